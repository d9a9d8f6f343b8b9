"""make bench-loop: how many radiologist reads and weeks until a new hospital's model is as good as one trained on
all its labels, which cases the reads should be, and whether the loop ever promotes a wrong model.

Part ``strategies`` (this script; the simulated hospital is ``loop_simulation.py``): the NIH patients of the
project's target-train split (never the held-out ones) are replayed in weekly batches; each strategy's worklist asks
for ``--budget`` reads a week, they return ``--read-delay`` weeks later, warm-start retraining makes challengers, and
the rollout rule promotes or rolls them back on their own shadow traffic. Two references in the same run: the
**oracle** (warm-started on every replayed patient's label, the same recipe) and **batch fine-tuning** on as many
random labels as the loop ended with, without the loop. Every model is scored on the fixed held-out NIH patients
(``--eval-set DIR``: any NIH-format folder of patients; default the project's own patient split), with 95% CIs.

Start champion: a ResNet-18 trained on Kermany at ``make run``'s 64 px and preprocessing, served at the threshold
chosen on Kermany validation — ``make run``'s source model (its CrossSim adaptation, without target labels, leaves
NIH AUC at the same near-chance level: README "CrossSim benchmark"); ``--champion CHECKPOINT`` starts from another.

    python benchmarks/loop.py [--part strategies] [--strategies random uncertainty diverse hybrid] [--seeds 42 43 44]
        [--weeks 8] [--studies-per-week 60] [--budget 30] [--read-delay 1] [--eval-set DIR] [--champion PT]
        [--smoke] [--output FILE] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from loop_simulation import Hospital, LoopSettings, Model, Simulation, hospital_of, simulate, stream_weeks
from rich.console import Console
from rich.table import Table
from rollout_models import rollout_data, rollout_models

from pipeline.config import PipelineConfig, load_config
from pipeline.crosssim.engine import DomainData
from pipeline.loop.retrain import warm_start_retrain
from pipeline.loop.selection import STRATEGIES
from pipeline.models import build_model

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"
RESULT = REPO / "benchmarks" / "results" / "loop.json"
FIGURE = REPO / "benchmarks" / "results" / "loop-learning-curve.png"
DEFAULTS = ["data.image_size=64"]  # make run's resolution; everything else as params.yaml (make run's settings)
SMOKE = ["data.max_images_per_class=24", "data.image_size=32", "train.epochs=1", "train.batch_size=16",
         "crosssim.label_finetune_steps=2", "loop.retrain_steps=3", "rollout.min_labelled=4"]  # fmt: skip
LABEL_TARGET = 300  # the read budget for reaching 0.95 × oracle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["strategies"], default="strategies")
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44])
    parser.add_argument("--weeks", type=int, default=8)
    parser.add_argument("--studies-per-week", type=int, default=60)
    parser.add_argument("--budget", type=int, default=30, help="Reads the worklist asks for each week.")
    parser.add_argument("--read-delay", type=int, default=1, help="Weeks between a worklist and its reads.")
    parser.add_argument("--eval-set", type=Path, help="NIH-format folder of held-out patients (default: the project's split).")
    parser.add_argument("--champion", type=Path, help="A train checkpoint (state_dict) to start from instead.")
    parser.add_argument("--cache", type=Path, default=REPO / ".cache" / "bench-loop")
    parser.add_argument("--smoke", action="store_true", help="Seconds: a tiny real subset, 2 weeks, one seed (CI).")
    parser.add_argument("--output", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench-loop-"))
    overrides = [*DEFAULTS, *(SMOKE if args.smoke else []), f"train.output_dir={work / 'train'}", *args.overrides]
    if args.smoke:
        overrides.append(f"data.cache_dir={work / 'cache'}")
        args.seeds, args.weeks, args.studies_per_week, args.budget, args.cache = args.seeds[:1], 3, 8, 4, work / "models"
    output = args.output or (work / RESULT.name if args.smoke else RESULT)
    cfg = load_config(PARAMS, overrides)
    console = Console(width=150)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    data, source_val, target_train = rollout_data(cfg, args.eval_set)
    cache = args.cache / hashlib.sha256(str(args.eval_set.resolve() if args.eval_set else "project").encode()).hexdigest()[:8]
    champion = rollout_models(cfg, data, source_val, target_train, cache, log=console.print)["champion"]
    network = champion.model
    if args.champion is not None:
        network = build_model(cfg.train.backbone)
        network.load_state_dict(torch.load(args.champion, map_location="cpu", weights_only=True))
    manifest = data.target.manifest  # replayed: the patients of the project's target-train, never the held-out ones
    pool_rows = manifest[~manifest["patient_id"].isin(set(data.nih_test["patient_id"]))].reset_index(drop=True)
    hospital = hospital_of(cfg.crosssim.target, data.target.images_of(pool_rows), pool_rows, data.nih_test_images, data.nih_test)
    start = Model.of(1, network.eval(), champion.threshold, 0, hospital)
    console.print(f"replayed: {len(hospital.images)} NIH images of {len(set(hospital.patients))} patients; held out: "
                  f"{len(hospital.eval_labels)} images; start champion AUC {start.held_out(hospital)['auc']:.3f}")  # fmt: skip

    runs: dict[str, list[Simulation]] = {strategy: [] for strategy in args.strategies}
    references: list[dict] = []
    for seed in args.seeds:
        for strategy in args.strategies:
            settings = LoopSettings(strategy, seed, args.weeks, args.studies_per_week, args.budget, args.read_delay,
                                    max(1, math.ceil(cfg.loop.worklist_window_days / 7)))  # fmt: skip
            runs[strategy].append(simulate(hospital, start, settings, cfg, log=console.print))
            _write(output, _report(args, cfg, runs, references, hospital, start, started, partial=True))
        references.append(_references(hospital, start, cfg, runs, seed, args))
        console.print(f"seed {seed} references: {references[-1]}")
    report = _report(args, cfg, runs, references, hospital, start, started, partial=False)
    _write(output, report)
    figure = FIGURE if output == RESULT else output.with_suffix(".png")
    _figure(report, figure)
    _print(report, console)
    console.print(f"written {output} and {figure}; wall {report['wall_minutes']:.1f} min")


def _references(hospital: Hospital, start: Model, cfg: PipelineConfig, runs: dict[str, list[Simulation]], seed: int,
                args: argparse.Namespace) -> dict:  # fmt: skip
    """Oracle (every replayed label) and batch fine-tuning (as many random labels as the loop ended with), per seed."""
    final = max(run.weeks[-1]["labelled"] for strategy_runs in runs.values() for run in strategy_runs if run.settings.seed == seed)
    replayed = np.concatenate(stream_weeks(hospital, runs[args.strategies[0]][-1].settings))
    rng = np.random.default_rng(seed)
    chosen = {"oracle": replayed, "batch_finetune": rng.choice(replayed, final, replace=False)}
    out = {"seed": seed, "batch_labels": int(final)}
    for name, rows in chosen.items():
        reads = DomainData(name, hospital.images[rows], hospital.labels[rows])
        made = warm_start_retrain(start.network, reads, cfg.loop, cfg.train, cfg.augment, seed)
        scored = Model.of(0, made.model, made.threshold, len(rows), hospital).held_out(hospital)
        out[name] = {"labels": int(len(rows)), **scored, "seconds": made.seconds}
    return out


def _mean(values: list[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def _curves(runs: dict[str, list[Simulation]]) -> dict[str, list[dict]]:
    """Per strategy and week, means over seeds: reads so far and the champion's held-out AUC."""
    curves = {}
    for strategy, sims in runs.items():
        if not sims:
            continue
        weeks = min(len(sim.weeks) for sim in sims)
        curves[strategy] = [
            {"week": w, "labelled": _mean([sim.weeks[w]["labelled"] for sim in sims]),
             "auc": _mean([sim.weeks[w]["auc"] for sim in sims]),
             "auc_sd": float(np.std([sim.weeks[w]["auc"] for sim in sims])),
             "candidate_auc": _mean([sim.weeks[w]["candidate_auc"] for sim in sims]),
             "candidate_auc_sd": float(np.std([sim.weeks[w]["candidate_auc"] for sim in sims]))}  # fmt: skip
            for w in range(weeks)
        ]
    return curves


def _labels_to_reach(curve: list[dict], auc: float) -> float | None:
    reached = [point["labelled"] for point in curve if point["candidate_auc"] >= auc]
    return min(reached) if reached else None


def _report(args, cfg: PipelineConfig, runs, references, hospital: Hospital, start: Model, started: float, partial: bool) -> dict:
    curves = _curves(runs)
    oracle = _mean([r["oracle"]["auc"] for r in references])
    finals = {s: c[-1] for s, c in curves.items()}
    within = {s: [p for p in c if p["labelled"] <= LABEL_TARGET] for s, c in curves.items()}
    # the best strategy by what its reads taught (the final candidate), the champion by what the rule let through
    best = max(finals, key=lambda s: finals[s]["candidate_auc"]) if finals else None
    at_300 = max((within[s][-1]["auc"] for s in within if within[s]), default=float("nan"))
    learnt_300 = max((within[s][-1]["candidate_auc"] for s in within if within[s]), default=float("nan"))
    share = None
    if "random" in curves and best is not None and best != "random":
        needed = _labels_to_reach(curves[best], finals["random"]["candidate_auc"])
        share = None if needed is None or not finals["random"]["labelled"] else needed / finals["random"]["labelled"]
    decisions = [asdict(d) | {"wrong": d.wrong, "strategy": s, "seed": sim.settings.seed}
                 for s, sims in runs.items() for sim in sims for d in sim.decisions]  # fmt: skip
    weeks = [w | {"strategy": s, "seed": sim.settings.seed} for s, sims in runs.items() for sim in sims for w in sim.weeks]
    retrains = [asdict(r) | {"strategy": s, "seed": sim.settings.seed} for s, sims in runs.items() for sim in sims for r in sim.retrains]
    estimate_errors = [abs(w["estimated_auc"] - w["served_week_auc"]) for w in weeks if not math.isnan(w["served_week_auc"])]
    return {
        "benchmark": "loop",
        "part": args.part,
        "partial": partial,
        "command": f"make bench-loop  # python benchmarks/loop.py {shlex.join(sys.argv[1:])}",
        "smoke": args.smoke,
        "seeds": args.seeds,
        "seed": args.seeds[0],
        "strategies": args.strategies,
        "settings": {"weeks": args.weeks, "studies_per_week": args.studies_per_week, "budget": args.budget,
                     "read_delay_weeks": args.read_delay, "eval_set": str(args.eval_set) if args.eval_set else "project split",
                     "image_size": cfg.data.image_size, "harmonisation": cfg.data.harmonisation, "loop": cfg.loop.model_dump(mode="json"),
                     "rule": {"alpha": cfg.rollout.alpha, "min_labelled": cfg.rollout.min_labelled}},  # fmt: skip
        "replayed_images": int(len(hospital.images)),
        "held_out_images": int(len(hospital.eval_labels)),
        "start_champion": start.held_out(hospital),
        "auc_vs_oracle_at_300": at_300 / oracle if oracle == oracle else None,
        "candidate_auc_vs_oracle_at_300": learnt_300 / oracle if oracle == oracle else None,
        "labels_share_to_match_random": share,
        "best_strategy": best,
        "wrong_promotions": sum(d["wrong"] for d in decisions),
        "promotions": sum(d["decision"] == "promote" for d in decisions),
        "rollbacks": sum(d["decision"] == "rollback" for d in decisions),
        "cycle_seconds_max": max((w["cycle_seconds"] for w in weeks), default=None),
        "estimated_auc_error_max": max(estimate_errors, default=None),
        "wall_minutes": (time.perf_counter() - started) / 60,
        "wall_seconds": time.perf_counter() - started,
        "oracle_auc": oracle,
        "batch_finetune_auc": _mean([r["batch_finetune"]["auc"] for r in references]),
        "curves": curves,
        "references": references,
        "decisions": decisions,
        "retrains": retrains,
        "weeks": weeks,
        "hardware": {"cpu": platform.processor() or platform.machine(), "cores": torch.get_num_threads(),
                     "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},  # fmt: skip
        "versions": {pkg: version(pkg) for pkg in ("torch", "torchvision", "numpy")} | {"python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d"),
    }


def _write(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".partial")
    temporary.write_text(json.dumps(report, indent=2, default=str) + "\n")
    temporary.replace(path)


def _figure(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for strategy, curve in report["curves"].items():
        labelled = [p["labelled"] for p in curve]
        line = axes.plot(labelled, [p["candidate_auc"] for p in curve], marker="o", label=f"{strategy}: model on its reads")[0]
        axes.plot(labelled, [p["auc"] for p in curve], linestyle=":", color=line.get_color(), label=f"{strategy}: champion")
    if report["references"]:
        axes.axhline(report["oracle_auc"], color="black", linestyle="--", label="oracle (all replayed labels)")
        labels = _mean([r["batch_labels"] for r in report["references"]])
        axes.scatter([labels], [report["batch_finetune_auc"]], marker="*", s=150, color="grey", zorder=3,
                     label="batch fine-tuning, random labels")  # fmt: skip
    axes.axhline(report["start_champion"]["auc"], color="red", linestyle=":", label="start champion")
    axes.set_xlabel("radiologist reads returned")
    axes.set_ylabel("AUC, held-out NIH patients")
    axes.set_title(f"Learning loop at NIH: mean of {len(report['seeds'])} seeds, {report['settings']['budget']} reads/week")
    axes.legend(fontsize=8, loc="lower right")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _print(report: dict, console: Console) -> None:
    table = Table(title="Held-out NIH AUC by week, mean over seeds: the week's retrained model / the champion (reads)")
    table.add_column("strategy")
    weeks = max((len(c) for c in report["curves"].values()), default=0)
    for week in range(weeks):
        table.add_column(f"w{week}")
    for strategy, curve in report["curves"].items():
        table.add_row(strategy, *(f"{p['candidate_auc']:.3f} / {p['auc']:.3f} ({p['labelled']:.0f})" for p in curve))
    console.print(table)
    console.print(
        f"oracle {report['oracle_auc']:.3f}; batch fine-tuning {report['batch_finetune_auc']:.3f}; best {report['best_strategy']}; "
        f"AUC/oracle at ≤300 reads {report['auc_vs_oracle_at_300']}; label share to match random {report['labels_share_to_match_random']}; "
        f"promotions {report['promotions']} (wrong {report['wrong_promotions']}), rollbacks {report['rollbacks']}; "
        f"max cycle {report['cycle_seconds_max']:.1f} s; max |estimated − true AUC| {report['estimated_auc_error_max']}"
    )


if __name__ == "__main__":
    main()
