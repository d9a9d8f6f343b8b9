"""Batched inference on uint8 image arrays, shared by every loop, evaluation and the CrossSim feature extractor."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch
from torch import nn

from pipeline.augment import normalise, to_model_input


@torch.no_grad()
def batched_outputs(
    network: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor | np.ndarray,
    device: torch.device,
    channels_last: bool = True,
    batch_size: int = 256,
    autocast: Callable[[], AbstractContextManager] | None = None,
) -> Iterator[torch.Tensor]:
    """``network``'s outputs on uint8 images (N, H, W), one batch at a time, without gradients: the batched
    inference of every loop. Each batch is copied out of ``images`` on its own, so a memory-mapped set is never
    read whole."""
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        batch = torch.from_numpy(np.array(batch)) if isinstance(batch, np.ndarray) else batch
        inputs = normalise(to_model_input(batch, device, channels_last))
        with autocast() if autocast is not None else nullcontext():
            outputs = network(inputs)
        yield outputs


@torch.no_grad()
def predict_proba(
    model: nn.Module,
    images: torch.Tensor | np.ndarray,
    device: torch.device,
    channels_last: bool = True,
    batch_size: int = 256,
    autocast: Callable[[], AbstractContextManager] | None = None,
) -> np.ndarray:
    """Softmax probability of class 1 for uint8 images (N, H, W), in eval mode."""
    was_training = model.training
    model.eval()
    outputs = [
        torch.softmax(logits.float(), dim=1)[:, 1].cpu()
        for logits in batched_outputs(model, images, device, channels_last, batch_size, autocast)
    ]
    model.train(was_training)
    return torch.cat(outputs).numpy() if outputs else np.zeros(0, dtype=np.float32)
