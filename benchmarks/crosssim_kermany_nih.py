"""make bench-crosssim: CrossSim on the real pediatric → adult shift (Kermany → NIH ChestX-ray8), five seeds.

Source = kermany-pediatric (official train; a patient-disjoint val carved from it per seed). Target = nih-cxr8,
split by patient per seed into target-train (labels hidden from adaptation, except the labelled share of the
10% rows) and target-test (labels used only for scoring; ``--test-set`` points at any other NIH-format folder of
held-out patients instead). Every variant of a seed starts from that seed's source model and is scored on that
seed's target-test with 95% bootstrap CIs; thresholds follow pipeline.crosssim.scoring.

Headline rows run on every seed; ablations (one thing left out each) on the first seed only. Source models are
cached per (seed, configuration) under .cache/bench-crosssim, so re-running a variant does not retrain them.
The paired difference CrossSim 10% − fine-tuning 10% is taken per seed (same split, same source model), with
its mean and a t-based 95% CI over seeds.

    python benchmarks/crosssim_kermany_nih.py [--seeds 42 43 44 45 46] [--only VARIANT ...] [--test-set DIR]
        [--jobs N] [--smoke] [--output FILE] [--set key=value ...]

--only runs the named variants (and source_only, which every row is compared with) and writes the JSON beside
the committed one unless --output says where. --smoke runs every variant in seconds (first seed, a tiny real
subset, a few steps) into a temp folder: CI runs it (tests/test_benchmarks.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path

import torch
from bench_cli import run_benchmark
from rich.console import Console
from rich.table import Table
from scipy import stats

from pipeline.config import PRETRAIN_WEIGHTS, PipelineConfig, load_config
from pipeline.crosssim.engine import UNLABELLED
from pipeline.crosssim.finetune import finetune_on_labels
from pipeline.crosssim.model import load_model
from pipeline.crosssim.scoring import evaluate_models
from pipeline.crosssim.stage import DomainData, run_crosssim
from pipeline.data.prepare import PreparedDataset, prepare_dataset, staged_entry
from pipeline.data.readers import read_dataset
from pipeline.data.splits import assign_splits, subsample
from pipeline.evaluation import Interval, format_with_interval
from pipeline.pretrain.stage import PretrainImages, PretrainResult, pretrain_backbone
from pipeline.retrain.data import CrossSimData, crosssim_data, target_split
from pipeline.training import load_trained_model, train_model

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "benchmarks" / "results" / "crosssim-kermany-nih.json"
SOURCE_CACHE = REPO / ".cache" / "bench-crosssim"
# Sized for the 2-core CPU budget (≤ 45 min for the whole table); see README "CrossSim benchmark".
DEFAULTS = [
    # sized for 45 min on 2 cores (64 px with 2× the steps took ≈ 2 h); the five-seed table took 51.9 min
    "data.image_size=48",
    "train.pretrained_weights=pretrain",  # one SimCLR backbone shared by the seeds (shared_pretraining)
    "pretrain.epochs=3",
    "train.epochs=3",
    "crosssim.head_warmup_steps=80",
    "crosssim.steps=120",
    "crosssim.label_finetune_steps=80",
    "crosssim.distill.steps=120",
    "crosssim.eval_every=40",
    "crosssim.diagnostics_samples=150",
    "evaluate.bootstrap_samples=1000",
]
LABELLED_FRACTION = 0.1
JOBS = 1  # worker processes; on 2 cores two workers of one thread ran no faster than one process of two threads


@dataclass(frozen=True)
class Variant:
    """One row of the table: how its model is made from the seed's source model."""

    kind: str  # source | crosssim | finetune
    labelled_fraction: float = 0.0
    overrides: list[str] = field(default_factory=list)  # the variant's CrossSim settings
    source: list[str] = field(default_factory=list)  # settings that change the source model (its own, cached)
    every_seed: bool = False  # headline row; else an ablation on the first seed


VARIANTS = {
    "source_only": Variant("source", every_seed=True),
    "crosssim": Variant("crosssim", every_seed=True),  # + crosssim_no_distillation: its teacher, scored too
    "crosssim_10pct": Variant("crosssim", LABELLED_FRACTION, every_seed=True),  # + its teacher
    "finetune_10pct": Variant("finetune", LABELLED_FRACTION, every_seed=True),
    "oracle": Variant("finetune", 1.0, every_seed=True),
    "crosssim_no_pretraining": Variant("crosssim", source=["train.pretrained_weights=null"]),
    "crosssim_no_harmonisation": Variant("crosssim", source=["data.harmonisation=none"]),
    "crosssim_no_alignment": Variant("crosssim", overrides=["crosssim.alignment=off"]),
    "crosssim_no_augmentation": Variant("crosssim", overrides=["crosssim.augment=false"]),
    "dann": Variant(
        "crosssim",
        overrides=[
            "crosssim.alignment=dann",
            "crosssim.consistency_weight=0",
            "crosssim.target_batchnorm=false",
            "crosssim.distill.enabled=false",
        ],
    ),
    "crosssim_10pct_no_consistency": Variant(
        "crosssim", LABELLED_FRACTION, overrides=["crosssim.label_consistency_weight=0"]
    ),
}
TEACHERS = {"crosssim": "crosssim_no_distillation", "crosssim_10pct": "crosssim_10pct_no_distillation"}
METRICS = ("auc", "accuracy", "sensitivity", "specificity")
SMOKE = [  # --smoke: every variant on 12 images per split and class of each site, a step or two each
    "data.max_images_per_class=12",
    "data.image_size=16",
    "train.epochs=1",
    "train.batch_size=8",
    "train.num_threads=1",  # CI runs two test files at once on 2 cores: more threads thrash (~5× slower)
    "pretrain.epochs=1",
    "pretrain.batch_size=16",
    "crosssim.steps=2",
    "crosssim.eval_every=2",
    "crosssim.batch_size=4",
    "crosssim.label_finetune_steps=1",
    "crosssim.diagnostics_samples=10",
    "crosssim.distill.steps=2",
    "evaluate.bootstrap_samples=20",
]


def _interactive() -> bool:
    """Progress bars on a terminal, from the main process only: two workers' bars on one terminal garble it."""
    return sys.stdout.isatty() and multiprocessing.parent_process() is None


def _finetune(source_model, data: DomainData, cfg: PipelineConfig) -> torch.nn.Module:
    """The fine-tuning baseline (and the oracle): plain supervised fine-tuning, the recipe CrossSim
    with labels also uses when ``crosssim.label_consistency_weight`` is 0."""
    settings = cfg.crosssim
    return finetune_on_labels(
        source_model, data, settings.label_finetune_steps, settings.label_finetune_lr, cfg.train, cfg.augment, cfg.seed
    )


class Sites:
    """The two sites, read once; each seed draws its own patient splits, prepared through the cache."""

    def __init__(self, cfg: PipelineConfig) -> None:
        root = cfg.data.resolved_root()
        self.kermany = read_dataset(root / cfg.data.source)
        nih = read_dataset(root / cfg.crosssim.target)
        self.nih = nih[nih["label"].notna()].reset_index(drop=True)
        self._prepared: dict[tuple, tuple[PreparedDataset, PreparedDataset]] = {}

    def prepared(self, cfg: PipelineConfig) -> tuple[PreparedDataset, PreparedDataset]:
        """Kermany with this seed's val carved by patient (decoding ~6k small JPEGs takes seconds), and NIH (its
        target-test is drawn by crosssim_data, per seed). Kept for the process's next task of the same seed and data."""
        key = (cfg.seed, cfg.data.preprocessing(), cfg.data.max_images_per_class, str(cfg.data.cache_dir))
        if key not in self._prepared:
            self._prepared[key] = self._prepare(cfg)
        return self._prepared[key]

    def _prepare(self, cfg: PipelineConfig) -> tuple[PreparedDataset, PreparedDataset]:
        kermany = assign_splits(self.kermany, cfg.data.val_fraction, cfg.data.test_fraction, cfg.seed)
        kermany = subsample(kermany, cfg.data.max_images_per_class, cfg.seed).reset_index(drop=True)
        nih = subsample(self.nih, cfg.data.max_images_per_class, 0).reset_index(drop=True)
        preprocessing = cfg.data.preprocessing()
        return (
            prepare_dataset(kermany, preprocessing, cfg.data.cache_dir),
            prepare_dataset(nih, preprocessing, cfg.data.cache_dir),
        )


def shared_pretraining(sites: Sites, cfg: PipelineConfig, seeds: list[int], test_set: Path | None) -> PretrainResult:
    """One self-supervised backbone for every seed, on images no seed scores on: Kermany's official train split (its
    test split never) and the NIH patients that no seed holds out as target-test."""
    kermany, nih = sites.prepared(cfg)
    tested: set[str] = set()
    for seed in seeds:
        tested |= set(target_split(cfg.model_copy(update={"seed": seed, "crosssim": cfg.crosssim.model_copy(
            update={"test_set": test_set})}), nih, 0.0).test["patient_id"])  # fmt: skip
    sets = [
        PretrainImages(cfg.data.source, "train", kermany, kermany.manifest[kermany.manifest["split"] != "test"]),
        PretrainImages(cfg.crosssim.target, "target-train", nih, nih.manifest[~nih.manifest["patient_id"].isin(tested)]),
    ]
    return pretrain_backbone(sets, cfg.pretrain, cfg.train.backbone, cfg.seed, cfg.train, show_progress=_interactive())


def _config(base: list[str], seed: int, work: Path, extra: list[str]) -> PipelineConfig:
    return load_config(
        REPO / "params.yaml",
        [*DEFAULTS, *base, f"seed={seed}", f"train.output_dir={work / 'train'}", f"crosssim.output_dir={work / 'adapt'}", *extra],
    )


def source_model(cfg: PipelineConfig, source: PreparedDataset, cache: Path, console: Console) -> tuple[torch.nn.Module, float]:
    """The seed's source model and its val AUC: trained once per (seed, data, training configuration), then cached."""
    identity = {
        "seed": cfg.seed,
        "prepared": source.key,
        "train": cfg.train.model_dump(mode="json", exclude={"output_dir", "device", "num_threads", "processes", "resume"}),
        "augment": cfg.augment.model_dump(mode="json"),
    }
    entry = cache / hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    if not (entry / "summary.json").is_file():
        console.print(f"seed {cfg.seed}: training the source model")
        with staged_entry(entry, "summary.json") as staging:
            trained = train_model(source, cfg.model_copy(update={"train": cfg.train.model_copy(update={"output_dir": staging})}),
                                  show_progress=_interactive())  # fmt: skip
            summary = {"identity": identity, "val_auc": trained.state.best_val_auc}
            (staging / "summary.json").write_text(json.dumps(summary, indent=2))
    summary = json.loads((entry / "summary.json").read_text())
    return load_trained_model(entry / "best.pt", cfg.train.backbone), summary["val_auc"]


@dataclass(frozen=True)
class Task:
    """One variant of one seed: a unit of work a worker process runs on its own."""

    seed: int
    name: str
    overrides: tuple[str, ...]  # the run's settings (--set, the shared backbone)
    test_set: Path | None
    cache: Path

    @property
    def source_settings(self) -> tuple[str, ...]:
        return tuple(VARIANTS[self.name].source)

    def config(self, work: Path) -> PipelineConfig:
        return _config([*self.overrides, *self.source_settings], self.seed, work, [])


# rough cost of a variant, so the longest start first and the workers finish together
COST = {"source": 0, "finetune": 1, "crosssim": 2}


def _cost(task: Task) -> float:
    variant = VARIANTS[task.name]
    return COST[variant.kind] + (1 if variant.kind == "crosssim" and variant.labelled_fraction else 0)


def train_source(task: Task) -> None:
    """Trains (or finds in the cache) the source model ``task``'s variant starts from."""
    work = Path(tempfile.mkdtemp(prefix=f"bench-crosssim-{task.seed}-"))
    cfg = task.config(work)
    source_model(cfg, _SITES[0].prepared(cfg)[0], task.cache, Console(width=160))
    shutil.rmtree(work, ignore_errors=True)


def variant_rows(task: Task) -> tuple[dict, dict[str, dict]]:
    """The seed's facts (headline configuration only, else empty) and the rows of ``task``'s variant (and its
    teacher), scored on the seed's target-test."""
    work = Path(tempfile.mkdtemp(prefix=f"bench-crosssim-{task.seed}-{task.name}-"))
    cfg = task.config(work)
    source, target = _SITES[0].prepared(cfg)
    model, val_auc = source_model(cfg, source, task.cache, Console(width=160))
    variant = VARIANTS[task.name]
    unlabelled = crosssim_data(_target_split(cfg, 0.0, "source", task.test_set), source, target)
    data = crosssim_data(_target_split(cfg, variant.labelled_fraction, variant.kind, task.test_set), source, target)
    target_test = unlabelled.target_test
    facts = {} if task.source_settings else {
        "source_val_auc": val_auc, "n_target_train": len(unlabelled.target_train.labels),
        "n_target_test": len(target_test[1]), "n_target_test_pneumonia": int(target_test[1]["label"].sum()),
    }  # fmt: skip
    rows = {}
    made = _variant_models(task.name, model, data, cfg, [*task.overrides, *task.source_settings], work)
    for row, (variant_model, train_data, seconds, gap, deployed) in made.items():
        scored = evaluate_models({row: variant_model}, unlabelled.source_val, train_data, {"target-test": target_test},
                                 cfg.evaluate, work / "eval", torch.device("cpu"), task.seed)[row]  # fmt: skip
        point = scored.sets["target-test"].at_threshold
        rows[row] = {
            **{metric: point.value(metric) for metric in METRICS},
            "ci": {metric: asdict(point.ci[metric]) for metric in METRICS},
            "threshold": scored.threshold,
            "threshold_chosen_on": scored.threshold_chosen_on,
            "labelled_target_images": int((train_data.labels != UNLABELLED).sum()),
            "adapt_seconds": seconds,
            "domain_gap": gap,
            "model": deployed,
        }
    shutil.rmtree(work, ignore_errors=True)
    return facts, rows


def run_tasks(tasks: list[Task], sites: Sites, jobs: int, console: Console, partial: Path) -> list[dict]:
    """Every task's rows, grouped per seed in the order of ``tasks``; ``partial`` is rewritten as tasks finish, so
    an interrupted run still leaves its finished rows."""
    seeds = list(dict.fromkeys(task.seed for task in tasks))
    results: dict[int, dict] = {seed: {"seed": seed, "variants": {}} for seed in seeds}
    for task, (facts, rows) in _finished(tasks, sites, jobs):
        console.print(f"seed {task.seed}: {task.name} done")
        results[task.seed].update(facts)
        results[task.seed]["variants"].update(rows)
        partial.write_text(json.dumps(list(results.values()), indent=2, default=str))
    ordered = []
    for seed in seeds:
        order = [row for task in tasks if task.seed == seed for row in (task.name, TEACHERS.get(task.name))]
        variants = results[seed]["variants"]
        ordered.append({**results[seed], "variants": {row: variants[row] for row in order if row in variants}})
    return ordered


def _finished(tasks: list[Task], sites: Sites, jobs: int) -> Iterator[tuple[Task, tuple[dict, dict[str, dict]]]]:
    """(task, its rows) as tasks finish; every source model is in the cache before any variant starts, and the
    longest variants start first. With ``jobs`` > 1 they run in that many spawned worker processes (a forked torch
    can deadlock in OpenMP) of ``cores // jobs`` threads each, for machines with more cores than one process uses."""
    sources = list({(task.seed, task.source_settings): task for task in tasks}.values())
    ordered = sorted(tasks, key=_cost, reverse=True)
    if jobs == 1:
        _use_sites(sites, 0)
        for task in sources:
            train_source(task)
        yield from ((task, variant_rows(task)) for task in ordered)
        return
    threads = max(1, (os.cpu_count() or 1) // jobs)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_use_sites, initargs=(sites, threads)) as pool:
        try:
            for done in as_completed([pool.submit(train_source, task) for task in sources]):
                done.result()
            futures = {pool.submit(variant_rows, task): task for task in ordered}
            for done in as_completed(futures):
                yield futures[done], done.result()
        except BaseException:
            pool.shutdown(cancel_futures=True)  # a failed task stops the run now, not after the queued ones
            raise


_SITES: list[Sites] = []  # the process's sites: read once per worker, with the datasets it prepared


def _use_sites(sites: Sites, threads: int) -> None:
    """A worker's start (and the single process's): the sites its tasks read, and its torch threads (0: as is)."""
    _SITES[:] = [sites]
    if threads:
        torch.set_num_threads(threads)


def _target_split(cfg: PipelineConfig, fraction: float, kind: str, test_set: Path | None) -> PipelineConfig:
    selection = cfg.crosssim.selection_fraction if kind == "crosssim" else 0.0
    update = {"labelled_fraction": fraction, "test_set": test_set, "selection_fraction": selection}
    return cfg.model_copy(update={"crosssim": cfg.crosssim.model_copy(update=update)})


def _variant_models(name: str, model: torch.nn.Module, data: CrossSimData, cfg: PipelineConfig, settings: list[str],
                    work: Path) -> dict[str, tuple[torch.nn.Module, DomainData, float, dict | None, str]]:  # fmt: skip
    """The variant's model (and its teacher, for the distilled headline rows):
    row → (model, target-train, seconds, gap, which model: source | fine-tuned | adapted | student)."""
    variant, train_data, started = VARIANTS[name], data.target_train, time.perf_counter()
    if variant.kind == "source":
        return {name: (model, train_data, 0.0, None, "source")}
    if variant.kind == "finetune":
        return {name: (_finetune(model, train_data, cfg), train_data, time.perf_counter() - started, None, "fine-tuned")}
    variant_cfg = _config(settings, cfg.seed, work, [*variant.overrides, f"crosssim.labelled_fraction={variant.labelled_fraction}"])
    result = run_crosssim(model, cfg.data.image_size, data.source_train, data.source_val, train_data, variant_cfg,
                          show_progress=_interactive(), target_selection=data.target_selection)  # fmt: skip
    seconds, gap = time.perf_counter() - started, result.gap.to_dict()
    made = {name: (load_model(result.deployable_path), train_data, seconds, gap, result.deployable)}  # what CrossSim deploys
    if result.student_path is not None and name in TEACHERS:
        made[TEACHERS[name]] = (load_model(result.adapted_path), train_data, seconds, gap, "adapted")
    return made


def _gap_closed(adapted: float, source_only: float, oracle: float) -> float:
    """(adapted − source-only) / (oracle − source-only); NaN when the oracle gained nothing (tiny smoke sets)."""
    return (adapted - source_only) / (oracle - source_only) if oracle != source_only else float("nan")


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def paired_difference(differences: list[float]) -> dict[str, float]:
    """Mean of per-seed paired differences and its 95% CI (Student t over seeds; NaN bounds with one seed)."""
    mean = statistics.fmean(differences)
    if len(differences) < 2:
        return {"mean": mean, "ci_low": float("nan"), "ci_high": float("nan"), "per_seed": differences}
    half = stats.t.ppf(0.975, len(differences) - 1) * statistics.stdev(differences) / math.sqrt(len(differences))
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "per_seed": differences}


def _selected(only: list[str] | None) -> list[str]:
    if not only:
        return list(VARIANTS)
    unknown = sorted(set(only) - set(VARIANTS))
    if unknown:
        sys.exit(f"--only: unknown variant(s) {', '.join(unknown)}; one of: {', '.join(VARIANTS)}")
    return [name for name in VARIANTS if name == "source_only" or name in only]  # every row is read against source-only


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44, 45, 46])
    parser.add_argument("--only", nargs="+", default=None, metavar="VARIANT", help=f"among: {', '.join(VARIANTS)}")
    parser.add_argument("--test-set", type=Path, default=None, help="NIH-format folder of held-out target patients")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    parser.add_argument("--jobs", type=int, default=JOBS, help=f"worker processes (default {JOBS}; 1: this process)")
    parser.add_argument("--smoke", action="store_true", help="seconds: first seed, tiny real subset, few steps (CI)")
    parser.add_argument("--output", type=Path, default=None, help=f"result JSON (default {RESULT.relative_to(REPO)})")
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: at least 1 (1 runs every task in this process)")
    console = Console(width=160)
    started = time.perf_counter()
    names = _selected(args.only)
    overrides, run_seeds, cache = args.overrides, args.seeds, SOURCE_CACHE
    # a partial table never replaces the committed one unless asked to
    output = args.output or (RESULT.with_name(f"{RESULT.stem}.only.json") if args.only else RESULT)
    if args.smoke:
        smoke_dir = Path(tempfile.mkdtemp(prefix="bench-crosssim-smoke-"))
        # its prepared images and source models stay in its temp folder: a smoke run leaves nothing in the project
        overrides = [*SMOKE, f"data.cache_dir={smoke_dir / 'cache'}", f"pretrain.cache_dir={smoke_dir / 'pretrain'}", *args.overrides]
        output, cache = args.output or smoke_dir / RESULT.name, smoke_dir / "sources"
        run_seeds = args.seeds[:1]
    cfg = load_config(REPO / "params.yaml", [*DEFAULTS, *overrides])
    sites = Sites(cfg)
    pretrained = None
    if cfg.train.pretrained_weights == PRETRAIN_WEIGHTS:
        console.print(f"self-supervised pretraining ({cfg.pretrain.method}, {cfg.pretrain.epochs} epochs), shared by the seeds")
        pretrained = shared_pretraining(sites, cfg, run_seeds, args.test_set)
        overrides = [*overrides, f"train.pretrained_weights={pretrained.checkpoint_path}"]

    tasks = [
        Task(seed, name, tuple(overrides), args.test_set, cache)
        for index, seed in enumerate(run_seeds)
        for name in names
        if index == 0 or VARIANTS[name].every_seed
    ]
    seeds = run_tasks(tasks, sites, args.jobs, console, output.with_suffix(".partial.json"))
    report = _report(args, cfg, run_seeds, seeds, time.perf_counter() - started)
    report["pretraining"] = None if pretrained is None else {
        "method": pretrained.method, "epochs": pretrained.epochs, "images": pretrained.images,
        "epoch_losses": pretrained.epoch_losses, "wall_seconds": pretrained.wall_seconds, "reused": pretrained.reused,
        "cache_key": pretrained.cache_key,
    }  # fmt: skip
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2, default=str) + "\n")
    output.with_suffix(".partial.json").unlink(missing_ok=True)
    _print(report, console)


def _report(args: argparse.Namespace, cfg: PipelineConfig, run_seeds: list[int], seeds: list[dict], wall: float) -> dict:
    summary = {}
    for name in seeds[0]["variants"]:
        aucs = [run["variants"][name]["auc"] for run in seeds if name in run["variants"]]
        gaps = [
            _gap_closed(run["variants"][name]["auc"], run["variants"]["source_only"]["auc"], run["variants"]["oracle"]["auc"])
            for run in seeds
            if name in run["variants"] and "oracle" in run["variants"]
        ]
        mean, sd = _mean_sd(aucs)
        summary[name] = {"auc_mean": mean, "auc_sd": sd, "seeds": len(aucs),
                         "gap_closed_mean": statistics.fmean(gaps) if gaps else None}  # fmt: skip

    def mean_auc(name: str) -> float | None:
        return summary[name]["auc_mean"] if name in summary else None

    def gap(name: str) -> float | None:
        return summary[name]["gap_closed_mean"] if name in summary else None

    paired = [
        run["variants"]["crosssim_10pct"]["auc"] - run["variants"]["finetune_10pct"]["auc"]
        for run in seeds
        if {"crosssim_10pct", "finetune_10pct"} <= set(run["variants"])
    ]
    first = seeds[0]["variants"]
    command = [
        f"--seeds {' '.join(map(str, run_seeds))}",
        *([f"--only {' '.join(args.only)}"] if args.only else []),
        *([f"--test-set {args.test_set}"] if args.test_set else []),
        *([f"--jobs {args.jobs}"] if args.jobs != JOBS else []),
        *(["--smoke"] if args.smoke else []),
        *(f"--set {o}" for o in args.overrides),
    ]
    return {
        "benchmark": "crosssim-kermany-nih",
        "command": f"make bench-{'smoke' if args.smoke else 'crosssim'}  # python benchmarks/crosssim_kermany_nih.py "
        + " ".join(command),
        "smoke": args.smoke,
        "source": cfg.data.source,
        "target": cfg.crosssim.target,
        "target_test": str(args.test_set) if args.test_set else f"{cfg.crosssim.test_fraction:.0%} patient holdout of {cfg.crosssim.target} (per seed)",
        "source_only_auc": mean_auc("source_only"),
        "crosssim_auc": mean_auc("crosssim"),
        "oracle_auc": mean_auc("oracle"),
        "crosssim_10pct_auc": mean_auc("crosssim_10pct"),
        "finetune_10pct_auc": mean_auc("finetune_10pct"),
        "dann_auc": first["dann"]["auc"] if "dann" in first else None,
        # gap closed: per seed against that seed's source-only and oracle, then averaged
        "gap_closed": gap("crosssim"),
        "gap_closed_10pct": gap("crosssim_10pct"),
        "gap_closed_finetune_10pct": gap("finetune_10pct"),
        "paired_10pct_vs_finetune": paired_difference(paired) if paired else None,
        "summary": summary,
        "per_seed": seeds,
        "seeds": run_seeds,
        "wall_seconds": wall,
        "config": cfg.model_dump(mode="json", include={"data", "augment", "train", "crosssim", "seed"}),
        "finetune_steps": cfg.crosssim.label_finetune_steps,
        "hardware": {
            "cpu": platform.processor() or platform.machine(),
            "cores": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "versions": {pkg: version(pkg) for pkg in ("torch", "torchvision", "numpy", "scikit-learn", "torchmetrics", "lightly")}
        | {"python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d"),
    }


def _number(value: float | None) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def _print(report: dict, console: Console) -> None:
    table = Table(title=f"{report['source']} → {report['target']}: target-test (95% CI, first seed; AUC mean ± sd over seeds)")
    for column in ("variant", "AUC mean ± sd", "gap closed", *METRICS):
        table.add_column(column)
    first = report["per_seed"][0]["variants"]
    for name, row in first.items():
        stats_ = report["summary"][name]
        spread = f"{stats_['auc_mean']:.3f} ± {stats_['auc_sd']:.3f} (n={stats_['seeds']})"
        table.add_row(name, spread, _number(stats_["gap_closed_mean"]),
                      *(format_with_interval(row[m], Interval(**row["ci"][m])) for m in METRICS))  # fmt: skip
    console.print(table)
    paired = report["paired_10pct_vs_finetune"]
    if paired is not None:
        console.print(
            f"CrossSim 10% − fine-tuning 10% (paired over {len(paired['per_seed'])} seeds): {paired['mean']:+.3f} "
            f"[{_number(paired['ci_low'])}, {_number(paired['ci_high'])}]"
        )
    console.print(
        f"gap closed: {_number(report['gap_closed'])} (unlabelled target), {_number(report['gap_closed_10pct'])} with 10% "
        f"labels (fine-tuning on them: {_number(report['gap_closed_finetune_10pct'])}); wall {report['wall_seconds'] / 60:.1f} min"
    )


if __name__ == "__main__":
    run_benchmark(main)
