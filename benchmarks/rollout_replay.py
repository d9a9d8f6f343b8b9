"""The rollout benchmark's live part: the models registered as a retrain would register them, and the NIH
target-test films replayed through one `crosssim serve` (its own process, on loopback) during real rollouts, each
radiologist read posted to /v1/feedback ``delay`` films later, and the rollout analysed after every ``batch``
reads, as the hourly analysis would. The better and the equivalent challenger run in shadow, the worse one in
canary at the schedule's first share. What the ledger recorded — both models' scores of every film — is the pool
the resampled streams of ``benchmarks/rollout.py`` are drawn from.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from rollout_models import RolloutData, ServedModel
from servers import free_port, running_server

from pipeline.config import PipelineConfig
from pipeline.data.salt import salt_variables
from pipeline.models import servable
from pipeline.registry.store import CHALLENGER, CHAMPION, ModelRegistry
from pipeline.rollout.actions import rollout_actions
from pipeline.rollout.analysis import analyse_rollout
from pipeline.serving.api_key import API_KEY_HEADER
from pipeline.serving.export import LoggedBundle, build_bundle, version_tags
from pipeline.serving.ledger import PredictionLedger
from pipeline.serving.service import API_KEY_ENV
from pipeline.tracking import MlflowTracker, resolve_tracking_uri

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
CROSSSIM = str(Path(sys.executable).parent / "crosssim")
MODEL_NAME = "bench-rollout"
API_KEY = "bench-rollout-key-0123456789abcdef"
SALT = "bench-rollout-salt-0123456789abcdef"
MODES = {"better": "shadow", "worse": "canary", "equivalent": "shadow"}
SOURCE = "radiologist_read"


@dataclass(frozen=True)
class Replay:
    challenger: str
    mode: str
    served: int  # films answered
    labelled: int  # reads posted
    first_decision: str  # the analysis's first non-continue verdict, or continue
    decided_at: int | None  # labelled cases when it came
    final_decision: str
    answered_by: dict[str, int]  # arm → films it answered
    champion: np.ndarray  # both models' served probabilities, in NIH target-test order
    challenger_p: np.ndarray
    max_abs_difference_from_pytorch: float  # served (decode, preprocess, ONNX) vs the prepared images in PyTorch
    seconds: float


def replay_config(cfg: PipelineConfig, work: Path) -> list[str]:
    """Overrides that give the replay its own registry, ledger and image store, and labels that count at once
    (the delay is in the replay order: a read arrives ``delay`` films after its film)."""
    return [f"tracking.local_dir={work / 'mlflow'}", f"registry.model_name={MODEL_NAME}", "registry.policy=review",
            f"serve.ledger_path={work / 'ledger.db'}", f"serve.image_store={work / 'images'}", "serve.poll_seconds=1",
            f"serve.sites=[{cfg.crosssim.target}]", "serve.export.int8=false", "rollout.maturity_hours=0",
            "rollout.policy=review"]  # fmt: skip


def register_models(cfg: PipelineConfig, models: dict[str, ServedModel], data: RolloutData) -> dict[str, str]:
    """Each model a registered version with its serving bundle (ONNX, threshold, drift reference); name → version.
    The equivalent challenger is the champion's logged model and bundle registered again, as a user re-registering
    it would: a new version of the very same artifacts."""
    registry = ModelRegistry(resolve_tracking_uri(cfg.tracking))
    val_images, _ = data.source.subset(data.source.manifest["split"] == "val")
    calibration = np.asarray(val_images)[: cfg.serve.export.calibration_images]
    versions, logged = {}, {}
    for name, served in models.items():
        if name != "equivalent":
            logged[name] = _log_with_bundle(cfg, served, calibration)
        run_id, model_uri, bundle = logged["champion" if name == "equivalent" else name]
        version = str(registry.register(MODEL_NAME, model_uri, {"mlflow_run_id": run_id, "bench.model": name}).version)
        registry.set_version_tags(MODEL_NAME, version, version_tags(bundle))
        versions[name] = version
    registry.move_alias(MODEL_NAME, CHAMPION, versions["champion"])
    return versions


def _log_with_bundle(cfg: PipelineConfig, served: ServedModel, calibration: np.ndarray) -> tuple[str, str, LoggedBundle]:
    """The model logged to its own MLflow run with its serving bundle, as registration logs them."""
    model, example = servable(served.model, cfg.data.image_size)
    folder = Path(cfg.serve.image_store).parent / f"bundle-{served.name}"
    with MlflowTracker(cfg.tracking, run_name=f"bench-rollout {served.name}") as tracker:
        model_uri = tracker.log_model(model, "model", example)
        bundle = build_bundle(
            model, backbone=cfg.train.backbone, preprocessing=cfg.data.preprocessing(), threshold=served.threshold,
            threshold_chosen_on=served.threshold_chosen_on, golden=calibration[:8], calibration=calibration,
            eval_sets={}, settings=cfg.serve.export, directory=folder,
        )  # fmt: skip
        tracker.log_artifacts(folder, f"serving/{MODEL_NAME}")
    return tracker.run_id, model_uri, LoggedBundle(MODEL_NAME, f"runs:/{tracker.run_id}/serving/{MODEL_NAME}", bundle)


def replay_all(cfg: PipelineConfig, overrides: list[str], versions: dict[str, str], data: RolloutData,
               offline: dict[str, np.ndarray], delay: int, batch: int, seed: int) -> dict[str, Replay]:  # fmt: skip
    """One `crosssim serve` process, running as a hospital's would, while the challengers are rolled out in turn."""
    site = cfg.crosssim.target
    port = free_port()
    env = os.environ | {API_KEY_ENV: API_KEY, salt_variables(site, cfg.ingest)[0]: SALT}
    settings = [*overrides, f"serve.port={port}"]
    command = [CROSSSIM, "serve", "--config", str(PARAMS), *(a for s in settings for a in ("--set", s))]
    log = Path(cfg.serve.ledger_path).parent / "serve.log"
    base = f"http://127.0.0.1:{port}"
    with running_server(command, f"{base}/readyz", env, log), httpx.Client(base_url=base, timeout=60) as client:
        return {name: _replay(client, cfg, name, versions[name], data, offline, delay, batch, seed) for name in MODES}


def _replay(client: httpx.Client, cfg: PipelineConfig, name: str, version: str, data: RolloutData,
            offline: dict[str, np.ndarray], delay: int, batch: int, seed: int) -> Replay:  # fmt: skip
    """One rollout of challenger ``version`` with the NIH target-test films streamed through the server."""
    started = time.perf_counter()
    rollouts = rollout_actions(cfg)
    registry = rollouts.actions.registry
    registry.move_alias(MODEL_NAME, CHALLENGER, version)
    rollout = rollouts.start(MODES[name], "bench-rollout", f"{name} challenger on the replayed NIH stream")
    admin = {API_KEY_HEADER: API_KEY}
    site, rows = cfg.crosssim.target, data.nih_test
    order = np.random.default_rng(seed).permutation(len(rows))
    ledger = PredictionLedger(f"sqlite:///{cfg.serve.ledger_path}")
    answers: dict[int, str] = {}  # NIH test position → inference id
    first, decided_at, labelled = "continue", None, 0
    try:
        client.post("/v1/admin/reload", headers=admin).raise_for_status()  # follow the new rollout now, not at the next poll
        for step, position in enumerate([*order, *([None] * delay)]):
            if position is not None:
                row = rows.iloc[position]
                path = Path(row["path"])
                form = {"site": site, "patient_id": row["patient_id"], "study_id": row["image_id"]}
                answer = client.post("/v1/predict", files={"file": (path.name, path.read_bytes())}, data=form)
                answer.raise_for_status()
                answered = answer.json()
                if answered["arm"] is None:
                    raise RuntimeError(f"crosssim serve answered outside the rollout {rollout.describe()}")
                answers[int(position)] = answered["inference_id"]
            if step < delay:
                continue
            read_of = int(order[step - delay])  # the read of the film served `delay` films ago arrives now
            label = ("normal", "pneumonia")[int(rows.iloc[read_of]["label"])]
            client.post("/v1/feedback", headers=admin,
                        json={"inference_id": answers[read_of], "label": label, "source": SOURCE}).raise_for_status()  # fmt: skip
            labelled += 1
            if labelled % batch == 0 and first == "continue":
                analysis = analyse_rollout(ledger, rollout, cfg.rollout)
                if analysis.decision != "continue":
                    first, decided_at = analysis.decision, analysis.labelled
        final = analyse_rollout(ledger, rollout, cfg.rollout)
        by_id = {case.inference_id: case for case in final.cases}
        cases = [by_id[answers[position]] for position in range(len(rows))]
    finally:
        ledger.close()
        rollouts.stop("bench-rollout", "replay over")
        registry.move_alias(MODEL_NAME, CHALLENGER, None)
    champion = np.array([case.champion for case in cases])
    challenger = np.array([case.challenger for case in cases])
    difference = max(np.abs(champion - offline["champion"]).max(), np.abs(challenger - offline[name]).max())
    return Replay(name, MODES[name], len(answers), labelled, first, decided_at, final.decision, final.answered_by,
                  champion, challenger, float(difference), time.perf_counter() - started)  # fmt: skip
