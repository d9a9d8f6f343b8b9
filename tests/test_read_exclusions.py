"""Readers report every row and file they leave out, on small copies of the real datasets with a defect injected."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image
from prefect.testing.utilities import prefect_test_harness
from typer.testing import CliRunner

from flows.cli import app
from flows.retrain import retrain
from pipeline.data.readers import NIH_CSV, kermany_patient, read_dataset, read_dataset_with_report
from pipeline.errors import DatasetError, DataValidationError
from tests.conftest import REPO, copy_kermany_subset, copy_nih_subset

pytestmark = pytest.mark.slow  # a whole run: left out of make test-fast


def only(report, reason):
    [exclusion] = [e for e in report.exclusions if e.reason == reason]
    return exclusion


@pytest.fixture()
def nih_copy(data_dir: Path, tmp_path: Path) -> Path:
    return copy_nih_subset(data_dir, tmp_path / "nih-cxr8", per_class=20)


def edit_csv(site: Path, row: int, column: str, value: str) -> None:
    table = pd.read_csv(site / NIH_CSV, dtype=str, keep_default_na=False)
    table.loc[row, column] = value
    table.to_csv(site / NIH_CSV, index=False)


def test_misspelled_nih_label_blocks_naming_the_row_and_the_nearest_label(nih_copy, tmp_path):
    edit_csv(nih_copy, 1, "Finding Labels", "Pneumonai")  # CSV line 3 (line 1 is the header)
    edit_csv(nih_copy, 25, "Finding Labels", "Infiltration|No finding")  # line 27
    manifest, report = read_dataset_with_report(nih_copy)
    exclusion = only(report, "unknown_label")
    assert (exclusion.severity, exclusion.count, len(manifest)) == ("blocking", 2, 38)
    for line, label, nearest in ((3, "Pneumonai", "Pneumonia"), (27, "No finding", "No Finding")):
        assert f"line {line} (" in exclusion.message
        assert f"{label!r} is not an NIH label (nearest: {nearest!r})" in exclusion.message
    with pytest.raises(DatasetError, match="unknown_label: 2 .*line 3"):
        read_dataset(nih_copy)

    result = CliRunner().invoke(
        app, ["validate", str(nih_copy), "--config", str(REPO / "params.yaml"),
              "--set", f"validation.report_dir={tmp_path / 'reports'}", "--set", "validation.min_images=10"]
    )  # fmt: skip
    assert result.exit_code == 3, result.output
    assert "[BLOCKING] unknown_label" in result.output and "nearest: 'Pneumonia'" in result.output
    saved = json.loads((tmp_path / "reports" / "nih-cxr8" / "validation.json").read_text())
    assert saved["success"] is False
    assert [(e["reason"], e["count"]) for e in saved["exclusions"]] == [("unknown_label", 2)]


def test_out_of_task_nih_row_is_left_out_with_a_count(nih_copy):
    edit_csv(nih_copy, 2, "Finding Labels", "Hernia")
    manifest, report = read_dataset_with_report(nih_copy)
    exclusion = only(report, "out_of_task")
    assert (exclusion.severity, exclusion.count) == ("warning", 1)
    assert "line 4 (" in exclusion.message and "'Hernia'" in exclusion.message
    assert len(manifest) == 39 and not report.blocking


def test_imagefolder_layout_surprises_are_reported(data_dir, tmp_path):
    site = copy_kermany_subset(data_dir, tmp_path / "kermany-pediatric", per_class=3)
    shutil.copytree(site / "test", site / "testing")  # a misnamed split folder: 6 images not read
    normal = sorted((site / "train" / "NORMAL").iterdir())
    Image.open(normal[0]).save(normal[0].with_suffix(".tif"))
    shutil.copy(normal[1], site / "train" / "stray.jpeg")  # outside any class folder
    (site / "notes.txt").write_text("exported 2024-01-01")
    manifest, report = read_dataset_with_report(site)
    assert len(manifest) == 12 and not report.blocking
    assert only(report, "unknown_split_folder").message.endswith(": testing/ (6 files)")
    unlisted = only(report, "unlisted_file")
    assert unlisted.count == 3
    assert set(unlisted.examples) == {"notes.txt", "train/stray.jpeg", f"train/NORMAL/{normal[0].stem}.tif"}

    shutil.move(site / "train" / "NORMAL", site / "train" / "HEALTHY")
    with pytest.raises(DatasetError, match=r"unknown_class_folder: 1 .*train/HEALTHY/ \(4 files\)"):
        read_dataset(site)


def put_a_patient_in_train_and_test(data_dir: Path, site: Path) -> tuple[str, Path, Path]:
    """Copy two images of one real Kermany child, one into train/ and the other into test/."""
    by_patient: dict[str, list[Path]] = {}
    for file in sorted((data_dir / "kermany-pediatric" / "train" / "NORMAL").glob("IM-*")):
        by_patient.setdefault(kermany_patient(file.name), []).append(file)
    patient, (first, second, *_) = next((p, files) for p, files in by_patient.items() if len(files) > 1)
    shutil.copy(first, site / "train" / "NORMAL" / first.name)
    shutil.copy(second, site / "test" / "NORMAL" / second.name)
    return patient, first, second


def test_patient_in_official_train_and_test_blocks_naming_the_patient(data_dir, tmp_path):
    site = copy_kermany_subset(data_dir, tmp_path / "kermany-pediatric", per_class=3)
    patient, first, second = put_a_patient_in_train_and_test(data_dir, site)
    _, report = read_dataset_with_report(site)
    exclusion = only(report, "patient_in_official_splits")
    assert (exclusion.severity, exclusion.count) == ("blocking", 1)
    assert exclusion.examples == (
        f"kermany-pediatric/{patient} (train/NORMAL/{first.stem}, test/NORMAL/{second.stem})",
    )


def test_nan_in_a_float_medmnist_array_blocks_naming_the_array(data_dir, tmp_path):
    with np.load(data_dir / "pneumoniamnist" / "pneumoniamnist.npz") as real:
        arrays = {key: real[key][:6] for key in real.files}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = arrays[f"{split}_images"].astype(np.float32) / 255
    arrays["test_images"][1, 3, 3] = np.nan
    arrays["val_images"][4, 0, 0] = np.inf
    site = tmp_path / "pneumoniamnist"
    site.mkdir()
    np.savez(site / "pneumoniamnist.npz", **arrays)
    _, report = read_dataset_with_report(site)
    exclusion = only(report, "nonfinite_pixels")
    assert (exclusion.severity, exclusion.count) == ("blocking", 2)
    assert exclusion.examples == ("val_images[4]", "test_images[1]")
    with pytest.raises(DatasetError, match=r"nonfinite_pixels: 2 image\(s\) of pneumoniamnist.npz with NaN"):
        read_dataset(site)


def test_a_run_records_what_reading_left_out(data_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = Path(shutil.copy(REPO / "params.yaml", tmp_path))  # relative paths (outputs, MLflow) resolve here
    site = copy_kermany_subset(data_dir, tmp_path / "data" / "kermany-pediatric", per_class=12)
    shutil.copytree(site / "test", site / "testing")
    patient, _, _ = put_a_patient_in_train_and_test(data_dir, site)
    overrides = [f"data.root={tmp_path / 'data'}", "data.external=[]", "crosssim.enabled=false"]
    with prefect_test_harness(server_startup_timeout=120), pytest.raises(DataValidationError) as error:
        retrain(config_path=str(config), overrides=overrides)
    assert "patient_in_official_splits: 1 patient(s)" in str(error.value) and patient in str(error.value)

    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("crosssim-retrain").experiment_id])
    assert run.info.status == "FAILED"
    excluded = {k: v for k, v in run.data.metrics.items() if k.startswith("excluded.")}
    assert excluded == {
        "excluded.kermany-pediatric.patient_in_official_splits": 1,
        "excluded.kermany-pediatric.unknown_split_folder": 1,
    }
    saved = client.download_artifacts(run.info.run_id, "validation/kermany-pediatric/validation.json", str(tmp_path))
    reasons = {e["reason"]: e["count"] for e in json.loads(Path(saved).read_text())["exclusions"]}
    assert reasons == {"patient_in_official_splits": 1, "unknown_split_folder": 1}
