"""Warm-start retraining on a tiny real NIH subset: from the champion's weights, on the site's reads alone or with
source replay, calibrated on the reads it held out, leaving the champion untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.crosssim.engine import DomainData
from pipeline.data.prepare import prepare_dataset
from pipeline.data.preprocessing import Preprocessing
from pipeline.data.readers import read_dataset
from pipeline.errors import DatasetError
from pipeline.loop.retrain import calibration_split, fit_temperature, fold_temperature, warm_start_retrain
from pipeline.models import build_model
from pipeline.training.inference import predict_proba
from tests.conftest import REPO, copy_kermany_subset, copy_nih_subset

pytestmark = pytest.mark.slow  # trains a network (seconds)


def _domain(folder, cache, name: str) -> DomainData:
    prepared = prepare_dataset(read_dataset(folder), Preprocessing(32), cache)
    return DomainData(name, np.asarray(prepared.images), prepared.manifest["label"].to_numpy("int64"))


def test_warm_start_retrain_fits_the_reads_from_the_champion_and_leaves_it_unchanged(data_dir, tmp_path):
    reads = _domain(copy_nih_subset(data_dir, tmp_path / "nih", per_class=12), tmp_path / "cache", "nih reads")
    source = _domain(copy_kermany_subset(data_dir, tmp_path / "kermany", per_class=8), tmp_path / "cache", "kermany")
    overrides = ["loop.retrain_steps=25", "loop.retrain_lr=0.001", "train.batch_size=8", "loop.calibration_share=0.25"]
    cfg = load_config(REPO / "params.yaml", overrides)
    torch.manual_seed(0)
    champion = build_model("resnet18").eval()
    before = {k: v.clone() for k, v in champion.state_dict().items()}
    made = warm_start_retrain(champion, reads, cfg.loop, cfg.train, cfg.augment, seed=1)
    assert all(torch.equal(before[k], v) for k, v in champion.state_dict().items())  # the champion keeps serving as it was
    # a quarter of each class (3 of 12) held out to calibrate it and choose its threshold
    assert (made.labelled, made.calibrated_on, made.replayed) == (18, 6, 0) and made.seconds > 0
    assert 0.0 <= made.threshold <= 1.0 and made.threshold_chosen_on == "nih reads (held-out reads) (labelled rows)"
    fit_rows, held_out = calibration_split(reads.labels, cfg.loop.calibration_share, seed=1)
    trained_on = DomainData("fit", reads.images[fit_rows], reads.labels[fit_rows])

    def auc(model, data: DomainData) -> float:
        from sklearn.metrics import roc_auc_score

        return roc_auc_score(data.labels, predict_proba(model, data.images, torch.device("cpu")))

    assert auc(made.model, trained_on) > max(0.8, auc(champion, trained_on))  # it learnt the reads it was given
    replay_cfg = cfg.model_copy(update={"loop": cfg.loop.model_copy(update={"source_replay": 0.5})})
    replayed = warm_start_retrain(champion, reads, replay_cfg.loop, cfg.train, cfg.augment, seed=1, source=source)
    assert replayed.replayed == 9 and replayed.labelled == 18
    one_class = DomainData("normals", reads.images[reads.labels == 0], reads.labels[reads.labels == 0])
    with pytest.raises(DatasetError, match="both classes"):
        warm_start_retrain(champion, one_class, cfg.loop, cfg.train, cfg.augment, seed=1)


def test_calibration_holds_out_a_share_of_each_class_or_nothing():
    labels = np.array([0] * 12 + [1] * 8)
    fit, held = calibration_split(labels, 0.25, seed=3)
    assert sorted(labels[held].tolist()) == [0, 0, 0, 1, 1] and len(fit) == 15 and not set(fit) & set(held)
    few = np.array([0] * 12 + [1] * 3)  # 1 pneumonia read would be held out: too few to calibrate on
    assert calibration_split(few, 0.25, seed=3)[1].size == 0
    assert calibration_split(labels, 0.0, seed=3)[1].size == 0


def test_the_fitted_temperature_is_folded_into_the_head_and_lowers_the_held_out_log_loss(data_dir, tmp_path):
    reads = _domain(copy_nih_subset(data_dir, tmp_path / "nih", per_class=10), tmp_path / "cache", "nih reads")
    torch.manual_seed(0)
    model = build_model("resnet18").eval()
    with torch.no_grad():
        model.head.weight.mul_(40)  # an over-confident network
    before = predict_proba(model, reads.images, torch.device("cpu")).astype(np.float64)
    temperature = fit_temperature(model, reads)
    fold_temperature(model, temperature)
    after = predict_proba(model, reads.images, torch.device("cpu")).astype(np.float64)

    def log_loss(p: np.ndarray) -> float:
        p = np.clip(p, 1e-7, 1 - 1e-7)
        return float(-np.mean(reads.labels * np.log(p) + (1 - reads.labels) * np.log(1 - p)))

    assert temperature > 1 and log_loss(after) < log_loss(before)
    logit = lambda p: np.log(np.clip(p, 1e-12, 1)) - np.log(np.clip(1 - p, 1e-12, 1))  # noqa: E731
    order = np.argsort(before)
    assert np.all(np.diff(after[order]) >= -1e-6)  # a temperature keeps the ranking (AUC unchanged)
    kept = (before > 1e-5) & (before < 1 - 1e-5)
    assert np.allclose(logit(after[kept]), logit(before[kept]) / temperature, rtol=1e-3, atol=1e-3)
