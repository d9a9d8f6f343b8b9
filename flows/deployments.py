"""The Prefect deployments of the two flows, served by ``crosssim serve-flows``.

- ``crosssim-retrain/scheduled``: the retraining flow on the cron of the ``schedule`` section
  (default Mondays 02:00 UTC); it registers its model as challenger at its end.
- ``crosssim-rollout-analysis/scheduled``: the running rollout's analysis and decision on ``rollout.analysis_cron``
  (default hourly); it does nothing while no rollout runs.
- ``crosssim-ingest/on-demand``: the ingest flow (which retrains after an accepted batch when
  ``ingest.retrain_after``), no schedule. A hospital's batch arrives when it arrives, and a timer
  on a drop folder would pick up a half-copied export: the sender (or an automation) starts one
  run per complete batch with ``site`` and ``folder``.

They are served (``prefect.serve``) rather than deployed to a work pool: the serving process
registers both with the Prefect API in $PREFECT_API_URL, polls for their runs (scheduled or
triggered) and runs each in a subprocess, so there is no pool or worker to set up. Entrypoints
are module paths (``flows.retrain.retrain``): a run imports the installed project, whatever the
directory the serving process was started from.
"""

from __future__ import annotations

from pathlib import Path

from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron
from prefect.types.entrypoint import EntrypointType

from flows.ingest import ingest
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
    common = {"tags": ["crosssim"], "entrypoint_type": EntrypointType.MODULE_PATH}
    return [
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
