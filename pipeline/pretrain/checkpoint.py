"""The pretrained backbone as a file ``build_model(backbone, path)`` loads, and where train finds it.

``build_model`` takes a torchvision state_dict: an RGB stem, which it turns into the 1-channel one by summing the
three kernels, and torchvision's classifier, which it drops. The file is written in that form, so the pretrained
backbone loads like any other local weights file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torchvision import models

from pipeline.config import PRETRAIN_WEIGHTS, PipelineConfig
from pipeline.errors import TrainingError

BACKBONE_FILE = "backbone.pt"
MANIFEST_FILE = "manifest.csv"  # the images the backbone was pretrained on: image_id, site, split
SUMMARY_FILE = "pretrain_summary.json"


def save_backbone(features: nn.Module, backbone: str, path: Path) -> None:
    """``features`` (a Classifier's, 1-channel stem) as a torchvision ``backbone`` state_dict at ``path``.

    The stem's kernel is spread evenly over the three RGB channels, so that build_model's sum restores it. The
    torchvision classifier keeps its initial weights: they only make the file complete, build_model drops them."""
    complete = getattr(models, backbone)(weights=None).state_dict()
    for name, tensor in features.state_dict().items():
        expected = complete[name]
        if tensor.shape != expected.shape:  # the stem: (out, 1, k, k) where torchvision has (out, 3, k, k)
            tensor = (tensor / expected.shape[1]).expand_as(expected)
        complete[name] = tensor.detach().cpu().contiguous()
    torch.save(complete, path)


def pretrained_weights(cfg: PipelineConfig) -> Path | None:
    """The weights file training starts from: ``train.pretrained_weights``, where ``pretrain`` means the backbone
    ``crosssim pretrain`` published in ``pretrain.output_dir`` (it must be of ``train.backbone``)."""
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
