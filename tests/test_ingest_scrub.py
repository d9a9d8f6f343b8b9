"""PNG/JPEG metadata removal at ingest (pipeline.data.scrub): PHI out, pixels byte for byte.

Small synthetic images: the edge cases (16-bit PNG, progressive JPEG, truncation) are about
file structure, not content; the ingest tests run the same filter on real NIH images.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from pipeline.data.scrub import ImageFormatError, scrub_image

PHI = b"Doe^Jane MRN-123456"


def _pixels(path_or_bytes) -> np.ndarray:
    source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    with Image.open(source) as image:
        return np.asarray(image)


def _radiograph(dtype=np.uint8) -> np.ndarray:
    rng = np.random.default_rng(0)
    top = 255 if dtype == np.uint8 else 4095
    return (np.linspace(0, top, 48 * 40).reshape(48, 40) + rng.integers(0, 9, (48, 40))).clip(0, top).astype(dtype)


def _exif() -> Image.Exif:
    exif = Image.Exif()
    exif[0x010E] = PHI.decode()  # ImageDescription
    exif[0x013B] = "Dr House"  # Artist
    return exif


@pytest.mark.parametrize("bits", [8, 16])
def test_png_text_and_exif_chunks_are_removed_and_pixels_kept(tmp_path: Path, bits: int):
    info = PngImagePlugin.PngInfo()
    info.add_text("PatientName", PHI.decode())
    info.add_text("Comment", PHI.decode(), zip=True)
    info.add_itxt("Description", PHI.decode())
    exported = tmp_path / "export.png"
    image = Image.fromarray(_radiograph(np.uint8 if bits == 8 else np.uint16))
    image.save(exported, pnginfo=info, exif=_exif(), dpi=(150, 150))
    exported.write_bytes(exported.read_bytes() + b"trailing " + PHI)
    assert PHI in exported.read_bytes()

    removed = scrub_image(exported, tmp_path / "staged.png")

    staged = (tmp_path / "staged.png").read_bytes()
    assert PHI not in staged and b"Dr House" not in staged
    assert removed == {"tEXt": 1, "zTXt": 1, "iTXt": 1, "eXIf": 1, "bytes after IEND": 1}
    np.testing.assert_array_equal(_pixels(tmp_path / "staged.png"), _pixels(exported))
    assert _pixels(tmp_path / "staged.png").dtype == _pixels(exported).dtype
    with Image.open(tmp_path / "staged.png") as clean:
        assert clean.info["dpi"] == pytest.approx((150, 150), abs=0.1)  # display chunks stay


@pytest.mark.parametrize("progressive", [False, True])
def test_jpeg_exif_comment_and_vendor_segments_are_removed_and_pixels_kept(tmp_path: Path, progressive: bool):
    exported = tmp_path / "export.jpg"
    Image.fromarray(_radiograph()).save(exported, exif=_exif(), comment=PHI, progressive=progressive, quality=90)
    data = exported.read_bytes()
    vendor = b"\xff\xed" + (len(PHI) + 2).to_bytes(2, "big") + PHI  # an APP13 (IPTC) segment after SOI
    exported.write_bytes(data[:2] + vendor + data[2:])
    assert exported.read_bytes().count(PHI) == 3

    removed = scrub_image(exported, tmp_path / "staged.jpg")

    staged = (tmp_path / "staged.jpg").read_bytes()
    assert PHI not in staged and b"Dr House" not in staged
    assert removed == {"APP1": 1, "APP13": 1, "COM": 1}
    np.testing.assert_array_equal(_pixels(tmp_path / "staged.jpg"), _pixels(exported))
    if progressive:  # several scans with tables between them, all kept
        assert staged.count(b"\xff\xda") == data.count(b"\xff\xda") > 1


def test_an_image_without_metadata_is_copied_unchanged(tmp_path: Path):
    exported = tmp_path / "export.png"
    Image.fromarray(_radiograph()).save(exported)
    assert scrub_image(exported, tmp_path / "staged.png") == {}
    assert (tmp_path / "staged.png").read_bytes() == exported.read_bytes()


@pytest.mark.parametrize(
    "content, message",
    [
        ("png", "truncated PNG"),
        ("jpeg", "truncated JPEG"),
        ("text", "neither a PNG nor a JPEG"),
    ],
)
def test_truncated_or_foreign_files_are_refused_and_nothing_is_written(tmp_path: Path, content: str, message: str):
    exported = tmp_path / "export.png"
    if content == "text":
        exported.write_bytes(b"Name,MRN\n" + PHI)
    else:
        Image.fromarray(_radiograph()).save(exported, format=content.upper())
        exported.write_bytes(exported.read_bytes()[:300])
    with pytest.raises(ImageFormatError, match=message):
        scrub_image(exported, tmp_path / "staged.png")
    assert not (tmp_path / "staged.png").exists()
