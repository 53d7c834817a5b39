"""Target codecs: how a target set's rows are stored, registered by name (lhotse style).

A codec's name and options are recorded in the manifest (``codec``, ``codec_options``); a reader
builds the codec from them with :func:`codec_for` and never guesses. Adding a codec is one file
here with a ``@register_codec`` class, plus its import line at the bottom of this module.

Shipped: ``topk`` (:mod:`.topk`, the default and format 1's only encoding) and ``compact``
(:mod:`.compact`, about half the bytes). The ``sampled`` codec's math lives in ``sampled.py``;
registering it is one class there and one import line below.
"""

from __future__ import annotations

import abc
from typing import ClassVar

import numpy as np
import torch

from logitcache.errors import LogitCacheError
from logitcache.targets import kd_loss, teacher_probs

FLOAT16_MAX = 65504.0  # log(0) = -inf must become the float16 floor, or it would not round-trip


class TargetCodec(abc.ABC):
    """How one target set's rows are stored, read back, and trained against.

    The contract (``k`` = topk, ``C`` = classes, ``kind`` = multilabel | multiclass, ``frames`` =
    T or None; every method works on any leading shape, so ``[G, B, (T)]`` rows need no loop):

    * ``fields()``: name -> (dtype, trailing shape of one row), the frame axis included. The
      layout makes one array ``<target set>/<name>`` of shape ``[E, N, *trailing]`` per field.
    * ``encode(logits [..., C])`` runs on the device and returns tensors to copy to the host; it
      always holds ``values`` and ``stat`` (finite unless the logits were bad: dump checks them).
      ``pack(host arrays)`` turns those, on the host, into exactly the arrays of ``fields()``.
      ``encode_rows(values, indices, stat)`` does both from top-k rows as ``topk_targets`` gives
      them (used by plan and the tests).
    * ``decode(arrays)`` -> (values float [..., k], indices [..., k], stat float [...]): the
      triple :func:`logitcache.targets.kd_loss` consumes. Values descending.
    * ``loss`` and ``dense`` are the KD loss and the dense reconstruction for fidelity; both
      delegate to :mod:`logitcache.targets` (one KL implementation).
    * ``check(rows)`` -> [(field, problem)] for one chunk of every field (verify), empty when
      the rows are sound.
    * ``row_bytes()``: stored bytes of one view of one target set, uncompressed.
    """

    name: ClassVar[str]

    def __init__(self, topk: int, num_classes: int, kind: str, frames: int | None = None,
                 options: dict | None = None):
        self.k, self.num_classes, self.kind, self.frames = int(topk), int(num_classes), kind, frames
        self.options = dict(self.default_options() if options is None else options)

    @classmethod
    def default_options(cls, value_dtype: str = "float16") -> dict:
        return {}

    @property
    def frame(self) -> tuple[int, ...]:
        return (int(self.frames),) if self.frames else ()

    @abc.abstractmethod
    def fields(self) -> dict[str, tuple[str, tuple[int, ...]]]: ...

    @abc.abstractmethod
    def encode(self, logits: torch.Tensor) -> dict[str, torch.Tensor]: ...

    @abc.abstractmethod
    def pack(self, host: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def encode_rows(self, values, indices, stat) -> dict[str, np.ndarray]:
        return self.pack({"values": _np(values), "indices": _np(indices), "stat": _np(stat)})

    @abc.abstractmethod
    def decode(self, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...

    @abc.abstractmethod
    def check(self, rows: dict[str, np.ndarray]) -> list[tuple[str, str]]: ...

    def loss(self, student_logits: torch.Tensor, decoded, kind: str | None = None,
             temperature: float = 1.0) -> torch.Tensor:
        values, indices, stat = decoded
        return kd_loss(student_logits, values, indices, stat, kind or self.kind, temperature)

    def dense(self, decoded, temperature: float = 1.0) -> torch.Tensor:
        values, indices, stat = (torch.as_tensor(np.asarray(a)) for a in decoded)
        return teacher_probs(values, indices, stat, self.num_classes, self.kind, temperature)

    def row_bytes(self) -> int:
        return sum(np.dtype(d).itemsize * int(np.prod(s, dtype=np.int64)) for d, s in self.fields().values())

    def chunk_sizing_bytes(self) -> int:
        """Bytes per row that ``choose_chunk_rows`` sizes chunks by."""
        return self.row_bytes()


def _np(a) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


CODECS: dict[str, type[TargetCodec]] = {}


def register_codec(cls: type[TargetCodec]) -> type[TargetCodec]:
    """Class decorator: make a codec available under ``cls.name``."""
    CODECS[cls.name] = cls
    return cls


def get_codec(name: str) -> type[TargetCodec]:
    """The codec class registered as ``name``; an unknown name is one error listing the known ones."""
    try:
        return CODECS[name]
    except (KeyError, TypeError):
        raise LogitCacheError(f"codec {name!r} is not known (known codecs: {', '.join(sorted(CODECS))})") from None


# The registry: one line per codec file.
from logitcache.codecs import compact as _compact  # noqa: E402,F401
from logitcache.codecs import topk as _topk  # noqa: E402,F401
