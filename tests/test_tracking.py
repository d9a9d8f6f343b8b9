"""The MLflow adapter against a real MLflow store in a temporary folder (no server)."""

from __future__ import annotations

import importlib.metadata
import json
import socket
import subprocess
from pathlib import Path

import mlflow
import mlflow.pytorch
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.config import TrackingConfig
from pipeline.tracking import (
    MlflowTracker,
    NullTracker,
    Tracker,
    embedded_artifact_dir,
    flatten_params,
    resolve_tracking_uri,
    run_context_tags,
)


@pytest.fixture(autouse=True)
def _no_tracking_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One embedded store for the module: creating an MLflow database takes seconds."""
    return tmp_path_factory.mktemp("project")


def _tiny_cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 2),
    )


def test_tracking_uri_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    default = resolve_tracking_uri(TrackingConfig(local_dir=tmp_path / "mlflow"))
    assert default == f"sqlite:///{tmp_path.resolve().as_posix()}/mlflow/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert resolve_tracking_uri(TrackingConfig()) == "http://tracking.example:5000"
    assert resolve_tracking_uri(TrackingConfig(tracking_uri="sqlite:///x.db")) == "sqlite:///x.db"
    assert embedded_artifact_dir(TrackingConfig()) is None  # a server: it decides where artifacts go
    local = TrackingConfig(local_dir=tmp_path / "mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", default)  # what mlflow.set_tracking_uri exports after a first run
    assert embedded_artifact_dir(local) == tmp_path.resolve() / "mlflow" / "artifacts"  # still ours, not ./mlruns


def test_flatten_params() -> None:
    nested = {"seed": 1, "train": {"lr": 0.001, "amp": {"mode": "off"}}, "data": {"root": Path("/d")}}
    assert flatten_params(nested) == {"seed": "1", "train.lr": "0.001", "train.amp.mode": "off", "data.root": "/d"}


def test_run_is_logged_and_read_back(project: Path, tmp_path: Path) -> None:
    cfg = TrackingConfig(experiment="unit-test", local_dir=project / "mlflow")
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"auc": 0.9}))
    plots = tmp_path / "plots"
    plots.mkdir()
    (plots / "roc.txt").write_text("roc")
    model = _tiny_cnn()
    example = np.random.default_rng(0).random((2, 1, 16, 16), dtype=np.float32)

    with MlflowTracker(cfg, run_name="unit") as tracker:
        tracker.log_params({"seed": 42, "train": {"lr": 0.001, "epochs": 2}})
        for step, loss in enumerate([0.9, 0.5]):
            tracker.log_metrics({"train_loss": loss}, step=step)
        tracker.log_metrics({"val_auc": np.float64(0.81)})
        tracker.log_artifact(report)
        tracker.log_artifacts(plots, artifact_path="plots")
        tracker.log_dict({"threshold": 0.5}, "decision.json")
        tracker.set_tags({"stage": "train", "retrain": True})
        model_uri = tracker.log_model(model, "classifier", example)
    assert model.training  # log_model restores the mode it found

    client = MlflowClient(resolve_tracking_uri(cfg))
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "unit"
    assert run.data.params == {"seed": "42", "train.lr": "0.001", "train.epochs": "2"}
    assert [m.value for m in client.get_metric_history(run.info.run_id, "train_loss")] == [0.9, 0.5]
    assert run.data.metrics["val_auc"] == pytest.approx(0.81)
    assert run.data.tags["stage"] == "train" and run.data.tags["retrain"] == "True"
    assert run.data.tags["package.torch"] == importlib.metadata.version("torch")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.json", "plots", "decision.json"} <= artifacts
    experiment = client.get_experiment(tracker.experiment_id)
    assert experiment.name == "unit-test"
    assert experiment.artifact_location == (project / "mlflow" / "artifacts").resolve().as_uri()
    run_dir = Path(tracker.run_url)
    assert run_dir.is_dir() and (run_dir / "plots" / "roc.txt").read_text() == "roc"

    model_dir = Path(mlflow.artifacts.download_artifacts(model_uri))
    assert (model_dir / "requirements.txt").read_text().count("torch==") == 1
    loaded = mlflow.pytorch.load_model(model_uri)
    batch = torch.from_numpy(np.random.default_rng(1).random((3, 1, 16, 16), dtype=np.float32))
    model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(batch), model(batch), atol=1e-6)


def test_failing_block_marks_run_failed(project: Path) -> None:
    cfg = TrackingConfig(experiment="unit-test", local_dir=project / "mlflow")
    with pytest.raises(ValueError, match="diverged"):
        with MlflowTracker(cfg) as tracker:
            tracker.log_metrics({"train_loss": float("nan")}, step=0)
            raise ValueError("diverged")
    run = MlflowClient(resolve_tracking_uri(cfg)).get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    with pytest.raises(RuntimeError, match="outside"):
        tracker.log_params({"late": 1})


def test_null_tracker_records_calls(tmp_path: Path) -> None:
    tracker: Tracker = NullTracker()
    with tracker:
        tracker.log_params({"train": {"lr": 0.1}})
        tracker.log_metrics({"loss": 1.0}, step=0)
        tracker.log_metrics({"loss": 0.5}, step=1)
        tracker.log_dict({"a": 1}, "a.json")
        tracker.log_artifact(tmp_path, "x")
        tracker.set_tags({"k": 1})
        uri = tracker.log_model(_tiny_cnn(), "classifier", np.zeros((2, 1, 8, 8), np.float32))
    assert isinstance(tracker, NullTracker)
    assert tracker.params == {"train.lr": "0.1"}
    assert tracker.metrics["loss"] == [(0, 1.0), (1, 0.5)]
    assert tracker.dicts == {"a.json": {"a": 1}} and tracker.tags == {"k": "1"}
    assert tracker.artifacts == [(tmp_path, "x")] and "classifier" in tracker.models and uri.endswith("classifier")
    assert tracker.status == "FINISHED"


def _git(repo: Path, *args: str) -> str:
    command = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.org", *args]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()


def test_run_context_tags(tmp_path: Path) -> None:
    plain = run_context_tags(tmp_path)
    assert "mlflow.source.git.commit" not in plain
    assert plain["package.numpy"] == np.__version__ and plain["python.version"]
    assert socket.gethostname() not in plain.values()

    _git(tmp_path, "init", "-q")
    (tmp_path / "a.txt").write_text("a")
    _git(tmp_path, "add", "a.txt")
    _git(tmp_path, "commit", "-q", "-m", "init")
    tags = run_context_tags(tmp_path)
    assert tags["mlflow.source.git.commit"] == _git(tmp_path, "rev-parse", "HEAD")
    assert tags["git.dirty"] == "false"
    (tmp_path / "a.txt").write_text("changed")
    assert run_context_tags(tmp_path)["git.dirty"] == "true"
