"""Fine-tuning the source model on the labelled target images, plain or semi-supervised.

With target labels, CrossSim starts adaptation from a fine-tuned model rather than from the
source model: the pediatric cues the source model learned invert on adults, and a few target
labels correct that faster than any alignment.

* :func:`finetune_on_labels`: plain supervised fine-tuning; the benchmark's "fine-tune" baseline.
* :class:`ConsistencyFinetuner`: the same labels, plus a consistency loss on the target-train images whose
  labels are hidden (CrossSim's default when it has labels, ``crosssim.label_consistency_weight``): dynamic
  augmentation turned into a training signal on the unlabelled target images, either UDA's
  :class:`AugmentationConsistencyLoss` or AdaMatch's :class:`DistributionAlignedPseudoLabelLoss`
  (``crosssim.label_consistency``).
* :func:`linear_probe`: the LP of LP-FT (Kumar et al., ICLR 2022; ``crosssim.label_probe_steps``). Fine-tuning
  every layer through a head that does not yet fit the new labels distorts the pretrained features before the
  head catches up; fitting the head first on frozen features, then fine-tuning, keeps them.

Neither selects a checkpoint: with this few labels no separate validation set is left to select on.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.augment import augment_batch, build_strong_augmentation, normalise, to_model_input
from pipeline.config import AugmentConfig, CrossSimConfig, TrainConfig
from pipeline.crosssim.engine import UNLABELLED, DomainData, DomainLoop, EvaluationSets, LoopRuntime, extract
from pipeline.crosssim.losses import AugmentationConsistencyLoss, DistributionAlignedPseudoLabelLoss
from pipeline.errors import DatasetError
from pipeline.models import Classifier
from pipeline.training.engine import Trainer, seed_everything
from pipeline.training.schedule import warmup_cosine


def _labelled_rows(data: DomainData) -> np.ndarray:
    labelled = data.labels != UNLABELLED
    if set(np.unique(data.labels[labelled])) != {0, 1}:
        raise DatasetError(
            f"{data.name}: fine-tuning needs labelled images of both classes, "
            f"got {sorted(set(data.labels[labelled].tolist()))}"
        )
    return labelled


def linear_probe(
    model: Classifier, data: DomainData, steps: int, lr: float, train: TrainConfig, device: torch.device
) -> Classifier:
    """A copy of ``model`` whose ``head`` alone was fitted (``steps`` full-batch AdamW steps, label smoothing and
    weight decay as in training) on the frozen, un-augmented features of ``data``'s labelled rows."""
    labelled = _labelled_rows(data)
    probed = copy.deepcopy(model).to(device).eval()
    features = extract(probed.features, np.asarray(data.images[labelled]), device, channels_last=False).float()
    labels = torch.as_tensor(data.labels[labelled], device=device)
    optimizer = torch.optim.AdamW(probed.head.parameters(), lr=lr, weight_decay=train.weight_decay)
    criterion = nn.CrossEntropyLoss(label_smoothing=train.label_smoothing)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        criterion(probed.head(features), labels).backward()
        optimizer.step()
    return probed


def finetune_on_labels(
    source_model: Classifier, data: DomainData, steps: int, lr: float, train: TrainConfig, augment: AugmentConfig, seed: int
) -> Classifier:
    """A copy of ``source_model`` fine-tuned (all layers, cosine from ``lr``) for about ``steps`` steps on
    ``data``'s labelled rows, with the training augmentation; the last weights are returned."""
    labelled = _labelled_rows(data)
    images, labels = np.asarray(data.images[labelled]), data.labels[labelled]
    epochs = max(1, math.ceil(steps * train.batch_size / len(images)))
    # a few steps: the last weights, not an average that would still lag them
    config = train.model_copy(update={"epochs": epochs, "lr": lr, "warmup_epochs": 0.0, "ema_decay": None})
    seed_everything(seed)
    trainer = Trainer(copy.deepcopy(source_model), images, labels, images, labels, config, augment, seed)
    trainer.fit()
    return trainer.model.eval()


class ConsistencyFinetuner(DomainLoop):
    """CE on ``data``'s labelled rows + ``label_consistency_weight``·consistency on its unlabelled ones, for
    ``label_finetune_steps`` steps from ``label_finetune_lr`` (``settings``: the CrossSim section); after :meth:`fit`,
    ``self.model`` (a copy of ``source_model``) is the result. It batches, smooths labels, decays and clips as
    source training does (``train``): it is supervised training of the same network, on other images.

    Its two streams are the labelled rows (``source`` of the loop) and the unlabelled rows
    (``target``). Each step: CE (label smoothing as in training) on an augmented labelled
    batch; the model's prediction on an ordinarily augmented (weak) view of an unlabelled batch,
    without gradient, is the target for its prediction on a strongly augmented view of the same
    images (:func:`pipeline.augment.build_strong_augmentation`).
    """

    def __init__(
        self,
        source_model: Classifier,
        data: DomainData,
        settings: CrossSimConfig,
        train: TrainConfig,
        augment: AugmentConfig,
        evaluation: EvaluationSets,
        runtime: LoopRuntime,
        handlers: list[Any] | None = None,
    ) -> None:
        labelled = _labelled_rows(data)
        if labelled.all():
            raise DatasetError(f"{data.name}: semi-supervised fine-tuning needs unlabelled images too; all are labelled")
        labelled_rows, unlabelled_rows = (
            DomainData(f"{data.name} ({kind})", data.images[rows], data.labels[rows])
            for kind, rows in (("labelled", labelled), ("unlabelled", ~labelled))
        )
        steps = settings.label_finetune_steps
        super().__init__(labelled_rows, unlabelled_rows, train.batch_size, steps, steps, evaluation, runtime, handlers)
        self.model = copy.deepcopy(source_model).to(self.device, memory_format=self.memory_format)
        self.weight = settings.label_consistency_weight
        self.strong = build_strong_augmentation(augment)
        self.grad_clip_norm = train.grad_clip_norm
        self.criterion = nn.CrossEntropyLoss(label_smoothing=train.label_smoothing)
        self.consistency = AugmentationConsistencyLoss()
        self.pseudo_labels = (
            DistributionAlignedPseudoLabelLoss(settings.relative_confidence) if settings.label_consistency == "adamatch" else None
        )
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=settings.label_finetune_lr, weight_decay=train.weight_decay)
        self.scheduler = warmup_cosine(self.optimizer, steps)

    def losses(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images, labels = self.source.next()
        self.model.train()
        labelled_logits = self.model(self.inputs(images))
        losses = {"classification": self.criterion(labelled_logits, labels.to(self.device))}
        unlabelled, _ = self.target.next()
        batch = to_model_input(unlabelled, self.device, self.channels_last)
        with torch.no_grad():
            weak = self.model(normalise(augment_batch(batch, self.transform)))
        strong = self.model(normalise(augment_batch(batch, self.strong)))
        if self.pseudo_labels is None:
            losses["consistency"] = self.weight * self.consistency(weak, strong)
        else:  # the labelled batch's (weakly augmented) predictions set the class mix and the confidence bar
            loss, kept = self.pseudo_labels(weak, strong, labelled_logits)
            losses["consistency"] = self.weight * loss
            losses["pseudo_labels_kept"] = kept.detach()  # a rate, recorded in the history, not minimised
        return losses["classification"] + losses["consistency"], losses
