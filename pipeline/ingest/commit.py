"""Adding an accepted batch to the DVC-tracked dataset, all or nothing; quarantining a rejected one.

Commit order: back up the ``.dvc`` file, the ``.gitignore`` ``dvc add`` may touch and the site's
CSV; write a journal of what will change; move the staged images into ``<site>/images/`` (one
filesystem: a rename per file, new names only); replace the site's CSV (one rename, so readers
see the new rows only once all their images are in place; a new site is one rename of the whole
folder); ``dvc add``; ``dvc push``; append the log line, the commit point; drop the backups.
An exception before the log line rolls back: images move back to the staging folder (so a retry
can commit again) and the backups are restored byte for byte. A killed process leaves its
journal: the next ingest rolls it back, or only cleans up when the log says it was committed.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline.config import IngestConfig
from pipeline.data.readers import NIH_CSV
from pipeline.errors import ConfigError, DatasetError, PipelineError, VersioningError
from pipeline.ingest.batch import StagedBatch
from pipeline.ingest.dvc_repo import DvcRepo, dvc_file
from pipeline.ingest.log import accepted_entry, append_entry
from pipeline.ingest.report import BatchReport, move_validation
from pipeline.versioning import dataset_version

WORKSPACE = ".crosssim-ingest"  # at the repository root: same filesystem as the data, outside the DVC target
JOURNAL = "journal.json"
QUARANTINE_LOG = "quarantine_log.jsonl"  # per site, beside its quarantined batches: every rejection, oldest first
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class DataLayout:
    """Where ingest reads and writes, resolved from ``IngestConfig`` and checked once."""

    data_dir: Path
    dvc_target: Path
    repo: DvcRepo

    @classmethod
    def from_settings(cls, settings: IngestConfig) -> DataLayout:
        data_dir, target = settings.data_dir.resolve(), settings.dvc_target.resolve()
        if not data_dir.is_relative_to(target):
            raise ConfigError(f"ingest.data_dir {data_dir} must be inside ingest.dvc_target {target}")
        for key in ("quarantine_dir", "report_dir", "log_path"):
            if getattr(settings, key).resolve().is_relative_to(target):
                raise ConfigError(f"ingest.{key} must be outside ingest.dvc_target {target}: it is not data to version")
        return cls(data_dir, target, DvcRepo.containing(target.parent))

    @property
    def workspace(self) -> Path:
        return self.repo.root / WORKSPACE

    def site_dir(self, site: str) -> Path:
        if not _SITE_NAME.match(site):
            raise ConfigError(f"site {site!r}: use letters, digits, '.', '_' and '-' (it names a folder)")
        return self.data_dir / site

    def sites(self) -> list[str]:
        """The sites that exist: the folders under ``data_dir``."""
        if not self.data_dir.is_dir():
            return []
        return sorted(p.name for p in self.data_dir.iterdir() if p.is_dir() and _SITE_NAME.match(p.name))

    @contextmanager
    def lock(self) -> Iterator[None]:
        """One ingest at a time per repository (the OS drops the lock if the process dies)."""
        self.workspace.mkdir(parents=True, exist_ok=True)
        with (self.workspace / ".lock").open("w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise ConfigError(f"another ingest is running in {self.repo.root}; try again when it ends") from exc
            yield

    def check_clean(self) -> str | None:
        """The current data version, after checking the data folder still is what the .dvc file says.

        Otherwise ``dvc add`` would fold someone's uncommitted edits into the batch's version.
        """
        version = self.repo.version(self.dvc_target)
        if version is not None and dataset_version(self.dvc_target) != version:
            raise DatasetError(
                f"{self.dvc_target} differs from {dvc_file(self.dvc_target).name} (changes not added to DVC): "
                "run `dvc status`, then `dvc add` or `dvc checkout` them before ingesting"
            )
        return version


class _Transaction:
    """The journal of one commit: what it changes and how to undo it."""

    def __init__(self, work: Path, state: dict) -> None:
        self.work, self.state = work, state

    @classmethod
    def begin(cls, staged: StagedBatch, site_dir: Path, protected: list[Path]) -> _Transaction:
        work = staged.folder.parent
        backup_dir = work / "backup"
        backup_dir.mkdir()
        backups = {}
        for index, path in enumerate(protected):
            backups[str(path)] = str(index) if path.is_file() else None
            if path.is_file():
                shutil.copy2(path, backup_dir / str(index))
        state = {
            "site": staged.site,
            "fingerprint": staged.fingerprint,
            "staged": str(staged.folder),
            "site_dir": str(site_dir),
            "site_created": not site_dir.exists(),
            "images": sorted(p.name for p in (staged.folder / "images").iterdir()),
            "backups": backups,
        }
        _write_atomic(work / JOURNAL, json.dumps(state).encode())
        return cls(work, state)

    @classmethod
    def load(cls, work: Path) -> _Transaction:
        return cls(work, json.loads((work / JOURNAL).read_text()))

    def apply(self) -> None:
        staged, site_dir = Path(self.state["staged"]), Path(self.state["site_dir"])
        if self.state["site_created"]:
            site_dir.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, site_dir)
            return
        images = site_dir / "images"
        images.mkdir(exist_ok=True)
        for name in self.state["images"]:
            if (images / name).exists():  # checked before, but never overwrite a file of the dataset
                raise DatasetError(f"{images / name} already exists")
            os.replace(staged / "images" / name, images / name)
        site_csv = site_dir / NIH_CSV
        columns = pd.read_csv(site_csv, dtype=str, nrows=0).columns
        rows = pd.read_csv(staged / NIH_CSV, dtype=str, keep_default_na=False).reindex(columns=columns, fill_value="")
        old = site_csv.read_bytes()
        _write_atomic(
            site_csv, old + (b"" if old.endswith(b"\n") else b"\n") + rows.to_csv(index=False, header=False).encode()
        )

    def rollback(self) -> None:
        staged, site_dir = Path(self.state["staged"]), Path(self.state["site_dir"])
        if self.state["site_created"]:
            if site_dir.exists() and not staged.exists():
                os.replace(site_dir, staged)
        else:
            for name in self.state["images"]:
                placed, origin = site_dir / "images" / name, staged / "images" / name
                if placed.exists() and not origin.exists():
                    os.replace(placed, origin)
        for path, backup in self.state["backups"].items():
            if backup is None:
                Path(path).unlink(missing_ok=True)
            else:
                _write_atomic(Path(path), (self.work / "backup" / backup).read_bytes())
        self.close()

    def close(self) -> None:
        shutil.rmtree(self.work / "backup", ignore_errors=True)
        (self.work / JOURNAL).unlink(missing_ok=True)


def _write_atomic(path: Path, content: bytes) -> None:
    partial = path.with_name(path.name + ".ingest-partial")
    partial.write_bytes(content)
    os.replace(partial, path)


def commit_batch(staged: StagedBatch, report: BatchReport, layout: DataLayout, settings: IngestConfig) -> BatchReport:
    """Add the batch to ``<data_dir>/<site>``, version and push it, log it; on any failure restore everything.

    Raises VersioningError (after rolling back) when a step fails.
    """
    site_dir, target = layout.site_dir(staged.site), layout.dvc_target
    report.version_before = layout.repo.version(target)
    transaction = _Transaction.begin(
        staged, site_dir, [dvc_file(target), target.parent / ".gitignore", site_dir / NIH_CSV]
    )
    step = "placing the batch"
    try:
        transaction.apply()
        step = "dvc add"
        layout.repo.add(target)
        if settings.push:
            step = "dvc push"
            layout.repo.push(target, settings.remote)
        step = "writing the ingest log"
        report.version_after = layout.repo.version(target)
        report.site_version = dataset_version(site_dir)
        report.location = str(settings.report_dir / staged.site / staged.batch_id)
        append_entry(settings.log_path, report)
    except Exception as exc:
        failure = f"batch {staged.batch_id} was not ingested: {step} failed ({_cause(exc)})"
        try:
            transaction.rollback()
        except Exception as undo:
            raise VersioningError(
                f"{failure}, and so did the rollback ({_cause(undo)}): the next `crosssim ingest` in this "
                f"repository finishes it from {transaction.work / JOURNAL}"
            ) from undo
        raise VersioningError(f"{failure}. {site_dir} and {dvc_file(target).name} were restored as they were.") from exc
    except BaseException:
        transaction.rollback()
        raise
    transaction.close()
    return report


def _cause(exc: Exception) -> str:
    return str(exc) if isinstance(exc, PipelineError) else f"{type(exc).__name__}: {exc}"


def quarantine_batch(
    staged: StagedBatch, report: BatchReport, settings: IngestConfig, validation_dir: Path
) -> BatchReport:
    """Move the de-identified batch and its reports to ``<quarantine_dir>/<site>/<batch_id>/`` and log it in
    ``<quarantine_dir>/<site>/quarantine_log.jsonl``. The ingest log is not touched: it is versioned with the
    data, and a rejected batch changes no data.

    The drop folder itself is left where the hospital put it: it may hold PHI, so it is not copied.
    """
    destination = settings.quarantine_dir / staged.site / staged.batch_id
    partial = destination.with_name(destination.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    if staged.folder.exists():
        shutil.move(str(staged.folder), str(partial / "batch"))
    move_validation(validation_dir, partial / "validation")
    report.location = str(destination)
    report.write(partial)
    shutil.rmtree(destination, ignore_errors=True)
    os.replace(partial, destination)
    append_entry(destination.parent / QUARANTINE_LOG, report)
    return report


def recover(layout: DataLayout, log_path: Path) -> list[str]:
    """Finish what a killed ingest left: roll back its changes unless the log says it was committed.

    Call it holding ``layout.lock()``.
    """
    messages = []
    for journal in sorted(layout.workspace.glob(f"*/{JOURNAL}")):
        transaction = _Transaction.load(journal.parent)
        site, fingerprint = transaction.state["site"], transaction.state["fingerprint"]
        if accepted_entry(log_path, site, fingerprint) is None:
            transaction.rollback()
            messages.append(f"rolled back an interrupted ingest into {site} (batch {fingerprint[:12]})")
    for leftover in layout.workspace.iterdir():  # under the lock, every folder here is a dead run's
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
    return messages
