"""params.yaml + --set overrides, with clear errors for bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import PipelineConfig, load_config
from pipeline.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_params_yaml_loads_and_overrides_apply():
    cfg = load_config(REPO / "params.yaml", ["train.epochs=2", "data.external=[]", "crosssim.enabled=false", "augment.scale=[0.9, 1.1]"])
    assert cfg.train.epochs == 2 and cfg.data.external == [] and cfg.augment.scale == (0.9, 1.1)
    assert cfg.train.output_dir == REPO / "outputs" / "train"  # anchored at the config's folder


def _disagreements(written: object, default: object, key: str = "") -> list[str]:
    if isinstance(written, dict) and isinstance(default, dict):
        return [
            problem
            for name in sorted(set(written) | set(default))
            for problem in (
                [f"{key}{name}: in params.yaml only"] if name not in default
                else [f"{key}{name}: missing from params.yaml"] if name not in written
                else _disagreements(written[name], default[name], f"{key}{name}.")
            )
        ]  # fmt: skip
    return [] if written == default else [f"{key[:-1]}: params.yaml {written!r}, pipeline/config.py {default!r}"]


def test_params_yaml_writes_every_default_of_the_config_model_and_no_other_value():
    """params.yaml is the configuration users read and edit; the model's defaults are what a missing file or key
    gives. One value, written twice, so this test is the single source of truth check: they must never disagree."""
    written = yaml.safe_load((REPO / "params.yaml").read_text())
    assert _disagreements(written, PipelineConfig().model_dump(mode="json")) == []
    assert _disagreements({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3, "d": 0}}) == [
        "a.c: params.yaml 2, pipeline/config.py 3", "a.d: missing from params.yaml"
    ]  # the check itself finds a disagreement


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


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("garbage", "'garbage' is not a torch device"),
        ("tpu", "'tpu' is not a torch device"),
        ("cuda:x", "'cuda:x' is not a torch device"),
        ("cuda:99", "'cuda:99': this machine has"),  # no cuda device, or fewer than 100
    ],
)
def test_a_device_this_machine_lacks_is_refused_when_the_config_is_read(device, message):
    with pytest.raises(ConfigError, match=f"train.device: {message}"):
        load_config(REPO / "params.yaml", [f"train.device={device}"])


def test_auto_and_cpu_devices_are_read_without_importing_torch():
    """Commands that never train (registry, validate, prepare) read the config: torch takes ~10 s to import."""
    probe = (
        "import sys; from pathlib import Path; from pipeline.config import PipelineConfig, load_config; "
        "[load_config(Path('params.yaml'), [f'train.device={d}']) for d in ('auto', 'cpu')]; "
        "print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
