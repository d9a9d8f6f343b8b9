"""The prediction ledger (SQLite and a real PostgreSQL) and the served-image store."""

from __future__ import annotations

import asyncio
import io
import time
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image, PngImagePlugin

from pipeline.config import IngestConfig, ServeConfig
from pipeline.errors import ConfigError
from pipeline.serving.image_store import ImageStore, ImageStoreError
from pipeline.serving.ledger import (
    LedgerUnavailable,
    NoSiteSalt,
    PredictionLedger,
    PredictionRow,
    new_inference_id,
    pseudonym,
    pseudonymise_ids,
    resolve_ledger_url,
)
from tests.pg_fixture import PostgresServer, postgres_server  # noqa: F401

SALT = "0123456789abcdef-test-salt"
RAW_PATIENT_ID = "MRN-4471-SMITH"
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)


def make_row(index: int = 0, **changes: object) -> PredictionRow:
    row = PredictionRow(
        inference_id=new_inference_id(),
        created_at=T0 + timedelta(milliseconds=index),
        site="kermany",
        patient_pseudonym=None,
        study_pseudonym=None,
        model_name="crosssim",
        model_version="3",
        model_alias="champion",
        artifact_sha256="ab" * 32,
        precision="fp32",
        probability=(index % 100) / 100 + 0.001,
        decision=index % 2,
        threshold=0.5,
        latency_ms=12.5,
        converted_from="RGBA" if index % 3 == 0 else None,
        arm=None,
    )
    return replace(row, **changes)


@pytest.fixture()
def ledger(tmp_path: Path):
    opened = PredictionLedger(f"sqlite:///{tmp_path / 'ledger' / 'ledger.db'}")
    yield opened
    opened.close()


def test_concurrent_records_share_commits_and_match_one_to_one(ledger: PredictionLedger) -> None:
    commits = []
    sa.event.listen(ledger.engine, "commit", lambda connection: commits.append(1))
    rows = [make_row(i) for i in range(300)]

    async def record_all() -> None:
        await asyncio.gather(*(ledger.record(row) for row in rows))

    asyncio.run(record_all())
    assert 1 <= len(commits) < len(rows)
    assert ledger.rows() == sorted(rows, key=lambda row: (row.created_at, row.inference_id))
    assert ledger.get(rows[7].inference_id) == rows[7]
    assert ledger.get(new_inference_id()) is None
    assert ledger.healthy()


def test_ledger_is_sqlite_wal_and_readers_filter(ledger: PredictionLedger) -> None:
    study = pseudonym("study-1", SALT)
    rows = [make_row(i, study_pseudonym=study if i < 2 else None) for i in range(4)]
    rows[3] = replace(rows[3], probability=np.float32(0.75), decision=np.int64(1))  # as ONNX Runtime gives them

    async def record_all() -> None:
        for row in rows:
            await ledger.record(row)

    asyncio.run(record_all())
    with ledger.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() > 0
    assert ledger.rows(study_pseudonym=study) == rows[:2]
    assert ledger.rows(since=rows[2].created_at) == rows[2:]
    assert ledger.rows(limit=1) == rows[:1]


def test_close_commits_pending_rows_then_refuses(tmp_path: Path) -> None:
    ledger = PredictionLedger(f"sqlite:///{tmp_path / 'ledger.db'}")
    rows = [make_row(i) for i in range(50)]

    async def record_then_close() -> None:
        pending = [asyncio.ensure_future(ledger.record(row)) for row in rows]
        await asyncio.sleep(0)  # every record() has queued its row
        await asyncio.to_thread(ledger.close)
        await asyncio.gather(*pending)
        with pytest.raises(LedgerUnavailable, match="closed"):
            await ledger.record(make_row(99))

    asyncio.run(record_then_close())
    reopened = PredictionLedger(f"sqlite:///{tmp_path / 'ledger.db'}")
    assert len(reopened.rows()) == len(rows)
    reopened.close()


def test_raw_patient_id_never_reaches_the_database_file(tmp_path: Path) -> None:
    environ = {"CROSSSIM_DICOM_SALT_KERMANY": SALT}
    ids = pseudonymise_ids("kermany", f" {RAW_PATIENT_ID} ", "STUDY-777", IngestConfig(), environ)
    assert ids.patient == pseudonym(RAW_PATIENT_ID, SALT)  # the pseudonym ingest gives this PatientID
    ledger = PredictionLedger(f"sqlite:///{tmp_path / 'ledger.db'}")
    row = make_row(patient_pseudonym=ids.patient, study_pseudonym=ids.study)
    asyncio.run(ledger.record(row))
    ledger.close()
    stored = b"".join(path.read_bytes() for path in tmp_path.iterdir())
    assert ids.patient.encode() in stored and ids.study.encode() in stored
    assert RAW_PATIENT_ID.encode() not in stored and b"STUDY-777" not in stored


def test_ids_without_a_site_salt_are_refused_and_raw_ids_rejected() -> None:
    assert pseudonymise_ids("kermany", None, " ", IngestConfig(), {}).patient is None
    with pytest.raises(NoSiteSalt, match=r"site 'kermany'.*CROSSSIM_DICOM_SALT_KERMANY"):
        pseudonymise_ids("kermany", RAW_PATIENT_ID, None, IngestConfig(), {"CROSSSIM_DICOM_SALT_NIH": SALT})
    with pytest.raises(ValueError, match="raw ids are never stored"):
        make_row(patient_pseudonym=RAW_PATIENT_ID)
    with pytest.raises(ValueError, match="timezone-aware"):
        make_row(created_at=datetime(2025, 1, 1))


def test_ledger_url_resolution(tmp_path: Path) -> None:
    default = ServeConfig(ledger_path=tmp_path / "l.db")
    assert resolve_ledger_url(default, {}) == f"sqlite:///{tmp_path / 'l.db'}"
    environ = {"CROSSSIM_LEDGER_URL": "postgresql+psycopg://u@db/ledger"}
    assert resolve_ledger_url(default, environ) == "postgresql+psycopg://u@db/ledger"
    configured = ServeConfig(ledger_url="sqlite:///other.db")
    assert resolve_ledger_url(configured, environ) == "sqlite:///other.db"
    with pytest.raises(ConfigError, match="not a usable SQLAlchemy URL"):
        PredictionLedger("nosuchdb://x")
    with pytest.raises(ConfigError, match="must be a file"):
        PredictionLedger("sqlite://")


def png_bytes(metadata: dict[str, str] | None = None) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    Image.fromarray(np.arange(64 * 64, dtype=np.uint8).reshape(64, 64)).save(buffer, "PNG", pnginfo=info)
    return buffer.getvalue()


def test_image_store_put_get_purge(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images", retention_days=2)
    image = png_bytes()
    old, boundary, recent = new_inference_id(), new_inference_id(), new_inference_id()
    now = T0 + timedelta(days=3)
    store.put(old, image, created_at=T0 - timedelta(days=1))
    store.put(boundary, image, created_at=now - timedelta(days=2, minutes=1))  # same UTC day as the cutoff
    path = store.put(recent, image, created_at=now - timedelta(days=2) + timedelta(minutes=1))
    assert path is not None and path.read_bytes() == image and path.parent.parent == tmp_path / "images"
    assert not [p for p in (tmp_path / "images").rglob("*") if p.is_file() and p.suffix != ".png"]
    assert store.get(old) is not None and store.get(new_inference_id()) is None
    (tmp_path / "images" / "notes").mkdir()  # not a day folder: left alone

    assert store.purge(now) == 2
    assert store.get(old) is None and store.get(boundary) is None and store.get(recent) == path
    assert (tmp_path / "images" / "notes").is_dir()
    assert store.purge(now) == 0


def test_image_store_refuses_metadata_and_keeps_nothing_at_zero_retention(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images", retention_days=1)
    with pytest.raises(ImageStoreError, match="tEXt"):
        store.put(new_inference_id(), png_bytes({"PatientName": "SMITH^JOHN"}))
    with pytest.raises(ImageStoreError, match="PNG or JPEG"):
        store.put(new_inference_id(), b"DICM" + b"\0" * 200)
    with pytest.raises(ImageStoreError, match="truncated"):
        store.put(new_inference_id(), png_bytes()[:100])
    with pytest.raises(ImageStoreError, match="inference_id"):
        store.put("../../etc/passwd", png_bytes())
    assert not (tmp_path / "images").exists()

    keep_none = ImageStore(tmp_path / "none", retention_days=0)
    assert keep_none.put(new_inference_id(), png_bytes()) is None
    assert not (tmp_path / "none").exists()


@pytest.mark.slow  # a PostgreSQL server, stopped and restarted
def test_postgres_stopped_under_load_gives_unavailable_then_recovers(postgres_server: PostgresServer) -> None:
    ledger = PredictionLedger(postgres_server.url)
    attempted: dict[str, PredictionRow] = {}
    acknowledged: list[str] = []
    acknowledged_after_restart: list[str] = []
    errors: list[BaseException] = []
    phase = {"name": "up"}

    async def client(worker: int) -> None:
        index = worker * 100_000
        while phase["name"] != "done":
            index += 1
            row = make_row(index)
            attempted[row.inference_id] = row
            try:
                await ledger.record(row)
            except Exception as exc:  # anything but LedgerUnavailable fails the test below
                errors.append(exc)
                await asyncio.sleep(0.01)
                continue
            acknowledged.append(row.inference_id)
            if phase["name"] == "restarted":
                acknowledged_after_restart.append(row.inference_id)

    async def wait_for(condition, what: str, timeout_s: float = 15.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.01)

    async def scenario() -> None:
        clients = [asyncio.ensure_future(client(worker)) for worker in range(8)]
        await wait_for(lambda: len(acknowledged) >= 200, "rows before the stop")
        await asyncio.to_thread(postgres_server.stop)
        phase["name"] = "stopped"
        await wait_for(lambda: len(errors) >= 5, "refusals while stopped")
        assert not await asyncio.to_thread(ledger.healthy)
        await asyncio.to_thread(postgres_server.start)
        phase["name"] = "restarted"
        await wait_for(lambda: len(acknowledged_after_restart) >= 100, "rows after the restart")
        phase["name"] = "done"
        await asyncio.gather(*clients)

    asyncio.run(scenario())
    assert ledger.healthy()
    assert errors and all(type(error) is LedgerUnavailable for error in errors), {type(e) for e in errors}
    stored = {row.inference_id: row for row in ledger.rows()}
    assert set(acknowledged) <= set(stored)  # every acknowledged row is in the table
    # Nothing half-written: each stored row is exactly one that was sent (a commit cut before its
    # acknowledgement may have landed; that request answered 503, never 200 without a row).
    assert all(attempted[inference_id] == row for inference_id, row in stored.items())
    ledger.close()
