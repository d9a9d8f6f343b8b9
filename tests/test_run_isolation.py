"""Runs that cannot corrupt each other or leave debris: two `crosssim run`s at once each register the
weights they trained; a killed run leaves no RUNNING MLflow run and no orphaned Prefect server."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import mlflow
import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.config import load_config
from pipeline.data.prepare import _move_into_place
from pipeline.tracking import ENDED_BY_TAG, MlflowTracker

pytestmark = pytest.mark.slow  # concurrent whole runs: left out of make test-fast

REPO = Path(__file__).resolve().parents[1]
CROSSSIM = str(Path(sys.executable).parent / "crosssim")
MODEL = "crosssim-pneumonia"


def _command(work: Path, data_dir: Path, *extra: str) -> list[str]:
    settings = [
        f"data.root={data_dir}",
        "data.external=[]",
        "crosssim.enabled=false",
        "data.max_images_per_class=16",
        "validation.min_images=20",
        "train.epochs=1",
        "train.batch_size=16",
        "evaluate.bootstrap_samples=20",
        "serve.export.enabled=false",  # the serving bundles have their own tests; here they would only cost time
        f"data.cache_dir={work / 'cache'}",
        f"runs.dir={work / 'runs'}",
        f"tracking.local_dir={work / 'mlflow'}",
        *extra,
    ]
    return [CROSSSIM, "run", "--config", str(REPO / "params.yaml"), *(arg for s in settings for arg in ("--set", s))]


def _env(work: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PREFECT_", "MLFLOW_"))}
    return env | {"PREFECT_HOME": str(work / "prefect"), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}


def _client(work: Path) -> MlflowClient:
    uri = f"sqlite:///{work / 'mlflow' / 'mlflow.db'}"
    return MlflowClient(uri, registry_uri=uri)


def _weights_digest(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def test_two_concurrent_runs_each_register_the_weights_they_trained(data_dir, tmp_path):
    """The reported defect: a run started 3 s after another (other seed, other image size) used to overwrite the
    first one's checkpoint, which then registered the second one's weights."""
    runs = []
    for seed, size in ((1, 64), (2, 32)):
        command = _command(tmp_path, data_dir, f"seed={seed}", f"data.image_size={size}")
        runs.append(subprocess.Popen(command, cwd=REPO, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        time.sleep(3)
    outputs = [run.communicate(timeout=900)[0] for run in runs]
    for run, output in zip(runs, outputs, strict=True):
        assert run.returncode == 0, output

    client = _client(tmp_path)
    versions = client.search_model_versions(f"name = '{MODEL}'")
    assert len(versions) == 2
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    trained_digests = set()
    for version in versions:
        run = client.get_run(version.tags["mlflow_run_id"])
        run_dir = Path(run.data.tags["run_folder"])
        assert run_dir.parent == tmp_path / "runs"
        trained = torch.load(run_dir / "train" / "best.pt", map_location="cpu", weights_only=True)
        registered = mlflow.pytorch.load_model(f"models:/{MODEL}/{version.version}").classifier.state_dict()
        assert _weights_digest(registered) == _weights_digest(trained), f"v{version.version} holds another run's weights"
        assert version.tags["image_size"] == run.data.params["data.image_size"]
        trained_digests.add(_weights_digest(trained))
    assert len(trained_digests) == 2  # two different models, not one registered twice
    assert {version.tags["image_size"] for version in versions} == {"64", "32"}


def _wait_for_running_run(process: subprocess.Popen, work: Path, timeout: float = 300) -> str:
    """The id of the run's MLflow run once it is RUNNING, read without touching the store's schema (an
    MLflow client here would race the run's own creation of the database)."""
    database = work / "mlflow" / "mlflow.db"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the run ended before reaching MLflow (exit {process.returncode})"
        try:
            with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as connection:
                running = connection.execute("SELECT run_uuid FROM runs WHERE status = 'RUNNING'").fetchall()
        except sqlite3.Error:  # not created yet
            running = []
        if running:
            return running[0][0]
        time.sleep(0.5)
    raise AssertionError("the run never reached MLflow")


def _wait_for_training(process: subprocess.Popen, work: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not any((work / "runs").glob("*/train/last.pt")):
        assert process.poll() is None and time.monotonic() < deadline, "the run never started training"
        time.sleep(0.5)


def _prefect_servers(process: subprocess.Popen) -> list[psutil.Process]:
    children = psutil.Process(process.pid).children(recursive=True)
    return [child for child in children if "prefect.server.api.server:create_app" in " ".join(child.cmdline())]


def test_a_stopped_or_killed_run_leaves_no_running_mlflow_run_and_no_server(data_dir, tmp_path, monkeypatch):
    """One run stopped by SIGTERM, one killed by SIGKILL, side by side (one start-up cost)."""
    # mlflow.set_tracking_uri (called by earlier tests in this process) exports MLFLOW_TRACKING_URI, which would
    # send the in-process "next run" below to another store than the killed run's.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    stops = (signal.SIGTERM, signal.SIGKILL)
    # Output to files, not pipes: a pipe would also wait for whatever the killed process left holding it.
    logs = {stop: tmp_path / f"{stop.name}.log" for stop in stops}
    processes = {}
    for stop in stops:
        with open(logs[stop], "w") as log:
            processes[stop] = subprocess.Popen(
                _command(tmp_path / stop.name, data_dir, "train.epochs=50", "train.early_stopping_patience=null"),
                cwd=REPO, env=_env(tmp_path / stop.name), stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
    try:
        run_ids = {stop: _wait_for_running_run(process, tmp_path / stop.name) for stop, process in processes.items()}
        for stop, process in processes.items():  # signal during training, not while prepare forks its decoders:
            _wait_for_training(process, tmp_path / stop.name)  # a signal landing in an at-fork hook is lost (README)
        servers = {stop: _prefect_servers(process) for stop, process in processes.items()}
        for stop, process in processes.items():
            process.send_signal(stop)
        for process in processes.values():
            process.wait(timeout=180)
    finally:
        for process in processes.values():
            process.kill()
    outputs = {stop: log.read_text() for stop, log in logs.items()}
    for stop in stops:
        assert len(servers[stop]) == 1
        psutil.wait_procs(servers[stop], timeout=30)
        assert not servers[stop][0].is_running(), f"the temporary Prefect server outlived its run ({stop.name})"

    # SIGTERM: the run unwinds, says so, and closes its MLflow run as KILLED
    stopped = processes[signal.SIGTERM]
    assert stopped.returncode == 128 + signal.SIGTERM, outputs[signal.SIGTERM]
    # Not checked: Prefect's log worker and its server print their own shutdown noise (a failed log upload, an
    # aborted heartbeat write) around ours; see README "Stopping a run".
    assert "stopped by SIGTERM" in outputs[signal.SIGTERM]
    assert _client(tmp_path / "SIGTERM").get_run(run_ids[signal.SIGTERM]).info.status == "KILLED"

    # SIGKILL: nothing could close the run; the next run of the experiment on this machine marks it FAILED
    work = tmp_path / "SIGKILL"
    client = _client(work)
    assert client.get_run(run_ids[signal.SIGKILL]).info.status == "RUNNING"
    cfg = load_config(REPO / "params.yaml", [f"tracking.local_dir={work / 'mlflow'}"])
    with MlflowTracker(cfg.tracking, run_name="next") as tracker:
        assert client.get_run(tracker.run_id).info.status == "RUNNING"  # its own, live run is left alone
    killed = client.get_run(run_ids[signal.SIGKILL])
    assert killed.info.status == "FAILED" and "killed" in killed.data.tags[ENDED_BY_TAG]


def test_two_runs_preparing_the_same_images_share_one_complete_cache_entry(tmp_path):
    """The second of two concurrent builds of one content key keeps the first's (identical) entry."""
    entry = tmp_path / "cache" / "key"
    first, second = tmp_path / "cache" / ".key-a", tmp_path / "cache" / ".key-b"
    for staging, marker in ((first, "first"), (second, "second")):
        staging.mkdir(parents=True)
        (staging / "meta.json").write_text(marker)
    _move_into_place(first, entry)
    _move_into_place(second, entry)
    assert (entry / "meta.json").read_text() == "first" and not second.exists() and not first.exists()


def test_a_flow_run_keeps_its_outputs_in_its_own_folder(tmp_path):
    cfg = load_config(REPO / "params.yaml").in_run_folder(tmp_path / "run-1")
    assert cfg.train.output_dir == tmp_path / "run-1" / "train"
    assert cfg.data.prepared_site("nih-cxr8") == tmp_path / "run-1" / "prepared" / "nih-cxr8"
    assert {cfg.validation.report_dir, cfg.evaluate.output_dir, cfg.crosssim.output_dir} == {
        tmp_path / "run-1" / name for name in ("validation", "eval", "adapt")
    }
    assert cfg.pretrain.output_dir == tmp_path / "run-1" / "pretrain"
    assert cfg.data.cache_dir == REPO / ".cache" / "prepared"  # the content-addressed caches stay shared
    assert cfg.pretrain.cache_dir == REPO / ".cache" / "pretrain"
