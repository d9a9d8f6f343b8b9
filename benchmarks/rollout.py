"""make bench-rollout: does the rollout's decision rule promote a truly better challenger, roll back a truly worse
one and leave an equivalent one alone — how fast, and how often wrongly? And does the drift alarm fire on a
shifted site, but not on the model's own kind of images?

Models (real, trained here): the champion is a ResNet-18 trained on Kermany (pediatric); the challengers are the
champion fine-tuned on NIH's labelled target-train patients (truly better on NIH), that fine-tuned model with its
probabilities inverted (truly worse: the Kermany champion is itself below chance on NIH adults, so inverting *it*
would make a better model, not a worse one), and the champion itself re-registered (equivalent). Every model scores the
NIH target-test patients (a patient-disjoint holdout, never used to train any of them): those real paired
predictions and labels are resampled into ``--streams`` streams of labelled cases, and the rule of
``pipeline.rollout.analysis.decide_cases`` is checked after every ``--batch`` cases, as the analysis flow would
(both models score every served image, so shadow and canary give the same paired cases). Drift: the champion's
drift reference is its Kermany calibration images (as registration stores it); windows of served NIH images of
growing size are tested until the alarm fires, and windows of Kermany test images count the false alarms.

    python benchmarks/rollout.py [--streams 200] [--batch 10] [--max-cases 600] [--smoke] [--output FILE] [--set k=v]
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from flows.model_steps import images_of
from pipeline.config import PipelineConfig, load_config
from pipeline.crosssim.finetune import finetune_on_labels
from pipeline.crosssim.stage import DomainData
from pipeline.crosssim.target import split_target
from pipeline.data.prepare import prepare_dataset
from pipeline.data.readers import read_dataset
from pipeline.data.splits import assign_splits, subsample
from pipeline.evaluation import binary_metrics
from pipeline.rollout.analysis import LabelledCase, decide_cases
from pipeline.rollout.drift import image_embedding, mmd_test
from pipeline.training import load_trained_model, train_model
from pipeline.training.engine import predict_proba

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "benchmarks" / "results" / "rollout.json"
DEFAULTS = ["data.image_size=64", "train.epochs=6", "crosssim.label_finetune_steps=150"]
SMOKE = ["data.max_images_per_class=16", "data.image_size=32", "train.epochs=1", "train.batch_size=16",
         "train.num_threads=1", "crosssim.label_finetune_steps=2", "rollout.min_labelled=10"]  # fmt: skip
CHALLENGERS = ("better", "worse", "equivalent")
RIGHT = {"better": "promote", "worse": "rollback", "equivalent": "continue"}
DRIFT_WINDOWS = (25, 50, 100, 200)
DRIFT_ALPHA_WINDOWS = 40  # Kermany test windows for the false-alarm rate


def _stream_decision(cases: list[LabelledCase], cfg: PipelineConfig, batch: int) -> tuple[str, int | None]:
    """The first non-continue decision when checked after every ``batch`` cases, and at how many labelled cases."""
    for n in range(batch, len(cases) + 1, batch):
        if n < cfg.rollout.min_labelled:
            continue
        decision = decide_cases(cases[:n], cfg.rollout).decision
        if decision != "continue":
            return decision, n
    return "continue", None


def _cases(labels: np.ndarray, champion: np.ndarray, challenger: np.ndarray, threshold: float) -> list[LabelledCase]:
    now = datetime.now(timezone.utc)
    return [
        LabelledCase(f"{i:032x}", now, "nih-cxr8", "champion", int(y), float(p), float(q), threshold, threshold)
        for i, (y, p, q) in enumerate(zip(labels, champion, challenger, strict=True))
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--batch", type=int, default=10, help="Labelled cases between two checks of the rule.")
    parser.add_argument("--max-cases", type=int, default=600, help="A stream still undecided after this continues.")
    parser.add_argument("--smoke", action="store_true", help="Seconds: tiny real subsets, 1 epoch, 10 streams (CI).")
    parser.add_argument("--output", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench-rollout-"))
    overrides = [*DEFAULTS, *(SMOKE if args.smoke else []), f"train.output_dir={work / 'train'}", *args.overrides]
    if args.smoke:
        overrides.append(f"data.cache_dir={work / 'cache'}")
        args.streams, args.max_cases = 10, 120
    output = args.output or (work / RESULT.name if args.smoke else RESULT)
    cfg = load_config(REPO / "params.yaml", overrides)
    console = Console(width=140)
    torch.manual_seed(cfg.seed)

    root = cfg.data.resolved_root()
    kermany = subsample(assign_splits(read_dataset(root / cfg.data.source), cfg.data.val_fraction, cfg.data.test_fraction, cfg.seed),
                        cfg.data.max_images_per_class, cfg.seed)  # fmt: skip
    source = prepare_dataset(kermany, cfg.data.image_size, cfg.data.cache_dir)
    nih = read_dataset(root / cfg.crosssim.target)
    nih = subsample(nih[nih["label"].notna()], cfg.data.max_images_per_class, cfg.seed).reset_index(drop=True)
    target = prepare_dataset(nih, cfg.data.image_size, cfg.data.cache_dir)
    console.print("[bold]champion[/]: ResNet-18 trained on Kermany")
    champion = load_trained_model(train_model(source, cfg, show_progress=sys.stdout.isatty()).model_path, cfg.train.backbone)
    split = split_target(target.manifest, cfg.crosssim.test_fraction, 1.0, cfg.seed)
    labelled = DomainData("nih-cxr8/target-train", images_of(target, split.train), split.train["label"].to_numpy("int64"))
    console.print("[bold]better challenger[/]: the champion fine-tuned on NIH's labelled target-train patients")
    better = finetune_on_labels(champion, labelled, cfg.crosssim.label_finetune_steps, cfg.train, cfg.augment, cfg.seed)
    test_images, test_labels = images_of(target, split.test), split.test["label"].to_numpy("int64")
    cpu = torch.device("cpu")
    champion_p = predict_proba(champion, test_images, cpu).astype(np.float64)
    better_p = predict_proba(better, test_images, cpu).astype(np.float64)
    probabilities = {"better": better_p, "worse": 1 - better_p, "equivalent": champion_p}
    threshold = 0.5
    scored = {"champion": champion_p, **probabilities}
    on_nih = {name: {key: binary_metrics(test_labels, p, threshold)[key] for key in ("auc", "sensitivity", "specificity")}
              for name, p in scored.items()}  # fmt: skip
    aucs = {name: metrics["auc"] for name, metrics in on_nih.items()}

    rng = np.random.default_rng(cfg.seed)
    results: dict[str, dict] = {}
    for name in CHALLENGERS:
        decisions, cases_needed = [], []
        for _ in range(args.streams):
            order = rng.integers(0, len(test_labels), args.max_cases)  # resampled from the real paired predictions
            cases = _cases(test_labels[order], champion_p[order], probabilities[name][order], threshold)
            decision, n = _stream_decision(cases, cfg, args.batch)
            decisions.append(decision)
            if n is not None and decision == RIGHT[name]:
                cases_needed.append(n)
        wrong = sum(d not in (RIGHT[name], "continue") for d in decisions) if name != "equivalent" else sum(d != "continue" for d in decisions)
        results[name] = {
            "auc_on_nih_test": aucs[name],
            "sensitivity_specificity_at_threshold": [on_nih[name]["sensitivity"], on_nih[name]["specificity"]],
            "decisions": {d: decisions.count(d) for d in ("promote", "rollback", "continue")},
            "wrong_rate": wrong / args.streams,
            "labelled_cases_to_decide_median": float(np.median(cases_needed)) if cases_needed else None,
            "labelled_cases_to_decide_p90": float(np.percentile(cases_needed, 90)) if cases_needed else None,
        }
        console.print(f"{name}: {results[name]}")

    # Drift: the champion's reference is its calibration images (Kermany val, as registration stores them)
    val_images, _ = source.subset(source.manifest["split"] == "val")
    kermany_test, _ = source.subset(source.manifest["split"] == "test")
    reference = image_embedding(np.asarray(val_images)[rng.permutation(len(val_images))[:200]])
    nih_all = np.asarray(target.images)
    detected_at = None
    for size in DRIFT_WINDOWS:
        window = image_embedding(nih_all[rng.choice(len(nih_all), min(size, len(nih_all)), replace=False)])
        if mmd_test(reference, window, seed=size).p_value < cfg.rollout.drift_alpha:
            detected_at = size
            break
    kermany_test = np.asarray(kermany_test)
    window_size = min(100, len(kermany_test))
    false_alarms = sum(
        mmd_test(reference, image_embedding(kermany_test[rng.choice(len(kermany_test), window_size, replace=False)]), seed=w).p_value
        < cfg.rollout.drift_alpha
        for w in range(DRIFT_ALPHA_WINDOWS if not args.smoke else 4)
    )
    windows = DRIFT_ALPHA_WINDOWS if not args.smoke else 4
    drift = {"nih_images_until_alarm": detected_at, "window_sizes_tried": list(DRIFT_WINDOWS),
             "kermany_test_false_alarm_rate": false_alarms / windows, "kermany_test_windows": windows,
             "kermany_test_window_size": window_size, "alpha": cfg.rollout.drift_alpha}  # fmt: skip

    wrong_total = sum(results[n]["wrong_rate"] for n in CHALLENGERS) / len(CHALLENGERS)
    report = {
        "benchmark": "rollout",
        "command": f"make bench-{'smoke' if args.smoke else 'rollout'}  # python benchmarks/rollout.py " + shlex.join(sys.argv[1:]),
        "smoke": args.smoke,
        "streams": args.streams,
        "check_every_labelled_cases": args.batch,
        "max_cases_per_stream": args.max_cases,
        "nih_test_cases": int(len(test_labels)),
        "rule": {"alpha": cfg.rollout.alpha, "min_labelled": cfg.rollout.min_labelled,
                 "sensitivity_margin": cfg.rollout.sensitivity_margin, "min_site_positives": cfg.rollout.min_site_positives},  # fmt: skip
        "champion_on_nih_test": on_nih["champion"],
        "challengers": results,
        "wrong_decision_rate": wrong_total,
        "better_promoted_after_median": results["better"]["labelled_cases_to_decide_median"],
        "worse_rolled_back_after_median": results["worse"]["labelled_cases_to_decide_median"],
        "drift": drift,
        "wall_seconds": time.perf_counter() - started,
        "seed": cfg.seed,
        "hardware": {"cpu": platform.processor() or platform.machine(), "cores": torch.get_num_threads(),
                     "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},  # fmt: skip
        "versions": {pkg: version(pkg) for pkg in ("torch", "numpy", "scipy")} | {"python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d"),
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2, default=str) + "\n")
    table = Table(title=f"Rollout decisions over {args.streams} resampled streams of real NIH predictions")
    for column in ("challenger", "AUC on NIH test", "promote", "rollback", "continue", "wrong", "cases to decide (median)"):
        table.add_column(column)
    for name in CHALLENGERS:
        r = results[name]
        table.add_row(name, f"{r['auc_on_nih_test']:.3f}", *(str(r["decisions"][d]) for d in ("promote", "rollback", "continue")),
                      f"{r['wrong_rate']:.1%}", str(r["labelled_cases_to_decide_median"]))  # fmt: skip
    console.print(table)
    console.print(f"champion AUC on NIH test {aucs['champion']:.3f}; drift: {drift}; wall {report['wall_seconds'] / 60:.1f} min; "
                  f"written {output}")  # fmt: skip


if __name__ == "__main__":
    main()
