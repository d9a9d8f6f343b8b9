"""Drift checks of a running rollout: per site and per model (champion, challenger), the latest served images and
probabilities against the model's drift reference (its serving bundle's ``reference.npz``).

A check alarms when its input drift (MMD permutation test of the images' embeddings) or its output drift
(Kolmogorov–Smirnov test of the probabilities) has a p-value below ``rollout.drift_alpha``; it also reports the
confidence-based performance estimate. A site with fewer than ``rollout.drift_min_window`` served images in the
rollout is not checked; images no longer kept (retention) leave the input test out, the output test still runs.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from mlflow.artifacts import download_artifacts
from mlflow.exceptions import MlflowException

from pipeline.config import RolloutConfig
from pipeline.data.images import ImageDecodeError, decode_image
from pipeline.data.preprocessing import Preprocessing
from pipeline.registry.store import ModelRegistry
from pipeline.rollout.assignment import CHAMPION_ARM
from pipeline.rollout.drift import (
    DriftReference,
    DriftTest,
    EstimatedPerformance,
    estimated_performance,
    image_embedding,
    mmd_test,
    output_drift,
)
from pipeline.rollout.state import Rollout
from pipeline.serving.bundle import ARTIFACT_URI_TAG, MANIFEST, read_bundle
from pipeline.serving.image_store import ImageStore
from pipeline.serving.ledger import PredictionLedger, PredictionRow


@dataclass(frozen=True)
class ModelReference:
    """What a version's drift checks need from its bundle."""

    version: str
    preprocessing: Preprocessing
    threshold: float
    reference: DriftReference


@dataclass(frozen=True)
class DriftCheck:
    site: str
    model: str  # champion | challenger
    version: str
    window: int  # served predictions looked at
    images: int  # of which the image was still kept
    input: DriftTest | None
    output: DriftTest
    estimated: EstimatedPerformance
    alarm: bool
    reasons: list[str] = field(default_factory=list)


def model_reference(registry: ModelRegistry, name: str, version: str) -> ModelReference | None:
    """The drift reference of ``name`` v``version`` (None: its bundle predates drift references, or has none)."""
    uri = registry.version(name, version).tags.get(ARTIFACT_URI_TAG)
    if not uri:
        return None
    with tempfile.TemporaryDirectory(prefix="crosssim-drift-") as folder:
        try:
            bundle = read_bundle(Path(download_artifacts(f"{uri}/{MANIFEST}", dst_path=folder, tracking_uri=registry.tracking_uri)).parent)
            if bundle.reference is None:
                return None
            local = download_artifacts(f"{uri}/{bundle.reference}", dst_path=folder, tracking_uri=registry.tracking_uri)
        except (MlflowException, OSError):
            return None
        return ModelReference(version, bundle.preprocessing, bundle.threshold, DriftReference.load(Path(local)))


def drift_checks(
    ledger: PredictionLedger,
    images: ImageStore,
    rollout: Rollout,
    references: dict[str, ModelReference],
    cfg: RolloutConfig,
) -> list[DriftCheck]:
    """One check per site and model with a reference; ``references``: "champion" / "challenger" → its reference."""
    rows = ledger.rows(rollout_id=rollout.rollout_id)
    checks = []
    for site in sorted({row.site for row in rows}):
        window = [row for row in rows if row.site == site][-cfg.drift_window :]
        if len(window) < cfg.drift_min_window:
            continue
        pixels = _kept_pixels(window, images)
        for model, reference in references.items():
            probabilities = np.array([p for row in window if (p := _probability(row, model)) is not None])
            served = [reference.preprocessing.image(image) for image in pixels]
            embedded = image_embedding(np.stack(served)) if served else None
            checks.append(_check(site, model, reference, len(window), embedded, probabilities, cfg))
    return checks


def _check(
    site: str,
    model: str,
    reference: ModelReference,
    window: int,
    embedded: np.ndarray | None,
    probabilities: np.ndarray,
    cfg: RolloutConfig,
) -> DriftCheck:
    enough_images = embedded is not None and len(embedded) >= cfg.drift_min_window
    inputs = mmd_test(reference.reference.embeddings, embedded) if enough_images else None
    outputs = output_drift(reference.reference.probabilities, probabilities)
    reasons = []
    if inputs is not None and inputs.p_value < cfg.drift_alpha:
        reasons.append(f"input drift at {site} for the {model} (MMD p = {inputs.p_value:.4f})")
    if outputs.p_value < cfg.drift_alpha:
        reasons.append(f"output drift at {site} for the {model} (KS p = {outputs.p_value:.2g})")
    return DriftCheck(
        site, model, reference.version, window, 0 if embedded is None else len(embedded), inputs, outputs,
        estimated_performance(probabilities, reference.threshold), bool(reasons), reasons,
    )  # fmt: skip


def _probability(row: PredictionRow, model: str) -> float | None:
    answered_by_champion = row.arm in (None, CHAMPION_ARM)
    if (model == "champion") == answered_by_champion:
        return row.probability
    return row.shadow_probability


def _kept_pixels(rows: list[PredictionRow], images: ImageStore) -> list[np.ndarray]:
    pixels = []
    for row in rows:
        path = images.get(row.inference_id)
        if path is None:
            continue
        try:
            pixels.append(decode_image(path))
        except ImageDecodeError:
            continue  # a damaged file in the store is one image fewer, not a failed check
    return pixels
