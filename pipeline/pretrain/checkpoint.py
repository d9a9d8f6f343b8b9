"""The pretrained backbone as a file ``build_model(backbone, path)`` loads.

``build_model`` takes a torchvision state_dict: an RGB stem, which it turns into the 1-channel one by summing the
three kernels, and torchvision's classifier, which it drops. The file is written in that form, so the pretrained
backbone loads like any other local weights file (train finds it through :mod:`pipeline.training.weights`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision import models

MANIFEST_FILE = "manifest.csv"  # the images the backbone was pretrained on: image_id, site, split


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
