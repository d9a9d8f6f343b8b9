"""The ``adapt`` stage: source model + source data + target images → adapted model, student, diagnostics.

Output folder (replaced as a whole; a failed run leaves only ``diagnostics.json``):

    adapted.pt          the adapted model (AdaptedClassifier), chosen by ModelSelector's rule
    student.pt          the distilled student (when crosssim.distill.enabled)
    diagnostics.json    selection, domain gap before/after, stop reason, loss/accuracy history
    tsne_before.png, tsne_after.png
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.augment import build_augmentation
from pipeline.config import PipelineConfig
from pipeline.crosssim.adapt import Adapter, recalibrate_batchnorm
from pipeline.crosssim.diagnostics import DomainShift, domain_gap
from pipeline.crosssim.distill import Distiller
from pipeline.crosssim.engine import UNLABELLED, DomainData, EvaluationSets, LoopRuntime, LoopState
from pipeline.crosssim.finetune import ConsistencyFinetuner, finetune_on_labels
from pipeline.crosssim.handlers import DivergenceDetector, HistoryRecorder, LoopProgress, ModelSelector
from pipeline.crosssim.model import save_model
from pipeline.errors import DatasetError, TrainingError
from pipeline.models import Classifier
from pipeline.training.engine import seed_everything, select_device

ADAPTED_MODEL = "adapted.pt"
STUDENT_MODEL = "student.pt"
DIAGNOSTICS = "diagnostics.json"


class AdaptationDivergedError(TrainingError):
    """Adaptation stopped (non-finite loss or discriminator collapse); no model was written."""

    exit_code = 4

    def __init__(self, message: str, diagnostics_path: Path) -> None:
        super().__init__(f"{message}\ndiagnostics: {diagnostics_path} (no model was written)")
        self.diagnostics_path = diagnostics_path


@dataclass(frozen=True)
class CrossSimResult:
    adapted_path: Path
    student_path: Path | None
    diagnostics_path: Path
    diagnostics: dict[str, Any]  # what diagnostics.json holds: histories, selection, the rule, the configuration
    gap: DomainShift


def check_inputs(
    source_train: DomainData, source_val: DomainData, target_train: DomainData, model_image_size: int, labels_required: bool
) -> None:
    """Refuse inputs adaptation cannot use, naming the set and the rule broken."""
    for data in (source_train, source_val, target_train):
        if len(data.images) == 0:
            raise DatasetError(f"{data.name}: no images; adaptation needs a non-empty {data.name} set")
        if data.images.dtype != np.uint8 or data.images.ndim != 3:
            raise DatasetError(
                f"{data.name}: images must be single-channel uint8 arrays (N, H, W), got {data.images.dtype} "
                f"{data.images.shape}: prepare every site with the same pipeline (crosssim prepare)"
            )
        height, width = data.images.shape[1:]
        if (height, width) != (model_image_size, model_image_size):
            raise DatasetError(
                f"{data.name}: images are {height}×{width} but the source model was trained on "
                f"{model_image_size}×{model_image_size}; prepare all sites at data.image_size={model_image_size}"
            )
        if len(data.labels) != len(data.images):
            raise DatasetError(f"{data.name}: {len(data.labels)} labels for {len(data.images)} images")
    for data in (source_train, source_val):
        if set(np.unique(data.labels)) != {0, 1}:
            raise DatasetError(f"{data.name}: needs labelled images of both classes, has {sorted(set(data.labels))}")
    labelled = target_train.labels[target_train.labels != UNLABELLED]
    if labels_required and set(np.unique(labelled)) != {0, 1}:
        raise DatasetError(
            f"{target_train.name}: crosssim.labelled_fraction > 0 needs labelled target images of both classes, "
            f"got classes {sorted(set(labelled.tolist()))} in {len(labelled)} labelled images"
        )


def check_model_input(model: Classifier, image_size: int) -> None:
    """The source model must accept (B, 1, S, S) images: a mismatch is an error, not a crash later."""
    probe = torch.zeros(2, 1, image_size, image_size)
    try:
        with torch.no_grad():
            logits = model.eval()(probe)
    except RuntimeError as exc:
        raise TrainingError(f"the source model does not accept 1×{image_size}×{image_size} images: {exc}") from exc
    if tuple(logits.shape) != (2, 2):
        raise TrainingError(f"the source model returns {tuple(logits.shape)} for a batch of 2; expected (2, 2) logits")


def _sample(data: DomainData, count: int, rng: np.random.Generator) -> np.ndarray:
    rows = np.sort(rng.choice(len(data.images), size=min(count, len(data.images)), replace=False))
    return np.asarray(data.images[rows])


def run_crosssim(
    source_model: Classifier,
    model_image_size: int,
    source_train: DomainData,
    source_val: DomainData,
    target_train: DomainData,
    cfg: PipelineConfig,
    tracker=None,
    show_progress: bool = True,
) -> CrossSimResult:
    """Adapt ``source_model`` to ``target_train``'s images, then distil it; see the package docs."""
    settings = cfg.crosssim
    check_inputs(source_train, source_val, target_train, model_image_size, settings.labelled_fraction > 0)
    check_model_input(source_model, model_image_size)
    output_dir = Path(settings.output_dir)
    shutil.rmtree(output_dir, ignore_errors=True)  # no stale model from an earlier run may go forward
    output_dir.mkdir(parents=True)
    seed_everything(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    device = select_device(cfg.train.device)
    channels_last = cfg.train.channels_last != "off"
    transform = build_augmentation(cfg.augment) if settings.augment else None
    runtime = LoopRuntime(device, channels_last, transform, generator, cfg.train.amp)
    evaluation = EvaluationSets(source_val.images, source_val.labels, target_train.images, target_train.labels)
    rng = np.random.default_rng(cfg.seed)
    probe_source = _sample(source_val, settings.diagnostics_samples, rng)
    probe_target = _sample(target_train, settings.diagnostics_samples, rng)
    diagnostics: dict[str, Any] = {"alignment": settings.alignment, "config": settings.model_dump(mode="json")}
    labelled = int((target_train.labels != UNLABELLED).sum())
    if labelled and settings.label_finetune_steps:
        source_model, finetune_state = _finetune(
            source_model, target_train, cfg, evaluation, runtime, tracker, show_progress
        )
        diagnostics["label_finetune"] = {
            "labelled_images": labelled,
            "steps": settings.label_finetune_steps,
            "consistency_weight": 0.0 if finetune_state is None else settings.label_consistency_weight,
        }
        if finetune_state is not None:
            diagnostics["label_finetune"]["history"] = finetune_state.history
            if finetune_state.stop_reason is not None:
                _fail(output_dir, diagnostics, f"label fine-tuning stopped: {finetune_state.stop_reason}", tracker)

    selector = ModelSelector(settings.selection_tolerance)
    adapter = Adapter(
        source_model,
        source_train,
        target_train,
        evaluation,
        settings,
        runtime,
        [
            selector,
            DivergenceDetector(settings.collapse_patience),
            HistoryRecorder("adapt", tracker),
            LoopProgress(f"adapt ({settings.alignment})", show_progress),
        ],
    )
    before = domain_gap(
        adapter.embed(probe_source), adapter.embed(probe_target), "before adaptation", output_dir / "tsne_before.png", cfg.seed
    )
    state = adapter.fit()
    diagnostics["adapt"] = {"history": state.history, "steps_run": state.step, "stop_reason": state.stop_reason}
    diagnostics["domain_gap"] = {"before": before.to_dict()}
    if state.stop_reason is not None:
        _fail(output_dir, diagnostics, f"adaptation stopped: {state.stop_reason}", tracker)
    selector.restore_best(adapter)
    if settings.target_batchnorm:
        recalibrate_batchnorm(adapter.model, target_train.images, device, channels_last)
    diagnostics["adapt"]["selected"] = selector.best
    diagnostics["selection_rule"] = selector.rule
    after = domain_gap(
        adapter.embed(probe_source), adapter.embed(probe_target), "after adaptation", output_dir / "tsne_after.png", cfg.seed
    )
    diagnostics["domain_gap"]["after"] = after.to_dict()
    adapted = adapter.model.eval()

    student_path = None
    if settings.distill.enabled:
        # the student is gated on the teacher's source-val AUC, not on its own random start
        teacher_auc = selector.best["source_val_auc"] if selector.best else selector.reference_auc
        distill_selector = ModelSelector(settings.selection_tolerance, reference_auc=teacher_auc)
        distiller = Distiller(
            adapted,
            source_train,
            target_train,
            evaluation,
            settings,
            runtime,
            [distill_selector, HistoryRecorder("distill", tracker), LoopProgress("distil", show_progress)],
        )
        distill_state = distiller.fit()
        diagnostics["distill"] = {"history": distill_state.history, "steps_run": distill_state.step}
        if distill_state.stop_reason is not None:
            _fail(output_dir, diagnostics, f"distillation stopped: {distill_state.stop_reason}", tracker)
        distill_selector.restore_best(distiller)
        diagnostics["distill"]["selected"] = distill_selector.best
        student_path = save_model(distiller.model.eval(), output_dir / STUDENT_MODEL)
    adapted_path = save_model(adapted, output_dir / ADAPTED_MODEL)
    diagnostics_path = _write(output_dir, diagnostics)
    if tracker is not None:
        tracker.log_metrics(
            {
                "crosssim.pad_before": before.proxy_a_distance,
                "crosssim.pad_after": after.proxy_a_distance,
                "crosssim.feature_distance_before": before.mean_feature_distance,
                "crosssim.feature_distance_after": after.mean_feature_distance,
            }
        )  # the folder itself is logged by the caller once scores are added to it
    return CrossSimResult(adapted_path, student_path, diagnostics_path, diagnostics, DomainShift(before, after))


def _finetune(
    source_model: Classifier,
    target_train: DomainData,
    cfg: PipelineConfig,
    evaluation: EvaluationSets,
    runtime: LoopRuntime,
    tracker,
    show_progress: bool,
) -> tuple[Classifier, LoopState | None]:
    """The labelled fine-tuning adaptation starts from, and its loop's state when it was semi-supervised
    (some target images unlabelled and ``label_consistency_weight`` > 0), else None (plain fine-tuning)."""
    settings = cfg.crosssim
    if settings.label_consistency_weight == 0 or (target_train.labels != UNLABELLED).all():
        steps = settings.label_finetune_steps
        lr = settings.label_finetune_lr
        return finetune_on_labels(source_model, target_train, steps, lr, cfg.train, cfg.augment, cfg.seed), None
    handlers = [HistoryRecorder("label_finetune", tracker), LoopProgress("fine-tune + consistency", show_progress)]
    loop = ConsistencyFinetuner(source_model, target_train, settings, cfg.train, cfg.augment, evaluation, runtime, handlers)
    state = loop.fit()
    return loop.model.eval(), state


def _write(output_dir: Path, diagnostics: dict[str, Any]) -> Path:
    path = output_dir / DIAGNOSTICS
    path.write_text(json.dumps(diagnostics, indent=2, default=str))
    return path


def _fail(output_dir: Path, diagnostics: dict[str, Any], message: str, tracker) -> None:
    diagnostics["failure"] = message
    for model_file in (ADAPTED_MODEL, STUDENT_MODEL):
        (output_dir / model_file).unlink(missing_ok=True)
    path = _write(output_dir, diagnostics)
    if tracker is not None:
        tracker.log_artifacts(output_dir, artifact_path="crosssim")
    raise AdaptationDivergedError(message, path)

