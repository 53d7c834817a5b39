"""Dump throughput vs number of torch.distributed ranks (CPU, gloo), launched as users do.

Each point is ``torchrun --nproc_per_node=W -m logitcache dump`` on the same synthetic dataset and
teacher (zoo cnn_small with random weights, exported to .pt2, C=527), one intra-op thread and no
DataLoader workers per rank, so W ranks use W cores. Throughput is views / the manifest's
``dump_seconds`` (rank 0's time from the first batch to the complete manifest, so it includes
waiting for the slowest rank); start-up (imports, process group, teacher load) is reported apart.
The caches are also checked to be bit-identical across W.

    python benchmarks/bench_distributed.py            # ~2 min on 2 cores
    python benchmarks/bench_distributed.py --quick    # ~40 s
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np

from _common import TEACHERS_1, export_teachers, machine, make_data, parser, table, workdir


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dump(world: int, data, teachers, out, epochs: int) -> tuple[float, float]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "logitcache", "dump", "--data", str(data),
           *[a for t in teachers for a in ("--teacher", t)], "--out", str(out), "--epochs", str(epochs),
           "--workers", "0", "--chunk-rows", "64", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    import logitcache

    with logitcache.open_cache(out) as c:
        return float(c.manifest["dump_seconds"]), wall


def main() -> None:
    args = parser(__doc__).parse_args()
    root = workdir(args.workdir)
    n, epochs = (128, 1) if args.quick else (256, 2)
    data = make_data(root / f"data{n}", n, clip_seconds=2.0)
    teachers = export_teachers(root / "teachers", TEACHERS_1, 527, 2.0)
    print(f"# dump throughput vs ranks: {n} clips x {epochs} epoch(s), {TEACHERS_1[0]} teacher; {machine()}")
    rows, rates, arrays = [], {}, {}
    for world in (1, 2):
        out = root / f"ranks{world}.zarr"
        if out.exists():
            import shutil

            shutil.rmtree(out)
        seconds, wall = dump(world, data, teachers, out, epochs)
        rates[world] = n * epochs / seconds
        import logitcache

        with logitcache.open_cache(out) as c:
            arrays[world] = {k: c.store.read(k) for k in c.store.arrays()}
        rows.append([world, round(seconds, 2), round(wall - seconds, 1), round(rates[world], 1),
                     round(rates[world] / rates[1], 2)])
    same = all(np.array_equal(arrays[1][k], arrays[2][k]) for k in arrays[1])
    print(table(["ranks", "dump s", "start-up s", "views/s", "vs 1 rank"], rows))
    print(f"\nratio 2 ranks / 1 rank: {rates[2] / rates[1]:.2f}x  (caches bit-identical: {same})")
    print(json.dumps({"ranks_1_views_per_s": rates[1], "ranks_2_views_per_s": rates[2],
                      "ratio_2_vs_1": rates[2] / rates[1], "bit_identical": same}))


if __name__ == "__main__":
    main()
