"""The validation stage on small copies of the real datasets, then on deliberately broken copies.

Each broken copy must fail its own rule, and the message must name the offending file (or split/class).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.config import EvaluateConfig, ValidationConfig
from pipeline.data.images import decode_image
from pipeline.data.readers import NIH_CSV, read_dataset
from pipeline.errors import DataValidationError
from pipeline.evaluation import evaluate_split
from pipeline.validation import ValidationReport, compute_image_facts, validate_dataset
from tests.validation_fixtures import copies_root, kermany_manifest, nih_manifest, validation_cfg  # noqa: F401

METADATA_WARNING = "metadata_missing"


def run(manifest: pd.DataFrame, cfg: ValidationConfig, labels_required: bool = True) -> ValidationReport:
    return validate_dataset(manifest, compute_image_facts(manifest), cfg, cfg.report_dir, labels_required)


def blocking_messages(report: ValidationReport, rule: str) -> str:
    assert not report.success, report.summary()
    messages = [f.message for f in report.blocking if f.rule == rule]
    assert messages, f"rule {rule} did not fail:\n{report.summary()}"
    return "\n".join(messages)


def ref(path: str, root: Path) -> str:
    """How messages name a file: its path from the site folder on."""
    return Path(path).relative_to(root).as_posix()


def test_clean_real_subset_passes_with_gx_data_docs(kermany_manifest, validation_cfg):
    report = run(kermany_manifest, validation_cfg)
    assert report.success, report.summary()
    # Kermany records no age, sex or view: reported, never fatal
    assert {f.rule for f in report.failures} == {METADATA_WARNING}
    assert all("all 24 rows" in f.message for f in report.warnings)
    saved = json.loads(report.report_json_path.read_text())
    assert saved["success"] is True and saved["n_images"] == 24
    assert {c["rule"] for c in saved["checks"]} >= {"decodes", "patient_in_two_splits", "class_share", "min_images"}
    index = report.data_docs_dir / "index.html"
    assert index.is_file() and "Great Expectations" in index.read_text()
    pages = list((report.data_docs_dir / "validations").rglob("*.html"))
    assert {p.stem for p in pages} == {"crosssim-images", "crosssim-classes"}
    assert report.report_json_path.parent == validation_cfg.report_dir


def test_missing_age_is_a_warning_with_a_row_count(nih_manifest, copies_root, validation_cfg):
    assert run(nih_manifest, validation_cfg).failures == []
    nih_manifest.loc[2, "age"] = np.nan
    report = run(nih_manifest, validation_cfg)
    assert report.success, report.summary()
    [warning] = report.failures
    assert warning.rule == METADATA_WARNING and warning.severity == "warning"
    assert "1 of 8 rows break 'age is recorded'" in warning.message
    assert ref(nih_manifest.loc[2, "path"], copies_root) in warning.message


def test_corrupt_bytes_fail_decoding(kermany_manifest, copies_root, validation_cfg):
    path = kermany_manifest.loc[3, "path"]
    Path(path).write_bytes(np.random.default_rng(0).bytes(4000))
    message = blocking_messages(run(kermany_manifest, validation_cfg), "decodes")
    assert ref(path, copies_root) in message and "1 of 24 rows" in message


def test_truncated_png_fails_decoding(nih_manifest, copies_root, validation_cfg):
    path = Path(nih_manifest.loc[5, "path"])
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    message = blocking_messages(run(nih_manifest, validation_cfg), "decodes")
    assert ref(str(path), copies_root) in message and "truncated" in message


def test_blank_image_fails(kermany_manifest, copies_root, validation_cfg):
    path = kermany_manifest.loc[7, "path"]
    Image.new("L", (224, 224), color=128).save(path, format="JPEG")
    message = blocking_messages(run(kermany_manifest, validation_cfg), "not_blank")
    assert ref(path, copies_root) in message


def test_unknown_label_fails(kermany_manifest, copies_root, validation_cfg):
    kermany_manifest.loc[0, "label"] = 2
    message = blocking_messages(run(kermany_manifest, validation_cfg), "label_values")
    assert ref(kermany_manifest.loc[0, "path"], copies_root) in message


def test_missing_label_fails_only_when_labels_are_required(nih_manifest, copies_root, validation_cfg):
    nih_manifest.loc[1, "label"] = pd.NA
    message = blocking_messages(run(nih_manifest, validation_cfg), "label_values")
    assert "label is present" in message and ref(nih_manifest.loc[1, "path"], copies_root) in message
    nih_manifest["label"] = pd.NA  # unlabelled target data: no label or class rule applies
    assert run(nih_manifest, validation_cfg, labels_required=False).failures == []


def test_same_image_in_two_splits_fails(kermany_manifest, copies_root, validation_cfg):
    source = kermany_manifest[kermany_manifest["split"] == "train"].iloc[0]
    # the copy is re-encoded as PNG under another name: only the pixels are the same
    copy = Path(source["path"]).parents[2] / "test" / "NORMAL" / "IM-9999-0001.png"
    Image.fromarray(decode_image(source["path"])).save(copy)
    extra = {**source.to_dict(), "image_id": "test/NORMAL/IM-9999-0001", "path": str(copy), "split": "test"}
    extra["patient_id"] = "kermany-pediatric/test/IM-9999"
    manifest = pd.concat([kermany_manifest, pd.DataFrame([extra])], ignore_index=True)
    message = blocking_messages(run(manifest, validation_cfg), "duplicate_across_splits")
    assert ref(source["path"], copies_root) in message and ref(str(copy), copies_root) in message


def test_same_image_twice_in_one_split_fails(kermany_manifest, copies_root, validation_cfg):
    source = Path(kermany_manifest.loc[0, "path"])
    copy = source.with_name("IM-9998-0001.jpeg")
    shutil.copy(source, copy)
    extra = {**kermany_manifest.loc[0].to_dict(), "image_id": "copy", "path": str(copy)}
    manifest = pd.concat([kermany_manifest, pd.DataFrame([extra])], ignore_index=True)
    message = blocking_messages(run(manifest, validation_cfg), "duplicate_within_split")
    assert ref(str(source), copies_root) in message and ref(str(copy), copies_root) in message


def test_patient_in_two_splits_fails(kermany_manifest, copies_root, validation_cfg):
    train = kermany_manifest.index[kermany_manifest["split"] == "train"][0]
    val = kermany_manifest.index[kermany_manifest["split"] == "val"][0]
    kermany_manifest.loc[val, "patient_id"] = kermany_manifest.loc[train, "patient_id"]
    message = blocking_messages(run(kermany_manifest, validation_cfg), "patient_in_two_splits")
    for row in (train, val):
        assert ref(kermany_manifest.loc[row, "path"], copies_root) in message


def test_empty_class_fails(kermany_manifest, validation_cfg):
    manifest = kermany_manifest[~((kermany_manifest["split"] == "val") & (kermany_manifest["label"] == 1))]
    message = blocking_messages(run(manifest, validation_cfg), "class_present")
    assert "val/pneumonia (0 images" in message


def test_missing_required_column_fails(kermany_manifest, validation_cfg):
    report = run(kermany_manifest.drop(columns=["patient_id"]), validation_cfg)
    assert "missing column(s): patient_id" in blocking_messages(report, "required_columns")


def test_empty_required_value_fails(kermany_manifest, copies_root, validation_cfg):
    kermany_manifest.loc[4, "patient_id"] = ""
    message = blocking_messages(run(kermany_manifest, validation_cfg), "required_values")
    assert "patient_id is not empty" in message and ref(kermany_manifest.loc[4, "path"], copies_root) in message


def test_too_few_images_fails(kermany_manifest, validation_cfg):
    cfg = validation_cfg.model_copy(update={"min_images": 30})
    assert "24 image(s); at least 30 required" in blocking_messages(run(kermany_manifest, cfg), "min_images")


def test_raise_if_blocking_carries_summary_and_report(kermany_manifest, validation_cfg):
    kermany_manifest.loc[0, "label"] = 7
    report = run(kermany_manifest, validation_cfg)
    with pytest.raises(DataValidationError) as caught:
        report.raise_if_blocking()
    assert "label_values" in caught.value.summary and caught.value.report_path == str(report.report_json_path)
    assert json.loads(report.report_json_path.read_text())["success"] is False


def test_implausible_metadata_warns_naming_rows_and_stays_out_of_subgroups(nih_manifest, copies_root, validation_cfg):
    site = copies_root / "nih-cxr8"
    table = pd.read_csv(site / NIH_CSV, dtype=str, keep_default_na=False)
    table.loc[0, "Patient Age"], table.loc[1, "Patient Age"] = "250", "-5"
    table.loc[2, "Patient Gender"], table.loc[3, "View Position"] = "Q", "XYZ"
    table.to_csv(site / NIH_CSV, index=False)
    manifest = read_dataset(site)
    report = run(manifest, validation_cfg)
    assert report.success, report.summary()
    assert {f.rule for f in report.failures} == {"metadata_implausible"}
    messages = "\n".join(f.message for f in report.warnings)
    assert "2 of 8 rows break 'age within [0, 120]'" in messages
    for row, value in ((0, "age 250"), (1, "age -5"), (2, "sex 'Q'"), (3, "view 'XYZ'")):
        assert f"{ref(manifest.loc[row, 'path'], copies_root)} ({value})" in messages

    scored = manifest.assign(prob=np.linspace(0.1, 0.9, len(manifest)))
    result = evaluate_split("nih-cxr8/test", scored, 0.5, EvaluateConfig(bootstrap_samples=20), copies_root / "eval")
    groups = result.subgroups
    assert "Q" not in groups["sex"] and "XYZ" not in groups["view"]
    assert groups["sex"]["unknown"]["n"] == groups["view"]["unknown"]["n"] == 1
    assert groups["age_band"]["unknown"]["n"] == 2
    assert "2 implausible age value(s) counted as unknown" in result.notes


def test_colour_alpha_and_16_bit_images_in_a_grayscale_site_are_counted(nih_manifest, copies_root, validation_cfg):
    paths = [Path(nih_manifest.loc[row, "path"]) for row in (0, 1, 2)]
    gray = [np.asarray(Image.open(path)) for path in paths]
    Image.fromarray(gray[0]).convert("RGB").save(paths[0])
    Image.fromarray(gray[1]).convert("RGBA").save(paths[1])
    Image.fromarray(gray[2].astype(np.uint16) * 257).save(paths[2])  # 16-bit grayscale PNG
    report = run(nih_manifest, validation_cfg)
    assert report.success, report.summary()
    [warning] = report.warnings
    assert warning.rule == "mode_converted" and "3 of 8 rows break" in warning.message
    for path, mode in zip(paths, ("RGB", "RGBA", "I;16"), strict=True):
        assert f"{ref(str(path), copies_root)} (stored {mode})" in warning.message
