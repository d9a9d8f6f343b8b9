"""The deployments on a real Prefect server: `crosssim serve-flows` registers the weekly retraining, the
on-demand ingest and each site's continuous-learning cycle; a triggered retraining registers a challenger, a cycle
turns served reads into a shadow rollout, and the server schedules the next Monday."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL, temporary_settings
from typer.testing import CliRunner

from flows.cli import app
from flows.deployments import ANALYSIS, INGEST, RETRAIN
from tests.conftest import REPO, copy_nih_subset
from tests.test_flow import _overrides

pytestmark = pytest.mark.slow  # a Prefect server and workers: left out of make test-fast

CRON, ZONE = "0 2 * * 1", "Europe/Berlin"  # Mondays 02:00 Berlin time: 01:00 UTC in winter, 00:00 UTC in summer


def test_serve_flows_needs_a_server_and_a_valid_cron():
    params = ["serve-flows", "--config", str(REPO / "params.yaml")]
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        result = CliRunner().invoke(app, params)
    assert result.exit_code == 2 and "PREFECT_API_URL is not set" in result.output
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):  # refused before any connection
        result = CliRunner().invoke(app, [*params, "--set", "schedule.retrain_cron=61 2 * * 1"])
    assert result.exit_code == 2 and "schedule.retrain_cron" in result.output and "Traceback" not in result.output


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for(check: Callable[[], object], timeout: float, what: str, log: Path) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if result := check():
                return result
        except Exception:  # not up yet
            pass
        time.sleep(1)
    pytest.fail(f"{what} not ready after {timeout:.0f}s; log tail:\n{log.read_text()[-3000:]}")


def _start(command: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    with log.open("w") as out:  # a session of its own: stopping it stops the flow-run processes it started
        return subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def served(tmp_path_factory, data_dir) -> Iterator[Path]:
    """A Prefect server and `crosssim serve-flows` against it, as subprocesses; yields the folder of their logs."""
    home = tmp_path_factory.mktemp("prefect")
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # tracking.local_dir then
    env |= {
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "CROSSSIM_DATA_DIR": str(data_dir),
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",  # seconds between the serving process's looks for runs
    }
    bin_dir = Path(sys.executable).parent
    server_command = [str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    server = _start([*server_command, "--no-ui"], env, home, home / "server.log")
    serving = None
    try:
        health = f"{url}/health"
        _wait_for(lambda: urllib.request.urlopen(health, timeout=5), 120, "Prefect server", home / "server.log")
        serve_command = [str(bin_dir / "crosssim"), "serve-flows", "--config", str(REPO / "params.yaml")]
        serve_command += ["--set", f"schedule.retrain_cron={CRON}", "--set", f"schedule.timezone={ZONE}"]
        serving = _start(serve_command, env, REPO, home / "serve.log")  # cwd: the project, as a user runs it
        with temporary_settings({PREFECT_API_URL: url}):
            _wait_for(lambda: all(map(_deployment, (RETRAIN, INGEST, ANALYSIS))), 120, "served deployments", home / "serve.log")
            yield home
    finally:
        for process in (serving, server):
            if process is not None:
                _stop(process)


def _deployment(name: str):
    with get_client(sync_client=True) as client:
        try:
            return client.read_deployment_by_name(name)
        except ObjectNotFound:
            return None


def _next_monday_2am(zone: str) -> datetime:
    local = datetime.now(ZoneInfo(zone))
    candidate = local.replace(hour=2, minute=0, second=0, microsecond=0) + timedelta(days=(0 - local.weekday()) % 7)
    return candidate if candidate > local else candidate + timedelta(days=7)


def test_serve_flows_registers_the_weekly_retrain_and_the_ingest(served):
    retrain, ingest = _deployment(RETRAIN), _deployment(INGEST)
    (schedule,) = retrain.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == (CRON, ZONE, True)
    assert retrain.parameters["config_path"] == str(REPO / "params.yaml")
    assert retrain.entrypoint == "flows.retrain.retrain"
    assert ingest.schedules == [] and set(ingest.parameter_openapi_schema["required"]) == {"site", "folder"}
    analysis = _deployment(ANALYSIS)
    (hourly,) = analysis.schedules
    assert (hourly.schedule.cron, analysis.entrypoint) == ("0 * * * *", "flows.rollout.rollout_analysis")


def test_the_server_schedules_the_next_monday_in_the_configured_zone(served):
    deployment = _deployment(RETRAIN)

    def scheduled():
        with get_client(sync_client=True) as client:
            return client.read_flow_runs(deployment_filter=DeploymentFilter(id={"any_": [deployment.id]}))

    runs = _wait_for(scheduled, 20, "scheduled runs", served / "server.log")  # the server looks every 5 s
    assert min(run.expected_start_time for run in runs) == _next_monday_2am(ZONE)


def test_a_triggered_retrain_registers_a_challenger(served, data_dir, tmp_path):
    # CrossSim inside the flow is test_flow's subject; here it would only double the run's time
    tiny = ("data.max_images_per_class=30", "data.image_size=32", "train.epochs=1", "train.batch_size=32")
    overrides = _overrides(tmp_path, data_dir, *tiny, "crosssim.enabled=false")
    flow_run = run_deployment(RETRAIN, parameters={"overrides": overrides}, timeout=300)
    assert flow_run.state.is_completed(), f"{flow_run.state}\n{(served / 'serve.log').read_text()[-3000:]}"

    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)  # not the process-wide URI an earlier test left set
    challenger = client.get_model_version_by_alias("crosssim-pneumonia", "challenger")
    assert challenger.tags["prefect_flow_run_id"] == str(flow_run.id)  # lineage back to the deployment's run


def test_the_ingest_deployment_takes_a_batch_and_fails_on_a_missing_folder(served, tmp_path):
    repo = tmp_path / "repo"  # the batch's DVC repository: nothing of the project's is touched
    (repo / ".dvc").mkdir(parents=True)
    overrides = [f"ingest.dvc_target={repo / 'data'}", f"ingest.data_dir={repo / 'data' / 'raw'}"]
    overrides += [f"ingest.{key}={repo / key}" for key in ("quarantine_dir", "report_dir", "log_path")]
    missing = tmp_path / "no-such-drop"
    parameters = {"site": "nih-cxr8", "folder": str(missing), "overrides": overrides}
    flow_run = run_deployment(INGEST, parameters=parameters, timeout=120)
    assert flow_run.state.is_failed() and f"batch folder {missing} does not exist" in flow_run.state.message


def test_a_drift_alarm_triggers_the_retrain_deployment_through_an_automation(served, tmp_path, monkeypatch):
    """README "Rollouts": the automation a team creates. The triggered run is given a data root that does not
    exist, so it fails in seconds: what is checked is that the alarm started the retrain deployment."""
    from prefect.automations import Automation
    from prefect.events.actions import RunDeployment
    from prefect.events.schemas.automations import EventTrigger, Posture

    from flows.rollout import DRIFT_EVENT, raise_alarm
    from pipeline.config import load_config
    from pipeline.rollout.drift import DriftTest, EstimatedPerformance
    from pipeline.rollout.monitor import DriftCheck
    from tests.test_rollout import champion_and_challenger

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    retrain = _deployment(RETRAIN)
    marker = f"data.root={tmp_path / 'no-data-drift-test'}"
    automation = Automation(
        name="retrain on drift",
        trigger=EventTrigger(expect={DRIFT_EVENT}, match={"prefect.resource.id": "crosssim.model.*"}, posture=Posture.Reactive, threshold=1),
        actions=[RunDeployment(source="selected", deployment_id=retrain.id, parameters={"overrides": [marker]})],
    ).create()
    try:
        cfg = load_config(REPO / "params.yaml", [f"tracking.local_dir={tmp_path / 'mlflow'}", "registry.model_name=cxr"])
        rollouts = champion_and_challenger(cfg)
        shadow = rollouts.start("shadow", "dr. ada", "v2 in shadow")
        alarm = DriftCheck("nih-cxr8", "champion", "1", 200, 200, DriftTest(0.3, 0.0005), DriftTest(0.5, 1e-9),
                           EstimatedPerformance(0.6, 0.5, 0.7), True, ["input drift at nih-cxr8 for the champion"])  # fmt: skip
        time.sleep(2)  # the automation is loaded by the server's trigger service
        assert raise_alarm.fn(rollouts, shadow, [alarm]) == "event emitted"

        def triggered():
            with get_client(sync_client=True) as client:
                runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id={"any_": [retrain.id]}))
            return [run for run in runs if marker in (run.parameters.get("overrides") or [])]

        (run,) = _wait_for(triggered, 60, "the retrain run the drift alarm triggers", served / "server.log")
        assert run.deployment_id == retrain.id
    finally:
        automation.delete()


def _loop_site(data_dir: Path, root: Path) -> Path:
    """root/repo: git + DVC with data/raw/nih-cxr8 holding 6 real NIH images (the site's dataset so far)."""
    from dvc.repo import Repo

    from pipeline.ingest.dvc_repo import DvcRepo

    repo = root / "repo"
    copy_nih_subset(data_dir, repo / "data" / "raw" / "nih-cxr8", per_class=3)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    Repo.init(str(repo))
    DvcRepo(repo).add(repo / "data")
    return repo


def _serve_cases(data_dir: Path, work: Path, known: set[str], n: int) -> list[str]:
    """``n`` NIH images of patients the site does not hold, as served cases of nih-cxr8 (ledger rows answered by
    the champion v1, images kept) two days ago, each with a radiologist's read."""
    import asyncio
    from dataclasses import replace
    from datetime import timezone

    import pandas as pd

    from pipeline.rollout.outcomes import OutcomeReport, record_outcomes
    from pipeline.serving.image_store import ImageStore
    from pipeline.serving.ledger import PredictionLedger
    from tests.test_serving_ledger import make_row

    table = pd.read_csv(data_dir / "nih-cxr8" / "Data_Entry_2017.csv", dtype=str, keep_default_na=False)
    fresh = table[~table["Patient ID"].isin(known)].drop_duplicates("Patient ID")
    normal = fresh[fresh["Finding Labels"].eq("No Finding")].head(n // 2)
    pneumonia = fresh[fresh["Finding Labels"].str.contains("Pneumonia")].head(n - n // 2)
    served_at = datetime.now(timezone.utc) - timedelta(days=2)
    ledger, images = PredictionLedger(f"sqlite:///{work / 'ledger.db'}"), ImageStore(work / "images", 30)
    rows, reads = [], []
    for index, (_, case) in enumerate(pd.concat([normal, pneumonia]).iterrows()):
        row = replace(
            make_row(index), site="nih-cxr8", model_version="1", created_at=served_at + timedelta(seconds=index)
        )
        images.put(
            row.inference_id, (data_dir / "nih-cxr8" / "images" / case["Image Index"]).read_bytes(), row.created_at
        )
        label = "normal" if case["Finding Labels"] == "No Finding" else "pneumonia"
        rows.append(row)
        reads.append(OutcomeReport(label, "radiologist_read", inference_id=row.inference_id, observed_at=served_at))

    async def record_all() -> None:
        await asyncio.gather(*(ledger.record(row) for row in rows))

    asyncio.run(record_all())
    record_outcomes(ledger, reads, ["radiologist_read", "follow_up"])
    ledger.close()
    return [row.inference_id for row in rows]


def test_the_continuous_learning_deployment_turns_served_reads_into_a_shadow_rollout(
    served, data_dir, tmp_path, monkeypatch
):
    """Issue 30: served cases with reads → export → ingest (DVC) → warm-start challenger → registered → shadow
    rollout, on the real server. A cycle killed mid-retrain leaves no version and is finished by the next run
    without a second ingest; a week with no new read trains nothing and says so."""
    import sqlalchemy as sa

    from flows.deployments import loop_deployment
    from pipeline.config import load_config
    from pipeline.registry.review import actions_for
    from pipeline.registry.store import CHALLENGER, CHAMPION, ModelRegistry
    from pipeline.rollout.actions import rollout_actions
    from pipeline.serving.ledger import PredictionLedger, exported_cases

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tiny = ("data.max_images_per_class=30", "data.image_size=32", "train.epochs=1", "train.batch_size=16")
    overrides = _overrides(tmp_path, data_dir, *tiny, "crosssim.enabled=false")
    first = run_deployment(RETRAIN, parameters={"overrides": overrides}, timeout=300)
    assert first.state.is_completed(), f"{first.state}\n{(served / 'serve.log').read_text()[-3000:]}"
    cfg = load_config(REPO / "params.yaml", overrides)
    actions = actions_for(cfg)
    actions.approve("dr. ada", "first champion for the loop", override_gate=bool(actions.gate_failures("1")))

    repo = _loop_site(data_dir, tmp_path)
    known = set(pd_read_ids(repo / "data" / "raw" / "nih-cxr8"))
    served_ids = _serve_cases(data_dir, tmp_path, known, 12)
    loop = [
        *overrides, f"serve.ledger_path={tmp_path / 'ledger.db'}", f"serve.image_store={tmp_path / 'images'}",
        f"ingest.dvc_target={repo / 'data'}", f"ingest.data_dir={repo / 'data' / 'raw'}", "ingest.push=false",
        *(f"ingest.{key}={repo / key}" for key in ("quarantine_dir", "report_dir", "log_path")),
        f"loop.exports_dir={tmp_path / 'exports'}", "loop.retrain_steps=3", "rollout.maturity_hours=0",
        "registry.margin=1.0",  # this test is about the wiring: the gate passes whatever 3 steps did
    ]  # fmt: skip
    # killed mid-retrain (here in this process, against the same server): exported and ingested, nothing registered
    from flows.loop import continuous_learning
    from pipeline.loop import cycle as cycle_steps

    def killed(*args, **kwargs):
        raise RuntimeError("killed mid-retrain")

    monkeypatch.setattr(cycle_steps, "warm_start_retrain", killed)
    with pytest.raises(RuntimeError, match="killed mid-retrain"):
        continuous_learning("nih-cxr8", str(REPO / "params.yaml"), loop)
    monkeypatch.undo()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    registry = ModelRegistry(f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    assert [str(v.version) for v in registry.versions(cfg.registry.model_name)] == ["1"]
    assert len(pd_read_ids(repo / "data" / "raw" / "nih-cxr8")) == 6 + len(served_ids)

    # the next (scheduled) run finishes the cycle: no second export or ingest, one new version, a shadow rollout
    cycle = run_deployment(loop_deployment("nih-cxr8"), parameters={"overrides": loop}, timeout=400)
    assert cycle.state.is_completed(), f"{cycle.state}\n{(served / 'serve.log').read_text()[-4000:]}"

    versions = registry.versions(cfg.registry.model_name)
    newest = versions[-1]
    assert len(versions) == 2 and newest.tags["loop.site"] == "nih-cxr8" and newest.tags["model_kind"] == "loop"
    assert newest.tags["loop.reads"] == str(6 + len(served_ids))  # the site's 6 images and every read
    assert newest.tags["parent_model"].endswith("/1") and newest.tags["weights_artifact"].startswith("runs:/")
    assert registry.find(cfg.registry.model_name, CHALLENGER).version == newest.version
    assert str(registry.find(cfg.registry.model_name, CHAMPION).version) == "1"  # the champion keeps serving
    rollout = rollout_actions(load_config(REPO / "params.yaml", loop)).active()
    assert rollout is not None and (rollout.mode, rollout.challenger, rollout.champion) == (
        "shadow",
        str(newest.version),
        "1",
    )
    ledger = PredictionLedger(f"sqlite:///{tmp_path / 'ledger.db'}")
    with ledger.transaction() as connection:
        assert set(connection.execute(sa.select(exported_cases.c.inference_id)).scalars()) == set(served_ids)
    ledger.close()
    assert len(list((tmp_path / "exports" / "nih-cxr8" / "ingested").iterdir())) == 1
    assert len(pd_read_ids(repo / "data" / "raw" / "nih-cxr8")) == 6 + len(served_ids)  # ingested into the dataset

    again = run_deployment(loop_deployment("nih-cxr8"), parameters={"overrides": loop}, timeout=300)
    assert again.state.is_completed(), f"{again.state}\n{(served / 'serve.log').read_text()[-3000:]}"
    assert len(registry.versions(cfg.registry.model_name)) == 2  # no new read: nothing trained
    with get_client(sync_client=True) as client:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        (note,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[again.id]))
        )
    assert note.key == "loop-nih-cxr8" and "skipped" in note.data and "no new reads" in note.data
    # that cycle's first step analysed the running rollout: its report draws the site's learning curve
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    (analysis,) = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], f"tags.`crosssim.rollout_id` = '{rollout.rollout_id}'"
    )
    page = Path(
        client.download_artifacts(analysis.info.run_id, "rollout/rollout-report.html", str(tmp_path))
    ).read_text()
    assert "id='learning-curve'" in page and "<svg" in page


def pd_read_ids(site: Path) -> list[str]:
    import pandas as pd

    return pd.read_csv(site / "Data_Entry_2017.csv", dtype=str, keep_default_na=False)["Patient ID"].tolist()
