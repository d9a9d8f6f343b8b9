"""The arrays a run's model stages share, built once per run and passed along (adapt, score, gate, export).

Source train/val/test come from the prepared source site; the CrossSim target's labelled images are split into
target-train (labels hidden but a labelled fraction) and target-test (never seen by adaptation), or scored on a
held-out folder of other patients (``crosssim.test_set``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.config import PipelineConfig
from pipeline.crosssim.engine import UNLABELLED, DomainData
from pipeline.crosssim.target import TargetSplit, split_target
from pipeline.data.prepare import PreparedDataset, open_prepared, prepare_dataset


@dataclass(frozen=True)
class CrossSimData:
    source_train: DomainData
    source_val: DomainData
    source_test: tuple[np.ndarray, pd.DataFrame]
    target_train: DomainData
    target_test: tuple[np.ndarray, pd.DataFrame]
    target_selection: DomainData | None  # labelled target patients held out of training, to choose the deployable model


def crosssim_data(
    cfg: PipelineConfig, source: PreparedDataset | None = None, target: PreparedDataset | None = None
) -> CrossSimData:
    """Source train/val/test and the CrossSim target's split, as arrays. ``source``, ``target``: the prepared sites
    when the caller has them open (default: the run's prepared folders)."""
    settings = cfg.crosssim
    source = source or open_prepared(cfg.data.prepared_site(cfg.data.source))
    target = target or open_prepared(cfg.data.prepared_site(settings.target))
    split = target_split(cfg, target, settings.labelled_fraction)
    if settings.test_set is None:
        test_images = target.images_of(split.test)
    else:  # a held-out folder of other patients: prepared like every site, through the same cache
        test_images = prepare_dataset(split.test, cfg.data.preprocessing(), cfg.data.cache_dir).images

    def labelled(name: str, split_name: str) -> DomainData:
        images, rows = source.subset(source.manifest["split"] == split_name)
        return DomainData(name, images, rows["label"].to_numpy(dtype="int64"))

    return CrossSimData(
        source_train=labelled(f"{cfg.data.source}/train", "train"),
        source_val=labelled(f"{cfg.data.source}/val", "val"),
        source_test=source.subset(source.manifest["split"] == "test"),
        target_train=DomainData(
            f"{settings.target}/target-train",
            target.images_of(split.train),
            split.train["label"].fillna(UNLABELLED).to_numpy(dtype="int64"),
        ),
        target_test=(np.asarray(test_images), split.test),
        target_selection=None
        if split.selection.empty
        else DomainData(
            f"{settings.target}/target-selection",
            target.images_of(split.selection),
            split.selection["label"].to_numpy(dtype="int64"),
        ),
    )


def target_split(cfg: PipelineConfig, target: PreparedDataset, labelled_fraction: float) -> TargetSplit:
    """The CrossSim target's labelled images split into target-train and target-test, as every stage sees them
    (adaptation, scoring, the gate, pretraining); ``labelled_fraction`` changes labels only, never which images."""
    settings = cfg.crosssim
    return split_target(
        target.manifest[target.manifest["label"].notna()].reset_index(drop=True),
        settings.test_fraction,
        labelled_fraction,
        cfg.seed,
        settings.test_set,
        settings.selection_fraction if labelled_fraction > 0 else 0.0,  # nothing to hold out without labels
    )
