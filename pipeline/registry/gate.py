"""The promotion gate: challenger vs champion on the same frozen evaluation sets, site by site.

Per set the gate measures AUC and the sensitivity reached at a fixed specificity (a clinical
operating point that does not depend on either model's chosen threshold). The challenger passes
when, on every set and metric, it is not worse than the champion by more than ``margin``; with no
champion yet it must clear the absolute floors instead. The comparison is handed to MLflow's
``validate_evaluation_results`` as absolute thresholds (champion − margin, or the floor), so the
verdict and the thresholds are the ones MLflow records and explains.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.models import MetricThreshold
from mlflow.models.evaluation import EvaluationResult
from sklearn.metrics import roc_auc_score, roc_curve

from pipeline.config import RegistryConfig
from pipeline.evaluation.metrics import check_inputs

GATE_METRICS = ("auc", "sensitivity_at_specificity")


def score_set(labels: np.ndarray, probabilities: np.ndarray, specificity: float) -> dict[str, float]:
    """AUC and the best sensitivity among operating points with specificity ≥ ``specificity``."""
    y, s = check_inputs(labels, probabilities)
    fpr, tpr, _ = roc_curve(y, s)
    reachable = tpr[(1 - fpr) >= specificity - 1e-12]
    return {
        "auc": float(roc_auc_score(y, s)),
        "sensitivity_at_specificity": float(reachable.max()) if reachable.size else 0.0,
        "n": float(y.size),
        "n_pos": float(y.sum()),
    }


@dataclass(frozen=True)
class GateRow:
    set: str
    metric: str
    challenger: float
    champion: float | None
    threshold: float
    passed: bool


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    compared_with: str  # "champion vN" or "floors (no champion yet)"
    rows: list[GateRow]
    policy: dict[str, Any]
    mlflow_verdict: str

    def failures(self) -> list[str]:
        return [
            f"{row.set} {row.metric}: {row.challenger:.4f} < required {row.threshold:.4f}" for row in self.rows if not row.passed
        ]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "failures": self.failures()}


def decide(
    challenger: dict[str, dict[str, float]],
    champion: dict[str, dict[str, float]] | None,
    policy: RegistryConfig,
    champion_label: str | None = None,
) -> GateDecision:
    """Apply the gate to per-set scores (``set → metric → value``) of both models."""
    floors = {"auc": policy.floor_auc, "sensitivity_at_specificity": policy.floor_sensitivity}
    rows, thresholds, candidate = [], {}, {}
    for set_name, scores in challenger.items():
        for metric in GATE_METRICS:
            reference = None if champion is None else champion.get(set_name, {}).get(metric)
            if champion is not None and reference is None:
                raise ValueError(f"the champion has no {metric} on {set_name}: both models must be scored on the same sets")
            threshold = floors[metric] if reference is None else reference - policy.margin
            value = scores[metric]
            key = f"{set_name}/{metric}"
            thresholds[key] = MetricThreshold(threshold=threshold, greater_is_better=True)
            candidate[key] = value
            passed = not math.isnan(value) and value >= threshold
            rows.append(GateRow(set_name, metric, value, reference, threshold, passed))
    try:
        mlflow.validate_evaluation_results(thresholds, EvaluationResult(metrics=candidate, artifacts={}))
        verdict, passed = "passed", True
    except MlflowException as exc:  # ModelValidationFailedException: the message lists each failed metric
        verdict, passed = str(exc), False
    if passed != all(row.passed for row in rows):
        raise AssertionError(f"gate rows disagree with MLflow's verdict: {verdict}")
    return GateDecision(
        passed=passed,
        compared_with=champion_label or "floors (no champion yet)",
        rows=rows,
        policy=policy.model_dump(mode="json"),
        mlflow_verdict=verdict,
    )
