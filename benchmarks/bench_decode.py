"""Views per second per worker core vs. soundfile's raw decode of the same files, side by side.

One process, one intra-op thread (as a DataLoader worker runs), the same files for every method:

  soundfile  ``soundfile.read(path, dtype="float32")`` of each file, nothing else: the floor
  none       logitcache's view making for ``augment none`` through the dump worker's own path:
             ``DrawnViews.__getitem__`` (stat, read, crc, decode, mono, resample to 16 kHz when
             the file's rate differs, fit to the clip, ops) + ``collate_views`` per batch of 32
  ced        the same with ``augment ced`` (roll, time mask, STFT frequency mask)

File groups (made once; PCM-16 noise-like audio): 1 s WAV at 16 kHz (the rate matches: no
resampling), 1 s WAV at 32 kHz and 10 s FLAC at 16 / 44.1 kHz (resampled). Each round times every
method over every group, in rotating order; the decode cache is cleared before each pass, so every
view decodes its file as in a real epoch. Reported: median views/s per core over rounds and the
median of the paired per-round ratios method / soundfile. Rates are views per CPU second of the
process (``time.process_time``): a core's rate even on a shared machine. Goal: ``none`` >= 1 / 1.2 of
soundfile's rate on files at the view rate; resampled groups and ``ced`` are reported as measured
(resampling and the STFT are work soundfile does not do).

    python benchmarks/bench_decode.py            # ~3 min
    python benchmarks/bench_decode.py --quick    # ~30 s
    python benchmarks/bench_decode.py --profile none   # + cProfile of one pass (top functions)
    python benchmarks/bench_decode.py --quick --layers # + CPU time per view of each layer of the path
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import soundfile
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, median, parser, table, workdir  # noqa: E402

from logitcache import data as lcdata  # noqa: E402
from logitcache.augment import Augmenter, load_ops_spec, view_seeds  # noqa: E402
from logitcache.sources.audio_folder import AudioFolder  # noqa: E402
from logitcache.views import DrawnViews, ViewSource, collate_views  # noqa: E402

VIEW_RATE, BATCH = 16000, 32
# (name, file rate, seconds, format, files full, files quick)
GROUPS = [("1s wav 16k", 16000, 1.0, "WAV", 1000, 300),
          ("1s wav 32k", 32000, 1.0, "WAV", 300, 100),
          ("10s flac 16k", 16000, 10.0, "FLAC", 100, 30),
          ("10s flac 44.1k", 44100, 10.0, "FLAC", 100, 30)]


def make_group(root: Path, rate: int, seconds: float, fmt: str, n: int) -> Path:
    """A data folder of ``n`` clips (labels.csv + dataset.json + audio), made once."""
    if (root / "labels.csv").is_file() and len((root / "labels.csv").read_text().splitlines()) == n + 1:
        return root
    (root / "audio").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(rate + n)
    ext = fmt.lower()
    rows = ["filename,labels"]
    for i in range(n):
        t = np.arange(int(rate * seconds)) / rate
        x = 0.3 * np.sin(2 * np.pi * rng.uniform(200, 2000) * t) + 0.05 * rng.standard_normal(len(t))
        name = f"audio/clip_{i:05d}.{ext}"
        soundfile.write(root / name, x.astype(np.float32), rate, format=fmt, subtype="PCM_16")
        rows.append(f"{name},c{i % 5}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    (root / "dataset.json").write_text(f'{{"sample_rate": {VIEW_RATE}, "clip_seconds": {seconds}}}')
    return root


def raw_decode(folder: AudioFolder) -> int:
    paths = [folder.path_of(i) for i in range(len(folder))]
    for p in paths:
        soundfile.read(p, dtype="float32")
    return len(paths)


def view_maker(folder: AudioFolder, augment: str, seconds: float):
    augmenter = Augmenter(load_ops_spec(augment), VIEW_RATE, seconds)
    source = ViewSource(folder, augmenter)
    order = np.arange(len(folder), dtype=np.int64)
    views = DrawnViews(source, order, view_seeds(0, 0, np.arange(len(folder), dtype=np.uint64)))

    def run() -> int:
        for a in range(0, len(views), BATCH):
            collate_views([views[p] for p in range(a, min(a + BATCH, len(views)))])
        return len(views)

    return run


def clear_caches() -> None:
    """Every view decodes its file, as in an epoch over a dataset larger than the decode cache."""
    for f in (lcdata._decode,):
        f.cache_clear()


def timed(run) -> float:
    """Views per CPU second of this process: a core's rate, whatever else shares the machine
    (wall-clock time on a shared box counts the other jobs' slices too)."""
    clear_caches()
    t0 = time.process_time()
    n = run()
    return n / (time.process_time() - t0)


def profile(run, top: int = 18) -> None:
    import cProfile
    import pstats

    clear_caches()
    pr = cProfile.Profile()
    pr.enable()
    run()
    pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(top)


def layers(folder: AudioFolder, augment: str, seconds: float, rounds: int) -> None:
    """CPU us per view of each layer of the worker's path, cumulative (medians over rounds): where
    the time of (b)/(c) goes, without a profiler's overhead."""
    augmenter = Augmenter(load_ops_spec(augment), VIEW_RATE, seconds)
    source = ViewSource(folder, augmenter)
    paths = [folder.path_of(i) for i in range(len(folder))]

    def load():
        for p in paths:
            lcdata._load_audio(p, VIEW_RATE)

    def draw():
        for i in range(len(paths)):
            source.draw(i, i)

    steps = {"soundfile.read(path)": lambda: raw_decode(folder),
             "_load_audio: stat, read, crc, decode, mono, resample": load,
             "ViewSource.draw: + context, draw, ops (a fresh view)": draw,
             "DrawnViews[i] + collate_views (the worker's path)": view_maker(folder, augment, seconds)}
    cost = {k: [] for k in steps}
    for _ in range(rounds):
        for name, run in steps.items():
            cost[name].append(1e6 / timed(lambda: run() or len(paths)))
    print(f"\nper view, {augment}, CPU us (cumulative layers, medians of {rounds}):")
    for name, xs in cost.items():
        print(f"  {name:55s} {median(xs):8.1f}")


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5, quick 3)")
    p.add_argument("--profile", choices=("none", "ced"), default=None,
                   help="after the table, cProfile one pass of this method over the first group")
    p.add_argument("--layers", action="store_true",
                   help="after the table, CPU time per view of each layer of the path (first group)")
    args = p.parse_args()
    torch.set_num_threads(1)  # a DataLoader worker's setting
    rounds = args.rounds or (3 if args.quick else 5)
    work = workdir(args.workdir)
    print(f"machine: {machine()}")
    groups = []
    for name, rate, seconds, fmt, n_full, n_quick in GROUPS:
        n = n_quick if args.quick else n_full
        folder = AudioFolder(make_group(work / f"{rate}_{seconds:g}s_{fmt}_{n}", rate, seconds, fmt, n))
        methods = {"soundfile": lambda f=folder: raw_decode(f),
                   "none": view_maker(folder, "none", seconds), "ced": view_maker(folder, "ced", seconds)}
        groups.append((name, n, methods))
    rates = {(g, m): [] for g, _, ms in groups for m in ms}
    for r in range(rounds):
        for name, _, methods in groups:
            names = list(methods)
            for m in names[r % 3:] + names[:r % 3]:  # rotate which method runs first
                rates[name, m].append(timed(methods[m]))
    rows = []
    for name, n, methods in groups:
        sf = rates[name, "soundfile"]
        ratio = {m: median([a / b for a, b in zip(rates[name, m], sf)]) for m in ("none", "ced")}
        rows.append([name, n, median(sf), median(rates[name, "none"]), median(rates[name, "ced"]),
                     ratio["none"], ratio["ced"], 1e6 / median(rates[name, "none"]) - 1e6 / median(sf)])
    print(f"\n{rounds} interleaved rounds, 1 thread, batch {BATCH}, views at {VIEW_RATE} Hz; "
          f"views per CPU second (medians)")
    print(table(["files", "n", "soundfile", "none", "ced", "none/sf", "ced/sf", "none - sf us/view"], rows))
    same = [r for r, (_, rate, *_) in zip(rows, GROUPS) if rate == VIEW_RATE]  # no resampling: the goal's case
    print("ratios: none/soundfile " + ", ".join(f"{r[5]:.3f} ({r[0]})" for r in same) + f" (goal >= {1 / 1.2:.3f}); "
          "ced/soundfile " + ", ".join(f"{r[6]:.3f} ({r[0]})" for r in same))
    if args.layers:
        folder = AudioFolder(work / f"{GROUPS[0][1]}_{GROUPS[0][2]:g}s_{GROUPS[0][3]}_{groups[0][1]}")
        for augment in ("none", "ced"):
            layers(folder, augment, GROUPS[0][2], rounds)
    if args.profile:
        profile(groups[0][2][args.profile])


if __name__ == "__main__":
    main()
