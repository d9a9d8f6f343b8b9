"""Two random views of each image, the input of every self-supervised method here.

lightly's view transforms (``lightly.transforms.SimCLRTransform`` and kin) take PIL images and end in RGB colour
jitter (saturation, hue), random grayscale and ImageNet normalisation; our images are batches of 1-channel uint8
arrays already in memory. torchvision.transforms.v2 works on those tensors directly, on the batch's device. It draws
one set of random parameters per call, so each image gets its own call (as in :mod:`pipeline.augment`).
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from pipeline.augment import augment_batch, normalise


def view_transform(image_size: int, min_crop_scale: float) -> v2.Transform:
    """SimCLR's recipe for radiographs: a random crop resized back (the strongest cue), a small rotation, brightness and
    contrast jitter, blur half of the time. No flips (left and right of a chest differ) and no colour (one channel)."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(image_size, scale=(min_crop_scale, 1.0), antialias=True),
            v2.RandomAffine(degrees=10),
            v2.ColorJitter(brightness=0.4, contrast=0.4),
            v2.RandomApply([v2.GaussianBlur(kernel_size=5, sigma=(0.1, 1.5))], p=0.5),
        ]
    )


def two_views(batch: torch.Tensor, transform: v2.Transform) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1, S, S) pixels in [0, 1] → two independently augmented, normalised copies."""
    return normalise(augment_batch(batch, transform)), normalise(augment_batch(batch, transform))
