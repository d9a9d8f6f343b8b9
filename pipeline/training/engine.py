"""Supervised training of the source model: epochs over a labelled set, validation AUC after each.

The :class:`Trainer` is a :class:`pipeline.training.loop.Loop` (handlers, device, mixed precision, the optimiser
step, the non-finite-loss policy); its handlers (checkpointing, early stopping, progress, tracking) attach through
``fit_start``, ``step_end``, ``epoch_end`` and ``fit_end``.

Under ``torchrun`` it trains data-parallel (:mod:`pipeline.training.distributed`): the model is wrapped in
DistributedDataParallel, each rank takes its share of every global batch, and the epoch's numbers (loss, images/s,
validation AUC) are those of all ranks together.
"""

from __future__ import annotations

import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DistributedSampler
from torchmetrics.functional.classification import binary_auroc

from pipeline.augment import augment_batch, build_augmentation, normalise, to_model_input
from pipeline.config import AugmentConfig, TrainConfig
from pipeline.errors import TrainingError
from pipeline.training.distributed import Ranks
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
        ranks: Ranks = Ranks(),
    ) -> None:
        if len(train_images) < 2 or len(val_images) == 0:
            raise TrainingError(f"need ≥2 training and ≥1 validation images (got {len(train_images)}, {len(val_images)})")
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        seed_everything(seed)
        device = ranks.device(select_device(cfg.device))
        super().__init__(device, cfg.channels_last in ("on", "auto"), cfg.amp, handlers)
        self.cfg = cfg
        self.seed = seed
        self.ranks = ranks
        self.rank_batch = ranks.per_rank_batch(cfg.batch_size)
        self.model = model.to(self.device, memory_format=self.memory_format)
        # DDP copies rank 0's weights to every rank here and averages the gradients in backward
        self.forward = (
            DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
            if ranks.distributed
            else self.model
        )
        self.sampler = DistributedSampler(
            range(len(train_images)), num_replicas=ranks.world_size, rank=ranks.rank, shuffle=True, seed=seed
        )
        self.train_images = torch.from_numpy(np.ascontiguousarray(train_images))
        self.train_labels = torch.as_tensor(np.asarray(train_labels, dtype=np.int64))
        self.val_images = torch.from_numpy(np.ascontiguousarray(val_images))
        self.val_labels = torch.as_tensor(np.asarray(val_labels, dtype=np.int64))
        weights = class_weights(self.train_labels) if cfg.class_weighted else None
        self.criterion = nn.CrossEntropyLoss(
            weight=None if weights is None else weights.to(self.device), label_smoothing=cfg.label_smoothing
        )
        self.transform = build_augmentation(augment)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.steps_per_epoch = math.ceil(self._batches_per_epoch() / cfg.grad_accum_steps)
        total_steps = self.steps_per_epoch * cfg.epochs
        warmup_steps = min(int(cfg.warmup_epochs * self.steps_per_epoch), max(total_steps - 1, 0))
        self.scheduler = warmup_cosine(self.optimizer, total_steps, warmup_steps)
        self.averaged = None if cfg.ema_decay is None else weight_average(self.model, cfg.ema_decay)
        self.state = TrainState()

    @property
    def weights(self) -> nn.Module:
        """The model that is validated, checkpointed as best and deployed: the weight average when there is one."""
        return self.model if self.averaged is None else self.averaged.module

    def _batches_per_epoch(self) -> int:
        full, rest = divmod(len(self.sampler), self.rank_batch)  # the same on every rank: the sampler pads
        return full + (1 if rest >= 2 else 0)  # a batch of one breaks BatchNorm: it is dropped

    def fit(self) -> TrainState:
        self.emit("fit_start")
        while self.state.epoch < self.cfg.epochs and not self.state.should_stop:
            started = time.perf_counter()
            train_loss, images = self._train_epoch()
            mean_seconds = self.ranks.sum(time.perf_counter() - started)[0] / self.ranks.world_size
            self.state.train_images_per_second = images / mean_seconds
            val_auc = float(binary_auroc(torch.from_numpy(self._validation_probabilities()), self.val_labels))
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
            self.state.should_stop = self.ranks.main_decides(self.state.should_stop)
        self.emit("fit_end")
        return self.state

    def _train_epoch(self) -> tuple[float, int]:
        """One pass over this rank's share of the data; (mean loss, images) over all ranks."""
        self.model.train()
        self.sampler.set_epoch(self.state.epoch)  # the same permutation on every rank, a new one each epoch
        order = torch.tensor(list(self.sampler))
        torch.manual_seed(self.ranks.epoch_seed(self.seed, self.state.epoch))  # the augmentation's draws
        accum = self.cfg.grad_accum_steps
        batches = self._batches_per_epoch()
        total_loss, seen = 0.0, 0
        self.optimizer.zero_grad(set_to_none=True)
        for index in range(batches):
            rows = order[index * self.rank_batch : (index + 1) * self.rank_batch]
            inputs = to_model_input(self.train_images[rows], self.device, self.channels_last)
            inputs = normalise(augment_batch(inputs, self.transform))
            targets = self.train_labels[rows].to(self.device, non_blocking=True)
            stepping = (index + 1) % accum == 0 or index + 1 == batches
            # between optimiser steps the ranks need not average gradients: DDP then only accumulates them
            with nullcontext() if stepping or not self.ranks.distributed else self.forward.no_sync():
                with self.autocast():
                    loss = self.criterion(self.forward(inputs), targets)
                self.state.last_loss = loss.item()
                self.check_finite({"cross-entropy": self.state.last_loss}, f"epoch {self.state.epoch + 1}, batch {index}")
                self.backward(loss / accum)
            if stepping:
                self.apply_gradients(self.optimizer, self.scheduler, self.model.parameters(), self.cfg.grad_clip_norm)
                if self.averaged is not None:
                    self.averaged.update_parameters(self.model)
                self.state.step += 1
            total_loss += self.state.last_loss * len(rows)
            seen += len(rows)
            self.emit("step_end")
        total_loss, seen = self.ranks.sum(total_loss, seen)
        return total_loss / seen, int(seen)

    def _validation_probabilities(self) -> np.ndarray:
        """P(pneumonia) of every validation image; each rank scores every N-th one."""
        rows = np.arange(self.ranks.rank, len(self.val_images), self.ranks.world_size)
        return self.ranks.gather(self.predict(self.val_images[rows]), rows, len(self.val_images))

    def predict(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        """Probability of pneumonia for each uint8 image, by the model that is kept (:attr:`weights`)."""
        return self.probabilities(self.weights, images)

    def checkpoint(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "averaged": self.averaged.state_dict() if self.averaged is not None else None,
            "state": self.state.__dict__.copy(),
        }

    def restore(self, checkpoint: dict[str, Any]) -> None:
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        if self.scaler and checkpoint["scaler"]:
            self.scaler.load_state_dict(checkpoint["scaler"])
        if self.averaged is not None and checkpoint.get("averaged"):
            self.averaged.load_state_dict(checkpoint["averaged"])
        self.state = TrainState(**checkpoint["state"])


def weight_average(model: nn.Module, decay: float) -> AveragedModel:
    """An exponential moving average of ``model``'s parameters and buffers (BatchNorm statistics included, so the
    average needs no BatchNorm pass of its own). After ``n`` updates the rate is ``min(decay, (1+n)/(10+n))``: the
    average follows the weights closely while they move fast early on instead of staying near the initial ones.
    Integer buffers (BatchNorm's batch counter) are copied, not averaged."""

    def update(averages: list[torch.Tensor], currents: list[torch.Tensor], updates: torch.Tensor) -> None:
        # called once per device and dtype group: one read of the counter, one fused update of the group
        if not averages[0].is_floating_point():
            torch._foreach_copy_(averages, currents)
            return
        count = int(updates)
        rate = min(decay, (1 + count) / (10 + count))
        torch._foreach_lerp_(averages, currents, 1 - rate)

    return AveragedModel(model, multi_avg_fn=update, use_buffers=True)
