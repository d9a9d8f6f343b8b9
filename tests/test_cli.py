"""The crosssim command line: bad input gives a message and a non-zero exit, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from tests.conftest import REPO, copy_kermany_subset

runner = CliRunner()


@pytest.fixture()
def site(data_dir, tmp_path):
    return copy_kermany_subset(data_dir, tmp_path / "kermany-pediatric", per_class=30)


def test_validate_passes_a_clean_real_subset(site, tmp_path):
    result = runner.invoke(
        app, ["validate", str(site), "--config", str(REPO / "params.yaml"),
              "--set", f"validation.report_dir={tmp_path / 'reports'}", "--set", "validation.min_images=50"]
    )
    assert result.exit_code == 0, result.output
    assert "Data validation PASSED" in result.output
    assert (tmp_path / "reports" / "kermany-pediatric" / "data_docs" / "index.html").is_file()


def test_validate_exits_nonzero_naming_the_broken_file(site, tmp_path):
    victim = sorted((site / "test" / "NORMAL").iterdir())[0]
    victim.write_bytes(b"not an image at all")
    result = runner.invoke(
        app, ["validate", str(site), "--config", str(REPO / "params.yaml"),
              "--set", f"validation.report_dir={tmp_path / 'reports'}", "--set", "validation.min_images=50"]
    )
    assert result.exit_code == 3
    assert victim.name in result.output and "Traceback" not in result.output


def test_bad_override_and_missing_data_are_clear(tmp_path):
    result = runner.invoke(app, ["train", "--config", str(REPO / "params.yaml"), "--set", "train.epochs=0"])
    assert result.exit_code == 2 and "train.epochs" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["validate", "--config", str(REPO / "params.yaml"), "--set", f"data.root={tmp_path / 'none'}"])
    assert result.exit_code == 2 and "CROSSSIM_DATA_DIR" in result.output


def test_prepare_before_validate_says_what_to_run(tmp_path, data_dir):
    result = runner.invoke(
        app, ["prepare", "--config", str(REPO / "params.yaml"), "--set", f"data.root={data_dir}",
              "--set", f"validation.report_dir={tmp_path / 'none'}"]
    )
    assert result.exit_code == 2 and "run `crosssim validate` first" in result.output


def test_adapt_before_train_and_bad_crosssim_config_are_clear(tmp_path):
    result = runner.invoke(app, ["adapt", "--config", str(REPO / "params.yaml"), "--set", f"train.output_dir={tmp_path}"])
    assert result.exit_code == 2 and "run `crosssim train` first" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["adapt", "--config", str(REPO / "params.yaml"), "--set", "crosssim.target=elsewhere"])
    assert result.exit_code == 2 and "must be one of data.external" in " ".join(result.output.split())
    result = runner.invoke(app, ["adapt", "--config", str(REPO / "params.yaml"), "--set", "crosssim.alignment=wgan"])
    assert result.exit_code == 2 and "crosssim.alignment" in result.output


def test_too_few_patients_for_the_val_split_is_a_clear_error(data_dir, tmp_path):
    """5 images per class: Kermany's train part has 5 normal and 4 pneumonia patients; a 15% val split needs 7."""
    small = copy_kermany_subset(data_dir, tmp_path / "kermany-pediatric", per_class=5)
    result = runner.invoke(app, ["validate", str(small), "--config", str(REPO / "params.yaml")])
    output = " ".join(result.output.split())
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "kermany-pediatric: too few patients for the val split (data.val_fraction)" in output
    assert "at least 7 patients per class" in output and "normal 5 patients (5 images); pneumonia 4 patients" in output


def test_a_device_this_machine_lacks_stops_train_before_anything_is_written(tmp_path):
    out = tmp_path / "train"
    settings = ["--config", str(REPO / "params.yaml"), "--set", "train.device=cuda:99", "--set", f"train.output_dir={out}"]
    result = runner.invoke(app, ["train", *settings])
    assert result.exit_code == 2 and "train.device: 'cuda:99'" in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_train_before_prepare_and_evaluate_before_train_say_what_to_run(tmp_path):
    settings = ["--config", str(REPO / "params.yaml"), "--set", f"data.prepared_dir={tmp_path / 'prepared'}",
                "--set", f"train.output_dir={tmp_path / 'train'}", "--set", f"evaluate.output_dir={tmp_path / 'eval'}"]
    result = runner.invoke(app, ["train", *settings])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "run `crosssim prepare` first" in " ".join(result.output.split())
    result = runner.invoke(app, ["evaluate", *settings])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "run `crosssim train` first" in " ".join(result.output.split())
    assert not any((tmp_path / folder).exists() for folder in ("prepared", "train", "eval"))


@pytest.mark.slow  # starts, and kills, a Prefect server
def test_run_says_what_to_do_when_prefects_temporary_server_does_not_start(tmp_path):
    """A busy machine can start Prefect's temporary server too slowly: a clear message, exit 7, nothing run."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "0"}
    command = [str(Path(sys.executable).parent / "crosssim"), "run", "--config", str(REPO / "params.yaml")]
    for key in ("runs.dir", "tracking.local_dir"):
        command += ["--set", f"{key}={tmp_path / key}"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 7, output
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in output and "Traceback" not in output
    assert not any((tmp_path / key).exists() for key in ("runs.dir", "tracking.local_dir"))


@pytest.mark.parametrize(
    ("module", "kept_out"),
    [("flows.cli", {"torch", "mlflow", "great_expectations", "prefect"}), ("pipeline.retrain.sites", {"torch", "mlflow"})],
)
def test_the_cli_and_the_data_stages_do_not_import_what_they_do_not_use(module, kept_out):
    """`crosssim --help` and each DVC stage start a process: torch, MLflow and GX take ~30 s to import here."""
    probe = f"import sys, {module}; print(sorted(m for m in {sorted(kept_out)!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_metrics_table_keeps_every_name_and_interval_whole_in_80_columns(monkeypatch):
    from rich.console import Console

    from flows.cli import stages
    from pipeline.evaluation import Interval, OperatingPoint, ScoredModel, SetEvaluation

    narrow = Console(width=80, record=True)
    monkeypatch.setattr(stages, "console", narrow)
    interval = Interval(0.412, 0.517)
    point = {"auc": 0.4827, "sensitivity": 0.7217, "specificity": 0.1552, "accuracy": 0.4401}
    counts = dict(n=1150, n_pos=575, tn=89, fp=486, fn=160, tp=415)
    at = OperatingPoint(0.5, **point, precision=0.46, f1=0.56, average_precision=0.5, ece=0.1, **counts,
                        ci=dict.fromkeys(point, interval))  # fmt: skip
    sets = {name: SetEvaluation(name, 1150, 575, 0, 0.5, 200, at, at, {}, [], {}, {})
            for name in ("kermany-pediatric/test", "nih-cxr8/target-test")}  # fmt: skip
    stages._print_results(ScoredModel(0.5, "kermany-pediatric/val", sets), "Evaluation")
    text = narrow.export_text()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    lines = text.splitlines()
    for metric, value in point.items():  # each metric on its own row, with its whole interval, once per set
        assert sum(metric in line and f"{value:.3f} [0.412, 0.517]" in line for line in lines) == 2, metric
    assert "nih-cxr8/target-test" in text and "kermany-pediatric/" in text  # long names fold, never cut
