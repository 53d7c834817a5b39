"""Other tools' token-level KD formats, re-encoded from the same teacher rows (bench_lm_bytes.py).

Each encoder takes teacher logits ``[R, V]`` (torch float32) and returns a :class:`Rows`: the
stored bytes of every row (packed as the tool packs them, so a compressor sees real bytes), the
rows as the tool's loss reads them back (``ids``, ``logp``: log-probabilities), and ``loss``, that
tool's KD loss of student logits against them. What each tool does is written from its code and
README (cited per encoder); simplifications are marked ASSUMPTION.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

MEGATRON_MAX_VOCAB = 1 << 17  # 17-bit ids: Megatron asserts vocab <= 131,072


@dataclass
class Rows:
    packed: np.ndarray      # uint8 [R, row bytes]: what is stored per token
    ids: torch.Tensor       # int64 [R, k] (may hold ids the tool wrapped)
    logp: torch.Tensor      # float32 [R, k]: the stored log-probabilities as the loss reads them
    loss: Callable          # loss(student logits [R, V]) -> mean over rows
    tail: bool = False      # the mass off ``ids`` is spread evenly (else: none, renormalised)

    @property
    def row_bytes(self) -> int:
        return self.packed.shape[1]


# ---------------------------------------------------------------- bits
def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned ints ``[R, n]`` -> uint8 ``[R, ceil(n bits / 8)]``, ``bits`` per value, LSB first."""
    v = np.asarray(values, np.uint64)
    if v.size and int(v.max()) >> bits:
        raise ValueError(f"a value does not fit {bits} bits")
    planes = ((v[..., None] >> np.arange(bits, dtype=np.uint64)) & np.uint64(1)).astype(np.uint8)
    flat = planes.reshape(len(v), -1)
    return np.packbits(flat, axis=1, bitorder="little")


def unpack_bits(packed: np.ndarray, n: int, bits: int) -> np.ndarray:
    flat = np.unpackbits(packed, axis=1, bitorder="little")[:, :n * bits].reshape(len(packed), n, bits)
    return (flat.astype(np.uint64) << np.arange(bits, dtype=np.uint64)).sum(-1)


def as_bytes(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.view(np.uint8).reshape(len(a), -1)


def zstd_bytes(rows: np.ndarray, level: int = 3) -> int:
    """Bytes of ``rows`` (one shard, row-major) after zstd (numcodecs' Zstd; ``zstandard`` is not
    installed here)."""
    from numcodecs import Zstd

    return len(Zstd(level=level).encode(np.ascontiguousarray(rows)))


def id_bits(vocab: int) -> int:
    return max(1, math.ceil(math.log2(vocab)))


def round_to(x: torch.Tensor, dtype: str) -> torch.Tensor:
    return x.to(getattr(torch, dtype)).float()


# ---------------------------------------------------------------- losses
def renormalised_loss(ids: torch.Tensor, logp: torch.Tensor) -> Callable:
    """KL(teacher renormalised over its stored ids || student), the student's log-softmax over the
    whole vocabulary gathered at those ids (DistillKit's ``missing: zero``; Megatron's, ASSUMPTION)."""
    p = F.softmax(logp.double(), -1).float()

    def loss(s: torch.Tensor) -> torch.Tensor:
        return -(p * F.log_softmax(s.float(), -1).gather(-1, ids)).sum(-1).mean()
    return loss


def symmetric_uniform_loss(ids: torch.Tensor, logp: torch.Tensor, eps: float = 1e-6) -> Callable:
    """DistillKit's ``missing: symmetric_uniform`` (lossfuncs/kl.py): the stored log-probs as they
    are plus one bucket for the missing mass of teacher and student each."""
    def log1mexp(x):
        return torch.where(x > -1, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))

    lt = logp.float()
    t_miss = log1mexp(torch.logsumexp(lt, -1).clamp(max=-eps))

    def loss(s: torch.Tensor) -> torch.Tensor:
        ls = F.log_softmax(s.float(), -1).gather(-1, ids)
        kl = (lt.exp() * (lt - ls)).sum(-1)
        s_miss = log1mexp(torch.logsumexp(ls, -1).clamp(max=-eps))
        pm = t_miss.exp()
        return (kl + torch.where(pm > eps, pm * (t_miss - s_miss), torch.zeros_like(pm))).mean()
    return loss


# ---------------------------------------------------------------- Megatron-LM offline KD
def megatron(z: torch.Tensor, k: int = 128, bits: int | None = None) -> Rows:
    """Top-k log-probs in float16 + ids at ``bits`` bits (Megatron: 17; it asserts V <= 131,072, so
    at a larger V the caller sizes the ids at 18 bits to compare), no tail: the loss renormalises
    over the top-k. Stored rows are zstd-compressed tar shards (``zstd_bytes`` of the rows)."""
    bits = bits or id_bits(z.shape[-1])
    lp = F.log_softmax(z.double(), -1)
    v, i = torch.topk(lp, k, -1)
    v16 = v.half()
    packed = np.concatenate([as_bytes(v16.numpy()), pack_bits(i.numpy(), bits)], 1)
    return Rows(packed, i, v16.float(), renormalised_loss(i, v16.float()))


# ---------------------------------------------------------------- DistillKit (arcee-ai)
@dataclass(frozen=True)
class DistillKitConfig:
    """``logprob_compressor`` of DistillKit's README: ``k`` ids (rank order, ceil(log2 V) bits each),
    the first ``exact_k`` log-probs in ``exact_dtype``, the other k - exact_k from a least-squares
    fit over rank of ``terms`` (ints: powers of t; "sqrt": sqrt t), coefficients in float32
    (``term_dtype``), no residual bins, no delta encoding."""

    name: str
    k: int
    exact_k: int
    exact_dtype: str
    terms: tuple


DISTILLKIT = (
    DistillKitConfig("recommended", 128, 16, "bfloat16", (0, 1, 2, 3, 4, "sqrt")),
    DistillKitConfig("budget", 50, 1, "bfloat16", (0, 1, "sqrt")),
    DistillKitConfig("quickstart (Qwen3-235B set)", 128, 32, "float32", (0, 1, 2)),
)


def distillkit_row_bytes(cfg: DistillKitConfig, vocab: int) -> int:
    """DistillKit's ``DistributionQuantizationConfig.total_bits() / 8``: logprob bits rounded up to
    a byte, plus the ids at ceil(log2 V) bits rounded up to a byte."""
    lp_bits = cfg.exact_k * (32 if cfg.exact_dtype == "float32" else 16) + 32 * len(cfg.terms)
    return -(-lp_bits // 8) + -(-cfg.k * id_bits(vocab) // 8)


def _basis(t: torch.Tensor, terms) -> torch.Tensor:
    return torch.stack([torch.sqrt(t) if x == "sqrt" else t ** int(x) for x in terms], -1)


def distillkit(z: torch.Tensor, cfg: DistillKitConfig, missing: str = "zero") -> Rows:
    """The log-probs of ranks exact_k..k-1 come from the fitted curve. ASSUMPTION (their
    ``monotonic_logprobs`` code was not at hand): t = 0, 1, ... over the fitted ranks (their
    default ``normalize_t: false``), an ordinary least-squares fit in float64, coefficients rounded
    to float32; their sort and monotonicity step is the top-k's own order here."""
    V = z.shape[-1]
    lp = F.log_softmax(z.double(), -1)
    v, i = torch.topk(lp, cfg.k, -1)
    exact = round_to(v[:, :cfg.exact_k], cfg.exact_dtype)
    rest = v[:, cfg.exact_k:]
    coef = torch.zeros(len(v), len(cfg.terms), dtype=torch.float32)
    approx = torch.zeros(len(v), 0)
    if rest.shape[1]:
        A = _basis(torch.arange(rest.shape[1], dtype=torch.float64), cfg.terms)
        coef = torch.linalg.lstsq(A.expand(len(v), *A.shape), rest[..., None]).solution[..., 0].float()
        approx = (A @ coef.double().T).T.float()
    logp = torch.cat([exact, approx], -1)
    exact_np = exact.to(getattr(torch, cfg.exact_dtype)).view(torch.int16 if cfg.exact_dtype != "float32"
                                                                else torch.int32).numpy()
    lp_bytes = np.concatenate([as_bytes(exact_np), as_bytes(coef.numpy())], 1)
    packed = np.concatenate([lp_bytes, pack_bits(i.numpy(), id_bits(V))], 1)
    loss = renormalised_loss(i, logp) if missing == "zero" else symmetric_uniform_loss(i, logp)
    return Rows(packed, i, logp, loss, tail=missing != "zero")


# ---------------------------------------------------------------- the 37-byte sampled-KD re-implementation
def rskd37(ids: torch.Tensor, counts: torch.Tensor, n: int = 12, id_mask_bits: int = 17,
           prob_bits: int = 7) -> Rows:
    """RS-KD rows as the re-implementation stores them, from draws of the teacher (the sampled
    codec's ``ids``/``counts``: distinct ids, ascending, sentinel V where unused): n slots of a
    ``id_mask_bits``-bit id (``id & (2^17 - 1)``, no check: ids >= 131,072 wrap onto other tokens)
    and a ``prob_bits``-bit probability round(count / n * 127) / 127, plus one byte of the slot
    count. ASSUMPTION: that byte and the probability's fixed-point scale; 12 x 24 bits + 8 = 37 B.
    The loss is cross-entropy against the stored probabilities, renormalised."""
    used = counts > 0
    q = torch.round(counts.float() / n * ((1 << prob_bits) - 1)).long() * used
    wrapped = torch.where(used, ids & ((1 << id_mask_bits) - 1), torch.zeros_like(ids))
    slots = (wrapped << prob_bits) | q
    packed = np.concatenate([pack_bits(slots.numpy(), id_mask_bits + prob_bits),
                             used.sum(-1, keepdim=True).numpy().astype(np.uint8)], 1)
    w = q.float() / q.sum(-1, keepdim=True).clamp_min(1).float()
    logp = torch.log(w)
    return Rows(packed, wrapped, logp, lambda s: -(w * F.log_softmax(s.float(), -1).gather(-1, wrapped)).sum(-1).mean())


def dense(rows: Rows, vocab: int) -> torch.Tensor:
    """The float64 distribution ``[R, V]`` a format stores: its renormalised entries (repeated
    wrapped ids add up), or with ``tail`` the leftover mass spread evenly over the other ids."""
    p = torch.zeros(len(rows.ids), vocab, dtype=torch.float64)
    lp = rows.logp.double()
    if not rows.tail:
        lp = lp - torch.logsumexp(lp, -1, keepdim=True)
    p.scatter_add_(-1, rows.ids, lp.exp())
    if rows.tail:
        left = (1.0 - p.sum(-1, keepdim=True)).clamp_min(0.0) / (vocab - rows.ids.shape[-1])
        p = torch.where(p > 0, p, left.expand_as(p))
    return p
