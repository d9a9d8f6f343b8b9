"""Prefect 3 rollout-analysis flow: the running rollout's outcomes → analysis → HTML report → decision.

The steps are pipeline.rollout.run's; this module makes them tasks. Each analysis is an MLflow run (the decision,
its bounds and counts as metrics, the HTML report as an artifact) and a Prefect markdown artifact; under
``rollout.policy: auto`` a promote or roll back is carried out through the registry (audited). Drift checks run
beside it: an alarm puts a canary back into shadow mode (audited) and emits the Prefect event
``crosssim.rollout.drift-alarm``, which an automation can turn into a retrain (README "Rollouts"). Served as the
``crosssim-rollout-analysis/scheduled`` deployment on ``rollout.analysis_cron`` (flows/deployments.py).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from pipeline.config import PipelineConfig, load_config
from pipeline.registry.review import Decision
from pipeline.rollout import run as steps
from pipeline.rollout.actions import RolloutActions, rollout_actions
from pipeline.rollout.analysis import RolloutAnalysis
from pipeline.rollout.monitor import DriftCheck
from pipeline.rollout.run import AnalysisSummary
from pipeline.rollout.state import Rollout

DRIFT_EVENT = "crosssim.rollout.drift-alarm"


@task(cache_policy=NO_CACHE)
def analyse(cfg: PipelineConfig, rollout: Rollout) -> RolloutAnalysis:
    return steps.analyse(cfg, rollout)


@task(cache_policy=NO_CACHE)
def check_drift(cfg: PipelineConfig, rollouts: RolloutActions, rollout: Rollout) -> list[DriftCheck]:
    return steps.check_drift(cfg, rollouts, rollout)


@task(cache_policy=NO_CACHE)
def raise_alarm(rollouts: RolloutActions, rollout: Rollout, alarms: list[DriftCheck]) -> str:
    """A canary goes back to shadow mode; the event lets an automation start a retrain."""
    paused = steps.pause_on_alarm(rollouts, rollout, alarms)
    emit_event(
        event=DRIFT_EVENT,
        resource={"prefect.resource.id": f"crosssim.model.{rollouts.name}", "prefect.resource.name": rollouts.name},
        payload={"rollout_id": rollout.rollout_id, "reasons": [reason for check in alarms for reason in check.reasons]},
    )
    return "canary paused (back to shadow), event emitted" if paused else "event emitted"


@task(cache_policy=NO_CACHE)
def report(cfg: PipelineConfig, analysis: RolloutAnalysis, drift: list[DriftCheck]) -> str:
    return steps.log_analysis(cfg, analysis, drift)


@task(cache_policy=NO_CACHE)
def decide(rollouts: RolloutActions, analysis: RolloutAnalysis, run_id: str) -> Decision | Rollout:
    return rollouts.act_on(analysis.decision, analysis.reasons, "rollout analysis flow", analysis_run=run_id)


@flow(name="crosssim-rollout-analysis", log_prints=True)
def rollout_analysis(config_path: str | None = None, overrides: list[str] | None = None) -> AnalysisSummary:
    """Analyse the running rollout of ``registry.model_name`` (nothing to do when none runs)."""
    cfg = load_config(Path(config_path) if config_path else None, overrides or [])
    logger = get_run_logger()
    rollouts = rollout_actions(cfg)
    rollout = rollouts.active()
    if rollout is None:
        logger.info("%s: no rollout is running", rollouts.name)
        return AnalysisSummary(rollout_id=None)
    analysis = analyse(cfg, rollout)
    drift = check_drift(cfg, rollouts, rollout)
    alarms = [check for check in drift if check.alarm]
    alarmed = raise_alarm(rollouts, rollout, alarms) if alarms else None
    run_id = report(cfg, analysis, drift)
    outcome = decide(rollouts, analysis, run_id)
    summary = AnalysisSummary(
        rollout_id=rollout.rollout_id,
        description=rollout.describe(),
        decision=analysis.decision,
        reasons=list(analysis.reasons),
        carried_out=None if isinstance(outcome, Rollout) else f"{outcome.action} of v{outcome.version}",
        labelled=analysis.labelled,
        pending=analysis.pending,
        mlflow_run_id=run_id,
        drift_checks=len(drift),
        drift_alarms=[reason for check in alarms for reason in check.reasons],
        alarm_action=alarmed,
    )
    create_markdown_artifact(key="rollout-analysis", markdown=summary.markdown(), description="Rollout analysis")
    logger.info("%s: %s (%s)", rollout.describe(), analysis.decision, "; ".join(analysis.reasons))
    return summary
