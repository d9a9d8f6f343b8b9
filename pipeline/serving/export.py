"""Deployable artifacts of a registered model: its serving bundle (ONNX FP32 and static INT8), each checked.

    model.onnx       exported from the serving-form PyTorch model (dynamic batch), kept only if ONNX Runtime
                     reproduces PyTorch on the frozen golden images: max |Δp| ≤ parity_tolerance
    model.int8.onnx  ONNX Runtime ``quantize_static`` (QDQ, per-channel weights) of model.onnx, calibrated on real
                     images that no gate set contains, kept only if its AUC on every gate set is within
                     int8_auc_tolerance of the PyTorch model's

An artifact that fails its check, or whose export raises, is left out and ``ServingBundle.notes`` says why in a
sentence; registration goes on without it (the model card shows the notes).
"""

from __future__ import annotations

import re
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from sklearn.metrics import roc_auc_score

from pipeline.config import ExportConfig
from pipeline.data.preprocessing import Preprocessing
from pipeline.rollout.drift import DriftReference
from pipeline.serving.bundle import (
    ARTIFACT_URI_TAG,
    FP32_FILE,
    FP32_SHA256_TAG,
    INPUT_NAME,
    INT8_FILE,
    INT8_TAG,
    MANIFEST,
    OUTPUT_NAME,
    REFERENCE_FILE,
    ArtifactInfo,
    ServingBundle,
    sha256_of,
    write_bundle,
)
from pipeline.serving.runtime import onnx_probabilities, onnx_session, pixel_batches, torch_probabilities

OPSET = 18
CALIBRATION_BATCH = 32
# The convolutional trunk, where the time goes. The head stays FP32: quantising the logits and the softmax would
# give P(pneumonia) 256 levels, tie hundreds of images and move them across the decision threshold.
QUANTIZED_OPS = ("Conv", "Relu", "Clip", "Add", "Mul", "HardSigmoid", "MaxPool", "AveragePool", "GlobalAveragePool")
FP32_NOTE = "FP32"  # every note starts with the precision it explains, so a tag can carry INT8's reason alone
INT8_NOTE = "INT8"

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")  # torch.onnx colours its messages
LabelledImages = tuple[np.ndarray, np.ndarray]  # uint8 (N, S, S) images, int labels (N,)


@dataclass(frozen=True)
class LoggedBundle:
    """A bundle as logged to the registering run, for the registered model ``name``."""

    name: str
    artifact_uri: str  # runs:/<run id>/serving/<name>
    bundle: ServingBundle


def build_bundle(
    model: torch.nn.Module,
    *,
    backbone: str,
    preprocessing: Preprocessing,
    threshold: float,
    threshold_chosen_on: str,
    golden: np.ndarray,
    calibration: np.ndarray,
    eval_sets: Mapping[str, LabelledImages],
    settings: ExportConfig,
    directory: Path,
) -> ServingBundle:
    """Export, check and write the bundle of a serving-form model (in eval mode, on the CPU) into ``directory``.

    ``model`` may be a plain module or a registered one as MLflow loads it (a torch.export program's module).

    ``golden`` and ``calibration`` are uint8 (N, S, S) real images; ``eval_sets`` the gate's frozen sets.
    Never raises for an exporter or quantizer failure: the artifact is missing and a note says why.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in (MANIFEST, FP32_FILE, INT8_FILE, REFERENCE_FILE):  # a reused folder must not pass off an old file as this bundle's
        (directory / stale).unlink(missing_ok=True)
    artifacts: dict[str, ArtifactInfo] = {}
    notes: list[str] = []
    fp32 = _fp32_artifact(model, preprocessing.image_size, golden, settings.parity_tolerance, directory / FP32_FILE, notes)
    if fp32 is not None:
        artifacts["fp32"] = fp32
        if not settings.int8:
            notes.append(f"{INT8_NOTE}: not built (serve.export.int8 is false)")
        else:
            int8 = _int8_artifact(model, directory, calibration, eval_sets, settings.int8_auc_tolerance, notes)
            if int8 is not None:
                artifacts["int8"] = int8
    reference = _drift_reference(model, calibration, directory / REFERENCE_FILE, notes) if artifacts else None
    bundle = ServingBundle(
        backbone,
        preprocessing.image_size,
        float(threshold),
        threshold_chosen_on,
        artifacts,
        notes,
        reference=reference,
        harmonisation=preprocessing.harmonisation,
    )
    write_bundle(directory, bundle)  # last: a folder without serving.json was never a bundle
    return bundle


def _drift_reference(model: torch.nn.Module, images: np.ndarray, path: Path, notes: list[str]) -> str | None:
    """The calibration images — what the model was built on: source-val, and target-train with CrossSim — as
    the drift checks' reference (pipeline.rollout.drift)."""
    try:
        DriftReference.of(images, torch_probabilities(model, images)).save(path)
    except Exception as exc:  # drift checks are an aid: their reference failing must not stop registration
        notes.append(f"drift reference: not built ({type(exc).__name__}: {exc})")
        return None
    return path.name


def export_onnx(model: torch.nn.Module, image_size: int, path: Path) -> None:
    """The FP32 graph, one file: (B, 1, S, S) float pixels in [0, 1] → (B,) probability, B dynamic.

    torch.export's exporter (the default, ``dynamo=True``), not the TorchScript one: a registered model loads from
    MLflow as a torch.export program (``pt2``), whose module refuses the train/eval switch the TorchScript exporter
    makes. It is also the one that stays: the TorchScript exporter is deprecated. It costs 3-10 s per model here
    (resnet18, mobilenet_v3_small), most of it in torch.export's decompositions.
    """
    example = torch.zeros(2, 1, image_size, image_size)  # batch 2: nothing traced may specialise on batch 1
    with warnings.catch_warnings():
        if isinstance(model, torch.fx.GraphModule):  # a torch.export program's module says training=True, but
            # a registered one was traced in eval mode (MlflowTracker.log_model): the warning would be wrong
            warnings.filterwarnings("ignore", message="Exporting a model while it is in training mode")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            opset_version=OPSET,
            dynamo=True,
            external_data=False,  # the bundle's model.onnx is self-contained (weights inside)
            verbose=False,
        )


def quantize_int8(fp32_path: Path, calibration: np.ndarray, path: Path) -> None:
    """Static INT8 (QDQ, per-channel weights) of ``fp32_path``; activation ranges from ``calibration`` (uint8)."""
    with tempfile.TemporaryDirectory(prefix="crosssim-quantize-") as work:
        # shape inference and graph optimisation first (folds what the exporter left), as ONNX Runtime recommends
        prepared = Path(work) / "model.prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))
        quantize_static(
            str(prepared),
            str(path),
            _CalibrationImages(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            # U8S8 (unsigned activations, signed weights) runs ONNX Runtime's fast x86 kernels: 3× the images/s of
            # S8S8, which is slower than FP32 on our CPUs. No reduce_range: its 7-bit weights, a guard against
            # saturation on CPUs without VNNI, tripled the AUC loss of a small model (0.0013 → 0.0038)
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=list(QUANTIZED_OPS),
        )


def version_tags(logged: LoggedBundle) -> dict[str, str]:
    """The registered version's tags that find and vouch for its bundle."""
    bundle = logged.bundle
    int8 = "yes" if "int8" in bundle.artifacts else int8_reason(bundle)
    tags = {ARTIFACT_URI_TAG: logged.artifact_uri, INT8_TAG: int8}
    if "fp32" in bundle.artifacts:
        tags[FP32_SHA256_TAG] = bundle.artifacts["fp32"].sha256
    return tags


def int8_reason(bundle: ServingBundle) -> str:
    """Why the bundle has no INT8 artifact: its INT8 note, else (FP32 missing) the FP32 one."""
    prefix = f"{INT8_NOTE}: "
    reasons = [note.removeprefix(prefix) for note in bundle.notes if note.startswith(prefix)]
    return "; ".join(reasons or [f"no FP32 export to quantise ({'; '.join(bundle.notes)})"])


class _CalibrationImages(CalibrationDataReader):
    """The calibration images in batches, as the graph's input."""

    def __init__(self, images: np.ndarray) -> None:
        self._batches = pixel_batches(images, CALIBRATION_BATCH)

    def get_next(self) -> dict[str, np.ndarray] | None:
        pixels = next(self._batches, None)
        return None if pixels is None else {INPUT_NAME: pixels}


def _fp32_artifact(
    model: torch.nn.Module, image_size: int, golden: np.ndarray, tolerance: float, path: Path, notes: list[str]
) -> ArtifactInfo | None:
    try:
        export_onnx(model, image_size, path)
        onnx = onnx_probabilities(onnx_session(path), golden)
    except Exception as exc:  # torch.onnx and ONNX Runtime raise many unrelated types; registration goes on
        path.unlink(missing_ok=True)
        notes.append(
            f"{FP32_NOTE}: torch.onnx could not export the model, or ONNX Runtime could not run it ({_reason(exc)})"
        )
        return None
    reference = torch_probabilities(model, golden)
    comparable = onnx.shape == reference.shape and onnx.size > 0
    difference = float(np.max(np.abs(onnx - reference))) if comparable else float("nan")
    if not difference <= tolerance:  # NaN (no golden image, a shape mismatch, a non-finite output) fails as well
        path.unlink()
        notes.append(
            f"{FP32_NOTE}: the ONNX export disagrees with PyTorch on the {len(golden)} golden images "
            f"(max |Δp| {difference:.3g} > tolerance {tolerance:g}); no ONNX artifact"
        )
        return None
    return ArtifactInfo(FP32_FILE, sha256_of(path), {"max_abs_diff": difference, "golden_images": float(len(golden))})


def _int8_artifact(
    model: torch.nn.Module,
    directory: Path,
    calibration: np.ndarray,
    eval_sets: Mapping[str, LabelledImages],
    tolerance: float,
    notes: list[str],
) -> ArtifactInfo | None:
    path = directory / INT8_FILE
    try:
        quantize_int8(directory / FP32_FILE, calibration, path)
        session = onnx_session(path)
        int8 = {name: _auc(labels, onnx_probabilities(session, images)) for name, (images, labels) in eval_sets.items()}
    except Exception as exc:  # the quantizer raises many unrelated types; registration goes on with FP32
        path.unlink(missing_ok=True)
        notes.append(f"{INT8_NOTE}: ONNX Runtime's quantizer failed ({_reason(exc)})")
        return None
    checks, failures = {}, []
    for name, (images, labels) in eval_sets.items():
        reference = _auc(labels, torch_probabilities(model, images))
        delta = int8[name] - reference
        checks |= {f"auc.{name}": int8[name], f"auc_delta.{name}": delta}
        if not abs(delta) <= tolerance:  # NaN: a set without both classes cannot vouch for INT8
            failures.append(f"{name} AUC {int8[name]:.4f} vs PyTorch {reference:.4f} (Δ {delta:+.4f})")
    if not eval_sets:
        failures.append("no evaluation set to check it on")
    if failures:
        path.unlink()
        notes.append(f"{INT8_NOTE}: rejected, AUC not within {tolerance:g} of PyTorch's: " + "; ".join(failures))
        return None
    return ArtifactInfo(INT8_FILE, sha256_of(path), checks)


def _auc(labels: np.ndarray, probabilities: np.ndarray) -> float:
    labels = np.asarray(labels)
    return float(roc_auc_score(labels, probabilities)) if len(np.unique(labels)) == 2 else float("nan")


def _reason(exc: BaseException) -> str:
    """An exception in one line for a note (no traceback): the type and first message line of its root cause,
    which names the failing operator where torch.onnx's own message only says which export step failed."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = ANSI_ESCAPE.sub("", str(exc)).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
