"""Dump cost vs. the teachers' forward passes alone, over the same augmented batches.

For 1 and 3 teachers (zoo models with AudioSet-sized heads, C = 527, exported to .pt2 as a
user's teachers would be), k = 20, batch 32, on this machine's device:

  forward   the teachers' forward passes alone over the epoch's augmented batches, made
            beforehand and held in memory (no decoding, no augmenting, no top-k, no writing)
  views     making those batches (decode, resample, augment) serially in one process: the
            CPU work the DataLoader workers must hide behind the teachers
  dump      logitcache.dump of the same epoch (same order, seeds, batches): decoding and
            augmenting in DataLoader workers, teachers back to back, top-k on the device, a
            background writer writing whole chunks. Timed from the start of its loop to the
            manifest being final ("dump_seconds"); "wall" adds its setup (teacher loading,
            probing, layout) which does not grow with N.

Rounds are interleaved (forward, dump w=0, dump w=1, ..., forward again, then the next round);
each dump is divided by the mean of the two forward passes around it and the median of these
paired ratios is reported, as the shared machine's load drifts (ms columns: medians). "CPU" compares the dump's CPU seconds (main process + workers, setup
included) with forward + views: near 1 means the pipeline adds little work of its own, and
the wall-clock ratio then depends on whether a core is free for the workers. "own ms/batch"
(w=0 only, where nothing overlaps) is dump - forward - views: the pipeline's own work (top-k,
ensemble, host copies, chunk assembly, writing) per batch. The main process
runs cores - workers intra-op threads (--threads to change). Goal: dump / forward <= 1.05 with teachers costing >= 20 ms per batch.

    python benchmarks/bench_dump.py            # ~3 min on 2 idle cores (longer when shared)
    python benchmarks/bench_dump.py --quick    # ~1 min
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def premade_batches(data: Path, clip: float, batch_size: int, seed: int = 0) -> tuple[list[torch.Tensor], float]:
    """Epoch 0's augmented batches exactly as dump draws them; and the serial ms to make one."""
    from logitcache.augment import Augmenter, epoch_order, id_hashes, load_ops_spec, view_seeds
    from logitcache.data import AudioFolder, _decode
    from logitcache.views import DrawnViews, ViewSource, collate_views

    folder = AudioFolder(data)
    aug = Augmenter(load_ops_spec("ced"), C.SAMPLE_RATE, clip)
    h = id_hashes(folder.ids)
    order = epoch_order(seed, 0, h)
    views = DrawnViews(ViewSource(folder, aug), order, view_seeds(seed, 0, h)[order])
    _decode.cache_clear()
    t0 = time.perf_counter()
    batches = [b[0] for b in DataLoader(views, batch_size=batch_size, collate_fn=collate_views)]
    return batches, (time.perf_counter() - t0) / len(batches)


def forward_only(teachers, batches, dev) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of the teachers' forward passes over ``batches``."""
    with torch.inference_mode():
        c0, t0 = C.cpu_seconds(), time.perf_counter()
        for x in batches:
            x = x.to(dev, non_blocking=True)
            for t in teachers:
                t.module(x)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, C.cpu_seconds() - c0


def run_dump(data, paths, out: Path, clip, batch_size, k, workers, dev) -> tuple[float, float, float]:
    """(loop seconds, wall seconds, CPU seconds of the whole call incl. workers) of one dump."""
    import logitcache
    from logitcache.cache import open_cache

    shutil.rmtree(out, ignore_errors=True)
    time.sleep(1.0)  # let the previous run's workers exit first
    c0, t0 = C.cpu_seconds(), time.perf_counter()
    logitcache.dump(data, paths, out, topk=k, augment="ced", batch_size=batch_size, device=dev.type,
                    num_workers=workers, sample_rate=C.SAMPLE_RATE, clip_seconds=clip, progress=False,
                    threads=torch.get_num_threads())  # the benchmark's --threads, the same for every worker count
    wall, cpu = time.perf_counter() - t0, C.cpu_seconds() - c0
    loop = float(open_cache(out).manifest["dump_seconds"])
    shutil.rmtree(out, ignore_errors=True)
    return loop, wall, cpu


def main() -> None:
    p = C.parser(__doc__)
    p.add_argument("--clips", type=int, default=None, help="clips in the epoch (default 1920; --quick 256)")
    p.add_argument("--clip-seconds", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--topk", type=int, default=20)
    p.add_argument("--classes", type=int, default=527)
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 4; --quick 2)")
    p.add_argument("--workers", default="0,1,auto", help="DataLoader worker counts to compare (auto = the fixed rule min(2, cores - 1); a CPU dump without --workers measures its costs instead, see bench_dump_e2e)")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    from logitcache.dump import default_workers, resolve_device
    from logitcache.teachers import load_teacher

    torch.set_num_threads(args.threads or C.default_threads(default_workers(resolve_device(args.device))))

    clips = args.clips or (256 if args.quick else 1920)
    rounds = args.rounds or (2 if args.quick else 4)
    dev = resolve_device(args.device)
    auto = default_workers(dev)
    settings = []
    for w in args.workers.split(","):
        n = auto if w == "auto" else int(w)
        label = f"w={n}" + (" (fixed rule)" if n == auto else "")
        if all(s[1] != n for s in settings):
            settings.append((label, n))
    wd = C.workdir(args.workdir)
    data = C.make_data(wd / f"data_{clips}x{args.clip_seconds:g}s_C{args.classes}", clips, args.clip_seconds,
                       args.classes)
    print(f"# bench_dump: {clips} clips of {args.clip_seconds:g} s, C={args.classes}, k={args.topk}, "
          f"batch {args.batch_size}, 'ced' augmentation, device {dev.type}")
    print(f"# machine: {C.machine()}")
    rows, ratios = [], {}
    for names in (C.TEACHERS_1, C.TEACHERS_3):
        paths = C.export_teachers(wd / "teachers", names, args.classes, args.clip_seconds)
        teachers = [load_teacher(q, None, dev) for q in paths]
        batches, _ = premade_batches(data, args.clip_seconds, args.batch_size)
        forward_only(teachers, batches[:2], dev)  # warm-up
        nb = len(batches)
        fwd, fwd_cpu, views, dumps = [], [], [], {n: [] for _, n in settings}
        for r in range(rounds):
            # forward before and after the dumps of the round: each dump is compared with the
            # forward measured around it (paired), since the machine's load drifts
            views.append(premade_batches(data, args.clip_seconds, args.batch_size)[1])
            before = forward_only(teachers, batches, dev)
            order = settings if r % 2 == 0 else settings[::-1]  # alternate: no worker count always goes first
            ds = {n: run_dump(data, paths, wd / "bench.zarr", args.clip_seconds, args.batch_size, args.topk, n, dev)
                  for _, n in order}
            after = forward_only(teachers, batches, dev)
            fwd.append((before[0] + after[0]) / 2)
            fwd_cpu.append((before[1] + after[1]) / 2)
            for n, d in ds.items():
                dumps[n].append(d)
        f, make_s = C.median(fwd), C.median(views)
        for label, n in settings:
            loop, wall, cpu = (C.median([d[i] for d in dumps[n]]) for i in range(3))
            ratio = C.median([d[0] / fr for d, fr in zip(dumps[n], fwd)])
            own = C.median([(d[0] - fr) / nb - v for d, fr, v in zip(dumps[n], fwd, views)]) if n == 0 else 0.0
            rows.append([len(names), label, round(1e3 * f / nb, 1), round(1e3 * make_s, 1), round(1e3 * loop / nb, 1),
                         round(ratio, 3), round(1e3 * own, 1) if n == 0 else "",
                         round(C.median([d[1] / fr for d, fr in zip(dumps[n], fwd)]), 2),
                         round(C.median([d[2] / (fc_ + v * nb) for d, fc_, v in zip(dumps[n], fwd_cpu, views)]), 2),
                         round(clips / loop)])
            ratios[(len(names), n)] = ratio
            if n == 0:
                ratios[(len(names), "own")] = own / (f / nb)
        print(f"#   {len(names)} teacher(s) {', '.join(names)} done; load average {os.getloadavg()[0]:.1f}", flush=True)
    print()
    print(C.table(["teachers", "workers", "forward ms/batch", "views ms/batch (serial)", "dump ms/batch",
                   "dump / forward", "own ms/batch", "wall / forward", "CPU: dump / (forward + views)",
                   "dump views/s"], rows))
    print()
    best = {m: min(v for (mm, w), v in ratios.items() if mm == m and w != "own") for m in (1, 3)}
    at_auto = {m: ratios[(m, auto)] for m in (1, 3) if (m, auto) in ratios}
    own = {m: ratios.get((m, "own"), float("nan")) for m in (1, 3)}
    print("ratios: dump/forward (goal <= 1.05) " +
          ", ".join(f"{m} teacher(s): {at_auto.get(m, float('nan')):.3f} at the fixed-rule w={auto} "
                    f"(best {best[m]:.3f})" for m in (1, 3)) +
          "; the dump's own work (w=0: dump - forward - views) / forward: " +
          ", ".join(f"{m} teacher(s) {own[m]:.3f}" for m in (1, 3)))


if __name__ == "__main__":
    main()
