"""DICOM input: display-ready pixels, de-identification, and a PHI-free manifest of a folder.

De-identification follows the DICOM PS3.15 Annex E Basic Application Level Confidentiality
Profile with the Retain Patient Characteristics Option: age and sex are kept because they are
covariates for subgroup metrics; identities become keyed pseudonyms so that images of one
patient still land in one split.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi, apply_voi_lut, apply_windowing
from pydicom.uid import UID, generate_uid

from pipeline.data.images import DICOM_SUFFIXES, ImageDecodeError, to_grayscale
from pipeline.data.manifest import LABEL_NAMES, make_manifest
from pipeline.errors import ConfigError, DatasetError

PSEUDONYM_HEX_CHARS = 16  # 64 bits: collisions are negligible even across millions of patients
DEIDENTIFICATION_METHOD = "PS3.15 E.1 Basic Profile + Retain Patient Characteristics"

# Identifying attributes without analytic value here: removed (PS3.15 Table E.1-1 action X),
# at any depth, since sequences (e.g. a request item) repeat them.
_REMOVE = frozenset(
    {
        "PatientBirthDate",
        "PatientBirthTime",
        "PatientBirthName",
        "PatientMotherBirthName",
        "PatientAddress",
        "PatientTelephoneNumbers",
        "OtherPatientIDs",
        "OtherPatientIDsSequence",
        "OtherPatientNames",
        "MedicalRecordLocator",
        "PatientComments",
        "AdditionalPatientHistory",
        "InstitutionName",
        "InstitutionAddress",
        "InstitutionalDepartmentName",
        "ReferringPhysicianAddress",
        "ReferringPhysicianTelephoneNumbers",
        "StationName",
        "DeviceSerialNumber",
        "StudyDescription",
        "SeriesDescription",
        "ImageComments",
        "RequestAttributesSequence",
        "ReferencedPatientSequence",
    }
)
# Type-2 attributes a valid file must still carry: kept, but empty (action Z). All person names,
# dates and times are emptied the same way.
_EMPTY = frozenset({"AccessionNumber", "StudyID"})
_EMPTY_VRS = frozenset({"PN", "DA", "DT", "TM"})
# Curves (50xx) and overlays (60xx) can hold drawn annotations, i.e. burned-in text.
_GRAPHIC_GROUPS = {0x5000, 0x6000}
_AGE = re.compile(r"^(\d{1,3})([DWMY])$")
_YEARS_PER_UNIT = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}
_MAX_AGE_YEARS = 90  # HIPAA Safe Harbor: ages above 89 are one category


def dicom_pixels(path: str | Path) -> np.ndarray:
    """The image as displayed by a viewer: uint8 (H, W), bright = dense (bone).

    Applies the modality LUT/rescale, then the first VOI LUT or window (or the full range when
    neither is present), and inverts MONOCHROME1. Raises ImageDecodeError naming the file.
    """
    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:
        raise ImageDecodeError(f"{path}: cannot decode DICOM pixels ({type(exc).__name__}: {exc})") from exc
    return dataset_pixels(ds, path)


def dataset_pixels(ds: Dataset, where: str | Path) -> np.ndarray:
    """``dicom_pixels`` of a dataset already read (e.g. from an upload in memory); errors name ``where``."""
    try:
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise ImageDecodeError(f"{where}: multi-frame DICOM is not supported (a radiograph has one frame)")
        pixels = ds.pixel_array
        if int(ds.get("SamplesPerPixel", 1)) > 1:
            if pixels.dtype != np.uint8:
                raise ImageDecodeError(f"{where}: colour DICOM with {ds.BitsAllocated}-bit samples is not supported")
            return to_grayscale(pixels)  # pydicom already converted YBR to RGB
        values = apply_modality_lut(pixels, ds)
        if ds.get("VOILUTSequence") or "WindowCenter" in ds:
            values = apply_voi_lut(values, ds)
            low, high = _voi_output_range(ds)
        else:
            low, high = float(values.min()), float(values.max())
        scale = 255.0 / (high - low) if high > low else 0.0
        gray = np.clip((np.asarray(values, dtype=np.float64) - low) * scale, 0, 255).round().astype(np.uint8)
        if ds.get("PhotometricInterpretation", "") == "MONOCHROME1":
            gray = 255 - gray  # MONOCHROME1 stores dense tissue as low values
        return gray
    except ImageDecodeError:
        raise
    except Exception as exc:  # pydicom and its decoder plugins raise many types on corrupt/unsupported files
        raise ImageDecodeError(f"{where}: cannot decode DICOM pixels ({type(exc).__name__}: {exc})") from exc


def _voi_output_range(ds: Dataset) -> tuple[float, float]:
    """The fixed output range of the VOI transform, so a window maps onto 0..255 as a viewer shows it.

    Pushing extreme inputs through pydicom's own functions finds it without re-deriving pydicom's
    rules (they depend on rescale, sign and modality LUT depth).
    """
    if ds.get("VOILUTSequence"):
        entries, first, _ = ds.VOILUTSequence[0].LUTDescriptor
        lut = apply_voi(np.arange(first, first + (entries or 2**16)), ds)
        return float(lut.min()), float(lut.max())
    ends = apply_windowing(np.array([-np.inf, np.inf]), ds)
    return float(ends.min()), float(ends.max())


def deidentify(ds: Dataset, salt: str) -> Dataset:
    """A de-identified copy of ``ds``; the same (salt, patient) always gets the same pseudonym.

    PatientID/PatientName become a keyed hash of PatientID; other person names, all dates and
    times, accession and study IDs are emptied; addresses, institution, free text, other IDs,
    curves/overlays and private tags are removed; instance UIDs are replaced by UIDs derived from
    the keyed hash of the original, so references between files stay consistent.
    """
    if not salt:
        raise ConfigError("a non-empty de-identification salt is required (keep it secret, one per site)")
    ds = copy.deepcopy(ds)
    patient_id = str(ds.get("PatientID", "") or "").strip()
    pseudonym = keyed_pseudonym(patient_id, salt) if patient_id else ""
    ds.remove_private_tags()
    ds.walk(lambda dataset, elem: _scrub(dataset, elem, salt))
    ds.PatientID = pseudonym
    ds.PatientName = pseudonym
    if "PatientAge" in ds:
        ds.PatientAge = _capped_age(str(ds.PatientAge))
    file_meta = getattr(ds, "file_meta", None)
    if file_meta is not None and "MediaStorageSOPInstanceUID" in file_meta and "SOPInstanceUID" in ds:
        file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = DEIDENTIFICATION_METHOD
    ds.LongitudinalTemporalInformationModified = "REMOVED"
    return ds


def keyed_pseudonym(value: str, salt: str) -> str:
    """The pseudonym ``deidentify`` gives a PatientID ``value``: lets a caller match an ID it holds elsewhere."""
    return _keyed_hash(value, salt)[:PSEUDONYM_HEX_CHARS]


def _keyed_hash(value: str, salt: str) -> str:
    # HMAC, not a bare hash: MRNs are short numbers, so without the secret they could be brute-forced.
    return hmac.new(salt.encode(), value.encode(), hashlib.sha256).hexdigest()


def _scrub(dataset: Dataset, elem: DataElement, salt: str) -> None:
    if elem.tag.group & 0xFF00 in _GRAPHIC_GROUPS or elem.keyword in _REMOVE:
        del dataset[elem.tag]  # walk() checks membership before recursing, so deleting here is safe
    elif elem.VR in _EMPTY_VRS or elem.keyword in _EMPTY:
        elem.value = ""
    elif elem.VR == "UI" and elem.value:
        values = elem.value if elem.VM > 1 else [elem.value]
        new = [_replace_uid(str(uid), salt) for uid in values]
        elem.value = new if elem.VM > 1 else new[0]


def _replace_uid(uid: str, salt: str) -> str:
    if UID(uid).keyword:  # a registered UID (SOP class, transfer syntax...) identifies nobody
        return uid
    return str(generate_uid(entropy_srcs=[_keyed_hash(uid, salt)]))


def _capped_age(age: str) -> str:
    years = parse_age(age)
    return f"{_MAX_AGE_YEARS:03d}Y" if years is not None and years >= _MAX_AGE_YEARS else age


def parse_age(age: str | None) -> float | None:
    """DICOM Age String ('045Y', '006M', '010W', '003D') in years; None when absent or malformed."""
    match = _AGE.match(str(age or "").strip().upper())
    if not match:
        return None
    return int(match.group(1)) * _YEARS_PER_UNIT[match.group(2)]


def read_dicom_folder(folder: Path, site: str, labels: pd.DataFrame | None, salt: str) -> pd.DataFrame:
    """Manifest of every DICOM file under ``folder`` (recursively), with no PHI in it.

    ``labels`` has columns ``file`` (file name, or path relative to ``folder``) and ``label``
    (0/1 or normal/pneumonia); files it does not list get label <NA>.
    """
    folder = Path(folder)
    lookup = _label_lookup(labels)
    rows = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in DICOM_SUFFIXES):
        relative = path.relative_to(folder).as_posix()
        try:
            ds = deidentify(pydicom.dcmread(path, stop_before_pixels=True), salt)
        except (InvalidDicomError, OSError, ValueError, AttributeError, KeyError, TypeError) as exc:
            raise DatasetError(f"{path}: not a readable DICOM file ({exc})") from exc
        if not ds.PatientID:
            raise DatasetError(f"{path}: no PatientID, so patient-disjoint splits are impossible")
        rows.append(
            {
                "image_id": Path(relative).with_suffix("").as_posix(),
                "path": str(path.resolve()),
                "label": lookup.get(relative, lookup.get(path.name)),
                "patient_id": f"{site}/{ds.PatientID}",
                "site": site,
                "split": "",
                "view": str(ds.get("ViewPosition", "") or "").strip() or None,
                "age": parse_age(ds.get("PatientAge")),
                "sex": str(ds.get("PatientSex", "") or "").strip() or None,
            }
        )
    if not rows:
        raise DatasetError(f"{folder}: no DICOM files (*.dcm) found")
    return make_manifest(rows)


def _label_lookup(labels: pd.DataFrame | None) -> dict[str, int]:
    if labels is None:
        return {}
    missing = {"file", "label"} - set(labels.columns)
    if missing:
        raise DatasetError(f"DICOM labels table: missing column(s) {', '.join(sorted(missing))}; needs file,label")
    lookup: dict[str, int] = {}
    for file, raw in zip(labels["file"].astype(str).str.strip(), labels["label"], strict=True):
        if pd.isna(raw):
            continue
        code = _label_code(raw)
        if code is None:
            raise DatasetError(f"DICOM labels table, file {file!r}: label {raw!r} is not one of 0, 1, normal, pneumonia")
        if file in lookup:
            raise DatasetError(f"DICOM labels table: file {file!r} is listed twice")
        lookup[file] = code
    return lookup


def _label_code(raw: object) -> int | None:
    text = str(raw).strip().lower()
    by_name = {name: code for code, name in LABEL_NAMES.items()}
    if text in by_name:
        return by_name[text]
    try:
        number = float(text)  # CSV columns holding blanks are read as floats: "1.0"
    except ValueError:
        return None
    return int(number) if number in LABEL_NAMES else None
