"""Which arm answers a patient during a rollout: deterministic, sticky, randomised within each site.

A patient's draw is ``HMAC-SHA256(rollout salt, site + patient pseudonym)`` read as a number in [0, 1): uniform
and independent across patients within every site, unpredictable without the rollout's salt, and the same on
every server. The challenger answers when the draw falls below the canary share *at the patient's first request*;
that first arm is stored (``rollout_assignments``) and reused, so a patient never switches arm when the canary
ramps up, goes back to shadow, or the server restarts. A request without a patient id is assigned by its study,
else on its own.

The sample-ratio-mismatch check compares, per site, how many patients each arm got with what the shares at their
assignment predict (chi-square, one degree of freedom): a tiny p-value means the split is broken (a router
sending some patients elsewhere, a cache, a bug), and the rollout's comparison cannot be trusted.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
from dataclasses import dataclass
from datetime import datetime, timezone

import sqlalchemy as sa
from scipy.stats import chisquare
from sqlalchemy.dialects import postgresql, sqlite

from pipeline.rollout.state import Rollout
from pipeline.serving.ledger import PredictionLedger, rollout_assignments

CHAMPION_ARM, CHALLENGER_ARM = "champion", "challenger"
SRM_ALPHA = 0.001  # a broken split shows at this level; a sound one flags a site once in a thousand checks


def draw(salt: str, site: str, unit: str) -> float:
    """The unit's uniform number in [0, 1) for this rollout and site."""
    digest = hmac.new(salt.encode(), f"{site}\x1f{unit}".encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def arm_of(rollout: Rollout, site: str, unit: str) -> str:
    """The arm a first request of ``unit`` gets now."""
    return CHALLENGER_ARM if draw(rollout.salt, site, unit) < rollout.challenger_share else CHAMPION_ARM


class Assignments:
    """The stored arms of the running rollouts (the ledger's database), cached in memory."""

    def __init__(self, ledger: PredictionLedger) -> None:
        self.ledger = ledger
        self._known: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    def known(self, rollout: Rollout, unit: str) -> str | None:
        """``unit``'s arm if this process has seen it (no database round trip)."""
        with self._lock:
            return self._known.get((rollout.rollout_id, unit))

    def arm(self, rollout: Rollout, site: str, unit: str, now: datetime | None = None) -> str:
        """``unit``'s arm in ``rollout``: its first one if it has been seen, else a new draw, stored."""
        key = (rollout.rollout_id, unit)
        if (seen := self.known(rollout, unit)) is not None:
            return seen
        table = rollout_assignments
        stored_arm = sa.select(table.c.arm).where(table.c.rollout_id == rollout.rollout_id, table.c.unit == unit)
        with self.ledger.transaction() as connection:
            stored = connection.execute(stored_arm).scalar_one_or_none()
            if stored is not None:
                return self._remember(key, stored)
            # Insert unless present (another server may assign the same patient meanwhile), then read what is stored.
            insert = postgresql.insert if connection.dialect.name == "postgresql" else sqlite.insert
            connection.execute(
                insert(table).values(
                    rollout_id=rollout.rollout_id, unit=unit, site=site, arm=arm_of(rollout, site, unit),
                    challenger_share=rollout.challenger_share, assigned_at=now or datetime.now(timezone.utc),
                ).on_conflict_do_nothing()
            )  # fmt: skip
            stored = connection.execute(stored_arm).scalar_one()
        return self._remember(key, stored)

    def _remember(self, key: tuple[str, str], arm: str) -> str:
        with self._lock:
            self._known[key] = arm
        return arm


@dataclass(frozen=True)
class SampleRatio:
    site: str
    patients: int
    challenger: int
    expected_challenger: float
    p_value: float | None  # None: nothing to test (shadow only, or no patient yet)

    @property
    def mismatch(self) -> bool:
        return self.p_value is not None and self.p_value < SRM_ALPHA


def sample_ratio_check(ledger: PredictionLedger, rollout_id: str) -> list[SampleRatio]:
    """Per site: the patients each arm got against the shares they were assigned under."""
    table = rollout_assignments
    query = (
        sa.select(
            table.c.site,
            sa.func.count(),
            sa.func.sum(sa.case((table.c.arm == CHALLENGER_ARM, 1), else_=0)),
            sa.func.sum(table.c.challenger_share),
        )
        .where(table.c.rollout_id == rollout_id)
        .group_by(table.c.site)
        .order_by(table.c.site)
    )
    with ledger.transaction() as connection:
        rows = list(connection.execute(query))
    checks = []
    for site, patients, challenger, expected in rows:
        patients, challenger, expected = int(patients), int(challenger or 0), float(expected or 0.0)
        p_value = None
        if 0 < expected < patients:
            p_value = float(chisquare([patients - challenger, challenger], [patients - expected, expected]).pvalue)
        checks.append(SampleRatio(site, patients, challenger, expected, p_value))
    return checks
