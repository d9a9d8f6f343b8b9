"""``crosssim`` command line: each stage on its own (as DVC runs them) and the whole flow."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from flows.cli_common import ConfigOption, SetOption, _config, _fail, console, err_console
from flows.feedback_cli import feedback_app
from flows.registry_cli import registry_app
from flows.rollout_cli import rollout_app
from pipeline.config import ServeConfig
from pipeline.errors import ConfigError, DataValidationError, PipelineError

app = typer.Typer(help="CrossSim: retrain and evaluate a chest X-ray pneumonia classifier.", no_args_is_help=True)
app.add_typer(registry_app, name="registry")
app.add_typer(feedback_app, name="feedback")
app.add_typer(rollout_app, name="rollout")


def _print_results(sets: dict, title: str = "Evaluation (threshold chosen on the source val split; 95% CI)") -> None:
    """Per-site metrics at the validation-chosen threshold, with 95% bootstrap CIs."""
    from pipeline.evaluation import format_with_interval

    metrics = ("auc", "sensitivity", "specificity", "accuracy")
    table = Table(title=title)
    for column in ("set", "images (pneumonia)", *metrics):
        table.add_column(column)
    for name, result in sets.items():
        point = result["at_threshold"]
        cells = [format_with_interval(point[metric], point["ci"].get(metric)) for metric in metrics]
        table.add_row(name, f"{result['n']} ({result['n_pos']})", *cells)
    console.print(table)


def _print_crosssim(scores: dict, gap: dict, diagnostics_path: Path) -> None:
    """Source, adapted and student models side by side on every scored set, and the domain gap."""
    for model_name, scored in scores.items():
        title = f"{model_name} model (threshold {scored['threshold']:.3f} chosen on {scored['threshold_chosen_on']}; 95% CI)"
        _print_results(scored["sets"], title)
    console.print(
        f"proxy A-distance {gap['before']['proxy_a_distance']:.3f} → {gap['after']['proxy_a_distance']:.3f}; "
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


@app.command()
def validate(
    dataset_dir: Annotated[Optional[Path], typer.Argument(help="One dataset folder; default: every configured site.")] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
) -> None:
    """Check a dataset with the data-quality suite; exit 3 on a blocking failure."""
    from flows import data_steps

    try:
        cfg = _config(config, set_)
        if dataset_dir is not None:
            targets = {dataset_dir.name: data_steps.read_split(cfg, dataset_dir)}
        else:
            targets = {site: data_steps.load_site(cfg, site) for site in data_steps.sites(cfg)}
        blocked = False
        for site, (manifest, read) in targets.items():
            _, report = data_steps.validate_site(cfg, site, manifest, read=read)
            console.print(report.summary(), highlight=False, markup=False)
            blocked |= not report.success
        if blocked:
            raise DataValidationError("blocking data-quality rules failed (see above)")
    except PipelineError as error:
        _fail(error)


@app.command()
def prepare(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Decode/resize every validated site into outputs/prepared/<site> (run `crosssim validate` first)."""
    from flows import data_steps

    try:
        cfg = _config(config, set_)
        for site in data_steps.sites(cfg):
            manifest = data_steps.validated_manifest(cfg, site)
            console.print(f"{site}: {len(manifest)} images → {data_steps.prepare_site(cfg, site, manifest)}")
    except PipelineError as error:
        _fail(error)


@app.command()
def train(
    config: ConfigOption = None,
    set_: SetOption = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from last.pt (same config; train.epochs may be raised).")
    ] = False,
) -> None:
    """Train on the prepared source site (run `crosssim prepare` first)."""
    from flows import model_steps

    try:
        cfg = _config(config, [*(set_ or []), *(["train.resume=true"] if resume else [])])
        result = model_steps.train_step(cfg)
        for note in result.notes:
            err_console.print(f"note: {note}", highlight=False, markup=False)
        console.print(f"best val AUC {result.state.best_val_auc:.4f} at epoch {result.state.best_epoch}: {result.model_path}")
    except PipelineError as error:
        _fail(error)


@app.command()
def evaluate(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Score the trained model on the source test split and every external site."""
    from flows import model_steps

    try:
        cfg = _config(config, set_)
        result = model_steps.evaluate_step(cfg, cfg.train.output_dir / "best.pt")
        _print_results(result["sets"])
        console.print(f"metrics: {cfg.evaluate.output_dir / 'metrics.json'}")
    except PipelineError as error:
        _fail(error)


@app.command()
def adapt(config: ConfigOption = None, set_: SetOption = None) -> None:
    """CrossSim: adapt the trained model to crosssim.target, distil it, score all three on target-test."""
    from flows import model_steps

    try:
        cfg = _config(config, set_)
        result = model_steps.adapt_step(cfg, cfg.train.output_dir / "best.pt")
        scores = model_steps.evaluate_adaptation_step(cfg, cfg.train.output_dir / "best.pt", result.adapted_path.parent)
        _print_crosssim(scores, result.diagnostics["domain_gap"], result.diagnostics_path)
    except PipelineError as error:
        _fail(error)


@app.command()
def run(config: ConfigOption = None, set_: SetOption = None) -> None:
    """The whole retraining flow under Prefect, tracked in MLflow, in its own run folder under runs.dir."""
    from prefect.exceptions import TerminationSignal
    from prefect.settings import PREFECT_API_URL

    from flows.prefect_server import temporary_server
    from flows.retrain import retrain

    try:
        cfg_path = config if config is not None else (Path("params.yaml") if Path("params.yaml").is_file() else None)
        _config(cfg_path, set_)  # fail fast on a bad config, before Prefect starts
        # Without a configured server, one of our own that dies with this process (not Prefect's ephemeral one).
        server = nullcontext() if PREFECT_API_URL.value() else temporary_server()
        with _sigterm_unwinds(), server:
            summary = retrain(config_path=str(cfg_path) if cfg_path else None, overrides=set_ or [])
    except PipelineError as error:
        _fail(error)
    except (KeyboardInterrupt, TerminationSignal) as stop:
        by_sigterm = isinstance(stop, (Terminated, TerminationSignal))
        err_console.print(
            f"[bold red]stopped[/] by {'SIGTERM' if by_sigterm else 'Ctrl-C'}: the MLflow run is marked KILLED "
            "and the temporary Prefect server is stopped",
            highlight=False,
        )
        raise typer.Exit(128 + (signal.SIGTERM if by_sigterm else signal.SIGINT)) from None
    _print_results(summary["sets"])
    if "crosssim" in summary:
        crosssim = summary["crosssim"]
        _print_crosssim(crosssim["scores"], crosssim["gap"], crosssim["diagnostics"])
    if "registry" in summary:
        registered = summary["registry"]
        verdict = "passed" if registered["gate_passed"] else "failed"
        console.print(
            f"registered {registered['name']} v{registered['version']} as challenger; promotion gate {verdict} "
            f"(last action: {registered['decision']}); see `crosssim registry review`"
        )
    console.print(f"\n[bold green]done.[/] MLflow run {summary['mlflow_run_id']}: {summary['mlflow_run_url']}")
    console.print(f"evaluation outputs: {summary['outputs']}\nmodel: {summary['model_uri']}")
    console.print("browse runs: make mlflow-ui   |   flow runs: make prefect-ui")


@app.command()
def ingest(
    site: Annotated[str, typer.Argument(help="Site: its dataset folder under ingest.data_dir, e.g. nih-cxr8.")],
    folder: Annotated[Path, typer.Argument(help="The export: Data_Entry_2017.csv + images/ (PNG, JPEG or DICOM).")],
    config: ConfigOption = None,
    set_: SetOption = None,
    new_site: Annotated[
        bool, typer.Option("--new-site", help="SITE is a new site: create its folder (otherwise it must exist).")
    ] = False,
) -> None:
    """Add a hospital's batch to the site's DVC-tracked dataset; exit 3 when a check rejects it (quarantined)."""
    import os

    from pipeline.ingest import BatchIngest, resolve_salt

    try:
        cfg = _config(config, set_)
        with BatchIngest(cfg, site, folder, resolve_salt(site, cfg.ingest, os.environ), new_site) as batch:
            report = batch.run()
        for message in batch.recovered:
            err_console.print(f"note: {message}", highlight=False, markup=False)
        console.print(report.markdown(), highlight=False, markup=False, soft_wrap=True)
        if report.status == "rejected":
            raise DataValidationError(f"batch {report.batch_id} rejected; quarantined in {report.location}")
        if report.status == "accepted":
            console.print(f"record the version: git add {cfg.ingest.dvc_target}.dvc {cfg.ingest.log_path} && git commit")
    except PipelineError as error:
        _fail(error)


@app.command("serve-flows")
def serve_flows(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Register the scheduled retrain, the scheduled rollout analysis and the on-demand ingest deployments with
    $PREFECT_API_URL and run them until Ctrl-C."""
    from prefect.settings import PREFECT_API_URL

    from flows.deployments import ANALYSIS, INGEST, RETRAIN, build_deployments, serve_deployments

    try:
        # Served deployments need a lasting server: an ephemeral one would take the schedule down with this process.
        if not PREFECT_API_URL.value():
            raise ConfigError(
                "PREFECT_API_URL is not set: start a server (`make prefect-ui`) and "
                "export PREFECT_API_URL=http://127.0.0.1:4200/api, or point it at the team's Prefect server"
            )
        cfg_path = config if config is not None else (Path("params.yaml") if Path("params.yaml").is_file() else None)
        cfg = _config(cfg_path, set_)
        deployments = build_deployments(cfg, cfg_path, set_ or [])
    except PipelineError as error:
        _fail(error)
    state = "" if cfg.schedule.active else " (schedule off: schedule.active=false)"
    console.print(
        f"serving on {PREFECT_API_URL.value()}: {RETRAIN} at {cfg.schedule.retrain_cron!r} "
        f"{cfg.schedule.timezone}{state}; {ANALYSIS} at {cfg.rollout.analysis_cron!r}; {INGEST} on demand\n"
        f"ingest a batch: prefect deployment run {INGEST} -p site=SITE -p folder=DROP_FOLDER",
        highlight=False,
        markup=False,
    )
    serve_deployments(cfg, deployments)


def _yaml_value(value: object) -> str:
    return "null" if value is None else str(value)


def _serve_help() -> str:
    keys = [
        f"serve.{key} = {_yaml_value(field.get_default(call_default_factory=True))}"
        + (f": {field.description}" if field.description else "")
        for key, field in ServeConfig.model_fields.items()
        if key != "export"  # built at registration, not read by the server
    ]
    return "Configuration: the serve: section of params.yaml (--set serve.KEY=VALUE):\n" + "\n".join(keys)


@app.command(epilog=_serve_help())
def serve(
    config: ConfigOption = None,
    set_: SetOption = None,
    alias: Annotated[Optional[str], typer.Option("--alias", help="Follow this alias (serve.alias; default champion).")] = None,
    version: Annotated[Optional[str], typer.Option("--version", help="Pin a registered version (serve.version).")] = None,
    precision: Annotated[Optional[str], typer.Option("--precision", help="fp32 or int8 (serve.precision).")] = None,
    host: Annotated[Optional[str], typer.Option("--host", help="Address to listen on (serve.host).")] = None,
    port: Annotated[Optional[int], typer.Option("--port", help="Port (serve.port).")] = None,
) -> None:
    """Serve the registry's model over HTTP on ONNX Runtime: POST /v1/predict and /v1/explain (docs at /docs).

    SIGTERM/Ctrl-C drains the requests in flight, then exits. Admin routes need $CROSSSIM_API_KEY.
    """
    import os

    from flows.serve import build_app, run_server

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # bundle downloads: no bars in the log
    options = {"alias": alias, "version": version, "precision": precision, "host": host, "port": port}
    overrides = [*(set_ or []), *(f"serve.{key}={value}" for key, value in options.items() if value is not None)]
    if alias is not None and version is None:
        overrides.append("serve.version=null")  # --alias follows the alias even if params.yaml pins a version
    try:
        cfg = _config(config, overrides)
        server, notes = build_app(cfg, os.environ)
    except PipelineError as error:
        _fail(error)
    for note in notes:
        console.print(note, highlight=False, markup=False, soft_wrap=True)
    run_server(server, cfg.serve.host, cfg.serve.port)


if __name__ == "__main__":
    app()
