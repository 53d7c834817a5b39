"""Language-model teachers in a dump, in bounded memory.

An LM teacher maps int64 ids ``[B, L]`` to logits ``[B, L, V]``; at V = 151,936 and L = 1,024 one
teacher's output for one window is 0.6 GB, so the audio path (every member's logits stacked with
the ensemble, ``[G, B, L, V]``, then encoded) would hold several GB per window. Here the teachers
run one at a time: each member's output is encoded (its own target set) and folded into a running
ensemble block of positions by block of positions, then dropped; the ensemble is encoded last,
block by block. Peak memory is about two ``[B, L, V]`` float32 tensors (the running ensemble and
one teacher's output) plus one block of temporaries, whatever the number of teachers
(``benchmarks/bench_lm_memory.py``: 1.2 GB at V = 151,936, L = 1,024, 3 teachers, against 8.3 GB
when every member is held and stacked).

Rows are encoded block by block along L, and every codec works row by row (sampled: each row
with its own seed, derived from the view's seed and the row's position), so the stored rows do
not depend on the block size. The running ensemble adds members one at a time
(``logaddexp`` for ``mean_prob``), so it may differ from :func:`logitcache.targets.aggregate` of
the same members in the last float32 bit.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from logitcache import checks
from logitcache.codecs import target_set_seeds
from logitcache.device import autocast
from logitcache.errors import LogitCacheError
from logitcache.teachers import run_teachers

BLOCK_VALUES = 1 << 22  # positions x vocabulary per block: each block temporary is 16 MB of float32


def position_blocks(batch: int, length: int, vocab: int, block_values: int | None = None):
    """``(a, b)`` slices of the L axis holding at most ``block_values`` (default ``BLOCK_VALUES``)
    logits each (at least one position)."""
    step = max(1, (block_values or BLOCK_VALUES) // max(1, batch * vocab))
    return [(a, min(a + step, length)) for a in range(0, length, step)]


def check_lm_dump(kind: str, class_maps, sample_rates, clip_seconds) -> None:
    """Refuse dump options that token data has no use for, one line each."""
    if kind != "multiclass":
        raise LogitCacheError(f"--output-kind {kind}: token targets are a softmax over the vocabulary; "
                              f"use --output-kind multiclass")
    for option, given in (("--class-map", class_maps), ("--teacher-sample-rate", sample_rates),
                          ("--teacher-clip-seconds", clip_seconds)):
        if given and any(g is not None for g in given):
            raise LogitCacheError(f"{option}: applies to audio or image teachers; LM teachers share the "
                                  f"corpus's vocabulary and take its windows")


def block_moments(z: torch.Tensor, blocks) -> torch.Tensor:
    """:func:`logitcache.dump.logit_moments` of ``z [B, L, V]`` summed block by block (float64)."""
    from logitcache.pipeline import logit_moments

    return sum(logit_moments(z[:, a:b]) for a, b in blocks)


def row_seeds(view_seeds, groups: int, batch: int, length: int, device) -> torch.Tensor | None:
    """int64 ``[G, B, L]``: each target set's per-position seeds, as the sampled codec derives them
    from ``[G, B]`` view seeds over the frame axis, so a block of positions draws what the whole
    window would."""
    if view_seeds is None:
        return None
    from logitcache.codecs.sampled import _row_seeds

    per_set = target_set_seeds(view_seeds, groups)
    return torch.stack([_row_seeds(per_set[g], (batch, length), device).reshape(batch, length)
                        for g in range(groups)])


@torch.inference_mode()
def stream_encode(teachers, x: torch.Tensor, sample_ids, dev, precision: str, codec, aggregation: str,
                  weights, members: bool, view_seeds=None, moments: bool = False):
    """(bad [M, B] non-finite teacher rows, encoded {field: [G, B, L, ...]} with G = ensemble then
    members, per-member moments [M, B, 3] or None) of one batch of windows (see the module doc)."""
    G = 1 + (len(teachers) if members else 0)
    seeds = row_seeds(view_seeds, G, x.shape[0], x.shape[1], dev)
    acc, fold = _running_ensemble(x, len(teachers), aggregation, weights)
    bad, parts, stats = _members(teachers, x, sample_ids, dev, precision, codec,
                                 None if seeds is None else seeds[1:], members, moments, fold)
    ensemble = [codec.encode(acc[0][:, a:b], None if seeds is None else seeds[0, :, a:b])
                for a, b in position_blocks(*acc[0].shape)]
    acc.clear()
    encoded = _joined([ensemble] + parts)
    return bad, encoded, stats


@torch.inference_mode()
def stream_ensemble(teachers, x: torch.Tensor, sample_ids, dev, precision: str, aggregation: str, weights,
                    each=None) -> torch.Tensor:
    """The ensemble's logits float32 ``[B, L, V]`` of ``teachers`` on windows ``x``, the teachers run
    one at a time and folded in block by block as the dump does (see the module doc), so no more
    than one teacher's output is held beside it. ``each(m, a, b, zb)`` sees teacher m's logits of
    positions [a, b) on the way (compare's per-teacher heads), before they are dropped."""
    acc, fold = _running_ensemble(x, len(teachers), aggregation, weights, each)
    _members(teachers, x, sample_ids, dev, precision, None, None, False, False, fold)
    return acc[0]


def _running_ensemble(x: torch.Tensor, members: int, aggregation: str, weights, each=None):
    """(a list that will hold the running ensemble ``[B, L, V]``, made at the first teacher's output,
    and the ``fold(m, a, b, zb)`` that adds teacher m's block of positions to it, then calls ``each``)."""
    w = checks.ensemble_weights(weights, members, option="ensemble weights")
    w = [x_ / sum(w) for x_ in w] if w else [1.0 / members] * members
    acc: list[torch.Tensor] = []

    def fold(m: int, a: int, b: int, zb: torch.Tensor) -> None:
        if not acc:
            acc.append(torch.empty((*x.shape[:2], zb.shape[-1]), dtype=torch.float32, device=zb.device))
        _fold(acc[0][:, a:b], zb, w[m], m == 0, aggregation)
        if each is not None:
            each(m, a, b, zb)

    return acc, fold


@torch.inference_mode()
def encode_members(teachers, x: torch.Tensor, sample_ids, dev, precision: str, codec, seeds=None,
                   moments: bool = False):
    """Each teacher's own target set (no ensemble), one teacher and one block of positions at a time:
    (bad [M, B], encoded {field: [M, B, L, ...]}, moments [M, B, 3] or None). ``seeds``: int64
    ``[M, B, L]`` per-position seeds (:func:`row_seeds` of each set's seed group) or None."""
    bad, parts, stats = _members(teachers, x, sample_ids, dev, precision, codec, seeds, True, moments, None)
    return bad, _joined(parts), stats


def _members(teachers, x, sample_ids, dev, precision, codec, seeds, encode: bool, moments: bool, fold):
    """Run each teacher alone; encode its blocks (``encode``) and hand them to ``fold(m, a, b, zb)``."""
    B, L = x.shape[:2]
    bad, parts, stats = [], [], []
    for m, t in enumerate(teachers):
        with autocast(dev, precision):
            z = run_teachers([t], x, sample_ids)[0]
        blocks = position_blocks(B, L, z.shape[-1])
        if moments:
            stats.append(block_moments(z, blocks))
        finite, mine = torch.ones(B, dtype=torch.bool, device=z.device), []
        for a, b in blocks:
            zb = z[:, a:b]
            finite &= torch.isfinite(zb).reshape(B, -1).all(1)
            if encode:
                mine.append(codec.encode(zb, None if seeds is None else seeds[m, :, a:b]))
            if fold is not None:
                fold(m, a, b, zb)
        bad.append(~finite)
        parts += [mine] if encode else []
        del z, zb  # zb is a view: it would keep this teacher's whole output alive during the next one
    return torch.stack(bad), parts, (torch.stack(stats) if moments else None)


def _joined(parts: list[list[dict]]) -> dict[str, torch.Tensor]:
    """Per target set, its blocks' encoded fields joined along L, then the sets stacked: [G, B, L, ...]."""
    return {f: torch.stack([torch.cat([p[f] for p in blocks], dim=1) for blocks in parts]) for f in parts[0][0]}


def _fold(acc: torch.Tensor, z: torch.Tensor, weight: float, first: bool, aggregation: str) -> None:
    """Add one member's block to the running ensemble block, in place."""
    if aggregation == "mean_logit":
        term = z.float() * weight
    elif aggregation == "mean_prob":
        term = F.log_softmax(z.float(), dim=-1).add_(math.log(weight))  # one temporary, not two
    else:
        raise ValueError(f"unknown aggregation {aggregation!r}")
    if first:
        acc.copy_(term)
    elif aggregation == "mean_logit":
        acc.add_(term)
    else:
        torch.logaddexp(acc, term, out=acc)


# ---------------------------------------------------------------- training
def masked_rows(decoded, mask: torch.Tensor):
    """The decoded targets (a top-k triple, or a codec's dict of arrays) of the unmasked positions
    only, ``[P, ...]``: masked positions never reach a loss."""
    if isinstance(decoded, dict):
        return {k: v[mask] for k, v in decoded.items()}
    return tuple(t[mask] for t in decoded)


def next_token_loss(student_logits: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits ``[P, V]`` against the next tokens ``[P]`` (unmasked positions)."""
    return F.cross_entropy(student_logits.float(), next_ids.long())


@torch.no_grad()
def evaluate_lm(model: torch.nn.Module, folder, augmenter, device, batch_size: int = 32) -> dict:
    """Next-token NLL (nats per token) and perplexity of ``model`` on every slot's window at offset
    0 (the corpus in order), unmasked positions only."""
    from logitcache.views import ViewSource

    was = model.training
    model.eval()
    plain = ViewSource(folder, augmenter)
    total, count = 0.0, 0
    for a in range(0, len(folder), batch_size):
        ids, nxt, mask = (torch.stack(x) for x in zip(*(plain.replay_tokens(i, {})
                                                       for i in range(a, min(a + batch_size, len(folder))))))
        z = model(ids.to(device)).float()
        m = mask.to(device)
        total += float(F.cross_entropy(z[m], nxt.to(device)[m], reduction="sum"))
        count += int(m.sum())
    model.train(was)
    nll = total / max(count, 1)
    return {"nll": nll, "ppl": math.exp(min(nll, 700.0)), "tokens": count}
