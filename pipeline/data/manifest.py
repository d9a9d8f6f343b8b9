"""The manifest: one row per image, the single format every reader produces.

Columns (pandas dtypes):

- ``image_id`` (str): unique within a site, e.g. ``IM-0115-0001`` or ``00001281_000``.
- ``path`` (str): absolute path of the file holding the pixels.
- ``frame`` (Int64): index inside an array file (MedMNIST ``.npz``), <NA> for one-image files.
- ``array_key`` (str | None): array name inside an ``.npz`` (e.g. ``train_images``), else None.
- ``label`` (Int64): 0 normal, 1 pneumonia; <NA> when unknown (unlabeled target images).
- ``patient_id`` (str): site-prefixed (``kermany-pediatric/IM-0115``) so ids never collide across sites.
- ``site`` (str): dataset name, e.g. ``kermany-pediatric``.
- ``split`` (str): ``train``/``val``/``test``, or empty before splitting.
- ``view`` (str | None), ``age`` (float | NaN), ``sex`` (str | None): when known.
"""

from __future__ import annotations

import pandas as pd

from pipeline.errors import DatasetError

MANIFEST_COLUMNS: tuple[str, ...] = (
    "image_id",
    "path",
    "frame",
    "array_key",
    "label",
    "patient_id",
    "site",
    "split",
    "view",
    "age",
    "sex",
)
REQUIRED_COLUMNS: tuple[str, ...] = ("image_id", "path", "label", "patient_id", "site", "split")
SPLITS: tuple[str, ...] = ("train", "val", "test")
LABEL_NAMES: dict[int, str] = {0: "normal", 1: "pneumonia"}
# Values a real record can hold; validation warns about others and subgroup metrics count them as unknown.
AGE_RANGE: tuple[float, float] = (0.0, 120.0)  # years
SEXES: tuple[str, ...] = ("M", "F", "O")  # DICOM PatientSex's defined terms (O: other)
VIEWS: tuple[str, ...] = ("PA", "AP", "LL", "RL", "LLD", "RLD", "LLO", "RLO")  # DICOM ViewPosition's terms


def make_manifest(rows: list[dict]) -> pd.DataFrame:
    """Build a manifest with every column present and canonical dtypes."""
    frame = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))
    return normalise(frame)


def normalise(frame: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise DatasetError(f"manifest is missing required column(s): {', '.join(missing)}")
    frame = frame.copy()
    for column in MANIFEST_COLUMNS:
        if column not in frame.columns:
            frame[column] = None
    frame["frame"] = pd.array(frame["frame"], dtype="Int64")
    frame["label"] = pd.array(frame["label"], dtype="Int64")
    frame["age"] = pd.to_numeric(frame["age"], errors="coerce").astype("float64")
    for column in ("image_id", "path", "patient_id", "site", "split"):
        frame[column] = frame[column].fillna("").astype(str)
    for column in ("array_key", "view", "sex"):
        frame[column] = frame[column].astype(object).where(frame[column].notna(), None)
    return frame[list(MANIFEST_COLUMNS)].reset_index(drop=True)


def implausible(frame: pd.DataFrame, column: str) -> pd.Series:
    """True where ``column`` (age, sex or view) holds a value no real record has; a missing value is not implausible."""
    values = frame[column]
    if column == "age":
        age = pd.to_numeric(values, errors="coerce")
        low, high = AGE_RANGE
        return values.notna() & ~age.between(low, high)
    allowed = {"sex": SEXES, "view": VIEWS}[column]
    return values.notna() & ~values.isin(allowed)


def save_manifest(frame: pd.DataFrame, path) -> None:
    frame.to_csv(path, index=False)


def load_manifest(path) -> pd.DataFrame:
    frame = pd.read_csv(path, dtype={"image_id": str, "patient_id": str, "split": str, "site": str})
    return normalise(frame)
