"""Served cases back into training: the matured, labelled predictions of a site, with the de-identified images the
service kept, as a batch in NIH's layout that ``crosssim ingest SITE FOLDER`` takes with all its checks.

The batch: ``Data_Entry_2017.csv`` (``Image Index`` = ``<inference_id>.png|.jpg``, ``Finding Labels`` =
``Pneumonia`` | ``No Finding`` from the label precedence chose, ``Patient ID`` = the keyed pseudonym the ledger
holds — the one ingest gives the same patient's DICOM — else the study's, else the inference id; age, sex and
view are not known to the service and left empty) and ``images/``. A case is exported once (``exported_cases`` in
the ledger's database); a case without a kept image (retention passed, or ``serve.image_retention_days: 0``) is
counted, not exported; a patient the site's dataset already holds is held back unless ``allow_known_patients``
(ingest would refuse the batch for it), and so is a second case with the very same image file (ingest refuses a
batch holding two copies). The folder appears complete or not at all.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import sqlalchemy as sa

from pipeline.data.readers import NIH_CSV
from pipeline.errors import PipelineError
from pipeline.rollout.outcomes import matured_labels
from pipeline.serving.image_store import ImageStore
from pipeline.serving.ledger import PredictionLedger, exported_cases

FINDINGS = {0: "No Finding", 1: "Pneumonia"}


class ExportError(PipelineError):
    """Nothing could be exported (no labelled case, or the folder exists); nothing was written."""


@dataclass(frozen=True)
class ExportedBatch:
    folder: Path
    cases: int
    without_image: int  # labelled, but the image was not kept
    known_patients: int  # held back: the site's dataset already has the patient
    exported_before: int
    duplicates: int = 0  # held back: the same image file as another case of the batch (ingest refuses copies)


def dataset_patients(site_folder: Path) -> set[str]:
    """The Patient IDs a site's dataset holds (its NIH-layout CSV; empty for a new site)."""
    table = site_folder / NIH_CSV
    if not table.is_file():
        return set()
    return set(pd.read_csv(table, dtype=str, keep_default_na=False, usecols=["Patient ID"])["Patient ID"].str.strip())


def export_labelled_cases(
    ledger: PredictionLedger,
    images: ImageStore,
    site: str,
    folder: Path,
    sources: Sequence[str],
    maturity: timedelta,
    site_patients: set[str],
    allow_known_patients: bool = False,
    now: datetime | None = None,
) -> ExportedBatch:
    """Write ``site``'s new labelled served cases to ``folder`` (which must not exist) and mark them exported."""
    now = now or datetime.now(timezone.utc)
    if folder.exists():
        raise ExportError(f"{folder} exists: export into a new folder (each batch is ingested once)")
    labels = matured_labels(ledger, sources, maturity, now)
    with ledger.transaction() as connection:
        done = set(connection.execute(sa.select(exported_cases.c.inference_id)).scalars())
    labelled = [row for row in ledger.rows() if row.site == site and row.inference_id in labels]
    fresh = [row for row in labelled if row.inference_id not in done]
    records, without_image, known, copies, seen = [], 0, 0, [], set()
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))  # same file system: one rename
    try:
        (staging / "images").mkdir()
        for row in fresh:
            patient = row.patient_pseudonym or row.study_pseudonym or row.inference_id
            if patient in site_patients and not allow_known_patients:
                known += 1
                continue
            kept = images.get(row.inference_id)
            if kept is None:
                without_image += 1
                continue
            digest = hashlib.sha256(kept.read_bytes()).hexdigest()
            if digest in seen:  # the same file served twice (NIH has such pairs): ingest would refuse the batch
                copies.append(row.inference_id)
                continue
            seen.add(digest)
            shutil.copy2(kept, staging / "images" / kept.name)
            records.append({"Image Index": kept.name, "Finding Labels": FINDINGS[labels[row.inference_id].label],
                            "Follow-up #": 0, "Patient ID": patient, "inference_id": row.inference_id})  # fmt: skip
        if not records:
            raise ExportError(
                f"{site}: no new labelled served case to export ({len(labelled)} labelled, {len(labelled) - len(fresh)} "
                f"exported before, {without_image} without a kept image, {known} of patients the site already holds, "
                f"{len(copies)} the same file as another case)"
            )
        table = pd.DataFrame(records)
        table.drop(columns="inference_id").to_csv(staging / NIH_CSV, index=False)
        with ledger.transaction() as connection:  # marked in the same step the folder appears
            connection.execute(  # a copy is handled with its original: never offered again
                sa.insert(exported_cases),
                [
                    {"inference_id": i, "batch": folder.name, "exported_at": now}
                    for i in [*table["inference_id"], *copies]
                ],
            )
            staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportedBatch(folder, len(records), without_image, known, len(labelled) - len(fresh), len(copies))
