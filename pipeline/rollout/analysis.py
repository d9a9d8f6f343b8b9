"""A rollout's analysis: its predictions joined with their matured outcomes, both models compared on the same
patients, and the decision — continue, promote or roll back.

During a rollout both models score every image (``crosssim serve``), so each labelled case gives a paired
difference. The rule, checked after any batch of outcomes without inflating its error rate (see
``pipeline.rollout.sequential``):

- primary: dᵢ = Brier(champion) − Brier(challenger) = (p_champion − y)² − (p_challenger − y)², in [−1, 1]
  (positive: the challenger's probabilities are closer to the outcomes), in arrival order. Its always-valid
  confidence sequence at level 1 − α/k (Bonferroni over the k sequences checked: this one and one per judged site);
- guardrail, per site with at least ``min_site_positives`` labelled pneumonia cases: sensitivity at matched
  specificity. The champion answers at its served threshold t₀, with specificity s₀ on the site's labelled normal
  cases; the challenger is read at t₁, the lowest threshold at which it reaches s₀ on the same cases. Over the
  site's pneumonia cases, eᵢ = 1[p_challenger ≥ t₁] − 1[p_champion ≥ t₀]: non-inferior when the sequence's lower
  bound is at least −``sensitivity_margin``, inferior when its upper bound is below it. Matched, because a
  guardrail at each model's own threshold would judge where a threshold was put, not the model: a Youden threshold
  chosen on NIH trades a little sensitivity for a lot of specificity, and a champion calling 85% of the normal
  films pneumonia would hold back every challenger (the registry's gate compares at a fixed specificity for the
  same reason). t₁ is fitted on the normal cases and eᵢ read on the pneumonia ones, so the sequence is valid given
  t₁; the sampling error of the match itself is not in the bound. The report shows both models at their served
  thresholds, so a reviewer sees the operating point a promotion would bring;
- no decision before ``min_labelled`` labelled cases. Roll back when the Brier sequence lies below 0 or a site is
  inferior; promote when it lies above 0 and every judged site is non-inferior; otherwise continue.

Per model and site, AUC, sensitivity and specificity at the model's threshold and calibration error come with
95% bootstrap intervals (descriptive; the decision uses the sequences).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Literal

import numpy as np

from pipeline.config import RolloutConfig
from pipeline.evaluation.metrics import binary_metrics, bootstrap_ci
from pipeline.rollout.assignment import CHAMPION_ARM
from pipeline.rollout.outcomes import matured_labels
from pipeline.rollout.sequential import ConfidenceSequence, difference_sequence
from pipeline.rollout.state import Rollout
from pipeline.serving.ledger import PredictionLedger, PredictionRow

Decision = Literal["continue", "promote", "rollback"]
MODELS = ("champion", "challenger")
BOOTSTRAP_SAMPLES = 200


@dataclass(frozen=True)
class LabelledCase:
    inference_id: str
    created_at: datetime
    site: str
    arm: str  # who answered
    label: int
    champion: float  # both models' probabilities of the same image
    challenger: float
    champion_threshold: float
    challenger_threshold: float

    def probability(self, model: str) -> float:
        return self.champion if model == "champion" else self.challenger

    def threshold(self, model: str) -> float:
        return self.champion_threshold if model == "champion" else self.challenger_threshold


@dataclass(frozen=True)
class ModelSiteMetrics:
    model: str  # champion | challenger
    site: str
    n: int
    n_pos: int
    auc: float
    sensitivity: float
    specificity: float
    ece: float
    ci: dict[str, tuple[float, float]]  # metric → 95% bootstrap interval


@dataclass(frozen=True)
class SiteSensitivity:
    site: str
    positives: int
    specificity: float  # the champion's, at its served threshold, on the site's labelled normal cases
    challenger_threshold: float  # where the challenger reaches that specificity on the same cases
    low: float  # bounds on challenger − champion sensitivity at that specificity (paired, always valid)
    high: float
    verdict: Literal["non-inferior", "inferior", "undecided", "too few"]


@dataclass(frozen=True)
class RolloutAnalysis:
    rollout_id: str
    champion: str
    challenger: str
    mode: str
    analysed_at: datetime
    predictions: int
    labelled: int
    pending: int  # predictions without a matured label
    conflicts: int
    answered_by: dict[str, int]  # arm → predictions it answered
    metrics: list[ModelSiteMetrics]
    brier: ConfidenceSequence  # of champion − challenger Brier, case by case
    brier_mean: float
    sensitivity: list[SiteSensitivity]
    decision: Decision
    reasons: list[str] = field(default_factory=list)
    cases: list[LabelledCase] = field(default_factory=list, repr=False)


def analyse_rollout(
    ledger: PredictionLedger, rollout: Rollout, cfg: RolloutConfig, now: datetime | None = None
) -> RolloutAnalysis:
    """The rollout's predictions so far, their matured outcomes, and the decision rule's verdict."""
    now = now or datetime.now(timezone.utc)
    rows = ledger.rows(rollout_id=rollout.rollout_id)
    labels = matured_labels(ledger, cfg.outcome_sources, timedelta(hours=cfg.maturity_hours), now)
    cases = [case for row in rows if (case := _case(row, labels)) is not None]
    answered_by = {arm: sum(row.arm == arm for row in rows) for arm in MODELS}
    sites = sorted({case.site for case in cases})
    verdict = decide_cases(cases, cfg)
    brier, sensitivity, decision, reasons = verdict.brier, verdict.sensitivity, verdict.decision, verdict.reasons
    return RolloutAnalysis(
        rollout_id=rollout.rollout_id,
        champion=rollout.champion,
        challenger=rollout.challenger,
        mode=rollout.mode,
        analysed_at=now,
        predictions=len(rows),
        labelled=len(cases),
        pending=sum(row.inference_id not in labels for row in rows),
        conflicts=sum(labels[row.inference_id].conflict for row in rows if row.inference_id in labels),
        answered_by=answered_by,
        metrics=[m for model in MODELS for site in sites if (m := _metrics(cases, model, site)) is not None],
        brier=brier,
        brier_mean=float(np.mean([brier_gain(case) for case in cases])) if cases else float("nan"),
        sensitivity=sensitivity,
        decision=decision,
        reasons=reasons,
        cases=cases,
    )


@dataclass(frozen=True)
class Verdict:
    brier: ConfidenceSequence
    sensitivity: list[SiteSensitivity]
    decision: Decision
    reasons: list[str]


def decide_cases(cases: Sequence[LabelledCase], cfg: RolloutConfig) -> Verdict:
    """The decision rule on the labelled cases so far, in arrival order (see the module's text)."""
    sites = sorted({case.site for case in cases})
    judged = [site for site in sites if sum(c.label for c in cases if c.site == site) >= cfg.min_site_positives]
    alpha = cfg.alpha / (1 + len(judged))  # Bonferroni over the sequences the rule checks
    brier = difference_sequence(np.array([brier_gain(case) for case in cases]), alpha)
    sensitivity = [_site_sensitivity(cases, site, site in judged, alpha, cfg.sensitivity_margin) for site in sites]
    decision, reasons = _decide(brier, sensitivity, len(cases), cfg)
    return Verdict(brier, sensitivity, decision, reasons)


def _case(row: PredictionRow, labels: dict) -> LabelledCase | None:
    label = labels.get(row.inference_id)
    if label is None or row.shadow_probability is None or row.shadow_threshold is None or row.arm is None:
        return None  # pending, or the other model did not score it (no pair)
    answered, other = (row.probability, row.threshold), (row.shadow_probability, row.shadow_threshold)
    (champion, champion_t), (challenger, challenger_t) = (answered, other) if row.arm == CHAMPION_ARM else (other, answered)
    return LabelledCase(
        row.inference_id, row.created_at, row.site, row.arm, label.label, champion, challenger, champion_t, challenger_t
    )


def brier_gain(case: LabelledCase) -> float:
    """(p_champion − y)² − (p_challenger − y)²: positive when the challenger was closer to the outcome."""
    return (case.champion - case.label) ** 2 - (case.challenger - case.label) ** 2


def _site_sensitivity(
    cases: Sequence[LabelledCase], site: str, judged: bool, alpha: float, margin: float
) -> SiteSensitivity:
    at_site = [case for case in cases if case.site == site]
    positives = [case for case in at_site if case.label == 1]
    normals = [case for case in at_site if case.label == 0]
    if not judged or not normals:
        return SiteSensitivity(site, len(positives), float("nan"), float("nan"), -1.0, 1.0, "too few")
    specificity = float(np.mean([c.champion < c.champion_threshold for c in normals]))
    threshold = matched_threshold(np.array([c.challenger for c in normals]), specificity)
    challenger = np.array([c.challenger >= threshold for c in positives], float)
    champion = np.array([c.champion >= c.champion_threshold for c in positives], float)
    low, high = difference_sequence(challenger - champion, alpha).last()
    verdict = "non-inferior" if low >= -margin else "inferior" if high < -margin else "undecided"
    return SiteSensitivity(site, len(positives), specificity, threshold, low, high, verdict)


def matched_threshold(normal_scores: np.ndarray, specificity: float) -> float:
    """The lowest threshold t with mean(normal_scores < t) ≥ ``specificity`` (scores ≥ t read as pneumonia)."""
    ordered = np.sort(normal_scores)
    needed = math.ceil(specificity * ordered.size - 1e-9)  # normal cases that must fall below t
    return 0.0 if needed == 0 else float(np.nextafter(ordered[needed - 1], np.inf))


def _decide(
    brier: ConfidenceSequence, sensitivity: Sequence[SiteSensitivity], labelled: int, cfg: RolloutConfig
) -> tuple[Decision, list[str]]:
    if labelled < cfg.min_labelled:
        return "continue", [f"{labelled} labelled cases of the {cfg.min_labelled} needed before any decision"]
    low, high = brier.last()
    inferior = [s for s in sensitivity if s.verdict == "inferior"]
    bounds = f"Brier gain of the challenger in [{low:+.4f}, {high:+.4f}] over {labelled} labelled cases"
    if high < 0 or inferior:
        why = [f"{bounds}: worse" if high < 0 else bounds]
        return "rollback", why + [f"sensitivity at {s.site} below the champion's by more than the margin, at the champion's "
                                  f"specificity {s.specificity:.2f}" for s in inferior]
    judged = [s for s in sensitivity if s.verdict != "too few"]
    if low > 0 and all(s.verdict == "non-inferior" for s in judged):
        return "promote", [f"{bounds}: better",
                           *(f"sensitivity at {s.site} non-inferior at the champion's specificity {s.specificity:.2f}" for s in judged)]
    waiting = [f"sensitivity at {s.site} not yet shown non-inferior" for s in judged if s.verdict == "undecided"]
    return "continue", [f"{bounds}: not decided yet" if not low > 0 else bounds, *waiting]


def _metrics(cases: Sequence[LabelledCase], model: str, site: str) -> ModelSiteMetrics | None:
    chosen = [case for case in cases if case.site == site]
    if not chosen:
        return None
    y = np.array([case.label for case in chosen])
    p = np.array([case.probability(model) for case in chosen])
    threshold = chosen[-1].threshold(model)
    point = binary_metrics(y, p, threshold)
    intervals = bootstrap_ci(y, p, threshold, BOOTSTRAP_SAMPLES) if 0 < y.sum() < y.size else {}
    return ModelSiteMetrics(
        model, site, point["n"], point["n_pos"], point["auc"], point["sensitivity"], point["specificity"], point["ece"],
        {key: intervals[key] for key in ("auc", "sensitivity", "specificity") if key in intervals},
    )  # fmt: skip
