"""Training engine on a small real PneumoniaMNIST subset: resume, early stopping, bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from flows.cli import app
from pipeline.config import load_config
from pipeline.data.prepare import prepare_dataset
from pipeline.data.preprocessing import Preprocessing
from pipeline.data.readers import read_dataset
from pipeline.data.splits import subsample
from pipeline.errors import TrainingError
from pipeline.models import build_model
from pipeline.retrain.sites import prepare_site
from pipeline.training import load_trained_model, train_model
from pipeline.training.engine import Trainer
from pipeline.training.inference import predict_proba
from pipeline.training.loop import NonFiniteLoss
from tests.conftest import REPO

pytestmark = pytest.mark.slow  # real training runs: left out of make test-fast


@pytest.fixture(scope="module")
def mnist_subset(data_dir, tmp_path_factory):
    manifest = subsample(read_dataset(data_dir / "pneumoniamnist"), 48, seed=0)
    manifest = manifest[manifest["split"] != "test"]
    return prepare_dataset(manifest, Preprocessing(32), tmp_path_factory.mktemp("cache"))


def _cfg(tmp_path, *extra):
    return load_config(
        None,
        [
            "train.batch_size=16",
            "train.early_stopping_patience=null",
            f"train.output_dir={tmp_path}",
            "train.warmup_epochs=0.5",
            *extra,
        ],
    )


def _weights(path):
    return torch.load(path, weights_only=False)["model"]


class Crash:
    """Interrupts training after its first epoch, as a killed run would."""

    def on_epoch_end(self, trainer):
        if trainer.state.epoch == 1:
            raise KeyboardInterrupt


def test_resume_after_interruption_equals_uninterrupted(mnist_subset, tmp_path):
    straight = train_model(mnist_subset, _cfg(tmp_path / "a", "train.epochs=3"), show_progress=False)
    # "interrupted": a run configured for 3 epochs that died after its first one
    with pytest.raises(KeyboardInterrupt):
        train_model(mnist_subset, _cfg(tmp_path / "b", "train.epochs=3"), show_progress=False, extra_handlers=[Crash()])
    resumed = train_model(mnist_subset, _cfg(tmp_path / "b", "train.epochs=3", "train.resume=true"), show_progress=False)
    assert resumed.state.epoch == 3
    assert [h["val_auc"] for h in resumed.state.history] == pytest.approx([h["val_auc"] for h in straight.state.history])
    a, b = _weights(straight.checkpoint_path), _weights(resumed.checkpoint_path)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_the_weight_average_is_what_is_validated_kept_and_resumed(mnist_subset, tmp_path):
    settings = ("train.epochs=2", "train.ema_decay=0.9")
    straight = train_model(mnist_subset, _cfg(tmp_path / "a", *settings), show_progress=False)
    kept, raw = torch.load(straight.model_path, weights_only=True), _weights(straight.checkpoint_path)
    assert any(not torch.equal(kept[name], raw[name]) for name in kept)  # the average, not the last weights
    images, rows = mnist_subset.subset(mnist_subset.manifest["split"] == "val")
    scores = predict_proba(load_trained_model(straight.model_path, "resnet18"), images, torch.device("cpu"))
    assert roc_auc_score(rows["label"], scores) == pytest.approx(straight.state.best_val_auc, abs=1e-4)

    with pytest.raises(KeyboardInterrupt):
        train_model(mnist_subset, _cfg(tmp_path / "b", *settings), show_progress=False, extra_handlers=[Crash()])
    resumed = train_model(mnist_subset, _cfg(tmp_path / "b", *settings, "train.resume=true"), show_progress=False)
    assert [h["val_auc"] for h in resumed.state.history] == pytest.approx([h["val_auc"] for h in straight.state.history])
    again = torch.load(resumed.model_path, weights_only=True)
    assert all(torch.equal(kept[name], again[name]) for name in kept)


def test_learns_above_chance_and_keeps_best(mnist_subset, tmp_path, capsys):
    result = train_model(mnist_subset, _cfg(tmp_path, "train.epochs=2"))
    assert result.state.best_val_auc > 0.75
    assert result.model_path.is_file() and result.checkpoint_path.is_file()
    assert len(result.state.history) == 2 and result.state.history[-1]["train_images_per_second"] > 0
    # not a terminal (as in CI or a Prefect worker): no progress bar drawn at the end, one line per epoch
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("  ")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"], lines
    assert f"val AUC {result.state.history[-1]['val_auc']:.4f}" in lines[-1]


def test_early_stopping_stops(mnist_subset, tmp_path):
    cfg = _cfg(tmp_path, "train.epochs=6", "train.early_stopping_patience=1", "train.lr=1e-9", "train.warmup_epochs=0")
    result = train_model(mnist_subset, cfg, show_progress=False)
    assert result.state.epoch < 6


def test_single_class_training_set_is_refused(mnist_subset, tmp_path):
    cfg = _cfg(tmp_path, "train.epochs=1")
    with pytest.raises(TrainingError, match="both classes"):
        Trainer(build_model("resnet18"), np.zeros((8, 32, 32), np.uint8), np.ones(8, np.int64),
                np.zeros((4, 32, 32), np.uint8), np.ones(4, np.int64), cfg.train, cfg.augment, 0)


def test_a_non_finite_loss_ends_training_before_it_reaches_the_weights(mnist_subset, tmp_path):
    cfg = _cfg(tmp_path, "train.epochs=1")
    images, rows = mnist_subset.subset(mnist_subset.manifest["split"] == "train")
    model = build_model("resnet18")
    with torch.no_grad():
        model.head.weight.fill_(float("nan"))  # every logit NaN from the first batch on
    before = {name: value.detach().clone() for name, value in model.named_parameters() if name != "head.weight"}
    trainer = Trainer(model, images, rows["label"].to_numpy(), images[:4], rows["label"].to_numpy()[:4], cfg.train, cfg.augment, 0)
    with pytest.raises(NonFiniteLoss, match="loss cross-entropy is not finite at epoch 1, batch 0"):
        trainer.fit()
    after = dict(trainer.model.named_parameters())
    assert trainer.state.step == 0 and all(torch.equal(value, after[name]) for name, value in before.items())


def test_resume_without_checkpoint_is_a_clear_error(mnist_subset, tmp_path):
    with pytest.raises(TrainingError, match="no checkpoint"):
        train_model(mnist_subset, _cfg(tmp_path / "empty", "train.resume=true"), show_progress=False)
    assert not (tmp_path / "empty").exists()


@pytest.fixture(scope="module")
def trained_once(data_dir, tmp_path_factory):
    """`crosssim train` for one epoch on a prepared PneumoniaMNIST subset: (CLI settings, its train folder)."""
    project = tmp_path_factory.mktemp("project")
    overrides = [
        "data.source=pneumoniamnist", "data.external=[]", "crosssim.enabled=false", "data.image_size=32",
        f"data.prepared_dir={project / 'prepared'}", f"data.cache_dir={project / 'cache'}",
        "train.epochs=1", "train.batch_size=16", "train.early_stopping_patience=null",
    ]
    cfg = load_config(REPO / "params.yaml", overrides)
    prepare_site(cfg, "pneumoniamnist", subsample(read_dataset(data_dir / "pneumoniamnist"), 16, seed=0))
    settings = ["--config", str(REPO / "params.yaml")]
    for override in [*overrides, f"train.output_dir={project / 'train'}"]:
        settings += ["--set", override]
    result = CliRunner().invoke(app, ["train", *settings])
    assert result.exit_code == 0, result.output
    return settings, project / "train"


def _resume(trained_once, tmp_path, *overrides):
    """`crosssim train --resume` on a copy of the trained folder: (exit code, output, last.pt)."""
    settings, trained = trained_once
    train_dir = shutil.copytree(trained, tmp_path / "train")
    extra = [item for override in (f"train.output_dir={train_dir}", *overrides) for item in ("--set", override)]
    result = CliRunner().invoke(app, ["train", "--resume", *settings, *extra])
    assert "Traceback" not in result.output, result.output
    return result.exit_code, " ".join(result.output.split()), train_dir / "last.pt"


def test_resume_with_another_configuration_lists_each_difference(trained_once, tmp_path):
    before = (trained_once[1] / "last.pt").read_bytes()
    code, output, last = _resume(
        trained_once, tmp_path, "train.backbone=mobilenet_v3_small", "train.batch_size=8", "train.lr=0.01"
    )
    assert code == 2, output
    assert "was trained with another configuration" in output
    assert "train.backbone: checkpoint 'resnet18', config 'mobilenet_v3_small'" in output
    assert "train.batch_size: checkpoint 16, config 8" in output and "train.lr: checkpoint 0.001, config 0.01" in output
    assert last.read_bytes() == before  # nothing trained, nothing rewritten


def test_resume_from_a_truncated_checkpoint_names_the_file(trained_once, tmp_path):
    last = shutil.copytree(trained_once[1], tmp_path / "broken") / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    code, output, _ = _resume((trained_once[0], last.parent), tmp_path)
    assert code == 2 and "is truncated or corrupt" in output
    assert "last.pt" in "".join(output.split())  # the path may be folded across lines


def test_resume_may_raise_epochs_and_says_so(trained_once, tmp_path):
    code, output, last = _resume(trained_once, tmp_path, "train.epochs=2")
    assert code == 0, output
    assert "note: train.epochs raised from 1 to 2: training continues after epoch 1" in output
    assert json.loads((last.parent / "train_summary.json").read_text())["epochs_run"] == 2
    settings = [*trained_once[0], "--set", f"train.output_dir={last.parent}", "--set", "train.epochs=2"]
    again = CliRunner().invoke(app, ["train", "--resume", *settings])
    assert again.exit_code == 0 and "holds 2 of 2 epochs: nothing left to train" in " ".join(again.output.split())


@pytest.mark.parametrize("backbone", ["resnet50", "densenet121", "mobilenet_v3_small", "efficientnet_b0"])
def test_other_backbones_take_one_channel(backbone):
    model = build_model(backbone).eval()
    assert model(torch.rand(2, 1, 64, 64)).shape == (2, 2)


def test_pretrained_weights_load_from_a_local_file_into_the_gray_stem(tmp_path):
    from torchvision import models

    reference = models.resnet18(weights=None)
    weights = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), weights)
    model = build_model("resnet18", weights)
    assert torch.allclose(model.features.conv1.weight, reference.conv1.weight.sum(dim=1, keepdim=True))
    assert torch.equal(model.features.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)


def test_missing_or_wrong_pretrained_weights_are_clear_errors(tmp_path):
    with pytest.raises(TrainingError, match="not found"):
        build_model("resnet18", tmp_path / "absent.pth")
    from torchvision import models

    wrong = tmp_path / "mobilenet.pth"
    torch.save(models.mobilenet_v3_small(weights=None).state_dict(), wrong)
    with pytest.raises(TrainingError, match="not a resnet18 state_dict"):
        build_model("resnet18", wrong)
