"""The pretrain stage against a run's output layout: the images a run may pretrain on, the backbone published.

    <run>/pretrain/   backbone.pt (what train.pretrained_weights=pretrain loads), manifest.csv, pretrain_summary.json

A run may pretrain on every image it trains or adapts on without labels: the source site's train split and, with
CrossSim, the target's target-train split (the same split adaptation gets). Source val/test, target-test and every
other external site are evaluation sets: never read here.
"""

from __future__ import annotations

from dataclasses import replace

from pipeline.config import PipelineConfig
from pipeline.data.prepare import open_prepared
from pipeline.pretrain.stage import PretrainImages, PretrainResult, pretrain_backbone
from pipeline.retrain.data import target_split
from pipeline.retrain.sites import publish


def pretrain_images(cfg: PipelineConfig) -> list[PretrainImages]:
    """Source train, and with CrossSim the target's target-train, from the run's prepared sites."""
    source = open_prepared(cfg.data.prepared_site(cfg.data.source))
    sets = [PretrainImages(cfg.data.source, "train", source, source.manifest[source.manifest["split"] == "train"])]
    if cfg.crosssim.enabled:
        target = open_prepared(cfg.data.prepared_site(cfg.crosssim.target))
        # which images are target-train does not depend on how many of their labels adaptation may see
        split = target_split(cfg, target, labelled_fraction=0.0)
        sets.append(PretrainImages(cfg.crosssim.target, "target-train", target, split.train))
    return sets


def pretrain(cfg: PipelineConfig, show_progress: bool = True) -> PretrainResult:
    """Pretrain ``train.backbone`` (or reuse the cached backbone of this configuration) and publish it in
    ``pretrain.output_dir``."""
    result = pretrain_backbone(pretrain_images(cfg), cfg.pretrain, cfg.train.backbone, cfg.seed, cfg.train, show_progress)
    publish(result.directory, cfg.pretrain.output_dir)
    return replace(result, directory=cfg.pretrain.output_dir)


def log_pretrain(tracker, result: PretrainResult) -> None:
    """The backbone, its manifest and summary, and the loss of each epoch into the run's tracker."""
    tracker.log_artifacts(result.directory, artifact_path="pretrain")
    for epoch, loss in enumerate(result.epoch_losses, start=1):
        tracker.log_metrics({"pretrain.loss": loss}, step=epoch)
    tracker.log_metrics({"pretrain.images": sum(result.images.values()), "pretrain.wall_seconds": result.wall_seconds})
    tracker.set_tags({"pretrain.cache_key": result.cache_key, "pretrain.method": result.method})
