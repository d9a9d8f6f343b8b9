"""Prefect 3 retraining flow: validate → prepare → [pretrain] → train → evaluate → CrossSim adapt → register, tracked
in MLflow (pretrain runs when train.pretrained_weights is ``pretrain``).

The stages are pipeline.retrain's; this module makes them tasks. Runs in Prefect's local ephemeral mode unless
PREFECT_API_URL points at a server. One MLflow run spans the flow: a blocked validation leaves a FAILED run holding
the validation reports and no model. Each flow run works in its own folder under ``runs.dir``, so runs started
together (a schedule overlapping a manual run) never train, score or register each other's files.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from pathlib import Path

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE, CacheKeyFnPolicy
from prefect.context import get_run_context
from prefect.locking.filesystem import FileSystemLockManager
from prefect.settings import PREFECT_HOME

from pipeline.config import PRETRAIN_WEIGHTS, PipelineConfig, load_config
from pipeline.crosssim.stage import CrossSimResult
from pipeline.data.exclusions import ReadReport
from pipeline.data.prepare import content_key
from pipeline.errors import ConfigError
from pipeline.evaluation import ScoredModel
from pipeline.pretrain.stage import PretrainResult
from pipeline.retrain import adaptation, pretraining, promotion, sites, source
from pipeline.retrain.adaptation import AdaptationOutcome
from pipeline.retrain.data import CrossSimData, crosssim_data
from pipeline.retrain.promotion import Registration
from pipeline.retrain.summary import RetrainSummary
from pipeline.rollout.actions import rollout_actions
from pipeline.tracking import MlflowTracker, run_context_tags
from pipeline.training import TrainResult
from pipeline.validation import ValidationReport, compute_image_facts
from pipeline.validation.facts import FACTS_FORMAT


@task(retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def read_site(cfg: PipelineConfig, site: str) -> tuple[pd.DataFrame, ReadReport]:
    return sites.load_site(cfg, site)


def _facts_cache_key(context, parameters) -> str:
    # Keyed on the bytes of every image and the manifest rows, not on object identity.
    return f"facts{FACTS_FORMAT}-{content_key(parameters['manifest'], None)}"


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
    return sites.validate_site(cfg, site, manifest, facts, read)


@task(retries=1, cache_policy=NO_CACHE)
def prepare_site(cfg: PipelineConfig, site: str, manifest: pd.DataFrame) -> Path:
    return sites.prepare_site(cfg, site, manifest)


@task(cache_policy=NO_CACHE)
def pretrain(cfg: PipelineConfig, tracker: MlflowTracker) -> PretrainResult:
    # not a Prefect cache: the stage's own content-keyed cache makes an unchanged configuration's rerun free
    result = pretraining.pretrain(cfg)
    pretraining.log_pretrain(tracker, result)
    if result.reused:
        get_run_logger().info("pretrain: reused the cached backbone %s", result.cache_key)
    return result


@task(cache_policy=NO_CACHE)
def train(cfg: PipelineConfig, tracker: MlflowTracker) -> TrainResult:
    return source.train_source(cfg, tracker)


@task(cache_policy=NO_CACHE)
def evaluate(cfg: PipelineConfig, model_path: Path) -> ScoredModel:
    return source.evaluate_source(cfg, model_path)


@task(cache_policy=NO_CACHE)
def log_source(cfg: PipelineConfig, tracker: MlflowTracker, trained: TrainResult, evaluation: ScoredModel) -> str:
    return source.log_source(cfg, tracker, trained, evaluation)


@task(cache_policy=NO_CACHE)
def adapt(cfg: PipelineConfig, model_path: Path, data: CrossSimData, tracker: MlflowTracker) -> CrossSimResult:
    return adaptation.adapt(cfg, model_path, data, tracker)


@task(cache_policy=NO_CACHE)
def score_adaptation(cfg: PipelineConfig, model_path: Path, result_dir: Path, data: CrossSimData) -> dict[str, ScoredModel]:
    return adaptation.score_adaptation(cfg, model_path, result_dir, data)


@task(cache_policy=NO_CACHE)
def log_adaptation(
    cfg: PipelineConfig, tracker: MlflowTracker, result: CrossSimResult, scores: dict[str, ScoredModel]
) -> AdaptationOutcome:
    return adaptation.log_adaptation(cfg, tracker, result, scores)


@task(cache_policy=NO_CACHE)
def register(
    cfg: PipelineConfig,
    tracker: MlflowTracker,
    model_uri: str,
    evaluation: ScoredModel,
    crosssim: AdaptationOutcome | None,
    data: dict,
    provenance: dict,
    shared: CrossSimData | None,
) -> Registration:
    return promotion.register_run(cfg, tracker, model_uri, evaluation, crosssim, data, provenance, shared)


@task(cache_policy=NO_CACHE)
def start_rollout(cfg: PipelineConfig, version: str) -> str:
    _, said = rollout_actions(cfg).auto_start(version, "retrain flow")
    get_run_logger().info("rollout.auto_start: %s", said)
    return said


def _flow_run_id() -> str | None:
    try:
        return str(get_run_context().flow_run.id)
    except Exception:  # outside a Prefect run context (direct call of .fn)
        return None


@flow(name="crosssim-retrain", log_prints=True)
def retrain(config_path: str | None = None, overrides: list[str] | None = None) -> RetrainSummary:
    """Retrain on the configured source dataset and evaluate on it and every external site."""
    cfg = load_config(Path(config_path) if config_path else None, overrides or [])
    if cfg.train.resume:
        raise ConfigError(
            "train.resume: a flow run trains in a new run folder, so there is nothing to resume; a retried flow run "
            "(`prefect flow-run retry ID`) resumes its training by itself, and `crosssim train --resume` resumes a "
            "training started with `crosssim train`"
        )
    run_dir, rerun = sites.run_folder(cfg.runs.dir, _flow_run_id() or uuid.uuid4().hex)
    cfg = cfg.in_run_folder(run_dir)
    logger = get_run_logger()
    logger.info("run folder: %s", run_dir)
    if rerun:
        cfg = sites.resuming(cfg)
        resumes = "training resumes from its checkpoint" if cfg.train.resume else "no checkpoint: training starts anew"
        logger.info("a rerun of this flow run: %s", resumes)
    manifests = {site: read_site(cfg, site) for site in sites.sites(cfg)}
    with MlflowTracker(cfg.tracking, run_name="retrain") as tracker:
        versions = sites.data_versions(cfg)
        tags = {f"data_version.{site}": v for site, v in versions.items()}
        tracker.set_tags(tags | {"prefect_flow_run_id": _flow_run_id() or "", "run_folder": str(run_dir)})
        tracker.log_params(cfg.model_dump(mode="json"))
        checked = {
            site: validate_site(cfg, site, manifest, image_facts(manifest), read)
            for site, (manifest, read) in manifests.items()
        }
        sites.gate_validation({site: report for site, (_, report) in checked.items()}, tracker, logger.warning)
        for site, (manifest, _) in checked.items():
            prepare_site(cfg, site, manifest)
        if cfg.train.pretrained_weights == PRETRAIN_WEIGHTS:
            pretrain(cfg, tracker)
        trained = train(cfg, tracker)
        evaluation = evaluate(cfg, trained.model_path)
        model_uri = log_source(cfg, tracker, trained, evaluation)
        shared = crosssim_data(cfg) if cfg.crosssim.enabled else None  # built once: adapt, score, gate, export
        crosssim = None
        if shared is not None:  # a diverged adaptation raises: no model
            result = adapt(cfg, trained.model_path, shared, tracker)
            scores = score_adaptation(cfg, trained.model_path, result.adapted_path.parent, shared)
            crosssim = log_adaptation(cfg, tracker, result, scores)
        registered, rollout = None, None
        if cfg.registry.enabled:
            data = {site: {"version": versions[site], "images": len(checked[site][0])} for site in checked}
            provenance = {
                "git_commit": run_context_tags().get("mlflow.source.git.commit", ""),
                "prefect_flow_run_id": _flow_run_id() or "",
                "mlflow_run_id": tracker.run_id,
            }
            registered = register(cfg, tracker, model_uri, evaluation, crosssim, data, provenance, shared)
            if cfg.rollout.auto_start:
                rollout = start_rollout(cfg, registered.version)
        summary = RetrainSummary(
            mlflow_run_id=tracker.run_id,
            mlflow_run_url=tracker.run_url,
            outputs=run_dir,
            model=f"{cfg.train.backbone}, {cfg.data.image_size}×{cfg.data.image_size}",
            model_uri=model_uri,
            training=trained.state,
            evaluation=evaluation,
            crosssim=crosssim,
            registry=registered,
            rollout=rollout,
        )
        create_markdown_artifact(key="retrain-summary", markdown=summary.markdown(), description="CrossSim retraining run")
        logger.info("MLflow run %s: %s", tracker.run_id, tracker.run_url)
        return summary
