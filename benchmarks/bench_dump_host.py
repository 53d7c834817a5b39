"""The dump's own host work per view on the main process, with teachers that cost nothing.

Three free teachers (each a slice of the views reshaped to logits: [B, 527] clip level or
[B, T=250, 527] frame level, no arithmetic), the ensemble and the 3 members stored (mean_prob,
multilabel), the default codec (topk, float16), a zarr cache, batch 32, 'ced' augmentation
params. The views are premade batches held in memory (no decoding, no augmenting). What runs is
the dump's own loop, :func:`logitcache.pipeline.run_epoch` with the dump's ``EpochStep``,
``TeacherPass`` and ``ChunkRows`` and a real ``CacheWriter`` (background thread, compression):
content checks, device copies, teachers, aggregation, encode, bad-row checks, copies to the host,
pack, chunk assembly, hand-off to the writer.

Per setting (k = 20 and 100, clip and frame level), µs per view on the main thread:

  wall, CPU    the loop's wall time and the main thread's CPU time (``time.thread_time``: the
               writer thread's compression is not in it)
  device       the device section: teachers, stacking, finite checks, aggregation, top-k, tail
               statistic, member moments (``TeacherPass._encode``). On a GPU only their launches
               are host work; on a CPU these kernels run here and dominate frame level
  ops/batch    aten ops the device section dispatches per batch (about its kernel launches on a
               GPU; each costs the host a few µs there)
  wait         waiting for the device's results (CUDA only; 0 on CPU)
  own          the dump's own host work, in wall and main-thread CPU time: on CPU the loop minus
               the device section (everything but the kernels a GPU box runs on the device);
               on CUDA the loop minus the wait (kernel launches included)
  own timed    the same main-thread CPU time, summed directly around the loop's steps (``start``,
               ``finish``) outside the device section (CPU) or the wait (CUDA): at frame level the device section is ~4,000x
               the own work, and "own" as a difference carries its noise (tens of µs per view)
  / goal       own timed / 25 µs (the goal: <= 25 µs per view, >= 40k views/s; <= 1 passes). On
               a quiet machine own wall and own CPU agree; on a shared one the CPU figures hold
  writer CPU   the writer thread's CPU time (``time.thread_time`` inside it): chunk assembly
               (copying each batch's rows into its chunk, params to their grid), then zarr's
               encode, compression and writes; ``assembly`` is the first part alone
  drain        the wall time from the loop's end until the writer has written everything: near 0
               while the writer keeps up with the loop

Each setting runs twice per round, side by side: ``assembly writer`` is the dump as it is (the
main thread hands each chunk's rows over by reference, ``pipeline.ChunkParts``, and the writer
thread copies them into the chunk), ``assembly main`` the previous way (the same copies made on
the main thread before the hand-over). ``now / before`` is the median over rounds of the paired
ratio of their own CPU.

Settings run in interleaved rounds (their order alternating) and the medians are printed, as the
shared machine's load drifts; ``--profile`` adds a cProfile of one k=20 clip-level epoch.

    python benchmarks/bench_dump_host.py --quick   # ~1.5 min on 2 shared cores (load 4)
    python benchmarks/bench_dump_host.py           # ~4.5 min on 2 shared cores (load 4)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

CLASSES, FRAMES, MEMBERS, GOAL_US = 527, 250, 3, 25.0


class FreeTeacher(torch.nn.Module):
    """Logits at no cost: a slice of the views, offset per teacher so the members differ."""

    def __init__(self, offset: int, frames: int | None):
        super().__init__()
        self.offset, self.frames = offset, frames

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = CLASSES * (self.frames or 1)
        z = x[:, self.offset:self.offset + n]
        return z.reshape(x.shape[0], self.frames, CLASSES) if self.frames else z


class Folder:
    """What the loop asks of a data source: ids (for error messages) and the modality."""

    modality = "audio"

    def __init__(self, n: int):
        self.ids = [f"audio/clip_{i:07d}.wav" for i in range(n)]


def _timed_pass():
    from logitcache.pipeline import TeacherPass

    class TimedPass(TeacherPass):
        """The dump's TeacherPass, with its device section and its wait for results timed."""

        device_s = device_cpu_s = wait_s = 0.0

        def _encode(self, *a):
            t0, c0 = time.perf_counter(), time.thread_time()
            out = super()._encode(*a)
            self.device_s += time.perf_counter() - t0
            self.device_cpu_s += time.thread_time() - c0
            return out

        def rows(self, pending):
            t0 = time.perf_counter()
            if pending.ready is not None:
                pending.ready.synchronize()
            self.wait_s += time.perf_counter() - t0
            return super().rows(pending)

    return TimedPass


def _timed_writer():
    from logitcache.cache import CacheWriter

    class TimedWriter(CacheWriter):
        """The dump's CacheWriter, with its thread's CPU time and its chunk assembly timed."""

        cpu_s = assembly_s = 0.0

        def _run(self):
            c0 = time.thread_time()
            try:
                super()._run()
            finally:
                self.cpu_s = time.thread_time() - c0

        def _assembled(self, block):
            c0 = time.thread_time()
            out = super()._assembled(block)
            self.assembly_s += time.thread_time() - c0
            return out

    return TimedWriter


def _timed_step():
    from logitcache.pipeline import EpochStep

    class TimedStep(EpochStep):
        """The dump's EpochStep, with the main thread's CPU time in ``start`` and ``finish`` outside
        the device section summed: the own work timed directly, not as a difference of two large
        times (at frame level the device section is ~4,000x larger, and its noise swamps the
        difference in a single run)."""

        own_s = 0.0

        def start(self, batch):  # on CUDA the device section's launches are host work: kept in
            tp = self.teacher_pass
            c0, d0 = time.thread_time(), tp.device_cpu_s
            out = super().start(batch)
            self.own_s += time.thread_time() - c0 - (tp.device_cpu_s - d0 if tp.dev.type != "cuda" else 0.0)
            return out

        def finish(self, pending):
            c0, w0 = time.thread_time(), self.teacher_pass.wait_s
            super().finish(pending)
            self.own_s += time.thread_time() - c0 - (self.teacher_pass.wait_s - w0)  # a CUDA wait may spin

    return TimedStep


def _chunk_rows(assembly: str):
    from logitcache.pipeline import ChunkRows

    class MainThreadChunkRows(ChunkRows):
        """The previous hand-over: each chunk assembled on the main thread, then queued."""

        def hand_over(self, chunk, parts):
            self.writer.put(self.epoch, chunk, parts())

    return ChunkRows if assembly == "writer" else MainThreadChunkRows


class Setting:
    """One (k, frames) setting: its teachers, manifest and premade batches, run as many times as asked."""

    def __init__(self, k: int, frames: int | None, n: int, batch: int, dev: torch.device, workdir: Path):
        from logitcache.augment import Augmenter, epoch_order, id_hashes, load_ops_spec, make_spec, view_seeds
        from logitcache.cache import choose_chunk_rows
        from logitcache.codecs import get_codec
        from logitcache.layout import codec_entries, new_manifest
        from logitcache.targets import index_dtype
        from logitcache.teachers import Teacher
        from logitcache.views import Decoded

        self.k, self.frames, self.n, self.dev, self.workdir = k, frames, n, dev, workdir
        self.label = f"k={k}, {'frame T=%d' % frames if frames else 'clip'}"
        self.folder = Folder(n)
        self.aug = Augmenter.from_spec(make_spec("audio", load_ops_spec("ced"),
                                                 {"sample_rate": C.SAMPLE_RATE, "clip_seconds": 10.0}))
        self.teachers = [Teacher(f"free{i}", "free", FreeTeacher(7 * i, frames), "") for i in range(MEMBERS)]
        for t in self.teachers:
            t.out_shape = (frames, CLASSES) if frames else (CLASSES,)
        entries = codec_entries("topk", "float16", index_dtype(CLASSES))
        self.codec = get_codec("topk")(k, CLASSES, "multilabel", frames, entries["codec_options"])
        R = choose_chunk_rows(self.codec.chunk_sizing_bytes(), n)
        self.manifest = new_manifest(
            dataset={"fingerprint": "free", "num_samples": n}, classes=[f"c{i}" for i in range(CLASSES)],
            augmenter=self.aug, teachers=[t.describe() for t in self.teachers],
            members=[t.name for t in self.teachers], output_kind="multilabel", aggregation="mean_prob", weights=None,
            topk=k, frames=frames, value_dtype="float16", epochs=1, seed=0, chunk_rows=R, codec=entries,
            run={"precision": "fp32", "compile": False, "channels_last": False, "device": dev.type})
        h = id_hashes(self.folder.ids)
        self.order = epoch_order(0, 0, h)
        self.seeds = view_seeds(0, 0, h)[self.order]
        g = torch.Generator().manual_seed(0)
        width = 7 * MEMBERS + CLASSES * (frames or 1)
        waves = [torch.randn(batch, width, generator=g) * 3 - 4 for _ in range(2)]  # two, reused: memory
        if dev.type == "cuda":
            waves = [w.pin_memory() for w in waves]  # as the DataLoader's pin_memory gives them
        ctx = self.aug.context(num_samples=n, sample_index=0, source_samples=self.aug.clip_samples)
        drawn = [self.aug.draw(int(s), ctx) for s in range(batch)]
        params = {p: np.stack([d[p] for d in drawn]) for p in self.aug.param_specs}
        self.batches = []
        for i, a in enumerate(range(0, n, batch)):
            pos = np.arange(a, min(a + batch, n))
            b = len(pos)
            index = self.order[pos].astype(np.int64)
            decoded = Decoded(np.arange(b, dtype=np.uint32), index, np.arange(b, dtype=np.uint32))
            self.batches.append((waves[i % 2][:b], {p: v[:b] for p, v in params.items()}, pos, decoded))
        self.runs = 0

    def run(self, profile=None, assembly: str = "writer") -> dict[str, float]:
        """One epoch through the dump's loop, chunks assembled on the ``writer`` thread or the
        ``main`` one; µs per view of each part."""
        from logitcache.dump import _view_rows
        from logitcache.layout import Layout
        from logitcache.pipeline import run_epoch
        from logitcache.views import SourceContent

        self.runs += 1
        out = self.workdir / f"{self.label.replace(' ', '').replace(',', '_').replace('=', '')}_{self.runs}.zarr"
        writer = _timed_writer()(out, self.manifest, self.folder.ids, self.aug.param_specs, backend="zarr")
        R, N = self.manifest["chunk_rows"], self.n
        per_chunk = {Layout.stats_path(t.name) for t in self.teachers}
        tp = _timed_pass()(self.teachers, self.dev, "fp32", self.codec, "multilabel", "mean_prob", None, True,
                           self.folder.ids, moments=True)
        step = _timed_step()(tp, _chunk_rows(assembly)(writer, 0, R, N, per_chunk), SourceContent.empty(N), self.folder,
                         self.order, self.seeds, _view_rows(self.order, self.seeds, writer.manifest, True))
        try:
            if profile is not None:
                profile.enable()
            c0, t0 = time.thread_time(), time.perf_counter()
            run_epoch(iter(self.batches), step)
            wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
            if profile is not None:
                profile.disable()
            writer.drain()
            drain = time.perf_counter() - t0 - wall
            writer.finish(complete=True)
        except BaseException:
            writer.abort()
            raise
        writer.close()
        _remove(out)
        us = 1e6 / N
        cuda = self.dev.type == "cuda"
        own = wall - (tp.wait_s if cuda else tp.device_s)
        own_cpu = cpu - (tp.wait_s if cuda else tp.device_cpu_s)  # a CUDA wait may spin: counted as waiting
        return {"wall": wall * us, "cpu": cpu * us, "device": tp.device_s * us, "wait": tp.wait_s * us,
                "own": own * us, "own_cpu": own_cpu * us, "own_timed": step.own_s * us,
                "writer_cpu": writer.cpu_s * us,
                "assembly": writer.assembly_s * us, "drain": drain * us}


def device_ops(s: Setting) -> int:
    """aten ops the device section dispatches per batch (kernel launches on a GPU, roughly), counted
    once outside the timed runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from logitcache.pipeline import TeacherPass

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    tp = TeacherPass(s.teachers, s.dev, "fp32", s.codec, "multilabel", "mean_prob", None, True, s.folder.ids,
                     moments=True)
    wave, _, pos, _ = s.batches[0]
    with Count(), torch.inference_mode():
        tp._encode(tp.streams.to_device(wave), s.order[pos], s.seeds[pos])
    return Count.n


def _remove(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def main() -> None:
    p = C.parser(__doc__)
    p.add_argument("--views", type=int, default=None, help="clip-level views per epoch (default 8192; --quick 2048)")
    p.add_argument("--frame-views", type=int, default=None,
                   help="frame-level views per epoch (default: 1024 on CUDA, else 128; --quick a quarter)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5; --quick 3)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--profile", action="store_true", help="also print a cProfile of one k=20 clip-level epoch")
    args = p.parse_args()
    from logitcache.device import resolve_device

    torch.set_num_threads(args.threads or 1)
    dev = resolve_device(args.device)
    n_clip = args.views or (2048 if args.quick else 8192)
    n_frame = args.frame_views or ((1024 if dev.type == "cuda" else 128) // (4 if args.quick else 1))
    rounds = args.rounds or (3 if args.quick else 5)
    wd = C.workdir(args.workdir)
    print(f"# bench_dump_host: free teachers x{MEMBERS} + ensemble stored, C={CLASSES}, topk codec float16, zarr, "
          f"batch {args.batch_size}, device {dev.type}; {n_clip} clip-level / {n_frame} frame-level views, "
          f"{rounds} rounds")
    print(f"# machine: {C.machine()}")
    settings = [Setting(k, T, n_frame if T else n_clip, args.batch_size, dev, wd)
                for T in (None, FRAMES) for k in (20, 100)]
    variants = ("writer", "main")
    for s in settings:  # warm-up: allocator, zarr codecs, first-call costs
        s.run()
    results = {(s.label, v): [] for s in settings for v in variants}
    for r in range(rounds):
        for s in (settings if r % 2 == 0 else settings[::-1]):
            for v in (variants if r % 2 == 0 else variants[::-1]):
                results[s.label, v].append(s.run(assembly=v))
    rows = []
    for s in settings:
        ops = device_ops(s)
        paired = [now["own_timed"] / before["own_timed"]
                  for now, before in zip(results[s.label, "writer"], results[s.label, "main"])]
        for v in variants:
            runs = results[s.label, v]
            med = {key: C.median([x[key] for x in runs]) for key in runs[0]}
            rows.append([s.label, v, med["wall"], med["cpu"], med["device"], ops, med["wait"], med["own"],
                         med["own_cpu"], med["own_timed"], round(med["own_timed"] / GOAL_US, 2),
                         f"{1e6 / med['own_timed']:,.0f}",
                         med["writer_cpu"], med["assembly"], med["drain"],
                         round(C.median(paired), 2) if v == "writer" else ""])
    print(C.table(["setting", "assembly", "wall", "CPU", "device", "device ops/batch", "wait", "own (wall)",
                   "own (CPU)", "own (CPU, timed)", "timed / goal", "views/s at timed", "writer CPU", "of which assembly",
                   "drain", "timed now / before"], rows))
    own = "wall (CPU) - wait (launches included)" if dev.type == "cuda" else "wall (CPU) - device section"
    print(f"# µs per view; own = {own}; timed = main-thread CPU in the loop's steps outside the device section; "
          f"goal {GOAL_US:g} µs/view (timed / goal <= 1); assembly writer = now "
          f"(chunks assembled on the writer thread), main = before (on the main thread)")
    if args.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        settings[0].run(prof)
        pstats.Stats(prof).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
