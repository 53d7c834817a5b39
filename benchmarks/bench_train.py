"""Student training cost: from the cache vs. on hard labels vs. online KD with the teachers.

One epoch of N clips (default 640; --quick 192) of 1 s, C = 527, batch 32. A 3-teacher cache
(cnn_small + crnn_small + transformer_tiny, exported .pt2, k = 20, 'ced' augmentation) is dumped
first. Then three pipelines train the same student (cnn_tiny, same initial weights, AdamW), each
with its views made in DataLoader workers exactly as ``logitcache train`` makes them:

  cache     CacheStream (views replayed from stored parameters + targets streamed from the
            cache) -> distill_step with the KD loss on the stored top-k + tail (what `train` runs)
  labels    the same views drawn from the same seeds (no cache opened) -> the same student
            step with the hard-label loss (mixup-mixed labels)
  online    the same views -> the 3 teachers' forward passes every step -> the same student
            step with KD against the ensemble's dense probabilities

plus the parts alone on batches held in memory: the teachers' forward, the student step. Time
per step is measured from the 2nd step on (the first waits for workers to start), rounds are
interleaved (labels and cache swap order every round), ratios are taken within each round and
their medians reported (ms: medians). The main process runs cores - workers intra-op threads
(--threads to change). Goals: cache / labels <= 1.05; the speed-up online / cache
>= 0.9 x the ideal (teachers' forward + labels step) / (labels step).

    python benchmarks/bench_train.py            # ~2 min on 2 cores
    python benchmarks/bench_train.py --quick    # ~1 min
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


class LabelledViews(torch.utils.data.Dataset):
    """Epoch 0's views drawn from their seeds (what dump drew) with their hard labels; no cache."""

    def __init__(self, data: Path, clip: float, seed: int = 0):
        from logitcache.augment import Augmenter, epoch_order, id_hashes, load_ops_spec, view_seeds
        from logitcache.data import AudioFolder
        from logitcache.views import ViewSource

        folder = AudioFolder(data)
        self.source = ViewSource(folder, Augmenter(load_ops_spec("ced"), C.SAMPLE_RATE, clip))
        h = id_hashes(folder.ids)
        self.order = epoch_order(seed, 0, h)
        self.seeds = view_seeds(seed, 0, h)[self.order]

    def __len__(self):
        return len(self.order)

    def __getitem__(self, pos):
        wave, params = self.source.draw(self.order[pos], self.seeds[pos])
        return wave, torch.from_numpy(self.source.labels(self.order[pos], params))


def loader(ds, batch_size, workers):
    kw = {"batch_size": batch_size} if not isinstance(ds, torch.utils.data.IterableDataset) else {"batch_size": None}
    return DataLoader(ds, num_workers=workers, prefetch_factor=4 if workers else None, **kw)


def student(classes):
    from logitcache.train import build_student

    model = build_student(C.STUDENT, classes, C.SAMPLE_RATE, None, seed=0)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def timed_steps(batches, step) -> tuple[float, float]:
    """(wall seconds per step from the end of the first step to the end of the last, CPU seconds
    per step of the whole loop: main process + DataLoader workers, which are joined at its end)."""
    n, t0, c0 = 0, None, C.cpu_seconds()
    for b in batches:
        step(b)
        n += 1
        if t0 is None:
            t0 = time.perf_counter()
    wall = (time.perf_counter() - t0) / max(n - 1, 1)
    del batches
    return wall, (C.cpu_seconds() - c0) / max(n, 1)


def run_cache(cache, data, classes, bs, workers) -> float:
    from logitcache.train import distill_step
    from logitcache.views import CacheStream

    model, opt = student(classes)
    dev = torch.device("cpu")
    return timed_steps(loader(CacheStream(cache, data, 0, bs), bs, workers),
                       lambda b: distill_step(model, opt, b, "multilabel", dev))


def hard_step(model, opt, wave, labels):
    from logitcache.targets import hard_label_loss

    loss = hard_label_loss(model(wave), labels, "multilabel")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def run_labels(views, classes, bs, workers) -> float:
    model, opt = student(classes)
    return timed_steps(loader(views, bs, workers), lambda b: hard_step(model, opt, *b))


def online_targets(teachers, wave):
    from logitcache.targets import aggregate

    with torch.inference_mode():
        logits = [t.module(wave).float() for t in teachers]
        return torch.sigmoid(aggregate(logits, "multilabel", "mean_prob"))


def run_online(views, teachers, classes, bs, workers) -> float:
    model, opt = student(classes)

    def step(b):
        target = online_targets(teachers, b[0]).clone()
        loss = F.binary_cross_entropy_with_logits(model(b[0]), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return timed_steps(loader(views, bs, workers), step)


def main() -> None:
    p = C.parser(__doc__)
    p.add_argument("--clips", type=int, default=None, help="clips (default 640; --quick 192)")
    p.add_argument("--clip-seconds", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--codec", default="topk", help="target codec of the cache (topk, compact)")
    p.add_argument("--classes", type=int, default=527)
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 8; --quick 2)")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers for all three pipelines (default: min(2, cores-1))")
    args = p.parse_args()
    import logitcache
    from logitcache.teachers import load_teacher

    clips = args.clips or (192 if args.quick else 640)
    rounds = args.rounds or (2 if args.quick else 8)
    workers = args.workers if args.workers is not None else max(0, min(2, (os.cpu_count() or 1) - 1))
    torch.set_num_threads(args.threads or C.default_threads(workers))
    bs, clip = args.batch_size, args.clip_seconds
    wd = C.workdir(args.workdir)
    data = C.make_data(wd / f"data_{clips}x{clip:g}s_C{args.classes}", clips, clip, args.classes)
    paths = C.export_teachers(wd / "teachers", C.TEACHERS_3, args.classes, clip)
    cache = wd / "train_bench.zarr"
    shutil.rmtree(cache, ignore_errors=True)
    logitcache.dump(data, paths, cache, topk=20, augment="ced", batch_size=bs, sample_rate=C.SAMPLE_RATE,
                    clip_seconds=clip, progress=False, codec=args.codec)
    print(f"# bench_train: {clips} clips of {clip:g} s, C={args.classes}, batch {bs}, student {C.STUDENT}, "
          f"teachers {', '.join(C.TEACHERS_3)} (k=20 {args.codec} cache, 'ced'), {workers} DataLoader worker(s) "
          f"per pipeline")
    print(f"# machine: {C.machine()}")

    teachers = [load_teacher(q) for q in paths]
    views = LabelledViews(data, clip)
    held = [b for b, _ in zip(DataLoader(views, batch_size=bs), range(6))]

    def teacher_alone():
        t0 = time.perf_counter()
        for w, _ in held:
            online_targets(teachers, w)
        return (time.perf_counter() - t0) / len(held)

    def student_alone():
        model, opt = student(args.classes)
        hard_step(model, opt, *held[0])
        t0 = time.perf_counter()
        for w, y in held[1:]:
            hard_step(model, opt, w, y)
        return (time.perf_counter() - t0) / (len(held) - 1)

    res = {k: [] for k in ("cache", "labels", "online", "teachers", "student")}
    cpu = {k: [] for k in ("cache", "labels", "online")}
    for r in range(rounds):
        pipelines = [("labels", lambda: run_labels(views, args.classes, bs, workers)),
                     ("cache", lambda: run_cache(cache, data, args.classes, bs, workers))]
        # labels and cache swap places every round, with a pause before each run: the second of
        # two back-to-back runs was measured up to 10-15 % slower here (the first one's worker
        # still exiting)
        pipelines = (pipelines if r % 2 == 0 else pipelines[::-1]) + [
            ("online", lambda: run_online(views, teachers, args.classes, bs, workers))]
        for name, run in pipelines:
            time.sleep(1.0)  # let the previous run's worker exit first
            wall, c = run()
            res[name].append(wall)
            cpu[name].append(c)
        res["teachers"].append(teacher_alone())
        res["student"].append(student_alone())
        print(f"#   round {r + 1}/{rounds} done; load average {os.getloadavg()[0]:.1f}", flush=True)
    m = {k: C.median(v) for k, v in res.items()}
    mc = {k: C.median(v) for k, v in cpu.items()}
    # ratios paired within each round (the shared machine's load drifts between rounds), then medians
    paired = {k: C.median([a / b for a, b in zip(v, res["labels"])]) for k, v in res.items()}
    paired_cpu = {k: C.median([a / b for a, b in zip(v, cpu["labels"])]) for k, v in cpu.items()}
    ideal = C.median([(t + lab) / lab for t, lab in zip(res["teachers"], res["labels"])])
    speedup = C.median([o / c for o, c in zip(res["online"], res["cache"])])
    ideal_parts = C.median([(t + st) / st for t, st in zip(res["teachers"], res["student"])])

    def row(label, key, with_cpu=True):
        cells = [label, round(1e3 * m[key], 1), round(paired[key], 3)]
        if with_cpu:
            return cells + [round(1e3 * mc[key], 1), round(paired_cpu[key], 3)]
        return cells + ["", ""]

    rows = [row("labels: views (workers) + student step, hard labels", "labels"),
            row("cache: replay + stream targets (workers) + KD step", "cache"),
            row("online: views (workers) + 3 teachers + KD step", "online"),
            row("teachers' forward alone (batches in memory)", "teachers", False),
            row("student step alone (batches in memory)", "student", False)]
    print()
    print(C.table(["pipeline", "ms/step", "/ labels", "CPU ms/step (incl. workers)", "CPU / labels"], rows))
    print()
    print(f"ratios: cache/labels {paired['cache']:.3f} (goal <= 1.05; CPU {paired_cpu['cache']:.3f}); "
          f"online/cache speed-up {speedup:.2f}x vs ideal (teachers + labels step)/(labels step) {ideal:.2f}x = "
          f"{speedup / ideal:.2f} of ideal (goal >= 0.9); [ideal from the parts alone, (teachers + student step)/"
          f"(student step): {ideal_parts:.2f}x, {speedup / ideal_parts:.2f} of it]")


if __name__ == "__main__":
    main()
