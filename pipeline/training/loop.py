"""The training engine every loop here specialises (source training, CrossSim adaptation, distillation,
fine-tuning): the loop only optimises, handlers attach the rest, in the spirit of MONAI's engine + handlers.

What a :class:`Loop` owns, once for all of them:

- handlers and their events: objects with any of ``on_<event>(loop)`` (``fit_start``, ``step_end``,
  ``epoch_end``, ``evaluate``, ``fit_end``), called in order by :meth:`Loop.emit`;
- where it runs: device, memory format, mixed precision (bf16/fp16 autocast on CUDA; fp16 with a gradient
  scaler), and batched inference under the same autocast;
- the optimiser step: scaled backward, unscale, gradient clipping, step, zero, scheduler;
- one non-finite-loss policy: :meth:`Loop.check_finite` raises :class:`NonFiniteLoss` before a NaN or infinite
  loss reaches the weights. Source training lets it end the run; the CrossSim loops record it as their stop
  reason so that the stage can write its diagnostics first.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.errors import TrainingError
from pipeline.training.inference import predict_proba


class NonFiniteLoss(TrainingError):
    """A loss term is NaN or infinite; the step was not applied."""


def amp_dtype(choice: str, device: torch.device) -> torch.dtype | None:
    """``train.amp`` → the autocast dtype, or None for fp32."""
    if choice == "off" or (choice == "auto" and device.type != "cuda"):
        return None  # CPU autocast is slower than fp32 for these convnets
    if choice == "fp16" or (choice == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


class Loop:
    """The base of every training loop; subclasses own their data, model(s), optimiser and loop body."""

    def __init__(self, device: torch.device, channels_last: bool, amp: str, handlers: Iterable[Any] | None) -> None:
        self.device = device
        self.channels_last = channels_last
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.amp_dtype = amp_dtype(amp, device)
        self.scaler = torch.amp.GradScaler(device.type) if self.amp_dtype == torch.float16 else None
        self.handlers = list(handlers or [])

    def emit(self, event: str) -> None:
        for handler in self.handlers:
            callback = getattr(handler, f"on_{event}", None)
            if callback is not None:
                callback(self)

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None)

    @staticmethod
    def check_finite(losses: Mapping[str, float], where: str) -> None:
        bad = [name for name, value in losses.items() if not math.isfinite(value)]
        if bad:
            raise NonFiniteLoss(f"loss {', '.join(bad)} is not finite at {where}")

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def apply_gradients(
        self,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        parameters: Iterable[nn.Parameter],
        clip_norm: float | None,
    ) -> None:
        """The accumulated gradients (unscaled, clipped to ``clip_norm`` when set) into the weights; then zeroed."""
        if self.scaler:
            self.scaler.unscale_(optimizer)
        if clip_norm:
            nn.utils.clip_grad_norm_(parameters, clip_norm)
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()

    def probabilities(self, model: nn.Module, images: torch.Tensor | np.ndarray) -> np.ndarray:
        """P(pneumonia) of uint8 images, in batches, under the loop's device, memory format and autocast."""
        return predict_proba(model, images, self.device, self.channels_last, autocast=self.autocast)
