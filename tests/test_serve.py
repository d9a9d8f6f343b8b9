"""`crosssim serve` on real registered models (resnet18, 1 epoch on real Kermany images, 64 px): every endpoint,
every bad input, PHI, the ledger on a stopped PostgreSQL, and on loopback an alias move under load and SIGTERM."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pydicom
import pytest
from PIL import Image, PngImagePlugin
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from typer.testing import CliRunner

from flows import cli
from pipeline.config import PipelineConfig, load_config
from pipeline.data.dicom import dataset_pixels, keyed_pseudonym
from pipeline.data.images import decode_image
from pipeline.data.prepare import prepare_dataset
from pipeline.data.preprocessing import Preprocessing
from pipeline.data.readers import read_dataset
from pipeline.data.scrub import scrub_jpeg, scrub_png
from pipeline.data.splits import assign_splits
from pipeline.models import servable
from pipeline.registry.store import CHALLENGER, CHAMPION, ModelRegistry
from pipeline.rollout.actions import rollout_actions
from pipeline.rollout.monitor import drift_checks, model_reference
from pipeline.serving.bundle import FP32_FILE, INPUT_NAME, INT8_FILE, read_bundle
from pipeline.serving.export import LoggedBundle, build_bundle, version_tags
from pipeline.serving.image_store import ImageStore
from pipeline.serving.ledger import PredictionLedger
from pipeline.serving.model_source import ModelRef, ModelSource
from pipeline.serving.service import API_KEY_ENV, build_app
from pipeline.tracking import MlflowTracker
from pipeline.training import load_trained_model, train_model
from tests.conftest import REPO, copy_kermany_subset
from tests.pg_fixture import PostgresServer, postgres_server  # noqa: F401  (the fixture, found by name)

pytestmark = pytest.mark.slow  # real registered models served: left out of make test-fast

NAME = "cxr-serve"
SIZE = 64  # the smallest at which resnet18's last block still has a 2×2 map
SALT = "serve-test-secret-0123456789abcdef"
API_KEY = "serve-test-admin-key-0123456789"
PHI = {
    "PatientName": "Doe^Jane",
    "PatientID": "MRN-7731942",
    "PatientBirthDate": "19800101",
    "InstitutionName": "St Example Hospital",
    "AccessionNumber": "ACC-998877",
    "ReferringPhysicianName": "House^Gregory",
}
runner = CliRunner()


@dataclass(frozen=True)
class Registered:
    overrides: list[str]  # tracking store and model name
    tracking_uri: str
    bundles: dict[str, Path]  # version → its bundle folder (as exported)
    images: dict[str, Path]  # real uploads: kermany (RGB JPEG), nih (8-bit gray PNG)

    def expected(self, version: str, path: Path, precision: str = "fp32") -> float:
        """What ONNX Runtime gives for ``path`` decoded as training images are."""
        file = FP32_FILE if precision == "fp32" else INT8_FILE
        session = ort.InferenceSession(str(self.bundles[version] / file), providers=["CPUExecutionProvider"])
        inputs = Preprocessing(SIZE).model_input(decode_image(path))[None]
        return float(session.run(None, {INPUT_NAME: inputs})[0][0])


@pytest.fixture(scope="module")
def registered(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Registered:
    """v1 (champion; FP32 and INT8): resnet18 after one epoch on real Kermany images; v2 (FP32 only): the same
    network with its pneumonia logit raised by 1 (a recalibration: other probabilities, no second training).
    Both logged, exported and tagged as registration does it."""
    import torch

    work = tmp_path_factory.mktemp("registered")
    overrides = [f"tracking.local_dir={work / 'mlflow'}", f"registry.model_name={NAME}"]
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    kermany = copy_kermany_subset(data_dir, work / "kermany-pediatric", per_class=16)
    manifest = assign_splits(read_dataset(kermany), 0.25, 0.2, 0)
    prepared = prepare_dataset(manifest, Preprocessing(SIZE), work / "cache")
    test_images, test_rows = prepared.subset(manifest["split"] == "test")
    cfg = load_config(REPO / "params.yaml", [
        *overrides, "train.epochs=1", "train.batch_size=8", "train.warmup_epochs=0",
        "train.early_stopping_patience=null", f"train.output_dir={work / 'train'}", "serve.export.golden_images=8",
        "serve.export.int8_auc_tolerance=1.0",  # a one-epoch model: the INT8 accuracy check is export's own test
    ])  # fmt: skip
    classifier = load_trained_model(train_model(prepared, cfg, show_progress=False).model_path, "resnet18")
    registry, bundles = ModelRegistry(f"sqlite:///{work / 'mlflow' / 'mlflow.db'}"), {}
    for label, int8 in (("v1", True), ("v2", False)):
        if label == "v2":
            with torch.no_grad():
                classifier.head.bias[1] += 1.0
        model, example = servable(classifier, SIZE)
        folder = work / f"bundle-{label}"
        with MlflowTracker(cfg.tracking, run_name=label) as tracker:
            uri = tracker.log_model(model, "model", example)
            bundle = build_bundle(
                model, backbone="resnet18", preprocessing=Preprocessing(SIZE), threshold=0.5, threshold_chosen_on="kermany-pediatric/val",
                golden=np.asarray(test_images[:8]), calibration=np.asarray(test_images),
                eval_sets={"kermany-pediatric/test": (np.asarray(test_images), test_rows["label"].to_numpy(dtype=np.int64))},
                settings=cfg.serve.export.model_copy(update={"int8": int8}), directory=folder,
            )  # fmt: skip
            tracker.log_artifacts(folder, f"serving/{NAME}")
            artifact_uri = f"runs:/{tracker.run_id}/serving/{NAME}"
        version = str(registry.register(NAME, uri, {"mlflow_run_id": tracker.run_id}).version)
        registry.set_version_tags(NAME, version, version_tags(LoggedBundle(NAME, artifact_uri, bundle)))
        bundles[version] = folder
    assert set(read_bundle(bundles["1"]).artifacts) == {"fp32", "int8"} and set(read_bundle(bundles["2"]).artifacts) == {"fp32"}
    registry.move_alias(NAME, CHAMPION, "1")
    uploads = work / "uploads"
    uploads.mkdir()
    sources = {
        "kermany": sorted((data_dir / "kermany-pediatric" / "test" / "PNEUMONIA").iterdir())[0],
        "nih": data_dir / "nih-cxr8" / "images" / "00000061_012.png",
    }
    images = {key: Path(shutil.copy(source, uploads / source.name)) for key, source in sources.items()}
    return Registered(overrides, registry.tracking_uri, bundles, images)


def grad_cam_by_hand(registered: Registered, version: str, path: Path) -> np.ndarray:
    """Grad-CAM from its definition (layer4's activations weighted by their mean gradient, ReLU, bilinear up),
    on the registered PyTorch model: an independent check of what the app gets from captum."""
    import torch

    source = ModelSource(ModelRegistry(registered.tracking_uri), ModelRef(NAME, None, version), "fp32")
    twin = source.load(version).twin()
    seen = {}
    hook = twin.get_submodule("classifier.features.layer4").register_forward_hook(lambda m, i, out: seen.update(a=out))
    probability = twin(torch.from_numpy(Preprocessing(SIZE).model_input(decode_image(path)))[None])
    hook.remove()
    gradient = torch.autograd.grad(probability.sum(), seen["a"])[0]
    cam = torch.relu((gradient.mean(dim=(2, 3), keepdim=True) * seen["a"]).sum(dim=1, keepdim=True))
    return torch.nn.functional.interpolate(cam, size=(SIZE, SIZE), mode="bilinear")[0, 0].detach().numpy()


def serve_config(registered: Registered, tmp_path: Path, *extra: str) -> PipelineConfig:
    return load_config(REPO / "params.yaml", [
        *registered.overrides, f"serve.ledger_path={tmp_path / 'ledger.db'}", f"serve.image_store={tmp_path / 'images'}",
        "serve.max_upload_mb=2", *extra,
    ])  # fmt: skip


@asynccontextmanager
async def served(cfg: PipelineConfig, environ: dict[str, str] | None = None) -> AsyncIterator[httpx.AsyncClient]:
    """The app in process, its lifespan running (batcher, alias poller), behind an httpx client."""
    app, _ = build_app(cfg, environ or {})
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://serve", timeout=60) as client:
            yield client


def upload(path: Path, **form: str) -> dict:
    return {"files": {"file": (path.name, path.read_bytes())}, "data": form}


def ledger_rows(cfg: PipelineConfig) -> dict:
    ledger = PredictionLedger(f"sqlite:///{cfg.serve.ledger_path}")
    try:
        return {row.inference_id: row for row in ledger.rows()}
    finally:
        ledger.close()


def test_every_endpoint_on_a_real_registered_model(registered, tmp_path):
    cfg = serve_config(registered, tmp_path)

    async def scenario() -> dict:
        async with served(cfg, {API_KEY_ENV: API_KEY}) as client:
            health = await client.get("/healthz")
            ready = await client.get("/readyz")
            models = await client.get("/v1/models")
            kermany = await client.post("/v1/predict", **upload(registered.images["kermany"], site="kermany-pediatric"))
            nih = await client.post("/v1/predict", **upload(registered.images["nih"], site="nih-cxr8"))
            explained = await client.post("/v1/explain", **upload(registered.images["kermany"]))
            overlay = await client.post("/v1/explain?format=png", **upload(registered.images["nih"]))
            reload_refused = await client.post("/v1/admin/reload", headers={"X-API-Key": "wrong"})
            reload = await client.post("/v1/admin/reload", headers={"X-API-Key": API_KEY})
            openapi = await client.get("/openapi.json")
            metrics = await client.get("/metrics")
            return locals()

    got = asyncio.run(scenario())
    assert got["health"].json() == {"status": "ok"}
    assert got["ready"].status_code == 200 and got["ready"].json()["ledger"] == "ok"
    info = got["models"].json()
    assert info["model"]["name"] == NAME and info["model"]["version"] == "1" and info["model"]["alias"] == CHAMPION
    assert info["precisions"] == ["fp32", "int8"] and info["image_size"] == SIZE and info["follows_alias"]

    rows = ledger_rows(cfg)
    for key, site, converted in (("kermany", "kermany-pediatric", "RGB"), ("nih", "nih-cxr8", None)):
        answer = got[key].json()
        assert got[key].status_code == 200, answer
        assert answer["probability"] == pytest.approx(registered.expected("1", registered.images[key]), abs=1e-6)
        assert answer["decision"] == ("pneumonia" if answer["probability"] >= answer["threshold"] else "normal")
        assert answer["model"]["version"] == "1" and answer["model"]["precision"] == "fp32"
        assert answer["model"]["artifact_sha256"] == info["model"]["artifact_sha256"]
        assert answer["converted_from"] == converted and answer["site"] == site and answer["latency_ms"] > 0
        row = rows[answer["inference_id"]]  # in the ledger, as answered
        assert (row.site, row.model_version, row.model_alias, row.probability, row.latency_ms, row.converted_from) == (
            site, "1", CHAMPION, answer["probability"], answer["latency_ms"], converted
        )  # fmt: skip
        assert row.decision == (answer["decision"] == "pneumonia") and row.patient_pseudonym is None
        stored = next((tmp_path / "images").rglob(f"{answer['inference_id']}.*"))
        assert stored.suffix == {"kermany": ".jpg", "nih": ".png"}[key]  # the upload's own encoding, kept lossless
        assert np.array_equal(decode_image(stored), decode_image(registered.images[key]))
        assert (scrub_png if key == "nih" else scrub_jpeg)(stored.read_bytes())[1] == {}  # no metadata left
    assert len(rows) == 2

    explanation = got["explained"].json()
    assert got["explained"].status_code == 200, explanation
    assert explanation["explained_artifact"] == f"models:/{NAME}/1" and explanation["model"]["version"] == "1"
    assert explanation["layer"] == "classifier.features.layer4" and explanation["map_size"] == [SIZE, SIZE]
    assert explanation["probability"] == pytest.approx(registered.expected("1", registered.images["kermany"]), abs=1e-4)
    expected = grad_cam_by_hand(registered, "1", registered.images["kermany"])
    assert np.asarray(explanation["map"]) == pytest.approx(expected, abs=1e-5) and expected.max() > 0
    with Image.open(io.BytesIO(base64.b64decode(explanation["overlay_png"]))) as overlay:
        assert overlay.format == "PNG" and overlay.size == (224, 224) and overlay.mode == "RGB"
    assert got["overlay"].headers["content-type"] == "image/png" and got["overlay"].headers["x-model-version"] == "1"
    assert Image.open(io.BytesIO(got["overlay"].content)).size == (256, 256)

    assert got["reload_refused"].status_code == 401 and got["reload_refused"].json()["error"] == "api_key"
    assert got["reload"].json() == {"previous": "1", "current": "1", "changed": False}
    paths = got["openapi"].json()["paths"]
    assert {"/v1/predict", "/v1/explain", "/v1/models", "/healthz", "/readyz", "/metrics", "/v1/admin/reload"} <= set(paths)
    assert "Prediction" in got["openapi"].json()["components"]["schemas"]
    text = got["metrics"].text
    assert 'crosssim_http_requests_total{method="POST",route="/v1/predict",status="200"} 2.0' in text
    assert 'crosssim_http_requests_total{method="POST",route="/v1/admin/reload",status="401"} 1.0' in text
    assert 'crosssim_http_request_duration_seconds_bucket{le="+Inf",route="/v1/predict"} 2.0' in text
    assert f'crosssim_served_model{{alias="champion",artifact_sha256="{info["model"]["artifact_sha256"]}",' in text


def png_of(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header says width×height (8-bit gray) and whose pixel data stops after 1000 bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(1000))) + chunk(b"IEND", b"")


STUDY_UID = "1.2.826.0.1.3680043.8.498.77319420001"


def dicom_bytes(pixels: np.ndarray | None) -> bytes:
    """A DX DICOM (Part 10) carrying PHI, with ``pixels`` as 8-bit MONOCHROME2 (None: no pixel data)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "DX"
    for keyword, value in PHI.items():
        setattr(ds, keyword, value)
    ds.StudyInstanceUID = STUDY_UID
    ds.SeriesInstanceUID = generate_uid()
    if pixels is not None:
        ds.set_pixel_data(pixels, "MONOCHROME2", 8)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_bad_inputs_get_a_4xx_naming_the_rule_and_the_server_keeps_serving(registered, tmp_path):
    cfg = serve_config(registered, tmp_path)  # serve.max_upload_mb=2
    png, jpeg = registered.images["nih"].read_bytes(), registered.images["kermany"].read_bytes()

    def file(name: str, data: bytes, **form: str) -> dict:
        return {"files": {"file": (name, data)}, "data": form}

    cases = [
        ("text file named .png", file("scan.png", b"not an image, just text\n" * 20), 415, "unsupported_format"),
        ("truncated PNG", file("x.png", png[: len(png) // 2]), 422, "corrupt_image"),
        ("truncated JPEG", file("x.jpeg", jpeg[: len(jpeg) // 2]), 422, "corrupt_image"),
        ("DICOM without pixel data", file("x.dcm", dicom_bytes(None), site="nih-cxr8"), 422, "dicom_without_pixels"),
        ("10×10 image", file("x.png", png_of(np.full((10, 10), 128, np.uint8))), 422, "image_too_small"),
        ("20000×20000 image", file("x.png", png_claiming(20000, 20000)), 422, "image_too_large"),
        ("empty body", {"content": b""}, 400, "empty_body"),
        ("no file field", {"files": {"image": ("x.png", png)}}, 422, "missing_field"),
        ("empty file", file("x.png", b""), 422, "empty_file"),
        ("unknown site", file("x.png", png, site="st-elsewhere"), 422, "unknown_site"),
        ("patient id, site without a salt", file("x.png", png, site="kermany-pediatric", patient_id="MRN-1"), 422,
         "site_without_salt"),
        ("DICOM, site without a salt", file("x.dcm", dicom_bytes(decode_image(registered.images["nih"]))), 422,
         "site_without_salt"),
        ("50 MB upload", file("big.png", bytes(50 * 2**20)), 413, "body_too_large"),
        ("multipart without a boundary", {"content": b"x", "headers": {"content-type": "multipart/form-data"}}, 400,
         "bad_request"),
    ]  # fmt: skip
    sent_chunks = 0

    async def fifty_megabytes_chunked() -> AsyncIterator[bytes]:
        nonlocal sent_chunks
        yield b'--zz\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n\r\n'
        for _ in range(50):
            sent_chunks += 1
            yield bytes(2**20)

    async def scenario() -> dict:
        async with served(cfg, {"CROSSSIM_DICOM_SALT_NIH_CXR8": SALT}) as client:
            answers = {name: await client.post("/v1/predict", **request) for name, request, _, _ in cases}
            answers["50 MB streamed"] = await client.post(
                "/v1/predict", content=fifty_megabytes_chunked(), headers={"content-type": "multipart/form-data; boundary=zz"}
            )
            answers["explain: 10×10"] = await client.post("/v1/explain", **file("x.png", png_of(np.zeros((10, 10), np.uint8))))
            answers["unknown route"] = await client.get("/v2/predict")
            still_serving = await client.post("/v1/predict", **upload(registered.images["nih"]))
            metrics = (await client.get("/metrics")).text
        async with served(serve_config(registered, tmp_path / "wide", "serve.max_side=30000")) as client:
            bomb = await client.post("/v1/predict", **file("x.png", png_claiming(20000, 20000)))
        return {"answers": answers, "still_serving": still_serving, "metrics": metrics, "bomb": bomb}

    got = asyncio.run(scenario())
    expected = {name: (status, rule) for name, _, status, rule in cases}
    expected |= {"50 MB streamed": (413, "body_too_large"), "explain: 10×10": (422, "image_too_small"),
                 "unknown route": (404, "not_found")}  # fmt: skip
    for name, (status, rule) in expected.items():
        response = got["answers"][name]
        assert (response.status_code, response.json()["error"]) == (status, rule), (name, response.text)
        assert set(response.json()) == {"error", "detail"} and "Traceback" not in response.text, name
    assert sent_chunks <= 4  # refused while streaming: the rest of the 50 MB was never read
    assert "serve.max_upload_mb" in got["answers"]["50 MB upload"].json()["detail"]
    assert got["bomb"].json()["error"] == "image_too_large" and "decompression" in got["bomb"].json()["detail"]
    assert got["still_serving"].status_code == 200
    assert len(ledger_rows(cfg)) == 1  # only the answered prediction
    assert 'crosssim_rejected_requests_total{rule="image_too_small"} 2.0' in got["metrics"]
    assert 'crosssim_http_requests_total{method="GET",route="other",status="404"} 1.0' in got["metrics"]
    assert "status=\"5" not in got["metrics"]  # no 5xx at all


def test_rgb_rgba_and_16_bit_uploads_are_converted_as_training_images_were(registered, tmp_path):
    gray = decode_image(registered.images["nih"])
    ramp = np.linspace(0, 255, gray.size, dtype=np.float64).reshape(gray.shape).astype(np.uint8)
    variants = {
        "RGB": Image.fromarray(np.stack([gray, gray, ramp], axis=-1)),  # channels that differ: luma matters
        "RGBA": Image.fromarray(np.stack([gray, gray, gray, ramp], axis=-1)),
        "16-bit": Image.fromarray(gray.astype(np.uint16) * 200 + 1000),  # a real export's 16-bit range
    }
    paths = {}
    for name, image in variants.items():
        paths[name] = tmp_path / f"{name}.png"
        image.save(paths[name])
    cfg = serve_config(registered, tmp_path)

    async def scenario() -> dict:
        async with served(cfg) as client:
            return {name: await client.post("/v1/predict", **upload(path)) for name, path in paths.items()}

    answers = asyncio.run(scenario())
    rows = ledger_rows(cfg)
    for name, path in paths.items():
        answer = answers[name].json()
        with Image.open(path) as stored_as:
            mode = stored_as.mode
        assert answer["converted_from"] == mode and mode == {"RGB": "RGB", "RGBA": "RGBA"}.get(name, "I;16"), name
        assert answer["probability"] == pytest.approx(registered.expected("1", path), abs=1e-6), name
        assert rows[answer["inference_id"]].converted_from == mode
    assert answers["RGB"].json()["probability"] != pytest.approx(answers["16-bit"].json()["probability"], abs=1e-9)


def tagged_exports(registered) -> dict[str, bytes]:
    """The real uploads as a PACS export may write them: the patient's name in PNG text chunks, in a JPEG's EXIF
    and comment, and appended after the image's end."""
    text = ", ".join(f"{key}={value}" for key, value in PHI.items())
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", text)
    info.add_itxt("Description", text, zip=True)
    png = io.BytesIO()
    Image.open(registered.images["nih"]).save(png, "PNG", pnginfo=info)
    jpeg = io.BytesIO()
    with Image.open(registered.images["kermany"]) as image:
        exif = image.getexif()
        exif[0x010E] = text  # ImageDescription
        image.save(jpeg, "JPEG", exif=exif, comment=text.encode(), quality=95)
    return {"png": png.getvalue() + text.encode(), "jpeg": jpeg.getvalue()}


def test_a_dicom_with_patient_data_leaves_only_pseudonyms(registered, tmp_path, caplog, capsys):
    exports = tagged_exports(registered)  # before logs are captured: writing the EXIF logs it at DEBUG here
    caplog.set_level(logging.DEBUG)
    pixels = decode_image(registered.images["nih"])
    dicom = dicom_bytes(pixels)
    cfg = serve_config(registered, tmp_path)
    named = {"file": ("Doe_Jane_MRN-7731942.dcm", dicom)}

    async def scenario() -> dict:
        async with served(cfg, {"CROSSSIM_DICOM_SALT_NIH_CXR8": SALT}) as client:
            with_ids = await client.post(
                "/v1/predict", files=named, data={"site": "nih-cxr8", "patient_id": "MRN-7731942", "study_id": "ACC-998877"}
            )
            from_header = await client.post("/v1/predict", files=named, data={"site": "nih-cxr8"})
            mismatch = await client.post("/v1/predict", files=named, data={"site": "nih-cxr8", "patient_id": "MRN-1"})
            explained = await client.post("/v1/explain", files=named)
            tagged = [await client.post("/v1/predict", files={"file": (f"x.{kind}", data)}) for kind, data in exports.items()]
            metrics = await client.get("/metrics")
            return locals()

    got = asyncio.run(scenario())
    assert got["mismatch"].json()["error"] == "patient_mismatch" and got["explained"].status_code == 200
    rows = ledger_rows(cfg)
    first, second = rows[got["with_ids"].json()["inference_id"]], rows[got["from_header"].json()["inference_id"]]
    assert first.patient_pseudonym == keyed_pseudonym("MRN-7731942", SALT)  # what ingest's deidentify writes
    assert first.study_pseudonym == keyed_pseudonym("ACC-998877", SALT)  # the form's study id wins
    assert second.patient_pseudonym == first.patient_pseudonym and second.study_pseudonym == keyed_pseudonym(STUDY_UID, SALT)
    assert got["with_ids"].json()["converted_from"] == "DICOM"
    kept = {inference_id: next((tmp_path / "images").rglob(f"{inference_id}.*")) for inference_id in rows}
    from_dicom = kept[got["with_ids"].json()["inference_id"]]
    assert np.array_equal(decode_image(from_dicom), dataset_pixels(pydicom.dcmread(io.BytesIO(dicom)), "x"))
    for answer, (kind, data) in zip(got["tagged"], exports.items(), strict=True):
        assert answer.status_code == 200, answer.text  # the pixels are the export's, its metadata gone
        (export := tmp_path / f"export.{kind}").write_bytes(data)
        assert np.array_equal(decode_image(kept[answer.json()["inference_id"]]), decode_image(export))
    stored = list(kept.values())
    assert len(stored) == 4

    captured = capsys.readouterr()
    places = {
        "ledger database": b"".join(p.read_bytes() for p in tmp_path.glob("ledger.db*")),
        "image store": b"".join(p.read_bytes() for p in stored),
        "logs": (caplog.text + captured.out + captured.err).encode(),
        "metrics": got["metrics"].content,
        "responses": b"".join(got[key].content for key in ("with_ids", "from_header", "mismatch", "explained"))
        + b"".join(answer.content for answer in got["tagged"]),
    }
    assert len(places["logs"]) > 0 and len(places["ledger database"]) > 0
    for value in [*PHI.values(), STUDY_UID, "7731942", "ACC-998877", "Doe_Jane"]:
        for place, content in places.items():
            assert value.encode() not in content, (value, place)


def test_feedback_attaches_outcomes_to_served_predictions(registered, tmp_path):
    cfg = serve_config(registered, tmp_path)
    environ = {API_KEY_ENV: API_KEY, "CROSSSIM_DICOM_SALT_NIH_CXR8": SALT}
    key = {"X-API-Key": API_KEY}

    async def scenario() -> dict:
        async with served(cfg, environ) as client:
            answer = (await client.post("/v1/predict", **upload(registered.images["nih"], site="nih-cxr8", study_id="ACC-55"))).json()
            read = {"inference_id": answer["inference_id"], "label": "pneumonia", "source": "radiologist_read"}
            return {
                "no_key": await client.post("/v1/feedback", json=read),
                "recorded": await client.post("/v1/feedback", json=read, headers=key),
                "duplicate": await client.post("/v1/feedback", json=read, headers=key),
                "conflict": await client.post(
                    "/v1/feedback", headers=key,
                    json={"study_id": "ACC-55", "site": "nih-cxr8", "label": "normal", "source": "follow_up"},
                ),  # fmt: skip
                "unknown": await client.post("/v1/feedback", json=read | {"inference_id": "0" * 32}, headers=key),
                "bad_label": await client.post("/v1/feedback", json=read | {"label": "maybe"}, headers=key),
                "unknown_study": await client.post(
                    "/v1/feedback", headers=key, json={"study_id": "ACC-99", "site": "nih-cxr8", "label": "normal", "source": "follow_up"}
                ),
                "answer": answer,
            }

    got = asyncio.run(scenario())
    assert got["no_key"].status_code == 401
    for name, status in (("recorded", "recorded"), ("duplicate", "duplicate"), ("conflict", "conflict")):
        assert got[name].status_code == 200
        assert got[name].json() == {"status": status, "inference_ids": [got["answer"]["inference_id"]], "requested": False}
    assert (got["unknown"].status_code, got["unknown"].json()["error"]) == (404, "unknown_inference")
    assert (got["unknown_study"].status_code, got["unknown_study"].json()["error"]) == (404, "unknown_inference")
    assert (got["bad_label"].status_code, got["bad_label"].json()["error"]) == (422, "unknown_label")


def test_worklist_asks_for_served_cases_once_and_counts_their_reads_as_requested(registered, tmp_path, data_dir):
    cfg = serve_config(registered, tmp_path)
    key = {"X-API-Key": API_KEY}
    studies = sorted((data_dir / "nih-cxr8" / "images").iterdir())[:8]

    async def scenario() -> dict:
        async with served(cfg, {API_KEY_ENV: API_KEY}) as client:
            answers = [(await client.post("/v1/predict", **upload(path, site="nih-cxr8"))).json() for path in studies]
            first = await client.get("/v1/worklist", params={"site": "nih-cxr8", "budget": 3, "strategy": "uncertainty"}, headers=key)
            second = await client.get("/v1/worklist", params={"site": "nih-cxr8", "budget": 10}, headers=key)
            asked = first.json()["items"][0]["inference_id"]
            return {
                "answers": answers, "first": first, "second": second,
                "no_key": await client.get("/v1/worklist", params={"site": "nih-cxr8", "budget": 3}),
                "unknown_site": await client.get("/v1/worklist", params={"site": "st-elsewhere", "budget": 3}, headers=key),
                "zero": await client.get("/v1/worklist", params={"site": "nih-cxr8", "budget": 0}, headers=key),
                "bad_strategy": await client.get("/v1/worklist", params={"site": "nih-cxr8", "budget": 2, "strategy": "x"}, headers=key),
                "requested": await client.post("/v1/feedback", headers=key,
                                               json={"inference_id": asked, "label": "normal", "source": "radiologist_read"}),
                "metrics": (await client.get("/metrics")).text,
            }  # fmt: skip

    got = asyncio.run(scenario())
    assert got["first"].status_code == 200 and got["second"].status_code == 200
    first, second = got["first"].json(), got["second"].json()
    served_ids = {answer["inference_id"] for answer in got["answers"]}
    first_ids = [item["inference_id"] for item in first["items"]]
    second_ids = [item["inference_id"] for item in second["items"]]
    assert len(first_ids) == 3 and first["recorded"] and second["strategy"] == "uncertainty"  # loop.worklist_strategy
    assert set(first_ids) | set(second_ids) == served_ids and not set(first_ids) & set(second_ids)
    by_id = {answer["inference_id"]: answer for answer in got["answers"]}
    margins = sorted(abs(np.log(a["probability"] / (1 - a["probability"])) - np.log(a["threshold"] / (1 - a["threshold"])))
                     for a in got["answers"])  # fmt: skip
    picked = [abs(np.log(by_id[i]["probability"] / (1 - by_id[i]["probability"])) - np.log(by_id[i]["threshold"] / (1 - by_id[i]["threshold"])))
              for i in first_ids]  # fmt: skip
    assert sorted(picked) == pytest.approx(margins[:3])
    assert got["no_key"].status_code == 401
    assert (got["unknown_site"].status_code, got["unknown_site"].json()["error"]) == (422, "unknown_site")
    assert got["zero"].status_code == 422 and got["bad_strategy"].status_code == 422
    assert got["requested"].json()["requested"] is True
    assert 'crosssim_outcomes_total{requested="true"} 1.0' in got["metrics"]
    assert 'crosssim_reads_requested_total{site="nih-cxr8"} 8.0' in got["metrics"]


def test_serve_follows_a_rollout_in_shadow_then_canary_with_sticky_patients(registered, tmp_path):
    cfg = serve_config(registered, tmp_path, "rollout.canary_schedule=[0.5]")
    environ = {API_KEY_ENV: API_KEY, "CROSSSIM_DICOM_SALT_NIH_CXR8": SALT}
    nih, key = registered.images["nih"], {"X-API-Key": API_KEY}
    expected = {version: registered.expected(version, nih) for version in ("1", "2")}
    rollouts = rollout_actions(cfg)
    rollouts.actions.registry.move_alias(NAME, CHALLENGER, "2")
    patients = [f"MRN-{n}" for n in range(40)]

    async def predict_all(client: httpx.AsyncClient) -> dict[str, dict]:
        return {p: (await client.post("/v1/predict", **upload(nih, site="nih-cxr8", patient_id=p))).json() for p in patients}

    async def scenario() -> dict:
        async with served(cfg, environ) as client:
            shadowed = (await client.post("/v1/predict", **upload(nih, site="nih-cxr8", patient_id="MRN-0"))).json()
            rollouts.advance("dr. ada", "shadow looked sound")
            await client.post("/v1/admin/reload", headers=key)
            canary = await predict_all(client)
            again = await predict_all(client)
        async with served(cfg, environ) as restarted:  # a new process: the arms come back from the ledger
            after_restart = await predict_all(restarted)
        return locals()

    try:
        started = rollouts.start("shadow", "dr. ada", "v2 on live traffic")
        got = asyncio.run(scenario())
    finally:
        rollouts.stop("dr. ada", "test over")
        rollouts.actions.registry.move_alias(NAME, CHALLENGER, None)
    rows = ledger_rows(cfg)

    shadowed = got["shadowed"]  # the champion answers; the challenger's score of the same image is in the ledger
    assert shadowed["arm"] == "champion" and shadowed["model"]["version"] == "1"
    assert shadowed["probability"] == pytest.approx(expected["1"], abs=1e-6)
    row = rows[shadowed["inference_id"]]
    assert (row.arm, row.rollout_id, row.shadow_version) == ("champion", started.rollout_id, "2")
    assert row.shadow_probability == pytest.approx(expected["2"], abs=1e-6)

    arms = {p: answer["arm"] for p, answer in got["canary"].items()}
    assert set(arms.values()) == {"champion", "challenger"}  # 50%: both arms answer some of the 40 patients
    for answers in (got["canary"], got["again"], got["after_restart"]):
        for p, answer in answers.items():
            version = "2" if arms[p] == "challenger" else "1"
            assert answer["arm"] == arms[p] and answer["model"]["version"] == version, p  # sticky, even after restart
            assert answer["probability"] == pytest.approx(expected[version], abs=1e-6)
            row = rows[answer["inference_id"]]  # the other model scored the same image, unanswered (paired)
            other = "1" if version == "2" else "2"
            assert (row.arm, row.shadow_version) == (arms[p], other)
            assert row.shadow_probability == pytest.approx(expected[other], abs=1e-6)

    # Label-free drift checks on what the rollout served: the bundles' references are Kermany images, the 121 served
    # NIH uploads are one adult film over and over: both inputs and outputs have drifted, for both models
    registry = rollouts.actions.registry
    references = {model: model_reference(registry, NAME, version) for model, version in (("champion", "1"), ("challenger", "2"))}
    ledger = PredictionLedger(f"sqlite:///{cfg.serve.ledger_path}")
    try:
        checks = drift_checks(ledger, ImageStore(cfg.serve.image_store, 30), started, references, cfg.rollout)
    finally:
        ledger.close()
    assert [(c.site, c.model, c.version) for c in checks] == [("nih-cxr8", "champion", "1"), ("nih-cxr8", "challenger", "2")]
    assert all(c.alarm and c.images == c.window == 121 and c.input.p_value < 0.001 for c in checks), checks


def test_int8_a_pinned_version_and_versions_that_cannot_be_served(registered, tmp_path):
    nih = registered.images["nih"]

    async def predict(cfg: PipelineConfig) -> tuple[dict, dict]:
        async with served(cfg) as client:
            return (await client.post("/v1/predict", **upload(nih))).json(), (await client.get("/v1/models")).json()

    int8, _ = asyncio.run(predict(serve_config(registered, tmp_path / "int8", "serve.precision=int8")))
    assert int8["model"]["precision"] == "int8" and int8["model"]["version"] == "1"
    assert int8["model"]["artifact_sha256"] == read_bundle(registered.bundles["1"]).artifacts["int8"].sha256
    assert int8["probability"] == pytest.approx(registered.expected("1", nih, "int8"), abs=1e-6)
    pinned, info = asyncio.run(predict(serve_config(registered, tmp_path / "pinned", "serve.version=2")))
    assert pinned["model"]["version"] == "2" and pinned["model"]["alias"] is None and not info["follows_alias"]
    assert pinned["probability"] == pytest.approx(registered.expected("2", nih), abs=1e-6)
    assert info["precisions"] == ["fp32"] and any(note.startswith("INT8") for note in info["notes"])

    registry = ModelRegistry(registered.tracking_uri)
    unbundled = str(registry.register(NAME, registry.version(NAME, "1").source, {}).version)  # no serving.* tags
    reload_cfg = serve_config(registered, tmp_path / "reload", "serve.poll_seconds=3600")  # only the admin reloads

    async def reload_to(version: str, client: httpx.AsyncClient) -> tuple[httpx.Response, str]:
        await asyncio.to_thread(registry.move_alias, NAME, CHAMPION, version)
        reloaded = await client.post("/v1/admin/reload", headers={"X-API-Key": API_KEY})
        return reloaded, (await client.post("/v1/predict", **upload(nih))).json()["model"]["version"]

    async def reloads() -> list[tuple[httpx.Response, str]]:
        async with served(reload_cfg, {API_KEY_ENV: API_KEY}) as client:
            return [await reload_to(version, client) for version in (unbundled, "2")]

    try:
        (failed, still), (moved, now) = asyncio.run(reloads())
    finally:
        registry.move_alias(NAME, CHAMPION, "1")
    assert failed.status_code == 409 and failed.json()["error"] == "reload_failed" and still == "1"
    assert "has no serving bundle" in failed.json()["detail"] and "still serving v1" in failed.json()["detail"]
    assert moved.json() == {"previous": "1", "current": "2", "changed": True} and now == "2"

    base = ["--config", str(REPO / "params.yaml"), *(arg for o in registered.overrides for arg in ("--set", o))]
    no_int8 = runner.invoke(cli.app, ["serve", *base, "--version", "2", "--precision", "int8"])
    no_bundle = runner.invoke(cli.app, ["serve", *base, "--version", unbundled])
    no_alias = runner.invoke(cli.app, ["serve", *base, "--alias", "staging"])
    bad_precision = runner.invoke(cli.app, ["serve", *base, "--precision", "fp16"])
    weak_key = runner.invoke(cli.app, ["serve", *base], env={API_KEY_ENV: "secret"})
    assert no_int8.exit_code == 2 and f"{NAME} v2: this version has no int8 artifact (INT8: not built" in no_int8.output
    assert no_bundle.exit_code == 2 and "has no serving bundle" in no_bundle.output
    assert no_alias.exit_code == 6 and f"{NAME}@staging" in no_alias.output
    assert bad_precision.exit_code == 2 and "serve.precision" in bad_precision.output
    assert weak_key.exit_code == 2 and API_KEY_ENV in weak_key.output
    assert all("Traceback" not in result.output for result in (no_int8, no_bundle, no_alias, bad_precision, weak_key))
    help_text = runner.invoke(cli.app, ["serve", "--help"], env={"COLUMNS": "200"}).output
    for option in ("--alias", "--version", "--precision", "--host", "--port", "--set", "serve.max_batch = 16"):
        assert option in help_text, option


def test_the_ledger_database_stopped_under_load_gives_503s_then_recovers_by_itself(
    registered, tmp_path, postgres_server: PostgresServer
):
    cfg = serve_config(registered, tmp_path, f"serve.ledger_url={postgres_server.url}")
    nih = registered.images["nih"]
    answers: list[httpx.Response] = []

    async def until(done, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, "the load did not get there in time"
            await asyncio.sleep(0.05)

    def count(status: int, since: int = 0) -> int:
        return sum(1 for answer in answers[since:] if answer.status_code == status)

    async def scenario() -> tuple[httpx.Response, httpx.Response, int]:
        stop = asyncio.Event()
        async with served(cfg) as client:

            async def worker() -> None:
                while not stop.is_set():
                    answers.append(await client.post("/v1/predict", **upload(nih)))
                    await asyncio.sleep(0.01)

            workers = [asyncio.create_task(worker()) for _ in range(4)]
            await until(lambda: count(200) >= 8)
            await asyncio.to_thread(postgres_server.stop)  # fast shutdown: connections cut mid-load
            await until(lambda: count(503) >= 6)
            ready_while_down = await client.get("/readyz")
            await asyncio.to_thread(postgres_server.start)
            restarted = len(answers)
            await until(lambda: count(200, since=restarted) >= 8)
            stop.set()
            await asyncio.gather(*workers)
            return ready_while_down, await client.get("/readyz"), restarted

    ready_while_down, ready_after, restarted = asyncio.run(scenario())
    assert {answer.status_code for answer in answers} == {200, 503}
    assert all(answer.json()["error"] == "ledger_unavailable" for answer in answers if answer.status_code == 503)
    assert answers[-1].status_code == 200  # recovered without a restart of the app
    assert ready_while_down.status_code == 503 and ready_while_down.json()["ledger"] == "unavailable"
    assert ready_after.status_code == 200
    ledger = PredictionLedger(postgres_server.url)
    try:
        stored = {row.inference_id: row for row in ledger.rows()}
    finally:
        ledger.close()
    answered = {answer.json()["inference_id"]: answer.json() for answer in answers if answer.status_code == 200}
    assert set(stored) == set(answered)  # every 200 has its row; no refused request left one
    assert all(stored[key].probability == answer["probability"] for key, answer in answered.items())
    kept = {path.stem for path in (tmp_path / "images").rglob("*.*")}
    assert kept == set(answered)  # a refused prediction's image is removed with it


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_on_loopback_an_alias_move_under_load_fails_nothing_and_sigterm_drains(registered, tmp_path):
    """`crosssim serve` in its own process on 127.0.0.1: 200 requests (8 at a time) while the alias moves to v2;
    then SIGTERM while a request is still uploading: it is answered, new connections are refused, the ledger closes."""
    port, paths = _free_port(), [registered.images["nih"], registered.images["kermany"]]
    base = f"http://127.0.0.1:{port}"
    settings = [*registered.overrides, f"serve.ledger_path={tmp_path / 'ledger.db'}",
                f"serve.image_store={tmp_path / 'images'}", "serve.poll_seconds=0.25"]  # fmt: skip
    command = [sys.executable, "-m", "flows.cli", "serve", "--config", str(REPO / "params.yaml"),
               *(arg for setting in settings for arg in ("--set", setting)), "--port", str(port)]  # fmt: skip
    env = {**os.environ, API_KEY_ENV: API_KEY, "CROSSSIM_DICOM_SALT": SALT, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    expected = {(version, path): registered.expected(version, path) for version in ("1", "2") for path in paths}
    sha = {version: read_bundle(registered.bundles[version]).artifacts["fp32"].sha256 for version in ("1", "2")}
    registry = ModelRegistry(registered.tracking_uri)
    log_path = tmp_path / "server.log"

    async def scenario() -> dict:
        limits = httpx.Limits(max_connections=8)
        async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:
            deadline = time.monotonic() + 180
            while True:
                assert process.poll() is None, log_path.read_text()
                try:
                    if (await client.get("/readyz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, log_path.read_text()
                await asyncio.sleep(0.5)
            phi = await client.post("/v1/predict", files={"file": ("x.dcm", dicom_bytes(decode_image(paths[0])))})

            answers: list[tuple[Path, httpx.Response]] = []
            gate = asyncio.Semaphore(8)

            async def one(index: int) -> None:
                async with gate:
                    path = paths[index % 2]
                    response = await client.post("/v1/predict", **upload(path))
                    answers.append((path, response))
                    if len(answers) == 30:  # under load: the registry moves the alias, the poller follows
                        asyncio.get_running_loop().run_in_executor(None, registry.move_alias, NAME, CHAMPION, "2")
                    if response.status_code == 200 and response.json()["model"]["version"] == "1":
                        await asyncio.sleep(0.15)  # paced until the swap, so that the load outlasts it on a busy CI

            await asyncio.gather(*(one(index) for index in range(200)))
            swap_deadline = time.monotonic() + 90  # a busy CI may take longer to follow the alias: the load goes on
            while answers[-1][1].status_code == 200 and answers[-1][1].json()["model"]["version"] != "2":
                assert time.monotonic() < swap_deadline, "the server never followed the alias move"
                await asyncio.gather(*(one(index) for index in range(len(answers), len(answers) + 40)))

            # SIGTERM while a request's body is still on its way: it must be answered, then the process ends.
            request = client.build_request("POST", "/v1/predict", files={"file": (paths[0].name, paths[0].read_bytes())})
            body, release = request.read(), asyncio.Event()

            async def slow_body() -> AsyncIterator[bytes]:
                yield body[:200]
                await release.wait()
                yield body[200:]

            headers = {"content-type": request.headers["content-type"], "content-length": str(len(body))}
            in_flight = asyncio.create_task(client.post("/v1/predict", content=slow_body(), headers=headers))
            await asyncio.sleep(1.0)
            process.send_signal(signal.SIGTERM)
            await asyncio.sleep(1.5)
            try:
                async with httpx.AsyncClient(base_url=base, timeout=5) as fresh:
                    refused = (await fresh.get("/healthz")).status_code
            except httpx.TransportError:
                refused = "refused"
            release.set()
            return {"phi": phi, "answers": answers, "drained": await in_flight, "refused": refused}

    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        got = asyncio.run(scenario())
        exit_code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
        registry.move_alias(NAME, CHAMPION, "1")
    answers = got["answers"]
    assert len(answers) >= 200 and all(response.status_code == 200 for _, response in answers)  # 0 failed
    versions = [response.json()["model"]["version"] for _, response in answers]
    assert set(versions) == {"1", "2"} and versions[0] == "1" and versions[-1] == "2"
    for path, response in answers:  # never mixed: each number is the named version's own
        answer = response.json()
        version = answer["model"]["version"]
        assert answer["probability"] == pytest.approx(expected[(version, path)], abs=1e-6)
        assert answer["model"]["artifact_sha256"] == sha[version]
    drained = got["drained"]
    assert drained.status_code == 200 and drained.json()["model"]["version"] == "2"
    # uvicorn re-raises the signal once it has shut down, so the process ends as killed by SIGTERM, after the drain
    assert got["refused"] == "refused" and exit_code == -signal.SIGTERM
    cfg = serve_config(registered, tmp_path)
    rows = ledger_rows(cfg)
    answered = {r.json()["inference_id"]: r.json() for r in [got["phi"], drained, *(r for _, r in answers)]}
    assert set(rows) == set(answered)  # one row per answer, the drained one included
    assert all(rows[key].model_version == answer["model"]["version"] for key, answer in answered.items())
    server_log = log_path.read_text()
    assert "now serving cxr-serve v2 (was v1)" in server_log and "admin routes on" in server_log
    assert server_log.index("Waiting for connections to close") < server_log.index("stopped: ledger closed")
    assert "Traceback" not in server_log
    for value in [*PHI.values(), STUDY_UID, "7731942"]:
        assert value not in server_log
