"""Read throughput of a cache on S3 (moto's server on 127.0.0.1) vs on local disk.

A clip-level cache (k=20 of 527, 'ced' parameters; synthetic rows through the real CacheWriter)
is written locally, copied to a bucket with ``logitcache copy``, and one epoch is read in stored
order, whole chunks, as training reads it (``views.ChunkReader``, the chunk after the current one
read ahead in a thread), at the default chunking and at 8192-row chunks. Local reads are cold
(page cache evicted where possible). moto (a separate process) keeps objects in memory and answers over HTTP on the
loopback, so this measures the request path (HTTP, s3fs, zarr's fsspec store), not a real
network's latency or bandwidth.

    python benchmarks/bench_s3.py            # ~1 min on 2 cores
    python benchmarks/bench_s3.py --quick
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

from _common import SyntheticRows, evict, machine, parser, table, workdir, write_synthetic


def read_epoch(path, ahead: int = 1) -> float:
    """Rows per second reading every array of epoch 0 in stored order."""
    from logitcache.cache import open_cache
    from logitcache.views import ChunkReader

    t0 = time.perf_counter()
    with open_cache(path) as c:
        R, N = c.chunk_rows, c.num_samples
        chunks = list(range(-(-N // R)))
        reader = ChunkReader(c, 0, chunks, ahead=ahead)
        rows = sum(len(reader.rows(a * R, min((a + 1) * R, N))["order"]) for a in chunks)
        reader.close()
    return rows / (time.perf_counter() - t0)


def main() -> None:
    args = parser(__doc__).parse_args()
    root = workdir(args.workdir)
    n = 100_000 if args.quick else 400_000
    repeats = 2 if args.quick else 3
    # The server in its own process: in this one it would compete with the reader for the GIL.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    import s3fs

    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)

    from logitcache.copy import copy_cache

    s3fs.S3FileSystem().mkdir("bench-caches")
    print(f"# S3 (moto, 127.0.0.1) vs local read throughput: {n:,} clip-level rows, k=20; {machine()}")
    rows, out = [], {}
    for chunk_rows in (None, 8192):
        local = root / f"s3bench_{chunk_rows or 'default'}.zarr"
        if not local.exists():
            write_synthetic(local, SyntheticRows(20), n, chunk_rows=chunk_rows)
        url = f"s3://bench-caches/{local.name}"
        copy_cache(local, url, verify=False)
        loc, rem = [], []
        for _ in range(repeats):
            evict(local)
            loc.append(read_epoch(local))
            rem.append(read_epoch(url))
        from logitcache.cache import open_cache

        with open_cache(local) as c:
            R = c.chunk_rows
        a, b = max(loc), max(rem)
        rows.append([R, round(a), round(b), round(b / a, 3)])
        out[str(R)] = {"local_rows_per_s": a, "s3_rows_per_s": b, "ratio_s3_vs_local": b / a}
    print(table(["chunk rows", "local rows/s", "S3 rows/s", "S3 / local"], rows))
    print(json.dumps(out))
    server.terminate()
    server.wait()


if __name__ == "__main__":
    main()
