"""params.yaml + --set overrides, with clear errors for bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_params_yaml_loads_and_overrides_apply():
    cfg = load_config(REPO / "params.yaml", ["train.epochs=2", "data.external=[]", "crosssim.enabled=false", "augment.scale=[0.9, 1.1]"])
    assert cfg.train.epochs == 2 and cfg.data.external == [] and cfg.augment.scale == (0.9, 1.1)
    assert cfg.train.output_dir == REPO / "outputs" / "train"  # anchored at the config's folder


def test_data_root_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CROSSSIM_DATA_DIR", str(tmp_path))
    assert load_config(None).data.root == tmp_path


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epochs=0", "train.epochs"),
        ("train.backbone=vgg", "train.backbone"),
        ("train.unknown=1", "train.unknown"),
        ("noequals", "key=value"),
        ("data.external=[kermany-pediatric]", "must not repeat"),
        ("schedule.timezone=Mars/Olympus", "schedule.timezone"),
    ],
)
def test_bad_overrides_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "params.yaml", [override])
