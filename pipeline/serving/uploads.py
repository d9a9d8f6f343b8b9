"""An uploaded image → its pixels, decoded exactly as the training images were, or an ``UploadError`` naming the rule.

The format is read from the bytes (PNG and JPEG signatures, the DICOM ``DICM`` marker), never from the file name.
Sizes are checked on the header, before any pixel is decoded, so a huge image costs nothing but its upload.
A DICOM is read in memory; its header gives only keyed pseudonyms of PatientID and StudyInstanceUID (with the
site's secret salt, as ingest pseudonymises them) and is then dropped. What is kept of an upload
(``deidentified_image``) carries no metadata: a PNG or JPEG is kept as its own bytes with every metadata chunk or
segment removed (the lossless filter ingest applies, pipeline.data.scrub: no re-encoding on the request path), a
DICOM as a PNG encoded from its decoded pixels.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError

from pipeline.data.dicom import dataset_pixels
from pipeline.data.images import DICOM_MODE, ImageDecodeError, pil_to_uint8
from pipeline.data.scrub import PNG_SIGNATURE, ImageFormatError, scrub_jpeg, scrub_png
from pipeline.errors import RequestRefused
from pipeline.serving.ledger import Pseudonyms, pseudonym

JPEG_SIGNATURE = b"\xff\xd8\xff"
DICOM_MARKER_AT = 128  # Part 10 files: a 128-byte preamble, then "DICM"
_PIXEL_ELEMENTS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


UNSPECIFIED_SITE = "unspecified"  # the ledger's site when a request names none


class UploadError(RequestRefused):
    """An upload the server refuses (a 4xx naming the rule)."""


def served_site(site: str | None, allowed: tuple[str, ...]) -> str:
    """The request's site, one of ``allowed`` (serve.sites); ``UNSPECIFIED_SITE`` when it names none."""
    name = (site or "").strip()
    if not name:
        return UNSPECIFIED_SITE
    if name not in allowed:
        raise UploadError("unknown_site", f"site {name!r} is not served here; one of: {', '.join(allowed)} (serve.sites)")
    return name


@dataclass(frozen=True)
class UploadLimits:
    min_side: int
    max_side: int


@dataclass(frozen=True)
class DecodedUpload:
    pixels: np.ndarray  # uint8 (H, W) or (H, W, 3), as pipeline.data.images decodes a stored image
    image_format: str  # "png" | "jpeg" | "dicom"
    converted_from: str | None  # the stored mode when it was converted (e.g. "RGB", "RGBA", "I;16", "DICOM")
    dicom_ids: Pseudonyms | None  # keyed pseudonyms of the DICOM's PatientID / StudyInstanceUID (if salted)


def sniff_format(data: bytes) -> str:
    if data.startswith(PNG_SIGNATURE):
        return "png"
    if data.startswith(JPEG_SIGNATURE):
        return "jpeg"
    if data[DICOM_MARKER_AT : DICOM_MARKER_AT + 4] == b"DICM":
        return "dicom"
    raise UploadError(
        "unsupported_format",
        "field 'file' is not a PNG, JPEG or DICOM (Part 10) image: its bytes start with none of their signatures "
        "(the file name's extension is not trusted)",
        415,
    )


def decode_upload(data: bytes, limits: UploadLimits, dicom_salt: str | None) -> DecodedUpload:
    """Decode ``data``; a DICOM's ids are pseudonymised with ``dicom_salt``, the site's secret (None: no ids)."""
    image_format = sniff_format(data)
    if image_format == "dicom":
        return _decode_dicom(data, limits, dicom_salt)
    return _decode_raster(data, image_format, limits)


def deidentified_image(data: bytes, decoded: DecodedUpload) -> bytes:
    """The upload as it is kept: the PNG/JPEG without its metadata, else (a DICOM, or a file whose chunks
    cannot be walked although its pixels decoded) a PNG of the decoded pixels."""
    if decoded.image_format in ("png", "jpeg"):
        try:
            return (scrub_png if decoded.image_format == "png" else scrub_jpeg)(data)[0]
        except ImageFormatError:
            pass  # re-encoding the pixels cannot carry metadata along
    return deidentified_png(decoded.pixels)


def deidentified_png(pixels: np.ndarray) -> bytes:
    """The decoded pixels as a PNG with no metadata chunk: nothing of the upload's header or text survives."""
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", compress_level=1)  # fast: it is written on every request
    return out.getvalue()


def _check_sides(width: int, height: int, limits: UploadLimits) -> None:
    if min(width, height) < limits.min_side:
        raise UploadError(
            "image_too_small", f"the image is {width}×{height}; both sides must be at least {limits.min_side} pixels"
        )
    if max(width, height) > limits.max_side:
        raise UploadError(
            "image_too_large", f"the image is {width}×{height}; no side may exceed {limits.max_side} pixels"
        )


def _decode_raster(data: bytes, image_format: str, limits: UploadLimits) -> DecodedUpload:
    name = image_format.upper()
    try:
        image = Image.open(io.BytesIO(data), formats=[name])  # reads the header only
    except Image.DecompressionBombError as exc:
        raise UploadError("image_too_large", f"PIL's decompression-bomb guard refused it ({exc})") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UploadError("corrupt_image", f"the {name} header cannot be read ({exc})") from exc
    with image:
        _check_sides(*image.size, limits)
        try:
            image.load()  # the full decode: a truncated file fails here
        except Image.DecompressionBombError as exc:
            raise UploadError("image_too_large", f"PIL's decompression-bomb guard refused it ({exc})") from exc
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise UploadError("corrupt_image", f"the {name} cannot be decoded ({exc})") from exc
        pixels = pil_to_uint8(image)
        mode = image.mode
    return DecodedUpload(pixels, image_format, None if mode == "L" else mode, None)


def _decode_dicom(data: bytes, limits: UploadLimits, salt: str | None) -> DecodedUpload:
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as exc:  # pydicom raises many types on a corrupt file; their text may quote header values
        raise UploadError("corrupt_dicom", f"not a readable DICOM file ({type(exc).__name__})") from exc
    if not any(element in ds for element in _PIXEL_ELEMENTS):
        raise UploadError("dicom_without_pixels", "the DICOM file holds no pixel data (a report or a header only?)")
    try:
        width, height = int(ds.Columns), int(ds.Rows)
    except (AttributeError, TypeError, ValueError) as exc:
        raise UploadError("corrupt_dicom", "the DICOM header gives no Rows/Columns") from exc
    _check_sides(width, height, limits)
    try:
        pixels = dataset_pixels(ds, "the DICOM upload")
    except ImageDecodeError as exc:
        raise UploadError("corrupt_dicom", str(exc)) from exc
    if salt is None:
        return DecodedUpload(pixels, "dicom", DICOM_MODE, None)
    patient = str(ds.get("PatientID", "") or "").strip()
    study = str(ds.get("StudyInstanceUID", "") or "").strip()
    # pseudonym() of a PatientID is what deidentify() writes at ingest, so served and ingested images match.
    ids = Pseudonyms(patient=pseudonym(patient, salt) if patient else None, study=pseudonym(study, salt) if study else None)
    return DecodedUpload(pixels, "dicom", DICOM_MODE, ids)
