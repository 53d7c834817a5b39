"""Tiny deterministic teachers for the tests, importable as ``toy_teachers:<factory>``.

Each teacher is a fixed random filterbank over 25 ms frames (10 ms hop), log frame energies,
average-pooled into a few time bins, then a fixed random linear map to C logits. The weights come
from a seeded generator, so every call of a factory builds the same module.

* Sensitive to the input: gain, masks, noise, shifts and mixup all change the logits.
* Batch-invariant: all arithmetic runs in float64 and only the result is cast to float32, so a
  row's logits do not depend on which other rows share its batch (the tests compare dumps made
  with different batch sizes bit for bit).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NUM_CLASSES = 10  # the synthetic dataset's class count (logitcache.synth default)
WIN, HOP, BANDS, BINS = 400, 160, 8, 4


class ToyTeacher(torch.nn.Module):
    def __init__(self, seed: int, num_classes: int = NUM_CLASSES, frames: int | None = None,
                 scale: float = 1.0, nan: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.frames, self.nan = frames, nan
        bins = 1 if frames else BINS  # frame-level: per-bin logits over `frames` bins
        self.register_buffer("filters", torch.randn(WIN, BANDS, generator=g, dtype=torch.float64) / WIN**0.5)
        self.register_buffer("weight", torch.randn(BANDS * bins, num_classes, generator=g, dtype=torch.float64)
                             * (scale / (BANDS * bins) ** 0.5))
        self.register_buffer("bias", torch.randn(num_classes, generator=g, dtype=torch.float64))
        self.bins = frames or BINS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float64)
        frames = x.unfold(-1, WIN, HOP)  # [B, nF, WIN]
        energy = (frames @ self.filters) ** 2  # [B, nF, BANDS]
        feat = (torch.log(energy + 1e-6) + 8.0) / 3.0  # roughly zero-mean, unit scale on the synth data
        pooled = F.adaptive_avg_pool1d(feat.transpose(1, 2), self.bins)  # [B, BANDS, bins]
        if self.frames:
            out = pooled.transpose(1, 2) @ self.weight + self.bias  # [B, T, C]
        else:
            out = pooled.flatten(1) @ self.weight + self.bias  # [B, C]
        if self.nan:
            out = out * torch.nan
        return out.to(torch.float32)


def toy_a() -> ToyTeacher:
    return ToyTeacher(1, scale=3.0)


def toy_b() -> ToyTeacher:
    return ToyTeacher(2, scale=3.0)


def toy_c() -> ToyTeacher:
    return ToyTeacher(3, scale=2.0)


def toy_frames() -> ToyTeacher:
    """Frame-level: ``[B, 6, C]``."""
    return ToyTeacher(4, frames=6, scale=3.0)


def toy_frames_b() -> ToyTeacher:
    return ToyTeacher(5, frames=6, scale=3.0)


def toy_c11() -> ToyTeacher:
    """A different class count, for the teachers-disagree error."""
    return ToyTeacher(6, num_classes=NUM_CLASSES + 1)


def toy_nan() -> ToyTeacher:
    """NaN logits for every input (the probe only checks shapes; the dump must catch it)."""
    return ToyTeacher(7, nan=True)


def toy_40k() -> ToyTeacher:
    return ToyTeacher(8, num_classes=40_000, scale=3.0)


def toy_70k() -> ToyTeacher:
    return ToyTeacher(9, num_classes=70_000, scale=3.0)


class SilenceNaN(ToyTeacher):
    """toy_a, except ``fill`` (NaN or Inf) logits for an all-zero input row: the dump must stop at
    exactly that sample, so a test can place it mid-epoch by silencing one clip."""

    fill = float("nan")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        silent = x.abs().amax(dim=-1) == 0
        return torch.where(silent[:, None], torch.full_like(out, self.fill), out)


class SilenceInf(SilenceNaN):
    fill = float("inf")


def toy_nan_on_silence() -> ToyTeacher:
    return SilenceNaN(1, scale=3.0)


def toy_inf_on_silence() -> ToyTeacher:
    return SilenceInf(1, scale=3.0)


class ToyConv(torch.nn.Module):
    """Two 3x3 convs over the (frame, band) log-energy image, then a linear head (float32).

    The second conv has 4 input channels, so its 4-D weight really changes layout under
    channels-last (a 1-channel weight is contiguous in both layouts)."""

    def __init__(self, seed: int, num_classes: int = NUM_CLASSES):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("filters", torch.randn(WIN, BANDS, generator=g) / WIN**0.5)
        self.conv1 = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.head = torch.nn.Linear(4, num_classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        energy = (x.unfold(-1, WIN, HOP) @ self.filters) ** 2  # [B, nF, BANDS]
        img = ((torch.log(energy + 1e-6) + 8.0) / 3.0).unsqueeze(1)  # [B, 1, nF, BANDS]
        h = torch.relu(self.conv2(torch.relu(self.conv1(img))))
        return self.head(h.mean((2, 3))) * 3.0


def toy_conv() -> ToyConv:
    return ToyConv(10)
