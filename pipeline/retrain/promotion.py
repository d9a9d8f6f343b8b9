"""Registration and the promotion gate: the last stage of a retraining run.

    challenger = the run's deployable model (CrossSim-adapted when adaptation ran, else the source model)
    scores     = challenger and champion on the same frozen evaluation sets, per site (gate_sets)
    decision   = pipeline.registry.gate.decide(...)        → logged to the run (gate/*.json, metrics)
    bundles    = pipeline.serving.export.build_bundle(...) → ONNX FP32 + INT8 of challenger and student, checked
                                                           on the same sets, logged to the run under serving/<name>/
    card       = pipeline.registry.card.model_card(...)    → run artifact + version description
    register   → alias challenger (+ paired student); record_gate → tags, audit, and under `auto` the decision
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow.pytorch
import numpy as np
import pandas as pd

from pipeline.config import PipelineConfig
from pipeline.crosssim.stage import ADAPTED_MODEL
from pipeline.data.prepare import open_prepared, prepare_dataset
from pipeline.data.preprocessing import Preprocessing
from pipeline.evaluation import ScoredModel
from pipeline.registry.card import CardFacts, model_card
from pipeline.registry.gate import GateDecision, decide, score_set
from pipeline.registry.review import Decision, actions_for, student_name
from pipeline.registry.store import CHAMPION, ModelRegistry
from pipeline.registry.weights import WEIGHTS_TAG
from pipeline.retrain.adaptation import AdaptationOutcome
from pipeline.retrain.data import CrossSimData, crosssim_data
from pipeline.retrain.source import SOURCE_WEIGHTS
from pipeline.serving.export import LoggedBundle, build_bundle, version_tags
from pipeline.serving.runtime import torch_probabilities
from pipeline.tracking import resolve_tracking_uri
from pipeline.training.handlers import BEST_CHECKPOINT

IMAGE_SIZE_TAG = "image_size"
HARMONISATION_TAG = "harmonisation"  # absent on versions registered before harmonisation existed: none


def gate_sets(
    cfg: PipelineConfig, preprocessing: Preprocessing, shared: CrossSimData | None = None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each frozen set's images and labels (``gate_frames``)."""
    return {
        name: (images, rows["label"].to_numpy(dtype=np.int64))
        for name, (images, rows) in gate_frames(cfg, preprocessing, shared).items()
    }


def gate_frames(
    cfg: PipelineConfig, preprocessing: Preprocessing, shared: CrossSimData | None = None
) -> dict[str, tuple[np.ndarray, pd.DataFrame]]:
    """The frozen evaluation sets, images and manifest rows: source test, and each external site's labelled
    images (for the CrossSim target only its held-out target-test: adaptation saw the rest), prepared with
    ``preprocessing`` since a champion may have been trained at another size or harmonisation. ``shared``: the
    run's CrossSim split, if built."""
    source = open_prepared(cfg.data.prepared_site(cfg.data.source))
    rows = {f"{cfg.data.source}/test": source.manifest[source.manifest["split"] == "test"]}
    for site in cfg.data.external:
        if cfg.crosssim.enabled and site == cfg.crosssim.target:
            rows[f"{site}/target-test"] = (shared or crosssim_data(cfg, source)).target_test[1]
        else:
            external = open_prepared(cfg.data.prepared_site(site))
            rows[site] = external.manifest[external.manifest["label"].notna()]
    sets = {}
    for name, frame in rows.items():
        prepared = prepare_dataset(frame.reset_index(drop=True), preprocessing, cfg.data.cache_dir)
        sets[name] = (np.asarray(prepared.images), prepared.manifest)
    return sets


def registered_preprocessing(tags: dict[str, str], default: Preprocessing) -> Preprocessing:
    """How a registered version's inputs are made, from its tags (``default``'s size where the tag is missing)."""
    size = int(tags.get(IMAGE_SIZE_TAG, default.image_size))
    return Preprocessing(size, tags.get(HARMONISATION_TAG, "none"))


def score_registered(model_uri: str, sets: dict[str, tuple[np.ndarray, np.ndarray]], specificity: float) -> dict[str, dict[str, float]]:
    """A registered model's gate scores on every frozen set."""
    model = mlflow.pytorch.load_model(model_uri, map_location="cpu")
    return {name: score_set(labels, torch_probabilities(model, images), specificity) for name, (images, labels) in sets.items()}


def gate_challenger(
    cfg: PipelineConfig,
    challenger_uri: str,
    sets: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    shared: CrossSimData | None = None,
) -> tuple[GateDecision, dict[str, Any]]:
    """Score challenger and champion on the same sets and apply the gate; returns the decision and both scores.

    ``sets``: the frozen sets of this configuration's preprocessing when the caller has them already (gate_sets).
    """
    registry = ModelRegistry(resolve_tracking_uri(cfg.tracking))
    ours = cfg.data.preprocessing()
    sets = sets if sets is not None else gate_sets(cfg, ours, shared)  # loading sites is the slow part
    challenger = score_registered(challenger_uri, sets, cfg.registry.specificity)
    champion_version = registry.find(cfg.registry.model_name, CHAMPION)
    champion, label = None, None
    if champion_version is not None:
        theirs = registered_preprocessing(champion_version.tags, ours)
        champion_sets = sets if theirs == ours else gate_sets(cfg, theirs, shared)
        champion = score_registered(f"models:/{cfg.registry.model_name}@{CHAMPION}", champion_sets, cfg.registry.specificity)
        label = f"champion v{champion_version.version}"
    decision = decide(challenger, champion, cfg.registry, label)
    return decision, {"challenger": challenger, "champion": champion}


def export_images(cfg: PipelineConfig, shared: CrossSimData | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The golden images (the first ``golden_images`` source-test images by image_id: frozen) and the INT8
    calibration images (spread over source-val and, with CrossSim, its target-train: never a gate set)."""
    settings = cfg.serve.export
    source = open_prepared(cfg.data.prepared_site(cfg.data.source))
    test = source.manifest[source.manifest["split"] == "test"].sort_values("image_id").head(settings.golden_images)
    pools = [source.subset(source.manifest["split"] == "val")[0]]
    if cfg.crosssim.enabled:
        pools.append((shared or crosssim_data(cfg, source)).target_train.images)
    share = settings.calibration_images // len(pools)
    calibration = [pool[np.linspace(0, len(pool) - 1, min(share, len(pool))).astype(int)] for pool in pools]
    return source.images_of(test), np.concatenate(calibration)


@dataclass(frozen=True)
class Deployable:
    """A model about to be registered, as its serving bundle describes it."""

    name: str  # the registered model it becomes a version of
    model_uri: str
    backbone: str
    threshold: float
    threshold_chosen_on: str


def export_bundles(
    cfg: PipelineConfig,
    tracker,
    models: list[Deployable],
    sets: dict[str, tuple[np.ndarray, np.ndarray]],
    shared: CrossSimData | None = None,
) -> list[LoggedBundle]:
    """Each model's serving bundle, logged to the run under ``serving/<name>/``; INT8 is checked on the gate's
    frozen ``sets``."""
    golden, calibration = export_images(cfg, shared)
    logged = []
    for model in models:
        with tempfile.TemporaryDirectory(prefix="crosssim-serving-") as folder:
            bundle = build_bundle(
                mlflow.pytorch.load_model(model.model_uri, map_location="cpu"),
                backbone=model.backbone,
                preprocessing=cfg.data.preprocessing(),
                threshold=model.threshold,
                threshold_chosen_on=model.threshold_chosen_on,
                golden=golden,
                calibration=calibration,
                eval_sets=sets,
                settings=cfg.serve.export,
                directory=Path(folder),
            )
            tracker.log_artifacts(Path(folder), artifact_path=f"serving/{model.name}")
        logged.append(LoggedBundle(model.name, f"runs:/{tracker.run_id}/serving/{model.name}", bundle))
    return logged


@dataclass(frozen=True)
class Registration:
    """What registering a run's model did: its version, the gate's verdict, the last action and the aliases now."""

    name: str
    version: str
    gate_passed: bool
    decision: str
    aliases: dict[str, str]


def register_run(
    cfg: PipelineConfig,
    tracker,
    model_uri: str,
    evaluation: ScoredModel,
    crosssim: AdaptationOutcome | None,
    data: dict[str, dict[str, Any]],
    provenance: dict[str, str],
    shared: CrossSimData | None = None,
) -> Registration:
    """Gate, card and register the run's deployable model (the adapted one when adaptation ran, else the source
    model at ``model_uri``).

    ``data``: site → {"version", "images"}; ``provenance``: git_commit / prefect_flow_run_id / mlflow_run_id; all
    become version tags (the lineage). ``shared``: the run's CrossSim split, when it has one.
    """
    challenger_uri = crosssim.adapted_uri if crosssim else model_uri
    student_uri = crosssim.student_uri if crosssim else None
    frozen = gate_sets(cfg, cfg.data.preprocessing(), shared)  # the gate's sets, and the sets INT8 is checked on
    decision, scores = gate_challenger(cfg, challenger_uri, frozen, shared)
    tracker.log_dict(decision.to_dict() | {"scores": scores}, "registry/gate.json")
    tracker.log_metrics(
        {
            f"gate.{row.set.replace('/', '_')}.{row.metric}.{who}": value
            for row in decision.rows
            for who, value in (("challenger", row.challenger), ("champion", row.champion), ("required", row.threshold))
            if value is not None
        }
    )
    # the registered model's own numbers: the adapted model's when adaptation ran, not the source model's
    scored = crosssim.scores["adapted"] if crosssim else evaluation
    bundles = None
    if cfg.serve.export.enabled:
        deployables = [
            Deployable(cfg.registry.model_name, challenger_uri, cfg.train.backbone, scored.threshold, scored.threshold_chosen_on)
        ]
        if student_uri is not None:  # the student answers at its own threshold, chosen by the same rule
            student = crosssim.scores["student"]
            deployables.append(
                Deployable(
                    student_name(cfg.registry.model_name),
                    student_uri,
                    cfg.crosssim.distill.student_backbone,
                    student.threshold,
                    student.threshold_chosen_on,
                )
            )
        bundles = export_bundles(cfg, tracker, deployables, frozen, shared)
    kind = f"CrossSim-adapted {cfg.train.backbone}" if crosssim else cfg.train.backbone
    weights = f"crosssim/{ADAPTED_MODEL}" if crosssim else f"{SOURCE_WEIGHTS}/{BEST_CHECKPOINT}"  # trainable copies
    tags = {
        **{f"data_version.{site}": info["version"] for site, info in data.items()},
        **{key: value for key, value in provenance.items() if value},
        IMAGE_SIZE_TAG: str(cfg.data.image_size),
        HARMONISATION_TAG: cfg.data.harmonisation,
        "backbone": cfg.train.backbone,
        "model_kind": "adapted" if crosssim else "source",
        "parent_model": model_uri if crosssim else "",
        WEIGHTS_TAG: f"runs:/{tracker.run_id}/{weights}",
    }

    def card(version: str) -> str:
        text = model_card(
            CardFacts(
                name=cfg.registry.model_name,
                version=version,
                model=f"{kind}, input {cfg.data.preprocessing().describe()}",
                lineage={
                    key: value
                    for key, value in tags.items()
                    if value and key not in (IMAGE_SIZE_TAG, HARMONISATION_TAG, "backbone", WEIGHTS_TAG)
                },
                data=data,
                scored=scored,
                config=cfg.model_dump(mode="json", include={"data", "augment", "train", "crosssim"}),
                crosssim=crosssim.gap if crosssim else None,
                gate=decision.to_dict(),
                serving=bundles,
            )
        )
        path = Path(cfg.evaluate.output_dir) / "model_card.md"
        path.write_text(text)
        tracker.log_artifact(path, artifact_path="registry")
        return text

    actions = actions_for(cfg)
    serving_tags = {logged.name: version_tags(logged) for logged in bundles or []}
    registered: Decision = actions.register_challenger(challenger_uri, tags, card, student_uri, own_tags=serving_tags)
    decided = actions.record_gate(registered.version, decision, cfg.registry.policy)
    return Registration(cfg.registry.model_name, registered.version, decision.passed, decided.action, decided.aliases)
