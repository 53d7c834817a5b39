"""Adding a teacher to a cache vs dumping that teacher alone, over the same data and epochs.

A base cache is dumped once with one teacher (cnn_small, exported to .pt2, C = 527, k = 20).
Then, per round:

  add    ``logitcache.add_teachers`` of a second teacher (crnn_small) to a fresh copy of the
         base cache: its views replayed from the stored parameters, only the new teacher run,
         one member target set written
  dump   ``logitcache.dump`` of that teacher alone, same data, epochs, batch size and workers:
         views drawn, the teacher run, ensemble + member target sets, order, seeds and
         parameters written

Both are wall-clock times of the whole call (teacher loading and probing included), the copy
of the base cache excluded, and CPU seconds (main process + DataLoader workers: what the call
costs whatever else shares the machine). Rounds alternate which goes first; each ratio add /
dump is the median of the per-round ratios (the shared machine's load drifts). Goal: wall
<= 1.1 (an addition costs about one teacher's forward over the stored views).

    python benchmarks/bench_add_teacher.py            # ~4 min on 2 idle cores
    python benchmarks/bench_add_teacher.py --quick    # ~1 min
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

BASE, NEW = "cnn_small", "crnn_small"


def timed(fn, *args, **kw) -> tuple[float, float]:
    """(wall seconds, CPU seconds incl. the call's finished DataLoader workers) of one call."""
    time.sleep(0.5)  # let the previous call's workers exit first
    c0, t0 = C.cpu_seconds(), time.perf_counter()
    fn(*args, **kw)
    return time.perf_counter() - t0, C.cpu_seconds() - c0


def main() -> None:
    p = C.parser(__doc__)
    p.add_argument("--clips", type=int, default=None, help="clips (default 512; --quick 128)")
    p.add_argument("--epochs", type=int, default=None, help="stored epochs (default 2; --quick 1)")
    p.add_argument("--clip-seconds", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--topk", type=int, default=20)
    p.add_argument("--classes", type=int, default=527)
    p.add_argument("--rounds", type=int, default=None, help="rounds (default 3; --quick 2)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: dump's default)")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    import logitcache
    from logitcache.dump import default_workers, resolve_device

    dev = resolve_device(args.device)
    workers = default_workers(dev) if args.workers is None else args.workers
    torch.set_num_threads(args.threads or C.default_threads(workers))
    clips, epochs = args.clips or (128 if args.quick else 512), args.epochs or (1 if args.quick else 2)
    rounds = args.rounds or (2 if args.quick else 3)
    wd = C.workdir(args.workdir)
    data = C.make_data(wd / f"data_{clips}x{args.clip_seconds:g}s_C{args.classes}", clips, args.clip_seconds,
                       args.classes)
    base_t, new_t = C.export_teachers(wd / "teachers", (BASE, NEW), args.classes, args.clip_seconds)
    common = dict(epochs=epochs, topk=args.topk, augment="ced", batch_size=args.batch_size, device=dev.type,
                  num_workers=workers, sample_rate=C.SAMPLE_RATE, clip_seconds=args.clip_seconds, progress=False,
                  threads=torch.get_num_threads())
    print(f"# bench_add_teacher: {clips} clips of {args.clip_seconds:g} s x {epochs} epoch(s), C={args.classes}, "
          f"k={args.topk}, batch {args.batch_size}, {workers} worker(s), device {dev.type}; base {BASE}, added {NEW}")
    print(f"# machine: {C.machine()}")
    base = wd / "base.zarr"
    shutil.rmtree(base, ignore_errors=True)
    logitcache.dump(data, [base_t], base, **common)
    work, alone = wd / "added.zarr", wd / "alone.zarr"

    def add() -> tuple[float, float]:
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(base, work)
        return timed(logitcache.add_teachers, work, data, [new_t], batch_size=args.batch_size, device=dev.type,
                     num_workers=workers, threads=torch.get_num_threads(), progress=False)

    def dump() -> tuple[float, float]:
        shutil.rmtree(alone, ignore_errors=True)
        return timed(logitcache.dump, data, [new_t], alone, **common)

    add(), dump()  # warm-up, not counted: the first load of each program, first-touch of the files
    adds, dumps = [], []
    for r in range(rounds):
        if r % 2 == 0:  # alternate which goes first
            a, d = add(), dump()
        else:
            d = dump()
            a = add()
        adds.append(a)
        dumps.append(d)
        print(f"#   round {r + 1}: add {a[0]:.2f} s ({a[1]:.2f} CPU s), dump alone {d[0]:.2f} s ({d[1]:.2f} CPU s), "
              f"ratio {a[0] / d[0]:.3f}; load average {os.getloadavg()[0]:.1f}", flush=True)
    wall = C.median([a[0] / d[0] for a, d in zip(adds, dumps)])
    cpu = C.median([a[1] / d[1] for a, d in zip(adds, dumps)])
    print()
    print(C.table(["teacher", "views", "add-teacher s", "dump alone s", "add / dump", "CPU s: add / dump"],
                  [[NEW, clips * epochs, round(C.median([a[0] for a in adds]), 2),
                    round(C.median([d[0] for d in dumps]), 2), round(wall, 3), round(cpu, 3)]]))
    print()
    print(f"ratio add-teacher / dump alone: {wall:.3f} wall, {cpu:.3f} CPU (goal <= 1.1; median of {rounds} "
          f"paired rounds)")


if __name__ == "__main__":
    main()
