"""A site's own operating point, chosen on its matured reads: the threshold that gives it the configured sensitivity.

Why: a version's bundle threshold was chosen on the source site's validation split, and a threshold does not
transfer across a domain shift — the Kermany-trained model, served at its 0.114 on NIH adults, has sensitivity 0.64
and specificity 0.39 there, with typical NIH films at p = 0.9999. The site's own labelled reads are the only
evidence of where its operating point lies, so once enough have matured the threshold is re-chosen on them, before
any retraining and again as reads accumulate (the worklist keeps asking for them).

The maths. The reads are the site's predictions with a matured label (``pipeline.rollout.outcomes``) that the
version scored — its answer (``probability``) or, during a rollout, its unanswered score of the same image
(``shadow_probability``). With P of them pneumonia, scores s₁ ≥ s₂ ≥ … ≥ s_P of those positives, and a case read
as pneumonia when its score is ≥ t, the in-sample sensitivity #{i : sᵢ ≥ t}/P falls as t rises, so the highest t
reaching the target τ is

    t* = s_k,   k = ⌈τ·P⌉

(any t above s_k loses the k-th positive). The highest such t keeps the most normal cases below it, i.e. the best
specificity at that sensitivity. Sensitivity and specificity at t* come with 95% stratified bootstrap intervals
(``pipeline.evaluation.metrics.bootstrap_ci``), and so does the threshold it replaces, on the same reads and
resamples. They are given t*: the choice itself is in-sample, so the point
sensitivity is ≥ τ by construction and the lower bound is the number to read; the rollout analysis later judges the
served threshold on reads it was not chosen on. Too few reads, or too few of either class, are refused: with 10
positives one case moves sensitivity by 0.1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import numpy as np

from pipeline.config import LoopConfig, RolloutConfig
from pipeline.errors import RequestRefused
from pipeline.evaluation.metrics import binary_metrics, bootstrap_cis
from pipeline.registry.store import ModelRegistry, RegistryError
from pipeline.rollout.outcomes import matured_labels
from pipeline.serving.bundle import site_thresholds
from pipeline.serving.ledger import PredictionLedger
from pipeline.serving.model_source import registered_bundle

BOOTSTRAP_SAMPLES = 1000


class SiteThresholdError(RequestRefused):
    """A site's threshold cannot be chosen (unknown site or version, too few reads); nothing was changed."""


@dataclass(frozen=True)
class SiteReads:
    """The matured labelled reads of one site scored by one version."""

    labels: np.ndarray  # 1: pneumonia
    scores: np.ndarray  # the version's P(pneumonia) of each

    @property
    def positives(self) -> int:
        return int(self.labels.sum())


@dataclass(frozen=True)
class OperatingPoint:
    """A threshold and what it gives on the site's reads."""

    threshold: float
    sensitivity: float  # in-sample
    sensitivity_ci: tuple[float, float]  # 95% stratified bootstrap, given the threshold
    specificity: float
    specificity_ci: tuple[float, float]


@dataclass(frozen=True)
class SiteThreshold:
    """The operating point chosen for ``site`` on ``version``'s scores of its reads, beside the one it replaces."""

    model: str
    version: str
    site: str
    target_sensitivity: float
    chosen: OperatingPoint
    before: OperatingPoint  # the site's previous own threshold, else the bundle's, on the same reads (same resamples)
    reads: int
    positives: int
    chosen_at: str  # ISO time: which matured reads it saw

    @property
    def threshold(self) -> float:
        return self.chosen.threshold

    @property
    def replaces(self) -> float:
        return self.before.threshold


def operating_point(registry: ModelRegistry, model: str, ref: str, site: str) -> tuple[str, float]:
    """The version ``ref`` (a number or an alias) names, and the threshold ``site`` is answered at on it now."""
    try:
        registered = registry.version(model, ref)
    except RegistryError as exc:
        raise SiteThresholdError("unknown_version", f"{exc}; `crosssim registry list` shows the versions") from exc
    version = str(registered.version)
    own = site_thresholds(registered.tags).get(site)
    return version, own if own is not None else registered_bundle(registry, model, version).threshold


def site_reads(
    ledger: PredictionLedger, model: str, version: str, site: str, rollout: RolloutConfig, now: datetime
) -> SiteReads:
    """``site``'s predictions with a matured label, as ``model`` v``version`` scored them (answered or shadow)."""
    labels = matured_labels(ledger, rollout.outcome_sources, timedelta(hours=rollout.maturity_hours), now)
    pairs = []
    for row in ledger.rows(site=site):
        label = labels.get(row.inference_id)
        if label is None or row.model_name != model:
            continue
        if row.model_version == version:
            pairs.append((label.label, row.probability))
        elif row.shadow_version == version and row.shadow_probability is not None:
            pairs.append((label.label, row.shadow_probability))
    labelled = np.array(pairs, dtype=np.float64).reshape(-1, 2)
    return SiteReads(labelled[:, 0].astype(np.int64), labelled[:, 1])


def sensitivity_threshold(labels: np.ndarray, scores: np.ndarray, target: float) -> float:
    """The highest t with mean(scores[labels == 1] ≥ t) ≥ ``target``: the ⌈target·P⌉-th highest positive score."""
    positives = np.sort(scores[labels == 1])[::-1]
    needed = math.ceil(target * positives.size - 1e-9)  # 0.9 × 10 is 9.000000000000002 in floating point
    return float(positives[needed - 1])


def choose_site_threshold(
    ledger: PredictionLedger,
    model: str,
    version: str,
    site: str,
    replaces: float,
    loop: LoopConfig,
    rollout: RolloutConfig,
    *,
    served_sites: Sequence[str],
    now: datetime | None = None,
) -> SiteThreshold:
    """``site``'s threshold for ``loop.site_sensitivity_target`` on its matured reads; refused (nothing chosen) for an
    unknown site or fewer than ``loop.min_threshold_reads`` reads / ``loop.min_threshold_class_reads`` of a class."""
    now = now or datetime.now(timezone.utc)
    if site not in served_sites:
        raise SiteThresholdError(
            "unknown_site", f"site {site!r} is not served here; one of: {', '.join(served_sites)} (serve.sites)"
        )
    reads = site_reads(ledger, model, version, site, rollout, now)
    count, positives = reads.labels.size, reads.positives
    counts = (
        f"{count} matured labelled reads of {site} scored by {model} v{version} "
        f"({positives} pneumonia, {count - positives} normal)"
    )
    if count < loop.min_threshold_reads:
        raise SiteThresholdError(
            "too_few_reads", f"{counts}; choosing its threshold needs {loop.min_threshold_reads} (loop.min_threshold_reads)"
        )
    if min(positives, count - positives) < loop.min_threshold_class_reads:
        raise SiteThresholdError(
            "too_few_class_reads",
            f"{counts}; choosing its threshold needs {loop.min_threshold_class_reads} of each class "
            "(loop.min_threshold_class_reads)",
        )
    thresholds = (sensitivity_threshold(reads.labels, reads.scores, loop.site_sensitivity_target), replaces)
    intervals = bootstrap_cis(reads.labels, reads.scores, thresholds, BOOTSTRAP_SAMPLES)  # the same resamples
    chosen, before = (
        _operating_point(binary_metrics(reads.labels, reads.scores, threshold), ci)
        for threshold, ci in zip(thresholds, intervals, strict=True)
    )
    return SiteThreshold(model, version, site, loop.site_sensitivity_target, chosen, before, count, positives, now.isoformat())


def _operating_point(point: dict, intervals: dict[str, tuple[float, float]]) -> OperatingPoint:
    return OperatingPoint(
        point["threshold"], point["sensitivity"], intervals["sensitivity"], point["specificity"], intervals["specificity"]
    )
