"""Served PNG/JPEG uploads are kept without their metadata, losslessly: real exports decode to the same pixels,
and every chunk or segment that could carry a name, an id or a date is gone."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from pipeline.data.images import decode_image
from pipeline.serving.image_store import ImageStore, ImageStoreError
from pipeline.serving.ledger import new_inference_id
from pipeline.serving.raster_metadata import MetadataError, metadata_found, without_metadata

NAME = "DOE^JANE MRN-7731942"
XMP = b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta><dc:creator>" + NAME.encode() + b"</dc:creator></x:xmpmeta>"


def _real_files(data_dir: Path) -> list[Path]:
    kermany = sorted((data_dir / "kermany-pediatric" / "test").rglob("*.jpeg"))[::20]
    nih = sorted((data_dir / "nih-cxr8" / "images").glob("*.png"))[::20]
    return kermany + nih


def _segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload


def test_real_exports_decode_to_the_same_pixels_after_stripping(data_dir: Path, tmp_path: Path) -> None:
    files = _real_files(data_dir)
    assert len(files) > 40
    for path in files:
        data = path.read_bytes()
        image_format = "png" if path.suffix == ".png" else "jpeg"
        stripped = without_metadata(data, image_format)
        kept = tmp_path / f"kept{path.suffix}"
        kept.write_bytes(stripped)
        assert np.array_equal(decode_image(kept), decode_image(path)), path.name
        assert metadata_found(stripped) is None and without_metadata(stripped, image_format) == stripped


def test_png_text_exif_time_and_trailing_bytes_are_dropped_transparency_kept() -> None:
    pixels = np.arange(40 * 50, dtype=np.uint8).reshape(40, 50) % 7
    image = Image.fromarray(pixels, "L").convert("P")
    image.info["transparency"] = 3  # a tRNS chunk: RGBA conversion depends on it
    info = PngImagePlugin.PngInfo()
    info.add_text("Author", NAME)
    info.add_text("Comment", NAME, zip=True)
    info.add_itxt("Description", NAME)
    info.add(b"tIME", b"\x07\xea\x0c\x01\x0c\x00\x00")
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x010E] = NAME
    image.save(buffer, "PNG", pnginfo=info, exif=exif, transparency=3)
    data = buffer.getvalue() + NAME.encode()  # bytes after IEND
    assert metadata_found(data) == "tEXt"

    stripped = without_metadata(data, "png")
    assert b"DOE" not in stripped and b"tIME" not in stripped and b"eXIf" not in stripped
    assert b"tRNS" in stripped
    with Image.open(io.BytesIO(data)) as before, Image.open(io.BytesIO(stripped)) as after:
        assert np.array_equal(np.asarray(before.convert("RGBA")), np.asarray(after.convert("RGBA")))
        assert "Author" not in after.info and "transparency" in after.info
    assert metadata_found(stripped) is None


@pytest.mark.parametrize("progressive", [False, True])
def test_jpeg_exif_xmp_icc_and_comments_are_dropped(progressive: bool) -> None:
    pixels = (np.indices((64, 48)).sum(axis=0) * 3 % 256).astype(np.uint8)
    image = Image.fromarray(np.stack([pixels, pixels[::-1], 255 - pixels], axis=-1))
    exif = image.getexif()
    exif[0x013B] = NAME  # Artist
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif, comment=NAME.encode(), progressive=progressive, icc_profile=b"\0" * 300)
    data = buffer.getvalue()
    data = data[:2] + _segment(0xE1, XMP) + _segment(0xED, b"Photoshop 3.0\x00" + NAME.encode()) + data[2:]
    assert metadata_found(data) == "APP1"

    stripped = without_metadata(data, "jpeg")
    assert b"DOE" not in stripped and b"ICC_PROFILE" not in stripped and b"Exif" not in stripped
    with Image.open(io.BytesIO(data)) as before, Image.open(io.BytesIO(stripped)) as after:
        assert np.array_equal(np.asarray(before), np.asarray(after)) and after.mode == before.mode
        assert "exif" not in after.info and "icc_profile" not in after.info and "comment" not in after.info
    assert metadata_found(stripped) is None


@pytest.mark.parametrize(
    ("data", "image_format", "rule"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR", "png", "truncated"),
        (b"not an image at all", "png", "not a PNG"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "jpeg", "runs past the end"),
        (b"\xff\xd8" + _segment(0xDA, b"\x01\x01\x00\x00\x3f\x00") + b"\x12\x34", "jpeg", "no EOI"),
        (b"GIF89a", "jpeg", "not a JPEG"),
    ],
)
def test_a_malformed_file_is_an_error_not_a_partial_copy(data: bytes, image_format: str, rule: str) -> None:
    with pytest.raises(MetadataError, match=rule):
        without_metadata(data, image_format)


def test_the_image_store_refuses_a_jpeg_with_metadata_and_keeps_a_clean_one(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images", retention_days=1)
    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 32), 90, np.uint8)).save(buffer, "JPEG", comment=NAME.encode())
    with pytest.raises(ImageStoreError, match="COM"):
        store.put(new_inference_id(), buffer.getvalue())
    inference_id = new_inference_id()
    kept = store.put(inference_id, without_metadata(buffer.getvalue(), "jpeg"))
    assert kept is not None and kept.suffix == ".jpg" and store.get(inference_id) == kept
