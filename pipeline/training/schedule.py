"""The learning-rate schedule of every training loop (source training, fine-tuning, adaptation, distillation)."""

from __future__ import annotations

import math

import torch


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to zero at ``total_steps`` (held there after). The factor on each group's
    learning rate at optimizer step t (counted from 0), with w = ``warmup_steps`` and T = ``total_steps``:

        t < w:  (t + 1) / w
        t ≥ w:  ½ · (1 + cos(π · min((t − w) / max(1, T − w), 1)))
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * min((step - warmup_steps) / max(1, total_steps - warmup_steps), 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
