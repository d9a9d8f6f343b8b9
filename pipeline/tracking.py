"""Experiment tracking behind a small interface, so stages log the same way to MLflow or to memory.

Without a configured server everything lands in an embedded SQLite store and an artifact folder
under the project (``mlflow/`` by default); ``mlflow ui --backend-store-uri <that sqlite URI>``
browses it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self
from urllib.parse import unquote, urlparse

import mlflow
import numpy as np
import psutil
from filelock import FileLock
from mlflow.entities import RunInfo
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.config import TrackingConfig

if TYPE_CHECKING:  # torch only where a model is logged (mlflow.pytorch loads lazily): registry commands stay fast
    import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TRACKED_PACKAGES = ("torch", "torchvision", "mlflow", "prefect", "great_expectations", "dvc", "numpy")


def resolve_tracking_uri(cfg: TrackingConfig) -> str:
    """``cfg.tracking_uri``, else $MLFLOW_TRACKING_URI, else SQLite under ``cfg.local_dir``.

    ``load_config`` has already made ``local_dir`` absolute (anchored at the config file's folder).
    """
    if cfg.tracking_uri:
        return cfg.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return _embedded_uri(cfg)


def _embedded_uri(cfg: TrackingConfig) -> str:
    return f"sqlite:///{(cfg.local_dir / 'mlflow.db').resolve().as_posix()}"


def local_artifact_dir(cfg: TrackingConfig) -> Path:
    """Artifact folder of the embedded store (MLflow would otherwise use ./mlruns of the working dir)."""
    return (cfg.local_dir / "artifacts").resolve()


def ensure_experiment(tracking_uri: str, name: str, artifact_dir: Path | None) -> str:
    """The id of experiment ``name``, created on first use (with ``artifact_dir`` in embedded mode)."""
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = artifact_dir.as_uri() if artifact_dir is not None else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created concurrently by another process
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def _initialise_embedded_store(tracking_uri: str, local_dir: Path) -> None:
    """Create or migrate the embedded SQLite store under a file lock: two runs starting together on a new
    project would otherwise both run MLflow's schema migrations and one would fail half-way."""
    with FileLock(local_dir / "mlflow.db.lock"):
        MlflowClient(tracking_uri).search_experiments(max_results=1)


def embedded_artifact_dir(cfg: TrackingConfig) -> Path | None:
    """Where artifacts go when no tracking server is configured; None when one is.

    Decided on the resolved URI, not on $MLFLOW_TRACKING_URI being set: ``mlflow.set_tracking_uri``
    exports that variable itself, so after the first run of a process it is always set.
    """
    return local_artifact_dir(cfg) if resolve_tracking_uri(cfg) == _embedded_uri(cfg) else None


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings → dotted keys (``{"train": {"lr": 0.1}}`` → ``{"train.lr": "0.1"}``)."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def run_context_tags(repo: Path = PROJECT_ROOT) -> dict[str, str]:
    """What produced a run: git commit and dirty flag (when in git), Python and key package versions.

    Deliberately holds no host name or user-specific path.
    """
    tags = {"python.version": platform.python_version()}
    for package in TRACKED_PACKAGES:
        try:
            tags[f"package.{package}"] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    commit = _git(repo, "rev-parse", "--verify", "HEAD")
    if commit:
        # MLflow's own key, so the UI shows the commit next to the run
        tags["mlflow.source.git.commit"] = commit
        tags["git.dirty"] = str(bool(_git(repo, "status", "--porcelain"))).lower()
    return tags


def model_requirements() -> list[str]:
    """What serving a logged model needs. Given explicitly because MLflow's own inference re-imports
    the model in a subprocess, which costs tens of seconds per logged model."""
    return [f"{package}=={importlib.metadata.version(package)}" for package in ("torch", "numpy")]


def _git(repo: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


PROCESS_MACHINE_TAG = "crosssim.process.machine"
PROCESS_PID_TAG = "crosssim.process.pid"
PROCESS_STARTED_TAG = "crosssim.process.started"
ENDED_BY_TAG = "crosssim.ended_by"


def _machine_key() -> str:
    # A hash, not the host name: run tags hold nothing that identifies a machine or a person.
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:16]


def process_tags() -> dict[str, str]:
    """Which process holds a run open: how a later run tells a live run from one whose process was killed."""
    me = psutil.Process()
    return {PROCESS_MACHINE_TAG: _machine_key(), PROCESS_PID_TAG: str(me.pid), PROCESS_STARTED_TAG: f"{me.create_time():.2f}"}


def _process_alive(pid: int, started: float) -> bool:
    try:  # same pid and same start time: a recycled pid is another process
        return abs(psutil.Process(pid).create_time() - started) < 0.05
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def fail_orphaned_runs(tracking_uri: str, experiment_id: str) -> list[str]:
    """Mark FAILED the RUNNING runs of this experiment whose process on this machine is gone (killed: a
    SIGKILL leaves no chance to close the run). Runs held by other machines are left alone. Returns their ids."""
    client = MlflowClient(tracking_uri)
    running = client.search_runs(
        [experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`{PROCESS_MACHINE_TAG}` = '{_machine_key()}'",
    )
    reaped = []
    for run in running:
        tags = run.data.tags
        try:
            pid, started = int(tags[PROCESS_PID_TAG]), float(tags[PROCESS_STARTED_TAG])
        except (KeyError, ValueError):
            continue
        if _process_alive(pid, started):
            continue
        client.set_tag(run.info.run_id, ENDED_BY_TAG, f"process {pid} ended without closing the run (killed)")
        client.set_terminated(run.info.run_id, status="FAILED")
        reaped.append(run.info.run_id)
    return reaped


class Tracker(Protocol):
    """What a stage may log. Use as a context manager around the stage."""

    @property
    def run_id(self) -> str: ...

    @property
    def run_url(self) -> str: ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...

    def log_artifacts(self, directory: Path, artifact_path: str | None = None) -> None: ...

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None: ...

    def set_tags(self, tags: Mapping[str, Any]) -> None: ...

    def log_model(self, model: torch.nn.Module, name: str, input_example: np.ndarray) -> str: ...


class MlflowTracker:
    """One MLflow run in ``cfg.experiment``; ends FINISHED, FAILED when the block raises, KILLED when stopped.

    A run whose process is killed outright stays RUNNING in MLflow; it carries its process's identity
    (``process_tags``), and the next tracker of the experiment on this machine marks it FAILED.

    Uses MLflow's fluent API (``mlflow.pytorch.log_model`` needs it), so it sets the process-wide
    tracking URI and there can be one open tracker at a time.
    """

    def __init__(
        self, cfg: TrackingConfig, run_name: str | None = None, tags: Mapping[str, Any] | None = None
    ) -> None:
        self.tracking_uri = resolve_tracking_uri(cfg)
        self._experiment = cfg.experiment
        self._artifact_dir = embedded_artifact_dir(cfg)
        self._run_name = run_name
        self._tags = {**run_context_tags(), **{k: str(v) for k, v in (tags or {}).items()}}
        self._info: RunInfo | None = None
        self._open = False

    def __enter__(self) -> Self:
        if self._artifact_dir is not None:
            self._artifact_dir.mkdir(parents=True, exist_ok=True)  # also creates the SQLite file's folder
            _initialise_embedded_store(self.tracking_uri, self._artifact_dir.parent)
        mlflow.set_tracking_uri(self.tracking_uri)
        experiment_id = self._experiment_id()
        fail_orphaned_runs(self.tracking_uri, experiment_id)
        run = mlflow.start_run(
            experiment_id=experiment_id, run_name=self._run_name, tags={**self._tags, **process_tags()}
        )
        self._info, self._open = run.info, True
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            status = "FINISHED"
        else:  # Ctrl-C, SIGTERM (Prefect's TerminationSignal) and exit are stops, not failures of the run
            status = "FAILED" if issubclass(exc_type, Exception) else "KILLED"
        self._open = False
        mlflow.end_run(status=status)

    def _experiment_id(self) -> str:
        return ensure_experiment(self.tracking_uri, self._experiment, self._artifact_dir)

    @property
    def info(self) -> RunInfo:
        """The run's MLflow record; still available after the block ends."""
        if self._info is None:
            raise RuntimeError("MlflowTracker has not been entered yet (use it as `with MlflowTracker(...)`)")
        return self._info

    @property
    def run_id(self) -> str:
        return self.info.run_id

    @property
    def experiment_id(self) -> str:
        return self.info.experiment_id

    @property
    def run_url(self) -> str:
        """The run's page on an MLflow server, else the local folder of its artifacts."""
        if self.tracking_uri.startswith(("http://", "https://")):
            return f"{self.tracking_uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
        parsed = urlparse(self.info.artifact_uri)
        return unquote(parsed.path) if parsed.scheme in ("", "file") else self.info.artifact_uri

    def _open_run_id(self) -> str:
        # Outside the block MLflow's fluent API would silently start a new, unrelated run.
        if not self._open:
            raise RuntimeError("MlflowTracker is used outside its `with` block")
        return self.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        mlflow.log_params(flatten_params(params), run_id=self._open_run_id())

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step, run_id=self._open_run_id())

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        mlflow.log_artifact(str(path), artifact_path, run_id=self._open_run_id())

    def log_artifacts(self, directory: Path, artifact_path: str | None = None) -> None:
        mlflow.log_artifacts(str(directory), artifact_path, run_id=self._open_run_id())

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        """JSON, or YAML when ``artifact_file`` ends in .yaml/.yml."""
        mlflow.log_dict(dict(data), artifact_file, run_id=self._open_run_id())

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        run_id = self._open_run_id()
        client = MlflowClient(self.tracking_uri)
        for key, value in tags.items():
            client.set_tag(run_id, key, str(value))

    def log_model(self, model: torch.nn.Module, name: str, input_example: np.ndarray) -> str:
        """Log ``model`` (signature inferred from ``input_example``) and return its ``models:/`` URI.

        MLflow 3 saves with torch.export, which traces ``forward`` on the example: use a batch of
        at least 2 so the batch dimension stays dynamic.
        """
        self._open_run_id()  # the active run is ours, so the model is linked to it
        was_training = model.training
        model.eval()  # tracing/signature inference in train mode would bake in dropout and update BN stats
        try:
            info = mlflow.pytorch.log_model(
                model, name=name, input_example=input_example, pip_requirements=model_requirements()
            )
        finally:
            model.train(was_training)
        return info.model_uri


@dataclass
class NullTracker:
    """Keeps every call in memory: for tests and for runs with tracking switched off."""

    run_id: str = "null-run"
    experiment_id: str = "null-experiment"
    run_url: str = ""
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, list[tuple[int | None, float]]] = field(default_factory=dict)
    artifacts: list[tuple[Path, str | None]] = field(default_factory=list)
    dicts: dict[str, dict[str, Any]] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    models: dict[str, torch.nn.Module] = field(default_factory=dict)
    status: str | None = None

    def __enter__(self) -> Self:
        self.status = "RUNNING"
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.status = "FINISHED" if exc_type is None else "FAILED"

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.params.update(flatten_params(params))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            self.metrics.setdefault(key, []).append((step, float(value)))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.artifacts.append((Path(path), artifact_path))

    def log_artifacts(self, directory: Path, artifact_path: str | None = None) -> None:
        self.artifacts.append((Path(directory), artifact_path))

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        self.dicts[artifact_file] = dict(data)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.tags.update({k: str(v) for k, v in tags.items()})

    def log_model(self, model: torch.nn.Module, name: str, input_example: np.ndarray) -> str:
        self.models[name] = model
        return f"null:/models/{name}"
