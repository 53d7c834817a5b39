"""Tiny deterministic image teachers for the tests, importable as ``toy_image_teachers:<factory>``.

A fixed random 3x3 convolution over the RGB view, a ReLU, 2x2 average-pooled cells, then a fixed
random linear map to C logits. Weights come from a seeded generator; arithmetic runs in float64
and only the result is cast to float32, so a row's logits do not depend on its batch companions.
Input: float32 ``[B, 3, H, W]``; output ``[B, C]`` (the ``dense_*`` teachers: ``[B, H', W', C]``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NUM_CLASSES = 3
CHANNELS, CELLS = 6, 2


class ToyImageTeacher(torch.nn.Module):
    def __init__(self, seed: int, num_classes: int = NUM_CLASSES, scale: float = 3.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("conv", torch.randn(CHANNELS, 3, 3, 3, generator=g, dtype=torch.float64) / 3.0)
        features = CHANNELS * CELLS * CELLS
        self.register_buffer("weight", torch.randn(features, num_classes, generator=g, dtype=torch.float64)
                             * (scale / features ** 0.5))
        self.register_buffer("bias", torch.randn(num_classes, generator=g, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(F.conv2d(x.to(torch.float64), self.conv, padding=1))
        pooled = F.adaptive_avg_pool2d(h, CELLS).flatten(1)
        return (pooled @ self.weight + self.bias).to(torch.float32)


def image_a() -> ToyImageTeacher:
    return ToyImageTeacher(11)


def image_b() -> ToyImageTeacher:
    return ToyImageTeacher(12, scale=2.0)


class ToyDenseTeacher(torch.nn.Module):
    """A dense-map teacher: the same fixed 3x3 convolution and ReLU, average-pooled to a
    ``side x side`` map, then a fixed 1x1 convolution to C logits; output ``[B, side, side, C]``
    (channels last), float64 inside as above."""

    def __init__(self, seed: int, side: int = 4, num_classes: int = NUM_CLASSES):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.side = side
        self.register_buffer("conv", torch.randn(CHANNELS, 3, 3, 3, generator=g, dtype=torch.float64) / 3.0)
        self.register_buffer("head", torch.randn(CHANNELS, num_classes, generator=g, dtype=torch.float64) * 2.0)
        self.register_buffer("bias", torch.randn(num_classes, generator=g, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(F.conv2d(x.to(torch.float64), self.conv, padding=1))
        cells = F.adaptive_avg_pool2d(h, self.side).permute(0, 2, 3, 1)  # [B, side, side, CHANNELS]
        return (cells @ self.head + self.bias).to(torch.float32)


def dense_a() -> ToyDenseTeacher:
    return ToyDenseTeacher(21)


def dense_b() -> ToyDenseTeacher:
    return ToyDenseTeacher(22)


def dense_2x2() -> ToyDenseTeacher:
    return ToyDenseTeacher(23, side=2)
