"""Stress test (not part of the suite): SIGKILL a dump at many random points, resume it each time,
and check that the finished cache is bit-identical to an uninterrupted dump.

    python tests/stress/kill_resume.py --kills 60 --backend both          # minutes on 2 CPU cores
    python tests/stress/kill_resume.py --kills 20 --timer-only --seed 3
    python tests/stress/kill_resume.py --disk-full                        # needs root (mounts a tmpfs)

Each round is a fresh dump that is killed again and again until it completes. A kill is either a
test-hook kill (``LOGITCACHE_TEST_KILL=<point>:<n>``: layout, write, resize, finish), at a random
point of the run, or a timer kill (SIGKILL from this process after a random delay, wherever the
child happens to be, including inside an HDF5 flush). After every kill it checks the invariant
resume relies on: every chunk marked done holds exactly the reference's bytes, in every array.
Half of the rounds also extend a finished cache by one epoch and kill that, too.

``--disk-full`` runs dumps on a small tmpfs until they fail for space, grows the tmpfs and
resumes; zarr hits the real ENOSPC, HDF5 the writer's free-space reserve (see README).

The same helpers drive tests/test_resume.py (a handful of fixed kill points).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TESTS = Path(__file__).resolve().parents[1]
for p in (TESTS, TESTS / "stress"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

TEACHERS = ["toy_teachers:toy_a", "toy_teachers:toy_b"]
DUMP_KW = dict(topk=10, augment="strong", seed=0, batch_size=8, output_kind="multiclass", aggregation="mean_prob",
               members=True, value_dtype="float32", sample_rate=16000, clip_seconds=1.0, num_workers=0,
               chunk_rows=4, progress=False)


# ---------------------------------------------------------------- the child and the kills
def child(data: str, out: str, kill: str | None, kw: dict) -> None:
    """A resumable dump in its own process, optionally killed by the test hook."""
    api_child(kill, "dump", (data, TEACHERS, out), {"resume": True, **kw})


def api_child(kill: str | None, function: str, args: tuple, kw: dict) -> None:
    """``logitcache.<function>(*args, **kw)`` in its own process, optionally killed by the test hook."""
    import threading

    import numcodecs.blosc
    import torch
    from tqdm import tqdm

    # tqdm's and blosc's default locks are multiprocessing semaphores: a SIGKILLed child leaks
    # them and the resource tracker complains when the parent exits. This child never forks, so
    # thread locks do the same job.
    tqdm.set_lock(threading.RLock())
    numcodecs.blosc._MUTEX, numcodecs.blosc._MUTEX_IS_INIT = threading.Lock(), True
    torch.set_num_threads(1)  # as in tests/conftest.py: tiny tensors, OpenMP hand-offs cost more than the ops
    if kill:
        os.environ["LOGITCACHE_TEST_KILL"] = kill
    else:
        os.environ.pop("LOGITCACHE_TEST_KILL", None)
    import logitcache

    getattr(logitcache, function)(*args, **kw)


def context():
    """Children forked from a server that has already imported torch and logitcache: ~0.1 s each
    instead of ~3 s of imports, and no threads of this process (zarr's event loop) in the fork."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["logitcache.dump", "logitcache.report", "zarr", "h5py", "kill_resume"])
    return ctx


def run_api_child(ctx, kill: str | None, function: str, *args, **kw) -> int:
    """Exit code of ``logitcache.<function>(*args, **kw)`` run in a child (-9 when the hook killed it)."""
    p = ctx.Process(target=api_child, args=(kill, function, args, kw))
    p.start()
    p.join()
    return p.exitcode


def run_child(ctx, data, out, kill: str | None, kw: dict, timer: float | None = None) -> int:
    """Exit code of one child run: -9 when killed (by the hook or, with ``timer``, by us)."""
    p = ctx.Process(target=child, args=(str(data), str(out), kill, kw))
    p.start()
    if timer is not None:
        p.join(timer)
        if p.exitcode is None:
            os.kill(p.pid, signal.SIGKILL)
    p.join()
    return p.exitcode


# ---------------------------------------------------------------- comparisons
def arrays(path) -> dict[str, np.ndarray]:
    import logitcache

    with logitcache.open_cache(path) as c:
        return {name: c.store.read(name) for name in c.store.arrays()}


def differing(path, reference: dict[str, np.ndarray]) -> list[str]:
    """Arrays that are not bit-identical (same dtype, shape and bytes) to ``reference``."""
    got = arrays(path)
    names = sorted(set(got) | set(reference))
    return [n for n in names if n not in got or n not in reference or got[n].dtype != reference[n].dtype
            or got[n].shape != reference[n].shape or got[n].tobytes() != reference[n].tobytes()]


def done_chunks_wrong(path, reference: dict[str, np.ndarray]) -> list[str]:
    """(array, epoch, chunk) of every chunk marked done whose bytes differ from the reference's."""
    import logitcache
    from logitcache.cache import SAMPLE_ARRAYS

    if not Path(path).exists():
        return []
    bad = []
    with logitcache.open_cache(path) as c:
        R, done = c.chunk_rows, c.chunks_done()
        for name in c.store.arrays():
            if name.startswith("ids/") or name == "done":
                continue
            for epoch, chunk in np.argwhere(done):
                if name in SAMPLE_ARRAYS and epoch:
                    continue  # one row per sample, written with epoch 0's chunks
                rows = slice(chunk * R, (chunk + 1) * R)
                if c.layout.arrays.get(name) is not None and c.layout.arrays[name].per == "chunk":
                    rows = slice(int(chunk), int(chunk) + 1)  # one row per chunk (member statistics)
                key = (rows,) if name in SAMPLE_ARRAYS else (int(epoch), rows)
                if c.store.read(name, key).tobytes() != reference[name][key].tobytes():
                    bad.append(f"{name}[{epoch}, chunk {chunk}]")
    return bad


def writes_per_chunk(reference: dict[str, np.ndarray], epoch: int = 0) -> int:
    """Store writes the writer makes per chunk of ``epoch``: every per-position array (``content``
    in epoch 0 only), then the done marker."""
    from logitcache.cache import SAMPLE_ARRAYS

    return len([n for n in reference if not n.startswith("ids/") and not (epoch and n in SAMPLE_ARRAYS)])


# ---------------------------------------------------------------- stress
def _reference(data: Path, root: Path, suffix: str, epochs: int) -> dict[str, np.ndarray]:
    import logitcache

    out = root / f"reference{epochs}{suffix}"
    if not out.exists():
        logitcache.dump(data, TEACHERS, out, epochs=epochs, **DUMP_KW)
    return arrays(out)


def _chunks_left(out: Path, total: int) -> int:
    import logitcache

    if not out.exists():
        return total
    with logitcache.open_cache(out) as c:
        return total - int(c.chunks_done().sum())


def _random_kill(rng: random.Random, per_chunk: int, left: int, extending: bool) -> tuple[str | None, float | None]:
    """A kill point inside what the next run still has to do (so it is not wasted on a finished run)."""
    r = rng.random()
    if r < 0.35:
        return None, rng.uniform(0.05, 0.3 + 0.3 * left)  # timer: wherever the child is (~0.25 s a chunk)
    if r < 0.45:
        return ("resize:" + str(rng.randint(1, per_chunk))) if extending else "layout:1", None
    if r < 0.5:
        return "finish:1", None
    return f"write:{rng.randint(1, per_chunk * max(left, 1))}", None


def stress(args) -> int:
    import threading

    from tqdm import tqdm

    import logitcache  # noqa: F401  (imports before forking the server)

    tqdm.set_lock(threading.RLock())  # no multiprocessing semaphore for the resource tracker to miss

    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="kill_resume_"))
    from logitcache.synth import make_dataset

    data = make_dataset(root / "data", args.clips, sample_rate=16000, clip_seconds=1.0, seed=0)
    ctx = context()
    backends = [".zarr", ".h5"] if args.backend == "both" else [".zarr" if args.backend == "zarr" else ".h5"]
    refs = {(s, e): _reference(data, root, s, e) for s in backends for e in (2, 3)}
    per_chunk = writes_per_chunk(refs[(backends[0], 2)])
    chunks = -(-args.clips // DUMP_KW["chunk_rows"])
    kills = hook_kills = timer_kills = rounds = failures = 0
    started = time.time()
    while kills < args.kills:
        rounds += 1
        suffix = backends[rounds % len(backends)]
        out = root / f"round{rounds}{suffix}"
        extend = rounds % 2 == 0
        for epochs in ((2, 3) if extend else (2,)):
            for attempt in range(200):
                left = _chunks_left(out, epochs * chunks)
                kill, timer = _random_kill(rng, per_chunk, left, extending=epochs == 3)
                if args.timer_only:
                    kill, timer = None, rng.uniform(0.05, 0.3 + 0.3 * left)
                code = run_child(ctx, data, out, kill, {**DUMP_KW, "epochs": epochs}, timer)
                if code == 0:
                    break
                if code != -signal.SIGKILL:
                    print(f"round {rounds}: child exited {code} (not killed) after kill={kill} timer={timer}")
                    failures += 1
                    break
                kills += 1
                hook_kills += kill is not None
                timer_kills += kill is None
                bad = done_chunks_wrong(out, refs[(suffix, epochs)]) if out.exists() else []
                if bad:
                    print(f"round {rounds}: after kill={kill} timer={timer}: done chunks differ: {bad[:5]}")
                    failures += 1
            diff = differing(out, refs[(suffix, epochs)])
            if diff:
                print(f"round {rounds} ({suffix}, {epochs} epochs): final cache differs in {diff[:5]}")
                failures += 1
        shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
        print(f"round {rounds} ({suffix}{', extended' if extend else ''}): {kills} kills so far, "
              f"{failures} failure(s), {time.time() - started:.0f} s", flush=True)
    print(f"\n{kills} kills survived ({hook_kills} at hook points, {timer_kills} by timer) in {rounds} rounds, "
          f"backends {', '.join(backends)}: {failures} failure(s); every final cache bit-identical: {failures == 0}")
    shutil.rmtree(root, ignore_errors=True)
    return 1 if failures else 0


# ---------------------------------------------------------------- real disk full (tmpfs)
def disk_full(args) -> int:
    """Fill a real (tiny) filesystem mid-dump, grow it, resume; zarr and HDF5."""
    import logitcache
    from logitcache import LogitCacheError
    from logitcache.synth import make_dataset

    root = Path(tempfile.mkdtemp(prefix="disk_full_"))
    data = make_dataset(root / "data", args.clips, sample_rate=16000, clip_seconds=1.0, seed=0)
    mnt = root / "tiny"
    mnt.mkdir()
    failures = 0
    try:
        for suffix, size_kb, reserve in ((".zarr", 300, None), (".h5", 100, "40000")):
            ref = _reference(data, root, suffix, 2)
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mnt)], check=True)
            env = {"LOGITCACHE_MIN_FREE_BYTES": reserve} if reserve else {"LOGITCACHE_MIN_FREE_BYTES": "0"}
            os.environ.update(env)
            out = mnt / f"full{suffix}"
            try:
                logitcache.dump(data, TEACHERS, out, epochs=2, **DUMP_KW)
                print(f"{suffix}: the dump fit in {size_kb} KiB; nothing tested")
                failures += 1
            except LogitCacheError as e:
                print(f"{suffix}: {e}")
            subprocess.run(["mount", "-o", "remount,size=8m", str(mnt)], check=True)
            logitcache.dump(data, TEACHERS, out, epochs=2, resume=True, **DUMP_KW)
            diff = differing(out, ref)
            print(f"{suffix}: resumed after freeing space: bit-identical: {not diff} {diff[:5]}")
            failures += bool(diff)
            subprocess.run(["umount", str(mnt)], check=True)
            for k in env:
                os.environ.pop(k)
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failures else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=60, help="Stop after this many kills.")
    ap.add_argument("--backend", choices=["zarr", "hdf5", "both"], default="both")
    ap.add_argument("--clips", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timer-only", action="store_true", help="Only kill by timer (no hook points).")
    ap.add_argument("--disk-full", action="store_true", help="Real ENOSPC on a tmpfs (needs root).")
    args = ap.parse_args()
    return disk_full(args) if args.disk_full else stress(args)


if __name__ == "__main__":
    sys.exit(main())
