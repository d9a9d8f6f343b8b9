"""Served PNG/JPEG uploads are kept as their own bytes minus metadata (the filter ingest applies,
pipeline.data.scrub): real exports decode to the same pixels, and the store refuses an image that still has any."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.images import decode_image
from pipeline.data.scrub import scrub_jpeg, scrub_png
from pipeline.serving.image_store import ImageStore, ImageStoreError
from pipeline.serving.ledger import new_inference_id

NAME = "DOE^JANE MRN-7731942"


def test_real_exports_are_kept_pixel_for_pixel(data_dir: Path, tmp_path: Path) -> None:
    files = sorted((data_dir / "kermany-pediatric" / "test").rglob("*.jpeg"))[::20]
    files += sorted((data_dir / "nih-cxr8" / "images").glob("*.png"))[::20]
    assert len(files) > 40
    for path in files:
        scrub = scrub_png if path.suffix == ".png" else scrub_jpeg
        kept_bytes, _ = scrub(path.read_bytes())
        kept = tmp_path / f"kept{path.suffix}"
        kept.write_bytes(kept_bytes)
        assert np.array_equal(decode_image(kept), decode_image(path)), path.name
        assert scrub(kept_bytes) == (kept_bytes, {})  # nothing left to remove


def test_the_image_store_refuses_a_jpeg_with_metadata_and_keeps_a_clean_one(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images", retention_days=1)
    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 32), 90, np.uint8)).save(buffer, "JPEG", comment=NAME.encode())
    with pytest.raises(ImageStoreError, match="COM"):
        store.put(new_inference_id(), buffer.getvalue())
    inference_id = new_inference_id()
    kept = store.put(inference_id, scrub_jpeg(buffer.getvalue())[0])
    assert kept is not None and kept.suffix == ".jpg" and store.get(inference_id) == kept
    assert NAME.encode() not in kept.read_bytes()
