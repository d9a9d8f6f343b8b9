"""Evaluation stage: threshold choice on validation, metrics with bootstrap CIs, subgroups, plots.

``choose_threshold`` picks the decision threshold on the validation split (Youden's J);
``evaluate_sites`` then reports every named set at that threshold and at 0.5 and writes the
DVC metrics/plots files (see ``pipeline.evaluation.report`` for the file layout).
"""

from pipeline.evaluation.metrics import (
    CI_METRICS,
    EvaluationError,
    binary_metrics,
    bootstrap_ci,
    bootstrap_cis,
    choose_threshold,
)
from pipeline.evaluation.report import (
    evaluate_sites,
    evaluate_split,
    format_with_interval,
    metrics_table_markdown,
    safe_name,
    summary_table,
)
from pipeline.evaluation.results import Interval, OperatingPoint, ScoredModel, SetEvaluation

__all__ = [
    "CI_METRICS",
    "EvaluationError",
    "Interval",
    "OperatingPoint",
    "ScoredModel",
    "SetEvaluation",
    "binary_metrics",
    "bootstrap_ci",
    "bootstrap_cis",
    "choose_threshold",
    "evaluate_sites",
    "evaluate_split",
    "format_with_interval",
    "metrics_table_markdown",
    "safe_name",
    "summary_table",
]
