"""A registered version's trainable network: the learning loop fine-tunes the champion, so every version carries
its weights as well as its serving form.

MLflow 3 logs a PyTorch model as a torch.export archive (``serialization_format: pt2``), which serves but cannot
be trained further. So registration also points the version tag ``weights_artifact`` at a run artifact holding the
network's weights: a ``pipeline.crosssim.model.save_model`` file (architecture + state_dict: the adapted model
CrossSim wrote, a loop retrain's) or the source training's checkpoint (a state_dict of the version's ``backbone``).
``load_weights`` rebuilds that network.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow.artifacts
import torch
from mlflow.exceptions import MlflowException
from torch import nn

from pipeline.crosssim.model import load_model, save_model
from pipeline.models import build_model
from pipeline.registry.store import ModelRegistry, RegistryError

WEIGHTS_TAG = "weights_artifact"
WEIGHTS_FILE = "model.pt"


def log_weights(tracker, model: nn.Module, artifact_path: str = "weights") -> str:
    """Write ``model`` in save_model's format into the run's ``artifact_path``; its ``runs:/`` URI."""
    with tempfile.TemporaryDirectory(prefix="crosssim-weights-") as folder:
        tracker.log_artifact(save_model(model, Path(folder) / WEIGHTS_FILE), artifact_path=artifact_path)
    return f"runs:/{tracker.run_id}/{artifact_path}/{WEIGHTS_FILE}"


def load_weights(registry: ModelRegistry, name: str, ref: str) -> nn.Module:
    """The trainable network of version/alias ``ref`` of ``name`` (RegistryError when it has none)."""
    version = registry.version(name, ref)
    uri = version.tags.get(WEIGHTS_TAG)
    if not uri:
        raise RegistryError(
            f"{name} v{version.version} has no {WEIGHTS_TAG} tag (registered before versions carried trainable "
            "weights): register a model from `crosssim run` first, then the loop can fine-tune it"
        )
    with tempfile.TemporaryDirectory(prefix="crosssim-weights-") as folder:
        try:
            path = mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=folder, tracking_uri=registry.tracking_uri
            )
        except MlflowException as exc:
            raise RegistryError(
                f"{name} v{version.version}: its weights at {uri} cannot be read ({exc.message})"
            ) from exc
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(payload, dict) and "spec" in payload:
            return load_model(Path(path))
        if "backbone" not in version.tags:
            raise RegistryError(f"{name} v{version.version}: its weights are a bare state_dict and it has no backbone tag")
        network = build_model(version.tags["backbone"])  # a source checkpoint: the state_dict alone
        network.load_state_dict(payload)
        return network.eval()
