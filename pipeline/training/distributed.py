"""Data-parallel training over the processes ``torchrun`` starts (PyTorch DistributedDataParallel).

``torchrun --nproc-per-node N …`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address in
each process's environment; :func:`process_group` reads them, joins the group (NCCL when training on CUDA, Gloo on
the CPU) and leaves it at the end. Without torchrun there is one process and nothing is initialised, so the same
code trains on one CPU, one GPU or N of either.

What the ranks share, and how:

- the data order: every rank draws the same permutation (seed + epoch) and takes every N-th image of it, so the
  N per-rank batches of ``train.batch_size / N`` images together are the single-process batch of
  ``train.batch_size``;
- gradients: averaged by DDP in backward;
- the validation score: each rank predicts every N-th validation image, the predictions are gathered, so every
  rank computes the same AUC; the early-stopping decision is rank 0's, broadcast;
- side effects (checkpoints, the training summary, MLflow metrics, the progress bar): rank 0 only.

A rank that dies makes ``torchrun`` stop the others and exit non-zero; the last checkpoint (written atomically
once per epoch) stays valid, and ``--resume`` continues from it on any number of processes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from pipeline.errors import TrainingError


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def per_rank_batch(self, global_batch: int) -> int:
        """The images each rank takes from a global batch; the global batch must split evenly."""
        if global_batch % self.world_size:
            raise TrainingError(
                f"train.batch_size {global_batch} is the global batch: it must divide evenly among the "
                f"{self.world_size} training processes (e.g. {global_batch - global_batch % self.world_size})"
            )
        return global_batch // self.world_size

    def device(self, device: torch.device) -> torch.device:
        """Rank r of a node trains on its node's CUDA device r; CPU ranks share the CPU."""
        if self.distributed and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def gather(self, values: np.ndarray, indices: np.ndarray, total: int) -> np.ndarray:
        """Every rank's ``values`` (its rows ``indices`` of ``total``) in row order, on every rank."""
        if not self.distributed:
            return values
        parts: list = [None] * self.world_size
        dist.all_gather_object(parts, (indices, values))
        merged = np.empty(total, dtype=values.dtype)
        for part_indices, part_values in parts:
            merged[part_indices] = part_values
        return merged

    def sum(self, *values: float) -> list[float]:
        """Each value summed over the ranks."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor)  # a CPU tensor: Gloo reduces it (NCCL groups carry a Gloo backend for the CPU)
        return tensor.tolist()

    def main_decides(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank (a decision all ranks must take together)."""
        if not self.distributed:
            return flag
        shared = [flag]
        dist.broadcast_object_list(shared, src=0)
        return bool(shared[0])

    def epoch_seed(self, seed: int, epoch: int) -> int:
        """The augmentation seed of one rank in one epoch: resumable on any number of ranks without saved RNG
        state, and different on each rank (the same draws on every rank would correlate their batches)."""
        return int(np.random.SeedSequence([seed, epoch, self.rank]).generate_state(1)[0])


def ranks_from_environment() -> Ranks:
    """The ranks torchrun set in this process's environment; one process when there are none."""
    try:
        return Ranks(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError as exc:
        raise TrainingError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers, as torchrun sets them ({exc})") from exc


@contextmanager
def process_group(device: torch.device) -> Iterator[Ranks]:
    """Join the torchrun process group for the block (when there is one) and leave it afterwards."""
    ranks = ranks_from_environment()
    if not ranks.distributed or dist.is_initialized():
        yield ranks
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(ranks.local_rank)
    # CPU collectives (the gathered validation scores) need Gloo beside NCCL
    dist.init_process_group("cpu:gloo,cuda:nccl" if backend == "nccl" else "gloo")
    try:
        yield ranks
    finally:
        dist.destroy_process_group()
