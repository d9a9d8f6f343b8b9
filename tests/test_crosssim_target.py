"""Target-domain split on the real NIH data: patient-disjoint, labels hidden, labelled fraction by patient."""

from __future__ import annotations

import pytest

from pipeline.crosssim.target import split_target
from pipeline.data.readers import read_dataset
from pipeline.errors import DatasetError
from tests.conftest import copy_nih_subset


@pytest.fixture(scope="module")
def nih(data_dir):
    return read_dataset(data_dir / "nih-cxr8")


def test_target_split_hides_labels_and_keeps_patients_apart(nih):
    split = split_target(nih, test_fraction=0.3, labelled_fraction=0.0, seed=1)
    assert not set(split.train["patient_id"]) & set(split.test["patient_id"])
    assert split.train["label"].isna().all() and split.test["label"].notna().all()
    assert abs(len(split.test) / len(nih) - 0.3) < 0.06
    assert split.train_labels.notna().all() and len(split.train_labels) == len(split.train)


def test_labelled_fraction_is_whole_patients_of_both_classes(nih):
    split = split_target(nih, test_fraction=0.3, labelled_fraction=0.1, seed=1)
    labelled = split.train[split.train["label"].notna()]
    assert set(labelled["label"]) == {0, 1}
    patients = split.train["patient_id"].nunique()
    assert abs(labelled["patient_id"].nunique() / patients - 0.1) < 0.03
    unlabelled = split.train[split.train["patient_id"].isin(set(labelled["patient_id"]))]
    assert unlabelled["label"].notna().all()  # a labelled patient has all its images labelled


def test_a_share_of_the_labelled_patients_is_held_out_to_choose_the_deployable_model(nih):
    whole = split_target(nih, test_fraction=0.3, labelled_fraction=0.1, seed=1)
    split = split_target(nih, test_fraction=0.3, labelled_fraction=0.1, seed=1, selection_fraction=0.25)
    labelled = set(whole.train.loc[whole.train["label"].notna(), "patient_id"])  # the same patients are labelled...
    trained_on = set(split.train.loc[split.train["label"].notna(), "patient_id"])
    held = set(split.selection["patient_id"])
    assert trained_on | held == labelled and not trained_on & held  # ...some of them held out of training
    assert set(split.selection["label"]) == {0, 1} and set(split.train.loc[split.train["label"].notna(), "label"]) == {0, 1}
    assert 0.15 < len(held) / len(labelled) < 0.35
    assert split.train["image_id"].tolist() == whole.train["image_id"].tolist()  # their images stay, unlabelled
    assert split_target(nih, 0.3, 0.0, seed=1, selection_fraction=0.25).selection.empty  # no labels: nothing to hold out
    one_each = split_target(nih.head(40), 0.3, 0.01, seed=1, selection_fraction=0.5)
    assert one_each.selection.empty  # one labelled patient per class: all of them train


def test_configured_test_set_excludes_its_patients_from_adaptation(nih, data_dir, tmp_path):
    held_out = copy_nih_subset(data_dir, tmp_path / "held-out", per_class=10)
    split = split_target(nih, test_fraction=0.3, labelled_fraction=0.0, seed=1, test_set=held_out)
    assert len(split.test) == 20
    assert not set(split.train["patient_id"]) & set(split.test["patient_id"])


def test_bad_fraction_is_refused(nih):
    with pytest.raises(DatasetError, match="labelled_fraction"):
        split_target(nih, 0.3, 1.5, seed=0)
