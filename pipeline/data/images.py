"""Decoding one manifest row's pixels, whatever file format holds them."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.errors import DatasetError

DICOM_SUFFIXES = {".dcm", ".dicom"}
DICOM_MODE = "DICOM"  # windowed to 8 bits by the DICOM reader, as its display would
# Stored formats decoded without conversion (a DICOM's windowing is how DICOM is meant to be viewed).
NATIVE_MODES = frozenset({"L", "RGB", DICOM_MODE})


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
    return decode_image_and_mode(path, frame, array_key)[0]


def decode_image_and_mode(
    path: str | Path, frame: int | None = None, array_key: str | None = None
) -> tuple[np.ndarray, str]:
    """``decode_image``, and the format the pixels were stored in: PIL's mode ("L", "RGB", "RGBA", "I;16", "P",
    ...), DICOM_MODE, or for an array its mode when uint8, else its dtype. Modes other than NATIVE_MODES were
    converted to reach uint8 L/RGB.
    """
    path = Path(path)
    try:
        if array_key is not None:
            pixels = np.asarray(_npz_arrays(str(path))[array_key][int(frame)])
            return pixels, _array_mode(pixels)
        if path.suffix.lower() in DICOM_SUFFIXES:
            from pipeline.data.dicom import dicom_pixels

            return dicom_pixels(path), DICOM_MODE
        with Image.open(path) as image:
            image.load()  # forces a full decode: truncated files fail here, not later
            return pil_to_uint8(image), image.mode
    except ImageDecodeError:
        raise
    except (OSError, UnidentifiedImageError, KeyError, IndexError, ValueError, SyntaxError) as exc:
        raise ImageDecodeError(f"{path}: cannot decode image ({exc})") from exc


def _array_mode(pixels: np.ndarray) -> str:
    if pixels.dtype != np.uint8:
        return str(pixels.dtype)
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    return {1: "L", 3: "RGB", 4: "RGBA"}.get(channels, f"{channels} channels")


def pil_to_uint8(image: Image.Image) -> np.ndarray:
    """A loaded PIL image as uint8 (H, W) or (H, W, 3): 16-bit/int/float stretched min→max, alpha and palette
    to RGB, other modes to L. Also what ``crosssim serve`` does to an upload, so both match the training images."""
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
