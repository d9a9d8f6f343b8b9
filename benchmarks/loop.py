"""make bench-loop: how many radiologist reads and weeks until a new hospital's model is as good as one trained on
all its labels, which cases the reads should be, and whether the loop ever promotes a wrong model.

Part ``strategies`` (this script; the simulated hospital is ``loop_simulation.py``): the NIH patients of the
project's target-train split (never the held-out ones) are replayed in weekly batches; each strategy's worklist asks
for ``--budget`` reads a week, they return ``--read-delay`` weeks later, warm-start retraining makes challengers, and
the rollout rule promotes or rolls them back on their own shadow traffic. Two references in the same run: the
**oracle** (warm-started on every replayed patient's label, the same recipe) and **batch fine-tuning** on as many
random labels as the loop ended with, without the loop. Every model is scored on the fixed held-out NIH patients
(``--eval-set DIR``: any NIH-format folder of patients; default the project's own patient split), with 95% CIs.

Part ``live`` (``loop_live.py``): the same hospital, one strategy and seed, through a running `crosssim serve` (real
HTTP: /v1/predict, /v1/worklist, /v1/feedback) and the ``crosssim-continuous-learning`` deployment served by
`crosssim serve-flows` on a Prefect server, one run per week; its results go into the ``live`` section of the same
JSON.

Start champion: a ResNet-18 trained on Kermany at ``make run``'s 64 px and preprocessing, served at the threshold
chosen on Kermany validation — ``make run``'s source model (its CrossSim adaptation, without target labels, leaves
NIH AUC at the same near-chance level: README "CrossSim benchmark"); ``--champion CHECKPOINT`` starts from another.

    python benchmarks/loop.py [--part strategies|live] [--strategies random uncertainty diverse hybrid] [--seeds 42 43 44]
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
from bench_cli import run_benchmark
from loop_simulation import Hospital, LoopSettings, Model, Simulation, hospital_of, simulate, stream_weeks
from rich.console import Console
from rich.table import Table
from rollout_models import rollout_data, rollout_models

from pipeline.config import PipelineConfig, load_config
from pipeline.crosssim.engine import DomainData
from pipeline.loop.retrain import warm_start_retrain
from pipeline.loop.selection import STRATEGIES
from pipeline.models import build_model
from pipeline.tracking import MlflowTracker

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
    parser.add_argument(
        "--part",
        choices=["strategies", "live"],
        default="strategies",
        help="strategies: the stage functions in one process; live: crosssim serve + the deployment's flow.",
    )
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES,
                        help="Default: all four (strategies part); loop.worklist_strategy (live part, which runs one).")
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
    args.live_default = args.part == "live" and args.strategies is None
    args.strategies = args.strategies or list(STRATEGIES)
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench-loop-"))
    overrides = [*DEFAULTS, *(SMOKE if args.smoke else []), f"train.output_dir={work / 'train'}", *args.overrides]
    if args.smoke:
        overrides += [f"data.cache_dir={work / 'cache'}", f"tracking.local_dir={work / 'mlflow'}"]
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

    if args.part == "live":
        _live(args, cfg, overrides, hospital, pool_rows, start, champion, data, work, output, started, console)
        return
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
    run_id = _log_to_mlflow(cfg, output, figure)
    _print(report, console)
    console.print(
        f"written {output} and {figure} (also MLflow run {run_id}); wall {report['strategies_wall_minutes']:.1f} min"
    )


def _log_to_mlflow(cfg: PipelineConfig, output: Path, figure: Path) -> str:
    """The learning-curve figure and the result JSON as artifacts of an MLflow run (experiment ``bench-loop`` of
    the configured tracking store), where the registry's reviewers already look."""
    tracking = cfg.tracking.model_copy(update={"experiment": "bench-loop"})
    with MlflowTracker(tracking, run_name="bench-loop") as tracker:
        tracker.log_artifact(figure, "bench-loop")
        tracker.log_artifact(output, "bench-loop")
        return tracker.run_id


def _live(args, cfg: PipelineConfig, overrides: list[str], hospital: Hospital, pool_rows, start: Model, champion,
          data, work: Path, output: Path, started: float, console: Console) -> None:  # fmt: skip
    """Part live (benchmarks/loop_live.py): one strategy (loop.worklist_strategy, or the first of --strategies), one
    seed (the first)."""
    from loop_live import live_overrides, register_start_champion, run_live, serving_flows, site_repository
    from servers import prefect_api

    strategy, seed = (cfg.loop.worklist_strategy if args.live_default else args.strategies[0]), args.seeds[0]
    live = [*overrides, *live_overrides(cfg, work)]
    live_cfg = load_config(PARAMS, live)
    site_repository(work / "site-repo")
    settings = LoopSettings(strategy, seed, args.weeks, args.studies_per_week, args.budget, args.read_delay, 1)
    weeks = stream_weeks(hospital, settings)
    val_images, _ = data.source.subset(data.source.manifest["split"] == "val")
    calibration = np.asarray(val_images)[: cfg.serve.export.calibration_images]
    files = [Path(path) for path in pool_rows["path"]]
    register_start_champion(live_cfg.in_run_folder(work / "start"), start.network, start.threshold,
                            champion.threshold_chosen_on, calibration)  # fmt: skip
    with prefect_api(work / "prefect", work / "prefect-server.log") as api, \
            serving_flows(live, api, hospital.site, work / "serve-flows.log") as deployment:  # fmt: skip
        run = run_live(live_cfg, live, deployment, hospital, files, weeks, start.threshold, args.budget, args.read_delay,
                       strategy, log=console.print)  # fmt: skip
    cycles = [w["cycle_seconds"] for w in run.weeks]
    section = {
        "command": f"make bench-loop BENCH_ARGS='--part live'  # python benchmarks/loop.py {shlex.join(sys.argv[1:])}",
        "strategy": strategy, "seed": seed,
        "settings": {"weeks": len(weeks), "studies_per_week": args.studies_per_week, "budget": args.budget,
                     "read_delay_weeks": args.read_delay, "image_size": cfg.data.image_size},
        "start_champion": start.held_out(hospital), "weeks": run.weeks, "cycles": run.cycles, "decisions": run.decisions,
        "promotions": sum(d["decision"] == "promote" for d in run.decisions),
        "rollbacks": sum(d["decision"] == "rollback" for d in run.decisions),
        "wrong_promotions": sum(bool(d.get("wrong")) for d in run.decisions),
        "cycle_seconds_max": max(cycles, default=None), "cycle_seconds_median": float(np.median(cycles)) if cycles else None,
        "estimated_auc_error_max": max((abs(w["estimated_auc"] - w["served_week_auc"]) for w in run.weeks
                                        if not math.isnan(w["served_week_auc"])), default=None),
        "wall_minutes": (time.perf_counter() - started) / 60, "date": time.strftime("%Y-%m-%d"),
        "hardware": {"cpu": platform.processor() or platform.machine(), "cores": torch.get_num_threads()},
        "versions": {pkg: version(pkg) for pkg in ("torch", "mlflow", "prefect", "fastapi")} | {"python": platform.python_version()},
    }  # fmt: skip
    _write(output, {"live": section, "smoke": args.smoke})
    table = Table(title=f"Live loop ({strategy}, seed {seed}): crosssim serve + the continuous-learning flow, by week")
    for column in ("week", "reads", "champion", "held-out AUC", "estimated / served-week AUC", "cycle", "seconds"):
        table.add_column(column)
    for w in run.weeks:
        table.add_row(str(w["week"]), str(w["labelled"]), f"v{w['champion']}", f"{w['auc']:.3f}",
                      f"{w['estimated_auc']:.3f} / {w['served_week_auc']:.3f}", w["cycle"], f"{w['cycle_seconds']:.0f}")  # fmt: skip
    console.print(table)
    console.print(f"promotions {section['promotions']} (wrong {section['wrong_promotions']}), rollbacks {section['rollbacks']}; "
                  f"max cycle {section['cycle_seconds_max']:.0f} s; written {output}")  # fmt: skip


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
        "strategies_wrong_promotions": sum(d["wrong"] for d in decisions),
        "promotions": sum(d["decision"] == "promote" for d in decisions),
        "rollbacks": sum(d["decision"] == "rollback" for d in decisions),
        "strategies_cycle_seconds_max": max((w["cycle_seconds"] for w in weeks), default=None),
        "estimated_auc_error_max": max(estimate_errors, default=None),
        "strategies_wall_minutes": (time.perf_counter() - started) / 60,
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
    """Into ``path`` (atomically), keeping the other part's results: the strategies part owns the top level, the
    live part its ``live`` section. The target keys combine both: the longer part's wall time, a live cycle (the
    one the 5 min target means) when the live part ran, and the wrong promotions of both."""
    path.parent.mkdir(parents=True, exist_ok=True)
    earlier = json.loads(path.read_text()) if path.is_file() else {}
    if set(report) <= {"live", "smoke"}:
        merged = {**earlier, "live": report["live"]}
    else:
        merged = {**report, **({"live": earlier["live"]} if "live" in earlier else {})}
    live = merged.get("live", {})
    for key in ("wall_minutes", "cycle_seconds_max", "wrong_promotions"):  # a strategies result from before the split
        merged.setdefault(f"strategies_{key}", merged.get(key))
    merged["wall_minutes"] = max(merged["strategies_wall_minutes"] or 0, live.get("wall_minutes") or 0)
    merged["cycle_seconds_max"] = live.get("cycle_seconds_max", merged["strategies_cycle_seconds_max"])
    merged["wrong_promotions"] = (merged["strategies_wrong_promotions"] or 0) + (live.get("wrong_promotions") or 0)
    temporary = path.with_suffix(".partial")
    temporary.write_text(json.dumps(merged, indent=2, default=str) + "\n")
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
        f"promotions {report['promotions']} (wrong {report['strategies_wrong_promotions']}), rollbacks {report['rollbacks']}; "
        f"max cycle {report['strategies_cycle_seconds_max']:.1f} s; max |estimated − true AUC| {report['estimated_auc_error_max']}"
    )


if __name__ == "__main__":
    run_benchmark(main)
