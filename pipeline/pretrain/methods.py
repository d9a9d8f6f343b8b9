"""The self-supervised methods: the backbone being pretrained, lightly's heads on top, lightly's loss.

Each method is an ``nn.Module`` whose ``forward(view_a, view_b)`` returns the step's scalar loss, and whose
``step_end(step, total_steps)`` runs what follows an optimiser step (BYOL's momentum update). Only ``backbone`` is kept.
"""

from __future__ import annotations

import copy

import torch
from lightly.loss import NegativeCosineSimilarity, NTXentLoss
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead, SimCLRProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils.scheduler import cosine_schedule
from torch import nn

from pipeline.config import PretrainConfig


class SimCLR(nn.Module):
    r"""SimCLR (Chen et al., 2020): the two views of an image attract, every other image of the batch repels.

    With :math:`z = g(f(x))` (backbone :math:`f`, projection head :math:`g`), :math:`\mathrm{sim}` the cosine
    similarity and :math:`2N` projections of :math:`N` images, lightly's ``NTXentLoss`` is, for the positive pair
    :math:`(i, j)`,

    .. math::
        \ell_{i,j} = -\log \frac{\exp(\mathrm{sim}(z_i, z_j)/\tau)}{\sum_{k \ne i} \exp(\mathrm{sim}(z_i, z_k)/\tau)}

    averaged over all :math:`2N` ordered pairs. Its floor is 0 and chance is :math:`\log(2N - 1)`.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: PretrainConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection = SimCLRProjectionHead(feature_dim, cfg.hidden_dim, cfg.projection_dim)
        self.criterion = NTXentLoss(temperature=cfg.temperature)

    def forward(self, view_a: torch.Tensor, view_b: torch.Tensor) -> torch.Tensor:
        return self.criterion(self.projection(self.backbone(view_a)), self.projection(self.backbone(view_b)))

    def step_end(self, step: int, total_steps: int) -> None:
        """Nothing follows SimCLR's optimiser step."""


class BYOL(nn.Module):
    r"""BYOL (Grill et al., 2020): an online network predicts a slowly moving copy of itself; no negatives.

    Online :math:`q(g(f(x)))` (predictor :math:`q`), target :math:`\bar g(\bar f(x))`, an exponential moving
    average of :math:`g \circ f` with rate :math:`m` rising from ``momentum`` to 1 on a cosine over the run. With
    lightly's ``NegativeCosineSimilarity`` :math:`c(p, z) = -\cos(p, z)`, the symmetric loss is

    .. math::
        L = \tfrac12\,[\,c(q(g(f(x_a))),\ \mathrm{sg}(\bar g(\bar f(x_b)))) +
                       c(q(g(f(x_b))),\ \mathrm{sg}(\bar g(\bar f(x_a))))\,]

    (:math:`\mathrm{sg}`: no gradient), between −1 (perfect prediction) and 1.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, cfg: PretrainConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection = BYOLProjectionHead(feature_dim, cfg.hidden_dim, cfg.projection_dim)
        self.prediction = BYOLPredictionHead(cfg.projection_dim, cfg.hidden_dim, cfg.projection_dim)
        self.momentum_backbone = copy.deepcopy(backbone)
        self.momentum_projection = copy.deepcopy(self.projection)
        deactivate_requires_grad(self.momentum_backbone)
        deactivate_requires_grad(self.momentum_projection)
        self.criterion = NegativeCosineSimilarity()
        self.base_momentum = cfg.momentum

    def _online(self, view: torch.Tensor) -> torch.Tensor:
        return self.prediction(self.projection(self.backbone(view)))

    @torch.no_grad()
    def _target(self, view: torch.Tensor) -> torch.Tensor:
        return self.momentum_projection(self.momentum_backbone(view))

    def forward(self, view_a: torch.Tensor, view_b: torch.Tensor) -> torch.Tensor:
        return 0.5 * (
            self.criterion(self._online(view_a), self._target(view_b))
            + self.criterion(self._online(view_b), self._target(view_a))
        )

    def step_end(self, step: int, total_steps: int) -> None:
        """Move the target network towards the online one after optimiser step ``step`` (from 0) of ``total_steps``."""
        momentum = cosine_schedule(step, total_steps, self.base_momentum, 1.0)
        update_momentum(self.backbone, self.momentum_backbone, momentum)
        update_momentum(self.projection, self.momentum_projection, momentum)


METHODS: dict[str, type[SimCLR] | type[BYOL]] = {"simclr": SimCLR, "byol": BYOL}
