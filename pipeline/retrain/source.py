"""The source model's stages against a run's output layout:

    <run>/train/    best.pt, last.pt, train_summary.json
    <run>/eval/     metrics.json (DVC metrics), plots, predictions.csv, threshold.json
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.config import PipelineConfig
from pipeline.data.prepare import PreparedDataset, open_prepared
from pipeline.evaluation import ScoredModel, choose_threshold, evaluate_sites
from pipeline.models import PneumoniaProbability, servable
from pipeline.training import TrainResult, load_trained_model, train_model
from pipeline.training.distributed import Ranks, ranks_from_environment
from pipeline.training.engine import select_device
from pipeline.training.handlers import log_epoch
from pipeline.training.inference import predict_proba
from pipeline.training.launch import launch


def train_source(cfg: PipelineConfig, tracker=None, show_progress: bool = True) -> TrainResult:
    """Train on the prepared source site (``crosssim prepare`` or the flow's prepare tasks made it).

    With ``train.processes`` > 1 (and not already under torchrun) the training runs in that many data-parallel
    processes; their epochs reach ``tracker`` when they have finished (a tracker's run lives in this process)."""
    if cfg.train.processes > 1 and not ranks_from_environment().distributed:
        Ranks(world_size=cfg.train.processes).per_rank_batch(cfg.train.batch_size)  # uneven: fails before spawning
        result = launch(cfg.train.processes, train_rank, cfg, show_progress)
        if tracker is not None:
            for row in result.state.history:
                log_epoch(tracker, row)
        return result
    return train_model(_prepared_source(cfg), cfg, tracker, show_progress)


def train_rank(cfg: PipelineConfig, show_progress: bool) -> TrainResult:
    """One of the data-parallel training processes (rank 0 shows the progress)."""
    return train_model(_prepared_source(cfg), cfg, show_progress=show_progress)


def _prepared_source(cfg: PipelineConfig) -> PreparedDataset:
    return open_prepared(cfg.data.prepared_site(cfg.data.source))


def evaluate_source(cfg: PipelineConfig, model_path: Path) -> ScoredModel:
    """Threshold from the source val split; scores on source test and on every external site."""
    device = select_device(cfg.train.device)
    model = load_trained_model(model_path, cfg.train.backbone).to(device).to(memory_format=torch.channels_last)
    source = _prepared_source(cfg)
    val = _predictions(model, source, source.manifest["split"] == "val", device)
    threshold = choose_threshold(val["label"].to_numpy(dtype=int), val["prob"].to_numpy())
    chosen_on = f"{cfg.data.source}/val"
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
    (out_dir / "threshold.json").write_text(json.dumps({"threshold": threshold, "chosen_on": chosen_on}))
    return ScoredModel(threshold, chosen_on, results)


def serving_model(cfg: PipelineConfig, model_path: Path) -> tuple[PneumoniaProbability, np.ndarray]:
    """The trained source model as registered (pixels in [0, 1] → probability) and an input example."""
    return servable(load_trained_model(model_path, cfg.train.backbone), cfg.data.image_size)


def _predictions(model, prepared: PreparedDataset, mask: pd.Series, device: torch.device) -> pd.DataFrame:
    images, rows = prepared.subset(mask)
    rows = rows.copy()
    rows["prob"] = predict_proba(model, images, device)
    return rows


SOURCE_WEIGHTS = "weights"  # the run folder of the source model's checkpoint (its state_dict)


def log_source(cfg: PipelineConfig, tracker, trained: TrainResult, evaluation: ScoredModel) -> str:
    """The training summary, the evaluation's numbers and files, and the model in its serving form into the
    run's tracker; returns the logged model's URI."""
    tracker.log_artifact(trained.summary_path, artifact_path="train")
    tracker.log_metrics({"threshold": evaluation.threshold, **evaluation.flat_metrics()})
    tracker.log_artifacts(cfg.evaluate.output_dir, artifact_path="eval")
    model, example = serving_model(cfg, trained.model_path)
    # trainable weights for the learning loop (pipeline.registry.weights reads them back with the backbone tag)
    tracker.log_artifact(trained.model_path, artifact_path=SOURCE_WEIGHTS)
    return tracker.log_model(model, name="model", input_example=example)
