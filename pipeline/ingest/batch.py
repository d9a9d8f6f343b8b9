"""A hospital's drop folder → a de-identified copy in NIH's layout (the staged batch).

The drop holds ``Data_Entry_2017.csv`` (NIH's format) and ``images/`` with the files its
``Image Index`` column names: PNG/JPEG as exported, or DICOM. Every later stage (the
validation suite, reports, the dataset, DVC, quarantine) reads only the staged copy, so PHI
in a DICOM header goes no further than this module:

- a DICOM file becomes a PNG of its display-ready pixels (what every stage decodes it to
  anyway), named after the patient's keyed pseudonym, and its CSV row gets the pseudonym as
  ``Patient ID``. PNG has no header: a de-identified DICOM would still carry whatever
  private or free-text attribute the profile misses.
- the CSV keeps NIH's columns only (extra columns may hold anything) and ages are capped at
  90 (HIPAA Safe Harbor).

- a PNG/JPEG file is copied without its metadata (text chunks, EXIF, XMP, comments:
  pipeline.data.scrub), its pixels byte for byte.

File names and the pixels themselves (burned-in annotations) are taken as exported: the
export must not put PHI in them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pydicom
from PIL import Image

from pipeline.config import IngestConfig
from pipeline.data.dicom import deidentify, dicom_pixels, keyed_pseudonym, parse_age
from pipeline.data.images import DICOM_SUFFIXES, ImageDecodeError
from pipeline.data.readers import NIH_COLUMNS, NIH_CSV, nih_label, nih_label_problem
from pipeline.data.salt import salt_variables
from pipeline.data.scrub import ImageFormatError, scrub_image
from pipeline.errors import ConfigError
from pipeline.validation.report import Failure

# NIH's columns as pandas reads its header (the two size columns hold a comma in their names).
NIH_ALL_COLUMNS = (
    "Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
    "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]",
)  # fmt: skip
RASTER_SUFFIXES = {".png", ".jpg", ".jpeg"}
MAX_AGE = 90
MAX_NAMED = 10  # lines named in one message
_SALT_CHECK = "crosssim-salt-check"


@dataclass
class StagedBatch:
    """The de-identified copy of one drop and what reading it found."""

    site: str
    source: Path
    fingerprint: str  # sha256 over every file of the drop (names and bytes): the same drop, the same batch
    folder: Path  # NIH layout: Data_Entry_2017.csv + images/, only rows that can be ingested
    problems: list[Failure] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    salt_id: str | None = None  # a keyed digest naming the salt (not revealing it), to spot a changed salt

    @property
    def batch_id(self) -> str:
        return self.fingerprint[:12]


def batch_fingerprint(folder: Path) -> str:
    """Names and bytes of every file of the drop: the same drop sent twice has the same fingerprint."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def stage_batch(
    folder: Path, site: str, fingerprint: str, destination: Path, settings: IngestConfig, salt: str | None
) -> StagedBatch:
    """Read the drop in ``folder`` and write its de-identified copy to ``destination``.

    Problems with the drop (schema, rows, unreadable DICOM) are returned, not raised, so the
    batch can be quarantined with a report; only a missing salt raises (ConfigError), before
    anything is written, because that is for the operator to fix, not the hospital.
    """
    folder = Path(folder)
    has_dicom = any(p.suffix.lower() in DICOM_SUFFIXES for p in folder.rglob("*") if p.is_file())
    if has_dicom and salt is None:
        first, fallback = salt_variables(site, settings)
        raise ConfigError(
            f"{folder} holds DICOM files but no de-identification salt is set: export ${first} (or ${fallback}) "
            "with the site's secret. Nothing was ingested."
        )
    staged = StagedBatch(site, folder, fingerprint, destination)
    if has_dicom:
        staged.salt_id = keyed_pseudonym(_SALT_CHECK, salt)
    table = _read_csv(folder / NIH_CSV, staged)
    if table is None:
        return staged
    (destination / "images").mkdir(parents=True)
    rows = _stage_rows(table, folder, destination / "images", salt, staged)
    pd.DataFrame(rows, columns=list(NIH_ALL_COLUMNS)).to_csv(destination / NIH_CSV, index=False)
    listed = {folder / "images" / str(name).strip() for name in table["Image Index"]}
    unlisted = sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.name != NIH_CSV and p not in listed
    )
    if unlisted:
        _add(staged, "unlisted_file", "warning", f"{len(unlisted)} file(s) not in {NIH_CSV}, not ingested", unlisted)
    staged.counts.update(rows=len(table), staged_rows=len(rows), unlisted_files=len(unlisted))
    return staged


def _add(staged: StagedBatch, rule: str, severity: str, what: str, items: list[str]) -> None:
    shown = ", ".join(items[:MAX_NAMED]) + (", ..." if len(items) > MAX_NAMED else "")
    staged.problems.append(Failure(rule, severity, f"{what}: {shown}" if items else what))


def _read_csv(csv_path: Path, staged: StagedBatch) -> pd.DataFrame | None:
    if not csv_path.is_file():
        _add(
            staged, "csv_schema", "blocking", f"no {NIH_CSV} in the batch folder (NIH format: {NIH_CSV} + images/)", []
        )
        return None
    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        _add(staged, "csv_schema", "blocking", f"{NIH_CSV} is not a readable CSV ({exc})", [])
        return None
    missing = [c for c in NIH_COLUMNS if c not in table.columns]
    if missing:
        _add(
            staged,
            "csv_schema",
            "blocking",
            f"{NIH_CSV}: missing column(s) {', '.join(missing)}; NIH format needs {', '.join(NIH_COLUMNS)}",
            [],
        )
        return None
    extra = [c for c in table.columns if c not in NIH_ALL_COLUMNS]
    if extra:
        _add(staged, "csv_extra_columns", "warning", f"{NIH_CSV}: column(s) not in NIH's format, not ingested", extra)
    return table


def _stage_rows(
    table: pd.DataFrame, folder: Path, images: Path, salt: str | None, staged: StagedBatch
) -> list[dict[str, str]]:
    """Check each row and copy without metadata (PNG/JPEG) or de-identify (DICOM) its image; returns the rows to ingest."""
    found: dict[str, list[str]] = {}
    seen: dict[str, int] = {}
    rows, dicom, scrubbed = [], 0, []
    for line, record in enumerate(table.to_dict("records"), start=2):
        name, patient = str(record["Image Index"]).strip(), str(record["Patient ID"]).strip()
        where = f"line {line}"
        problem = _row_problem(record, name, patient, folder, seen)
        seen.setdefault(name, line)
        if problem is not None:
            found.setdefault(problem[0], []).append(f"{where} ({problem[1]})")
            continue
        if nih_label(record["Finding Labels"]) is None:
            found.setdefault("out_of_task", []).append(where)
            continue
        out = {column: str(record.get(column, "")).strip() for column in NIH_ALL_COLUMNS}
        source = folder / "images" / name
        if source.suffix.lower() in DICOM_SUFFIXES:
            problem = _stage_dicom(source, out, salt, images)
            if problem is not None:
                found.setdefault(problem[0], []).append(f"{where} ({problem[1]})")
                continue
            dicom += 1
        else:
            try:
                removed = scrub_image(source, images / name)
            except ImageFormatError as exc:
                found.setdefault("corrupt_file", []).append(f"{where} (images/{name}: {exc})")
                continue
            if removed:
                scrubbed.append(f"{name} ({', '.join(sorted(removed))})")
        out["Patient Age"] = _capped_age(out["Patient Age"])
        rows.append(out)
    for rule, what, severity in _ROW_RULES:
        if rule in found:
            _add(staged, rule, severity, what, found[rule])
    if scrubbed:
        _add(staged, "metadata_removed", "warning", "image metadata removed before staging", scrubbed)
    staged.counts.update(
        dicom_images=dicom, images_metadata_removed=len(scrubbed), out_of_task_rows=len(found.get("out_of_task", []))
    )
    return rows


_ROW_RULES = (
    ("csv_values", "rows with an empty, repeated or unsafe value", "blocking"),
    ("unknown_label", "rows whose 'Finding Labels' is not NIH's vocabulary", "blocking"),
    ("missing_file", "rows whose image is not in images/", "blocking"),
    ("file_type", "rows whose image is not PNG, JPEG or DICOM", "blocking"),
    ("corrupt_file", "rows whose image file cannot be read", "blocking"),
    ("dicom_patient", "rows whose DICOM header does not give their patient", "blocking"),
    ("out_of_task", "rows neither 'No Finding' nor with 'Pneumonia', not ingested", "warning"),
)


def _row_problem(
    record: dict[str, str], name: str, patient: str, folder: Path, seen: dict[str, int]
) -> tuple[str, str] | None:
    """(rule, detail) of the first rule a CSV row breaks, or None."""
    if not name or not patient:
        return "csv_values", "empty 'Image Index'" if not name else f"{name}: empty 'Patient ID'"
    if name in seen:
        return "csv_values", f"{name} also on line {seen[name]}"
    if Path(name).name != name or name.startswith("."):
        return "csv_values", f"{name!r} is not a plain file name"
    label_problem = nih_label_problem(record["Finding Labels"])
    if label_problem is not None:
        return "unknown_label", f"{name}: {label_problem}"
    suffix = Path(name).suffix.lower()
    if suffix not in RASTER_SUFFIXES | DICOM_SUFFIXES:
        return "file_type", name
    if not (folder / "images" / name).is_file():
        return "missing_file", f"images/{name}"
    return None


def _stage_dicom(source: Path, out: dict[str, str], salt: str, images: Path) -> tuple[str, str] | None:
    """Write the de-identified PNG of a DICOM row and make its CSV row PHI-free; (rule, detail) if it cannot."""
    try:
        header = deidentify(pydicom.dcmread(source, stop_before_pixels=True), salt)
        pixels = dicom_pixels(source)
    except ImageDecodeError as exc:
        return "corrupt_file", f"images/{source.name}: {str(exc).split(': ', 1)[-1]}"
    except Exception as exc:  # pydicom raises many types on corrupt files; their text may quote header values
        return "corrupt_file", f"images/{source.name}: not a readable DICOM file ({type(exc).__name__})"
    patient = str(header.PatientID)
    if not patient:
        return "dicom_patient", f"images/{source.name}: no PatientID in the header"
    if keyed_pseudonym(out["Patient ID"], salt) != patient:
        return "dicom_patient", f"images/{source.name}: 'Patient ID' differs from the header's (values not shown)"
    name = f"dicom-{patient}-{keyed_pseudonym(out['Image Index'], salt)[:8]}.png"
    Image.fromarray(pixels).save(images / name, format="PNG")
    age = parse_age(header.get("PatientAge"))
    header_values = {
        "Patient Age": "" if age is None else str(int(age)),
        "Patient Gender": str(header.get("PatientSex", "") or "").strip(),
        "View Position": str(header.get("ViewPosition", "") or "").strip(),
        "OriginalImage[Width": str(pixels.shape[1]),
        "Height]": str(pixels.shape[0]),
    }
    for column, value in header_values.items():
        out[column] = out[column] or value
    out.update({"Image Index": name, "Patient ID": patient})
    return None


def _capped_age(age: str) -> str:
    try:
        return str(MAX_AGE) if float(age) >= MAX_AGE else age
    except ValueError:
        return age
