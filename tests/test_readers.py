"""Each reader on the real files in $CROSSSIM_DATA_DIR."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest

from pipeline.data.manifest import MANIFEST_COLUMNS
from pipeline.data.readers import (
    kermany_patient,
    nih_label,
    nih_label_problem,
    read_dataset,
    read_dataset_with_report,
)
from pipeline.errors import DatasetError


def test_kermany_imagefolder_counts_and_patients(data_dir):
    manifest, report = read_dataset_with_report(data_dir / "kermany-pediatric")
    assert report.exclusions == []  # no file left out, no patient in both official splits
    assert list(manifest.columns) == list(MANIFEST_COLUMNS)
    counts = manifest.groupby([manifest["split"].replace("", "train"), "label"]).size().to_dict()
    assert counts == {("train", 0): 1341, ("train", 1): 3875, ("test", 0): 234, ("test", 1): 390}
    row = manifest[manifest["image_id"] == "train/PNEUMONIA/person1000_bacteria_2931"].iloc[0]
    assert row["patient_id"] == "kermany-pediatric/person1000" and row["label"] == 1
    # two separate normal numberings must not collide
    assert {"kermany-pediatric/IM-0115", "kermany-pediatric/NORMAL2-IM-0383"} <= set(manifest["patient_id"])
    # the test folder numbers "person" patients afresh (its own namespace), IM patients not
    test_patients = set(manifest.loc[manifest["split"] == "test", "patient_id"])
    assert {"kermany-pediatric/test/person100", "kermany-pediatric/IM-0001"} <= test_patients


@pytest.mark.parametrize(
    ("name", "patient"),
    [("IM-0011-0001-0002.jpeg", "IM-0011"), ("NORMAL2-IM-0011-0001.jpeg", "NORMAL2-IM-0011"), ("person7_virus_3_1.jpeg", "person7")],
)
def test_kermany_patient_parsing(name, patient):
    assert kermany_patient(name) == patient


def test_nih_csv_labels_patients_and_missing_metadata(data_dir):
    manifest, report = read_dataset_with_report(data_dir / "nih-cxr8")
    assert report.exclusions == []  # every row in the task, every image listed
    assert len(manifest) == 692
    assert manifest["label"].value_counts().to_dict() == {0: 348, 1: 344}
    assert manifest["patient_id"].nunique() == 477
    assert manifest["site"].unique().tolist() == ["nih-cxr8"]
    assert set(manifest["view"].dropna()) <= {"AP", "PA"}
    assert manifest["age"].isna().sum() > 0  # real export: some rows lack metadata, tolerated
    assert all(pd.io.common.file_exists(p) for p in manifest["path"].head(20))


@pytest.mark.parametrize(
    ("labels", "expected"),
    [("No Finding", 0), ("Pneumonia", 1), ("Infiltration|Pneumonia", 1), ("Effusion", None), ("No Finding|Mass", None)],
)
def test_nih_label_rule(labels, expected):
    assert nih_label(labels) == expected


@pytest.mark.parametrize(
    ("labels", "problem"),
    [
        ("Infiltration|Pneumonia", None),
        ("Hernia", None),  # NIH's vocabulary, only out of this task
        ("Pneumonai", "'Pneumonai' is not an NIH label (nearest: 'Pneumonia')"),
        ("No finding", "'No finding' is not an NIH label (nearest: 'No Finding')"),
        ("Effusion|Pleural Thickening", "'Pleural Thickening' is not an NIH label (nearest: 'Pleural_Thickening')"),
        ("No Finding|Mass", "'No Finding' together with findings"),
    ],
)
def test_nih_label_vocabulary_names_the_nearest_label(labels, problem):
    assert nih_label_problem(labels) == problem


def test_medmnist_npz_official_splits(data_dir):
    manifest, report = read_dataset_with_report(data_dir / "pneumoniamnist")
    assert report.exclusions == []
    assert manifest["split"].value_counts().to_dict() == {"train": 4708, "test": 624, "val": 524}
    assert manifest.loc[manifest["split"] == "test", "label"].value_counts().to_dict() == {1: 390, 0: 234}


def test_missing_dataset_names_layout_and_source(tmp_path):
    with pytest.raises(DatasetError, match="does not exist") as error:
        read_dataset(tmp_path / "nih-cxr8")
    assert "Data_Entry_2017.csv" in str(error.value) and "ChestX-ray14" in str(error.value)


def test_nih_csv_missing_column_is_named(data_dir, tmp_path):
    site = tmp_path / "nih"
    site.mkdir()
    table = pd.read_csv(data_dir / "nih-cxr8" / "Data_Entry_2017.csv").drop(columns=["Patient ID"])
    table.to_csv(site / "Data_Entry_2017.csv", index=False)
    with pytest.raises(DatasetError, match="missing column.*Patient ID"):
        read_dataset(site)


def test_unknown_class_folder_is_named(kermany_subset):
    shutil.move(kermany_subset / "train" / "NORMAL", kermany_subset / "train" / "HEALTHY")
    with pytest.raises(DatasetError, match=r"unknown_class_folder: 1 class folder.*: train/HEALTHY/ \(6 files\)"):
        read_dataset(kermany_subset)
