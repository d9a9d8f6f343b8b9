"""What happened to one batch, as JSON (the record) and markdown (for a person, the CLI and Prefect)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.validation.report import Failure

Status = Literal["accepted", "rejected", "unchanged"]
REPORT_JSON = "report.json"
SUMMARY_MD = "summary.md"
_COUNT_ORDER = (
    "rows", "images", "normal", "pneumonia", "patients", "new_patients", "dicom_images", "out_of_task_rows",
    "unlisted_files",
)  # fmt: skip


@dataclass
class BatchReport:
    site: str
    batch_id: str
    fingerprint: str
    source: str
    time: str  # ISO 8601, UTC
    status: Status
    problems: list[Failure] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    content_digest: str | None = None  # sha256 over the sorted pixel hashes of the batch's images
    salt_id: str | None = None
    version_before: str | None = None  # md5 in the .dvc file of the data folder
    version_after: str | None = None
    site_version: str | None = None  # the site folder's DVC md5 after ingest (what MLflow runs record)
    note: str = ""  # why an unchanged batch is unchanged
    location: str | None = None  # folder holding this report (and a rejected batch)

    @property
    def blocking(self) -> list[Failure]:
        return [p for p in self.problems if p.severity == "blocking"]

    @property
    def warnings(self) -> list[Failure]:
        return [p for p in self.problems if p.severity == "warning"]

    def to_dict(self) -> dict[str, Any]:
        fields = dict(self.__dict__)
        fields["problems"] = [p._asdict() for p in self.problems]
        return fields

    def log_entry(self) -> dict[str, Any]:
        """The ingest log's line: the record without the messages (they are in the report)."""
        entry = {k: v for k, v in self.to_dict().items() if k not in ("problems", "note")}
        entry["blocking_rules"] = sorted({p.rule for p in self.blocking})
        entry["warning_rules"] = sorted({p.rule for p in self.warnings})
        return entry

    def markdown(self) -> str:
        verdict = {"accepted": "ACCEPTED", "rejected": "REJECTED", "unchanged": "ALREADY INGESTED"}[self.status]
        lines = [
            f"# Batch {self.batch_id} for site `{self.site}`: {verdict}",
            "",
            f"- source: `{self.source}` (fingerprint `{self.fingerprint[:16]}…`), {self.time}",
            "- "
            + ", ".join(f"{key.replace('_', ' ')} {self.counts[key]}" for key in _COUNT_ORDER if key in self.counts),
        ]
        if self.note:
            lines.append(f"- {self.note}")
        if self.version_after:
            lines.append(
                f"- data version `{self.version_before}` → `{self.version_after}` (site `{self.site_version}`)"
            )
        if self.location:
            lines.append(f"- report: `{self.location}`")
        if self.problems:
            lines += ["", "| severity | rule | problem |", "|---|---|---|"]
            lines += [
                f"| {p.severity} | {p.rule} | {p.message.replace('|', '/')} |" for p in self.blocking + self.warnings
            ]
        return "\n".join(lines)

    def write(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / REPORT_JSON).write_text(json.dumps(self.to_dict(), indent=2, default=str))
        (folder / SUMMARY_MD).write_text(self.markdown() + "\n")


def move_validation(source: Path, destination: Path) -> None:
    """Move the suite's report folder (if it ran); its validation.json names the Data Docs by path, so that follows."""
    if not source.exists():
        return
    shutil.move(str(source), str(destination))
    suite_report = destination / "validation.json"
    if suite_report.is_file():
        payload = json.loads(suite_report.read_text())
        payload["data_docs"] = str(destination / "data_docs" / "index.html")
        suite_report.write_text(json.dumps(payload, indent=2, default=str))
