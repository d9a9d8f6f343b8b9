"""What evaluation returns: typed results every reader (CLI, flow summary, model card, gate, benchmarks) shares.

A renamed field fails where it is read, at import or type-check time, not fifteen minutes into a run.
Undefined numbers (the AUC of a one-class set, ...) are ``None``: the files written from these stay strict JSON.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Interval:
    """A 95% bootstrap interval; bounds are None where the metric is undefined."""

    low: float | None
    high: float | None


@dataclass(frozen=True)
class OperatingPoint:
    """A set's metrics at one decision threshold (score >= threshold is pneumonia), with bootstrap intervals."""

    threshold: float
    auc: float | None
    accuracy: float | None
    sensitivity: float | None
    specificity: float | None
    precision: float | None
    f1: float | None
    average_precision: float | None
    ece: float | None
    n: int
    n_pos: int
    tn: int
    fp: int
    fn: int
    tp: int
    ci: dict[str, Interval] = field(default_factory=dict)

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, Any], intervals: Mapping[str, tuple[float, float]]) -> OperatingPoint:
        """From ``binary_metrics`` (less its notes) and ``bootstrap_cis``; NaN becomes None."""
        values = {key: finite(value) for key, value in metrics.items() if key != "notes"}
        ci = {metric: Interval(finite(low), finite(high)) for metric, (low, high) in intervals.items()}
        return cls(**values, ci=ci)

    def value(self, metric: str) -> float | None:
        return getattr(self, metric)

    def interval(self, metric: str) -> Interval | None:
        return self.ci.get(metric)


@dataclass(frozen=True)
class SetEvaluation:
    """One named set scored at the threshold chosen on validation and at 0.5, with subgroups and its files."""

    name: str
    n: int
    n_pos: int
    n_unlabelled: int
    threshold: float
    bootstrap_samples: int
    at_threshold: OperatingPoint
    at_0_5: OperatingPoint
    subgroups: dict[str, dict[str, dict[str, Any]]]  # grouping → group → metrics, or {n, n_pos, note}
    notes: list[str]
    plots: dict[str, Path]
    files: dict[str, Path]

    def to_dict(self) -> dict[str, Any]:
        return jsonable(asdict(self))


@dataclass(frozen=True)
class ScoredModel:
    """A model's decision threshold (and the set it was chosen on) and its evaluation on every held-out set."""

    threshold: float
    threshold_chosen_on: str
    sets: dict[str, SetEvaluation]

    def headline(self) -> dict[str, dict[str, Any]]:
        """Per set: n and the four headline metrics at the chosen threshold (the DVC metrics of a comparison)."""
        keys = ("auc", "accuracy", "sensitivity", "specificity")
        return {
            name: {"n": result.n, **{key: result.at_threshold.value(key) for key in keys}}
            for name, result in self.sets.items()
        }

    def flat_metrics(self, prefix: str = "", keys: tuple[str, ...] | None = None) -> dict[str, float]:
        """``<prefix><set>.<metric>`` → value at the chosen threshold (every number, or ``keys``), for a tracker;
        undefined values are left out."""
        metrics = {}
        for name, result in self.sets.items():
            point = asdict(result.at_threshold)
            del point["ci"]
            chosen = keys or tuple(point)
            metrics.update({f"{prefix}{name.replace('/', '_')}.{key}": float(point[key]) for key in chosen if point[key] is not None})
        return metrics


def finite(value: Any) -> Any:
    """numpy scalars unwrapped; NaN and ±inf as None."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def jsonable(value: Any) -> Any:
    """Plain Python for json: numpy scalars unwrapped, paths as strings, NaN/inf as None (strict JSON)."""
    if isinstance(value, Mapping):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return finite(value)
