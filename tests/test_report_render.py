"""The rollout report as a reviewer's browser shows it: rendered by headless Chromium, no console message (the
page has no script that could fail), the decision, the ROC figure and the per-site tables present."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import load_config
from pipeline.rollout.analysis import analyse_rollout
from pipeline.rollout.outcomes import OutcomeReport, record_outcomes
from pipeline.rollout.report import render_report
from pipeline.serving.ledger import PredictionLedger
from tests.conftest import REPO
from tests.test_rollout import _rollout, _rollout_rows
from tests.test_serving_ledger import T0

CHROMIUM = shutil.which("chromium")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make test installs it with apt-get)")
def test_the_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    cfg = load_config(REPO / "params.yaml")
    rollout = _rollout(0.0)
    ledger = PredictionLedger(f"sqlite:///{tmp_path / 'ledger.db'}")
    rows, labels = _rollout_rows(rollout, 120, challenger_better=True, seed=11)
    for row in rows:
        asyncio.run(ledger.record(row))
    reports = [OutcomeReport(("normal", "pneumonia")[y], "follow_up", inference_id=r.inference_id) for r, y in zip(rows, labels, strict=True)]
    record_outcomes(ledger, reports, cfg.rollout.outcome_sources, now=T0)
    analysis = analyse_rollout(ledger, rollout, cfg.rollout, now=T0 + timedelta(days=4))
    ledger.close()
    page = render_report(analysis, tmp_path / "report.html")

    browser = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
               f"--user-data-dir={tmp_path / 'profile'}"]  # fmt: skip
    dom = subprocess.run([*browser, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "CONSOLE" not in dom.stderr, [line for line in dom.stderr.splitlines() if "CONSOLE" in line]
    assert 'id="decision"' in dom.stdout and f">{analysis.decision}<" in dom.stdout
    assert 'id="roc"' in dom.stdout and "<svg" in dom.stdout and 'id="per-site"' in dom.stdout
    shot = tmp_path / "report.png"
    subprocess.run([*browser, f"--screenshot={shot}", "--window-size=1200,1600", page.as_uri()], capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.std() > 10  # the page drew something: figures and tables, not a blank
