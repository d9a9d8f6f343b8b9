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
from typing import Any, NoReturn

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from pipeline.augment import build_augmentation
from pipeline.config import PipelineConfig
from pipeline.crosssim.adapt import Adapter, recalibrate_batchnorm
from pipeline.crosssim.diagnostics import DomainGap, DomainShift, domain_gap
from pipeline.crosssim.distill import Distiller
from pipeline.crosssim.engine import UNLABELLED, DomainData, EvaluationSets, LoopRuntime, LoopState
from pipeline.crosssim.finetune import ConsistencyFinetuner, finetune_on_labels, linear_probe
from pipeline.crosssim.handlers import DivergenceDetector, HistoryRecorder, LoopProgress, ModelSelector
from pipeline.crosssim.model import load_model, save_model
from pipeline.errors import DatasetError, TrainingError
from pipeline.models import Classifier
from pipeline.training.engine import seed_everything, select_device
from pipeline.training.inference import predict_proba

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
    deployable: str = "adapted"  # "adapted" (the teacher) or "student": the one that scored higher on held-out labels

    @property
    def deployable_path(self) -> Path:
        return self.student_path if self.deployable == "student" and self.student_path is not None else self.adapted_path


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


@dataclass(frozen=True)
class _Inputs:
    """What every step of a CrossSim run reads."""

    source_train: DomainData
    source_val: DomainData
    target_train: DomainData
    evaluation: EvaluationSets
    runtime: LoopRuntime
    cfg: PipelineConfig
    tracker: Any
    show_progress: bool


class _Diagnostics:
    """diagnostics.json, one section per step as the run goes; written at the end, or at a failure (when no model
    may be left in the folder)."""

    def __init__(self, output_dir: Path, tracker, **head: Any) -> None:
        self.output_dir, self.tracker, self.sections = output_dir, tracker, dict(head)

    def fail(self, message: str) -> NoReturn:
        self.sections["failure"] = message
        for model_file in (ADAPTED_MODEL, STUDENT_MODEL):
            (self.output_dir / model_file).unlink(missing_ok=True)
        path = self.write()
        if self.tracker is not None:
            self.tracker.log_artifacts(self.output_dir, artifact_path="crosssim")
        raise AdaptationDivergedError(message, path)

    def write(self) -> Path:
        path = self.output_dir / DIAGNOSTICS
        path.write_text(json.dumps(self.sections, indent=2, default=str))
        return path


def run_crosssim(
    source_model: Classifier,
    model_image_size: int,
    source_train: DomainData,
    source_val: DomainData,
    target_train: DomainData,
    cfg: PipelineConfig,
    tracker=None,
    show_progress: bool = True,
    target_selection: DomainData | None = None,
) -> CrossSimResult:
    """Adapt ``source_model`` to ``target_train``'s images (after fine-tuning it on their labels, when there are
    some), then distil it; see the package docs. ``target_selection``: labelled target images no step trains on,
    which choose the deployable model between the adapted teacher and the student."""
    settings = cfg.crosssim
    check_inputs(source_train, source_val, target_train, model_image_size, settings.labelled_fraction > 0)
    check_model_input(source_model, model_image_size)
    output_dir = Path(settings.output_dir)
    shutil.rmtree(output_dir, ignore_errors=True)  # no stale model from an earlier run may go forward
    output_dir.mkdir(parents=True)
    seed_everything(cfg.seed)
    transform = build_augmentation(cfg.augment) if settings.augment else None
    runtime = LoopRuntime(
        select_device(cfg.train.device), cfg.train.channels_last != "off", transform, torch.Generator().manual_seed(cfg.seed), cfg.train.amp
    )
    evaluation = EvaluationSets(source_val.images, source_val.labels, target_train.images, target_train.labels)
    inputs = _Inputs(source_train, source_val, target_train, evaluation, runtime, cfg, tracker, show_progress)
    rng = np.random.default_rng(cfg.seed)
    probes = (_sample(source_val, settings.diagnostics_samples, rng), _sample(target_train, settings.diagnostics_samples, rng))
    diagnostics = _Diagnostics(output_dir, tracker, alignment=settings.alignment, config=settings.model_dump(mode="json"))
    start = _label_finetune(source_model, inputs, diagnostics)
    adapted, selector, shift = _adapt(start, inputs, probes, diagnostics)
    student_path = _distil(adapted, selector, inputs, diagnostics) if settings.distill.enabled else None
    adapted_path = save_model(adapted, output_dir / ADAPTED_MODEL)
    deployable = _deployable(adapted, student_path, target_selection, runtime.device, diagnostics)
    diagnostics_path = diagnostics.write()
    if tracker is not None:
        tracker.log_metrics(
            {
                "crosssim.pad_before": shift.before.proxy_a_distance,
                "crosssim.pad_after": shift.after.proxy_a_distance,
                "crosssim.feature_distance_before": shift.before.mean_feature_distance,
                "crosssim.feature_distance_after": shift.after.mean_feature_distance,
            }
        )  # the folder itself is logged by the caller once scores are added to it
    return CrossSimResult(adapted_path, student_path, diagnostics_path, diagnostics.sections, shift, deployable)


def _deployable(
    adapted: Classifier, student_path: Path | None, selection: DomainData | None, device: torch.device, diagnostics: _Diagnostics
) -> str:
    """Teacher or student, by AUC on the held-out labelled target images (ties: the teacher, the larger model);
    the teacher when there is no student or nothing held out to judge on."""
    if student_path is None or selection is None or len(set(selection.labels.tolist())) < 2:
        reason = "no student" if student_path is None else "no held-out labelled target images"
        diagnostics.sections["deployable"] = {"model": "adapted", "chosen_on": reason}
        return "adapted"
    aucs = {
        name: float(roc_auc_score(selection.labels, predict_proba(model, selection.images, device)))
        for name, model in (("adapted", adapted), ("student", load_model(student_path)))
    }
    chosen = "student" if aucs["student"] > aucs["adapted"] else "adapted"
    diagnostics.sections["deployable"] = {
        "model": chosen,
        "chosen_on": f"{selection.name} ({len(selection.labels)} images held out of training)",
        "auc": aucs,
    }
    return chosen


def _label_finetune(source_model: Classifier, inputs: _Inputs, diagnostics: _Diagnostics) -> Classifier:
    """The model adaptation starts from: ``source_model`` fine-tuned on the labelled target images when the run has
    some (and ``label_finetune_steps``), else ``source_model``."""
    settings = inputs.cfg.crosssim
    labelled = int((inputs.target_train.labels != UNLABELLED).sum())
    if not (labelled and settings.label_finetune_steps):
        return source_model
    model, state = _finetune(source_model, inputs)
    section = {
        "labelled_images": labelled,
        "probe_steps": settings.label_probe_steps,
        "steps": settings.label_finetune_steps,
        "consistency_weight": 0.0 if state is None else settings.label_consistency_weight,
        "consistency": None if state is None else settings.label_consistency,
    }
    diagnostics.sections["label_finetune"] = section
    if state is not None:
        section["history"] = state.history
        if state.stop_reason is not None:
            diagnostics.fail(f"label fine-tuning stopped: {state.stop_reason}")
    return model


def _adapt(
    start: Classifier, inputs: _Inputs, probes: tuple[np.ndarray, np.ndarray], diagnostics: _Diagnostics
) -> tuple[Classifier, ModelSelector, DomainShift]:
    """Adaptation from ``start``: the selected model (target BatchNorm statistics when configured), its selector,
    and the domain gap before and after on the probe images."""
    settings, output_dir, seed = inputs.cfg.crosssim, diagnostics.output_dir, inputs.cfg.seed
    selector = ModelSelector(settings.selection_tolerance)
    handlers = [
        selector,
        DivergenceDetector(settings.collapse_patience),
        HistoryRecorder("adapt", inputs.tracker),
        LoopProgress(f"adapt ({settings.alignment})", inputs.show_progress),
    ]
    adapter = Adapter(start, inputs.source_train, inputs.target_train, inputs.evaluation, settings, inputs.runtime, handlers)

    def gap(when: str) -> DomainGap:
        source, target = (adapter.embed(images) for images in probes)
        return domain_gap(source, target, f"{when} adaptation", output_dir / f"tsne_{when}.png", seed)

    before = gap("before")
    state = adapter.fit()
    section = {"history": state.history, "steps_run": state.step, "stop_reason": state.stop_reason}
    diagnostics.sections["adapt"] = section
    diagnostics.sections["domain_gap"] = {"before": before.to_dict()}
    if state.stop_reason is not None:
        diagnostics.fail(f"adaptation stopped: {state.stop_reason}")
    selector.restore_best(adapter)
    if settings.target_batchnorm:
        recalibrate_batchnorm(adapter.model, inputs.target_train.images, inputs.runtime.device, inputs.runtime.channels_last)
    section["selected"] = selector.best
    diagnostics.sections["selection_rule"] = selector.rule
    after = gap("after")
    diagnostics.sections["domain_gap"]["after"] = after.to_dict()
    return adapter.model.eval(), selector, DomainShift(before, after)


def _distil(teacher: Classifier, teacher_selector: ModelSelector, inputs: _Inputs, diagnostics: _Diagnostics) -> Path:
    """The distilled student, saved; gated on the teacher's source-val AUC, not on its own random start."""
    settings = inputs.cfg.crosssim
    best = teacher_selector.best
    selector = ModelSelector(settings.selection_tolerance, reference_auc=best["source_val_auc"] if best else teacher_selector.reference_auc)
    handlers = [selector, HistoryRecorder("distill", inputs.tracker), LoopProgress("distil", inputs.show_progress)]
    distiller = Distiller(teacher, inputs.source_train, inputs.target_train, inputs.evaluation, settings, inputs.runtime, handlers)
    state = distiller.fit()
    section = {"history": state.history, "steps_run": state.step}
    diagnostics.sections["distill"] = section
    if state.stop_reason is not None:
        diagnostics.fail(f"distillation stopped: {state.stop_reason}")
    selector.restore_best(distiller)
    section["selected"] = selector.best
    return save_model(distiller.model.eval(), diagnostics.output_dir / STUDENT_MODEL)


def _finetune(source_model: Classifier, inputs: _Inputs) -> tuple[Classifier, LoopState | None]:
    """The labelled fine-tuning adaptation starts from, and its loop's state when it was semi-supervised
    (some target images unlabelled and ``label_consistency_weight`` > 0), else None (plain fine-tuning)."""
    cfg, target_train = inputs.cfg, inputs.target_train
    settings = cfg.crosssim
    if settings.label_probe_steps:  # LP-FT: the head first fits the labels on the frozen features
        source_model = linear_probe(
            source_model, target_train, settings.label_probe_steps, settings.head_warmup_lr, cfg.train, inputs.runtime.device
        )
    if settings.label_consistency_weight == 0 or (target_train.labels != UNLABELLED).all():
        steps = settings.label_finetune_steps
        lr = settings.label_finetune_lr
        return finetune_on_labels(source_model, target_train, steps, lr, cfg.train, cfg.augment, cfg.seed), None
    handlers = [HistoryRecorder("label_finetune", inputs.tracker), LoopProgress("fine-tune + consistency", inputs.show_progress)]
    loop = ConsistencyFinetuner(
        source_model, target_train, settings, cfg.train, cfg.augment, inputs.evaluation, inputs.runtime, handlers
    )
    state = loop.fit()
    return loop.model.eval(), state
