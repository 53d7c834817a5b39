"""Where and at what precision models run: the ``--device`` and ``--precision`` options of dump,
train, fidelity and compare. Imports nothing else of logitcache but errors, so any module may use it."""

from __future__ import annotations

import contextlib

import torch

from logitcache.errors import LogitCacheError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICE_TYPES = ("cpu", "cuda", "mps")


def resolve_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in DEVICE_TYPES:  # "meta" and the like hold no data to store
        raise LogitCacheError(f"--device {spec!r}: not a device logitcache runs on (use auto, cpu, cuda, cuda:N or mps)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LogitCacheError(f"--device {spec}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise LogitCacheError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                              f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise LogitCacheError(f"--device {spec}: MPS is not available on this machine")
    return device


def autocast(device: torch.device, precision: str):
    if precision not in PRECISIONS:
        raise LogitCacheError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
