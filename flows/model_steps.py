"""The model stages run against the project's output layout, shared by the CLI, DVC and Prefect.

Each function is one stage of ``dvc.yaml`` and one task of the retraining flow (the data
stages are in :mod:`flows.data_steps`); they only compose ``pipeline`` functions and decide
where artifacts live:

    outputs/train/               best.pt, last.pt, train_summary.json
    outputs/eval/                metrics.json (DVC metrics), plots, predictions.csv
    outputs/adapt/               adapted.pt, student.pt, diagnostics.json, t-SNE plots,
                                 metrics.json + eval/<model>/ (source vs adapted vs student)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.augment import PIXEL_MEAN, PIXEL_STD
from pipeline.config import PipelineConfig
from pipeline.crosssim.engine import UNLABELLED
from pipeline.crosssim.model import load_model
from pipeline.crosssim.scoring import evaluate_models
from pipeline.crosssim.stage import ADAPTED_MODEL, STUDENT_MODEL, CrossSimResult, DomainData, run_crosssim
from pipeline.crosssim.target import split_target
from pipeline.data.prepare import PreparedDataset, open_prepared, prepare_dataset
from pipeline.errors import DatasetError
from pipeline.evaluation import choose_threshold, evaluate_sites
from pipeline.models import PneumoniaProbability
from pipeline.training import TrainResult, load_trained_model, train_model
from pipeline.training.engine import predict_proba, select_device


@dataclass(frozen=True)
class CrossSimData:
    source_train: DomainData
    source_val: DomainData
    source_test: tuple[np.ndarray, pd.DataFrame]
    target_train: DomainData
    target_test: tuple[np.ndarray, pd.DataFrame]


def train_step(cfg: PipelineConfig, tracker=None, show_progress: bool = True) -> TrainResult:
    return train_model(open_prepared(cfg.data.prepared_site(cfg.data.source)), cfg, tracker, show_progress)


def _predictions(model, prepared: PreparedDataset, mask: pd.Series, device: torch.device) -> pd.DataFrame:
    images, rows = prepared.subset(mask)
    rows = rows.copy()
    rows["prob"] = predict_proba(model, images, device)
    return rows


def evaluate_step(cfg: PipelineConfig, model_path: Path) -> dict:
    """Threshold from the source val split; scores on source test and on every external site."""
    device = select_device(cfg.train.device)
    model = load_trained_model(model_path, cfg.train.backbone).to(device).to(memory_format=torch.channels_last)
    source = open_prepared(cfg.data.prepared_site(cfg.data.source))
    val = _predictions(model, source, source.manifest["split"] == "val", device)
    threshold = choose_threshold(val["label"].to_numpy(dtype=int), val["prob"].to_numpy())
    sets = {f"{cfg.data.source}/test": _predictions(model, source, source.manifest["split"] == "test", device)}
    for site in cfg.data.external:
        external = open_prepared(cfg.data.prepared_site(site))
        sets[site] = _predictions(model, external, external.manifest["label"].notna(), device)
    out_dir = cfg.evaluate.output_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    pd.concat([frame.assign(set=name) for name, frame in sets.items()]).drop(columns=["path"]).to_csv(
        out_dir / "predictions.csv", index=False
    )
    results = evaluate_sites(sets, threshold, cfg.evaluate, out_dir, seed=cfg.seed)
    (out_dir / "threshold.json").write_text(json.dumps({"threshold": threshold, "chosen_on": f"{cfg.data.source}/val"}))
    return {"threshold": threshold, "sets": results}


def serving_model(cfg: PipelineConfig, model_path: Path) -> tuple[PneumoniaProbability, np.ndarray]:
    """The model as registered (pixels in [0, 1] → probability) and an input example for its signature."""
    return serving_model_from(load_trained_model(model_path, cfg.train.backbone), cfg.data.image_size)


def images_of(prepared: PreparedDataset, rows: pd.DataFrame) -> np.ndarray:
    """The prepared images of ``rows`` (matched by image_id), in their order."""
    positions = pd.Index(prepared.manifest["image_id"]).get_indexer(rows["image_id"])
    return np.asarray(prepared.images[positions])


def crosssim_data(cfg: PipelineConfig) -> CrossSimData:
    """Source train/val, target-train (labels hidden but a labelled fraction) and target-test, as arrays."""
    settings = cfg.crosssim
    source = open_prepared(cfg.data.prepared_site(cfg.data.source))
    target = open_prepared(cfg.data.prepared_site(settings.target))
    split = split_target(
        target.manifest[target.manifest["label"].notna()].reset_index(drop=True),
        settings.test_fraction,
        settings.labelled_fraction,
        cfg.seed,
        settings.test_set,
    )
    if settings.test_set is None:
        test_images = images_of(target, split.test)
    else:  # a held-out folder of other patients: prepared like every site, through the same cache
        test_images = prepare_dataset(split.test, cfg.data.image_size, cfg.data.cache_dir).images

    def labelled(name: str, split_name: str) -> DomainData:
        images, rows = source.subset(source.manifest["split"] == split_name)
        return DomainData(name, images, rows["label"].to_numpy(dtype="int64"))

    return CrossSimData(
        source_train=labelled(f"{cfg.data.source}/train", "train"),
        source_val=labelled(f"{cfg.data.source}/val", "val"),
        source_test=source.subset(source.manifest["split"] == "test"),
        target_train=DomainData(
            f"{settings.target}/target-train",
            images_of(target, split.train),
            split.train["label"].fillna(UNLABELLED).to_numpy(dtype="int64"),
        ),
        target_test=(np.asarray(test_images), split.test),
    )


def adapt_step(cfg: PipelineConfig, model_path: Path, tracker=None, show_progress: bool = True) -> CrossSimResult:
    """CrossSim on the trained source model; the model's input size comes from its train summary."""
    summary_path = cfg.train.output_dir / "train_summary.json"
    if not summary_path.is_file():
        raise DatasetError(f"no training summary at {summary_path}; run `crosssim train` first")
    image_size = int(json.loads(summary_path.read_text())["image_size"])
    source_model = load_trained_model(model_path, cfg.train.backbone)
    data = crosssim_data(cfg)
    return run_crosssim(
        source_model, image_size, data.source_train, data.source_val, data.target_train, cfg, tracker, show_progress
    )


def evaluate_adaptation_step(cfg: PipelineConfig, source_model_path: Path, result_dir: Path) -> dict:
    """Source model vs adapted vs student on source test and target-test; writes outputs/adapt/metrics.json."""
    device = select_device(cfg.train.device)
    data = crosssim_data(cfg)
    models = {"source": load_trained_model(source_model_path, cfg.train.backbone)}
    for name, file in (("adapted", ADAPTED_MODEL), ("student", STUDENT_MODEL)):
        if (result_dir / file).is_file():
            models[name] = load_model(result_dir / file)
    test_sets = {
        f"{cfg.data.source}/test": data.source_test,
        f"{cfg.crosssim.target}/target-test": data.target_test,
    }
    results = evaluate_models(
        models, data.source_val, data.target_train, test_sets, cfg.evaluate, result_dir / "eval", device, cfg.seed
    )
    metrics = {
        model: {
            "threshold": result["threshold"],
            **{name: _metric_entry(values) for name, values in result["sets"].items()},
        }
        for model, result in results.items()
    }
    (result_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return results


def _metric_entry(result: dict) -> dict:
    point = result["at_threshold"]
    return {"n": result["n"], **{key: point[key] for key in ("auc", "accuracy", "sensitivity", "specificity")}}


def serving_model_from(model: torch.nn.Module, image_size: int) -> tuple[PneumoniaProbability, np.ndarray]:
    """Any classifier wrapped for serving; the example's batch of 2 keeps the batch dim dynamic."""
    return PneumoniaProbability(model.eval(), PIXEL_MEAN, PIXEL_STD).eval(), np.zeros(
        (2, 1, image_size, image_size), dtype=np.float32
    )
