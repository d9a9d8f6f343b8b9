"""Decoding one manifest row's pixels, whatever file format holds them."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.errors import DatasetError

DICOM_SUFFIXES = {".dcm", ".dicom"}


class ImageDecodeError(DatasetError):
    """The file exists in the manifest but its pixels cannot be read."""


@lru_cache(maxsize=4)
def _npz_arrays(path: str) -> dict[str, np.ndarray]:
    with np.load(path) as archive:
        return {key: archive[key] for key in archive.files}


def decode_image(path: str | Path, frame: int | None = None, array_key: str | None = None) -> np.ndarray:
    """Return the image as uint8, shape (H, W) or (H, W, C), exactly as stored.

    Raises ImageDecodeError naming the file and what went wrong.
    """
    path = Path(path)
    try:
        if array_key is not None:
            return np.asarray(_npz_arrays(str(path))[array_key][int(frame)])
        if path.suffix.lower() in DICOM_SUFFIXES:
            from pipeline.data.dicom import dicom_pixels

            return dicom_pixels(path)
        with Image.open(path) as image:
            image.load()  # forces a full decode: truncated files fail here, not later
            return _pil_to_uint8(image)
    except ImageDecodeError:
        raise
    except (OSError, UnidentifiedImageError, KeyError, IndexError, ValueError, SyntaxError) as exc:
        raise ImageDecodeError(f"{path}: cannot decode image ({exc})") from exc


def _pil_to_uint8(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scale = 255.0 / (high - low) if high > low else 0.0
        return ((array - low) * scale).round().astype(np.uint8)
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB" if "A" in image.mode or image.mode == "P" else "L")
    return np.asarray(image, dtype=np.uint8)


def to_grayscale(pixels: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, C) uint8 → (H, W) uint8 using ITU-R 601 luma, like PIL's "L"."""
    if pixels.ndim == 2:
        return pixels
    if pixels.shape[2] == 1:
        return pixels[:, :, 0]
    return np.asarray(Image.fromarray(pixels[:, :, :3]).convert("L"))


def resize_square(gray: np.ndarray, size: int) -> np.ndarray:
    """Resize to size×size with antialiasing (chest films are near-square; no crop loses lung fields)."""
    if gray.shape == (size, size):
        return gray
    return np.asarray(Image.fromarray(gray).resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None))
