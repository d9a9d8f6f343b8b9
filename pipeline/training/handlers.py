"""Cross-cutting concerns that attach to the Trainer instead of living in its loop."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

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
            save_atomic(trainer.model.state_dict(), self.best)
        save_atomic({**trainer.checkpoint(), "run_config": self.run_config}, self.last)


class EarlyStopping:
    """Stops when validation AUC has not improved for ``patience`` epochs."""

    def __init__(self, patience: int) -> None:
        self.patience = patience

    def on_epoch_end(self, trainer) -> None:
        if trainer.state.epoch - trainer.state.best_epoch >= self.patience:
            trainer.state.should_stop = True


class ProgressBar:
    """Rich progress bar over optimizer batches, showing loss and the last validation AUC. Where the output is not
    a terminal (CI, a Prefect worker, a log file) a bar would only be drawn once, at the end: there each epoch
    prints one line instead."""

    def __init__(self, enabled: bool = True, console: Console | None = None) -> None:
        self.enabled = enabled
        self.console = console or Console()
        self._progress: Progress | None = None
        self._task = None
        self._started = 0.0

    def on_fit_start(self, trainer) -> None:
        self._started = time.monotonic()
        if not self.enabled or not self.console.is_terminal:
            return
        self._progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  val AUC {task.fields[auc]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        total = trainer._batches_per_epoch() * trainer.cfg.epochs
        done = trainer._batches_per_epoch() * trainer.state.epoch
        self._task = self._progress.add_task(
            "train", total=total, completed=done, epoch=trainer.state.epoch + 1, loss=float("nan"), auc="-"
        )
        self._progress.start()

    def on_step_end(self, trainer) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=1, loss=trainer.state.last_loss)

    def on_epoch_end(self, trainer) -> None:
        row = trainer.state.history[-1]
        if self._progress is not None:
            shown_epoch = min(trainer.state.epoch + 1, trainer.cfg.epochs)
            self._progress.update(self._task, epoch=shown_epoch, auc=f"{row['val_auc']:.4f}")
        elif self.enabled:
            self.console.print(
                f"epoch {trainer.state.epoch}/{trainer.cfg.epochs}  train loss {row['train_loss']:.4f}  "
                f"val AUC {row['val_auc']:.4f}  {time.monotonic() - self._started:.0f} s",
                highlight=False,
                markup=False,
            )

    def on_fit_end(self, trainer) -> None:
        if self._progress is not None:
            self._progress.stop()


class MetricsLogger:
    """Sends each epoch's metrics to a tracker (pipeline.tracking.Tracker)."""

    def __init__(self, tracker) -> None:
        self.tracker = tracker

    def on_epoch_end(self, trainer) -> None:
        record = dict(trainer.state.history[-1])
        epoch = int(record.pop("epoch"))
        self.tracker.log_metrics(record, step=epoch)
