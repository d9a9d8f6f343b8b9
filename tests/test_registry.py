"""The model registry on a real MLflow store: gate, register, approve/reject/rollback, audit, atomicity."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from flows import cli
from flows.cli.options import console as cli_console
from pipeline.config import load_config
from pipeline.registry.gate import decide, score_set
from pipeline.registry.review import actions_for
from pipeline.registry.store import CHALLENGER, CHAMPION, HISTORY_TAG, ModelRegistry, RegistryError
from pipeline.tracking import MlflowTracker
from tests.conftest import REPO

runner = CliRunner()


class MeanBrightness(torch.nn.Module):
    """A stand-in network: P(pneumonia) rises with mean brightness (fast to export and register)."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(scale))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.scale * (pixels.mean(dim=(1, 2, 3)) - 0.5))


@pytest.fixture()
def cfg(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return load_config(REPO / "params.yaml", [f"tracking.local_dir={tmp_path / 'mlflow'}", "registry.model_name=cxr"])


def _logged_models(cfg, count: int) -> list[str]:
    uris = []
    with MlflowTracker(cfg.tracking, run_name="models") as tracker:
        for index in range(count):
            uris.append(tracker.log_model(MeanBrightness(float(index + 1)), f"m{index}", np.zeros((2, 1, 8, 8), np.float32)))
    return uris


def _scores(auc: float, sensitivity: float) -> dict[str, dict[str, float]]:
    return {site: {"auc": auc, "sensitivity_at_specificity": sensitivity} for site in ("kermany/test", "nih/target-test")}


def test_score_set_reads_sensitivity_at_the_specificity():
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    probabilities = np.array([0.1, 0.2, 0.3, 0.4, 0.9, 0.35, 0.6, 0.7, 0.8, 0.95])
    scored = score_set(labels, probabilities, specificity=0.8)
    assert scored["auc"] == pytest.approx(0.8)  # 20 of 25 pairs ranked right
    assert scored["sensitivity_at_specificity"] == pytest.approx(0.8)  # 4 of 5 above 0.4 with 1 false positive


def test_gate_promotes_a_better_challenger_and_blocks_a_worse_one(cfg):
    champion = _scores(0.80, 0.70)
    better = decide(_scores(0.85, 0.75), champion, cfg.registry, "champion v1")
    assert better.passed and not better.failures()
    slightly_worse = decide(_scores(0.79, 0.69), champion, cfg.registry, "champion v1")  # within the 0.02 margin
    assert slightly_worse.passed
    worse = _scores(0.85, 0.75)
    worse["nih/target-test"]["auc"] = 0.70  # better on one site, clearly worse on the other
    blocked = decide(worse, champion, cfg.registry, "champion v1")
    assert not blocked.passed
    assert blocked.failures() == ["nih/target-test auc: 0.7000 < required 0.7800"]
    assert "nih/target-test/auc" in blocked.mlflow_verdict  # MLflow's own record of the failed threshold
    first = decide(_scores(0.55, 0.9), None, cfg.registry)
    assert not first.passed and first.compared_with.startswith("floors")


def test_register_takes_only_a_logged_model_uri_and_writes_nothing_otherwise(tmp_path):
    registry = ModelRegistry(f"sqlite:///{tmp_path / 'mlflow.db'}")
    for uri in ("runs:/0123/model", "models:/crosssim-pneumonia/1", "models:/"):
        with pytest.raises(RegistryError, match="expected a logged model's URI"):
            registry.register("crosssim-pneumonia", uri, {})
    assert not (tmp_path / "mlflow.db").exists() or registry.find("crosssim-pneumonia", CHALLENGER) is None


def test_register_approve_reject_rollback_move_aliases_and_leave_an_audit_trail(cfg):
    uris = _logged_models(cfg, 3)
    actions = actions_for(cfg)
    card = lambda version: f"card of v{version}"  # noqa: E731
    first = actions.register_challenger(uris[0], {"mlflow_run_id": "r1"}, card)
    assert first.aliases == {CHALLENGER: "1"}
    assert actions.registry.version("cxr", "1").description == "card of v1"
    approved = actions.approve(reviewer="dr. ada", reason="better on both sites")
    assert approved.aliases == {CHAMPION: "1"}
    actions.register_challenger(uris[1], {}, card)
    actions.approve(reviewer="dr. ada", reason="v2 wins")
    actions.register_challenger(uris[2], {}, card)
    actions.reject(reviewer="dr. bob", reason="worse on NIH")
    assert actions.registry.aliases("cxr") == {CHAMPION: "2"}
    assert actions.registry.version("cxr", "3").tags["review.status"] == "rejected"
    rolled = actions.rollback(reviewer="dr. ada", reason="v2 misbehaves in production")
    assert rolled.aliases == {CHAMPION: "1"} and actions.registry.champion_history("cxr") == ["1"]
    assert actions.registry.version("cxr", "2").tags["review.status"] == "rolled back"

    trail = actions.audit.entries()
    assert [(e.action, e.version) for e in trail] == [
        ("register", "1"), ("approve", "1"), ("register", "2"), ("approve", "2"),
        ("register", "3"), ("reject", "3"), ("rollback", "1"),
    ]  # fmt: skip
    assert trail[-1].actor == "dr. ada" and trail[-1].aliases_before == {CHAMPION: "2"}
    assert trail[-1].aliases_after == {CHAMPION: "1"} and trail[-1].at
    with pytest.raises(RegistryError, match="no pending challenger"):
        actions.approve(reviewer="dr. ada", reason="nothing to approve")
    actions.register_challenger(uris[2], {}, card)
    with pytest.raises(RegistryError, match="reason"):
        actions.approve(reviewer="dr. ada", reason=" ")


def test_a_failure_between_alias_moves_leaves_the_registry_as_it_was(cfg, monkeypatch):
    uris = _logged_models(cfg, 2)
    actions = actions_for(cfg)
    actions.register_challenger(uris[0], {}, lambda v: "card")
    actions.approve(reviewer="dr. ada", reason="first champion")
    actions.register_challenger(uris[1], {}, lambda v: "card")
    before = (actions.registry.aliases("cxr"), actions.registry.model_tags("cxr"), len(actions.audit.entries()))

    real_move = actions.registry.move_alias
    calls = []

    def fail_on_second_move(name, alias, version):
        calls.append(alias)
        if len(calls) == 2:
            raise ConnectionError("tracking server went away")
        real_move(name, alias, version)

    monkeypatch.setattr(actions.registry, "move_alias", fail_on_second_move)
    with pytest.raises(ConnectionError):
        actions.approve(reviewer="dr. ada", reason="v2 wins")
    assert calls == [CHAMPION, CHALLENGER]  # the champion alias had moved when the failure hit
    after = (actions.registry.aliases("cxr"), actions.registry.model_tags("cxr"), len(actions.audit.entries()))
    assert after == before and after[0] == {CHAMPION: "1", CHALLENGER: "2"}
    assert after[1][HISTORY_TAG] == '["1"]'

    monkeypatch.setattr(actions.registry, "move_alias", real_move)
    monkeypatch.setattr(actions.audit, "append", lambda entry: (_ for _ in ()).throw(OSError("artifact store full")))
    with pytest.raises(OSError):
        actions.approve(reviewer="dr. ada", reason="v2 wins")
    assert actions.registry.aliases("cxr") == {CHAMPION: "1", CHALLENGER: "2"}  # no decision without its record


def test_a_registration_that_fails_half_way_leaves_no_version(cfg):
    uris = _logged_models(cfg, 1)
    actions = actions_for(cfg)

    def card_of_a_lost_connection(version: str) -> str:
        raise ConnectionError("tracking server went away")

    with pytest.raises(ConnectionError):
        actions.register_challenger(uris[0], {}, card_of_a_lost_connection, student_uri=uris[0])
    assert actions.registry.versions("cxr") == [] and actions.registry.aliases("cxr") == {}


def test_a_long_model_card_is_fitted_to_the_registry_limit_keeping_every_heading(cfg):
    from pipeline.registry.card import DESCRIPTION_LIMIT, FULL_CARD, fit_description, gate_override_note

    config = "## Training configuration\n```json\n" + '{"x": 1}\n' * 800 + "```\n"
    card = f"# Model card: cxr v1\n\n## Metrics\n| set | auc |\n\n{config}"
    note = gate_override_note("dr. ada", "needed now", ["auc below the champion's"], "audit/1.json")
    fitted = fit_description(f"{card}\n{note}")
    assert len(fitted) <= DESCRIPTION_LIMIT < len(card)
    assert "## Metrics\n| set | auc |" in fitted and "## Training configuration\n(left out here" in fitted
    assert FULL_CARD in fitted and fitted.endswith(note)  # the later note stays whole
    assert fit_description(note) == note

    uris = _logged_models(cfg, 1)
    actions = actions_for(cfg)
    actions.register_challenger(uris[0], {}, lambda version: card)
    assert actions.registry.version("cxr", "1").description == fit_description(card)


def test_registry_cli_review_decide_and_lineage(cfg, tmp_path):
    uris = _logged_models(cfg, 1)
    actions = actions_for(cfg)
    actions.register_challenger(uris[0], {"data_version.nih": "abc.dir", "git_commit": "1234", "mlflow_run_id": "r9"}, str)
    actions.record_gate("1", decide(_scores(0.8, 0.7), None, cfg.registry), "review")
    base = ["--config", str(REPO / "params.yaml"), "--set", f"tracking.local_dir={tmp_path / 'mlflow'}", "--set", "registry.model_name=cxr"]
    shown = runner.invoke(cli.app, ["registry", "review", *base])
    assert shown.exit_code == 0, shown.output
    assert "nih/target-test" in shown.output and "promote" in shown.output
    assert "Downloading artifacts" not in shown.output  # MLflow's progress bars stay out of the review
    refused = runner.invoke(cli.app, ["registry", "approve", *base, "--reviewer", "dr. ada"])
    assert refused.exit_code != 0 and "reason" in refused.output and "Traceback" not in refused.output
    done = runner.invoke(cli.app, ["registry", "approve", *base, "--reviewer", "dr. ada", "--reason", "ok"])
    assert done.exit_code == 0, done.output
    lineage = runner.invoke(cli.app, ["registry", "lineage", "cxr@champion", *base])
    assert lineage.exit_code == 0 and "abc.dir" in lineage.output and "1234" in lineage.output
    listed = runner.invoke(cli.app, ["registry", "list", *base])
    assert listed.exit_code == 0 and "champion" in listed.output and "approved" in listed.output
    missing = runner.invoke(cli.app, ["registry", "lineage", "cxr@nope", *base])
    assert missing.exit_code != 0 and "no such" in missing.output


def _registry_state(actions, version: str) -> tuple:
    """Everything an approval could change: aliases, model tags, the version's tags and card, the audit trail."""
    registered = actions.registry.version("cxr", version)
    return (
        actions.registry.aliases("cxr"), actions.registry.model_tags("cxr"), dict(registered.tags),
        registered.description, len(actions.audit.entries()),
    )  # fmt: skip


def test_approving_a_challenger_the_gate_rejected_needs_an_override_that_is_recorded(cfg, tmp_path, monkeypatch):
    uris = _logged_models(cfg, 3)
    actions = actions_for(cfg)
    card = lambda version: f"card of v{version}"  # noqa: E731
    actions.register_challenger(uris[0], {}, card)
    actions.record_gate("1", decide(_scores(0.80, 0.70), None, cfg.registry), "review")
    actions.approve(reviewer="dr. ada", reason="first champion")
    actions.register_challenger(uris[1], {}, card)
    failed = decide(_scores(0.37, 0.20), _scores(0.80, 0.70), cfg.registry, "champion v1")  # the NIH 0.37
    actions.record_gate("2", failed, "review")
    base = ["--config", str(REPO / "params.yaml"), "--set", f"tracking.local_dir={tmp_path / 'mlflow'}", "--set", "registry.model_name=cxr"]
    before = _registry_state(actions, "2")

    # refused, by the CLI and by the library, with the failed checks named; nothing changed
    refused = runner.invoke(cli.app, ["registry", "approve", *base, "--reviewer", "dr. ada", "--reason", "looks fine"])
    assert refused.exit_code == RegistryError.exit_code and "Traceback" not in refused.output
    message = " ".join(refused.output.split())
    assert "--override-gate" in message and "nih/target-test auc: 0.3700 < required 0.7800" in message
    with pytest.raises(RegistryError, match="promotion gate rejected it"):
        actions.approve(reviewer="dr. ada", reason="looks fine")
    with pytest.raises(RegistryError, match="reason"):
        actions.approve(reviewer="dr. ada", reason=" ", override_gate=True)
    assert _registry_state(actions, "2") == before
    review = runner.invoke(cli.app, ["registry", "review", *base])
    assert review.exit_code == 0 and "reject" in review.output and "--override-gate" in review.output

    # with --override-gate and a reason: promoted, and the override is on record everywhere
    reason = "NIH labels of this batch are known bad; ticket 42"
    done = runner.invoke(cli.app, ["registry", "approve", *base, "--override-gate", "--reviewer", "dr. ada", "--reason", reason])
    assert done.exit_code == 0, done.output
    assert "override" in done.output and actions.registry.aliases("cxr") == {CHAMPION: "2"}
    entry = actions.audit.entries()[-1]
    assert (entry.action, entry.version, entry.override_gate, entry.reason) == ("approve", "2", True, reason)
    assert entry.evidence["gate"]["passed"] is False and entry.evidence["gate"]["failures"] == failed.failures()
    assert not any(e.override_gate for e in actions.audit.entries()[:-1])
    version = actions.registry.version("cxr", "2")
    assert version.tags["review.override_gate"] == "true" and version.tags["review.status"] == "approved"
    assert version.description.startswith("card of v2") and "against the promotion gate (override)" in version.description
    assert all(f"- {failure}" in version.description for failure in failed.failures()) and reason in version.description
    assert "review.override_gate" not in actions.registry.version("cxr", "1").tags
    monkeypatch.setattr(cli_console, "width", 250)  # no wrapped table cells
    trail, listed = (runner.invoke(cli.app, ["registry", command, *base]) for command in ("audit", "list"))
    assert "approve (gate overridden)" in trail.output and "approved (gate overridden)" in listed.output

    # an override where the gate passed is refused too: there is nothing to override
    actions.register_challenger(uris[2], {}, card)
    actions.record_gate("3", decide(_scores(0.80, 0.70), _scores(0.37, 0.20), cfg.registry, "champion v2"), "review")
    before = _registry_state(actions, "3")
    with pytest.raises(RegistryError, match="nothing to override"):
        actions.approve(reviewer="dr. ada", reason="better", override_gate=True)
    assert _registry_state(actions, "3") == before


# What a reviewer's table must not wait for; each costs seconds to import.
HEAVY_MODULES = ("torch", "torchvision", "sklearn", "prefect")
READ_ONLY_COMMANDS = """
import json, sys
from typer.testing import CliRunner
from flows.cli import app
codes = [CliRunner().invoke(app, ["registry", command, *sys.argv[2:]]).exit_code for command in ("list", "review", "audit")]
print(json.dumps({"codes": codes, "heavy": [name for name in sys.argv[1].split(",") if name in sys.modules]}))
"""
OPEN_REGISTRY = "import sys; from mlflow.tracking import MlflowClient; MlflowClient(sys.argv[1], registry_uri=sys.argv[1]).search_model_versions(\"name = 'cxr'\")"


def _timed(command: list[str], cwd: Path) -> tuple[float, float, str]:
    """CPU seconds (user + system) and wall seconds of a child process, and its stdout."""
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    assert done.returncode == 0, done.stderr
    return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, wall, done.stdout


def test_registry_list_review_audit_import_neither_torch_nor_the_gate_and_cost_little_beyond_mlflow(cfg, tmp_path):
    uris = _logged_models(cfg, 1)
    actions = actions_for(cfg)
    actions.register_challenger(uris[0], {}, str)
    actions.record_gate("1", decide(_scores(0.8, 0.7), None, cfg.registry), "review")
    base = ["--config", str(REPO / "params.yaml"), "--set", f"tracking.local_dir={tmp_path / 'mlflow'}", "--set", "registry.model_name=cxr"]

    _, _, printed = _timed([sys.executable, "-c", READ_ONLY_COMMANDS, ",".join(HEAVY_MODULES), *base], tmp_path)
    assert json.loads(printed) == {"codes": [0, 0, 0], "heavy": []}

    # Wall time swings with the machine's load; CPU time does not. MLflow's own import and store opening is
    # the floor (about 2-3 s on a quiet machine); torch and torchvision alone would add several seconds.
    uri = f"sqlite:///{(tmp_path / 'mlflow' / 'mlflow.db').as_posix()}"
    floor, floor_wall, _ = _timed([sys.executable, "-c", OPEN_REGISTRY, uri], tmp_path)
    listed, listed_wall, table = _timed([str(Path(sys.executable).with_name("crosssim")), "registry", "list", *base], tmp_path)
    assert "challenger" in table
    assert listed < floor + 1.5, f"registry list: {listed:.1f} s CPU ({listed_wall:.1f} s wall); MLflow alone {floor:.1f} s ({floor_wall:.1f} s)"
