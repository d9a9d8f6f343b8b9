"""Binary metrics for pneumonia (1) vs normal (0) from per-image probabilities of pneumonia.

The maths is scikit-learn's (point estimates) and torchmetrics' (bootstrap, batched over
resamples); this module validates inputs, turns scores into decisions and packages numbers.
An image is called pneumonia when ``score >= threshold``: the convention of ``roc_curve``, so
a threshold taken from the ROC curve reproduces that curve's operating point exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)
from torchmetrics.functional.classification import (
    binary_calibration_error,
    multilabel_accuracy,
    multilabel_auroc,
    multilabel_average_precision,
    multilabel_f1_score,
    multilabel_precision,
    multilabel_recall,
    multilabel_specificity,
)

from pipeline.errors import PipelineError

NAN = math.nan
CI_METRICS: tuple[str, ...] = (
    "auc",
    "accuracy",
    "sensitivity",
    "specificity",
    "precision",
    "f1",
    "average_precision",
    "ece",
)
# Resamples are scored in chunks of at most this many (image, resample) cells, so memory stays
# bounded on large sets while each torchmetrics call still covers many resamples at once.
_CHUNK_CELLS = 4_000_000
# torchmetrics' calibration error is ~15x slower on float64 than float32 inputs (it bins against
# float32 edges); model probabilities are float32 anyway, so ECE is always computed in float32.
_ECE_DTYPE = torch.float32


class EvaluationError(PipelineError):
    """Predictions cannot be evaluated (missing columns, no labels, scores outside [0, 1])."""


def check_inputs(y_true: ArrayLike, y_score: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Labels as int64 0/1 and scores as float64 probabilities, or an EvaluationError saying why not."""
    y = np.asarray(y_true)
    s = np.asarray(y_score, dtype=np.float64)
    if y.ndim != 1 or y.shape != s.shape:
        raise EvaluationError(f"labels and scores must be 1-D and of equal length, got shapes {y.shape} and {s.shape}")
    if y.size == 0:
        raise EvaluationError("no labelled images to evaluate")
    if not np.isin(y, (0, 1)).all():
        raise EvaluationError("labels must be 0 (normal) or 1 (pneumonia), with no missing values")
    if not (np.isfinite(s).all() and s.min() >= 0 and s.max() <= 1):
        raise EvaluationError("scores must be probabilities in [0, 1], with no missing values")
    return y.astype(np.int64), s


def choose_threshold(y_true: ArrayLike, y_score: ArrayLike) -> float:
    """The decision threshold maximising Youden's J = sensitivity + specificity - 1 on the ROC curve.

    Call it on the VALIDATION split only and apply the value unchanged to test and external sets:
    choosing it on the set being reported would leak that set's labels into the decision rule.
    J weighs missed pneumonia and false alarms equally whatever the prevalence, which suits sets
    whose prevalence differs from the deployment site's. Ties keep the highest threshold (fewest
    false alarms). The value is one of the scores, so ``score >= threshold`` gives the J-optimal
    ROC point. Raises EvaluationError when the split lacks a class (J is then undefined).
    """
    y, s = check_inputs(y_true, y_score)
    if np.unique(y).size < 2:
        raise EvaluationError("cannot choose a threshold: the validation labels contain a single class")
    fpr, tpr, thresholds = roc_curve(y, s)
    # Index 0 is sklearn's artificial +inf threshold (nothing called pneumonia): not a usable rule.
    best = 1 + int(np.argmax(tpr[1:] - fpr[1:]))
    return float(thresholds[best])


def binary_metrics(y_true: ArrayLike, y_score: ArrayLike, threshold: float, *, n_bins: int = 10) -> dict[str, Any]:
    """Point estimates at ``threshold``; metrics undefined for the set are NaN and explained in ``notes``.

    ``ece`` is the expected calibration error of the pneumonia probability (L1, ``n_bins`` equal-width bins).
    """
    y, s = check_inputs(y_true, y_score)
    y_pred = (s >= threshold).astype(np.int64)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, y_pred, labels=[0, 1]).ravel())
    n_pos = int(y.sum())
    notes: list[str] = []
    if 0 < n_pos < y.size:
        auc, average_precision = float(roc_auc_score(y, s)), float(average_precision_score(y, s))
    else:
        auc = average_precision = NAN
        present = "pneumonia" if n_pos else "normal"
        notes.append(f"only {present} images: auc and average_precision are undefined")
    return {
        "threshold": float(threshold),
        "auc": auc,
        "accuracy": float(accuracy_score(y, y_pred)),
        "sensitivity": float(recall_score(y, y_pred, pos_label=1, zero_division=NAN)),
        "specificity": float(recall_score(y, y_pred, pos_label=0, zero_division=NAN)),
        "precision": float(precision_score(y, y_pred, zero_division=NAN)),
        "f1": float(f1_score(y, y_pred, zero_division=NAN)),
        "average_precision": average_precision,
        "ece": float(binary_calibration_error(torch.tensor(s, dtype=_ECE_DTYPE), torch.tensor(y), n_bins=n_bins)),
        "n": int(y.size),
        "n_pos": n_pos,
        "tn": tn,
        "fp": fp,
        "fn": fn,
        "tp": tp,
        "notes": notes,
    }


def bootstrap_ci(
    y_true: ArrayLike,
    y_score: ArrayLike,
    threshold: float,
    n_samples: int = 1000,
    seed: int = 0,
    *,
    n_bins: int = 10,
) -> dict[str, tuple[float, float]]:
    """95% percentile bootstrap intervals of every metric in ``CI_METRICS`` at ``threshold``.

    Resampling is stratified: positives are drawn from positives and negatives from negatives, so
    each resample keeps the set's class counts and AUC is defined in all of them. An interval is
    (NaN, NaN) when the metric is undefined in every resample; ``n_samples == 0`` returns ``{}``.
    """
    return bootstrap_cis(y_true, y_score, [threshold], n_samples, seed, n_bins=n_bins)[0]


def bootstrap_cis(
    y_true: ArrayLike,
    y_score: ArrayLike,
    thresholds: Sequence[float],
    n_samples: int = 1000,
    seed: int = 0,
    *,
    n_bins: int = 10,
) -> list[dict[str, tuple[float, float]]]:
    """``bootstrap_ci`` for several thresholds over the SAME resamples (paired; threshold-free metrics once)."""
    y, s = check_inputs(y_true, y_score)
    if n_samples <= 0:
        return [{} for _ in thresholds]
    with _one_torch_thread():
        return _bootstrap(y, s, thresholds, n_samples, seed, n_bins)


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    # The bootstrap makes thousands of calls on tensors of a few hundred values: intra-op threads only
    # add synchronisation, which costs several times the work itself when the CPU cores are busy.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _bootstrap(
    y: np.ndarray, s: np.ndarray, thresholds: Sequence[float], n_samples: int, seed: int, n_bins: int
) -> list[dict[str, tuple[float, float]]]:
    rng = np.random.default_rng(seed)
    positives, negatives = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    both_classes = positives.size > 0 and negatives.size > 0
    # Every resample lists its positives first, so one label column serves all resamples.
    labels = torch.from_numpy(np.concatenate([np.ones(positives.size), np.zeros(negatives.size)]).astype(np.int64))
    free: dict[str, list[np.ndarray]] = {"auc": [], "average_precision": [], "ece": []}
    per_threshold: list[dict[str, list[np.ndarray]]] = [{} for _ in thresholds]
    chunk = max(1, _CHUNK_CELLS // y.size)
    for start in range(0, n_samples, chunk):
        size = min(chunk, n_samples - start)
        rows = np.concatenate([_draw(rng, positives, size), _draw(rng, negatives, size)], axis=1)
        resampled = torch.from_numpy(s[rows])  # (resample, image)
        # torchmetrics' multilabel functions score each column separately: one column per resample.
        scores = resampled.T.contiguous()
        target = labels[:, None].expand(-1, size).contiguous()
        if both_classes:
            free["auc"].append(_numpy(multilabel_auroc(scores, target, size, average=None, validate_args=False)))
            free["average_precision"].append(
                _numpy(multilabel_average_precision(scores, target, size, average=None, validate_args=False))
            )
        free["ece"].append(
            np.array(
                [
                    float(binary_calibration_error(row, labels, n_bins=n_bins, validate_args=False))
                    for row in resampled.to(_ECE_DTYPE)
                ]
            )
        )
        for values, threshold in zip(per_threshold, thresholds, strict=True):
            # Decisions made here with >=; torchmetrics would threshold floats with > instead.
            _append(values, _decision_metrics((scores >= threshold).long(), target, size))
    results = []
    for values in per_threshold:
        merged = {**free, **values}
        if not both_classes:
            # Stratified resamples of a one-class set never gain the other class: say so, not 0.
            missing = "sensitivity" if positives.size == 0 else "specificity"
            merged[missing] = []
        results.append({metric: _percentile_interval(merged[metric]) for metric in CI_METRICS})
    return results


def _draw(rng: np.random.Generator, members: np.ndarray, size: int) -> np.ndarray:
    if members.size == 0:
        return np.empty((size, 0), dtype=np.int64)
    return members[rng.integers(0, members.size, size=(size, members.size))]


def _decision_metrics(preds: torch.Tensor, target: torch.Tensor, size: int) -> dict[str, np.ndarray]:
    common = {"num_labels": size, "average": None, "validate_args": False}
    return {
        "accuracy": _numpy(multilabel_accuracy(preds, target, **common)),
        "sensitivity": _numpy(multilabel_recall(preds, target, zero_division=NAN, **common)),
        "specificity": _numpy(multilabel_specificity(preds, target, **common)),
        "precision": _numpy(multilabel_precision(preds, target, zero_division=NAN, **common)),
        "f1": _numpy(multilabel_f1_score(preds, target, zero_division=NAN, **common)),
    }


def _append(store: dict[str, list[np.ndarray]], values: dict[str, np.ndarray]) -> None:
    for key, value in values.items():
        store.setdefault(key, []).append(value)


def _numpy(values: torch.Tensor) -> np.ndarray:
    return values.reshape(-1).double().numpy()


def _percentile_interval(chunks: list[np.ndarray]) -> tuple[float, float]:
    values = np.concatenate(chunks) if chunks else np.empty(0)
    values = values[~np.isnan(values)]  # e.g. precision in a resample with no image called pneumonia
    if values.size == 0:
        return (NAN, NAN)
    low, high = np.percentile(values, [2.5, 97.5])
    return (float(low), float(high))
