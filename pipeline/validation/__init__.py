"""Data validation stage: image facts, then Great Expectations rules, then a report.

    facts = compute_image_facts(manifest)
    manifest, report = check_dataset(manifest, facts, cfg.validation, cfg.validation.report_dir)
    report.raise_if_blocking()  # else train on the returned manifest (exact copies dropped)
"""

from pipeline.validation.dedupe import check_dataset, drop_exact_duplicates
from pipeline.validation.facts import compute_image_facts
from pipeline.validation.report import Failure, ValidationReport
from pipeline.validation.suite import validate_dataset

__all__ = [
    "Failure",
    "ValidationReport",
    "check_dataset",
    "compute_image_facts",
    "drop_exact_duplicates",
    "validate_dataset",
]
