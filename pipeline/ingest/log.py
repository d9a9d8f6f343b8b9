"""The ingest log: one JSON line per accepted batch, only ever appended to.

Kept beside the ``.dvc`` file and committed with it, it says which batch made each data version.
Appending the accepted line is the commit point of an ingest (see commit.py). Rejected batches change
no data version, so they are logged with their quarantine instead (the same line format).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pipeline.errors import DatasetError
from pipeline.ingest.report import BatchReport


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path} line {number}: not a JSON record ({exc.msg}); the log is append-only") from exc
    return entries


def accepted_entry(path: Path, site: str, fingerprint: str) -> dict[str, Any] | None:
    """The log record of an earlier ingest of the same drop into ``site``, if any."""
    for entry in read_log(path):
        if entry.get("status") == "accepted" and entry.get("site") == site and entry.get("fingerprint") == fingerprint:
            return entry
    return None


def salt_ids(path: Path, site: str) -> set[str]:
    """Digests of the salts earlier DICOM batches of ``site`` were pseudonymised with."""
    return {
        e["salt_id"]
        for e in read_log(path)
        if e.get("site") == site and e.get("status") == "accepted" and e.get("salt_id")
    }


def append_entry(path: Path, report: BatchReport) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as log:
        log.write(json.dumps(report.log_entry(), default=str, sort_keys=True) + "\n")
        log.flush()
        os.fsync(log.fileno())
