"""Evaluation stage: metrics against hand counts and sklearn, threshold choice, CIs, reports and files."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

from pipeline.config import EvaluateConfig
from pipeline.evaluation import (
    EvaluationError,
    binary_metrics,
    bootstrap_ci,
    choose_threshold,
    evaluate_sites,
    evaluate_split,
    safe_name,
)

REPO = Path(__file__).resolve().parents[1]
FAST = EvaluateConfig(bootstrap_samples=200, calibration_bins=10)

# Hand-checked example at threshold 0.5: predicted pneumonia = [0,0,1,0, 1,1,0,1,1,0]
# -> tn 3 (0.1, 0.4, 0.2), fp 1 (0.6), tp 4 (0.9, 0.8, 0.7, 0.55), fn 2 (0.3, 0.45).
# AUC: of the 6 x 4 (pneumonia, normal) pairs, 4+4+2+4+3+3 = 20 are ranked right -> 20/24.
Y_SMALL = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
S_SMALL = np.array([0.1, 0.4, 0.6, 0.2, 0.9, 0.8, 0.3, 0.7, 0.55, 0.45])


def noisy_scores(labels: np.ndarray, seed: int, separation: float = 2.0) -> np.ndarray:
    """Probabilities whose logit is +-separation/2 by class plus N(0, 1): AUC = Phi(separation / sqrt 2)."""
    rng = np.random.default_rng(seed)
    logits = (labels - 0.5) * separation + rng.normal(size=labels.size)
    return 1 / (1 + np.exp(-logits))


def synthetic_frame(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    return pd.DataFrame(
        {
            "label": pd.array(labels, dtype="Int64"),
            "prob": noisy_scores(labels, seed),
            "view": rng.choice(["AP", "PA"], n),
            "sex": rng.choice(["F", "M", None], n),
            "age": rng.choice([5.0, 18.0, 39.0, 50.0, 80.0, np.nan], n),
        }
    )


def test_binary_metrics_match_hand_counts_and_sklearn():
    m = binary_metrics(Y_SMALL, S_SMALL, 0.5)
    assert (m["tn"], m["fp"], m["fn"], m["tp"]) == (3, 1, 2, 4)
    assert (m["n"], m["n_pos"]) == (10, 6)
    assert m["auc"] == pytest.approx(20 / 24) == roc_auc_score(Y_SMALL, S_SMALL)
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["sensitivity"] == pytest.approx(4 / 6)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["precision"] == pytest.approx(4 / 5)
    assert m["f1"] == pytest.approx(8 / 11)
    y_pred = (S_SMALL >= 0.5).astype(int)
    assert m["sensitivity"] == pytest.approx(recall_score(Y_SMALL, y_pred))
    assert m["precision"] == pytest.approx(precision_score(Y_SMALL, y_pred))
    assert m["f1"] == pytest.approx(f1_score(Y_SMALL, y_pred))
    assert m["notes"] == []


def test_a_score_equal_to_the_threshold_counts_as_pneumonia():
    assert binary_metrics(Y_SMALL, S_SMALL, 0.55)["tp"] == 4
    assert binary_metrics(Y_SMALL, S_SMALL, 0.5500001)["tp"] == 3


def test_ece_of_hand_made_calibration_cases():
    half = np.array([0, 1] * 10)
    assert binary_metrics(half, np.full(20, 0.5), 0.5)["ece"] == pytest.approx(0.0, abs=1e-6)
    # Every image scored 0.9 but none has pneumonia: the only bin is off by 0.9.
    assert binary_metrics(np.zeros(20, int), np.full(20, 0.9), 0.5)["ece"] == pytest.approx(0.9, abs=1e-6)


def test_youden_threshold_separates_a_separable_validation_set():
    y = np.array([0, 0, 0, 1, 1, 1])
    s = np.array([0.01, 0.02, 0.03, 0.2, 0.3, 0.4])  # every score below 0.5, yet perfectly separable
    threshold = choose_threshold(y, s)
    assert threshold == pytest.approx(0.2)
    chosen = binary_metrics(y, s, threshold)
    assert (chosen["sensitivity"], chosen["specificity"]) == (1.0, 1.0)
    assert binary_metrics(y, s, 0.5)["sensitivity"] == 0.0


def test_threshold_cannot_be_chosen_on_one_class():
    with pytest.raises(EvaluationError, match="single class"):
        choose_threshold(np.ones(5, int), np.linspace(0.1, 0.9, 5))


def test_single_class_set_gives_nan_auc_with_a_note():
    y, s = np.zeros(30, int), np.linspace(0.05, 0.95, 30)
    m = binary_metrics(y, s, 0.5)
    assert math.isnan(m["auc"]) and math.isnan(m["average_precision"]) and math.isnan(m["sensitivity"])
    assert m["specificity"] == pytest.approx(15 / 30)
    assert "undefined" in m["notes"][0]
    ci = bootstrap_ci(y, s, 0.5, n_samples=50, seed=0)
    assert all(math.isnan(v) for v in ci["auc"]) and all(math.isnan(v) for v in ci["sensitivity"])
    assert ci["specificity"][0] <= 0.5 <= ci["specificity"][1]


@pytest.mark.parametrize(
    ("labels", "scores", "message"),
    [
        ([0, 1, 2], [0.1, 0.2, 0.3], "labels must be 0"),
        ([0, 1], [0.1, 1.3], r"\[0, 1\]"),
        ([0, 1], [0.1, np.nan], r"\[0, 1\]"),
        ([0, 1], [0.1], "equal length"),
        ([], [], "no labelled images"),
    ],
)
def test_invalid_inputs_are_rejected_with_a_reason(labels, scores, message):
    with pytest.raises(EvaluationError, match=message):
        binary_metrics(np.array(labels), np.array(scores, dtype=float), 0.5)


def test_bootstrap_interval_contains_estimate_narrows_with_n_and_is_fast():
    small = synthetic_frame(100, seed=1)
    large = synthetic_frame(700, seed=2)
    started = time.perf_counter()
    threads = torch.get_num_threads()
    ci_large = bootstrap_ci(large["label"], large["prob"], 0.5, n_samples=1000, seed=0)
    assert time.perf_counter() - started < 5.0
    assert torch.get_num_threads() == threads  # the bootstrap's single-thread mode is undone
    ci_small = bootstrap_ci(small["label"], small["prob"], 0.5, n_samples=1000, seed=0)
    point = binary_metrics(large["label"], large["prob"], 0.5)
    for metric, (low, high) in ci_large.items():
        assert low <= point[metric] <= high, metric
    for metric in ("auc", "sensitivity", "specificity", "accuracy"):
        (low_large, high_large), (low_small, high_small) = ci_large[metric], ci_small[metric]
        assert high_large - low_large < high_small - low_small, metric
    assert bootstrap_ci(large["label"], large["prob"], 0.5, n_samples=1000, seed=0) == ci_large
    assert bootstrap_ci(large["label"], large["prob"], 0.5, n_samples=0) == {}


def test_evaluate_split_reports_subgroups_plots_and_files(tmp_path: Path):
    frame = synthetic_frame(400, seed=3)
    frame.loc[:4, "label"] = pd.NA  # unlabelled images are left out, and counted
    frame.loc[5:9, "view"] = "LL"  # a view too rare to score
    result = evaluate_split("kermany-pediatric/test", frame, 0.4, FAST, tmp_path)

    assert (result.n, result.n_unlabelled) == (395, 5)
    assert result.at_threshold.threshold == 0.4 and result.at_0_5.threshold == 0.5
    assert set(result.at_threshold.ci) >= {"auc", "sensitivity", "specificity", "ece"}
    rare = result.subgroups["view"]["LL"]
    assert (rare["n"], rare["note"]) == (5, "not scored: fewer than 10 images") and "auc" not in rare
    assert result.subgroups["view"]["AP"]["n"] + result.subgroups["view"]["PA"]["n"] == 390
    assert 0.5 < result.subgroups["sex"]["F"]["auc"] < 1
    assert "unknown" in result.subgroups["sex"]
    ages = frame.loc[frame["label"].notna(), "age"]
    assert list(result.subgroups["age_band"]) == ["<18", "18-40", "40-65", "65+", "unknown"]
    assert result.subgroups["age_band"]["18-40"]["n"] == int(ages.isin([18.0, 39.0]).sum())

    for kind in ("roc", "pr", "calibration", "confusion"):
        png = Path(result.plots[kind])
        assert png.name == f"kermany-pediatric__test_{kind}.png"
        assert png.read_bytes()[:4] == b"\x89PNG"
    written = json.loads((tmp_path / "kermany-pediatric__test_metrics.json").read_text())
    assert written == result.to_dict() == json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert list(written) == ["name", "n", "n_pos", "n_unlabelled", "threshold", "bootstrap_samples", "at_threshold",
                             "at_0_5", "subgroups", "notes", "plots", "files"]  # fmt: skip
    roc = pd.read_csv(tmp_path / "kermany-pediatric__test_roc.csv")
    assert list(roc.columns) == ["fpr", "tpr", "threshold"]
    assert roc["fpr"].is_monotonic_increasing and roc["tpr"].is_monotonic_increasing
    assert (roc.iloc[-1]["fpr"], roc.iloc[-1]["tpr"]) == (1.0, 1.0)


def test_evaluate_split_without_metadata_or_second_class(tmp_path: Path):
    frame = pd.DataFrame({"label": [0] * 20, "prob": np.linspace(0, 1, 20)})
    result = evaluate_split("normals-only", frame, 0.5, FAST, tmp_path)
    assert result.at_threshold.auc is None and result.to_dict()["at_threshold"]["auc"] is None  # null in JSON
    assert any("auc and average_precision are undefined" in note for note in result.notes)
    assert result.subgroups == {}
    assert all(Path(path).is_file() for path in result.plots.values())
    assert pd.read_csv(tmp_path / "normals-only_roc.csv").empty


def test_a_threshold_that_calls_nothing_pneumonia_leaves_precision_undefined_not_a_crash(tmp_path: Path):
    frame = pd.DataFrame({"label": [0, 1] * 10, "prob": np.linspace(0.05, 0.45, 20)})  # every score below 0.5
    result = evaluate_split("cautious", frame, 0.3, FAST, tmp_path)
    assert result.at_0_5.precision is None and result.at_0_5.tp == 0 and result.at_threshold.precision is not None
    assert all(Path(path).is_file() for path in result.plots.values())


def test_evaluate_split_rejects_bad_predictions(tmp_path: Path):
    with pytest.raises(EvaluationError, match="lack column"):
        evaluate_split("x", pd.DataFrame({"label": [0, 1]}), 0.5, FAST, tmp_path)
    with pytest.raises(EvaluationError, match=r"x: scores must be"):
        evaluate_split("x", pd.DataFrame({"label": [0, 1], "prob": [0.2, None]}), 0.5, FAST, tmp_path)


def test_evaluate_sites_writes_dvc_metrics_and_summary(tmp_path: Path):
    sets = {"kermany-pediatric/test": synthetic_frame(200, seed=4), "nih-cxr8": synthetic_frame(120, seed=5)}
    results = evaluate_sites(sets, 0.45, FAST, tmp_path)

    assert list(results) == list(sets)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    entry = metrics["kermany-pediatric/test"]
    assert entry["auc"] == results["kermany-pediatric/test"].at_threshold.auc
    assert entry["threshold"] == 0.45 and entry["at_0_5"]["threshold"] == 0.5
    assert entry["ci"]["auc"]["low"] <= entry["auc"] <= entry["ci"]["auc"]["high"]
    assert (tmp_path / "kermany-pediatric__test_metrics.json").is_file()
    assert (tmp_path / "nih-cxr8_roc.png").is_file()
    roc = pd.read_csv(tmp_path / "roc.csv")
    assert set(roc["set"]) == set(sets)
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert list(summary["set"]) == list(sets) and {"auc_low", "auc_high", "ece"} <= set(summary.columns)
    markdown = (tmp_path / "summary.md").read_text()
    assert "| kermany-pediatric/test | 200 (" in markdown and "| nih-cxr8 | 120 (" in markdown


def test_set_names_become_distinct_safe_file_names(tmp_path: Path):
    assert safe_name("kermany-pediatric/test") == "kermany-pediatric__test"
    assert safe_name("../site a") == "site_a"  # no hidden files, no way out of out_dir
    with pytest.raises(EvaluationError, match="no usable file name"):
        safe_name("./")
    frame = synthetic_frame(30, seed=6)
    with pytest.raises(EvaluationError, match="same file name|share the file name"):
        evaluate_sites({"a/b": frame, "a__b": frame}, 0.5, FAST, tmp_path)


def test_auc_on_real_pneumoniamnist_labels():
    data_dir = Path(os.environ.get("CROSSSIM_DATA_DIR", REPO.parent / "shared" / "data"))
    npz = data_dir / "pneumoniamnist" / "pneumoniamnist.npz"
    if not npz.is_file():
        pytest.skip(f"PneumoniaMNIST not found at {npz} (set CROSSSIM_DATA_DIR, see README 'Data')")
    with np.load(npz) as data:
        val_labels, test_labels = data["val_labels"].ravel(), data["test_labels"].ravel()
    assert (test_labels == 0).sum() == 234 and (test_labels == 1).sum() == 390

    threshold = choose_threshold(val_labels, noisy_scores(val_labels, seed=7))
    assert 0.3 < threshold < 0.7  # classes are symmetric around logit 0
    test_scores = noisy_scores(test_labels, seed=8)
    m = binary_metrics(test_labels, test_scores, threshold)
    ci = bootstrap_ci(test_labels, test_scores, threshold, n_samples=500, seed=0)
    expected_auc = 0.921  # Phi(2 / sqrt 2) for two unit normals two apart
    assert 0.89 < m["auc"] < 0.95
    assert ci["auc"][0] < expected_auc < ci["auc"][1]
    assert 0.75 < m["sensitivity"] < 0.93 and 0.75 < m["specificity"] < 0.93
