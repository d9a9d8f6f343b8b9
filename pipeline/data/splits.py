"""Patient-disjoint, label-stratified splits with a fixed seed."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold


def patient_holdout(frame: pd.DataFrame, fraction: float, seed: int) -> pd.Index:
    """Index of ≈``fraction`` of the rows, whole patients only, class balance kept."""
    n_splits = max(2, round(1 / fraction))
    labels = frame["label"].fillna(-1).astype(int).to_numpy()
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    _, held = next(splitter.split(np.zeros(len(frame)), labels, groups=frame["patient_id"].to_numpy()))
    return frame.index[held]


def assign_splits(manifest: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int) -> pd.DataFrame:
    """Fill empty ``split`` values; official splits already present are kept.

    Rows without a split become test (when the dataset has no test split at all),
    then val, then train. A patient already in an official split keeps all of its
    rows there, so no patient ends up in two splits.
    """
    frame = manifest.copy()
    unsplit = frame["split"] == ""
    if not unsplit.any():
        return frame
    official = frame.loc[~unsplit].groupby("patient_id")["split"].first()
    inherited = unsplit & frame["patient_id"].isin(official.index)
    frame.loc[inherited, "split"] = frame.loc[inherited, "patient_id"].map(official)
    unsplit = frame["split"] == ""
    if "test" not in set(frame["split"]):
        frame.loc[patient_holdout(frame[unsplit], test_fraction, seed), "split"] = "test"
        unsplit = frame["split"] == ""
        val_fraction = val_fraction / (1 - test_fraction)
    if "val" not in set(frame["split"]):
        frame.loc[patient_holdout(frame[unsplit], val_fraction, seed), "split"] = "val"
    frame.loc[frame["split"] == "", "split"] = "train"
    return frame


def subsample(manifest: pd.DataFrame, max_per_class: int | None, seed: int) -> pd.DataFrame:
    """At most ``max_per_class`` images per (split, label): quick runs on a real subset."""
    if max_per_class is None:
        return manifest
    shuffled = manifest.sample(frac=1.0, random_state=seed)
    rank = shuffled.groupby(["split", "label"], dropna=False).cumcount()
    return shuffled[rank < max_per_class].sort_index()
