"""The change-control record is rendered from the configuration: every value and key in it is the config's."""

from __future__ import annotations

from typer.testing import CliRunner

from flows import cli
from pipeline.config import PipelineConfig, load_config
from pipeline.loop.change_plan import change_plan, render_markdown
from tests.conftest import REPO

runner = CliRunner()


def _resolves(cfg: PipelineConfig, key: str) -> bool:
    node = cfg
    for part in key.split("."):
        if not hasattr(node, part):
            return False
        node = getattr(node, part)
    return True


def test_change_plan_names_only_real_keys_and_follows_the_configuration():
    review = change_plan(load_config(REPO / "params.yaml"))
    auto = change_plan(load_config(REPO / "params.yaml", ["rollout.policy=auto", "loop.retrain_steps=77", "loop.source_replay=0.5"]))
    sections = ("modifications", "data_protocol", "retraining_protocol", "acceptance", "rollout_and_rollback", "needs_a_human")
    for plan in (review, auto):
        keys = [key for section in sections for item in getattr(plan, section) for key in item.keys]
        assert keys and all(_resolves(load_config(REPO / "params.yaml"), key) for key in keys), keys
    assert not review.automatic and auto.automatic
    assert any(item.what == "Every promotion and rollback" for item in review.needs_a_human)
    assert not any(item.what == "Every promotion and rollback" for item in auto.needs_a_human)
    text = render_markdown(auto)
    assert "77 steps" in text and "0.5 source images replayed per read" in text and "decided by the loop itself" in text
    assert "site reads only" in render_markdown(review) and "a reviewer" in render_markdown(review)


def test_crosssim_change_plan_writes_markdown(tmp_path):
    done = runner.invoke(cli.app, ["change-plan", "--config", str(REPO / "params.yaml"), "--out", str(tmp_path / "pccp.md")])
    assert done.exit_code == 0, done.output
    text = (tmp_path / "pccp.md").read_text()
    assert text.startswith("# Predetermined change control plan: crosssim-pneumonia") and "## Needs a human" in text
