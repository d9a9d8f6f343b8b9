"""Ingest a hospital's weekly export into the site's DVC-tracked dataset, all or nothing.

    salt = resolve_salt(site, cfg.ingest, os.environ)      # None: a batch holding DICOM is refused
    with BatchIngest(cfg, site, folder, salt) as ingest:
        report = ingest.run()                              # accepted | rejected (quarantined) | unchanged

Modules: batch (read + de-identify the drop into a staged NIH-layout copy), checks (validation
suite + batch rules), commit (atomic add/version/push, quarantine, crash recovery), dvc_repo
(the DVC adapter), log (the append-only ingest log), report.
"""

from pipeline.data.salt import resolve_salt, salt_variables
from pipeline.ingest.batch import StagedBatch
from pipeline.ingest.report import BatchReport
from pipeline.ingest.run import BatchIngest

__all__ = ["BatchIngest", "BatchReport", "StagedBatch", "resolve_salt", "salt_variables"]
