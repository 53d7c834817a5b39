"""Cache storage: read throughput, bytes on disk and open time, against a raw numpy.memmap.

One clip-level epoch of N samples (default 1M; --quick 200k), top-20 of 527 classes, 'ced'
augmentation parameters, written through the real CacheWriter from synthetic rows (teachers
are not run: rows come from a pool of realistic top-k rows, see _common.SyntheticRows). For
each backend and codec:

  write        rows/s through CacheWriter (background thread, whole chunks)
  seq          rows/s reading every array a training batch needs (order, seeds, params,
               values, indices, stat), whole chunks in stored order (Cache.read_block);
               warm = page cache holds the files, cold = this cache's files evicted first
  memmap       the same bytes as raw .npy files, read with numpy.memmap the same way (the
               physical limit on this disk)
  random       rows/s of cache.targets(epoch, ids) for batches of 256 random ids:
               "no LRU" decodes the chunks each batch needs; "LRU" keeps decoded chunks
               (the default, 256 MiB), measured after one warm-up pass
  B/row        bytes on disk per sample-epoch (all files: ids, manifest, every array), against
               the raw payload k x (value + index bytes) + seed + params of the issue (and the
               full raw row, which adds the tail statistic and the stored order)
  open ms      open_cache(path) (after imports)

Goals: seq >= 0.5 x memmap and >= 1M rows/s; B/row <= raw payload; open < 50 ms at 1M.

    python benchmarks/bench_store.py            # ~3-5 min on 2 cores
    python benchmarks/bench_store.py --quick    # ~1 min
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def training_arrays(cache) -> list[str]:
    return ["order", "seeds"] + [f"params/{n}" for n in cache.param_names()] + \
        ["ensemble/values", "ensemble/indices", "ensemble/stat"]


def seq_read(cache, epoch: int = 0) -> float:
    R, N = cache.chunk_rows, cache.num_samples
    t0 = time.perf_counter()
    for a in range(0, N, R):
        cache.read_block(epoch, a, min(a + R, N))
    return N / (time.perf_counter() - t0)


def make_memmap(cache, folder: Path) -> dict[str, Path]:
    """The same arrays as raw .npy files (one epoch)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in training_arrays(cache):
        data = cache.store.read(name, (0,))
        path = folder / (name.replace("/", "__") + ".npy")
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=data.dtype, shape=data.shape)
        mm[:] = data
        mm.flush()
        del mm
        out[name] = path
    return out


def open_memmaps(paths: dict[str, Path]) -> dict[str, np.memmap]:
    return {name: np.load(path, mmap_mode="r") for name, path in paths.items()}


def seq_read_memmap(mms: dict[str, np.memmap], R: int) -> float:
    N = len(next(iter(mms.values())))
    t0 = time.perf_counter()
    for a in range(0, N, R):
        {k: np.array(v[a:a + R]) for k, v in mms.items()}
    return N / (time.perf_counter() - t0)


def random_read(cache, batches: list[list[str]]) -> float:
    t0 = time.perf_counter()
    for ids in batches:
        cache.targets(0, ids)
    return sum(map(len, batches)) / (time.perf_counter() - t0)


def random_read_memmap(mms, positions: list[np.ndarray]) -> float:
    names = ["ensemble/values", "ensemble/indices", "ensemble/stat"]
    t0 = time.perf_counter()
    for pos in positions:
        [mms[n][pos] for n in names]
    return sum(map(len, positions)) / (time.perf_counter() - t0)


def open_ms(path: Path, repeats: int = 15) -> float:
    import logitcache

    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        c = logitcache.open_cache(path)
        times.append(time.perf_counter() - t0)
        c.close()
    return 1e3 * C.median(times)


def measure(path: Path, rows, n: int, backend: str, codec: str, chunk_rows: int | None, wd: Path,
            random_batches: int, memmap_ref: bool) -> dict:
    import logitcache

    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    res = {"write": n / C.write_synthetic(path, rows, n, backend=backend, codec=codec, chunk_rows=chunk_rows)}
    res["bytes"] = C.disk_bytes(path) / n
    res["open_ms"] = open_ms(path)
    cache = logitcache.open_cache(path)
    res["chunk_rows"] = cache.chunk_rows
    seq_read(cache)  # warm the page cache and zarr's metadata
    res["seq_warm"] = C.median([seq_read(cache) for _ in range(3)])
    cache.close()
    C.evict(path)
    cache = logitcache.open_cache(path)
    res["seq_cold"] = seq_read(cache)
    cache.close()
    rng = np.random.default_rng(1)
    ids = logitcache.open_cache(path).ids
    pos = [np.sort(rng.choice(n, 256, replace=False)) for _ in range(random_batches)]
    batches = [[ids[i] for i in p] for p in pos]
    cold = logitcache.open_cache(path, chunk_cache_bytes=0)
    cold.targets(0, batches[0])  # id index and positions built once, outside the timing
    res["rand_nolru"] = random_read(cold, batches[: max(3, random_batches // 10)])
    lru = logitcache.open_cache(path)
    random_read(lru, batches)  # warm-up pass fills the chunk LRU
    res["rand_lru"] = random_read(lru, batches)
    if memmap_ref:
        files = make_memmap(lru, wd / "memmap")
        mms = open_memmaps(files)
        seq_read_memmap(mms, res["chunk_rows"])
        res["mm_seq_warm"] = C.median([seq_read_memmap(mms, res["chunk_rows"]) for _ in range(3)])
        res["mm_rand"] = random_read_memmap(mms, pos)
        del mms  # unmapped, so that the eviction below takes
        C.evict(wd / "memmap")
        res["mm_seq_cold"] = seq_read_memmap(open_memmaps(files), res["chunk_rows"])
        shutil.rmtree(wd / "memmap")
    lru.close()
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return res


def zarr_settings(rows, n: int, wd: Path, random_batches: int, rounds: int = 2) -> dict[str, list]:
    """zarr-python settings, interleaved rounds: async concurrency, and the zarrs (Rust) codec
    pipeline when it is installed (it is not a dependency: pip install zarrs to include it)."""
    import zarr

    settings = [("async.concurrency=1", {"async.concurrency": 1}),
                ("async.concurrency=10 (default)", {"async.concurrency": 10}),
                ("async.concurrency=64", {"async.concurrency": 64}),
                ("zarrs codec pipeline", {"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})]
    try:
        import zarrs  # noqa: F401
    except ImportError:
        settings = settings[:-1]
    runs = {label: [] for label, _ in settings}
    for _ in range(rounds):
        for label, cfg in settings:
            with zarr.config.set(cfg):
                runs[label].append(measure(wd / "bench.zarr", rows, n, "zarr", "blosc-lz4", None, wd,
                                           random_batches // 4, memmap_ref=False))
            print(f"#   zarr {label} done", flush=True)
    zv = [[label] + [C.median([r[k] for r in rs]) for k in ("write", "seq_warm", "seq_cold", "rand_nolru")]
          for label, rs in runs.items()]
    if len(settings) < 4:
        zv.append(["zarrs codec pipeline", "not installed (pip install zarrs)", "", "", ""])
    print()
    print(C.table(["zarr setting (blosc-lz4)", "write rows/s", "seq rows/s warm", "seq rows/s cold",
                   "random no LRU"], zv))
    return {row[0]: row[1:] for row in zv if not isinstance(row[1], str)}


def main() -> None:
    p = C.parser(__doc__)
    p.add_argument("--samples", type=int, default=None, help="rows (default 1,000,000; --quick 200,000)")
    p.add_argument("--topk", type=int, default=20)
    p.add_argument("--classes", type=int, default=527)
    p.add_argument("--random-batches", type=int, default=200)
    p.add_argument("--no-variants", action="store_true",
                   help="skip the chunk-size, value-dtype and zarr-settings tables")
    p.add_argument("--only-zarr-settings", action="store_true",
                   help="only the zarr-settings table (async concurrency, zarrs codec pipeline)")
    args = p.parse_args()
    n = args.samples or (200_000 if args.quick else 1_000_000)
    wd = C.workdir(args.workdir)
    import zarr

    rows = C.SyntheticRows(args.topk, args.classes)
    raw = rows.raw_bytes_per_row()
    print(f"# bench_store: {n:,} samples x 1 epoch, top-{args.topk} of {args.classes} (float16 values, "
          f"{rows.index_dtype} indices), 'ced' params; synthetic rows written with CacheWriter (no teachers run)")
    print(f"# raw payload {raw['payload']} B/sample-epoch (k x (value + index) + seed + params); full raw row "
          f"{sum(raw.values())} B (+ tail statistic + stored order)")
    print(f"# machine: {C.machine()}; zarr {zarr.__version__}")

    configs = [("zarr", "none"), ("zarr", "blosc-lz4"), ("zarr", "zstd"), ("hdf5", "none"), ("hdf5", "lzf"),
               ("hdf5", "gzip")]
    if args.only_zarr_settings:
        z = zarr_settings(rows, n, wd, args.random_batches)
        base = z["async.concurrency=10 (default)"]
        names = ("write", "seq warm", "seq cold", "random no LRU")
        print()
        print("ratios: vs the default (async.concurrency=10): " + "; ".join(
            f"{label}: " + ", ".join(f"{k} {v / b:.2f}" for k, v, b in zip(names, vals, base))
            for label, vals in z.items() if not label.endswith("(default)")))
        return
    table, results = [], {}
    for backend, codec in configs:
        path = wd / ("bench.zarr" if backend == "zarr" else "bench.h5")
        r = measure(path, rows, n, backend, codec, None, wd, args.random_batches, memmap_ref=True)
        results[(backend, codec)] = r
        table.append([backend, codec, r["chunk_rows"], r["write"], r["seq_warm"], r["mm_seq_warm"],
                      round(r["seq_warm"] / r["mm_seq_warm"], 2), r["seq_cold"], r["mm_seq_cold"],
                      round(r["seq_cold"] / r["mm_seq_cold"], 2), r["rand_nolru"], r["rand_lru"], r["mm_rand"],
                      round(r["bytes"], 1), round(r["bytes"] / raw["payload"], 2), round(r["open_ms"], 1)])
        print(f"#   {backend}/{codec} done; load average {os.getloadavg()[0]:.1f}", flush=True)
    print()
    print(C.table(["backend", "codec", "chunk rows", "write rows/s", "seq rows/s warm", "memmap warm", "ratio",
                   "seq rows/s cold", "memmap cold", "ratio", "random no LRU", "random LRU", "memmap random",
                   "B/row", "/ payload", "open ms"], table))

    if not args.no_variants:
        # chunk size and value dtype, for the default codecs
        var = []
        for backend, R, dtype in [("zarr", 16384, "float16"), ("zarr", 131072, "float16"),
                                  ("hdf5", 16384, "float16"), ("hdf5", 131072, "float16"),
                                  ("zarr", None, "float32"), ("hdf5", None, "float32")]:
            rr = rows if dtype == "float16" else C.SyntheticRows(args.topk, args.classes, value_dtype=dtype)
            path = wd / ("bench.zarr" if backend == "zarr" else "bench.h5")
            codec = {"zarr": "blosc-lz4", "hdf5": "lzf"}[backend]
            r = measure(path, rr, n, backend, codec, R, wd, args.random_batches // 4, memmap_ref=False)
            var.append([backend, codec, r["chunk_rows"], dtype, r["write"], r["seq_warm"], r["seq_cold"],
                        r["rand_nolru"], r["rand_lru"], round(r["bytes"], 1)])
            print(f"#   {backend} R={r['chunk_rows']} {dtype} done", flush=True)
        print()
        print(C.table(["backend", "codec", "chunk rows", "values", "write rows/s", "seq rows/s warm",
                       "seq rows/s cold", "random no LRU", "random LRU", "B/row"], var))
        zarr_settings(rows, n, wd, args.random_batches)

    d = results[("zarr", "blosc-lz4")]
    h = results[("hdf5", "lzf")]
    print()
    print(f"ratios: seq/memmap warm zarr {d['seq_warm'] / d['mm_seq_warm']:.2f} hdf5 {h['seq_warm'] / h['mm_seq_warm']:.2f} "
          f"(goal >= 0.5), cold zarr {d['seq_cold'] / d['mm_seq_cold']:.2f} hdf5 {h['seq_cold'] / h['mm_seq_cold']:.2f}; "
          f"seq rows/s zarr {d['seq_warm'] / 1e6:.2f}M hdf5 {h['seq_warm'] / 1e6:.2f}M (goal >= 1M); "
          f"bytes/payload zarr {d['bytes'] / raw['payload']:.2f} hdf5 {h['bytes'] / raw['payload']:.2f} (goal <= 1); "
          f"open zarr {d['open_ms']:.1f} ms hdf5 {h['open_ms']:.1f} ms at {n:,} samples (goal < 50)")


if __name__ == "__main__":
    main()
