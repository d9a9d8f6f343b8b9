"""What a retraining run returns (to the CLI, an ingest flow, a Prefect caller), and its markdown rendering."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.evaluation import ScoredModel, metrics_table_markdown
from pipeline.retrain.adaptation import AdaptationOutcome
from pipeline.retrain.promotion import Registration
from pipeline.training import TrainState

CROSSSIM_METRICS = ("auc", "sensitivity", "specificity")


@dataclass(frozen=True)
class RetrainSummary:
    mlflow_run_id: str
    mlflow_run_url: str
    outputs: Path  # the run folder
    model: str  # "<backbone>, <size>×<size>"
    model_uri: str  # the source model, as logged
    training: TrainState
    evaluation: ScoredModel  # the source model on source test and every external site
    crosssim: AdaptationOutcome | None = None
    registry: Registration | None = None
    rollout: str | None = None  # what rollout.auto_start did

    def markdown(self) -> str:
        """The run's summary as a Prefect markdown artifact shows it."""
        state = self.training
        lines = [
            "# CrossSim retraining run",
            f"- MLflow run: [{self.mlflow_run_id}]({self.mlflow_run_url})",
            f"- Model: `{self.model_uri}` ({self.model})",
            f"- Epochs run: {state.epoch}, best epoch {state.best_epoch} (val AUC {state.best_val_auc:.4f})",
            f"- Decision threshold {self.evaluation.threshold:.4f}, chosen on `{self.evaluation.threshold_chosen_on}`",
            "",
            metrics_table_markdown(self.evaluation.sets),
        ]
        if self.crosssim is not None:
            lines += ["", crosssim_markdown(self.crosssim)]
        if self.registry is not None:
            lines += ["", registry_markdown(self.registry)]
        if self.rollout is not None:
            lines += ["", f"Rollout (rollout.auto_start): {self.rollout}"]
        return "\n".join(lines)


def crosssim_markdown(outcome: AdaptationOutcome) -> str:
    lines = ["## CrossSim adaptation"]
    for model_name, scored in outcome.scores.items():
        lines += [
            "",
            f"### {model_name} model (threshold {scored.threshold:.3f}, chosen on `{scored.threshold_chosen_on}`)",
            "",
            metrics_table_markdown(scored.sets, CROSSSIM_METRICS),
        ]
    gap = outcome.gap
    lines += [
        "",
        f"Proxy A-distance source↔target: {gap.before.proxy_a_distance:.3f} before, {gap.after.proxy_a_distance:.3f} after adaptation.",
        *(f"- `{name}`: `{uri}`" for name, uri in outcome.model_uris.items()),
    ]
    return "\n".join(lines)


def registry_markdown(registered: Registration) -> str:
    verdict = "passed" if registered.gate_passed else "failed"
    aliases = ", ".join(f"{alias} → v{version}" for alias, version in sorted(registered.aliases.items()))
    return "\n".join(
        [
            "## Registry",
            f"- Registered `{registered.name}` v{registered.version} as challenger; promotion gate {verdict}",
            f"- Last action: {registered.decision}; aliases now: {aliases or 'none'}",
            "- Review: `crosssim registry review`, then `crosssim registry approve|reject --reviewer NAME --reason TEXT`",
        ]
    )
