"""The one learning-rate schedule of every loop: linear warm-up, cosine to zero, held there."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.training.schedule import warmup_cosine


def _factors(total: int, warmup: int, steps: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = warmup_cosine(optimizer, total, warmup)
    factors = []
    for _ in range(steps):
        factors.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return factors


def test_warm_up_then_cosine_to_zero_and_held():
    factors = _factors(total=10, warmup=2, steps=14)
    assert factors[:2] == [0.5, 1.0]  # (t + 1) / w
    assert factors[2] == 1.0 and factors[6] == pytest.approx(0.5)  # cosine from 1 at t = w, half way at t = w + (T − w) / 2
    assert all(a > b for a, b in zip(factors[2:10], factors[3:11], strict=True))  # decreasing to the end
    assert factors[10:] == [0.0] * 4  # zero at T and after (a resumed run that trains longer stays at zero)


def test_without_warm_up_it_is_plain_cosine_to_the_last_bit():
    # the adaptation and fine-tuning loops used 0.5 · (1 + cos(π · min(t / T, 1))): the shared schedule must give
    # exactly those numbers, or their runs would change
    total = 37
    expected = [0.5 * (1 + math.cos(math.pi * min(t / total, 1.0))) for t in range(45)]
    assert _factors(total, 0, 45) == expected
