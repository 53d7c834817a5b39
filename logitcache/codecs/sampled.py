"""Sampled target rows (RS-KD, "Sparse Logit Sampling", 2025): an unbiased KD loss in a few bytes.

A top-k row drops the teacher's tail, so every loss built on it is biased however the tail is
filled in. This codec draws ``n`` class ids i.i.d. from the teacher distribution at a dump-time
temperature T_d and stores each distinct id once with its count; the KD loss against those
counts is an unbiased estimate of the loss against the full teacher. Optionally an exact head of
the ``head`` most probable classes is stored as well and only the rest (the tail) is sampled,
which removes the largest share of the variance. Fixed shape per row, rows first:

=============  =============================  ===============================================
array          dtype, row shape               content
=============  =============================  ===============================================
``ids``        smallest holding C+1, [n]      the distinct sampled ids ascending, then the
                                              sentinel C in the unused slots
``counts``     uint8 (n < 256) or uint16, [n] draws per id (sum n; 0 at sentinels; all 0 when
                                              the tail has no mass)
``entropy``    float32                        the teacher's exact entropy at T_d (multilabel:
                                              mean over C of the Bernoulli entropies), so the
                                              loss estimates a KL, not a cross-entropy
``mass``       float32                        the sampled part's total target mass: the tail
                                              mass 1 - sum(head p) (multiclass, only with a
                                              head: without one it is 1); sum of sigmoid p
                                              over the tail (multilabel, always)
``head_ids``   index dtype of C, [head]       the ``head`` most probable classes (head > 0)
``head_values`` float16, [head]               their log-probabilities at T_d (multiclass) or
                                              logits / T_d (multilabel), as top-k rows store
=============  =============================  ===============================================

Row bytes at C = 527: 3 n + 4 (multiclass, no head), e.g. n = 12 -> 40 B; a float16 top-k row
with its float32 stat is 4 k + 4 (k = 9 -> 40 B). At C = 151,936: 5 n + 4 against 6 k + 4.
New caches (codec option ``draws: elias_fano``) store ``ids`` and ``counts`` as one ``draws``
array instead: the n draws as a sorted multiset, Elias-Fano coded (see DRAWS_ELIAS_FANO): 12 + 4
B at C = 527 and 24 + 4 B at C = 151,936 for n = 12; they decode to the same ids and counts.

The estimators (p = teacher at T_d, q = softmax or sigmoid of student logits / T; T the
train-time temperature; every expectation over the draws of one row)
    multiclass: target weights w_c = p_c on the head, ``mass`` * count_c / n on sampled ids, 0
    elsewhere; E[w] = p exactly, because the tail draws come from p restricted to the tail and
    renormalised. ``loss`` = T^2 mean_rows(-sum_c w_c log q_c - entropy). It is linear in w, so
    E[loss] = T^2 KL(p || q) and E[grad] = grad of it, T (q - p) per row: the full-vocabulary
    KD loss and gradient (logitcache.targets.kd_loss with k = C) when T = T_d.
    multilabel (sigmoid): per-class Bernoulli targets are not one distribution, so ids are drawn
    from pi_c = p_c / S (S = sum of p_c over the tail, stored as ``mass``): importance sampling
    of classes by their probability. w_c = S count_c / n has E[w_c] = p_c for every class, and
    binary cross-entropy is linear in its target, so ``loss`` = T^2 mean(BCE(z / T, w)) -
    T^2 mean entropy is unbiased for T^2 times the mean Bernoulli KL (kd_loss's BCE at k = C,
    less a constant), gradient included. w_c can exceed 1 (a class drawn more often than its
    expectation); the loss does not mind (BCE with logits is linear in the target), ``dense``
    clips it to 1 for fidelity figures.
    T != T_d: the estimate stays unbiased for T^2 KL(p_{T_d} || q_T), a teacher at the dump
    temperature and a student at T; it is NOT the loss against p_T (biased towards p_{T_d}).
    Importance weights p_T / p_{T_d} are not implemented: they need the teacher's logit at
    every sampled id (+2 B per slot) and, because the normaliser of p_T is unknown from a
    sample, would only give a self-normalised estimator, itself biased by O(1/n). Dump at the
    temperature you train with.
    What is not exact: head values are float16 (the same rounding a float16 top-k row has, up
    to 2^-11 |log p| relative on a head probability); everything else is float32 or exact.

Measured (``benchmarks/bench_sampled.py``, realistic ensemble rows, T = 1, equal bytes per row;
bias = RMS over rows of |E[gradient] - full gradient|, MSE = mean |gradient - full|^2 per row)

    ====================  ==================  ==========  =========  ========================
    C = 527 softmax       codec               bias        MSE        |full gradient| = 0.30
    ====================  ==================  ==========  =========  ========================
    40 B                  topk k = 9 (fp16)   0.0156      2.4e-4     exact tail bucket
                          top-9 renormalised  0.078       6.2e-3     what naive caches do
                          sampled n = 12      < 0.0049    0.028      ~0: unbiased
                          head 3 + n = 6      < 0.0020    7.7e-3
    80 B                  topk k = 19         0.0098      9.5e-5
                          sampled n = 25      < 0.0035    0.013
                          head 6 + n = 16     < 0.0009    1.7e-3
    ====================  ==================  ==========  =========  ========================

    At C = 151,936 (40 B: topk k = 6, sampled n = 7): bias 0.012 (topk), 0.125 (renormalised),
    < 0.018 (sampled, the bound limited by 32 rows x 128 draws); MSE 1.4e-4, 0.016, 0.045.
    Multilabel behaves alike (MSE/topk 480-800x; 28-76x with a head). So: sampled is unbiased,
    7-16x less biased than a renormalised top-k, but logitcache's own topk, whose exact tail
    statistic already removes most of the bias (2-8% of the gradient), has 110-320x (softmax) and
    480-800x (sigmoid) less error per row at equal bytes; an exact head cuts sampled's error
    2.5-28x. Sampled's error is noise that fresh draws per epoch and the rows of a batch average
    out, top-k's is a bias that stays. Encode: 70-100k rows/s at C = 527, 400-500 at C =
    151,936 (one CPU thread, float64).

Sampling, reproducibly and on the logits' device
    Inverse-CDF sampling from a float64 cumulative sum per row (the last value as the total, so
    float rounding never puts mass on a zero-probability class, e.g. a head class in the tail
    draw), with uniforms from a counter-based generator: the uniforms of a row are
    ``logitcache.augment.uniforms(splitmix64(seed ^ SALT), 0, n)``, computed with int64 tensor
    ops, so a row's arrays depend only on its seed and logits: not on the batch, the block or
    the row's position, so a resumed dump writes identical arrays. The uniforms are bit-identical
    on every device; the float64 cumulative sums are too on one device, but CPU and GPU may round
    them differently, so across devices a draw within ~1e-16 of a class boundary may land on the
    neighbouring class. Give every row its own seed (the view's uint64 seed); the
    salt keeps the draws independent of the augmentation draws read from the same seed. Rows are
    processed in blocks of at most ``BLOCK_VALUES`` row x class values, so at C = 151,936 a
    block holds a few float64 [rows, C] temporaries of ~16 MiB each.

In a cache (:class:`SampledCodec`, ``dump --codec sampled --sample-n N [--sample-head H]
[--sample-temperature T]``): the dump gives each target set of each view its own seed,
``codecs.target_set_seeds(view seeds, G)`` (ensemble 0, then the members), and frame-level rows
one sub-stream per frame; the manifest's ``codec_options`` hold ``n``, ``head`` and
``temperature`` (T_d), and ``train`` warns when its --temperature differs from T_d.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from logitcache.errors import LogitCacheError
from logitcache.targets import KINDS, index_dtype

BLOCK_VALUES = 1 << 21  # rows x classes per block (float64 temporaries of 16 MiB)
SALT = 0x5A3F_1ED5_0C0D_EC01  # sampling stream of a seed, apart from the augmentation draws
_GOLDEN = 0x9E3779B97F4A7C15


def _signed(x: int) -> int:
    """A uint64 constant as the int64 with the same bits (torch has no full uint64 arithmetic)."""
    return x - (1 << 64) if x >= 1 << 63 else x


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """logitcache.augment.splitmix64 on int64 tensors (uint64 bits; products wrap mod 2^64)."""
    z = x + _signed(_GOLDEN)
    z = (z ^ _shr(z, 30)) * _signed(0xBF58476D1CE4E5B9)
    z = (z ^ _shr(z, 27)) * _signed(0x94D049BB133111EB)
    return z ^ _shr(z, 31)


def row_uniforms(seeds: torch.Tensor, n: int) -> torch.Tensor:
    """float64 uniforms in [0, 1) ``[R, n]``: slots 0..n-1 of each row's sampling stream."""
    key = splitmix64(seeds ^ _signed(SALT))
    slots = (torch.arange(n, dtype=torch.int64, device=seeds.device) + 1) * _signed(_GOLDEN)
    h = splitmix64(key[:, None] + slots)
    return _shr(h, 11).double() * (1.0 / (1 << 53))


# ---------------------------------------------------------------- specs
def _count_dtype(n: int) -> str:
    return "uint8" if n < 256 else "uint16"


def array_specs(n: int, num_classes: int, kind: str, head: int = 0) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The arrays of one encoded row: name -> (dtype, trailing shape), like compact.array_specs."""
    _check(n, num_classes, kind, head)
    specs = {"ids": (index_dtype(num_classes + 1), (n,)), "counts": (_count_dtype(n), (n,)),
             "entropy": ("float32", ())}
    if head or kind == "multilabel":
        specs["mass"] = ("float32", ())
    if head:
        specs["head_ids"] = (index_dtype(num_classes), (head,))
        specs["head_values"] = ("float16", (head,))
    return specs


def row_bytes(n: int, num_classes: int, head: int = 0, kind: str = "multiclass") -> int:
    """Bytes per encoded row (all arrays of :func:`array_specs`)."""
    specs = array_specs(n, num_classes, kind, head).values()
    return sum(np.dtype(d).itemsize * math.prod(s) for d, s in specs)


def _check(n: int, num_classes: int, kind: str, head: int) -> None:
    if kind not in KINDS:
        raise LogitCacheError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
    if not 1 <= n < 1 << 16:
        raise LogitCacheError(f"sampled: n {n} must be between 1 and 65535 draws per row")
    if not 0 <= head <= num_classes:
        raise LogitCacheError(f"sampled: head {head} must be between 0 and the number of classes "
                              f"({num_classes})")


def _torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


# ---------------------------------------------------------------- encode
def encode(logits: torch.Tensor, n: int, kind: str, temperature: float = 1.0, head: int = 0,
           seeds=0) -> dict[str, torch.Tensor]:
    """Teacher logits ``[..., C]`` -> the arrays of :func:`array_specs`, leading shape kept.

    ``seeds``: one uint64 seed per row (numpy uint64/int64 or an int64 tensor of the leading
    shape, e.g. the view seeds; a leading prefix of it broadcasts over the remaining axes, e.g.
    frames, each of which then gets its own stream), or one int for all rows (mixed with each
    row's flat position: reproducible for the same call, but a row then depends on its position).
    A torch.Generator is not accepted: its draws depend on the batch a row arrives in."""
    C = logits.shape[-1]
    _check(n, C, kind, head)
    T = float(temperature)
    if not T > 0 or not math.isfinite(T):
        raise LogitCacheError(f"sampled: temperature {temperature} must be a finite number > 0")
    lead = tuple(logits.shape[:-1])
    z = logits.reshape(-1, C)
    if torch.isnan(z).any():
        raise LogitCacheError("sampled: NaN teacher logits cannot be sampled")
    s = _row_seeds(seeds, lead, z.device)
    specs = array_specs(n, C, kind, head)
    out = {name: torch.empty((len(z), *shape), dtype=_torch_dtype(d), device=z.device)
           for name, (d, shape) in specs.items()}
    B = max(1, BLOCK_VALUES // C)
    for a in range(0, len(z), B):
        for name, x in _encode_block(z[a:a + B], n, kind, T, head, s[a:a + B]).items():
            out[name][a:a + B] = x.to(out[name].dtype)
    return {name: x.reshape((*lead, *x.shape[1:])) for name, x in out.items()}


def _row_seeds(seeds, lead: tuple[int, ...], device) -> torch.Tensor:
    """int64 ``[R]`` per-row stream seeds (uint64 bits) from ``seeds`` (see :func:`encode`)."""
    R = math.prod(lead)
    if isinstance(seeds, (int, np.integer)):
        base = torch.full(lead, _signed(int(seeds) & ((1 << 64) - 1)), dtype=torch.int64)
        m = 0
    else:
        if isinstance(seeds, torch.Generator):
            raise LogitCacheError("sampled: seeds must be per-row uint64 seeds or an int, not a "
                                  "torch.Generator (its draws depend on the batch)")
        a = np.asarray(seeds.cpu() if isinstance(seeds, torch.Tensor) else seeds)
        if a.dtype.kind not in "iu" or a.shape != lead[:a.ndim]:
            raise LogitCacheError(f"sampled: seeds of shape {a.shape} ({a.dtype}) do not match the "
                                  f"rows {lead}: expected integer seeds of shape {lead} or a prefix of it")
        m = a.ndim
        base = torch.from_numpy(np.ascontiguousarray(a.astype(np.uint64)).view(np.int64))
        base = base.reshape(*a.shape, *([1] * (len(lead) - m))).expand(lead)
    rest = math.prod(lead[m:])
    within = torch.arange(R, dtype=torch.int64).reshape(lead) % max(rest, 1)
    # the position inside the broadcast axes (frames) picks one of the seed's sub-streams
    row = base if rest == 1 else splitmix64(base.reshape(lead) + within * _signed(_GOLDEN))
    return row.reshape(R).to(device)


def _encode_block(z: torch.Tensor, n: int, kind: str, T: float, head: int, seeds: torch.Tensor):
    x = z.double() / T
    if kind == "multiclass":
        logp = F.log_softmax(x, -1)
        p = logp.exp()
        entropy = -(p * logp).sum(-1)
    else:
        lp, lnp = F.logsigmoid(x), F.logsigmoid(-x)
        p = lp.exp()
        entropy = -(p * lp + lnp.exp() * lnp).mean(-1)
        logp = x
    del x
    out = {"entropy": entropy}
    if head:
        hv, hi = torch.topk(z.float(), head, dim=-1, sorted=True)  # the top logits: the top p
        out["head_ids"], out["head_values"] = hi, logp.gather(-1, hi).clamp(-65504, 65504)
        p.scatter_(-1, hi, 0.0)
    del logp
    cdf = torch.cumsum(p, -1, out=p)  # in place: p is not needed again
    total = cdf[:, -1]
    if head and kind == "multiclass":
        out["mass"] = (1.0 - out["head_values"].to(torch.float16).double().exp().sum(-1)).clamp_min(0.0)
        out["mass"] = torch.where(total > 0, out["mass"], torch.zeros_like(total))
    elif kind == "multilabel":
        out["mass"] = total
    u = row_uniforms(seeds, n) * total[:, None]
    draws = torch.searchsorted(cdf, u, right=True).clamp_max_(z.shape[-1] - 1)
    draws = torch.where(total[:, None] > 0, draws, z.shape[-1])  # no tail mass: no draws
    out["ids"], out["counts"] = _unique_counts(draws, z.shape[-1])
    return out


def _unique_counts(draws: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the distinct values of ``draws [R, n]`` ascending, sentinel-padded, and their counts
    (0 for a sentinel: draws equal to the sentinel are not counted)."""
    s = draws.sort(-1).values
    new = torch.ones_like(s, dtype=torch.bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    slot = new.long().cumsum(-1) - 1
    ids = torch.full_like(s, num_classes).scatter_(-1, slot, s)
    counts = torch.zeros_like(s).scatter_add_(-1, slot, (s < num_classes).long())
    return ids, counts


# ---------------------------------------------------------------- decode
def _tensor(a) -> torch.Tensor:
    return a if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))


def decode(arrays: dict) -> dict[str, torch.Tensor]:
    """The arrays of :func:`encode` (torch or numpy) -> ``ids`` int64 [..., n] (sentinel C kept),
    ``counts`` int64, ``weights`` float32 [..., n] (target mass per slot: mass * count / n),
    ``entropy`` float32 [...], and with a head ``head_ids`` int64 and ``head_values`` float32."""
    missing = sorted({"ids", "counts", "entropy"} - set(arrays))
    if missing:
        raise LogitCacheError(f"sampled rows: missing array(s) {', '.join(missing)}")
    t = {k: _tensor(v) for k, v in arrays.items()}
    ids, counts = t["ids"].long(), t["counts"].long()
    if ids.shape != counts.shape or ids.shape[:-1] != t["entropy"].shape:
        raise LogitCacheError(f"sampled rows: ids {tuple(ids.shape)}, counts {tuple(counts.shape)} and "
                              f"entropy {tuple(t['entropy'].shape)} do not describe the same rows")
    mass = t["mass"].float() if "mass" in t else torch.ones(ids.shape[:-1], device=ids.device)
    out = {"ids": ids, "counts": counts, "entropy": t["entropy"].float(),
           "weights": counts.float() * (mass / ids.shape[-1])[..., None]}
    if "head_ids" in t:
        out["head_ids"], out["head_values"] = t["head_ids"].long(), t["head_values"].float()
    return out


def check(arrays: dict, num_classes: int, kind: str) -> None:
    """What verify can check in a block of encoded rows, else a LogitCacheError naming the array
    and the first bad row (of the block, flattened): ids ascending and < C where counted, the
    sentinel C exactly where the count is 0 and only after the counted slots, counts summing to
    n (or 0: a row without tail mass), a finite entropy >= 0, a finite mass >= 0 (<= 1 softmax)."""
    d = decode(arrays)
    ids, counts = d["ids"].reshape(-1, d["ids"].shape[-1]), d["counts"].reshape(-1, d["ids"].shape[-1])
    n, real = ids.shape[-1], counts > 0

    def fail(name: str, bad: torch.Tensor, what: str) -> None:
        if bad.any():
            row = int(bad.nonzero()[0, 0])
            raise LogitCacheError(f"sampled rows: {name} of row {row} {what} (corrupt data)")

    total = counts.sum(-1)
    fail("counts", (total != n) & (total != 0), f"do not sum to n = {n}")
    fail("ids", (real & (ids >= num_classes)).any(-1) | (~real & (ids != num_classes)).any(-1),
         f"hold an id >= {num_classes} classes or a sentinel with a count")
    fail("counts", (~real[:, :-1] & real[:, 1:]).any(-1), "have a counted slot after an empty one")
    fail("ids", ((ids[:, 1:] <= ids[:, :-1]) & real[:, 1:]).any(-1), "are not ascending and distinct")
    e = d["entropy"].reshape(-1)
    fail("entropy", ~torch.isfinite(e) | (e < 0), "is not a finite number >= 0")
    if "mass" in arrays:
        m = _tensor(arrays["mass"]).float().reshape(-1)
        top = 1.0 + 1e-3 if kind == "multiclass" else math.inf
        fail("mass", ~torch.isfinite(m) | (m < 0) | (m > top), "is not a finite mass >= 0 (<= 1 softmax)")
    if "head_ids" in d:
        h = d["head_ids"].reshape(-1, d["head_ids"].shape[-1])
        srt = h.sort(-1).values
        fail("head_ids", (h >= num_classes).any(-1) | (srt[:, 1:] == srt[:, :-1]).any(-1),
             f"hold an id >= {num_classes} or a repeated id")
        fail("head_values", ~torch.isfinite(d["head_values"].reshape(len(h), -1)).all(-1), "are not finite")


def _targets(decoded: dict, kind: str, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, weights) of every stored class, head and sampled slots together; sentinel slots get
    id 0 and weight 0, so gathers and scatter-adds need no mask."""
    ids, w = decoded["ids"], decoded["weights"]
    if ids.numel() and int(ids.max()) > num_classes:
        raise LogitCacheError(f"sampled rows: id {int(ids.max())} > {num_classes} classes (corrupt data)")
    pad = ids >= num_classes
    ids, w = ids.masked_fill(pad, 0), w.masked_fill(pad, 0.0)
    if "head_ids" in decoded:
        hv = decoded["head_values"]
        hp = hv.exp() if kind == "multiclass" else torch.sigmoid(hv)
        ids, w = torch.cat([decoded["head_ids"], ids], -1), torch.cat([hp, w], -1)
    return ids, w


# ---------------------------------------------------------------- loss and dense
def loss(student_logits: torch.Tensor, decoded: dict, kind: str, temperature: float = 1.0) -> torch.Tensor:
    """Unbiased estimate of T^2 KL(teacher at T_d || student at T), mean over rows (multilabel: mean
    over rows and classes, as kd_loss's BCE); see the module doc for what it is unbiased for."""
    if kind not in KINDS:
        raise LogitCacheError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
    T = float(temperature)
    x = student_logits.float() / T
    C = x.shape[-1]
    ids, w = _targets(decoded, kind, C)
    if kind == "multiclass":
        per_row = -(w * F.log_softmax(x, -1).gather(-1, ids)).sum(-1)
    else:  # BCE with logits = softplus(x) - w x, linear in the target w
        per_row = (F.softplus(x).sum(-1) - (w * x.gather(-1, ids)).sum(-1)) / C
    return (per_row - decoded["entropy"]).mean() * T * T


def dense(decoded: dict, num_classes: int, kind: str = "multiclass") -> torch.Tensor:
    """The stored distribution ``[..., C]`` float32: multiclass, exact head probabilities plus the
    empirical tail (sums to 1); multilabel, the unbiased per-class estimates clipped to [0, 1]."""
    ids, w = _targets(decoded, kind, num_classes)
    out = torch.zeros(*ids.shape[:-1], num_classes, device=ids.device).scatter_add_(-1, ids, w)
    return out if kind == "multiclass" else out.clamp_(0.0, 1.0)


# ---------------------------------------------------------------- the registered codec
from logitcache import checks  # noqa: E402
from logitcache.codecs import TargetCodec, compact, register_codec  # noqa: E402


# Storage of the draws (codec option ``draws``): "ids_counts" (the arrays of array_specs; caches
# from before the option) or "elias_fano": the n draws of a row as a sorted multiset, Elias-Fano
# coded like compact's id sets (m_i + i is a strictly increasing set of [0, C + n)), counts
# implied by repeats: 24 B instead of 5 n = 60 B at n = 12 of 151,936 ids.
DRAWS_ELIAS_FANO = "elias_fano"
DRAWS_IDS_COUNTS = "ids_counts"  # what a cache without the option stores


def draws_from_ids(ids: np.ndarray, counts: np.ndarray, num_classes: int) -> np.ndarray:
    """[R, n] distinct ids (sentinel-padded) + counts -> [R, n] sorted draws (sentinel C where a
    row drew nothing: its tail has no mass)."""
    ids, counts = np.asarray(ids, np.int64), np.asarray(counts, np.int64).copy()
    n = ids.shape[-1]
    empty = counts.sum(-1) == 0
    counts[empty, 0], ids = n, np.where(empty[:, None], num_classes, ids)
    return np.repeat(ids.ravel(), counts.ravel()).reshape(ids.shape)


def ids_from_draws(draws: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of :func:`draws_from_ids`: distinct ids ascending, sentinel-padded, and counts
    (0 at sentinels)."""
    R, n = draws.shape
    first = np.ones((R, n), bool)
    first[:, 1:] = draws[:, 1:] != draws[:, :-1]
    slot = np.cumsum(first, axis=1) - 1
    rows = np.repeat(np.arange(R), n)
    ids = np.full((R, n), num_classes, np.int64)
    ids[rows, slot.ravel()] = draws.ravel()
    counts = np.zeros((R, n), np.int64)
    np.add.at(counts, (rows, slot.ravel()), (draws.ravel() < num_classes).astype(np.int64))
    return ids, counts


def codec_options(n, head=None, temperature=None) -> dict:
    """The manifest's ``codec_options`` of a sampled dump, each option checked under its CLI name
    (``head`` < C is checked once the classes are known, by :class:`SampledCodec`)."""
    if n is None:
        raise LogitCacheError("--codec sampled needs --sample-n N (ids drawn per row)")
    return {"draws": DRAWS_ELIAS_FANO,
            "n": checks.whole("--sample-n", n, 1, (1 << 16) - 1),
            "head": checks.whole("--sample-head", 0 if head is None else head, 0),
            "temperature": checks.real("--sample-temperature", 1.0 if temperature is None else temperature,
                                       0, above=True)}


@register_codec
class SampledCodec(TargetCodec):
    """Options ``n`` (draws per row), ``head`` (exact head size), ``temperature`` (T_d).

    ``decode`` gives the dict of :func:`decode` as numpy arrays (ids, counts, weights, entropy,
    head_ids, head_values), not a top-k triple (``triple`` is False): ``loss`` and ``dense`` are
    this module's, and fidelity reports no top-k figures for it. The stored ``topk`` is unused."""

    name = "sampled"
    triple = False
    seeded = True

    def __init__(self, topk, num_classes, kind, frames=None, options=None):
        super().__init__(topk, num_classes, kind, frames, options)
        o = self.options
        self.n, self.head, self.temperature = int(o["n"]), int(o.get("head", 0)), float(o.get("temperature", 1.0))
        checks.whole("--sample-head", self.head, 0, self.num_classes - 1)
        if o.get("draws", DRAWS_IDS_COUNTS) not in (DRAWS_IDS_COUNTS, DRAWS_ELIAS_FANO):
            raise LogitCacheError(f"codec option 'draws' is {o.get('draws')!r}, not {DRAWS_ELIAS_FANO!r} or "
                                  f"{DRAWS_IDS_COUNTS!r} (edited or damaged manifest)")

    @property
    def elias_fano(self) -> bool:
        return self.options.get("draws") == DRAWS_ELIAS_FANO

    def fields(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        specs = array_specs(self.n, self.num_classes, self.kind, self.head)
        if self.elias_fano:
            width = compact.id_layout(self.n, self.num_classes + self.n).nbytes
            specs = {"draws": ("uint8", (width,)), **{f: x for f, x in specs.items() if f not in ("ids", "counts")}}
        return {f: (d, (*self.frame, *s)) for f, (d, s) in specs.items()}

    def encode(self, logits: torch.Tensor, seeds=None) -> dict[str, torch.Tensor]:
        # Non-finite rows are encoded as zeros and flagged by a NaN entropy, so the dump names the
        # teacher and sample at fault instead of failing inside the sampler.
        ok = torch.isfinite(logits).all(-1)
        z = torch.where(ok[..., None], logits, torch.zeros((), dtype=logits.dtype, device=logits.device))
        out = encode(z, self.n, self.kind, self.temperature, self.head, 0 if seeds is None else seeds)
        out["entropy"] = torch.where(ok, out["entropy"], torch.full_like(out["entropy"], math.nan))
        return out

    def finite_rows(self, encoded: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.isfinite(encoded["entropy"])

    def pack(self, host: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.elias_fano:
            ids = np.asarray(host["ids"])
            lead, n = ids.shape[:-1], ids.shape[-1]
            draws = draws_from_ids(ids.reshape(-1, n), np.asarray(host["counts"]).reshape(-1, n), self.num_classes)
            packed = compact.encode_ids(draws + np.arange(n), self.num_classes + n)
            host = {**host, "draws": packed.reshape(*lead, packed.shape[-1])}
        return {f: np.asarray(host[f]).astype(d) for f, (d, _) in self.fields().items()}

    def _ids_counts(self, arrays: dict) -> dict:
        """Rows in the ids/counts form :func:`decode` and :func:`check` take."""
        if not self.elias_fano or "draws" not in arrays:
            return arrays
        packed = np.asarray(arrays["draws"])
        lead, n = packed.shape[:-1], self.n
        draws = compact.decode_ids(packed.reshape(-1, packed.shape[-1]), n, self.num_classes + n).astype(np.int64)
        ids, counts = ids_from_draws(draws - np.arange(n), self.num_classes)
        rest = {k: v for k, v in arrays.items() if k != "draws"}
        return {**rest, "ids": ids.reshape(*lead, n), "counts": counts.reshape(*lead, n)}

    def decode(self, arrays: dict[str, np.ndarray], sort: bool = True) -> dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in decode(self._ids_counts(arrays)).items()}

    def decoded_arrays(self, decoded) -> dict[str, np.ndarray]:
        return dict(decoded)

    def from_arrays(self, batch: dict, device=None) -> dict[str, torch.Tensor]:
        keys = ("ids", "counts", "weights", "entropy") + (("head_ids", "head_values") if self.head else ())
        return {k: batch[k].to(device, non_blocking=True) for k in keys}

    def check(self, rows: dict[str, np.ndarray]) -> list[tuple[str, str]]:
        if self.elias_fano and "draws" in rows:
            try:
                rows = self._ids_counts(rows)
            except LogitCacheError as e:
                return [("draws", str(e).removeprefix("ids: "))]
        if not {"ids", "counts", "entropy"} <= set(rows):
            return []  # a field whose chunk could not be read: verify has reported it already
        try:
            check(rows, self.num_classes, self.kind)
        except LogitCacheError as e:
            msg = str(e).removeprefix("sampled rows: ")
            field = msg.split(" ", 1)[0]
            return [(field if field in rows else "ids", msg)]
        return []

    def loss(self, student_logits: torch.Tensor, decoded, kind: str | None = None,
             temperature: float = 1.0) -> torch.Tensor:
        d = {k: torch.as_tensor(v, device=student_logits.device) for k, v in decoded.items()}
        return loss(student_logits, d, kind or self.kind, temperature)

    def dense(self, decoded, temperature: float = 1.0) -> torch.Tensor:
        """The stored distribution at the dump temperature (``temperature`` is not applied: the
        rows hold draws at T_d only)."""
        return dense({k: torch.as_tensor(v) for k, v in decoded.items()}, self.num_classes, self.kind)
