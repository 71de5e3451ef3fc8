"""The refiner networks of the paper, one builder per dataset.

A refiner maps the current reconstruction ``[N x C x H x W]`` and a stage index
to K residual proposals ``[N x K x C x H x W]``; it never sees the target image.
"M" in the comments is the stage's channel mask (see ``nn.MaskedConv``).
"""

import torch.nn as nn

from .nn import MaskedConv, OptionConv, Refiner, ResidualBlock, SegmentRefiner, StageSequential


def mnist_refiner(options, num_stages):
    """1 x 28 x 28 images, one network for all stages."""
    s = num_stages
    body = StageSequential(
        MaskedConv(1, 32, 3, s, stride=2), nn.ReLU(),       # 14 x 14
        MaskedConv(32, 64, 3, s, stride=2), nn.ReLU(),      # 7 x 7
        MaskedConv(64, 128, 3, s), nn.ReLU(),
        MaskedConv(128, 128, 3, s), nn.ReLU(),
        MaskedConv(128, 64, 3, s), nn.ReLU(),
        MaskedConv(64, 64, 4, s, stride=2, transpose=True), nn.ReLU(),  # 14 x 14
        MaskedConv(64, 64, 4, s, stride=2, transpose=True), nn.ReLU(),  # 28 x 28
    )
    return Refiner(body, OptionConv(64, 1, options, 3))


def svhn_refiner(options, num_stages):
    """3 x 32 x 32 images, for one segment of stages; a separate 1x1 head per stage."""
    s = num_stages
    body = StageSequential(
        MaskedConv(3, 64, 5, s, stride=2), nn.ReLU(), nn.GroupNorm(4, 64),       # 16 x 16
        MaskedConv(64, 128, 5, s, stride=2), nn.ReLU(), nn.GroupNorm(8, 128),    # 8 x 8
        MaskedConv(128, 128, 3, s), nn.ReLU(), nn.GroupNorm(8, 128),
        MaskedConv(128, 256, 3, s), nn.ReLU(), nn.GroupNorm(8, 256),
        MaskedConv(256, 128, 3, s), nn.ReLU(), nn.GroupNorm(8, 128),
        MaskedConv(128, 128, 4, s, stride=2, transpose=True), nn.ReLU(), nn.GroupNorm(8, 128),
        MaskedConv(128, 128, 4, s, stride=2, transpose=True), nn.ReLU(), nn.GroupNorm(8, 128),
        MaskedConv(128, 128, 3, s), nn.ReLU(),
    )
    return Refiner(body, OptionConv(128, 3, options, 1, num_stages=s, per_stage=True))


def cifar_refiner(options, num_stages):
    """3 x 32 x 32 images, for one segment of stages, with six residual blocks at 8 x 8."""
    s = num_stages
    body = StageSequential(
        nn.Conv2d(3, 64, 5, stride=2, padding=2), nn.ReLU(), nn.GroupNorm(8, 64),
        nn.Conv2d(64, 128, 5, stride=2, padding=2), nn.ReLU(), nn.GroupNorm(8, 128),
        MaskedConv(128, 256, 3, s),
        *[ResidualBlock(256, 1024, (8, 8, 32), s) for _ in range(6)],
        MaskedConv(256, 128, 4, s, stride=2, transpose=True), nn.ReLU(), nn.GroupNorm(8, 128),
        MaskedConv(128, 128, 4, s, stride=2, transpose=True), nn.ReLU(), nn.GroupNorm(8, 128),
        MaskedConv(128, 128, 3, s), nn.ReLU(),
    )
    return Refiner(body, OptionConv(128, 3, options, 5))


def celeba_refiner(options, num_stages):
    """3 x 64 x 64 images, for one segment of stages, with six residual blocks at 8 x 8."""
    s = num_stages
    upsample = []
    for _ in range(3):
        upsample += [MaskedConv(128, 128, 4, s, stride=2, transpose=True), nn.ReLU(),
                     nn.GroupNorm(8, 128)]
    body = StageSequential(
        nn.Conv2d(3, 64, 5, stride=2, padding=2), nn.ReLU(), nn.GroupNorm(4, 64),
        nn.Conv2d(64, 128, 5, stride=2, padding=2), nn.ReLU(), nn.GroupNorm(8, 128),
        nn.Conv2d(128, 128, 5, stride=2, padding=2), nn.ReLU(), nn.GroupNorm(8, 128),
        *[ResidualBlock(128, 512, (8, 8, 16), s) for _ in range(6)],
        *upsample,
    )
    return Refiner(body, OptionConv(128, 3, options, 5))


REFINERS = {
    "mnist": mnist_refiner,
    "svhn": svhn_refiner,
    "cifar10": cifar_refiner,
    "celeba": celeba_refiner,
}


def build_refiner(name, options, num_stages, segment=None):
    """The refiner ``name`` for all stages, split into segments when ``segment`` is given."""
    make = REFINERS[name]
    if segment is None:
        return make(options, num_stages)
    return SegmentRefiner(lambda stages: make(options, stages), num_stages, segment)
