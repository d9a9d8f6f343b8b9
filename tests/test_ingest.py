"""`crosssim ingest` on real NIH images and DICOM files made from them, in a throwaway git+DVC repository.

Each test copies a small repository (git, DVC, a local remote, one NIH-layout site already
versioned) built once per module, so nothing touches the project's own data/ or data.dvc.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from typer.testing import CliRunner

from flows.cli import app
from pipeline.config import load_config
from pipeline.data.readers import read_dataset
from pipeline.data.scrub import scrub_png
from pipeline.errors import VersioningError
from pipeline.ingest.commit import _Transaction
from pipeline.ingest.dvc_repo import DvcRepo
from pipeline.rollout.outcomes import OutcomeReport, record_outcomes
from pipeline.serving.image_store import ImageStore
from pipeline.serving.ledger import PredictionLedger, pseudonym
from pipeline.versioning import dvc_tracked_version
from tests.conftest import REPO, copy_nih_subset
from tests.test_serving_ledger import make_row

pytestmark = pytest.mark.slow  # ingest and retraining flows: left out of make test-fast

runner = CliRunner()
SITE = "nih-site"
SALT_VAR = "CROSSSIM_DICOM_SALT_NIH_SITE"
PHI = {
    "PatientName": "Doe^Jane",
    "PatientID": "MRN-123456",
    "PatientBirthDate": "19800101",
    "InstitutionName": "St Example Hospital",
    "AccessionNumber": "ACC-998877",
    "ReferringPhysicianName": "House^Gregory",
}
PHI_BYTES = [value.encode() for value in PHI.values()]


@pytest.fixture(scope="module")
def template(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """root/repo: git + DVC, data/raw/nih-site (6 real NIH images) added and pushed to root/remote."""
    root = tmp_path_factory.mktemp("ingest-template")
    repo = root / "repo"
    copy_nih_subset(data_dir, repo / "data" / "raw" / SITE, per_class=3)
    shutil.copy(REPO / "params.yaml", repo / "params.yaml")
    with pytest.MonkeyPatch.context() as env:
        _dvc_env(env, root)
        subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
        from dvc.repo import Repo

        Repo.init(str(repo))
        (repo / ".dvc" / "config").write_text(
            "[core]\n    remote = local\n    analytics = false\n['remote \"local\"']\n    url = ../../remote\n"
        )
        dvc = DvcRepo(repo)
        dvc.add(repo / "data")
        dvc.push(repo / "data", None)
    return root


def _dvc_env(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.setenv("DVC_SITE_CACHE_DIR", str(root.parent / "dvc-site-cache"))
    monkeypatch.delenv("CROSSSIM_DICOM_SALT", raising=False)
    monkeypatch.delenv(SALT_VAR, raising=False)


@pytest.fixture()
def root(template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "case"
    shutil.copytree(template, root, symlinks=True)
    _dvc_env(monkeypatch, root)
    return root


def _ingest(root: Path, folder: Path, *overrides: str):
    sets = [arg for item in overrides for arg in ("--set", item)]
    return runner.invoke(app, ["ingest", SITE, str(folder), "--config", str(root / "repo" / "params.yaml"), *sets])


def _snapshot(root: Path) -> dict[str, str]:
    """Every file of the dataset folder, plus data.dvc and .gitignore, by content."""
    repo = root / "repo"
    files = [p for p in (repo / "data").rglob("*") if p.is_file()] + [repo / "data.dvc", repo / ".gitignore"]
    return {str(p.relative_to(repo)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _phi_found(folder: Path) -> list[str]:
    return [
        f"{path}: {phi!r}"
        for path in folder.rglob("*")
        if path.is_file()
        for phi in PHI_BYTES
        if phi in path.read_bytes()
    ]


def _fresh_rows(data_dir: Path, root: Path) -> pd.DataFrame:
    """Real NIH rows, one per patient the template's site does not hold, normal and pneumonia alternating."""
    table = pd.read_csv(data_dir / "nih-cxr8" / "Data_Entry_2017.csv", dtype=str, keep_default_na=False)
    fresh = table[~table["Patient ID"].isin(_site_table(root)["Patient ID"])].drop_duplicates("Patient ID")
    normal = fresh[fresh["Finding Labels"].eq("No Finding")].reset_index(drop=True).iloc[:10]
    pneumonia = fresh[fresh["Finding Labels"].str.contains("Pneumonia")].reset_index(drop=True).iloc[:10]
    return pd.concat([normal, pneumonia]).sort_index(kind="stable").reset_index(drop=True)


def _site_table(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / "repo" / "data" / "raw" / SITE / "Data_Entry_2017.csv", dtype=str, keep_default_na=False)


def _png_batch(data_dir: Path, folder: Path, rows: pd.DataFrame) -> Path:
    (folder / "images").mkdir(parents=True)
    for name in rows["Image Index"]:
        shutil.copy(data_dir / "nih-cxr8" / "images" / name, folder / "images" / name)
    rows.to_csv(folder / "Data_Entry_2017.csv", index=False)
    return folder


def _dicom_from(png: Path, out: Path, patient_id: str) -> None:
    """A DX DICOM of a real radiograph, carrying fake PHI in the header and in a sequence."""
    pixels = np.asarray(Image.open(png).convert("L"))
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Modality, ds.PatientAge, ds.PatientSex, ds.ViewPosition = "DX", "045Y", "F", "PA"
    for keyword, value in {**PHI, "PatientID": patient_id}.items():
        setattr(ds, keyword, value)
    request = Dataset()
    request.InstitutionName = PHI["InstitutionName"]
    ds.RequestAttributesSequence = [request]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(out, enforce_file_format=True)


def _with_metadata_phi(folder: Path, rows: pd.DataFrame) -> pd.DataFrame:
    """Row 0's PNG gets PHI in text chunks; row 1 becomes a JPEG with PHI in EXIF and a comment."""
    rows = rows.copy()
    png = folder / "images" / rows["Image Index"].iloc[0]
    info = PngInfo()
    info.add_text("PatientName", PHI["PatientName"])
    info.add_itxt("Institution", PHI["InstitutionName"])
    with Image.open(png) as image:
        image.save(png, pnginfo=info)
    exported = folder / "images" / rows["Image Index"].iloc[1]
    jpeg = exported.with_suffix(".jpg")
    exif = Image.Exif()
    exif[0x010E] = f"{PHI['PatientID']} {PHI['AccessionNumber']}"  # ImageDescription
    with Image.open(exported) as image:
        image.save(jpeg, exif=exif, comment=PHI["ReferringPhysicianName"].encode(), quality=95)
    exported.unlink()
    rows.iloc[1, rows.columns.get_loc("Image Index")] = jpeg.name
    return rows


def _mixed_batch(data_dir: Path, folder: Path, rows: pd.DataFrame) -> Path:
    """Rows 0-3 as exported images (row 0 a PNG and row 1 a JPEG with PHI in their metadata), rows 4-5
    as DICOM of patient MRN-123456 (its CSV rows carry the MRN)."""
    _png_batch(data_dir, folder, rows.iloc[:4])
    rows = pd.concat([_with_metadata_phi(folder, rows.iloc[:4]), rows.iloc[4:]])
    dicom_rows = rows.iloc[4:6].copy()
    for index, name in zip(dicom_rows.index, dicom_rows["Image Index"], strict=True):
        dicom_name = f"scan{index}.dcm"
        _dicom_from(data_dir / "nih-cxr8" / "images" / name, folder / "images" / dicom_name, PHI["PatientID"])
        dicom_rows.loc[index, ["Image Index", "Patient ID", "Patient Age"]] = [dicom_name, PHI["PatientID"], ""]
    pd.concat([rows.iloc[:4], dicom_rows]).to_csv(folder / "Data_Entry_2017.csv", index=False)
    return folder


def test_clean_batch_is_versioned_pushed_logged_and_free_of_phi(data_dir, root, tmp_path, monkeypatch):
    monkeypatch.setenv(SALT_VAR, "s3cret-salt-for-tests-0123456789")
    rows = _fresh_rows(data_dir, root)
    batch = _mixed_batch(data_dir, tmp_path / "week-01", rows.iloc[:6])
    repo = root / "repo"
    before = dvc_tracked_version(repo / "data.dvc")

    result = _ingest(root, batch)
    assert result.exit_code == 0, result.output
    assert "ACCEPTED" in result.output

    after = dvc_tracked_version(repo / "data.dvc")
    assert after != before
    log = [json.loads(line) for line in (repo / "ingest_log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and log[0]["status"] == "accepted"
    assert (log[0]["version_before"], log[0]["version_after"]) == (before, after)
    assert log[0]["counts"]["images"] == 6 and log[0]["counts"]["dicom_images"] == 2 and log[0]["content_digest"]
    # the remote holds the new version's listing and every file it names
    listing = root / "remote" / "files" / "md5" / after[:2] / after[2:]
    assert listing.is_file()
    assert all(
        (root / "remote" / "files" / "md5" / f["md5"][:2] / f["md5"][2:]).is_file()
        for f in json.loads(listing.read_text())
    )
    # the site now reads as 12 images; the DICOM patient is a pseudonym and its images are PNG
    manifest = read_dataset(repo / "data" / "raw" / SITE)
    assert len(manifest) == 12
    dicom_rows = manifest[manifest["image_id"].str.startswith("dicom-")]
    assert len(dicom_rows) == 2 and dicom_rows["patient_id"].nunique() == 1
    assert not list((repo / "data").rglob("*.dcm"))
    # PHI is nowhere: dataset, DVC cache, remote, log, reports, workspace; not in the drop's PNG/JPEG
    # metadata either, and those images' pixels are the exported ones
    assert _phi_found(batch) and _phi_found(root) == []
    assert log[0]["counts"]["images_metadata_removed"] == 2 and "metadata_removed" in result.output
    exported = [p for p in (batch / "images").iterdir() if p.suffix != ".dcm"]
    assert {p.suffix for p in exported} == {".png", ".jpg"}
    for image in exported:
        staged = repo / "data" / "raw" / SITE / "images" / image.name
        np.testing.assert_array_equal(np.asarray(Image.open(staged)), np.asarray(Image.open(image)))
    assert (repo / "outputs" / "ingest" / SITE / log[0]["batch_id"] / "summary.md").is_file()

    snapshot = _snapshot(root)
    again = _ingest(root, batch)
    assert again.exit_code == 0 and "already ingested" in again.output
    resent = shutil.copytree(batch, tmp_path / "week-01-resent")
    pd.read_csv(resent / "Data_Entry_2017.csv").iloc[::-1].to_csv(resent / "Data_Entry_2017.csv", index=False)
    again = _ingest(root, resent)
    assert again.exit_code == 0 and "already in" in again.output, again.output
    assert _snapshot(root) == snapshot and len((repo / "ingest_log.jsonl").read_text().splitlines()) == 1

    # DICOM of next week pseudonymised with another secret would split patients in two: refused
    monkeypatch.setenv(SALT_VAR, "another-secret-salt-0123456789")
    result = _ingest(root, _mixed_batch(data_dir, tmp_path / "week-02", rows.iloc[6:12]))
    assert result.exit_code == 3 and "salt_changed" in result.output, result.output
    assert _snapshot(root) == snapshot


def _corrupt_file(batch: Path, root: Path) -> tuple[str, str]:
    victim = sorted((batch / "images").iterdir())[1]
    victim.write_bytes(victim.read_bytes()[:300])  # a truncated export
    return "corrupt_file", victim.name


def _unknown_label(batch: Path, root: Path) -> tuple[str, str]:
    table = pd.read_csv(batch / "Data_Entry_2017.csv", dtype=str, keep_default_na=False)
    table.loc[1, "Finding Labels"] = "Pneumonai"
    table.to_csv(batch / "Data_Entry_2017.csv", index=False)
    return "unknown_label", "line 3"


def _known_patient(batch: Path, root: Path) -> tuple[str, str]:
    table = pd.read_csv(batch / "Data_Entry_2017.csv", dtype=str, keep_default_na=False)
    table.loc[0, "Patient ID"] = _site_table(root)["Patient ID"].iloc[0]
    table.to_csv(batch / "Data_Entry_2017.csv", index=False)
    return "known_patient", table.loc[0, "Image Index"]


def _missing_column(batch: Path, root: Path) -> tuple[str, str]:
    table = pd.read_csv(batch / "Data_Entry_2017.csv", dtype=str, keep_default_na=False)
    table.drop(columns=["Patient ID"]).to_csv(batch / "Data_Entry_2017.csv", index=False)
    return "csv_schema", "missing column(s) Patient ID"


def _dicom_of_another_patient(batch: Path, root: Path) -> tuple[str, str]:
    table = pd.read_csv(batch / "Data_Entry_2017.csv", dtype=str, keep_default_na=False)
    table.loc[4, "Patient ID"] = "MRN-999999"  # the CSV says one patient, the DICOM header another
    table.to_csv(batch / "Data_Entry_2017.csv", index=False)
    return "dicom_patient", f"line 6 (images/{table.loc[4, 'Image Index']}"


@pytest.mark.parametrize(
    "defect", [_corrupt_file, _unknown_label, _known_patient, _missing_column, _dicom_of_another_patient]
)
def test_bad_batch_is_quarantined_with_a_report_and_changes_nothing(defect, data_dir, root, tmp_path, monkeypatch):
    monkeypatch.setenv(SALT_VAR, "s3cret-salt-for-tests-0123456789")
    rows = _fresh_rows(data_dir, root).iloc[:6]
    batch = _mixed_batch(data_dir, tmp_path / "week-02", rows)
    rule, named = defect(batch, root)
    snapshot = _snapshot(root)

    result = _ingest(root, batch)
    assert result.exit_code == 3, result.output
    assert "Traceback" not in result.output and named in result.output and "REJECTED" in result.output
    [quarantined] = [p for p in (root / "repo" / "quarantine" / SITE).iterdir() if p.is_dir()]
    report = json.loads((quarantined / "report.json").read_text())
    blocking = [p for p in report["problems"] if p["severity"] == "blocking"]
    assert [p for p in blocking if p["rule"] == rule and named in p["message"]], blocking
    assert (quarantined / "summary.md").is_file()
    assert _snapshot(root) == snapshot
    # the versioned ingest log is untouched: the rejection is logged with the quarantine
    assert not (root / "repo" / "ingest_log.jsonl").exists()
    [entry] = [json.loads(line) for line in (quarantined.parent / "quarantine_log.jsonl").read_text().splitlines()]
    assert entry["status"] == "rejected" and rule in entry["blocking_rules"] and entry["location"] == str(quarantined)
    assert entry["version_before"] == entry["version_after"] == dvc_tracked_version(root / "repo" / "data.dvc")
    assert _phi_found(root) == []  # the quarantine holds the de-identified copy, never the drop itself
    if defect is _known_patient:  # follow-ups are accepted when the config says so, with a warning
        result = _ingest(root, batch, "ingest.allow_known_patients=true")
        assert result.exit_code == 0 and "ACCEPTED" in result.output and "| warning | known_patient |" in result.output


@pytest.mark.parametrize("failure", ["copy", "push"])
def test_failure_midway_rolls_back_to_the_exact_previous_state(failure, data_dir, root, tmp_path, monkeypatch):
    monkeypatch.setenv(SALT_VAR, "s3cret-salt-for-tests-0123456789")
    batch = _mixed_batch(data_dir, tmp_path / "week-03", _fresh_rows(data_dir, root).iloc[:6])
    snapshot = _snapshot(root)
    if failure == "push":

        def push(self, target, remote):
            raise VersioningError("remote unreachable")

        monkeypatch.setattr(DvcRepo, "push", push)
    else:
        images, real_replace, moved = root / "repo" / "data" / "raw" / SITE / "images", os.replace, []

        def replace(source, destination):
            if Path(destination).parent == images:
                moved.append(destination)
                if len(moved) == 3:
                    raise OSError(28, "No space left on device")
            real_replace(source, destination)

        monkeypatch.setattr(os, "replace", replace)

    result = _ingest(root, batch)
    assert result.exit_code == 5, result.output
    assert "restored as they were" in result.output and "Traceback" not in result.output
    assert _snapshot(root) == snapshot
    repo = root / "repo"
    assert not (repo / "ingest_log.jsonl").exists() and not (repo / "quarantine").exists()
    assert [p.name for p in (repo / ".crosssim-ingest").iterdir()] == [".lock"]

    if failure == "push":  # the rolled-back state is a sound one: the same batch now goes in
        monkeypatch.undo()
        _dvc_env(monkeypatch, root)
        monkeypatch.setenv(SALT_VAR, "s3cret-salt-for-tests-0123456789")
        result = _ingest(root, batch)
        assert result.exit_code == 0 and "ACCEPTED" in result.output, result.output


def test_a_commit_killed_midway_is_rolled_back_by_the_next_ingest(data_dir, root, tmp_path, monkeypatch):
    batch = _png_batch(data_dir, tmp_path / "week-05", _fresh_rows(data_dir, root).iloc[:4])
    snapshot = _snapshot(root)

    def push(self, target, remote):
        raise VersioningError("killed")

    monkeypatch.setattr(DvcRepo, "push", push)
    monkeypatch.setattr(_Transaction, "rollback", lambda self: None)  # the process died: nothing undone
    assert _ingest(root, batch).exit_code == 5
    assert _snapshot(root) != snapshot and list((root / "repo" / ".crosssim-ingest").glob("*/journal.json"))

    monkeypatch.undo()
    _dvc_env(monkeypatch, root)
    broken = _png_batch(data_dir, tmp_path / "week-06", _fresh_rows(data_dir, root).iloc[4:6])
    _missing_column(broken, root)
    result = _ingest(root, broken)
    assert result.exit_code == 3 and "rolled back an interrupted ingest" in result.output
    assert _snapshot(root) == snapshot
    assert not list((root / "repo" / ".crosssim-ingest").glob("*/journal.json"))


def test_dicom_without_a_secret_salt_is_refused_before_anything_is_written(data_dir, root, tmp_path, monkeypatch):
    batch = _mixed_batch(data_dir, tmp_path / "week-04", _fresh_rows(data_dir, root).iloc[:6])
    snapshot = _snapshot(root)
    result = _ingest(root, batch)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"${SALT_VAR}" in result.output and "Nothing was ingested" in " ".join(result.output.split())
    monkeypatch.setenv("CROSSSIM_DICOM_SALT", "crosssim")  # the public default of read_dataset
    result = _ingest(root, batch)
    assert result.exit_code == 2 and "not a usable secret" in result.output
    repo = root / "repo"
    assert _snapshot(root) == snapshot
    assert not (repo / "ingest_log.jsonl").exists() and not (repo / "quarantine").exists()


def test_the_ingest_flow_retrains_on_an_accepted_batch_and_registers_a_challenger(data_dir, root, tmp_path, monkeypatch):
    """The user story end to end: a batch (PNG + DICOM with PHI) in, checked and versioned, then train →
    registry challenger, with no PHI anywhere in the run."""
    from mlflow.tracking import MlflowClient
    from prefect.testing.utilities import prefect_test_harness

    from flows.ingest import ingest
    from tests.conftest import copy_kermany_subset

    repo = root / "repo"
    copy_kermany_subset(data_dir, repo / "data" / "raw" / "kermany-pediatric", per_class=20)
    DvcRepo(repo).add(repo / "data")  # the source site is versioned too: the workspace starts clean
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv(SALT_VAR, "s3cret-salt-for-tests-0123456789")
    batch = _mixed_batch(data_dir, tmp_path / "week-07", _fresh_rows(data_dir, root).iloc[:6])  # PNG + DICOM with PHI
    work = tmp_path / "work"
    overrides = [
        f"data.external=[{SITE}]",
        "crosssim.enabled=false",  # CrossSim inside the flow is test_flow's subject
        "validation.min_images=5",
        "data.val_fraction=0.3",  # the site has 4-5 patients per class left after its test split
        "data.image_size=32",
        "train.epochs=1",
        "train.batch_size=16",
        "evaluate.bootstrap_samples=50",
        f"data.cache_dir={work / 'cache'}",
        f"runs.dir={work / 'runs'}",
        f"tracking.local_dir={work / 'mlflow'}",
    ]
    with prefect_test_harness(server_startup_timeout=120):
        result = ingest(site=SITE, folder=str(batch), config_path=str(repo / "params.yaml"), overrides=overrides)
    assert result["status"] == "accepted" and result["retrain"]["registry"]["version"] == "1"
    uri = f"sqlite:///{work / 'mlflow' / 'mlflow.db'}"
    challenger = MlflowClient(uri, registry_uri=uri).get_model_version_by_alias("crosssim-pneumonia", "challenger")
    # the model was trained on the new data version: its lineage names the site folder as ingested
    assert challenger.tags[f"data_version.{SITE}"] == result["site_version"]
    # the fake PHI reached neither the training run (params, tags, artifacts, registry) nor its outputs
    assert _phi_found(work) == [] and _phi_found(repo) == []


def test_the_continuous_learning_loop_served_cases_to_a_shadow_rollout(data_dir, root, tmp_path, monkeypatch):
    """The whole loop on tiny settings: cases served by the champion and labelled later → feedback export →
    ingest (checked, versioned) → retrain → a challenger registered → its shadow rollout started (auto_start)."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.ingest import ingest
    from pipeline.rollout.actions import rollout_actions
    from pipeline.rollout.export import dataset_patients, export_labelled_cases
    from pipeline.tracking import MlflowTracker
    from tests.conftest import copy_kermany_subset
    from tests.test_registry import MeanBrightness

    repo, work = root / "repo", tmp_path / "work"
    copy_kermany_subset(data_dir, repo / "data" / "raw" / "kermany-pediatric", per_class=20)
    DvcRepo(repo).add(repo / "data")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    overrides = [
        f"data.external=[{SITE}]", "crosssim.enabled=false", "validation.min_images=5", "data.val_fraction=0.3",
        "data.image_size=32", "train.epochs=1", "train.batch_size=16", "evaluate.bootstrap_samples=50",
        "serve.export.enabled=false", f"data.cache_dir={work / 'cache'}", f"runs.dir={work / 'runs'}",
        f"tracking.local_dir={work / 'mlflow'}", "rollout.auto_start=true", "rollout.maturity_hours=0",
    ]  # fmt: skip
    cfg = load_config(repo / "params.yaml", overrides)
    rollouts = rollout_actions(cfg)
    with MlflowTracker(cfg.tracking, run_name="champion") as tracker:  # a stand-in champion at the flow's image size
        champion = tracker.log_model(MeanBrightness(1.0), "champion", np.zeros((2, 1, 32, 32), np.float32))
    rollouts.actions.register_challenger(champion, {}, lambda version: "the serving champion")
    rollouts.actions.approve(reviewer="dr. ada", reason="in service")

    # the champion served six adults at the site; a radiologist's reads came back
    salt = "s3cret-salt-for-tests-0123456789"
    ledger, store = PredictionLedger(f"sqlite:///{tmp_path / 'ledger.db'}"), ImageStore(tmp_path / "images", 30)
    reports = []
    for index, record in enumerate(_fresh_rows(data_dir, root).iloc[:6].to_dict("records")):
        row = make_row(index, site=SITE, patient_pseudonym=pseudonym(record["Patient ID"], salt))
        store.put(row.inference_id, scrub_png((data_dir / "nih-cxr8" / "images" / record["Image Index"]).read_bytes())[0])
        asyncio.run(ledger.record(row))
        label = "pneumonia" if "Pneumonia" in record["Finding Labels"] else "normal"
        reports.append(OutcomeReport(label, "radiologist_read", inference_id=row.inference_id))
    record_outcomes(ledger, reports, cfg.rollout.outcome_sources)
    batch = export_labelled_cases(
        ledger, store, SITE, tmp_path / "served-week", cfg.rollout.outcome_sources, timedelta(0),
        dataset_patients(repo / "data" / "raw" / SITE),
    )  # fmt: skip
    ledger.close()
    assert batch.cases == 6

    with prefect_test_harness(server_startup_timeout=120):
        result = ingest(site=SITE, folder=str(batch.folder), config_path=str(repo / "params.yaml"), overrides=overrides)
    assert result["status"] == "accepted" and result["retrain"]["registry"]["version"] == "2"
    rollout = rollouts.active()
    assert rollout is not None and (rollout.mode, rollout.champion, rollout.challenger) == ("shadow", "1", "2")
    assert result["retrain"]["rollout"] == f"started {rollout.describe()}"


def test_an_unknown_site_is_refused_unless_asked_for_as_a_new_site(data_dir, root, tmp_path):
    repo = root / "repo"
    batch = _png_batch(data_dir, tmp_path / "week-08", _fresh_rows(data_dir, root).iloc[:4])
    config = ["--config", str(repo / "params.yaml")]
    snapshot = _snapshot(root)

    typo = runner.invoke(app, ["ingest", "nih-sitr", str(batch), *config])
    assert typo.exit_code == 2 and "Traceback" not in typo.output
    message = " ".join(typo.output.split())
    assert "site 'nih-sitr' does not exist" in message and "known sites: nih-site" in message
    assert "did you mean 'nih-site'?" in message and "--new-site" in message
    existing = runner.invoke(app, ["ingest", SITE, str(batch), *config, "--new-site"])
    assert existing.exit_code == 2 and "already exists" in existing.output
    assert _snapshot(root) == snapshot and not (repo / ".crosssim-ingest").exists()
    assert not (repo / "ingest_log.jsonl").exists() and not (repo / "quarantine").exists()

    created = runner.invoke(app, ["ingest", "st-mary", str(batch), *config, "--new-site"])
    assert created.exit_code == 0 and "ACCEPTED" in created.output, created.output
    assert len(read_dataset(repo / "data" / "raw" / "st-mary")) == 4
    [entry] = [json.loads(line) for line in (repo / "ingest_log.jsonl").read_text().splitlines()]
    assert entry["site"] == "st-mary" and entry["status"] == "accepted"


def test_labelled_served_cases_export_as_a_batch_that_ingest_accepts(data_dir, root, tmp_path, monkeypatch):
    """The loop's last step: cases served at the site, labelled later, become its next training batch."""
    salt = "s3cret-salt-for-tests-0123456789"
    monkeypatch.setenv(SALT_VAR, salt)
    served = [f"serve.ledger_path={tmp_path / 'ledger.db'}", "serve.ledger_url=null", f"serve.image_store={tmp_path / 'images'}",
              "rollout.maturity_hours=0"]  # fmt: skip
    ledger, store = PredictionLedger(f"sqlite:///{tmp_path / 'ledger.db'}"), ImageStore(tmp_path / "images", 30)
    rows = _fresh_rows(data_dir, root).iloc[:6]
    reports = []
    for index, record in enumerate(rows.to_dict("records")):
        raw = (data_dir / "nih-cxr8" / "images" / record["Image Index"]).read_bytes()
        patient = pseudonym(record["Patient ID"], salt)  # as /v1/predict stores a patient_id sent with the image
        row = make_row(index, site=SITE, patient_pseudonym=patient, created_at=datetime.now(timezone.utc))
        store.put(row.inference_id, scrub_png(raw)[0], row.created_at)
        asyncio.run(ledger.record(row))
        label = "pneumonia" if "Pneumonia" in record["Finding Labels"] else "normal"
        reports.append(OutcomeReport(label, "radiologist_read", inference_id=row.inference_id))
    unlabelled = make_row(9, site=SITE)  # a pending prediction is not exported
    asyncio.run(ledger.record(unlabelled))
    copy = make_row(10, site=SITE, created_at=datetime.now(timezone.utc))  # the very same file served again
    store.put(copy.inference_id, store.get(reports[0].inference_id).read_bytes(), copy.created_at)
    asyncio.run(ledger.record(copy))
    reports.append(OutcomeReport(reports[0].label, "radiologist_read", inference_id=copy.inference_id))
    record_outcomes(ledger, reports, ("radiologist_read", "follow_up"))
    ledger.close()
    sets = [arg for item in served for arg in ("--set", item)]
    export = ["feedback", "export", SITE, "--config", str(root / "repo" / "params.yaml"), *sets]

    exported = runner.invoke(app, [*export, "--out", str(tmp_path / "week-served")])
    assert exported.exit_code == 0 and "6 labelled served cases" in exported.output, exported.output
    assert "1 held back: the same image file" in " ".join(exported.output.split())  # ingest would refuse the copy
    batch = pd.read_csv(tmp_path / "week-served" / "Data_Entry_2017.csv", dtype=str, keep_default_na=False)
    assert len(batch) == 6 and set(batch["Finding Labels"]) == {"Pneumonia", "No Finding"}
    assert (batch["Finding Labels"] == "Pneumonia").sum() == rows["Finding Labels"].str.contains("Pneumonia").sum()
    result = _ingest(root, tmp_path / "week-served")
    assert result.exit_code == 0 and "ACCEPTED" in result.output, result.output
    assert set(batch["Image Index"]) <= set(_site_table(root)["Image Index"])

    again = runner.invoke(app, [*export, "--out", str(tmp_path / "week-again")])
    said = " ".join(again.output.split())  # the error console wraps long lines
    assert again.exit_code == 2 and "7 exported before" in said and not (tmp_path / "week-again").exists()
