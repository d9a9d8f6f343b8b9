"""Decoded pixels → a model's input image: the one definition that prepare (training, adaptation, evaluation)
and serving share, so a served model sees its images exactly as it was trained on them.

    grayscale (ITU-R 601) → resize to S×S → intensity harmonisation → uint8 (S, S)

Harmonisation standardises each image's intensities on its own, before any learning: hospitals' films differ
in exposure, processing and windowing far more than a brightness augmentation covers.

- ``histeq``: global histogram equalisation. An image's grey levels are mapped through its own cumulative
  histogram, ``y = 255 · (CDF(x) − CDF(min)) / (1 − CDF(min))``, so every film ends with a near-uniform
  histogram over the full range whatever its exposure (the rescale matters: a film's black border is often
  a tenth of its pixels, which plain ``255 · CDF(x)`` would map to grey).
- ``clahe``: contrast-limited adaptive histogram equalisation (Zuiderveld 1994): the same mapping per tile of
  1/8 of the image side, each tile's histogram clipped at ``CLAHE_CLIP_LIMIT`` of its count (the excess spread
  evenly) so noise in flat regions is not amplified, tiles' mappings blended bilinearly.

Both come from scikit-image. A constant image (no contrast to standardise) is returned unchanged rather than
mapped to white.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
from skimage import exposure

from pipeline.data.images import resize_square, to_grayscale

# Per-image intensity standardisation after the resize; the configuration (data.harmonisation) takes its values here
Harmonisation = Literal["none", "histeq", "clahe"]
HARMONISATIONS: tuple[str, ...] = get_args(Harmonisation)
CLAHE_CLIP_LIMIT = 0.01  # scikit-image's default; tiles are 1/8 of the side (8 px at 64 px)


@dataclass(frozen=True)
class Preprocessing:
    """What turns decoded pixels into a model's input; a served model's bundle carries it."""

    image_size: int
    harmonisation: Harmonisation = "none"  # what bundles and caches made before harmonisation existed used

    def __post_init__(self) -> None:
        if self.harmonisation not in HARMONISATIONS:
            raise ValueError(f"harmonisation {self.harmonisation!r}: one of {', '.join(HARMONISATIONS)}")

    def image(self, pixels: np.ndarray) -> np.ndarray:
        """Decoded uint8 (H, W) or (H, W, C) → the model's uint8 (S, S) image (what prepare stores)."""
        return harmonise(resize_square(to_grayscale(pixels), self.image_size), self.harmonisation)

    def model_input(self, pixels: np.ndarray) -> np.ndarray:
        """Decoded uint8 pixels → (1, S, S) float32 in [0, 1]: what the exported graphs take."""
        return (self.image(pixels).astype(np.float32) / 255.0)[None]

    def describe(self) -> str:
        extra = "" if self.harmonisation == "none" else f", {self.harmonisation}"
        return f"{self.image_size}×{self.image_size} grayscale{extra}"


def harmonise(gray: np.ndarray, method: Harmonisation) -> np.ndarray:
    """uint8 (S, S) → uint8 (S, S) with standardised intensities (module docstring)."""
    if method == "none" or gray.min() == gray.max():
        return gray
    if method == "histeq":
        scaled = exposure.rescale_intensity(exposure.equalize_hist(gray, nbins=256), out_range=(0.0, 1.0))
    else:
        scaled = exposure.equalize_adapthist(gray, clip_limit=CLAHE_CLIP_LIMIT)
    return np.clip(np.round(scaled * 255.0), 0, 255).astype(np.uint8)
