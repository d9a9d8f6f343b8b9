"""The FastAPI app of ``crosssim serve`` (``create_app``); ``pipeline/serving/service.py`` builds its dependencies.

A prediction: in one decoding thread the upload is decoded and checked (``uploads``) and its de-identified image
stored; it is queued for the micro-batcher, scored by the version being served, its ledger row committed; only
then does the 200 leave (a request that fails after its image was stored removes it again). A refused request gets a 4xx JSON body ``{"error": <rule>, "detail": ...}``; no response ever
carries a stack trace. The app owns its background work (batching, alias polling, image expiry) and closes the
ledger when it shuts down, after uvicorn has drained the requests in flight.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import version as package_version
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline.config import ServeConfig
from pipeline.data.preprocessing import Preprocessing
from pipeline.data.salt import resolve_salt
from pipeline.errors import PipelineError, RequestRefused
from pipeline.rollout.assignment import CHAMPION_ARM, Assignments
from pipeline.serving.api_key import api_key_check
from pipeline.serving.batcher import MicroBatcher, Scored
from pipeline.serving.dependencies import ServeDependencies
from pipeline.serving.image_store import ImageStore
from pipeline.serving.ledger import (
    LedgerUnavailable,
    NoSiteSalt,
    PredictionRow,
    Pseudonyms,
    new_inference_id,
    pseudonymise_ids,
)
from pipeline.serving.metrics import MetricsMiddleware, ServeMetrics
from pipeline.serving.model_source import LiveModel, Refresh, RolloutServing
from pipeline.serving.outcome_routes import outcome_routes
from pipeline.serving.schemas import (
    ErrorBody,
    Explanation,
    Health,
    ModelIdentity,
    Prediction,
    Readiness,
    Reload,
    ServedModelInfo,
)
from pipeline.serving.uploads import (
    UNSPECIFIED_SITE,
    DecodedUpload,
    UploadError,
    UploadLimits,
    decode_upload,
    deidentified_image,
    served_site,
    sniff_format,
)

if TYPE_CHECKING:  # torch and captum load on the first explanation, not at start
    from pipeline.serving.explain import GradCam

IMAGE_EXPIRY_SECONDS = 3600.0  # how often images past their retention are deleted
_RULE_OF_STATUS = {400: "bad_request", 401: "api_key", 404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in (
        (413, "Body over serve.max_upload_mb"),
        (415, "Not a PNG, JPEG or DICOM"),
        (422, "An upload rule broken (the error names it)"),
        (503, "The ledger (or the image store, or for /v1/explain the PyTorch model) is unavailable"),
    )
}

log = logging.getLogger("crosssim.serve")


@dataclass(frozen=True)
class _Received:
    site: str
    ids: Pseudonyms
    decoded: DecodedUpload
    inputs: np.ndarray  # (1, S, S) for the model served when the upload arrived
    preprocessing: Preprocessing  # how ``inputs`` were made
    stored: Path | None  # where its de-identified image was kept (predictions, unless retention is 0)


class BodyLimit:
    """413 for a body over ``max_bytes``: at once when Content-Length says so, else as soon as the stream passes it
    (nothing larger is ever buffered)."""

    def __init__(self, app: ASGIApp, max_bytes: int, metrics: ServeMetrics) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            self.metrics.rejected.labels("body_too_large").inc()
            await _error(413, "body_too_large", self._detail(f"{int(declared)} bytes declared"))(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, self._detail(f"over {self.max_bytes} bytes received"))
            return message

        await self.app(scope, counted, send)

    def _detail(self, seen: str) -> str:
        return f"request body {seen}; the limit is serve.max_upload_mb = {self.max_bytes / 2**20:g} MB"


def create_app(settings: ServeConfig, deps: ServeDependencies) -> FastAPI:
    """The app serving ``deps.live``; ``settings`` gives batching, polling and upload limits."""
    for site in (*deps.sites, UNSPECIFIED_SITE):
        resolve_salt(site, deps.ingest, deps.environ)  # a guessable salt stops the start (ConfigError)
    metrics = ServeMetrics(settings.max_batch)
    metrics.serving(deps.live.current)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnxruntime")  # ORT parallelises inside
    # Bounded: with a thread per request (Starlette's pool has 40) decoders starve the event loop at high concurrency.
    decoders = ThreadPoolExecutor(settings.decode_threads or os.cpu_count() or 1, thread_name_prefix="decode")
    batcher = MicroBatcher(
        deps.live, settings.max_batch, settings.max_wait_ms / 1000, executor, metrics.batch_size.observe
    )
    limits = UploadLimits(settings.min_side, settings.max_side)
    assignments = Assignments(deps.ledger)
    explaining = threading.Lock()  # Grad-CAM hooks the twin's layer: one explanation at a time

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(batcher.run(), name="micro-batcher")]
        if deps.live.follows_alias:
            tasks.append(asyncio.create_task(_follow_alias(deps.live, settings.poll_seconds, metrics), name="alias"))
        tasks.append(asyncio.create_task(_expire_images(deps.images), name="image-expiry"))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            executor.shutdown(wait=True)
            decoders.shutdown(wait=True)
            await asyncio.to_thread(deps.ledger.close)  # commits every row already submitted
            log.info("stopped: ledger closed")

    app = FastAPI(
        title="CrossSim serve",
        version=package_version("crosssim"),
        description="P(pneumonia) from a chest X-ray (PNG, JPEG or DICOM), by the registry's model on ONNX Runtime. "
        'Errors are JSON `{"error": <rule>, "detail": ...}`.',
        lifespan=lifespan,
    )

    async def received(
        request: Request,
        file: UploadFile | None,
        site: str | None,
        ids: tuple[str | None, str | None],
        preprocessing: Preprocessing,
        keep: tuple[str, datetime] | None,
    ) -> _Received:
        """The checked upload; ``keep``: a prediction's (inference_id, time), under which its image is kept."""
        data = await _upload_bytes(request, file)
        site_name = served_site(site, deps.sites)
        patient_id, study_id = ids
        try:
            form_ids = pseudonymise_ids(site_name, patient_id, study_id, deps.ingest, deps.environ)
        except NoSiteSalt as exc:
            raise UploadError("site_without_salt", str(exc)) from exc
        salt = resolve_salt(site_name, deps.ingest, deps.environ)
        if keep is not None and salt is None and sniff_format(data) == "dicom":
            raise UploadError(
                "site_without_salt",
                f"site {site_name!r}: a DICOM is de-identified with the site's secret salt and none is configured "
                "on the server; send a PNG/JPEG export or ask the operator to set it",
            )
        loop = asyncio.get_running_loop()
        decoded, inputs, stored = await loop.run_in_executor(
            decoders, _decode, data, limits, salt, preprocessing, deps.images, keep
        )
        try:
            return _Received(site_name, _merged(form_ids, decoded.dicom_ids), decoded, inputs, preprocessing, stored)
        except BaseException:
            _discard(stored)
            raise

    @app.post("/v1/predict", response_model=Prediction, responses=_ERRORS, tags=["predict"])
    async def predict(
        request: Request,
        file: Annotated[UploadFile | None, File(description="The X-ray: PNG, JPEG or DICOM (Part 10).")] = None,
        site: Annotated[str | None, Form(description="The sending site (one of serve.sites).")] = None,
        study_id: Annotated[str | None, Form(description="Stored only as a keyed pseudonym.")] = None,
        patient_id: Annotated[str | None, Form(description="Stored only as a keyed pseudonym.")] = None,
    ) -> Prediction:
        """Score one image; the answer is in the prediction ledger before it is sent."""
        started = time.perf_counter()
        inference_id, received_at = new_inference_id(), datetime.now(timezone.utc)
        preprocessing = deps.live.current.preprocessing  # the batcher re-preprocesses if a swap changes it meanwhile
        ids = (patient_id, study_id)
        upload = await received(request, file, site, ids, preprocessing, keep=(inference_id, received_at))
        try:
            return await answer(inference_id, received_at, started, upload)
        except BaseException:
            _discard(upload.stored)  # no row, no image: the store holds only answered predictions
            raise

    async def answer(inference_id: str, received_at: datetime, started: float, upload: _Received) -> Prediction:
        following = deps.live.rollout
        arm = await assigned_arm(following, upload, inference_id)
        pixels, inputs = upload.decoded.pixels, (upload.inputs, upload.preprocessing)
        shadow: Scored | None = None
        if following is None:
            scored = await batcher.score(pixels, inputs)
        else:
            # Both models of the rollout score the image in the same batching round, so that every labelled case
            # compares them on the same patient (paired); the arm's model answers, the other's score is kept.
            answering, other = (None, following.challenger) if arm == CHAMPION_ARM else (following.challenger, None)
            scored, shadowed = await asyncio.gather(
                batcher.score(pixels, inputs, answering), batcher.score(pixels, inputs, other), return_exceptions=True
            )
            if isinstance(scored, BaseException):
                raise scored
            if isinstance(shadowed, BaseException):
                log.warning("the rollout's unanswered model failed to score: %s", type(shadowed).__name__)
            else:
                shadow = shadowed
        model, threshold = scored.model, scored.model.threshold_for(upload.site)  # the site's operating point
        latency_ms = (time.perf_counter() - started) * 1000
        row = PredictionRow(
            inference_id=inference_id,
            created_at=received_at,
            site=upload.site,
            patient_pseudonym=upload.ids.patient,
            study_pseudonym=upload.ids.study,
            model_name=model.name,
            model_version=model.version,
            model_alias=model.alias,
            artifact_sha256=model.artifact_sha256,
            precision=model.precision,
            probability=scored.probability,
            decision=int(scored.probability >= threshold),
            threshold=threshold,
            latency_ms=latency_ms,
            converted_from=upload.decoded.converted_from,
            arm=arm,
            rollout_id=following.rollout.rollout_id if following is not None else None,
            shadow_version=shadow.model.version if shadow is not None else None,
            shadow_probability=shadow.probability if shadow is not None else None,
            shadow_threshold=shadow.model.threshold_for(upload.site) if shadow is not None else None,
        )
        try:
            await deps.ledger.record(row)
        except LedgerUnavailable as exc:  # the ledger has logged why (without the request's content)
            metrics.ledger_failures.inc()
            raise RequestRefused("ledger_unavailable", "the prediction ledger cannot commit (database unavailable), so "
                              "the prediction is not answered; retry later", 503) from exc
        return Prediction(
            inference_id=row.inference_id,
            probability=row.probability,
            decision="pneumonia" if row.decision else "normal",
            threshold=row.threshold,
            model=ModelIdentity.of(model),
            latency_ms=latency_ms,
            converted_from=row.converted_from,
            site=row.site,
            arm=arm,
        )

    async def assigned_arm(following: RolloutServing | None, upload: _Received, inference_id: str) -> str | None:
        """The rollout arm answering this request (None without a rollout; the champion's in shadow mode)."""
        if following is None:
            return None
        if following.rollout.mode == "shadow":
            return CHAMPION_ARM
        unit = upload.ids.patient or upload.ids.study or inference_id  # sticky per patient when an id is sent
        if (seen := assignments.known(following.rollout, unit)) is not None:
            return seen  # a patient seen before: no thread hop, no database
        try:
            return await asyncio.to_thread(assignments.arm, following.rollout, upload.site, unit)
        except LedgerUnavailable as exc:
            metrics.ledger_failures.inc()
            raise RequestRefused("ledger_unavailable", "the rollout's assignments cannot be read (database unavailable); "
                              "retry later", 503) from exc

    @app.post(
        "/v1/explain",
        response_model=Explanation,
        responses={**_ERRORS, 200: {"content": {"image/png": {}}, "description": "JSON, or the overlay with ?format=png"}},
        tags=["predict"],
    )
    async def explain(
        request: Request,
        file: Annotated[UploadFile | None, File(description="The X-ray: PNG, JPEG or DICOM (Part 10).")] = None,
        output: Annotated[
            Literal["json", "png"], Query(alias="format", description="png: only the overlay, as image/png.")
        ] = "json",
    ) -> Explanation | Response:
        """Grad-CAM of the served version's FP32 PyTorch twin (not recorded in the ledger; nothing is stored)."""
        from pipeline.serving.explain import grad_cam, overlay_png  # torch and captum: loaded on first use

        model = deps.live.current  # the version explained, whatever the alias does meanwhile
        upload = await received(request, file, None, (None, None), model.preprocessing, keep=None)

        def explained() -> tuple[GradCam, bytes]:
            twin = model.twin()
            with explaining:
                cam = grad_cam(twin, upload.inputs)
            return cam, overlay_png(upload.decoded.pixels, cam.cam)

        try:
            cam, png = await run_in_threadpool(explained)
        except PipelineError as exc:  # the version's PyTorch model cannot be loaded or explained
            return _error(503, "explanation_unavailable", str(exc))
        explained_artifact = f"models:/{model.name}/{model.version}"
        if output == "png":
            headers = {"X-Model-Version": model.version, "X-Explained-Artifact": explained_artifact}
            return Response(png, media_type="image/png", headers=headers)
        return Explanation(
            model=ModelIdentity.of(model),
            explained_artifact=explained_artifact,
            layer=cam.layer,
            probability=cam.probability,
            map_size=list(cam.cam.shape),
            map=cam.cam.round(6).tolist(),
            overlay_png=base64.b64encode(png).decode(),
            converted_from=upload.decoded.converted_from,
        )

    @app.get("/v1/models", response_model=ServedModelInfo, tags=["models"])
    async def models() -> ServedModelInfo:
        """The version being served, what it carries, and the sites it answers at their own threshold."""
        return ServedModelInfo.of(deps.live.current, deps.live.follows_alias, settings.poll_seconds)

    @app.get("/healthz", response_model=Health, tags=["operations"])
    async def healthz() -> Health:
        """The process answers."""
        return Health()

    @app.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}}, tags=["operations"])
    async def readyz() -> JSONResponse:
        """Ready: a model is loaded and the ledger database answers."""
        ledger_ok = await asyncio.to_thread(deps.ledger.healthy)
        model = deps.live.current
        body = Readiness(ready=ledger_ok, model=f"{model.name} v{model.version}", ledger="ok" if ledger_ok else "unavailable")
        return JSONResponse(body.model_dump(), status_code=200 if ledger_ok else 503)

    @app.get("/metrics", response_class=Response, tags=["operations"])
    async def prometheus_metrics() -> Response:
        """Prometheus text format: requests by route and status, latency histograms, the served version."""
        return Response(metrics.render(), media_type=metrics.content_type)

    if deps.api_key:
        app.include_router(_admin_routes(deps.live, deps.api_key, metrics))
        app.include_router(outcome_routes(deps, deps.api_key, metrics))
    _install_error_handlers(app, metrics)
    app.add_middleware(BodyLimit, max_bytes=int(settings.max_upload_mb * 2**20), metrics=metrics)
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=[getattr(r, "path", "") for r in app.routes])
    return app


def _admin_routes(live: LiveModel, api_key: str, metrics: ServeMetrics) -> APIRouter:
    router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(api_key_check(api_key))])

    @router.post("/reload", response_model=Reload, responses={401: {"model": ErrorBody}, 409: {"model": ErrorBody}})
    async def reload() -> Reload | JSONResponse:
        """Check the alias now; a new version is loaded fully, then swapped in (requests never fail meanwhile)."""
        try:
            result = await _refresh(live, metrics)
        except Exception as exc:  # registry down, bundle missing: the current version keeps serving
            return _error(409, "reload_failed", f"{exc}; still serving v{live.current.version}")
        return Reload(previous=result.previous, current=result.current, changed=result.changed)

    return router


def _install_error_handlers(app: FastAPI, metrics: ServeMetrics) -> None:
    @app.exception_handler(RequestRefused)
    async def refused(request: Request, exc: RequestRefused) -> JSONResponse:
        metrics.rejected.labels(exc.rule).inc()
        log.info("refused %s %s: %s", request.method, request.url.path, exc.rule)  # the rule only: no content
        return _error(exc.status, exc.rule, exc.detail)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Locations and messages only: pydantic's "input" would echo what was sent (it may be a patient id).
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc'][1:]) or 'body'}: {error['msg']}" for error in exc.errors()
        )
        metrics.rejected.labels("invalid_field").inc()
        return _error(422, "invalid_field", problems)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        rule = _RULE_OF_STATUS.get(exc.status_code, f"http_{exc.status_code}")
        if exc.status_code in (401, 413):
            metrics.rejected.labels(rule).inc()
        return _error(exc.status_code, rule, str(exc.detail), exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error on %s %s: %s", request.method, request.url.path, type(exc).__name__, exc_info=exc)
        return _error(500, "internal_error", "the server failed on this request; the server log has the details")


def _error(status: int, rule: str, detail: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": rule, "detail": detail}, status_code=status, headers=headers)


async def _upload_bytes(request: Request, file: UploadFile | None) -> bytes:
    if file is None:
        if request.headers.get("content-length", "") == "0":
            raise UploadError("empty_body", "the request has no body; send the image as multipart field 'file'", 400)
        raise UploadError(
            "missing_field", "no 'file' field: send the image as multipart/form-data field 'file' (curl -F file=@x.png)"
        )
    data = await file.read()
    if not data:
        raise UploadError("empty_file", "field 'file' is empty (0 bytes)")
    return data


def _decode(
    data: bytes,
    limits: UploadLimits,
    salt: str | None,
    preprocessing: Preprocessing,
    images: ImageStore,
    keep: tuple[str, datetime] | None,
) -> tuple[DecodedUpload, np.ndarray, Path | None]:
    """Decoded, preprocessed and (``keep``) stored in one worker-thread call: each hop to a thread and back
    costs the event loop more than the file write itself."""
    decoded = decode_upload(data, limits, salt)
    inputs = preprocessing.model_input(decoded.pixels)
    if keep is None:
        return decoded, inputs, None
    inference_id, received_at = keep
    try:
        return decoded, inputs, images.put(inference_id, deidentified_image(data, decoded), received_at)
    except OSError as exc:
        raise RequestRefused("image_store_unavailable", f"the served image could not be kept ({exc.strerror})", 503) from exc


def _discard(stored: Path | None) -> None:
    if stored is not None:
        stored.unlink(missing_ok=True)


def _merged(form: Pseudonyms, dicom: Pseudonyms | None) -> Pseudonyms:
    """The request's ids: the form's, else the DICOM header's; a patient they disagree on is refused."""
    if dicom is None:
        return form
    if form.patient and dicom.patient and form.patient != dicom.patient:
        raise UploadError("patient_mismatch", "field 'patient_id' names another patient than the DICOM's PatientID")
    return Pseudonyms(patient=form.patient or dicom.patient, study=form.study or dicom.study)


async def _refresh(live: LiveModel, metrics: ServeMetrics) -> Refresh:
    try:
        result = await live.refresh()
    except Exception as exc:
        metrics.refresh_failures.inc()
        log.warning("alias check failed, still serving v%s: %s", live.current.version, exc)
        raise
    if result.changed:
        metrics.swaps.inc()
        metrics.serving(live.current)
        log.info("now serving %s v%s (was v%s)", live.current.name, result.current, result.previous)
    return result


async def _follow_alias(live: LiveModel, seconds: float, metrics: ServeMetrics) -> None:
    while True:
        await asyncio.sleep(seconds)
        try:
            await _refresh(live, metrics)
        except Exception:  # already logged and counted; the next poll tries again
            continue


async def _expire_images(images: ImageStore) -> None:
    while True:
        try:
            removed = await asyncio.to_thread(images.purge, datetime.now(timezone.utc))
        except OSError as exc:
            log.warning("image expiry failed: %s", exc)
        else:
            if removed:
                log.info("deleted %d served images past their retention", removed)
        await asyncio.sleep(IMAGE_EXPIRY_SECONDS)
