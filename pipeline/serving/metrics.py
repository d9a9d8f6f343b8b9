"""Prometheus metrics of one app (its own CollectorRegistry, so several apps can live in one process).

Labels are route templates, methods, status codes, rule names and model identity: never anything from a
request's content, so nothing a patient could be identified by reaches the metrics.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline.serving.model_source import ServedModel

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
OTHER_ROUTE = "other"  # paths that are no route of the app (404s): one label, whatever was asked


class ServeMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, max_batch: int) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "crosssim_http_requests", "HTTP requests answered", ["route", "method", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "crosssim_http_request_duration_seconds",
            "Time from request to response, by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "crosssim_inference_batch_size",
            "Requests scored together in one ONNX Runtime call",
            buckets=sorted({1, 2, 4, 8, 16, 32, 64, max_batch}),
            registry=self.registry,
        )
        self.model = Gauge(
            "crosssim_served_model",
            "The registered version being served (1 for the current one)",
            ["name", "version", "alias", "precision", "artifact_sha256"],
            registry=self.registry,
        )
        self.swaps = Counter("crosssim_model_swaps", "Alias moves picked up without a restart", registry=self.registry)
        self.refresh_failures = Counter(
            "crosssim_model_refresh_failures", "Alias checks or loads that failed (the old version kept serving)",
            registry=self.registry,
        )  # fmt: skip
        self.rejected = Counter(
            "crosssim_rejected_requests", "Requests refused, by the rule they broke", ["rule"], registry=self.registry
        )
        self.outcomes = Counter(
            "crosssim_outcomes", "Labels recorded, by whether a read worklist asked for them", ["requested"],
            registry=self.registry,
        )  # fmt: skip
        self.reads_requested = Counter(
            "crosssim_reads_requested", "Cases put on a read worklist, by site", ["site"], registry=self.registry
        )
        self.ledger_failures = Counter(
            "crosssim_ledger_failures", "Predictions refused (503) because the ledger could not commit them",
            registry=self.registry,
        )  # fmt: skip

    def serving(self, model: ServedModel) -> None:
        self.model.clear()
        self.model.labels(model.name, model.version, model.alias or "", model.precision, model.artifact_sha256).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts and times every HTTP request by route template (pure ASGI: streaming bodies pass untouched)."""

    def __init__(self, app: ASGIApp, metrics: ServeMetrics, routes: Iterable[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = frozenset(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets if the app fails before answering

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = getattr(scope.get("route"), "path", None) or self._known(scope["path"])
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)

    def _known(self, path: str) -> str:
        return path if path in self.routes else OTHER_ROUTE
