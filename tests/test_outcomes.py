"""Outcomes joined to predictions (SQLite and a real PostgreSQL): by inference id and by study, idempotent,
conflicts kept and settled by source precedence, labels pending until mature; the CSV import names a bad row."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from flows import cli
from pipeline.rollout.outcomes import OutcomeError, OutcomeReport, matured_labels, record_outcomes
from pipeline.serving.ledger import PredictionLedger, outcomes, pseudonym
from tests.pg_fixture import ledger_db, postgres_server  # noqa: F401
from tests.test_serving_ledger import T0, make_row

SOURCES = ("radiologist_read", "follow_up")
SALT = "0123456789abcdef-test-salt"
MATURITY = timedelta(hours=72)


def _stored(ledger: PredictionLedger) -> int:
    with ledger.transaction() as connection:
        return connection.execute(sa.select(sa.func.count()).select_from(outcomes)).scalar_one()


def test_outcomes_join_dedupe_conflict_and_mature(ledger_db: PredictionLedger) -> None:  # noqa: F811
    ledger = ledger_db
    study = pseudonym("ACC-1001", SALT)
    first, second, repeat = make_row(1), make_row(2, study_pseudonym=study), make_row(3, study_pseudonym=study)
    for row in (first, second, repeat):
        asyncio.run(ledger.record(row))
    day1, day2 = T0 + timedelta(days=1), T0 + timedelta(days=2)

    read = OutcomeReport("pneumonia", "radiologist_read", inference_id=first.inference_id, observed_at=day1)
    results = record_outcomes(ledger, [read], SOURCES, now=day1)
    assert [r.status for r in results] == ["recorded"]
    assert record_outcomes(ledger, [read], SOURCES, now=day1)[0].status == "duplicate"  # a retry stores nothing
    follow_up = OutcomeReport("normal", "follow_up", inference_id=first.inference_id)
    assert record_outcomes(ledger, [follow_up], SOURCES, now=day2)[0].status == "conflict"
    by_study = OutcomeReport("normal", "follow_up", study_pseudonym=study)
    recorded = record_outcomes(ledger, [by_study], SOURCES, now=day2)[0]
    assert recorded.status == "recorded" and recorded.inference_ids == (second.inference_id, repeat.inference_id)
    assert _stored(ledger) == 4

    # A bad report refuses its whole call: the good one beside it is not stored either
    unknown = OutcomeReport("normal", "follow_up", inference_id="f" * 32, where="row 3")
    with pytest.raises(OutcomeError, match="row 3: no prediction has inference_id") as refused:
        record_outcomes(ledger, [OutcomeReport("pneumonia", "follow_up", inference_id=second.inference_id), unknown], SOURCES, now=day2)
    assert refused.value.status == 404 and _stored(ledger) == 4
    for report, rule in (
        (OutcomeReport("pnuemonia", "follow_up", inference_id=first.inference_id), "unknown_label"),
        (OutcomeReport("normal", "hearsay", inference_id=first.inference_id), "unknown_source"),
        (OutcomeReport("normal", "follow_up", inference_id=first.inference_id, observed_at=day2 + timedelta(days=1)), "future_time"),
        (OutcomeReport("normal", "follow_up"), "missing_reference"),
    ):
        with pytest.raises(OutcomeError) as refused:
            record_outcomes(ledger, [report], SOURCES, now=day2)
        assert refused.value.rule == rule and refused.value.status == 422
    assert _stored(ledger) == 4

    # Pending until mature; precedence settles the conflict (the read outranks the later follow-up)
    assert matured_labels(ledger, SOURCES, MATURITY, now=day2) == {}
    labels = matured_labels(ledger, SOURCES, MATURITY, now=day2 + MATURITY)
    assert set(labels) == {first.inference_id, second.inference_id, repeat.inference_id}
    assert (labels[first.inference_id].label, labels[first.inference_id].source, labels[first.inference_id].conflict) == (
        1, "radiologist_read", True
    )  # fmt: skip
    assert labels[second.inference_id].label == 0 and not labels[second.inference_id].conflict
    only_first_matured = matured_labels(ledger, SOURCES, MATURITY, now=day1 + MATURITY)
    assert set(only_first_matured) == {first.inference_id} and not only_first_matured[first.inference_id].conflict


def test_feedback_import_is_all_or_nothing_and_names_the_bad_row(tmp_path: Path, monkeypatch) -> None:
    ledger_path = tmp_path / "ledger.db"
    ledger = PredictionLedger(f"sqlite:///{ledger_path}")
    study = pseudonym("ACC-2002", SALT)
    rows = [make_row(1), make_row(2, site="nih-cxr8", study_pseudonym=study)]
    for row in rows:
        asyncio.run(ledger.record(row))
    monkeypatch.setenv("CROSSSIM_DICOM_SALT_NIH_CXR8", SALT)
    options = ["--set", f"serve.ledger_path={ledger_path}", "--set", "serve.ledger_url=null"]
    runner = CliRunner()

    bad = tmp_path / "labels.csv"
    bad.write_text(
        "inference_id,study_id,site,label,source,observed_at\n"
        f"{rows[0].inference_id},,,pneumonia,radiologist_read,2025-03-02T09:00Z\n"
        ",ACC-2002,nih-cxr8,pnuemonia,follow_up,\n"
    )
    refused = runner.invoke(cli.app, ["feedback", "import", str(bad), *options])
    assert refused.exit_code == 2 and "labels.csv row 3" in refused.output and "pnuemonia" in refused.output
    assert _stored(ledger) == 0

    good = tmp_path / "labels-fixed.csv"
    good.write_text(bad.read_text().replace("pnuemonia", "normal"))
    imported = runner.invoke(cli.app, ["feedback", "import", str(good), *options])
    assert imported.exit_code == 0, imported.output
    again = runner.invoke(cli.app, ["feedback", "import", str(good), *options])
    assert again.exit_code == 0 and _stored(ledger) == 2
    labels = matured_labels(ledger, SOURCES, timedelta(0))
    assert {key: label.label for key, label in labels.items()} == {rows[0].inference_id: 1, rows[1].inference_id: 0}

    odd = tmp_path / "odd.csv"
    odd.write_text("id,label,source\nx,normal,follow_up\n")
    columns = runner.invoke(cli.app, ["feedback", "import", str(odd), *options])
    assert columns.exit_code == 2 and "unknown: id" in columns.output
    ledger.close()
