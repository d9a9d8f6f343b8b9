"""Warm-start retraining on a tiny real NIH subset: from the champion's weights, on the site's reads alone or with
source replay, leaving the champion untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.crosssim.engine import DomainData
from pipeline.data.preprocessing import Preprocessing
from pipeline.data.prepare import prepare_dataset
from pipeline.data.readers import read_dataset
from pipeline.errors import DatasetError
from pipeline.loop.retrain import warm_start_retrain
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
    cfg = load_config(REPO / "params.yaml", ["loop.retrain_steps=25", "loop.retrain_lr=0.001", "train.batch_size=8"])
    torch.manual_seed(0)
    champion = build_model("resnet18").eval()
    before = {k: v.clone() for k, v in champion.state_dict().items()}
    made = warm_start_retrain(champion, reads, cfg.loop, cfg.train, cfg.augment, seed=1)
    assert all(torch.equal(before[k], v) for k, v in champion.state_dict().items())  # the champion keeps serving as it was
    assert (made.labelled, made.replayed) == (24, 0) and 0.0 <= made.threshold <= 1.0 and made.seconds > 0
    assert made.threshold_chosen_on == "nih reads (labelled rows)"

    def fit(model) -> float:
        from sklearn.metrics import roc_auc_score

        return roc_auc_score(reads.labels, predict_proba(model, reads.images, torch.device("cpu")))

    assert fit(made.model) > max(0.8, fit(champion))  # it learnt the reads it was given
    replay_cfg = cfg.model_copy(update={"loop": cfg.loop.model_copy(update={"source_replay": 0.5})})
    replayed = warm_start_retrain(champion, reads, replay_cfg.loop, cfg.train, cfg.augment, seed=1, source=source)
    assert replayed.replayed == 12 and replayed.labelled == 24
    one_class = DomainData("normals", reads.images[reads.labels == 0], reads.labels[reads.labels == 0])
    with pytest.raises(DatasetError, match="both classes"):
        warm_start_retrain(champion, one_class, cfg.loop, cfg.train, cfg.augment, seed=1)
