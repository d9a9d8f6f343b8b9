"""Decode, grayscale, resize and store a manifest's images as one uint8 memory-mapped array.

The cache entry is keyed by a hash of the file contents, the manifest rows and the
preprocessing (image size, intensity harmonisation), so an unchanged rerun opens the existing array and costs nothing. An
entry is built in a temporary folder and renamed into place: a crash never leaves a
half-written entry that a later run would trust, and concurrent runs share entries safely.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.data.images import decode_image
from pipeline.data.manifest import load_manifest, save_manifest
from pipeline.data.preprocessing import Preprocessing
from pipeline.errors import DatasetError

PREPARE_FORMAT = "v1"  # bump when the pixel pipeline changes, so old cache entries are not reused


@dataclass(frozen=True)
class PreparedDataset:
    """Images (N, S, S) uint8 aligned row-for-row with ``manifest``."""

    key: str
    directory: Path
    images: np.ndarray
    manifest: pd.DataFrame
    preprocessing: Preprocessing

    def subset(self, mask: pd.Series | np.ndarray) -> tuple[np.ndarray, pd.DataFrame]:
        mask = np.asarray(mask, dtype=bool)
        return self.images[mask], self.manifest[mask].reset_index(drop=True)

    def images_of(self, rows: pd.DataFrame) -> np.ndarray:
        """The images of ``rows`` (matched by image_id), in their order."""
        positions = pd.Index(self.manifest["image_id"]).get_indexer(rows["image_id"])
        return np.asarray(self.images[positions])


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def content_key(manifest: pd.DataFrame, preprocessing: Preprocessing | None) -> str:
    """Hash of what determines the prepared array: file bytes, row order/labels/splits, preprocessing.

    ``preprocessing`` None: the files and rows alone (what facts computed from the raw files depend on).
    """
    digest = hashlib.sha256(f"{PREPARE_FORMAT}:{_pixels_tag(preprocessing)}".encode())
    digests = {path: file_sha256(path) for path in sorted(set(manifest["path"]))}
    columns = ["image_id", "path", "frame", "array_key", "label", "patient_id", "site", "split"]
    for row in manifest[columns].itertuples(index=False):
        digest.update("|".join(map(str, row)).encode())
        digest.update(digests[row.path].encode())
    return digest.hexdigest()[:20]


def _pixels_tag(preprocessing: Preprocessing | None) -> str:
    if preprocessing is None:
        return "0"
    # without harmonisation the tag is the size alone, as before harmonisation existed: cached entries stay valid
    if preprocessing.harmonisation == "none":
        return str(preprocessing.image_size)
    return f"{preprocessing.image_size}:{preprocessing.harmonisation}"


def _decode_row(args: tuple[str, object, object, Preprocessing]) -> np.ndarray:
    path, frame, array_key, preprocessing = args
    frame = None if pd.isna(frame) else int(frame)
    return preprocessing.image(decode_image(path, frame, array_key))


def prepare_dataset(
    manifest: pd.DataFrame, preprocessing: Preprocessing, cache_dir: Path, workers: int | None = None
) -> PreparedDataset:
    """Return the prepared dataset for ``manifest``, building it only if not cached."""
    key = content_key(manifest, preprocessing)
    image_size = preprocessing.image_size
    entry = Path(cache_dir) / key
    if (entry / "meta.json").is_file():
        return open_prepared(entry)
    with staged_entry(entry, "meta.json") as staging:
        images = np.lib.format.open_memmap(
            staging / "images.npy", mode="w+", dtype=np.uint8, shape=(len(manifest), image_size, image_size)
        )
        jobs = [(r.path, r.frame, r.array_key, preprocessing) for r in manifest.itertuples(index=False)]
        workers = workers or min(4, os.cpu_count() or 1)
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for index, pixels in enumerate(pool.map(_decode_row, jobs, chunksize=64)):
                images[index] = pixels
        images.flush()
        del images
        save_manifest(manifest, staging / "manifest.csv")
        meta = {
            "key": key,
            "image_size": image_size,
            "harmonisation": preprocessing.harmonisation,
            "count": len(manifest),
            "format": PREPARE_FORMAT,
        }
        (staging / "meta.json").write_text(json.dumps(meta, indent=2))
    return open_prepared(entry)


@contextmanager
def staged_entry(entry: Path, last_file: str) -> Iterator[Path]:
    """A temporary folder beside the content-keyed cache ``entry``, renamed into place once the block has written
    ``last_file`` into it: the entry appears complete or not at all, and a failed block leaves nothing. Two runs
    building the same entry at once both build it; the second's rename fails on the first's entry, which is kept.
    """
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
    try:
        yield staging
        _move_into_place(staging, entry, last_file)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _move_into_place(staging: Path, entry: Path, last_file: str = "meta.json") -> None:
    """Rename the finished ``staging`` to ``entry``; a complete ``entry`` already there (same key, same content) is kept."""
    try:
        os.replace(staging, entry)
    except OSError:
        if not (entry / last_file).is_file():
            raise
        shutil.rmtree(staging, ignore_errors=True)


def open_prepared(entry: Path) -> PreparedDataset:
    if not (entry / "meta.json").is_file():
        raise DatasetError(f"no prepared images at {entry}; run `crosssim prepare` first")
    meta = json.loads((entry / "meta.json").read_text())
    images = np.load(entry / "images.npy", mmap_mode="r")
    # entries from before harmonisation existed carry no "harmonisation": they had none
    preprocessing = Preprocessing(int(meta["image_size"]), meta.get("harmonisation", "none"))
    return PreparedDataset(meta["key"], entry, images, load_manifest(entry / "manifest.csv"), preprocessing)
