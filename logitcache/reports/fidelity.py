"""``fidelity``: re-run the teachers on stored views and measure how well the cache matches them,
and what a smaller k or another value dtype would lose (the report part)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from logitcache import checks
from logitcache.augment import Augmenter
from logitcache.cache import Cache, open_cache
from logitcache.codecs.topk import VALUE_DTYPES
from logitcache.sources import open_source
from logitcache.errors import LogitCacheError
from logitcache.layout import num_classes as layout_classes
from logitcache.storage import cache_location
from logitcache.targets import index_dtype, kl_divergence, teacher_probs, topk_targets, truncate_targets  # noqa: F401


# ---------------------------------------------------------------- the report part: per k', dtype, classes, members
TAIL_BINS = [0.0] + [10.0 ** (e / 4) for e in range(-32, 1)]  # tail mass 0, 1e-8 .. 1, four bins a decade


def k_grid(k: int) -> list[int]:
    """The k' values a report looks at: every k' up to 16, then about two per octave, and k itself."""
    steps = {1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024}
    grid = set(range(1, min(k, 16) + 1)) | {s for s in steps if s <= k}
    grid |= {2 ** e for e in range(11, 30) if 2 ** e <= k}
    return sorted(grid | {k})


def _dense_log_targets(values: torch.Tensor, indices: torch.Tensor, stat: torch.Tensor, num_classes: int,
                       kind: str) -> torch.Tensor:
    """Dense ``[R, C]`` float64 reconstruction of cache rows, as log-probabilities (softmax) or as
    logits (sigmoid): :func:`teacher_probs` at T = 1 without its float32 rounding, so extreme
    logits (p within 1e-8 of 0 or 1) keep finite, exact KLs."""
    v, s, idx = values.double(), stat.double(), indices.long()
    k = v.shape[-1]
    if kind == "multiclass":
        logp = v - s[..., None]
        tail = (1.0 - logp.exp().sum(-1)).clamp_min(0.0) / max(num_classes - k, 1)
        fill = torch.log(tail.clamp_min(1e-300))
    else:
        logp, fill = v, s
    out = fill[..., None].expand(*v.shape[:-1], num_classes).clone()
    return out.scatter_(-1, idx, logp)


def _row_figures(z: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, stat: torch.Tensor,
                 kind: str) -> dict[str, torch.Tensor]:
    """Per-row figures of targets ``[R, k]`` against fresh logits ``[R, C]`` (float64 throughout).

    kl: KL(fresh || reconstruction); for sigmoid the mean over classes of the Bernoulli KL.
    covered: softmax, the stored top-k probability mass; sigmoid, the top-k's share of the summed
    class probabilities. Both come from the cache alone. prob_err: max |p_fresh - p_reconstructed|.
    """
    C, k = z.shape[-1], values.shape[-1]
    z = z.double()
    v, s = values.double(), stat.double()
    rec = _dense_log_targets(v, indices, s, C, kind)
    kl = kl_divergence(z, rec, kind)  # softmax log-probabilities are logits of the same distribution
    if kind == "multiclass":
        p, q = F.log_softmax(z, dim=-1).exp(), rec.exp()
        covered = torch.exp(v - s[..., None]).sum(-1)
    else:
        p, q = torch.sigmoid(z), torch.sigmoid(rec)
        top = torch.sigmoid(v).sum(-1)
        covered = top / (top + (C - k) * torch.sigmoid(s)) if k < C else torch.ones_like(top)
    fresh_top = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, torch.topk(z, k, dim=-1).indices, True)
    return {"kl": kl, "covered": covered.clamp(0.0, 1.0), "prob_err": (p - q).abs().max(-1).values,
            "top1": (indices[..., 0].long() == z.argmax(-1)).double(),
            "agree": fresh_top.gather(-1, indices.long()).double().mean(-1)}


def _rounded(values: torch.Tensor, dtype: str) -> torch.Tensor:
    """Values as a cache of ``dtype`` stores them (fp16 saturates instead of overflowing)."""
    v = values.float()
    if dtype == "float16":
        v = v.clamp(-65504.0, 65504.0)
    return v.to(getattr(torch, dtype)).float()


class _ReportAccumulator:
    """Collects the fidelity report's figures batch by batch (rows = views, or view frames)."""

    SIM_ROWS = 8192  # rows per batch the dtype simulation looks at (it builds dense [rows, C] tensors)

    def __init__(self, kind: str, num_classes: int, k: int, members: list[str]):
        self.kind, self.C, self.k, self.members = kind, num_classes, k, members
        self.grid = k_grid(k)
        self.sim_grid = sorted(set(k_grid(num_classes)) | {k})
        self.per_k: dict[int, list[dict[str, torch.Tensor]]] = {k2: [] for k2 in self.grid}
        self.sim: dict[tuple[str, int], list[dict[str, torch.Tensor]]] = {}
        self.codec_sim: dict[str, list[dict[str, torch.Tensor]]] = {}
        self.class_mass = torch.zeros(num_classes, dtype=torch.float64)
        self.class_covered = torch.zeros(num_classes, dtype=torch.float64)
        self.class_in_topk = torch.zeros(num_classes, dtype=torch.float64)
        self.rows = 0
        M = len(members)
        self.pair_agree = torch.zeros(M, M, dtype=torch.float64)
        self.member_top1 = torch.zeros(M, dtype=torch.float64)
        self.member_kl = torch.zeros(M, dtype=torch.float64)

    def add(self, stored: dict[str, torch.Tensor], z: torch.Tensor, member_logits: list[torch.Tensor]) -> None:
        C = self.C
        z = z.double().reshape(-1, C)
        v = stored["values"].float().reshape(z.shape[0], -1)
        idx = stored["indices"].long().reshape(z.shape[0], -1)
        stat = stored["stat"].float().reshape(-1)
        for k2 in self.grid:
            self.per_k[k2].append(_row_figures(z, *truncate_targets(v, idx, stat, k2, C, self.kind), self.kind))
        # Which classes the stored top-k keeps, weighted by how much probability each holds.
        p = F.softmax(z, -1) if self.kind == "multiclass" else torch.sigmoid(z)
        kept = torch.zeros_like(p, dtype=torch.bool).scatter_(-1, idx, True)
        self.class_mass += p.sum(0)
        self.class_covered += (p * kept).sum(0)
        self.class_in_topk += kept.double().sum(0)
        self.rows += z.shape[0]
        # The value dtype: the fresh logits' own top-k' rounded as each dtype would store them.
        zs = z[: self.SIM_ROWS].float()
        for k2 in self.sim_grid:
            exact, ind, st = topk_targets(zs, k2, self.kind)
            for dtype in VALUE_DTYPES:
                rv = _rounded(exact, dtype)
                fig = _row_figures(zs, rv, ind, st, self.kind)
                fig["logit_err"] = (rv - exact).abs().max(-1).values.double()
                self.sim.setdefault((dtype, k2), []).append(fig)
        self._add_codecs(zs)
        # Members against each other and against the ensemble, on the same views.
        tops = [m.reshape(-1, C).argmax(-1) for m in member_logits]
        ens_top = z.argmax(-1)
        for i, mi in enumerate(member_logits):
            for j in range(len(member_logits)):
                self.pair_agree[i, j] += float((tops[i] == tops[j]).double().sum())
            self.member_top1[i] += float((tops[i] == ens_top).double().sum())
            self.member_kl[i] += float(kl_divergence(mi.reshape(-1, C).double(), z, self.kind).sum())

    # The codecs a user can choose between at this cache's k: (label, codec, options).
    CODEC_CHOICES = (("topk float16", "topk", {"value_dtype": "float16"}),
                     ("topk float32", "topk", {"value_dtype": "float32"}),
                     ("compact 8-bit", "compact", {"value_bits": 8}),
                     ("compact 6-bit", "compact", {"value_bits": 6}),
                     ("compact 4-bit", "compact", {"value_bits": 4}))

    def _add_codecs(self, zs: torch.Tensor) -> None:
        """The fresh logits' own top-k stored by each codec choice and decoded again."""
        from logitcache.codecs import get_codec

        exact, ind, st = topk_targets(zs, self.k, self.kind)
        host = {"values": exact.numpy(), "indices": ind.numpy(), "stat": st.numpy()}
        for label, name, options in self.CODEC_CHOICES:
            codec = get_codec(name)(self.k, self.C, self.kind, None, {"index_dtype": index_dtype(self.C), **options})
            v, i, s = (torch.from_numpy(np.asarray(x)) for x in codec.decode(codec.pack(host)))
            fig = _row_figures(zs, v.float(), i.long(), s.float(), self.kind)
            fig["bytes"] = torch.full((1,), float(codec.row_bytes()), dtype=torch.float64)
            self.codec_sim.setdefault(label, []).append(fig)

    def result(self, class_names: list[str], size_of) -> dict:
        def mean(parts, key):
            return float(torch.cat([x[key] for x in parts]).mean())

        def worst(parts, key):
            return float(torch.cat([x[key] for x in parts]).max())

        per_k = []
        for k2, parts in self.per_k.items():
            per_k.append({"k": k2, "kl_mean": mean(parts, "kl"), "kl_max": worst(parts, "kl"),
                          "top1_agreement": mean(parts, "top1"), "topk_agreement": mean(parts, "agree"),
                          "covered_mass_mean": mean(parts, "covered"),
                          "covered_mass_min": float(torch.cat([x["covered"] for x in parts]).min()),
                          "tail_mass_mean": float((1 - torch.cat([x["covered"] for x in parts])).mean()),
                          "prob_max_abs_error": worst(parts, "prob_err"),
                          "prob_mean_max_abs_error": mean(parts, "prob_err"),
                          "bytes_per_view": size_of(k2, None)})
        dtype_effect: dict[str, list[dict]] = {d: [] for d in VALUE_DTYPES}
        for (dtype, k2), parts in sorted(self.sim.items(), key=lambda x: (x[0][0], x[0][1])):
            dtype_effect[dtype].append({"k": k2, "kl_mean": mean(parts, "kl"), "kl_max": worst(parts, "kl"),
                                        "max_abs_logit_error": worst(parts, "logit_err"),
                                        "prob_max_abs_error": worst(parts, "prob_err"),
                                        "covered_mass_mean": mean(parts, "covered"),
                                        "bytes_per_view": size_of(k2, dtype)})
        codec_effect = [{"codec": label, "target_bytes_per_row": float(parts[0]["bytes"][0]),
                         "kl_mean": mean(parts, "kl"), "kl_max": worst(parts, "kl"),
                         "top1_agreement": mean(parts, "top1")} for label, parts in self.codec_sim.items()]
        tail = (1 - torch.cat([x["covered"] for x in self.per_k[self.k]])).clamp_min(0).numpy()
        counts, _ = np.histogram(tail, bins=TAIL_BINS)
        quant = np.quantile(tail, [0.5, 0.9, 0.99]) if len(tail) else [math.nan] * 3
        n, M = max(self.rows, 1), len(self.members)
        coverage = (self.class_covered / self.class_mass.clamp_min(1e-300)).tolist()
        per_class = [{"class": name, "coverage": cov, "in_topk_rate": float(r / n), "mean_prob": float(mass / n)}
                     for name, cov, r, mass in zip(class_names, coverage, self.class_in_topk, self.class_mass)]
        pair = (self.pair_agree / n).tolist()
        off = [pair[i][j] for i in range(M) for j in range(M) if i < j]
        disagreement = {
            "members": list(self.members),
            "pairwise_top1_agreement": pair,
            "mean_pairwise_disagreement": float(1 - np.mean(off)) if off else 0.0,
            "diversity_kl": float(self.member_kl.sum() / (n * M)) if M else 0.0,
            "member_vs_ensemble": {name: {"top1_agreement": float(self.member_top1[i] / n),
                                          "kl_to_ensemble": float(self.member_kl[i] / n)}
                                   for i, name in enumerate(self.members)},
        }
        return {"k_grid": self.grid, "per_k": per_k, "dtype_effect": dtype_effect, "codec_effect": codec_effect,
                "tail_mass": {"k": self.k, "edges": TAIL_BINS, "counts": counts.tolist(), "rows": int(len(tail)),
                              "p50": float(quant[0]), "p90": float(quant[1]), "p99": float(quant[2]),
                              "max": float(tail.max()) if len(tail) else math.nan},
                "per_class": per_class, "disagreement": disagreement, "rows_checked": int(self.rows)}


def _size_model(cache: Cache):
    """``size_of(k', dtype)`` -> stored bytes per view of this cache's per-view arrays, had it kept
    top-k' (and values of ``dtype``; None = as stored).

    Measured on this cache: value and index arrays scale with k' at their measured bytes per
    entry (values by the itemsize ratio for another dtype, an estimate), everything else per view
    (seeds, order, params, stats) is kept as measured. Ids, done markers and metadata are left out:
    they do not grow with views; nor does ``content`` (one crc per sample).
    """
    m = cache.manifest
    views = max(cache.epochs * cache.num_samples, 1)
    k, stored_dtype = cache.topk, m["value_dtype"]
    vals = idxs = rest = 0
    present = set(cache.store.arrays())
    for name, spec in cache.layout.arrays.items():
        if spec.per != "view" or name not in present:
            continue
        b = int(cache.store.info(name)["stored_bytes"])
        if spec.field in ("values", "codes"):  # what grows with k' (compact: ids about so)
            vals += b
        elif spec.field in ("indices", "ids"):
            idxs += b
        else:
            rest += b

    def size_of(k2: int, dtype: str | None) -> float:
        scale = np.dtype(dtype).itemsize / np.dtype(stored_dtype).itemsize if dtype else 1.0
        return float((rest + (vals * scale + idxs) * k2 / k) / views)

    return size_of


# ---------------------------------------------------------------- the summary figures and fidelity()
def _compare(stored: dict[str, torch.Tensor], logits: torch.Tensor, kind: str) -> dict[str, torch.Tensor]:
    """Per-row figures of stored top-k targets vs freshly computed full logits ``[S, (T,) C]``.

    Returns tensors shaped ``[S]`` (frame rows averaged, max errors maxed) so that rows of
    different batches can simply be concatenated.
    """
    v, idx, stat = stored["values"].float(), stored["indices"].long(), stored["stat"].float()
    z = logits.float()
    C, k = z.shape[-1], v.shape[-1]
    err = (v - z.gather(-1, idx)).abs()  # [S, (T,) k]
    in_topk = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, torch.topk(z, k, dim=-1).indices, True)
    agree = in_topk.gather(-1, idx).float().mean(-1)  # fraction of stored indices in the fresh top-k
    top1 = (idx[..., 0] == z.argmax(-1)).float()
    kl = _kl_to(teacher_probs(v, idx, stat, C, kind), z, kind)
    S = z.shape[0]
    err, agree, top1, kl = (t.reshape(S, -1) for t in (err, agree, top1, kl))  # frame rows -> one per view
    return {"err_max": err.max(1).values, "err_sum": err.sum(1),
            "err_n": torch.full((S,), float(err.shape[1])), "agree": agree.mean(1), "top1": top1.mean(1),
            "kl": kl.mean(1), "kl_max": kl.max(1).values}


def _kl_to(q: torch.Tensor, z: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-row KL(fresh teacher logits ``z`` || stored probabilities ``q``) in float32. Sigmoid
    teachers enter as probabilities, clamped like ``q``, as this figure has always been computed."""
    p = z if kind == "multiclass" else torch.sigmoid(z)
    return kl_divergence(p, q, kind, p_probs=kind != "multiclass", q_probs=True)


def _compare_dense(q: torch.Tensor, logits: torch.Tensor, kind: str) -> dict[str, torch.Tensor]:
    """Per-view figures of a codec's dense distribution ``q`` (no top-k triple, e.g. sampled)
    against fresh logits: KL and top-1 agreement only (see :data:`NOT_TOPK`)."""
    z = logits.float()
    S = z.shape[0]
    kl, top1 = _kl_to(q.float(), z, kind).reshape(S, -1), (q.argmax(-1) == z.argmax(-1)).float().reshape(S, -1)
    return {"top1": top1.mean(1), "kl": kl.mean(1), "kl_max": kl.max(1).values}


NOT_TOPK = ("the codec stores no top-k logits (sampled: ids drawn from the teacher and their counts), so "
            "logit errors, top-k index agreement and the per-k/dtype figures do not apply; KL and top-1 "
            "agreement compare the stored (empirical) distribution with the fresh teacher")


def _summary(parts: list[dict[str, torch.Tensor]]) -> dict:
    cat = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    if "err_max" not in cat:  # a codec without a top-k triple
        return {"max_abs_logit_error": None, "mean_abs_logit_error": None, "topk_index_agreement": None,
                "top1_agreement": float(cat["top1"].mean()), "kl_mean": float(cat["kl"].mean()),
                "kl_max": float(cat["kl_max"].max())}
    return {
        "max_abs_logit_error": float(cat["err_max"].max()),
        "mean_abs_logit_error": float(cat["err_sum"].sum() / cat["err_n"].sum()),
        "topk_index_agreement": float(cat["agree"].mean()),
        "top1_agreement": float(cat["top1"].mean()),
        "kl_mean": float(cat["kl"].mean()),
        "kl_max": float(cat["kl_max"].max()),
    }


def fidelity(path: str | Path, data_dir: str | Path, teachers: list[str], samples: int = 64, seed: int = 0,
             device: str = "auto", state_dicts: list[str | None] | None = None, teacher_args: dict | None = None,
             batch_size: int = 32, progress: bool = False, ensemble=None, ensemble_weights=None,
             aggregation: str | None = None, member_weighting: str | None = None,
             compositions: list[dict] | None = None, source: str | None = None) -> dict:
    """Re-run the teachers on a seeded random sample of stored views and compare with the cache.

    ``data_dir``: the cache's data (a path, its source kind detected or named by ``source``).

    Views are replayed from stored parameters, the teachers run at the dump's precision and are
    aggregated the way the manifest says, and the stored top-k is compared with the fresh
    logits. Teachers that differ from the manifest's (count, names, sha256) are reported
    (``teachers_match: false`` and a ``warning:`` line on stderr), not refused: float results
    differ slightly across hardware, and the error figures say by how much. ``state_dicts`` and
    ``teacher_args`` are as for :func:`logitcache.dump`.

    Returns ``samples_checked, teachers_match, teachers, max_abs_logit_error,
    mean_abs_logit_error, topk_index_agreement, top1_agreement, kl_mean, kl_max`` and
    ``members`` (stored member name -> the same figures, comparing each stored member with the
    --teacher at the same position; empty when members were not stored or the counts differ).
    KL is KL(fresh teacher || reconstruction from the cache): it includes the top-k
    truncation, so it is ~0 only when k == C.

    The report part (rows = views, or view frames for frame-level teachers; for token windows
    the unmasked positions, as every figure of a token cache is: padding and document starts are
    left out, and ``positions`` counts the rest):

    * ``per_k``: for each k' of ``k_grid`` (k' <= k, the cache truncated to its top k'): kl_mean,
      kl_max, top1_agreement, topk_agreement (stored top-k' classes among the fresh top-k'),
      covered_mass_mean/min (softmax: probability mass of the top-k'; sigmoid: the top-k' share
      of the summed class probabilities), tail_mass_mean (1 - covered), prob_max_abs_error and
      prob_mean_max_abs_error (|p_fresh - p_reconstructed|, max over classes), bytes_per_view.
    * ``dtype_effect``: {float16, float32} -> the same per k' up to C, for the fresh logits' own
      top-k' rounded to that dtype (what a dump with that --value-dtype would have stored),
      plus max_abs_logit_error of the rounding.
    * ``tail_mass``: histogram (``edges``, ``counts``) and quantiles of the per-row tail mass at k.
    * ``per_class``: per class, coverage (share of its fresh probability that falls in the stored
      top-k), in_topk_rate and mean_prob.
    * ``disagreement``: the fresh members' pairwise_top1_agreement matrix,
      mean_pairwise_disagreement, diversity_kl (mean KL(member || ensemble)) and
      member_vs_ensemble.

    Recompositions (``ensemble`` with ``ensemble_weights``, ``aggregation``, ``member_weighting``
    as for train, and/or ``compositions``: a list of dicts of those keys): ``recomposed``, one
    entry per composition with KL(the composition of the re-run teachers || the one recomposed
    from the stored members), see :mod:`logitcache.reports.recomposed`. Member i is re-run by
    teacher i. Empty without them.
    """
    from logitcache.reports.recomposed import Recompositions
    import sys

    from logitcache.device import autocast, resolve_device
    from logitcache.hetero import apply_recorded, coverage, ensemble_logits
    from logitcache.teachers import load_teachers, position_shape, probe_teachers, run_teachers, teacher_differences
    from logitcache.views import SourceContent, ViewSource, check_compatible

    samples, batch_size = checks.whole("--samples", samples), checks.whole("--batch-size", batch_size)
    seed = checks.seed("--seed", seed)
    if not teachers:
        raise LogitCacheError("at least one --teacher is needed")
    with open_cache(path) as cache:
        m = cache.manifest
        folder = open_source(data_dir, source)
        check_compatible(cache, folder)
        kind, stored_aggregation, weights = m["output_kind"], m["aggregation"], m.get("weights")
        recomposed = Recompositions(cache, teachers, ensemble, ensemble_weights, aggregation, member_weighting,
                                    compositions)
        if weights and len(weights) != len(teachers):
            raise LogitCacheError(f"cache {cache.path} was dumped with {len(weights)} weighted teachers; "
                                  f"got {len(teachers)} --teacher")
        dev = resolve_device(device)
        loaded = load_teachers(teachers, state_dicts, teacher_args, dev)
        apply_recorded(loaded, m)  # each teacher's own rate, clip length and class map, as dumped
        augmenter = Augmenter.from_spec(m["augment"])
        num_classes, frames = probe_teachers(loaded, augmenter.view_shape, dev, kind,
                                             inputs=getattr(augmenter, "probe_views", None))
        positions = position_shape(loaded)
        if num_classes != layout_classes(m) or frames != m.get("frames") or positions != m.get("positions"):
            theirs = (f"C={num_classes}" + (f", T={frames}" if frames else "")
                      + (f", map {positions}" if positions else ""))
            ours = (f"C={layout_classes(m)}" + (f", T={m['frames']}" if m.get("frames") else "")
                    + (f", map {m['positions']}" if m.get("positions") else ""))
            raise LogitCacheError(f"teachers output {theirs} but cache {cache.path} holds {ours}")

        dumped = m.get("teachers", [])
        described = []
        for i, t in enumerate(loaded):
            ref = dumped[i]["sha256"] if i < len(dumped) else None
            described.append({"name": t.name, "sha256": t.sha256, "manifest_sha256": ref,
                              "match": t.sha256 == ref})
        differences = teacher_differences(dumped, loaded)
        teachers_match = not differences
        if differences:
            print(f"warning: the teachers given are not the ones {cache.path} was dumped with "
                  f"({'; '.join(differences)}); the figures compare different models", file=sys.stderr)
        # Members map by position (the dump stored them in --teacher order); only when counts agree.
        member_of = dict(enumerate(cache.members)) if len(loaded) == len(cache.members) else {}

        # A seeded sample of (epoch, position) views from completely written chunks (an unfinished
        # cache reads zeros elsewhere), then read and replayed epoch by epoch in stored order.
        N, R = cache.num_samples, cache.chunk_rows
        done = np.argwhere(cache.chunks_done())  # [(epoch, chunk)], epoch-major
        if not len(done):
            raise LogitCacheError(f"{cache.path}: no chunk has been written yet")
        rows = np.minimum((done[:, 1] + 1) * R, N) - done[:, 1] * R
        ends = np.cumsum(rows)
        rng = np.random.default_rng(seed)
        pick = np.sort(rng.choice(int(ends[-1]), size=min(samples, int(ends[-1])), replace=False))
        which = np.searchsorted(ends, pick, side="right")
        flat = done[which, 0] * N + done[which, 1] * R + (pick - (ends[which] - rows[which]))
        source = ViewSource(folder, augmenter, SourceContent.of_cache(cache))
        tokens, positions = getattr(augmenter, "modality", None) == "tokens", 0
        parts: dict[str, list] = {"ensemble": [], **{n: [] for n in member_of.values()}}
        acc = _ReportAccumulator(kind, layout_classes(m), cache.topk, [t.name for t in loaded])
        size_of = _size_model(cache)
        bar = tqdm(total=len(flat), unit="view", desc="fidelity", disable=not progress, dynamic_ncols=True)
        try:
            for epoch in np.unique(flat // N):
                pos = flat[flat // N == epoch] % N
                for a in range(0, len(pos), batch_size):
                    ids = [cache.ids[i] for i in cache.order(int(epoch))[pos[a:a + batch_size]]]
                    wave, mask = _replayed(source, folder, ids, cache.params(int(epoch), ids), tokens)
                    bar.update(len(ids))
                    if mask is not None and not bool(mask.any()):
                        continue  # every position masked: nothing here is a target anything trains on
                    with torch.inference_mode(), autocast(dev, m.get("precision", "fp32")):
                        logits = run_teachers(loaded, wave.to(dev), lambda: ids)
                    logits = [_kept(x, mask) for x in logits]
                    ens = ensemble_logits(logits, kind, stored_aggregation, weights, coverage(loaded)).cpu()
                    logits = [x.cpu() for x in logits]
                    groups = [("ensemble", None, ens)]
                    recomposed.add(int(epoch), ids, logits, mask)
                    groups += [(n, n, logits[i]) for i, n in member_of.items()]
                    positions += int(mask.sum()) if mask is not None else 0
                    for key, member, z in groups:
                        t = cache.targets(int(epoch), ids, member=member)
                        if not cache.codec.triple:
                            parts[key].append(_compare_dense(_kept(cache.codec.dense(t), mask), z, kind))
                            continue
                        stored = {f: _kept(torch.from_numpy(np.asarray(getattr(t, f))), mask)
                                  for f in ("values", "indices", "stat")}
                        parts[key].append(_compare(stored, z, kind))
                        if member is None:
                            acc.add(stored, z, logits)
        finally:
            bar.close()
    if tokens and not positions:
        raise LogitCacheError(f"{cache_location(path)}: the {len(flat)} window(s) checked hold no unmasked "
                              f"position (every next token is padding or starts a document); give more --samples")

    return {
        "samples_checked": len(flat),
        "teachers_match": bool(teachers_match),
        "teachers": described,
        "output_kind": kind,
        "aggregation": stored_aggregation,
        "topk": int(m["topk"]),
        "value_dtype": m["value_dtype"],
        "device": dev.type,
        **_summary(parts["ensemble"]),
        "members": {n: _summary(parts[n]) for n in member_of.values()},
        "path": str(cache_location(path)),
        "classes": layout_classes(m),
        "frames": m.get("frames"),
        "modality": (m.get("augment") or {}).get("modality", "audio"),
        "codec": cache.spec.codec,
        "recomposed": recomposed.result(),
        **({"positions": positions} if tokens else {}),
        **(acc.result(cache.classes, size_of) if cache.codec.triple
           else _not_topk_report(positions if tokens else len(flat))),
    }


def _replayed(source, folder, ids: list[str], params: dict, tokens: bool):
    """(the batch of replayed views, and for token windows the mask ``[S, L]`` of the positions a
    loss counts; None for other views, whose every row counts)."""
    rows = [{n: v[r] for n, v in params.items()} for r in range(len(ids))]
    if not tokens:
        return torch.stack([source.replay(folder.index[s], p) for s, p in zip(ids, rows)]), None
    windows = (source.replay_tokens(folder.index[s], p) for s, p in zip(ids, rows))
    x, _, mask = (torch.stack(t) for t in zip(*windows))
    return x, mask


def _kept(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The rows of ``t [S, L, ...]`` at unmasked positions, ``[P, ...]`` (padding and document
    starts are no target anything trains on, so no figure averages over them); all of ``t``
    without a mask."""
    return t if mask is None else t[mask.to(t.device)]


def _not_topk_report(rows: int) -> dict:
    """The report part for a codec without a top-k triple: every top-k figure None, and why."""
    keys = ("k_grid", "per_k", "dtype_effect", "codec_effect", "tail_mass", "per_class", "disagreement")
    return {**dict.fromkeys(keys), "rows_checked": rows, "not_applicable": NOT_TOPK}
