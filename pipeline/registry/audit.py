"""The audit trail of registry decisions: who, when, why, on which evidence, and what moved.

Every action becomes one new JSON artifact in a dedicated MLflow run per registered model
(experiment ``<tracking experiment>-registry``, tag ``crosssim.audit_log=<model>``), named
``audit/<UTC time>-<action>-v<version>.json``. Entries are only ever added, never rewritten,
so the folder is an append-only log that lives wherever the tracking server keeps artifacts.
The affected version also carries the latest decision as tags (see pipeline.registry.review).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from pipeline.tracking import ensure_experiment

AUDIT_TAG = "crosssim.audit_log"
AUDIT_DIR = "audit"


@dataclass(frozen=True)
class AuditEntry:
    action: str  # register | gate | approve | reject | rollback
    model: str
    version: str
    actor: str
    reason: str
    aliases_before: dict[str, str]
    aliases_after: dict[str, str]
    evidence: dict[str, Any] = field(default_factory=dict)
    at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="microseconds"))
    override_gate: bool = False  # an approval against the promotion gate's rejection (entries before it: False)


class AuditLog:
    """The append-only log of one registered model."""

    def __init__(self, tracking_uri: str, experiment: str, artifact_dir: Path | None, model: str) -> None:
        self.client = MlflowClient(tracking_uri)
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.artifact_dir = artifact_dir
        self.model = model

    def append(self, entry: AuditEntry) -> str:
        """Write ``entry`` as a new artifact; returns its path inside the audit run."""
        stamp = entry.at.replace(":", "").replace("-", "").replace("+0000", "Z")
        artifact = f"{AUDIT_DIR}/{stamp}-{entry.action}-v{entry.version}.json"
        self.client.log_dict(self._run_id(create=True), asdict(entry), artifact)
        return artifact

    def entries(self) -> list[AuditEntry]:
        """Every entry, oldest first."""
        run_id = self._run_id(create=False)
        if run_id is None:
            return []
        names = sorted(item.path for item in self.client.list_artifacts(run_id, AUDIT_DIR))
        with tempfile.TemporaryDirectory() as folder:
            return [
                AuditEntry(**json.loads(Path(self.client.download_artifacts(run_id, name, folder)).read_text()))
                for name in names
            ]

    def _run_id(self, create: bool) -> str | None:
        experiment_id = ensure_experiment(self.tracking_uri, self.experiment, self.artifact_dir)
        runs = self.client.search_runs([experiment_id], f"tags.`{AUDIT_TAG}` = '{self.model}'", max_results=1)
        if runs:
            return runs[0].info.run_id
        if not create:
            return None
        run = self.client.create_run(experiment_id, tags={AUDIT_TAG: self.model}, run_name=f"audit-{self.model}")
        self.client.set_terminated(run.info.run_id)  # a log, not a running job; artifacts can still be added
        return run.info.run_id
