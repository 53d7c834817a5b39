"""Augmentations that replay exactly.

Two halves, kept apart on purpose:

* ``draw``: seed -> parameters in physical units (seconds, dB, Hz, partner id, lambda).
  Every draw reads a fixed *slot* of a counter-based generator (splitmix64 over
  ``seed + slot``), so a parameter never depends on how many random numbers another op
  consumed, on numpy's distribution code, or on the library version.
* ``apply``: parameters -> waveform. Pure function of the source audio and the stored
  parameters, computed per sample (never batched), so the view is bit-identical
  whatever the batch size, worker count or device count.

The dump stores exactly the (dtype-cast) parameters it applied, and training applies the
stored parameters; it never re-draws.
"""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from logitcache.errors import LogitCacheError

SPEC_VERSION = 1
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


# ---------------------------------------------------------------- counter-based randomness
def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, vectorised; a bijection on uint64 with good avalanche."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def id_hashes(ids: list[str]) -> np.ndarray:
    """A stable uint64 per sample id (blake2b), so seeds follow the id, not its row."""
    return np.array(
        [int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little") for i in ids],
        dtype=np.uint64,
    )


def view_seeds(base_seed: int, epoch: int, hashes: np.ndarray) -> np.ndarray:
    """uint64 seed of each (epoch, sample): a pure function of (base seed, epoch, sample id)."""
    with np.errstate(over="ignore"):
        key = splitmix64(np.uint64(base_seed & 0xFFFFFFFFFFFFFFFF)) ^ splitmix64(np.uint64(epoch) + _GOLDEN)
        return splitmix64(hashes ^ key)


def epoch_order(base_seed: int, epoch: int, hashes: np.ndarray) -> np.ndarray:
    """The stored order of an epoch: a seeded permutation of dataset indices (int64)."""
    keys = splitmix64(view_seeds(base_seed ^ 0x5DEECE66D, epoch, hashes))
    return np.argsort(keys, kind="stable").astype(np.int64)


def uniforms(seed: int, slot: int, n: int = 1) -> np.ndarray:
    """n float64 uniforms in [0, 1) read from fixed slots ``slot..slot+n`` of ``seed``'s stream."""
    with np.errstate(over="ignore"):
        counters = np.uint64(seed) + (np.arange(slot, slot + n, dtype=np.uint64) + np.uint64(1)) * _GOLDEN
    return (splitmix64(counters) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def gaussian_noise(seed: int, n: int) -> torch.Tensor:
    """Standard normal float32 noise from a uint64 seed (Box-Muller on our own uniforms)."""
    half = (n + 1) // 2
    u = uniforms(seed, 0, 2 * half)
    u1, u2 = np.maximum(u[:half], 1e-300), u[half:]
    r = np.sqrt(-2.0 * np.log(u1))
    z = np.concatenate([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)])[:n]
    return torch.from_numpy(z.astype(np.float32))


# ---------------------------------------------------------------- ops
@dataclass
class Context:
    """What an op may know besides its own parameters."""

    sample_rate: int
    clip_samples: int
    num_samples: int = 1  # dataset size, for mixup partners
    sample_index: int = 0
    source_samples: int = 0  # length of the decoded, resampled source audio
    load_partner: Callable[[int], torch.Tensor] | None = None  # dataset index -> clip-length waveform


class Op:
    """One augmentation. ``params`` maps parameter name -> (numpy dtype, trailing shape)."""

    name: str = ""
    params: dict[str, tuple[str, tuple[int, ...]]] = {}
    defaults: dict = {}

    def __init__(self, **hyper):
        unknown = set(hyper) - set(self.defaults)
        if unknown:
            raise LogitCacheError(
                f"augmentation op {self.name!r}: unknown setting(s) {sorted(unknown)}; known: {sorted(self.defaults)}"
            )
        self.hyper = {**self.defaults, **hyper}
        p = float(self.hyper.get("p", 1.0))
        if not 0.0 <= p <= 1.0:
            raise LogitCacheError(f"augmentation op {self.name!r}: p={p} is not in [0, 1]")

    def spec(self) -> dict:
        return {"op": self.name, **self.hyper}

    def draw(self, u: np.ndarray, ctx: Context) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def apply(self, wave: torch.Tensor, p: dict[str, np.ndarray], ctx: Context) -> torch.Tensor:
        raise NotImplementedError

    def grid(self, sample_rate: int, clip_samples: int) -> dict[str, tuple[int, int, int, int | None]]:
        """Params drawn on an integer grid: name -> (num, den, lo, hi). Every drawn value is
        ``float32(k * num / den)`` for an integer k in [lo, hi] (hi None: unbounded), so a cache
        stores k in the smallest integer dtype that holds [lo, hi] and decodes the same float32
        bit for bit. Params not listed are stored as drawn."""
        return {}


OPS: dict[str, type[Op]] = {}


def register_op(cls: type[Op]) -> type[Op]:
    OPS[cls.name] = cls
    return cls


def _int_dtype(lo: int, hi: int | None) -> str:
    """The smallest integer dtype holding [lo, hi] (hi None: int64)."""
    if hi is not None:
        for name in ("uint8", "int8", "uint16", "int16", "uint32", "int32"):
            info = np.iinfo(name)
            if info.min <= lo and hi <= info.max:
                return name
    return "int64"


def _float32(x: torch.Tensor) -> torch.Tensor:
    """``x.to(torch.float32)`` without its cost where it is one already (~8 us a call here, per view)."""
    return x if x.dtype == torch.float32 else x.to(torch.float32)


def _to_samples(seconds: float, sr: int) -> int:
    return int(round(float(seconds) * sr))


@register_op
class Crop(Op):
    """Random crop of sources longer than the clip (shorter ones are zero-padded at the end)."""

    name = "crop"
    params = {"start_s": ("float32", ())}
    defaults = {"p": 1.0}

    def draw(self, u, ctx):
        slack = max(ctx.source_samples - ctx.clip_samples, 0)
        start = int(u[1] * (slack + 1)) if u[0] < self.hyper["p"] else 0
        return {"start_s": np.float32(start / ctx.sample_rate)}

    def apply(self, wave, p, ctx):
        return wave  # applied by fit_clip() before the ops run; kept here so the spec lists it

    def grid(self, sample_rate, clip_samples):
        return {"start_s": (1, sample_rate, 0, None)}  # sources have no length limit


@register_op
class Shift(Op):
    """Circular time shift (roll) by up to ``max_fraction`` of the clip, either direction."""

    name = "shift"
    params = {"seconds": ("float32", ())}
    defaults = {"max_fraction": 0.5, "p": 0.5}

    def draw(self, u, ctx):
        if u[0] >= self.hyper["p"]:
            return {"seconds": np.float32(0.0)}
        max_shift = int(self.hyper["max_fraction"] * ctx.clip_samples)
        shift = int(u[1] * (2 * max_shift + 1)) - max_shift
        return {"seconds": np.float32(shift / ctx.sample_rate)}

    def apply(self, wave, p, ctx):
        shift = _to_samples(p["seconds"], ctx.sample_rate)
        return torch.roll(wave, shift) if shift else wave

    def grid(self, sample_rate, clip_samples):
        m = int(self.hyper["max_fraction"] * clip_samples)
        return {"seconds": (1, sample_rate, -m, m)}


@register_op
class Gain(Op):
    name = "gain"
    params = {"db": ("float32", ())}
    defaults = {"min_db": -6.0, "max_db": 6.0, "p": 1.0}

    def draw(self, u, ctx):
        h = self.hyper
        db = h["min_db"] + u[1] * (h["max_db"] - h["min_db"]) if u[0] < h["p"] else 0.0
        return {"db": np.float32(db)}

    def apply(self, wave, p, ctx):
        db = float(p["db"])
        return wave * np.float32(10.0 ** (db / 20.0)) if db else wave


@register_op
class Noise(Op):
    """Additive white noise at a drawn SNR (dB) relative to the signal's RMS; +inf means off."""

    name = "noise"
    params = {"snr_db": ("float32", ()), "seed": ("uint64", ())}
    defaults = {"min_snr_db": 10.0, "max_snr_db": 40.0, "p": 0.5}

    def draw(self, u, ctx):
        h = self.hyper
        if u[0] >= h["p"]:
            return {"snr_db": np.float32(np.inf), "seed": np.uint64(0)}
        snr = h["min_snr_db"] + u[1] * (h["max_snr_db"] - h["min_snr_db"])
        seed = np.uint64(int(u[2] * 2**53))
        return {"snr_db": np.float32(snr), "seed": seed}

    def apply(self, wave, p, ctx):
        snr = float(p["snr_db"])
        if not math.isfinite(snr):
            return wave
        rms = float(torch.sqrt(torch.mean(wave.double() ** 2)))
        scale = np.float32(rms * 10.0 ** (-snr / 20.0))
        return wave + scale * gaussian_noise(int(p["seed"]), wave.shape[-1])


@register_op
class TimeMask(Op):
    """Zero ``count`` spans of up to ``max_seconds`` each (positions in seconds)."""

    name = "time_mask"
    defaults = {"count": 1, "max_seconds": 0.2, "p": 1.0}

    @property
    def params(self):  # type: ignore[override]
        c = int(self.hyper["count"])
        return {"start_s": ("float32", (c,)), "width_s": ("float32", (c,))}

    def draw(self, u, ctx):
        c, sr = int(self.hyper["count"]), ctx.sample_rate
        max_w = _to_samples(self.hyper["max_seconds"], sr)
        starts, widths = np.zeros(c, np.float32), np.zeros(c, np.float32)
        for i in range(c):
            a, b, g = u[3 * i : 3 * i + 3]
            if g < self.hyper["p"]:
                w = int(a * (max_w + 1))
                starts[i] = int(b * (ctx.clip_samples - w + 1)) / sr
                widths[i] = w / sr
        return {"start_s": starts, "width_s": widths}

    def apply(self, wave, p, ctx):
        sr = ctx.sample_rate
        for start, width in zip(p["start_s"], p["width_s"]):
            a, w = _to_samples(start, sr), _to_samples(width, sr)
            if w:
                wave = wave.clone()
                wave[a : a + w] = 0.0
        return wave

    def grid(self, sample_rate, clip_samples):
        max_w = _to_samples(self.hyper["max_seconds"], sample_rate)
        return {"start_s": (1, sample_rate, 0, clip_samples), "width_s": (1, sample_rate, 0, max_w)}


@lru_cache(maxsize=8)
def _hann(n_fft: int) -> torch.Tensor:
    return torch.hann_window(n_fft)  # only read (stft, istft): shared by every view


def _stft(wave: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    """``torch.stft(wave, n_fft, hop, window=hann, return_complex=True)`` (centered, reflect
    padded, one-sided) of a 1-D wave, bit for bit: the same padding, frames times the window and
    the same real FFT, without torch.stft's argument handling (~25% of its time on a 1 s clip)."""
    pad = n_fft // 2
    padded = torch.nn.functional.pad(wave.reshape(1, 1, -1), [pad, pad], "reflect").view(-1)
    return torch.fft.rfft(padded.unfold(-1, n_fft, hop) * _hann(n_fft)).mT


def _istft(spec: torch.Tensor, n_fft: int, hop: int, length: int) -> torch.Tensor:
    """``torch.istft(spec, n_fft, hop, window=hann, length=length)`` (centered, one-sided), bit
    for bit: the same inverse FFT, then the window, the overlap-add in frame order and the
    division by the window's envelope done as whole-array numpy work, with the envelope made
    once per shape. torch's overlap-add and envelope cost ~2/3 of its istft of a 1 s clip."""
    frames = spec.shape[-1]
    envelope = _istft_envelope(n_fft, hop, frames, length) if spec.dim() == 2 and n_fft % hop == 0 else None
    if envelope is None:  # a shape the fast path does not cover: torch's own
        return torch.istft(spec, n_fft, hop_length=hop, window=_hann(n_fft), length=length)
    y = torch.fft.irfft(spec.mT, n=n_fft, dim=-1).numpy()
    y *= _hann(n_fft).numpy()
    start = n_fft // 2
    return torch.from_numpy(_overlap_add(y, hop)[start:start + length] / envelope)


def _overlap_add(frames: np.ndarray, hop: int) -> np.ndarray:
    """Frames ``[T, n_fft]`` summed at ``hop`` apart, each output sample adding its frames in
    frame order from zero (as torch's istft sums them: the float sums are the same)."""
    T, n_fft = frames.shape
    r = n_fft // hop
    blocks = frames.reshape(T, r, hop)
    out = np.zeros((T + r - 1, hop), np.float32)
    for q in range(r - 1, -1, -1):  # block b takes frame b-r+1 first, frame b last
        out[q:q + T] += blocks[:, q]
    return out.reshape(-1)


@lru_cache(maxsize=8)
def _istft_envelope(n_fft: int, hop: int, frames: int, length: int) -> np.ndarray | None:
    """The squared window's overlap-add over the output samples torch.istft keeps; None where it
    is (nearly) zero (torch refuses those: its error, from its own istft) or too short."""
    w2 = np.square(_hann(n_fft).numpy())
    env = _overlap_add(np.broadcast_to(w2, (frames, n_fft)).copy(), hop)[n_fft // 2:n_fft // 2 + length]
    if len(env) < length or not np.abs(env).min() > 1e-11:
        return None
    return env


@lru_cache(maxsize=8)
def _band_freqs(sample_rate: int, bins: int) -> np.ndarray:
    """Each STFT bin's frequency in Hz, float32 (torch.linspace's values, once per rate)."""
    return torch.linspace(0, sample_rate / 2, bins).numpy()


@register_op
class FreqMask(Op):
    """Zero a band [low, low+width) Hz in the STFT domain and resynthesise the waveform."""

    name = "freq_mask"
    defaults = {"count": 1, "max_hz": 1000.0, "n_fft": 512, "p": 1.0}

    @property
    def params(self):  # type: ignore[override]
        c = int(self.hyper["count"])
        return {"low_hz": ("float32", (c,)), "width_hz": ("float32", (c,))}

    def _bins(self, sample_rate: int) -> tuple[int, int]:
        """(the Nyquist bin, the widest band in bins) of the op's STFT."""
        n_fft = int(self.hyper["n_fft"])
        half = n_fft // 2
        return half, min(int(float(self.hyper["max_hz"]) * n_fft / sample_rate), half)

    def draw(self, u, ctx):
        # Bands are drawn in whole STFT bins (the resolution the mask acts at), stored in Hz:
        # low = j * sr / n_fft exactly, so a cache stores the integers j and m (see grid()).
        c, sr, n_fft = int(self.hyper["count"]), ctx.sample_rate, int(self.hyper["n_fft"])
        half, max_bins = self._bins(sr)
        lows, widths = np.zeros(c, np.float32), np.zeros(c, np.float32)
        for i in range(c):
            a, b, g = u[3 * i : 3 * i + 3]
            if g < self.hyper["p"]:
                m = int(a * (max_bins + 1))
                j = int(b * (half - m + 1))
                lows[i], widths[i] = j * sr / n_fft, m * sr / n_fft
        return {"low_hz": lows, "width_hz": widths}

    def grid(self, sample_rate, clip_samples):
        half, max_bins = self._bins(sample_rate)
        n_fft = int(self.hyper["n_fft"])
        return {"low_hz": (sample_rate, n_fft, 0, half), "width_hz": (sample_rate, n_fft, 0, max_bins)}

    def apply(self, wave, p, ctx):
        bands = [(float(lo), float(w)) for lo, w in zip(p["low_hz"], p["width_hz"]) if w > 0]
        if not bands:
            return wave
        n_fft = int(self.hyper["n_fft"])
        spec = _stft(wave, n_fft, n_fft // 4)
        freqs = _band_freqs(ctx.sample_rate, spec.shape[0])
        keep = np.ones(len(freqs), np.float32)  # numpy: on 257 bins each torch op costs more than its work
        for lo, w in bands:  # compared in float32, as torch compares a float32 tensor with a number
            keep[(freqs >= np.float32(lo)) & (freqs < np.float32(lo + w))] = 0.0
        spec = spec * torch.from_numpy(keep)[:, None]
        return _istft(spec, n_fft, n_fft // 4, wave.shape[-1])


@register_op
class Mixup(Op):
    """Mix with a partner clip: ``lam * x + (1 - lam) * partner``. The teachers see the real mix.

    The partner is stored by dataset index (``partner`` = -1 means no mix) together with lambda.
    """

    name = "mixup"
    params = {"partner": ("int64", ()), "lam": ("float32", ())}
    defaults = {"min_lam": 0.5, "max_lam": 1.0, "p": 0.5}

    def draw(self, u, ctx):
        h = self.hyper
        if u[0] >= h["p"] or ctx.num_samples < 2:
            return {"partner": np.int64(-1), "lam": np.float32(1.0)}
        partner = (ctx.sample_index + 1 + int(u[1] * (ctx.num_samples - 1))) % ctx.num_samples
        lam = h["min_lam"] + u[2] * (h["max_lam"] - h["min_lam"])
        return {"partner": np.int64(partner), "lam": np.float32(lam)}

    def apply(self, wave, p, ctx):
        partner = int(p["partner"])
        if partner < 0:
            return wave
        if ctx.load_partner is None:
            raise LogitCacheError("mixup needs the dataset to load partner clips")
        lam = np.float32(p["lam"])
        return lam * wave + (np.float32(1.0) - lam) * ctx.load_partner(partner)


# ---------------------------------------------------------------- presets and specs
PRESETS: dict[str, list[dict]] = {
    "none": [],
    # CED's recipe, without its correlated masks: roll +-50% (p=0.5), one time and one frequency mask.
    "ced": [
        {"op": "shift", "max_fraction": 0.5, "p": 0.5},
        {"op": "time_mask", "count": 1, "max_seconds": 0.2},
        {"op": "freq_mask", "count": 1, "max_hz": 1000.0},
    ],
    "strong": [
        {"op": "crop"},
        {"op": "shift", "max_fraction": 0.5, "p": 0.5},
        {"op": "gain", "min_db": -6.0, "max_db": 6.0},
        {"op": "mixup", "p": 0.5},
        {"op": "noise", "p": 0.5},
        {"op": "time_mask", "count": 2, "max_seconds": 0.2},
        {"op": "freq_mask", "count": 2, "max_hz": 800.0},
    ],
}
DEFAULT_PRESET = "ced"
_SLOTS_PER_OP = 64


def load_ops_spec(name_or_file: str, presets: dict[str, list[dict]] | None = None) -> list[dict]:
    """A preset name (of ``presets``, default the audio ones), or a JSON/TOML file holding
    ``ops = [...]`` (or a bare JSON list)."""
    presets = PRESETS if presets is None else presets
    if name_or_file in presets:
        return [dict(o) for o in presets[name_or_file]]
    path = Path(name_or_file)
    if not path.is_file():
        raise LogitCacheError(
            f"augmentation {name_or_file!r} is neither a preset ({', '.join(presets)}) nor a JSON/TOML file"
        )
    try:
        doc = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise LogitCacheError(f"{path}: not valid {path.suffix.lstrip('.') or 'JSON'}: {e}") from None
    ops = doc.get("ops") if isinstance(doc, dict) else doc
    if not isinstance(ops, list) or not all(isinstance(o, dict) and "op" in o for o in ops):
        raise LogitCacheError(f"{path}: expected a list of ops like [{{\"op\": \"shift\", ...}}]")
    return ops


def build_ops(specs: list[dict], registry: dict, what: str = "", twice: str = "") -> list:
    """The ops of a pipeline from their specs (``{"op": name, **settings}``), from ``registry``
    (name -> op class); each op once. ``what`` names the modality in the unknown-op error."""
    out = []
    for o in specs:
        o = dict(o)
        name = o.pop("op", None)
        if name not in registry:
            raise LogitCacheError(f"unknown {what}augmentation op {name!r}; known: {', '.join(registry)}")
        if any(op.name == name for op in out):
            raise LogitCacheError(f"augmentation op {name!r} is listed twice{twice}")
        out.append(registry[name](**o))
    return out


def param_specs_of(ops: list) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``"op.param"`` -> (dtype, trailing shape) of every op's stored parameters (any modality)."""
    return {f"{op.name}.{k}": v for op in ops for k, v in op.params.items()}


def param_grid_of(ops: list, *grid_args) -> dict[str, dict]:
    """``"op.param"`` -> {"dtype", "num", "den"} of the params each op draws on an integer grid,
    ``op.grid(*grid_args)`` (what the modality's ops need to size it: audio rate and clip samples,
    image size, token window length)."""
    return {f"{op.name}.{k}": {"dtype": _int_dtype(lo, hi), "num": int(num), "den": int(den)}
            for op in ops for k, (num, den, lo, hi) in op.grid(*grid_args).items()}


def draw_ops(ops: list, seed: int, ctx) -> dict[str, np.ndarray]:
    """Every op's parameters for one view, ``"op.param"`` -> array: op i reads the fixed slots
    ``64 i ...`` of ``seed``'s stream, so no op's draw depends on another's (any modality)."""
    out = {}
    if not ops:  # augment none: no numpy work per view
        return out
    every = uniforms(int(seed), 0, _SLOTS_PER_OP * len(ops))  # one call: a slot's value is its own
    for i, op in enumerate(ops):
        u = every[i * _SLOTS_PER_OP:(i + 1) * _SLOTS_PER_OP]
        for k, v in op.draw(u, ctx).items():
            dtype, shape = op.params[k]
            out[f"{op.name}.{k}"] = np.asarray(v, dtype=dtype).reshape(shape)
    return out


class Augmenter:
    """Builds the op pipeline from a spec; ``spec`` round-trips through the cache manifest."""

    def __init__(self, ops: list[dict], sample_rate: int, clip_seconds: float):
        self.sample_rate = int(sample_rate)
        self.clip_seconds = float(clip_seconds)
        self.clip_samples = int(round(self.clip_seconds * self.sample_rate))
        self.ops: list[Op] = build_ops(ops, OPS, twice="; use its 'count' setting")
        if any(op.name == "crop" for op in self.ops[1:]):
            raise LogitCacheError("augmentation op 'crop' must come first")

    @classmethod
    def from_spec(cls, spec: dict) -> "Augmenter":
        """The augmenter of a spec, audio or image by its ``modality`` (absent: audio)."""
        modality = spec.get("modality", "audio")
        if modality != "audio":
            return _augmenter_class(modality).from_spec(spec)
        if spec.get("version") != SPEC_VERSION:
            raise LogitCacheError(
                f"augmentation spec version {spec.get('version')} is not supported (this logitcache reads {SPEC_VERSION})"
            )
        return cls(spec["ops"], spec["sample_rate"], spec["clip_seconds"])

    @property
    def spec(self) -> dict:
        return {
            "version": SPEC_VERSION,
            "sample_rate": self.sample_rate,
            "clip_seconds": self.clip_seconds,
            "ops": [op.spec() for op in self.ops],
        }

    @property
    def mixers(self) -> list[str]:
        """Ops that mix in a partner (``partner`` and ``lam`` params), in the order applied: the
        hard labels are mixed the same way (views.batch_labels)."""
        return [op.name for op in self.ops if op.name == "mixup"]

    @property
    def param_specs(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Stored parameter arrays: ``"op.param"`` -> (dtype, trailing shape)."""
        return param_specs_of(self.ops)

    def param_grid(self) -> dict[str, dict]:
        """``"op.param"`` -> {"dtype", "num", "den"} for params drawn on an integer grid (see
        :meth:`Op.grid`): what a format-2 manifest stores as ``param_storage``."""
        return param_grid_of(self.ops, self.sample_rate, self.clip_samples)

    def context(self, **kw) -> Context:
        return Context(self.sample_rate, self.clip_samples, **kw)

    def draw(self, seed: int, ctx: Context) -> dict[str, np.ndarray]:
        return draw_ops(self.ops, seed, ctx)

    @property
    def view_shape(self) -> tuple[int, ...]:
        """Shape of one view (teachers take ``[B, *view_shape]``)."""
        return (self.clip_samples,)

    def fit(self, source: torch.Tensor, params: dict[str, np.ndarray] | None = None) -> torch.Tensor:
        """The source fitted to the view shape without the random ops (evaluation views)."""
        return self.fit_clip(source, params)

    def fit_clip(self, source: torch.Tensor, params: dict[str, np.ndarray] | None = None,
                 share: bool = False) -> torch.Tensor:
        """Crop (at the stored start, default 0) or zero-pad the source to the clip length
        (``share``: a crop may be a view of the source's memory, see :meth:`apply`)."""
        start = _to_samples(params["crop.start_s"], self.sample_rate) if params and "crop.start_s" in params else 0
        clip = source[start : start + self.clip_samples]
        if clip.shape[-1] < self.clip_samples:  # a new tensor already
            return torch.nn.functional.pad(clip, (0, self.clip_samples - clip.shape[-1]))
        return clip if share else clip.clone()  # the decoded source may be a cached tensor shared with other views

    def apply(self, source: torch.Tensor, params: dict[str, np.ndarray], ctx: Context,
              share: bool = False) -> torch.Tensor:
        """The view the teachers see: float32 ``[clip_samples]``. With ``share`` it may be the
        source's own memory where no op made a new tensor (no op writes into its input): for a
        caller that copies it at once (``collate_views`` stacks the batch), one copy less per
        view (a 10 s clip's copy and its page faults cost ~0.1 ms)."""
        wave = self.fit_clip(_float32(source), params, share)
        for op in self.ops:
            prefix = op.name + "."
            wave = op.apply(wave, {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}, ctx)
        return _float32(wave).contiguous()


# ---------------------------------------------------------------- modalities
MODALITIES = ("audio", "image", "tokens")


def _image_module():
    from logitcache import augment_image  # imported on use: audio never pays for it

    return augment_image


def _tokens_module():
    from logitcache import augment_tokens

    return augment_tokens


def _augmenter_class(modality: str):
    if modality == "image":
        return _image_module().ImageAugmenter
    if modality == "tokens":
        return _tokens_module().TokenAugmenter
    raise LogitCacheError(f"augmentation spec modality {modality!r} is not supported (known: {', '.join(MODALITIES)})")


def presets_for(modality: str) -> tuple[dict[str, list[dict]], str]:
    """(preset name -> ops, the default preset) of a modality."""
    if modality == "audio":
        return PRESETS, DEFAULT_PRESET
    if modality == "tokens":
        return _tokens_module().TOKEN_PRESETS, _tokens_module().DEFAULT_PRESET
    module = _image_module()
    return module.IMAGE_PRESETS, module.DEFAULT_PRESET


def make_spec(modality: str, ops: list[dict], settings: dict) -> dict:
    """An augmentation spec of ``modality`` from its ops and settings (audio ``sample_rate`` and
    ``clip_seconds``; image ``size`` [H, W]): what :meth:`Augmenter.from_spec` builds from."""
    if modality == "audio":
        return {"version": SPEC_VERSION, "sample_rate": settings["sample_rate"],
                "clip_seconds": settings["clip_seconds"], "ops": ops}
    if modality == "image":
        return {"version": SPEC_VERSION, "modality": "image", "size": list(settings["size"]), "ops": ops}
    if modality == "tokens":
        return {"version": SPEC_VERSION, "modality": "tokens", "context": settings["context"],
                "vocab_size": settings["vocab_size"], "ops": ops}
    _augmenter_class(modality)
    raise AssertionError(modality)


def view_rate(augmenter) -> int | None:
    """The sample rate views are drawn at (None for images): what teachers declaring their own
    rate are resampled from, and what audio students are built for."""
    rate = augmenter.spec.get("sample_rate")
    return None if rate is None else int(rate)
