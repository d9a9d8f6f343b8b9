"""Training stage: ``train_model`` turns a prepared dataset into a model checkpoint."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config import PipelineConfig
from pipeline.data.prepare import PreparedDataset
from pipeline.errors import TrainingError
from pipeline.models import Classifier, build_model
from pipeline.training.distributed import Ranks, process_group
from pipeline.training.engine import Trainer, TrainState, seed_everything, select_device
from pipeline.training.handlers import LAST_CHECKPOINT, Checkpointer, EarlyStopping, MetricsLogger, ProgressBar
from pipeline.training.resume import load_for_resume, run_config
from pipeline.training.weights import pretrained_weights

__all__ = ["TrainResult", "train_model", "load_trained_model"]


@dataclass(frozen=True)
class TrainResult:
    model_path: Path  # best weights (state_dict) by validation AUC
    checkpoint_path: Path  # full state of the last epoch, for --resume
    summary_path: Path
    state: TrainState
    notes: tuple[str, ...] = ()  # what a resume changed or found (e.g. epochs raised), for the user


def train_model(
    prepared: PreparedDataset,
    cfg: PipelineConfig,
    tracker=None,
    show_progress: bool = True,
    extra_handlers: list | None = None,
) -> TrainResult:
    """Train ``cfg.train.backbone`` on the train split, select on val AUC, checkpoint every epoch.

    With ``train.resume``, continue from last.pt if it was trained with this configuration
    (see :mod:`pipeline.training.resume`); it is checked before anything is written.

    Under ``torchrun`` every process calls this and they train together (:mod:`pipeline.training.distributed`);
    rank 0 alone writes the checkpoints and the summary, logs to ``tracker`` and shows progress.
    """
    with process_group(select_device(cfg.train.device)) as ranks:
        return _train(prepared, cfg, ranks, tracker, show_progress, extra_handlers or [])


def _train(
    prepared: PreparedDataset, cfg: PipelineConfig, ranks: Ranks, tracker, show_progress: bool, extra_handlers: list
) -> TrainResult:
    manifest = prepared.manifest
    train_images, train_rows = prepared.subset(manifest["split"] == "train")
    val_images, val_rows = prepared.subset(manifest["split"] == "val")
    output_dir = Path(cfg.train.output_dir)
    record = run_config(cfg, prepared)
    resumed, notes = load_for_resume(output_dir / LAST_CHECKPOINT, record) if cfg.train.resume else (None, [])
    checkpointer = Checkpointer(output_dir, record)
    handlers: list = [EarlyStopping(cfg.train.early_stopping_patience)] if cfg.train.early_stopping_patience else []
    if ranks.is_main:
        handlers += [checkpointer, ProgressBar(show_progress)]
        if tracker is not None:
            handlers.append(MetricsLogger(tracker))
    handlers.extend(extra_handlers)
    seed_everything(cfg.seed)  # before the model is built: its initial weights depend on it
    trainer = Trainer(
        build_model(cfg.train.backbone, pretrained_weights(cfg)),
        train_images,
        train_rows["label"].to_numpy(dtype="int64"),
        val_images,
        val_rows["label"].to_numpy(dtype="int64"),
        cfg.train,
        cfg.augment,
        cfg.seed,
        handlers,
        ranks,
    )
    if resumed is not None:
        trainer.restore(resumed)
    state = trainer.fit()
    summary = {
        "backbone": cfg.train.backbone,
        "image_size": int(prepared.images.shape[-1]),
        "harmonisation": prepared.preprocessing.harmonisation,
        "epochs_run": state.epoch,
        "best_epoch": state.best_epoch,
        "best_val_auc": state.best_val_auc,
        "train_images_per_second": state.train_images_per_second,
        "processes": ranks.world_size,
        "n_train": len(train_rows),
        "n_val": len(val_rows),
        "history": state.history,
        "resume_notes": notes,
    }
    summary_path = output_dir / "train_summary.json"
    if ranks.is_main:
        summary_path.write_text(json.dumps(summary, indent=2))
    return TrainResult(checkpointer.best, checkpointer.last, summary_path, state, tuple(notes))


def load_trained_model(model_path: Path, backbone: str) -> Classifier:
    if not Path(model_path).is_file():
        raise TrainingError(f"no trained model at {model_path}; run `crosssim train` first")
    model = build_model(backbone)
    try:
        model.load_state_dict(torch.load(model_path, map_location="cpu", weights_only=True))
    except (FileNotFoundError, RuntimeError) as exc:
        raise TrainingError(f"{model_path}: cannot load a {backbone} model ({exc})") from exc
    return model.eval()
