"""What reading a dataset left out or found wrong, so that no row or file is dropped in silence.

Every reader fills a ReadReport: rows and files it did not read, each reason with a count and
examples that name the CSV line or the file, and problems that must stop a run (blocking). The
validation report carries them (``validation.json``, and so the run's MLflow artifacts);
``read_dataset`` refuses a dataset with a blocking one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd

from pipeline.data.manifest import SPLITS
from pipeline.errors import DatasetError

Severity = Literal["blocking", "warning"]
MAX_EXAMPLES = 10  # rows/files named per reason; the count covers all of them


@dataclass(frozen=True)
class Exclusion:
    """One reason rows, files or values were left out (or, when blocking, why the dataset is refused)."""

    reason: str  # the rule's name in the validation report, e.g. "unknown_label"
    severity: Severity
    what: str  # e.g. "folder(s) other than the split folders train, val, test, not read"
    count: int
    examples: tuple[str, ...]  # the first MAX_EXAMPLES, each naming its CSV line, file or patient

    @classmethod
    def of(cls, reason: str, severity: Severity, what: str, items: list[str]) -> Exclusion:
        return cls(reason, severity, what, len(items), tuple(items[:MAX_EXAMPLES]))

    @property
    def message(self) -> str:
        more = ", ..." if self.count > len(self.examples) else ""
        return f"{self.count} {self.what}: {', '.join(self.examples)}{more}"


@dataclass
class ReadReport:
    """What one reader left out of ``folder``'s manifest, and why."""

    folder: Path
    exclusions: list[Exclusion] = field(default_factory=list)

    def add(self, reason: str, severity: Severity, what: str, items: list[str]) -> None:
        """Record ``items`` (one per row, file or patient) under ``reason``; nothing when there are none."""
        if items:
            self.exclusions.append(Exclusion.of(reason, severity, what, items))

    @property
    def blocking(self) -> list[Exclusion]:
        return [e for e in self.exclusions if e.severity == "blocking"]

    def raise_if_blocking(self) -> None:
        if self.blocking:
            found = "; ".join(f"{e.reason}: {e.message}" for e in self.blocking)
            raise DatasetError(f"{self.folder}: {found}")


def unread_files(folder: Path, read: set[Path]) -> list[str]:
    """Every file under ``folder`` not in ``read``, as paths relative to ``folder``."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p not in read)


def patients_in_official_splits(manifest: pd.DataFrame) -> list[str]:
    """Patients with images in more than one official split, each with its first image in each of them.

    Readers leave ``split`` empty where the data has no official split (an ImageFolder's train
    folder, NIH, DICOM), so empty counts as one split of its own: its rows are split later, by patient.
    """
    official = manifest["split"].replace("", "train")
    per_patient = official.groupby(manifest["patient_id"]).nunique()
    leaked = per_patient.index[per_patient > 1]
    found = []
    for patient in sorted(leaked):
        rows = manifest["patient_id"] == patient
        first = manifest.loc[rows, "image_id"].groupby(official[rows]).min()  # one image per split
        found.append(f"{patient} ({', '.join(first[s] for s in SPLITS if s in first.index)})")
    return found
