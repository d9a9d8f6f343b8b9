"""The served model: a registered version's serving bundle on ONNX Runtime, and its FP32 PyTorch twin.

``ModelSource`` finds the version an alias (or a pinned number) names and loads it fully: the bundle the version's
``serving.artifact_uri`` tag points to, its ONNX file checked against the recorded SHA-256, an ONNX Runtime
session. ``LiveModel`` holds the version being served and replaces it by a single assignment once the next one
is loaded, so a request (or a micro-batch) that took the old one finishes on it, and every answer names the
version that computed it. A server following ``champion`` also follows the model's rollout (``rollout.active``):
the rollout's challenger is loaded beside the champion, and dropped when the rollout ends. Each version answers a
site at the threshold the registry chose on that site's reads (version tag ``site_thresholds``), else at its
bundle's; a changed tag is picked up at the next check by swapping in the same loaded version with the new
thresholds (no download, no new ONNX session).
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort
from mlflow.artifacts import download_artifacts
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from pipeline.data.preprocessing import Preprocessing
from pipeline.registry.store import CHAMPION, ModelRegistry, RegistryError
from pipeline.rollout.state import ROLLOUT_TAG, Rollout
from pipeline.serving.bundle import (
    ARTIFACT_URI_TAG,
    FP32_FILE,
    FP32_SHA256_TAG,
    INPUT_NAME,
    MANIFEST,
    OUTPUT_NAME,
    BundleError,
    ServingBundle,
    read_bundle,
    site_thresholds,
)
from pipeline.serving.runtime import onnx_session

if TYPE_CHECKING:  # torch is imported only when an explanation first needs the twin
    import torch

log = logging.getLogger("crosssim.serve")

TORCH_EXPORT_FILE = "model.pt2"  # in the pytorch flavour's data folder, as MLflow 3 logs models

@dataclass(frozen=True)
class ModelRef:
    """What to serve: ``version`` when pinned, else whatever ``alias`` points at."""

    name: str
    alias: str | None
    version: str | None = None

    def __str__(self) -> str:
        return f"{self.name} v{self.version}" if self.version else f"{self.name}@{self.alias}"


@dataclass(eq=False)
class ServedModel:
    """One loaded registered version; never changes once built (the twin is loaded on first use): new per-site
    thresholds make a new ``ServedModel`` sharing the session, so a batch keeps the thresholds it was scored under."""

    name: str
    version: str
    alias: str | None  # None: a pinned version
    precision: str
    bundle: ServingBundle
    session: ort.InferenceSession
    twin_uri: str  # where the registry keeps the version's PyTorch model
    tracking_uri: str
    site_thresholds: dict[str, float] = field(default_factory=dict)  # site → its own operating point
    _twin: torch.nn.Module | None = field(default=None, init=False, repr=False)
    _twin_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @property
    def artifact_sha256(self) -> str:
        return self.bundle.artifacts[self.precision].sha256

    @property
    def preprocessing(self) -> Preprocessing:
        return self.bundle.preprocessing

    @property
    def threshold(self) -> float:
        """The bundle's threshold (chosen on the source's validation split): what a site without its own gets."""
        return self.bundle.threshold

    def threshold_for(self, site: str) -> float:
        """The operating point ``site``'s answers are decided at."""
        return self.site_thresholds.get(site, self.bundle.threshold)

    def with_site_thresholds(self, thresholds: Mapping[str, float]) -> ServedModel:
        """This version answering at ``thresholds`` (itself when they are its own): same session, same twin."""
        if dict(thresholds) == self.site_thresholds:
            return self
        updated = replace(self, site_thresholds=dict(thresholds))
        updated._twin = self._twin  # loaded once per version, whatever its thresholds
        return updated

    def predict(self, inputs: np.ndarray) -> np.ndarray:
        """(B, 1, S, S) float32 pixels in [0, 1] → (B,) P(pneumonia)."""
        return np.asarray(self.session.run([OUTPUT_NAME], {INPUT_NAME: inputs})[0], dtype=np.float64)

    def twin(self) -> torch.nn.Module:
        """The FP32 PyTorch model of this version (what explanations run on), with its module hierarchy.

        MLflow 3 logs PyTorch models as torch.export archives and ``mlflow.pytorch.load_model`` gives them back
        flattened into one graph, whose submodules are never called: no layer could be hooked. Unflattening the
        archive keeps ``classifier.features.layer4`` etc. as modules that run. It is in eval mode as exported.
        """
        with self._twin_lock:
            if self._twin is None:
                self._twin = self._load_twin()
            return self._twin

    def _load_twin(self) -> torch.nn.Module:
        import torch
        from mlflow.models import Model

        with tempfile.TemporaryDirectory(prefix="crosssim-twin-") as folder:
            try:
                local = Path(download_artifacts(self.twin_uri, dst_path=folder, tracking_uri=self.tracking_uri))
                archive = local / Model.load(local).flavors["pytorch"]["model_data"] / TORCH_EXPORT_FILE
                if not archive.is_file():
                    raise BundleError(f"{self.twin_uri}: no {TORCH_EXPORT_FILE} (not logged as a torch.export archive)")
                return torch.export.unflatten(torch.export.load(archive))
            except (MlflowException, OSError, KeyError) as exc:
                raise BundleError(f"{self.name} v{self.version}: cannot load its PyTorch model ({exc})") from exc


class ModelSource:
    """Registered versions of one model, loaded for serving at one precision."""

    def __init__(self, registry: ModelRegistry, ref: ModelRef, precision: str, threads: int = 0) -> None:
        self.registry = registry
        self.ref = ref
        self.precision = precision
        self.threads = threads  # ONNX Runtime intra-op threads (0: every core)

    def target(self) -> ModelVersion:
        """The registered version to serve now, with its tags: the pinned one, else the alias's (a RegistryError
        when it names none)."""
        return self.registry.version(self.ref.name, self.ref.version or str(self.ref.alias))

    def target_version(self) -> str:
        """The number of ``target()``."""
        return str(self.target().version)

    def load(self, version: str) -> ServedModel:
        """Download, check and open ``version``'s bundle; a BundleError says what is missing or altered."""
        registered = self.registry.version(self.ref.name, version)
        label = f"{self.ref.name} v{version}"
        artifact_uri = registered.tags.get(ARTIFACT_URI_TAG)
        if not artifact_uri:
            raise BundleError(
                f"{label} has no serving bundle (no {ARTIFACT_URI_TAG} tag): it was registered before ONNX export "
                "existed or its export failed (its model card says why); register a new version to serve it"
            )
        with tempfile.TemporaryDirectory(prefix="crosssim-bundle-") as folder:
            try:
                local = download_artifacts(artifact_uri, dst_path=folder, tracking_uri=self.registry.tracking_uri)
            except (MlflowException, OSError) as exc:
                raise BundleError(f"{label}: cannot download its serving bundle {artifact_uri} ({exc})") from exc
            bundle = read_bundle(local)
            try:
                path = bundle.path_of(local, self.precision)
            except BundleError as exc:
                raise BundleError(f"{label}: {exc}") from exc
            recorded = registered.tags.get(FP32_SHA256_TAG)
            if recorded and bundle.artifacts.get("fp32") and bundle.artifacts["fp32"].sha256 != recorded:
                raise BundleError(f"{label}: {FP32_FILE} differs from the hash the registry recorded ({FP32_SHA256_TAG})")
            try:
                session = onnx_session(path, self.threads)
            except Exception as exc:  # onnxruntime raises its own exception types for an unusable graph
                raise BundleError(f"{label}: ONNX Runtime cannot load {path.name} ({exc})") from exc
        return ServedModel(
            name=self.ref.name,
            version=str(registered.version),
            alias=None if self.ref.version else self.ref.alias,
            precision=self.precision,
            bundle=bundle,
            session=session,
            twin_uri=self.registry.client.get_model_version_download_uri(self.ref.name, str(registered.version)),
            tracking_uri=self.registry.tracking_uri,
            site_thresholds=site_thresholds(registered.tags),
        )

    def rollout_serving(self, champion: ServedModel, running: RolloutServing | None) -> RolloutServing | None:
        """The rollout to follow with ``champion``, its challenger loaded (``running``'s when it is the same).

        None when this server does not follow ``champion``, when no rollout runs, when it pairs another champion
        (a promotion still propagating), or when its challenger cannot be served (logged: the champion answers all).
        """
        if self.ref.version is not None or self.ref.alias != CHAMPION:
            return None
        tag = self.registry.model_tags(self.ref.name).get(ROLLOUT_TAG)
        if not tag:
            return None
        try:
            rollout = Rollout.from_tag(tag)
        except RegistryError as exc:
            log.warning("not following the rollout: %s", exc)
            return None
        if rollout.champion != champion.version:
            return None
        if running is not None and running.challenger.version == rollout.challenger:
            tags = self.registry.version(self.ref.name, rollout.challenger).tags
            return RolloutServing(rollout, running.challenger.with_site_thresholds(site_thresholds(tags)))
        try:
            return RolloutServing(rollout, self.load(rollout.challenger))
        except BundleError as exc:
            log.warning("not following %s: its challenger cannot be served (%s)", rollout.describe(), exc)
            return None


@dataclass(frozen=True)
class RolloutServing:
    """The running rollout and its challenger, loaded beside the champion."""

    rollout: Rollout
    challenger: ServedModel


@dataclass(frozen=True)
class Refresh:
    previous: str
    current: str

    @property
    def changed(self) -> bool:
        return self.previous != self.current


class LiveModel:
    """The version being served, and the rollout it follows; ``refresh`` follows both (load first, then swap)."""

    def __init__(self, source: ModelSource, initial: ServedModel, rollout: RolloutServing | None = None) -> None:
        self.source = source
        self._current = initial
        self._rollout = rollout
        self._lock = asyncio.Lock()  # one refresh at a time: the poller and the admin endpoint may race

    @property
    def current(self) -> ServedModel:
        return self._current

    @property
    def rollout(self) -> RolloutServing | None:
        return self._rollout

    @property
    def follows_alias(self) -> bool:
        return self.source.ref.version is None

    async def refresh(self) -> Refresh:
        """Serve the alias's version if it moved (else its per-site thresholds as tagged now), and the rollout's
        state; what serves keeps answering until what replaces it is loaded."""
        async with self._lock:
            previous = self._current
            target = await asyncio.to_thread(self.source.target)
            if str(target.version) != previous.version:
                self._current = await asyncio.to_thread(self.source.load, str(target.version))
            else:
                self._current = previous.with_site_thresholds(site_thresholds(target.tags))
                if self._current is not previous:
                    log.info("v%s: per-site thresholds now %s", previous.version, self._current.site_thresholds)
            before = self._rollout
            self._rollout = await asyncio.to_thread(self.source.rollout_serving, self._current, before)
            if (before and before.rollout) != (self._rollout and self._rollout.rollout):
                log.info("rollout: %s", self._rollout.rollout.describe() if self._rollout else "none running")
            return Refresh(previous.version, self._current.version)


def registered_bundle(registry: ModelRegistry, name: str, version: str) -> ServingBundle:
    """``name`` v``version``'s serving manifest alone (its threshold, preprocessing), without the ONNX files."""
    uri = registry.version(name, version).tags.get(ARTIFACT_URI_TAG)
    if not uri:
        raise BundleError(f"{name} v{version} has no serving bundle (no {ARTIFACT_URI_TAG} tag)")
    with tempfile.TemporaryDirectory(prefix="crosssim-manifest-") as folder:
        try:
            local = download_artifacts(f"{uri}/{MANIFEST}", dst_path=folder, tracking_uri=registry.tracking_uri)
        except (MlflowException, OSError) as exc:
            raise BundleError(f"{name} v{version}: cannot download {MANIFEST} of {uri} ({exc})") from exc
        return read_bundle(Path(local).parent)
