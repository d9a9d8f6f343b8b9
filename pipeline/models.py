"""torchvision backbones adapted to 1-channel chest X-rays, split into features + head.

The feature extractor and the linear head are separate modules because CrossSim
aligns the features of two domains and distils through the head.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision import models

from pipeline.augment import PIXEL_MEAN, PIXEL_STD
from pipeline.errors import TrainingError

NUM_CLASSES = 2


def _first_conv_parent(model: nn.Module) -> tuple[nn.Module, str, nn.Conv2d]:
    for module in model.modules():
        for name, child in module.named_children():
            if isinstance(child, nn.Conv2d) and child.in_channels == 3:
                return module, name, child
    raise TrainingError("backbone has no 3-channel input convolution to adapt")


def _to_single_channel(model: nn.Module) -> None:
    """Swap the RGB stem for a 1-channel one; summing RGB kernels keeps pretrained responses."""
    parent, name, conv = _first_conv_parent(model)
    gray = nn.Conv2d(
        1, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups, conv.bias is not None
    )
    with torch.no_grad():
        gray.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
        if conv.bias is not None:
            gray.bias.copy_(conv.bias)
    setattr(parent, name, gray)


def _detach_classifier(model: nn.Module) -> int:
    """Replace the torchvision classifier by Identity; return the feature width."""
    if hasattr(model, "fc"):
        width = model.fc.in_features
        model.fc = nn.Identity()
    elif isinstance(model.classifier, nn.Linear):  # densenet
        width = model.classifier.in_features
        model.classifier = nn.Identity()
    else:  # mobilenet / efficientnet: keep their pre-logit layers, drop the last Linear
        last = model.classifier[-1]
        width = last.in_features
        model.classifier[-1] = nn.Identity()
    return width


class Classifier(nn.Module):
    """``features(x)`` gives pooled backbone features; ``head`` maps them to 2 logits."""

    def __init__(self, backbone: str) -> None:
        super().__init__()
        if not hasattr(models, backbone):
            raise TrainingError(f"unknown backbone {backbone!r}")
        network = getattr(models, backbone)(weights=None)
        self.backbone_name = backbone
        self.feature_dim = _detach_classifier(network)
        self.features = network
        self.head = nn.Linear(self.feature_dim, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_model(backbone: str, pretrained_weights: Path | None = None) -> Classifier:
    """A 1-channel classifier; ``pretrained_weights`` is a local torchvision state_dict (RGB stem)."""
    classifier = Classifier(backbone)
    if pretrained_weights is not None:
        path = Path(pretrained_weights)
        if not path.is_file():
            raise TrainingError(f"pretrained weights {path} not found (weights load only from a local file)")
        network = getattr(models, backbone)(weights=None)
        try:
            network.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except (RuntimeError, ValueError) as exc:
            raise TrainingError(f"{path}: not a {backbone} state_dict ({exc})") from exc
        _detach_classifier(network)
        classifier.features = network
    _to_single_channel(classifier.features)
    return classifier


class PneumoniaProbability(nn.Module):
    """Serving form of a Classifier: (B, 1, S, S) float pixels in [0, 1] → (B,) P(pneumonia).

    Normalisation lives inside, so a registry consumer needs no knowledge of training code.
    """

    def __init__(self, classifier: Classifier, mean: float, std: float) -> None:
        super().__init__()
        self.classifier = classifier
        self.mean = mean
        self.std = std

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        logits = self.classifier((pixels - self.mean) / self.std)
        return torch.softmax(logits, dim=1)[:, 1]


def servable(classifier: nn.Module, image_size: int) -> tuple[PneumoniaProbability, np.ndarray]:
    """Any classifier in its serving form (as registered), and an input example for its signature: a batch of 2,
    so that the batch dimension stays dynamic."""
    example = np.zeros((2, 1, image_size, image_size), dtype=np.float32)
    return PneumoniaProbability(classifier.eval(), PIXEL_MEAN, PIXEL_STD).eval(), example
