"""``crosssim feedback …``: outcomes reported by the hospital, attached to the predictions they judge."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Annotated

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
        f"{batch.without_image} without a kept image, {batch.known_patients} held back: patient already in the dataset, "
        f"{batch.duplicates} held back: the same image file as another case)"
    )
    console.print(f"next: crosssim ingest {site} {batch.folder}")

