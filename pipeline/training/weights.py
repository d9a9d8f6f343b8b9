"""The weights a training starts from: ``train.pretrained_weights``, a local file or ``pretrain``.

``pretrain`` means the backbone ``crosssim pretrain`` (:mod:`pipeline.pretrain`) published in ``pretrain.output_dir``
for this configuration. The names of that folder's files live here, with the one reader of them that every
training imports, so that the stages which only evaluate do not import the pretraining code.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import PRETRAIN_WEIGHTS, PipelineConfig
from pipeline.errors import TrainingError

BACKBONE_FILE = "backbone.pt"  # a torchvision state_dict: build_model(backbone, path) loads it
SUMMARY_FILE = "pretrain_summary.json"


def pretrained_weights(cfg: PipelineConfig) -> Path | None:
    """The weights file training starts from; for ``pretrain``, the published backbone, which must be of
    ``train.backbone``."""
    weights = cfg.train.pretrained_weights
    if weights != PRETRAIN_WEIGHTS:
        return weights
    folder = cfg.pretrain.output_dir
    summary_path = folder / SUMMARY_FILE
    if not summary_path.is_file():
        raise TrainingError(
            f"train.pretrained_weights=pretrain: no pretrained backbone in {folder}; run `crosssim pretrain` first"
        )
    made_for = json.loads(summary_path.read_text())["backbone"]
    if made_for != cfg.train.backbone:
        raise TrainingError(
            f"train.pretrained_weights=pretrain: {folder} holds a pretrained {made_for}, but train.backbone is "
            f"{cfg.train.backbone}; run `crosssim pretrain` again with this configuration"
        )
    return folder / BACKBONE_FILE
