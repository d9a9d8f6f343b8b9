"""Grad-CAM explanations (captum's LayerGradCam) on a served version's FP32 PyTorch twin.

The map is taken at the backbone's last convolutional block (its output is the feature map the head pools), for
the model's output, P(pneumonia): positive values mark where the image pushes the probability up.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from captum.attr import LayerAttribution, LayerGradCam
from PIL import Image
from torch import nn

from pipeline.data.images import to_grayscale
from pipeline.errors import PipelineError

OVERLAY_MAX_SIDE = 1024  # the overlay is drawn on the upload, shrunk to this: enough to read, small to send
OVERLAY_ALPHA = 0.45


@dataclass(frozen=True)
class GradCam:
    layer: str  # the module the map was taken at, e.g. "classifier.features.layer4"
    probability: float  # the twin's own P(pneumonia) for the image
    cam: np.ndarray  # (S, S) float32, ReLU'd Grad-CAM upsampled to the model's input size, not normalised


def last_conv_block(model: nn.Module) -> tuple[str, nn.Module]:
    """The last top-level block of the backbone that holds a convolution (resnet: layer4; mobilenet,
    efficientnet, densenet: their ``features``). Convolutions are found by their 4-D kernels: in a model
    unflattened from torch.export the modules are graph interpreters, not ``nn.Conv2d``."""
    backbone = model.get_submodule("classifier.features")
    found = None
    for name, child in backbone.named_children():
        if any(parameter.ndim == 4 for parameter in child.parameters()):
            found = (f"classifier.features.{name}", child)
    if found is None:
        raise PipelineError("the model's backbone has no convolutional block to explain")
    return found


def grad_cam(model: nn.Module, inputs: np.ndarray) -> GradCam:
    """Grad-CAM of one preprocessed image, (1, S, S) float32 in [0, 1]."""
    layer_name, layer = last_conv_block(model)
    pixels = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))[None]
    with torch.no_grad():
        probability = float(model(pixels)[0])
    # The output is one probability per image, so no target index is needed.
    attribution = LayerGradCam(model, layer).attribute(pixels, relu_attributions=True)
    upsampled = LayerAttribution.interpolate(attribution, tuple(pixels.shape[-2:]), interpolate_mode="bilinear")
    cam = upsampled[0, 0].detach().clamp(min=0).numpy().astype(np.float32)
    return GradCam(layer_name, probability, cam)


def overlay_png(pixels: np.ndarray, cam: np.ndarray) -> bytes:
    """The map (jet colours, normalised to its maximum) blended over the grayscale upload, as a PNG."""
    from matplotlib import colormaps

    gray = Image.fromarray(to_grayscale(pixels))
    gray.thumbnail((OVERLAY_MAX_SIDE, OVERLAY_MAX_SIDE), Image.Resampling.BILINEAR)
    peak = float(cam.max())
    normalised = cam / peak if peak > 0 else np.zeros_like(cam)
    heat = Image.fromarray(normalised.astype(np.float32)).resize(gray.size, Image.Resampling.BILINEAR)
    colours = colormaps["jet"](np.clip(np.asarray(heat), 0, 1))[..., :3]
    base = np.asarray(gray.convert("RGB"), dtype=np.float32) / 255.0
    blended = (1 - OVERLAY_ALPHA) * base + OVERLAY_ALPHA * colours
    out = io.BytesIO()
    Image.fromarray((blended * 255).round().astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()
