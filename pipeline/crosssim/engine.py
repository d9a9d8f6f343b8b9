"""The step loop shared by adaptation, distillation and fine-tuning: two domains, periodic evaluation.

A :class:`pipeline.training.loop.Loop` like the source Trainer (handlers, device, mixed precision, the optimiser
step, the non-finite-loss policy); handlers attach model selection, divergence detection, progress and tracking
through the events ``fit_start``, ``step_end``, ``evaluate`` (every ``eval_every`` steps and at the end) and
``fit_end``. A subclass implements :meth:`DomainLoop.losses` and says which model is being trained
(``self.model``, ``self.optimizer``, ``self.scheduler``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from pipeline.augment import augment_batch, normalise, to_model_input
from pipeline.crosssim.losses import binary_entropy
from pipeline.errors import TrainingError
from pipeline.training.inference import batched_outputs
from pipeline.training.loop import Loop, NonFiniteLoss

UNLABELLED = -1


@dataclass(frozen=True)
class DomainData:
    """uint8 images (N, S, S) of one domain and their labels (0/1, or ``UNLABELLED``)."""

    name: str
    images: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class LoopRuntime:
    """Where and how a loop runs: device, memory format, augmentation, random stream, mixed precision."""

    device: torch.device
    channels_last: bool
    transform: Any  # per-image augmentation (pipeline.augment.build_augmentation) or None
    generator: torch.Generator
    amp: str = "off"  # train.amp: "auto" is bf16/fp16 on CUDA, fp32 on CPU


class DomainBatches:
    """Endless random batches of one domain's uint8 images, with labels (``UNLABELLED`` = hidden).

    ``balanced``: every batch holds each label equally often (labelled data only), so that a
    domain's class mix does not become part of what alignment matches.
    """

    def __init__(self, data: DomainData, batch_size: int, generator: torch.Generator, balanced: bool = False) -> None:
        self.images = torch.from_numpy(np.array(data.images))  # a copy: prepared arrays are read-only memmaps
        self.labels = torch.as_tensor(np.asarray(data.labels, dtype=np.int64))
        self.batch_size = min(batch_size, len(self.images))
        self.generator = generator
        if balanced and (self.labels == UNLABELLED).any():
            raise TrainingError(f"{data.name}: balanced batches need every image labelled")
        # rows drawn from: one pool per label when balanced, else one pool of all rows
        self._pools = (
            [torch.nonzero(self.labels == label).squeeze(1) for label in torch.unique(self.labels)]
            if balanced
            else [torch.arange(len(self.labels))]
        )
        self._orders = [torch.empty(0, dtype=torch.long) for _ in self._pools]

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        share, extra = divmod(self.batch_size, len(self._pools))
        rows = torch.cat([self._take(index, share + (index < extra)) for index in range(len(self._pools))])
        return self.images[rows], self.labels[rows]

    def _take(self, index: int, count: int) -> torch.Tensor:
        pool, order = self._pools[index], self._orders[index]
        while len(order) < count:  # a new pass: every image once before any repeats
            order = torch.cat([order, pool[torch.randperm(len(pool), generator=self.generator)]])
        self._orders[index] = order[count:]
        return order[:count]


@dataclass
class LoopState:
    step: int = 0
    losses: dict[str, float] = field(default_factory=dict)  # last step's loss terms
    domain_accuracy: float = math.nan  # last step's discriminator accuracy (nan without one)
    evaluation: dict[str, float] = field(default_factory=dict)  # last evaluation's numbers
    history: list[dict[str, float]] = field(default_factory=list)  # one row per logged step / evaluation
    stop_reason: str | None = None
    images_per_second: float = 0.0


@dataclass(frozen=True)
class EvaluationSets:
    """What an evaluation scores: labelled source-val, target-train images (labels mostly hidden)."""

    source_val_images: np.ndarray
    source_val_labels: np.ndarray
    target_images: np.ndarray
    target_labels: np.ndarray  # UNLABELLED where hidden


class DomainLoop(Loop):
    """Runs ``steps`` optimisation steps on source + target batches, evaluating every ``eval_every``."""

    model: nn.Module
    grad_clip_norm: float | None = None  # each loop sets its configured clip

    def __init__(
        self,
        source: DomainData,
        target: DomainData,
        batch_size: int,
        steps: int,
        eval_every: int,
        evaluation: EvaluationSets,
        runtime: LoopRuntime,
        handlers: list[Any] | None = None,
        balance_source: bool = False,
    ) -> None:
        if steps < 1:
            raise TrainingError(f"steps must be ≥ 1, got {steps}")
        super().__init__(runtime.device, runtime.channels_last, runtime.amp, handlers)
        self.batch_size = batch_size
        self.source = DomainBatches(source, batch_size, runtime.generator, balanced=balance_source)
        self.target = DomainBatches(target, batch_size, runtime.generator)
        self.steps = steps
        self.eval_every = eval_every
        self.evaluation_sets = evaluation
        self.transform = runtime.transform
        self.state = LoopState()

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 batch → augmented (when configured), normalised model input on the device."""
        batch = to_model_input(images, self.device, self.channels_last)
        return normalise(augment_batch(batch, self.transform))

    def extract(self, network: nn.Module, images: np.ndarray) -> torch.Tensor:
        """``network`` applied to un-augmented uint8 images in batches, without gradients."""
        return extract(network, images, self.device, self.channels_last)

    def losses(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One step's loss to minimise and its named terms (for the history); subclasses draw their batches."""
        raise NotImplementedError

    def train_step(self) -> None:
        """The step's losses under autocast, recorded, checked, then backward and the clipped optimiser step."""
        with self.autocast():
            total, losses = self.losses()
        self.state.losses = {name: float(value.detach()) for name, value in losses.items()} | {"total": float(total.detach())}
        self.check_finite(self.state.losses, f"step {self.state.step + 1}")
        self.optimizer.zero_grad(set_to_none=True)  # gradients another fit left behind (the head warm-up's) do not count
        self.backward(total)
        self.apply_gradients(self.optimizer, self.scheduler, self.model.parameters(), self.grad_clip_norm)

    def fit(self) -> LoopState:
        self.emit("fit_start")
        self.evaluate()  # step 0: the starting point every later evaluation is compared with
        started, images = time.perf_counter(), 0
        while self.state.step < self.steps and self.state.stop_reason is None:
            try:
                self.train_step()
            except NonFiniteLoss as stop:  # recorded, not raised: the stage writes its diagnostics, then fails
                self.state.stop_reason = str(stop)
            self.state.step += 1
            images += 2 * self.batch_size
            self.emit("step_end")
            if self.state.stop_reason is None and (
                self.state.step % self.eval_every == 0 or self.state.step == self.steps
            ):
                self.state.images_per_second = images / (time.perf_counter() - started)
                self.evaluate()
        self.emit("fit_end")
        return self.state

    def evaluate(self) -> None:
        sets = self.evaluation_sets
        source_probs = self.predict(sets.source_val_images)
        target_probs = self.predict(sets.target_images)
        labelled = sets.target_labels != UNLABELLED
        result = {
            "step": float(self.state.step),
            "source_val_auc": _auc(sets.source_val_labels, source_probs),
            "target_entropy": float(binary_entropy(torch.from_numpy(target_probs)).mean()),
            "target_positive_rate": float((target_probs >= 0.5).mean()),
        }
        if labelled.any() and len(set(sets.target_labels[labelled])) == 2:
            result["target_labelled_auc"] = _auc(sets.target_labels[labelled], target_probs[labelled])
        self.state.evaluation = result | self.extra_evaluation()
        self.emit("evaluate")

    def extra_evaluation(self) -> dict[str, float]:
        """Loop-specific numbers added to every evaluation."""
        return {}

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.probabilities(self.model, images)


def extract(network: nn.Module, images: np.ndarray, device: torch.device, channels_last: bool) -> torch.Tensor:
    """``network`` applied to uint8 images (N, H, W) in batches, without gradients; outputs on ``device``."""
    return torch.cat(list(batched_outputs(network, images, device, channels_last)))


def _auc(labels: np.ndarray, probs: np.ndarray) -> float:
    return float(roc_auc_score(labels, probs))
