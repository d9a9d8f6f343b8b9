"""Patient-disjoint, label-stratified splits with a fixed seed."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from pipeline.data.manifest import LABEL_NAMES
from pipeline.errors import DatasetError


def patient_holdout(frame: pd.DataFrame, fraction: float, seed: int, purpose: str) -> pd.Index:
    """Index of ≈``fraction`` of the rows, whole patients only, class balance kept.

    ``purpose`` names what is held out and the key setting ``fraction``, e.g. ``"val split
    (data.val_fraction)"``: the error for too few patients says it.
    """
    n_splits = max(2, round(1 / fraction))
    _require_patients_per_class(frame, n_splits, fraction, purpose)
    labels = frame["label"].fillna(-1).astype(int).to_numpy()
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    _, held = next(splitter.split(np.zeros(len(frame)), labels, groups=frame["patient_id"].to_numpy()))
    return frame.index[held]


def _require_patients_per_class(frame: pd.DataFrame, needed: int, fraction: float, purpose: str) -> None:
    """The held-out fold is one of ``needed`` folds: with fewer patients of a class, it may get none of them."""
    labelled = frame[frame["label"].notna()]
    patients = labelled.groupby("label")["patient_id"].nunique()
    if len(patients) and (patients >= needed).all():
        return
    images = labelled.groupby("label").size()
    have = "; ".join(
        f"{LABEL_NAMES.get(int(label), label)} {patients[label]} patients ({images[label]} images)"
        for label in patients.index
    )
    site = ", ".join(sorted(set(frame["site"]))) or "dataset"
    raise DatasetError(
        f"{site}: too few patients for the {purpose}: holding out {fraction:.0%} of them by whole patients, "
        f"stratified by class, needs at least {needed} patients per class; the images left to split have "
        f"{have or 'no labelled image'}. Add images of more patients, or raise that fraction."
    )


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
        held = patient_holdout(frame[unsplit], test_fraction, seed, "test split (data.test_fraction)")
        frame.loc[held, "split"] = "test"
        unsplit = frame["split"] == ""
        val_fraction = val_fraction / (1 - test_fraction)
    if "val" not in set(frame["split"]):
        frame.loc[patient_holdout(frame[unsplit], val_fraction, seed, "val split (data.val_fraction)"), "split"] = "val"
    frame.loc[frame["split"] == "", "split"] = "train"
    return frame


def subsample(manifest: pd.DataFrame, max_per_class: int | None, seed: int) -> pd.DataFrame:
    """At most ``max_per_class`` images per (split, label): quick runs on a real subset."""
    if max_per_class is None:
        return manifest
    shuffled = manifest.sample(frac=1.0, random_state=seed)
    rank = shuffled.groupby(["split", "label"], dropna=False).cumcount()
    return shuffled[rank < max_per_class].sort_index()
