"""Building blocks of CrossSim's domain alignment: gradient reversal, discriminator, mapping head.

Modelled on TLlib (``tllib/modules/grl.py``, ``tllib/modules/domain_discriminator.py``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


class GradientReverseFunction(torch.autograd.Function):
    r"""Identity forward, :math:`-c \cdot \text{grad}` backward (Ganin & Lempitsky, 2015)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, coeff: float) -> torch.Tensor:
        ctx.coeff = coeff
        # view_as gives a new tensor object, so autograd records this node instead of skipping it
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad_output.neg() * ctx.coeff, None  # no gradient for ``coeff``


class GradientReverseLayer(nn.Module):
    r""":math:`\mathcal{R}(x) = x`, :math:`\partial \mathcal{R} / \partial x = -c I` for a fixed ``coeff`` c."""

    def __init__(self, coeff: float = 1.0) -> None:
        super().__init__()
        self.coeff = coeff

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return GradientReverseFunction.apply(x, self.coeff)


class WarmStartGradientReverseLayer(nn.Module):
    r"""Gradient reversal whose coefficient rises from ``lo`` to ``hi`` (Ganin & Lempitsky's schedule).

    .. math::
        c_i = \frac{2(hi - lo)}{1 + \exp(-\alpha\, i / N)} - (hi - lo) + lo

    with :math:`i` the iteration and :math:`N` = ``max_iters``: :math:`c_0 = lo`, :math:`c_i \to hi`.
    Starting near 0 keeps the discriminator's early, noisy gradients out of the feature extractor.
    ``auto_step`` advances :math:`i` on every forward; otherwise call :meth:`step`. :math:`i` is kept
    in ``state_dict`` so a resumed run continues the schedule rather than restarting it.
    """

    def __init__(
        self, alpha: float = 10.0, lo: float = 0.0, hi: float = 1.0, max_iters: int = 1000, auto_step: bool = False
    ) -> None:
        super().__init__()
        if max_iters <= 0:
            raise ValueError(f"max_iters must be positive, got {max_iters}")
        self.alpha = alpha
        self.lo = lo
        self.hi = hi
        self.max_iters = max_iters
        self.auto_step = auto_step
        self.iter_num = 0

    @property
    def coeff(self) -> float:
        span = self.hi - self.lo
        return 2.0 * span / (1.0 + math.exp(-self.alpha * self.iter_num / self.max_iters)) - span + self.lo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = GradientReverseFunction.apply(x, self.coeff)
        if self.auto_step:
            self.step()
        return out

    def step(self) -> None:
        """Advance the schedule by one iteration."""
        self.iter_num += 1

    def get_extra_state(self) -> dict[str, int]:
        return {"iter_num": self.iter_num}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.iter_num = state["iter_num"]


class DomainDiscriminator(nn.Sequential):
    """MLP ``(N, in_features) -> (N, 1)`` logit that the features come from the source domain.

    Linear-(BN)-ReLU twice, then Linear to one logit. It returns logits, not probabilities: the
    losses use BCE-with-logits, which stays finite where ``log(sigmoid(x))`` underflows.
    ``batch_norm`` suits DANN, whose single pass sees both domains in one batch; the GAN form
    leaves it out (as ADDA does), because a BatchNorm discriminator scores each image relative to
    its batch, which the feature extractor can exploit instead of aligning the features.
    """

    def __init__(self, in_features: int, hidden: int = 256, batch_norm: bool = True) -> None:
        def block(width_in: int) -> list[nn.Module]:
            norm = [nn.BatchNorm1d(hidden)] if batch_norm else []
            return [nn.Linear(width_in, hidden), *norm, nn.ReLU()]

        super().__init__(*block(in_features), *block(hidden), nn.Linear(hidden, 1))


class MappingHead(nn.Sequential):
    """Shared Linear-BN-ReLU map from backbone features to the ``out_features``-d aligned space.

    Source and target features both pass through this one head, so the discriminator and the
    classifier work in a single common space (TLlib's "bottleneck"). Feed both domains in one
    batch (``torch.cat``): BatchNorm then normalises them with shared statistics, whereas
    separate batches would normalise each domain on its own and hide the shift being aligned.
    """

    def __init__(self, in_features: int, out_features: int = 256) -> None:
        super().__init__(nn.Linear(in_features, out_features), nn.BatchNorm1d(out_features), nn.ReLU())
        self.out_features = out_features
