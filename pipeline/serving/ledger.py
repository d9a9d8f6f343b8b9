"""The prediction ledger: one row per answered prediction, committed before the answer leaves.

``await ledger.record(row)`` returns only once the row's transaction has committed, so a response sent after
it is always in the ledger; when the database cannot commit, it raises ``LedgerUnavailable`` (the app answers
503) and the row is not written. Rows reach the database through one writer thread that commits whatever has
queued while its previous commit ran (group commit): under load many requests share one transaction instead
of each paying its own.

Patient and study ids are stored only as keyed pseudonyms (``pseudonymise_ids``), the same HMAC ingest gives a
DICOM PatientID, so an id held elsewhere can be matched without the ledger holding it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import re
import threading
import uuid
from collections.abc import Iterator, Mapping
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

from pipeline.config import IngestConfig, ServeConfig
from pipeline.data.dicom import PSEUDONYM_HEX_CHARS, keyed_pseudonym
from pipeline.data.salt import resolve_salt, salt_variables
from pipeline.errors import ConfigError, PipelineError
from pipeline.serving.bundle import PRECISIONS

LEDGER_URL_ENV = "CROSSSIM_LEDGER_URL"
MAX_BATCH_ROWS = 256  # rows per transaction: bounds one commit's size when a burst has queued up
SQLITE_BUSY_TIMEOUT_MS = 5000  # another process (a reader, a second server) holding the write lock
CONNECT_TIMEOUT_S = 3  # a server that does not answer fails the batch instead of holding every request

_PSEUDONYM = re.compile(rf"^[0-9a-f]{{{PSEUDONYM_HEX_CHARS}}}$")
_INFERENCE_ID = re.compile(r"^[0-9a-f]{32}$")
_CLOSE = object()  # the writer's stop signal, queued behind every row already submitted

log = logging.getLogger(__name__)


class LedgerUnavailable(PipelineError):
    """The ledger database could not commit the prediction: nothing was written, the request must fail (503)."""


class NoSiteSalt(ConfigError):
    """A patient or study id was given for a site without a DICOM salt, so it cannot be pseudonymised."""


@dataclass(frozen=True)
class PredictionRow:
    """One answered prediction. Ids are keyed pseudonyms (``pseudonymise_ids``), never the raw values."""

    inference_id: str  # new_inference_id()
    created_at: datetime  # timezone-aware; stored and read back as UTC
    site: str
    patient_pseudonym: str | None
    study_pseudonym: str | None
    model_name: str
    model_version: str
    model_alias: str | None  # None: a pinned version
    artifact_sha256: str
    precision: str
    probability: float
    decision: int  # 1: pneumonia (probability >= threshold)
    threshold: float
    latency_ms: float
    converted_from: str | None  # the upload's image mode when it was converted (e.g. "RGBA", "I;16")
    arm: str | None  # the rollout arm that answered (A/B rollouts): "champion" | "challenger"; None: no rollout
    rollout_id: str | None = None
    shadow_version: str | None = None  # during a rollout: the other model, which scored the same image unanswered
    shadow_probability: float | None = None
    shadow_threshold: float | None = None  # that model's operating point

    def __post_init__(self) -> None:
        # Numpy scalars (what ONNX Runtime returns) are not bindable by the database drivers.
        for name in ("probability", "threshold", "latency_ms"):
            object.__setattr__(self, name, float(getattr(self, name)))
        object.__setattr__(self, "decision", int(self.decision))
        for name in ("shadow_probability", "shadow_threshold"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, float(getattr(self, name)))
        # A malformed row would fail the whole batch it is committed with, so it is refused here, alone.
        if not _INFERENCE_ID.match(self.inference_id):
            raise ValueError(f"inference_id {self.inference_id!r}: expected uuid4().hex (32 lowercase hex)")
        if self.created_at.tzinfo is None:
            raise ValueError("created_at must be timezone-aware (datetime.now(timezone.utc))")
        for name in ("patient_pseudonym", "study_pseudonym"):
            value = getattr(self, name)
            if value is not None and not _PSEUDONYM.match(value):
                raise ValueError(f"{name}: not a keyed pseudonym ({PSEUDONYM_HEX_CHARS} hex); raw ids are never stored")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}: expected one of {PRECISIONS}")
        if self.decision not in (0, 1):
            raise ValueError(f"decision {self.decision!r}: expected 0 or 1")
        if not (math.isfinite(self.probability) and 0.0 <= self.probability <= 1.0):
            raise ValueError(f"probability {self.probability!r}: expected a number in [0, 1]")


@dataclass(frozen=True)
class Pseudonyms:
    patient: str | None
    study: str | None


def new_inference_id() -> str:
    return uuid.uuid4().hex


def pseudonym(value: str, salt: str) -> str:
    """The keyed pseudonym of an id: for a PatientID, the one ``deidentify`` writes at ingest."""
    return keyed_pseudonym(value.strip(), salt)


def pseudonymise_ids(
    site: str, patient_id: str | None, study_id: str | None, ingest: IngestConfig, environ: Mapping[str, str]
) -> Pseudonyms:
    """Pseudonyms of a request's ids with the site's secret salt; ids given without one are refused."""
    patient_id = (patient_id or "").strip() or None
    study_id = (study_id or "").strip() or None
    if patient_id is None and study_id is None:
        return Pseudonyms(None, None)
    salt = resolve_salt(site, ingest, environ)
    if salt is None:
        site_variable, shared_variable = salt_variables(site, ingest)
        raise NoSiteSalt(
            f"site {site!r}: patient/study ids are stored only as keyed pseudonyms, and no secret salt is set "
            f"(${site_variable} or ${shared_variable}); send the request without ids or configure the salt"
        )
    return Pseudonyms(
        patient=pseudonym(patient_id, salt) if patient_id else None,
        study=pseudonym(study_id, salt) if study_id else None,
    )


def resolve_ledger_url(serve: ServeConfig, environ: Mapping[str, str]) -> str:
    """``serve.ledger_url``, else ``$CROSSSIM_LEDGER_URL``, else the SQLite file at ``serve.ledger_path``."""
    return serve.ledger_url or environ.get(LEDGER_URL_ENV) or f"sqlite:///{serve.ledger_path}"


_metadata = sa.MetaData()
predictions = sa.Table(
    "predictions",
    _metadata,
    sa.Column("inference_id", sa.String(32), primary_key=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("site", sa.String, nullable=False),
    sa.Column("patient_pseudonym", sa.String(PSEUDONYM_HEX_CHARS)),
    sa.Column("study_pseudonym", sa.String(PSEUDONYM_HEX_CHARS), index=True),
    sa.Column("model_name", sa.String, nullable=False),
    sa.Column("model_version", sa.String, nullable=False),
    sa.Column("model_alias", sa.String),
    sa.Column("artifact_sha256", sa.String(64), nullable=False),
    sa.Column("precision", sa.String(8), nullable=False),
    sa.Column("probability", sa.Double, nullable=False),
    sa.Column("decision", sa.SmallInteger, nullable=False),
    sa.Column("threshold", sa.Double, nullable=False),
    sa.Column("latency_ms", sa.Double, nullable=False),
    sa.Column("converted_from", sa.String),
    sa.Column("arm", sa.String),
    sa.Column("rollout_id", sa.String(32), index=True),
    sa.Column("shadow_version", sa.String),
    sa.Column("shadow_probability", sa.Double),
    sa.Column("shadow_threshold", sa.Double),
)
# Columns added after the first release: a ledger created before gets them (nullable) when it is opened.
_ADDED_COLUMNS = ("rollout_id", "shadow_version", "shadow_probability", "shadow_threshold")
# Labels that arrive later for answered predictions (pipeline.rollout.outcomes). Every report is kept: the same
# (source, label) twice is one row; a disagreeing label is another row, settled by source precedence when read.
outcomes = sa.Table(
    "outcomes",
    _metadata,
    sa.Column("outcome_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("inference_id", sa.String(32), sa.ForeignKey("predictions.inference_id"), nullable=False, index=True),
    sa.Column("label", sa.SmallInteger, nullable=False),
    sa.Column("source", sa.String, nullable=False),
    sa.Column("observed_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.UniqueConstraint("inference_id", "source", "label", name="one_report_per_source_and_label"),
)
# Each rollout's arm per patient (pipeline.rollout.assignment): the first draw is kept, so a patient never switches
# arm within a rollout, whatever the canary share becomes and however often the server restarts.
rollout_assignments = sa.Table(
    "rollout_assignments",
    _metadata,
    sa.Column("rollout_id", sa.String(32), primary_key=True),
    sa.Column("unit", sa.String(64), primary_key=True),  # the patient's pseudonym (else the study's, else the request's)
    sa.Column("site", sa.String, nullable=False),
    sa.Column("arm", sa.String(16), nullable=False),
    sa.Column("challenger_share", sa.Double, nullable=False),  # when assigned: the SRM check's expectation
    sa.Column("assigned_at", sa.DateTime(timezone=True), nullable=False),
)
# Served cases already exported as a training batch (pipeline.rollout.export): each goes into training once.
exported_cases = sa.Table(
    "exported_cases",
    _metadata,
    sa.Column("inference_id", sa.String(32), primary_key=True),
    sa.Column("batch", sa.String, nullable=False),
    sa.Column("exported_at", sa.DateTime(timezone=True), nullable=False),
)
# Reads asked of a radiologist (pipeline.loop.worklist): a case is asked for once, so a read that comes back is
# known to have been requested, and a pending request is never asked again.
read_requests = sa.Table(
    "read_requests",
    _metadata,
    sa.Column("inference_id", sa.String(32), sa.ForeignKey("predictions.inference_id"), primary_key=True),
    sa.Column("worklist_id", sa.String(32), nullable=False, index=True),
    sa.Column("site", sa.String, nullable=False),
    sa.Column("strategy", sa.String(16), nullable=False),
    sa.Column("rank", sa.Integer, nullable=False),
    sa.Column("score", sa.Double, nullable=False),
    sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False, index=True),
)
_ROW_FIELDS = tuple(field.name for field in fields(PredictionRow))


@contextmanager
def opened_ledger(serve: ServeConfig, environ: Mapping[str, str]) -> Iterator[PredictionLedger]:
    """The configured ledger for one ``with`` block (a CLI command, a flow step), closed (committed) after it."""
    ledger = PredictionLedger(resolve_ledger_url(serve, environ))
    try:
        yield ledger
    finally:
        ledger.close()


class PredictionLedger:
    """The ``predictions`` table behind a group-commit writer thread. Use from any event loop or thread."""

    def __init__(self, url: str) -> None:
        try:
            parsed = sa.make_url(url)
            self._shown_url = parsed.render_as_string(hide_password=True)
            self.engine = _create_engine(parsed)
        except (ArgumentError, NoSuchModuleError, ValueError, OSError) as exc:
            raise ConfigError(f"ledger URL {url!r} is not a usable SQLAlchemy URL ({exc})") from exc
        self._schema_ready = False
        self._schema_lock = threading.Lock()
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._submit_lock = threading.Lock()
        self._closed = False
        self._writer = threading.Thread(target=self._write_loop, name="prediction-ledger-writer", daemon=True)
        self._writer.start()

    async def record(self, row: PredictionRow) -> None:
        """Return once ``row`` is committed; ``LedgerUnavailable`` when it could not be (then it is not stored)."""
        done: Future[None] = Future()
        with self._submit_lock:  # nothing may be queued behind the writer's stop signal
            if self._closed:
                raise LedgerUnavailable(f"prediction ledger {self._shown_url} is closed")
            self._queue.put((row, done))
        await asyncio.wrap_future(done)

    def healthy(self) -> bool:
        """Whether the database answers and holds the table (for /readyz)."""
        try:
            self._ensure_schema()
            with self.engine.connect() as connection:
                connection.execute(sa.select(1))
        except SQLAlchemyError:
            return False
        return True

    @contextmanager
    def transaction(self) -> Iterator[sa.Connection]:
        """One transaction on the ledger database (feedback, reports); ``LedgerUnavailable`` if it cannot commit."""
        try:
            self._ensure_schema()
            with self.engine.begin() as connection:
                yield connection
        except SQLAlchemyError as exc:
            raise LedgerUnavailable(f"prediction ledger {self._shown_url} could not commit: {_reason(exc)}") from exc

    def get(self, inference_id: str) -> PredictionRow | None:
        found = self.rows(inference_id=inference_id)
        return found[0] if found else None

    def rows(
        self,
        *,
        inference_id: str | None = None,
        study_pseudonym: str | None = None,
        since: datetime | None = None,
        rollout_id: str | None = None,
        site: str | None = None,
        limit: int | None = None,
    ) -> list[PredictionRow]:
        """Stored rows, oldest first, filtered by the arguments given."""
        query = sa.select(predictions).order_by(predictions.c.created_at, predictions.c.inference_id).limit(limit)
        if site is not None:
            query = query.where(predictions.c.site == site)
        if rollout_id is not None:
            query = query.where(predictions.c.rollout_id == rollout_id)
        if inference_id is not None:
            query = query.where(predictions.c.inference_id == inference_id)
        if study_pseudonym is not None:
            query = query.where(predictions.c.study_pseudonym == study_pseudonym)
        if since is not None:
            query = query.where(predictions.c.created_at >= since.astimezone(timezone.utc))
        try:
            self._ensure_schema()
            with self.engine.connect() as connection:
                return [_from_record(record._mapping) for record in connection.execute(query)]
        except SQLAlchemyError as exc:
            raise LedgerUnavailable(f"prediction ledger {self._shown_url} unreadable: {_reason(exc)}") from exc

    def close(self) -> None:
        """Commit every row already submitted, stop the writer, release the connections.

        Blocks until the last commit: from an event loop, ``await asyncio.to_thread(ledger.close)``.
        """
        with self._submit_lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_CLOSE)
        self._writer.join()
        self.engine.dispose()

    def _write_loop(self) -> None:
        stopping = False
        while not stopping:
            item = self._queue.get()
            if item is _CLOSE:
                return
            batch = [item]
            while len(batch) < MAX_BATCH_ROWS:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _CLOSE:
                    stopping = True
                    break
                batch.append(item)
            self._commit(batch)

    def _commit(self, batch: list[tuple[PredictionRow, Future[None]]]) -> None:
        # A waiter that was cancelled (client gone) before its batch started is dropped, not written.
        live = [(row, done) for row, done in batch if done.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            self._ensure_schema()
            with self.engine.begin() as connection:
                connection.execute(sa.insert(predictions), [_to_record(row) for row, _ in live])
        except Exception as exc:  # the writer must survive anything and fail only this batch
            # The transaction rolled back; dropping the pool makes the next batch reconnect from scratch.
            self.engine.dispose()
            reason = f"prediction ledger {self._shown_url} could not commit: {_reason(exc)}"
            log.warning("%s (%d predictions refused)", reason, len(live))
            for _, done in live:
                done.set_exception(LedgerUnavailable(reason))
            return
        for _, done in live:
            done.set_result(None)

    def _ensure_schema(self) -> None:
        if self._schema_ready:
            return
        with self._schema_lock:
            if not self._schema_ready:
                _metadata.create_all(self.engine, checkfirst=True)
                _add_missing_columns(self.engine)
                self._schema_ready = True


def _add_missing_columns(engine: sa.Engine) -> None:
    present = {column["name"] for column in sa.inspect(engine).get_columns("predictions")}
    with engine.begin() as connection:
        for name in _ADDED_COLUMNS:
            if name not in present:
                column = predictions.c[name]
                kind = column.type.compile(dialect=engine.dialect)
                connection.execute(sa.text(f"ALTER TABLE predictions ADD COLUMN {name} {kind}"))


def _create_engine(url: sa.URL) -> sa.Engine:
    if url.get_backend_name() != "sqlite":
        connect_args = {"connect_timeout": CONNECT_TIMEOUT_S} if url.get_backend_name() == "postgresql" else {}
        return sa.create_engine(url, pool_pre_ping=True, connect_args=connect_args)
    if url.database in (None, "", ":memory:"):
        raise ValueError("the SQLite ledger must be a file (an in-memory database would lose every row)")
    Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, pool_pre_ping=True)

    @sa.event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        # WAL: readers (/readyz, reports) never block the writer. synchronous stays FULL (the default):
        # a committed row must survive a power cut, since its response has been sent.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.close()

    return engine


def _to_record(row: PredictionRow) -> dict[str, Any]:
    record = {name: getattr(row, name) for name in _ROW_FIELDS}  # flat values: asdict's deep copy costs more
    record["created_at"] = row.created_at.astimezone(timezone.utc)
    return record


def _from_record(record: Mapping[str, Any]) -> PredictionRow:
    values = {name: record[name] for name in _ROW_FIELDS}
    created_at = values["created_at"]
    # SQLite keeps no zone: the value was written as UTC.
    values["created_at"] = (
        created_at.replace(tzinfo=timezone.utc) if created_at.tzinfo is None else created_at.astimezone(timezone.utc)
    )
    return PredictionRow(**values)


def _reason(exc: BaseException) -> str:
    # The driver's first line names the cause (connection refused, shutting down) without the SQL or parameters.
    cause = getattr(exc, "orig", None) or exc
    first_line = (str(cause).strip().splitlines() or [""])[0]
    return f"{type(cause).__name__}: {first_line}" if first_line else type(cause).__name__
