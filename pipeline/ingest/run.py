"""One drop folder's way into a site's dataset: stage → check → commit or quarantine.

``BatchIngest`` holds the repository's ingest lock for its ``with`` block and a private working
folder on the data's filesystem. ``run()`` does the stages in a row (the CLI); the Prefect flow
calls the same stages as tasks.
"""

from __future__ import annotations

import difflib
import shutil
from contextlib import ExitStack
from pathlib import Path

from pipeline.config import PipelineConfig
from pipeline.errors import ConfigError, DatasetError
from pipeline.ingest.batch import StagedBatch, batch_fingerprint, stage_batch
from pipeline.ingest.checks import check_batch
from pipeline.ingest.commit import JOURNAL, DataLayout, commit_batch, quarantine_batch, recover
from pipeline.ingest.log import accepted_entry, salt_ids
from pipeline.ingest.report import BatchReport, move_validation


class BatchIngest:
    """The ingest of one drop folder into one site; use it as a context manager, then ``run()``."""

    def __init__(self, cfg: PipelineConfig, site: str, folder: Path, salt: str | None, new_site: bool = False) -> None:
        """``salt``: the site's DICOM secret (see batch.resolve_salt); None refuses batches holding DICOM.
        ``new_site``: ``site`` is to be created; otherwise it must be one of the sites under ingest.data_dir."""
        self.cfg, self.settings = cfg, cfg.ingest
        self.layout = DataLayout.from_settings(cfg.ingest)
        self.site, self.site_dir = site, self.layout.site_dir(site)
        self.folder, self.salt = Path(folder), salt
        if not self.folder.is_dir():
            raise DatasetError(f"batch folder {self.folder} does not exist")
        _check_site(site, self.layout.sites(), self.layout.data_dir, new_site)
        self.recovered: list[str] = []
        self._stack = ExitStack()

    def __enter__(self) -> BatchIngest:
        self._stack.enter_context(self.layout.lock())
        try:
            self.recovered = recover(self.layout, self.settings.log_path)
            self.version = self.layout.check_clean()
            self.fingerprint = batch_fingerprint(self.folder)
            self.work = self.layout.workspace / f"{self.site}-{self.fingerprint[:12]}"
            self.work.mkdir()
            self._stack.callback(self._clean_up)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()

    def _clean_up(self) -> None:
        # a journal left here means a commit could not be undone: keep it for the next run's recover()
        if not (self.work / JOURNAL).exists():
            shutil.rmtree(self.work, ignore_errors=True)

    def previous(self) -> BatchReport | None:
        """An 'unchanged' report when this very drop was already ingested into the site (from the log)."""
        entry = accepted_entry(self.settings.log_path, self.site, self.fingerprint)
        if entry is None:
            return None
        return BatchReport(
            site=self.site,
            batch_id=entry["batch_id"],
            fingerprint=self.fingerprint,
            source=str(self.folder),
            time=entry["time"],
            status="unchanged",
            counts=entry.get("counts", {}),
            note=f"already ingested at {entry['time']} (data version {entry.get('version_after')}): nothing to do",
            location=entry.get("location"),
        )

    def stage(self) -> StagedBatch:
        return stage_batch(self.folder, self.site, self.fingerprint, self.work / "batch", self.settings, self.salt)

    def check(self, staged: StagedBatch) -> BatchReport:
        known_salts = salt_ids(self.settings.log_path, self.site)
        return check_batch(staged, self.site_dir, self.cfg, self.work / "validation", known_salts)

    def commit(self, staged: StagedBatch, report: BatchReport) -> BatchReport:
        report = commit_batch(staged, report, self.layout, self.settings)
        reports = Path(report.location)
        shutil.rmtree(reports, ignore_errors=True)
        reports.mkdir(parents=True)
        move_validation(self.work / "validation", reports / "validation")
        report.write(reports)
        return report

    def quarantine(self, staged: StagedBatch, report: BatchReport) -> BatchReport:
        report.version_before = report.version_after = self.version
        return quarantine_batch(staged, report, self.settings, self.work / "validation")

    def run(self) -> BatchReport:
        previous = self.previous()
        if previous is not None:
            return previous
        staged = self.stage()
        report = self.check(staged)
        if report.status == "rejected":
            return self.quarantine(staged, report)
        if report.status == "accepted":
            return self.commit(staged, report)
        return report


def _check_site(site: str, known: list[str], data_dir: Path, new_site: bool) -> None:
    """A typo in the site name must not start a new site: creating one is asked for with ``new_site``."""
    if new_site and site in known:
        raise ConfigError(f"site {site!r} already exists in {data_dir}: drop --new-site to add the batch to it")
    if not new_site and site not in known:
        nearest = difflib.get_close_matches(site, known, n=1, cutoff=0.6)
        raise ConfigError(
            f"site {site!r} does not exist in {data_dir} (known sites: {', '.join(known) or 'none yet'})"
            + (f"; did you mean {nearest[0]!r}?" if nearest else "")
            + " To start a new site, add --new-site (flow parameter new_site=true). Nothing was ingested."
        )
