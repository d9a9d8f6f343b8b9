"""The serving bundle: what a registered version carries so that it can be served without ``params.yaml``.

A bundle is a folder (logged to the registering MLflow run under ``serving/<registered name>/``, and named by
the version's ``serving.artifact_uri`` tag)::

    serving.json      this module's ServingBundle: preprocessing (size, harmonisation), decision threshold,
                      artifacts and their hashes
    model.onnx        FP32 ONNX graph, dynamic batch: (B, 1, S, S) float pixels in [0, 1] → (B,) P(pneumonia)
    model.int8.onnx   static INT8 (QDQ) version, only when it passed its accuracy check
    reference.npz     the drift reference: embeddings and probabilities of the images the model was built on
                      (pipeline.rollout.drift; no pixels)

Normalisation is inside both graphs (they are exported from ``PneumoniaProbability``), so a client's whole
preprocessing is the bundle's ``preprocessing.model_input``: decode, grayscale, resize to ``image_size``,
harmonise, scale to [0, 1] — the functions the training images went through (pipeline.data.preprocessing).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.data.prepare import file_sha256 as sha256_of  # one file hash for the cache and the bundles
from pipeline.data.preprocessing import Preprocessing
from pipeline.errors import PipelineError

BUNDLE_FORMAT = "crosssim-serving/1"
MANIFEST = "serving.json"
FP32_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
REFERENCE_FILE = "reference.npz"
INPUT_NAME = "pixels"
OUTPUT_NAME = "probability"
PRECISIONS = ("fp32", "int8")
# the registered version's tags (set at registration, pipeline.serving.export.version_tags)
ARTIFACT_URI_TAG = "serving.artifact_uri"  # runs:/<run id>/serving/<registered name>: the bundle folder
FP32_SHA256_TAG = "serving.fp32_sha256"  # the FP32 file's hash, as the registry vouches for it
INT8_TAG = "serving.int8"  # "yes", or why the version has no INT8 artifact
# JSON {site: threshold}: each site's operating point, chosen on its own matured reads after registration
# (pipeline.loop.thresholds, set by pipeline.registry.review's site-threshold action); other sites get the bundle's
SITE_THRESHOLDS_TAG = "site_thresholds"


class BundleError(PipelineError):
    """A serving bundle is missing, incomplete or altered."""


@dataclass(frozen=True)
class ArtifactInfo:
    """One ONNX file of the bundle and the checks it passed."""

    file: str
    sha256: str
    checks: dict[str, float] = field(default_factory=dict)  # e.g. max_abs_diff, auc.<set>, auc_delta.<set>


@dataclass(frozen=True)
class ServingBundle:
    backbone: str
    image_size: int
    threshold: float
    threshold_chosen_on: str
    artifacts: dict[str, ArtifactInfo]  # precision ("fp32" | "int8") → its file
    notes: list[str] = field(default_factory=list)  # why an artifact is missing, in words a model card can show
    format: str = BUNDLE_FORMAT
    reference: str | None = None  # the drift reference's file; None: bundled before drift checks existed
    harmonisation: str = "none"  # pipeline.data.preprocessing; bundles from before it existed had none

    @property
    def preprocessing(self) -> Preprocessing:
        """What turns a decoded upload into this model's input, exactly as its training images were made."""
        return Preprocessing(self.image_size, self.harmonisation)

    def path_of(self, directory: Path, precision: str) -> Path:
        """The ONNX file for ``precision`` inside ``directory``, checked against its recorded hash."""
        if precision not in self.artifacts:
            reason = "; ".join(self.notes) or "not built"
            raise BundleError(f"this version has no {precision} artifact ({reason})")
        info = self.artifacts[precision]
        path = Path(directory) / info.file
        if not path.is_file():
            raise BundleError(f"{path}: missing from the serving bundle")
        if sha256_of(path) != info.sha256:
            raise BundleError(f"{path}: its SHA-256 differs from the one recorded in {MANIFEST} (altered file)")
        return path


def write_bundle(directory: Path, bundle: ServingBundle) -> Path:
    path = Path(directory) / MANIFEST
    path.write_text(json.dumps(asdict(bundle), indent=2))
    return path


def read_bundle(directory: Path) -> ServingBundle:
    path = Path(directory) / MANIFEST
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: not a readable serving bundle ({exc})") from exc
    if raw.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path}: format {raw.get('format')!r}, this version of CrossSim reads {BUNDLE_FORMAT!r}")
    artifacts = {precision: ArtifactInfo(**info) for precision, info in raw.pop("artifacts").items()}
    return ServingBundle(artifacts=artifacts, **raw)


def site_thresholds(tags: Mapping[str, str]) -> dict[str, float]:
    """The per-site thresholds a version's tags carry ({} when none was chosen); a malformed tag is a BundleError."""
    raw = tags.get(SITE_THRESHOLDS_TAG)
    if not raw:
        return {}
    try:
        parsed = json.loads(raw)
        thresholds = {str(site): float(value) for site, value in parsed.items()}
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError) as exc:
        raise BundleError(f"version tag {SITE_THRESHOLDS_TAG}: not a JSON object of site → threshold ({exc})") from exc
    if not all(math.isfinite(value) and 0.0 <= value <= 1.0 for value in thresholds.values()):
        raise BundleError(f"version tag {SITE_THRESHOLDS_TAG}: thresholds must be probabilities in [0, 1]")
    return thresholds
