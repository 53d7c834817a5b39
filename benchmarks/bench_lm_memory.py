"""Peak memory of one LM dump batch: streamed (logitcache.lm) against full materialisation.

Three tiny GPT teachers (logitcache.models.gpt_tiny) of vocabulary V map one window of L token
ids to logits [1, L, V]; their targets (the ensemble and each member, top-k with the exact
log-normaliser) are encoded two ways, each in a fresh process:

* ``naive``: what a dump does for audio and images: every member's logits held, the ensemble
  aggregated over the stacked members, ensemble and members stacked [G, B, L, V] and encoded.
* ``stream``: what a dump does for tokens (:func:`logitcache.lm.stream_encode`): one teacher at a
  time, each member encoded and folded into a running ensemble block of positions by block of
  positions.

Reported: the process's peak resident memory above its resident memory just before the batch
(teachers built, one short warm-up window run), in MB, and the ratio; and whether the two modes
store the same member rows (they must) and the largest ensemble stat difference (float32
rounding of the running log-sum-exp).

    python benchmarks/bench_lm_memory.py                 # V = 151,936, L = 1,024, 3 teachers
    python benchmarks/bench_lm_memory.py --length 256    # smaller
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def child(mode: str, vocab: int, length: int, teachers: int, topk: int) -> dict:
    from logitcache.codecs import get_codec
    from logitcache.hetero import ensemble_logits
    from logitcache.lm import stream_encode
    from logitcache.models import gpt_tiny
    from logitcache.teachers import Teacher, run_teachers

    torch.set_num_threads(1)
    loaded = [Teacher(f"t{i}", f"gpt_tiny seed {i}", gpt_tiny(vocab, length, dim=16, depth=1, heads=1, seed=i), "")
              for i in range(teachers)]
    codec = get_codec("topk")(topk, vocab, "multiclass", length, {"value_dtype": "float16"})
    x = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(0))
    dev = torch.device("cpu")
    with torch.inference_mode():
        for t in loaded:  # warm-up on a short window: kernels and allocator caches in place, little memory
            t.module(x[:, :2])
        before = _rss_mb()
        started = time.perf_counter()
        if mode == "stream":
            _, encoded, _ = stream_encode(loaded, x, lambda: ["w0"], dev, "fp32", codec, "mean_prob", None, True)
        else:
            logits = run_teachers(loaded, x, lambda: ["w0"])
            z = torch.stack([ensemble_logits(logits, "multiclass", "mean_prob")] + logits)
            encoded = codec.encode(z)
        seconds = time.perf_counter() - started
    rows = {k: v.numpy().tolist() for k, v in encoded.items() if k in ("indices", "stat")}
    return {"mode": mode, "peak_mb": _peak_mb() - before, "seconds": seconds, "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--teachers", type=int, default=3)
    p.add_argument("--topk", type=int, default=32)
    p.add_argument("--child", choices=("naive", "stream"), default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.vocab, a.length, a.teachers, a.topk)))
        return
    runs = {}
    for mode in ("stream", "naive"):
        cmd = [sys.executable, __file__, "--child", mode, "--vocab", str(a.vocab), "--length", str(a.length),
               "--teachers", str(a.teachers), "--topk", str(a.topk)]
        runs[mode] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    s, n = runs["stream"], runs["naive"]
    one = a.length * a.vocab * 4 / 2**20
    print(f"V = {a.vocab:,}, L = {a.length:,}, {a.teachers} teachers, one window (B = 1), top-{a.topk}; "
          f"one teacher's logits = {one:,.0f} MB")
    print(f"{'mode':8} {'peak MB':>10} {'x logits':>9} {'seconds':>8}")
    for r in (n, s):
        print(f"{r['mode']:8} {r['peak_mb']:>10,.0f} {r['peak_mb'] / one:>9.2f} {r['seconds']:>8.2f}")
    print(f"naive / stream peak: {n['peak_mb'] / s['peak_mb']:.2f}x")
    same = np.array_equal(np.array(n["rows"]["indices"])[1:], np.array(s["rows"]["indices"])[1:])
    stat = np.abs(np.array(n["rows"]["stat"]) - np.array(s["rows"]["stat"]))
    ids_n, ids_s = np.sort(np.array(n["rows"]["indices"])[0], -1), np.sort(np.array(s["rows"]["indices"])[0], -1)
    differ = int((ids_n != ids_s).any(-1).sum())
    print(f"member rows identical: {same}; ensemble top-k id sets differ at {differ} of {ids_n.shape[-2]} positions "
          f"(near-ties of a random teacher: float32 rounding of the running log-sum-exp); "
          f"max |ensemble stat difference|: {stat.max():.2e}")


if __name__ == "__main__":
    main()
