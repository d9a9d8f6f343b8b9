"""Data-parallel training on real PneumoniaMNIST images: two Gloo processes on the CPU against one process.

Tolerances, and why:

- Without BatchNorm and class weighting, two ranks of 8 images each take the same steps as one process with the
  global batch of 16: the same permutation is split between them and DDP averages their gradients, so the weights
  agree to float32 rounding (the two half-batch means are added in another order than one full-batch mean):
  atol 1e-5 after two epochs.
- The real ResNet-18 normalises each rank's batch with that rank's statistics (BatchNorm over 16 images instead of
  32: PyTorch's SyncBatchNorm does not run on the CPU) and each rank draws its own augmentation, so it is not
  expected to match the single process exactly: its first-epoch training loss is asked to agree within 5 % (the
  two runs measured 0.594 and 0.598 on this subset).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from torch import nn

from pipeline.config import load_config
from pipeline.data.readers import read_dataset
from pipeline.data.splits import subsample
from pipeline.errors import TrainingError
from pipeline.retrain.sites import prepare_site
from pipeline.training.distributed import Ranks, process_group
from pipeline.training.engine import Trainer
from pipeline.training.launch import launch
from tests.conftest import REPO

pytestmark = pytest.mark.slow  # several training processes: left out of make test-fast

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def prepared(data_dir, tmp_path_factory) -> tuple[list[str], Path]:
    """A prepared PneumoniaMNIST subset (64 per class and split, 32×32): (`crosssim` settings, project folder)."""
    project = tmp_path_factory.mktemp("project")
    overrides = [
        "data.source=pneumoniamnist", "data.external=[]", "crosssim.enabled=false", "data.image_size=32",
        f"data.prepared_dir={project / 'prepared'}", f"data.cache_dir={project / 'cache'}",
        "train.batch_size=32", "train.early_stopping_patience=null",
        # the ≤ 5% loss agreement below was calibrated on these images without histeq: after 4 steps on the equalised
        # ones the 2-process loss was 0.63 against 0.50 (per-rank BatchNorm statistics are what differs between them)
        "data.harmonisation=none",
    ]  # fmt: skip
    cfg = load_config(REPO / "params.yaml", overrides)
    prepare_site(cfg, "pneumoniamnist", subsample(read_dataset(data_dir / "pneumoniamnist"), 64, seed=0))
    settings = ["--config", str(REPO / "params.yaml")]
    for override in overrides:
        settings += ["--set", override]
    return settings, project


def _images(project: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from pipeline.data.prepare import open_prepared

    data = open_prepared(project / "prepared" / "pneumoniamnist")
    train, train_rows = data.subset(data.manifest["split"] == "train")
    val, val_rows = data.subset(data.manifest["split"] == "val")
    return train[:96], train_rows["label"].to_numpy()[:96], val, val_rows["label"].to_numpy()  # 96: 6 full batches


def _network_without_batchnorm() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=2), nn.GroupNorm(2, 8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2), nn.GroupNorm(4, 16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2),
    )  # fmt: skip


def fit_without_batchnorm(project: Path, grad_accum_steps: int) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Two epochs of the engine on a BatchNorm-free network, global batch 16: (weights, per-epoch loss)."""
    cfg = load_config(None, ["augment.enabled=false", "train.class_weighted=false", "train.batch_size=16",
                             f"train.grad_accum_steps={grad_accum_steps}", "train.epochs=2", "train.device=cpu"])  # fmt: skip
    with process_group(torch.device("cpu")) as ranks:
        trainer = Trainer(_network_without_batchnorm(), *_images(project), cfg.train, cfg.augment, 7, ranks=ranks)
        state = trainer.fit()
    return trainer.model.state_dict(), [row["train_loss"] for row in state.history]


def test_two_gloo_processes_take_the_single_process_steps(prepared):
    """Two micro-batches per optimiser step: the first accumulates without syncing (DDP's no_sync), the second
    averages the accumulated gradients across the ranks."""
    _, project = prepared
    alone, alone_losses = fit_without_batchnorm(project, grad_accum_steps=2)
    together, together_losses = launch(2, fit_without_batchnorm, project, 2)
    assert together_losses == pytest.approx(alone_losses, rel=1e-5)
    for name, value in alone.items():
        torch.testing.assert_close(together[name], value, atol=1e-5, rtol=0, msg=name)


def test_the_global_batch_must_split_evenly():
    with pytest.raises(TrainingError, match="train.batch_size 30 is the global batch: it must divide evenly among the 4"):
        Ranks(rank=0, world_size=4).per_rank_batch(30)


def _torchrun(settings: list[str], output: Path, *extra: str) -> subprocess.Popen:
    command = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "--no-python", str(BIN / "crosssim")]
    command += ["train", *settings, "--set", f"train.output_dir={output}", *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _train(settings: list[str], output: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [str(BIN / "crosssim"), "train", *settings, "--set", f"train.output_dir={output}", *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_crosssim_train_under_torchrun_matches_one_process(prepared, tmp_path):
    settings, _ = prepared
    epochs = ["--set", "train.epochs=1"]
    with _torchrun(settings, tmp_path / "two", *epochs) as run:
        output, _ = run.communicate(timeout=300)
    assert run.returncode == 0, output
    assert output.count("best val AUC") == 1  # rank 0 reports, rank 1 does not
    alone = _train(settings, tmp_path / "one", *epochs)
    assert alone.returncode == 0, alone.stdout + alone.stderr
    two, one = (json.loads((tmp_path / name / "train_summary.json").read_text()) for name in ("two", "one"))
    assert (two["processes"], one["processes"], two["epochs_run"]) == (2, 1, 1)
    assert two["history"][0]["train_loss"] == pytest.approx(one["history"][0]["train_loss"], rel=0.05)
    assert two["n_train"] == one["n_train"] and two["best_val_auc"] > 0.75


def _rank_process(torchrun: subprocess.Popen, rank: int) -> psutil.Process:
    for child in psutil.Process(torchrun.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "crosssim" in " ".join(child.cmdline()):
                return child
        except psutil.Error:
            continue
    raise LookupError(f"no rank {rank} process")


def test_a_killed_rank_fails_the_job_and_resume_continues_on_another_process_count(prepared, tmp_path):
    settings, _ = prepared
    output = tmp_path / "train"
    with _torchrun(settings, output, "--set", "train.epochs=4") as run:
        deadline = time.monotonic() + 180
        while not (output / "last.pt").is_file() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (output / "last.pt").is_file(), "no checkpoint after the first epoch"
        os.kill(_rank_process(run, 1).pid, signal.SIGKILL)
        log, _ = run.communicate(timeout=120)  # torchrun stops rank 0 and exits: no hang on the dead peer
    assert run.returncode != 0 and "FAILED" in log and "Signal 9 (SIGKILL)" in log, log
    done = torch.load(output / "last.pt", weights_only=False)["state"]["epoch"]
    assert 1 <= done < 4  # a valid checkpoint of a finished epoch survives the failure

    resumed = _train(settings, output, "--set", "train.epochs=4", "--resume")  # one process this time
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    summary = json.loads((output / "train_summary.json").read_text())
    assert summary["epochs_run"] == 4 and summary["processes"] == 1
    assert [row["epoch"] for row in summary["history"]] == [1, 2, 3, 4]  # the epochs before the kill are kept


def test_a_failing_launched_process_is_a_clear_error(prepared, tmp_path):
    """`train.processes=2` without torchrun: a rank's error reaches the caller with its rank, nothing hangs."""
    settings, project = prepared
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "last.pt").write_bytes(b"not a checkpoint")
    failed = _train(settings, tmp_path / "train", "--set", "train.processes=2", "--resume")
    output = failed.stdout + failed.stderr
    assert failed.returncode == 2 and "is truncated or corrupt" in output, output  # a TrainingError, as one process
    assert "Traceback" not in output
