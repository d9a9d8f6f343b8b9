"""Readers that turn each real dataset layout into one manifest (see manifest.py).

Each reader also reports what it left out (see exclusions.py): NIH rows out of the task or with
labels outside NIH's vocabulary, files and folders an ImageFolder layout does not know, files a
CSV or archive does not list, float arrays with NaN pixels, and patients in two official splits.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.data.exclusions import ReadReport, patients_in_official_splits, unread_files
from pipeline.data.manifest import make_manifest
from pipeline.errors import DatasetError

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".dcm"}
CLASS_FOLDERS = {"NORMAL": 0, "PNEUMONIA": 1}
NIH_CSV = "Data_Entry_2017.csv"
NIH_COLUMNS = ("Image Index", "Finding Labels", "Patient ID")
NO_FINDING = "No Finding"
NIH_FINDINGS = frozenset(
    {
        "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis", "Hernia",
        "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax", NO_FINDING,
    }
)  # fmt: skip
MEDMNIST_SPLITS = ("train", "val", "test")

# Kermany file names carry the patient: IM-<p>-<n>, NORMAL2-IM-<p>-<n> (its own numbering) and
# person<p>_{bacteria,virus}_<n> (a third numbering), so each pattern keeps its prefix in the id.
# The flag says whether the official test folder numbers that pattern's patients afresh: its
# "person" numbers recur in train (170 of them) but never with the same kind of pneumonia,
# although half of train's patients have both kinds, so they are other children; its IM numbers
# never recur in train, so they are one numbering, and a recurring one would be a leak.
_KERMANY_PATIENT = (
    (re.compile(r"^(NORMAL2-IM-\d+)-"), False),
    (re.compile(r"^(IM-\d+)-"), False),
    (re.compile(r"^(person\d+)_"), True),
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
    """The manifest of ``dataset_dir``; a DatasetError when reading found a blocking problem.

    ``read_dataset_with_report`` returns what was left out instead of refusing.
    """
    manifest, report = read_dataset_with_report(dataset_dir, site=site, dicom_salt=dicom_salt)
    report.raise_if_blocking()
    return manifest


def read_dataset_with_report(
    dataset_dir: Path, *, site: str | None = None, dicom_salt: str | None = None
) -> tuple[pd.DataFrame, ReadReport]:
    """Detect the layout of ``dataset_dir``; its manifest (site: ``site``, else the folder name) and what was left out.

    DICOM is pseudonymised with ``dicom_salt``, the site's secret; a DICOM folder without one is
    refused (a public salt would let anyone recompute the pseudonyms from patient IDs).
    """
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise DatasetError(f"dataset folder {dataset_dir} does not exist.\n{LAYOUTS}")
    site = site or dataset_dir.name
    report = ReadReport(dataset_dir)
    manifest = _read_layout(dataset_dir, site, dicom_salt, report)
    report.add(
        "patient_in_official_splits",
        "blocking",
        "patient(s) with images in more than one official split (leakage: fix the export)",
        patients_in_official_splits(manifest),
    )
    return manifest, report


def _read_layout(dataset_dir: Path, site: str, dicom_salt: str | None, report: ReadReport) -> pd.DataFrame:
    if (dataset_dir / NIH_CSV).is_file():
        return read_nih(dataset_dir, site, report)
    npz_files = sorted(dataset_dir.glob("*.npz"))
    if npz_files:
        return read_medmnist(npz_files[0], site, report)
    if any((dataset_dir / split).is_dir() for split in ("train", "test")):
        return read_imagefolder(dataset_dir, site, report)
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
        manifest = read_dicom_folder(dataset_dir, site, labels, dicom_salt)
        read = {Path(path) for path in manifest["path"]} | {labels_csv.resolve()}  # manifest paths are resolved
        unlisted = unread_files(dataset_dir.resolve(), read)
        report.add("unlisted_file", "warning", "file(s) neither DICOM nor labels.csv, not read", unlisted)
        return manifest
    raise DatasetError(f"{dataset_dir}: no known dataset layout found.\n{LAYOUTS}")


def kermany_patient(file_name: str) -> str:
    return _patient_numbering(file_name)[0]


def _patient_numbering(file_name: str) -> tuple[str, bool]:
    """The patient a file name gives, and whether an official test folder numbers such patients afresh."""
    stem = Path(file_name).stem
    for pattern, test_numbers_afresh in _KERMANY_PATIENT:
        match = pattern.match(stem)
        if match:
            return match.group(1), test_numbers_afresh
    return stem, True  # unknown naming: each image is its own patient (no leakage claim possible)


def _folder_patient_id(site: str, split: str, file_name: str) -> str:
    # A test folder that numbers its patients afresh is its own patient namespace, kept as published.
    patient, test_numbers_afresh = _patient_numbering(file_name)
    namespace = f"{site}/test" if split == "test" and test_numbers_afresh else site
    return f"{namespace}/{patient}"


def read_imagefolder(dataset_dir: Path, site: str, report: ReadReport) -> pd.DataFrame:
    rows, accounted, other_splits, other_classes = [], set(), [], []
    for split_dir in sorted(p for p in dataset_dir.iterdir() if p.is_dir()):
        split = split_dir.name.lower()
        if split not in MEDMNIST_SPLITS:
            other_splits.append(_folder_ref(split_dir, dataset_dir))
            accounted |= set(split_dir.rglob("*"))  # reported as a folder, not file by file
            continue
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            label = CLASS_FOLDERS.get(class_dir.name.upper())
            if label is None:
                other_classes.append(_folder_ref(class_dir, dataset_dir))
                accounted |= set(class_dir.rglob("*"))
                continue
            for file in sorted(class_dir.iterdir()):
                if not file.is_file() or file.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                accounted.add(file)
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
    report.add(
        "unknown_class_folder",
        "blocking",
        f"class folder(s) other than {', '.join(CLASS_FOLDERS)}, not read (rename or remove them)",
        other_classes,
    )
    report.add(
        "unknown_split_folder",
        "warning",
        f"folder(s) other than the split folders {', '.join(MEDMNIST_SPLITS)}, not read",
        other_splits,
    )
    suffixes = "/".join(sorted(IMAGE_SUFFIXES))
    report.add(
        "unlisted_file",
        "warning",
        f"file(s) not read (only {suffixes} files in a class folder are images)",
        unread_files(dataset_dir, accounted),
    )
    if not rows:
        report.raise_if_blocking()
        raise DatasetError(f"{dataset_dir}: no images found.\n{LAYOUTS}")
    return make_manifest(rows)


def _folder_ref(folder: Path, dataset_dir: Path) -> str:
    files = sum(1 for p in folder.rglob("*") if p.is_file())
    return f"{folder.relative_to(dataset_dir).as_posix()}/ ({files} files)"


def nih_label(finding_labels: str) -> int | None:
    """Pneumonia when any finding is 'Pneumonia'; normal only for 'No Finding'; else not in this task."""
    findings = {f.strip() for f in str(finding_labels).split("|")}
    if "Pneumonia" in findings:
        return 1
    if findings == {NO_FINDING}:
        return 0
    return None


def nih_label_problem(finding_labels: str) -> str | None:
    """Why a 'Finding Labels' value is not NIH's vocabulary (naming the nearest NIH label), or None when it is."""
    findings = [f.strip() for f in str(finding_labels).split("|")]
    unknown = [f for f in findings if f not in NIH_FINDINGS]
    if unknown:
        return "; ".join(f"{f!r} is not an NIH label (nearest: {_nearest_nih_label(f)!r})" for f in unknown)
    if NO_FINDING in findings and len(findings) > 1:
        return f"{NO_FINDING!r} together with findings"
    return None


def _nearest_nih_label(finding: str) -> str:
    by_lower = {label.lower(): label for label in sorted(NIH_FINDINGS)}
    [nearest] = difflib.get_close_matches(finding.lower(), list(by_lower), n=1, cutoff=0.0)
    return by_lower[nearest]


def read_nih(dataset_dir: Path, site: str, report: ReadReport) -> pd.DataFrame:
    csv_path = dataset_dir / NIH_CSV
    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{csv_path}: not a readable CSV ({exc})") from exc
    missing = [c for c in NIH_COLUMNS if c not in table.columns]
    if missing:
        raise DatasetError(f"{csv_path}: missing column(s) {', '.join(missing)}; NIH format needs {', '.join(NIH_COLUMNS)}")
    images_dir = dataset_dir / "images"
    rows, listed, unknown, out_of_task = [], {csv_path}, [], []
    for line_no, record in enumerate(table.to_dict("records"), start=2):
        image_file = str(record["Image Index"]).strip()
        patient = str(record["Patient ID"]).strip()
        listed.add(images_dir / image_file)
        where = f"line {line_no} ({image_file or 'no Image Index'})"
        problem = nih_label_problem(record["Finding Labels"])
        if problem is not None:
            unknown.append(f"{where}: {problem}")
            continue
        label = nih_label(record["Finding Labels"])
        if label is None:
            out_of_task.append(f"{where}: {record['Finding Labels']!r}")
            continue
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
    report.add(
        "unknown_label", "blocking", f"{NIH_CSV} row(s) with a label outside NIH's vocabulary, left out", unknown
    )
    report.add(
        "out_of_task",
        "warning",
        f"{NIH_CSV} row(s) neither {NO_FINDING!r} nor with 'Pneumonia' (not in this task), left out",
        out_of_task,
    )
    unlisted = unread_files(dataset_dir, listed)
    report.add("unlisted_file", "warning", f"file(s) not named in {NIH_CSV}, not read", unlisted)
    if not rows:
        report.raise_if_blocking()
        raise DatasetError(f"{csv_path}: no row is labelled {NO_FINDING!r} or contains 'Pneumonia'")
    return make_manifest(rows)


def read_medmnist(npz_path: Path, site: str, report: ReadReport) -> pd.DataFrame:
    try:
        with np.load(npz_path) as archive:
            keys = set(archive.files)
            labels = {s: archive[f"{s}_labels"].reshape(-1) for s in MEDMNIST_SPLITS if f"{s}_labels" in keys}
            # Integer pixels cannot be NaN; a float array's NaN/inf would reach training as they are.
            nonfinite = [
                f"{key}[{frame}]"
                for key in (f"{s}_images" for s in MEDMNIST_SPLITS)
                if key in keys
                for frame in _nonfinite_frames(archive[key])
            ]
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{npz_path}: not a readable .npz archive ({exc})") from exc
    absent = [f"{s}_{k}" for s in MEDMNIST_SPLITS for k in ("images", "labels") if f"{s}_{k}" not in keys]
    if absent:
        raise DatasetError(f"{npz_path}: missing array(s) {', '.join(absent)}.\n{LAYOUTS}")
    report.add("nonfinite_pixels", "blocking", f"image(s) of {npz_path.name} with NaN or infinite pixels", nonfinite)
    unlisted = unread_files(npz_path.parent, {npz_path})
    report.add("unlisted_file", "warning", f"file(s) besides {npz_path.name}, not read", unlisted)
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


def _nonfinite_frames(images: np.ndarray) -> list[int]:
    if not np.issubdtype(images.dtype, np.floating):
        return []
    finite = np.isfinite(images).reshape(len(images), -1).all(axis=1)
    return np.flatnonzero(~finite).tolist()
