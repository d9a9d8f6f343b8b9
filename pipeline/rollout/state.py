"""A rollout: the challenger against the champion on live traffic, kept as one registry tag of the model.

Modes: ``shadow`` (the challenger scores every request, only the champion answers) and ``canary`` (a share of
patients is answered by the challenger, ramped through ``rollout.canary_schedule``). The state lives in the
registered model's tag ``rollout.active`` (JSON), so that every server following the model sees the same rollout,
and it changes only through ``pipeline.rollout.actions`` (a registry transaction with its audit entry).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import Literal

from pipeline.registry.store import RegistryError

ROLLOUT_TAG = "rollout.active"
Mode = Literal["shadow", "canary"]
MODES: tuple[Mode, ...] = ("shadow", "canary")


@dataclass(frozen=True)
class Rollout:
    rollout_id: str
    champion: str  # version numbers, fixed for the rollout's life
    challenger: str
    mode: Mode
    stage: int  # canary: index into the schedule; shadow: -1
    challenger_share: float  # of patients answered by the challenger (0 in shadow)
    policy: Literal["auto", "review"]
    salt: str  # keys the patients' arm draws (pipeline.rollout.assignment)
    started_at: str
    started_by: str
    recommendation: str | None = None  # the latest analysis's: continue | promote | rollback
    recommended_at: str | None = None

    def to_tag(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_tag(cls, text: str) -> Rollout:
        try:
            return cls(**json.loads(text))
        except (ValueError, TypeError) as exc:
            raise RegistryError(f"the registry's {ROLLOUT_TAG} tag is not a rollout ({exc}); stop it and start again") from exc

    def in_canary(self, stage: int, share: float) -> Rollout:
        return replace(self, mode="canary", stage=stage, challenger_share=share)

    def in_shadow(self) -> Rollout:
        return replace(self, mode="shadow", stage=-1, challenger_share=0.0)

    def describe(self) -> str:
        where = "shadow" if self.mode == "shadow" else f"canary stage {self.stage + 1} ({self.challenger_share:.0%} of patients)"
        return f"rollout {self.rollout_id}: challenger v{self.challenger} vs champion v{self.champion}, {where}"
