"""Registry actions: register a challenger, record the gate, approve / reject / roll back, set a site's threshold.

Each action is one registry transaction (aliases and model tags move together or not at all,
see :meth:`ModelRegistry.transaction`) that also appends its audit entry: if the entry cannot be
written the aliases go back, so no decision is ever applied without its record. A registered
version may pair with a distilled student (version tag ``student_version`` → a version of
``<name>-student``); the student's aliases follow the main model's.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from mlflow.entities.model_registry import ModelVersion

from pipeline.config import PipelineConfig
from pipeline.registry.audit import AuditEntry, AuditLog
from pipeline.registry.card import gate_override_note
from pipeline.registry.store import CHALLENGER, CHAMPION, HISTORY_TAG, ModelRegistry, RegistryError
from pipeline.serving.bundle import SITE_THRESHOLDS_TAG, site_thresholds
from pipeline.tracking import embedded_artifact_dir, resolve_tracking_uri

if TYPE_CHECKING:  # the gate and the threshold's bootstrap need scikit-learn and torch; reviewing and deciding do not
    from pipeline.loop.thresholds import SiteThreshold
    from pipeline.registry.gate import GateDecision

STUDENT_SUFFIX = "-student"
STUDENT_TAG = "student_version"


def student_name(name: str) -> str:
    return f"{name}{STUDENT_SUFFIX}"


def actions_for(cfg: PipelineConfig, name: str | None = None) -> RegistryActions:
    """The registry actions on ``name`` (default ``registry.model_name``) of the configured tracking server."""
    uri = resolve_tracking_uri(cfg.tracking)
    name = name or cfg.registry.model_name
    audit = AuditLog(uri, f"{cfg.tracking.experiment}-registry", embedded_artifact_dir(cfg.tracking), name)
    return RegistryActions(ModelRegistry(uri), audit, name)


@dataclass(frozen=True)
class Decision:
    """What an action did: the version acted on, the aliases after, and where its audit entry is."""

    action: str
    version: str
    aliases: dict[str, str]
    audit_artifact: str


class RegistryActions:
    """The actions on one registered model (and its student), each audited."""

    def __init__(self, registry: ModelRegistry, audit: AuditLog, name: str) -> None:
        self.registry = registry
        self.audit = audit
        self.name = name
        self.student = student_name(name)

    def register_challenger(
        self,
        model_uri: str,
        tags: Mapping[str, str],
        card: Callable[[str], str],
        student_uri: str | None = None,
        actor: str = "retrain flow",
        own_tags: Mapping[str, Mapping[str, str]] | None = None,
    ) -> Decision:
        """New version(s) with tags and ``card(version)`` as description; alias ``challenger`` moves to them.

        ``own_tags``: registered name (this model's or its student's) → tags only that version gets (its serving
        bundle), set when the version is created, so whoever follows the alias finds them there.
        """
        own_tags = own_tags or {}
        created: list[tuple[str, str]] = []  # deleted again if anything fails: no half-registered version stays
        try:
            version = str(self.registry.register(self.name, model_uri, {**tags, **own_tags.get(self.name, {})}).version)
            created.append((self.name, version))
            self.registry.describe(self.name, version, card(version))
            moves: dict[str, dict[str, str | None]] = {self.name: {CHALLENGER: version}}
            if student_uri is not None:
                parent = {"parent_model": f"models:/{self.name}/{version}"}
                student_tags = {**tags, **parent, **own_tags.get(self.student, {})}
                student = str(self.registry.register(self.student, student_uri, student_tags).version)
                created.append((self.student, student))
                described = f"Distilled student of {self.name} v{version}.\n\n{card(version)}"
                self.registry.describe(self.student, student, described)
                self.registry.set_version_tags(self.name, version, {STUDENT_TAG: student})
                moves[self.student] = {CHALLENGER: student}
            return self.apply("register", version, actor, "new model from a retraining run", moves, {"model_uri": model_uri})
        except BaseException:
            for name, number in reversed(created):
                self.registry.delete_version(name, number)
            raise

    def record_gate(self, version: str, decision: GateDecision, policy: str, actor: str = "promotion gate") -> Decision:
        """The gate's verdict on ``version``: tags, an audit entry, and under ``auto`` the promotion or rejection."""
        self.registry.set_version_tags(
            self.name,
            version,
            {
                "gate.passed": str(decision.passed).lower(),
                "gate.compared_with": decision.compared_with,
                "gate.recommendation": "promote" if decision.passed else "reject",
                "review.status": "pending" if policy == "review" else "decided by gate",
            },
        )
        summary = "gate passed" if decision.passed else "gate failed: " + "; ".join(decision.failures())
        recorded = self.apply("gate", version, actor, summary, {}, {"gate": decision.to_dict()})
        if policy != "auto":
            return recorded
        action = self.approve if decision.passed else self.reject
        return action(reviewer=f"{actor} (policy auto)", reason=summary, version=version)

    def approve(
        self,
        reviewer: str,
        reason: str,
        version: str | None = None,
        override_gate: bool = False,
        also: Mapping[str, str | None] | None = None,
        evidence: Mapping[str, object] | None = None,
    ) -> Decision:
        """The pending challenger becomes champion; the old champion stays in the history for rollback.

        ``also``: model tags changed in the same transaction (a rollout ending with it); ``evidence``: added to
        the audit entry's.

        A challenger the promotion gate rejected is promoted only with ``override_gate`` (and, as every
        decision, a reason); the audit entry, the version's ``review.override_gate`` tag and a section of its
        model card then say so. Refused (RegistryError, nothing changed) otherwise.
        """
        target = self._pending(version)
        number = _number(target)
        evidence = {**self._evidence(number), **(evidence or {})}
        failures = _gate_failures(evidence["gate"])
        if failures and not override_gate:
            raise RegistryError(
                f"{self.name} v{number}: the promotion gate rejected it ({'; '.join(failures)}). To approve it "
                "anyway, add --override-gate and say why in --reason (recorded as an override). Nothing changed."
            )
        if override_gate and not failures:
            verdict = "has not run on it" if evidence["gate"] is None else "passed it"
            raise RegistryError(
                f"{self.name} v{number}: --override-gate, but the promotion gate {verdict}: there is nothing to "
                "override; approve without it. Nothing changed."
            )
        history = [*self.registry.champion_history(self.name), number]
        moves = {self.name: {CHAMPION: number, CHALLENGER: None}}
        moves |= self._student_moves(target, {CHAMPION: True, CHALLENGER: False})
        tags = {HISTORY_TAG: json.dumps(history), **(also or {})}
        decided = self.apply("approve", number, reviewer, reason, moves, evidence, tags, override_gate)
        self._mark(number, "approved", reviewer, reason, {"review.override_gate": "true"} if override_gate else {})
        if override_gate:
            note = gate_override_note(reviewer, reason, failures, decided.audit_artifact)
            self.registry.describe(self.name, number, f"{(target.description or '').rstrip()}\n\n{note}")
        return decided

    def reject(
        self,
        reviewer: str,
        reason: str,
        version: str | None = None,
        also: Mapping[str, str | None] | None = None,
        evidence: Mapping[str, object] | None = None,
    ) -> Decision:
        """The pending challenger loses its alias; the champion is untouched (``also``, ``evidence``: as approve)."""
        target = self._pending(version)
        moves = {self.name: {CHALLENGER: None}} | self._student_moves(target, {CHALLENGER: False})
        evidence = {**self._evidence(_number(target)), **(evidence or {})}
        decided = self.apply("reject", _number(target), reviewer, reason, moves, evidence, also)
        self._mark(_number(target), "rejected", reviewer, reason)
        return decided

    def rollback(self, reviewer: str, reason: str) -> Decision:
        """The previous champion is champion again; the current one is marked rolled back."""
        _require(reviewer, reason)
        history = self.registry.champion_history(self.name)
        current = self.registry.find(self.name, CHAMPION)
        if current is None or len(history) < 2:
            raise RegistryError(f"{self.name}: no previous champion to roll back to (champion history: {history or 'empty'})")
        previous = self.registry.version(self.name, history[-2])
        moves = {self.name: {CHAMPION: _number(previous)}} | self._student_moves(previous, {CHAMPION: True})
        tags = {HISTORY_TAG: json.dumps(history[:-1])}
        evidence = {"rolled_back_version": _number(current)}
        decided = self.apply("rollback", _number(previous), reviewer, reason, moves, evidence, tags)
        self._mark(_number(current), "rolled back", reviewer, reason)
        return decided

    def set_site_threshold(self, chosen: SiteThreshold, reviewer: str, reason: str) -> Decision:
        """``chosen.version`` answers ``chosen.site`` at ``chosen.threshold`` (servers pick it up at their next check):
        the version's ``site_thresholds`` tag (other sites' kept) and the audit entry with the evidence, all or nothing.
        """
        if chosen.model != self.name:
            raise RegistryError(f"a threshold chosen on {chosen.model} cannot be set on {self.name}")
        target = self.registry.version(self.name, chosen.version)
        before = site_thresholds(target.tags)
        after = dict(sorted({**before, chosen.site: chosen.threshold}.items()))
        evidence = {"site_threshold": asdict(chosen), "site_thresholds_before": before, "site_thresholds_after": after}
        tags = {SITE_THRESHOLDS_TAG: json.dumps(after)}
        return self.apply("site-threshold", _number(target), reviewer, reason, {}, evidence, version_tags=tags)

    def _pending(self, version: str | None) -> ModelVersion:
        challenger = self.registry.find(self.name, CHALLENGER)
        if challenger is None:
            raise RegistryError(f"{self.name}: no pending challenger (nothing holds the alias '{CHALLENGER}')")
        if version is not None and version != _number(challenger):
            raise RegistryError(f"{self.name}: version {version} is not the pending challenger (v{_number(challenger)} is)")
        return challenger

    def _student_moves(self, version: ModelVersion, aliases: dict[str, bool]) -> dict[str, dict[str, str | None]]:
        """The paired student's aliases: True points the alias at it, False removes the alias."""
        student_version = version.tags.get(STUDENT_TAG)
        if student_version is None:
            return {}
        return {self.student: {alias: student_version if point else None for alias, point in aliases.items()}}

    def gate_evidence(self, version: str) -> dict | None:
        """The latest promotion-gate decision recorded for ``version`` (None if the gate never ran)."""
        gates = [entry for entry in self.audit.entries() if entry.action == "gate" and entry.version == version]
        return gates[-1].evidence.get("gate") if gates else None

    def lineage(self, version: ModelVersion) -> dict[str, str]:
        """Where a version came from: data versions, code, runs and parent models (from its tags)."""
        tags = version.tags
        found = {key: value for key, value in sorted(tags.items()) if key.startswith("data_version.")}
        for key in ("git_commit", "prefect_flow_run_id", "mlflow_run_id", "model_kind", "parent_model", STUDENT_TAG):
            if tags.get(key):
                found[key] = tags[key]
        found.setdefault("mlflow_run_id", version.run_id or "")
        found["source"] = version.source
        return found

    def run_link(self, run_id: str | None) -> str:
        """A browsable link to a run on a tracking server, else its id."""
        uri = self.registry.tracking_uri
        if run_id and uri.startswith(("http://", "https://")):
            return f"{uri.rstrip('/')}/#/runs/{run_id}"
        return run_id or "(no run)"

    def _evidence(self, version: str) -> dict:
        return {"gate": self.gate_evidence(version)}

    def _mark(self, version: str, status: str, reviewer: str, reason: str, extra: Mapping[str, str] | None = None) -> None:
        self.registry.set_version_tags(
            self.name, version, {"review.status": status, "review.by": reviewer, "review.reason": reason, **(extra or {})}
        )

    def gate_failures(self, version: str) -> list[str]:
        """What the promotion gate rejected ``version`` for; empty when it passed or never ran."""
        return _gate_failures(self.gate_evidence(version))

    def apply(
        self,
        action: str,
        version: str,
        actor: str,
        reason: str,
        moves: dict[str, dict[str, str | None]],
        evidence: Mapping[str, object],
        tags: Mapping[str, str | None] | None = None,
        override_gate: bool = False,
        version_tags: Mapping[str, str] | None = None,
    ) -> Decision:
        """Alias ``moves``, model ``tags`` (None: removed), ``version_tags`` of ``version`` and the audit entry of
        ``action``, all or nothing."""
        _require(actor, reason)
        before = self.registry.aliases(self.name)
        names = [self.name, *(name for name in moves if name != self.name)]
        with self.registry.transaction(names, [(self.name, version)] if version_tags else []):
            self.registry.set_version_tags(self.name, version, version_tags or {})
            for name, aliases in moves.items():
                for alias, target in aliases.items():
                    self.registry.move_alias(name, alias, target)
            for key, value in (tags or {}).items():
                self.registry.set_model_tag(self.name, key, value)
            after = self.registry.aliases(self.name)
            entry = AuditEntry(action, self.name, version, actor, reason, before, after, dict(evidence), override_gate=override_gate)
            artifact = self.audit.append(entry)
        return Decision(action, version, after, artifact)


def _gate_failures(gate: dict | None) -> list[str]:
    """What the recorded gate decision failed on; empty when it passed or never ran."""
    return [] if gate is None or gate["passed"] else gate["failures"]


def _number(version: ModelVersion) -> str:
    """A version's number as text (stores differ on int vs str)."""
    return str(version.version)


def _require(actor: str, reason: str) -> None:
    if not actor.strip():
        raise RegistryError("a decision needs the reviewer's name (--reviewer)")
    if not reason.strip():
        raise RegistryError("a decision needs a reason (--reason)")
