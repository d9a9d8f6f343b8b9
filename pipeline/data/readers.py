"""Readers that turn each real dataset layout into one manifest (see manifest.py)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.data.manifest import make_manifest
from pipeline.errors import DatasetError

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".dcm"}
CLASS_FOLDERS = {"NORMAL": 0, "PNEUMONIA": 1}
NIH_CSV = "Data_Entry_2017.csv"
NIH_COLUMNS = ("Image Index", "Finding Labels", "Patient ID")
MEDMNIST_SPLITS = ("train", "val", "test")

# Kermany file names carry the patient: IM-<p>-<n>, NORMAL2-IM-<p>-<n> (its own numbering) and
# person<p>_{bacteria,virus}_<n> (a third numbering), so each pattern keeps its prefix in the id.
_KERMANY_PATIENT = (
    re.compile(r"^(NORMAL2-IM-\d+)-"),
    re.compile(r"^(IM-\d+)-"),
    re.compile(r"^(person\d+)_"),
)

LAYOUTS = """Expected one of these layouts:
  ImageFolder (e.g. kermany-pediatric): <dir>/{train,test[,val]}/{NORMAL,PNEUMONIA}/*.jpeg|png
      public source: Kermany et al. 2018, Mendeley Data "Labeled OCT and Chest X-Ray Images" (CC BY 4.0)
  NIH ChestX-ray (e.g. nih-cxr8): <dir>/Data_Entry_2017.csv + <dir>/images/*.png
      public source: NIH Clinical Center ChestX-ray14 (nihcc.app.box.com/v/ChestXray-NIHCC)
  MedMNIST (e.g. pneumoniamnist): <dir>/pneumoniamnist.npz with train/val/test _images/_labels
      public source: MedMNIST v2 on Zenodo (CC BY 4.0)
  DICOM: <dir>/**/*.dcm [+ <dir>/labels.csv with columns file,label]"""


def read_dataset(dataset_dir: Path, *, site: str | None = None, dicom_salt: str | None = None) -> pd.DataFrame:
    """Detect the layout of ``dataset_dir`` and return its manifest (site: ``site``, else the folder name).

    DICOM is pseudonymised with ``dicom_salt``, the site's secret; a DICOM folder without one is
    refused (a public salt would let anyone recompute the pseudonyms from patient IDs).
    """
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise DatasetError(f"dataset folder {dataset_dir} does not exist.\n{LAYOUTS}")
    site = site or dataset_dir.name
    if (dataset_dir / NIH_CSV).is_file():
        return read_nih(dataset_dir, site)
    npz_files = sorted(dataset_dir.glob("*.npz"))
    if npz_files:
        return read_medmnist(npz_files[0], site)
    if any((dataset_dir / split).is_dir() for split in ("train", "test")):
        return read_imagefolder(dataset_dir, site)
    if any(dataset_dir.rglob("*.dcm")):
        from pipeline.data.dicom import read_dicom_folder

        if not dicom_salt:
            raise DatasetError(
                f"{dataset_dir}: DICOM files need the site's secret de-identification salt (the CLI reads "
                "$CROSSSIM_DICOM_SALT_<SITE>, else $CROSSSIM_DICOM_SALT; see ingest.salt_env), or ingest the "
                "export first: crosssim ingest SITE FOLDER"
            )
        labels_csv = dataset_dir / "labels.csv"
        labels = pd.read_csv(labels_csv) if labels_csv.is_file() else None
        return read_dicom_folder(dataset_dir, site, labels, dicom_salt)
    raise DatasetError(f"{dataset_dir}: no known dataset layout found.\n{LAYOUTS}")


def kermany_patient(file_name: str) -> str:
    stem = Path(file_name).stem
    for pattern in _KERMANY_PATIENT:
        match = pattern.match(stem)
        if match:
            return match.group(1)
    return stem  # unknown naming: each image is its own patient (no leakage claim possible)


def _folder_patient_id(site: str, split: str, file_name: str) -> str:
    # Kermany's official test folder numbers its patients afresh: its normal IM-numbers never
    # occur in train, and its "person100" has bacterial images where train's has viral ones.
    # So an official test split is its own patient namespace and is kept as published.
    namespace = f"{site}/test" if split == "test" else site
    return f"{namespace}/{kermany_patient(file_name)}"


def read_imagefolder(dataset_dir: Path, site: str) -> pd.DataFrame:
    rows = []
    for split_dir in sorted(p for p in dataset_dir.iterdir() if p.is_dir()):
        split = split_dir.name.lower()
        if split not in MEDMNIST_SPLITS:
            continue
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            label = CLASS_FOLDERS.get(class_dir.name.upper())
            if label is None:
                raise DatasetError(
                    f"{class_dir}: unknown class folder {class_dir.name!r}; allowed: {', '.join(CLASS_FOLDERS)}"
                )
            for file in sorted(class_dir.iterdir()):
                if file.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                rows.append(
                    {
                        "image_id": f"{split}/{class_dir.name}/{file.stem}",
                        "path": str(file.resolve()),
                        "label": label,
                        "patient_id": _folder_patient_id(site, split, file.name),
                        "site": site,
                        # official "val" folders of this dataset hold 16 images: we carve our own
                        "split": "test" if split == "test" else "",
                    }
                )
    if not rows:
        raise DatasetError(f"{dataset_dir}: no images found.\n{LAYOUTS}")
    return make_manifest(rows)


def nih_label(finding_labels: str) -> int | None:
    """Pneumonia when any finding is 'Pneumonia'; normal only for 'No Finding'; else not in this task."""
    findings = {f.strip() for f in str(finding_labels).split("|")}
    if "Pneumonia" in findings:
        return 1
    if findings == {"No Finding"}:
        return 0
    return None


def read_nih(dataset_dir: Path, site: str) -> pd.DataFrame:
    csv_path = dataset_dir / NIH_CSV
    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{csv_path}: not a readable CSV ({exc})") from exc
    missing = [c for c in NIH_COLUMNS if c not in table.columns]
    if missing:
        raise DatasetError(f"{csv_path}: missing column(s) {', '.join(missing)}; NIH format needs {', '.join(NIH_COLUMNS)}")
    images_dir = dataset_dir / "images"
    rows = []
    for line_no, record in enumerate(table.to_dict("records"), start=2):
        label = nih_label(record["Finding Labels"])
        if label is None:
            continue
        image_file = str(record["Image Index"]).strip()
        patient = str(record["Patient ID"]).strip()
        if not image_file or not patient:
            raise DatasetError(f"{csv_path} line {line_no}: empty 'Image Index' or 'Patient ID'")
        rows.append(
            {
                "image_id": Path(image_file).stem,
                "path": str((images_dir / image_file).resolve()),
                "label": label,
                "patient_id": f"{site}/{patient.lstrip('0') or '0'}",
                "site": site,
                "split": "",
                "view": record.get("View Position") or None,
                "age": record.get("Patient Age") or None,
                "sex": record.get("Patient Gender") or None,
            }
        )
    if not rows:
        raise DatasetError(f"{csv_path}: no row is labelled 'No Finding' or contains 'Pneumonia'")
    return make_manifest(rows)


def read_medmnist(npz_path: Path, site: str) -> pd.DataFrame:
    try:
        with np.load(npz_path) as archive:
            keys = set(archive.files)
            labels = {s: archive[f"{s}_labels"].reshape(-1) for s in MEDMNIST_SPLITS if f"{s}_labels" in keys}
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{npz_path}: not a readable .npz archive ({exc})") from exc
    absent = [f"{s}_{k}" for s in MEDMNIST_SPLITS for k in ("images", "labels") if f"{s}_{k}" not in keys]
    if absent:
        raise DatasetError(f"{npz_path}: missing array(s) {', '.join(absent)}.\n{LAYOUTS}")
    rows = []
    for split, split_labels in labels.items():
        for index, label in enumerate(split_labels):
            image_id = f"{split}-{index:05d}"
            rows.append(
                {
                    "image_id": image_id,
                    "path": str(npz_path.resolve()),
                    "frame": index,
                    "array_key": f"{split}_images",
                    "label": int(label),
                    # MedMNIST drops patient identity: each image stands alone (official splits are used)
                    "patient_id": f"{site}/{image_id}",
                    "site": site,
                    "split": split,
                }
            )
    return make_manifest(rows)
