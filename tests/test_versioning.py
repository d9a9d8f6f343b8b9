"""dataset_version must equal what a real `dvc add` records, on real images."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import DatasetError
from pipeline.versioning import dataset_version, dvc_tracked_version

NIH_IMAGES = Path(os.environ.get("CROSSSIM_DATA_DIR", "/work/shared/data")) / "nih-cxr8" / "images"
NIH_CSV = NIH_IMAGES.parent / "Data_Entry_2017.csv"
DVC = Path(sys.executable).parent / "dvc"


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """A small copy of real NIH images in a nested layout, plus the label CSV, in a tmp DVC repo."""
    sources = sorted(NIH_IMAGES.glob("*.png"))[:12] if NIH_IMAGES.is_dir() else []
    if len(sources) < 12 or not NIH_CSV.is_file():
        pytest.skip(f"real NIH images not found under {NIH_IMAGES} (set CROSSSIM_DATA_DIR)")
    repo = tmp_path / "repo"
    images = repo / "data" / "nih" / "images"
    (images / "followup").mkdir(parents=True)
    for index, source in enumerate(sources):
        shutil.copy(source, (images / "followup" if index % 3 == 0 else images) / source.name)
    shutil.copy(NIH_CSV, repo / "data" / "nih" / "labels.csv")
    return repo


def _dvc(repo: Path, *args: str) -> None:
    if not DVC.is_file():
        pytest.skip(f"dvc executable not found next to {sys.executable}")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(repo.parent / "dvc-site-cache")}
    subprocess.run([str(DVC), *args], cwd=repo, env=env, check=True, capture_output=True, text=True, timeout=300)


def test_equals_dvc_add_and_tracks_changes(dataset: Path) -> None:
    folder, csv = dataset / "data" / "nih" / "images", dataset / "data" / "nih" / "labels.csv"
    _dvc(dataset, "init", "--no-scm")
    _dvc(dataset, "add", str(folder.relative_to(dataset)), str(csv.relative_to(dataset)))

    folder_version = dvc_tracked_version(folder.with_name("images.dvc"))
    assert folder_version is not None and folder_version.endswith(".dir")
    assert dataset_version(folder) == folder_version
    assert dataset_version(csv) == dvc_tracked_version(csv.with_name("labels.csv.dvc"))
    assert csv.is_file()  # hashing a single file must leave it alone

    changed = next(folder.glob("followup/*.png"))
    changed.write_bytes(changed.read_bytes() + b"\0")
    new_version = dataset_version(folder)
    assert new_version != folder_version
    _dvc(dataset, "add", str(folder.relative_to(dataset)))
    assert dvc_tracked_version(folder.with_name("images.dvc")) == new_version


def test_empty_missing_and_malformed(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert dataset_version(tmp_path / "empty") == "d751713988987e9331980363e24189ce.dir"  # md5 of "[]"
    with pytest.raises(DatasetError, match="does not exist"):
        dataset_version(tmp_path / "absent")
    assert dvc_tracked_version(tmp_path / "absent.dvc") is None
    bad = tmp_path / "bad.dvc"
    bad.write_text("outs: [")
    with pytest.raises(DatasetError, match="bad.dvc"):
        dvc_tracked_version(bad)
    no_md5 = tmp_path / "pending.dvc"
    no_md5.write_text("outs:\n- path: data\n")
    assert dvc_tracked_version(no_md5) is None
