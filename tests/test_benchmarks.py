"""Every `make bench-*` in its --smoke mode (seconds, tiny real subset): a benchmark cannot stop working unseen."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow  # every benchmark's smoke run: left out of make test-fast

CROSSSIM_VARIANTS = {
    "source_only",
    "crosssim",
    "crosssim_no_distillation",
    "oracle",
    "crosssim_10pct",
    "crosssim_10pct_no_distillation",
    "finetune_10pct",
    "crosssim_no_pretraining",
    "crosssim_no_harmonisation",
    "crosssim_no_alignment",
    "crosssim_no_augmentation",
    "dann",
    "crosssim_10pct_no_consistency",
}


def run_smoke(script: str, data_dir: Path, tmp_path: Path, *options: str, find_data: bool = False) -> dict:
    """Runs the benchmark's smoke mode; returns its result JSON, checking what every benchmark reports.
    ``find_data``: without $CROSSSIM_DATA_DIR, as `python benchmarks/X.py` is run by hand (found as make finds it)."""
    committed = {path: path.read_bytes() for path in (REPO / "benchmarks" / "results").glob("*.json")}
    tmp_path.mkdir(parents=True, exist_ok=True)
    output = tmp_path / "result.json"
    # TMPDIR: the benchmark's work folders (checkpoints, prepared images) land in tmp_path too
    env = {**os.environ, "CROSSSIM_DATA_DIR": str(data_dir), "TMPDIR": str(tmp_path)}
    if find_data:
        del env["CROSSSIM_DATA_DIR"]
    command = [sys.executable, f"benchmarks/{script}", "--smoke", "--output", str(output), *options]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{script} --smoke failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert {path: path.read_bytes() for path in committed} == committed, "a smoke run overwrote a committed result"
    report = json.loads(output.read_text())
    assert report["smoke"] is True
    assert f"benchmarks/{script}" in report["command"] and "--smoke" in report["command"]
    assert set(report["hardware"]) == {"cpu", "cores", "gpu"} and report["hardware"]["cores"] >= 1
    assert {"torch", "python"} <= set(report["versions"])
    assert report["wall_seconds"] > 0 and re.fullmatch(r"\d{4}-\d{2}-\d{2}", report["date"])
    return report


def _is_score(value: float) -> bool:
    return isinstance(value, float) and 0.0 <= value <= 1.0


def test_bench_source_smoke_writes_its_table(data_dir, tmp_path):
    report = run_smoke("source_pneumoniamnist.py", data_dir, tmp_path, "--members", "2")
    assert report["seed"] == 42
    # an ensemble of two, each trained with its own seed
    assert [(member["seed"], member["epochs"]) for member in report["members"]] == [(42, 1), (43, 1)]
    assert "--members 2" in report["command"]
    assert all(_is_score(report[key]) for key in ("test_auc", "test_acc", "test_acc_at_0.5", "best_val_auc"))
    assert set(report["medmnist_v2_reference"]) == {"ResNet-18 (28)", "ResNet-50 (28)", "Google AutoML Vision"}
    assert report["throughput_pipeline_images_per_second"] > 0 and report["throughput_bare_images_per_second"] > 0
    assert report["throughput_ratio"] > 0


def test_bench_gpu_train_smoke_writes_its_throughput(data_dir, tmp_path):
    report = run_smoke("gpu_train.py", data_dir, tmp_path)
    assert report["train_images_per_second"] > 0 and len(report["per_epoch_images_per_second"]) == 2
    assert report["target_images_per_second"] == 3000 and report["target_met"] is False  # a CPU is far below it
    assert report["seed"] == 42 and "resnet18, 32x32" in report["model"]


def test_bench_crosssim_smoke_writes_every_variant(data_dir, tmp_path):
    report = run_smoke("crosssim_kermany_nih.py", data_dir, tmp_path)
    assert report["seeds"] == [42] and [run["seed"] for run in report["per_seed"]] == [42]
    assert set(report["summary"]) == CROSSSIM_VARIANTS
    rows = report["per_seed"][0]["variants"]
    assert set(rows) == CROSSSIM_VARIANTS
    for name, row in rows.items():
        assert all(_is_score(row[metric]) for metric in ("auc", "accuracy", "sensitivity", "specificity")), name
        assert set(row["ci"]) == {"auc", "accuracy", "sensitivity", "specificity"}, name
    assert rows["finetune_10pct"]["labelled_target_images"] < rows["oracle"]["labelled_target_images"]
    assert all(isinstance(report[key], float) for key in ("source_only_auc", "crosssim_auc", "oracle_auc"))
    assert report["pretraining"]["epochs"] == 1 and report["pretraining"]["images"]  # shared by the seeds
    assert report["paired_10pct_vs_finetune"]["per_seed"] == [
        rows["crosssim_10pct"]["auc"] - rows["finetune_10pct"]["auc"]
    ]  # one seed: a difference, no interval


def test_bench_crosssim_only_runs_the_named_variants_beside_source_only(data_dir, tmp_path):
    only = ("--only", "finetune_10pct", "oracle")
    report = run_smoke("crosssim_kermany_nih.py", data_dir, tmp_path / "in-process", *only, "--jobs", "1")
    assert set(report["per_seed"][0]["variants"]) == {"source_only", "finetune_10pct", "oracle"}
    assert report["crosssim_auc"] is None and report["paired_10pct_vs_finetune"] is None
    assert "--only finetune_10pct oracle" in report["command"]
    # the worker processes compute the same rows as this process does
    parallel = run_smoke("crosssim_kermany_nih.py", data_dir, tmp_path / "workers", *only, "--jobs", "2")
    assert "--jobs 2" in parallel["command"]
    for name, row in report["per_seed"][0]["variants"].items():
        assert parallel["per_seed"][0]["variants"][name]["auc"] == pytest.approx(row["auc"], abs=1e-6), name


def test_bench_rollout_smoke_writes_decisions_and_drift(data_dir, tmp_path):
    report = run_smoke("rollout.py", data_dir, tmp_path, find_data=True)
    assert set(report["challengers"]) == {"better", "worse", "equivalent"} and report["streams"] == 10
    films = report["nih_test_cases"]
    for name, row in report["challengers"].items():
        assert sum(row["decisions"].values()) == 10 and 0.0 <= row["wrong_rate"] <= 1.0, name
        assert _is_score(row["served"]["auc"]) and 0 <= row["served"]["threshold"] <= 1, name
        live = row["live_replay"]  # every film went through `crosssim serve`, every read through /v1/feedback
        assert live["films_served"] == live["reads_posted"] == films and sum(live["answered_by"].values()) == films, name
        assert live["max_abs_difference_served_vs_pytorch"] < 1e-4, name  # the ledger's scores are the models' own
    assert report["challengers"]["worse"]["live_replay"]["mode"] == "canary"
    assert report["challengers"]["worse"]["served"]["auc"] < report["challengers"]["better"]["served"]["auc"]
    assert report["drift"]["nih_images_until_alarm"] in (25, 50, 100, 200, None)
    assert 0.0 <= report["drift"]["kermany_test_false_alarm_rate"] <= 1.0


def test_bench_loop_smoke_runs_every_strategy_and_its_references(data_dir, tmp_path):
    report = run_smoke("loop.py", data_dir, tmp_path)
    assert report["strategies"] == ["random", "uncertainty", "diverse", "hybrid"]
    for key in ("auc_vs_oracle_at_300", "labels_share_to_match_random", "wrong_promotions", "cycle_seconds_max", "wall_minutes"):
        assert key in report
    assert set(report["curves"]) == set(report["strategies"])
    weeks = {(w["strategy"], w["week"]) for w in report["weeks"]}
    assert len(weeks) == 4 * 3 and all(_is_score(w["auc"]) for w in report["weeks"])
    # reads arrive a week after they were asked; the first week has none
    assert all(w["labelled"] == (0 if w["week"] == 0 else 4 * w["week"]) for w in report["weeks"])
    assert _is_score(report["oracle_auc"]) and report["references"][0]["oracle"]["labels"] > report["references"][0]["batch_labels"]
    assert Path(tmp_path / "result.png").stat().st_size > 10_000  # the learning-curve figure


def test_a_benchmark_without_its_datasets_says_so_in_one_line(tmp_path):
    env = {**os.environ, "CROSSSIM_DATA_DIR": str(tmp_path / "nowhere")}
    done = subprocess.run([sys.executable, "benchmarks/rollout.py", "--smoke", "--output", str(tmp_path / "r.json")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0 and "does not exist" in done.stderr and "CROSSSIM_DATA_DIR" in done.stderr
