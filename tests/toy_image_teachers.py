"""Tiny deterministic image teachers for the tests, importable as ``toy_image_teachers:<factory>``.

A fixed random 3x3 convolution over the RGB view, a ReLU, 2x2 average-pooled cells, then a fixed
random linear map to C logits. Weights come from a seeded generator; arithmetic runs in float64
and only the result is cast to float32, so a row's logits do not depend on its batch companions.
Input: float32 ``[B, 3, H, W]``; output ``[B, C]``.
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
