"""Recompose an ensemble from stored members, without the teachers: any subset, any weights,
another aggregation, teachers standardised by their dump-time statistics, or members weighted per
row by their confidence.

    comp = composition(cache, ["a", "b"], ensemble_weights=[2, 1], aggregation="mean_prob")
    values, indices, stat = comp.rows([cache.targets(0, member=m) for m in comp.members],
                                      cache.output_kind, len(cache.classes))   # kd_loss's triple

Each member row (values = its top-k logits, indices, stat; topk and compact caches decode to it)
stands for a dense estimate of that member's logits: exact on its k classes, and on its C - k tail
classes one constant that holds the member's exact tail mass (the codec's stat) spread evenly:
softmax ``stat + log(tail mass) - log(C - k)``, sigmoid ``stat`` itself (a Bernoulli at the mean
tail probability). That is the estimate ``targets.teacher_probs`` makes of one row; it is exact
when k == C. The members' estimates are aggregated by :func:`logitcache.targets.aggregate` (the
dump's own code), so with k == C a recomposition is the ensemble the teachers would give.

Outside the union U of the members' ids every member is at its tail constant, so the recomposed
row is one constant there too: the row is exactly (U's classes, their values, one tail statistic).
It is stored as a top-K triple, K = min(M k, C) for M members, so a batch has one width: rows
whose members share ids are padded with classes outside U carrying exactly that constant (the
dense distribution is unchanged). ``kd_loss`` consumes it as it is: sigmoid rows densely (exact);
softmax rows as KL over the K listed classes plus one bucket for the other C - K (the padding
classes are in effect listed at the estimate's value). When M k >= C the row is dense (k' = C).
Per row this costs O(M k log k), whatever C, on whole chunks in the reader thread.

Aggregations (``AGGREGATIONS``): ``mean_prob`` and ``mean_logit`` as at dump time; the
``_zscore`` variants first standardise each member's logits by its statistics measured at dump
time over every stored view (``member_stats``): softmax (z - row mean) / std within rows (a
per-teacher temperature; the row mean cancels in the softmax), sigmoid (z - mean) / std over all
logits. Per teacher rather than per class: a per-class shift would make the tail constants differ
by class, which top-k rows cannot express. The tail keeps its constant (standardised), the same
even-spread assumption ``kd_loss`` makes at a temperature other than 1.

``member_weighting="confidence"``: per row, weights w_m exp(-H_m) normalised over members, H_m
the entropy of member m's row (softmax: its distribution's entropy; sigmoid: the sum of its
classes' Bernoulli entropies), in nats: a sharper member counts more on that row, in the spirit of
instance-level routing (MST-Distill).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from logitcache import checks
from logitcache.errors import LogitCacheError
from logitcache.layout import MEMBER_STATS, MOMENTS, Layout
from logitcache.storage import chunk_error, chunk_name
from logitcache.targets import AGGREGATIONS as DUMP_AGGREGATIONS
from logitcache.targets import aggregate, truncate_targets

ZSCORE = "_zscore"
AGGREGATIONS = DUMP_AGGREGATIONS + tuple(a + ZSCORE for a in DUMP_AGGREGATIONS)
MEMBER_WEIGHTINGS = ("none", "confidence")
BLOCK_ROWS = 8192  # rows recomposed at once: [M, rows, K] temporaries of a few MiB


@dataclass(frozen=True)
class Composition:
    """A checked recomposition: member names, their weights (None: equal), the aggregation, the
    per-row weighting, and per member (shift, scale) for the ``_zscore`` aggregations."""

    members: tuple[str, ...]
    weights: tuple[float, ...] | None = None
    aggregation: str = "mean_prob"
    member_weighting: str = "none"
    standardise: tuple[tuple[float, float], ...] | None = None

    def describe(self) -> dict:
        """The JSON a run's config and the reports record."""
        return {"ensemble": list(self.members), "ensemble_weights": list(self.weights) if self.weights else None,
                "aggregation": self.aggregation, "member_weighting": self.member_weighting}

    def rows(self, member_rows, kind: str, num_classes: int, k: int | None = None):
        """The recomposed (values, indices, stat) of member rows given in ``members`` order (see
        :func:`recompose_rows`)."""
        return recompose_rows(member_rows, kind, num_classes, weights=self.weights,
                              aggregation=self.aggregation, member_weighting=self.member_weighting,
                              standardise=self.standardise, k=k)


# ---------------------------------------------------------------- checking a request against a cache
def requested(cache, ensemble=None, ensemble_weights=None, aggregation: str | None = None,
              member_weighting: str | None = None, member: str | None = None) -> Composition | None:
    """The checked :class:`Composition` a train/stream/fidelity call asks for, or None without
    ``ensemble`` (then the other recomposition options are refused: they would be ignored)."""
    if ensemble is None:
        given = [o for o, v in (("--ensemble-weights", ensemble_weights), ("--aggregation", aggregation),
                                ("--member-weighting", member_weighting)) if v]
        if given:
            raise LogitCacheError(f"{given[0]}: applies with --ensemble only (name the stored members to recompose)")
        return None
    return composition(cache, ensemble, ensemble_weights, aggregation, member_weighting, member)


def composition(cache, ensemble, ensemble_weights=None, aggregation: str | None = None,
                member_weighting: str | None = None, member: str | None = None) -> Composition:
    """Check a recomposition request against an open cache; one-line :class:`LogitCacheError`
    naming the option at fault otherwise. ``ensemble``: member names (a list, or one
    comma-separated string); ``ensemble_weights``: one finite weight >= 0 per member, as dump's
    ``--ensemble-weight`` (normalised); ``aggregation``: one of ``AGGREGATIONS`` (default: the
    cache's own); ``member``: a --member given as well, which is refused."""
    names = split_names(ensemble)
    shown = ",".join(names)
    if member is not None:
        raise LogitCacheError(f"--member {member} and --ensemble {shown}: choose one (--member trains on one stored "
                              f"member, --ensemble on a recomposition of several)")
    if not names:
        raise LogitCacheError("--ensemble: name at least one stored member")
    if not cache.codec.triple:
        raise LogitCacheError(f"--ensemble {shown}: cache {cache.path} uses codec {cache.codec.name}, whose rows are "
                              f"drawn ids, not top-k logits; recomposition needs a topk or compact cache")
    if not cache.members:
        raise LogitCacheError(f"--ensemble {shown}: cache {cache.path} stores no members (dumped with --no-members)")
    for n in names:
        if n not in cache.members:
            raise LogitCacheError(f"--ensemble {shown}: unknown member {n!r} (members: {', '.join(cache.members)})")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise LogitCacheError(f"--ensemble {shown}: member {twice[0]!r} is named twice")
    weights = checks.ensemble_weights(ensemble_weights, len(names), option="--ensemble-weights", of="member")
    aggregation = cache.manifest.get("aggregation", "mean_prob") if aggregation is None else aggregation
    if aggregation not in AGGREGATIONS:
        raise LogitCacheError(f"--aggregation {aggregation!r}: choose one of {', '.join(AGGREGATIONS)}")
    member_weighting = member_weighting or "none"
    if member_weighting not in MEMBER_WEIGHTINGS:
        raise LogitCacheError(f"--member-weighting {member_weighting!r}: choose one of {', '.join(MEMBER_WEIGHTINGS)}")
    standardise = None
    if aggregation.endswith(ZSCORE):
        stats = member_stats(cache)
        if stats is None:
            raise LogitCacheError(f"--aggregation {aggregation}: cache {cache.path} stores no per-teacher logit "
                                  f"statistics (dumped before they existed, or with --no-members); use "
                                  f"{aggregation[:-len(ZSCORE)]}, or dump it again")
        standardise = tuple(_shift_scale(stats[n], cache.output_kind, n, cache.path) for n in names)
    return Composition(tuple(names), tuple(weights) if weights else None, aggregation, member_weighting,
                       standardise)


def split_names(ensemble) -> list[str]:
    """Member names from a list and/or comma-separated strings (``--ensemble a,b`` or repeated)."""
    if ensemble is None:
        return []
    items = [ensemble] if isinstance(ensemble, str) else list(ensemble)
    return [n.strip() for item in items for n in str(item).split(",") if n.strip()]


def split_weights(weights) -> list | None:
    """Weights from numbers and/or comma-separated strings (``--ensemble-weights 2,1``); a part
    that is not a number stays a string, so the weight check names it."""
    if weights is None:
        return None
    items = [weights] if isinstance(weights, str) else list(weights)
    out: list = []
    for item in items:
        for part in (item.split(",") if isinstance(item, str) else [item]):
            try:
                out.append(float(part))
            except (TypeError, ValueError):
                out.append(str(part).strip())
    return out or None


def _shift_scale(stats: dict, kind: str, name: str, path) -> tuple[float, float]:
    shift, scale = (0.0, stats["std_within"]) if kind == "multiclass" else (stats["mean"], stats["std"])
    if not (math.isfinite(scale) and scale > 0):
        raise LogitCacheError(f"cache {path}: member {name!r} has logit std {scale:g}, so its logits cannot be "
                              f"standardised (constant outputs?)")
    return float(shift), float(scale)


# ---------------------------------------------------------------- per-teacher statistics (dump time)
def member_stats(cache) -> dict[str, dict] | None:
    """Per stored member, statistics of its logits over every view of the chunks written (all
    epochs), from the per-chunk sums the dump stored: ``count`` (logits summed), ``mean``, ``std``
    (over all logits), ``std_within`` (of logits minus their row's mean: the spread a softmax
    sees). None for a cache without them (dumped before they existed, or with --no-members)."""
    if cache.spec.member_stats != MEMBER_STATS or not cache.members:
        return None
    done = cache.chunks_done()
    R, N = cache.chunk_rows, cache.num_samples
    rows = np.minimum(R, N - np.arange(done.shape[1]) * R)
    per_row = len(cache.classes) * (cache.frames or 1)
    count = float((done * rows).sum()) * per_row
    out = {}
    for name in cache.members:
        path = Layout.stats_path(name)
        shape, chunks = cache.store.geometry(path)
        for e, c in np.argwhere(done).tolist():
            if cache.store.chunk_stored(path, (e, c)) is False:
                raise chunk_error(cache.path, chunk_name(path, (e, c), chunks))
        total = cache.store.read(path)[done].sum(0) if count else np.zeros(len(MOMENTS))
        s, ss, rss = (float(x) for x in total)
        mean = s / count if count else math.nan
        var = ss / count - mean * mean if count else math.nan
        within = (ss - rss) / count if count else math.nan
        out[name] = {"count": int(count), "mean": mean, "std": math.sqrt(max(var, 0.0)),
                     "std_within": math.sqrt(max(within, 0.0))}
    return out


# ---------------------------------------------------------------- the maths
def recompose_rows(member_rows, kind: str, num_classes: int, *, weights=None, aggregation: str = "mean_prob",
                   member_weighting: str | None = None, standardise=None, k: int | None = None):
    """Recompose member rows ``[(values [..., k], indices [..., k], stat [...]), ...]`` into one
    ensemble row (values sorted descending, indices, stat): the triple ``kd_loss`` consumes, of
    width K = min(M k, C) (module doc). ``weights`` as dump's ``ensemble_weights`` (None: equal);
    ``standardise``: per member (shift, scale) for the ``_zscore`` aggregations; ``k``: cut the
    row to its top k (as a top-k cache would store it, e.g. to encode with the cache's codec).
    numpy in, numpy out; torch in, torch out. Any leading shape (frames included)."""
    if not member_rows:
        raise LogitCacheError("recompose: no member rows given")
    method = aggregation[:-len(ZSCORE)] if aggregation.endswith(ZSCORE) else aggregation
    if method not in DUMP_AGGREGATIONS:
        raise LogitCacheError(f"--aggregation {aggregation!r}: choose one of {', '.join(AGGREGATIONS)}")
    if aggregation.endswith(ZSCORE) and (standardise is None or len(standardise) != len(member_rows)):
        raise LogitCacheError(f"--aggregation {aggregation}: needs one (shift, scale) per member")
    weights = checks.ensemble_weights(weights, len(member_rows), option="--ensemble-weights", of="member")
    as_numpy = isinstance(member_rows[0][0], np.ndarray)
    rows = [tuple(torch.as_tensor(np.asarray(x) if as_numpy else x) for x in r) for r in member_rows]
    lead = tuple(rows[0][2].shape)
    flat = [(v.reshape(-1, v.shape[-1]).float(), i.reshape(-1, i.shape[-1]).long(), s.reshape(-1).float())
            for v, i, s in rows]
    parts = [_recompose_flat([tuple(x[a:a + BLOCK_ROWS] for x in r) for r in flat], kind, num_classes, weights,
                             method, member_weighting, standardise if aggregation.endswith(ZSCORE) else None)
             for a in range(0, max(flat[0][0].shape[0], 1), BLOCK_ROWS)]
    values, indices, stat = (torch.cat([p[j] for p in parts]) for j in range(3))
    if k is not None and k < values.shape[-1]:
        values, indices, stat = truncate_targets(values, indices, stat, k, num_classes, kind)
        stat = stat.float()
    out = (values.reshape(*lead, -1), indices.reshape(*lead, -1), stat.reshape(lead))
    return tuple(x.numpy() for x in out) if as_numpy else out


def _recompose_flat(rows, kind: str, C: int, weights, method: str, member_weighting: str | None, standardise):
    """:func:`recompose_rows` on 2-D rows ``[L, k]``."""
    K = min(sum(v.shape[-1] for v, _, _ in rows), C)
    slots = union_slots([i for _, i, _ in rows], C, K)
    tail = K < C
    cols = [_member_columns(v, i, s, slots, kind, C, tail) for v, i, s in rows]
    if standardise is not None:
        cols = [(z - shift) / scale for z, (shift, scale) in zip(cols, standardise)]
    if tail and kind == "multiclass":  # the tail column stands for C - K classes: its total mass
        cols = [torch.cat([z[:, :K], z[:, K:] + math.log(C - K)], -1) for z in cols]
    w = weights
    if member_weighting == "confidence":
        w = confidence_weights(torch.stack([row_entropy(v, s, kind, C) for v, _, s in rows]), weights)
    ens = aggregate(cols, kind, method, w)
    if kind == "multiclass":
        stat = torch.logsumexp(ens, -1)
    else:
        stat = ens[:, K] if tail else torch.zeros(ens.shape[0])
    values, order = ens[:, :K].sort(dim=-1, descending=True, stable=True)
    return values, slots.gather(-1, order), stat


def union_slots(indices: list[torch.Tensor], C: int, K: int) -> torch.Tensor:
    """``[L, K]`` class ids per row: the union of the members' ids ascending, then (where members
    share ids) the lowest classes outside the union. K <= C and K >= the union's size, and among
    classes 0..K-1 at most |U| are in U, so those always supply the padding."""
    ids = torch.cat(indices, -1).long()
    L, W = ids.shape
    s = ids.sort(-1).values
    dup = torch.zeros_like(s, dtype=torch.bool)
    dup[:, 1:] = s[:, 1:] == s[:, :-1]
    if not dup.any():
        return s[:, :K]
    u = s.masked_fill(dup, C).sort(-1).values.contiguous()  # union ascending, then C as a sentinel
    n = (~dup).sum(-1, keepdim=True)
    cand = torch.arange(K).expand(L, K).contiguous()
    found = u.gather(-1, torch.searchsorted(u, cand).clamp(max=W - 1)) == cand
    pads = cand.gather(-1, torch.argsort(found.to(torch.int8), dim=-1, stable=True))  # outside U first
    j = torch.arange(K)
    return torch.where(j < n, u[:, :K], pads.gather(-1, (j - n).clamp(min=0)))


def _member_columns(values, indices, stat, slots, kind: str, C: int, tail: bool) -> torch.Tensor:
    """One member's estimated logits at ``slots`` ``[L, K]``, then (``tail``) its tail constant as
    one more column."""
    k = values.shape[-1]
    ids, order = indices.sort(-1)
    v = values.gather(-1, order)
    pos = torch.searchsorted(ids.contiguous(), slots.contiguous()).clamp(max=k - 1)
    hit = ids.gather(-1, pos) == slots
    t = tail_logit(values, stat, kind, C)
    z = torch.where(hit, v.gather(-1, pos), t[:, None])
    return torch.cat([z, t[:, None]], -1) if tail else z


def tail_logit(values: torch.Tensor, stat: torch.Tensor, kind: str, C: int) -> torch.Tensor:
    """A row's logit for each of its C - k tail classes: the exact tail mass spread evenly (softmax
    ``stat + log(mass) - log(C - k)``; sigmoid the stat, the logit of the mean tail probability).
    0 when k == C (no tail)."""
    k = values.shape[-1]
    if k >= C:
        return torch.zeros_like(stat)
    if kind != "multiclass":
        return stat
    # float64: 1 - sum(top-k p) cancels; in float32 a tail of 1e-2 would be 1e-5 off, relatively
    v, s = values.double(), stat.double()
    mass = (1.0 - torch.exp(v - s[..., None]).sum(-1)).clamp_min(1e-30)
    return (s + torch.log(mass) - math.log(C - k)).to(stat.dtype)


def row_entropy(values: torch.Tensor, stat: torch.Tensor, kind: str, C: int) -> torch.Tensor:
    """Entropy in nats of a row's estimated distribution: softmax Shannon's, tail spread evenly;
    sigmoid the sum over classes of the Bernoulli entropies, tail classes at the mean tail p."""
    k = values.shape[-1]
    t = tail_logit(values, stat, kind, C)
    if kind == "multiclass":
        logp = values - stat[..., None]
        h = -(logp.exp() * logp).sum(-1)
        if k < C:
            mass = (C - k) * torch.exp(t - stat)
            h = h - mass * (t - stat)
        return h

    return dense_entropy(values, kind) + (C - k) * dense_entropy(t[..., None], kind)


def confidence_weights(entropy: torch.Tensor, weights=None) -> torch.Tensor:
    """Per-row member weights ``[M, ...]`` from the members' row entropies ``[M, ...]`` (nats):
    w_m exp(-H_m), normalised over members (module doc); ``weights``: the w_m (None: equal)."""
    w = torch.tensor(weights if weights else [1.0] * len(entropy), dtype=torch.float32)
    return torch.softmax(w.log().view(-1, *([1] * (entropy.dim() - 1))) - entropy, 0)


def dense_ensemble(member_logits: list[torch.Tensor], kind: str, comp: Composition) -> torch.Tensor:
    """The composition applied to full member logits ``[..., C]`` (re-run teachers): the true
    recomposed ensemble's logits, what :func:`recompose_rows` estimates from stored rows."""
    z = [x.float() for x in member_logits]
    if comp.standardise is not None:
        z = [(x - shift) / scale for x, (shift, scale) in zip(z, comp.standardise)]
    w = comp.weights
    if comp.member_weighting == "confidence":
        w = confidence_weights(torch.stack([dense_entropy(x.float(), kind) for x in member_logits]), w)
    method = comp.aggregation[:-len(ZSCORE)] if comp.aggregation.endswith(ZSCORE) else comp.aggregation
    return aggregate(z, kind, method, w)


def dense_entropy(z: torch.Tensor, kind: str) -> torch.Tensor:
    """:func:`row_entropy` of full logits ``[..., C]``."""
    if kind == "multiclass":
        logp = F.log_softmax(z, -1)
        return -(logp.exp() * logp).sum(-1)
    p = torch.sigmoid(z)
    return (p * F.softplus(-z) + (1 - p) * F.softplus(z)).sum(-1)


# ---------------------------------------------------------------- reading recomposed blocks
def read_block(cache, epoch: int, start: int, stop: int, comp: Composition, params: bool = True) -> dict:
    """``cache.read_block`` of rows ``start:stop`` with the recomposed targets (values, indices,
    stat) in place of a stored target set's."""
    block = cache.read_block(epoch, start, stop, params=params, targets=False)
    rows = []
    for m in comp.members:
        r = cache.read_block(epoch, start, stop, member=m, params=False)
        rows.append((r["values"], r["indices"], r["stat"]))
    values, indices, stat = comp.rows(rows, cache.output_kind, len(cache.classes))
    block.update(values=values, indices=indices, stat=stat)
    return block


def targets(cache, epoch: int, ids: list[str] | None, comp: Composition) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Recomposed (values, indices, stat) of ``ids`` (default: all, stored order), as ``cache.targets``."""
    rows = []
    for m in comp.members:
        t = cache.targets(epoch, ids, member=m)
        rows.append((t.values, t.indices, t.stat))
    return comp.rows(rows, cache.output_kind, len(cache.classes))
