"""One site's weekly learning-loop cycle: its matured reads out of the serving ledger → a batch ingested into the
site's dataset → a warm-start challenger (pipeline.loop.retrain) → registered behind the promotion gate → a shadow
rollout. The rollout-analysis deployment (or the next cycle's first step) then promotes or rolls it back on the
site's own outcomes.

Every step can be repeated without doing its work twice, so a cycle killed anywhere is finished by the next run:

- export marks the cases it writes in the ledger in the same step the batch folder appears
  (pipeline.rollout.export); the folder waits in ``loop.exports_dir/<site>/`` until ingested;
- a waiting batch is ingested (ingest skips a batch it accepted before: its fingerprint is in the ingest log),
  then moved to ``ingested/`` (a rejected one, quarantined by ingest, to ``rejected/``);
- a challenger is trained only when the site's data version differs from the one the site's newest loop
  version was trained on (version tag ``data_version.<site>``); registration is all or nothing
  (RegistryActions.register_challenger), so a kill mid-retrain leaves no version and the next cycle retrains;
- the shadow rollout starts when the newest loop version is the pending challenger and no rollout runs.

A week without new reads (nothing exported, the data version unchanged) trains nothing and says so; neither does a
week in which a rollout is still undecided (a new challenger would take the alias from the one being judged): the
cycle after its decision trains on every read so far.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from mlflow.entities.model_registry import ModelVersion

from pipeline.config import PipelineConfig
from pipeline.crosssim.engine import DomainData
from pipeline.data.prepare import prepare_dataset
from pipeline.data.readers import read_dataset
from pipeline.evaluation import ScoredModel, evaluate_sites
from pipeline.loop.curve import HELD_OUT_AUC_TAG, LOOP_READS_TAG, LOOP_SITE_TAG
from pipeline.loop.retrain import WarmStartResult, warm_start_retrain
from pipeline.models import servable
from pipeline.registry.card import CardFacts, model_card
from pipeline.registry.review import actions_for
from pipeline.registry.store import CHALLENGER, CHAMPION, ModelRegistry, RegistryError
from pipeline.registry.weights import WEIGHTS_TAG, load_weights, log_weights
from pipeline.retrain import sites
from pipeline.retrain.promotion import (
    HARMONISATION_TAG,
    IMAGE_SIZE_TAG,
    Deployable,
    Registration,
    export_bundles,
    gate_challenger,
    gate_frames,
    registered_preprocessing,
)
from pipeline.rollout.actions import rollout_actions
from pipeline.rollout.export import ExportError, dataset_patients, export_labelled_cases
from pipeline.serving.export import version_tags
from pipeline.serving.image_store import ImageStore
from pipeline.serving.ledger import PredictionLedger
from pipeline.tracking import resolve_tracking_uri
from pipeline.training.inference import predict_proba
from pipeline.versioning import dataset_version

LOOP_THRESHOLD_TAG = "loop.threshold"  # the operating point the version serves at (its bundle holds it too)
INGESTED, REJECTED = "ingested", "rejected"
CycleStatus = Literal["retrained", "skipped", "up to date", "waiting"]


@dataclass(frozen=True)
class CycleResult:
    """What one site's cycle did: its status and why, and what it made."""

    site: str
    status: CycleStatus
    reason: str
    exported: int = 0  # cases exported this cycle
    ingested: list[str] = field(default_factory=list)  # batch folders ingested
    data_version: str = ""
    reads: int = 0  # labelled cases the challenger learnt from (fine-tuning + calibration)
    version: str | None = None
    gate_passed: bool | None = None
    rollout: str | None = None
    retrain_seconds: float | None = None

    def markdown(self) -> str:
        lines = [f"# Learning loop at {self.site}: {self.status}", "", self.reason, ""]
        lines += [f"- exported this cycle: {self.exported} labelled cases", f"- batches ingested: {len(self.ingested)}"]
        lines += [f"- site data version: `{self.data_version}`"]
        if self.version is not None:
            gate = "passed" if self.gate_passed else "failed"
            lines += [
                f"- challenger: v{self.version} on {self.reads} reads ({self.retrain_seconds:.0f} s); gate {gate}"
            ]
        if self.rollout:
            lines += [f"- rollout: {self.rollout}"]
        return "\n".join(lines) + "\n"


def site_folder(cfg: PipelineConfig, site: str) -> Path:
    return cfg.ingest.data_dir / site


def site_data_version(cfg: PipelineConfig, site: str) -> str:
    """The DVC md5 of the site's dataset folder ("" before its first batch)."""
    folder = site_folder(cfg, site)
    return dataset_version(folder) if folder.is_dir() else ""


def export_reads(
    cfg: PipelineConfig, ledger: PredictionLedger, site: str, now: datetime | None = None
) -> tuple[int, str]:
    """The site's new matured labelled cases as a batch folder under ``loop.exports_dir/<site>/``; (cases, what
    happened)."""
    now = now or datetime.now(timezone.utc)
    folder = cfg.loop.exports_dir / site / f"{now:%Y%m%dT%H%M%S%fZ}"
    try:
        batch = export_labelled_cases(
            ledger, ImageStore(cfg.serve.image_store, cfg.serve.image_retention_days), site, folder,
            cfg.rollout.outcome_sources, timedelta(hours=cfg.rollout.maturity_hours),
            dataset_patients(site_folder(cfg, site)), cfg.ingest.allow_known_patients, now,
        )  # fmt: skip
    except ExportError as exc:
        return 0, str(exc)
    return batch.cases, f"{batch.cases} labelled cases exported to {batch.folder}"


def waiting_batches(cfg: PipelineConfig, site: str) -> list[Path]:
    """Exported batch folders of ``site`` not yet ingested, oldest first (staging folders start with a dot)."""
    root = cfg.loop.exports_dir / site
    if not root.is_dir():
        return []
    return sorted(
        p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in (INGESTED, REJECTED)
    )


def file_batch(batch: Path, outcome: Literal["ingested", "rejected"]) -> Path:
    """Move a handled batch folder out of the waiting ones."""
    destination = batch.parent / outcome / batch.name
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(batch, destination)
    return destination


def newest_loop_version(registry: ModelRegistry, name: str, site: str) -> ModelVersion | None:
    found = [v for v in registry.versions(name) if v.tags.get(LOOP_SITE_TAG) == site]
    return found[-1] if found else None


def without_retrain(
    cfg: PipelineConfig, site: str, exported: int, ingested: list[str], export_said: str
) -> tuple[CycleStatus, str] | None:
    """Why this cycle trains nothing (its status and reason), or None when a challenger is due: the site's data
    version differs from the one its newest loop version was trained on and no rollout is still undecided."""
    registry = ModelRegistry(resolve_tracking_uri(cfg.tracking))
    newest = newest_loop_version(registry, cfg.registry.model_name, site)
    data_version = site_data_version(cfg, site)
    trained_on = newest.tags.get(f"data_version.{site}") if newest is not None else None
    if data_version and trained_on != data_version:
        running = rollout_actions(cfg).active()
        if running is None:
            return None
        # a challenger registered now would take the alias from the one being judged
        return "waiting", f"{running.describe()} is running: the next challenger is trained once it is decided"
    if not exported and not ingested:
        return "skipped", f"no new reads ({export_said})"
    return "up to date", f"v{newest.version} was trained on this data version"


def log_retrain(tracker, cfg: PipelineConfig, made: WarmStartResult, site: str, data_version: str) -> None:
    """The retrain's settings and figures into the cycle's MLflow run."""
    tracker.set_tags({LOOP_SITE_TAG: site, f"data_version.{site}": data_version})
    tracker.log_params(cfg.model_dump(mode="json", include={"loop", "train", "augment"}))
    tracker.log_metrics({"loop.reads": made.labelled + made.calibrated_on, "loop.retrain_seconds": made.seconds,
                         "loop.temperature": made.temperature, "loop.threshold": made.threshold})  # fmt: skip


def site_reads(cfg: PipelineConfig, site: str, champion: ModelVersion) -> DomainData:
    """Every labelled case of the site's dataset, prepared as the champion's inputs are."""
    manifest = read_dataset(site_folder(cfg, site))
    labelled = manifest[manifest["label"].notna()].reset_index(drop=True)
    prepared = prepare_dataset(
        labelled, registered_preprocessing(champion.tags, cfg.data.preprocessing()), cfg.data.cache_dir
    )
    return DomainData(f"{site} reads", np.asarray(prepared.images), prepared.manifest["label"].to_numpy("int64"))


def retrain_site(cfg: PipelineConfig, site: str, seed: int) -> tuple[WarmStartResult | None, ModelVersion, str]:
    """A warm-start challenger from the champion on the site's reads; (None, champion, why) when there is nothing
    to learn from yet."""
    registry = ModelRegistry(resolve_tracking_uri(cfg.tracking))
    name = cfg.registry.model_name
    champion = registry.find(name, CHAMPION)
    if champion is None:
        raise RegistryError(f"{name}: no champion to warm-start from (approve a first champion)")
    reads = site_reads(cfg, site, champion)
    if len(set(reads.labels.tolist())) < 2:
        return None, champion, f"{len(reads.labels)} reads at {site}, all of one class: nothing to fine-tune on yet"
    network = load_weights(registry, name, CHAMPION)
    return warm_start_retrain(network, reads, cfg.loop, cfg.train, cfg.augment, seed), champion, ""


def prepare_gate_sites(cfg: PipelineConfig) -> None:
    """The source and external sites read, split and prepared into ``cfg``'s run folder, as a retraining run
    does: the gate's frozen sets come from there (the same patient-disjoint splits, by the seed)."""
    for site in sites.sites(cfg):
        manifest, _ = sites.load_site(cfg, site)
        sites.prepare_site(cfg, site, manifest)


def register_loop_challenger(
    cfg: PipelineConfig,
    tracker,
    made: WarmStartResult,
    champion: ModelVersion,
    site: str,
    data_version: str,
    provenance: dict[str, str],
) -> Registration:
    """Log, gate, card and register the loop's challenger (tags ``loop.site`` and ``data_version.<site>``); the
    gate and ``registry.policy`` decide on it as on any retraining run's model. ``cfg``: in the cycle's run
    folder, its sites prepared (``prepare_gate_sites``)."""
    preprocessing = registered_preprocessing(champion.tags, cfg.data.preprocessing())
    served, example = servable(made.model, preprocessing.image_size)
    model_uri = tracker.log_model(served, name="model", input_example=example)
    weights_uri = log_weights(tracker, made.model)
    frames = gate_frames(cfg, preprocessing)
    frozen = {set_name: (images, rows["label"].to_numpy("int64")) for set_name, (images, rows) in frames.items()}
    decision, scores = gate_challenger(cfg, model_uri, frozen)
    tracker.log_dict(decision.to_dict() | {"scores": scores}, "registry/gate.json")
    with tempfile.TemporaryDirectory(prefix="crosssim-loop-eval-") as folder:
        predictions = {
            set_name: rows.assign(prob=predict_proba(made.model, images, torch.device("cpu")))
            for set_name, (images, rows) in frames.items()
        }
        scored = ScoredModel(made.threshold, made.threshold_chosen_on,
                             evaluate_sites(predictions, made.threshold, cfg.evaluate, Path(folder), seed=cfg.seed))  # fmt: skip
        tracker.log_artifacts(Path(folder), artifact_path="eval")
    bundles = None
    if cfg.serve.export.enabled:
        backbone = champion.tags.get("backbone", cfg.train.backbone)
        deployable = Deployable(cfg.registry.model_name, model_uri, backbone, made.threshold, made.threshold_chosen_on)
        bundles = export_bundles(cfg, tracker, [deployable], frozen)
    tags = {
        f"data_version.{site}": data_version,
        **{key: value for key, value in provenance.items() if value},
        IMAGE_SIZE_TAG: str(preprocessing.image_size),
        HARMONISATION_TAG: preprocessing.harmonisation,
        "backbone": champion.tags.get("backbone", cfg.train.backbone),
        "model_kind": "loop",
        "parent_model": f"models:/{cfg.registry.model_name}/{champion.version}",
        LOOP_SITE_TAG: site,
        LOOP_READS_TAG: str(made.labelled + made.calibrated_on),
        HELD_OUT_AUC_TAG: json.dumps({set_name: round(row["auc"], 4) for set_name, row in scored.headline().items()}),
        LOOP_THRESHOLD_TAG: f"{made.threshold:.6f}",
        WEIGHTS_TAG: weights_uri,
    }

    def card(version: str) -> str:
        return model_card(
            CardFacts(
                name=cfg.registry.model_name,
                version=version,
                model=f"{tags['backbone']} fine-tuned from v{champion.version} on {made.labelled} reads of {site} "
                f"(warm start, {cfg.loop.retrain_steps} steps; temperature {made.temperature:.3f} on {made.calibrated_on} "
                f"held-out reads), input {preprocessing.describe()}",
                lineage={
                    key: value
                    for key, value in tags.items()
                    if key not in (IMAGE_SIZE_TAG, HARMONISATION_TAG, WEIGHTS_TAG)
                },
                data={site: {"version": data_version, "images": made.labelled + made.calibrated_on}},
                scored=scored,
                config=cfg.model_dump(mode="json", include={"loop", "augment", "train"}),
                gate=decision.to_dict(),
                serving=bundles,
                notes=[
                    f"A learning-loop challenger for {site}: promoted only by its shadow rollout's decision rule "
                    '(README "Rollouts"), which its card then links.',
                    *(
                        []
                        if cfg.loop.registry_gate
                        else [
                            "The promotion gate below was not applied (loop.registry_gate "
                            "false): its scores are for information."
                        ]
                    ),
                ],  # fmt: skip
            )
        )

    actions = actions_for(cfg)
    own = {logged.name: version_tags(logged) for logged in bundles or []}
    registered = actions.register_challenger(model_uri, tags, card, actor="continuous-learning flow", own_tags=own)
    if not cfg.loop.registry_gate:  # its scores are in the card and the run; the rollout's rule decides
        return Registration(
            cfg.registry.model_name, registered.version, decision.passed, "gate not applied", registered.aliases
        )
    decided = actions.record_gate(registered.version, decision, cfg.registry.policy)
    return Registration(cfg.registry.model_name, registered.version, decision.passed, decided.action, decided.aliases)


def start_shadow(cfg: PipelineConfig, site: str) -> str:
    """A shadow rollout of the site's newest loop version, when it is the pending challenger and none runs."""
    registry = ModelRegistry(resolve_tracking_uri(cfg.tracking))
    newest = newest_loop_version(registry, cfg.registry.model_name, site)
    if newest is None:
        return "no loop version to roll out"
    challenger = registry.find(cfg.registry.model_name, CHALLENGER)
    if challenger is None or challenger.version != newest.version:
        return f"v{newest.version} is not the pending challenger (the gate or a reviewer decided on it)"
    if newest.tags.get("gate.passed") == "false":
        return (f"v{newest.version} failed the promotion gate: no rollout (a reviewer may approve it with "
                "--override-gate, or the next cycle's challenger tries again)")  # fmt: skip
    _, said = rollout_actions(cfg).auto_start(str(newest.version), "continuous-learning flow")
    return said
