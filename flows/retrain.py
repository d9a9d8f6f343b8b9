"""Prefect 3 retraining flow: validate → prepare → train → evaluate → CrossSim adapt, tracked in MLflow.

Runs in Prefect's local ephemeral mode unless PREFECT_API_URL points at a server.
One MLflow run spans the flow: a blocked validation leaves a FAILED run holding the
validation reports and no model. Each flow run works in its own folder under ``runs.dir``, so runs
started together (a schedule overlapping a manual run) never train, score or register each other's files.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE, CacheKeyFnPolicy
from prefect.context import get_run_context
from prefect.locking.filesystem import FileSystemLockManager
from prefect.settings import PREFECT_HOME

from flows import data_steps, model_steps, promotion
from pipeline.config import PipelineConfig, load_config
from pipeline.crosssim.model import load_model
from pipeline.data.exclusions import ReadReport
from pipeline.data.prepare import content_key
from pipeline.errors import ConfigError, DataValidationError
from pipeline.evaluation import format_with_interval, metrics_table_markdown
from pipeline.rollout.actions import rollout_actions
from pipeline.tracking import MlflowTracker, run_context_tags
from pipeline.validation import ValidationReport, compute_image_facts
from pipeline.validation.facts import FACTS_FORMAT


@task(retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def read_site(cfg: PipelineConfig, site: str) -> tuple[pd.DataFrame, ReadReport]:
    return data_steps.load_site(cfg, site)


def _facts_cache_key(context, parameters) -> str:
    # Keyed on the bytes of every image and the manifest rows, not on object identity.
    return f"facts{FACTS_FORMAT}-{content_key(parameters['manifest'], 0)}"


# Serializable: a run that computes an entry holds its lock until the result file is complete, and a
# concurrent run with the same images waits for it instead of reading a half-written file.
_FACTS_CACHE = CacheKeyFnPolicy(cache_key_fn=_facts_cache_key).configure(
    isolation_level="SERIALIZABLE", lock_manager=FileSystemLockManager(PREFECT_HOME.value() / "locks")
)


@task(cache_policy=_FACTS_CACHE, cache_expiration=timedelta(days=30), persist_result=True)
def image_facts(manifest: pd.DataFrame) -> pd.DataFrame:
    return compute_image_facts(manifest)


@task(cache_policy=NO_CACHE)
def validate_site(
    cfg: PipelineConfig, site: str, manifest: pd.DataFrame, facts: pd.DataFrame, read: ReadReport
) -> tuple[pd.DataFrame, ValidationReport]:
    return data_steps.validate_site(cfg, site, manifest, facts, read)


@task(retries=1, cache_policy=NO_CACHE)
def prepare_site(cfg: PipelineConfig, site: str, manifest: pd.DataFrame) -> Path:
    return data_steps.prepare_site(cfg, site, manifest)


@task(cache_policy=NO_CACHE)
def train(cfg: PipelineConfig, tracker: MlflowTracker):
    return model_steps.train_step(cfg, tracker)


@task(cache_policy=NO_CACHE)
def evaluate(cfg: PipelineConfig, model_path: Path) -> dict:
    return model_steps.evaluate_step(cfg, model_path)


@task(cache_policy=NO_CACHE)
def adapt(cfg: PipelineConfig, model_path: Path, tracker: MlflowTracker):
    return model_steps.adapt_step(cfg, model_path, tracker)


@task(cache_policy=NO_CACHE)
def register(cfg: PipelineConfig, tracker: MlflowTracker, run: dict, data: dict, provenance: dict) -> dict:
    return promotion.register_run(cfg, tracker, run, data, provenance)


@task(cache_policy=NO_CACHE)
def start_rollout(cfg: PipelineConfig, version: str) -> str:
    _, said = rollout_actions(cfg).auto_start(version, "retrain flow")
    get_run_logger().info("rollout.auto_start: %s", said)
    return said


@task(cache_policy=NO_CACHE)
def evaluate_adaptation(cfg: PipelineConfig, model_path: Path, result_dir: Path) -> dict:
    return model_steps.evaluate_adaptation_step(cfg, model_path, result_dir)


def _validation_gate(reports: dict[str, ValidationReport], tracker: MlflowTracker) -> None:
    for site, report in reports.items():
        tracker.log_artifacts(report.report_json_path.parent, artifact_path=f"validation/{site}")
        if report.exclusions:  # what reading or de-duplication left out, by reason
            tracker.log_metrics({f"excluded.{site}.{e.reason}": e.count for e in report.exclusions})
        for failure in report.warnings:
            get_run_logger().warning("%s: %s: %s", site, failure.rule, failure.message)
    blocking = [report for report in reports.values() if not report.success]
    if blocking:
        summary = "\n\n".join(report.summary() for report in blocking)
        raise DataValidationError(f"data validation failed; training did not start.\n{summary}")


def _new_run_folder(runs_dir: Path) -> Path:
    """A folder no other run uses: concurrent runs (a schedule overlapping a manual run) cannot mix files."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    run_dir = runs_dir / f"{stamp}-{(_flow_run_id() or uuid.uuid4().hex)[:8]}"
    run_dir.mkdir(parents=True, exist_ok=False)
    return run_dir


def _flow_run_id() -> str | None:
    try:
        return str(get_run_context().flow_run.id)
    except Exception:  # outside a Prefect run context (direct call of .fn)
        return None


@flow(name="crosssim-retrain", log_prints=True)
def retrain(config_path: str | None = None, overrides: list[str] | None = None) -> dict:
    """Retrain on the configured source dataset and evaluate on it and every external site."""
    cfg = load_config(Path(config_path) if config_path else None, overrides or [])
    if cfg.train.resume:
        raise ConfigError(
            "train.resume: a flow run trains in a new run folder, so there is nothing to resume; "
            "resume an interrupted training with `crosssim train --resume`"
        )
    run_dir = _new_run_folder(cfg.runs.dir)
    cfg = cfg.in_run_folder(run_dir)
    logger = get_run_logger()
    logger.info("run folder: %s", run_dir)
    manifests = {site: read_site(cfg, site) for site in data_steps.sites(cfg)}
    with MlflowTracker(cfg.tracking, run_name="retrain") as tracker:
        versions = data_steps.data_versions(cfg)
        tags = {f"data_version.{site}": v for site, v in versions.items()}
        tracker.set_tags(tags | {"prefect_flow_run_id": _flow_run_id() or "", "run_folder": str(run_dir)})
        tracker.log_params(cfg.model_dump(mode="json"))
        checked = {
            site: validate_site(cfg, site, manifest, image_facts(manifest), read)
            for site, (manifest, read) in manifests.items()
        }
        _validation_gate({site: report for site, (_, report) in checked.items()}, tracker)
        for site, (manifest, _) in checked.items():
            prepare_site(cfg, site, manifest)
        trained = train(cfg, tracker)
        tracker.log_artifact(trained.summary_path, artifact_path="train")
        evaluation = evaluate(cfg, trained.model_path)
        tracker.log_metrics(_flat_metrics(evaluation))
        tracker.log_artifacts(cfg.evaluate.output_dir, artifact_path="eval")
        model, example = model_steps.serving_model(cfg, trained.model_path)
        model_uri = tracker.log_model(model, name="model", input_example=example)
        markdown = _summary_markdown(cfg, tracker, trained, evaluation, metrics_table_markdown(evaluation["sets"]), model_uri)
        summary = {
            "mlflow_run_id": tracker.run_id,
            "mlflow_run_url": tracker.run_url,
            "model_uri": model_uri,
            "threshold": evaluation["threshold"],
            "sets": evaluation["sets"],
            "outputs": str(run_dir),
        }
        if cfg.crosssim.enabled:
            summary["crosssim"] = _crosssim(cfg, trained.model_path, tracker)
            markdown += "\n\n" + _crosssim_markdown(summary["crosssim"])
        if cfg.registry.enabled:
            data = {site: {"version": versions[site], "images": len(checked[site][0])} for site in checked}
            provenance = {
                "git_commit": run_context_tags().get("mlflow.source.git.commit", ""),
                "prefect_flow_run_id": _flow_run_id() or "",
                "mlflow_run_id": tracker.run_id,
            }
            summary["registry"] = register(cfg, tracker, summary, data, provenance)
            markdown += "\n\n" + _registry_markdown(summary["registry"])
            if cfg.rollout.auto_start:
                summary["rollout"] = start_rollout(cfg, summary["registry"]["version"])
                markdown += f"\n\nRollout (rollout.auto_start): {summary['rollout']}"
        create_markdown_artifact(key="retrain-summary", markdown=markdown, description="CrossSim retraining run")
        logger.info("MLflow run %s: %s", tracker.run_id, tracker.run_url)
        return summary


def _crosssim(cfg: PipelineConfig, model_path: Path, tracker: MlflowTracker) -> dict:
    """Adapt, score source vs adapted vs student, log the adapted models; a diverged run raises (no model)."""
    result = adapt(cfg, model_path, tracker)
    scores = evaluate_adaptation(cfg, model_path, result.adapted_path.parent)
    tracker.log_artifacts(result.adapted_path.parent, artifact_path="crosssim")
    for model_name, scored in scores.items():
        for set_name, values in scored["sets"].items():
            prefix = f"crosssim.{model_name}.{set_name.replace('/', '_')}"
            point = values["at_threshold"]
            tracker.log_metrics({f"{prefix}.{key}": point[key] for key in ("auc", "accuracy", "sensitivity", "specificity")})
    uris = {}
    for name, path in (("adapted_model", result.adapted_path), ("student_model", result.student_path)):
        if path is not None:
            served, example = model_steps.serving_model_from(load_model(path), cfg.data.image_size)
            uris[name] = tracker.log_model(served, name=name, input_example=example)
    return {"models": uris, "scores": scores, "diagnostics": result.diagnostics_path, "gap": result.diagnostics["domain_gap"]}


def _crosssim_markdown(crosssim: dict) -> str:
    lines = ["## CrossSim adaptation", "", "| model | set | n | AUC (95% CI) | sensitivity | specificity |", "|---|---|---|---|---|---|"]
    for model_name, scored in crosssim["scores"].items():
        for set_name, values in scored["sets"].items():
            point = values["at_threshold"]
            auc = format_with_interval(point["auc"], point["ci"].get("auc"))
            lines.append(
                f"| {model_name} | {set_name} | {values['n']} | {auc} | {point['sensitivity']:.3f} | {point['specificity']:.3f} |"
            )
    gap = crosssim["gap"]
    lines += [
        "",
        f"Proxy A-distance source↔target: {gap['before']['proxy_a_distance']:.3f} before, "
        f"{gap['after']['proxy_a_distance']:.3f} after adaptation.",
        *(f"- `{name}`: `{uri}`" for name, uri in crosssim["models"].items()),
    ]
    return "\n".join(lines)


def _registry_markdown(registered: dict) -> str:
    verdict = "passed" if registered["gate_passed"] else "failed"
    aliases = ", ".join(f"{alias} → v{version}" for alias, version in sorted(registered["aliases"].items()))
    return "\n".join(
        [
            "## Registry",
            f"- Registered `{registered['name']}` v{registered['version']} as challenger; promotion gate {verdict}",
            f"- Last action: {registered['decision']}; aliases now: {aliases or 'none'}",
            "- Review: `crosssim registry review`, then `crosssim registry approve|reject --reviewer NAME --reason TEXT`",
        ]
    )


def _flat_metrics(evaluation: dict) -> dict[str, float]:
    metrics = {"threshold": evaluation["threshold"]}
    for name, result in evaluation["sets"].items():
        prefix = name.replace("/", "_")
        for key, value in result["at_threshold"].items():
            if isinstance(value, (int, float)):
                metrics[f"{prefix}.{key}"] = float(value)
    return metrics


def _summary_markdown(cfg: PipelineConfig, tracker, trained, evaluation: dict, table: str, model_uri: str) -> str:
    return "\n".join(
        [
            "# CrossSim retraining run",
            f"- MLflow run: [{tracker.run_id}]({tracker.run_url})",
            f"- Model: `{model_uri}` ({cfg.train.backbone}, {cfg.data.image_size}×{cfg.data.image_size})",
            f"- Epochs run: {trained.state.epoch}, best epoch {trained.state.best_epoch} "
            f"(val AUC {trained.state.best_val_auc:.4f})",
            f"- Decision threshold {evaluation['threshold']:.4f}, chosen on `{cfg.data.source}/val`",
            "",
            table,
        ]
    )
