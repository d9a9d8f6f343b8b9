"""Dropping exact duplicate images that are harmless to drop.

Public datasets hold exact copies of the same radiograph (Kermany: 30 groups, NIH: 1).
A copy inside one split with the same label only over-weights that image: keeping
the first and reporting the rest fixes it. A copy across splits (leakage) or with
conflicting labels is a data error and is left for the blocking rules to stop.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.config import ValidationConfig
from pipeline.data.exclusions import Exclusion, ReadReport
from pipeline.validation.report import ValidationReport
from pipeline.validation.suite import validate_dataset


def drop_exact_duplicates(manifest: pd.DataFrame, facts: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Return (manifest, facts) without same-split, same-label copies, and the dropped rows' names."""
    table = manifest[["image_id", "split", "label"]].assign(content_hash=facts["content_hash"])
    hashed = table["content_hash"].notna()
    groups = table[hashed].groupby("content_hash")
    harmless = groups["split"].transform("nunique").eq(1) & groups["label"].transform("nunique").eq(1)
    harmless_rows = table[hashed][harmless]
    duplicated = harmless_rows.sort_values("image_id").duplicated("content_hash", keep="first")
    drop_index = duplicated[duplicated].index
    dropped = [f"{manifest.at[i, 'site']}/{manifest.at[i, 'image_id']}" for i in sorted(drop_index)]
    return manifest.drop(index=drop_index), facts.drop(index=drop_index), dropped


def check_dataset(
    manifest: pd.DataFrame,
    facts: pd.DataFrame,
    cfg: ValidationConfig,
    report_dir: Path,
    labels_required: bool = True,
    read: ReadReport | None = None,
) -> tuple[pd.DataFrame, ValidationReport]:
    """Drop harmless copies (if configured), run every rule, report the drops and what ``read`` left out.

    Returns the manifest that later stages must use and the report.
    """
    exclusions = list(read.exclusions) if read is not None else []
    if cfg.drop_exact_duplicates:
        manifest, facts, dropped = drop_exact_duplicates(manifest, facts)
        if dropped:
            copies = Exclusion.of("duplicate_dropped", "warning", "exact copies inside one split dropped", dropped)
            exclusions.append(copies)
    report = validate_dataset(manifest, facts, cfg, report_dir, labels_required)
    report.add_exclusions(exclusions)
    return manifest, report
