"""make bench-gpu-train: training throughput of the pipeline's own Trainer on a GPU — ResNet-50 at 224×224 with AMP
and channels_last on real Kermany images — against the target of 3,000 images/s on one H200 (NVIDIA's published
A100 AMP figure for ResNet-50 training is 2,470 images/s).

    python benchmarks/gpu_train.py [--processes N] [--epochs E] [--smoke] [--output FILE] [--set key=value ...]

Every epoch runs the full training step of `crosssim train` (augmentation on the device, class-weighted loss, the
optimiser step with clipping); the Trainer times each epoch's training pass itself (validation excluded). The first
epoch warms up (cuDNN autotuning, allocator): the result is the median of the later ones. ``--processes N`` trains
data-parallel on N GPUs (``train.processes``: DDP over NCCL) with the same per-GPU batch.

--smoke runs the same code on the CPU in seconds (ResNet-18, 32×32, a few images) and writes its JSON to a temp
folder: CI runs it (tests/test_benchmarks.py). Without a GPU a full run stops with a message instead of timing a CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import torch
from bench_cli import run_benchmark
from rich.console import Console
from rich.table import Table

from pipeline.config import load_config
from pipeline.retrain.sites import load_site, prepare_site
from pipeline.retrain.source import train_source

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "benchmarks" / "results" / "gpu-train.json"
TARGET_IMAGES_PER_SECOND = 3000.0
A100_REFERENCE = 2470.0  # NVIDIA Deep Learning Examples, ResNet-50 v1.5 training, A100 80GB, AMP, batch 256
PER_GPU_BATCH = 256
DEFAULTS = [
    "data.source=kermany-pediatric",
    "data.external=[]",
    "crosssim.enabled=false",
    "data.image_size=224",
    "train.backbone=resnet50",
    "train.amp=auto",  # bf16 on an H200
    "train.channels_last=auto",  # channels_last on every device
    "train.device=cuda",
    "train.early_stopping_patience=null",
]
SMOKE = [
    "data.max_images_per_class=24",
    "data.image_size=32",
    "train.backbone=resnet18",
    "train.device=cpu",
    "train.num_threads=1",  # CI runs two test files at once on 2 cores
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=1, help="GPUs to train on (data-parallel)")
    parser.add_argument("--epochs", type=int, default=6, help="epochs; the first one warms up")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    parser.add_argument("--smoke", action="store_true", help="seconds on the CPU (CI); not a result")
    parser.add_argument("--output", type=Path, default=None, help=f"result JSON (default {RESULT.relative_to(REPO)})")
    args = parser.parse_args()
    console = Console()
    if not args.smoke and not torch.cuda.is_available():
        console.print("[red]no CUDA device[/]: this benchmark measures GPU training (use --smoke to check it on a CPU)")
        raise SystemExit(2)
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-train-"))
    epochs = 2 if args.smoke else args.epochs
    batch = 8 if args.smoke else PER_GPU_BATCH * args.processes
    overrides = [*DEFAULTS, *(SMOKE if args.smoke else []), f"data.prepared_dir={work / 'prepared'}"]
    overrides += [f"train.epochs={epochs}", f"train.batch_size={batch}", f"train.processes={args.processes}"]
    overrides += [f"data.cache_dir={work / 'cache'}"] if args.smoke else []  # a smoke run leaves nothing behind
    cfg = load_config(REPO / "params.yaml", [*overrides, f"train.output_dir={work / 'train'}", *args.overrides])
    output = args.output or (work / RESULT.name if args.smoke else RESULT)

    manifest, _ = load_site(cfg, cfg.data.source)
    prepare_site(cfg, cfg.data.source, manifest)
    started = time.perf_counter()
    result = train_source(cfg, show_progress=sys.stdout.isatty())  # train.processes > 1: DDP over NCCL
    wall_seconds = time.perf_counter() - started
    per_epoch = [row["train_images_per_second"] for row in result.state.history]
    measured = statistics.median(per_epoch[1:]) if len(per_epoch) > 1 else per_epoch[0]
    train_images = int((manifest["split"] == "train").sum())

    report = {
        "benchmark": "gpu-train",
        "command": "make bench-gpu-train  # python benchmarks/gpu_train.py " + shlex.join(sys.argv[1:]),
        "smoke": args.smoke,
        "model": f"{cfg.train.backbone}, {cfg.data.image_size}x{cfg.data.image_size}, amp={cfg.train.amp}, "
        f"channels_last={cfg.train.channels_last}",
        "dataset": f"{cfg.data.source} train split, {train_images} real images",
        "processes": args.processes,
        "global_batch": cfg.train.batch_size,
        "train_images_per_second": measured,
        "per_epoch_images_per_second": per_epoch,
        "target_images_per_second": TARGET_IMAGES_PER_SECOND,
        "target_met": measured >= TARGET_IMAGES_PER_SECOND,
        "a100_reference_images_per_second": A100_REFERENCE,
        "wall_seconds": wall_seconds,
        "seed": cfg.seed,
        "hardware": {
            "gpu": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] or None,
            "cpu": platform.processor() or platform.machine(),
            "cores": torch.get_num_threads(),
        },
        "versions": {pkg: version(pkg) for pkg in ("torch", "torchvision")}
        | {"python": platform.python_version(), "cuda": torch.version.cuda},
        "date": time.strftime("%Y-%m-%d"),
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2, default=str) + "\n")
    table = Table(title=f"Training throughput: {report['model']}, {args.processes} process(es)")
    for column in ("measured images/s", "target", "A100 AMP (NVIDIA)"):
        table.add_column(column, justify="right")
    table.add_row(f"{measured:,.0f}", f"{TARGET_IMAGES_PER_SECOND:,.0f}", f"{A100_REFERENCE:,.0f}")
    console.print(table)
    console.print(f"result: {output}")


if __name__ == "__main__":
    run_benchmark(main)
