"""The adapted classifier (backbone → shared 256-d mapping head → linear head) and its files.

CrossSim's models are saved as self-describing checkpoints (architecture + weights) so
that evaluation, serving and the registry can rebuild them without the run's config.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn

from pipeline.crosssim.modules import MappingHead
from pipeline.errors import TrainingError
from pipeline.models import NUM_CLASSES, Classifier, build_model


class AdaptedClassifier(nn.Module):
    """The source model's backbone (copied, then adapted) followed by the shared mapping head.

    ``embed`` gives the mapping-head features, the space the discriminator works in: both
    domains pass through the same head, so source and target are compared in one space.
    """

    def __init__(self, backbone: str, features: nn.Module, feature_dim: int, mapping_dim: int) -> None:
        super().__init__()
        self.backbone_name = backbone
        self.feature_dim = feature_dim
        self.mapping_dim = mapping_dim
        self.features = features
        self.mapping = MappingHead(feature_dim, mapping_dim)
        self.head = nn.Linear(mapping_dim, NUM_CLASSES)

    @classmethod
    def from_source(cls, source: Classifier, mapping_dim: int) -> AdaptedClassifier:
        """Target feature extractor initialised from the source one; the source model is left untouched."""
        return cls(source.backbone_name, copy.deepcopy(source.features), source.feature_dim, mapping_dim)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.mapping(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def save_model(model: nn.Module, path: Path) -> Path:
    """Write architecture + weights atomically (a crash never leaves a model file behind)."""
    if isinstance(model, AdaptedClassifier):
        spec = {"kind": "adapted", "backbone": model.backbone_name, "mapping_dim": model.mapping_dim}
    elif isinstance(model, Classifier):
        spec = {"kind": "classifier", "backbone": model.backbone_name}
    else:
        raise TrainingError(f"cannot save a {type(model).__name__}: not a CrossSim model")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"spec": spec, "state_dict": model.state_dict()}, tmp)
    os.replace(tmp, path)
    return path


def load_model(path: Path) -> nn.Module:
    """Rebuild a model written by :func:`save_model`, in eval mode on the CPU."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        spec = payload["spec"]
    except (FileNotFoundError, RuntimeError, KeyError, TypeError) as exc:
        raise TrainingError(f"{path}: not a CrossSim model file ({exc})") from exc
    classifier = build_model(spec["backbone"])
    if spec["kind"] == "adapted":
        model: nn.Module = AdaptedClassifier(
            spec["backbone"], classifier.features, classifier.feature_dim, spec["mapping_dim"]
        )
    else:
        model = classifier
    model.load_state_dict(payload["state_dict"])
    return model.eval()
