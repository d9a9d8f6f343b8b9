"""Rollout actions: start, advance (ramp the canary), pause (back to shadow), promote, roll back, stop.

Each is one registry transaction (``RegistryActions.apply``): the ``rollout.active`` tag, any alias moves and the
audit entry change together or not at all. Promote and roll back are the registry's approve and reject of the
challenger, with the rollout ending in the same transaction; promoting against the latest analysis (or with no
analysis recommending it) needs ``force`` and a reason, recorded in the audit entry.
"""

from __future__ import annotations

import secrets
import uuid
from dataclasses import asdict, replace
from datetime import UTC, datetime

from pipeline.config import PipelineConfig, RolloutConfig
from pipeline.registry.card import rollout_evidence_note
from pipeline.registry.review import Decision, RegistryActions, actions_for
from pipeline.registry.store import CHALLENGER, CHAMPION, RegistryError
from pipeline.rollout.state import MODES, ROLLOUT_TAG, Mode, Rollout


def rollout_actions(cfg: PipelineConfig, name: str | None = None) -> RolloutActions:
    """The rollout actions on ``name`` (default ``registry.model_name``) of the configured tracking server."""
    return RolloutActions(actions_for(cfg, name), cfg.rollout)


class RolloutActions:
    def __init__(self, actions: RegistryActions, cfg: RolloutConfig) -> None:
        self.actions = actions
        self.cfg = cfg

    @property
    def name(self) -> str:
        return self.actions.name

    def active(self) -> Rollout | None:
        tag = self.actions.registry.model_tags(self.name).get(ROLLOUT_TAG)
        return Rollout.from_tag(tag) if tag else None

    def start(self, mode: Mode, actor: str, reason: str) -> Rollout:
        """The champion and the pending challenger, in ``mode`` (canary: at the schedule's first share)."""
        if mode not in MODES:
            raise RegistryError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
        running = self.active()
        if running is not None:
            raise RegistryError(f"{self.name}: {running.describe()} is already running; promote, roll back or stop it first")
        champion = self.actions.registry.find(self.name, CHAMPION)
        challenger = self.actions.registry.find(self.name, CHALLENGER)
        if champion is None or challenger is None:
            missing = " and ".join(alias for alias, v in ((CHAMPION, champion), (CHALLENGER, challenger)) if v is None)
            raise RegistryError(f"{self.name}: a rollout needs a {CHAMPION} and a {CHALLENGER}; no version holds {missing}")
        rollout = Rollout(
            rollout_id=uuid.uuid4().hex[:12],
            champion=str(champion.version),
            challenger=str(challenger.version),
            mode="shadow",
            stage=-1,
            challenger_share=0.0,
            policy=self.cfg.policy,
            salt=secrets.token_hex(16),
            started_at=datetime.now(UTC).isoformat(timespec="seconds"),
            started_by=actor,
        )
        if mode == "canary":
            rollout = rollout.in_canary(0, self.cfg.canary_schedule[0])
        self._change("rollout-start", rollout, actor, reason)
        return rollout

    def auto_start(self, version: str, actor: str) -> tuple[Rollout | None, str]:
        """``rollout.auto_start``: a shadow rollout of ``version`` if it is the pending challenger, a champion
        exists and no rollout runs; else None and why not."""
        challenger = self.actions.registry.find(self.name, CHALLENGER)
        if challenger is None or str(challenger.version) != version:
            return None, f"v{version} is not the pending challenger (the promotion gate decided on it)"
        if self.actions.registry.find(self.name, CHAMPION) is None:
            return None, "no champion to roll it out against yet (approve a first champion)"
        running = self.active()
        if running is not None:
            return None, f"{running.describe()} is running"
        rollout = self.start("shadow", actor, f"rollout.auto_start: v{version}, a new challenger from retraining")
        return rollout, f"started {rollout.describe()}"

    def advance(self, actor: str, reason: str) -> Rollout:
        """Shadow → the first canary share; canary → the schedule's next share."""
        rollout = self.running()
        stage = rollout.stage + 1
        if stage >= len(self.cfg.canary_schedule):
            raise RegistryError(f"{rollout.describe()} is at the schedule's last share already; promote or roll back")
        advanced = rollout.in_canary(stage, self.cfg.canary_schedule[stage])
        self._change("rollout-advance", advanced, actor, reason)
        return advanced

    def pause(self, actor: str, reason: str) -> Rollout:
        """Canary → shadow: no patient is answered by the challenger any more (a drift alarm does this)."""
        rollout = self.running()
        if rollout.mode == "shadow":
            raise RegistryError(f"{rollout.describe()} is in shadow mode already")
        paused = rollout.in_shadow()
        self._change("rollout-pause", paused, actor, reason)
        return paused

    def record_recommendation(self, recommendation: str, actor: str, reason: str) -> Rollout:
        rollout = self.running()
        updated = replace(rollout, recommendation=recommendation, recommended_at=datetime.now(UTC).isoformat(timespec="seconds"))
        self._change("rollout-analysis", updated, actor, reason)
        return updated

    def act_on(
        self, recommendation: str, reasons: list[str], actor: str, analysis_run: str | None = None
    ) -> Decision | Rollout:
        """An analysis's verdict: recorded on the rollout when it changed; under ``policy: auto`` a promote or
        roll back is also carried out (and ends the rollout). ``analysis_run``: the analysis's MLflow run, which
        a promoted version's model card then links."""
        rollout = self.running()
        reason = "; ".join(reasons) or recommendation
        if rollout.recommendation != recommendation:
            rollout = self.record_recommendation(recommendation, actor, reason)
        if rollout.policy == "auto" and recommendation == "promote":
            return self.promote(f"{actor} (policy auto)", reason, analysis_run=analysis_run)
        if rollout.policy == "auto" and recommendation == "rollback":
            return self.rollback(f"{actor} (policy auto)", reason)
        return rollout

    def promote(self, actor: str, reason: str, force: bool = False, analysis_run: str | None = None) -> Decision:
        """The challenger becomes champion and the rollout ends; its model card gains the evidence that admitted
        it (the rollout, the rule's reasons, the analysis run ``analysis_run`` when known, the audit entry)."""
        rollout = self.running()
        if rollout.recommendation != "promote" and not force:
            said = f"the latest analysis says {rollout.recommendation}" if rollout.recommendation else "no analysis has run"
            raise RegistryError(
                f"{rollout.describe()}: {said}. To promote anyway add --force and say why in --reason (recorded)"
            )
        overriding_gate = bool(self.actions.gate_failures(rollout.challenger)) and force
        evidence = self._evidence(rollout, forced=force and rollout.recommendation != "promote")
        if analysis_run:
            evidence["analysis_run"] = analysis_run
        decided = self.actions.approve(
            actor,
            reason,
            rollout.challenger,
            override_gate=overriding_gate,
            also={ROLLOUT_TAG: None},
            evidence=evidence,
        )
        registry, version = self.actions.registry, rollout.challenger
        card = (registry.version(self.name, version).description or "").rstrip()
        analysis = (
            self.actions.run_link(analysis_run)
            if analysis_run
            else "the rollout's latest analysis run (crosssim rollout analyse)"
        )
        note = rollout_evidence_note(rollout.rollout_id, actor, reason, analysis, decided.audit_artifact)
        registry.describe(self.name, version, f"{card}\n\n{note}")
        return decided

    def rollback(self, actor: str, reason: str) -> Decision:
        """The challenger is rejected and the rollout ends; the champion never stopped serving."""
        rollout = self.running()
        return self.actions.reject(actor, reason, rollout.challenger, also={ROLLOUT_TAG: None}, evidence=self._evidence(rollout))

    def stop(self, actor: str, reason: str) -> Decision:
        """The rollout ends without a decision: the challenger stays pending."""
        rollout = self.running()
        return self.actions.apply("rollout-stop", rollout.challenger, actor, reason, {}, self._evidence(rollout), {ROLLOUT_TAG: None})

    def running(self) -> Rollout:
        """The running rollout; a RegistryError when none is."""
        rollout = self.active()
        if rollout is None:
            raise RegistryError(f"{self.name}: no rollout is running (crosssim rollout start)")
        return rollout

    def _change(self, action: str, rollout: Rollout, actor: str, reason: str) -> Decision:
        return self.actions.apply(action, rollout.challenger, actor, reason, {}, self._evidence(rollout), {ROLLOUT_TAG: rollout.to_tag()})

    @staticmethod
    def _evidence(rollout: Rollout, forced: bool = False) -> dict[str, object]:
        shown = {key: value for key, value in asdict(rollout).items() if key != "salt"}  # the salt stays in the tag
        return {"rollout": shown, **({"forced_against_analysis": True} if forced else {})}
