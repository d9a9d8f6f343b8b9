"""DICOM decoding and de-identification on DICOM files built from real NIH chest X-rays."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pipeline.data.dicom import deidentify, dicom_pixels, parse_age, read_dicom_folder
from pipeline.data.images import ImageDecodeError, decode_image
from pipeline.data.readers import read_dataset
from pipeline.errors import DatasetError

NIH_IMAGES = Path(os.environ.get("CROSSSIM_DATA_DIR", "/work/shared/data")) / "nih-cxr8" / "images"
# Two follow-ups of NIH patient 61 stand for patient A; two other NIH patients' images for patient B.
SOURCES = {"a1": "00000061_012.png", "a2": "00000061_015.png", "b1": "00000150_002.png", "b2": "00000165_001.png"}
SALT = "test-secret"
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation

PATIENTS = {
    "A": {"PatientName": "Doe^Jane", "PatientID": "MRN-123456", "PatientBirthDate": "19800101", "PatientSex": "F"},
    "B": {"PatientName": "Roe^Richard", "PatientID": "MRN-654321", "PatientBirthDate": "19280704", "PatientSex": "M"},
}
STUDY_PHI = {
    "InstitutionName": "St Example Hospital",
    "InstitutionAddress": "1 Example Road, Exampleton",
    "AccessionNumber": "ACC-998877",
    "ReferringPhysicianName": "House^Gregory",
    "OtherPatientIDs": "OLD-424242",
    "StudyDate": "20240115",
    "SeriesDate": "20240116",
    "AcquisitionDate": "20240117",
    "ContentDate": "20240118",
    "StudyTime": "101500",
    "SeriesTime": "101612",
    "AcquisitionTime": "101733",
    "ContentTime": "101854",
}
PRIVATE_NOTE = "PRIVATE-NOTE-MRN-123456"


@pytest.fixture(scope="module")
def pngs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    missing = [name for name in SOURCES.values() if not (NIH_IMAGES / name).is_file()]
    if missing:
        pytest.skip(f"real NIH images not found under {NIH_IMAGES} (set CROSSSIM_DATA_DIR)")
    folder = tmp_path_factory.mktemp("png")
    arrays = {}
    for key, name in SOURCES.items():
        shutil.copy(NIH_IMAGES / name, folder / name)
        with Image.open(folder / name) as image:
            arrays[key] = np.asarray(image.convert("L"))
    return arrays


def _dataset(patient: str, age: str, view: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = DX_STORAGE
    ds.Modality = "DX"
    for keyword, value in {**PATIENTS[patient], **STUDY_PHI}.items():
        setattr(ds, keyword, value)
    ds.PatientAge = age
    ds.ViewPosition = view
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    # PHI nested in a sequence item, next to a reference that must follow the study's new UID
    reference = Dataset()
    reference.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management (registered)
    reference.ReferencedSOPInstanceUID = ds.StudyInstanceUID
    reference.InstitutionName = STUDY_PHI["InstitutionName"]
    ds.ReferencedStudySequence = [reference]
    block = ds.private_block(0x0009, "CROSSSIM TEST", create=True)
    block.add_new(0x01, "LO", PRIVATE_NOTE)
    return ds


def _write(ds: Dataset, pixels: np.ndarray, photometric: str, bits_stored: int, path: Path) -> Path:
    ds.set_pixel_data(pixels, photometric, bits_stored)  # also sets a new SOPInstanceUID
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def dicom_dir(pngs: dict[str, np.ndarray], tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("dicom")
    (folder / "study2").mkdir()
    # a1: 8-bit MONOCHROME2, no window: shown at full range.
    _write(_dataset("A", "045Y", "PA"), pngs["a1"], "MONOCHROME2", 8, folder / "a1.dcm")
    # a2: 12-bit MONOCHROME1 (dense = dark) with a window spanning the stored range.
    ds = _dataset("A", "046Y", "AP")
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    _write(ds, ((255 - pngs["a2"].astype(np.uint16)) * 16), "MONOCHROME1", 12, folder / "a2.dcm")
    # b1: 16-bit with a rescale; the window is in rescaled units and spans exactly the image.
    ds = _dataset("B", "095Y", "PA")
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 2, -1024, "US"
    low, high = -1024, 200 * 255 - 1024
    ds.WindowCenter, ds.WindowWidth = (low + high) / 2 + 0.5, high - low + 1
    _write(ds, pngs["b1"].astype(np.uint16) * 100, "MONOCHROME2", 16, folder / "study2" / "b1.dcm")
    # b2: 12-bit with a VOI LUT (x -> 16x, 16-bit output) instead of a window.
    ds = _dataset("B", "", "PA")
    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 16]
    lut.add_new("LUTData", "OW", (np.arange(4096, dtype="<u2") * 16).tobytes())
    ds.VOILUTSequence = [lut]
    _write(ds, pngs["b2"].astype(np.uint16) * 16, "MONOCHROME2", 12, folder / "study2" / "b2.dcm")
    return folder


def _phi_strings(path: Path) -> list[str]:
    """Every identifying value the original file holds."""
    ds = pydicom.dcmread(path)
    keywords = ["PatientName", "PatientID", "PatientBirthDate", *STUDY_PHI, "StudyInstanceUID", "SeriesInstanceUID"]
    return [str(ds[k].value) for k in keywords] + [str(ds.SOPInstanceUID), PRIVATE_NOTE]


def test_pixels_match_the_source_png(dicom_dir: Path, pngs: dict[str, np.ndarray]) -> None:
    a1 = pngs["a1"].astype(np.float64)
    expected = {
        "a1.dcm": (a1 - a1.min()) * 255 / (a1.max() - a1.min()),  # no window: full range
        "a2.dcm": pngs["a2"],  # MONOCHROME1 inverted back
        "study2/b1.dcm": pngs["b1"],
        "study2/b2.dcm": pngs["b2"],
    }
    for name, target in expected.items():
        pixels = dicom_pixels(dicom_dir / name)
        assert pixels.dtype == np.uint8 and pixels.shape == target.shape, name
        assert np.abs(pixels.astype(np.float64) - target).max() <= 1.0, name
        assert np.array_equal(decode_image(dicom_dir / name), pixels), name


def test_undecodable_file_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"not a dicom file at all")
    with pytest.raises(ImageDecodeError, match="broken.dcm"):
        dicom_pixels(bad)
    with pytest.raises(ImageDecodeError, match="broken.dcm"):
        decode_image(bad)


def test_deidentified_dataset_holds_no_phi(dicom_dir: Path, tmp_path: Path) -> None:
    for path in sorted(dicom_dir.rglob("*.dcm")):
        original = pydicom.dcmread(path)
        clean = deidentify(original, SALT)
        out = tmp_path / path.name
        clean.save_as(out, enforce_file_format=True)
        raw, original_raw = out.read_bytes(), path.read_bytes()
        for phi in _phi_strings(path):
            assert phi.encode() in original_raw and phi.encode() not in raw, (path.name, phi)
        assert original.PatientName != clean.PatientName  # a copy: the input is left untouched
        assert clean.PatientIdentityRemoved == "YES"
        assert clean.file_meta.MediaStorageSOPInstanceUID == clean.SOPInstanceUID
        assert clean.SOPClassUID == DX_STORAGE  # registered UIDs identify nobody and are kept
        reference = clean.ReferencedStudySequence[0]
        assert reference.ReferencedSOPInstanceUID == clean.StudyInstanceUID and "InstitutionName" not in reference
        assert np.array_equal(dicom_pixels(out), dicom_pixels(path))  # still a valid, identical image


def test_pseudonyms_and_uids_are_stable_per_patient(dicom_dir: Path) -> None:
    a1, a2, b1 = (deidentify(pydicom.dcmread(dicom_dir / n), SALT) for n in ("a1.dcm", "a2.dcm", "study2/b1.dcm"))
    assert a1.PatientID == a2.PatientID != b1.PatientID
    assert len(a1.PatientID) == 16
    again = deidentify(pydicom.dcmread(dicom_dir / "a1.dcm"), SALT)
    assert (again.PatientID, again.StudyInstanceUID) == (a1.PatientID, a1.StudyInstanceUID)
    assert a1.SOPInstanceUID != a2.SOPInstanceUID
    other_salt = deidentify(pydicom.dcmread(dicom_dir / "a1.dcm"), "another-secret")
    assert other_salt.PatientID != a1.PatientID


def test_manifest_has_labels_metadata_and_no_phi(dicom_dir: Path) -> None:
    labels = pd.DataFrame({"file": ["a1.dcm", "a2.dcm", "study2/b1.dcm"], "label": [0, "pneumonia", 1]})
    manifest = read_dicom_folder(dicom_dir, "new-hospital", labels, SALT)
    by_id = manifest.set_index("image_id")
    assert list(by_id.index) == ["a1", "a2", "study2/b1", "study2/b2"]
    assert by_id["label"].tolist()[:3] == [0, 1, 1] and pd.isna(by_id.loc["study2/b2", "label"])
    patients = by_id["patient_id"]
    assert patients["a1"] == patients["a2"] != patients["study2/b1"] == patients["study2/b2"]
    assert patients["a1"].startswith("new-hospital/")
    assert by_id["view"].tolist() == ["PA", "AP", "PA", "PA"]
    assert by_id["sex"].tolist() == ["F", "F", "M", "M"]
    assert by_id.loc["a1", "age"] == 45.0 and by_id.loc["study2/b1", "age"] == 90.0  # >89 is capped
    assert np.isnan(by_id.loc["study2/b2", "age"])
    assert set(manifest["split"]) == {""} and all(Path(p).is_file() for p in manifest["path"])
    text = manifest.to_csv(index=False)
    for path in dicom_dir.rglob("*.dcm"):
        for phi in _phi_strings(path):
            assert phi not in text, phi


def test_labels_by_bare_file_name_and_bad_labels(dicom_dir: Path) -> None:
    manifest = read_dicom_folder(dicom_dir, "site", pd.DataFrame({"file": ["b2.dcm"], "label": [0]}), SALT)
    assert manifest.set_index("image_id").loc["study2/b2", "label"] == 0
    with pytest.raises(DatasetError, match="maybe"):
        read_dicom_folder(dicom_dir, "site", pd.DataFrame({"file": ["a1.dcm"], "label": ["maybe"]}), SALT)


@pytest.mark.parametrize(
    ("text", "years"), [("045Y", 45.0), ("006M", 0.5), ("", None), (None, None), ("45", None), ("abcY", None)]
)
def test_parse_age(text: str | None, years: float | None) -> None:
    assert parse_age(text) == years



def test_read_dataset_refuses_dicom_without_the_sites_secret_salt(dicom_dir: Path) -> None:
    with pytest.raises(DatasetError, match="secret de-identification salt"):
        read_dataset(dicom_dir)
    manifest = read_dataset(dicom_dir, dicom_salt=SALT)
    assert manifest["patient_id"].tolist() == read_dicom_folder(dicom_dir, dicom_dir.name, None, SALT)["patient_id"].tolist()
