"""Warm-start retraining for the learning loop: the champion's network, fine-tuned on the site's labelled reads.

A weekly cycle cannot afford the full pipeline (source training, adaptation, distillation: ≈ 15 min at 64 px on
two cores), and need not: the champion already holds what the source taught it, and what it lacks at a new site
is what that site's labels say. So the challenger starts from the champion's weights and is fine-tuned (every
layer, the training augmentation, cosine decay from ``loop.retrain_lr``, ``loop.retrain_steps`` steps) on every
labelled case of the site so far — plain fine-tuning, which beat the semi-supervised CrossSim path on patients the
project never saw (README "CrossSim benchmark"). ``loop.source_replay`` > 0 mixes that many source images per
site case into the batches, against forgetting; the loop benchmark decides whether it helps.

No checkpoint is selected (the last weights are kept): with a few dozen reads no validation set is left that the
evaluation patients would not have to supply. The operating threshold is Youden's on the reads it was trained
on (``pipeline.crosssim.scoring.decision_threshold``): an in-sample choice, re-chosen as reads accumulate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.config import AugmentConfig, LoopConfig, TrainConfig
from pipeline.crosssim.engine import DomainData
from pipeline.crosssim.finetune import finetune_on_labels
from pipeline.crosssim.scoring import decision_threshold
from pipeline.models import Classifier


@dataclass(frozen=True)
class WarmStartResult:
    model: Classifier
    threshold: float
    threshold_chosen_on: str
    labelled: int  # site cases it was trained on
    replayed: int  # source images mixed in
    seconds: float


def warm_start_retrain(
    champion: Classifier,
    labelled: DomainData,
    loop: LoopConfig,
    train: TrainConfig,
    augment: AugmentConfig,
    seed: int,
    source: DomainData | None = None,
) -> WarmStartResult:
    """A copy of ``champion`` fine-tuned on ``labelled`` (the site's reads, both classes needed), with
    ``loop.source_replay`` source images per read drawn from ``source``; the champion itself is not changed."""
    started = time.perf_counter()
    data, replayed = labelled, 0
    if loop.source_replay > 0 and source is not None and len(source.images):
        replayed = min(len(source.images), int(round(loop.source_replay * len(labelled.images))))
        rows = np.sort(np.random.default_rng(seed).choice(len(source.images), replayed, replace=False))
        data = DomainData(
            f"{labelled.name} + {replayed} of {source.name}",
            np.concatenate([np.asarray(labelled.images), np.asarray(source.images)[rows]]),
            np.concatenate([labelled.labels, source.labels[rows]]),
        )
    model = finetune_on_labels(champion, data, loop.retrain_steps, loop.retrain_lr, train, augment, seed).cpu().eval()
    threshold, chosen_on = decision_threshold(model, labelled, labelled, torch.device("cpu"))
    return WarmStartResult(model, threshold, chosen_on, len(labelled.images), replayed, time.perf_counter() - started)
