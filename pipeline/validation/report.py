"""The outcome of a validation run: what failed, in words a user can act on, and where the details are."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from pipeline.data.exclusions import Exclusion, Severity
from pipeline.errors import DataValidationError


class Failure(NamedTuple):
    """One failed rule; a tuple so callers can write ``for rule, severity, message in report.failures``."""

    rule: str
    severity: Severity
    message: str


@dataclass
class ValidationReport:
    success: bool  # no blocking rule failed (warnings never make it False)
    failures: list[Failure]
    n_images: int
    report_json_path: Path
    data_docs_dir: Path  # the GX Data Docs site; open data_docs_dir / "index.html"
    checks: list[dict[str, Any]] = field(default_factory=list)  # every expectation run, passed or not
    exclusions: list[Exclusion] = field(default_factory=list)  # rows/files left out before the rules ran

    @property
    def blocking(self) -> list[Failure]:
        return [f for f in self.failures if f.severity == "blocking"]

    @property
    def warnings(self) -> list[Failure]:
        return [f for f in self.failures if f.severity == "warning"]

    def summary(self) -> str:
        verdict = "PASSED" if self.success else "FAILED"
        lines = [
            f"Data validation {verdict}: {self.n_images} images, {len(self.checks)} checks, "
            f"{len(self.blocking)} blocking failure(s), {len(self.warnings)} warning(s)."
        ]
        for failure in self.blocking + self.warnings:
            lines.append(f"  [{failure.severity.upper()}] {failure.rule}: {failure.message}")
        lines.append(f"Report: {self.report_json_path}")
        lines.append(f"Data Docs: {self.data_docs_dir / 'index.html'}")
        return "\n".join(lines)

    def add_exclusions(self, exclusions: list[Exclusion]) -> None:
        """Report what was left out before the rules ran (by the reader, as exact copies); a blocking one fails."""
        self.exclusions += exclusions
        self.failures += [Failure(e.reason, e.severity, e.message) for e in exclusions]
        self.failures.sort(key=lambda f: f.severity != "blocking")  # stable: each group keeps its order
        self.success = self.success and not any(e.severity == "blocking" for e in exclusions)
        self.write_json()

    def raise_if_blocking(self) -> None:
        if not self.success:
            raise DataValidationError(self.summary(), str(self.report_json_path))

    def write_json(self) -> None:
        payload = {
            "success": self.success,
            "n_images": self.n_images,
            "failures": [f._asdict() for f in self.failures],
            "checks": self.checks,
            "exclusions": [asdict(e) for e in self.exclusions],
            "data_docs": str(self.data_docs_dir / "index.html"),
        }
        self.report_json_path.write_text(json.dumps(payload, indent=2, default=str))
