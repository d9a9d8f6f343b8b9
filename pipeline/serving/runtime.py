"""Scoring prepared images in batches: with an ONNX Runtime session of a bundle, or with its PyTorch twin.

Both take what ``crosssim prepare`` and the gate's sets hold, uint8 (N, S, S) images, and turn them into the
serving input, (B, 1, S, S) float32 pixels in [0, 1], in one place (:func:`pixel_batches`), so the export
checks, the promotion gate and the benchmarks compare the two runtimes on exactly the same input.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from pipeline.serving.bundle import INPUT_NAME, OUTPUT_NAME

if TYPE_CHECKING:  # torch loads only where a PyTorch model is scored: the ONNX server starts without it
    import torch

BATCH = 256


def pixel_batches(images: np.ndarray, batch: int = BATCH) -> Iterator[np.ndarray]:
    """uint8 (N, S, S) images → successive (≤ batch, 1, S, S) float32 arrays in [0, 1]."""
    for start in range(0, len(images), batch):
        yield (np.asarray(images[start : start + batch], dtype=np.float32) / 255.0)[:, None]


def onnx_session(path: Path, threads: int = 0) -> ort.InferenceSession:
    """A CPU session on ``path``; ``threads`` 0 lets ONNX Runtime use every core."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_probabilities(session: ort.InferenceSession, images: np.ndarray, batch: int = BATCH) -> np.ndarray:
    """P(pneumonia) for uint8 (N, S, S) images from a bundle's ONNX session, as float64 (N,)."""
    outputs = [session.run([OUTPUT_NAME], {INPUT_NAME: pixels})[0] for pixels in pixel_batches(images, batch)]
    return np.concatenate(outputs).astype(np.float64) if outputs else np.zeros(0)


def torch_probabilities(model: torch.nn.Module, images: np.ndarray, batch: int = BATCH) -> np.ndarray:
    """P(pneumonia) for uint8 (N, S, S) images from a serving-form PyTorch model (on the CPU), as float64 (N,)."""
    import torch

    with torch.inference_mode():
        outputs = [model(torch.from_numpy(pixels)).float().numpy() for pixels in pixel_batches(images, batch)]
    return np.concatenate(outputs).astype(np.float64) if outputs else np.zeros(0)
