"""A small model zoo of audio taggers: the default student and a few demo teachers.

Every model maps a float32 waveform [B, samples] at its sample rate to logits: [B, num_classes]
(clip level) or [B, frames, num_classes] (frame level, when built with ``frames=N``). They share
one log-mel front end, so a model is "waveform in, logits out" and can be exported as a single
torch.export program that a dump can replay without this module's Python code.

The architectures differ on purpose (2-D CNN, CNN + GRU, patch transformer) so that a three-teacher
ensemble makes different mistakes, which is what makes ensemble distillation worth the cache.

    model = create_model("cnn_tiny", num_classes=10)
    logits = model(torch.randn(8, 32000))            # [8, 10]
    export_model(model, "student.pt2", 16000, 32000)
"""

from __future__ import annotations

import json
import numbers
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchaudio

from logitcache.errors import LogitCacheError

# -----------------------------------------------------------------------------
# registry

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}

# keys of create_model's **kwargs that configure the shared front end rather than the architecture
_FRONTEND_KEYS = ("n_mels", "f_min", "f_max", "win_ms", "hop_ms")


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register an encoder builder under its function name.

    The builder is called as ``fn(n_mels, **kwargs)`` and returns an ``nn.Module`` mapping log-mel
    features [B, n_mels, T] to features [B, out_dim, T'] with attributes ``out_dim`` (int) and
    ``pool`` ("meanmax" or "mean", how the clip-level head summarises time).
    """
    if fn.__name__ in _REGISTRY:
        raise LogitCacheError(f"model {fn.__name__!r} is already registered")
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted."""
    return sorted(_REGISTRY)


def create_model(
    name: str,
    num_classes: int,
    sample_rate: int = 16000,
    frames: int | None = None,
    *,
    seed: int | None = None,
    **kwargs,
) -> nn.Module:
    """Build a registered model (waveform [B, samples] -> logits).

    ``frames=None`` gives clip logits [B, num_classes]; an int gives frame logits
    [B, frames, num_classes] for any input length. Front-end options (``n_mels`` default 64,
    ``f_min``, ``f_max``, ``win_ms``, ``hop_ms``) and architecture options (e.g. ``width``) go in
    ``kwargs``. ``seed`` makes the initial weights reproducible without touching the global RNG.
    The returned model carries ``model.config``, enough to rebuild it: ``create_model(**config)``.
    Inputs need at least ~0.1 s of audio (the encoders downsample time by up to 8x).
    """
    if name in _IMAGE_REGISTRY:
        return _create_image_model(name, num_classes, frames, seed, **kwargs)
    if name in _TOKEN_REGISTRY:
        return _create_token_model(name, num_classes, frames, seed, **kwargs)
    if name not in _REGISTRY:
        raise LogitCacheError(f"unknown model {name!r}; choose one of: "
                              f"{', '.join(list_models() + list_image_models() + sorted(_TOKEN_REGISTRY))}")
    if not _is_int(num_classes) or num_classes < 1:
        raise LogitCacheError(f"num_classes must be a positive int, got {num_classes!r}")
    if sample_rate is None:  # what students are offered for image views
        raise LogitCacheError(f"model {name!r} takes audio, and the views are images; choose one of: "
                              f"{', '.join(list_image_models())}")
    if not _is_int(sample_rate) or sample_rate < 1000:
        raise LogitCacheError(f"sample_rate must be an int >= 1000 Hz, got {sample_rate!r}")
    if frames is not None and (not _is_int(frames) or frames < 1):
        raise LogitCacheError(f"frames must be None (clip level) or a positive int, got {frames!r}")
    # plain ints, so the config stays JSON-serialisable when numpy integers come in
    num_classes, sample_rate = int(num_classes), int(sample_rate)
    frames = None if frames is None else int(frames)

    front_kw = {k: kwargs.pop(k) for k in _FRONTEND_KEYS if k in kwargs}
    front_kw.setdefault("n_mels", 64)
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        try:
            frontend = LogMel(sample_rate, **front_kw)
            encoder = _REGISTRY[name](front_kw["n_mels"], **kwargs)
        except TypeError as e:
            # a misspelt option should read like any other bad input, not like a crash
            raise LogitCacheError(f"bad options for model {name!r}: {e}") from None
        model = AudioTagger(frontend, encoder, num_classes, frames)
    model.config = {"name": name, "num_classes": num_classes, "sample_rate": sample_rate,
                    "frames": frames, **front_kw, **kwargs}
    return model


# -----------------------------------------------------------------------------
# image models: float32 images [B, 3, H, W] in [0, 1] -> clip logits [B, num_classes]

_IMAGE_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_image_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register an image classifier builder ``fn(num_classes, **kwargs)`` under its function name."""
    if fn.__name__ in _REGISTRY or fn.__name__ in _IMAGE_REGISTRY:
        raise LogitCacheError(f"model {fn.__name__!r} is already registered")
    _IMAGE_REGISTRY[fn.__name__] = fn
    return fn


def list_image_models() -> list[str]:
    """Image model names accepted by :func:`create_model`, sorted."""
    return sorted(_IMAGE_REGISTRY)


def _create_image_model(name: str, num_classes, frames, seed, positions=None, **kwargs) -> nn.Module:
    if not _is_int(num_classes) or num_classes < 1:
        raise LogitCacheError(f"num_classes must be a positive int, got {num_classes!r}")
    dense = name in _DENSE_IMAGE_MODELS
    if frames is not None:
        raise LogitCacheError(f"model {name!r} gives {'dense-map' if dense else 'clip-level'} logits, not frames "
                              f"(frames={frames!r})")
    if positions is not None and not dense:
        raise LogitCacheError(f"model {name!r} gives clip-level logits and the targets are a "
                              f"{'x'.join(map(str, positions))} map; choose one of: {', '.join(_DENSE_IMAGE_MODELS)}")
    kwargs.pop("sample_rate", None)
    if dense:
        kwargs["positions"] = None if positions is None else [int(p) for p in positions]
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        try:
            model = _IMAGE_REGISTRY[name](int(num_classes), **kwargs)
        except TypeError as e:
            raise LogitCacheError(f"bad options for model {name!r}: {e}") from None
    model.config = {"name": name, "num_classes": int(num_classes), "frames": None, **kwargs}
    return model


@register_image_model
def image_cnn_tiny(num_classes: int, width: int = 16) -> nn.Module:
    """Two strided 3x3 convolutions, global average pooling, a linear classifier."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))


@register_image_model
def image_cnn_small(num_classes: int, width: int = 16) -> nn.Module:
    """``image_cnn_tiny`` that keeps a 4x4 layout before its classifier (digits need where the
    strokes are, which global pooling throws away)."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(2 * width * 16, num_classes))


@register_image_model
def image_dense_tiny(num_classes: int, width: int = 16, positions: list[int] | None = None) -> nn.Module:
    """A dense-map student: two strided 3x3 convolutions, average-pooled to ``positions`` (H', W')
    (default: the body's own 1/4-resolution map), a 1x1-convolution head; logits ``[B, H', W', C]``
    channels last, as dense-map teachers give them."""
    pool = nn.AdaptiveAvgPool2d(tuple(positions)) if positions else nn.Identity()
    return nn.Sequential(
        nn.Conv2d(3, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        pool, nn.Conv2d(2 * width, num_classes, 1), _ChannelsLast())


class _ChannelsLast(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


_DENSE_IMAGE_MODELS = ("image_dense_tiny",)


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def model_config(model: nn.Module) -> dict:
    """The ``create_model`` arguments that rebuild ``model``'s architecture (a copy)."""
    config = getattr(model, "config", None)
    if not isinstance(config, dict):
        raise LogitCacheError(f"{type(model).__name__} was not built by create_model; it has no config")
    return dict(config)


def num_params(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

# -----------------------------------------------------------------------------
# shared parts


class LogMel(nn.Module):
    """Waveform [B, samples] -> standardised log-mel [B, n_mels, T], T = samples // hop + 1."""

    def __init__(self, sample_rate: int, n_mels: int = 64, f_min: float = 0.0, f_max: float | None = None,
                 win_ms: float = 25.0, hop_ms: float = 10.0):
        super().__init__()
        win = round(sample_rate * win_ms / 1000)
        hop = round(sample_rate * hop_ms / 1000)
        n_fft = 1 << (win - 1).bit_length()  # next power of two: fast FFT, finer bins than needed
        # narrow low mel filters (many mels at a low rate) can fall between FFT bins and stay all-zero;
        # zero-padding the window further gives finer bins without changing the time resolution
        while n_fft < 8 * win and _has_empty_filter(n_fft, sample_rate, n_mels, f_min, f_max):
            n_fft *= 2
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate, n_fft=n_fft, win_length=win, hop_length=hop, f_min=f_min, f_max=f_max,
            n_mels=n_mels, power=2.0)
        # a periodic Hann window is a view into a one-longer tensor; torch.export.load warns about
        # such partial storages ("No complete tensor found"), so store a compact copy
        self.mel.spectrogram.window = self.mel.spectrogram.window.clone()
        # per-band standardisation learned from data (PANNs' "bn0"): log-mel levels differ by tens
        # of dB across bands, and a fixed scaling would need dataset statistics up front
        self.norm = nn.BatchNorm1d(n_mels)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        return self.norm(torch.log(self.mel(wav) + 1e-6))


def _has_empty_filter(n_fft: int, sample_rate: int, n_mels: int, f_min: float, f_max: float | None) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchaudio warns about exactly what we are testing for
        fb = torchaudio.functional.melscale_fbanks(n_fft // 2 + 1, f_min, f_max or sample_rate / 2, n_mels,
                                                   sample_rate)
    return bool((fb.sum(0) == 0).any())


class AudioTagger(nn.Module):
    """Front end -> encoder [B, D, T'] -> clip logits [B, C] or frame logits [B, frames, C]."""

    def __init__(self, frontend: nn.Module, encoder: nn.Module, num_classes: int, frames: int | None):
        super().__init__()
        self.frontend = frontend
        self.encoder = encoder
        self.frames = frames
        self.pool = encoder.pool
        self.fc = nn.Linear(encoder.out_dim, num_classes)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.frontend(wav))  # [B, D, T']
        if self.frames is not None:
            # adaptive pooling repeats steps when T' < frames, so any input length gives `frames` steps
            h = F.adaptive_avg_pool1d(h, self.frames)
            return self.fc(h.transpose(1, 2))
        z = h.mean(-1)
        if self.pool == "meanmax":
            z = z + h.amax(-1)  # the max keeps short events that a mean over 2 s would wash out
        return self.fc(z)


class ConvBlock(nn.Sequential):
    """3x3 conv (no bias: BN follows) + BN + ReLU, then an optional average pool."""

    def __init__(self, c_in: int, c_out: int, stride: int | tuple[int, int] = 1,
                 pool: tuple[int, int] | None = None):
        layers = [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                  nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        if pool is not None:
            layers.append(nn.AvgPool2d(pool))
        super().__init__(*layers)


def _to_image(x: torch.Tensor) -> torch.Tensor:
    # [B, F, T] -> [B, 1, T, F] in channels-last: oneDNN convs run several times faster on this layout
    # on CPU than on NCHW, and the outputs are the same up to float rounding
    return x.transpose(1, 2).unsqueeze(1).contiguous(memory_format=torch.channels_last)

# -----------------------------------------------------------------------------
# encoders


class CNN2d(nn.Module):
    """A VGG-like stack over the (time, mel) image, frequency averaged out at the end."""

    def __init__(self, blocks: list[nn.Module], out_dim: int):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.out_dim = out_dim
        self.pool = "meanmax"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(_to_image(x))  # [B, C, T', F']
        return h.mean(-1)  # [B, C, T']


@register_model
def cnn_tiny(n_mels: int, width: int = 16) -> nn.Module:
    """The default student: three conv layers (~25k params at width 16), 40 ms output steps."""
    w = width
    return CNN2d([
        ConvBlock(1, w, stride=(1, 2), pool=(2, 2)),  # the stride keeps the 1-channel conv cheap
        ConvBlock(w, 2 * w, pool=(2, 2)),
        ConvBlock(2 * w, 4 * w, pool=(1, 2)),
    ], out_dim=4 * w)


@register_model
def cnn_small(n_mels: int, width: int = 32) -> nn.Module:
    """A deeper, wider 2-D CNN teacher (~0.25M params at width 32), 80 ms output steps."""
    w = width
    # the wide layers sit at the lowest resolution, where their cost per parameter is smallest
    return CNN2d([
        ConvBlock(1, w, stride=2, pool=(2, 2)),
        ConvBlock(w, w, pool=(1, 2)),
        ConvBlock(w, 2 * w, pool=(1, 2)),
        ConvBlock(2 * w, 4 * w, pool=(2, 2)),
        ConvBlock(4 * w, 4 * w),
    ], out_dim=4 * w)


class CRNN(nn.Module):
    """Conv layers for local time-frequency patterns, then a bidirectional GRU for temporal context."""

    def __init__(self, n_mels: int, width: int = 16, hidden: int = 64):
        super().__init__()
        w = width
        self.conv = nn.Sequential(
            ConvBlock(1, w, stride=(1, 2), pool=(2, 2)),
            ConvBlock(w, 2 * w, pool=(1, 2)),
            ConvBlock(2 * w, 4 * w, pool=(2, 2)),
        )
        f_out = (n_mels + 1) // 2 // 2 // 2 // 2  # the stride-2 conv rounds up, the three pools round down
        self.proj = nn.Linear(4 * w * f_out, hidden)
        self.gru = nn.GRU(hidden, hidden, batch_first=True, bidirectional=True)
        self.out_dim = 2 * hidden
        self.pool = "meanmax"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(_to_image(x))  # [B, C, T', F']
        h = h.permute(0, 2, 1, 3).flatten(2)  # [B, T', C*F']: keep frequency detail for the GRU
        h, _ = self.gru(F.relu(self.proj(h)))  # [B, T', 2*hidden]
        return h.transpose(1, 2)


@register_model
def crnn_small(n_mels: int, width: int = 16, hidden: int = 64) -> nn.Module:
    """A CRNN teacher (~0.1M params): three conv layers + one bidirectional GRU layer."""
    return CRNN(n_mels, width, hidden)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, causal: bool = False):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # [B, heads, T, D/heads]
        return self.out(y.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    """Pre-norm transformer block (attention + MLP), no dropout so eval is deterministic."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, causal: bool = False):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, causal)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class PatchTransformer(nn.Module):
    """Non-overlapping patches of `patch` mel frames -> tokens -> transformer blocks."""

    def __init__(self, n_mels: int, dim: int = 96, depth: int = 2, heads: int = 4, patch: int = 4,
                 mlp_ratio: int = 2):
        super().__init__()
        if dim % heads:
            raise LogitCacheError(f"transformer dim {dim} is not divisible by heads {heads}")
        self.embed = nn.Conv1d(n_mels, dim, patch, stride=patch)
        # a depthwise conv as position encoding (as in wav2vec 2.0): relative, so it works for any
        # input length, where a learned table would fix the number of tokens
        self.pos = nn.Conv1d(dim, dim, 7, padding=3, groups=dim)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.ln = nn.LayerNorm(dim)
        self.out_dim = dim
        self.pool = "mean"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)  # [B, D, T/patch]
        h = (h + self.pos(h)).transpose(1, 2)  # [B, N, D]
        h = self.ln(self.blocks(h))
        return h.transpose(1, 2)


@register_model
def transformer_tiny(n_mels: int, dim: int = 96, depth: int = 2, heads: int = 4, patch: int = 4) -> nn.Module:
    """A patch transformer teacher (~0.17M params): 40 ms patches, 2 pre-norm blocks, mean pool."""
    return PatchTransformer(n_mels, dim, depth, heads, patch)

# -----------------------------------------------------------------------------
# export

_META_FILE = "logitcache_model.json"


def export_model(model: nn.Module, path: str | Path, sample_rate: int, clip_samples: int) -> Path:
    """Save ``model`` in eval mode as a torch.export program (``.pt2``) with a dynamic batch size.

    The number of samples is fixed at ``clip_samples``. ``model.config`` (if any), ``sample_rate``
    and ``clip_samples`` are stored alongside and come back from :func:`load_exported`.
    The model's train/eval mode is restored afterwards.
    """
    config = getattr(model, "config", None)
    if isinstance(config, dict) and config.get("sample_rate", sample_rate) != sample_rate:
        raise LogitCacheError(
            f"model was built for {config['sample_rate']} Hz but export asked for {sample_rate} Hz")
    if clip_samples < 1:
        raise LogitCacheError(f"clip_samples must be positive, got {clip_samples}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # batch 2, not 1: export specialises a dimension whose example size is 0 or 1
    example = torch.randn(2, clip_samples, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1)
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            # nn.GRU re-assigns its _flat_weights list while being traced; the weights are still
            # captured as parameters and the program matches eager, so the warning is noise
            warnings.filterwarnings("ignore", message=r"The tensor attributes .*_flat_weights")
            program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    finally:
        model.train(was_training)
    meta = {"config": config if isinstance(config, dict) else None,
            "sample_rate": sample_rate, "clip_samples": clip_samples}
    torch.export.save(program, path, extra_files={_META_FILE: json.dumps(meta)})
    return path


def load_exported(path: str | Path) -> tuple[nn.Module, dict]:
    """Load a program saved by :func:`export_model`: returns (callable module, metadata dict).

    The metadata has ``config``, ``sample_rate`` and ``clip_samples`` (empty for foreign ``.pt2`` files).
    """
    from logitcache.teacher_pt2 import load_program

    extra = {_META_FILE: ""}
    program = load_program(path, extra_files=extra)  # as data: nothing in the file runs
    meta = json.loads(extra[_META_FILE]) if extra[_META_FILE] else {}
    return program.module(), meta


# -----------------------------------------------------------------------------
# language models: int64 token ids [B, L] -> next-token logits [B, L, V]

_TOKEN_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def list_token_models() -> list[str]:
    """Language model names accepted by :func:`create_model` (``num_classes`` = V, ``frames`` = L)."""
    return sorted(_TOKEN_REGISTRY)


def _create_token_model(name: str, num_classes, frames, seed, **kwargs) -> nn.Module:
    if not _is_int(num_classes) or num_classes < 1:
        raise LogitCacheError(f"num_classes (the vocabulary size) must be a positive int, got {num_classes!r}")
    if not _is_int(frames) or frames < 1:
        raise LogitCacheError(f"model {name!r} needs frames = the context length L (a positive int), got {frames!r}")
    kwargs.pop("sample_rate", None)
    try:
        model = _TOKEN_REGISTRY[name](int(num_classes), int(frames), seed=seed, **kwargs)
    except TypeError as e:
        raise LogitCacheError(f"bad options for model {name!r}: {e}") from None
    model.config = {"name": name, "num_classes": int(num_classes), "frames": int(frames), **kwargs}
    return model


class TinyGPT(nn.Module):
    """nanoGPT in miniature: token + position embeddings, pre-norm causal blocks, an LM head.
    Positions past ``context`` are refused (no extrapolation)."""

    def __init__(self, vocab_size: int, context: int, dim: int = 32, depth: int = 2, heads: int = 2):
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Embedding(context, dim)
        self.blocks = nn.Sequential(*[Block(dim, heads, 4, causal=True) for _ in range(depth)])
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dim() != 2 or ids.is_floating_point() or ids.shape[1] > self.context:
            raise LogitCacheError(f"TinyGPT takes int64 token ids [B, L <= {self.context}], got "
                                  f"{ids.dtype} {list(ids.shape)}")
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        return self.head(self.ln(self.blocks(x)))


def gpt_tiny(vocab_size: int, context: int = 256, dim: int = 32, depth: int = 2, heads: int = 2,
             seed: int | None = None) -> nn.Module:
    """A tiny GPT (a few 10k parameters plus V x dim in the embeddings and head), in eval mode;
    ``seed`` fixes its initial weights (teachers as ``logitcache.models:gpt_tiny`` with
    ``--teacher-arg seed=...`` or a teacher spec file's kwargs)."""
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        return TinyGPT(int(vocab_size), int(context), dim, depth, heads).eval()


_TOKEN_REGISTRY["gpt_tiny"] = gpt_tiny
