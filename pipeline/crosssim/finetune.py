"""Plain supervised fine-tuning of the source model on the labelled target images.

With target labels, CrossSim starts adaptation from this model rather than from the source
model: the pediatric cues the source model learned invert on adults, and a few target labels
correct that faster than any alignment. The benchmark's "fine-tune" baseline is this same
function, so CrossSim with labels is compared with exactly what it starts from.
"""

from __future__ import annotations

import copy
import math

import numpy as np

from pipeline.config import AugmentConfig, TrainConfig
from pipeline.crosssim.engine import UNLABELLED, DomainData
from pipeline.errors import DatasetError
from pipeline.models import Classifier
from pipeline.training.engine import Trainer, seed_everything

FINETUNE_LR = 3e-4


def finetune_on_labels(
    source_model: Classifier, data: DomainData, steps: int, train: TrainConfig, augment: AugmentConfig, seed: int
) -> Classifier:
    """A copy of ``source_model`` fine-tuned (all layers, cosine lr) for about ``steps`` steps on
    ``data``'s labelled rows, with the training augmentation; the last weights are returned.

    There is no selection: with this few labels no separate validation set is left to select on.
    """
    labelled = data.labels != UNLABELLED
    images, labels = np.asarray(data.images[labelled]), data.labels[labelled]
    if set(np.unique(labels)) != {0, 1}:
        raise DatasetError(f"{data.name}: fine-tuning needs labelled images of both classes, got {sorted(set(labels.tolist()))}")
    epochs = max(1, math.ceil(steps * train.batch_size / len(images)))
    config = train.model_copy(update={"epochs": epochs, "lr": FINETUNE_LR, "warmup_epochs": 0.0})
    seed_everything(seed)
    trainer = Trainer(copy.deepcopy(source_model), images, labels, images, labels, config, augment, seed)
    trainer.fit()
    return trainer.model.eval()
