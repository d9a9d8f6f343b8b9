"""dvc.yaml reproduces a run with the crosssim CLI, and `dvc metrics show` shows it."""

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


def test_dvc_repro_runs_the_stages_and_reports_metrics(data_dir, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    for name in ("dvc.yaml", "pipeline", "flows"):
        source = REPO / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, project / name)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(image_size=32, max_images_per_class=15)
    params["train"].update(epochs=1, batch_size=16)
    params["evaluate"].update(bootstrap_samples=50)
    params["validation"].update(min_images=20)
    params["crosssim"].update(steps=10, eval_every=5, batch_size=8, diagnostics_samples=20)
    params["crosssim"]["distill"].update(steps=5)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    copy_kermany_subset(data_dir, project / "data" / "raw" / "kermany-pediatric", per_class=30)
    copy_nih_subset(data_dir, project / "data" / "raw" / "nih-cxr8", per_class=15)
    _run(["git", "init", "-q"], project)
    _run(["dvc", "init", "-q"], project)
    shutil.copy(REPO / ".dvcignore", project / ".dvcignore")

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    undeclared = {}
    for stage, spec in stages.items():  # one stage at a time, so that each one's imports are its own
        imported = _project_files_imported(_run(["dvc", "repro", "--single-item", stage], project, PYTHONPROFILEIMPORTTIME="1").stderr)
        assert imported, f"{stage}: no import report (did the stage run?)"
        undeclared[stage] = sorted(f for f in imported if not any(f == dep or f.startswith(f"{dep}/") for dep in spec["deps"]))
    assert undeclared == dict.fromkeys(stages, []), f"dvc.yaml stages run code they do not depend on: {undeclared}"
    metrics = json.loads((project / "outputs" / "eval" / "metrics.json").read_text())
    assert {"kermany-pediatric/test", "nih-cxr8"} <= set(metrics)
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"validate", "prepare", "train", "evaluate", "adapt"}
    adapted = json.loads((project / "outputs" / "adapt" / "metrics.json").read_text())
    assert set(adapted) == {"source", "adapted", "student"}
    assert "nih-cxr8/target-test" in adapted["adapted"]
    shown = json.loads(_run(["dvc", "metrics", "show", "--json"], project).stdout)
    assert "kermany-pediatric/test" in json.dumps(shown)
    bytecode = project / "pipeline" / "data" / "__pycache__" / "images.cpython-311.pyc"
    bytecode.parent.mkdir(exist_ok=True)
    bytecode.write_bytes(b"compiled later")  # Python writing bytecode beside the code is not a code change
    assert "up to date" in _run(["dvc", "repro"], project).stdout  # nothing changed: nothing reruns
