"""Cross-cutting concerns that attach to the Trainer instead of living in its loop."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from pipeline.training.progress import LoopProgressBase

LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"


def save_atomic(payload: Any, path: Path) -> None:
    """torch.save through a temporary file, so an interrupted save never leaves a broken checkpoint."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


class Checkpointer:
    """Saves the full training state every epoch (for --resume) and the best model weights.

    ``run_config`` (what the run was configured with) is saved in ``last.pt``, so that a resume
    can check that it continues the same training.
    """

    def __init__(self, directory: Path, run_config: dict[str, Any] | None = None) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.run_config = run_config

    @property
    def last(self) -> Path:
        return self.directory / LAST_CHECKPOINT

    @property
    def best(self) -> Path:
        return self.directory / BEST_CHECKPOINT

    def on_epoch_end(self, trainer) -> None:
        if trainer.state.best_epoch == trainer.state.epoch:
            save_atomic(trainer.weights.state_dict(), self.best)
        save_atomic({**trainer.checkpoint(), "run_config": self.run_config}, self.last)


class EarlyStopping:
    """Stops when validation AUC has not improved for ``patience`` epochs."""

    def __init__(self, patience: int) -> None:
        self.patience = patience

    def on_epoch_end(self, trainer) -> None:
        if trainer.state.epoch - trainer.state.best_epoch >= self.patience:
            trainer.state.should_stop = True


class ProgressBar(LoopProgressBase):
    """Source training's progress: optimizer batches over all epochs, the last loss and validation AUC; one line
    per epoch without a terminal."""

    label = "[bold]epoch {task.fields[epoch]}"
    shown = "loss {task.fields[loss]:.4f}  val AUC {task.fields[auc]}"

    def extent(self, trainer) -> tuple[int, int]:
        batches = trainer._batches_per_epoch()
        return batches * trainer.cfg.epochs, batches * trainer.state.epoch

    def fields(self, trainer) -> dict[str, Any]:
        state = trainer.state
        auc = f"{state.history[-1]['val_auc']:.4f}" if state.history else "-"
        return {"epoch": min(state.epoch + 1, trainer.cfg.epochs), "loss": state.last_loss, "auc": auc}

    def line(self, trainer, event: str) -> str | None:
        if event != "epoch_end":
            return None
        row = trainer.state.history[-1]
        return f"epoch {trainer.state.epoch}/{trainer.cfg.epochs}  train loss {row['train_loss']:.4f}  val AUC {row['val_auc']:.4f}"


class MetricsLogger:
    """Sends each epoch's metrics to a tracker (pipeline.tracking.Tracker)."""

    def __init__(self, tracker) -> None:
        self.tracker = tracker

    def on_epoch_end(self, trainer) -> None:
        log_epoch(self.tracker, trainer.state.history[-1])


def log_epoch(tracker, row: dict[str, float]) -> None:
    """One epoch's row of the training history into ``tracker``, at its epoch as the step."""
    record = dict(row)
    epoch = int(record.pop("epoch"))
    tracker.log_metrics(record, step=epoch)
