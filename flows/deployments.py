"""The Prefect deployments of the two flows, served by ``crosssim serve-flows``.

- ``crosssim-retrain/scheduled``: the retraining flow on the cron of the ``schedule`` section
  (default Mondays 02:00 UTC); it registers its model as challenger at its end.
- ``crosssim-rollout-analysis/scheduled``: the running rollout's analysis and decision on ``rollout.analysis_cron``
  (default hourly); it does nothing while no rollout runs.
- ``crosssim-continuous-learning/<site>``: one per site of ``loop.sites``, on ``loop.cycle_cron`` (default weekly):
  the site's learning-loop cycle (flows/loop.py) — last week's rollout decided, the new reads exported, ingested,
  a warm-start challenger registered and rolled out in shadow.
- ``crosssim-ingest/on-demand``: the ingest flow (which retrains after an accepted batch when
  ``ingest.retrain_after``), no schedule. A hospital's batch arrives when it arrives, and a timer
  on a drop folder would pick up a half-copied export: the sender (or an automation) starts one
  run per complete batch with ``site`` and ``folder``.

Two ways to run them:

- ``crosssim serve-flows`` (one machine): served with ``prefect.serve``; the serving process registers them with
  the Prefect API in $PREFECT_API_URL, polls for their runs (scheduled or triggered) and runs each in a subprocess,
  so there is no pool or worker to set up.
- ``crosssim deploy`` (a team, a cluster): registered on the work pool ``schedule.work_pool``; ``prefect worker
  start --pool NAME`` processes (a process pool) or a Kubernetes worker (one pod per flow run, from the pool's
  base job template in infra/prefect/) run them, as many workers as wanted, on other machines than the server's.

Entrypoints are module paths (``flows.retrain.retrain``): a run imports the installed project, whatever the
directory its process was started from.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from uuid import UUID

from prefect import serve
from prefect.automations import Automation
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.objects import StateType
from prefect.deployments.runner import RunnerDeployment
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification
from prefect.exceptions import ObjectNotFound
from prefect.schedules import Cron
from prefect.types.entrypoint import EntrypointType
from prefect.workers.process import ProcessWorker

from flows.ingest import ingest
from flows.loop import continuous_learning
from flows.retrain import retrain
from flows.rollout import rollout_analysis
from pipeline.config import PipelineConfig
from pipeline.errors import ConfigError

RETRAIN_DEPLOYMENT = "scheduled"
INGEST_DEPLOYMENT = "on-demand"
ANALYSIS_DEPLOYMENT = "scheduled"
RETRAIN = f"{retrain.name}/{RETRAIN_DEPLOYMENT}"  # full names, as `prefect deployment run` and run_deployment take them
INGEST = f"{ingest.name}/{INGEST_DEPLOYMENT}"
ANALYSIS = f"{rollout_analysis.name}/{ANALYSIS_DEPLOYMENT}"


def loop_deployment(site: str) -> str:
    """The full name of ``site``'s continuous-learning deployment."""
    return f"{continuous_learning.name}/{site}"


def build_deployments(cfg: PipelineConfig, config_path: Path | None, overrides: list[str]) -> list[RunnerDeployment]:
    """The deployments. Their default parameters are the serving process's config file and overrides,
    so a scheduled run is what ``crosssim run --config FILE --set ...`` would run at that moment."""
    schedule = cfg.schedule
    defaults = {"config_path": str(config_path.resolve()) if config_path else None, "overrides": overrides}
    try:
        cron = Cron(schedule.retrain_cron, timezone=schedule.timezone, active=schedule.active)
    except ValueError as exc:
        raise ConfigError(f"schedule.retrain_cron: {exc}") from exc
    try:
        analysis_cron = Cron(cfg.rollout.analysis_cron, timezone=schedule.timezone, active=schedule.active)
    except ValueError as exc:
        raise ConfigError(f"rollout.analysis_cron: {exc}") from exc
    try:
        cycle_cron = Cron(cfg.loop.cycle_cron, timezone=schedule.timezone, active=schedule.active)
    except ValueError as exc:
        raise ConfigError(f"loop.cycle_cron: {exc}") from exc
    common = {"tags": ["crosssim"], "entrypoint_type": EntrypointType.MODULE_PATH}
    cycles = [
        continuous_learning.to_deployment(
            name=site,
            schedule=cycle_cron,
            parameters=defaults | {"site": site},
            description=f"The learning loop at {site}: rollout decided, reads exported and ingested, a warm-start "
            f"challenger registered and rolled out in shadow; cron {cfg.loop.cycle_cron!r}.",
            **common,
        )
        for site in cfg.loop.sites
    ]
    return [
        *cycles,
        retrain.to_deployment(
            name=RETRAIN_DEPLOYMENT,
            schedule=cron,
            parameters=defaults,
            description=f"Retrain, evaluate, adapt and register a challenger; cron {schedule.retrain_cron!r} "
            f"({schedule.timezone}).",
            **common,
        ),
        rollout_analysis.to_deployment(
            name=ANALYSIS_DEPLOYMENT,
            schedule=analysis_cron,
            parameters=defaults,
            description=f"Analyse the running rollout and decide (rollout.policy); cron {cfg.rollout.analysis_cron!r}.",
            **common,
        ),
        ingest.to_deployment(
            name=INGEST_DEPLOYMENT,
            parameters=defaults,
            description="Ingest one hospital batch: run it with site=<site> folder=<drop folder>.",
            **common,
        ),
    ]


def serve_deployments(cfg: PipelineConfig, deployments: list[RunnerDeployment]) -> None:
    """Register and serve until interrupted; on shutdown Prefect pauses the deployments, so no run
    is scheduled while nothing would execute it (serving again resumes them)."""
    serve(*deployments, limit=cfg.schedule.max_concurrent_runs)


def deploy_to_pool(cfg: PipelineConfig, deployments: list[RunnerDeployment]) -> tuple[str, list[UUID]]:
    """Register (or update) the deployments on the work pool ``schedule.work_pool``; (the pool's type, their ids).

    A missing pool is created as a process pool: Prefect's default job template with flow-run heartbeats every
    ``schedule.heartbeat_seconds``, and ``schedule.max_concurrent_runs`` as its concurrency limit. An existing
    pool (e.g. the Kubernetes pool created from infra/prefect/kubernetes-base-job-template.json) is used as it is.
    The automation that marks silent flow runs Crashed is created or updated with them."""
    pool = cfg.schedule.work_pool
    with get_client(sync_client=True) as client:
        try:
            pool_type = client.read_work_pool(pool).type
        except ObjectNotFound:
            template = ProcessWorker.get_default_base_job_template()
            heartbeat = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(cfg.schedule.heartbeat_seconds)}
            template["variables"]["properties"]["env"]["default"] = heartbeat
            created = WorkPoolCreate(
                name=pool, type="process", base_job_template=template, concurrency_limit=cfg.schedule.max_concurrent_runs
            )
            pool_type = client.create_work_pool(work_pool=created).type
    ids = [deployment.apply(work_pool_name=pool) for deployment in deployments]
    _crash_silent_runs(cfg.schedule.crashed_after_seconds)
    return pool_type, ids


CRASH_SILENT_RUNS = "crosssim: crash silent flow runs"
FINAL_STATES = ("Completed", "Failed", "Cancelled", "Crashed")


def _crash_silent_runs(after_seconds: int) -> None:
    """Prefect's zombie detection: a flow run whose heartbeats stop (its worker killed, its machine lost) without a
    final state is marked Crashed after ``after_seconds``; `prefect flow-run retry` then reruns it and the retrain
    flow resumes its training. Without it such a run would show Running for ever."""
    automation = Automation(
        name=CRASH_SILENT_RUNS,
        description=f"Flow runs silent for {after_seconds} s are marked Crashed (created by `crosssim deploy`).",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *(f"prefect.flow-run.{state}" for state in FINAL_STATES)},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=after_seconds),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {after_seconds} s: its worker or machine was lost "
                "(`prefect flow-run retry ID` resumes it)",
            )
        ],
    )
    with get_client(sync_client=True) as client:
        for existing in client.read_automations_by_name(CRASH_SILENT_RUNS):
            client.delete_automation(existing.id)
    automation.create()

