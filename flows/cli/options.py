"""What every ``crosssim`` command shares: the --config/--set options, reading the config, the clean error exit.

Its own module so that flows/cli.py and flows/registry_cli.py both import it instead of each other; it imports
nothing heavy (no MLflow, no torch), so `crosssim registry …` starts fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from pipeline.config import PipelineConfig, load_config
from pipeline.errors import PipelineError

console = Console()
err_console = Console(stderr=True)

ConfigOption = Annotated[
    Optional[Path], typer.Option("--config", "-c", help="params.yaml to read (default: ./params.yaml if present).")
]
SetOption = Annotated[
    Optional[list[str]], typer.Option("--set", "-s", help="Override a config key, e.g. --set train.epochs=2.")
]


def _config(config: Path | None, overrides: list[str] | None) -> PipelineConfig:
    if config is None and Path("params.yaml").is_file():
        config = Path("params.yaml")
    return load_config(config, overrides or [])


def _fail(error: PipelineError) -> None:
    err_console.print(f"[bold red]error:[/] {error}", highlight=False, markup=True)
    raise typer.Exit(error.exit_code)
