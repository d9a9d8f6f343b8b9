"""The pretrain stage on a tiny real subset (Kermany train + NIH target-train at 32 px): the loss falls, training starts
from the backbone, no evaluation image is read, an unchanged rerun reuses the cache; bad input is a clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from flows.cli import app
from pipeline.config import PRETRAIN_WEIGHTS, load_config
from pipeline.data.prepare import open_prepared
from pipeline.errors import ConfigError, DatasetError, TrainingError
from pipeline.models import build_model
from pipeline.pretrain.stage import PretrainImages, pretrain_backbone
from pipeline.retrain import sites
from pipeline.retrain.data import target_split
from pipeline.retrain.pretraining import pretrain
from pipeline.training import train_model
from pipeline.training.weights import pretrained_weights
from tests.conftest import REPO

TINY_PRETRAIN = [
    "pretrain.epochs=3",
    "pretrain.batch_size=16",
    "pretrain.hidden_dim=64",
    "pretrain.projection_dim=32",
]


def _overrides(folder: Path, data_dir: Path, *extra: str) -> list[str]:
    return [
        f"data.root={data_dir}",
        "data.image_size=32",
        "data.max_images_per_class=24",
        f"data.cache_dir={folder / 'prepared-cache'}",
        f"data.prepared_dir={folder / 'prepared'}",
        f"pretrain.cache_dir={folder / 'pretrain-cache'}",
        f"pretrain.output_dir={folder / 'pretrain'}",
        f"train.output_dir={folder / 'train'}",
        *TINY_PRETRAIN,
        *extra,
    ]


@pytest.fixture(scope="module")
def prepared(data_dir, tmp_path_factory):
    """Both sites read, split and prepared at 32 px (validation skipped: not what is tested here)."""
    folder = tmp_path_factory.mktemp("pretrain")
    cfg = load_config(None, _overrides(folder, data_dir))
    for site in sites.sites(cfg):
        sites.prepare_site(cfg, site, sites.load_site(cfg, site)[0])
    return folder, data_dir


@pytest.fixture(scope="module")
def pretrained(prepared):
    folder, data_dir = prepared
    cfg = load_config(None, _overrides(folder, data_dir))
    return cfg, pretrain(cfg, show_progress=False)


def test_pretrained_weights_is_the_stage_or_a_path_anchored_like_before():
    assert load_config(REPO / "params.yaml", ["train.pretrained_weights=pretrain"]).train.pretrained_weights == "pretrain"
    assert load_config(REPO / "params.yaml", ["train.pretrained_weights=./pretrain"]).train.pretrained_weights == REPO / "pretrain"
    assert load_config(REPO / "params.yaml", ["train.pretrained_weights=w.pth"]).train.pretrained_weights == REPO / "w.pth"
    with pytest.raises(ConfigError, match="pretrain.method"):
        load_config(None, ["pretrain.method=mae"])


def test_pretraining_on_too_few_images_is_a_clear_error(tmp_path):
    cfg = load_config(None, [f"pretrain.cache_dir={tmp_path}"])
    empty = PretrainImages("nih-cxr8", "target-train", None, pd.DataFrame({"image_id": []}))  # type: ignore[arg-type]
    with pytest.raises(DatasetError, match="at least 2 images; nih-cxr8/target-train hold 0"):
        pretrain_backbone([empty], cfg.pretrain, "resnet18", 0, cfg.train, show_progress=False)


def test_training_from_pretrain_before_it_ran_or_of_another_backbone_is_a_clear_error(tmp_path):
    cfg = load_config(None, ["train.pretrained_weights=pretrain", f"pretrain.output_dir={tmp_path}"])
    with pytest.raises(TrainingError, match="run `crosssim pretrain` first"):
        pretrained_weights(cfg)
    (tmp_path / "pretrain_summary.json").write_text(json.dumps({"backbone": "densenet121"}))
    with pytest.raises(TrainingError, match="holds a pretrained densenet121, but train.backbone is resnet18"):
        pretrained_weights(cfg)


def test_pretrain_command_before_prepare_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(app, ["pretrain", "--set", f"data.prepared_dir={tmp_path}"])
    assert result.exit_code == 2 and "run `crosssim prepare` first" in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_the_loss_falls_and_only_source_train_and_target_train_are_read(pretrained):
    cfg, result = pretrained
    assert result.epochs == 3 and not result.reused
    assert result.epoch_losses[-1] < result.epoch_losses[0], result.epoch_losses
    read = pd.read_csv(result.manifest_path)
    source = open_prepared(cfg.data.prepared_site(cfg.data.source)).manifest
    target = target_split(cfg, open_prepared(cfg.data.prepared_site("nih-cxr8")), cfg.crosssim.labelled_fraction)
    evaluation = set(source.loc[source["split"] != "train", "image_id"]) | set(target.test["image_id"])
    allowed = set(source.loc[source["split"] == "train", "image_id"]) | set(target.train["image_id"])
    assert evaluation and not set(read["image_id"]) & evaluation
    assert set(read["image_id"]) == allowed and len(read) == len(allowed)
    assert read.groupby(["site", "split"]).size().to_dict() == {
        ("kermany-pediatric", "train"): result.images["kermany-pediatric/train"],
        ("nih-cxr8", "target-train"): result.images["nih-cxr8/target-train"],
    }
    summary = json.loads(result.summary_path.read_text())
    assert summary["cache_key"] == result.cache_key and summary["image_size"] == 32


@pytest.mark.slow
def test_an_unchanged_rerun_reuses_the_backbone_and_a_changed_one_does_not(pretrained, prepared):
    cfg, first = pretrained
    folder, data_dir = prepared
    written = first.checkpoint_path.read_bytes()
    again = pretrain(cfg, show_progress=False)
    assert again.reused and again.cache_key == first.cache_key and again.epoch_losses == first.epoch_losses
    assert again.checkpoint_path.read_bytes() == written
    other = load_config(None, _overrides(folder, data_dir, "crosssim.test_fraction=0.5", "pretrain.epochs=1"))
    assert pretrain(other, show_progress=False).cache_key != first.cache_key  # other target-train images


@pytest.mark.slow
def test_training_starts_from_the_pretrained_backbone(pretrained):
    cfg, result = pretrained
    saved = torch.load(result.checkpoint_path, weights_only=True)
    loaded = build_model("resnet18", result.checkpoint_path)
    assert torch.allclose(loaded.features.conv1.weight, saved["conv1.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(loaded.features.layer4[1].conv2.weight, saved["layer4.1.conv2.weight"])

    class FirstWeights:
        def on_fit_start(self, trainer):
            self.features = {name: value.clone() for name, value in trainer.model.features.state_dict().items()}

    first = FirstWeights()
    train_cfg = cfg.model_copy(
        update={"train": cfg.train.model_copy(update={"pretrained_weights": PRETRAIN_WEIGHTS, "epochs": 1, "batch_size": 16})}
    )
    prepared_source = open_prepared(cfg.data.prepared_site(cfg.data.source))
    train_model(prepared_source, train_cfg, show_progress=False, extra_handlers=[first])
    for name, value in loaded.features.state_dict().items():
        assert torch.allclose(first.features[name], value), name
    assert not torch.equal(first.features["layer1.0.conv1.weight"], build_model("resnet18").features.layer1[0].conv1.weight)


@pytest.mark.slow
def test_byol_and_the_command_line(prepared):
    folder, data_dir = prepared
    overrides = _overrides(folder, data_dir, "pretrain.method=byol", "pretrain.epochs=1")
    result = CliRunner().invoke(app, ["pretrain", *[arg for item in overrides for arg in ("--set", item)]])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "byol resnet18 on kermany-pediatric/train" in said and "(1 epochs in" in said
    assert build_model("resnet18", folder / "pretrain" / "backbone.pt").features.conv1.weight.shape[1] == 1
    again = CliRunner().invoke(app, ["pretrain", *[arg for item in overrides for arg in ("--set", item)]])
    assert again.exit_code == 0 and "reused from the cache" in " ".join(again.output.split())


@pytest.mark.slow
def test_the_backbone_and_its_losses_are_logged_to_the_run(pretrained, tmp_path, monkeypatch):
    """What the flow's pretrain task logs through the project's tracker."""
    import mlflow

    from pipeline.retrain.pretraining import log_pretrain
    from pipeline.tracking import MlflowTracker, resolve_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg, result = pretrained
    tracking = cfg.tracking.model_copy(update={"local_dir": tmp_path / "mlflow"})
    with MlflowTracker(tracking, run_name="pretrain") as tracker:
        log_pretrain(tracker, result)
    client = mlflow.MlflowClient(resolve_tracking_uri(tracking))
    assert {item.path for item in client.list_artifacts(tracker.run_id, "pretrain")} == {
        "pretrain/backbone.pt", "pretrain/manifest.csv", "pretrain/pretrain_summary.json"
    }  # fmt: skip
    losses = client.get_metric_history(tracker.run_id, "pretrain.loss")
    assert [(m.step, m.value) for m in losses] == [(epoch, loss) for epoch, loss in enumerate(result.epoch_losses, 1)]
