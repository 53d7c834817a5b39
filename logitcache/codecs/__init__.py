"""Target codecs: how a target set's rows are stored, registered by name (lhotse style).

A codec's name and options are recorded in the manifest (``codec``, ``codec_options``); a reader
builds the codec from them with :func:`codec_for` and never guesses. Adding a codec is one file
here with a ``@register_codec`` class, plus its import line at the bottom of this module.

Shipped: ``topk`` (:mod:`.topk`, the default and format 1's only encoding), ``compact``
(:mod:`.compact`, about half the bytes) and ``sampled`` (:mod:`.sampled`, RS-KD: ids drawn from
the teacher, an unbiased KD loss; its decoded form is not a top-k triple, see ``triple``).
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
    * ``encode(logits [..., C], seeds=None)`` runs on the device and returns tensors to copy to the
      host; ``finite_rows(encoded)`` -> bool [...] says which rows came from finite logits (dump
      refuses a batch with any other). ``seeds``: uint64 per row, or a prefix of the leading
      shape (dump passes [G, B]: one derived seed per target set and view, see
      :func:`target_set_seeds`); codecs that draw nothing (topk, compact) ignore them.
      ``pack(host arrays)`` turns those, on the host, into exactly the arrays of ``fields()``.
      ``encode_rows(values, indices, stat)`` does both from top-k rows as ``topk_targets`` gives
      them (used by plan and the tests).
    * ``decode(arrays)`` -> the codec's decoded form. With ``triple`` (topk, compact) it is
      (values float [..., k], indices [..., k], stat float [...]), the triple
      :func:`logitcache.targets.kd_loss` consumes, values descending; otherwise a codec-specific
      object (sampled: a dict of arrays). Consumers never look inside: ``decoded_arrays(decoded)``
      names its arrays (the keys of a read block / training batch) and ``from_arrays(batch)``
      rebuilds the decoded form from those keys of a batch (tensors).
    * ``loss(student_logits, decoded, kind, temperature)`` and ``dense(decoded)`` are the KD loss
      and the dense teacher distribution [..., C] for fidelity; topk and compact delegate to
      :mod:`logitcache.targets` (one KL implementation).
    * ``check(rows)`` -> [(field, problem)] for one chunk of every field (verify), empty when
      the rows are sound.
    * ``row_bytes()``: stored bytes of one view of one target set, uncompressed.
    """

    name: ClassVar[str]
    triple: ClassVar[bool] = True  # decode gives (values, indices, stat): top-k figures apply
    seeded: ClassVar[bool] = False  # encode draws from per-row seeds (the dump derives them only then)

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
    def encode(self, logits: torch.Tensor, seeds=None) -> dict[str, torch.Tensor]: ...

    def narrow_dtypes(self) -> dict[str, torch.dtype]:
        """Encoded fields the dump may cast on the device to the dtype ``pack`` stores them in (fewer
        bytes to copy back, no cast on the host); ``pack`` takes them as they are. None by default."""
        return {}

    def finite_rows(self, encoded: dict[str, torch.Tensor]) -> torch.Tensor:
        values, stat = encoded["values"], encoded["stat"]
        return torch.isfinite(values).all(-1) & torch.isfinite(stat)

    @abc.abstractmethod
    def pack(self, host: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def encode_rows(self, values, indices, stat) -> dict[str, np.ndarray]:
        return self.pack({"values": _np(values), "indices": _np(indices), "stat": _np(stat)})

    @abc.abstractmethod
    def decode(self, arrays: dict[str, np.ndarray], sort: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stored arrays -> decoded rows. ``sort=False`` allows a codec to leave a row's entries in
        any order the losses accept (they gather and scatter by index): what training streams."""

    def decoded_arrays(self, decoded) -> dict[str, np.ndarray]:
        values, indices, stat = decoded
        return {"values": values, "indices": indices, "stat": stat}

    def from_arrays(self, batch: dict, device=None):
        return tuple(batch[k].to(device, non_blocking=True) for k in ("values", "indices", "stat"))

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


def target_set_seeds(view_seeds, groups: int) -> np.ndarray:
    """uint64 [groups, B]: one seed per target set (0 = ensemble, then members) and view, derived
    from the view seeds, so target sets draw independently and a row depends on its view alone
    (not on the batch it was dumped in)."""
    from logitcache.codecs.sampled import _signed, splitmix64

    s = torch.from_numpy(np.ascontiguousarray(np.asarray(view_seeds, np.uint64)).view(np.int64))
    g = torch.arange(groups, dtype=torch.int64)[:, None]
    return splitmix64(s[None, :] ^ splitmix64(g + _signed(0xD1B54A32D192ED03))).numpy().view(np.uint64)


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
from logitcache.codecs import sampled as _sampled  # noqa: E402,F401
from logitcache.codecs import topk as _topk  # noqa: E402,F401
