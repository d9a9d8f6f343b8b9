"""Domain-gap diagnostics on features of real images from the two hospitals."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.crosssim.diagnostics import domain_gap
from pipeline.data.prepare import prepare_dataset
from pipeline.data.preprocessing import Preprocessing
from pipeline.data.readers import read_dataset
from pipeline.data.splits import subsample
from pipeline.models import build_model
from pipeline.training.engine import seed_everything


def _features(model, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.features(torch.from_numpy(np.array(images)).float().div(255).unsqueeze(1)).numpy()


def test_domain_gap_separates_pediatric_from_adult_features(data_dir, tmp_path):
    kermany = subsample(read_dataset(data_dir / "kermany-pediatric"), 30, seed=0)
    nih = read_dataset(data_dir / "nih-cxr8").head(120)
    source = prepare_dataset(kermany, Preprocessing(64), tmp_path / "cache").images
    target = prepare_dataset(nih, Preprocessing(64), tmp_path / "cache").images
    seed_everything(0)
    model = build_model("resnet18").eval()
    source_f, target_f = _features(model, source), _features(model, target)

    across = domain_gap(source_f, target_f, "Kermany vs NIH", tmp_path / "across.png", seed=0)
    half = len(source_f) // 2
    within = domain_gap(source_f[:half], source_f[half:], "Kermany vs Kermany", tmp_path / "within.png", seed=0)
    assert across.proxy_a_distance > within.proxy_a_distance + 0.5
    assert across.mean_feature_distance > within.mean_feature_distance
    assert across.tsne_plot.stat().st_size > 10_000
