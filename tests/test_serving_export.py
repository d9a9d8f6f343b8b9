"""Deployable artifacts: ONNX FP32 and static INT8 bundles of a resnet18 trained one epoch on real images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlflow.pytorch
import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from pipeline.config import ExportConfig, load_config
from pipeline.data.prepare import prepare_dataset
from pipeline.data.preprocessing import Preprocessing
from pipeline.data.readers import read_dataset
from pipeline.data.splits import subsample
from pipeline.evaluation import ScoredModel
from pipeline.models import servable
from pipeline.registry.card import CardFacts, model_card
from pipeline.rollout.drift import DriftReference
from pipeline.serving.bundle import FP32_FILE, INT8_FILE, MANIFEST, BundleError, read_bundle
from pipeline.serving.export import LoggedBundle, build_bundle, version_tags
from pipeline.serving.runtime import onnx_probabilities, onnx_session, torch_probabilities
from pipeline.training import load_trained_model, train_model

pytestmark = pytest.mark.slow  # ONNX export of real models: left out of make test-fast

SIZE = 32
SET = "pneumoniamnist/test"


@dataclass(frozen=True)
class Trained:
    model: torch.nn.Module  # serving form: (B, 1, S, S) pixels in [0, 1] → (B,) probability
    golden: np.ndarray
    calibration: np.ndarray
    eval_sets: dict[str, tuple[np.ndarray, np.ndarray]]
    settings: ExportConfig


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory) -> Trained:
    """resnet18, one epoch on 256 real PneumoniaMNIST train/val images; 300 real test images to check it on."""
    work = tmp_path_factory.mktemp("export")
    manifest = read_dataset(data_dir / "pneumoniamnist")
    train = prepare_dataset(subsample(manifest[manifest["split"] != "test"], 64, seed=0), Preprocessing(SIZE), work / "cache")
    test_rows = subsample(manifest[manifest["split"] == "test"], 150, seed=0).sort_values("image_id")
    test = prepare_dataset(test_rows.reset_index(drop=True), Preprocessing(SIZE), work / "cache")
    training = ["train.epochs=1", "train.batch_size=16", "train.early_stopping_patience=null", "train.warmup_epochs=0.5"]
    cfg = load_config(None, [*training, f"train.output_dir={work / 'train'}"])
    result = train_model(train, cfg, show_progress=False)
    model, example = servable(load_trained_model(result.model_path, "resnet18"), SIZE)
    # as registration gets it: MLflow saves the model as a torch.export program and loads that program's module
    mlflow.pytorch.save_model(model, str(work / "registered"), input_example=example)
    images = np.asarray(test.images)
    return Trained(
        model=mlflow.pytorch.load_model(str(work / "registered"), map_location="cpu"),
        golden=images[:16],
        calibration=np.asarray(train.images[np.asarray(train.manifest["split"] == "val")]),
        eval_sets={SET: (images, test.manifest["label"].to_numpy(dtype=np.int64))},
        settings=cfg.serve.export,
    )


def _build(trained: Trained, directory: Path, model: torch.nn.Module | None = None, **changes):
    settings = trained.settings.model_copy(update=changes.pop("settings", {}))
    inputs = {"golden": trained.golden, "calibration": trained.calibration, "eval_sets": trained.eval_sets, **changes}
    return build_bundle(
        model or trained.model,
        backbone="resnet18",
        preprocessing=Preprocessing(SIZE),
        threshold=0.42,
        threshold_chosen_on="pneumoniamnist/val",
        settings=settings,
        directory=directory,
        **inputs,
    )


@pytest.fixture(scope="module")
def bundle_dir(trained, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("bundle")
    _build(trained, directory)
    return directory


def test_fp32_export_matches_pytorch_on_any_batch(trained, bundle_dir):
    bundle = read_bundle(bundle_dir)  # the manifest round-trips: a served model needs nothing else
    assert (bundle.backbone, bundle.image_size, bundle.threshold) == ("resnet18", SIZE, 0.42)
    assert bundle.threshold_chosen_on == "pneumoniamnist/val"
    fp32 = bundle.artifacts["fp32"]
    assert fp32.checks["golden_images"] == 16 and fp32.checks["max_abs_diff"] <= 1e-4
    session = onnx_session(bundle.path_of(bundle_dir, "fp32"))
    assert session.get_inputs()[0].shape == ["batch", 1, SIZE, SIZE]
    images = trained.eval_sets[SET][0]
    for batch in (1, 7):
        probabilities = onnx_probabilities(session, images[:batch])
        assert probabilities.shape == (batch,)
        np.testing.assert_allclose(probabilities, torch_probabilities(trained.model, images[:batch]), atol=1e-4)


def test_int8_is_per_channel_qdq_checked_on_every_set_and_kept(trained, bundle_dir):
    bundle = read_bundle(bundle_dir)
    int8 = bundle.artifacts["int8"]
    assert set(int8.checks) == {f"auc.{SET}", f"auc_delta.{SET}"} and abs(int8.checks[f"auc_delta.{SET}"]) <= 0.005
    assert bundle.notes == []
    reference = DriftReference.load(bundle_dir / bundle.reference)  # what drift checks compare served images with
    assert reference.embeddings.shape[0] == reference.probabilities.shape[0] > 0
    assert ((reference.probabilities >= 0) & (reference.probabilities <= 1)).all()
    graph = onnx.load(bundle.path_of(bundle_dir, "int8")).graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= {node.op_type for node in graph.node}
    weights = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    conv_inputs = {name for node in graph.node if node.op_type == "Conv" for name in node.input}
    per_channel = [
        node for node in graph.node if node.op_type == "DequantizeLinear" and set(node.output) & conv_inputs
        and weights.get(node.input[1], np.zeros(1)).size > 1
    ]
    assert per_channel, "no convolution weight has per-channel scales"
    # the head stays FP32: probabilities are not rounded to 256 levels
    probabilities = onnx_probabilities(onnx_session(bundle.path_of(bundle_dir, "int8")), trained.eval_sets[SET][0])
    assert len(np.unique(probabilities)) > 256
    logged = LoggedBundle("crosssim-pneumonia", "runs:/abc/serving/crosssim-pneumonia", bundle)
    assert version_tags(logged) == {
        "serving.artifact_uri": "runs:/abc/serving/crosssim-pneumonia",
        "serving.fp32_sha256": bundle.artifacts["fp32"].sha256,
        "serving.int8": "yes",
    }


def test_an_altered_artifact_is_refused(bundle_dir, tmp_path):
    bundle = read_bundle(bundle_dir)
    altered = tmp_path / FP32_FILE
    altered.write_bytes((bundle_dir / FP32_FILE).read_bytes() + b"\0")
    with pytest.raises(BundleError, match="SHA-256 differs"):
        bundle.path_of(tmp_path, "fp32")


def test_int8_that_loses_auc_is_left_out_with_the_numbers_and_fp32_kept(trained, tmp_path):
    # calibrated on black images only, every real image saturates the INT8 activation ranges
    bundle = _build(trained, tmp_path, calibration=np.zeros_like(trained.calibration))
    assert set(bundle.artifacts) == {"fp32"} and not (tmp_path / INT8_FILE).exists()
    (note,) = bundle.notes
    assert note.startswith("INT8: rejected, AUC not within 0.005 of PyTorch's") and f"{SET} AUC" in note
    tags = version_tags(LoggedBundle("m", "runs:/abc/serving/m", bundle))
    assert tags["serving.int8"] == note.removeprefix("INT8: ") and tags["serving.fp32_sha256"]
    card = model_card(
        CardFacts(
            name="m", version="1", model="resnet18", lineage={}, data={},
            scored=ScoredModel(0.42, "pneumoniamnist/val", {}), config={},
            serving=[LoggedBundle("m", "runs:/abc/serving/m", bundle)],
        )
    )
    assert "## Deployable artifacts" in card and bundle.artifacts["fp32"].sha256 in card
    assert f"- Missing: {note}" in card

    switched_off = _build(trained, tmp_path / "switched-off", settings={"int8": False})
    assert set(switched_off.artifacts) == {"fp32"}
    assert switched_off.notes == ["INT8: not built (serve.export.int8 is false)"]


class _Unexportable(torch.nn.Module):
    """A probability through an operator torch.onnx has no ONNX translation for (aten::i0)."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(torch.special.i0(pixels).mean(dim=(1, 2, 3)))


class _Noisy(torch.nn.Module):
    """Exportable, but its ONNX graph draws other random numbers than PyTorch: parity cannot hold."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        mean = pixels.mean(dim=(1, 2, 3))
        return mean + 0.01 * torch.rand_like(mean)


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        (_Unexportable().eval(), "FP32: torch.onnx could not export the model, or ONNX Runtime could not run it "
                          "(DispatchError: No ONNX function found for <OpOverload(op='prims.bessel_i0'"),
        (_Noisy().eval(), "FP32: the ONNX export disagrees with PyTorch on the 16 golden images (max |Δp| "),
    ],
)
def test_a_failed_export_or_parity_check_is_a_note_and_no_artifact(trained, tmp_path, model, reason):
    bundle = _build(trained, tmp_path, model=model)
    assert bundle.artifacts == {}
    (note,) = bundle.notes
    assert note.startswith(reason) and "Traceback" not in note and "\n" not in note
    assert sorted(path.name for path in tmp_path.iterdir()) == [MANIFEST]  # no half-written ONNX file
    assert read_bundle(tmp_path) == bundle
    tags = version_tags(LoggedBundle("m", "runs:/abc/serving/m", bundle))
    assert "serving.fp32_sha256" not in tags and tags["serving.int8"].startswith("no FP32 export to quantise")
    with pytest.raises(BundleError, match="no fp32 artifact"):
        bundle.path_of(tmp_path, "fp32")
