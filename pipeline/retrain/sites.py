"""The data stages (read, validate, prepare each site) against a run's output layout: CLI, DVC and Prefect.

Kept apart from the model stages so that ``crosssim validate`` and ``crosssim prepare`` (and DVC, which runs
each stage in its own process) do not import torch and MLflow, and ``prepare`` not Great Expectations either
(validation imports it when it runs):

    outputs/validation/<site>/   validation.json + GX Data Docs + manifest.csv (the accepted rows)
    outputs/prepared/<site>/     images.npy + manifest.csv (hard links into the content-keyed cache)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from pipeline.config import DATA_DIR_ENV, PipelineConfig
from pipeline.data.exclusions import ReadReport
from pipeline.data.manifest import load_manifest, save_manifest
from pipeline.data.prepare import prepare_dataset
from pipeline.data.readers import read_dataset_with_report
from pipeline.data.salt import resolve_salt
from pipeline.data.splits import assign_splits, subsample
from pipeline.errors import DatasetError, DataValidationError
from pipeline.versioning import dataset_version

if TYPE_CHECKING:
    from pipeline.validation import ValidationReport

VALIDATED_MANIFEST = "manifest.csv"  # next to validation.json: the rows the rules accepted


def sites(cfg: PipelineConfig) -> list[str]:
    return [cfg.data.source, *cfg.data.external]


def site_dir(cfg: PipelineConfig, site: str) -> Path:
    root = cfg.data.resolved_root()
    if not root.is_dir():
        raise DatasetError(
            f"data folder {root} does not exist. Set {DATA_DIR_ENV} (or data.root in params.yaml) to the folder "
            f"holding one sub-folder per dataset, e.g. {DATA_DIR_ENV}=../shared/data (see README, 'Data')."
        )
    return root / site


def dicom_salt(cfg: PipelineConfig, site: str) -> str | None:
    """The site's secret DICOM salt from the environment (only a DICOM folder needs one)."""
    return resolve_salt(site, cfg.ingest, os.environ)


def read_split(cfg: PipelineConfig, dataset_dir: Path) -> tuple[pd.DataFrame, ReadReport]:
    """Read a dataset folder (and what reading left out), assign patient-disjoint splits."""
    manifest, read = read_dataset_with_report(dataset_dir, dicom_salt=dicom_salt(cfg, dataset_dir.name))
    return assign_splits(manifest, cfg.data.val_fraction, cfg.data.test_fraction, cfg.seed), read


def load_site(cfg: PipelineConfig, site: str) -> tuple[pd.DataFrame, ReadReport]:
    """``read_split`` of the site's folder, subsampled if configured."""
    manifest, read = read_split(cfg, site_dir(cfg, site))
    return subsample(manifest, cfg.data.max_images_per_class, cfg.seed), read


def validate_site(
    cfg: PipelineConfig,
    site: str,
    manifest: pd.DataFrame,
    facts: pd.DataFrame | None = None,
    read: ReadReport | None = None,
) -> tuple[pd.DataFrame, ValidationReport]:
    """Run the data-quality suite; returns the manifest later stages use (harmless copies dropped).

    What reading left out (``read``) goes into the report; a blocking exclusion fails it.
    The caller decides whether blocking failures stop the run.
    """
    from pipeline.validation import check_dataset, compute_image_facts  # Great Expectations: ~10 s to import

    if facts is None:
        facts = compute_image_facts(manifest)
    report_dir = cfg.validation.report_dir / site
    checked, report = check_dataset(manifest, facts, cfg.validation, report_dir, read=read)
    save_manifest(checked, report_dir / VALIDATED_MANIFEST)
    return checked, report


def validated_manifest(cfg: PipelineConfig, site: str) -> pd.DataFrame:
    """The manifest ``crosssim validate`` accepted for ``site`` (how DVC's prepare stage gets its input)."""
    report_dir = cfg.validation.report_dir / site
    report_path = report_dir / "validation.json"
    if not report_path.is_file():
        raise DatasetError(f"{site}: no validation report at {report_path}; run `crosssim validate` first")
    if not json.loads(report_path.read_text())["success"]:
        raise DataValidationError(f"{site}: data validation failed; see {report_path}", str(report_path))
    return load_manifest(report_dir / VALIDATED_MANIFEST)


def publish(entry: Path, destination: Path) -> None:
    """Expose a cache entry's files at a stable path (hard links: no copy of the pixels or weights)."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}-", dir=destination.parent))
    for file in entry.iterdir():
        try:
            os.link(file, staging / file.name)
        except OSError:  # another filesystem: copy instead
            shutil.copy2(file, staging / file.name)
    shutil.rmtree(destination, ignore_errors=True)
    os.replace(staging, destination)


def prepare_site(cfg: PipelineConfig, site: str, manifest: pd.DataFrame) -> Path:
    entry = prepare_dataset(manifest, cfg.data.preprocessing(), cfg.data.cache_dir)
    destination = cfg.data.prepared_site(site)
    publish(entry.directory, destination)
    return destination


def data_versions(cfg: PipelineConfig) -> dict[str, str]:
    """DVC md5 of each input dataset folder: the data version recorded with a run."""
    return {site: dataset_version(site_dir(cfg, site)) for site in sites(cfg)}


def run_folder(runs_dir: Path, run_id: str) -> tuple[Path, bool]:
    """(the run's folder, whether it is a rerun's). A folder no other run uses, so concurrent runs (a schedule
    overlapping a manual run) cannot mix files; a rerun of the same flow run (Prefect's retry of a crashed or
    failed run keeps its id) gets its earlier folder back, with the training checkpoint it left."""
    earlier = sorted(runs_dir.glob(f"*-{run_id[:8]}")) if runs_dir.is_dir() else []
    if earlier:
        return earlier[-1], True
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    run_dir = runs_dir / f"{stamp}-{run_id[:8]}"
    run_dir.mkdir(parents=True, exist_ok=False)
    return run_dir, False


def resuming(cfg: PipelineConfig) -> PipelineConfig:
    """A rerun's configuration: training continues from the checkpoint the earlier attempt left in the run folder
    (when it got that far); ``train.resume`` still refuses a checkpoint of another configuration."""
    from pipeline.training.handlers import LAST_CHECKPOINT  # torch: not loaded by the commands that only validate

    if not (cfg.train.output_dir / LAST_CHECKPOINT).is_file():
        return cfg
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"resume": True})})


def gate_validation(reports: dict[str, ValidationReport], tracker, warn: Callable[[str], object]) -> None:
    """Each site's validation report and exclusions into the run's tracker, its warnings to ``warn``; a blocking
    failure anywhere raises DataValidationError (training does not start)."""
    for site, report in reports.items():
        tracker.log_artifacts(report.report_json_path.parent, artifact_path=f"validation/{site}")
        if report.exclusions:  # what reading or de-duplication left out, by reason
            tracker.log_metrics({f"excluded.{site}.{e.reason}": e.count for e in report.exclusions})
        for failure in report.warnings:
            warn(f"{site}: {failure.rule}: {failure.message}")
    blocking = [report for report in reports.values() if not report.success]
    if blocking:
        summary = "\n\n".join(report.summary() for report in blocking)
        raise DataValidationError(f"data validation failed; training did not start.\n{summary}")
