"""The read worklist on real NIH images: strategies on their embeddings, and the ledger's record of what was asked."""

from __future__ import annotations

import io
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from flows import cli
from pipeline.config import LoopConfig, load_config
from pipeline.data.images import decode_image
from pipeline.data.preprocessing import Preprocessing
from pipeline.loop.selection import select, threshold_margin
from pipeline.loop.worklist import WorklistError, build_worklist
from pipeline.rollout.drift import image_embedding
from pipeline.rollout.outcomes import OutcomeReport, record_outcomes
from pipeline.serving.image_store import ImageStore
from pipeline.serving.ledger import PredictionLedger, PredictionRow, new_inference_id, read_requests
from tests.conftest import REPO

SITES = ("kermany-pediatric", "nih-cxr8")
SOURCES = ("radiologist_read", "follow_up")
PREPROCESSING = Preprocessing(64)
NOW = datetime(2026, 12, 7, 12, tzinfo=timezone.utc)
runner = CliRunner()


@pytest.fixture(scope="module")
def nih_images(data_dir: Path) -> list[Path]:
    table = pd.read_csv(data_dir / "nih-cxr8" / "Data_Entry_2017.csv", dtype=str, keep_default_na=False)
    return [data_dir / "nih-cxr8" / "images" / name for name in table["Image Index"].head(60)]


@pytest.fixture(scope="module")
def embeddings(nih_images: list[Path]) -> np.ndarray:
    return image_embedding(np.stack([PREPROCESSING.image(decode_image(path)) for path in nih_images]))


def _probabilities(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.0, 1.0, count)


def _mean_pairwise(points: np.ndarray) -> float:
    standardised = (points - points.mean(0)) / np.where(points.std(0) == 0, 1, points.std(0))
    distances = np.linalg.norm(standardised[:, None] - standardised[None], axis=2)
    return float(distances[np.triu_indices(len(points), 1)].mean())


def test_uncertainty_asks_for_the_cases_nearest_the_operating_threshold(embeddings):
    p = _probabilities(len(embeddings))
    thresholds = np.full(len(p), 0.114)  # a source-chosen operating point far from 0.5
    picked = select("uncertainty", 10, p, thresholds, embeddings).indices
    assert len(set(picked.tolist())) == 10
    margin = threshold_margin(p, thresholds)
    assert margin[picked].max() <= np.sort(margin)[9] + 1e-12  # exactly the 10 closest to flipping
    assert np.all(np.abs(np.log(p[picked] / (1 - p[picked])) - np.log(0.114 / 0.886)) < 1.0)
    # saturated probabilities (p = 0.9999 and 1.0 in float32) still rank, far from the threshold
    assert threshold_margin(np.array([1.0, 0.9999]), np.array([0.114, 0.114])).tolist()[0] > 10


def test_diverse_spreads_its_picks_over_the_real_embeddings_and_avoids_the_labelled(embeddings):
    p, thresholds = _probabilities(len(embeddings)), np.full(len(embeddings), 0.5)
    candidates, labelled = embeddings[:50], embeddings[50:]
    diverse = select("diverse", 8, p[:50], thresholds[:50], candidates, labelled).indices
    uncertain = select("uncertainty", 8, p[:50], thresholds[:50], candidates).indices
    randoms = [select("random", 8, p[:50], thresholds[:50], candidates, seed=seed).indices for seed in range(20)]
    assert len(set(diverse.tolist())) == 8
    spread = _mean_pairwise(candidates[diverse])
    assert spread > _mean_pairwise(candidates[uncertain])
    assert spread > np.mean([_mean_pairwise(candidates[r]) for r in randoms])
    # each pick is farther from what is labelled than a typical candidate is
    def nearest_labelled(points: np.ndarray) -> np.ndarray:
        return np.linalg.norm(points[:, None] - labelled[None], axis=2).min(1)

    assert np.median(nearest_labelled(candidates[diverse])) > np.median(nearest_labelled(candidates))


def test_hybrid_picks_spread_cases_among_the_uncertain_and_never_one_twice(embeddings):
    p, thresholds = _probabilities(len(embeddings), 3), np.full(len(embeddings), 0.3)
    hybrid = select("hybrid", 6, p, thresholds, embeddings, pool_factor=3.0).indices
    pool = np.argsort(threshold_margin(p, thresholds))[:18]
    assert set(hybrid.tolist()) <= set(pool.tolist()) and len(set(hybrid.tolist())) == 6
    duplicated = np.concatenate([embeddings[:5], embeddings[:5]])  # exact copies: still distinct picks
    copies = select("diverse", 10, np.full(10, 0.5), np.full(10, 0.5), duplicated).indices
    assert sorted(copies.tolist()) == list(range(10))
    assert len(select("hybrid", 100, p, thresholds, embeddings).indices) == len(embeddings)  # budget > candidates
    with pytest.raises(ValueError, match="budget"):
        select("random", 0, p, thresholds, embeddings)


def _served_site(tmp_path: Path, nih_images: list[Path], sites=SITES, count: int = 24):
    """A ledger and an image store holding ``count`` real NIH studies served at each site."""
    ledger = PredictionLedger(f"sqlite:///{tmp_path / 'ledger.db'}")
    images = ImageStore(tmp_path / "images", retention_days=90)
    rows = []
    rng = np.random.default_rng(1)
    for site_index, site in enumerate(sites):
        for index, path in enumerate(nih_images[site_index * count : (site_index + 1) * count]):
            served_at = NOW - timedelta(days=2, minutes=index)
            row = PredictionRow(
                new_inference_id(), served_at, site, None, f"{site_index:02x}{index:014x}", "m", "1", "champion",
                "0" * 64, "fp32", float(rng.uniform()), 0, 0.114, 5.0, None, None,
            )  # fmt: skip
            buffer = io.BytesIO()
            Image.open(path).convert("L").save(buffer, format="PNG")
            images.put(row.inference_id, buffer.getvalue(), served_at)
            rows.append(row)
    import asyncio

    async def record() -> None:
        for row in rows:
            await ledger.record(row)

    asyncio.run(record())
    return ledger, images, rows


def test_worklist_records_what_it_asked_never_asks_twice_and_shares_the_budget(tmp_path, nih_images):
    ledger, images, rows = _served_site(tmp_path, nih_images)
    try:
        by_id = {row.inference_id: row for row in rows}
        nih = [row for row in rows if row.site == "nih-cxr8"]
        record_outcomes(ledger, [OutcomeReport("pneumonia", "radiologist_read", nih[0].inference_id)], SOURCES, NOW)
        first = build_worklist(ledger, images, SITES, 9, LoopConfig(), PREPROCESSING, served_sites=SITES, now=NOW)
        assert first.recorded and [item.rank for item in first.items] == list(range(1, 10))
        asked = {item.site: 0 for item in first.items}
        for item in first.items:
            asked[item.site] += 1
        assert sorted(asked.values()) == [4, 5]  # shared evenly between the two sites
        assert nih[0].inference_id not in {item.inference_id for item in first.items}  # labelled: not asked
        second = build_worklist(ledger, images, ["nih-cxr8"], 30, LoopConfig(), PREPROCESSING, served_sites=SITES, now=NOW)
        first_ids = {item.inference_id for item in first.items}
        second_ids = {item.inference_id for item in second.items}
        assert not first_ids & second_ids  # pending: never offered again
        nih_first = sum(by_id[i].site == "nih-cxr8" for i in first_ids)
        assert len(second_ids) == 24 - 1 - nih_first  # every other nih case, once
        summary = {site.site: site for site in second.sites}["nih-cxr8"]
        assert (summary.labelled, summary.pending, summary.asked) == (1, nih_first, len(second_ids))
        with ledger.transaction() as connection:
            stored = connection.execute(read_requests.select()).all()
        assert len(stored) == 9 + len(second_ids)
        # a read for a requested case, and one nobody asked for (accepted, counted as unrequested)
        requested, unrequested = next(iter(second_ids)), nih[0].inference_id
        results = record_outcomes(ledger, [
            OutcomeReport("normal", "radiologist_read", requested), OutcomeReport("normal", "follow_up", unrequested),
        ], SOURCES, NOW)  # fmt: skip
        assert [result.requested for result in results] == [True, False]
        empty = build_worklist(ledger, images, ["nih-cxr8"], 5, LoopConfig(), PREPROCESSING, served_sites=SITES, now=NOW)
        assert empty.items == () and not empty.recorded
    finally:
        ledger.close()


def test_worklist_preview_window_and_refusals(tmp_path, nih_images):
    ledger, images, rows = _served_site(tmp_path, nih_images, sites=("nih-cxr8",), count=12)
    try:
        preview = build_worklist(ledger, images, ["nih-cxr8"], 5, LoopConfig(), PREPROCESSING, served_sites=SITES,
                                 strategy="uncertainty", record=False, now=NOW)  # fmt: skip
        assert not preview.recorded and len(preview.items) == 5
        margins = threshold_margin(np.array([r.probability for r in rows]), np.full(len(rows), 0.114))
        assert {item.inference_id for item in preview.items} == {rows[i].inference_id for i in np.argsort(margins)[:5]}
        later = NOW + timedelta(days=40)  # past loop.worklist_window_days: nothing is a candidate any more
        stale = build_worklist(ledger, images, ["nih-cxr8"], 5, LoopConfig(), PREPROCESSING, served_sites=SITES, now=later)
        assert stale.items == ()
        for sites, budget, strategy, rule in (
            (["st-elsewhere"], 5, None, "unknown_site"), (["nih-cxr8"], 0, None, "invalid_budget"),
            (["nih-cxr8"], 5, "greedy", "unknown_strategy"), (["nih-cxr8", "nih-cxr8"], 5, None, "duplicate_site"),
        ):  # fmt: skip
            with pytest.raises(WorklistError) as refused:
                build_worklist(ledger, images, sites, budget, LoopConfig(), PREPROCESSING, served_sites=SITES,
                               strategy=strategy, now=NOW)  # fmt: skip
            assert refused.value.rule == rule
        with ledger.transaction() as connection:
            assert connection.execute(read_requests.select()).all() == []  # previews and refusals record nothing
    finally:
        ledger.close()


def test_crosssim_worklist_command(tmp_path, nih_images):
    ledger, _, _ = _served_site(tmp_path, nih_images, sites=("nih-cxr8",), count=10)
    ledger.close()
    options = ["--set", f"serve.ledger_path={tmp_path / 'ledger.db'}", "--set", f"serve.image_store={tmp_path / 'images'}",
               "--config", str(REPO / "params.yaml")]  # fmt: skip
    listed = runner.invoke(cli.app, ["worklist", "nih-cxr8", "--budget", "4", "--csv", str(tmp_path / "w.csv"), *options])
    assert listed.exit_code == 0, listed.output
    assert "recorded as asked for" in listed.output and len(pd.read_csv(tmp_path / "w.csv")) == 4
    unknown = runner.invoke(cli.app, ["worklist", "st-elsewhere", "--budget", "4", *options])
    assert unknown.exit_code == 2 and "unknown_site" in unknown.output and "Traceback" not in unknown.output
    zero = runner.invoke(cli.app, ["worklist", "nih-cxr8", "--budget", "0", *options])
    assert zero.exit_code == 2 and "Traceback" not in zero.output
    cfg = load_config(REPO / "params.yaml")
    assert cfg.loop.worklist_strategy == "uncertainty"  # what make bench-loop chose
