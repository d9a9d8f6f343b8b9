"""dvc.yaml reproduces a run with the crosssim CLI, and `dvc metrics show` shows it; each stage depends on exactly
the code it runs and the params.yaml keys it reads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, copy_kermany_subset, copy_nih_subset

pytestmark = pytest.mark.slow  # dvc repro of every stage: left out of make test-fast

BIN = Path(sys.executable).parent
PARAMS_PROBE = Path(__file__).parent / "params_probe"  # its sitecustomize records the config keys a stage reads


def _run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **env}
    done = subprocess.run(args, cwd=cwd, env=environ, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def _project_files_imported(stderr: str) -> set[str]:
    """The project's modules a process imported, from Python's -X importtime report (one line per import)."""
    modules = {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")}
    files = set()
    for module in modules:
        if module.split(".")[0] in ("pipeline", "flows"):
            path = REPO / Path(*module.split("."))
            files.add(str((path / "__init__.py" if path.is_dir() else path.with_suffix(".py")).relative_to(REPO)))
    return files


def _params_mismatch(read_file: Path, declared: list[str], params: dict) -> dict[str, list[str]]:
    """Keys the stage read that no declared key covers; declared sections the stage did not use whole (list their
    keys instead); declared keys params.yaml does not have. A declared leaf the stage did not read this time is
    fine: which keys a stage reads depends on the configuration (fine-tuning runs only with target labels)."""
    read = set().union(*(json.loads(line) for line in read_file.read_text().splitlines()))

    def covers(outer: str, inner: str) -> bool:
        return inner == outer or inner.startswith(f"{outer}.")

    def value(key: str):
        node = params
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return KeyError
            node = node[part]
        return node

    mismatch = {
        "read, not declared": sorted(key for key in read if not any(covers(d, key) for d in declared)),
        "section, not used whole": sorted(d for d in declared if isinstance(value(d), dict) and d not in read),
        "not in params.yaml": sorted(d for d in declared if value(d) is KeyError),
    }
    return {kind: keys for kind, keys in mismatch.items() if keys}


def test_dvc_repro_runs_the_stages_and_reports_metrics(data_dir, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    for name in ("dvc.yaml", "pipeline", "flows"):
        source = REPO / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, project / name)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(image_size=32, max_images_per_class=15)
    params["train"].update(epochs=1, batch_size=16, pretrained_weights="pretrain")  # train from the pretrain stage
    params["pretrain"].update(epochs=1, batch_size=16, hidden_dim=32, projection_dim=16)
    params["evaluate"].update(bootstrap_samples=50)
    params["validation"].update(min_images=20)
    # with target labels, so that adapt also fine-tunes (and reads the training keys that uses)
    params["crosssim"].update(steps=10, eval_every=5, batch_size=8, diagnostics_samples=20, labelled_fraction=0.5,
                              label_finetune_steps=4)  # fmt: skip
    params["crosssim"]["distill"].update(steps=5)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    copy_kermany_subset(data_dir, project / "data" / "raw" / "kermany-pediatric", per_class=30)
    copy_nih_subset(data_dir, project / "data" / "raw" / "nih-cxr8", per_class=15)
    _run(["git", "init", "-q"], project)
    _run(["dvc", "init", "-q"], project)
    shutil.copy(REPO / ".dvcignore", project / ".dvcignore")

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    undeclared, params_wrong = {}, {}
    for stage, spec in stages.items():  # one stage at a time, so that each one's imports and reads are its own
        params_read = tmp_path / f"params-{stage}.jsonl"
        path = os.pathsep.join(filter(None, [str(PARAMS_PROBE), os.environ.get("PYTHONPATH")]))
        probe = {"PYTHONPATH": path, "CROSSSIM_PARAMS_READ": str(params_read), "PYTHONPROFILEIMPORTTIME": "1"}
        imported = _project_files_imported(_run(["dvc", "repro", "--single-item", stage], project, **probe).stderr)
        assert imported, f"{stage}: no import report (did the stage run?)"
        undeclared[stage] = sorted(f for f in imported if not any(f == dep or f.startswith(f"{dep}/") for dep in spec["deps"]))
        params_wrong[stage] = _params_mismatch(params_read, spec["params"], params)
    assert undeclared == dict.fromkeys(stages, []), f"dvc.yaml stages run code they do not depend on: {undeclared}"
    assert params_wrong == dict.fromkeys(stages, {}), f"dvc.yaml stages' params are not the keys they read: {params_wrong}"
    metrics = json.loads((project / "outputs" / "eval" / "metrics.json").read_text())
    assert {"kermany-pediatric/test", "nih-cxr8"} <= set(metrics)
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"validate", "prepare", "pretrain", "train", "evaluate", "adapt"}
    adapted = json.loads((project / "outputs" / "adapt" / "metrics.json").read_text())
    assert set(adapted) == {"source", "adapted", "student"}
    assert "nih-cxr8/target-test" in adapted["adapted"]
    shown = json.loads(_run(["dvc", "metrics", "show", "--json"], project).stdout)
    assert "kermany-pediatric/test" in json.dumps(shown)
    bytecode = project / "pipeline" / "data" / "__pycache__" / "images.cpython-311.pyc"
    bytecode.parent.mkdir(exist_ok=True)
    bytecode.write_bytes(b"compiled later")  # Python writing bytecode beside the code is not a code change
    assert "up to date" in _run(["dvc", "repro"], project).stdout  # nothing changed: nothing reruns
