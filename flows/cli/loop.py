"""``crosssim worklist`` and ``crosssim change-plan``: the learning loop's commands."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from flows.cli.options import ConfigOption, SetOption, console, read_config


def worklist(
    sites: Annotated[list[str], typer.Argument(help="Served site(s); several share the budget evenly.")],
    budget: Annotated[int, typer.Option("--budget", min=1, help="Reads to ask for, over all sites.")],
    strategy: Annotated[
        Optional[str], typer.Option("--strategy", help="random | uncertainty | diverse | hybrid (loop.worklist_strategy).")
    ] = None,
    preview: Annotated[bool, typer.Option("--preview", help="Rank only: nothing is recorded as asked for.")] = False,
    csv: Annotated[Optional[Path], typer.Option("--csv", help="Also write the worklist as CSV (for the reading room).")] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
) -> None:
    """The served, unlabelled cases of SITE a radiologist's read would teach the model most, best first; recorded
    in the ledger as asked for (never offered again; their reads count as requested). Same as GET /v1/worklist."""
    from pipeline.loop.worklist import build_worklist
    from pipeline.serving.image_store import ImageStore
    from pipeline.serving.ledger import opened_ledger

    cfg = read_config(config, [*(set_ or []), *([f"loop.worklist_strategy={strategy}"] if strategy else [])])
    with opened_ledger(cfg.serve, os.environ) as ledger:
        built = build_worklist(
            ledger, ImageStore(cfg.serve.image_store, cfg.serve.image_retention_days), sites, budget, cfg.loop,
            cfg.data.preprocessing(), served_sites=cfg.served_sites(), record=not preview,
        )  # fmt: skip
    table = Table(title=f"worklist {built.worklist_id[:8]} ({built.strategy}, {len(built.items)} of {budget} reads)")
    for column in ("rank", "site", "inference_id", "served (UTC)", "p", "threshold", "score"):
        table.add_column(column)
    for item in built.items:
        table.add_row(
            str(item.rank), item.site, item.inference_id, f"{item.served_at:%Y-%m-%d %H:%M}",
            f"{item.probability:.4f}", f"{item.threshold:.4f}", f"{item.score:.3f}",
        )  # fmt: skip
    console.print(table)
    for site in built.sites:
        console.print(
            f"{site.site}: {site.candidates} candidates, {site.labelled} labelled, {site.pending} pending, "
            f"{site.without_image} without a kept image; {site.asked} asked now"
        )
    if csv is not None:
        import pandas as pd

        rows = [{**vars(item), "worklist_id": built.worklist_id} for item in built.items]
        pd.DataFrame(rows).to_csv(csv, index=False)
        console.print(f"→ {csv}")
    console.print("preview: nothing recorded" if not built.recorded else "recorded as asked for in the ledger")


def change_plan(
    out: Annotated[Optional[Path], typer.Option("--out", help="Write the Markdown here instead of printing it.")] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
) -> None:
    """The loop's change-control record (FDA PCCP shape), from the configuration: what it may change by itself, its
    data and re-training protocol, the acceptance criteria, rollout and rollback, and what needs a human."""
    from pipeline.loop.change_plan import change_plan as plan_of
    from pipeline.loop.change_plan import render_markdown

    markdown = render_markdown(plan_of(read_config(config, set_)))
    if out is None:
        console.print(markdown, markup=False, highlight=False, soft_wrap=True)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown)
    console.print(f"→ {out}")
