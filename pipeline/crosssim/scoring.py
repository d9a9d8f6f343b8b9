"""Scoring source, adapted and student models side by side on held-out sets.

Decision threshold rule (never target-test): Youden's J on the labelled target-train images
when adaptation had some, else on source-val. Every model gets its own threshold by the same
rule, so ACC / sensitivity / specificity compare like with like.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from pipeline.config import EvaluateConfig
from pipeline.crosssim.engine import UNLABELLED
from pipeline.crosssim.stage import DomainData
from pipeline.evaluation import ScoredModel, choose_threshold, evaluate_sites
from pipeline.training.inference import predict_proba


def decision_threshold(
    model: nn.Module, source_val: DomainData, target_train: DomainData, device: torch.device
) -> tuple[float, str]:
    labelled = target_train.labels != UNLABELLED
    if len(set(target_train.labels[labelled].tolist())) == 2:
        probs = predict_proba(model, np.asarray(target_train.images[labelled]), device)
        return choose_threshold(target_train.labels[labelled], probs), f"{target_train.name} (labelled rows)"
    return choose_threshold(source_val.labels, predict_proba(model, source_val.images, device)), source_val.name


def evaluate_models(
    models: Mapping[str, nn.Module],
    source_val: DomainData,
    target_train: DomainData,
    test_sets: Mapping[str, tuple[np.ndarray, pd.DataFrame]],
    cfg: EvaluateConfig,
    out_dir: Path,
    device: torch.device,
    seed: int,
) -> dict[str, ScoredModel]:
    """For each model: threshold by the rule above, then every test set (images + manifest rows with labels).

    Files go to ``out_dir/<model>/`` (see :func:`pipeline.evaluation.evaluate_sites`).
    """
    results: dict[str, ScoredModel] = {}
    for name, model in models.items():
        model = model.to(device).eval()
        threshold, chosen_on = decision_threshold(model, source_val, target_train, device)
        predictions = {
            set_name: rows.assign(prob=predict_proba(model, np.asarray(images), device))
            for set_name, (images, rows) in test_sets.items()
        }
        sets = evaluate_sites(predictions, threshold, cfg, out_dir / name, seed=seed)
        results[name] = ScoredModel(threshold, chosen_on, sets)
    return results
