"""Feature-space cross mapping: adapt the source model's features to the target hospital.

Each step takes one source batch (labelled) and one target batch (labels hidden except a
labelled fraction), both augmented, and one network — the *target* feature extractor,
initialised from the source one, followed by the shared mapping head — sees both:

* ``gan``:  the discriminator D learns source (1) vs target (0) on detached mapping features
  (:class:`DiscriminatorLoss`, its own optimiser); then the network minimises
  CE(source) + w·L_adv(target) + λ‖F_src(x_t) − F_tgt(x_t)‖₂, where F_src is the frozen source
  backbone (:class:`AdversarialAlignmentLoss`, :class:`FeatureConsistencyLoss`).
* ``dann``: one optimiser step on CE + w·L_dann through a warm-start gradient reversal layer
  (:class:`DomainAdversarialLoss`); the consistency term is added when λ > 0.
* ``off``:  CE + consistency only (the "no alignment" ablation).

Labelled target rows, when there are any, add their CE to the classification term, and the
source CE then weighs ``source_label_weight`` (the stage hands this class the source model
already fine-tuned on those labels: it is the "source" model, F_src, of the formulas above).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.config import CrossSimConfig
from pipeline.crosssim.engine import UNLABELLED, DomainData, DomainLoop, EvaluationSets, LoopRuntime, extract
from pipeline.crosssim.losses import (
    AdversarialAlignmentLoss,
    DiscriminatorLoss,
    DomainAdversarialLoss,
    FeatureConsistencyLoss,
)
from pipeline.crosssim.model import AdaptedClassifier
from pipeline.crosssim.modules import DomainDiscriminator, WarmStartGradientReverseLayer
from pipeline.models import Classifier
from pipeline.training.engine import class_weights
from pipeline.training.schedule import warmup_cosine


class Adapter(DomainLoop):
    """Adversarial (or plain) adaptation of ``source`` to the target images; ``self.model`` is the result."""

    def __init__(
        self,
        source_model: Classifier,
        source: DomainData,
        target: DomainData,
        evaluation: EvaluationSets,
        cfg: CrossSimConfig,
        runtime: LoopRuntime,
        handlers: list[Any] | None = None,
    ) -> None:
        super().__init__(
            source, target, cfg.batch_size, cfg.steps, cfg.eval_every, evaluation, runtime, handlers, cfg.balance_source_classes
        )
        self.cfg = cfg
        self.grad_clip_norm = cfg.grad_clip_norm
        self.frozen_source = copy.deepcopy(source_model.features).to(self.device, memory_format=self.memory_format).eval()
        self.frozen_source.requires_grad_(False)
        self.model = AdaptedClassifier.from_source(source_model, cfg.mapping_dim).to(
            self.device, memory_format=self.memory_format
        )
        self.weighted_criterion = nn.CrossEntropyLoss(weight=class_weights(torch.as_tensor(source.labels)).to(self.device))
        # balanced batches already weigh the classes equally
        self.criterion = nn.CrossEntropyLoss() if cfg.balance_source_classes else self.weighted_criterion
        self.source_weight = cfg.source_label_weight if (target.labels != UNLABELLED).any() else 1.0
        self.consistency = FeatureConsistencyLoss(cfg.consistency_weight)
        self.discriminator = DomainDiscriminator(cfg.mapping_dim, batch_norm=cfg.alignment == "dann").to(self.device)
        self.discriminator_loss = DiscriminatorLoss()
        self.adversarial_loss = AdversarialAlignmentLoss()
        grl = WarmStartGradientReverseLayer(max_iters=cfg.steps, auto_step=True)
        self.dann_loss = DomainAdversarialLoss(self.discriminator, grl)
        self._warm_start_head(source, target, runtime.generator)
        groups = [
            {"params": self.model.features.parameters(), "lr": cfg.lr},
            {"params": [*self.model.mapping.parameters(), *self.model.head.parameters()], "lr": cfg.lr * cfg.head_lr_factor},
        ]
        if cfg.alignment == "dann":
            groups.append({"params": self.discriminator.parameters(), "lr": cfg.discriminator_lr})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        self.discriminator_optimizer = torch.optim.AdamW(self.discriminator.parameters(), lr=cfg.discriminator_lr)
        self.scheduler = warmup_cosine(self.optimizer, cfg.steps)

    def _warm_start_head(self, source: DomainData, target: DomainData, generator: torch.Generator) -> None:
        """Fit the new mapping head + classifier on the frozen starting features first.

        The adapted model then starts as good as the starting model on its labelled images,
        instead of from a random head whose large early gradients would wreck the copied
        backbone. The loss is the one of :meth:`_classification`: source CE, plus labelled
        target CE when the run has target labels.
        """
        self.model.features.eval()
        head = nn.Sequential(self.model.mapping, self.model.head)
        domains = [(self.extract(self.model.features, source.images), source.labels, self.source_weight)]
        labelled = target.labels != UNLABELLED
        if labelled.any():
            domains.append((self.extract(self.model.features, target.images[labelled]), target.labels[labelled], 1.0))
        domains = [
            (features, torch.as_tensor(np.asarray(labels, dtype=np.int64), device=self.device), weight)
            for features, labels, weight in domains
        ]
        optimizer = torch.optim.AdamW(head.parameters(), lr=self.cfg.head_warmup_lr, weight_decay=self.cfg.weight_decay)
        for _ in range(self.cfg.head_warmup_steps):
            loss = torch.zeros((), device=self.device)
            for features, labels, weight in domains:
                rows = torch.randint(len(features), (128,), generator=generator).to(self.device)
                loss = loss + weight * self.weighted_criterion(head(features[rows]), labels[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        self.model.features.train()

    def losses(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        source_images, source_labels = self.source.next()
        target_images, target_labels = self.target.next()
        x_source, x_target = self.inputs(source_images), self.inputs(target_images)
        source_labels = source_labels.to(self.device)
        target_labels = target_labels.to(self.device)
        n_source = len(x_source)
        self.model.train()
        features = self.model.features(torch.cat([x_source, x_target]))
        embedded = self.model.mapping(features)  # one batch: the mapping head's BatchNorm sees both domains
        logits = self.model.head(embedded)
        losses = {"classification": self._classification(logits, source_labels, target_labels)}
        if self.cfg.consistency_weight > 0:
            with torch.no_grad():
                anchor = self.frozen_source(x_target)
            losses["consistency"] = self.consistency(anchor, features[n_source:])
        if self.cfg.alignment == "gan":
            losses |= self._gan_terms(embedded, n_source)
        elif self.cfg.alignment == "dann":
            losses["dann"] = self.cfg.adversarial_weight * self.dann_loss(embedded[:n_source], embedded[n_source:])
            self.state.domain_accuracy = self.dann_loss.domain_accuracy
        return sum(value for name, value in losses.items() if name != "discriminator"), losses

    def _classification(self, logits: torch.Tensor, source_labels: torch.Tensor, target_labels: torch.Tensor) -> torch.Tensor:
        """Source CE, plus the CE of the batch's labelled target rows when there are any.

        With target labels in the run the two domains' means are added with the source one
        weighted by ``source_label_weight``: a handful of target rows must not drown in a
        full source batch whose pediatric cues invert on adults.
        """
        n_source = len(source_labels)
        loss = self.source_weight * self.criterion(logits[:n_source], source_labels)
        labelled = target_labels != UNLABELLED
        if labelled.any():
            loss = loss + self.criterion(logits[n_source:][labelled], target_labels[labelled])
        return loss

    def _gan_terms(self, embedded: torch.Tensor, n_source: int) -> dict[str, torch.Tensor]:
        """D's own step on detached features, then the target extractor's adversarial term."""
        logits = self.discriminator(embedded.detach()).squeeze(1)
        discriminator_loss = self.discriminator_loss(logits[:n_source], logits[n_source:])
        self.discriminator_optimizer.zero_grad(set_to_none=True)
        discriminator_loss.backward()
        self.discriminator_optimizer.step()
        with torch.no_grad():
            hits = torch.cat([logits[:n_source] >= 0, logits[n_source:] < 0]).float()
            self.state.domain_accuracy = 0.5 * float(hits[:n_source].mean() + hits[n_source:].mean())
        # D's parameters get gradients from this term too; they are cleared before D's next step.
        adversarial = self.adversarial_loss(self.discriminator(embedded).squeeze(1)[n_source:])
        return {"discriminator": discriminator_loss.detach(), "adversarial": self.cfg.adversarial_weight * adversarial}

    def extra_evaluation(self) -> dict[str, float]:
        """‖mean f_src − mean f_tgt‖₂ in the mapping space (source-val vs target-train): the gap, tracked."""
        source = self.embed(self.evaluation_sets.source_val_images)
        target = self.embed(self.evaluation_sets.target_images)
        return {"feature_distance": float(np.linalg.norm(source.mean(axis=0) - target.mean(axis=0)))}

    def embed(self, images: np.ndarray) -> np.ndarray:
        """Mapping-head features of uint8 images (eval mode): the space alignment works in."""
        self.model.eval()
        return self.extract(self.model.embed, images).float().cpu().numpy()


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images: np.ndarray, device: torch.device, channels_last: bool) -> None:
    """Re-estimate every BatchNorm's running statistics on ``images`` (AdaBN, Li et al. 2016).

    During adaptation the statistics average both domains; the deployed model sees only the
    target hospital's images, so it normalises with theirs. Weights are not changed.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over all batches
    was_training = model.training
    model.train()
    extract(model, images, device, channels_last)
    model.train(was_training)
    for norm, momentum in zip(norms, saved, strict=True):
        norm.momentum = momentum
