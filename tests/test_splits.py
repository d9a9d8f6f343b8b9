"""Patient-disjoint, label-stratified splits on the real NIH and Kermany manifests."""

from __future__ import annotations

import pytest

from pipeline.data.readers import read_dataset
from pipeline.data.splits import assign_splits, subsample
from pipeline.errors import DatasetError
from tests.conftest import copy_nih_subset


def _patients_per_split(manifest):
    return manifest.groupby("patient_id")["split"].nunique()


def test_nih_split_is_patient_disjoint_stratified_and_seeded(data_dir):
    manifest = read_dataset(data_dir / "nih-cxr8")
    split = assign_splits(manifest, val_fraction=0.15, test_fraction=0.2, seed=7)
    assert (_patients_per_split(split) == 1).all()
    shares = split.groupby("split").size() / len(split)
    assert abs(shares["test"] - 0.2) < 0.05 and abs(shares["val"] - 0.15) < 0.05
    pneumonia_share = split.groupby("split")["label"].mean()
    assert (abs(pneumonia_share - manifest["label"].mean()) < 0.08).all()
    again = assign_splits(manifest, 0.15, 0.2, seed=7)
    assert (again["split"] == split["split"]).all()
    other = assign_splits(manifest, 0.15, 0.2, seed=8)
    assert (other["split"] != split["split"]).any()


def test_kermany_keeps_official_test_and_carves_val_by_patient(data_dir):
    manifest = read_dataset(data_dir / "kermany-pediatric")
    split = assign_splits(manifest, 0.15, 0.2, seed=42)
    official_test = manifest["split"] == "test"
    assert (split.loc[official_test, "split"] == "test").all()
    assert (split.loc[~official_test, "split"] != "test").all()
    assert set(split["split"]) == {"train", "val", "test"}
    assert (_patients_per_split(split) == 1).all()


def test_subsample_caps_each_split_and_class(data_dir):
    split = assign_splits(read_dataset(data_dir / "nih-cxr8"), 0.15, 0.2, seed=1)
    small = subsample(split, 10, seed=1)
    assert small.groupby(["split", "label"]).size().max() == 10
    assert len(small) == 60


def test_too_few_patients_for_a_split_says_how_many_there_are_and_are_needed(data_dir, tmp_path):
    """3 normal and 3 pneumonia NIH rows (2 pneumonia patients): a 20% test split needs 5 patients per class."""
    manifest = read_dataset(copy_nih_subset(data_dir, tmp_path / "nih-cxr8", per_class=3))
    with pytest.raises(DatasetError) as error:
        assign_splits(manifest, 0.15, 0.2, seed=42)
    message = str(error.value)
    assert message.startswith("nih-cxr8: too few patients for the test split (data.test_fraction)")
    assert "at least 5 patients per class" in message
    assert "normal 3 patients (3 images); pneumonia 2 patients (3 images)" in message
