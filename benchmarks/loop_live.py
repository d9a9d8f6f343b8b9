"""make bench-loop --part live: the learning loop with everything real. One `crosssim serve` (its own process, on
loopback: HTTP, ledger, registry, rollouts) answers a simulated hospital's weekly studies; the read worklist is
``GET /v1/worklist``; each read returns ``delay`` weeks later to ``POST /v1/feedback``; and each week's cycle is a
run of the deployment ``crosssim-continuous-learning/<site>``, served by `crosssim serve-flows` (its own process)
on a Prefect server (its own process): the running rollout analysed and, under ``rollout.policy: auto``, promoted
or rolled back; the matured reads exported, ingested into the site's DVC dataset, a warm-start challenger
registered and rolled out in shadow.

A week of the hospital is a few minutes here, so the worklist window is set to ``WINDOW_SECONDS``, and each week
lasts at least that long after its worklist: a worklist reads that week's studies only, as a weekly one would.
Truth, as in the strategies part: every champion's and challenger's AUC on the fixed held-out NIH patients.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch
from loop_simulation import WRONG_PROMOTION_MARGIN, Hospital
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL, temporary_settings
from servers import free_port, running_server

from pipeline.config import PipelineConfig
from pipeline.data.salt import salt_variables
from pipeline.evaluation import binary_metrics
from pipeline.evaluation.metrics import bootstrap_ci
from pipeline.loop.cycle import LOOP_THRESHOLD_TAG, prepare_gate_sites
from pipeline.models import Classifier, servable
from pipeline.registry.review import actions_for
from pipeline.registry.store import CHAMPION, ModelRegistry
from pipeline.registry.weights import WEIGHTS_TAG, load_weights, log_weights
from pipeline.retrain.promotion import HARMONISATION_TAG, IMAGE_SIZE_TAG, gate_challenger
from pipeline.rollout.drift import estimated_performance
from pipeline.serving.api_key import API_KEY_HEADER
from pipeline.serving.export import LoggedBundle, build_bundle, version_tags
from pipeline.serving.service import API_KEY_ENV
from pipeline.tracking import MlflowTracker, resolve_tracking_uri
from pipeline.training.inference import predict_proba

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
CROSSSIM = str(Path(sys.executable).parent / "crosssim")
MODEL_NAME = "bench-loop"
API_KEY = "bench-loop-key-0123456789abcdef"
SALT = "bench-loop-salt-0123456789abcdef"
WINDOW_SECONDS = 45.0  # the worklist window: longer than a week's serving, shorter than a week
SOURCE = "radiologist_read"
CPU = torch.device("cpu")


@dataclass
class LiveRun:
    weeks: list[dict] = field(default_factory=list)
    decisions: list[dict] = field(default_factory=list)
    cycles: list[dict] = field(default_factory=list)


def live_overrides(cfg: PipelineConfig, work: Path) -> list[str]:
    """Its own registry, ledger, image store, site dataset (a git + DVC repository) and exports; reads that count
    at once; promotions and roll backs by the rule alone (rollout.policy auto, loop.registry_gate false). The gate
    would decide on NIH's target-test patients, which are this benchmark's held-out truth: a decision taken on them
    would peek (and its point estimates on 231 images move by more than its 0.02 margin between equal models)."""
    repo = work / "site-repo"
    window_days = WINDOW_SECONDS / 86400
    return [
        f"tracking.local_dir={work / 'mlflow'}", f"registry.model_name={MODEL_NAME}", "registry.policy=review",
        f"serve.ledger_path={work / 'ledger.db'}", f"serve.image_store={work / 'images'}", "serve.poll_seconds=1",
        f"serve.sites=[{cfg.crosssim.target}]", "serve.export.int8=false", "rollout.maturity_hours=0",
        "rollout.policy=auto", "loop.registry_gate=false", f"loop.worklist_window_days={window_days}", f"loop.exports_dir={work / 'exports'}",
        f"ingest.dvc_target={repo / 'data'}", f"ingest.data_dir={repo / 'data' / 'raw'}", "ingest.push=false",
        *(f"ingest.{key}={work / key}" for key in ("quarantine_dir", "report_dir", "log_path")),
        f"runs.dir={work / 'runs'}",
    ]  # fmt: skip


def site_repository(repo: Path) -> None:
    """An empty git + DVC repository for the site's dataset (its first exported batch creates the site)."""
    from dvc.repo import Repo

    (repo / "data" / "raw").mkdir(parents=True)
    (repo / "data" / "raw" / ".keep").write_text("")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    Repo.init(str(repo))
    from pipeline.ingest.dvc_repo import DvcRepo

    DvcRepo(repo).add(repo / "data")


def register_start_champion(cfg: PipelineConfig, network: Classifier, threshold: float, chosen_on: str,
                            calibration: np.ndarray) -> str:  # fmt: skip
    """``network`` registered as a retraining run would register it (serving bundle, trainable weights), gated,
    and made champion by an audited override: the gate rightly rejects a Kermany model at NIH."""
    prepare_gate_sites(cfg)
    folder = Path(tempfile.mkdtemp(prefix="bench-loop-bundle-"))
    with MlflowTracker(cfg.tracking, run_name="bench-loop start champion") as tracker:
        model, example = servable(network, cfg.data.image_size)
        model_uri = tracker.log_model(model, "model", example)
        weights = log_weights(tracker, network)
        bundle = build_bundle(
            model, backbone=cfg.train.backbone, preprocessing=cfg.data.preprocessing(), threshold=threshold,
            threshold_chosen_on=chosen_on, golden=calibration[:8], calibration=calibration, eval_sets={},
            settings=cfg.serve.export, directory=folder,
        )  # fmt: skip
        tracker.log_artifacts(folder, f"serving/{MODEL_NAME}")
    logged = LoggedBundle(MODEL_NAME, f"runs:/{tracker.run_id}/serving/{MODEL_NAME}", bundle)
    tags = {IMAGE_SIZE_TAG: str(cfg.data.image_size), HARMONISATION_TAG: cfg.data.harmonisation,
            "backbone": cfg.train.backbone, "model_kind": "source", WEIGHTS_TAG: weights, "mlflow_run_id": tracker.run_id}  # fmt: skip
    actions = actions_for(cfg)
    card = lambda version: f"make run's Kermany-trained {cfg.train.backbone} (bench-loop start champion)"  # noqa: E731
    version = actions.register_challenger(
        model_uri, tags, card, actor="bench-loop", own_tags={MODEL_NAME: version_tags(logged)}
    ).version
    decision, _ = gate_challenger(cfg, model_uri)
    actions.record_gate(version, decision, "review")
    actions.approve("bench-loop", "start champion of the live loop (issue 30): make run's model, whatever the gate "
                    "says at NIH", version, override_gate=not decision.passed)  # fmt: skip
    return version


def run_live(cfg: PipelineConfig, overrides: list[str], deployment: str, hospital: Hospital, files: list[Path],
             weeks: list[np.ndarray], start_threshold: float, budget: int, delay: int, strategy: str, log=print) -> LiveRun:  # fmt: skip
    """The weeks through one `crosssim serve`, a continuous-learning cycle after each (the module's text);
    ``files``: each replayed image's file, as the hospital sends it."""
    site = hospital.site
    port = free_port()
    env = os.environ | {API_KEY_ENV: API_KEY, salt_variables(site, cfg.ingest)[0]: SALT}
    settings = [*overrides, f"serve.port={port}"]
    command = [CROSSSIM, "serve", "--config", str(PARAMS), *(a for s in settings for a in ("--set", s))]
    base, admin = f"http://127.0.0.1:{port}", {API_KEY_HEADER: API_KEY}
    registry = ModelRegistry(resolve_tracking_uri(cfg.tracking))
    result, asked, held_out = LiveRun(), {}, {}
    answered: dict[str, int] = {}  # inference id → image row
    with running_server(command, f"{base}/readyz", env, Path(cfg.serve.ledger_path).parent / "serve.log"), \
            httpx.Client(base_url=base, timeout=120) as client:  # fmt: skip
        for week, studies in enumerate(weeks):
            started = time.perf_counter()
            served_p = []
            for row in studies:
                form = {"site": site, "patient_id": str(hospital.patients[row]), "study_id": f"study-{row}"}
                answer = client.post(
                    "/v1/predict", files={"file": (files[row].name, files[row].read_bytes())}, data=form
                )
                answer.raise_for_status()
                answered[answer.json()["inference_id"]] = int(row)
                served_p.append(answer.json()["probability"])
            threshold = answer.json()["threshold"]
            worklist = client.get(
                "/v1/worklist", params={"site": site, "budget": budget, "strategy": strategy}, headers=admin
            )
            worklist.raise_for_status()
            asked_at = time.perf_counter()
            asked[week] = [item["inference_id"] for item in worklist.json()["items"]]
            for inference_id in asked.get(week - delay, []):
                label = ("normal", "pneumonia")[int(hospital.labels[answered[inference_id]])]
                client.post("/v1/feedback", headers=admin,
                            json={"inference_id": inference_id, "label": label, "source": SOURCE}).raise_for_status()  # fmt: skip
            cycle_started = time.perf_counter()
            cycle = run_cycle(deployment, overrides)
            cycle_seconds = time.perf_counter() - cycle_started
            client.post("/v1/admin/reload", headers=admin).raise_for_status()
            champion = str(registry.find(MODEL_NAME, CHAMPION).version)
            for version in {champion, *([cycle.version] if cycle.version else [])} - held_out.keys():
                held_out[version] = _held_out(registry, version, hospital, start_threshold)
            labelled = sum(len(asked.get(w, [])) for w in range(week - delay + 1))
            y = hospital.labels[studies]
            result.cycles.append({"week": week, "status": cycle.status, "reason": cycle.reason, "version": cycle.version,
                                  "rollout": cycle.rollout, "seconds": cycle_seconds})  # fmt: skip
            row = {
                "week": week, "labelled": labelled, "asked": len(asked[week]), "champion": champion,
                **{key: value for key, value in held_out[champion].items() if key != "scores"},
                "threshold": threshold, "estimated_auc": estimated_performance(np.array(served_p), threshold).auc,
                "served_week_auc": binary_metrics(y, np.array(served_p), threshold)["auc"],
                "cycle": cycle.status, "why": cycle.reason, "cycle_seconds": cycle_seconds,
                "candidate_auc": held_out[cycle.version]["auc"] if cycle.version else None,
            }  # fmt: skip
            result.weeks.append(row)
            if len(result.weeks) > 1 and result.weeks[-2]["champion"] != champion:
                before = result.weeks[-2]["champion"]
                promoted = {"week": week, "decision": "promote", "challenger": champion, "champion": before,
                            "challenger_auc": held_out[champion]["auc"], "champion_auc": held_out[before]["auc"]}  # fmt: skip
                promoted["wrong"] = promoted["challenger_auc"] < promoted["champion_auc"] - WRONG_PROMOTION_MARGIN
                result.decisions.append(promoted)
            log(f"  live week {week}: {labelled} reads, champion v{champion} AUC {row['auc']:.3f}; cycle {cycle.status} "
                f"({cycle_seconds:.0f} s): {cycle.reason}; rollout: {cycle.rollout}")  # fmt: skip
            wait = WINDOW_SECONDS - (time.perf_counter() - asked_at)
            if wait > 0:  # next week's worklist must not see this week's studies
                time.sleep(wait)
            row["wall_seconds"] = time.perf_counter() - started
    result.decisions += _rollbacks(registry)
    return result


@dataclass(frozen=True)
class Cycle:
    status: str
    reason: str
    version: str | None  # registered by this cycle
    rollout: str | None


@contextmanager
def serving_flows(overrides: list[str], api_url: str, site: str, log: Path) -> Iterator[str]:
    """`crosssim serve-flows` (its own process) with the live settings as the deployments' defaults; yields the
    site's continuous-learning deployment once the server lists it."""
    command = [CROSSSIM, "serve-flows", "--config", str(PARAMS), *(a for s in overrides for a in ("--set", s))]
    env = os.environ | {"PREFECT_API_URL": api_url, "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    name = f"crosssim-continuous-learning/{site}"
    with open(log, "w") as output:
        process = subprocess.Popen(command, cwd=PARAMS.parent, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        with temporary_settings({PREFECT_API_URL: api_url}):
            deadline = time.monotonic() + 180
            while not _deployed(name):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"crosssim serve-flows did not serve {name}; see {log}")
                time.sleep(1)
            yield name
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


def _deployed(name: str) -> bool:
    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(name)
            return True
        except ObjectNotFound:
            return False


def run_cycle(deployment: str, overrides: list[str]) -> Cycle:
    """One run of the deployment (inside ``serving_flows``), read back from the markdown artifact it leaves."""
    flow_run = run_deployment(deployment, parameters={"overrides": overrides}, timeout=900)
    if not flow_run.state.is_completed():
        raise RuntimeError(f"{deployment}: {flow_run.state.name}: {flow_run.state.message}")
    with get_client(sync_client=True) as client:
        (note,) = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id])),
                                        limit=1)  # fmt: skip
    lines = note.data.splitlines()
    version = re.search(r"^- challenger: v(\d+)", note.data, re.M)
    rollout = re.search(r"^- rollout: (.*)$", note.data, re.M)
    return Cycle(lines[0].rsplit(": ", 1)[1], lines[2], version and version.group(1), rollout and rollout.group(1))


def _held_out(registry: ModelRegistry, version: str, hospital: Hospital, start_threshold: float) -> dict:
    """The version's held-out AUC (95% CI), sensitivity and specificity at the threshold it serves at."""
    network = load_weights(registry, MODEL_NAME, version)
    scores = predict_proba(network, hospital.eval_images, CPU).astype(np.float64)
    threshold = float(registry.version(MODEL_NAME, version).tags.get(LOOP_THRESHOLD_TAG, start_threshold))
    point = binary_metrics(hospital.eval_labels, scores, threshold)
    low, high = bootstrap_ci(hospital.eval_labels, scores, threshold, 500)["auc"]
    return {"auc": point["auc"], "auc_low": low, "auc_high": high, "sensitivity": point["sensitivity"],
            "specificity": point["specificity"]}  # fmt: skip


def _rollbacks(registry: ModelRegistry) -> list[dict]:
    """Versions the rollout rejected (their review.status tag)."""
    return [{"decision": "rollback", "challenger": str(v.version), "wrong": False}
            for v in registry.versions(MODEL_NAME) if v.tags.get("review.status") == "rejected"]  # fmt: skip
