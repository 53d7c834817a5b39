"""STAND-IN for ``logitcache/augment_image.py`` (the image ops of issue 12), used only until that
module exists: ``augment._image_module`` imports it when ``augment_image`` is missing. It
implements the shared augmenter interface with the least that tests of the source seam need: a
resize of the whole image to the view size and one random op, ``hflip``. Delete this file when
``augment_image.py`` is merged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from logitcache.augment import SPEC_VERSION, uniforms
from logitcache.errors import LogitCacheError

PRESETS: dict[str, list[dict]] = {"none": [], "flip": [{"op": "hflip", "p": 0.5}]}
DEFAULT_PRESET = "flip"
_PARAMS = {"hflip": {"flip": ("uint8", ())}}


@dataclass
class ImageContext:
    source_size: tuple[int, int] = (0, 0)
    num_samples: int = 1
    sample_index: int = 0
    load_partner: Callable[[int], torch.Tensor] | None = None


class ImageAugmenter:
    def __init__(self, ops: list[dict], size):
        self.size = (int(size[0]), int(size[1]))
        self.ops = [dict(o) for o in ops]
        for o in self.ops:
            if o.get("op") not in _PARAMS:
                raise LogitCacheError(f"unknown image augmentation op {o.get('op')!r}; known: {', '.join(_PARAMS)}")
            o.setdefault("p", 0.5)

    @classmethod
    def from_spec(cls, spec: dict) -> "ImageAugmenter":
        if spec.get("version") != SPEC_VERSION:
            raise LogitCacheError(f"augmentation spec version {spec.get('version')} is not supported "
                                  f"(this logitcache reads {SPEC_VERSION})")
        return cls(spec["ops"], spec["size"])

    @property
    def spec(self) -> dict:
        return {"version": SPEC_VERSION, "modality": "image", "size": list(self.size), "ops": self.ops}

    @property
    def param_specs(self) -> dict:
        return {f"{o['op']}.{k}": v for o in self.ops for k, v in _PARAMS[o["op"]].items()}

    def param_grid(self) -> dict:
        return {}

    @property
    def view_shape(self) -> tuple[int, int, int]:
        return (3, *self.size)

    def context(self, **kw) -> ImageContext:
        return ImageContext(**kw)

    def draw(self, seed: int, ctx: ImageContext) -> dict[str, np.ndarray]:
        out = {}
        for i, o in enumerate(self.ops):
            u = uniforms(int(seed), 64 * i, 1)
            out["hflip.flip"] = np.asarray(u[0] < o["p"], dtype=np.uint8)
        return out

    def fit(self, source: torch.Tensor, params=None) -> torch.Tensor:
        if tuple(source.shape[-2:]) == self.size:
            return source.clone()  # the decoded source may be a cached tensor shared with other views
        return F.interpolate(source[None].float(), size=self.size, mode="bilinear", align_corners=False)[0]

    def apply(self, source: torch.Tensor, params: dict[str, np.ndarray], ctx: ImageContext) -> torch.Tensor:
        view = self.fit(source)
        if int(params.get("hflip.flip", 0)):
            view = torch.flip(view, dims=[-1])
        return view.to(torch.float32).contiguous()
