"""Prefect 3 rollout-analysis flow: the running rollout's outcomes → analysis → HTML report → decision.

The stages are pipeline.rollout's; this module makes them tasks. Each analysis is an MLflow run (the decision,
its bounds and counts as metrics, the HTML report as an artifact) and a Prefect markdown artifact; under
``rollout.policy: auto`` a promote or roll back is carried out through the registry (audited). Drift checks run
beside it: an alarm puts a canary back into shadow mode (audited) and emits the Prefect event
``crosssim.rollout.drift-alarm``, which an automation can turn into a retrain (README "Rollouts"). Served as the
``crosssim-rollout-analysis/scheduled`` deployment on ``rollout.analysis_cron`` (flows/deployments.py).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from pipeline.config import PipelineConfig, load_config
from pipeline.registry.review import Decision
from pipeline.rollout.actions import RolloutActions, rollout_actions
from pipeline.rollout.analysis import RolloutAnalysis, analyse_rollout
from pipeline.rollout.monitor import DriftCheck, drift_checks, model_reference
from pipeline.rollout.report import render_report
from pipeline.rollout.state import Rollout
from pipeline.serving.image_store import ImageStore
from pipeline.serving.ledger import PredictionLedger, resolve_ledger_url
from pipeline.tracking import MlflowTracker

DECISION_CODES = {"continue": 0, "promote": 1, "rollback": -1}
DRIFT_EVENT = "crosssim.rollout.drift-alarm"


@task(cache_policy=NO_CACHE)
def analyse(cfg: PipelineConfig, rollout: Rollout) -> RolloutAnalysis:
    ledger = PredictionLedger(resolve_ledger_url(cfg.serve, os.environ))
    try:
        return analyse_rollout(ledger, rollout, cfg.rollout)
    finally:
        ledger.close()


@task(cache_policy=NO_CACHE)
def check_drift(cfg: PipelineConfig, rollouts: RolloutActions, rollout: Rollout) -> list[DriftCheck]:
    registry = rollouts.actions.registry
    versions = {"champion": rollout.champion, "challenger": rollout.challenger}
    references = {model: ref for model, v in versions.items() if (ref := model_reference(registry, rollouts.name, v))}
    ledger = PredictionLedger(resolve_ledger_url(cfg.serve, os.environ))
    try:
        return drift_checks(ledger, ImageStore(cfg.serve.image_store, cfg.serve.image_retention_days), rollout, references, cfg.rollout)
    finally:
        ledger.close()


@task(cache_policy=NO_CACHE)
def raise_alarm(rollouts: RolloutActions, rollout: Rollout, alarms: list[DriftCheck]) -> str:
    """A canary goes back to shadow mode; the event lets an automation start a retrain."""
    reasons = [reason for check in alarms for reason in check.reasons]
    done = "event emitted"
    if rollout.mode == "canary":
        rollouts.pause("drift monitor", "; ".join(reasons))
        done = "canary paused (back to shadow), event emitted"
    emit_event(
        event=DRIFT_EVENT,
        resource={"prefect.resource.id": f"crosssim.model.{rollouts.name}", "prefect.resource.name": rollouts.name},
        payload={"rollout_id": rollout.rollout_id, "reasons": reasons},
    )
    return done


@task(cache_policy=NO_CACHE)
def report(cfg: PipelineConfig, analysis: RolloutAnalysis, drift: list[DriftCheck]) -> str:
    """The MLflow run of this analysis, with its HTML report; returns the run id."""
    low, high = analysis.brier.last()
    with MlflowTracker(cfg.tracking, run_name=f"rollout-{analysis.rollout_id}") as tracker, tempfile.TemporaryDirectory() as folder:
        tracker.set_tags({"crosssim.rollout_id": analysis.rollout_id, "crosssim.rollout_decision": analysis.decision,
                          "crosssim.challenger": analysis.challenger, "crosssim.champion": analysis.champion})  # fmt: skip
        tracker.log_metrics({"rollout.labelled": analysis.labelled, "rollout.pending": analysis.pending,
                             "rollout.conflicts": analysis.conflicts, "rollout.brier_gain_low": low,
                             "rollout.brier_gain_high": high, "rollout.decision": DECISION_CODES[analysis.decision]})  # fmt: skip
        tracker.log_metrics({"rollout.drift_alarms": sum(check.alarm for check in drift)})
        tracker.log_artifact(render_report(analysis, Path(folder) / "rollout-report.html", drift), "rollout")
        return tracker.run_id


@task(cache_policy=NO_CACHE)
def decide(rollouts: RolloutActions, analysis: RolloutAnalysis) -> Decision | Rollout:
    return rollouts.act_on(analysis.decision, analysis.reasons, "rollout analysis flow")


@flow(name="crosssim-rollout-analysis", log_prints=True)
def rollout_analysis(config_path: str | None = None, overrides: list[str] | None = None) -> dict:
    """Analyse the running rollout of ``registry.model_name`` (nothing to do when none runs)."""
    cfg = load_config(Path(config_path) if config_path else None, overrides or [])
    logger = get_run_logger()
    rollouts = rollout_actions(cfg)
    rollout = rollouts.active()
    if rollout is None:
        logger.info("%s: no rollout is running", rollouts.name)
        return {"rollout_id": None, "decision": None}
    analysis = analyse(cfg, rollout)
    drift = check_drift(cfg, rollouts, rollout)
    alarms = [check for check in drift if check.alarm]
    alarmed = raise_alarm(rollouts, rollout, alarms) if alarms else None
    run_id = report(cfg, analysis, drift)
    outcome = decide(rollouts, analysis)
    carried_out = None if isinstance(outcome, Rollout) else f"{outcome.action} of v{outcome.version}"
    markdown = "\n".join([
        f"# {rollout.describe()}",
        f"**{analysis.decision}**" + (f" — carried out: {carried_out}" if carried_out else ""),
        *(f"- {reason}" for reason in analysis.reasons),
        *(f"- **drift alarm** ({alarmed}): {reason}" for check in alarms for reason in check.reasons),
        f"\n{analysis.labelled} labelled, {analysis.pending} pending; report: MLflow run {run_id}, artifact "
        "rollout/rollout-report.html",
    ])  # fmt: skip
    create_markdown_artifact(key="rollout-analysis", markdown=markdown, description="Rollout analysis")
    logger.info("%s: %s (%s)", rollout.describe(), analysis.decision, "; ".join(analysis.reasons))
    return {"rollout_id": rollout.rollout_id, "decision": analysis.decision, "mlflow_run_id": run_id,
            "carried_out": carried_out, "labelled": analysis.labelled, "drift_alarms": [r for c in alarms for r in c.reasons],
            "drift_checks": len(drift)}  # fmt: skip
