"""The data-quality rules as Great Expectations (GX 1.x) suites, and the run that checks them.

Two tables are validated: ``images`` (the manifest joined with the image facts, one row per image)
and ``classes`` (one row per split and class). Rules that compare rows (a patient in two splits,
a duplicate across splits, class shares) get a helper column computed here with pandas, and a
plain GX expectation on it, so every rule is a GX expectation and shows up in the Data Docs.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import great_expectations as gx
import pandas as pd
from great_expectations.core import ExpectationSuiteValidationResult, ExpectationValidationResult
from great_expectations.data_context import EphemeralDataContext
from great_expectations.data_context.types.base import (
    DataContextConfig,
    InMemoryStoreBackendDefaults,
    ProgressBarsConfig,
)
from great_expectations.expectations import Expectation
from great_expectations.expectations.metadata_types import FailureSeverity

from pipeline.config import ValidationConfig
from pipeline.data.images import NATIVE_MODES
from pipeline.data.manifest import AGE_RANGE, LABEL_NAMES, REQUIRED_COLUMNS, SEXES, SPLITS, VIEWS, implausible
from pipeline.validation.facts import FACT_COLUMNS
from pipeline.validation.report import Failure, ValidationReport

E = gx.expectations
BLOCKING, WARNING = FailureSeverity.CRITICAL, FailureSeverity.WARNING
UNSPLIT = "unsplit"  # how the not-yet-split rows (split == "") are named in messages
METADATA_COLUMNS = ("age", "sex", "view")
# Mean intensity outside this range suggests an inverted, saturated or wrongly scaled film.
MEAN_INTENSITY_RANGE = (10.0, 245.0)
MAX_NAMED = 10  # offending files/rows named in a message
DOCS_SITE = "crosssim"


def _rule(
    kind: type[Expectation], rule: str, description: str, severity: FailureSeverity = BLOCKING, **kwargs: Any
) -> Expectation:
    """An expectation tagged with its rule name; ``description`` is shown in Data Docs and messages."""
    return kind(severity=severity, description=description, meta={"rule": rule}, **kwargs)


def _file_ref(path: Any, site: Any, frame: Any, array_key: Any) -> str:
    """A short, unambiguous name: the path from the site folder on (``site/train/NORMAL/x.jpeg``)."""
    path, site = (v if isinstance(v, str) else "" for v in (path, site))  # a column may be absent
    parts = Path(path).parts
    if site and site in parts[:-1]:
        ref = "/".join(parts[len(parts) - 1 - parts[::-1].index(site) :])
    else:
        ref = "/".join(p for p in (site, Path(path).name) if p)
    return f"{ref}[{array_key}:{frame}]" if isinstance(array_key, str) else ref


def _splits_per(table: pd.DataFrame, key: pd.Series) -> pd.Series:
    """For each row, how many different splits hold rows with its key (NaN where the key is missing)."""
    return table["split"].groupby(key, dropna=True).transform("nunique").astype("float64")


def images_table(manifest: pd.DataFrame, facts: pd.DataFrame) -> pd.DataFrame:
    if not facts.index.equals(manifest.index):
        raise ValueError("facts do not match the manifest: compute them with compute_image_facts(manifest)")
    table = manifest.join(facts[list(FACT_COLUMNS[4:])])
    for column in METADATA_COLUMNS:  # absent metadata is a warning, not a crash
        if column not in table:
            table[column] = None
    where = table.reindex(columns=["path", "site", "frame", "array_key"])  # absent columns read as NaN
    table["file"] = [_file_ref(*row) for row in where.itertuples(index=False)]
    table["converted"] = _converted(table)
    if "split" in table:
        table["hash_split_count"] = _splits_per(table, table["content_hash"])
        if "patient_id" in table:
            patient = table["patient_id"].where(table["patient_id"].fillna("").astype(str) != "")
            table["patient_split_count"] = _splits_per(table, patient)
    return table.reset_index(drop=True)


def _converted(table: pd.DataFrame) -> pd.Series:
    """True for an image whose pixels were converted to reach the site's 8-bit mode: alpha dropped, a palette
    expanded, 16 bits rescaled (any site), or colour made grey in a site stored mostly in grayscale."""
    mode = table.get("stored_mode", pd.Series(None, index=table.index, dtype=object))
    site = table.get("site", pd.Series("", index=table.index)).fillna("")
    most_common = mode.groupby(site).transform(lambda modes: modes.mode().iat[0] if modes.notna().any() else None)
    colour_in_grey = (most_common == "L") & (mode == "RGB")
    return mode.notna() & (~mode.isin(NATIVE_MODES) | colour_in_grey)


def classes_table(table: pd.DataFrame, allowed_labels: list[int]) -> pd.DataFrame:
    """One row per (split, class): its image count and share of the split's labelled images."""
    labelled = table[table["label"].isin(allowed_labels)]
    rows = []
    for split in sorted(table["split"].fillna("").unique()):
        counts = labelled.loc[labelled["split"] == split, "label"].value_counts()
        total = int(counts.sum())
        for label in allowed_labels:
            n = int(counts.get(label, 0))
            rows.append(
                {
                    "split": split or UNSPLIT,
                    "class": LABEL_NAMES.get(label, str(label)),
                    "images": n,
                    "share": n / total if total else 0.0,
                }
            )
    return pd.DataFrame(rows, columns=["split", "class", "images", "share"])


def image_expectations(table: pd.DataFrame, cfg: ValidationConfig, labels_required: bool) -> list[Expectation]:
    present = set(table.columns)
    side = f"within [{cfg.min_side}, {cfg.max_side}]"
    rules = [
        _rule(E.ExpectTableRowCountToBeBetween, "min_images", "enough images", min_value=cfg.min_images),
        _rule(
            E.ExpectTableColumnsToMatchSet, "required_columns", "required columns present",
            column_set=list(REQUIRED_COLUMNS), exact_match=False,
        ),
        _rule(E.ExpectColumnValuesToBeInSet, "decodes", "file decodes as an image", column="decodes", value_set=[True]),
        _rule(E.ExpectColumnValuesToBeInSet, "channels", "channels are 1 or 3", column="channels", value_set=[1, 3]),
    ]
    for dim in ("width", "height"):
        rules.append(
            _rule(
                E.ExpectColumnValuesToBeBetween, "image_size", f"{dim} {side}",
                column=dim, min_value=cfg.min_side, max_value=cfg.max_side,
            )
        )
    rules.append(
        _rule(
            E.ExpectColumnValuesToBeBetween, "not_blank", f"pixel std >= {cfg.min_std} (not blank/constant)",
            column="std_intensity", min_value=cfg.min_std,
        )
    )
    # A rule on an absent column would only repeat "required_columns" as a GX exception: skip it.
    for column in ("image_id", "path", "patient_id", "site", "split"):
        if column not in present:
            continue
        rules.append(_rule(E.ExpectColumnValuesToNotBeNull, "required_values", f"{column} is not null", column=column))
        if column != "split":  # an empty split means "not split yet"
            rules.append(
                _rule(
                    E.ExpectColumnValueLengthsToBeBetween, "required_values", f"{column} is not empty",
                    column=column, min_value=1,
                )
            )
    if "label" in present:
        rules.append(
            _rule(
                E.ExpectColumnValuesToBeInSet, "label_values", f"label is one of {cfg.allowed_labels}",
                column="label", value_set=cfg.allowed_labels,
            )
        )
        if labels_required:
            rules.append(_rule(E.ExpectColumnValuesToNotBeNull, "label_values", "label is present", column="label"))
    if {"site", "image_id"} <= present:
        rules.append(
            _rule(
                E.ExpectCompoundColumnsToBeUnique, "unique_image_id", "image_id is unique within its site",
                column_list=["site", "image_id"],
            )
        )
    if "split" in present:
        rules += [
            _rule(
                E.ExpectColumnValuesToBeInSet, "split_values", f"split is {', '.join(SPLITS)} or empty",
                column="split", value_set=[*SPLITS, ""],
            ),
            _rule(
                E.ExpectCompoundColumnsToBeUnique, "duplicate_within_split",
                "no two images of a split have the same pixels",
                column_list=["split", "content_hash"],
                ignore_row_if="any_value_is_missing",  # undecodable rows have no hash
            ),
            _rule(
                E.ExpectColumnValuesToBeBetween, "duplicate_across_splits",
                "no image shares its pixels with another split (leakage)",
                column="hash_split_count", max_value=1,
            ),
        ]
    if {"split", "patient_id"} <= present:
        rules.append(
            _rule(
                E.ExpectColumnValuesToBeBetween, "patient_in_two_splits",
                "all images of a patient are in one split (leakage)",
                column="patient_split_count", max_value=1,
            )
        )
    low, high = MEAN_INTENSITY_RANGE
    rules.append(
        _rule(
            E.ExpectColumnValuesToBeBetween, "intensity_range",
            f"mean intensity within [{low:g}, {high:g}] (not inverted/saturated)",
            severity=WARNING, column="mean_intensity", min_value=low, max_value=high,
        )
    )
    rules += [
        _rule(E.ExpectColumnValuesToNotBeNull, "metadata_missing", f"{c} is recorded", severity=WARNING, column=c)
        for c in METADATA_COLUMNS
    ]
    # Implausible values are left out of subgroup metrics (counted as unknown) by the same definition.
    rules += [
        _rule(
            E.ExpectColumnValuesToBeBetween, "metadata_implausible", f"age within [{AGE_RANGE[0]:g}, {AGE_RANGE[1]:g}]",
            severity=WARNING, column="age", min_value=AGE_RANGE[0], max_value=AGE_RANGE[1],
        ),
        _rule(
            E.ExpectColumnValuesToBeInSet, "metadata_implausible", f"sex is one of {', '.join(SEXES)}",
            severity=WARNING, column="sex", value_set=list(SEXES),
        ),
        _rule(
            E.ExpectColumnValuesToBeInSet, "metadata_implausible", f"view is one of {', '.join(VIEWS)}",
            severity=WARNING, column="view", value_set=list(VIEWS),
        ),
        _rule(
            E.ExpectColumnValuesToBeInSet, "mode_converted",
            "stored in the site's 8-bit grayscale or RGB (not converted)",
            severity=WARNING, column="converted", value_set=[False],
        ),
    ]
    return rules


def class_expectations(cfg: ValidationConfig) -> list[Expectation]:
    share = cfg.min_class_share
    return [
        _rule(
            E.ExpectColumnValuesToBeBetween, "class_present", "every class has images in every split",
            column="images", min_value=1,
        ),
        _rule(
            E.ExpectColumnValuesToBeBetween, "class_share", f"each class is [{share:g}, {1 - share:g}] of its split",
            column="share", min_value=share, max_value=1 - share,
        ),
    ]


def _gx_context(docs_dir: Path) -> EphemeralDataContext:
    """An in-memory context whose only output is the Data Docs site in ``docs_dir``."""
    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    config = DataContextConfig(
        # the default ephemeral config adds a second docs site in a temp dir: leave it out
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        data_docs_sites={
            DOCS_SITE: {
                "class_name": "SiteBuilder",
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
            }
        },
        progress_bars=ProgressBarsConfig(globally=False),
        analytics_enabled=False,
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def _run_suites(
    tables: dict[str, tuple[pd.DataFrame, list[Expectation], list[str]]], docs_dir: Path
) -> list[ExpectationSuiteValidationResult]:
    context = _gx_context(docs_dir)
    source = context.data_sources.add_pandas("crosssim")
    results = []
    for name, (frame, expectations, ref_columns) in tables.items():
        batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
        suite = context.suites.add(gx.ExpectationSuite(name=f"crosssim_{name}", expectations=expectations))
        definition = context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
        result_format = {
            "result_format": "SUMMARY",
            "partial_unexpected_count": MAX_NAMED,
            "unexpected_index_column_names": ref_columns,  # names offending rows by file, not index
        }
        results.append(definition.run(batch_parameters={"dataframe": frame}, result_format=result_format))
    if docs_dir.exists():  # stale pages of an earlier run would stay linked from nowhere
        shutil.rmtree(docs_dir)
    context.build_data_docs(site_names=[DOCS_SITE])
    return results


def _message(result: ExpectationValidationResult, details: dict[str, str]) -> str:
    config = result.expectation_config
    # GX 1.x reports a metric's error nested under its metric id, an expectation's error flat
    info = result.exception_info or {}
    errors = [
        e["exception_message"] for e in (info, *info.values()) if isinstance(e, dict) and e.get("raised_exception")
    ]
    if errors:
        return f"'{config.description}' could not be checked: {errors[0]}"
    outcome = result.result
    if config.type == "expect_table_row_count_to_be_between":
        return f"{outcome['observed_value']} image(s); at least {config.kwargs['min_value']} required"
    if config.type == "expect_table_columns_to_match_set":
        return f"missing column(s): {', '.join(outcome['details']['mismatched']['missing'])}"
    checked = set(config.kwargs.get("column_list") or [config.kwargs.get("column")])
    refs = []
    for row in outcome.get("partial_unexpected_index_list", []):
        # GX gives {checked column(s): value, index column(s): value}; the index columns name the row
        ref = "/".join(str(value) for column, value in row.items() if column not in checked)
        refs.append(f"{ref} ({details[ref]})" if ref in details else ref)
    count, total = outcome["unexpected_count"], outcome["element_count"]
    if count == total > len(refs):  # e.g. a dataset without any age: naming 10 of them adds nothing
        return f"all {total} rows break '{config.description}'"
    more = ", ..." if count > len(refs) else ""
    return f"{count} of {total} rows break '{config.description}': {', '.join(refs)}{more}"


def _details(table: pd.DataFrame, rule: str) -> dict[str, str]:
    """Per-row context for a rule's message: why a file failed to decode, where a copy or patient is."""
    if rule == "decodes":
        failed = table[~table["decodes"]]
        # decode_error starts with the full path, which the message already names
        return {f: str(e).split(": ", 1)[-1] for f, e in zip(failed["file"], failed["decode_error"], strict=True)}
    if rule in ("duplicate_within_split", "duplicate_across_splits"):
        return {
            f: f"{s or UNSPLIT}, pixels {str(h)[:8]}"
            for f, s, h in zip(table["file"], table["split"], table["content_hash"], strict=True)
        }
    if rule == "metadata_implausible":
        bad = pd.DataFrame({c: implausible(table, c) for c in METADATA_COLUMNS})
        return {
            table.at[i, "file"]: ", ".join(_shown(c, table.at[i, c]) for c in METADATA_COLUMNS if bad.at[i, c])
            for i in bad.index[bad.any(axis=1)]
        }
    if rule == "mode_converted":
        converted = table[table["converted"]]
        return {f: f"stored {m}" for f, m in zip(converted["file"], converted["stored_mode"], strict=True)}
    if rule == "patient_in_two_splits":
        return {
            f: f"{s or UNSPLIT}, patient {p}"
            for f, s, p in zip(table["file"], table["split"], table["patient_id"], strict=True)
        }
    if rule in ("class_present", "class_share"):
        return {f"{s}/{c}": f"{n} images, {share:.0%}" for s, c, n, share in table.itertuples(index=False)}
    return {}


def _shown(column: str, value: Any) -> str:
    return f"{column} {value:g}" if isinstance(value, float) else f"{column} {value!r}"


def validate_dataset(
    manifest: pd.DataFrame,
    facts: pd.DataFrame,
    cfg: ValidationConfig,
    report_dir: Path,
    labels_required: bool = True,
) -> ValidationReport:
    """Check ``manifest`` (and its ``facts`` from compute_image_facts) against every rule.

    Writes ``report_dir/validation.json`` and the GX Data Docs site ``report_dir/data_docs``.
    Class presence and share are checked only when labels are required (unlabelled target data
    has no classes to count). Call ``raise_if_blocking()`` on the result to stop a pipeline.
    """
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    table = images_table(manifest, facts)
    tables = {"images": (table, image_expectations(table, cfg, labels_required), ["file"])}
    if labels_required and {"label", "split"} <= set(table.columns):
        classes = classes_table(table, cfg.allowed_labels)
        tables["classes"] = (classes, class_expectations(cfg), ["split", "class"])
    docs_dir = report_dir / "data_docs"
    results = _run_suites(tables, docs_dir)

    checks, failures = [], []
    rule_order = [e.meta["rule"] for _, expectations, _ in tables.values() for e in expectations]
    for table_name, suite_result in zip(tables, results, strict=True):
        for result in suite_result.results:
            config = result.expectation_config
            rule = config.meta["rule"]
            severity = "blocking" if config.severity == BLOCKING else "warning"
            checks.append(
                {
                    "rule": rule,
                    "severity": severity,
                    "table": table_name,
                    "expectation": config.type,
                    "kwargs": {k: v for k, v in config.kwargs.items() if k != "batch_id"},
                    "success": result.success,
                    "unexpected_count": result.result.get("unexpected_count"),
                }
            )
            if not result.success:
                failures.append(Failure(rule, severity, _message(result, _details(tables[table_name][0], rule))))
    # GX returns results in its own order; report them blocking first, then in rule order.
    failures.sort(key=lambda f: (f.severity != "blocking", rule_order.index(f.rule)))
    report = ValidationReport(
        success=not any(f.severity == "blocking" for f in failures),
        failures=failures,
        n_images=len(table),
        report_json_path=report_dir / "validation.json",
        data_docs_dir=docs_dir,
        checks=checks,
    )
    report.write_json()
    return report
