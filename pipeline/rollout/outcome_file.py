"""A hospital's outcome export (``crosssim feedback import FILE.csv``) → ``OutcomeReport``s, or an error naming the
row and the field.

Columns: ``label`` and ``source`` (required), ``inference_id`` or ``study_id`` + ``site`` (one reference per row),
``observed_at`` (ISO 8601 with a zone; empty: when it is imported). Study ids are turned into the site's keyed
pseudonyms here, as /v1/predict stored them; the raw ids go no further.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path

from pipeline.config import IngestConfig
from pipeline.rollout.outcomes import OutcomeError, OutcomeReport
from pipeline.serving.ledger import NoSiteSalt, pseudonymise_ids

REQUIRED_COLUMNS = ("label", "source")
KNOWN_COLUMNS = (*REQUIRED_COLUMNS, "inference_id", "study_id", "site", "observed_at")


def read_outcome_file(
    path: Path, sites: Sequence[str], ingest: IngestConfig, environ: Mapping[str, str]
) -> list[OutcomeReport]:
    """Every row of ``path`` as a report; the first malformed row is an ``OutcomeError`` naming it."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as file:
            reader = csv.DictReader(file)
            columns = reader.fieldnames or []
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise OutcomeError("unreadable_file", f"{path}: cannot be read as a UTF-8 CSV file ({exc})") from exc
    missing = [column for column in REQUIRED_COLUMNS if column not in columns]
    unknown = [column for column in columns if column not in KNOWN_COLUMNS]
    if missing or unknown or not ({"inference_id", "study_id"} & set(columns)):
        raise OutcomeError(
            "bad_columns",
            f"{path}: columns {', '.join(columns) or '(none)'}; expected {', '.join(REQUIRED_COLUMNS)}, "
            "inference_id or study_id + site, optionally observed_at"
            + (f" (missing: {', '.join(missing)})" if missing else "")
            + (f" (unknown: {', '.join(unknown)})" if unknown else ""),
        )
    if not rows:
        raise OutcomeError("empty_file", f"{path}: no rows")
    # Row 1 is the header: data rows are numbered as a spreadsheet shows them.
    return [_report(row, f"{path.name} row {number}", sites, ingest, environ) for number, row in enumerate(rows, start=2)]


def _report(
    row: Mapping[str, str | None], where: str, sites: Sequence[str], ingest: IngestConfig, environ: Mapping[str, str]
) -> OutcomeReport:
    values = {key: (value or "").strip() for key, value in row.items() if key is not None}
    if None in row:
        raise OutcomeError("bad_row", f"{where}: more fields than the header has columns")
    inference_id, study_id, site = values.get("inference_id"), values.get("study_id"), values.get("site")
    study = None
    if study_id:
        if site not in sites:
            raise OutcomeError("unknown_site", f"{where}: field 'site' {site!r} is not one of {', '.join(sites)}")
        try:
            study = pseudonymise_ids(site, None, study_id, ingest, environ).study
        except NoSiteSalt as exc:
            raise OutcomeError("site_without_salt", f"{where}: {exc}") from exc
    observed = values.get("observed_at")
    try:
        observed_at = datetime.fromisoformat(observed.replace("Z", "+00:00")) if observed else None
    except ValueError as exc:
        raise OutcomeError("bad_time", f"{where}: field 'observed_at' {observed!r} is not an ISO 8601 time") from exc
    return OutcomeReport(values["label"], values["source"], inference_id or None, study, observed_at, where)
