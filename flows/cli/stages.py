"""``crosssim validate|prepare|pretrain|train|evaluate|adapt|run``: each stage on its own (as DVC runs them) and the whole flow."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich import box
from rich.table import Table

from flows.cli.options import ConfigOption, SetOption, config_path, console, err_console, read_config
from pipeline.errors import DataValidationError

if TYPE_CHECKING:  # the CLI starts without torch: stages import what they run
    from pipeline.crosssim.diagnostics import DomainShift
    from pipeline.evaluation import ScoredModel


def _print_results(scored: ScoredModel, title: str) -> None:
    """Per-site metrics at the validation-chosen threshold, with 95% bootstrap CIs: one row per set and metric, so
    that no name or interval is cut in an 80-column terminal."""
    from pipeline.evaluation import format_with_interval

    table = Table(title=f"{title} (threshold {scored.threshold:.3f} chosen on {scored.threshold_chosen_on}; 95% CI)", box=box.SIMPLE_HEAD)
    table.add_column("set", overflow="fold", min_width=22)  # kermany-pediatric/test on one line
    table.add_column("images (pneumonia)", overflow="fold", max_width=11)
    table.add_column("metric")
    table.add_column("value [95% CI]", no_wrap=True)
    for name, result in scored.sets.items():
        point = result.at_threshold
        for index, metric in enumerate(("auc", "sensitivity", "specificity", "accuracy")):
            shown = (name, f"{result.n} ({result.n_pos})") if index == 0 else ("", "")
            cell = format_with_interval(point.value(metric), point.interval(metric))
            table.add_row(*shown, metric, cell, end_section=metric == "accuracy")
    console.print(table)


def _print_crosssim(scores: dict[str, ScoredModel], gap: DomainShift, diagnostics_path: Path) -> None:
    """Source, adapted and student models side by side on every scored set, and the domain gap."""
    for model_name, scored in scores.items():
        _print_results(scored, f"{model_name} model")
    console.print(
        f"proxy A-distance {gap.before.proxy_a_distance:.3f} → {gap.after.proxy_a_distance:.3f}; "
        f"diagnostics: {diagnostics_path}"
    )


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that every open block (MLflow run, Prefect server) closes."""


@contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    # Python's default SIGTERM ends the process on the spot: no finally, no atexit. During a flow Prefect swaps
    # in its own handler and, after marking the flow run, re-sends the signal to this one.
    def raise_terminated(signum: int, frame: object) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def validate(
    dataset_dir: Annotated[Optional[Path], typer.Argument(help="One dataset folder; default: every configured site.")] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
) -> None:
    """Check a dataset with the data-quality suite; exit 3 on a blocking failure."""
    from pipeline.retrain import sites

    cfg = read_config(config, set_)
    if dataset_dir is not None:
        targets = {dataset_dir.name: sites.read_split(cfg, dataset_dir)}
    else:
        targets = {site: sites.load_site(cfg, site) for site in sites.sites(cfg)}
    blocked = False
    for site, (manifest, read) in targets.items():
        _, report = sites.validate_site(cfg, site, manifest, read=read)
        console.print(report.summary(), highlight=False, markup=False)
        blocked |= not report.success
    if blocked:
        raise DataValidationError("blocking data-quality rules failed (see above)")


def prepare(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Decode/resize every validated site into outputs/prepared/<site> (run `crosssim validate` first)."""
    from pipeline.retrain import sites

    cfg = read_config(config, set_)
    for site in sites.sites(cfg):
        manifest = sites.validated_manifest(cfg, site)
        console.print(f"{site}: {len(manifest)} images → {sites.prepare_site(cfg, site, manifest)}")


def pretrain(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Self-supervised pretraining of train.backbone on source train + CrossSim target-train images (run `crosssim
    prepare` first); train from it with --set train.pretrained_weights=pretrain."""
    from pipeline.retrain.pretraining import pretrain as run_pretrain

    cfg = read_config(config, set_)
    result = run_pretrain(cfg)
    images = ", ".join(f"{name} {count}" for name, count in result.images.items())
    how = "reused from the cache" if result.reused else f"{result.epochs} epochs in {result.wall_seconds:.0f} s"
    console.print(f"{result.method} {result.backbone} on {images} images ({how}); loss {result.epoch_losses[-1]:.4f}")
    console.print(f"backbone: {result.checkpoint_path}\nimages read: {result.manifest_path}")


def train(
    config: ConfigOption = None,
    set_: SetOption = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from last.pt (same config; train.epochs may be raised).")
    ] = False,
) -> None:
    """Train on the prepared source site (run `crosssim prepare` first). Under torchrun
    (`torchrun --nproc-per-node N --no-python crosssim train ...`) the N processes train data-parallel."""
    from pipeline.retrain.source import train_source
    from pipeline.training.distributed import ranks_from_environment

    cfg = read_config(config, [*(set_ or []), *(["train.resume=true"] if resume else [])])
    result = train_source(cfg)
    if not ranks_from_environment().is_main:
        return  # rank 0 reports for all
    for note in result.notes:
        err_console.print(f"note: {note}", highlight=False, markup=False)
    console.print(f"best val AUC {result.state.best_val_auc:.4f} at epoch {result.state.best_epoch}: {result.model_path}")


def evaluate(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Score the trained model on the source test split and every external site."""
    from pipeline.retrain.source import evaluate_source

    cfg = read_config(config, set_)
    _print_results(evaluate_source(cfg, cfg.train.output_dir / "best.pt"), "Evaluation")
    console.print(f"metrics: {cfg.evaluate.output_dir / 'metrics.json'}")


def adapt(config: ConfigOption = None, set_: SetOption = None) -> None:
    """CrossSim: adapt the trained model to crosssim.target, distil it, score all three on target-test."""
    from pipeline.retrain.adaptation import adapt as run_adaptation
    from pipeline.retrain.adaptation import score_adaptation, trained_preprocessing
    from pipeline.retrain.data import crosssim_data

    cfg = read_config(config, set_)
    model_path = cfg.train.output_dir / "best.pt"
    trained_preprocessing(cfg)  # nothing trained, or trained otherwise: say so before loading any site
    data = crosssim_data(cfg)  # once, for adaptation and scoring
    result = run_adaptation(cfg, model_path, data)
    scores = score_adaptation(cfg, model_path, result.adapted_path.parent, data)
    _print_crosssim(scores, result.gap, result.diagnostics_path)


def run(config: ConfigOption = None, set_: SetOption = None) -> None:
    """The whole retraining flow under Prefect, tracked in MLflow, in its own run folder under runs.dir."""
    from prefect.exceptions import TerminationSignal
    from prefect.settings import PREFECT_API_URL

    from flows.prefect_server import temporary_server
    from flows.retrain import retrain

    try:
        cfg_path = config_path(config)
        read_config(cfg_path, set_)  # fail fast on a bad config, before Prefect starts
        # Without a configured server, one of our own that dies with this process (not Prefect's ephemeral one).
        server = nullcontext() if PREFECT_API_URL.value() else temporary_server()
        with _sigterm_unwinds(), server:
            summary = retrain(config_path=str(cfg_path) if cfg_path else None, overrides=set_ or [])
    except (KeyboardInterrupt, TerminationSignal) as stop:
        by_sigterm = isinstance(stop, (Terminated, TerminationSignal))
        err_console.print(
            f"[bold red]stopped[/] by {'SIGTERM' if by_sigterm else 'Ctrl-C'}: the MLflow run is marked KILLED "
            "and the temporary Prefect server is stopped",
            highlight=False,
        )
        raise typer.Exit(128 + (signal.SIGTERM if by_sigterm else signal.SIGINT)) from None
    _print_results(summary.evaluation, "Evaluation")
    if summary.crosssim is not None:
        _print_crosssim(summary.crosssim.scores, summary.crosssim.gap, summary.crosssim.diagnostics_path)
    if summary.registry is not None:
        registered = summary.registry
        verdict = "passed" if registered.gate_passed else "failed"
        console.print(
            f"registered {registered.name} v{registered.version} as challenger; promotion gate {verdict} "
            f"(last action: {registered.decision}); see `crosssim registry review`"
        )
    console.print(f"\n[bold green]done.[/] MLflow run {summary.mlflow_run_id}: {summary.mlflow_run_url}")
    console.print(f"evaluation outputs: {summary.outputs}\nmodel: {summary.model_uri}")
    console.print("browse runs: make mlflow-ui   |   flow runs: make prefect-ui")
