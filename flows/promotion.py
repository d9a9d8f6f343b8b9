"""Registration and the promotion gate as run at the end of the retraining flow (and by the CLI).

    challenger = the run's deployable model (CrossSim-adapted when adaptation ran, else the source model)
    scores     = challenger and champion on the same frozen evaluation sets, per site (gate_sets)
    decision   = pipeline.registry.gate.decide(...)        → logged to the run (gate/*.json, metrics)
    card       = pipeline.registry.card.model_card(...)    → run artifact + version description
    register   → alias challenger (+ paired student); record_gate → tags, audit, and under `auto` the decision
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pytorch
import numpy as np
import torch

from flows import model_steps
from pipeline.config import PipelineConfig
from pipeline.data.prepare import open_prepared, prepare_dataset
from pipeline.registry.card import CardFacts, model_card
from pipeline.registry.gate import GateDecision, decide, score_set
from pipeline.registry.review import Decision, actions_for
from pipeline.registry.store import CHAMPION, ModelRegistry
from pipeline.tracking import resolve_tracking_uri

IMAGE_SIZE_TAG = "image_size"


def gate_sets(cfg: PipelineConfig, image_size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The frozen evaluation sets: source test, and each external site's labelled images (for the
    CrossSim target only its held-out target-test: adaptation saw the rest), prepared at ``image_size``
    since a champion may have been trained at another size."""
    source = open_prepared(cfg.data.prepared_site(cfg.data.source))
    rows = {f"{cfg.data.source}/test": source.manifest[source.manifest["split"] == "test"]}
    for site in cfg.data.external:
        if cfg.crosssim.enabled and site == cfg.crosssim.target:
            rows[f"{site}/target-test"] = model_steps.crosssim_data(cfg).target_test[1]
        else:
            external = open_prepared(cfg.data.prepared_site(site))
            rows[site] = external.manifest[external.manifest["label"].notna()]
    sets = {}
    for name, frame in rows.items():
        prepared = prepare_dataset(frame.reset_index(drop=True), image_size, cfg.data.cache_dir)
        sets[name] = (np.asarray(prepared.images), prepared.manifest["label"].to_numpy(dtype=np.int64))
    return sets


@torch.no_grad()
def served_probabilities(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    """P(pneumonia) from a registered (serving-form) model: uint8 (N, S, S) → float pixels in [0, 1]."""
    outputs = []
    for start in range(0, len(images), 256):
        batch = torch.from_numpy(np.asarray(images[start : start + 256], dtype=np.float32) / 255.0).unsqueeze(1)
        outputs.append(model(batch).float().cpu().numpy())
    return np.concatenate(outputs)


def score_registered(model_uri: str, sets: dict[str, tuple[np.ndarray, np.ndarray]], specificity: float) -> dict[str, dict[str, float]]:
    """A registered model's gate scores on every frozen set."""
    model = mlflow.pytorch.load_model(model_uri)
    return {name: score_set(labels, served_probabilities(model, images), specificity) for name, (images, labels) in sets.items()}


def gate_challenger(cfg: PipelineConfig, challenger_uri: str) -> tuple[GateDecision, dict[str, Any]]:
    """Score challenger and champion on the same sets and apply the gate; returns the decision and both scores."""
    registry = ModelRegistry(resolve_tracking_uri(cfg.tracking))
    sets = gate_sets(cfg, cfg.data.image_size)  # built once: loading and splitting every site is the slow part
    challenger = score_registered(challenger_uri, sets, cfg.registry.specificity)
    champion_version = registry.find(cfg.registry.model_name, CHAMPION)
    champion, label = None, None
    if champion_version is not None:
        size = int(champion_version.tags.get(IMAGE_SIZE_TAG, cfg.data.image_size))
        champion_sets = sets if size == cfg.data.image_size else gate_sets(cfg, size)
        champion = score_registered(f"models:/{cfg.registry.model_name}@{CHAMPION}", champion_sets, cfg.registry.specificity)
        label = f"champion v{champion_version.version}"
    decision = decide(challenger, champion, cfg.registry, label)
    return decision, {"challenger": challenger, "champion": champion}


def register_run(
    cfg: PipelineConfig, tracker, run: dict[str, Any], data: dict[str, dict[str, Any]], provenance: dict[str, str]
) -> dict[str, Any]:
    """Gate, card and register the run's model; returns what happened (for the flow summary).

    ``run`` is the retrain flow's summary, ``data`` site → {"version", "images"}, ``provenance``
    git_commit / prefect_flow_run_id / mlflow_run_id: all become version tags (the lineage).
    """
    crosssim = run.get("crosssim")
    challenger_uri = crosssim["models"]["adapted_model"] if crosssim else run["model_uri"]
    student_uri = crosssim["models"].get("student_model") if crosssim else None
    decision, scores = gate_challenger(cfg, challenger_uri)
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
    sets = crosssim["scores"]["adapted"]["sets"] if crosssim else run["sets"]
    threshold = crosssim["scores"]["adapted"] if crosssim else run
    kind = f"CrossSim-adapted {cfg.train.backbone}" if crosssim else cfg.train.backbone
    tags = {
        **{f"data_version.{site}": info["version"] for site, info in data.items()},
        **{key: value for key, value in provenance.items() if value},
        IMAGE_SIZE_TAG: str(cfg.data.image_size),
        "backbone": cfg.train.backbone,
        "model_kind": "adapted" if crosssim else "source",
        "parent_model": run["model_uri"] if crosssim else "",
    }

    def card(version: str) -> str:
        text = model_card(
            CardFacts(
                name=cfg.registry.model_name,
                version=version,
                model=f"{kind}, input {cfg.data.image_size}×{cfg.data.image_size} grayscale",
                lineage={key: value for key, value in tags.items() if value and key not in (IMAGE_SIZE_TAG, "backbone")},
                data=data,
                sets=sets,
                threshold={"value": threshold["threshold"], "chosen_on": threshold.get("threshold_chosen_on", f"{cfg.data.source}/val")},
                config=cfg.model_dump(mode="json", include={"data", "augment", "train", "crosssim"}),
                crosssim=crosssim["gap"] if crosssim else None,
                gate=decision.to_dict(),
            )
        )
        path = Path(cfg.evaluate.output_dir) / "model_card.md"
        path.write_text(text)
        tracker.log_artifact(path, artifact_path="registry")
        return text

    actions = actions_for(cfg)
    registered: Decision = actions.register_challenger(challenger_uri, tags, card, student_uri)
    decided = actions.record_gate(registered.version, decision, cfg.registry.policy)
    return {
        "name": cfg.registry.model_name,
        "version": registered.version,
        "gate_passed": decision.passed,
        "decision": decided.action,
        "aliases": decided.aliases,
    }

