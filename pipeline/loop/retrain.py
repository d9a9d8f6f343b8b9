"""Warm-start retraining for the learning loop: the champion's network, fine-tuned on the site's labelled reads,
then calibrated on reads it was not trained on.

A weekly cycle cannot afford the full pipeline (source training, adaptation, distillation: ≈ 15 min at 64 px on
two cores), and need not: the champion already holds what the source taught it, and what it lacks at a new site
is what that site's labels say. So the challenger starts from the champion's weights and is fine-tuned (every
layer, the training augmentation, cosine decay from ``loop.retrain_lr``, ``loop.retrain_steps`` steps) on the
site's labelled cases — plain fine-tuning, which beat the semi-supervised CrossSim path on patients the project
never saw (README "CrossSim benchmark"). ``loop.source_replay`` > 0 mixes that many source images per site case
into the batches, against forgetting.

Calibration (``loop.calibration_share`` of the reads, stratified, held out of the fine-tuning): a few dozen reads
fine-tuned for 100 steps give over-confident probabilities (make bench-loop: an in-sample threshold of 0.95),
and the rollout's rule compares Brier scores, which punish over-confidence; so a calibrated challenger shows its
gain in far fewer cases (on NIH, the mean paired Brier gain of a 60-read challenger rose from 0.04 to 0.10).
Temperature scaling (Guo et al., "On calibration of modern neural networks", ICML 2017): one T > 0 minimising
the held-out reads' log-loss of softmax(z / T), folded into the linear head (W/T, b/T) so the served network is
calibrated as it stands. Its operating threshold is Youden's on those held-out reads
(``pipeline.crosssim.scoring.decision_threshold``): out of sample, unlike one chosen on the reads it fitted.
Too few reads of a class to hold any out: all are trained on, T = 1, the threshold in-sample (said so in
``threshold_chosen_on``).

No checkpoint is selected (the last weights are kept): no validation set is left that the evaluation patients
would not have to supply.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from torch import nn

from pipeline.config import AugmentConfig, LoopConfig, TrainConfig
from pipeline.crosssim.engine import DomainData
from pipeline.crosssim.finetune import finetune_on_labels
from pipeline.crosssim.scoring import decision_threshold
from pipeline.models import Classifier
from pipeline.training.inference import batched_outputs

MIN_CALIBRATION_PER_CLASS = 2  # held-out reads of each class below which no temperature is fitted
TEMPERATURE_BOUNDS = (0.05, 100.0)


@dataclass(frozen=True)
class WarmStartResult:
    model: Classifier
    threshold: float
    threshold_chosen_on: str
    labelled: int  # site cases it was trained on
    calibrated_on: int  # site cases held out for its temperature and threshold
    temperature: float
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
    """A copy of ``champion`` fine-tuned on ``labelled`` (the site's reads, both classes needed) less the share held
    out to calibrate it, with ``loop.source_replay`` source images per read drawn from ``source``; the champion
    itself is not changed."""
    started = time.perf_counter()
    fit, held_out = calibration_split(labelled.labels, loop.calibration_share, seed)
    fitted = DomainData(labelled.name, np.asarray(labelled.images)[fit], labelled.labels[fit])
    data, replayed = fitted, 0
    if loop.source_replay > 0 and source is not None and len(source.images):
        replayed = min(len(source.images), int(round(loop.source_replay * len(fitted.images))))
        rows = np.sort(np.random.default_rng(seed).choice(len(source.images), replayed, replace=False))
        data = DomainData(
            f"{labelled.name} + {replayed} of {source.name}",
            np.concatenate([np.asarray(fitted.images), np.asarray(source.images)[rows]]),
            np.concatenate([fitted.labels, source.labels[rows]]),
        )
    model = finetune_on_labels(champion, data, loop.retrain_steps, loop.retrain_lr, train, augment, seed).cpu().eval()
    temperature = 1.0
    chosen_by = fitted
    if len(held_out):
        calibration = DomainData(
            f"{labelled.name} (held-out reads)", np.asarray(labelled.images)[held_out], labelled.labels[held_out]
        )
        temperature = fit_temperature(model, calibration)
        fold_temperature(model, temperature)
        chosen_by = calibration
    threshold, chosen_on = decision_threshold(model, chosen_by, chosen_by, torch.device("cpu"))
    return WarmStartResult(
        model, threshold, chosen_on, len(fit), len(held_out), temperature, replayed, time.perf_counter() - started
    )


def calibration_split(labels: np.ndarray, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows to fine-tune on, rows held out to calibrate): ``share`` of each class, rounded, held out when that
    leaves at least ``MIN_CALIBRATION_PER_CLASS`` of each class on both sides; otherwise nothing is held out."""
    rng = np.random.default_rng(seed)
    held: list[np.ndarray] = []
    for value in (0, 1):
        rows = np.flatnonzero(labels == value)
        take = int(round(share * len(rows)))
        if take < MIN_CALIBRATION_PER_CLASS or len(rows) - take < MIN_CALIBRATION_PER_CLASS:
            return np.arange(len(labels)), np.array([], dtype=np.int64)
        held.append(rng.choice(rows, take, replace=False))
    held_out = np.sort(np.concatenate(held))
    return np.setdiff1d(np.arange(len(labels)), held_out), held_out


def fit_temperature(model: Classifier, calibration: DomainData) -> float:
    """The T minimising the mean log-loss of softmax(logits / T) on ``calibration`` (bounded 1-d search)."""
    model.eval()
    logits = torch.cat(list(batched_outputs(model, np.asarray(calibration.images), torch.device("cpu")))).double()
    labels = torch.as_tensor(calibration.labels, dtype=torch.long)

    def log_loss(temperature: float) -> float:
        return float(nn.functional.cross_entropy(logits / temperature, labels))

    found = minimize_scalar(log_loss, bounds=TEMPERATURE_BOUNDS, method="bounded")
    return float(found.x) if math.isfinite(found.fun) else 1.0


def fold_temperature(model: Classifier, temperature: float) -> None:
    """Scale the linear head so that the network outputs logits / T: (W/T)·h + b/T."""
    with torch.no_grad():
        model.head.weight.div_(temperature)
        model.head.bias.div_(temperature)
