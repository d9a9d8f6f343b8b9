"""Intensity harmonisation (pipeline.data.preprocessing): what it does to real films, and that training,
adaptation, evaluation and serving all feed a model the same harmonised pixels for the same image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.data.images import decode_image
from pipeline.data.prepare import content_key, open_prepared, prepare_dataset
from pipeline.data.preprocessing import Preprocessing, harmonise
from pipeline.data.readers import read_dataset
from pipeline.data.splits import subsample
from pipeline.retrain.data import crosssim_data
from pipeline.retrain.sites import load_site, prepare_site
from pipeline.serving.app import _decode
from pipeline.serving.bundle import ServingBundle, read_bundle, write_bundle
from pipeline.serving.image_store import ImageStore
from pipeline.serving.uploads import UploadLimits
from tests.conftest import REPO, copy_kermany_subset, copy_nih_subset


@pytest.fixture(scope="module")
def films(data_dir: Path) -> list[np.ndarray]:
    """Decoded real films of both hospitals: a pediatric JPEG and adult PNGs differ in exposure and processing."""
    kermany = subsample(read_dataset(data_dir / "kermany-pediatric"), 3, seed=0)
    nih = subsample(read_dataset(data_dir / "nih-cxr8"), 3, seed=0)
    return [decode_image(path) for path in [*kermany["path"], *nih["path"]]]


@pytest.mark.parametrize("method", ["histeq", "clahe"])
def test_harmonisation_spreads_every_film_over_the_full_range(films, method):
    plain, harmonised = Preprocessing(64), Preprocessing(64, method)
    for pixels in films:
        before, after = plain.image(pixels), harmonised.image(pixels)
        assert after.dtype == np.uint8 and after.shape == (64, 64)
        assert after.min() <= 5 and after.max() >= 250  # stretched, whatever the film's exposure
        # monotone where it is global: a darker pixel never ends brighter
        if method == "histeq":
            order = np.argsort(before, axis=None, kind="stable")
            assert np.all(np.diff(after.ravel()[order].astype(int)) >= 0)
    spreads = [float(harmonised.image(pixels).std()) for pixels in films]
    assert max(spreads) - min(spreads) < max(float(plain.image(p).std()) for p in films) - min(
        float(plain.image(p).std()) for p in films
    ) + 1e-9  # the films' contrast is closer after harmonisation than before


def test_a_constant_image_stays_as_it_is_and_none_changes_nothing(films):
    flat = np.full((40, 40), 90, dtype=np.uint8)
    assert np.array_equal(harmonise(flat, "histeq"), flat) and np.array_equal(harmonise(flat, "clahe"), flat)
    gray = Preprocessing(64).image(films[0])
    assert harmonise(gray, "none") is gray


def test_an_unknown_harmonisation_is_refused_by_the_config_and_the_value():
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="data.harmonisation"):
        load_config(REPO / "params.yaml", ["data.harmonisation=gamma"])
    with pytest.raises(ValueError, match="harmonisation 'gamma'"):
        Preprocessing(64, "gamma")  # type: ignore[arg-type]


def test_the_cache_key_changes_with_harmonisation_only_when_it_is_on(data_dir, tmp_path):
    manifest = subsample(read_dataset(data_dir / "pneumoniamnist"), 2, seed=0)
    keys = {method: content_key(manifest, Preprocessing(28, method)) for method in ("none", "histeq", "clahe")}
    assert len(set(keys.values())) == 3
    prepared = prepare_dataset(manifest, Preprocessing(28, "clahe"), tmp_path / "cache")
    assert prepared.key == keys["clahe"] and prepared.preprocessing == Preprocessing(28, "clahe")
    assert open_prepared(prepared.directory).preprocessing.harmonisation == "clahe"  # meta.json records it


@pytest.mark.slow  # prepares two real sites
def test_training_adaptation_evaluation_and_serving_feed_the_same_pixels_for_an_image(data_dir, tmp_path):
    """Every path's model input for an image equals what serving makes of that image's file under the served
    bundle's preprocessing; the same check under "none" tells them apart, so it can fail."""
    root = tmp_path / "data"
    copy_kermany_subset(data_dir, root / "kermany-pediatric", per_class=20)
    copy_nih_subset(data_dir, root / "nih-cxr8", per_class=10)
    overrides = [
        f"data.root={root}", "data.image_size=32", "data.harmonisation=clahe", f"data.cache_dir={tmp_path / 'cache'}",
        f"data.prepared_dir={tmp_path / 'prepared'}",
    ]  # fmt: skip
    cfg = load_config(REPO / "params.yaml", overrides)
    for site in (cfg.data.source, cfg.crosssim.target):
        prepare_site(cfg, site, load_site(cfg, site)[0])
    source = open_prepared(cfg.data.prepared_site(cfg.data.source))
    data = crosssim_data(cfg)
    train_images, train_rows = source.subset(source.manifest["split"] == "train")  # what train_model reads
    test_images, test_rows = data.target_test
    target_rows = open_prepared(cfg.data.prepared_site(cfg.crosssim.target)).manifest
    target_train_rows = target_rows[~target_rows["image_id"].isin(test_rows["image_id"])]
    paths = {
        "train": (train_images[0], train_rows["path"].iloc[0]),
        "adapt": (data.target_train.images[0], target_train_rows["path"].iloc[0]),
        "evaluate": (test_images[0], test_rows["path"].iloc[0]),
    }
    assert np.array_equal(data.source_train.images[0], train_images[0])  # adaptation's source images are training's

    bundle_dir = tmp_path / "bundle"
    bundle_dir.mkdir()
    write_bundle(bundle_dir, ServingBundle("resnet18", 32, 0.5, "val", {}, harmonisation=cfg.data.harmonisation))
    served = read_bundle(bundle_dir).preprocessing
    store = ImageStore(tmp_path / "served", retention_days=1)
    limits = UploadLimits(min_side=16, max_side=8192)
    for name, (pixels, file) in paths.items():
        _, inputs, _ = _decode(Path(file).read_bytes(), limits, None, served, store, None)  # crosssim serve's path
        assert inputs.shape == (1, 32, 32) and inputs.dtype == np.float32
        assert np.array_equal(np.round(inputs[0] * 255).astype(np.uint8), pixels), f"{name} differs from serving"
        _, unharmonised, _ = _decode(Path(file).read_bytes(), limits, None, Preprocessing(32), store, None)
        assert not np.array_equal(np.round(unharmonised[0] * 255).astype(np.uint8), pixels), name


def test_adaptation_refuses_a_source_model_trained_on_other_pixels(tmp_path):
    from pipeline.errors import DatasetError
    from pipeline.retrain.adaptation import trained_preprocessing

    cfg = load_config(REPO / "params.yaml", [f"train.output_dir={tmp_path}", "data.harmonisation=histeq"])
    (tmp_path / "train_summary.json").write_text('{"image_size": 64}')  # trained before harmonisation: none
    with pytest.raises(DatasetError, match="trained on 64×64 grayscale images, this configuration prepares "
                       "64×64 grayscale, histeq"):  # fmt: skip
        trained_preprocessing(cfg)
    (tmp_path / "train_summary.json").write_text('{"image_size": 64, "harmonisation": "histeq"}')
    assert trained_preprocessing(cfg) == Preprocessing(64, "histeq")


def test_a_champion_is_gated_on_its_own_preprocessing():
    from pipeline.retrain.promotion import registered_preprocessing

    ours = Preprocessing(64, "clahe")
    assert registered_preprocessing({"image_size": "96", "harmonisation": "histeq"}, ours) == Preprocessing(96, "histeq")
    assert registered_preprocessing({"image_size": "64"}, ours) == Preprocessing(64)  # registered before harmonisation
    assert registered_preprocessing({}, ours) == Preprocessing(64)


def test_the_batcher_re_preprocesses_an_upload_made_for_another_model(films):
    """An alias move between an upload's decoding and its batch: the new model gets its own preprocessing."""
    import asyncio
    from types import SimpleNamespace

    from pipeline.serving.batcher import _score, _Waiting

    made_for, scoring = Preprocessing(64), Preprocessing(64, "clahe")
    seen = []
    model = SimpleNamespace(preprocessing=scoring, predict=lambda inputs: seen.append(inputs) or np.zeros(len(inputs)))
    future = asyncio.new_event_loop().create_future()
    waiting = [_Waiting(pixels, made_for.model_input(pixels), made_for, None, future) for pixels in films[:2]]
    _score(model, waiting)
    expected = np.stack([scoring.model_input(pixels) for pixels in films[:2]])
    assert np.array_equal(seen[0], expected)
    marked = np.zeros((1, 64, 64), dtype=np.float32)  # not what scoring would compute: shows whether it was re-made
    _score(model, [_Waiting(films[0], marked, scoring, None, future)])
    assert np.array_equal(seen[1][0], marked)  # made for this model already: used as it is
