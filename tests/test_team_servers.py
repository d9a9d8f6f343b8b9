"""The team set-up on loopback, nothing mocked: one PostgreSQL server holding MLflow's store and Prefect's
database, an MLflow tracking server on it with its own artifact root, a Prefect server on it, a process work pool
and `prefect worker`s. What a hospital group's team runs (README "From one machine to a cluster"):

- `crosssim run` logs to the MLflow server and registers there, through a PostgreSQL restart in the middle of the
  run; the flow run is in the Prefect server's database;
- `crosssim deploy` puts the deployments on the work pool; `prefect deployment run` starts them and workers run
  them; a worker lost mid-training leaves its flow run to the zombie automation (Crashed), and `prefect flow-run
  retry` on another worker resumes the training from the run folder's checkpoint.

Two tests, each doing several things, because every start of these servers and every flow run costs CI minutes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.deployments import ANALYSIS, RETRAIN
from tests.conftest import REPO
from tests.pg_fixture import PostgresServer, running_postgres
from tests.test_deployments import _free_port, _start, _stop, _wait_for
from tests.test_flow import _overrides

pytestmark = pytest.mark.slow  # four servers and real training: left out of make test-fast

BIN = Path(sys.executable).parent
MODEL = "cxr-team"
CRASHED_AFTER = 60  # seconds without a heartbeat (every 30 s) before a flow run is marked Crashed
TINY = ("data.max_images_per_class=30", "data.image_size=32", "train.batch_size=32", "crosssim.enabled=false")


@dataclass
class Team:
    postgres: PostgresServer
    mlflow_url: str
    prefect_url: str
    env: dict[str, str]  # what a team member's shell exports
    logs: Path

    def mlflow(self) -> MlflowClient:
        return MlflowClient(self.mlflow_url, registry_uri=self.mlflow_url)


@pytest.fixture(scope="module")
def team(tmp_path_factory, data_dir) -> Iterator[Team]:
    logs = tmp_path_factory.mktemp("team")
    with running_postgres() as postgres:
        mlflow_db = postgres.create_database("mlflow")
        postgres.create_database("prefect")
        mlflow_port, prefect_port = _free_port(), _free_port()
        env = {key: value for key, value in os.environ.items() if not key.startswith(("MLFLOW_", "PREFECT_"))}
        env |= {
            "CROSSSIM_DATA_DIR": str(data_dir),
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
            "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
            "PREFECT_HOME": str(logs / "prefect-home"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_WORKER_QUERY_SECONDS": "2",
        }
        server_env = env | {"PREFECT_API_DATABASE_CONNECTION_URL": postgres.database_url("prefect", "asyncpg")}
        mlflow_command = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port)]
        mlflow_command += ["--backend-store-uri", mlflow_db, "--artifacts-destination", str(logs / "artifacts")]
        prefect_command = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)]
        servers = [
            _start([*mlflow_command, "--workers", "1"], env, logs, logs / "mlflow.log"),
            _start([*prefect_command, "--no-ui"], server_env, logs, logs / "prefect.log"),
        ]
        try:
            health = [(f"{env['MLFLOW_TRACKING_URI']}/health", "mlflow"), (f"{env['PREFECT_API_URL']}/health", "prefect")]
            for url, name in health:
                _wait_for(lambda url=url: _ok(url), 180, f"{name} server", logs / f"{name}.log")
            yield Team(postgres, env["MLFLOW_TRACKING_URI"], env["PREFECT_API_URL"], env, logs)
        finally:
            for server in servers:
                _stop(server)


def _ok(url: str) -> bool:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status == 200


def _settings(team: Team, work: Path, *extra: str) -> list[str]:
    overrides = _overrides(work, team.env["CROSSSIM_DATA_DIR"], *TINY, f"registry.model_name={MODEL}", *extra)
    return [item for override in overrides for item in ("--set", override)]


def _tables(postgres: PostgresServer, database: str) -> set[str]:
    with psycopg.connect(f"host=127.0.0.1 port={postgres.port} user=postgres dbname={database}") as db:
        rows = db.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall()
    return {name for (name,) in rows}


def test_crosssim_run_logs_and_registers_on_the_team_servers_through_a_postgres_restart(team, tmp_path):
    """PostgreSQL is stopped for 3 s as soon as the run has opened its MLflow run: the MLflow server answers 503
    meanwhile, MLflow's client retries, the Prefect server reconnects by itself."""
    client = team.mlflow()
    runs_before = len(_all_runs(client))
    restarted = threading.Event()

    def restart_when_the_run_has_started() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and len(_all_runs(client)) == runs_before:
            time.sleep(0.5)
        team.postgres.stop()  # the run's next requests (tags, validation reports) meet no database
        time.sleep(3)
        team.postgres.start()
        restarted.set()

    restarter = threading.Thread(target=restart_when_the_run_has_started)
    restarter.start()
    command = [str(BIN / "crosssim"), "run", "--config", str(REPO / "params.yaml"), *_settings(team, tmp_path, "train.epochs=1")]
    done = subprocess.run(command, env=team.env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    restarter.join()
    assert restarted.is_set() and "OperationalError" in (team.logs / "mlflow.log").read_text()  # it met no database
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    (version,) = client.search_model_versions(f"name = '{MODEL}'")  # registered once
    assert version.status == "READY" and client.get_model_version_by_alias(MODEL, "challenger").version == version.version
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED" and run.info.artifact_uri.startswith("mlflow-artifacts:")  # served by it
    assert any((team.logs / "artifacts").rglob("MLmodel"))  # in the server's artifact root, not the project
    assert not (tmp_path / "mlflow").exists()
    assert {"runs", "registered_models", "model_versions"} <= _tables(team.postgres, "mlflow")
    assert {"flow_run", "deployment", "work_pool"} <= _tables(team.postgres, "prefect")
    assert _state(team, run.data.tags["prefect_flow_run_id"]).is_completed()  # in Prefect's PostgreSQL database


@pytest.fixture(scope="module")
def deployed(team, tmp_path_factory) -> Iterator[Path]:
    """`crosssim deploy` onto the process pool, and a worker of the pool; yields the runs' work folder."""
    work = tmp_path_factory.mktemp("deployed")
    command = [str(BIN / "crosssim"), "deploy", "--config", str(REPO / "params.yaml"), "--set", "schedule.active=false"]
    command += ["--set", f"schedule.crashed_after_seconds={CRASHED_AFTER}"]
    done = subprocess.run(command, env=team.env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "deployed on work pool 'process' (process)" in done.stdout, done.stdout + done.stderr
    worker = _start_worker(team, "first")
    try:
        yield work
    finally:
        _stop(worker)


def _start_worker(team: Team, name: str) -> subprocess.Popen:
    command = [str(BIN / "prefect"), "worker", "start", "--pool", "process", "--name", name]
    return _start(command, team.env, REPO, team.logs / f"worker-{name}.log")


def _deployment_run(team: Team, deployment: str, overrides: list[str]) -> str:
    """`prefect deployment run` as a user types it; the new flow run's id."""
    import json

    command = [str(BIN / "prefect"), "deployment", "run", deployment, "--param", f"overrides={json.dumps(overrides)}"]
    done = subprocess.run(command, env=team.env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    (line,) = [line for line in done.stdout.splitlines() if "UUID:" in line]
    return line.split("UUID:")[1].strip()


def _state(team: Team, flow_run_id: str):
    with temporary_settings({PREFECT_API_URL: team.prefect_url}), get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).state


def _final_state(team: Team, flow_run_id: str, timeout: float, log: Path):
    return _wait_for(lambda: (state := _state(team, flow_run_id)).is_final() and state, timeout, "flow run end", log)


def test_deployments_run_on_workers_and_a_lost_workers_run_resumes_when_retried(team, deployed):
    """`prefect deployment run` of the retraining; its worker is lost (SIGKILL of the worker and the run: a lost
    machine) after the first epoch. While the automation `crosssim deploy` made waits for the missing heartbeats,
    a new worker runs the rollout analysis; the retraining is then marked Crashed, `prefect flow-run retry` reruns it
    on the new worker, which resumes the training from the run folder's checkpoint and registers the model."""
    overrides = [*_settings(team, deployed)[1::2], "train.epochs=4", "train.early_stopping_patience=null"]
    flow_run = _deployment_run(team, RETRAIN, overrides)
    checkpoints = deployed / "runs"
    _wait_for(lambda: any(checkpoints.glob("*/train/last.pt")), 300, "the first epoch's checkpoint", team.logs / "worker-first.log")
    _lose_every_worker(team)
    (train_dir,) = checkpoints.glob("*/train")
    done_before = _epoch(train_dir)
    assert 1 <= done_before < 4

    replacement = _start_worker(team, "replacement")
    log = team.logs / "worker-replacement.log"
    try:
        analysis = _deployment_run(team, ANALYSIS, [f"registry.model_name={MODEL}"])
        state = _final_state(team, analysis, 180, log)
        assert state.is_completed(), f"{state}\n{log.read_text()[-3000:]}"

        state = _final_state(team, flow_run, CRASHED_AFTER + 90, team.logs / "worker-first.log")
        assert state.is_crashed() and "no heartbeat" in state.message, state
        retry = subprocess.run([str(BIN / "prefect"), "flow-run", "retry", flow_run], env=team.env, capture_output=True, text=True, timeout=120)
        assert retry.returncode == 0, retry.stdout + retry.stderr
        state = _final_state(team, flow_run, 600, log)
        assert state.is_completed(), f"{state}\n{log.read_text()[-3000:]}"
    finally:
        _stop(replacement)
    assert _epoch(train_dir) == 4 and len(list(checkpoints.iterdir())) == 1  # the same run folder, trained on
    challenger = team.mlflow().get_model_version_by_alias(MODEL, "challenger")
    assert challenger.tags["prefect_flow_run_id"] == flow_run
    steps = [m.step for m in team.mlflow().get_metric_history(challenger.run_id, "val_auc")]
    assert min(steps) == done_before + 1  # the retry trained only the epochs the crash had left


def _epoch(train_dir: Path) -> int:
    import torch

    return torch.load(train_dir / "last.pt", weights_only=False)["state"]["epoch"]


def _lose_every_worker(team: Team) -> None:
    """SIGKILL to every worker of the module and every process it started, flow runs included: a lost machine.
    Nothing reports anything; only the missing heartbeats tell the server."""
    import psutil

    for process in psutil.process_iter(["cmdline"]):
        try:
            ours = process.environ().get("PREFECT_HOME") == team.env["PREFECT_HOME"]
            if ours and "worker start --pool process" in " ".join(process.info["cmdline"] or []):
                for doomed in [process, *process.children(recursive=True)]:
                    doomed.kill()
        except psutil.Error:  # gone meanwhile, or not ours to read
            continue


def _all_runs(client: MlflowClient) -> list:
    return client.search_runs([experiment.experiment_id for experiment in client.search_experiments()])
