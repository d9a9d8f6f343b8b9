"""make bench-rollout: does the rollout's decision rule promote a truly better challenger, roll back a truly worse
one and leave an equivalent one alone — how fast, and how often wrongly? And does the drift alarm fire on a
shifted site, but not on the model's own kind of images?

Models (real, trained here, cached per configuration): see ``rollout_models.py`` — a Kermany-trained champion and
three challengers (better: fine-tuned on NIH labels; worse: its label-inverted copy; equivalent: the champion
re-registered), each served at the threshold registration would give it. Live: each challenger is rolled out
against the champion while the NIH target-test films (patients never used to train any model) stream through
`crosssim serve` with their reads arriving ``--delay`` films later, and the rollout is analysed after every
``--batch`` reads (``rollout_replay.py``). Resampled: what the ledger recorded (both models' scores of every film,
paired) and the films' labels are resampled into ``--streams`` streams of up to ``--max-cases`` labelled cases, and
the same rule (``pipeline.rollout.analysis.decide_cases``) is checked after every ``--batch`` cases. Drift: the
champion's drift reference is its Kermany calibration images (as registration stores it); windows of served NIH
images of growing size are tested until the alarm fires, and windows of Kermany test images count false alarms.

    python benchmarks/rollout.py [--streams 200] [--batch 10] [--max-cases 600] [--delay 20] [--cache DIR]
                                 [--smoke] [--output FILE] [--set k=v]
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
from bench_cli import run_benchmark
from rich.console import Console
from rich.table import Table
from rollout_models import CHALLENGERS, models_cached, rollout_data, rollout_models
from rollout_replay import Replay, register_models, replay_all, replay_config

from pipeline.config import PipelineConfig, load_config
from pipeline.evaluation import binary_metrics
from pipeline.rollout.analysis import LabelledCase, decide_cases
from pipeline.rollout.drift import image_embedding, mmd_test
from pipeline.training.inference import predict_proba

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"
RESULT = REPO / "benchmarks" / "results" / "rollout.json"
# harmonisation none: the committed result was measured before histeq became the default
DEFAULTS = ["data.image_size=64", "data.harmonisation=none", "train.epochs=6", "crosssim.label_finetune_steps=150"]
SMOKE = ["data.max_images_per_class=16", "data.image_size=32", "train.epochs=1", "train.batch_size=16",
         "train.num_threads=1", "crosssim.label_finetune_steps=2", "rollout.min_labelled=10"]  # fmt: skip
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


def _cases(labels: np.ndarray, champion: np.ndarray, challenger: np.ndarray, thresholds: tuple[float, float],
           site: str) -> list[LabelledCase]:  # fmt: skip
    now = datetime.now(timezone.utc)
    return [
        LabelledCase(f"{i:032x}", now, site, "champion", int(y), float(p), float(q), *thresholds)
        for i, (y, p, q) in enumerate(zip(labels, champion, challenger, strict=True))
    ]


def _replayed(r: Replay) -> dict:
    return {"mode": r.mode, "films_served": r.served, "reads_posted": r.labelled, "first_decision": r.first_decision,
            "labelled_cases_at_decision": r.decided_at, "decision_after_all_reads": r.final_decision,
            "answered_by": r.answered_by, "max_abs_difference_served_vs_pytorch": r.max_abs_difference_from_pytorch,
            "seconds": r.seconds}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--batch", type=int, default=10, help="Labelled cases between two checks of the rule.")
    parser.add_argument("--max-cases", type=int, default=600, help="A stream still undecided after this continues.")
    parser.add_argument("--delay", type=int, default=20, help="Films served between a film and its read (live replay).")
    parser.add_argument("--cache", type=Path, default=REPO / ".cache" / "bench-rollout", help="Trained models, per configuration.")
    parser.add_argument("--smoke", action="store_true", help="Seconds: tiny real subsets, 1 epoch, 10 streams (CI).")
    parser.add_argument("--output", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench-rollout-"))
    overrides = [*DEFAULTS, *(SMOKE if args.smoke else []), f"train.output_dir={work / 'train'}", *args.overrides]
    if args.smoke:
        overrides.append(f"data.cache_dir={work / 'cache'}")
        args.streams, args.max_cases, args.delay, args.cache = 10, 120, 5, work / "models"
    output = args.output or (work / RESULT.name if args.smoke else RESULT)
    cfg = load_config(PARAMS, overrides)
    console = Console(width=140)
    torch.manual_seed(cfg.seed)

    data, source_val, target_train = rollout_data(cfg)
    cached = models_cached(cfg, args.cache)
    models = rollout_models(cfg, data, source_val, target_train, args.cache, log=console.print)
    labels, site = data.nih_test_labels, cfg.crosssim.target
    offline = {name: predict_proba(m.model, data.nih_test_images, torch.device("cpu")).astype(np.float64) for name, m in models.items()}
    on_nih = {name: {key: binary_metrics(labels, offline[name], m.threshold)[key] for key in ("auc", "sensitivity", "specificity")}
              | {"threshold": m.threshold, "threshold_chosen_on": m.threshold_chosen_on} for name, m in models.items()}  # fmt: skip

    replay_overrides = [*overrides, *replay_config(cfg, work / "replay")]
    replay_cfg = load_config(PARAMS, replay_overrides)
    console.print(f"[bold]live[/]: {len(labels)} NIH target-test films through `crosssim serve` per challenger, reads {args.delay} films later")
    versions = register_models(replay_cfg, models, data)
    replays = replay_all(replay_cfg, replay_overrides, versions, data, offline, args.delay, args.batch, cfg.seed)
    for name, r in replays.items():
        console.print(f"{name} ({r.mode}): first decision {r.first_decision} at {r.decided_at} reads; served vs PyTorch max |Δp| "
                      f"{r.max_abs_difference_from_pytorch:.2e}; {r.seconds:.0f} s")  # fmt: skip

    rng = np.random.default_rng(cfg.seed)
    champion_p = replays["better"].champion  # the champion's served scores (the same in every replay)
    thresholds = {name: (models["champion"].threshold, models[name].threshold) for name in CHALLENGERS}
    results: dict[str, dict] = {}
    for name in CHALLENGERS:
        decisions, cases_needed = [], []
        for _ in range(args.streams):
            order = rng.integers(0, len(labels), args.max_cases)  # resampled from the served, paired predictions
            cases = _cases(labels[order], champion_p[order], replays[name].challenger_p[order], thresholds[name], site)
            decision, n = _stream_decision(cases, cfg, args.batch)
            decisions.append(decision)
            if n is not None and decision == RIGHT[name]:
                cases_needed.append(n)
        wrong = sum(d not in (RIGHT[name], "continue") for d in decisions) if name != "equivalent" else sum(d != "continue" for d in decisions)
        results[name] = {
            "served": on_nih[name],
            "decisions": {d: decisions.count(d) for d in ("promote", "rollback", "continue")},
            "wrong_rate": wrong / args.streams,
            "labelled_cases_to_decide_median": float(np.median(cases_needed)) if cases_needed else None,
            "labelled_cases_to_decide_p90": float(np.percentile(cases_needed, 90)) if cases_needed else None,
            "live_replay": _replayed(replays[name]),
        }
        console.print(f"{name}: {results[name]['decisions']}, median {results[name]['labelled_cases_to_decide_median']}")

    # Drift: the champion's reference is its calibration images (Kermany val, as registration stores them)
    val_images, _ = data.source.subset(data.source.manifest["split"] == "val")
    kermany_test, _ = data.source.subset(data.source.manifest["split"] == "test")
    reference = image_embedding(np.asarray(val_images)[rng.permutation(len(val_images))[:200]])
    nih_all = np.asarray(data.target.images)
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
        "delay_films": args.delay,
        "nih_test_cases": int(len(labels)),
        "rule": {"alpha": cfg.rollout.alpha, "min_labelled": cfg.rollout.min_labelled,
                 "sensitivity_margin": cfg.rollout.sensitivity_margin, "min_site_positives": cfg.rollout.min_site_positives},  # fmt: skip
        "champion_on_nih_test": on_nih["champion"],
        "challengers": results,
        "wrong_decision_rate": wrong_total,
        "better_promoted_after_median": results["better"]["labelled_cases_to_decide_median"],
        "worse_rolled_back_after_median": results["worse"]["labelled_cases_to_decide_median"],
        "drift": drift,
        "wall_seconds": time.perf_counter() - started,
        "models_from_cache": cached,  # training them adds about 5 minutes on the 2-core CPU
        "seed": cfg.seed,
        "hardware": {"cpu": platform.processor() or platform.machine(), "cores": torch.get_num_threads(),
                     "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},  # fmt: skip
        "versions": {pkg: version(pkg) for pkg in ("torch", "numpy", "scipy")} | {"python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d"),
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2, default=str) + "\n")
    table = Table(title=f"Rollout decisions: live replay through crosssim serve, then {args.streams} resampled streams")
    for column in ("challenger", "AUC on NIH test", "sens / spec served", "live: first decision (reads)", "promote",
                   "rollback", "continue", "wrong", "cases to decide (median / p90)"):  # fmt: skip
        table.add_column(column)
    for name in CHALLENGERS:
        r, live = results[name], results[name]["live_replay"]
        table.add_row(name, f"{r['served']['auc']:.3f}", f"{r['served']['sensitivity']:.2f} / {r['served']['specificity']:.2f}",
                      f"{live['first_decision']} ({live['labelled_cases_at_decision']})",
                      *(str(r["decisions"][d]) for d in ("promote", "rollback", "continue")), f"{r['wrong_rate']:.1%}",
                      f"{r['labelled_cases_to_decide_median']} / {r['labelled_cases_to_decide_p90']}")  # fmt: skip
    console.print(table)
    champion = on_nih["champion"]
    console.print(f"champion on NIH test: AUC {champion['auc']:.3f}, sens / spec {champion['sensitivity']:.2f} / "
                  f"{champion['specificity']:.2f}; drift: {drift}; wall {report['wall_seconds'] / 60:.1f} min; written {output}")  # fmt: skip


if __name__ == "__main__":
    run_benchmark(main)
