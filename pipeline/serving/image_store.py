"""Served images kept by inference_id, so that a label arriving later can turn them into training data.

Contract: the store keeps exactly the bytes it is given and checks only that they are a PNG or JPEG from which
the metadata filter (``pipeline.data.scrub``) would remove nothing. The caller hands it a de-identified image
(``uploads.deidentified_image``), never an upload as received, whose DICOM header or PNG/JPEG metadata may
name the patient.

Layout: ``<directory>/<YYYY-MM-DD>/<inference_id>.png|.jpg`` by UTC day of the prediction, so that expiry
removes whole day folders and a lookup checks one file per retained day.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

from pipeline.data.scrub import JPEG_SOI, PNG_SIGNATURE, ImageFormatError, scrub_jpeg, scrub_png
from pipeline.errors import PipelineError

SUFFIXES = (".png", ".jpg")
_INFERENCE_ID = re.compile(r"^[0-9a-f]{32}$")
_DAY = "%Y-%m-%d"


class ImageStoreError(PipelineError):
    """An image was refused by the store (not a PNG/JPEG, carries metadata, or a malformed inference_id)."""


class ImageStore:
    def __init__(self, directory: Path, retention_days: int) -> None:
        if retention_days < 0:
            raise ValueError(f"retention_days {retention_days}: expected 0 or more")
        self.directory = Path(directory)
        self.retention_days = retention_days

    def put(self, inference_id: str, image: bytes, created_at: datetime | None = None) -> Path | None:
        """Store ``image`` for ``inference_id`` (atomically: whole or absent); None when retention is 0.

        ``created_at``: the prediction's time (its ledger row's), by default now; expiry counts from it.
        """
        _check_id(inference_id)
        suffix = _checked_suffix(image)
        if self.retention_days == 0:
            return None
        created_at = created_at or datetime.now(timezone.utc)
        day_folder = self.directory / created_at.astimezone(timezone.utc).strftime(_DAY)
        day_folder.mkdir(parents=True, exist_ok=True)
        target = day_folder / f"{inference_id}{suffix}"
        handle, temporary = tempfile.mkstemp(dir=day_folder, prefix=f".{inference_id}.", suffix=".partial")
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(image)
            # The file's time is the prediction's: purge() expires by it within a day folder.
            stamp = created_at.timestamp()
            os.utime(temporary, (stamp, stamp))
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return target

    def get(self, inference_id: str) -> Path | None:
        _check_id(inference_id)
        for _, folder in sorted(self._day_folders(), reverse=True):
            for suffix in SUFFIXES:
                path = folder / f"{inference_id}{suffix}"
                if path.is_file():
                    return path
        return None

    def purge(self, now: datetime) -> int:
        """Delete the images stored more than ``retention_days`` before ``now``; returns how many."""
        cutoff = now.astimezone(timezone.utc) - timedelta(days=self.retention_days)
        removed = 0
        for day, folder in self._day_folders():
            day_start = datetime(day.year, day.month, day.day, tzinfo=timezone.utc)
            if day_start + timedelta(days=1) <= cutoff:
                removed += sum(1 for path in folder.iterdir() if path.suffix in SUFFIXES)
                shutil.rmtree(folder)
            elif day_start < cutoff:
                for path in folder.iterdir():
                    try:
                        expired = path.stat().st_mtime < cutoff.timestamp()
                    except FileNotFoundError:  # a put() renaming its temporary file meanwhile
                        continue
                    if expired:
                        removed += path.suffix in SUFFIXES
                        path.unlink(missing_ok=True)
        return removed

    def _day_folders(self) -> list[tuple[date, Path]]:
        if not self.directory.is_dir():
            return []
        found = []
        for folder in self.directory.iterdir():
            try:
                day = datetime.strptime(folder.name, _DAY).date()
            except ValueError:
                continue  # not ours: left alone
            if folder.is_dir():
                found.append((day, folder))
        return found


def _check_id(inference_id: str) -> None:
    # The id becomes a file name: only the ledger's uuid4 hex form is accepted (no path tricks).
    if not _INFERENCE_ID.match(inference_id):
        raise ImageStoreError(f"inference_id {inference_id!r}: expected uuid4().hex (32 lowercase hex)")


def _checked_suffix(image: bytes) -> str:
    """The file suffix of a clean PNG or JPEG; anything else is refused."""
    is_png = image.startswith(PNG_SIGNATURE)
    if not is_png and not image.startswith(JPEG_SOI):
        raise ImageStoreError("the image store keeps de-identified PNG or JPEG images; these bytes are neither")
    try:
        removed = (scrub_png if is_png else scrub_jpeg)(image)[1]
    except ImageFormatError as exc:
        raise ImageStoreError(f"the image cannot be checked for metadata ({exc})") from exc
    if removed:
        raise ImageStoreError(
            f"the image carries metadata ({', '.join(sorted(removed))}): strip it (uploads.deidentified_image) first"
        )
    return SUFFIXES[0] if is_png else SUFFIXES[1]
