"""CrossSim in a run: adapt the trained source model to ``crosssim.target``, score source vs adapted vs student
on the same held-out sets, log the adapted models.

    <run>/adapt/    adapted.pt, student.pt, diagnostics.json, t-SNE plots,
                    metrics.json (DVC metrics) + eval/<model>/ (source vs adapted vs student)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import PipelineConfig
from pipeline.crosssim.diagnostics import DomainShift
from pipeline.crosssim.model import load_model
from pipeline.crosssim.scoring import evaluate_models
from pipeline.crosssim.stage import ADAPTED_MODEL, STUDENT_MODEL, CrossSimResult, run_crosssim
from pipeline.data.preprocessing import Preprocessing
from pipeline.errors import DatasetError
from pipeline.evaluation import ScoredModel
from pipeline.models import servable
from pipeline.retrain.data import CrossSimData
from pipeline.training import load_trained_model
from pipeline.training.engine import select_device

HEADLINE = ("auc", "accuracy", "sensitivity", "specificity")


@dataclass(frozen=True)
class AdaptationOutcome:
    """What adaptation gave a run: the logged models, their scores beside the source model's, the domain gap."""

    model_uris: dict[str, str]  # "adapted_model" (always), "student_model" (with distillation) → runs:/ URI
    scores: dict[str, ScoredModel]  # "source", "adapted", "student"
    diagnostics_path: Path
    gap: DomainShift  # proxy A-distance and mean-feature distance, before and after

    @property
    def adapted_uri(self) -> str:
        return self.model_uris["adapted_model"]

    @property
    def student_uri(self) -> str | None:
        return self.model_uris.get("student_model")


def trained_preprocessing(cfg: PipelineConfig) -> Preprocessing:
    """How the source model's images were made (its train summary). An error when nothing was trained, or when
    this configuration prepares its images otherwise: adaptation and scoring would feed the model other inputs."""
    summary_path = cfg.train.output_dir / "train_summary.json"
    if not summary_path.is_file():
        raise DatasetError(f"no training summary at {summary_path}; run `crosssim train` first")
    summary = json.loads(summary_path.read_text())
    trained = Preprocessing(int(summary["image_size"]), summary.get("harmonisation", "none"))
    configured = cfg.data.preprocessing()
    if trained.harmonisation != configured.harmonisation:
        raise DatasetError(
            f"{summary_path}: the source model was trained on {trained.describe()} images, this configuration "
            f"prepares {configured.describe()} (data.harmonisation); set it back or train again"
        )
    return trained


def adapt(cfg: PipelineConfig, model_path: Path, data: CrossSimData, tracker=None, show_progress: bool = True) -> CrossSimResult:
    """CrossSim on the trained source model."""
    image_size = trained_preprocessing(cfg).image_size
    source_model = load_trained_model(model_path, cfg.train.backbone)
    return run_crosssim(
        source_model,
        image_size,
        data.source_train,
        data.source_val,
        data.target_train,
        cfg,
        tracker,
        show_progress,
        data.target_selection,
    )


def score_adaptation(cfg: PipelineConfig, source_model_path: Path, result_dir: Path, data: CrossSimData) -> dict[str, ScoredModel]:
    """Source model vs adapted vs student on source test and target-test; writes ``result_dir/metrics.json``."""
    models = {"source": load_trained_model(source_model_path, cfg.train.backbone)}
    for name, file in (("adapted", ADAPTED_MODEL), ("student", STUDENT_MODEL)):
        if (result_dir / file).is_file():
            models[name] = load_model(result_dir / file)
    test_sets = {
        f"{cfg.data.source}/test": data.source_test,
        f"{cfg.crosssim.target}/target-test": data.target_test,
    }
    device = select_device(cfg.train.device)
    scores = evaluate_models(
        models, data.source_val, data.target_train, test_sets, cfg.evaluate, result_dir / "eval", device, cfg.seed
    )
    metrics = {model: {"threshold": scored.threshold, **scored.headline()} for model, scored in scores.items()}
    (result_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return scores


def log_adaptation(cfg: PipelineConfig, tracker, result: CrossSimResult, scores: dict[str, ScoredModel]) -> AdaptationOutcome:
    """The adaptation's files, headline metrics and models (in their serving form) into the run's tracker."""
    tracker.log_artifacts(result.adapted_path.parent, artifact_path="crosssim")
    for model_name, scored in scores.items():
        tracker.log_metrics(scored.flat_metrics(f"crosssim.{model_name}.", HEADLINE))
    uris = {}
    for name, path in (("adapted_model", result.adapted_path), ("student_model", result.student_path)):
        if path is not None:
            served, example = servable(load_model(path), cfg.data.image_size)
            uris[name] = tracker.log_model(served, name=name, input_example=example)
    return AdaptationOutcome(uris, scores, result.diagnostics_path, result.gap)
