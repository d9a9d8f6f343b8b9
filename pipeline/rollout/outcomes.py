"""Outcomes: the labels a hospital reports days after a prediction (a radiologist's read, a follow-up), joined to
the prediction they judge.

A report names its prediction by ``inference_id``, or by the study's keyed pseudonym (every prediction of that
study then gets it). Recording is all or nothing per call: one bad report (unknown inference, a label or source
outside the configured sets, a time in the future) refuses the whole call and nothing is written.

- The same (source, label) reported again is a ``duplicate``: nothing new is stored (idempotent retries).
- A label that disagrees with one already reported is stored too and the result says ``conflict``; when labels
  are read, the one from the source highest in ``rollout.outcome_sources`` wins, then the latest reported.
- A prediction without a matured label is *pending*, never a negative. A label matures ``maturity`` after it was
  recorded, so that a correction arriving meanwhile still counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Literal

import sqlalchemy as sa

from pipeline.errors import RequestRefused
from pipeline.serving.ledger import PredictionLedger, outcomes, predictions, read_requests

LABELS = {"normal": 0, "pneumonia": 1}
LABEL_NAMES = {code: name for name, code in LABELS.items()}
FUTURE_TOLERANCE = timedelta(minutes=5)  # clocks of the reporting systems drift a little


class OutcomeError(RequestRefused):
    """A report refused; nothing of its call was stored."""


@dataclass(frozen=True)
class OutcomeReport:
    """One reported label. Exactly one of ``inference_id`` and ``study_pseudonym`` names what it judges."""

    label: str  # "normal" | "pneumonia"
    source: str  # one of rollout.outcome_sources
    inference_id: str | None = None
    study_pseudonym: str | None = None  # the keyed pseudonym of the study id (ledger.pseudonymise_ids)
    observed_at: datetime | None = None  # when the outcome was established; None: when it is recorded
    where: str = "report"  # how errors name it: "row 7 of labels.csv", "request body"


@dataclass(frozen=True)
class RecordedOutcome:
    where: str
    inference_ids: tuple[str, ...]
    status: Literal["recorded", "duplicate", "conflict"]
    requested: bool  # a read worklist asked for it (pipeline.loop.worklist); False: an unrequested report, kept too


@dataclass(frozen=True)
class MaturedLabel:
    inference_id: str
    label: int
    source: str
    observed_at: datetime
    conflict: bool  # sources disagreed; ``label`` is the one precedence chose


def record_outcomes(
    ledger: PredictionLedger, reports: Sequence[OutcomeReport], sources: Sequence[str], now: datetime | None = None
) -> list[RecordedOutcome]:
    """Store ``reports`` in one transaction; an ``OutcomeError`` naming the first bad report stores none."""
    now = now or datetime.now(timezone.utc)
    for report in reports:
        _check(report, sources, now)
    results = []
    with ledger.transaction() as connection:
        for report in reports:
            targets = _targets(connection, report)
            statuses = [_store(connection, inference_id, report, now) for inference_id in targets]
            status = "conflict" if "conflict" in statuses else "recorded" if "recorded" in statuses else "duplicate"
            asked = connection.execute(
                sa.select(sa.func.count()).select_from(read_requests).where(read_requests.c.inference_id.in_(targets))
            ).scalar_one()
            results.append(RecordedOutcome(report.where, tuple(targets), status, requested=asked > 0))
    return results


def matured_labels(
    ledger: PredictionLedger, sources: Sequence[str], maturity: timedelta, now: datetime | None = None
) -> dict[str, MaturedLabel]:
    """inference_id → its label, from the reports recorded at least ``maturity`` before ``now``."""
    now = now or datetime.now(timezone.utc)
    query = sa.select(outcomes).where(outcomes.c.recorded_at <= now - maturity).order_by(outcomes.c.recorded_at)
    with ledger.transaction() as connection:
        records = list(connection.execute(query).mappings())
    rank = {source: index for index, source in enumerate(sources)}
    by_inference: dict[str, list[sa.RowMapping]] = {}
    for record in records:
        by_inference.setdefault(record["inference_id"], []).append(record)
    matured = {}
    for inference_id, reported in by_inference.items():
        # Precedence first (a source no longer configured ranks last), then the latest report.
        best = min(reported, key=lambda r: (rank.get(r["source"], len(rank)), -_utc(r["recorded_at"]).timestamp()))
        matured[inference_id] = MaturedLabel(
            inference_id,
            int(best["label"]),
            best["source"],
            _utc(best["observed_at"]),
            conflict=len({int(r["label"]) for r in reported}) > 1,
        )
    return matured


def _check(report: OutcomeReport, sources: Sequence[str], now: datetime) -> None:
    if (report.inference_id is None) == (report.study_pseudonym is None):
        raise OutcomeError("missing_reference", f"{report.where}: give an inference_id or a study id (one of them)")
    if report.label not in LABELS:
        raise OutcomeError(
            "unknown_label", f"{report.where}: label {report.label!r} is not one of {', '.join(LABELS)}"
        )
    if report.source not in sources:
        raise OutcomeError(
            "unknown_source",
            f"{report.where}: source {report.source!r} is not one of {', '.join(sources)} (rollout.outcome_sources)",
        )
    if report.observed_at is not None:
        if report.observed_at.tzinfo is None:
            raise OutcomeError("naive_time", f"{report.where}: observed_at needs a time zone (e.g. 2026-12-01T09:30Z)")
        if report.observed_at > now + FUTURE_TOLERANCE:
            raise OutcomeError("future_time", f"{report.where}: observed_at {report.observed_at.isoformat()} is in the future")


def _targets(connection: sa.Connection, report: OutcomeReport) -> list[str]:
    if report.inference_id is not None:
        query = sa.select(predictions.c.inference_id).where(predictions.c.inference_id == report.inference_id)
        missing = f"{report.where}: no prediction has inference_id {report.inference_id!r}"
    else:
        query = sa.select(predictions.c.inference_id).where(predictions.c.study_pseudonym == report.study_pseudonym)
        missing = f"{report.where}: no prediction was made for this study (site and study id as sent to /v1/predict?)"
    found = [row[0] for row in connection.execute(query.order_by(predictions.c.created_at))]
    if not found:
        raise OutcomeError("unknown_inference", missing, 404)
    return found


def _store(connection: sa.Connection, inference_id: str, report: OutcomeReport, now: datetime) -> str:
    label = LABELS[report.label]
    known = {
        (row.source, row.label)
        for row in connection.execute(
            sa.select(outcomes.c.source, outcomes.c.label).where(outcomes.c.inference_id == inference_id)
        )
    }
    if (report.source, label) in known:
        return "duplicate"
    connection.execute(
        sa.insert(outcomes).values(
            inference_id=inference_id,
            label=label,
            source=report.source,
            observed_at=(report.observed_at or now).astimezone(timezone.utc),
            recorded_at=now.astimezone(timezone.utc),
        )
    )
    return "conflict" if any(known_label != label for _, known_label in known) else "recorded"


def _utc(value: datetime) -> datetime:
    # SQLite keeps no zone: values were written as UTC.
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)
