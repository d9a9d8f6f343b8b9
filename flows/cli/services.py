"""``crosssim ingest|serve-flows|serve``: a hospital's batch in, the scheduled flows and the model served."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from flows.cli.options import ConfigOption, SetOption, config_path, console, err_console, read_config
from pipeline.config import ServeConfig
from pipeline.errors import ConfigError, DataValidationError

if TYPE_CHECKING:
    from fastapi import FastAPI

DRAIN_SECONDS = 20  # SIGTERM: requests in flight get this long to finish (under Kubernetes' default 30 s grace)


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

    cfg = read_config(config, set_)
    with BatchIngest(cfg, site, folder, resolve_salt(site, cfg.ingest, os.environ), new_site) as batch:
        report = batch.run()
    for message in batch.recovered:
        err_console.print(f"note: {message}", highlight=False, markup=False)
    console.print(report.markdown(), highlight=False, markup=False, soft_wrap=True)
    if report.status == "rejected":
        raise DataValidationError(f"batch {report.batch_id} rejected; quarantined in {report.location}")
    if report.status == "accepted":
        console.print(f"record the version: git add {cfg.ingest.dvc_target}.dvc {cfg.ingest.log_path} && git commit")


def serve_flows(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Register the scheduled retrain, the scheduled rollout analysis and the on-demand ingest deployments with
    $PREFECT_API_URL and run them until Ctrl-C."""
    from prefect.settings import PREFECT_API_URL

    from flows.deployments import ANALYSIS, INGEST, RETRAIN, build_deployments, serve_deployments

    # Served deployments need a lasting server: an ephemeral one would take the schedule down with this process.
    if not PREFECT_API_URL.value():
        raise ConfigError(
            "PREFECT_API_URL is not set: start a server (`make prefect-ui`) and "
            "export PREFECT_API_URL=http://127.0.0.1:4200/api, or point it at the team's Prefect server"
        )
    cfg_path = config_path(config)
    cfg = read_config(cfg_path, set_)
    deployments = build_deployments(cfg, cfg_path, set_ or [])
    state = "" if cfg.schedule.active else " (schedule off: schedule.active=false)"
    console.print(
        f"serving on {PREFECT_API_URL.value()}: {RETRAIN} at {cfg.schedule.retrain_cron!r} "
        f"{cfg.schedule.timezone}{state}; {ANALYSIS} at {cfg.rollout.analysis_cron!r}; {INGEST} on demand\n"
        f"ingest a batch: prefect deployment run {INGEST} -p site=SITE -p folder=DROP_FOLDER",
        highlight=False,
        markup=False,
    )
    serve_deployments(cfg, deployments)


def deploy(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Register the three deployments on the work pool schedule.work_pool of $PREFECT_API_URL (a process pool is
    created when missing); workers of the pool run them: `prefect worker start --pool NAME`."""
    from prefect.settings import PREFECT_API_URL

    from flows.deployments import ANALYSIS, INGEST, RETRAIN, build_deployments, deploy_to_pool

    if not PREFECT_API_URL.value():
        raise ConfigError(
            "PREFECT_API_URL is not set: deployments live on a Prefect server; export PREFECT_API_URL=http://HOST:4200/api"
        )
    cfg_path = config_path(config)
    cfg = read_config(cfg_path, set_)
    pool_type, _ = deploy_to_pool(cfg, build_deployments(cfg, cfg_path, set_ or []))
    pool = cfg.schedule.work_pool
    console.print(
        f"deployed on work pool {pool!r} ({pool_type}) of {PREFECT_API_URL.value()}: {RETRAIN}, {ANALYSIS}, {INGEST}\n"
        f"start a worker: prefect worker start --pool {pool}\n"
        f"run one now:    prefect deployment run {RETRAIN}",
        highlight=False,
        markup=False,
    )


def _yaml_value(value: object) -> str:
    return "null" if value is None else str(value)


def serve_help() -> str:
    keys = [
        f"serve.{key} = {_yaml_value(field.get_default(call_default_factory=True))}"
        + (f": {field.description}" if field.description else "")
        for key, field in ServeConfig.model_fields.items()
        if key != "export"  # built at registration, not read by the server
    ]
    return "Configuration: the serve: section of params.yaml (--set serve.KEY=VALUE):\n" + "\n".join(keys)


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

    from pipeline.serving.service import build_app

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # bundle downloads: no bars in the log
    options = {"alias": alias, "version": version, "precision": precision, "host": host, "port": port}
    overrides = [*(set_ or []), *(f"serve.{key}={value}" for key, value in options.items() if value is not None)]
    if alias is not None and version is None:
        overrides.append("serve.version=null")  # --alias follows the alias even if params.yaml pins a version
    cfg = read_config(config, overrides)
    server, notes = build_app(cfg, os.environ)
    for note in notes:
        console.print(note, highlight=False, markup=False, soft_wrap=True)
    _run_server(server, cfg.serve.host, cfg.serve.port)


def _run_server(app: FastAPI, host: str, port: int) -> None:
    """uvicorn until SIGINT/SIGTERM: it stops accepting, lets requests in flight finish (up to DRAIN_SECONDS),
    then the app's shutdown commits the ledger's last rows."""
    import copy

    import uvicorn

    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    log_config["loggers"]["crosssim"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    uvicorn.run(app, host=host, port=port, timeout_graceful_shutdown=DRAIN_SECONDS, log_config=log_config)
