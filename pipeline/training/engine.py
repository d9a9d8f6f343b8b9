"""Supervised training of the source model: epochs over a labelled set, validation AUC after each.

The :class:`Trainer` is a :class:`pipeline.training.loop.Loop` (handlers, device, mixed precision, the optimiser
step, the non-finite-loss policy); its handlers (checkpointing, early stopping, progress, tracking) attach through
``fit_start``, ``step_end``, ``epoch_end`` and ``fit_end``.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torchmetrics.functional.classification import binary_auroc

from pipeline.augment import augment_batch, build_augmentation, normalise, to_model_input
from pipeline.config import AugmentConfig, TrainConfig
from pipeline.errors import TrainingError
from pipeline.training.loop import Loop
from pipeline.training.schedule import warmup_cosine


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    last_loss: float = math.nan
    best_val_auc: float = -math.inf
    best_epoch: int = 0
    should_stop: bool = False
    train_images_per_second: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def select_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def class_weights(labels: torch.Tensor) -> torch.Tensor:
    """Inverse class frequency, normalised so a balanced set gets weight 1 per class."""
    counts = torch.bincount(labels, minlength=2).float()
    if (counts == 0).any():
        raise TrainingError(f"training split must contain both classes (counts normal/pneumonia: {counts.tolist()})")
    return counts.sum() / (2 * counts)


class Trainer(Loop):
    """Trains ``model`` on uint8 image arrays (N, H, W) with 0/1 labels."""

    def __init__(
        self,
        model: nn.Module,
        train_images: np.ndarray,
        train_labels: np.ndarray,
        val_images: np.ndarray,
        val_labels: np.ndarray,
        cfg: TrainConfig,
        augment: AugmentConfig,
        seed: int,
        handlers: list[Any] | None = None,
    ) -> None:
        if len(train_images) < 2 or len(val_images) == 0:
            raise TrainingError(f"need ≥2 training and ≥1 validation images (got {len(train_images)}, {len(val_images)})")
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        seed_everything(seed)
        super().__init__(select_device(cfg.device), cfg.channels_last in ("on", "auto"), cfg.amp, handlers)
        self.cfg = cfg
        self.model = model.to(self.device, memory_format=self.memory_format)
        self.train_images = torch.from_numpy(np.ascontiguousarray(train_images))
        self.train_labels = torch.as_tensor(np.asarray(train_labels, dtype=np.int64))
        self.val_images = torch.from_numpy(np.ascontiguousarray(val_images))
        self.val_labels = torch.as_tensor(np.asarray(val_labels, dtype=np.int64))
        weights = class_weights(self.train_labels) if cfg.class_weighted else None
        self.criterion = nn.CrossEntropyLoss(
            weight=None if weights is None else weights.to(self.device), label_smoothing=cfg.label_smoothing
        )
        self.transform = build_augmentation(augment)
        self.generator = torch.Generator().manual_seed(seed)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.steps_per_epoch = math.ceil(self._batches_per_epoch() / cfg.grad_accum_steps)
        total_steps = self.steps_per_epoch * cfg.epochs
        warmup_steps = min(int(cfg.warmup_epochs * self.steps_per_epoch), max(total_steps - 1, 0))
        self.scheduler = warmup_cosine(self.optimizer, total_steps, warmup_steps)
        self.state = TrainState()

    def _batches_per_epoch(self) -> int:
        full, rest = divmod(len(self.train_images), self.cfg.batch_size)
        return full + (1 if rest >= 2 else 0)  # a batch of one breaks BatchNorm: it is dropped

    def fit(self) -> TrainState:
        self.emit("fit_start")
        while self.state.epoch < self.cfg.epochs and not self.state.should_stop:
            started = time.perf_counter()
            train_loss, images = self._train_epoch()
            self.state.train_images_per_second = images / (time.perf_counter() - started)
            val_probs = self.predict(self.val_images)
            val_auc = float(binary_auroc(torch.from_numpy(val_probs), self.val_labels))
            self.state.epoch += 1
            if val_auc > self.state.best_val_auc:
                self.state.best_val_auc, self.state.best_epoch = val_auc, self.state.epoch
            self.state.history.append(
                {
                    "epoch": self.state.epoch,
                    "train_loss": train_loss,
                    "val_auc": val_auc,
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "train_images_per_second": self.state.train_images_per_second,
                }
            )
            self.emit("epoch_end")
        self.emit("fit_end")
        return self.state

    def _train_epoch(self) -> tuple[float, int]:
        self.model.train()
        order = torch.randperm(len(self.train_images), generator=self.generator)
        accum = self.cfg.grad_accum_steps
        batches = self._batches_per_epoch()
        total_loss, seen = 0.0, 0
        self.optimizer.zero_grad(set_to_none=True)
        for index in range(batches):
            rows = order[index * self.cfg.batch_size : (index + 1) * self.cfg.batch_size]
            inputs = to_model_input(self.train_images[rows], self.device, self.channels_last)
            inputs = normalise(augment_batch(inputs, self.transform))
            targets = self.train_labels[rows].to(self.device, non_blocking=True)
            with self.autocast():
                loss = self.criterion(self.model(inputs), targets)
            self.state.last_loss = loss.item()
            self.check_finite({"cross-entropy": self.state.last_loss}, f"epoch {self.state.epoch + 1}, batch {index}")
            self.backward(loss / accum)
            if (index + 1) % accum == 0 or index + 1 == batches:
                self.apply_gradients(self.optimizer, self.scheduler, self.model.parameters(), self.cfg.grad_clip_norm)
                self.state.step += 1
            total_loss += self.state.last_loss * len(rows)
            seen += len(rows)
            self.emit("step_end")
        return total_loss / seen, seen

    def predict(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        """Probability of pneumonia for each uint8 image."""
        return self.probabilities(self.model, images)

    def checkpoint(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "numpy_rng": np.random.get_state(),
            "python_rng": random.getstate(),
            "state": self.state.__dict__.copy(),
        }

    def restore(self, checkpoint: dict[str, Any]) -> None:
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        if self.scaler and checkpoint["scaler"]:
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.generator.set_state(checkpoint["generator"])
        torch.set_rng_state(checkpoint["torch_rng"])
        np.random.set_state(checkpoint["numpy_rng"])
        random.setstate(checkpoint["python_rng"])
        self.state = TrainState(**checkpoint["state"])
