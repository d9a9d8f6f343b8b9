"""``train.processes`` > 1 without torchrun: start that many data-parallel training processes on this machine with
PyTorch's elastic launcher (what ``torchrun --standalone`` runs), wait for them, and return rank 0's result.

This is how the retraining flow's training task trains on N GPUs of its node (or N CPU processes); across nodes,
start ``crosssim train`` under ``torchrun`` on each. A process that fails makes the launcher stop the others. The
caller gets the failing rank's own error (a :class:`PipelineError` keeps its type, so the CLI's exit code and
message are those of one process), or one naming the rank and how it died; the last checkpoint stays valid for
``train.resume``.
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from pipeline.errors import PipelineError, TrainingError
from pipeline.training import TrainResult


def launch(processes: int, train: Callable[..., TrainResult], *args: object) -> TrainResult:
    """``train(*args)`` in ``processes`` processes that form one process group; rank 0's return value.

    ``train`` and ``args`` must be picklable (the processes are spawned, not forked: a forked CUDA context or
    thread pool would not survive)."""
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=processes,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",  # a free loopback port, as torchrun --standalone picks
        max_restarts=0,  # a failed rank fails the run: resuming is the caller's decision
        start_method="spawn",
    )
    threads = os.environ.get("OMP_NUM_THREADS")
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))  # as torchrun does
    try:
        with tempfile.TemporaryDirectory(prefix="crosssim-ranks-") as errors, _launcher_logs_quiet():
            try:
                return elastic_launch(config, _rank)(Path(errors), train, *args)[0]
            except ChildFailedError as exc:
                raise _rank_error(exc, Path(errors), processes) from None
    finally:
        if threads is None:
            del os.environ["OMP_NUM_THREADS"]


def _rank(errors: Path, train: Callable[..., TrainResult], *args: object) -> TrainResult:
    """One process: ``train``. A pipeline error is left in ``errors`` for the launching process to raise, and the
    process ends with its exit code (an exception would have the launcher log its traceback for a bad input)."""
    try:
        return train(*args)
    except PipelineError as exc:
        (errors / f"rank-{os.environ['RANK']}.pickle").write_bytes(pickle.dumps(exc))
        raise SystemExit(exc.exit_code) from None


def _rank_error(failed: ChildFailedError, errors: Path, processes: int) -> Exception:
    rank, failure = failed.get_first_failure()
    for kept in sorted(errors.glob("rank-*.pickle")):  # the first failure may be a peer stopped by the launcher
        return pickle.loads(kept.read_bytes())
    how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
    recorded = failure.message.get("message", "") if isinstance(failure.message, dict) else failure.message
    detail = f":\n{recorded}" if recorded else ""  # an unexpected error's traceback, as the process recorded it
    return TrainingError(f"data-parallel training failed: rank {rank} of {processes} ended with {how}{detail}")


@contextmanager
def _launcher_logs_quiet() -> Iterator[None]:
    """The launcher logs each failed process with a traceback of its own polling; the error raised here says it."""
    loggers = [logging.getLogger(name) for name in ("torch.distributed.elastic", "torch.multiprocessing")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
