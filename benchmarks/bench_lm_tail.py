"""The tail of token targets spread by a prior instead of evenly, on a small trained LM's rows.

bench_lm_bytes.py measures the reconstructions of codecs.evaluate.prior_tail_probs on synthetic
rows that share one Zipf prior by construction, which favours them. Here the rows are real: the
two gpt_tiny teachers of ``logitcache demo --lm`` (same corpus: 18 standard-library modules of
this Python, the same byte-level BPE of 512, the same sizes 2x48 and 4x64), trained for --steps
steps each, their mean-softmax ensemble over every 64-token window of the training tokens (the
rows a dump of one epoch at offset 0 would hold, 225k tokens). The prior is the mean ensemble
probability per id over all of those rows (codecs.evaluate.mean_probs, what a dump would
accumulate); figures are over --rows of them drawn at random. Values are the exact float32 top-k
(no value quantisation), so the columns differ by the tail alone:

  even          the exact tail mass spread evenly (what the caches store and kd_loss trains on:
                one bucket; its gradient is the even-spread one)
  prior         spread over the ids outside the top-k in proportion to the prior (0 B per row)
  prior^beta    in proportion to prior ** beta, beta the row's maximum-likelihood exponent
                rounded to 1/64 (evaluate.fit_tail_beta; one more byte per row)
  KL            mean KL(teacher || reconstruction) per token, float64
  bias          |E[g] - g_full| / |g_full| of the KD gradient w.r.t. the student's logits
                (bench_lm_bytes.py's students: trained 0.8 x teacher + N(0, 1), random N(0, 1))
  ids saved     the even tail needs k' ids for the prior column's KL at k (interpolated in log k
                between measured k): 1 - k / k'

    python benchmarks/bench_lm_tail.py            # ~4 min on 2 quiet cores (13 at load 8; training dominates)
    python benchmarks/bench_lm_tail.py --quick    # ~40 s (1.5 min at load 9): one teacher, 40 steps, near-unigram
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as Cm  # noqa: E402
from bench_lm_bytes import dense_target_loss, student_logits  # noqa: E402
from bench_sampled import full_gradient, grad_of  # noqa: E402

from logitcache import models  # noqa: E402
from logitcache.codecs.evaluate import fit_tail_beta, mean_probs, prior_tail_probs  # noqa: E402
from logitcache.demo_lm import HELD_OUT, MODULES, TEACHERS, fit_lm, stdlib_texts, train_tokenizer  # noqa: E402
from logitcache.targets import aggregate, kd_loss, teacher_probs, topk_targets  # noqa: E402

KS = (1, 2, 4, 8, 16, 32, 64)
CONTEXT, VOCAB = 64, 512


def teacher_rows(steps: int, names, seed: int = 0) -> np.ndarray:
    """float32 ``[tokens, V]``: the ensemble's log-probs at every position of the training tokens."""
    texts = stdlib_texts(MODULES)[:-HELD_OUT]
    with tempfile.TemporaryDirectory() as d:
        tok = train_tokenizer(texts, VOCAB, Path(d) / "tokenizer.json")
    ids = np.array([i for t in texts for i in tok.encode(t).ids], np.int64)
    V = tok.get_vocab_size()
    windows = torch.from_numpy(ids[:len(ids) // CONTEXT * CONTEXT]).view(-1, CONTEXT)
    outs = []
    for n, name in enumerate(names):
        m = models.gpt_tiny(V, CONTEXT, seed=10 * seed + n, **TEACHERS[name])
        fit_lm(m, ids, CONTEXT, steps, 32, 3e-3, seed, False, name)
        with torch.no_grad():
            outs.append(torch.cat([m(windows[a:a + 256]) for a in range(0, len(windows), 256)]))
        print(f"#   teacher {name} trained ({steps} steps)", flush=True)
    return aggregate(outs, "multiclass", "mean_prob").reshape(-1, V).numpy()


def kl(logp: torch.Tensor, q: torch.Tensor) -> float:
    return float((logp.exp() * (logp - torch.log(q.clamp_min(1e-300)))).sum(-1).mean())


def bias(loss, z: torch.Tensor, students: dict, g_full: dict) -> list[str]:
    out = []
    for s, x in students.items():
        g = grad_of(loss, x).double()
        out.append(f"{float((g - g_full[s]).norm() / g_full[s].norm()):.3g}")
    return out


def row(k: int, z: torch.Tensor, log_prior: np.ndarray, students: dict, g_full: dict) -> dict:
    V = z.shape[-1]
    logp = F.log_softmax(z.double(), -1)
    v, i, s = topk_targets(z, k, "multiclass")
    even = teacher_probs(v, i, s, V, "multiclass").double()
    beta = fit_tail_beta(z.numpy(), i.numpy(), log_prior)
    prior = prior_tail_probs(v.numpy(), i.numpy(), s.numpy(), log_prior)
    powered = prior_tail_probs(v.numpy(), i.numpy(), s.numpy(), log_prior, beta)
    return {"k": k, "kl": [kl(logp, q) for q in (even, prior, powered)],
            "bias": [bias(lambda x: kd_loss(x, v, i, s, "multiclass"), z, students, g_full)]
            + [bias(dense_target_loss(q), z, students, g_full) for q in (prior, powered)],
            "beta": float(np.median(beta))}


def ids_saved(k: int, target: float, rows: list[dict]) -> str:
    """1 - k / k', k' the (log-interpolated) number of ids at which the even tail reaches ``target``."""
    ks = np.log([r["k"] for r in rows])
    even = np.array([r["kl"][0] for r in rows])  # decreasing in k
    if target < even[-1] or target > even[0]:
        return "-"
    k2 = float(np.exp(np.interp(target, even[::-1], ks[::-1])))
    return f"{1 - k / k2:.0%}"


def main() -> None:
    p = Cm.parser(__doc__)
    p.add_argument("--steps", type=int, default=None, help="training steps per teacher (default 400; --quick 40)")
    p.add_argument("--rows", type=int, default=2048, help="tokens the figures are measured on (default 2048)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    steps = a.steps or (40 if a.quick else 400)
    names = list(TEACHERS)[:1] if a.quick else list(TEACHERS)
    print(f"# {Cm.machine()}")
    t0 = time.time()
    Z = teacher_rows(steps, names)
    log_prior = np.log(mean_probs(Z[b:b + 8192] for b in range(0, len(Z), 8192)))
    pick = np.random.default_rng(0).choice(len(Z), min(a.rows, len(Z)), replace=False)
    z = torch.from_numpy(Z[np.sort(pick)])
    ent = float(-(F.softmax(z.double(), -1) * F.log_softmax(z.double(), -1)).sum(-1).mean())
    print(f"# teachers {' + '.join(names)}, V = {Z.shape[1]}, {len(Z):,} rows (the prior's), "
          f"{len(z)} measured; ensemble entropy {ent:.2f} nats")
    students = student_logits(z, 0)
    g_full = {s: full_gradient(z.double(), x.double(), "multiclass") for s, x in students.items()}
    rows = [row(k, z, log_prior, students, g_full) for k in KS]
    table = [[r["k"], *(f"{x:.4g}" for x in r["kl"]), f"{r['beta']:.2f}", ids_saved(r["k"], r["kl"][1], rows),
              ids_saved(r["k"], r["kl"][2], rows), *(b for bs in r["bias"] for b in bs)] for r in rows]
    print()
    print(Cm.table(["k", "KL even", "KL prior", "KL prior^beta", "median beta", "ids saved (prior)",
                    "ids saved (prior^beta)", "bias even (trained)", "(random)", "bias prior (trained)", "(random)",
                    "bias prior^beta (trained)", "(random)"], table))
    print(f"# wall time {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
