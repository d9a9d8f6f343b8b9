"""Per-image facts (does it decode, its size, intensity and content hash) that the rules check.

Decoding is the slow part of validation, so it is done once here, in parallel, and the rules
then run on this small table.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd

from pipeline.data.images import decode_image_and_mode
from pipeline.errors import DatasetError

FACT_COLUMNS: tuple[str, ...] = (
    "image_id",
    "site",
    "split",
    "path",
    "decodes",
    "decode_error",
    "channels",
    "width",
    "height",
    "min_intensity",
    "max_intensity",
    "mean_intensity",
    "std_intensity",
    "content_hash",
    "stored_mode",  # how the file stored its pixels (decode_image_and_mode): conversions are reported
)
# Bumped when the columns change, so facts cached in an older format are not reused.
FACTS_FORMAT = 2
# Below this many images a thread pool costs more than it saves.
_PARALLEL_FROM = 64


def _image_facts(path: str, frame: Any, array_key: Any) -> dict[str, Any]:
    frame = None if pd.isna(frame) else int(frame)
    try:
        pixels, stored_mode = decode_image_and_mode(path, frame, array_key if isinstance(array_key, str) else None)
    except DatasetError as exc:  # ImageDecodeError, or a DICOM the reader cannot handle
        return {"decodes": False, "decode_error": str(exc)}
    pixels = np.ascontiguousarray(pixels)
    # Shape is hashed with the bytes so a 10x20 and a 20x10 image of equal bytes differ; the hash
    # is of pixels, not file bytes, so one image saved twice (other name, format) is still caught.
    digest = hashlib.sha256(f"{pixels.shape}{pixels.dtype}".encode())
    digest.update(pixels.data)
    return {
        "decodes": True,
        "decode_error": None,
        "channels": 1 if pixels.ndim == 2 else pixels.shape[2],
        "width": pixels.shape[1],
        "height": pixels.shape[0],
        "min_intensity": float(pixels.min()),
        "max_intensity": float(pixels.max()),
        "mean_intensity": float(pixels.mean()),
        "std_intensity": float(pixels.std()),
        "content_hash": digest.hexdigest(),
        "stored_mode": stored_mode,
    }


def compute_image_facts(manifest: pd.DataFrame, workers: int | None = None) -> pd.DataFrame:
    """One row of facts per manifest row, with the manifest's index (so the two join row by row).

    Threads suffice: PIL decoding, numpy reductions and hashlib release the GIL, and threads share
    decode_image's cache of .npz archives (a process pool would load each archive once per worker).
    """
    frames = manifest["frame"] if "frame" in manifest else pd.Series(None, index=manifest.index)
    keys = manifest["array_key"] if "array_key" in manifest else pd.Series(None, index=manifest.index)
    jobs = list(zip(manifest["path"], frames, keys, strict=True))
    if len(jobs) < _PARALLEL_FROM:
        rows = [_image_facts(*job) for job in jobs]
    else:
        with ThreadPoolExecutor(workers or os.cpu_count()) as pool:
            rows = list(pool.map(lambda job: _image_facts(*job), jobs))
    facts = pd.DataFrame(rows, index=manifest.index, columns=list(FACT_COLUMNS[4:]))
    for column in ("image_id", "site", "split", "path"):
        facts[column] = manifest[column] if column in manifest else None
    facts["decodes"] = facts["decodes"].astype(bool)
    for column in ("channels", "width", "height"):
        facts[column] = pd.array(facts[column], dtype="Int64")
    return facts[list(FACT_COLUMNS)]
