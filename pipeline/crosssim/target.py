"""The target hospital's data as adaptation sees it: target-train (labels hidden) and target-test.

Target-test labels are used only for scoring; adaptation sees target-train images, and
at most ``labelled_fraction`` of their labels (whole patients, class-stratified).
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


def split_target(
    target: pd.DataFrame,
    test_fraction: float,
    labelled_fraction: float,
    seed: int,
    test_set: Path | None = None,
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
    if labelled_fraction > 0:
        chosen = _labelled_patients(train.assign(label=hidden), labelled_fraction, seed)
        train.loc[chosen, "label"] = hidden[chosen]
    return TargetSplit(train.reset_index(drop=True), test.reset_index(drop=True), hidden.reset_index(drop=True))


def _labelled_patients(train: pd.DataFrame, fraction: float, seed: int) -> pd.Index:
    """Rows of ≈``fraction`` of the patients, drawn per class so both classes are labelled."""
    patients = train.groupby("patient_id")["label"].max()
    picked = [
        group.sample(n=max(1, round(len(group) * fraction)), random_state=seed).index
        for _, group in patients.groupby(patients)
    ]
    chosen = set().union(*map(set, picked))
    return train.index[train["patient_id"].isin(chosen)]
