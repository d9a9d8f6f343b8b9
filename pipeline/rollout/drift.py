"""Early warning without labels: has what a model is served moved away from what it was built on, and how well
is it probably doing? Labels arrive days later; these checks need only the served images and probabilities.

- **Input drift**: each image (the model's preprocessed input, uint8 S×S) is summarised by an embedding — its
  4×4 block means (the layout of the film) and a 16-bin intensity histogram (its exposure and contrast) — and a
  window of served images is compared with the model's reference images by the maximum mean discrepancy with a
  Gaussian kernel (bandwidth: the median pairwise distance of the pooled sample), unbiased estimate, p-value from
  a permutation test (Gretton et al., JMLR 2012).
- **Output drift**: the served probabilities against the reference images' probabilities, two-sample
  Kolmogorov–Smirnov test.
- **Estimated performance** (confidence-based, as NannyML's CBPE): if the probabilities are calibrated, a case with
  probability p is a pneumonia with probability p, so the expected confusion matrix at threshold t is
  TP = Σ p·1[p ≥ t], FN = Σ p·1[p < t], TN = Σ (1−p)·1[p < t], FP = Σ (1−p)·1[p ≥ t] (sensitivity, specificity
  follow), and the expected AUC is Σᵢ≠ⱼ pᵢ(1−pⱼ)·(1[pᵢ > pⱼ] + ½·1[pᵢ = pⱼ]) / Σᵢ≠ⱼ pᵢ(1−pⱼ). It is only as good as
  the calibration: under shift it is an estimate to watch, never a measurement.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.stats import ks_2samp

GRID = 4  # block means per side (8 also flags Kermany test against Kermany train: a real but small shift)
HISTOGRAM_BINS = 16


@dataclass(frozen=True)
class DriftReference:
    """What a model was built on, as drift checks compare with it: embeddings and the model's probabilities of
    its reference images (kept in its serving bundle; no pixels)."""

    embeddings: np.ndarray
    probabilities: np.ndarray

    @classmethod
    def of(cls, images: np.ndarray, probabilities: np.ndarray) -> DriftReference:
        return cls(image_embedding(images), np.asarray(probabilities, dtype=np.float64))

    def save(self, path: Path) -> Path:
        np.savez_compressed(path, embeddings=self.embeddings, probabilities=self.probabilities)
        return path

    @classmethod
    def load(cls, path: Path) -> DriftReference:
        with np.load(path) as stored:
            return cls(stored["embeddings"], stored["probabilities"])


@dataclass(frozen=True)
class DriftTest:
    statistic: float
    p_value: float


@dataclass(frozen=True)
class EstimatedPerformance:
    auc: float
    sensitivity: float
    specificity: float


def image_embedding(images: np.ndarray) -> np.ndarray:
    """uint8 (N, S, S) images → float (N, GRID² + HISTOGRAM_BINS) embeddings in [0, 1]."""
    images = np.asarray(images)
    if images.ndim != 3 or images.shape[1] != images.shape[2] or images.shape[1] % GRID:
        raise ValueError(f"expected (N, S, S) images with S a multiple of {GRID}, got {images.shape}")
    n, side = images.shape[0], images.shape[1]
    pixels = images.astype(np.float64) / 255.0
    block = side // GRID
    layout = pixels.reshape(n, GRID, block, GRID, block).mean(axis=(2, 4)).reshape(n, -1)
    bins = np.minimum((pixels * HISTOGRAM_BINS).astype(int), HISTOGRAM_BINS - 1).reshape(n, -1)
    histogram = np.stack([np.bincount(row, minlength=HISTOGRAM_BINS) for row in bins]) / (side * side)
    return np.hstack([layout, histogram])


def mmd_test(reference: np.ndarray, window: np.ndarray, permutations: int = 1000, seed: int = 0) -> DriftTest:
    """Unbiased MMD² between two embedding samples and its permutation p-value."""
    pooled = np.vstack([reference, window])
    squared = np.sum((pooled[:, None, :] - pooled[None, :, :]) ** 2, axis=-1)
    off_diagonal = squared[np.triu_indices(len(pooled), k=1)]
    bandwidth = float(np.median(off_diagonal[off_diagonal > 0])) if np.any(off_diagonal > 0) else 1.0
    kernel = np.exp(-squared / bandwidth)
    n = len(reference)
    observed = _mmd2(kernel, np.arange(len(pooled)) < n)
    rng = np.random.default_rng(seed)
    exceed = 0
    for _ in range(permutations):
        exceed += _mmd2(kernel, rng.permutation(len(pooled)) < n) >= observed
    return DriftTest(float(observed), float((1 + exceed) / (1 + permutations)))


def output_drift(reference: np.ndarray, window: np.ndarray) -> DriftTest:
    """Kolmogorov–Smirnov test of the served probabilities against the reference images'."""
    result = ks_2samp(reference, window)
    return DriftTest(float(result.statistic), float(result.pvalue))


def estimated_performance(probabilities: np.ndarray, threshold: float) -> EstimatedPerformance:
    """Expected AUC, sensitivity and specificity if ``probabilities`` are calibrated (see the module's text)."""
    p = np.asarray(probabilities, dtype=np.float64)
    flagged = p >= threshold
    tp, fn = p[flagged].sum(), p[~flagged].sum()
    tn, fp = (1 - p)[~flagged].sum(), (1 - p)[flagged].sum()
    positive, negative = p[:, None], (1 - p)[None, :]
    weight = positive * negative
    np.fill_diagonal(weight, 0.0)
    order = (p[:, None] > p[None, :]) + 0.5 * (p[:, None] == p[None, :])
    auc = float((weight * order).sum() / weight.sum()) if weight.sum() > 0 else float("nan")
    return EstimatedPerformance(
        auc=auc,
        sensitivity=float(tp / (tp + fn)) if tp + fn > 0 else float("nan"),
        specificity=float(tn / (tn + fp)) if tn + fp > 0 else float("nan"),
    )


def _mmd2(kernel: np.ndarray, in_first: np.ndarray) -> float:
    first, second = kernel[np.ix_(in_first, in_first)], kernel[np.ix_(~in_first, ~in_first)]
    cross = kernel[np.ix_(in_first, ~in_first)]
    m, n = first.shape[0], second.shape[0]
    within_first = (first.sum() - np.trace(first)) / (m * (m - 1))
    within_second = (second.sum() - np.trace(second)) / (n * (n - 1))
    return float(within_first + within_second - 2 * cross.mean())
