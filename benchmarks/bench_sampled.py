"""Sampled targets (RS-KD, logitcache.codecs.sampled) against float16 top-k at equal bytes per row.

Rows are realistic ensemble targets (logitcache.codecs.evaluate.teacher_rows: three synthetic
teachers, Zipf-like class prior, aggregated by mean probability), for softmax (multiclass) and
sigmoid (multilabel) heads, at C = 527 and C = 151,936 (fewer rows there). The student's logits
are 0.8 x teacher + N(0, 1) noise (a half-trained student; topk also with an early student,
0.1 x teacher + N(0, 0.25), whose tail shape is far from the teacher's); T = T_d = 1. No cache is
written.

At each byte budget, topk keeps the largest k whose float16 values + ids + float32 stat fit, and
sampled the largest n (and "sampled+h" an exact head of h = k // 3 ids plus the largest n that
still fits). For every row the benchmark takes the gradient of the codec's own KD loss w.r.t. the
student logits (autograd: kd_loss for topk, sampled.loss for sampled) and compares it with the
full-vocabulary gradient T (q - p) (sigmoid: (q - p) / C, kd_loss's mean BCE):

  bias        RMS over rows of |E[g] - g_full| (the L2 norm over classes of the expected gradient
              error). topk is deterministic; for sampled, E over ``--draws`` independent draws
              per row, with the variance's 1/draws share taken out (an unbiased estimate of
              |E[g] - g_full|^2 per row, averaged over rows); "~0 (<b)" when that average is
              within 2 standard errors of 0, b = sqrt(estimate + 2 standard errors)
  MSE         mean over rows (and draws) of |g - g_full|^2: bias^2 + variance, what one step sees
  |g_full|    RMS of the full gradient's norm, for scale
  KL          mean KL(teacher || row) (topk: tail spread evenly, as evaluate.dense_kl; sampled:
              inf, an empirical distribution has no mass off its draws) and KL(row || teacher)
              (multilabel: the sum over classes of Bernoulli KLs; sampled rows clipped to [0, 1])
  naive       multiclass only: a cache that renormalises its top-k (no tail bucket)

    python benchmarks/bench_sampled.py            # ~10 min on 2 shared cores
    python benchmarks/bench_sampled.py --quick    # ~2 min
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

from logitcache.codecs import sampled as sc  # noqa: E402
from logitcache.codecs.evaluate import _kl, dense_kl, teacher_rows  # noqa: E402
from logitcache.targets import index_dtype, kd_loss, teacher_probs, topk_targets  # noqa: E402

KINDS = ("multiclass", "multilabel")
BUDGETS = (40, 80)


def topk_bytes(k: int, C: int) -> int:
    return k * (2 + np.dtype(index_dtype(C)).itemsize) + 4


def largest(fits, top: int) -> int:
    """The largest x in 1..top with fits(x) (0 if none)."""
    return max([x for x in range(1, top + 1) if fits(x)], default=0)


def full_gradient(teacher: torch.Tensor, student: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "multiclass":
        return F.softmax(student, -1) - F.softmax(teacher, -1)
    return (torch.sigmoid(student) - torch.sigmoid(teacher)) / teacher.shape[-1]


def grad_of(loss_fn, student: torch.Tensor) -> torch.Tensor:
    """Per-row gradient of a mean-over-rows loss (times the row count)."""
    s = student.clone().requires_grad_(True)
    (loss_fn(s) * len(s)).backward()
    return s.grad


def log_probs(p: torch.Tensor, kind: str):
    """(log p, log 1-p) float64 for evaluate._kl; categorical rows get None for the second."""
    p = p.double()
    if kind == "multiclass":
        return torch.log(p), None
    return torch.log(p), torch.log1p(-p)


def teacher_log_probs(z: torch.Tensor, kind: str):
    z = z.double()
    return (F.log_softmax(z, -1), None) if kind == "multiclass" else (F.logsigmoid(z), F.logsigmoid(-z))


class Errors:
    """Running per-row sums of gradient errors over draws."""

    def __init__(self, rows: int, C: int):
        self.sum = torch.zeros(rows, C, dtype=torch.float64)
        self.sq = torch.zeros(rows, dtype=torch.float64)
        self.draws = 0

    def add(self, e: torch.Tensor) -> None:
        self.sum += e.double()
        self.sq += e.double().pow(2).sum(-1)
        self.draws += 1

    def bias_mse(self) -> tuple[float, float, float]:
        """(bias^2, its Monte-Carlo standard error, MSE), each averaged over rows. bias^2 per row is
        |mean error|^2 less its expected noise trace / draws: an unbiased estimate of |E[g] - g_full|^2."""
        D, R = self.draws, len(self.sq)
        m2 = (self.sum / D).pow(2).sum(-1)
        mse = float((self.sq / D).mean())
        if D == 1:
            return float(m2.mean()), 0.0, mse
        b2 = m2 - (self.sq - D * m2).clamp_min(0) / (D - 1) / D
        return float(b2.mean()), float(b2.std() / math.sqrt(R)) if R > 1 else math.inf, mse


def measure_topk(z, s, g_full, k, kind):
    v, i, stat = topk_targets(z, k, kind)
    v16 = v.clamp(-65504, 65504).half().float()
    g = grad_of(lambda x: kd_loss(x, v16, i, stat, kind), s)
    err = Errors(len(z), z.shape[-1])
    err.add(g - g_full)
    q = teacher_probs(v16, i, stat, z.shape[-1], kind)
    kl_tr = float(dense_kl(z.numpy(), v16.numpy(), i.numpy(), stat.numpy(), kind).mean())
    kl_rt = float(_kl(*log_probs(q, kind), *teacher_log_probs(z, kind)).mean())
    out = [err.bias_mse(), kl_tr, kl_rt]
    if kind == "multiclass":  # a naive cache: softmax over the k stored values, nothing else
        w = torch.zeros_like(z).scatter_(-1, i, F.softmax(v16, -1))
        gn = grad_of(lambda x: -(w * F.log_softmax(x, -1)).sum(-1).mean(), s)
        naive = Errors(len(z), z.shape[-1])
        naive.add(gn - g_full)
        out.append(naive.bias_mse())
    return out


def measure_sampled(z, s, g_full, n, kind, head, draws):
    err = Errors(len(z), z.shape[-1])
    kl_rt, enc_cpu = 0.0, 0.0
    base = np.arange(len(z), dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    for d in range(draws):
        t0 = time.process_time()
        arrays = sc.encode(z, n, kind, head=head, seeds=base ^ np.uint64(d * 7919 + 1))
        enc_cpu += time.process_time() - t0
        decoded = sc.decode(arrays)
        g = grad_of(lambda x: sc.loss(x, decoded, kind), s)
        err.add(g - g_full)
        if d < 4:  # the empirical rows' KL hardly varies between draws
            q = sc.dense(decoded, z.shape[-1], kind).double()
            lq = log_probs(q, kind)
            lp = teacher_log_probs(z, kind)
            kl_rt += float(_kl(lq[0], lq[1], lp[0], lp[1]).mean()) / min(draws, 4)
    return err.bias_mse(), math.inf, kl_rt, len(z) * draws / max(enc_cpu, 1e-9)


def run(C, kind, rows, draws, seed):
    z = torch.from_numpy(teacher_rows(rows, C, 1, kind, seed=seed)[0])
    g = torch.Generator().manual_seed(seed + 17)
    noise = torch.randn(z.shape, generator=g)
    students = {"": 0.8 * z + noise, ", early student": 0.1 * z + 0.5 * noise}
    table, ratios = [], {}
    for budget in BUDGETS:
        k = largest(lambda x: topk_bytes(x, C) <= budget, 200)
        n = largest(lambda x: sc.row_bytes(x, C, 0, kind) <= budget, 400)
        h = max(1, k // 3)
        nh = largest(lambda x: sc.row_bytes(x, C, h, kind) <= budget, 400)
        for name, s in students.items():
            g_full = full_gradient(z, s, kind)
            scale = f"{float(g_full.pow(2).sum(-1).mean().sqrt()):.3g}"
            res = measure_topk(z, s, g_full, k, kind)
            (tb2, _, tm), kl_tr, kl_rt = res[:3]
            table.append([C, kind, budget, f"topk k={k}{name}", topk_bytes(k, C), f"{math.sqrt(tb2):.3g}",
                          f"{tm:.3g}", scale, f"{kl_tr:.4g}", f"{kl_rt:.4g}", "-"])
            if kind == "multiclass":
                (nb2, _, nm) = res[3]
                table.append([C, kind, budget, f"naive renormalised k={k}{name}", topk_bytes(k, C),
                              f"{math.sqrt(nb2):.3g}", f"{nm:.3g}", scale, "-", "-", "-"])
            if not name:
                naive = math.sqrt(res[3][0]) if kind == "multiclass" else math.nan
                ref = (math.sqrt(tb2), tm, s, g_full, scale)
        tb, tm, s, g_full, scale = ref
        # sampled's gradient error p - w does not depend on the student: one student measures it
        for label, hh, nn in ((f"sampled n={n}", 0, n), (f"sampled+h h={h} n={nh}", h, nh)):
            if nn == 0:
                continue
            (b2, se, sm), kl_tr_s, kl_rt_s, rate = measure_sampled(z, s, g_full, nn, kind, hh, draws)
            bound = math.sqrt(max(b2, 0.0) + 2 * se)  # bias^2 + 2 standard errors
            bias = f"{math.sqrt(b2):.3g}" if b2 > 2 * se else f"~0 (<{bound:.2g})"
            table.append([C, kind, budget, label, sc.row_bytes(nn, C, hh, kind), bias, f"{sm:.3g}",
                          scale, "inf", f"{kl_rt_s:.4g}", f"{rate / 1e3:.1f}k"])
            ratios[(budget, hh > 0)] = (bound / tb, bound / naive, sm / tm)
        print(f"#   C={C} {kind} {budget} B done", flush=True)
    return table, ratios


def main() -> None:
    p = Cm.parser(__doc__)
    p.add_argument("--rows", type=int, default=None, help="rows at C = 527 (default 1,024; --quick 256)")
    p.add_argument("--large-rows", type=int, default=None,
                   help="rows at C = 151,936 (default 32; --quick 8)")
    p.add_argument("--draws", type=int, default=None,
                   help="independent draws per row for sampled at C = 527 (default 64; --quick 32)")
    p.add_argument("--large-draws", type=int, default=None,
                   help="draws per row at C = 151,936 (default 128; --quick 32)")
    args = p.parse_args()
    torch.set_num_threads(args.threads or 1)
    rows = args.rows or (256 if args.quick else 1024)
    large = args.large_rows or (8 if args.quick else 32)
    draws = args.draws or (32 if args.quick else 64)
    large_draws = args.large_draws or (32 if args.quick else 128)
    print(f"# bench_sampled: sampled (RS-KD) vs float16 top-k at equal bytes; {rows:,} rows at C = 527, "
          f"{large:,} at C = 151,936; {draws} and {large_draws} draws per row")
    print(f"# machine: {Cm.machine()}")
    table, ratios = [], {}
    for C, R, D in ((527, rows, draws), (151_936, large, large_draws)):
        for kind in KINDS:
            t, r = run(C, kind, R, D, seed=1 if C > 1000 else 0)
            table += t
            ratios.update({(C, kind) + key: v for key, v in r.items()})
    print()
    print(Cm.table(["C", "kind", "budget B", "codec", "B/row", "gradient bias (RMS)", "gradient MSE",
                    "|g_full| (RMS)", "KL(teacher||row)", "KL(row||teacher)", "encode rows/s"], table))
    parts = []
    for (C, kind, budget, head), (b, bn, m) in sorted(ratios.items()):
        if not head:
            mh = ratios.get((C, kind, budget, True), (0, 0, math.nan))[2]
            vs_naive = f", /naive {bn:.2g}" if kind == "multiclass" else ""
            parts.append(f"C={C} {kind} {budget} B: bias/topk <= {b:.2g}{vs_naive}, MSE/topk {m:.3g} "
                         f"(+head {mh:.3g})")
    print()
    print("ratios: sampled vs topk float16 at equal bytes (bias: upper bound, 2 s.e.): " + "; ".join(parts))


if __name__ == "__main__":
    main()
