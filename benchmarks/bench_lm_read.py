"""Read rate of a token cache, per worker: training batches from the cache against plain token reads.

A nanoGPT corpus of N windows of L = 1,024 tokens (default N = 1,024, 1M tokens; --quick 256) at
V = 151,936 (uint32 ids, a document every ~5,000 tokens) and a token cache of it (one epoch,
``compact`` codec, 6-bit values, top-k, default k = 32 and 64; --quick 32), written through the
real CacheWriter from synthetic next-token teacher rows (benchmarks/_lm_cache.py: running a
teacher at this V for 1M tokens takes longer than the whole benchmark, and the rows' origin does
not change read speed). Files are in the page cache (warm reads). Each case reads the whole epoch
in batches of 16 windows, in one process:

  cache      CacheStream, read_ahead=0: one thread reads each chunk (zarr), decodes the targets,
             replays the windows from the stored offsets (ids, next tokens, mask, the content crc of
             every window checked) and hands over whole-batch tensors (what a DataLoader worker does)
  cache+1    the same with the default read_ahead=1 (chunks read and decoded in a second thread)
  bin        nanoGPT's get_batch on the same windows (same order and offsets): x, y = int64 slices of
             the .bin memmap, stacked; no targets (what a next-token-label step reads)
  memmap     the cache's stored target bytes of the epoch, as one raw file, read through numpy.memmap
             batch by batch (the same number of bytes as `cache` reads, no decoding)

tokens/s counts window positions (B x L per batch) in the steady state of a long epoch: the cache
cases are timed from the end of their first chunk (opening the cache and corpus and reading the
first chunk are reported apart, "first chunk ms"), so every later chunk's read, decode and replay
is in the rate; bin and memmap from their second batch. "per CPU s" divides by this process's CPU
time (all its threads): on a shared box it is what a worker with a core to itself would reach.
Rounds are interleaved (case order rotates every round), ratios are paired within a round,
medians reported. Goal: `cache` >= 1M tokens/s per worker (read_ahead=0: one thread).

    python benchmarks/bench_lm_read.py            # ~1.5 min of CPU, 4 min wall on a busy box (k = 32, 64)
    python benchmarks/bench_lm_read.py --quick    # < 30 s of CPU, < 1 min wall (k = 32, 256k tokens)
    python benchmarks/bench_lm_read.py --quick --topk 32,64 --baseline bdd2986
        # adds `cache@bdd2986`: `cache` with the compact decode of that commit (its compact.py loaded
        # from git), in the same rounds: "cache vs cache@REV" is the paired CPU-time ratio
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import _lm_cache  # noqa: E402

V, L, BATCH = 151_936, 1_024, 16


def read_cache(cache: Path, corpus: Path, read_ahead: int) -> tuple[int, int, float]:
    """(window positions of the second chunk on, unmasked positions in all, seconds from the stream's
    construction to the last batch of its first chunk: opening the cache and the corpus, the first
    chunk's read and decode). The clock restarts there, so the rate is the steady state of a long
    epoch: every later chunk's read, decode and replay, per token."""
    from logitcache import open_cache
    from logitcache.views import CacheStream

    with open_cache(cache) as c:
        first_chunk = -(-c.chunk_rows // BATCH)  # batches
    t0 = time.perf_counter()
    tokens = unmasked = 0
    for i, b in enumerate(CacheStream(cache, corpus, epoch=0, batch_size=BATCH, read_ahead=read_ahead)):
        if i == first_chunk - 1:  # chunk 0's last batch: the next one reads chunk 1
            start = time.perf_counter() - t0
            clock.restart()
        if i >= first_chunk:
            tokens += b["tokens"].numel()
        unmasked += int(b["mask"].sum())
    return tokens, unmasked, start


def with_decode(module, fn):
    """``fn()`` with the compact codec decoding through ``module`` (a baseline compact.py)."""
    from logitcache.codecs.compact import CompactCodec

    own = CompactCodec.decode
    CompactCodec.decode = lambda self, arrays, sort=True: module.decode(
        arrays, self.k, self.num_classes, self.kind, self.value_bits, sort=sort)
    try:
        return fn()
    finally:
        CompactCodec.decode = own


class Clock:
    """Wall and CPU seconds (this process, all its threads) since ``restart``."""

    def restart(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


clock = Clock()


def windows(cache: Path) -> list[np.ndarray]:
    """Each batch's window starts (token offsets) in stored order, from the cache's order and offsets."""
    from logitcache import open_cache

    with open_cache(cache) as c:
        order = c.order(0)
        offset = c.read_block(0, 0, c.num_samples, targets=False)["params/window.offset"]
    starts = order * L + np.rint(offset).astype(np.int64)
    return [starts[a:a + BATCH] for a in range(0, len(starts), BATCH)]


def read_bin(data: np.ndarray, batches: list[np.ndarray]) -> int:
    """nanoGPT's get_batch (x, y as int64 [B, L]), with its end-of-corpus windows padded."""
    tokens = 0
    for starts in batches[1:]:
        x = torch.stack([torch.from_numpy(np.resize(data[s:s + L].astype(np.int64), L)) for s in starts])
        y = torch.stack([torch.from_numpy(np.resize(data[s + 1:s + 1 + L].astype(np.int64), L)) for s in starts])
        tokens += x.numel() + 0 * int(y[0, 0])
    return tokens


def read_memmap(path: Path, row_bytes: int, n_rows: int) -> int:
    m = np.memmap(path, dtype=np.uint8, mode="r").reshape(n_rows, row_bytes)
    step = BATCH * L
    for a in range(step, n_rows, step):
        np.array(m[a:a + step])
    return n_rows - step


def main() -> None:
    args = C.parser(__doc__)
    args.add_argument("--windows", type=int, default=None, help="windows of 1,024 tokens (default 1,024; quick 256)")
    args.add_argument("--topk", default=None, help="comma-separated k (default 32,64; quick 32)")
    args.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5; quick 3)")
    args.add_argument("--baseline", default=None,
                      help="also a case `cache@REV`: `cache` with the compact decode of git revision REV")
    a = args.parse_args()
    torch.set_num_threads(a.threads or 1)
    n = a.windows or (256 if a.quick else 1024)
    ks = [int(k) for k in (a.topk or ("32" if a.quick else "32,64")).split(",")]
    rounds = a.rounds or (3 if a.quick else 5)
    work = C.workdir(a.workdir)
    base = None
    if a.baseline:
        from bench_compact_decode import baseline_module

        base = baseline_module(a.baseline)
    print(f"# machine: {C.machine()}")
    corpus = _lm_cache.make_corpus(work / "corpus", n * L + 1, V, L)
    data = np.memmap(work / "corpus" / "corpus.bin", dtype=np.uint32, mode="r")
    rows, summary = [], []
    for k in ks:
        t0 = time.perf_counter()
        cache = _lm_cache.make_cache(work / f"compact_k{k}.zarr", corpus, k=k, pool=512 if a.quick else 2048)
        from logitcache import open_cache

        with open_cache(cache) as c:
            row_bytes = c.codec.row_bytes() // L
        raw = work / f"raw_k{k}.bin"
        if not raw.is_file():
            np.random.default_rng(0).integers(0, 256, n * L * row_bytes, dtype=np.uint8).tofile(raw)
        print(f"# k = {k}: cache written in {time.perf_counter() - t0:.0f} s, {row_bytes} B/token stored")
        batches = windows(cache)
        cases = {
            "cache": lambda: read_cache(cache, corpus, 0),
            "cache+1": lambda: read_cache(cache, corpus, 1),
            "bin": lambda: (read_bin(data, batches), 0, 0.0),
            "memmap": lambda: (read_memmap(raw, row_bytes, n * L), 0, 0.0),
        }
        if a.baseline:
            cases[f"cache@{a.baseline}"] = lambda: with_decode(base, lambda: read_cache(cache, corpus, 0))
        unmasked = read_cache(cache, corpus, 0)[1]  # warm-up: page cache, imports
        wall: dict[str, list[float]] = {c: [] for c in cases}
        cpu: dict[str, list[float]] = {c: [] for c in cases}
        first: dict[str, list[float]] = {c: [] for c in cases}
        for r in range(rounds):
            names = list(cases)
            names = names[r % len(names):] + names[:r % len(names)]
            for name in names:
                clock.restart()
                tokens, _, start = cases[name]()
                w, c = clock.read()  # restarted by read_cache after its first chunk
                wall[name].append(w / tokens)
                cpu[name].append(c / tokens)
                first[name].append(start)
        ratio = {c: C.median([x / y for x, y in zip(wall[c], wall["bin"])]) for c in cases}
        to_mm = C.median([x / y for x, y in zip(wall["cache"], wall["memmap"])])
        rate = {c: 1 / C.median(wall[c]) for c in cases}
        cpu_rate = {c: 1 / C.median(cpu[c]) for c in cases}
        for c in cases:
            rows.append([k, c, round(rate[c] / 1e6, 3), round(cpu_rate[c] / 1e6, 3), round(ratio[c], 2),
                         round(1e3 * C.median(first[c])) if c.startswith("cache") else ""])
        if a.baseline:
            paired = C.median([x / y for x, y in zip(cpu[f"cache@{a.baseline}"], cpu["cache"])])
            summary.append(f"k={k}: cache vs cache@{a.baseline} {paired:.2f}x tokens per CPU second (paired)")
        summary.append(f"k={k}: cache {rate['cache'] / 1e6:.2f}M tokens/s ({cpu_rate['cache'] / 1e6:.2f}M per CPU "
                       f"second; goal >= 1M; with the read-ahead thread {rate['cache+1'] / 1e6:.2f}M), cache/bin time "
                       f"{ratio['cache']:.2f}, cache/memmap {to_mm:.2f}; {unmasked / (n * L):.3f} of positions unmasked")
    print(C.table(["k", "case", "M tokens/s", "M tokens per CPU s", "time / bin", "first chunk ms"], rows))
    print("ratios: " + "; ".join(summary))


if __name__ == "__main__":
    main()
