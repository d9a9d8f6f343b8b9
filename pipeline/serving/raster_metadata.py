"""PNG and JPEG files without their metadata: only what a decoder needs for the pixels survives.

A served PNG/JPEG is kept as its own encoded bytes with every ancillary chunk/segment removed (a whitelist, so
that a chunk type nobody anticipated is dropped too). This is lossless — the kept file decodes to exactly the
pixels that were scored — costs no re-encoding on the request path, and leaves no text, EXIF, XMP, ICC profile,
IPTC or timestamp that could name the patient, nor anything after the image's end marker.

- PNG: chunks IHDR, PLTE, tRNS (transparency changes how RGBA/palette images are converted), IDAT, IEND.
- JPEG: SOI, frame/table/scan segments and their entropy-coded data, EOI; of the application segments only
  APP0 (JFIF: pixel density) and APP14 (Adobe: the colour transform a decoder must apply). Dropped: APP1–APP13
  and APP15 (EXIF, XMP, ICC, IPTC, vendor data) and COM (free text).

A file whose structure cannot be walked is a ``MetadataError``; the caller then re-encodes the pixels instead.
"""

from __future__ import annotations

import re
import struct

from pipeline.errors import PipelineError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_KEPT_CHUNKS = frozenset({b"IHDR", b"PLTE", b"tRNS", b"IDAT", b"IEND"})

_SOI, _EOI, _SOS = 0xD8, 0xD9, 0xDA
_APP0, _APP14, _APP15, _COM = 0xE0, 0xEE, 0xEF, 0xFE
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RST0–7: no length field
# Inside entropy-coded data a marker is 0xFF (after optional 0xFF fill) followed by anything but 0x00 (a stuffed
# 0xFF byte) or RST0–7 (restart markers, part of the scan).
_NEXT_MARKER = re.compile(rb"\xff+[^\x00\xd0-\xd7\xff]")


class MetadataError(PipelineError):
    """The file's chunk or segment structure is malformed; nothing was produced."""


def without_metadata(data: bytes, image_format: str) -> bytes:
    """``data`` (a PNG or a JPEG, ``image_format`` "png" | "jpeg") with only its pixel-bearing parts."""
    head = PNG_SIGNATURE if image_format == "png" else b""
    return head + b"".join(raw for name, raw in _parts(data, image_format) if name in _KEPT[image_format])


def metadata_found(data: bytes) -> str | None:
    """What ``without_metadata`` would drop from a PNG or JPEG: the first metadata chunk/segment's name (e.g.
    ``"tEXt"``, ``"APP1"``, ``"COM"``), or bytes after the image's end; None for a clean file."""
    image_format = "png" if data.startswith(PNG_SIGNATURE) else "jpeg"
    parts = _parts(data, image_format)
    dropped = [name for name, _ in parts if name not in _KEPT[image_format]]
    if dropped:
        return dropped[0]
    walked = sum(len(raw) for _, raw in parts) + (len(PNG_SIGNATURE) if image_format == "png" else 0)
    return None if walked == len(data) else "bytes after the image's end"


_KEPT = {
    "png": frozenset(kind.decode("latin-1") for kind in PNG_KEPT_CHUNKS),
    "jpeg": frozenset({"SOI", "EOI", "SOS", "SEG", "APP0", "APP14"}),
}


def _parts(data: bytes, image_format: str) -> list[tuple[str, bytes]]:
    if image_format == "png":
        return _png_chunks(data)
    if image_format == "jpeg":
        return _jpeg_parts(data)
    raise ValueError(f"image_format {image_format!r}: expected 'png' or 'jpeg'")


def _png_chunks(data: bytes) -> list[tuple[str, bytes]]:
    """(type, the chunk's bytes: length, type, data, CRC) up to and including IEND."""
    if not data.startswith(PNG_SIGNATURE):
        raise MetadataError("not a PNG (no PNG signature)")
    chunks, offset = [], len(PNG_SIGNATURE)
    while offset + 12 <= len(data):
        length, kind = struct.unpack(">I4s", data[offset : offset + 8])
        end = offset + 12 + length
        if end > len(data):
            break
        chunks.append((kind.decode("latin-1"), data[offset:end]))
        if kind == b"IEND":
            return chunks
        offset = end
    raise MetadataError("the PNG is truncated (a chunk runs past the end, or no IEND chunk)")


def _jpeg_parts(data: bytes) -> list[tuple[str, bytes]]:
    """(name, bytes) of each marker segment, with a scan's entropy-coded data in its SOS part, up to EOI.

    Names: SOI, EOI, SOS, APPn, COM, and SEG for every other (frame, table, restart-interval...) segment."""
    if not data.startswith(b"\xff\xd8"):
        raise MetadataError("not a JPEG (no SOI marker)")
    parts: list[tuple[str, bytes]] = [("SOI", data[:2])]
    offset = 2
    while True:
        while offset < len(data) and data[offset] == 0xFF and offset + 1 < len(data) and data[offset + 1] == 0xFF:
            offset += 1  # fill bytes before a marker
        if offset + 2 > len(data) or data[offset] != 0xFF:
            raise MetadataError(f"the JPEG has no marker where one must be (byte {offset}); truncated or malformed")
        marker = data[offset + 1]
        if marker == _EOI:
            parts.append(("EOI", data[offset : offset + 2]))
            return parts
        if marker in _STANDALONE:
            parts.append(("SEG", data[offset : offset + 2]))
            offset += 2
            continue
        if offset + 4 > len(data):
            raise MetadataError("the JPEG is truncated inside a segment header")
        (length,) = struct.unpack(">H", data[offset + 2 : offset + 4])
        end = offset + 2 + length
        if length < 2 or end > len(data):
            raise MetadataError(f"the JPEG's segment at byte {offset} runs past the end of the file")
        if marker == _SOS:
            found = _NEXT_MARKER.search(data, end)
            if found is None:
                raise MetadataError("the JPEG's scan data has no end (no EOI marker)")
            parts.append(("SOS", data[offset : found.start()]))
            offset = found.end() - 2  # the marker: 0xFF and its code (fill bytes skipped)
            continue
        parts.append((_segment_name(marker), data[offset:end]))
        offset = end


def _segment_name(marker: int) -> str:
    if _APP0 <= marker <= _APP15:
        return f"APP{marker - _APP0}"
    return "COM" if marker == _COM else "SEG"
