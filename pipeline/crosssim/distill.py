"""Knowledge distillation: the adapted model (teacher) teaches a smaller student on both domains.

Each step the frozen teacher scores an augmented source batch and target batch; the student
minimises :class:`DistillationLoss` on each: α·CE + (1 − α)·T²·KL on labelled images (source,
and labelled target rows), T²·KL alone on unlabelled target images (or α·CE on confident
teacher pseudo-labels + (1 − α)·T²·KL when ``pseudo_label_threshold`` is set). When the run has
target labels, the source rows' hard labels weigh ``source_label_weight`` (as in adaptation):
``w``·(α·CE + (1 − α)·T²·KL) + (1 − ``w``)·T²·KL.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.config import CrossSimConfig
from pipeline.crosssim.engine import UNLABELLED, DomainData, DomainLoop, EvaluationSets, LoopRuntime
from pipeline.crosssim.losses import DistillationLoss
from pipeline.models import build_model
from pipeline.training.schedule import warmup_cosine


class Distiller(DomainLoop):
    """Trains a fresh ``settings.distill.student_backbone`` from ``teacher``; ``self.model`` is the student.

    Batches and evaluations as in adaptation (``settings.batch_size``, ``settings.eval_every``); steps, optimiser and
    losses from ``settings.distill``.
    """

    def __init__(
        self,
        teacher: nn.Module,
        source: DomainData,
        target: DomainData,
        evaluation: EvaluationSets,
        settings: CrossSimConfig,
        runtime: LoopRuntime,
        handlers: list[Any] | None = None,
    ) -> None:
        cfg = settings.distill
        super().__init__(source, target, settings.batch_size, cfg.steps, settings.eval_every, evaluation, runtime, handlers)
        self.cfg = cfg
        self.teacher = teacher.to(self.device, memory_format=self.memory_format).eval()
        self.teacher.requires_grad_(False)
        self.model = build_model(cfg.student_backbone).to(self.device, memory_format=self.memory_format)
        self.labelled_loss = DistillationLoss(cfg.alpha, cfg.temperature)
        self.unlabelled_loss = DistillationLoss(cfg.alpha, cfg.temperature, cfg.pseudo_label_threshold)
        self.soft_loss = DistillationLoss(0.0, cfg.temperature)  # T²·KL alone
        self.source_weight = settings.source_label_weight if (target.labels != UNLABELLED).any() else 1.0
        self.grad_clip_norm = cfg.grad_clip_norm
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = warmup_cosine(self.optimizer, cfg.steps, warmup_steps=max(1, cfg.steps // 10))

    def losses(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        source_images, source_labels = self.source.next()
        target_images, target_labels = self.target.next()
        inputs = torch.cat([self.inputs(source_images), self.inputs(target_images)])
        with torch.no_grad():
            teacher_logits = self.teacher(inputs)
        self.model.train()
        student_logits = self.model(inputs)
        n_source, n_all = len(source_images), len(inputs)
        source_labels, target_labels = source_labels.to(self.device), target_labels.to(self.device)
        student_source, student_target = student_logits[:n_source], student_logits[n_source:]
        teacher_source, teacher_target = teacher_logits[:n_source], teacher_logits[n_source:]
        # each part weighted by its share of the batch: a per-image mean over all of it
        source = self.labelled_loss(student_source, teacher_source, source_labels)
        if self.source_weight < 1:
            source = self.source_weight * source + (1 - self.source_weight) * self.soft_loss(student_source, teacher_source)
        losses: dict[str, torch.Tensor] = {"source": source * n_source / n_all}
        labelled = target_labels != UNLABELLED
        if labelled.any():
            losses["labelled_target"] = self.labelled_loss(
                student_target[labelled], teacher_target[labelled], target_labels[labelled]
            ) * int(labelled.sum()) / n_all
        if (~labelled).any():
            losses["unlabelled_target"] = self.unlabelled_loss(
                student_target[~labelled], teacher_target[~labelled]
            ) * int((~labelled).sum()) / n_all
        return sum(losses.values()), losses
