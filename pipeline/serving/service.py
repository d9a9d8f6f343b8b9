"""The serving stage: the registry's model, ledger, image store and rollout behind the FastAPI app
(pipeline.serving.app), assembled from the configuration; ``crosssim serve`` runs it under uvicorn.

Everything is resolved and loaded before the server starts, so a missing model, artifact or weak secret is a
clear message and exit 2, never a half-started server.
"""

from __future__ import annotations

from collections.abc import Mapping

import sqlalchemy as sa
from fastapi import FastAPI

from pipeline.config import PipelineConfig
from pipeline.data.salt import resolve_salt, salt_variables
from pipeline.errors import ConfigError
from pipeline.registry.store import ModelRegistry, RegistryError
from pipeline.serving.api_key import API_KEY_HEADER
from pipeline.serving.app import create_app
from pipeline.serving.dependencies import ServeDependencies
from pipeline.serving.image_store import ImageStore
from pipeline.serving.ledger import PredictionLedger, resolve_ledger_url
from pipeline.serving.model_source import LiveModel, ModelRef, ModelSource
from pipeline.tracking import resolve_tracking_uri

API_KEY_ENV = "CROSSSIM_API_KEY"
MIN_API_KEY_CHARS = 16


def build_app(cfg: PipelineConfig, environ: Mapping[str, str]) -> tuple[FastAPI, list[str]]:
    """The app serving ``cfg.serve``'s model, and what to tell the operator at start."""
    settings = cfg.serve
    api_key = environ.get(API_KEY_ENV) or None
    if api_key is not None and len(api_key) < MIN_API_KEY_CHARS:
        raise ConfigError(f"${API_KEY_ENV} is too short to be a secret: use at least {MIN_API_KEY_CHARS} random characters")
    ref = ModelRef(
        settings.model_name or cfg.registry.model_name,
        alias=None if settings.version else settings.alias,
        version=settings.version,
    )
    registry = ModelRegistry(resolve_tracking_uri(cfg.tracking))
    source = ModelSource(registry, ref, settings.precision, settings.inference_threads)
    try:
        version = source.target_version()
    except RegistryError as exc:
        raise RegistryError(
            f"{exc}. `crosssim registry list` shows what is registered; `make run` registers a first version as "
            "challenger (serve it with --alias challenger, or approve it)"
        ) from exc
    initial = source.load(version)
    sites = cfg.served_sites()
    ledger_url = resolve_ledger_url(settings, environ)
    ledger = PredictionLedger(ledger_url)
    images = ImageStore(settings.image_store, settings.image_retention_days)
    live = LiveModel(source, initial, source.rollout_serving(initial, None))
    deps = ServeDependencies(live, ledger, images, sites, cfg.ingest, environ, api_key, tuple(cfg.rollout.outcome_sources), cfg.loop)
    try:
        app = create_app(settings, deps)
    except BaseException:
        ledger.close()
        raise
    following = f"following @{ref.alias}, checked every {settings.poll_seconds:g} s" if ref.alias else "pinned"
    notes = [
        f"serving {ref.name} v{initial.version} ({settings.precision}; {following}), "
        f"artifact sha256 {initial.artifact_sha256[:12]}…, threshold {initial.threshold:.4f}",
        f"http://{settings.host}:{settings.port}  (API docs: /docs; POST /v1/predict, /v1/explain)",
        f"ledger: {sa.make_url(ledger_url).render_as_string(hide_password=True)}; "
        f"images: {settings.image_store} (kept {settings.image_retention_days} days)",
    ]
    if live.rollout is not None:
        notes.append(f"following {live.rollout.rollout.describe()}")
    unsalted = [site for site in sites if resolve_salt(site, cfg.ingest, environ) is None]
    if unsalted:
        notes.append(
            f"no DICOM salt for {', '.join(unsalted)}: their DICOM uploads and patient/study ids are refused "
            f"(set ${salt_variables(unsalted[0], cfg.ingest)[0]} or ${cfg.ingest.salt_env})"
        )
    if api_key is None:
        notes.append(f"admin routes off: ${API_KEY_ENV} is not set (POST /v1/admin/reload and /v1/feedback are not mounted)")
    else:
        notes.append(f"admin routes on: POST /v1/admin/reload and POST /v1/feedback with header {API_KEY_HEADER}")
    return app, notes
