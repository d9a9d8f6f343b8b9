"""An always-valid confidence sequence for the mean of bounded observations: the decision rule of a rollout may
be checked after every batch of outcomes, as often as anyone likes, without inflating its error rate.

The predictable plug-in empirical-Bernstein confidence sequence (Waudby-Smith & Ramdas, "Estimating means of
bounded random variables by betting", JRSS B 2023, Theorem 2 with eq. 13–15). For x₁, x₂, … in [0, 1] with
common mean μ, and α in (0, 1):

    μ̂ₜ = (½ + Σᵢ≤ₜ xᵢ) / (t + 1)                σ̂²ₜ = (¼ + Σᵢ≤ₜ (xᵢ − μ̂ᵢ)²) / (t + 1)
    λₜ = min( √(2 log(2/α) / (σ̂²ₜ₋₁ · t · log(1 + t))), c )      (c = ½;  μ̂₀ = ½, σ̂²₀ = ¼)
    vₜ = 4 (xₜ − μ̂ₜ₋₁)²                          ψ(λ) = (−log(1 − λ) − λ) / 4

    Cₜ = Σ λᵢxᵢ / Σ λᵢ  ±  (log(2/α) + Σ vᵢ ψ(λᵢ)) / Σ λᵢ

and P(∃t: μ ∉ Cₜ) ≤ α. The running intersection of the Cₜ is reported (still valid, never wider). Its width
adapts to the observed variance: paired score differences that are mostly small decide far sooner than a
Hoeffding bound would. (``confseq``, the reference implementation, does not build here; spotify-confidence's
sequential test is group-sequential and needs the final sample size planned in advance.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LAMBDA_CAP = 0.5


@dataclass(frozen=True)
class ConfidenceSequence:
    """Running bounds on the mean after each observation (arrays of the stream's length)."""

    low: np.ndarray
    high: np.ndarray
    alpha: float

    @property
    def n(self) -> int:
        return len(self.low)

    def last(self) -> tuple[float, float]:
        """The bounds after every observation so far ((0, 1) before any)."""
        return (float(self.low[-1]), float(self.high[-1])) if self.n else (0.0, 1.0)


def empirical_bernstein(x: np.ndarray, alpha: float) -> ConfidenceSequence:
    """The confidence sequence of ``x`` (values in [0, 1], in arrival order) at level 1 − ``alpha``."""
    x = np.asarray(x, dtype=np.float64)
    if x.size and (x.min() < 0 or x.max() > 1):
        raise ValueError("observations must lie in [0, 1]")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha {alpha}: expected a level in (0, 1)")
    t = np.arange(1, x.size + 1, dtype=np.float64)
    mean = (0.5 + np.cumsum(x)) / (t + 1)
    previous_mean = np.concatenate([[0.5], mean[:-1]])
    variance = (0.25 + np.cumsum((x - mean) ** 2)) / (t + 1)
    previous_variance = np.concatenate([[0.25], variance[:-1]])
    log_term = math.log(2 / alpha)
    lam = np.minimum(np.sqrt(2 * log_term / (previous_variance * t * np.log1p(t))), LAMBDA_CAP)
    psi = (-np.log1p(-lam) - lam) / 4
    v = 4 * (x - previous_mean) ** 2
    lam_sum = np.cumsum(lam)
    centre = np.cumsum(lam * x) / lam_sum
    width = (log_term + np.cumsum(v * psi)) / lam_sum
    low = np.maximum.accumulate(np.clip(centre - width, 0, 1))
    high = np.minimum.accumulate(np.clip(centre + width, 0, 1))
    return ConfidenceSequence(low, high, alpha)


def difference_sequence(d: np.ndarray, alpha: float) -> ConfidenceSequence:
    """The confidence sequence of the mean of differences ``d`` in [−1, 1] (mapped to [0, 1] and back)."""
    mapped = empirical_bernstein((np.asarray(d, dtype=np.float64) + 1) / 2, alpha)
    return ConfidenceSequence(2 * mapped.low - 1, 2 * mapped.high - 1, alpha)
