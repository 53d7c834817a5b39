"""How dump-side and read-side cache costs grow with N, k, members, frames T and epochs.

Caches are written through the real CacheWriter from synthetic rows (running teachers over 1M
clips would take hours here, and the teachers' own cost is linear in N by construction; see
_common.SyntheticRows). Each sweep varies one factor from the base (N = 100k clip-level rows,
k = 20 of 527, 1 epoch, ensemble only, zarr + blosc-lz4, default chunking):

  write       CacheWriter: layout + every chunk through the background writer + finish
  dump host   the dump's own per-batch work after the teachers (ensemble aggregation, top-k,
              tail statistic, dtype casts, host copies: pipeline.TeacherPass) on batches of 32,
              with teachers that return fixed logits
  seq read    every array of an epoch, whole chunks in stored order (Cache.read_block)
  random      cache.targets(epoch, ids) for batches of 256 random ids, chunk cache warm
  open        open_cache (must not grow with anything)

The last line gives, per sweep and cost, the growth exponent between the sweep's ends:
log(cost ratio) / log(size ratio), where size is rows x epochs for the N and epochs sweeps and
the target elements per row, (1 + members) x T x k, for the k, members and T sweeps. 1.0 =
linear; below 1 = fixed costs (per chunk, per row, per batch, per class) being amortised;
above 1 would be super-linear. Open time should stay flat
(exponent ~0). Each point is the median of --repeats runs; the main process uses 1 intra-op
thread unless --threads says otherwise (tiny tensor ops on a shared 2-core box).

    python benchmarks/bench_scaling.py            # ~1-2 min on 2 cores
    python benchmarks/bench_scaling.py --quick    # ~30 s (N up to 300k, T up to 100)
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


class FixedLogits(torch.nn.Module):
    def __init__(self, z: torch.Tensor):
        super().__init__()
        self.z = z

    def forward(self, x):
        return self.z[: x.shape[0]]


def dump_host_us_per_row(k: int, members: int, frames: int | None, classes: int = 527, batch: int = 32,
                         repeats: int = 6) -> float:
    from logitcache.codecs import get_codec
    from logitcache.pipeline import TeacherPass
    from logitcache.teachers import Teacher

    g = torch.Generator().manual_seed(0)
    shape = (batch, frames, classes) if frames else (batch, classes)
    teachers = [Teacher(f"t{i}", "fixed", FixedLogits(torch.randn(*shape, generator=g) * 3 - 4), "")
                for i in range(members)]
    wave = torch.zeros(batch, 1)
    codec = get_codec("topk")(k, classes, "multilabel", frames, {"value_dtype": "float16"})
    tp = TeacherPass(teachers, torch.device("cpu"), "fp32", codec, "multilabel", "mean_prob", None, True,
                     [f"v{i}" for i in range(batch)])
    index = np.arange(batch)
    tp.rows(tp.submit(wave, index))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        tp.rows(tp.submit(wave, index))
        times.append(time.perf_counter() - t0)
    return 1e6 * C.median(times) / batch


def read_costs(path: Path, random_batches: int = 40) -> dict:
    import logitcache

    t0 = time.perf_counter()
    cache = logitcache.open_cache(path)
    opened = time.perf_counter() - t0
    R, N = cache.chunk_rows, cache.num_samples
    seq = []
    for e in range(cache.epochs):
        t0 = time.perf_counter()
        for a in range(0, N, R):
            cache.read_block(e, a, min(a + R, N))
        seq.append(time.perf_counter() - t0)
    rng = np.random.default_rng(0)
    ids = cache.ids
    batches = [[ids[i] for i in rng.choice(N, min(256, N), replace=False)] for _ in range(random_batches)]
    cache.targets(0, batches[0])
    for b in batches:  # warm-up pass fills the chunk cache
        cache.targets(0, b)
    t0 = time.perf_counter()
    for b in batches:
        cache.targets(0, b)
    rand = (time.perf_counter() - t0) / sum(map(len, batches))
    cache.close()
    return {"open_ms": 1e3 * opened, "seq_us": 1e6 * sum(seq) / (N * cache.epochs), "rand_us": 1e6 * rand}


def one(wd: Path, n: int, k: int = 20, members: int = 0, frames: int | None = None, epochs: int = 1,
        repeats: int = 1, pools: dict = {}) -> dict:
    runs = [one_run(wd, n, k, members, frames, epochs, pools) for _ in range(repeats)]
    return {key: C.median([r[key] for r in runs]) for key in runs[0]}


def one_run(wd: Path, n: int, k: int, members: int, frames: int | None, epochs: int, pools: dict) -> dict:
    key = (k, frames)
    if key not in pools:
        pools[key] = C.SyntheticRows(k, frames=frames, pool=1 << 16 if not frames else max(1 << 16, 64 * frames))
    rows = pools[key]
    path = wd / "scale.zarr"
    shutil.rmtree(path, ignore_errors=True)
    write = C.write_synthetic(path, rows, n, epochs=epochs, members=members)
    res = read_costs(path)
    res.update(write_us=1e6 * write / (n * epochs), bytes=C.disk_bytes(path) / (n * epochs))
    shutil.rmtree(path, ignore_errors=True)
    return res


def main() -> None:
    p = C.parser(__doc__)
    p.add_argument("--repeats", type=int, default=None, help="runs per point (default 3; --quick 1)")
    args = p.parse_args()
    torch.set_num_threads(args.threads or 1)
    repeats = args.repeats or (1 if args.quick else 3)
    wd = C.workdir(args.workdir)
    q = args.quick
    base_n = 30_000 if q else 100_000
    sweeps = {
        "N": [("N", n, dict(n=n)) for n in ([10_000, 100_000, 300_000] if q else [10_000, 100_000, 1_000_000])],
        "k": [("k", k, dict(n=base_n, k=k)) for k in (5, 20, 50, 100)],
        "members": [("members", m, dict(n=base_n, members=m)) for m in (1, 3, 5)],
        "T": [("T", t, dict(n=4_000 if q else 10_000, frames=t if t > 1 else None))
              for t in ((1, 10, 100) if q else (1, 10, 50, 250))],
        "epochs": [("epochs", e, dict(n=base_n // 2, epochs=e)) for e in (1, 2, 4, 8)],
    }
    print(f"# bench_scaling: synthetic rows through CacheWriter (no teachers run), zarr + blosc-lz4, C=527; "
          f"base N={base_n:,}, k=20, 1 epoch, ensemble only")
    print(f"# machine: {C.machine()}")
    table, summary = [], []
    for sweep, points in sweeps.items():
        results = []
        for label, value, kw in points:
            r = one(wd, repeats=repeats, **kw)
            k, m, T = kw.get("k", 20), kw.get("members", 0), kw.get("frames") or 1
            host = dump_host_us_per_row(k, max(m, 1), kw.get("frames"))
            # the sweep's size: samples x epochs (N, epochs) or target elements per row,
            # (ensemble + members) x T x k (k, members, T)
            size = kw["n"] * kw.get("epochs", 1) if sweep in ("N", "epochs") else (1 + m) * T * k
            r.update(host_us=host, size=size, total_write=r["write_us"] * kw["n"] * kw.get("epochs", 1),
                     total_seq=r["seq_us"] * kw["n"] * kw.get("epochs", 1))
            results.append(r)
            table.append([sweep, f"{value:,}", f"{kw['n']:,} x {kw.get('epochs', 1)}", round(r["bytes"], 1),
                          round(r["write_us"], 3), round(r["host_us"], 2), round(r["seq_us"], 3),
                          round(r["rand_us"], 3), round(r["open_ms"], 1)])
            print(f"#   {sweep}={value} done; load average {os.getloadavg()[0]:.1f}", flush=True)
        a, b = results[0], results[-1]

        def exponent(field, per_row=True):
            # per-row costs times rows for the N/epochs sweeps; per-row costs against bytes/row otherwise
            scale = (b["size"] / a["size"]) if (per_row and sweep in ("N", "epochs")) else 1.0
            return np.log(b[field] * scale / a[field]) / np.log(b["size"] / a["size"])

        summary.append(f"{sweep} {points[0][1]:,}->{points[-1][1]:,}: write {exponent('write_us'):.2f}, "
                       f"seq read {exponent('seq_us'):.2f}, random {exponent('rand_us', False):.2f}, "
                       f"open {exponent('open_ms', False):.2f}" +
                       (f", dump host {exponent('host_us'):.2f}" if sweep not in ("N", "epochs") else ""))
    print()
    print(C.table(["sweep", "value", "samples x epochs", "B/row on disk", "write us/row", "dump host us/row",
                   "seq read us/row", "random us/row", "open ms"], table))
    print()
    print("ratios: growth exponents of cost vs size between each sweep's ends (1 = linear, < 1 = fixed costs "
          "amortised, > 1 = super-linear; random and open are per call/row, ~0 = flat): " + "; ".join(summary))


if __name__ == "__main__":
    main()
