"""``pretrain_backbone``: unlabelled images in, a pretrained backbone out, cached by content.

The cache entry ``<pretrain.cache_dir>/<key>/`` holds ``backbone.pt``, ``manifest.csv`` (exactly the images read)
and ``pretrain_summary.json``. The key hashes the prepared datasets' content keys, the image_ids taken from each,
the pretrain configuration, the backbone and the seed: an unchanged rerun finds the entry and trains nothing. An
entry is built in a temporary folder and renamed into place (as :mod:`pipeline.data.prepare` does), so a crash never
leaves a half-written entry that a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.augment import to_model_input
from pipeline.config import PretrainConfig, TrainConfig
from pipeline.data.prepare import PreparedDataset, staged_entry
from pipeline.errors import DatasetError
from pipeline.models import build_model
from pipeline.pretrain.checkpoint import MANIFEST_FILE, save_backbone
from pipeline.pretrain.methods import METHODS
from pipeline.pretrain.views import two_views, view_transform
from pipeline.training.engine import seed_everything, select_device
from pipeline.training.loop import Loop
from pipeline.training.schedule import warmup_cosine
from pipeline.training.weights import BACKBONE_FILE, SUMMARY_FILE

PRETRAIN_FORMAT = "v1"  # bump when the method code changes what a configuration learns: old entries are not reused


@dataclass(frozen=True)
class PretrainImages:
    """The unlabelled images of one site's split: ``rows`` of ``prepared``'s manifest (matched by image_id)."""

    site: str
    split: str  # "train" (the source site's) or "target-train" (the CrossSim target's)
    prepared: PreparedDataset
    rows: pd.DataFrame

    @property
    def name(self) -> str:
        return f"{self.site}/{self.split}"


@dataclass(frozen=True)
class PretrainResult:
    directory: Path  # holds backbone.pt, manifest.csv, pretrain_summary.json
    cache_key: str
    backbone: str
    method: str
    epochs: int
    epoch_losses: tuple[float, ...]
    images: dict[str, int]  # per "<site>/<split>"
    wall_seconds: float  # of the training that made the backbone
    reused: bool  # the cache had it: this call trained nothing

    @property
    def checkpoint_path(self) -> Path:
        return self.directory / BACKBONE_FILE

    @property
    def manifest_path(self) -> Path:
        return self.directory / MANIFEST_FILE

    @property
    def summary_path(self) -> Path:
        return self.directory / SUMMARY_FILE


def cache_key(sets: list[PretrainImages], cfg: PretrainConfig, backbone: str, seed: int) -> str:
    """Hash of what determines the backbone: the images (by content key and image_id), the method's settings, the seed."""
    settings = cfg.model_dump(mode="json", exclude={"cache_dir", "output_dir"})
    head = {"format": PRETRAIN_FORMAT, "backbone": backbone, "seed": seed, "pretrain": settings}
    digest = hashlib.sha256(json.dumps(head, sort_keys=True).encode())
    for images in sets:
        digest.update(f"{images.name}|{images.prepared.key}|".encode())
        digest.update("|".join(map(str, images.rows["image_id"])).encode())
    return digest.hexdigest()[:20]


def pretrain_backbone(
    sets: list[PretrainImages],
    cfg: PretrainConfig,
    backbone: str,
    seed: int,
    runtime: TrainConfig,
    show_progress: bool = True,
) -> PretrainResult:
    """Pretrain ``backbone`` on the images of ``sets`` with ``cfg.method``, or find it in ``cfg.cache_dir``.

    ``runtime`` says where it runs: ``device``, ``amp``, ``channels_last`` and ``num_threads`` of the train section.
    """
    count = sum(len(images.rows) for images in sets)
    if count < 2:
        names = ", ".join(images.name for images in sets)
        raise DatasetError(f"pretraining needs at least 2 images; {names} hold {count}")
    key = cache_key(sets, cfg, backbone, seed)
    entry = Path(cfg.cache_dir) / key
    reused = (entry / SUMMARY_FILE).is_file()
    if not reused:
        _build_entry(entry, sets, cfg, backbone, seed, runtime, show_progress)
    summary = json.loads((entry / SUMMARY_FILE).read_text())
    return PretrainResult(
        directory=entry,
        cache_key=key,
        backbone=summary["backbone"],
        method=summary["method"],
        epochs=summary["epochs"],
        epoch_losses=tuple(summary["epoch_losses"]),
        images=summary["images"],
        wall_seconds=summary["wall_seconds"],
        reused=reused,
    )


def _pixels(sets: list[PretrainImages]) -> np.ndarray:
    arrays = [np.asarray(images.prepared.images_of(images.rows)) for images in sets]
    sizes = {array.shape[-1] for array in arrays}
    if len(sizes) > 1:
        raise DatasetError(f"pretraining sets were prepared at different sizes {sorted(sizes)}; run `crosssim prepare`")
    return np.concatenate(arrays)


def _manifest(sets: list[PretrainImages]) -> pd.DataFrame:
    return pd.concat(
        [
            pd.DataFrame({"image_id": images.rows["image_id"].to_numpy(), "site": images.site, "split": images.split})
            for images in sets
        ],
        ignore_index=True,
    )


def _build_entry(
    entry: Path,
    sets: list[PretrainImages],
    cfg: PretrainConfig,
    backbone: str,
    seed: int,
    runtime: TrainConfig,
    show_progress: bool,
) -> None:
    pixels = _pixels(sets)
    with staged_entry(entry, SUMMARY_FILE) as staging:
        started = time.perf_counter()
        loop = PretrainLoop(backbone, pixels, cfg, seed, runtime, show_progress)
        losses = loop.fit()
        save_backbone(loop.method.backbone, backbone, staging / BACKBONE_FILE)
        _manifest(sets).to_csv(staging / MANIFEST_FILE, index=False)
        summary = {
            "cache_key": entry.name,
            "backbone": backbone,
            "method": cfg.method,
            "image_size": int(pixels.shape[-1]),
            "epochs": cfg.epochs,
            "epoch_losses": losses,
            "epoch_seconds": loop.epoch_seconds,
            "images": {images.name: len(images.rows) for images in sets},
            "wall_seconds": time.perf_counter() - started,
            "device": str(loop.device),
            "seed": seed,
        }
        (staging / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))


class PretrainLoop(Loop):
    """Epochs of shuffled full batches (a last, smaller one is dropped: SimCLR's negatives and BatchNorm need a
    full batch); AdamW with one warm-up epoch and cosine decay."""

    def __init__(
        self, backbone: str, pixels: np.ndarray, cfg: PretrainConfig, seed: int, runtime: TrainConfig, show_progress: bool
    ) -> None:
        if runtime.num_threads:
            torch.set_num_threads(runtime.num_threads)
        super().__init__(select_device(runtime.device), runtime.channels_last in ("on", "auto"), runtime.amp, None)
        seed_everything(seed)  # the initial weights and every augmentation draw
        classifier = build_model(backbone)
        self.method = METHODS[cfg.method](classifier.features, classifier.feature_dim, cfg)
        self.method.to(self.device, memory_format=self.memory_format)
        self.pixels = torch.from_numpy(np.ascontiguousarray(pixels))
        self.cfg = cfg
        self.batch_size = min(cfg.batch_size, len(pixels))
        self.steps_per_epoch = len(pixels) // self.batch_size
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.transform = view_transform(pixels.shape[-1], cfg.min_crop_scale)
        trainable = [parameter for parameter in self.method.parameters() if parameter.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = warmup_cosine(self.optimizer, self.total_steps, min(self.steps_per_epoch, self.total_steps - 1))
        self.generator = torch.Generator().manual_seed(seed)
        self.show_progress = show_progress
        self.epoch_seconds: list[float] = []

    def fit(self) -> list[float]:
        """Train ``cfg.epochs`` epochs; the mean loss of each."""
        self.method.train()
        losses, step = [], 0
        for epoch in range(1, self.cfg.epochs + 1):
            started = time.perf_counter()
            order = torch.randperm(len(self.pixels), generator=self.generator)
            total = 0.0
            for index in range(self.steps_per_epoch):
                rows = order[index * self.batch_size : (index + 1) * self.batch_size]
                view_a, view_b = two_views(to_model_input(self.pixels[rows], self.device, self.channels_last), self.transform)
                with self.autocast():
                    loss = self.method(view_a, view_b)
                value = loss.item()  # one device sync per step, for the check and the epoch's mean
                self.check_finite({self.cfg.method: value}, f"pretraining epoch {epoch}, batch {index}")
                self.backward(loss)
                self.apply_gradients(self.optimizer, self.scheduler, self.method.parameters(), None)
                self.method.step_end(step, self.total_steps)
                total += value
                step += 1
            losses.append(total / self.steps_per_epoch)
            self.epoch_seconds.append(time.perf_counter() - started)
            if self.show_progress:
                print(f"pretrain epoch {epoch}/{self.cfg.epochs}  loss {losses[-1]:.4f}  {self.epoch_seconds[-1]:.1f} s")
        return losses
