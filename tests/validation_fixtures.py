"""Fixtures for tests/test_validation.py: small copies of the real datasets, read by the real readers.

Kept out of conftest.py (edited by others); test_validation.py imports them. Each test gets its own
copy in tmp_path, so a test may corrupt files freely.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from pipeline.config import ValidationConfig
from pipeline.data.readers import NIH_CSV, read_dataset

TRAIN_PER_CLASS = 8  # from Kermany's train folder, split patient-wise into train and val
TEST_PER_CLASS = 4
NIH_PER_CLASS = 4


@pytest.fixture()
def copies_root(tmp_path: Path) -> Path:
    """Folder holding the copied site folders; messages name files relative to it."""
    root = tmp_path.resolve() / "data"
    root.mkdir()
    return root


@pytest.fixture()
def validation_cfg(tmp_path: Path) -> ValidationConfig:
    return ValidationConfig(min_images=8, report_dir=tmp_path / "report")


@pytest.fixture()
def kermany_manifest(data_dir: Path, copies_root: Path) -> pd.DataFrame:
    """24 real Kermany images: train/val from its train folder (patient-disjoint), test from its test folder."""
    for folder, count in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        for label in ("NORMAL", "PNEUMONIA"):
            target = copies_root / "kermany-pediatric" / folder / label
            target.mkdir(parents=True)
            for file in sorted((data_dir / "kermany-pediatric" / folder / label).iterdir())[:count]:
                shutil.copy(file, target / file.name)
    manifest = read_dataset(copies_root / "kermany-pediatric")
    # The reader leaves the train folder unsplit; send the first 2 patients of each class to val.
    unsplit = manifest["split"] == ""
    for label in (0, 1):
        patients = sorted(manifest.loc[unsplit & (manifest["label"] == label), "patient_id"].unique())
        rows = unsplit & (manifest["label"] == label)
        to_val = manifest.loc[rows, "patient_id"].isin(patients[:2])
        manifest.loc[rows, "split"] = to_val.map({True: "val", False: "train"})
    return manifest


@pytest.fixture()
def nih_manifest(data_dir: Path, copies_root: Path) -> pd.DataFrame:
    """8 real NIH images whose CSV rows have age, sex and view, in NIH's own layout (not yet split)."""
    table = pd.read_csv(data_dir / "nih-cxr8" / NIH_CSV, dtype=str, keep_default_na=False)
    complete = table[(table["Patient Age"] != "") & (table["Patient Gender"] != "") & (table["View Position"] != "")]
    normal = complete[complete["Finding Labels"] == "No Finding"].head(NIH_PER_CLASS)
    pneumonia = complete[complete["Finding Labels"].str.contains("Pneumonia")].head(NIH_PER_CLASS)
    chosen = pd.concat([normal, pneumonia])
    target = copies_root / "nih-cxr8"
    (target / "images").mkdir(parents=True)
    for name in chosen["Image Index"]:
        shutil.copy(data_dir / "nih-cxr8" / "images" / name, target / "images" / name)
    chosen.to_csv(target / NIH_CSV, index=False)
    return read_dataset(target)
