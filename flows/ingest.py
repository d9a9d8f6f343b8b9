"""Prefect 3 ingest flow: a hospital's weekly batch → de-identify → check → commit to DVC, or quarantine;
an accepted batch then retrains (``ingest.retrain_after``): train → CrossSim → registry challenger.

The stages are pipeline.ingest's; this module only makes them tasks and leaves a markdown
artifact per batch. Run it once per complete batch (deployment ``crosssim-ingest/on-demand``, see
flows/deployments.py): a timer on a drop folder could pick up a half-copied export.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.retrain import retrain
from pipeline.config import load_config
from pipeline.errors import DataValidationError
from pipeline.ingest import BatchIngest, BatchReport, StagedBatch, resolve_salt


@task(cache_policy=NO_CACHE)
def stage(batch: BatchIngest) -> StagedBatch:
    return batch.stage()


@task(cache_policy=NO_CACHE)
def check(batch: BatchIngest, staged: StagedBatch) -> BatchReport:
    return batch.check(staged)


# A failed commit rolls itself back completely, so retrying it (a remote that hiccupped) is safe.
@task(retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE)
def commit(batch: BatchIngest, staged: StagedBatch, report: BatchReport) -> BatchReport:
    return batch.commit(staged, report)


@task(cache_policy=NO_CACHE)
def quarantine(batch: BatchIngest, staged: StagedBatch, report: BatchReport) -> BatchReport:
    return batch.quarantine(staged, report)


@flow(name="crosssim-ingest", log_prints=True)
def ingest(
    site: str, folder: str, config_path: str | None = None, overrides: list[str] | None = None, new_site: bool = False
) -> dict:
    """Ingest ``folder`` into ``site``; the flow fails (DataValidationError) when the batch is rejected.

    ``site`` must exist under ingest.data_dir (ConfigError otherwise); ``new_site=True`` creates it.
    """
    cfg = load_config(Path(config_path) if config_path else None, overrides or [])
    logger = get_run_logger()
    with BatchIngest(cfg, site, Path(folder), resolve_salt(site, cfg.ingest, os.environ), new_site) as batch:
        for message in batch.recovered:
            logger.warning(message)
        report = batch.previous()
        if report is None:
            staged = stage(batch)
            report = check(batch, staged)
            if report.status == "rejected":
                report = quarantine(batch, staged, report)
            elif report.status == "accepted":
                report = commit(batch, staged, report)
    create_markdown_artifact(
        key=f"ingest-{re.sub(r'[^a-z0-9-]', '-', site.lower())}",
        markdown=report.markdown(),
        description=f"CrossSim ingest of {folder} into {site}",
    )
    logger.info("batch %s: %s", report.batch_id, report.status)
    if report.status == "rejected":
        raise DataValidationError(f"batch {report.batch_id} rejected; quarantined in {report.location}")
    result = report.to_dict()
    if report.status == "accepted" and cfg.ingest.retrain_after:
        # a subflow: the new data version goes through train → CrossSim → registry as one traced run
        retrained = retrain(config_path, [*(overrides or []), f"data.root={cfg.ingest.data_dir}"])
        registered = asdict(retrained.registry) if retrained.registry else None
        result["retrain"] = {"mlflow_run_id": retrained.mlflow_run_id, "registry": registered, "rollout": retrained.rollout}
    return result
