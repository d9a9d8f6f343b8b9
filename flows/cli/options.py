"""What every ``crosssim`` command shares: its options, reading the config, and the one error handler.

It imports nothing heavy (no MLflow, no torch), so `crosssim registry …` starts fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import click
import typer
from rich.console import Console
from typer.core import TyperGroup

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
ReviewerOption = Annotated[str, typer.Option("--reviewer", help="Who decides (recorded in the audit trail).")]
ReasonOption = Annotated[str, typer.Option("--reason", help="Why (recorded in the audit trail).")]
NameOption = Annotated[Optional[str], typer.Option("--name", help="Registered model (default: registry.model_name).")]


def config_path(config: Path | None) -> Path | None:
    """``--config``, else ./params.yaml when there is one, else None (the model's defaults)."""
    if config is None and Path("params.yaml").is_file():
        return Path("params.yaml")
    return config


def read_config(config: Path | None, overrides: list[str] | None) -> PipelineConfig:
    return load_config(config_path(config), overrides or [])


def fail(error: PipelineError) -> NoReturn:
    """The clean exit: one line naming the file/row/field and the rule, and the error's exit code."""
    err_console.print(f"[bold red]error:[/] {error}", highlight=False, markup=True)
    raise typer.Exit(error.exit_code)


class CleanErrors(TyperGroup):
    """The root command group: a PipelineError from any command, at any depth, ends through ``fail`` (no
    traceback), so commands never catch it themselves."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PipelineError as error:
            fail(error)
