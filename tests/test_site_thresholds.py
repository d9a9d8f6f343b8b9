"""A site's own operating point: chosen on its matured reads (a real SQLite ledger), set by an audited registry action
(a real MLflow registry), served at that site from the next alias check while other sites keep the bundle's."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from flows import cli
from flows.cli.options import console as cli_console
from pipeline.config import LoopConfig, RolloutConfig
from pipeline.loop.thresholds import (
    OperatingPoint,
    SiteThreshold,
    SiteThresholdError,
    choose_site_threshold,
    sensitivity_threshold,
)
from pipeline.registry.review import actions_for
from pipeline.registry.store import CHALLENGER, RegistryError
from pipeline.rollout.actions import rollout_actions
from pipeline.rollout.outcomes import OutcomeReport, record_outcomes
from pipeline.serving.bundle import SITE_THRESHOLDS_TAG, site_thresholds
from pipeline.serving.ledger import PredictionLedger, PredictionRow, new_inference_id
from pipeline.serving.service import API_KEY_ENV
from tests import test_serve
from tests.conftest import REPO
from tests.test_serve import API_KEY, NAME, Registered, ledger_rows, serve_config, served, upload

registered = test_serve.registered  # the fixture (found by name): a real registered model with its ONNX bundles

SITE, OTHER_SITE = "nih-cxr8", "kermany-pediatric"
SITES = (OTHER_SITE, SITE)
SOURCES = ("radiologist_read", "follow_up")
NOW = datetime(2026, 12, 7, 12, tzinfo=timezone.utc)
MATURED, FRESH = NOW - timedelta(days=4), NOW - timedelta(hours=1)  # rollout.maturity_hours is 72
SOURCE_THRESHOLD = 0.114
runner = CliRunner()


def _row(probability: float, *, site: str = SITE, model: str = "m", version: str = "1", shadow: tuple[str, float] | None = None) -> PredictionRow:
    return PredictionRow(
        new_inference_id(), NOW - timedelta(days=5), site, None, None, model, version, "champion", "0" * 64, "fp32",
        probability, int(probability >= SOURCE_THRESHOLD), SOURCE_THRESHOLD, 5.0, None, "champion" if shadow else None,
        shadow_version=shadow[0] if shadow else None, shadow_probability=shadow[1] if shadow else None,
        shadow_threshold=SOURCE_THRESHOLD if shadow else None,
    )  # fmt: skip


def _stored(ledger: PredictionLedger, labelled: list[tuple[PredictionRow, int | None]], recorded: datetime = MATURED) -> None:
    """The rows in the ledger, each with its label (None: unlabelled) reported at ``recorded``."""

    async def record() -> None:
        for row, _ in labelled:
            await ledger.record(row)

    asyncio.run(record())
    reports = [
        OutcomeReport("pneumonia" if label else "normal", "radiologist_read", row.inference_id)
        for row, label in labelled
        if label is not None
    ]
    if reports:
        record_outcomes(ledger, reports, SOURCES, recorded)


def _saturated(rng: np.random.Generator, count: int, spread: float) -> np.ndarray:
    """Probabilities bunched just below 1, as the Kermany-trained model gives NIH films (p = 0.9999 typical)."""
    return np.clip(1 - rng.beta(1.0, spread, count), 0, 1)


def test_the_threshold_is_the_highest_reaching_the_target_on_the_matured_reads_of_the_version(tmp_path):
    rng = np.random.default_rng(7)
    positives, normals = _saturated(rng, 40, 4000), _saturated(rng, 40, 1500)
    positives[:3] = 1.0  # ties at the top, as float32 saturates
    ledger = PredictionLedger(f"sqlite:///{tmp_path / 'ledger.db'}")
    try:
        answered = [(_row(p), 1) for p in positives[:30]] + [(_row(p), 0) for p in normals[:30]]
        # during a rollout v1 scored these unanswered: its shadow score is its read of the case
        shadowed = [(_row(0.5, version="2", shadow=("1", p)), 1) for p in positives[30:]]
        shadowed += [(_row(0.5, version="2", shadow=("1", p)), 0) for p in normals[30:]]
        ignored = [(_row(0.2, site=OTHER_SITE), 1), (_row(0.3, version="3"), 0), (_row(0.4, model="other"), 1),
                   (_row(0.01), None), (_row(0.02, version="2", shadow=("3", 0.02)), 1)]  # fmt: skip
        _stored(ledger, answered + shadowed + ignored)
        _stored(ledger, [(_row(0.001), 1), (_row(0.002), 1)], recorded=FRESH)  # labels not matured yet
        chosen = choose_site_threshold(
            ledger, "m", "1", SITE, SOURCE_THRESHOLD, LoopConfig(), RolloutConfig(), served_sites=SITES, now=NOW
        )
    finally:
        ledger.close()
    assert (chosen.reads, chosen.positives, chosen.target_sensitivity) == (80, 40, 0.9)
    sensitivity = lambda t: float(np.mean(positives >= t))  # noqa: E731
    specificity = lambda t: float(np.mean(normals < t))  # noqa: E731
    reaching = [t for t in np.unique(np.concatenate([positives, normals])) if sensitivity(t) >= 0.9]
    assert chosen.threshold == max(reaching) and sensitivity(chosen.threshold) >= 0.9  # highest t reaching the target
    assert sensitivity(np.nextafter(chosen.threshold, 2.0)) < 0.9  # any higher one misses it
    assert chosen.chosen.sensitivity == sensitivity(chosen.threshold) == 36 / 40
    assert chosen.chosen.specificity == specificity(chosen.threshold) > specificity(SOURCE_THRESHOLD)
    assert chosen.replaces == SOURCE_THRESHOLD and chosen.before.specificity == specificity(SOURCE_THRESHOLD) == 0.0
    for point in (chosen.chosen, chosen.before):
        for value, (low, high) in ((point.sensitivity, point.sensitivity_ci), (point.specificity, point.specificity_ci)):
            assert low <= value <= high
    assert chosen.chosen.sensitivity_ci[0] < 0.9 < chosen.chosen.sensitivity_ci[1] <= 1.0  # 40 positives: not exact
    # ⌈τ·P⌉ exactly where floating point rounds up (0.9 × 10 = 9.000000000000002) and at the extremes
    scores = np.linspace(0.1, 1.0, 10)
    assert sensitivity_threshold(np.ones(10, int), scores, 0.9) == pytest.approx(0.2)
    assert sensitivity_threshold(np.ones(10, int), scores, 0.05) == 1.0
    assert sensitivity_threshold(np.ones(10, int), scores, 0.99) == pytest.approx(0.1)


def test_too_few_reads_one_class_or_an_unknown_site_is_refused_naming_the_counts(tmp_path):
    ledger = PredictionLedger(f"sqlite:///{tmp_path / 'ledger.db'}")
    rng = np.random.default_rng(3)
    try:
        _stored(ledger, [(_row(p), 1) for p in _saturated(rng, 30, 4000)] + [(_row(p), 0) for p in _saturated(rng, 8, 1500)])

        def refusal(loop: LoopConfig, site: str = SITE) -> SiteThresholdError:
            with pytest.raises(SiteThresholdError) as refused:
                choose_site_threshold(ledger, "m", "1", site, 0.5, loop, RolloutConfig(), served_sites=SITES, now=NOW)
            return refused.value

        few = refusal(LoopConfig())
        assert few.rule == "too_few_reads" and few.exit_code == 2
        assert "38 matured labelled reads of nih-cxr8 scored by m v1 (30 pneumonia, 8 normal)" in str(few)
        assert "needs 40 (loop.min_threshold_reads)" in str(few)
        normals = refusal(LoopConfig(min_threshold_reads=20))
        assert normals.rule == "too_few_class_reads" and "needs 10 of each class" in str(normals)
        assert refusal(LoopConfig(min_threshold_reads=20), site="st-elsewhere").rule == "unknown_site"
        only_pneumonia = refusal(LoopConfig(min_threshold_reads=5, min_threshold_class_reads=1), site=OTHER_SITE)
        assert only_pneumonia.rule == "too_few_reads" and "0 matured labelled reads" in str(only_pneumonia)
        chosen = choose_site_threshold(ledger, "m", "1", SITE, 0.5, LoopConfig(min_threshold_reads=20, min_threshold_class_reads=8),
                                       RolloutConfig(), served_sites=SITES, now=NOW)  # fmt: skip
        assert chosen.reads == 38
        _stored(ledger, [(_row(p, site=OTHER_SITE), 1) for p in _saturated(rng, 12, 4000)])  # one class only
        one_class = refusal(LoopConfig(min_threshold_reads=5, min_threshold_class_reads=1), site=OTHER_SITE)
        assert one_class.rule == "too_few_class_reads" and "(12 pneumonia, 0 normal)" in str(one_class)
    finally:
        ledger.close()


def _cli_options(registered: Registered, tmp_path: Path, *extra: str) -> list[str]:
    settings = [*registered.overrides, f"serve.ledger_path={tmp_path / 'ledger.db'}", f"serve.image_store={tmp_path / 'images'}", *extra]
    return ["--config", str(REPO / "params.yaml"), *(arg for setting in settings for arg in ("--set", setting))]


@pytest.mark.slow
def test_the_registry_action_writes_tag_and_audit_entry_together_or_neither(registered, tmp_path, monkeypatch):
    ledger = PredictionLedger(f"sqlite:///{tmp_path / 'ledger.db'}")
    rng = np.random.default_rng(11)
    try:
        reads = [(_row(p, model=NAME, version="2"), 1) for p in _saturated(rng, 20, 4000)]
        reads += [(_row(p, model=NAME, version="2", site=OTHER_SITE), 1) for p in _saturated(rng, 20, 4000)]
        reads += [(_row(p, model=NAME, version="2", site=site), 0) for site in SITES for p in _saturated(rng, 20, 1500)]
        _stored(ledger, reads)
        chosen = {site: choose_site_threshold(ledger, NAME, "2", site, 0.5, LoopConfig(), RolloutConfig(), served_sites=SITES, now=NOW)
                  for site in SITES}  # fmt: skip
    finally:
        ledger.close()
    actions = actions_for(serve_config(registered, tmp_path))
    entries = len(actions.audit.entries())
    decided = actions.set_site_threshold(chosen[SITE], "dr. ada", "40 matured NIH reads")
    assert decided.action == "site-threshold" and decided.version == "2"
    tag = lambda: actions.registry.version(NAME, "2").tags.get(SITE_THRESHOLDS_TAG)  # noqa: E731
    assert json.loads(tag()) == {SITE: chosen[SITE].threshold}
    entry = actions.audit.entries()[-1]
    assert (entry.action, entry.version, entry.actor, entry.reason) == ("site-threshold", "2", "dr. ada", "40 matured NIH reads")
    evidence = entry.evidence["site_threshold"]
    assert (evidence["site"], evidence["before"]["threshold"], evidence["chosen"]["threshold"]) == (SITE, 0.5, chosen[SITE].threshold)
    assert evidence["reads"] == 40 and evidence["target_sensitivity"] == 0.9
    assert evidence["chosen"]["sensitivity_ci"] == list(chosen[SITE].chosen.sensitivity_ci)
    assert entry.evidence["site_thresholds_before"] == {} and entry.aliases_before == entry.aliases_after

    actions.set_site_threshold(chosen[OTHER_SITE], "dr. ada", "kermany reads too")  # merged with the other site's
    both = {SITE: chosen[SITE].threshold, OTHER_SITE: chosen[OTHER_SITE].threshold}
    assert json.loads(tag()) == both and len(actions.audit.entries()) == entries + 2

    monkeypatch.setattr(actions.audit, "append", lambda entry: (_ for _ in ()).throw(OSError("artifact store full")))
    moved = dataclasses.replace(chosen[SITE], site="st-elsewhere")
    with pytest.raises(OSError):
        actions.set_site_threshold(moved, "dr. ada", "no record, no change")
    assert json.loads(tag()) == both  # the tag went back: no threshold without its audit entry
    monkeypatch.undo()
    assert len(actions.audit.entries()) == entries + 2
    with pytest.raises(RegistryError, match="cannot be set on"):
        actions.set_site_threshold(dataclasses.replace(moved, model="another"), "dr. ada", "wrong model")
    with pytest.raises(RegistryError, match="reviewer"):
        actions.set_site_threshold(moved, " ", "no name")
    assert json.loads(tag()) == both


@pytest.mark.slow
def test_a_site_is_answered_at_its_own_threshold_from_the_next_alias_check_without_a_restart(
    registered, tmp_path, data_dir, monkeypatch
):
    extra = ["serve.poll_seconds=0.2", "rollout.maturity_hours=0", "loop.min_threshold_reads=16", "loop.min_threshold_class_reads=8"]
    cfg, options = serve_config(registered, tmp_path, *extra), _cli_options(registered, tmp_path, *extra)
    table = pd.read_csv(data_dir / "nih-cxr8" / "Data_Entry_2017.csv", dtype=str, keep_default_na=False)
    studies = [(name, 1) for name in table[table["Finding Labels"].str.contains("Pneumonia")]["Image Index"].head(8)]
    studies += [(name, 0) for name in table[table["Finding Labels"] == "No Finding"]["Image Index"].head(8)]
    key, probe = {"X-API-Key": API_KEY}, registered.images["nih"]
    command = ["registry", "site-threshold", SITE, "--reviewer", "dr. ada", "--reason", "16 NIH reads", *options]

    async def predict(client: httpx.AsyncClient, site: str) -> dict:
        return (await client.post("/v1/predict", **upload(probe, site=site))).json()

    async def scenario() -> dict:
        async with served(cfg, {API_KEY_ENV: API_KEY}) as client:
            for name, label in studies:  # served, read by a radiologist, labels matured (maturity 0 here)
                answer = (await client.post("/v1/predict", **upload(data_dir / "nih-cxr8" / "images" / name, site=SITE))).json()
                read = {"inference_id": answer["inference_id"], "label": "pneumonia" if label else "normal", "source": "radiologist_read"}
                assert (await client.post("/v1/feedback", json=read, headers=key)).status_code == 200
            before = await predict(client, SITE)
            dry = await asyncio.to_thread(runner.invoke, cli.app, [*command, "--dry-run"])
            await asyncio.sleep(0.6)  # three alias checks: a dry run changes nothing
            unchanged = (await client.get("/v1/models")).json()
            applied = await asyncio.to_thread(runner.invoke, cli.app, command)
            deadline = time.monotonic() + 30
            while not (models := (await client.get("/v1/models")).json())["site_thresholds"]:
                assert time.monotonic() < deadline, "the server never picked up the site's threshold"
                await asyncio.sleep(0.1)
            return {"before": before, "dry": dry, "unchanged": unchanged, "applied": applied, "models": models,
                    "site": await predict(client, SITE), "other": await predict(client, OTHER_SITE)}  # fmt: skip

    monkeypatch.setattr(cli_console, "width", 200)  # no wrapped table cells
    got = asyncio.run(scenario())
    assert got["dry"].exit_code == 0, got["dry"].output
    assert "dry run: nothing changed" in got["dry"].output and got["unchanged"]["site_thresholds"] == {}
    assert got["applied"].exit_code == 0, got["applied"].output
    assert "sensitivity (95% CI)" in got["applied"].output and "16 (8 / 8)" in got["applied"].output
    threshold = json.loads(actions_for(cfg).registry.version(NAME, "1").tags[SITE_THRESHOLDS_TAG])[SITE]
    assert got["models"]["site_thresholds"] == {SITE: threshold} and got["models"]["threshold"] == 0.5
    assert got["models"]["model"]["version"] == "1"  # the same version, not reloaded from scratch
    assert f"{threshold:.6g}" in got["applied"].output
    assert got["before"]["threshold"] == 0.5 and threshold != 0.5
    probability = registered.expected("1", probe)
    for name, site_threshold in (("site", threshold), ("other", 0.5)):  # another site keeps the bundle's threshold
        answer = got[name]
        assert answer["threshold"] == site_threshold and answer["probability"] == pytest.approx(probability, abs=1e-6)
        assert answer["decision"] == ("pneumonia" if answer["probability"] >= site_threshold else "normal")
    rows = ledger_rows(cfg)
    assert rows[got["site"]["inference_id"]].threshold == threshold and rows[got["other"]["inference_id"]].threshold == 0.5
    assert rows[got["site"]["inference_id"]].decision == (got["site"]["decision"] == "pneumonia")
    entry = actions_for(cfg).audit.entries()[-1]
    assert entry.action == "site-threshold" and entry.evidence["site_threshold"]["reads"] == 16


@pytest.mark.slow
def test_a_rollouts_challenger_scores_at_its_own_site_threshold_and_follows_a_new_one_live(registered, tmp_path):
    cfg = serve_config(registered, tmp_path, "serve.poll_seconds=0.2")
    rollouts = rollout_actions(cfg)
    registry = rollouts.actions.registry

    def chosen(threshold: float) -> SiteThreshold:  # the action's input; how it is chosen is tested above
        point = OperatingPoint(threshold, 0.9, (0.8, 1.0), 0.5, (0.4, 0.6))
        return SiteThreshold(NAME, "2", SITE, 0.9, point, point, 40, 20, NOW.isoformat())

    async def shadow_threshold(client: httpx.AsyncClient, site: str) -> float | None:
        answer = (await client.post("/v1/predict", **upload(registered.images["nih"], site=site))).json()
        assert answer["model"]["version"] == "1" and answer["arm"] == "champion", answer
        return ledger_rows(cfg)[answer["inference_id"]].shadow_threshold

    async def scenario() -> tuple[float | None, float | None, float | None]:
        async with served(cfg) as client:
            first, other = await shadow_threshold(client, SITE), await shadow_threshold(client, OTHER_SITE)
            await asyncio.to_thread(rollouts.actions.set_site_threshold, chosen(0.25), "dr. ada", "more NIH reads")
            deadline = time.monotonic() + 30
            while (later := await shadow_threshold(client, SITE)) != 0.25:
                assert time.monotonic() < deadline, "the challenger's new site threshold was never picked up"
                await asyncio.sleep(0.1)
            return first, other, later

    rollouts.actions.set_site_threshold(chosen(0.75), "dr. ada", "NIH reads of the challenger")
    registry.move_alias(NAME, CHALLENGER, "2")
    rollouts.start("shadow", "dr. ada", "v2 in shadow")
    try:
        first, other, later = asyncio.run(scenario())
    finally:
        rollouts.stop("dr. ada", "test over")
        registry.move_alias(NAME, CHALLENGER, None)
    assert first == 0.75 and later == 0.25  # the unanswered model's own operating point at the site, live
    assert other == site_thresholds(registry.version(NAME, "2").tags).get(OTHER_SITE, 0.5)


@pytest.mark.slow
def test_the_command_refuses_bad_input_with_one_line_exit_2_and_writes_nothing(registered, tmp_path):
    options = _cli_options(registered, tmp_path)
    actions = actions_for(serve_config(registered, tmp_path))
    before = (actions.registry.version(NAME, "2").tags.get(SITE_THRESHOLDS_TAG), len(actions.audit.entries()))
    base = ["registry", "site-threshold", "--reviewer", "dr. ada", "--reason", "r", *options]
    for site, version, rule in ((SITE, "2", "too_few_reads"), ("st-elsewhere", "2", "unknown_site"), (SITE, "99", "unknown_version")):
        refused = runner.invoke(cli.app, [*base[:2], site, *base[2:], "--version", version])
        assert refused.exit_code == 2 and rule in refused.output and "Traceback" not in refused.output, refused.output
    after = (actions.registry.version(NAME, "2").tags.get(SITE_THRESHOLDS_TAG), len(actions.audit.entries()))
    assert after == before
