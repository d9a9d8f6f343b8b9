"""``crosssim feedback …``: outcomes reported by the hospital, attached to the predictions they judge."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from flows.cli.options import ConfigOption, SetOption, console, read_config

feedback_app = typer.Typer(help="Outcomes (labels) of served predictions.", no_args_is_help=True)


@feedback_app.command("import")
def import_outcomes(
    file: Annotated[Path, typer.Argument(help="CSV: label, source, inference_id or study_id + site, observed_at.")],
    config: ConfigOption = None,
    set_: SetOption = None,
) -> None:
    """Attach every row's label to its prediction(s) in the serving ledger; all rows or none.

    A row already imported is a duplicate (nothing stored); a label that disagrees with an earlier one is kept as a
    conflict (rollout.outcome_sources decides which counts)."""
    from pipeline.rollout.outcome_file import read_outcome_file
    from pipeline.rollout.outcomes import record_outcomes
    from pipeline.serving.ledger import opened_ledger

    cfg = read_config(config, set_)
    reports = read_outcome_file(file, cfg.served_sites(), cfg.ingest, os.environ)
    with opened_ledger(cfg.serve, os.environ) as ledger:
        results = record_outcomes(ledger, reports, cfg.rollout.outcome_sources)
    counts = Counter(result.status for result in results)
    table = Table(title=f"{file.name}: {len(results)} rows imported")
    for column in ("recorded", "duplicate", "conflict", "predictions labelled"):
        table.add_column(column)
    labelled = len({inference_id for result in results for inference_id in result.inference_ids})
    table.add_row(*(str(counts[status]) for status in ("recorded", "duplicate", "conflict")), str(labelled))
    console.print(table)
    for result in results:
        if result.status == "conflict":
            console.print(f"[yellow]conflict[/]: {result.where} disagrees with an earlier label of {', '.join(result.inference_ids)}")


@feedback_app.command("export")
def export_cases(
    site: Annotated[str, typer.Argument(help="The site whose labelled served cases to export.")],
    out: Annotated[Path, typer.Option("--out", help="The batch folder to write (must not exist).")],
    config: ConfigOption = None,
    set_: SetOption = None,
) -> None:
    """Matured, labelled served cases of SITE (not exported before) → a batch in NIH's layout for `crosssim ingest`."""
    from datetime import timedelta

    from pipeline.rollout.export import dataset_patients, export_labelled_cases
    from pipeline.serving.image_store import ImageStore
    from pipeline.serving.ledger import opened_ledger

    cfg = read_config(config, set_)
    with opened_ledger(cfg.serve, os.environ) as ledger:
        batch = export_labelled_cases(
            ledger, ImageStore(cfg.serve.image_store, cfg.serve.image_retention_days), site, out,
            cfg.rollout.outcome_sources, timedelta(hours=cfg.rollout.maturity_hours),
            dataset_patients(cfg.ingest.data_dir / site), cfg.ingest.allow_known_patients,
        )  # fmt: skip
    console.print(
        f"{batch.cases} labelled served cases of {site} → {batch.folder} ({batch.exported_before} exported before, "
        f"{batch.without_image} without a kept image, {batch.known_patients} held back: patient already in the dataset)"
    )
    console.print(f"next: crosssim ingest {site} {batch.folder}")


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
