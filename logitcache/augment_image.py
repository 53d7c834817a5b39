"""Image augmentations that replay exactly: the ImageNet training pipeline in physical units.

The same draw/apply split as :mod:`logitcache.augment` (read its docstring first): ``draw`` turns
a view's seed into parameters (source pixels, view pixels, factors, degrees, partner + lambda),
each op reading fixed slots of :func:`logitcache.augment.uniforms`; ``apply`` turns a float32
``[3, H0, W0]`` source in [0, 1] and the stored parameters into the float32 ``[3, H, W]`` view.

Why the view cannot depend on threads, batch, worker or CPU: every step is either an exact
operation (slicing, flipping, gathering pixels, min/max, comparisons) or a fixed sequence of
element-wise float32 multiplies and adds, each its own torch kernel, so IEEE rounding happens
after every step and no kernel can fuse (FMA), reorder or split a sum by thread count or SIMD
width. The one reduction (the mean grey level of contrast jitter) is summed exactly with
``math.fsum``. Resizing is therefore our own separable tap sum (:func:`resize`), with
torch's ``interpolate(mode="bilinear", antialias=True, align_corners=False)`` weights computed
in float64 and stored as float32; it equals torch's kernel to float32 rounding (tested), but
torch's kernel is compiled per SIMD level, where the compiler may contract its multiply-adds,
so its bits are not promised across machines (dump on one, train on another).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np
import torch

from logitcache.augment import (_SLOTS_PER_OP, SPEC_VERSION, Op, _int_dtype, build_ops, draw_ops, load_ops_spec,
                                param_grid_of, param_specs_of)
from logitcache.errors import LogitCacheError

MODALITY = "image"
_PIXEL_DTYPE = "int32"  # source-pixel boxes: a source has no size limit short of int32's


# ---------------------------------------------------------------- exact building blocks
@lru_cache(maxsize=1024)
def _taps(in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output pixel, the source indices and float32 weights of torch's antialiased bilinear
    filter (``_compute_indices_min_size_weights_aa``), as ``[out, T]`` (unused taps: weight 0).
    Computed in float64 with element-wise steps only (each weight's normaliser summed tap by tap
    in order), so the weights are the same on every machine."""
    scale = in_size / out_size
    support = scale if scale >= 1.0 else 1.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    center = scale * (np.arange(out_size, dtype=np.float64) + 0.5)
    lo = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    hi = np.minimum(np.trunc(center + support + 0.5), in_size).astype(np.int64)
    j = lo[:, None] + np.arange(int((hi - lo).max()))
    w = np.where(j < hi[:, None], np.maximum(0.0, 1.0 - np.abs((j - center[:, None] + 0.5) * invscale)), 0.0)
    total = w[:, 0].copy()
    for t in range(1, w.shape[1]):
        total = total + w[:, t]
    w = np.where(total[:, None] != 0, w / np.where(total == 0, 1.0, total)[:, None], w)
    return torch.from_numpy(np.minimum(j, in_size - 1)), torch.from_numpy(w.astype(np.float32))


def _resize_rows(x: torch.Tensor, out_size: int) -> torch.Tensor:
    """Resize dim -2 (whole rows gathered: contiguous copies, much faster than gathering columns)."""
    if x.shape[-2] == out_size:
        return x
    idx, wts = _taps(x.shape[-2], out_size)
    acc = None
    for t in range(idx.shape[1]):  # fixed tap order; a separate mul and add per tap: no FMA, no reorder
        term = x.index_select(-2, idx[:, t]) * wts[:, t, None]
        acc = term if acc is None else acc + term
    return acc


def resize(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[C, h, w]`` -> ``[C, H, W]`` float32: torch's antialiased bilinear resize (align_corners
    False), widths first, bit-identical on any thread count and CPU (see the module docstring)."""
    wide = _resize_rows(img.transpose(-1, -2).contiguous(), int(size[1])).transpose(-1, -2)
    return _resize_rows(wide.contiguous(), int(size[0])).contiguous()


def _f32(x: float) -> torch.Tensor:
    return torch.tensor(np.float32(x))


def _blend(a: torch.Tensor, b: torch.Tensor | float, ratio: float) -> torch.Tensor:
    """torchvision's ``_blend``: ``ratio * a + (1 - ratio) * b`` clamped to [0, 1], in float32."""
    r = np.float32(ratio)
    b = b if isinstance(b, torch.Tensor) else _f32(b)
    return (_f32(r) * a + _f32(np.float32(1) - r) * b).clamp(0.0, 1.0)


def _grey(img: torch.Tensor) -> torch.Tensor:
    """torchvision's ``rgb_to_grayscale`` (ITU-R 601-2 luma), ``[1, H, W]``."""
    r, g, b = img[0], img[1], img[2]
    return (_f32(0.2989) * r + _f32(0.587) * g + _f32(0.114) * b)[None]


def _mean_exact(x: torch.Tensor) -> float:
    """The float32 mean of ``x``: summed exactly (fsum), so no reduction order can change it."""
    return float(np.float32(math.fsum(x.double().reshape(-1).tolist()) / x.numel()))


def _warp_nearest(img: torch.Tensor, mat: tuple[float, float, float, float],
                  shift: tuple[float, float]) -> torch.Tensor:
    """Output pixel (x, y) takes the source pixel nearest to ``mat @ (x - cx, y - cy) + (cx, cy) - shift``
    (centre cx = (W-1)/2, cy = (H-1)/2); outside the image: 0. Coordinates in float64 numpy
    (separate ufuncs, no fused multiply-add); the pixels themselves are copied, never blended."""
    _, H, W = img.shape
    a, b, c, d = mat
    cx, cy = (W - 1) / 2.0, (H - 1) / 2.0
    dy, dx = np.mgrid[0:H, 0:W].astype(np.float64)
    dx, dy = dx - cx, dy - cy
    sx = np.floor(a * dx + b * dy + (cx - shift[0]) + 0.5).astype(np.int64)
    sy = np.floor(c * dx + d * dy + (cy - shift[1]) + 0.5).astype(np.int64)
    inside = (sx >= 0) & (sx < W) & (sy >= 0) & (sy < H)
    flat = torch.from_numpy(np.where(inside, sy * W + sx, 0).reshape(-1))
    out = img.reshape(img.shape[0], -1).index_select(1, flat).reshape(img.shape)
    return out * torch.from_numpy(inside.astype(np.float32))  # 0 outside; x * 1 is x exactly


# ---------------------------------------------------------------- ops
@dataclass
class ImageContext:
    """What an image op may know besides its own parameters."""

    size: tuple[int, int]  # the view (H, W)
    source_size: tuple[int, int] = (0, 0)  # the decoded source (H0, W0)
    num_samples: int = 1  # dataset size, for mixup/cutmix partners
    sample_index: int = 0
    load_partner: Callable[[int], torch.Tensor] | None = None  # dataset index -> the partner's *source*


class ImageOp(Op):
    """An image op (see :class:`logitcache.augment.Op`). ``size`` (the view's (H, W)) is set by
    the augmenter before use; ``fits``: the op turns the source into the view (must come first)."""

    fits = False
    size: tuple[int, int] = (0, 0)

    def __init__(self, **hyper):
        p = hyper.get("p", 1.0)
        if isinstance(p, bool) or not isinstance(p, (int, float)):
            raise LogitCacheError(f"augmentation op {self.name!r}: p={p!r} is not a number in [0, 1]")
        super().__init__(**hyper)
        self.check()

    def check(self) -> None:
        """Refuse bad settings with one line naming the op and the setting."""

    def bad(self, key: str, why: str) -> LogitCacheError:
        return LogitCacheError(f"augmentation op {self.name!r}: {key}={self.hyper[key]!r} {why}")

    def number(self, key: str, lo: float, hi: float = math.inf) -> float:
        v = self.hyper[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
            raise self.bad(key, f"is not a finite number {f'>= {lo}' if hi == math.inf else f'in [{lo}, {hi}]'}")
        return float(v)

    def integer(self, key: str, lo: int, hi: int) -> int:
        v = self.hyper[key]
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise self.bad(key, f"is not an integer in [{lo}, {hi}]")
        return v

    def interval(self, key: str, lo: float, hi: float = math.inf) -> tuple[float, float]:
        v = self.hyper[key]
        ok = isinstance(v, (list, tuple)) and len(v) == 2 and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)
        if not ok or not lo <= v[0] <= v[1] <= hi:
            raise self.bad(key, f"is not [low, high] with {lo} <= low <= high <= {hi}")
        return float(v[0]), float(v[1])

    def grid(self, size: tuple[int, int]) -> dict[str, tuple[int, int, int, int | None]]:
        """As :meth:`logitcache.augment.Op.grid`, given the view size."""
        return {}

    def draw(self, u, ctx):
        return {}


IMAGE_OPS: dict[str, type[ImageOp]] = {}  # apart from augment.OPS: audio and image ops share names


def register_image_op(cls: type[ImageOp]) -> type[ImageOp]:
    IMAGE_OPS[cls.name] = cls
    return cls


def _partner(u: float, ctx: ImageContext) -> int:
    """Any sample but the view's own (the audio mixup's rule)."""
    return (ctx.sample_index + 1 + int(u * (ctx.num_samples - 1))) % ctx.num_samples


def _load_partner(op: ImageOp, index: int, ctx: ImageContext) -> torch.Tensor:
    """The partner's source resized whole to the view: deterministic, no params of its own."""
    if ctx.load_partner is None:
        raise LogitCacheError(f"augmentation op {op.name!r} needs the dataset to load partner images")
    return resize(_checked_source(ctx.load_partner(index)), ctx.size)


@register_image_op
class Resize(ImageOp):
    """The deterministic fit: the whole source resized to the view (aspect ratio not kept). The
    augmenter's fit when no crop op is listed."""

    name = "resize"
    fits = True

    def apply(self, img, p, ctx):
        return resize(img, ctx.size)


@register_image_op
class RandomResizedCrop(ImageOp):
    """torchvision's RandomResizedCrop: a box of ``scale`` of the source area and aspect ratio
    (w/h) in ``ratio`` (log-uniform), 10 attempts, then its fallback (the centre crop of the
    whole image clamped to ``ratio``); resized to the view. ``box`` = [top, left, height, width]
    in source pixels. With probability 1 - p, the box is the whole source (a plain resize)."""

    name = "random_resized_crop"
    params = {"box": (_PIXEL_DTYPE, (4,))}
    defaults = {"scale": [0.08, 1.0], "ratio": [0.75, 4.0 / 3.0], "p": 1.0}
    fits = True
    ATTEMPTS = 10

    def check(self):
        self.interval("scale", 1e-9, 1.0)
        self.interval("ratio", 1e-9)

    def draw(self, u, ctx):
        H0, W0 = ctx.source_size
        if H0 <= 0 or W0 <= 0:
            raise LogitCacheError(f"augmentation op {self.name!r} needs the source size (context(source_size=...))")
        box = self._box(u, H0, W0) if u[0] < self.hyper["p"] else (0, 0, H0, W0)
        return {"box": np.array(box, np.int64)}

    def _box(self, u, H0: int, W0: int) -> tuple[int, int, int, int]:
        (s0, s1), (r0, r1) = self.interval("scale", 0), self.interval("ratio", 0)
        area, lr0, lr1 = H0 * W0, math.log(r0), math.log(r1)
        for a in range(self.ATTEMPTS):  # attempt a reads slots 1 + 4a .. 4 + 4a
            us, ur, ut, ul = u[1 + 4 * a: 5 + 4 * a]
            target = area * (s0 + us * (s1 - s0))
            aspect = math.exp(lr0 + ur * (lr1 - lr0))
            w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < w <= W0 and 0 < h <= H0:
                return int(ut * (H0 - h + 1)), int(ul * (W0 - w + 1)), h, w
        in_ratio = W0 / H0
        if in_ratio < r0:
            w, h = W0, int(round(W0 / r0))
        elif in_ratio > r1:
            h, w = H0, int(round(H0 * r1))
        else:
            h, w = H0, W0
        return (H0 - h) // 2, (W0 - w) // 2, h, w

    def apply(self, img, p, ctx):
        top, left, h, w = (int(v) for v in p["box"])
        if h <= 0 or w <= 0 or top < 0 or left < 0 or top + h > img.shape[1] or left + w > img.shape[2]:
            raise LogitCacheError(f"augmentation op {self.name!r}: box {[top, left, h, w]} is outside the "
                                  f"{img.shape[1]}x{img.shape[2]} source (is this the source the view was drawn from?)")
        return resize(img[:, top: top + h, left: left + w], ctx.size)


@register_image_op
class HFlip(ImageOp):
    name = "hflip"
    params = {"flip": ("uint8", ())}
    defaults = {"p": 0.5}

    def draw(self, u, ctx):
        return {"flip": np.uint8(u[0] < self.hyper["p"])}

    def apply(self, img, p, ctx):
        return torch.flip(img, [-1]) if int(p["flip"]) else img


@register_image_op
class ColorJitter(ImageOp):
    """torchvision's brightness, contrast and saturation jitter, in that fixed order (torchvision
    shuffles it; a fixed order keeps one stored factor per effect). A factor is drawn uniformly in
    [max(0, 1 - s), 1 + s] for setting s; 1.0 means untouched. No hue (its RGB<->HSV round trip
    is not worth its cost here)."""

    name = "color_jitter"
    params = {"brightness": ("float32", ()), "contrast": ("float32", ()), "saturation": ("float32", ())}
    defaults = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "p": 1.0}
    EFFECTS = ("brightness", "contrast", "saturation")

    def check(self):
        for k in self.EFFECTS:
            self.number(k, 0.0)

    def draw(self, u, ctx):
        out = {}
        for i, k in enumerate(self.EFFECTS):  # effect i reads slot 1 + i
            s = float(self.hyper[k])
            lo, hi = max(0.0, 1.0 - s), 1.0 + s
            out[k] = np.float32(lo + u[1 + i] * (hi - lo) if u[0] < self.hyper["p"] else 1.0)
        return out

    def apply(self, img, p, ctx):
        b, c, s = (float(p[k]) for k in self.EFFECTS)
        if b != 1.0:
            img = (img * _f32(b)).clamp(0.0, 1.0)
        if c != 1.0:
            img = _blend(img, _mean_exact(_grey(img)), c)
        if s != 1.0:
            img = _blend(img, _grey(img), s)
        return img


@register_image_op
class Mixup(ImageOp):
    """``lam * view + (1 - lam) * partner``, the partner's source resized whole to the view. Params
    named as audio's mixup (``partner`` -1: no mix), so labels mix the same way."""

    name = "mixup"
    params = {"partner": ("int64", ()), "lam": ("float32", ())}
    defaults = {"min_lam": 0.5, "max_lam": 1.0, "p": 0.5}

    def check(self):
        if not self.number("min_lam", 0.0, 1.0) <= self.number("max_lam", 0.0, 1.0):
            raise self.bad("max_lam", "is below min_lam")

    def draw(self, u, ctx):
        h = self.hyper
        if u[0] >= h["p"] or ctx.num_samples < 2:
            return {"partner": np.int64(-1), "lam": np.float32(1.0)}
        return {"partner": np.int64(_partner(u[1], ctx)),
                "lam": np.float32(h["min_lam"] + u[2] * (h["max_lam"] - h["min_lam"]))}

    def apply(self, img, p, ctx):
        partner = int(p["partner"])
        if partner < 0:
            return img
        lam = np.float32(p["lam"])
        return _f32(lam) * img + _f32(np.float32(1) - lam) * _load_partner(self, partner, ctx)


@register_image_op
class CutMix(ImageOp):
    """Paste the partner's pixels (its source resized whole to the view) into ``box`` = [top, left,
    height, width] in view pixels: CutMix's box (side sqrt(1 - lam0) of the view's, centred
    uniformly, clipped to the view, lam0 uniform in [min_lam, max_lam]; CutMix's alpha = 1).
    ``lam`` is the effective share of the view's own pixels, 1 - box area / view area, so the
    labels mix by it as for mixup; it lies on the grid k / (H * W)."""

    name = "cutmix"
    defaults = {"min_lam": 0.0, "max_lam": 1.0, "p": 0.5}

    @property
    def params(self):  # type: ignore[override]
        return {"partner": ("int64", ()), "lam": ("float32", ()), "box": (_int_dtype(0, max(self.size)), (4,))}

    def check(self):
        if not self.number("min_lam", 0.0, 1.0) <= self.number("max_lam", 0.0, 1.0):
            raise self.bad("max_lam", "is below min_lam")

    def draw(self, u, ctx):
        h, (H, W) = self.hyper, ctx.size
        if u[0] >= h["p"] or ctx.num_samples < 2:
            return {"partner": np.int64(-1), "lam": np.float32(1.0), "box": np.zeros(4, np.int64)}
        cut = math.sqrt(1.0 - (h["min_lam"] + u[2] * (h["max_lam"] - h["min_lam"])))
        ch, cw = int(H * cut), int(W * cut)
        cy, cx = int(u[3] * H), int(u[4] * W)
        y0, y1 = min(max(cy - ch // 2, 0), H), min(max(cy + ch // 2, 0), H)
        x0, x1 = min(max(cx - cw // 2, 0), W), min(max(cx + cw // 2, 0), W)
        kept = H * W - (y1 - y0) * (x1 - x0)
        return {"partner": np.int64(_partner(u[1], ctx)), "lam": np.float32(kept / (H * W)),
                "box": np.array([y0, x0, y1 - y0, x1 - x0], np.int64)}

    def grid(self, size):
        H, W = size
        return {"lam": (1, H * W, 0, H * W)}  # lam = kept pixels / view pixels, exactly

    def apply(self, img, p, ctx):
        partner = int(p["partner"])
        top, left, h, w = (int(v) for v in p["box"])
        if partner < 0 or h == 0 or w == 0:
            return img
        other = _load_partner(self, partner, ctx)
        img = img.clone()
        img[:, top: top + h, left: left + w] = other[:, top: top + h, left: left + w]
        return img


# RandAugment's op list: a stored op index means the name at that position, forever (append only).
RAND_AUGMENT_OPS = ("identity", "rotate", "translate_x", "translate_y", "shear_x", "shear_y", "posterize",
                    "solarize", "autocontrast")
_SIGNED = {"rotate", "translate_x", "translate_y", "shear_x", "shear_y"}


@register_image_op
class RandAugment(ImageOp):
    """torchvision's RandAugment (``num_ops`` = n, ``magnitude`` = m of 31 bins), without colour
    ops, equalize and sharpness. Per slot: ``op`` (index in :data:`RAND_AUGMENT_OPS`) and
    ``magnitude`` in the op's own unit, sign included: degrees (rotate, shear), view pixels
    (translate), bits kept (posterize), threshold in [0, 1] (solarize), 0 (identity,
    autocontrast). A slot is applied with probability p (else identity). Geometric ops sample
    the nearest pixel about the view centre and fill with 0, as torchvision's default."""

    name = "rand_augment"
    defaults = {"n": 2, "m": 9, "p": 1.0}
    BINS = 31
    MAX_N = _SLOTS_PER_OP // 3  # slot i reads uniforms 3i .. 3i + 2

    @property
    def params(self):  # type: ignore[override]
        n = int(self.hyper["n"])
        return {"op": ("uint8", (n,)), "magnitude": ("float32", (n,))}

    def check(self):
        self.integer("n", 0, self.MAX_N)
        self.integer("m", 0, self.BINS - 1)

    def magnitude(self, name: str, size: tuple[int, int]) -> float:
        """Torchvision's magnitude of bin m, unsigned, in the op's unit."""
        f = int(self.hyper["m"]) / (self.BINS - 1)
        if name == "rotate":
            return 30.0 * f
        if name in ("shear_x", "shear_y"):
            return math.degrees(math.atan(0.3 * f))
        if name in ("translate_x", "translate_y"):
            return float(int(150.0 / 331.0 * (size[1] if name == "translate_x" else size[0]) * f))
        if name == "posterize":
            return float(8 - int(round(4 * f)))
        if name == "solarize":
            return 1.0 - f
        return 0.0

    def draw(self, u, ctx):
        n = int(self.hyper["n"])
        ops, mags = np.zeros(n, np.int64), np.zeros(n, np.float32)
        for i in range(n):
            gate, pick, sign = u[3 * i: 3 * i + 3]
            if gate < self.hyper["p"]:
                ops[i] = int(pick * len(RAND_AUGMENT_OPS))
                name = RAND_AUGMENT_OPS[ops[i]]
                m = self.magnitude(name, ctx.size)
                mags[i] = -m if name in _SIGNED and sign < 0.5 else m
        return {"op": ops, "magnitude": mags}

    def apply(self, img, p, ctx):
        for k, mag in zip(p["op"], p["magnitude"]):
            img = _rand_augment_one(img, RAND_AUGMENT_OPS[int(k)], float(mag))
        return img


def _rand_augment_one(img: torch.Tensor, name: str, mag: float) -> torch.Tensor:
    if name == "identity":
        return img
    if name == "rotate":  # positive: counter-clockwise, as torchvision
        c, s = math.cos(math.radians(mag)), math.sin(math.radians(mag))
        return _warp_nearest(img, (c, -s, s, c), (0.0, 0.0))
    if name in ("translate_x", "translate_y"):  # positive: content moves right / down
        return _warp_nearest(img, (1.0, 0.0, 0.0, 1.0), (mag, 0.0) if name == "translate_x" else (0.0, mag))
    if name == "shear_x":
        return _warp_nearest(img, (1.0, -math.tan(math.radians(mag)), 0.0, 1.0), (0.0, 0.0))
    if name == "shear_y":
        return _warp_nearest(img, (1.0, 0.0, -math.tan(math.radians(mag)), 1.0), (0.0, 0.0))
    if name == "posterize":  # keep the top ``mag`` bits of the 8-bit value
        step = _f32(2.0 ** (8 - int(mag)))
        return torch.floor(torch.round(img * _f32(255.0)) / step) * step / _f32(255.0)
    if name == "solarize":
        return torch.where(img >= _f32(mag), _f32(1.0) - img, img)
    if name == "autocontrast":  # per channel (min, max) -> (0, 1); flat channels untouched
        lo, hi = img.amin(dim=(1, 2), keepdim=True), img.amax(dim=(1, 2), keepdim=True)
        flat = hi <= lo
        scale = torch.where(flat, _f32(1.0), _f32(1.0) / torch.where(flat, _f32(1.0), hi - lo))
        return ((img - torch.where(flat, _f32(0.0), lo)) * scale).clamp(0.0, 1.0)
    raise LogitCacheError(f"augmentation op 'rand_augment': unknown op {name!r}")


# ---------------------------------------------------------------- presets, spec, augmenter
IMAGE_PRESETS: dict[str, list[dict]] = {
    "image_none": [],  # the fit only: the whole source resized to the view
    # FKD / MEAL V2: crops and flips
    "image_basic": [{"op": "random_resized_crop"}, {"op": "hflip", "p": 0.5}],
    "image_strong": [
        {"op": "random_resized_crop"},
        {"op": "hflip", "p": 0.5},
        {"op": "color_jitter", "brightness": 0.4, "contrast": 0.4, "saturation": 0.4},
        {"op": "rand_augment", "n": 2, "m": 9},
        {"op": "mixup", "p": 0.5},
        {"op": "cutmix", "p": 0.5},
    ],
}


DEFAULT_PRESET = "image_basic"  # crops and flips, the recipe of FKD and MEAL V2


def load_image_ops_spec(name_or_file: str) -> list[dict]:
    """An image preset name, or a JSON/TOML file of ops (as :func:`logitcache.augment.load_ops_spec`)."""
    if name_or_file in IMAGE_PRESETS:
        return [dict(o) for o in IMAGE_PRESETS[name_or_file]]
    return load_ops_spec(name_or_file)


def _checked_source(source: torch.Tensor) -> torch.Tensor:
    if source.dim() != 3 or source.shape[0] != 3 or source.shape[1] < 1 or source.shape[2] < 1:
        raise LogitCacheError(f"image source has shape {list(source.shape)}, not [3, H, W]")
    return source.to(torch.float32)


def _checked_size(size) -> tuple[int, int]:
    ok = isinstance(size, (list, tuple)) and len(size) == 2 and all(
        isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
    if not ok:
        raise LogitCacheError(f"image augmentation size {size!r} is not [height, width] in positive pixels")
    return int(size[0]), int(size[1])


class ImageAugmenter:
    """The image op pipeline of a spec ``{"version", "modality": "image", "size": [H, W], "ops"}``;
    the interface of :class:`logitcache.augment.Augmenter`. The first op may be a fit op
    (``random_resized_crop`` or ``resize``); without one, ``resize`` is implied (not listed)."""

    modality = MODALITY

    def __init__(self, ops: list[dict], size):
        self.size = _checked_size(size)
        self.ops: list[ImageOp] = build_ops(ops, IMAGE_OPS, "image ")
        for i, op in enumerate(self.ops):
            if op.fits and i:
                raise LogitCacheError(f"augmentation op {op.name!r} must come first (it makes the view from the source)")
            op.size = self.size
        self._fit = self.ops[0] if self.ops and self.ops[0].fits else Resize()
        self._fit.size = self.size

    @classmethod
    def from_spec(cls, spec: dict) -> "ImageAugmenter":
        if spec.get("version") != SPEC_VERSION:
            raise LogitCacheError(f"augmentation spec version {spec.get('version')} is not supported "
                                  f"(this logitcache reads {SPEC_VERSION})")
        if spec.get("modality") != MODALITY:
            raise LogitCacheError(f"augmentation spec modality {spec.get('modality')!r} is not {MODALITY!r}")
        if not isinstance(spec.get("ops"), list):
            raise LogitCacheError(f"augmentation spec 'ops' is {spec.get('ops')!r}, not a list of ops")
        return cls(spec["ops"], spec.get("size"))

    @property
    def spec(self) -> dict:
        return {"version": SPEC_VERSION, "modality": MODALITY, "size": list(self.size),
                "ops": [op.spec() for op in self.ops]}

    @property
    def view_shape(self) -> tuple[int, int, int]:
        return (3, *self.size)

    @property
    def param_specs(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Stored parameter arrays: ``"op.param"`` -> (dtype, trailing shape)."""
        return param_specs_of(self.ops)

    def param_grid(self) -> dict[str, dict]:
        """As :meth:`logitcache.augment.Augmenter.param_grid`."""
        return param_grid_of(self.ops, self.size)

    @property
    def mixers(self) -> list[str]:
        """Ops that mix in a partner, in the order applied: each has ``partner`` and ``lam``, and a
        view's hard labels are ``y = lam * y + (1 - lam) * y[partner]`` for each in turn."""
        return [op.name for op in self.ops if isinstance(op, (Mixup, CutMix))]

    def context(self, **kw) -> ImageContext:
        if "source_size" in kw:
            kw["source_size"] = tuple(int(s) for s in kw["source_size"])
        return ImageContext(self.size, **kw)

    def draw(self, seed: int, ctx: ImageContext) -> dict[str, np.ndarray]:
        return draw_ops(self.ops, seed, ctx)

    def fit(self, source: torch.Tensor, params: dict[str, np.ndarray] | None = None) -> torch.Tensor:
        """The source made into a ``[3, H, W]`` view by the fit op (its stored params; without
        params, the whole source resized)."""
        source = _checked_source(source)
        if params is None or not self._fit.params:
            return resize(source, self.size)
        return self._fit.apply(source, _own(self._fit, params), self.context())

    def apply(self, source: torch.Tensor, params: dict[str, np.ndarray], ctx: ImageContext) -> torch.Tensor:
        """The view the teachers see: float32 ``[3, H, W]``."""
        img = self.fit(source, params)
        for op in self.ops:
            if not op.fits:
                img = op.apply(img, _own(op, params), ctx)
        return img.to(torch.float32).contiguous()


def _own(op: ImageOp, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    prefix = op.name + "."
    return {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}
