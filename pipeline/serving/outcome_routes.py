"""The routes a hospital's systems call about served cases (header ``X-API-Key``): labels coming back
(``POST /v1/feedback``) and the read worklist (``GET /v1/worklist``), which cases a radiologist should read next."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Query

from pipeline.config import WorklistStrategy
from pipeline.errors import RequestRefused
from pipeline.loop.worklist import Worklist, build_worklist
from pipeline.rollout.outcomes import OutcomeError, OutcomeReport, record_outcomes
from pipeline.serving.api_key import api_key_check
from pipeline.serving.dependencies import ServeDependencies
from pipeline.serving.ledger import LedgerUnavailable, NoSiteSalt, pseudonymise_ids
from pipeline.serving.metrics import ServeMetrics
from pipeline.serving.schemas import ErrorBody, OutcomeIn, OutcomeRecorded, WorklistOut
from pipeline.serving.uploads import served_site

_REFUSALS = {401: {"model": ErrorBody}, 404: {"model": ErrorBody}, 409: {"model": ErrorBody}, 422: {"model": ErrorBody}}
MAX_WORKLIST = 1000  # reads one worklist may ask for


def outcome_routes(deps: ServeDependencies, api_key: str, metrics: ServeMetrics) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["outcomes"], dependencies=[Depends(api_key_check(api_key))])

    @router.post("/feedback", response_model=OutcomeRecorded, responses=_REFUSALS)
    async def feedback(body: OutcomeIn) -> OutcomeRecorded:
        """Attach a label to an answered prediction (header X-API-Key). Idempotent: the same label from the same
        source again is a ``duplicate``; a disagreeing label is kept as a ``conflict``. A read no worklist asked for
        is kept too, and counted as unrequested (``requested: false``)."""
        study = None
        if body.study_id is not None:
            site = served_site(body.site, deps.sites)
            try:
                study = pseudonymise_ids(site, None, body.study_id, deps.ingest, deps.environ).study
            except NoSiteSalt as exc:
                raise OutcomeError("site_without_salt", str(exc)) from exc
        report = OutcomeReport(body.label, body.source, body.inference_id, study, body.observed_at, "request body")
        try:
            recorded = (await asyncio.to_thread(record_outcomes, deps.ledger, [report], deps.outcome_sources))[0]
        except LedgerUnavailable as exc:
            raise RequestRefused("ledger_unavailable", "the ledger database cannot commit; retry later", 503) from exc
        if recorded.status != "duplicate":
            metrics.outcomes.labels("true" if recorded.requested else "false").inc()
        return OutcomeRecorded(
            status=recorded.status, inference_ids=list(recorded.inference_ids), requested=recorded.requested
        )

    @router.get("/worklist", response_model=WorklistOut, responses=_REFUSALS)
    async def worklist(
        site: Annotated[list[str], Query(min_length=1, description="A served site; repeat it to share the budget.")],
        budget: Annotated[int, Query(ge=1, le=MAX_WORKLIST, description="Reads to ask for, over all sites.")],
        strategy: Annotated[WorklistStrategy | None, Query(description="Default: loop.worklist_strategy.")] = None,
        preview: Annotated[bool, Query(description="true: rank only; nothing is recorded as asked for.")] = False,
    ) -> WorklistOut:
        """The site's served, unlabelled cases a radiologist's read would teach the model most, best first. Unless
        ``preview``, they are recorded as asked for: never offered again, and their reads count as requested."""
        try:
            built: Worklist = await asyncio.to_thread(
                build_worklist, deps.ledger, deps.images, site, budget, deps.loop, deps.live.current.preprocessing,
                served_sites=deps.sites, strategy=strategy, record=not preview,
            )  # fmt: skip
        except LedgerUnavailable as exc:
            raise RequestRefused("ledger_unavailable", "the ledger database cannot commit; retry later", 503) from exc
        if built.recorded:
            for item in built.items:
                metrics.reads_requested.labels(item.site).inc()
        return WorklistOut.of(built)

    return router
