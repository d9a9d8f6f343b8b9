"""Prefect 3 continuous-learning flow: one site's weekly cycle — the running rollout's analysis → export of the
matured reads → ingest → warm-start retrain → register challenger → shadow rollout.

The steps are pipeline.loop.cycle's (which says why a cycle killed anywhere is finished by the next run); this
module makes them tasks. The ingest is the ingest flow, as a subflow (its checks, DVC commit and quarantine), with
``ingest.retrain_after`` off: the loop retrains from the champion, not from scratch. The analysis is the
rollout-analysis flow, as a subflow, so under ``rollout.policy: auto`` last week's challenger is promoted or rolled
back before this week's is trained. Served as ``crosssim-continuous-learning/<site>`` on ``loop.cycle_cron``
(flows/deployments.py).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.ingest import ingest
from flows.retrain import _flow_run_id
from flows.rollout import rollout_analysis
from pipeline.config import PipelineConfig, load_config
from pipeline.errors import DataValidationError
from pipeline.loop import cycle
from pipeline.loop.cycle import CycleResult
from pipeline.loop.retrain import WarmStartResult
from pipeline.retrain import sites as retrain_sites
from pipeline.retrain.promotion import Registration
from pipeline.serving.ledger import opened_ledger
from pipeline.tracking import MlflowTracker, run_context_tags


@task(cache_policy=NO_CACHE)
def export_reads(cfg: PipelineConfig, site: str) -> tuple[int, str]:
    with opened_ledger(cfg.serve, os.environ) as ledger:
        return cycle.export_reads(cfg, ledger, site)


@task(cache_policy=NO_CACHE)
def retrain_site(cfg: PipelineConfig, site: str, seed: int) -> tuple[WarmStartResult | None, object, str]:
    return cycle.retrain_site(cfg, site, seed)


@task(cache_policy=NO_CACHE)
def prepare_gate_sites(cfg: PipelineConfig) -> None:
    cycle.prepare_gate_sites(cfg)


@task(cache_policy=NO_CACHE)
def register(cfg, tracker, made, champion, site: str, data_version: str, provenance: dict[str, str]) -> Registration:
    return cycle.register_loop_challenger(cfg, tracker, made, champion, site, data_version, provenance)


@task(cache_policy=NO_CACHE)
def start_shadow(cfg: PipelineConfig, site: str) -> str:
    return cycle.start_shadow(cfg, site)


def _ingest_waiting(cfg: PipelineConfig, site: str, config_path: str | None, overrides: list[str]) -> list[str]:
    """Each waiting batch through the ingest flow; filed as ingested or rejected."""
    logger = get_run_logger()
    done = []
    for batch in cycle.waiting_batches(cfg, site):
        new_site = not cycle.site_folder(cfg, site).is_dir()
        try:
            ingest(site, str(batch), config_path, [*overrides, "ingest.retrain_after=false"], new_site=new_site)
        except DataValidationError as exc:
            logger.warning("%s: rejected (%s); filed in %s", batch.name, exc, cycle.file_batch(batch, cycle.REJECTED))
            continue
        done.append(str(cycle.file_batch(batch, cycle.INGESTED)))
    return done


@flow(name="crosssim-continuous-learning", log_prints=True)
def continuous_learning(site: str, config_path: str | None = None, overrides: list[str] | None = None) -> CycleResult:
    """One weekly learning-loop cycle for ``site`` (pipeline.loop.cycle)."""
    overrides = list(overrides or [])
    cfg = load_config(Path(config_path) if config_path else None, overrides)
    logger = get_run_logger()
    analysed = rollout_analysis(config_path, overrides)
    if analysed.rollout_id:
        logger.info("rollout %s: %s", analysed.rollout_id, analysed.carried_out or analysed.decision)
    exported, said = export_reads(cfg, site)
    logger.info("export: %s", said)
    ingested = _ingest_waiting(cfg, site, config_path, overrides)
    data_version = cycle.site_data_version(cfg, site)
    common = {"site": site, "exported": exported, "ingested": ingested, "data_version": data_version}
    idle = cycle.without_retrain(cfg, site, exported, ingested, said)
    if idle is not None:
        result = CycleResult(status=idle[0], reason=idle[1], rollout=start_shadow(cfg, site), **common)
    else:
        made, champion, why = retrain_site(cfg, site, cfg.seed)
        if made is None:
            result = CycleResult(status="skipped", reason=why, **common)
        else:
            in_run = cfg.in_run_folder(retrain_sites.run_folder(cfg.runs.dir, _flow_run_id() or uuid.uuid4().hex)[0])
            prepare_gate_sites(in_run)
            with MlflowTracker(cfg.tracking, run_name=f"loop-{site}") as tracker:
                cycle.log_retrain(tracker, cfg, made, site, data_version)
                provenance = {"git_commit": run_context_tags().get("mlflow.source.git.commit", ""),
                              "prefect_flow_run_id": _flow_run_id() or "", "mlflow_run_id": tracker.run_id}  # fmt: skip
                registered = register(in_run, tracker, made, champion, site, data_version, provenance)
            result = CycleResult(
                status="retrained",
                reason=f"v{registered.version} from champion v{champion.version}: gate "
                f"{'passed' if registered.gate_passed else 'failed'} ({registered.decision})",
                reads=made.labelled + made.calibrated_on, version=registered.version,
                gate_passed=registered.gate_passed, rollout=start_shadow(cfg, site), retrain_seconds=made.seconds,
                **common,
            )  # fmt: skip
    create_markdown_artifact(
        key=f"loop-{_slug(site)}", markdown=result.markdown(), description=f"Learning loop at {site}"
    )
    logger.info("%s: %s — %s", site, result.status, result.reason)
    return result


def _slug(site: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in site.lower())
