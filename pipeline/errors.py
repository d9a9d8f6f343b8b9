"""Errors a user can act on. The CLI prints their message (no traceback) and exits non-zero."""

from __future__ import annotations


class PipelineError(Exception):
    """Base class: the message names the file/row and the rule broken."""

    exit_code = 2


class ConfigError(PipelineError):
    """The configuration or a CLI override is invalid."""


class DatasetError(PipelineError):
    """A dataset is missing, malformed or unreadable."""


class DataValidationError(PipelineError):
    """Blocking data-quality rules failed; ``summary`` is the readable report."""

    exit_code = 3

    def __init__(self, summary: str, report_path: str | None = None) -> None:
        super().__init__(summary)
        self.summary = summary
        self.report_path = report_path


class TrainingError(PipelineError):
    """Training could not run or diverged."""


class VersioningError(PipelineError):
    """DVC could not record or upload a data version; the change was rolled back."""

    exit_code = 5


class RequestRefused(PipelineError):
    """A request refused by a rule; ``rule`` names it (an HTTP error's ``error``), ``status`` is its HTTP status."""

    def __init__(self, rule: str, detail: str, status: int = 422) -> None:
        super().__init__(f"{rule}: {detail}")
        self.rule = rule
        self.detail = detail
        self.status = status
