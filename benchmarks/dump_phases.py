"""Where a whole ``logitcache dump`` process spends its time, next to the plain loop of bench_dump_e2e.

Runs, each as its own process, (1) ``logitcache dump`` with timers around its phases (imports,
source, header scan, teacher load, probe, the workers measurement, layout, first batch, per
batch: teachers + encoding (``_run_batch``) and waiting for views, final flush) and (2) the plain
read + teacher + top-k script with timers around its imports, load, reads and forward + top-k.
Prints wall and CPU milliseconds per phase (CPU: this process's, threads included, DataLoader
workers not; on a shared box the CPU column is the one to compare). A profile, not a ratio:
bench_dump_e2e.py gives the ratios.

    python benchmarks/dump_phases.py --workdir DIR [-- extra dump options, e.g. --workers 0]
    # ~30 s for 4,096 clips on 2 idle cores (--quick: 512); clips and teacher as bench_dump_e2e
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

_ROWS: list[tuple[str, float, float]] = []


def _mark(name: str, t: float, c: float) -> None:
    _ROWS.append((name, time.perf_counter() - t, time.process_time() - c))


def _report() -> None:
    agg: dict[str, list] = {}
    for n, w, c in _ROWS:
        a = agg.setdefault(n, [0, 0.0, 0.0])
        a[0] += 1
        a[1] += w
        a[2] += c
    for n, (k, w, c) in agg.items():
        print(f"  {n:44s} x{k:<4d} wall {w * 1e3:9.1f} ms   CPU {c * 1e3:9.1f} ms")


def _timed(owner, name: str, label: str | None = None) -> None:
    f = getattr(owner, name)

    def timed(*a, **k):
        t, c = time.perf_counter(), time.process_time()
        try:
            return f(*a, **k)
        finally:
            _mark(label or name, t, c)
    setattr(owner, name, timed)


def profile_dump(args: list[str], t0: float, c0: float) -> None:
    import numpy  # noqa: F401  what the plain loop imports too
    import soundfile  # noqa: F401
    import torch  # noqa: F401

    _mark("import torch + numpy + soundfile", t0, c0)
    t, c = time.perf_counter(), time.process_time()
    import logitcache.cli.main as cli
    import logitcache.dump  # noqa: F401

    _mark("import logitcache + CLI (beyond those)", t, c)
    D = sys.modules["logitcache.dump"]  # the attribute logitcache.dump is the function
    from logitcache import cache
    from logitcache.sources import audio_folder

    for n in ("open_source", "load_teachers", "probe_teachers", "_open_writer", "_default_workers", "_run_batch"):
        _timed(D, n)
    _timed(audio_folder.AudioFolder, "scan", "header scan (folder.scan)")
    for n in ("drain", "finish", "close"):
        _timed(cache.CacheWriter, n, f"writer.{n}")
    batches = D.one_line_worker_errors

    def timed_batches(loader):
        t, c, label = time.perf_counter(), time.process_time(), "waiting for views: first batch"
        for x in batches(loader):
            _mark(label, t, c)
            label = "waiting for views: next batches"
            yield x
            t, c = time.perf_counter(), time.process_time()
    D.one_line_worker_errors = timed_batches
    t, c = time.perf_counter(), time.process_time()
    try:
        cli.main(["dump", *args], standalone_mode=False)
    finally:
        _mark("dump command", t, c)
        _mark("PROCESS", t0, c0)
        print("dump:")
        _report()


def profile_plain(data: str, teacher: str, k: int = 20, bs: int = 32) -> None:
    t0, c0 = time.perf_counter(), time.process_time()
    import numpy as np
    import soundfile as sf
    import torch

    _mark("import torch + numpy + soundfile", t0, c0)
    t, c = time.perf_counter(), time.process_time()
    files = [data + "/" + line.split(",")[0] for line in open(data + "/labels.csv").read().splitlines()[1:]]
    model = torch.export.load(teacher).module()
    _mark("torch.export.load", t, c)
    with torch.inference_mode():
        for a in range(0, len(files), bs):
            t, c = time.perf_counter(), time.process_time()
            x = torch.from_numpy(np.stack([sf.read(f, dtype="float32")[0] for f in files[a:a + bs]]))
            _mark("soundfile.read", t, c)
            t, c = time.perf_counter(), time.process_time()
            v, i = torch.topk(model(x), k, dim=-1)
            v.numpy(), i.numpy()
            _mark("forward + torch.topk", t, c)
    _mark("PROCESS", t0, c0)
    print("plain loop:")
    _report()


def main() -> None:
    t0, c0 = time.perf_counter(), time.process_time()
    if sys.argv[1:2] == ["--dump-child"]:
        return profile_dump(sys.argv[2:], t0, c0)
    if sys.argv[1:2] == ["--plain-child"]:
        return profile_plain(sys.argv[2], sys.argv[3])
    import os
    import shutil

    import _common as C
    import bench_dump_e2e as E

    extra = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else []
    p = C.parser(__doc__)
    p.add_argument("--clips", type=int, default=None, help="clips (default 4096; --quick 512)")
    args = p.parse_args(sys.argv[1:len(sys.argv) - len(extra) - (1 if extra else 0)])
    clips = args.clips or (512 if args.quick else 4096)
    wd = C.workdir(args.workdir)
    data = E.make_clips(wd / f"clips_{clips}x1s_16k", clips, 527)
    teacher = C.export_teachers(wd / "teachers", C.TEACHERS_1, 527, 1.0)[0]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "PYTHONDONTWRITEBYTECODE")}
    subprocess.run([sys.executable, "-c", "import logitcache.cli.main"], env=env, check=True)  # cached bytecode
    out = wd / "phases.zarr"
    shutil.rmtree(out, ignore_errors=True)
    print(f"# dump_phases: {clips} clips, {C.TEACHERS_1[0]} C=527 (.pt2), k=20, batch 32, --augment none {' '.join(extra)}")
    print(f"# machine: {C.machine()}")
    subprocess.run([sys.executable, __file__, "--dump-child", "--data", str(data), "--teacher", teacher, "--out",
                    str(out), "--topk", "20", "--augment", "none", "--batch-size", "32", *extra], env=env, check=True,
                   stderr=subprocess.DEVNULL)
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run([sys.executable, __file__, "--plain-child", str(data), teacher], env=env, check=True)


if __name__ == "__main__":
    main()
