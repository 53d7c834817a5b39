"""``compare`` of a run trained on a token cache: per-token figures over unmasked positions.

A token view is a window of L positions, each a softmax over the vocabulary. Every figure is a
mean over the window positions the loss counted (the mask of :mod:`logitcache.augment_tokens`:
padding and document starts are left out), never over windows:

* ``top1_agreement``: the student's argmax equals the ensemble's; ``kl_mean``: KL(ensemble ||
  student) per position, the ensemble rebuilt from the cache (top-k with the exact tail spread
  evenly over the other ids, or the sampled codec's stored distribution);
* ``student_vs_labels`` / ``ensemble_vs_labels``: next-token top-1 accuracy, and
  ``student_nll`` / ``ensemble_nll`` (nats per token) with their perplexities.

The dense ensemble rows are built a block of positions at a time (at most ``BLOCK_VALUES``
probabilities), so V = 262,144 costs a few 16-MB temporaries, not ``[B, L, V]`` more; and the
windows run in batches of at most ``WINDOW_VALUES`` logits per model output (one window at
V = 151,936 and L = 1,024), whatever ``batch_size`` says, so the student's, the heads' and the
re-run teachers' outputs stay bounded too. The re-run teachers of ``--teacher`` run one at a time
and are folded into the ensemble a block of positions at a time, as the dump does
(:func:`logitcache.lm.stream_ensemble`): a batch holds the running ensemble and one teacher's
output, not every teacher's.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from logitcache.cache import Targets
from logitcache.lm import BLOCK_VALUES
from logitcache.reports.compare import _dense_targets, _head_rows, _student_figures

WINDOW_VALUES = 1 << 28  # logits per model output in one batch of windows (1 GiB of float32)


class _Tally:
    """Per-position figures of one comparison, collected batch by batch."""

    def __init__(self, heads: int):
        self.parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("top1", "kl", "s_nll", "s_hit", "e_nll", "e_hit")}
        self.heads = [[] for _ in range(heads)]  # per head: (top-1, KL) rows against its own teacher

    def add(self, **rows: torch.Tensor) -> None:
        for k, v in rows.items():
            self.parts[k].append(v.double())

    def _mean(self, key: str) -> float | None:
        got = self.parts[key]
        return float(torch.cat(got).mean()) if got and sum(len(x) for x in got) else None

    def result(self, with_ensemble: bool = True) -> dict:
        s_nll = self._mean("s_nll")
        out = {"positions": int(sum(len(x) for x in self.parts["s_nll"])), "student_vs_labels": self._mean("s_hit"),
               "student_nll": s_nll, "student_ppl": _ppl(s_nll), "map_vs_ensemble": None}
        if with_ensemble:
            e_nll = self._mean("e_nll")
            out.update(top1_agreement=self._mean("top1"), kl_mean=self._mean("kl"),
                       ensemble_vs_labels=self._mean("e_hit"), ensemble_nll=e_nll, ensemble_ppl=_ppl(e_nll))
        return out


def _ppl(nll: float | None) -> float | None:
    return None if nll is None else math.exp(min(nll, 700.0))


def window_batch(batch_size: int, length: int, vocab: int) -> int:
    """Windows per batch: ``batch_size``, or fewer so one output holds at most ``WINDOW_VALUES`` logits."""
    return max(1, min(batch_size, WINDOW_VALUES // max(1, length * vocab)))


def _blocks(rows: int, vocab: int):
    step = max(1, BLOCK_VALUES // max(vocab, 1))
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]


def _masked(t, mask: np.ndarray):
    """Stored targets (a :class:`Targets` triple or a sampled dict) of the unmasked positions, ``[P, ...]``."""
    if isinstance(t, dict):
        return {k: np.asarray(v)[mask] for k, v in t.items()}
    return Targets(*(np.asarray(a)[mask] for a in (t.values, t.indices, t.stat)))


def _rows(t, a: int, b: int):
    if isinstance(t, dict):
        return {k: v[a:b] for k, v in t.items()}
    return Targets(t.values[a:b], t.indices[a:b], t.stat[a:b])


def _against_stored(c, t, z: torch.Tensor, nxt: torch.Tensor, kind: str):
    """(top-1 agreement, KL, ensemble NLL of the next token, ensemble top-1 hit) per unmasked
    position, for student logits ``z [P, V]`` against stored rows ``t`` of the same positions."""
    V, out = z.shape[-1], []
    for a, b in _blocks(len(z), V):
        q = _dense_targets(c, _rows(t, a, b), V, kind).double()
        agree, kl = _student_figures(z[a:b], q, kind)
        p_next = q.gather(-1, nxt[a:b, None]).squeeze(-1)
        out.append((agree, kl, -torch.log(p_next.clamp_min(1e-300)), (q.argmax(-1) == nxt[a:b]).double()))
    if not out:
        return (torch.zeros(0, dtype=torch.float64),) * 4
    return tuple(torch.cat(x) for x in zip(*out))


def _against_logits(teacher: torch.Tensor, z: torch.Tensor, nxt: torch.Tensor):
    """The same four figures against a re-run teacher's (or ensemble's) logits ``[P, V]`` (exact)."""
    V, out = z.shape[-1], []
    for a, b in _blocks(len(z), V):
        lp = F.log_softmax(teacher[a:b].double(), -1)
        agree, kl = _student_figures(z[a:b], lp.exp(), "multiclass")
        out.append((agree, kl, -lp.gather(-1, nxt[a:b, None]).squeeze(-1), (lp.argmax(-1) == nxt[a:b]).double()))
    if not out:
        return (torch.zeros(0, dtype=torch.float64),) * 4
    return tuple(torch.cat(x) for x in zip(*out))


def _student_rows(z: torch.Tensor, nxt: torch.Tensor) -> dict:
    return {"s_nll": F.cross_entropy(z.double(), nxt, reduction="none"), "s_hit": (z.argmax(-1) == nxt).double()}


def _forward(net, x: torch.Tensor, heads: bool):
    """(the prediction [B, L, V], every head's logits [M, B, L, V] or None), on the CPU."""
    with torch.inference_mode():
        zh = net(x, all_heads=True).float().cpu() if heads else None
        return (net(x).float().cpu() if zh is None else net.combine(zh)), zh


def cached_views(c, net, source, picks, batch_size: int, dev, kind: str, targets_of, heads: list[str] | None,
                 bar) -> dict:
    """The ``views`` part of compare for a token cache. ``picks``: (epoch, positions) pairs;
    ``targets_of(epoch, ids)``: the stored targets the run trained on (ensemble, member or
    recomposition)."""
    tally = _Tally(len(heads or []))
    windows, epochs = 0, set()
    batch_size = window_batch(batch_size, c.frames, len(c.classes))
    for epoch, pos in picks:
        for a in range(0, len(pos), batch_size):
            index = c.order(epoch)[pos[a:a + batch_size]]
            ids = [c.ids[i] for i in index]
            params = c.params(epoch, ids)
            rows = [{n: v[r] for n, v in params.items()} for r in range(len(ids))]
            x, nxt, mask = (torch.stack(t) for t in zip(*(source.replay_tokens(i, p) for i, p in zip(index, rows))))
            zs, zh = _forward(net, x.to(dev), bool(heads))
            m, n = mask.numpy(), nxt[mask]
            agree, kl, e_nll, e_hit = _against_stored(c, _masked(targets_of(epoch, ids), m), zs[mask], n, kind)
            tally.add(top1=agree, kl=kl, e_nll=e_nll, e_hit=e_hit, **_student_rows(zs[mask], n))
            for h, name in enumerate(heads or []):
                got = _against_stored(c, _masked(c.targets(epoch, ids, member=name), m), zh[h][mask], n, kind)
                tally.heads[h].append(got[:2])
            windows, epochs = windows + len(ids), epochs | {epoch}
            bar.update(len(ids))
    out = {"views": windows, "epochs": sorted(epochs), **tally.result()}
    if heads:
        out["heads"] = _head_rows(heads, tally.heads, "member")
    return out


def _against_teachers(tally: _Tally, loaded, manifest, x: torch.Tensor, sample_ids, dev, mask: torch.Tensor,
                      zs: torch.Tensor, zh: torch.Tensor | None, nxt: torch.Tensor) -> None:
    """The ensemble figures of one batch of windows (and each head's against its own teacher, with
    ``zh``) against the re-run teachers, streamed as the dump streams them: one teacher and one
    block of positions at a time (:func:`logitcache.lm.stream_ensemble`), so a batch holds the
    running ensemble and one teacher's output, not every teacher's ``[B, L, V]``."""
    from logitcache.lm import position_blocks, stream_ensemble

    def head_rows(m: int, a: int, b: int, zb: torch.Tensor) -> None:
        keep = mask[:, a:b]
        rows = _against_logits(zb[keep.to(zb.device)].cpu(), zh[m][:, a:b][keep], nxt[:, a:b][keep])
        tally.heads[m].append(rows[:2])

    ze = stream_ensemble(loaded, x, sample_ids, dev, manifest.get("precision", "fp32"),
                         manifest["aggregation"], manifest.get("weights"), head_rows if zh is not None else None)
    for a, b in position_blocks(*ze.shape):
        keep = mask[:, a:b]
        agree, kl, e_nll, e_hit = _against_logits(ze[:, a:b][keep.to(ze.device)].cpu(), zs[:, a:b][keep],
                                                  nxt[:, a:b][keep])
        tally.add(top1=agree, kl=kl, e_nll=e_nll, e_hit=e_hit)


def held_out(net, held, augmenter, loaded, manifest, batch_size: int, dev, heads: list[str] | None,
             eval_data) -> dict:
    """The ``eval`` part for token data: every window of ``held`` at offset 0 (as ``train
    --eval-data`` scores it); with re-run teachers (``loaded``, probed by the caller) the exact
    ensemble of the manifest's aggregation, and per head its own teacher."""
    from logitcache.views import ViewSource

    plain = ViewSource(held, augmenter)
    per_head = len(loaded) == len(heads or []) and bool(loaded)
    tally = _Tally(len(loaded) if per_head else 0)
    batch_size = window_batch(batch_size, augmenter.length, augmenter.vocab_size)
    for a in range(0, len(held), batch_size):
        slots = range(a, min(a + batch_size, len(held)))
        x, nxt, mask = (torch.stack(t) for t in zip(*(plain.replay_tokens(i, {}) for i in slots)))
        zs, zh = _forward(net, x.to(dev), bool(heads))
        n = nxt[mask]
        tally.add(**_student_rows(zs[mask], n))
        if loaded:
            _against_teachers(tally, loaded, manifest, x.to(dev), lambda: [held.ids[i] for i in slots], dev,
                              mask, zs, zh if per_head else None, nxt)
    out = {"data": str(eval_data), "clips": len(held), "teachers": [t.name for t in loaded],
           **tally.result(bool(loaded)), "per_class": []}
    if per_head:
        out["heads"] = _head_rows([t.name for t in loaded], tally.heads, "teacher")
    return out
