"""Run one function as every rank of a local torch.distributed (gloo) job, for the tests.

Ranks are forked from a forkserver that has already imported torch and logitcache (~0.1 s per
rank instead of ~3 s of imports); the env vars are the ones torchrun sets.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
for p in (TESTS, TESTS / "stress"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


def context():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["logitcache.dump", "logitcache.train", "zarr", "torch.distributed", "dist_ranks"])
    return ctx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(env: dict, fn: str, args: tuple, kwargs: dict, errors) -> None:
    import importlib
    import threading

    import numcodecs.blosc
    import torch
    from tqdm import tqdm

    # As in stress/kill_resume.py: thread locks instead of multiprocessing semaphores.
    tqdm.set_lock(threading.RLock())
    numcodecs.blosc._MUTEX, numcodecs.blosc._MUTEX_IS_INIT = threading.Lock(), True
    torch.set_num_threads(1)
    os.environ.update(env)
    os.environ.pop("LOGITCACHE_TEST_KILL", None)
    module, _, name = fn.rpartition(".")
    try:
        getattr(importlib.import_module(module), name)(*args, **kwargs)
    except BaseException as e:
        errors.put((int(env["RANK"]), f"{type(e).__name__}: {e}"))
        raise SystemExit(1)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(ctx, world: int, fn: str, *args, timeout: float = 120, env: dict | None = None,
              **kwargs) -> dict[int, str]:
    """Call ``fn`` (dotted path) in ``world`` rank processes, with ``env`` added to the torchrun-like
    variables (the forkserver's own environment is the one it started with); returns {rank: error}
    of failed ranks."""
    port = str(free_port())
    errors = ctx.Queue()
    procs = []
    extra = dict(env or {})
    for r in range(world):
        env = {**extra, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        p = ctx.Process(target=_rank, args=(env, fn, args, kwargs, errors))
        p.start()
        procs.append(p)
    for p in procs:
        p.join(timeout)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    out = {}
    while not errors.empty():
        r, msg = errors.get()
        out[r] = msg
    for r in hung:
        out[r] = "hung"
    for r, p in enumerate(procs):
        if p.exitcode not in (0, None) and r not in out:
            out[r] = f"exit {p.exitcode}"
    return out


def tiny_student(num_classes: int):
    """A student without batch statistics (the zoo's log-mel front-end has a BatchNorm, whose
    per-rank statistics legitimately differ from a big batch's): DDP must then equal, to float
    rounding, one process training on the union of the ranks' batches."""
    import torch
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(1, 8, 64, stride=32)
            self.head = nn.Linear(8, num_classes)

        def forward(self, wav):
            return self.head(torch.relu(self.conv(wav[:, None])).mean(-1))

    return Tiny()


def train_rank(cache: str, data: str, out: str, result: str, **kw) -> None:
    """One DDP rank of ``logitcache.train``; each rank writes what it returned to ``result``.<rank>."""
    import json

    from logitcache.train import train

    metrics = train(cache, data, out=out, distributed=True, record_steps=True, progress=False, **kw)
    Path(f"{result}.{os.environ['RANK']}").write_text(json.dumps(metrics))
