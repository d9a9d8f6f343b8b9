"""The models and data of make bench-rollout, trained once per configuration and cached.

Champion: a ResNet-18 trained on Kermany (pediatric). Challengers: the champion fine-tuned on NIH's labelled
target-train patients (truly better on NIH); that model with its two output classes swapped, so its probability
is exactly 1 − the better one's (truly worse: inverting the Kermany champion itself would give a *better* model,
since it is below chance on NIH adults); the champion re-registered (equivalent). Each model answers at the
threshold registration would give it (``pipeline.crosssim.scoring.decision_threshold``: Youden's J on NIH's
labelled target-train rows for the models built on them, on Kermany validation for the champion).
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from pipeline.config import PipelineConfig
from pipeline.crosssim.finetune import finetune_on_labels
from pipeline.crosssim.scoring import decision_threshold
from pipeline.crosssim.stage import DomainData
from pipeline.crosssim.target import split_target
from pipeline.data.prepare import PreparedDataset, prepare_dataset
from pipeline.data.readers import read_dataset
from pipeline.data.splits import assign_splits, subsample
from pipeline.models import Classifier, build_model
from pipeline.training import load_trained_model, train_model

CHALLENGERS = ("better", "worse", "equivalent")


@dataclass(frozen=True)
class ServedModel:
    name: str  # champion | better | worse | equivalent
    model: Classifier
    threshold: float
    threshold_chosen_on: str


@dataclass(frozen=True)
class RolloutData:
    source: PreparedDataset  # Kermany, with its train/val/test splits
    target: PreparedDataset  # the labelled NIH images
    nih_test: pd.DataFrame  # NIH target-test patients (never used to train any model): the replayed stream
    nih_test_images: np.ndarray

    @property
    def nih_test_labels(self) -> np.ndarray:
        return self.nih_test["label"].to_numpy("int64")


def rollout_data(cfg: PipelineConfig, test_set: Path | None = None) -> tuple[RolloutData, DomainData, DomainData]:
    """The data, plus Kermany validation and NIH's labelled target-train as the threshold rule reads them.
    ``test_set``: any NIH-format folder of held-out patients as the target-test (they leave target-train)."""
    root = cfg.data.resolved_root()
    kermany = assign_splits(read_dataset(root / cfg.data.source), cfg.data.val_fraction, cfg.data.test_fraction, cfg.seed)
    source = prepare_dataset(subsample(kermany, cfg.data.max_images_per_class, cfg.seed), cfg.data.preprocessing(), cfg.data.cache_dir)
    nih = read_dataset(root / cfg.crosssim.target)
    nih = subsample(nih[nih["label"].notna()], cfg.data.max_images_per_class, cfg.seed).reset_index(drop=True)
    target = prepare_dataset(nih, cfg.data.preprocessing(), cfg.data.cache_dir)
    split = split_target(target.manifest, cfg.crosssim.test_fraction, 1.0, cfg.seed, test_set=test_set)
    tested = target if test_set is None else prepare_dataset(split.test, cfg.data.preprocessing(), cfg.data.cache_dir)
    val_images, val_rows = source.subset(source.manifest["split"] == "val")
    source_val = DomainData(f"{cfg.data.source}/val", np.asarray(val_images), val_rows["label"].to_numpy("int64"))
    target_train = DomainData(f"{cfg.crosssim.target}/target-train", target.images_of(split.train),
                              split.train["label"].to_numpy("int64"))  # fmt: skip
    data = RolloutData(source, target, split.test, tested.images_of(split.test))
    return data, source_val, target_train


def rollout_models(cfg: PipelineConfig, data: RolloutData, source_val: DomainData, target_train: DomainData,
                   cache: Path, log=print) -> dict[str, ServedModel]:  # fmt: skip
    """champion, better, worse, equivalent — trained, or loaded from ``cache`` (a folder per configuration)."""
    folder = cache / _cache_key(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    trained: dict[str, Classifier] = {}
    for name in ("champion", "better"):
        path = folder / f"{name}.pt"
        if path.is_file():
            log(f"{name}: cached in {path}")
            trained[name] = build_model(cfg.train.backbone)
            trained[name].load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        else:
            log(f"{name}: training" + (" (ResNet on Kermany)" if name == "champion" else " (fine-tuning on NIH labels)"))
            trained[name] = (
                load_trained_model(train_model(data.source, cfg, show_progress=False).model_path, cfg.train.backbone)
                if name == "champion"
                else finetune_on_labels(trained["champion"], target_train, cfg.crosssim.label_finetune_steps,
                                        cfg.crosssim.label_finetune_lr, cfg.train, cfg.augment, cfg.seed)  # fmt: skip
            )
            torch.save(trained[name].state_dict(), path.with_suffix(".tmp"))
            path.with_suffix(".tmp").rename(path)  # a killed run leaves no half-written cache
        trained[name] = trained[name].cpu().eval()
    worse = _classes_swapped(trained["better"])
    cpu = torch.device("cpu")
    served = {}
    unlabelled = DomainData(target_train.name, target_train.images[:0], target_train.labels[:0])  # Kermany only
    for name, model, seen in (("champion", trained["champion"], unlabelled), ("better", trained["better"], target_train),
                              ("worse", worse, target_train)):  # fmt: skip
        threshold, chosen_on = decision_threshold(model, source_val, seen, cpu)
        served[name] = ServedModel(name, model, threshold, chosen_on)
    champion = served["champion"]
    served["equivalent"] = ServedModel("equivalent", copy.deepcopy(champion.model), champion.threshold, champion.threshold_chosen_on)
    return served


def models_cached(cfg: PipelineConfig, cache: Path) -> bool:
    """Whether ``rollout_models`` will load both trained models from ``cache`` instead of training them."""
    return all((cache / _cache_key(cfg) / f"{name}.pt").is_file() for name in ("champion", "better"))


def _classes_swapped(model: Classifier) -> Classifier:
    """The same network with its two logits swapped: softmax gives exactly 1 − p (a label-inverted copy)."""
    swapped = copy.deepcopy(model)
    with torch.no_grad():
        head: nn.Linear = swapped.head
        head.weight.copy_(head.weight.flip(0))
        head.bias.copy_(head.bias.flip(0))
    return swapped.eval()


def _cache_key(cfg: PipelineConfig) -> str:
    """What the two trained models depend on: data, training and fine-tuning settings, and the seed."""
    settings = {
        "data": cfg.data.model_dump(mode="json", exclude={"cache_dir", "root"}),
        "train": cfg.train.model_dump(mode="json", exclude={"output_dir", "num_threads"}),
        "augment": cfg.augment.model_dump(mode="json"),
        "finetune": (cfg.crosssim.label_finetune_steps, cfg.crosssim.label_finetune_lr),
        "target": cfg.crosssim.target,
        "test_fraction": cfg.crosssim.test_fraction,
        "seed": cfg.seed,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
