"""Evaluation of named prediction sets: metrics with CIs at two thresholds, subgroups, plots, files.

Every set is reported at the threshold chosen on the validation split (``at_threshold``) and at
0.5 (``at_0_5``). Files in ``out_dir``, with ``<stem> = safe_name(set name)``:

- ``<stem>_metrics.json``: everything ``evaluate_split`` returns;
- ``<stem>_roc.csv``: ROC points (fpr, tpr, threshold) for DVC plots;
- ``<stem>_{roc,pr,calibration,confusion}.png``;
- from ``evaluate_sites``: ``metrics.json`` (DVC metrics, set name -> numbers), ``roc.csv`` (every
  set's ROC points with a ``set`` column), ``summary.csv`` and ``summary.md``.

Results are the dataclasses of :mod:`pipeline.evaluation.results`. Undefined numbers (AUC of a one-class set,
...) are None there and ``null`` in the JSON files, which must stay strict JSON for DVC and other readers.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import precision_recall_curve, roc_curve

from pipeline.config import EvaluateConfig
from pipeline.data.manifest import implausible
from pipeline.evaluation import plots
from pipeline.evaluation.metrics import EvaluationError, binary_metrics, bootstrap_cis, check_inputs
from pipeline.evaluation.results import Interval, OperatingPoint, SetEvaluation, jsonable

DEFAULT_THRESHOLD = 0.5
MIN_SUBGROUP_IMAGES = 10
AGE_BANDS: tuple[str, ...] = ("<18", "18-40", "40-65", "65+")
_AGE_EDGES = (-math.inf, 18, 40, 65, math.inf)  # left-closed: an 18-year-old is in 18-40
_UNKNOWN = "unknown"
SUMMARY_METRICS: tuple[str, ...] = ("auc", "sensitivity", "specificity", "accuracy", "precision", "f1", "ece")


def safe_name(name: str) -> str:
    """A file-name stem for a set name: ``kermany-pediatric/test`` -> ``kermany-pediatric__test``."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name.replace("/", "__")).strip("._")
    if not stem:
        raise EvaluationError(f"set name {name!r} gives no usable file name")
    return stem


def evaluate_split(
    name: str, frame: pd.DataFrame, threshold: float, cfg: EvaluateConfig, out_dir: Path, *, seed: int = 0
) -> SetEvaluation:
    """Metrics (with bootstrap CIs) at ``threshold`` and at 0.5, subgroups, plots and files of one set.

    ``frame`` needs ``label`` (0/1; rows without one are left out and counted) and ``prob`` (probability
    of pneumonia); optional ``view``, ``sex``, ``age``, ``site`` give the subgroup breakdown.
    """
    return _evaluate(name, frame, threshold, cfg, Path(out_dir), seed)[0]


def evaluate_sites(
    predictions: Mapping[str, pd.DataFrame], threshold: float, cfg: EvaluateConfig, out_dir: Path, *, seed: int = 0
) -> dict[str, SetEvaluation]:
    """``evaluate_split`` for every named set, plus the combined files; returns set name -> result."""
    if not predictions:
        raise EvaluationError("no prediction sets to evaluate")
    stems: dict[str, str] = {}
    for name in predictions:
        stem = safe_name(name)
        if stem in stems:
            raise EvaluationError(f"set names {stems[stem]!r} and {name!r} would share the file name {stem!r}")
        stems[stem] = name
    out_dir = Path(out_dir)
    results: dict[str, SetEvaluation] = {}
    roc_tables = []
    for name, frame in predictions.items():
        results[name], roc = _evaluate(name, frame, threshold, cfg, out_dir, seed)
        roc_tables.append(roc.assign(set=name)[["set", *roc.columns]])
    metrics = {name: _dvc_entry(result) for name, result in results.items()}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False))
    pd.concat(roc_tables, ignore_index=True).to_csv(out_dir / "roc.csv", index=False)
    summary_table(results).to_csv(out_dir / "summary.csv", index=False)
    (out_dir / "summary.md").write_text(metrics_table_markdown(results) + "\n")
    return results


def summary_table(results: Mapping[str, SetEvaluation]) -> pd.DataFrame:
    """One row per set: metrics at the chosen threshold with CI bounds, and sensitivity/specificity at 0.5."""
    rows = []
    for name, result in results.items():
        point = result.at_threshold
        row: dict[str, Any] = {"set": name, "n": result.n, "n_pos": result.n_pos, "threshold": result.threshold}
        for metric in SUMMARY_METRICS:
            interval = point.interval(metric) or Interval(None, None)
            row[metric] = point.value(metric)
            row[f"{metric}_low"] = interval.low
            row[f"{metric}_high"] = interval.high
        row["sensitivity_at_0_5"] = result.at_0_5.sensitivity
        row["specificity_at_0_5"] = result.at_0_5.specificity
        rows.append(row)
    return pd.DataFrame(rows)


def metrics_table_markdown(results: Mapping[str, SetEvaluation], metrics: tuple[str, ...] = SUMMARY_METRICS) -> str:
    """The markdown table of evaluation results (summary.md, the flow's summary, model cards): value [95% CI] at
    the chosen threshold."""
    header = ["set", "images (pneumonia)", "threshold", *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, result in results.items():
        point = result.at_threshold
        cells = [name, f"{result.n} ({result.n_pos})", f"{result.threshold:.3f}"]
        cells += [format_with_interval(point.value(metric), point.interval(metric)) for metric in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("At the decision threshold (Youden's J, chosen on validation data, never on the set reported); 95% stratified bootstrap CIs in brackets.")
    return "\n".join(lines)


def _evaluate(
    name: str, frame: pd.DataFrame, threshold: float, cfg: EvaluateConfig, out_dir: Path, seed: int
) -> tuple[SetEvaluation, pd.DataFrame]:
    missing = [column for column in ("label", "prob") if column not in frame.columns]
    if missing:
        raise EvaluationError(f"{name}: predictions lack column(s) {', '.join(missing)}")
    labelled = frame[frame["label"].notna()].reset_index(drop=True)
    notes: list[str] = []
    if len(labelled) < len(frame):
        notes.append(f"{len(frame) - len(labelled)} image(s) without a label left out")
    try:
        y, s = check_inputs(_floats(labelled["label"]), _floats(labelled["prob"]))
    except EvaluationError as error:
        raise EvaluationError(f"{name}: {error}") from None

    operating_points = {"at_threshold": float(threshold), "at_0_5": DEFAULT_THRESHOLD}
    # One set of resamples serves both thresholds, so their intervals are paired and computed once.
    intervals = bootstrap_cis(
        y, s, list(operating_points.values()), cfg.bootstrap_samples, seed, n_bins=cfg.calibration_bins
    )
    points = {}
    for (key, point_threshold), interval in zip(operating_points.items(), intervals, strict=True):
        metrics = binary_metrics(y, s, point_threshold, n_bins=cfg.calibration_bins)
        notes += [note for note in metrics["notes"] if note not in notes]
        points[key] = OperatingPoint.from_metrics(metrics, interval)
    subgroups, subgroup_notes = _subgroups(labelled, y, s, threshold, cfg.calibration_bins)

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / safe_name(name)
    roc = _roc_points(y, s)
    roc_csv = stem.with_name(f"{stem.name}_roc.csv")
    roc.to_csv(roc_csv, index=False)
    chosen, at_0_5 = points["at_threshold"], points["at_0_5"]
    result = SetEvaluation(
        name=name,
        n=int(y.size),
        n_pos=int(y.sum()),
        n_unlabelled=len(frame) - len(labelled),
        threshold=float(threshold),
        bootstrap_samples=cfg.bootstrap_samples,
        at_threshold=chosen,
        at_0_5=at_0_5,
        subgroups=jsonable(subgroups),
        notes=notes + subgroup_notes,
        plots=_plots(name, y, s, chosen, at_0_5, cfg.calibration_bins, stem),
        files={"metrics": stem.with_name(f"{stem.name}_metrics.json"), "roc_csv": roc_csv},
    )
    result.files["metrics"].write_text(json.dumps(result.to_dict(), indent=2, allow_nan=False))
    return result, roc


def _floats(column: pd.Series) -> np.ndarray:
    # Nullable and object columns become float64 with NaN, which check_inputs then rejects by name.
    return pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)


def _roc_points(y: np.ndarray, s: np.ndarray) -> pd.DataFrame:
    if np.unique(y).size < 2:
        return pd.DataFrame(columns=["fpr", "tpr", "threshold"])
    fpr, tpr, thresholds = roc_curve(y, s)
    return pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": thresholds})


def _plots(
    name: str, y: np.ndarray, s: np.ndarray, chosen: OperatingPoint, default: OperatingPoint, n_bins: int, stem: Path
) -> dict[str, Path]:
    title = f"{name} (n={chosen.n}, pneumonia {chosen.n_pos})"
    labels = {f"threshold {chosen.threshold:.3f} (val)": chosen, f"threshold {DEFAULT_THRESHOLD}": default}
    paths = {kind: stem.with_name(f"{stem.name}_{kind}.png") for kind in ("roc", "pr", "calibration", "confusion")}
    if 0 < chosen.n_pos < chosen.n:
        fpr, tpr, _ = roc_curve(y, s)
        roc_marks = {label: (1 - m.specificity, m.sensitivity) for label, m in labels.items()}
        plots.plot_roc(fpr, tpr, chosen.auc, roc_marks, title, paths["roc"])
        precision, recall, _ = precision_recall_curve(y, s)
        pr_marks = {label: (m.sensitivity, m.precision) for label, m in labels.items()}
        plots.plot_pr(recall, precision, chosen.average_precision, chosen.n_pos / chosen.n, pr_marks, title, paths["pr"])
    else:
        for kind in ("roc", "pr"):
            plots.plot_message("undefined: only one class in this set", title, paths[kind])
    plots.plot_reliability(y, s, n_bins, chosen.ece, title, paths["calibration"])
    plots.plot_confusion(chosen.tn, chosen.fp, chosen.fn, chosen.tp, chosen.threshold, title, paths["confusion"])
    return paths


def _subgroups(
    frame: pd.DataFrame, y: np.ndarray, s: np.ndarray, threshold: float, n_bins: int
) -> tuple[dict[str, dict[str, dict[str, Any]]], list[str]]:
    """Metrics at ``threshold`` per view, sex, age band and (when sets mix them) site; missing values form 'unknown'."""
    groupings, notes = _groupings(frame)
    breakdown: dict[str, dict[str, dict[str, Any]]] = {}
    for grouping, values in groupings.items():
        present = set(values)
        order = [*AGE_BANDS, _UNKNOWN] if grouping == "age_band" else sorted(present - {_UNKNOWN}) + [_UNKNOWN]
        breakdown[grouping] = {}
        for value in order:
            if value in present:
                mask = values == value
                breakdown[grouping][value] = _group_metrics(y[mask], s[mask], threshold, n_bins)
    return breakdown, notes


def _groupings(frame: pd.DataFrame) -> tuple[dict[str, np.ndarray], list[str]]:
    columns: dict[str, pd.Series] = {}
    notes: list[str] = []
    if "site" in frame.columns and frame["site"].nunique(dropna=True) > 1:
        columns["site"] = frame["site"]
    metadata = {}
    for column in ("view", "sex", "age"):
        if column not in frame.columns:
            continue
        wrong = implausible(frame, column)
        if wrong.any():
            notes.append(f"{int(wrong.sum())} implausible {column} value(s) counted as {_UNKNOWN}")
        metadata[column] = frame[column].where(~wrong)
    for column in ("view", "sex"):
        if column in metadata and metadata[column].notna().any():
            columns[column] = metadata[column]
        else:
            notes.append(f"no {column} information: no per-{column} breakdown")
    age = pd.to_numeric(metadata["age"], errors="coerce") if "age" in metadata else None
    if age is not None and age.notna().any():
        columns["age_band"] = pd.cut(age, bins=_AGE_EDGES, right=False, labels=AGE_BANDS)
    else:
        notes.append("no age information: no per-age-band breakdown")
    groupings = {
        name: values.astype(object).where(values.notna(), _UNKNOWN).astype(str).to_numpy()
        for name, values in columns.items()
    }
    return groupings, notes


def _group_metrics(y: np.ndarray, s: np.ndarray, threshold: float, n_bins: int) -> dict[str, Any]:
    n, n_pos = int(y.size), int(y.sum())
    if n < MIN_SUBGROUP_IMAGES or n_pos in (0, n):
        reason = f"fewer than {MIN_SUBGROUP_IMAGES} images" if n < MIN_SUBGROUP_IMAGES else "a single class"
        return {"n": n, "n_pos": n_pos, "note": f"not scored: {reason}"}
    metrics = binary_metrics(y, s, threshold, n_bins=n_bins)
    del metrics["notes"], metrics["threshold"]  # no notes for two-class groups; threshold is the set's
    return metrics


def _dvc_entry(result: SetEvaluation) -> dict[str, Any]:
    """The set's numbers at the chosen threshold (with CIs) and, without CIs, at 0.5."""
    numbers = result.to_dict()
    at_0_5 = {key: value for key, value in numbers["at_0_5"].items() if key not in ("ci", "n", "n_pos")}
    return {**numbers["at_threshold"], "at_0_5": at_0_5}


def format_with_interval(value: float | None, interval: Interval | None) -> str:
    """``0.921 [0.894, 0.945]``; ``n/a`` for an undefined value; no brackets without an interval."""
    if value is None:
        return "n/a"
    if interval is None or interval.low is None or interval.high is None:
        return f"{value:.3f}"
    return f"{value:.3f} [{interval.low:.3f}, {interval.high:.3f}]"
