"""How far stored target rows are from the teachers: the measures the codec tests and benchmark use.

All in float64 on purpose (not logitcache.targets.teacher_probs, which works in float32): these
measure what a row *stores*, so float32 arithmetic in the measure must not hide or add errors.
A softmax row's stored tail mass counts as at least TAIL_FLOOR = 2^-24 (float32's resolution of
a probability near 1; below it no float32 pipeline, kd_loss included, keeps a tail): a row whose
stored top-k mass reached 1 has lost its tail, and pays about t log(t / 2^-24) for a teacher tail
t instead of an infinite KL. ``tail_mass`` lets callers count such rows.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from logitcache.codecs.compact import _check_kind
from logitcache.errors import LogitCacheError

_BLOCK_VALUES = 1 << 22  # rows x classes per float64 block (32 MiB)
TAIL_FLOOR = 2.0**-24


def teacher_rows(rows: int, num_classes: int, k: int, kind: str, seed: int = 0, members: int = 3):
    """Realistic ensemble targets: ``(logits [rows, C] float32, values, indices, stat)`` numpy.

    ``members`` teachers from logitcache.plan.synthetic_logits (Zipf-like class prior, a few strong
    events per clip, teachers that mostly agree), aggregated by mean probability as a dump does,
    through the real ``topk_targets``. Made in blocks, so C = 151,936 fits in memory."""
    from logitcache.plan import synthetic_logits
    from logitcache.targets import aggregate, topk_targets

    _check_kind(kind)
    rng = np.random.default_rng(seed)
    prior = -3.0 - 1.2 * np.log1p(rng.permutation(num_classes)).astype(np.float32)
    step = max(1, _BLOCK_VALUES // (members * num_classes))
    parts = []
    for a in range(0, rows, step):
        z = aggregate(synthetic_logits(rng, min(step, rows - a), num_classes, members, prior=prior), kind)
        parts.append([z.numpy()] + [t.numpy() for t in topk_targets(z, k, kind)])
    return tuple(np.concatenate(p) for p in zip(*parts))


def _log_probs(values, indices, stat, num_classes: int, kind: str):
    """Dense float64 log-probabilities a row stores (tail spread evenly). Multilabel: (log q, log 1-q)."""
    v = torch.as_tensor(np.asarray(values, np.float64))
    i = torch.as_tensor(np.asarray(indices).astype(np.int64))
    s = torch.as_tensor(np.asarray(stat, np.float64))[..., None]
    k = v.shape[-1]
    if kind == "multilabel":
        x = s.expand(*v.shape[:-1], num_classes).clone().scatter_(-1, i, v)
        return F.logsigmoid(x), F.logsigmoid(-x)
    logp = v - s
    tail = (1.0 - torch.exp(logp).sum(-1, keepdim=True)).clamp_min(TAIL_FLOOR)
    fill = torch.log(tail / (num_classes - k)) if k < num_classes else torch.zeros_like(tail)
    return fill.expand(*v.shape[:-1], num_classes).clone().scatter_(-1, i, logp), None


def _kl(logp, log1mp, logq, log1mq) -> torch.Tensor:
    """Row sums of KL(p || q): categorical, or per-class Bernoulli when the log(1-.) parts are given.
    0 log 0 counts as 0; q = 0 where p > 0 gives inf."""
    p = torch.exp(logp)
    kl = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p))
    if log1mp is not None:
        p1 = torch.exp(log1mp)
        kl = kl + torch.where(p1 > 0, p1 * (log1mp - log1mq), torch.zeros_like(p1))
    return kl.sum(-1)


def dense_kl(logits, values, indices, stat, kind: str) -> np.ndarray:
    """Per row KL(teacher || stored row), float64: softmax over C classes, or the sum over C
    classes of the per-class Bernoulli KL for sigmoid. ``logits`` are the teacher's, ``[R, C]``."""
    _check_kind(kind)
    R, C = np.shape(logits)
    if np.shape(values)[0] != R:
        raise LogitCacheError(f"dense_kl: {R} teacher rows but {np.shape(values)[0]} stored rows")
    out = np.empty(R)
    step = max(1, _BLOCK_VALUES // C)
    for a in range(0, R, step):
        z = torch.as_tensor(np.asarray(logits[a:a + step], np.float64))
        logq = _log_probs(values[a:a + step], indices[a:a + step], stat[a:a + step], C, kind)
        logp = (F.logsigmoid(z), F.logsigmoid(-z)) if kind == "multilabel" else (F.log_softmax(z, -1), None)
        out[a:a + step] = _kl(logp[0], logp[1], *logq).numpy()
    return out


def stored_kl(reference: tuple, other: tuple, num_classes: int, kind: str) -> np.ndarray:
    """Per row KL(reference row || other row), both ``(values, indices, stat)`` reconstructions:
    the storage error alone (e.g. reference = float32 top-k), without the top-k truncation."""
    _check_kind(kind)
    R = len(reference[2])
    out = np.empty(R)
    step = max(1, _BLOCK_VALUES // num_classes)
    for a in range(0, R, step):
        p = _log_probs(*(x[a:a + step] for x in reference), num_classes, kind)
        q = _log_probs(*(x[a:a + step] for x in other), num_classes, kind)
        out[a:a + step] = _kl(p[0], p[1], q[0], q[1]).numpy()
    return out


def tail_mass(values, stat) -> np.ndarray:
    """Softmax rows: the tail mass 1 - sum(exp(values - stat)) a row stores (float64, may be <= 0)."""
    return 1.0 - np.exp(np.asarray(values, np.float64) - np.asarray(stat, np.float64)[..., None]).sum(-1)


def lm_teacher_rows(rows: int, num_classes: int, seed: int = 0, block: int = 64):
    """Next-token teacher logits of a language model, ``float32 [<= block, V]`` blocks (a generator).

    Heavy-tailed as an LM's are: a Zipf prior over the vocabulary (log p ~ -1.1 a log(1 + rank),
    a varying per token) with N(0, sigma) context noise on every logit, plus a few peaked
    continuations per token drawn from the same Zipf prior, the first 2 below to 9 above the
    background's log-normaliser, so some tokens are near-deterministic and others spread out:
    mean entropy ~2 nats, median ~1, a tenth above 5; ~9% of the mass beyond the top-128 on
    average (benchmarks/bench_lm_bytes.py). Token ids follow frequency loosely, as a BPE
    vocabulary's merge order does (at V = 151,936 the 14% of ids above 131,072 hold 7% of the mass).
    Blocks keep [rows, V] float32 at block x V x 4 bytes (39 MB at V = 151,936)."""
    rng = np.random.default_rng(seed)
    key = np.log1p(np.arange(num_classes)) + rng.normal(0.0, 1.0, num_classes)
    id_of_rank = np.argsort(key, kind="stable")
    rank_of_id = np.empty(num_classes, np.int64)
    rank_of_id[id_of_rank] = np.arange(num_classes)
    zipf = (-1.1 * np.log1p(rank_of_id)).astype(np.float32)
    for a in range(0, rows, block):
        b = min(block, rows - a)
        z = zipf[None] * rng.uniform(0.6, 1.2, (b, 1)).astype(np.float32)
        z += rng.standard_normal((b, num_classes), dtype=np.float32) * rng.uniform(0.5, 1.2, (b, 1)).astype(np.float32)
        lse = torch.logsumexp(torch.from_numpy(z), -1).numpy()
        for r in range(b):
            m = min(1 + int(rng.geometric(0.4)), 16)
            ids = id_of_rank[np.minimum(rng.zipf(1.2, m) - 1, num_classes - 1)]
            heights = lse[r] + rng.uniform(-2.0, 9.0) - np.cumsum(np.r_[0.0, rng.exponential(1.5, m - 1)])
            z[r, ids] = np.maximum(z[r, ids], heights.astype(np.float32))
        yield z


# ---------------------------------------------------------------- a tail shaped by a prior (measured only)
def mean_probs(logit_blocks) -> np.ndarray:
    """float64 ``[V]``: the mean softmax probability of every id over all rows of ``logit_blocks``
    (an iterable of ``[R, V]`` blocks), summed block by block in float64: the tail prior of
    :func:`prior_tail_probs` as a dump would estimate it from its own teacher rows."""
    total, count = None, 0
    for z in logit_blocks:
        p = F.softmax(torch.as_tensor(np.asarray(z, np.float64)), -1).sum(0)
        total = p if total is None else total + p
        count += len(z)
    return (total / count).numpy()


def _masked_prior(log_prior, indices, beta) -> torch.Tensor:
    """softmax over the ids outside each row's top-k of beta * log prior: ``[R, V]`` float64."""
    lp = torch.as_tensor(np.asarray(log_prior, np.float64))
    b = torch.as_tensor(np.asarray(beta, np.float64)).reshape(-1, 1)
    x = (b * lp[None]).expand(len(b), lp.shape[0]).clone()
    x.scatter_(-1, torch.as_tensor(np.asarray(indices).astype(np.int64)), -np.inf)
    return F.softmax(x, -1)


def prior_tail_probs(values, indices, stat, log_prior, beta=1.0) -> torch.Tensor:
    """Dense float64 ``[R, V]`` of softmax rows whose exact tail mass is spread over the ids
    outside the top-k in proportion to ``prior ** beta`` (``beta``: a scalar or one per row)
    instead of evenly; ``log_prior [V]`` is log of :func:`mean_probs`."""
    v = torch.as_tensor(np.asarray(values, np.float64))
    i = torch.as_tensor(np.asarray(indices).astype(np.int64))
    top = torch.exp(v - torch.as_tensor(np.asarray(stat, np.float64))[..., None])
    tail = (1.0 - top.sum(-1, keepdim=True)).clamp_min(TAIL_FLOOR)
    beta = np.array(np.broadcast_to(np.asarray(beta, np.float64), (len(v),)))
    return (tail * _masked_prior(log_prior, i, beta)).scatter_(-1, i, top)


def fit_tail_beta(logits, indices, log_prior, grid: float = 1 / 64, top: float = 4.0) -> np.ndarray:
    """Per row, the exponent beta in [0, ``top``) whose ``prior ** beta`` (over the ids outside the
    top-k) is the maximum-likelihood fit of the row's own tail, on a ``grid`` (a byte holds beta
    in [0, 4) at 1/64): what one extra byte per row would store. The fit solves E_beta[log prior]
    = E_tail[log prior], whose left side rises with beta (its derivative is a variance), by
    bisection down to the grid (Newton overshoots on tails with a few peaks)."""
    z = torch.as_tensor(np.asarray(logits, np.float64))
    lp = torch.as_tensor(np.asarray(log_prior, np.float64))
    i = torch.as_tensor(np.asarray(indices).astype(np.int64))
    target = (F.softmax(z.clone().scatter_(-1, i, -np.inf), -1) * lp).sum(-1)  # the row's own tail
    lo, hi = torch.zeros(len(z), dtype=torch.float64), torch.full((len(z),), top, dtype=torch.float64)
    while float((hi - lo).max()) > grid:
        mid = (lo + hi) / 2
        up = (_masked_prior(lp, i, mid.numpy()) * lp).sum(-1) < target
        lo, hi = torch.where(up, mid, lo), torch.where(up, hi, mid)
    return (torch.round((lo + hi) / 2 / grid) * grid).clamp(0.0, top - grid).numpy()
