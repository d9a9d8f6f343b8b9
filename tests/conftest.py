"""Shared fixtures: the real datasets, found through $CROSSSIM_DATA_DIR (as in CI)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# One intra-op thread per process (set before torch is imported, inherited by the runs the tests start): the suite
# keeps both cores busy with its two workers and their subprocesses, and there more threads per process only add
# synchronisation on these small models. Export OMP_NUM_THREADS to choose otherwise.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    configured = os.environ.get("CROSSSIM_DATA_DIR")
    path = Path(configured) if configured else REPO.parent / "shared" / "data"
    if not (path / "kermany-pediatric").is_dir():
        if configured:
            pytest.fail(f"CROSSSIM_DATA_DIR={configured} does not hold the real datasets (see README, 'Data')")
        pytest.skip("real datasets not found: set CROSSSIM_DATA_DIR (see README, 'Data')")
    return path.resolve()


def copy_kermany_subset(data_dir: Path, destination: Path, per_class: int = 6) -> Path:
    """A small ImageFolder copy of real Kermany images: train and test, both classes."""
    for split in ("train", "test"):
        for label in ("NORMAL", "PNEUMONIA"):
            target = destination / split / label
            target.mkdir(parents=True)
            for file in sorted((data_dir / "kermany-pediatric" / split / label).iterdir())[:per_class]:
                shutil.copy(file, target / file.name)
    return destination


@pytest.fixture()
def kermany_subset(data_dir: Path, tmp_path: Path) -> Path:
    return copy_kermany_subset(data_dir, tmp_path / "kermany-pediatric")


def copy_nih_subset(data_dir: Path, destination: Path, per_class: int = 20) -> Path:
    """NIH's layout (CSV + images/) with the first ``per_class`` normal and pneumonia rows."""
    import pandas as pd

    table = pd.read_csv(data_dir / "nih-cxr8" / "Data_Entry_2017.csv", dtype=str, keep_default_na=False)
    normal = table[table["Finding Labels"] == "No Finding"].head(per_class)
    pneumonia = table[table["Finding Labels"].str.contains("Pneumonia")].head(per_class)
    chosen = pd.concat([normal, pneumonia])
    (destination / "images").mkdir(parents=True)
    for name in chosen["Image Index"]:
        shutil.copy(data_dir / "nih-cxr8" / "images" / name, destination / "images" / name)
    chosen.to_csv(destination / "Data_Entry_2017.csv", index=False)
    return destination
