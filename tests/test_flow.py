"""The retraining flow under Prefect on a few hundred real images: tracked, evaluated, or stopped early."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from prefect.artifacts import Artifact
from prefect.testing.utilities import prefect_test_harness
from typer.testing import CliRunner

from flows import cli
from flows.cli.options import console as cli_console
from flows.retrain import retrain
from flows.rollout import raise_alarm, rollout_analysis
from pipeline.config import load_config
from pipeline.errors import DataValidationError
from pipeline.retrain.data import crosssim_data
from pipeline.retrain.promotion import actions_for, gate_challenger
from pipeline.retrain.source import serving_model
from pipeline.rollout.drift import DriftTest, EstimatedPerformance
from pipeline.rollout.monitor import DriftCheck
from pipeline.rollout.outcomes import OutcomeReport, record_outcomes
from pipeline.serving.bundle import read_bundle
from pipeline.serving.ledger import PredictionLedger
from pipeline.serving.runtime import onnx_probabilities, onnx_session
from pipeline.tracking import MlflowTracker
from tests.conftest import copy_kermany_subset
from tests.test_benchmarks import run_smoke
from tests.test_rollout import _rollout_rows, champion_and_challenger
from tests.test_serving_ledger import T0

pytestmark = pytest.mark.slow  # whole Prefect flows on real models: left out of make test-fast

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def prefect_backend():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def _overrides(work: Path, data_root: Path, *extra: str) -> list[str]:
    return [
        f"data.root={data_root}",
        f"data.cache_dir={work / 'cache'}",
        f"runs.dir={work / 'runs'}",
        f"tracking.local_dir={work / 'mlflow'}",
        "evaluate.bootstrap_samples=200",
        "crosssim.steps=20",
        "crosssim.eval_every=10",
        "crosssim.batch_size=16",
        "crosssim.diagnostics_samples=40",
        "crosssim.distill.steps=10",
        *extra,
    ]


def _client(work: Path) -> MlflowClient:
    uri = f"sqlite:///{work / 'mlflow' / 'mlflow.db'}"
    return MlflowClient(uri, registry_uri=uri)  # not the process-wide URI a run leaves set


def _artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= _artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def test_retrain_end_to_end_on_real_images(data_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    overrides = _overrides(
        tmp_path,
        data_dir,
        "data.max_images_per_class=40",
        "data.image_size=64",
        "train.epochs=2",
        "train.batch_size=32",
        "train.processes=2",  # the training task trains data-parallel (two Gloo processes here)
        "train.pretrained_weights=pretrain",  # ... from the backbone the flow's pretrain task made
        "pretrain.epochs=1",
        "pretrain.batch_size=32",
        f"pretrain.cache_dir={tmp_path / 'pretrain-cache'}",
        "crosssim.enabled=false",  # the next test covers adaptation inside the flow
    )
    summary = retrain(config_path=str(REPO / "params.yaml"), overrides=overrides)

    client = _client(tmp_path)
    run = client.get_run(summary.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "2"
    assert run.data.tags["data_version.kermany-pediatric"].endswith(".dir")
    assert run.data.tags["prefect_flow_run_id"]
    assert len(client.get_metric_history(run.info.run_id, "val_auc")) == 2
    source_auc = run.data.metrics["kermany-pediatric_test.auc"]
    assert source_auc > 0.75, source_auc  # clearly above chance after 2 short epochs
    assert "nih-cxr8.auc" in run.data.metrics

    artifacts = _artifact_paths(client, run.info.run_id)
    assert "validation/kermany-pediatric/validation.json" in artifacts
    assert any(p.startswith("validation/nih-cxr8/data_docs/") and p.endswith("index.html") for p in artifacts)
    assert {"eval/metrics.json", "eval/predictions.csv", "train/train_summary.json"} <= artifacts
    assert {"pretrain/backbone.pt", "pretrain/manifest.csv", "pretrain/pretrain_summary.json"} <= artifacts
    assert len(client.get_metric_history(run.info.run_id, "pretrain.loss")) == 1
    assert any(p.endswith(".png") for p in artifacts)

    artifact = Artifact.get("retrain-summary")
    assert artifact is not None and artifact.type == "markdown"
    assert run.info.run_id in artifact.data and "nih-cxr8" in artifact.data

    model = mlflow.pytorch.load_model(summary.model_uri)
    run_dir = summary.outputs
    assert run_dir.parent == tmp_path / "runs" and run.data.tags["run_folder"] == str(run_dir)
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert set(metrics) >= {"kermany-pediatric/test", "nih-cxr8"}
    assert json.loads((run_dir / "train" / "train_summary.json").read_text())["processes"] == 2
    probabilities = model(torch.rand(3, 1, 64, 64))
    assert probabilities.shape == (3,) and ((probabilities >= 0) & (probabilities <= 1)).all()


def test_crosssim_adapt_runs_inside_the_flow_and_lands_in_mlflow(data_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    overrides = _overrides(
        tmp_path, data_dir, "data.max_images_per_class=30", "data.image_size=32", "data.harmonisation=histeq",
        "train.epochs=1", "train.batch_size=32",
    )
    built = []  # the run's CrossSim arrays are built once and passed to adapt, score, gate and export
    with monkeypatch.context() as patch:
        patch.setattr("flows.retrain.crosssim_data", lambda cfg: built.append(crosssim_data(cfg)) or built[-1])
        patch.setattr("pipeline.retrain.promotion.crosssim_data", None)  # a second build would fail here
        summary = retrain(config_path=str(REPO / "params.yaml"), overrides=overrides)
    assert len(built) == 1

    client = _client(tmp_path)
    run = client.get_run(summary.mlflow_run_id)
    assert run.data.params["crosssim.alignment"] == "gan"
    artifacts = _artifact_paths(client, run.info.run_id)
    assert {"crosssim/diagnostics.json", "crosssim/tsne_before.png", "crosssim/tsne_after.png"} <= artifacts
    assert "crosssim/metrics.json" in artifacts
    for metric in ("crosssim.pad_before", "crosssim.pad_after", "crosssim.adapted.nih-cxr8_target-test.auc"):
        assert metric in run.data.metrics, metric
    assert len(client.get_metric_history(run.info.run_id, "adapt.domain_accuracy")) == 2  # steps 10 and 20
    assert len(client.get_metric_history(run.info.run_id, "adapt.loss.classification")) == 2
    assert set(summary.crosssim.scores) == {"source", "adapted", "student"}
    target_test = summary.crosssim.scores["adapted"].sets["nih-cxr8/target-test"]
    assert target_test.n > 0 and target_test.n_unlabelled == 0
    for name in ("adapted_model", "student_model"):
        served = mlflow.pytorch.load_model(summary.crosssim.model_uris[name])
        assert served(torch.rand(2, 1, 32, 32)).shape == (2,)
    assert "CrossSim adaptation" in Artifact.get("retrain-summary").data

    # registered as challenger with its lineage, model card and gate verdict (policy: review → pending)
    registered = summary.registry
    assert registered.version == "1" and registered.aliases == {"challenger": "1"}
    version = client.get_model_version("crosssim-pneumonia", "1")
    assert version.tags["mlflow_run_id"] == run.info.run_id and version.tags["prefect_flow_run_id"]
    assert version.tags["data_version.nih-cxr8"].endswith(".dir") and version.tags["model_kind"] == "adapted"
    assert version.tags["review.status"] == "pending" and version.tags["gate.compared_with"].startswith("floors")
    assert "# Model card: crosssim-pneumonia v1" in version.description and "nih-cxr8/target-test" in version.description
    student = client.get_model_version_by_alias("crosssim-pneumonia-student", "challenger")
    assert student.tags["parent_model"] == "models:/crosssim-pneumonia/1"
    assert {"registry/model_card.md", "registry/gate.json"} <= _artifact_paths(client, run.info.run_id)
    assert "## Registry" in Artifact.get("retrain-summary").data

    # both versions carry their checked ONNX bundle, logged to the run, found through their tags
    scores = summary.crosssim.scores
    for registered_version, scored in ((version, scores["adapted"]), (student, scores["student"])):
        tags = registered_version.tags
        assert tags["serving.artifact_uri"] == f"runs:/{run.info.run_id}/serving/{registered_version.name}"
        folder = str(tmp_path / registered_version.name)
        local = mlflow.artifacts.download_artifacts(tags["serving.artifact_uri"], dst_path=folder, tracking_uri=client.tracking_uri)
        bundle = read_bundle(local)
        # the served model carries its preprocessing: clients and crosssim serve harmonise as training did
        assert (bundle.image_size, bundle.harmonisation, bundle.threshold) == (32, "histeq", scored.threshold)
        assert (tags["image_size"], tags["harmonisation"]) == ("32", "histeq")
        assert bundle.artifacts["fp32"].sha256 == tags["serving.fp32_sha256"]
        assert bundle.artifacts["fp32"].checks["max_abs_diff"] <= 1e-4
        session = onnx_session(bundle.path_of(local, "fp32"))  # path_of checks the file against its hash
        assert onnx_probabilities(session, np.zeros((3, 32, 32), dtype=np.uint8)).shape == (3,)
        if "int8" in bundle.artifacts:  # a 20-step model may lose more AUC than allowed: then the card says why
            assert tags["serving.int8"] == "yes" and bundle.path_of(local, "int8").is_file()
            checked = {"auc.nih-cxr8/target-test", "auc_delta.kermany-pediatric/test"}
            assert checked <= set(bundle.artifacts["int8"].checks)
        else:
            assert tags["serving.int8"].startswith("rejected") and tags["serving.int8"] in version.description
        assert tags["serving.fp32_sha256"] in version.description  # the card lists both bundles
    assert "## Deployable artifacts" in version.description
    audit_experiment = client.get_experiment_by_name("crosssim-retrain-registry")
    assert audit_experiment.artifact_location == (tmp_path / "mlflow" / "artifacts").resolve().as_uri()

    # `crosssim run` prints the adapted models' table next to the source model's (same flow summary)
    monkeypatch.setattr("flows.retrain.retrain", lambda **_: summary)
    monkeypatch.setattr(cli_console, "width", 200)  # no wrapped table cells
    options = [arg for override in overrides for arg in ("--set", override)]
    printed = CliRunner().invoke(cli.app, ["run", "--config", str(REPO / "params.yaml"), *options])
    assert printed.exit_code == 0, printed.output
    assert "adapted model" in printed.output and "student model" in printed.output
    assert "nih-cxr8/target-test" in printed.output and "proxy A-distance" in printed.output
    assert "registered crosssim-pneumonia v1 as challenger" in printed.output

    # the gate on the same frozen sets with real models: once v1 is champion, v1 again passes (equal scores)
    # and a challenger that inverts the source model's probabilities is blocked (it fails on the source test set)
    cfg = load_config(REPO / "params.yaml", overrides).in_run_folder(summary.outputs)  # the run's sets
    passed = summary.registry.gate_passed  # a 20-step model may miss the floors: then approve is an override
    actions_for(cfg).approve(reviewer="dr. ada", reason="first champion", override_gate=not passed)
    same, _ = gate_challenger(cfg, "models:/crosssim-pneumonia/1")
    assert same.passed and same.compared_with == "champion v1"
    source_model, example = serving_model(cfg, summary.outputs / "train" / "best.pt")
    with MlflowTracker(cfg.tracking, run_name="inverted") as tracker:
        inverted = tracker.log_model(Inverted(source_model), "inverted", example)
    worse, scores = gate_challenger(cfg, inverted)
    assert not worse.passed and set(scores["challenger"]) == {"kermany-pediatric/test", "nih-cxr8/target-test"}
    assert scores["challenger"]["kermany-pediatric/test"]["auc"] < 0.5 < scores["champion"]["kermany-pediatric/test"]["auc"]

    # make bench-serve --smoke on the champion this flow registered: every server answers real images over HTTP
    report = run_smoke("serve.py", data_dir, tmp_path, *(arg for override in overrides for arg in ("--set", override)))
    int8 = {"crosssim-int8"} if "int8" in report["model"]["artifacts"] else set()  # a 1-epoch model's may be rejected
    assert report["model"]["version"] == "1" and set(report["servers"]) == {"crosssim-fp32", "mlflow", "eager"} | int8
    for server, levels in report["servers"].items():
        assert set(levels) == {"1", "4"} and all(level["failed"] == 0 and level["rps"] > 0 for level in levels.values()), server
    assert report["auc"]["onnx-fp32"] == pytest.approx(report["auc"]["pytorch"], abs=1e-6)


class Inverted(torch.nn.Module):
    """A deliberately worse challenger: a model's probabilities turned upside down."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return 1 - self.model(pixels)


def test_broken_dataset_stops_flow_before_training(data_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "data"
    site = copy_kermany_subset(data_dir, root / "kermany-pediatric", per_class=30)
    victim = sorted((site / "train" / "PNEUMONIA").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:300])  # truncated JPEG
    work = tmp_path / "work"
    with pytest.raises(DataValidationError) as error:
        retrain(config_path=str(REPO / "params.yaml"), overrides=_overrides(work, root, "data.external=[]", "crosssim.enabled=false"))
    assert victim.name in str(error.value)
    (run_dir,) = (work / "runs").iterdir()
    assert not (run_dir / "train").exists() and not (run_dir / "prepared").exists()

    client = _client(work)
    (run,) = client.search_runs([client.get_experiment_by_name("crosssim-retrain").experiment_id])
    assert run.info.status == "FAILED"
    artifacts = _artifact_paths(client, run.info.run_id)
    assert "validation/kermany-pediatric/validation.json" in artifacts
    assert not any(p.startswith("model") for p in artifacts)
    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow' / 'mlflow.db'}")
    assert mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list") == []


def test_the_rollout_analysis_flow_reports_and_decides_under_policy_auto(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    overrides = [f"tracking.local_dir={tmp_path / 'mlflow'}", "registry.model_name=cxr", "rollout.policy=auto",
                 f"serve.ledger_path={tmp_path / 'ledger.db'}", "serve.ledger_url=null", "rollout.maturity_hours=0"]  # fmt: skip
    cfg = load_config(REPO / "params.yaml", overrides)
    assert rollout_analysis(overrides=overrides).decision is None  # nothing runs yet: nothing to do
    rollouts = champion_and_challenger(cfg)
    rollout = rollouts.start("shadow", "dr. ada", "v2 in shadow")
    ledger = PredictionLedger(f"sqlite:///{tmp_path / 'ledger.db'}")
    rows, labels = _rollout_rows(rollout, 200, challenger_better=True, seed=5)
    for row in rows:
        asyncio.run(ledger.record(row))
    reports = [OutcomeReport(("normal", "pneumonia")[y], "follow_up", inference_id=r.inference_id) for r, y in zip(rows, labels, strict=True)]
    record_outcomes(ledger, reports, cfg.rollout.outcome_sources, now=T0 + timedelta(days=1))
    ledger.close()

    summary = rollout_analysis(overrides=overrides)
    assert summary.decision == "promote" and summary.carried_out == "approve of v2" and summary.labelled == 200
    assert rollouts.active() is None and rollouts.actions.registry.aliases("cxr") == {"champion": "2"}
    client = _client(tmp_path)
    run = client.get_run(summary.mlflow_run_id)
    assert run.data.tags["crosssim.rollout_decision"] == "promote" and run.data.metrics["rollout.brier_gain_low"] > 0
    page = Path(client.download_artifacts(run.info.run_id, "rollout/rollout-report.html", str(tmp_path))).read_text()
    assert "<svg" in page and "id='per-site'" in page and "id='roc'" in page and ">promote<" in page
    assert "v2 vs champion v1" in Artifact.get("rollout-analysis").data
    card = rollouts.actions.registry.version("cxr", "2").description  # the evidence that admitted it, linked
    assert f"## Admitted by rollout {rollout.rollout_id}" in card and summary.mlflow_run_id in card and "Brier gain" in card


def test_a_drift_alarm_puts_a_canary_back_into_shadow(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(REPO / "params.yaml", [f"tracking.local_dir={tmp_path / 'mlflow'}", "registry.model_name=cxr"])
    rollouts = champion_and_challenger(cfg)
    canary = rollouts.start("canary", "dr. ada", "v2 at 5%")
    reasons = ["input drift at nih-cxr8 for the challenger (MMD p = 0.0010)"]
    alarm = DriftCheck("nih-cxr8", "challenger", "2", 200, 200, DriftTest(0.3, 0.001), DriftTest(0.5, 1e-9),
                       EstimatedPerformance(0.6, 0.5, 0.7), True, reasons)  # fmt: skip
    # the event goes to this module's Prefect server; test_deployments checks an automation turns it into a retrain
    assert raise_alarm.fn(rollouts, canary, [alarm]) == "canary paused (back to shadow), event emitted"
    assert rollouts.active().mode == "shadow" and rollouts.active().challenger_share == 0.0
    paused = [entry for entry in rollouts.actions.audit.entries() if entry.action == "rollout-pause"]
    assert len(paused) == 1 and paused[0].actor == "drift monitor" and "input drift" in paused[0].reason
