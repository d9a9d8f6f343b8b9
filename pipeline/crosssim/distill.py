"""Knowledge distillation: the adapted model (teacher) teaches a smaller student on both domains.

Each step the frozen teacher scores an augmented source batch and target batch; the student
minimises :class:`DistillationLoss` on each: α·CE + (1 − α)·T²·KL on labelled images (source,
and labelled target rows), T²·KL alone on unlabelled target images (or α·CE on confident
teacher pseudo-labels + (1 − α)·T²·KL when ``pseudo_label_threshold`` is set).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from pipeline.config import DistillConfig
from pipeline.crosssim.engine import UNLABELLED, DomainData, DomainLoop, EvaluationSets, LoopRuntime
from pipeline.crosssim.losses import DistillationLoss
from pipeline.models import build_model


class Distiller(DomainLoop):
    """Trains a fresh ``cfg.student_backbone`` from ``teacher``; ``self.model`` is the student."""

    def __init__(
        self,
        teacher: nn.Module,
        source: DomainData,
        target: DomainData,
        evaluation: EvaluationSets,
        cfg: DistillConfig,
        batch_size: int,
        eval_every: int,
        runtime: LoopRuntime,
        handlers: list[Any] | None = None,
    ) -> None:
        super().__init__(source, target, batch_size, cfg.steps, eval_every, evaluation, runtime, handlers)
        self.cfg = cfg
        self.teacher = teacher.to(self.device, memory_format=self.memory_format).eval()
        self.teacher.requires_grad_(False)
        self.model = build_model(cfg.student_backbone).to(self.device, memory_format=self.memory_format)
        self.labelled_loss = DistillationLoss(cfg.alpha, cfg.temperature)
        self.unlabelled_loss = DistillationLoss(cfg.alpha, cfg.temperature, cfg.pseudo_label_threshold)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=1e-4)
        warmup = max(1, cfg.steps // 10)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * min((step - warmup) / max(1, cfg.steps - warmup), 1.0)))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)

    def train_step(self) -> None:
        source_images, source_labels = self.source.next()
        target_images, target_labels = self.target.next()
        inputs = torch.cat([self.inputs(source_images), self.inputs(target_images)])
        labels = torch.cat([source_labels, target_labels]).to(self.device)
        with torch.no_grad():
            teacher_logits = self.teacher(inputs)
        self.model.train()
        student_logits = self.model(inputs)
        labelled = labels != UNLABELLED
        losses: dict[str, torch.Tensor] = {}
        if labelled.any():
            losses["labelled"] = self.labelled_loss(
                student_logits[labelled], teacher_logits[labelled], labels[labelled]
            ) * labelled.float().mean()
        if (~labelled).any():
            losses["unlabelled"] = self.unlabelled_loss(
                student_logits[~labelled], teacher_logits[~labelled]
            ) * (~labelled).float().mean()
        total = sum(losses.values())  # weighted by share of the batch: a per-image mean over both parts
        self.optimise(total, losses)
