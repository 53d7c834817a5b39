"""Whole-process ``logitcache dump`` vs. a plain read + teacher + top-k loop, same clips, same teacher.

4,096 one-second 16 kHz WAV clips (made once, soundfile), one conv teacher (zoo ``cnn_small``
with a 527-class head, random seeded weights, exported to ``.pt2`` as a user's teacher would be),
k = 20, batch 32, no augmentation (``--augment none``), zarr. Each case is a whole process,
timed from its start to its exit (interpreter start and imports included):

  plain     a script a user would write: ``torch.export.load(teacher).module()``, then for each
            batch of 32 files ``soundfile.read`` + the teacher + ``torch.topk``, keeping the top-k
            values and indices as numpy arrays in memory (nothing written); torch's default threads
  dump      ``logitcache dump --augment none`` with the defaults (workers and threads chosen by dump)
  w=0, w=1  the same with ``--workers 0`` / ``--workers 1``
  omp=1     the defaults with OMP_NUM_THREADS=1 in the environment

First it prints what a CPU dump without ``--workers`` measures to choose its workers (one view
and the teachers on one view, one core; ``none`` and ``ced`` augmentation; 1 teacher, and 3 in
the full run) and the choice on this machine. Rounds are interleaved (every case once per round, the order alternating between rounds, a
short pause between runs); each dump's wall time is divided by the plain run of its own round
and the median of these paired ratios is reported (ms columns: medians). "start" is the wall
time before the dump's loop began (imports, header scan, teacher load and probe, layout):
wall - the manifest's ``dump_seconds``; for plain, wall - its loop. "CPU" is the process's CPU
seconds, its DataLoader workers included: on a shared box, where wall times swing with the
other jobs, CPU / plain shows how much work the dump adds. Bytecode is cached as on a user's
install (PYTHONDONTWRITEBYTECODE is dropped from the subprocesses' environment). Goal: dump / plain <= 1.05
with the defaults. Subprocesses inherit this environment minus OMP_NUM_THREADS (except omp=1).

    python benchmarks/bench_dump_e2e.py            # ~4 min on 2 idle cores (longer when shared)
    python benchmarks/bench_dump_e2e.py --quick    # ~1 min: 512 clips, 2 rounds
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

# The plain loop, as a user would write it (run as its own process).
PLAIN = r'''
import json, sys, time
t_start = time.perf_counter()
import numpy as np, soundfile as sf, torch
data, teacher, k, bs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
files = [data + "/" + line.split(",")[0] for line in open(data + "/labels.csv").read().splitlines()[1:]]
model = torch.export.load(teacher).module()
t_loop = time.perf_counter()
values, indices = [], []
with torch.inference_mode():
    for a in range(0, len(files), bs):
        x = torch.from_numpy(np.stack([sf.read(f, dtype="float32")[0] for f in files[a:a + bs]]))
        v, i = torch.topk(model(x), k, dim=-1)
        values.append(v.numpy()); indices.append(i.numpy())
print(json.dumps({"loop": time.perf_counter() - t_loop, "rows": sum(len(v) for v in values),
                  "threads": torch.get_num_threads()}))
'''

CASES = {  # name -> (extra dump options, extra environment)
    "dump": ([], {}),
    "w=0": (["--workers", "0"], {}),
    "w=1": (["--workers", "1"], {}),
    "omp=1": ([], {"OMP_NUM_THREADS": "1"}),
}


def make_clips(root: Path, n: int, num_classes: int, seconds: float = 1.0) -> Path:
    """``n`` 16-bit WAV clips at 16 kHz (noise + a tone), labels.csv, classes.txt, dataset.json."""
    import soundfile as sf

    root = Path(root)
    if (root / "labels.csv").is_file():
        return root
    (root / "audio").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * C.SAMPLE_RATE)) / C.SAMPLE_RATE
    rows = []
    for i in range(n):
        x = 0.1 * rng.standard_normal(len(t)) + 0.3 * np.sin(2 * np.pi * rng.uniform(100, 4000) * t)
        name = f"audio/clip_{i:05d}.wav"
        sf.write(root / name, x.astype(np.float32), C.SAMPLE_RATE, subtype="PCM_16")
        rows.append(f"{name},class_{i % num_classes:04d}\n")
    (root / "classes.txt").write_text("".join(f"class_{c:04d}\n" for c in range(num_classes)))
    (root / "dataset.json").write_text(json.dumps({"sample_rate": C.SAMPLE_RATE, "clip_seconds": seconds}))
    (root / "labels.csv").write_text("filename,labels\n" + "".join(rows))  # last: marks the folder complete
    return root


def _children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)  # finished children and theirs (DataLoader workers)
    return r.ru_utime + r.ru_stime


def run_plain(script: Path, data: Path, teacher: str, k: int, bs: int, env: dict) -> tuple:
    """(wall, start-up, CPU) seconds of one plain-loop process, and its threads."""
    c0, t0 = _children_cpu(), time.perf_counter()
    out = subprocess.run([sys.executable, str(script), str(data), teacher, str(k), str(bs)], env=env,
                         check=True, capture_output=True, text=True).stdout
    wall = time.perf_counter() - t0
    result = json.loads(out.splitlines()[-1])
    return wall, wall - result["loop"], _children_cpu() - c0, f"w=0, t={result['threads']}"


def run_dump(data: Path, teacher: str, out: Path, k: int, bs: int, extra: list[str],
             env: dict) -> tuple:
    """(wall, start-up, CPU) seconds of one ``logitcache dump`` process (the console script), and
    the workers and threads it ran with."""
    exe = Path(sys.executable).with_name("logitcache")
    cmd = [str(exe) if exe.is_file() else sys.executable, *([] if exe.is_file() else ["-m", "logitcache"]),
           "dump", "--data", str(data), "--teacher", teacher, "--out", str(out), "--topk", str(k),
           "--augment", "none", "--batch-size", str(bs), *extra]
    shutil.rmtree(out, ignore_errors=True)
    c0, t0 = _children_cpu(), time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t0, _children_cpu() - c0
    if proc.returncode:
        raise SystemExit(f"dump failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    from logitcache.cache import open_cache

    loop = float(open_cache(out).manifest["dump_seconds"])
    shutil.rmtree(out, ignore_errors=True)
    chose = re.search(r"\[(\d+) workers?, (\d+) thread", proc.stderr)  # the progress bar's label
    return wall, wall - loop, cpu, f"w={chose[1]}, t={chose[2]}" if chose else "?"


def print_costs(data: Path, teachers: list[str], reps: int = 3) -> None:
    """What a CPU dump without --workers measures before its loop (``dump.measure_costs``: one view
    and the teachers on one view, CPU time of one thread, decoding cold), for ``none`` and ``ced``
    augmentation, and the workers ``dump.choose_workers`` picks from it on this machine's cores."""
    import torch

    from logitcache.augment import Augmenter, epoch_order, id_hashes, load_ops_spec, make_spec, presets_for, view_seeds
    from logitcache.data import _decode
    from logitcache.dump import _cores, choose_workers, measure_costs
    from logitcache.sources import open_source, settings_for
    from logitcache.teachers import load_teachers, probe_teachers
    from logitcache.views import DrawnViews, ViewSource

    folder, cpu = open_source(data), torch.device("cpu")
    folder.scan()
    presets, _ = presets_for(folder.modality)
    h = id_hashes(folder.ids)
    order, seeds = epoch_order(0, 0, h), view_seeds(0, 0, h)
    loaded = load_teachers(teachers, device=cpu)
    for aug in ("none", "ced"):
        augmenter = Augmenter.from_spec(make_spec(folder.modality, load_ops_spec(aug, presets), settings_for(folder, {})))
        folder.configure(augmenter.spec)
        probe_teachers(loaded, augmenter.view_shape, cpu)
        costs = []
        for r in range(reps):
            _decode.cache_clear()
            o = order[64 * r:]
            costs.append(measure_costs(DrawnViews(ViewSource(folder, augmenter), o, seeds[o]), loaded, cpu, "fp32"))
        v, t = C.median([c[0] for c in costs]), C.median([c[1] for c in costs])
        print(f"# costs per view, one core ({len(teachers)} teacher(s), --augment {aug}): views {1e3 * v:.2f} ms "
              f"({', '.join(f'{1e3 * c[0]:.2f}' for c in costs)}), teachers {1e3 * t:.2f} ms "
              f"({', '.join(f'{1e3 * c[1]:.2f}' for c in costs)}); views / teachers {v / t:.2f} "
              f"-> default --workers {choose_workers(v, t, _cores())} on {_cores()} cores")


def main() -> None:
    p = C.parser(__doc__)
    p.add_argument("--clips", type=int, default=None, help="clips (default 4096; --quick 512)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5; --quick 2)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--topk", type=int, default=20)
    p.add_argument("--classes", type=int, default=527)
    p.add_argument("--cases", default=",".join(CASES), help=f"dump cases to run (of {', '.join(CASES)})")
    args = p.parse_args()
    clips = args.clips or (512 if args.quick else 4096)
    rounds = args.rounds or (2 if args.quick else 5)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    wd = C.workdir(args.workdir)
    data = make_clips(wd / f"clips_{clips}x1s_16k", clips, args.classes)
    teacher = C.export_teachers(wd / "teachers", C.TEACHERS_1, args.classes, 1.0)[0]
    script = wd / "plain_loop.py"
    script.write_text(PLAIN)
    # As a user's box runs them: bytecode cached (this sandbox sets PYTHONDONTWRITEBYTECODE, which
    # recompiles every imported logitcache module per process: ~0.45 s), torch's own thread count.
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "PYTHONDONTWRITEBYTECODE")}
    subprocess.run([sys.executable, "-c", "import logitcache.cli.main"], env=env, check=True)  # writes the .pyc
    print(f"# bench_dump_e2e: {clips} clips of 1 s (16 kHz WAV), {C.TEACHERS_1[0]} C={args.classes} (.pt2), "
          f"k={args.topk}, batch {args.batch_size}, --augment none, zarr; {rounds} rounds")
    print(f"# machine: {C.machine()}")
    for names in ([C.TEACHERS_1] if args.quick else [C.TEACHERS_1, C.TEACHERS_3]):
        print_costs(data, C.export_teachers(wd / "teachers", names, args.classes, 1.0))
    names = ["plain", *cases]
    runs: dict[str, list[tuple]] = {n: [] for n in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            time.sleep(0.5)
            if name == "plain":
                runs[name].append(run_plain(script, data, teacher, args.topk, args.batch_size, env))
            else:
                extra, more = CASES[name]
                runs[name].append(run_dump(data, teacher, wd / "e2e.zarr", args.topk, args.batch_size, extra,
                                           {**env, **more}))
    rows, ratios = [], {}
    for name in names:
        wall, start, cpu = (C.median([w[i] for w in runs[name]]) for i in (0, 1, 2))
        ratio = C.median([d[0] / pl[0] for d, pl in zip(runs[name], runs["plain"])])
        cpu_ratio = C.median([d[2] / pl[2] for d, pl in zip(runs[name], runs["plain"])])
        ratios[name] = ratio
        chose = sorted(set(w[3] for w in runs[name]))
        rows.append([name, " / ".join(chose), round(wall, 2), round(start, 2), round(1e6 * (wall - start) / clips, 1), round(cpu, 2),
                     round(ratio, 3), round(cpu_ratio, 3),
                     " ".join(f"{d[0] / pl[0]:.2f}" for d, pl in zip(runs[name], runs["plain"]))])
    print(C.table(["case", "ran with", "wall s", "start s", "loop µs/clip", "CPU s", "wall / plain", "CPU / plain",
                   "wall / plain per round"], rows))
    print("ratios: " + ", ".join(f"{n}/plain {ratios[n]:.3f}" for n in cases)
          + (f" (goal: dump/plain <= 1.05 with the defaults: {'met' if ratios['dump'] <= 1.05 else 'not met'})"
             if "dump" in ratios else ""))


if __name__ == "__main__":
    main()
