"""prepare: decode → grayscale → resize into one memmap, content-keyed and all-or-nothing."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.images import ImageDecodeError
from pipeline.data.prepare import prepare_dataset
from pipeline.data.preprocessing import Preprocessing
from pipeline.data.readers import read_dataset


def test_prepare_real_images_and_cache_hit(kermany_subset, data_dir, tmp_path):
    manifest = read_dataset(kermany_subset)
    cache = tmp_path / "cache"
    first = prepare_dataset(manifest, Preprocessing(32), cache, workers=2)
    assert first.images.shape == (len(manifest), 32, 32) and first.images.dtype == np.uint8
    assert first.images.std() > 10  # real radiographs, not blanks
    assert (first.manifest["image_id"] == manifest["image_id"]).all()
    stamp = (first.directory / "images.npy").stat().st_mtime_ns
    second = prepare_dataset(manifest, Preprocessing(32), cache)
    assert second.key == first.key and (second.directory / "images.npy").stat().st_mtime_ns == stamp
    assert prepare_dataset(manifest, Preprocessing(48), cache).key != first.key


def test_changed_image_bytes_change_the_key(kermany_subset, tmp_path):
    manifest = read_dataset(kermany_subset)
    before = prepare_dataset(manifest, Preprocessing(32), tmp_path / "cache").key
    victim = manifest["path"].iloc[0]
    with open(victim, "ab") as handle:
        handle.write(b"\0")
    assert prepare_dataset(manifest, Preprocessing(32), tmp_path / "cache").key != before


def test_medmnist_frames_and_nih_pngs(data_dir, tmp_path):
    mnist = read_dataset(data_dir / "pneumoniamnist")
    mnist = mnist[mnist["split"] == "val"].head(16)
    prepared = prepare_dataset(mnist, Preprocessing(28), tmp_path / "cache")
    with np.load(data_dir / "pneumoniamnist" / "pneumoniamnist.npz") as archive:
        assert np.array_equal(prepared.images, archive["val_images"][:16])
    nih = read_dataset(data_dir / "nih-cxr8").head(8)
    assert prepare_dataset(nih, Preprocessing(64), tmp_path / "cache").images.shape == (8, 64, 64)


def test_corrupt_image_leaves_no_cache_entry(kermany_subset, tmp_path):
    manifest = read_dataset(kermany_subset)
    broken = manifest["path"].iloc[3]
    with open(broken, "r+b") as handle:
        handle.truncate(200)
    cache = tmp_path / "cache"
    with pytest.raises(ImageDecodeError, match=broken.split("/")[-1]):
        prepare_dataset(manifest, Preprocessing(32), cache)
    assert list(cache.iterdir()) == []
