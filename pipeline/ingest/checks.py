"""Checks of a staged batch: the pipeline's data-quality suite, then what only a new batch can break.

The suite (pipeline.validation, Great Expectations) runs on the batch as ``read_dataset`` reads
it, i.e. as training will; class balance is left out (a week's export may hold one class) and
``validation.min_images`` becomes ``ingest.min_batch_images``. Then, against the site's dataset:

- known_image (blocking): pixels the site already holds. When every image is known the batch
  is already in (re-sent, perhaps with a regenerated CSV): it is reported unchanged instead.
- name_conflict (blocking): a file name the site already uses.
- known_patient (blocking unless ``ingest.allow_known_patients``): the models trained so far
  split the site by patient; new images of a patient they trained on could land in a later
  test split and score the model on a patient it has seen.
- salt_changed (blocking): DICOM pseudonymised with another salt than the site's earlier
  batches, so one patient would get two pseudonyms and patient checks would miss them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from pipeline.config import PipelineConfig
from pipeline.data.readers import NIH_CSV, read_dataset
from pipeline.errors import ConfigError, DatasetError
from pipeline.ingest.batch import MAX_NAMED, StagedBatch
from pipeline.ingest.report import BatchReport
from pipeline.validation import compute_image_facts, validate_dataset
from pipeline.validation.report import Failure


@dataclass(frozen=True)
class SiteContents:
    """What the site's dataset already holds, for comparison with a batch."""

    files: dict[str, str]  # content hash → file name
    patients: frozenset[str]
    names: frozenset[str]  # every file name under images/, used or not

    @classmethod
    def read(cls, site_dir: Path, site: str) -> SiteContents:
        if not site_dir.exists():
            return cls({}, frozenset(), frozenset())
        if not (site_dir / NIH_CSV).is_file():
            raise ConfigError(
                f"{site_dir} is not in NIH's layout ({NIH_CSV} + images/): ingest only adds to sites in that layout"
            )
        manifest = read_dataset(site_dir, site=site)
        facts = compute_image_facts(manifest)
        files = {
            h: Path(p).name for h, p in zip(facts["content_hash"], manifest["path"], strict=True) if isinstance(h, str)
        }
        names = (
            frozenset(p.name for p in (site_dir / "images").glob("*"))
            if (site_dir / "images").is_dir()
            else frozenset()
        )
        return cls(files, frozenset(manifest["patient_id"]), names)


def check_batch(
    staged: StagedBatch, site_dir: Path, cfg: PipelineConfig, report_dir: Path, known_salts: set[str]
) -> BatchReport:
    """The verdict on a staged batch: rejected (blocking problems), unchanged, or accepted (to commit).

    Writes the suite's validation.json and Data Docs under ``report_dir``.
    """
    report = BatchReport(
        site=staged.site,
        batch_id=staged.batch_id,
        fingerprint=staged.fingerprint,
        source=str(staged.source),
        time=datetime.now(UTC).isoformat(timespec="seconds"),
        status="rejected",
        problems=list(staged.problems),
        counts=dict(staged.counts),
        salt_id=staged.salt_id,
    )
    if not staged.counts.get("staged_rows"):
        if not report.blocking:
            report.problems.append(Failure("empty_batch", "blocking", "no row is 'No Finding' or has 'Pneumonia'"))
        return report
    try:
        manifest = read_dataset(staged.folder, site=staged.site)
    except DatasetError as exc:
        report.problems.append(Failure("batch_unreadable", "blocking", str(exc)))
        return report
    facts = compute_image_facts(manifest)
    site = SiteContents.read(site_dir, staged.site)
    hashes = facts["content_hash"]
    report.content_digest = hashlib.sha256("".join(sorted(hashes.dropna())).encode()).hexdigest()
    patients = set(manifest["patient_id"])
    report.counts.update(
        images=len(manifest),
        pneumonia=int((manifest["label"] == 1).sum()),
        normal=int((manifest["label"] == 0).sum()),
        patients=len(patients),
        new_patients=len(patients - site.patients),
    )
    known = hashes.isin(site.files.keys())
    if known.all() and not report.blocking:
        report.status = "unchanged"
        report.note = f"every image of the batch is already in {staged.site} (same pixels): nothing to do"
        return report
    suite_cfg = cfg.validation.model_copy(update={"min_images": cfg.ingest.min_batch_images})
    report.problems += validate_dataset(manifest, facts, suite_cfg, report_dir, labels_required=False).failures
    report.problems += _site_problems(manifest, hashes, known, site, cfg.ingest.allow_known_patients)
    if staged.salt_id and known_salts and staged.salt_id not in known_salts:
        report.problems.append(
            Failure(
                "salt_changed",
                "blocking",
                f"the DICOM salt differs from the one {staged.site}'s earlier batches used: restore it "
                "(pseudonyms must stay stable for patient checks)",
            )
        )
    report.status = "rejected" if report.blocking else "accepted"
    return report


def _named(items: list[str]) -> str:
    return ", ".join(items[:MAX_NAMED]) + (", ..." if len(items) > MAX_NAMED else "")


def _site_problems(
    manifest: pd.DataFrame, hashes: pd.Series, known: pd.Series, site: SiteContents, allow_known_patients: bool
) -> list[Failure]:
    names = manifest["path"].map(lambda p: Path(p).name)
    name = manifest["site"].iloc[0]
    problems = []
    if known.any():
        pairs = [f"{n} = {site.files[h]}" for n, h in zip(names[known], hashes[known], strict=True)]
        problems.append(
            Failure(
                "known_image", "blocking", f"{len(pairs)} image(s) already in {name} (same pixels): {_named(pairs)}"
            )
        )
    clashes = sorted(set(names[~known]) & site.names)
    if clashes:
        problems.append(
            Failure(
                "name_conflict", "blocking", f"{len(clashes)} file name(s) already used in {name}: {_named(clashes)}"
            )
        )
    seen = manifest[manifest["patient_id"].isin(site.patients)]
    if len(seen):
        refs = [f"{n} (patient {p})" for n, p in zip(names[seen.index], seen["patient_id"], strict=True)]
        severity = "warning" if allow_known_patients else "blocking"
        hint = "" if allow_known_patients else "; set ingest.allow_known_patients=true to accept follow-ups"
        problems.append(
            Failure(
                "known_patient",
                severity,
                f"{seen['patient_id'].nunique()} patient(s) already in {name}, {len(seen)} image(s): {_named(refs)}{hint}",
            )
        )
    return problems
