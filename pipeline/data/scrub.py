"""Lossless removal of PNG/JPEG metadata: before an exported image is staged (ingest) or a served one kept.

Hospital exports can write a patient's name, ID or study date into a PNG's text chunks or a
JPEG's EXIF/XMP/IPTC/comment segments. Re-encoding the pixels would drop them too, but it
changes JPEG pixels (and 16-bit PNGs need care); these filters instead copy the image data
byte for byte and leave out the containers metadata lives in, so the staged pixels are
exactly the exported ones. Pixels themselves (burned-in annotations) are not inspected.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8"
# Chunks that decide how pixels decode or display; text (tEXt, zTXt, iTXt), eXIf, tIME and
# private chunks are everything else, and are dropped.
PNG_KEPT_CHUNKS = frozenset(
    {b"IHDR", b"PLTE", b"IDAT", b"IEND", b"tRNS", b"gAMA", b"cHRM", b"sRGB", b"iCCP", b"sBIT", b"pHYs", b"bKGD"}
)
# JPEG segments dropped: APP1 (EXIF, XMP), APP3–APP13 (IPTC, vendor data), APP15, COM. Kept:
# APP0 (JFIF), APP2 (ICC profile) and APP14 (Adobe: how the decoder converts colours).
JPEG_DROPPED_MARKERS = frozenset({0xE1, *range(0xE3, 0xEE), 0xEF, 0xFE})
_SOS, _EOI = 0xDA, 0xD9
_NO_LENGTH = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM and RSTn stand alone


class ImageFormatError(ValueError):
    """The file is not a well-formed PNG or JPEG, so its metadata cannot be removed safely."""


def scrub_image(source: Path, destination: Path) -> Counter[str]:
    """Write ``source`` without its metadata to ``destination``; returns what was removed, by kind.

    The format is read from the file's signature, not its name. Raises ImageFormatError (and
    writes nothing) when the file is neither a PNG nor a JPEG or is truncated.
    """
    data = Path(source).read_bytes()
    if data.startswith(PNG_SIGNATURE):
        cleaned, removed = scrub_png(data)
    elif data.startswith(JPEG_SOI):
        cleaned, removed = scrub_jpeg(data)
    else:
        raise ImageFormatError("neither a PNG nor a JPEG file (by its first bytes)")
    Path(destination).write_bytes(cleaned)
    return removed


def scrub_png(data: bytes) -> tuple[bytes, Counter[str]]:
    """PNG chunks outside :data:`PNG_KEPT_CHUNKS`, and any bytes after IEND, left out."""
    kept, removed = [PNG_SIGNATURE], Counter()
    position = len(PNG_SIGNATURE)
    while True:
        if position + 8 > len(data):
            raise ImageFormatError("truncated PNG: no IEND chunk")
        length = int.from_bytes(data[position : position + 4], "big")
        kind = data[position + 4 : position + 8]
        end = position + 12 + length  # length, type, data, CRC
        if end > len(data):
            raise ImageFormatError(f"truncated PNG: chunk {kind!r} runs past the end of the file")
        if kind in PNG_KEPT_CHUNKS:
            kept.append(data[position:end])
        else:
            removed[kind.decode("latin-1")] += 1
        position = end
        if kind == b"IEND":
            break
    if position < len(data):
        removed["bytes after IEND"] += 1
    return b"".join(kept), removed


def scrub_jpeg(data: bytes) -> tuple[bytes, Counter[str]]:
    """JPEG segments in :data:`JPEG_DROPPED_MARKERS`, and any bytes after EOI, left out.

    Segments are walked from SOI to EOI; each scan's entropy-coded data is copied up to the
    next marker (progressive files have several scans with tables between them).
    """
    kept, removed = [JPEG_SOI], Counter()
    position = len(JPEG_SOI)
    while True:
        start = position
        if position >= len(data) or data[position] != 0xFF:
            raise ImageFormatError(f"not a JPEG marker at byte {position} (truncated or corrupt file)")
        while position < len(data) and data[position] == 0xFF:  # fill bytes may pad a marker
            position += 1
        if position >= len(data):
            raise ImageFormatError("truncated JPEG: no EOI marker")
        marker = data[position]
        position += 1
        if marker == _EOI:
            kept.append(data[start:position])
            break
        if marker not in _NO_LENGTH:
            if position + 2 > len(data):
                raise ImageFormatError("truncated JPEG segment header")
            position += int.from_bytes(data[position : position + 2], "big")
            if position > len(data):
                raise ImageFormatError(f"truncated JPEG: segment 0xFF{marker:02X} runs past the end of the file")
        if marker == _SOS:
            position = _end_of_scan(data, position)
        if marker in JPEG_DROPPED_MARKERS:
            removed["COM" if marker == 0xFE else f"APP{marker - 0xE0}"] += 1
        else:
            kept.append(data[start:position])
    if position < len(data):
        removed["bytes after EOI"] += 1
    return b"".join(kept), removed


def _end_of_scan(data: bytes, position: int) -> int:
    """Index of the first marker after a scan's entropy-coded data (0xFF00 and RSTn belong to the data)."""
    while True:
        position = data.find(b"\xff", position)
        if position < 0 or position + 1 >= len(data):
            raise ImageFormatError("truncated JPEG: scan data without an end marker")
        following = data[position + 1]
        if following == 0x00 or 0xD0 <= following <= 0xD7:
            position += 2
        else:
            return position
