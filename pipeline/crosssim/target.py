"""The target hospital's data as adaptation sees it: target-train (labels hidden) and target-test.

Target-test labels are used only for scoring; adaptation sees target-train images, and
at most ``labelled_fraction`` of their labels (whole patients, class-stratified). Of those labelled patients,
``selection_fraction`` are held out of training (their images stay in target-train, unlabelled) to choose the
deployable model between teacher and student on images no model was fitted to.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline.data.readers import read_dataset
from pipeline.data.splits import patient_holdout
from pipeline.errors import DatasetError


@dataclass(frozen=True)
class TargetSplit:
    train: pd.DataFrame  # target-train; ``label`` is <NA> except on the labelled fraction
    test: pd.DataFrame  # target-test with labels, for scoring only
    train_labels: pd.Series  # the hidden labels of target-train, for the oracle and diagnostics
    selection: pd.DataFrame  # labelled patients held out of training (their rows unlabelled in ``train``); may be empty


def split_target(
    target: pd.DataFrame,
    test_fraction: float,
    labelled_fraction: float,
    seed: int,
    test_set: Path | None = None,
    selection_fraction: float = 0.0,
) -> TargetSplit:
    """Patient-disjoint target-train/target-test, or target-test read from ``test_set`` (any reader layout).

    With ``test_set`` given, patients that appear in it are removed from target-train, so the
    scored patients are never seen during adaptation.
    """
    if not 0 <= labelled_fraction <= 1:
        raise DatasetError(f"labelled_fraction must be within [0, 1], got {labelled_fraction}")
    if test_set is not None:
        # read as the target site, so its patient ids are comparable with target-train's
        test = read_dataset(test_set, site=target["site"].iloc[0])
        train = target[~target["patient_id"].isin(set(test["patient_id"]))].assign(split="train")
    else:
        held = patient_holdout(target, test_fraction, seed, "target-test (crosssim.test_fraction)")
        test = target.loc[held].assign(split="test")
        train = target.drop(index=held).assign(split="train")
    if train.empty or test.empty:
        raise DatasetError(f"target split left {len(train)} train and {len(test)} test images; need both non-empty")
    hidden = train["label"].copy()
    train = train.assign(label=pd.array([pd.NA] * len(train), dtype="Int64"))
    selection = train.iloc[:0]
    if labelled_fraction > 0:
        chosen = _labelled_patients(train.assign(label=hidden), labelled_fraction, seed)
        held = _selection_patients(train.loc[chosen].assign(label=hidden[chosen]), selection_fraction, seed)
        selection = train.loc[held].assign(label=hidden[held])
        kept = chosen.difference(held)
        train.loc[kept, "label"] = hidden[kept]
    return TargetSplit(
        train.reset_index(drop=True),
        test.reset_index(drop=True),
        hidden.reset_index(drop=True),
        selection.reset_index(drop=True),
    )


def _selection_patients(labelled: pd.DataFrame, fraction: float, seed: int) -> pd.Index:
    """Rows of ≈``fraction`` of the labelled patients per class, leaving at least one patient per class to train on;
    none when a class has a single labelled patient (nothing could be held out of it)."""
    patients = labelled.groupby("patient_id")["label"].max()
    counts = patients.value_counts()
    if fraction == 0 or len(counts) < 2 or counts.min() < 2:
        return labelled.index[:0]
    picked = [
        group.sample(n=min(len(group) - 1, max(1, round(len(group) * fraction))), random_state=seed).index
        for _, group in patients.groupby(patients)
    ]
    return labelled.index[labelled["patient_id"].isin(set().union(*map(set, picked)))]


def _labelled_patients(train: pd.DataFrame, fraction: float, seed: int) -> pd.Index:
    """Rows of ≈``fraction`` of the patients, drawn per class so both classes are labelled."""
    patients = train.groupby("patient_id")["label"].max()
    picked = [
        group.sample(n=max(1, round(len(group) * fraction)), random_state=seed).index
        for _, group in patients.groupby(patients)
    ]
    chosen = set().union(*map(set, picked))
    return train.index[train["patient_id"].isin(chosen)]
