"""One analysis of the running rollout, step by step: outcomes → analysis, drift checks, the MLflow run with its
HTML report, the decision, and the summary. ``flows/rollout.py`` makes each step a Prefect task (the drift alarm's
event is Prefect's, so it stays there)."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import PipelineConfig
from pipeline.loop.curve import LOOP_SITE_TAG, LearningPoint, site_learning_curve
from pipeline.registry.store import ModelRegistry
from pipeline.rollout.actions import RolloutActions
from pipeline.rollout.analysis import RolloutAnalysis, analyse_rollout
from pipeline.rollout.monitor import DriftCheck, drift_checks, model_reference
from pipeline.rollout.report import render_report
from pipeline.rollout.state import Rollout
from pipeline.serving.image_store import ImageStore
from pipeline.serving.ledger import opened_ledger
from pipeline.tracking import MlflowTracker, resolve_tracking_uri

DECISION_CODES = {"continue": 0, "promote": 1, "rollback": -1}


def analyse(cfg: PipelineConfig, rollout: Rollout) -> RolloutAnalysis:
    """The rollout's matured outcomes from the serving ledger, analysed."""
    with opened_ledger(cfg.serve, os.environ) as ledger:
        return analyse_rollout(ledger, rollout, cfg.rollout)


def check_drift(cfg: PipelineConfig, rollouts: RolloutActions, rollout: Rollout) -> list[DriftCheck]:
    """Input and output drift of both models at every site, against each model's registered reference."""
    registry = rollouts.actions.registry
    versions = {"champion": rollout.champion, "challenger": rollout.challenger}
    references = {model: ref for model, v in versions.items() if (ref := model_reference(registry, rollouts.name, v))}
    images = ImageStore(cfg.serve.image_store, cfg.serve.image_retention_days)
    with opened_ledger(cfg.serve, os.environ) as ledger:
        return drift_checks(ledger, images, rollout, references, cfg.rollout)


def pause_on_alarm(rollouts: RolloutActions, rollout: Rollout, alarms: list[DriftCheck]) -> bool:
    """A canary goes back to shadow mode (audited); returns whether it did."""
    if rollout.mode != "canary":
        return False
    rollouts.pause("drift monitor", "; ".join(reason for check in alarms for reason in check.reasons))
    return True


def log_analysis(cfg: PipelineConfig, analysis: RolloutAnalysis, drift: list[DriftCheck]) -> str:
    """The analysis as its own MLflow run: decision, bounds and counts as metrics, the HTML report as an artifact;
    returns the run id."""
    low, high = analysis.brier.last()
    with MlflowTracker(cfg.tracking, run_name=f"rollout-{analysis.rollout_id}") as tracker, tempfile.TemporaryDirectory() as folder:
        tracker.set_tags({"crosssim.rollout_id": analysis.rollout_id, "crosssim.rollout_decision": analysis.decision,
                          "crosssim.challenger": analysis.challenger, "crosssim.champion": analysis.champion})  # fmt: skip
        tracker.log_metrics({"rollout.labelled": analysis.labelled, "rollout.pending": analysis.pending,
                             "rollout.conflicts": analysis.conflicts, "rollout.brier_gain_low": low,
                             "rollout.brier_gain_high": high, "rollout.decision": DECISION_CODES[analysis.decision],
                             "rollout.drift_alarms": sum(check.alarm for check in drift)})  # fmt: skip
        curve = _site_curve(cfg, analysis.challenger)
        tracker.log_artifact(render_report(analysis, Path(folder) / "rollout-report.html", drift, curve), "rollout")
        return tracker.run_id


def _site_curve(cfg: PipelineConfig, challenger: str) -> list[LearningPoint]:
    """The learning curve of the challenger's site, when the challenger is a loop version."""
    registry = ModelRegistry(resolve_tracking_uri(cfg.tracking))
    site = registry.version(cfg.registry.model_name, challenger).tags.get(LOOP_SITE_TAG)
    return site_learning_curve(registry, cfg.registry.model_name, site) if site else []


@dataclass(frozen=True)
class AnalysisSummary:
    """What one analysis found and did; ``rollout_id`` None: no rollout was running."""

    rollout_id: str | None
    description: str = ""
    decision: str | None = None
    reasons: list[str] = field(default_factory=list)
    carried_out: str | None = None  # "approve of v2", "rollback of v2"; None: continue, or policy review
    labelled: int = 0
    pending: int = 0
    mlflow_run_id: str | None = None
    drift_checks: int = 0
    drift_alarms: list[str] = field(default_factory=list)
    alarm_action: str | None = None  # what the alarm did

    def markdown(self) -> str:
        return "\n".join([
            f"# {self.description}",
            f"**{self.decision}**" + (f" — carried out: {self.carried_out}" if self.carried_out else ""),
            *(f"- {reason}" for reason in self.reasons),
            *(f"- **drift alarm** ({self.alarm_action}): {reason}" for reason in self.drift_alarms),
            f"\n{self.labelled} labelled, {self.pending} pending; report: MLflow run {self.mlflow_run_id}, artifact "
            "rollout/rollout-report.html",
        ])  # fmt: skip
