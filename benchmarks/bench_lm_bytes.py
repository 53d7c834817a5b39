"""Bytes per token against fidelity at V = 151,936 (Qwen's vocabulary): our codecs, Megatron-LM's
offline KD, DistillKit, and a 37-byte sampled-KD re-implementation, re-encoded from the same rows.

Teacher rows: logitcache.codecs.evaluate.lm_teacher_rows, next-token distributions shaped like an
LM's (Zipf prior over the vocabulary, per-token context noise, a few peaked continuations; mean
entropy ~2 nats, median ~1, a tenth above 5; ~9% of the mass beyond the top-128 on average), made
in blocks of 64 rows so [rows, V] float32 never exceeds 39 MB. A tiny GPT was not used: randomly
initialised it is near-uniform (entropy ~log V = 11.9), and training one to realistic heads at
this V does not fit the CPU budget.

  B/token   stored bytes per token, uncompressed (Megatron: after zstd, its shard format); "zstd"
            is zstd level 3 of all rows as one shard, for every format
  KL        mean and max per token of KL(teacher || what the format stores), float64, as the
            format's own loss reads it: ours (topk/compact) with the exact tail spread evenly
            (codecs.evaluate.dense_kl); renormalised formats with no tail and sampled rows (an
            empirical distribution) under dense_kl's convention that a stored tail counts as at
            least 2^-24 (TAIL_FLOOR), else their KL is infinite
  top-1     the format's most probable stored id is the teacher's argmax
  bias      |E[g] - g_full| / |g_full|, g = gradient of the format's own KD loss w.r.t. student
            logits, g_full = that of full-vocabulary KD, q - p; norms over all rows and classes;
            students: "trained" 0.8 x teacher + N(0, 1) logits, "random" N(0, 1) logits. Sampled:
            E over --draws fresh draws per row (bench_sampled.Errors takes the noise share out);
            "~0 (<b)" when within 2 standard errors of 0

"tail ~ prior" rows: the same compact rows, their exact tail mass spread over the ids outside the
top-k in proportion to a prior (codecs.evaluate.prior_tail_probs) instead of evenly, and KD against
that dense target. The prior is the mean teacher probability per id over --prior-rows further rows
of the same teacher stream (codecs.evaluate.mean_probs: the cache's own teacher outputs, as a dump
would accumulate them; the measured rows are not in it). "prior^beta (+1 B)": each row's tail
follows prior ** beta, beta the row's maximum-likelihood exponent in a byte (evaluate.fit_tail_beta).
These rows favour the method: the synthetic rows share one Zipf prior by construction (each row's
background is that prior to a per-row power, times log-normal noise: prior^beta is the generator's
own family), while a real LM's tail follows unigram frequency only partly; bench_lm_tail.py
measures the same reconstructions on a small trained LM's rows.

"ids allocated across the window" rows: not a fixed k per token but a fixed budget of --budget
ids per token on average over each block of 64 rows (a window of L = 64 positions), given one at
a time to the position whose KL drops most (greedy; optimal as each row's KL is convex in k),
tail spread evenly. Values are the exact float32 top-k (the 6-bit storage adds ~0.1% KL); bytes
are each row's compact 6-bit row at its own k plus 1 B for k (what a variable-length row would
take; no codec stores it).

    python benchmarks/bench_lm_bytes.py            # ~4 min on 2 quiet cores (12 at load 9)
    python benchmarks/bench_lm_bytes.py --quick    # ~45 s (4 min at load 9)
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as Cm  # noqa: E402
import _lm_formats as LF  # noqa: E402
from bench_sampled import Errors, full_gradient, grad_of  # noqa: E402
from logitcache.codecs.sampled import DRAWS_ELIAS_FANO  # noqa: E402

from logitcache.codecs import get_codec  # noqa: E402
from logitcache.codecs.evaluate import (TAIL_FLOOR, dense_kl, fit_tail_beta, lm_teacher_rows,  # noqa: E402
                                        mean_probs, prior_tail_probs)
from logitcache.targets import kd_loss, kl_divergence, topk_targets  # noqa: E402

V = 151_936
KIND = "multiclass"
TOPK_KS = (8, 20, 64, 128)  # 128: DistillKit's and Megatron's k
SAMPLED = ((12, 0), (25, 0), (50, 0), (12, 4), (25, 4), (6, 0))
ADAPTIVE_BUDGETS = (32, 48, 52)
DISTILLKIT_GOAL, SAMPLED_GOAL = 1 / 3, 37
WRAP = "sampled-KD re-impl.: the id wrap alone, exact expectation"


def floored_kl(z: torch.Tensor, q: torch.Tensor) -> np.ndarray:
    """KL(teacher || q) float64, zero-mass classes sharing TAIL_FLOOR evenly (dense_kl's rule)."""
    zero = q <= 0
    fill = TAIL_FLOOR / zero.sum(-1, keepdim=True).clamp_min(1)
    q = torch.where(zero, fill.expand_as(q), q)
    return kl_divergence(z.double(), q / q.sum(-1, keepdim=True), KIND, q_probs=True).numpy()


class Stat:
    """Running figures of one format over blocks of rows."""

    def __init__(self, name: str, row_bytes: int, note: str = ""):
        self.name, self.row_bytes, self.note = name, row_bytes, note
        self.kl, self.top1, self.packed, self.row_sizes = [], [], [], []
        self.err = {"trained": [0.0, 0.0], "random": [0.0, 0.0]}  # sum |E g - g|^2, sum |g|^2
        self.bias_text = {}

    def add(self, kl, top1, packed, errs) -> None:
        self.kl.append(kl)
        self.top1.append(top1)
        self.packed.append(packed)
        for s, (e2, g2) in errs.items():
            self.err[s][0] += e2
            self.err[s][1] += g2

    def bias(self, s: str) -> str:
        if s in self.bias_text:
            return self.bias_text[s]
        e2, g2 = self.err[s]
        return f"{math.sqrt(e2 / g2):.3g}"


def codec(name: str, k: int, **options):
    return get_codec(name)(k, V, KIND, None, options)


def encode_ours(c, z: torch.Tensor, seeds=None):
    host = {f: t.cpu().numpy() for f, t in c.encode(z, seeds).items()}
    packed = c.pack(host)
    return packed, c.decode(packed)


def packed_rows(arrays: dict) -> np.ndarray:
    return np.concatenate([LF.as_bytes(np.asarray(a).reshape(len(a), -1)) for a in arrays.values()], 1)


def grad_errors(loss, z, students, g_full) -> dict:
    out = {}
    for s, x in students.items():
        g = grad_of(loss, x)
        out[s] = (float((g.double() - g_full[s]).pow(2).sum()), float(g_full[s].pow(2).sum()))
    return out


def dense_target_loss(q: torch.Tensor):
    """KD against a dense target ``q [R, V]``: cross-entropy, gradient q_student - q."""
    q = q.float()
    return lambda s: -(q * F.log_softmax(s.float(), -1)).sum(-1).mean()


def prior_tail_formats(z: torch.Tensor, log_prior: np.ndarray):
    """The compact 6-bit rows with their tail spread in proportion to the prior (see the doc)."""
    for k in TOPK_KS:
        c = codec("compact", k, value_bits=6)
        packed, dec = encode_ours(c, z)
        for fit in (False, True):
            beta = fit_tail_beta(z.numpy(), dec[1], log_prior) if fit else 1.0
            q = prior_tail_probs(*dec, log_prior, beta)
            extra = np.round(np.asarray(beta) * 64).astype(np.uint8).reshape(-1, 1) if fit else None
            rows = packed_rows(packed) if extra is None else np.concatenate([packed_rows(packed), extra], 1)
            name = f"ours compact 6-bit k={k}, tail ~ prior" + ("^beta (+1 B)" if fit else "")
            yield (name, c.row_bytes() + int(fit), floored_kl(z, q), dec[1][:, 0], rows, dense_target_loss(q),
                   "favoured: synthetic rows share the prior by construction")


ADAPTIVE_MAX_K = 1024


def even_tail_kl_by_k(z: torch.Tensor, kmax: int) -> np.ndarray:
    """float64 [R, kmax + 1]: KL(teacher || its top-k with the tail spread evenly) for k = 0..kmax,
    from cumulative sums over the sorted row (no loop over k)."""
    lp = torch.sort(F.log_softmax(z.double(), -1), -1, descending=True).values
    p = lp.exp()
    ks = torch.arange(kmax + 1)
    plogp = torch.flip(torch.cumsum(torch.flip(p * lp, [-1]), -1), [-1])[:, ks]
    mass = torch.flip(torch.cumsum(torch.flip(p, [-1]), -1), [-1])[:, ks]
    return (plogp - mass * torch.log(mass.clamp_min(1e-300) / (z.shape[-1] - ks.double()))).numpy()


def allocate_ids(kl: np.ndarray, budget: int) -> np.ndarray:
    """Per row k (int), ``budget`` x rows ids in all, each to the row whose KL drops most."""
    import heapq

    R, top = kl.shape[0], kl.shape[1] - 1
    k = np.zeros(R, np.int64)
    heap = [(kl[r, 1] - kl[r, 0], r) for r in range(R)]
    heapq.heapify(heap)
    for _ in range(budget * R):
        _, r = heapq.heappop(heap)
        k[r] += 1
        if k[r] < top:
            heapq.heappush(heap, (kl[r, k[r] + 1] - kl[r, k[r]], r))
    return k


def adaptive_formats(z: torch.Tensor, budgets):
    """Ids allocated across the block's positions (see the doc), even tail, kd_loss per row."""
    kl = even_tail_kl_by_k(z, ADAPTIVE_MAX_K)
    for budget in budgets:
        k = allocate_ids(kl, budget)
        nbytes = np.array([codec("compact", int(x), value_bits=6).row_bytes() if x else 2 for x in k]) + 1
        rows = [topk_targets(z[r:r + 1], max(int(k[r]), 1), KIND) for r in range(len(z))]

        def loss(s, rows=rows):
            return torch.stack([kd_loss(s[r:r + 1], *t, KIND) for r, t in enumerate(rows)]).mean()
        yield (f"ours ids allocated across the window, mean k={budget} (6-bit rows + 1 B k)", nbytes,
               kl[np.arange(len(z)), k], np.array([int(t[1][0, 0]) for t in rows]), None, loss,
               f"k = {k.min()}-{k.max()}; bytes estimated, no codec stores it")


def deterministic_formats(z: torch.Tensor, log_prior: np.ndarray):
    """(name, row bytes, kl, top-1 ids, packed rows, loss, note) of every format but sampled."""
    for k in TOPK_KS:
        c = codec("topk", k, value_dtype="float16")
        packed, dec = encode_ours(c, z)
        yield (f"ours topk k={k} (fp16 + exact log-normaliser)", c.row_bytes(), dense_kl(z.numpy(), *dec, KIND),
               dec[1][:, 0], packed_rows(packed), lambda s, c=c, d=dec: c.loss(s, tuple(map(torch.as_tensor, d))), "")
    for bits in (6, 8):
        for k in TOPK_KS:
            c = codec("compact", k, value_bits=bits)
            packed, dec = encode_ours(c, z)
            yield (f"ours compact {bits}-bit k={k}", c.row_bytes(), dense_kl(z.numpy(), *dec, KIND), dec[1][:, 0],
                   packed_rows(packed), lambda s, c=c, d=dec: c.loss(s, tuple(map(torch.as_tensor, d))), "")
    yield from prior_tail_formats(z, log_prior)
    yield from adaptive_formats(z, ADAPTIVE_BUDGETS)
    rows = LF.megatron(z, 128, 18)
    yield ("Megatron top-128 fp16 + 18-bit ids, zstd", None, floored_kl(z, LF.dense(rows, V)),
           rows.ids[:, 0].numpy(), rows.packed, rows.loss,
           "asserts at V > 131,072 (17-bit ids); sized at 18 bits; B/token after zstd")
    for cfg in LF.DISTILLKIT:
        for missing in ("zero", "symmetric_uniform") if cfg.name == "recommended" else ("zero",):
            rows = LF.distillkit(z, cfg, missing)
            assert rows.row_bytes == LF.distillkit_row_bytes(cfg, V)
            yield (f"DistillKit {cfg.name} k={cfg.k} exact={cfg.exact_k} ({missing})", rows.row_bytes,
                   floored_kl(z, LF.dense(rows, V)), rows.ids[:, 0].numpy(), rows.packed, rows.loss, "")


def run_deterministic(blocks, stats: dict, log_prior: np.ndarray) -> None:
    for b, z in enumerate(blocks):
        z = torch.from_numpy(z)
        students = student_logits(z, b)
        g_full = {s: full_gradient(z.double(), x.double(), KIND) for s, x in students.items()}
        top = z.argmax(-1).numpy()
        for name, nbytes, kl, top1, packed, loss, note in deterministic_formats(z, log_prior):
            per_row = isinstance(nbytes, np.ndarray)  # a variable-length row: its bytes, no packed rows
            st = stats.setdefault(name, Stat(name, 0 if per_row else nbytes or packed.shape[1], note))
            if per_row:
                st.row_sizes.append(nbytes)
                packed = nbytes[:, None]
            st.add(np.asarray(kl), np.asarray(top1).astype(np.int64) == top, packed,
                   grad_errors(loss, z, students, g_full))
        for name, c, rskd in sampled_configs():
            kls, top1s, first = [], [], None
            for d in range(2):  # the KL of an empirical row hardly varies between draws
                q, rb, _ = sampled_rows(c, z, rskd, b * 131 + d)
                kls.append(floored_kl(z, q))
                top1s.append(q.argmax(-1).numpy() == top)
                first = rb if first is None else first
            st = stats.setdefault(name, Stat(name, first.shape[1] if rskd else c.row_bytes(),
                                             "ids wrap above 131,072" if rskd else ""))
            st.add(np.mean(kls, 0), np.mean(top1s, 0), first, {})
        wrap = stats.setdefault(WRAP, Stat(WRAP, 0))
        for sname in students:
            wrap.err[sname][0] += float((wrap_expectation(z) - F.softmax(z.double(), -1)).pow(2).sum())
            wrap.err[sname][1] += float(g_full[sname].pow(2).sum())
        print(f"#   block {b} done", flush=True)


def wrap_expectation(z: torch.Tensor) -> torch.Tensor:
    """E[stored weights] of the 37-byte rows but for their 7-bit rounding: the teacher with the mass
    of every id >= 131,072 moved onto id - 131,072 (its loss's gradient is then q - this)."""
    p = F.softmax(z.double(), -1)
    hi = p[:, LF.MEGATRON_MAX_VOCAB:]
    return torch.cat([p[:, :hi.shape[1]] + hi, p[:, hi.shape[1]:LF.MEGATRON_MAX_VOCAB], hi * 0], -1)


def student_logits(z: torch.Tensor, seed: int) -> dict:
    g = torch.Generator().manual_seed(1000 + seed)
    noise = torch.randn(z.shape, generator=g)
    return {"trained": 0.8 * z + noise, "random": torch.randn(z.shape, generator=g)}


def sampled_configs():
    for n, h in SAMPLED:
        # stored as new dumps store them: the draws as an Elias-Fano multiset
        yield (f"ours sampled n={n}" + (f" + head {h}" if h else ""),
               codec("sampled", 0, n=n, head=h, draws=DRAWS_ELIAS_FANO), False)
    yield "sampled-KD re-impl. 12 ids x (17-bit id + 7-bit p) + 1 B", codec("sampled", 0, n=12), True


def sampled_rows(c, z: torch.Tensor, rskd: bool, draw: int):
    """(dense stored distribution, packed rows, loss) of one draw per row."""
    seeds = np.arange(len(z), dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) ^ np.uint64(draw * 7919 + 1)
    packed, dec = encode_ours(c, z, seeds)
    if rskd:
        rows = LF.rskd37(torch.as_tensor(dec["ids"]).long(), torch.as_tensor(dec["counts"]).long(), c.n)
        return LF.dense(rows, V), rows.packed, rows.loss
    return c.dense(dec).double(), packed_rows(packed), lambda s: c.loss(s, dec)


def run_sampled(z: np.ndarray, draws: int, stats: dict) -> None:
    """The gradient bias of the sampled formats: ``draws`` fresh draws of every row of ``z``."""
    z = torch.from_numpy(z)
    students = student_logits(z, 99)
    g_full = {s: full_gradient(z.double(), x.double(), KIND) for s, x in students.items()}
    for name, c, rskd in sampled_configs():
        errs = {s: Errors(len(z), V) for s in students}
        for d in range(draws):
            _, _, loss = sampled_rows(c, z, rskd, 10_000 + d)
            for s, x in students.items():
                errs[s].add(grad_of(loss, x).double() - g_full[s])
        for s, e in errs.items():
            b2, se, _ = e.bias_mse()
            g2 = float(g_full[s].pow(2).sum(-1).mean())
            bound = math.sqrt(max(b2, 0.0) + 2 * se)
            stats[name].bias_text[s] = (f"{math.sqrt(b2 / g2):.3g}" if b2 > 2 * se
                                        else f"~0 (<{bound / math.sqrt(g2):.2g})")
        print(f"#   {name} done", flush=True)


def report(stats: dict) -> None:
    rows = []
    for st in stats.values():
        if st.name == WRAP:
            rows.append([st.name, "-", "-", "-", "-", "-", st.bias("trained"), st.bias("random"),
                         "the bias its ids' 17-bit mask adds at V = 151,936 (7-bit rounding aside)"])
            continue
        kl = np.concatenate(st.kl)
        if st.row_sizes:
            st.row_bytes = round(float(np.concatenate(st.row_sizes).mean()), 1)
        packed = np.concatenate(st.packed)
        z = "-" if st.row_sizes else LF.zstd_bytes(packed) / len(packed)
        nbytes = z if st.name.startswith("Megatron") else st.row_bytes
        rows.append([st.name, round(nbytes, 1), z if z == "-" else round(z, 1), f"{kl.mean():.4g}",
                     f"{kl.max():.3g}", f"{np.concatenate(st.top1).mean():.4f}", st.bias("trained"), st.bias("random"), st.note])
    print()
    print(Cm.table(["format (V = 151,936)", "B/token", "zstd B/token", "KL mean", "KL max", "top-1",
                    "bias (trained student)", "bias (random student)", "note"], rows))
    ratios(stats, {r[0]: r for r in rows})


def ratios(stats: dict, rows: dict) -> None:
    def rows_where(keep):
        return [(st.row_bytes, float(np.concatenate(st.kl).mean()), n) for n, st in stats.items() if keep(n)]

    shipped = rows_where(lambda n: n.startswith("ours") and not any(w in n for w in ("sampled", "tail ~", "allocated")))
    shaped, spread = rows_where(lambda n: "tail ~" in n), rows_where(lambda n: "allocated" in n)
    parts, tails, alloc = [], [], []
    for name, st in stats.items():
        if not name.startswith("DistillKit"):
            continue
        dk = float(np.concatenate(st.kl).mean())
        parts.append(f"{name}: {best_at(shipped, dk, st.row_bytes)}")
        if "symmetric_uniform" in name:
            tails.append(f"{name}: {best_at(shaped, dk, st.row_bytes)}")
            alloc.append(f"{name}: {best_at(spread, dk, st.row_bytes)}")
    s12 = stats.get("ours sampled n=12")
    line = "; ".join(parts)
    if s12:
        line += (f"; ours sampled n=12: {s12.row_bytes} B vs 37 B (goal < {SAMPLED_GOAL}; draws stored as an "
                 f"Elias-Fano multiset); n=6: {stats['ours sampled n=6'].row_bytes} B")
    if tails:
        line += "; tail spread by the prior (measured, not a codec; rows that favour it): " + "; ".join(tails)
    if alloc:
        line += "; ids allocated across the window (measured, not a codec): " + "; ".join(alloc)
    print()
    print("ratios: " + line)


def best_at(ours: list, dk: float, dk_bytes: int) -> str:
    """The fewest bytes among ``ours`` (bytes, KL, name) at KL <= ``dk``, as a ratio to ``dk_bytes``."""
    fit = [o for o in ours if o[1] <= dk]
    if not fit:
        return f"none of ours at KL <= {dk:.3g}"
    b, kl, on = min(fit)
    return (f"{b} / {dk_bytes} B = {b / dk_bytes:.3f} ({on}, KL {kl:.3g} <= {dk:.3g}; "
            f"goal <= {DISTILLKIT_GOAL:.3f})")


def prior_stream(skip: int, rows: int):
    """The teacher rows after the first ``skip`` of the same stream (seed 0: the same vocabulary
    ranking), ``rows`` of them."""
    seen = 0
    for z in lm_teacher_rows(skip + rows, V, seed=0):
        keep = z[max(0, skip - seen):]
        seen += len(z)
        if len(keep):
            yield keep


def main() -> None:
    p = Cm.parser(__doc__)
    p.add_argument("--rows", type=int, default=None, help="teacher rows (tokens) (default 128; --quick 32)")
    p.add_argument("--sampled-rows", type=int, default=None,
                   help="rows for the sampled gradient bias, <= 64 (default 16; --quick 4)")
    p.add_argument("--draws", type=int, default=None, help="draws per row for sampled (default 16; --quick 6)")
    p.add_argument("--prior-rows", type=int, default=None,
                   help="further teacher rows the tail prior is estimated from (default 512; --quick 128)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = a.rows or (32 if a.quick else 128)
    srows = a.sampled_rows or (4 if a.quick else 16)
    draws = a.draws or (6 if a.quick else 16)
    prior_rows = a.prior_rows or (128 if a.quick else 512)
    print(f"# {Cm.machine()}")
    print(f"# V = {V:,}, {rows} teacher rows, sampled: {srows} rows x {draws} draws, "
          f"tail prior from {prior_rows} further rows")
    t0 = time.time()
    stats: dict = {}
    log_prior = np.log(mean_probs(prior_stream(rows, prior_rows)))
    run_deterministic(lm_teacher_rows(rows, V, seed=0), stats, log_prior)
    run_sampled(next(lm_teacher_rows(64, V, seed=0))[:srows], draws, stats)  # the first rows
    report(stats)
    print(f"# wall time {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
