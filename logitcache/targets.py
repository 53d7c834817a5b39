"""Target math shared by dump, training, fidelity, compare and the online-KD reference.

A stored target row is ``values`` (top-k logits, sorted descending), ``indices`` (their classes)
and one side statistic ``stat`` that makes the tail exact:

* ``multiclass`` (softmax): ``stat`` = log-sum-exp of *all* C logits, the exact log-normaliser.
  Top-k probabilities are ``exp(values - stat)`` and the leftover mass is ``1 - sum`` of them.
* ``multilabel`` (sigmoid): ``stat`` = logit of the *mean* sigmoid probability of the C-k classes
  outside the top k, so the total tail probability mass is exact. (0 when k == C: no tail.)

Everything works on any leading shape, so frame-level rows ``[..., T, k]`` need no special case.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from logitcache.checks import ensemble_weights

KINDS = ("multilabel", "multiclass")
AGGREGATIONS = ("mean_prob", "mean_logit")


def aggregate(member_logits: list[torch.Tensor] | torch.Tensor, kind: str, method: str = "mean_prob",
              weights: list[float] | None = None) -> torch.Tensor:
    """Ensemble logits. mean_prob gives log(mean p) for softmax and logit(mean p) for sigmoid.

    ``weights``: one finite weight >= 0 per member with a positive sum (normalised here), else a
    :class:`LogitCacheError`; a NaN or negative weight would make a NaN ensemble. Or a tensor
    ``[M, ...]`` of per-row weights (the members' leading shape; normalised over members here),
    as :mod:`logitcache.recompose` gives for members weighted by their confidence. The members may
    come stacked, ``[M, ..., C]`` (the dump's stacked pass: no second copy)."""
    z = stacked(member_logits)  # [M, ..., C]
    if isinstance(weights, torch.Tensor):
        w = weights.float().to(z.device)
        wz = (w / w.sum(0, keepdim=True))[..., None]
    else:
        weights = ensemble_weights(weights, len(member_logits), option="ensemble weights")
        wz = member_weights(weights, len(member_logits), z.device).view(-1, *([1] * (z.dim() - 1)))
    if method == "mean_logit":
        return (z * wz).sum(0)
    if method != "mean_prob":
        raise ValueError(f"unknown aggregation {method!r}")
    logw = torch.log(wz)
    if kind == "multiclass":
        return torch.logsumexp(F.log_softmax(z, dim=-1) + logw, dim=0)
    log_p = torch.logsumexp(F.logsigmoid(z) + logw, dim=0)
    log_not_p = torch.logsumexp(F.logsigmoid(-z) + logw, dim=0)
    return log_p - log_not_p


_WEIGHTS: dict[tuple, torch.Tensor] = {}


def member_weights(weights: list[float] | None, members: int, device) -> torch.Tensor:
    """[M] float32 normalised member weights on ``device``, made once per setting: a host tensor
    made per call would be a synchronous host-to-device copy per batch on a GPU."""
    key = (tuple(weights) if weights else None, members, str(device))
    if key not in _WEIGHTS:
        with torch.inference_mode(False):  # usable where gradients are recorded too
            w = torch.tensor(weights if weights else [1.0] * members, dtype=torch.float32)
            _WEIGHTS[key] = (w / w.sum()).to(device)
    return _WEIGHTS[key]


def stacked(member_logits: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """Members' logits as one float32 tensor ``[M, ..., C]``."""
    if isinstance(member_logits, torch.Tensor):
        return member_logits.float()
    return torch.stack([m.float() for m in member_logits])


def topk_targets(logits: torch.Tensor, k: int, kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values, indices, stat) of full logits ``[..., C]``; computed in float32 on the logits' device."""
    z = logits.float()
    num_classes = z.shape[-1]
    values, indices = torch.topk(z, k, dim=-1, sorted=True)
    if kind == "multiclass":
        return values, indices, torch.logsumexp(z, dim=-1)
    if k == num_classes:
        return values, indices, torch.zeros(z.shape[:-1], device=z.device)
    in_topk = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, indices, True)
    log_p = F.logsigmoid(z).masked_fill(in_topk, -math.inf)
    log_not_p = F.logsigmoid(-z).masked_fill(in_topk, -math.inf)
    # logit(mean tail p) = log(sum p) - log(sum (1-p)); the 1/(C-k) cancels. Exact and stable.
    stat = torch.logsumexp(log_p, dim=-1) - torch.logsumexp(log_not_p, dim=-1)
    return values, indices, stat


def truncate_targets(values: torch.Tensor, indices: torch.Tensor, stat: torch.Tensor, k2: int, num_classes: int,
                     kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The targets a top-``k2`` cache would have stored, from a top-k cache's row (k2 <= k).

    softmax: the log-normaliser does not depend on k, so only the top entries are dropped.
    sigmoid: the dropped entries join the tail, whose mean probability (``stat``) is recomputed
    exactly from them and the old tail's mean (see the module doc). Fidelity and recomposition use it.
    """
    k = values.shape[-1]
    if k2 == k or kind == "multiclass":
        return values[..., :k2], indices[..., :k2], stat
    tail = torch.sigmoid(values[..., k2:].double()).sum(-1)
    if k < num_classes:  # with k == C the stored stat is a placeholder 0, not a tail
        tail = tail + (num_classes - k) * torch.sigmoid(stat.double())
    mean = tail / (num_classes - k2)
    return values[..., :k2], indices[..., :k2], (torch.log(mean) - torch.log1p(-mean)).float()


def _softmax_topk_logprobs(values: torch.Tensor, stat: torch.Tensor, num_classes: int,
                           temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher log-probs of the top-k and the tail mass at a temperature.

    At T = 1 both are exact. At T != 1 the tail's own spread is unknown, so the tail mass is
    assumed spread evenly over the C-k other classes (exact at T = 1, documented approximation).
    """
    v = values.float()
    k = v.shape[-1]
    if temperature == 1.0 or k == num_classes:
        logp = v / temperature - (stat if temperature == 1.0 else torch.logsumexp(v / temperature, -1))[..., None]
    else:
        tail_mass = (1.0 - torch.exp(v - stat[..., None]).sum(-1)).clamp_min(1e-30)
        tail_logit = stat + torch.log(tail_mass) - math.log(num_classes - k)  # per tail class
        parts = torch.cat([v / temperature, (tail_logit / temperature + math.log(num_classes - k))[..., None]], -1)
        logp = v / temperature - torch.logsumexp(parts, -1, keepdim=True)
    if k == num_classes:  # no tail: a float32 residue of 1 - sum would meet log q_tail's clamp in kd_loss
        return logp, torch.zeros_like(logp[..., 0])
    tail = (1.0 - torch.exp(logp).sum(-1)).clamp_min(0.0)
    return logp, tail


def teacher_probs(values: torch.Tensor, indices: torch.Tensor, stat: torch.Tensor, num_classes: int,
                  kind: str, temperature: float = 1.0) -> torch.Tensor:
    """Dense ``[..., C]`` probabilities reconstructed from a cache row (tail spread evenly)."""
    indices = indices.long()
    if kind == "multiclass":
        logp, tail = _softmax_topk_logprobs(values, stat, num_classes, temperature)
        k = values.shape[-1]
        fill = tail / max(num_classes - k, 1)
        out = fill[..., None].expand(*values.shape[:-1], num_classes).clone()
        return out.scatter_(-1, indices, torch.exp(logp))
    out = torch.sigmoid(stat.float() / temperature)[..., None].expand(*values.shape[:-1], num_classes).clone()
    return out.scatter_(-1, indices, torch.sigmoid(values.float() / temperature))


def kd_loss(student_logits: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, stat: torch.Tensor,
            kind: str, temperature: float = 1.0) -> torch.Tensor:
    """Distillation loss of student logits ``[..., C]`` against stored targets, scaled by T^2.

    multiclass: KL(teacher || student) over the top-k classes plus one exact "everything else"
    bucket (no renormalised top-k, which biases the student); one ``exp`` over the logits and a
    closed-form gradient (:func:`_softmax_kd_rows`), so at LM vocabularies it costs less than
    cross-entropy. multilabel: BCE against the stored sigmoid probabilities, tail classes filled
    from ``stat``.
    """
    T = float(temperature)
    z = student_logits.float()
    indices = indices.long()
    if kind == "multiclass":
        logp, p_tail = _softmax_topk_logprobs(values, stat.float(), z.shape[-1], T)
        k = logp.shape[-1]
        z, p_tail = z.reshape(-1, z.shape[-1]), p_tail.reshape(-1)  # rows [P, ...]
        logp, indices = logp.reshape(-1, k), indices.reshape(-1, k)
        rows, exact = _softmax_kd_rows(z, logp, p_tail, indices, T)
        total = _SoftmaxKD.apply(z, rows, T)
        if exact.any():  # rows whose student tail underflows in float32: the log-space formula
            total = total + _softmax_kd_rows_exact(z[exact], logp[exact], p_tail[exact], indices[exact], T).sum()
        return total / max(z.shape[0], 1) * T * T
    target = teacher_probs(values, indices, stat, z.shape[-1], kind, T)
    return F.binary_cross_entropy_with_logits(z / T, target) * T * T


# A student's tail sum exp(z/T - max) below this (of a row sum >= 1) has lost float32 precision to
# underflow: such rows take the log-space formula (a confident student; rare in training).
_TAIL_FLOOR = 1e-30


def _softmax_kd_rows(z, logp, p_tail, indices, T: float):
    """The per-row softmax KD loss of :func:`kd_loss` (before the mean and T^2) and its gradient
    w.r.t. ``z [P, C]``, from one ``exp`` of the student's logits and no other ``[P, C]`` tensor:
    KL(p || q) over the top-k plus the tail bucket, q = softmax(z / T), is

        sum_K p_i (log p_i - log q_i) + p_tail (log p_tail - log q_tail)

    with log q_i = z_i / T - m - log s (m: the row's max of z / T, s = sum exp(z / T - m)) and
    log q_tail = log s_tail - log s (s_tail: that sum over the classes outside the top-k, summed
    with them zeroed, not as s minus theirs, which cancels). Its gradient w.r.t. z / T is
    e_j (a / s - [j not in K] p_tail / s_tail) - [j in K] p_j, with e = exp(z / T - m) and
    a = sum_K p + p_tail. Returns (a :class:`_Rows` holding e for the backward pass, and the
    bool [P] rows to compute exactly instead: tail below ``_TAIL_FLOOR`` with teacher tail mass)."""
    with torch.no_grad():
        e = z / T if T != 1.0 else z.clone()
        m = e.amax(-1, keepdim=True)
        e.sub_(m).exp_()
        s = e.sum(-1)
        e_k = e.gather(-1, indices)
        e.scatter_(-1, indices, 0.0)
        s_tail = e.sum(-1)
        e.scatter_(-1, indices, e_k)
        p = torch.exp(logp)
        exact = (s_tail < _TAIL_FLOOR) & (p_tail > 0)
        tail = (p_tail > 0) & ~exact
        log_s = torch.log(s)
        logq = (z.gather(-1, indices) / T if T != 1.0 else z.gather(-1, indices)) - m - log_s[:, None]
        logq_tail = torch.log(torch.where(tail, s_tail, 1.0)) - log_s
        loss = (p * (logp - logq)).sum(-1) + torch.xlogy(p_tail, p_tail) - torch.where(tail, p_tail * logq_tail, 0.0)
        loss = torch.where(exact, 0.0, loss)
        a = torch.where(exact, 0.0, (p.sum(-1) + p_tail) / s)
        b = torch.where(tail, p_tail / torch.where(tail, s_tail, 1.0), 0.0)
        in_k = torch.where(exact[:, None], 0.0, e_k * a[:, None] - p)  # the gradient at the top-k ids
    return _Rows(e, a - b, b, in_k, indices, loss), exact


class _Rows:
    """What :class:`_SoftmaxKD` keeps between its passes (no autograd graph over ``[P, C]``)."""

    def __init__(self, e, off_k, b, in_k, indices, loss):
        self.e, self.off_k, self.b, self.in_k, self.indices, self.loss = e, off_k, b, in_k, indices, loss


class _SoftmaxKD(torch.autograd.Function):
    """Sum of :func:`_softmax_kd_rows`'s row losses; the backward pass writes the gradient into the
    saved ``e`` in place (one pass over ``[P, C]``, as cross-entropy's)."""

    @staticmethod
    def forward(ctx, z, rows: _Rows, T: float):
        ctx.rows, ctx.T = rows, T
        return rows.loss.sum()

    @staticmethod
    def backward(ctx, grad):
        r, scale = ctx.rows, grad / ctx.T  # d/dz = d/d(z/T) / T
        g = r.e.mul_((r.off_k * scale)[:, None])  # every class as if outside the top-k
        g.scatter_(-1, r.indices, r.in_k * scale)
        ctx.rows = None
        return g, None, None


def _softmax_kd_rows_exact(z, logp, p_tail, indices, T: float) -> torch.Tensor:
    """Per-row softmax KD loss in log space (log-softmax and a masked log-sum-exp of the tail): exact
    where the student's tail underflows ``exp``; used for the few rows that need it."""
    logq_all = F.log_softmax(z / T, dim=-1)
    logq = logq_all.gather(-1, indices)
    in_topk = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, indices, True)
    logq_tail = torch.logsumexp(logq_all.masked_fill(in_topk, -math.inf), dim=-1)
    kl = (torch.exp(logp) * (logp - logq)).sum(-1)
    return kl + torch.xlogy(p_tail, p_tail) - p_tail * logq_tail.clamp_min(-1e4)


def kl_divergence(p: torch.Tensor, q: torch.Tensor, kind: str, *, p_probs: bool = False,
                  q_probs: bool = False) -> torch.Tensor:
    """Per-row KL(p || q) over the last axis ``[..., C]``, the figure fidelity and compare report
    (``kd_loss`` is the training loss). softmax: the sum over classes; sigmoid: the mean over
    classes of the per-class Bernoulli KL. Each side is logits, or probabilities with
    ``p_probs``/``q_probs``; these are clamped into [lo, 1] (softmax) or [lo, 1 - hi] (sigmoid),
    lo and hi at the dtype's resolution (float32: 1e-12, 1e-7; float64: 1e-300, 1e-16), so a
    class given no mass costs a large finite KL, not an infinite one. Computed in the inputs'
    dtype; tiny negatives (rounding) read 0."""
    lp, lp_not, wp, wp_not = _kl_side(p, kind, p_probs)
    lq, lq_not, _, _ = _kl_side(q, kind, q_probs)
    if kind == "multiclass":
        return (wp * (lp - lq)).sum(-1).clamp_min(0.0)
    return (wp * (lp - lq) + wp_not * (lp_not - lq_not)).mean(-1).clamp_min(0.0)


def _kl_side(x: torch.Tensor, kind: str, probs: bool):
    """(log p, log(1-p), p, 1-p) of one side of :func:`kl_divergence` (the 1-p parts None for softmax)."""
    lo, hi = (1e-300, 1e-16) if x.dtype == torch.float64 else (1e-12, 1e-7)
    if kind == "multiclass":
        if probs:
            return torch.log(x.clamp(lo, 1.0)), None, x, None
        logp = F.log_softmax(x, dim=-1)
        return logp, None, logp.exp(), None
    if probs:
        x = x.clamp(lo, 1 - hi)
        return torch.log(x), torch.log1p(-x), x, 1 - x
    return F.logsigmoid(x), F.logsigmoid(-x), torch.sigmoid(x), torch.sigmoid(-x)


def hard_label_loss(student_logits: torch.Tensor, labels: torch.Tensor, kind: str) -> torch.Tensor:
    """Loss against (possibly mixed) clip-level labels ``[B, C]``; frame outputs are max-pooled."""
    z = student_logits.float()
    if z.dim() == 3:
        z = z.max(dim=1).values
    if kind == "multiclass":
        return -(labels * F.log_softmax(z, -1)).sum(-1).mean()
    return F.binary_cross_entropy_with_logits(z, labels)


def index_dtype(num_classes: int) -> str:
    """Smallest unsigned integer dtype that holds every class index (no 32,767-class ceiling)."""
    for dtype, limit in (("uint8", 2**8), ("uint16", 2**16), ("uint32", 2**32)):
        if num_classes <= limit:
            return dtype
    return "uint64"
