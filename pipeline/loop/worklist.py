"""The read worklist: the served, still-unlabelled cases of a site ranked by how much a radiologist's read would
teach the model (``pipeline.loop.selection``), recorded in the ledger as asked for.

Candidates are a site's predictions of the last ``loop.worklist_window_days`` whose de-identified image the
service kept (a read of a case without its image cannot become training data) and that are neither labelled
(any outcome reported) nor already asked for; a study asked for or labelled once is not asked again through
another of its images. Over several sites the budget is shared evenly, and what a site cannot use (too few
candidates) goes to the others. The embedding is the drift monitor's (``pipeline.rollout.drift``): block means
and the intensity histogram of the model's input image; the labelled and asked-for cases are the centres the
diverse strategies keep away from.

Recording is all or nothing: the worklist's requests commit in one transaction, or none does (two worklists
racing for the same case: the second is refused, 409, and can simply be asked again).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import numpy as np
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from pipeline.config import LoopConfig
from pipeline.data.images import ImageDecodeError, decode_image
from pipeline.data.preprocessing import Preprocessing
from pipeline.errors import RequestRefused
from pipeline.loop.selection import STRATEGIES, Strategy, select
from pipeline.rollout.drift import image_embedding
from pipeline.serving.image_store import ImageStore
from pipeline.serving.ledger import PredictionLedger, PredictionRow, outcomes, read_requests


class WorklistError(RequestRefused):
    """A worklist refused (unknown site, budget, strategy, or a race with another worklist); nothing recorded."""


@dataclass(frozen=True)
class WorklistItem:
    rank: int  # 1: ask first
    inference_id: str
    site: str
    study_pseudonym: str | None
    served_at: datetime
    probability: float  # as served
    threshold: float  # the operating point it was served at
    score: float  # the strategy's priority (higher: asked first)


@dataclass(frozen=True)
class SiteCandidates:
    site: str
    candidates: int  # unlabelled, not asked for, image kept, inside the window
    labelled: int
    pending: int  # asked for, no read yet
    without_image: int
    asked: int  # of this worklist


@dataclass(frozen=True)
class Worklist:
    worklist_id: str
    strategy: str
    budget: int
    requested_at: datetime
    recorded: bool  # False: a preview, nothing asked for
    items: tuple[WorklistItem, ...]
    sites: tuple[SiteCandidates, ...]


def build_worklist(
    ledger: PredictionLedger,
    images: ImageStore,
    sites: Sequence[str],
    budget: int,
    cfg: LoopConfig,
    preprocessing: Preprocessing,
    *,
    served_sites: Sequence[str],
    strategy: Strategy | None = None,
    record: bool = True,
    now: datetime | None = None,
    seed: int | None = None,
) -> Worklist:
    """Rank the candidates of ``sites`` with ``strategy`` (default ``loop.worklist_strategy``), ``budget`` in all."""
    now = now or datetime.now(timezone.utc)
    strategy = strategy or cfg.worklist_strategy
    _check(sites, budget, strategy, served_sites)
    labelled, pending = _labelled_and_pending(ledger)
    pools = {
        site: _site_pool(ledger, images, site, labelled, pending, now - timedelta(days=cfg.worklist_window_days))
        for site in sites
    }
    shares = _shares(budget, {site: len(pool.candidates) for site, pool in pools.items()})
    worklist_id = uuid.uuid4().hex
    items: list[WorklistItem] = []
    for site in sites:
        pool = pools[site]
        if shares[site] == 0:
            continue
        chosen = _choose(
            pool, shares[site], strategy, cfg, preprocessing, seed=int(now.timestamp()) if seed is None else seed
        )
        items.extend(chosen)
    items.sort(key=lambda item: -item.score)  # sites interleaved by priority
    items = [_ranked(item, rank) for rank, item in enumerate(items, start=1)]
    if record and items:
        _record(ledger, worklist_id, strategy, items, now)
    summary = tuple(
        SiteCandidates(
            site, len(p.candidates), p.labelled, p.pending, p.without_image, sum(i.site == site for i in items)
        )
        for site, p in pools.items()
    )
    return Worklist(worklist_id, strategy, budget, now, record and bool(items), tuple(items), summary)


@dataclass(frozen=True)
class _Pool:
    candidates: list[PredictionRow]
    pixels: list[np.ndarray]  # of the candidates, same order
    known_pixels: list[np.ndarray]  # labelled or asked-for cases of the site, whose image is kept
    labelled: int
    pending: int
    without_image: int


def _check(sites: Sequence[str], budget: int, strategy: str, served_sites: Sequence[str]) -> None:
    if not sites:
        raise WorklistError("missing_site", "name at least one site")
    unknown = [site for site in sites if site not in served_sites]
    if unknown:
        raise WorklistError(
            "unknown_site", f"site {unknown[0]!r} is not served here; one of: {', '.join(served_sites)} (serve.sites)"
        )
    if len(set(sites)) != len(sites):
        raise WorklistError("duplicate_site", f"sites {', '.join(sites)}: each site once")
    if budget < 1:
        raise WorklistError("invalid_budget", f"budget {budget}: ask for at least 1 read")
    if strategy not in STRATEGIES:
        raise WorklistError("unknown_strategy", f"strategy {strategy!r}: one of {', '.join(STRATEGIES)}")


def _labelled_and_pending(ledger: PredictionLedger) -> tuple[set[str], set[str]]:
    with ledger.transaction() as connection:
        labelled = set(connection.execute(sa.select(outcomes.c.inference_id).distinct()).scalars())
        asked = set(connection.execute(sa.select(read_requests.c.inference_id)).scalars())
    return labelled, asked - labelled


def _site_pool(
    ledger: PredictionLedger, images: ImageStore, site: str, labelled: set[str], pending: set[str], since: datetime
) -> _Pool:
    rows = ledger.rows(site=site)
    known_rows = [row for row in rows if row.inference_id in labelled or row.inference_id in pending]
    known_studies = {row.study_pseudonym for row in known_rows if row.study_pseudonym}
    candidates, pixels, without_image = [], [], 0
    for row in rows:
        if row.created_at < since or row.inference_id in labelled or row.inference_id in pending:
            continue
        if row.study_pseudonym and row.study_pseudonym in known_studies:
            continue
        image = _kept(images, row.inference_id)
        if image is None:
            without_image += 1
            continue
        candidates.append(row)
        pixels.append(image)
        if row.study_pseudonym:  # one image per study on one worklist
            known_studies.add(row.study_pseudonym)
    known_pixels = [image for row in known_rows if (image := _kept(images, row.inference_id)) is not None]
    return _Pool(
        candidates, pixels, known_pixels,
        sum(row.inference_id in labelled for row in rows), sum(row.inference_id in pending for row in rows), without_image,
    )  # fmt: skip


def _kept(images: ImageStore, inference_id: str) -> np.ndarray | None:
    path = images.get(inference_id)
    if path is None:
        return None
    try:
        return decode_image(path)
    except ImageDecodeError:
        return None  # a damaged stored file: one candidate fewer, not a failed worklist


def _shares(budget: int, available: dict[str, int]) -> dict[str, int]:
    """``budget`` split as evenly as the sites' candidates allow (water-filling: what one cannot use goes on)."""
    shares = {site: 0 for site in available}
    left = budget
    open_sites = [site for site, count in available.items() if count > 0]
    while left > 0 and open_sites:
        each, extra = divmod(left, len(open_sites))
        for index, site in enumerate(open_sites):
            shares[site] += min(each + (index < extra), available[site] - shares[site])
        left = budget - sum(shares.values())
        open_sites = [site for site in open_sites if shares[site] < available[site]]
    return shares


def _choose(
    pool: _Pool, share: int, strategy: Strategy, cfg: LoopConfig, preprocessing: Preprocessing, seed: int
) -> list[WorklistItem]:
    rows = pool.candidates
    embed = lambda pixels: image_embedding(np.stack([preprocessing.image(p) for p in pixels]))  # noqa: E731
    embeddings = embed(pool.pixels)
    known = embed(pool.known_pixels) if pool.known_pixels else None
    selection = select(
        strategy, share,
        np.array([row.probability for row in rows]), np.array([row.threshold for row in rows]),
        embeddings, known, pool_factor=cfg.hybrid_pool_factor, seed=seed,
    )  # fmt: skip
    return [
        WorklistItem(
            0,
            rows[i].inference_id,
            rows[i].site,
            rows[i].study_pseudonym,
            rows[i].created_at,
            rows[i].probability,
            rows[i].threshold,
            float(score),
        )  # fmt: skip
        for i, score in zip(selection.indices, selection.scores, strict=True)
    ]


def _ranked(item: WorklistItem, rank: int) -> WorklistItem:
    return WorklistItem(rank, item.inference_id, item.site, item.study_pseudonym, item.served_at, item.probability,
                        item.threshold, item.score)  # fmt: skip


def _record(
    ledger: PredictionLedger, worklist_id: str, strategy: str, items: list[WorklistItem], now: datetime
) -> None:
    records = [
        {
            "inference_id": item.inference_id,
            "worklist_id": worklist_id,
            "site": item.site,
            "strategy": strategy,
            "rank": item.rank,
            "score": item.score,
            "requested_at": now,
        }  # fmt: skip
        for item in items
    ]
    with ledger.transaction() as connection:
        try:
            connection.execute(sa.insert(read_requests), records)
        except IntegrityError as exc:  # rolled back whole: none of this worklist's requests stays
            raise WorklistError(
                "worklist_conflict", "another worklist asked for some of these cases meanwhile; ask again", 409
            ) from exc
