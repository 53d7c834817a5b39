"""Helpers shared by the benchmarks (not part of the package; nothing here runs in the tests)."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

TEACHERS_1 = ("cnn_small",)
TEACHERS_3 = ("cnn_small", "crnn_small", "transformer_tiny")
STUDENT = "cnn_tiny"
SAMPLE_RATE = 16000


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.strip().splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc)
    p.add_argument("--quick", action="store_true", help="a fast, smaller run (smoke test; noisier figures)")
    p.add_argument("--workdir", default=None, help="where to write data and caches (default: a temp folder)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads in the main process (default: torch's)")
    return p


def workdir(arg: str | None) -> Path:
    """``--workdir`` (kept), else a temporary folder removed when the benchmark exits."""
    if arg:
        Path(arg).mkdir(parents=True, exist_ok=True)
        return Path(arg)
    import atexit
    import shutil

    path = Path(tempfile.mkdtemp(prefix="logitcache-bench-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU only"
    return (f"{os.cpu_count()} cores ({cpu}), {dev}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} intra-op thread(s); free cores now {free_cores(os.cpu_count() or 1)} "
            f"of {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (DataLoader workers, once joined)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def default_threads(workers: int) -> int:
    """Intra-op threads for the main process: the cores the workers leave free (at least 1). On a
    shared 2-core box, 2 OpenMP threads next to other jobs were 2-7x slower than 1 (barrier waits)."""
    return max(1, (os.cpu_count() or 1) - workers)


def _spin(n: int = 3_000_000) -> float:
    t0 = time.perf_counter()
    x = 0
    for i in range(n):
        x += i
    return time.perf_counter() - t0


def free_cores(n: int = 2) -> float:
    """Cores this benchmark can actually get now: n busy loops at once vs one alone (n = free
    cores when idle, less when other jobs share the machine)."""
    import multiprocessing as mp

    alone = min(_spin() for _ in range(2))
    ctx = mp.get_context("fork")
    with ctx.Pool(n) as pool:
        t0 = time.perf_counter()
        pool.map(_spin, [3_000_000] * n)
        together = time.perf_counter() - t0
    return round(n * alone / together, 2)


def median(xs) -> float:
    return float(statistics.median(xs))


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0


def table(header: list[str], rows: list[list]) -> str:
    """A markdown table (pasted into the README as is)."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    line = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells])


def make_data(root: Path, n: int, clip_seconds: float, num_classes: int = 527, seed: int = 0) -> Path:
    """A synthetic dataset of ``n`` clips (logitcache.synth, mixed rates and formats) with a class list
    padded to ``num_classes`` names, so teachers with an AudioSet-sized head (527) fit it."""
    from logitcache.synth import make_dataset

    root = Path(root)
    if (root / "labels.csv").is_file():
        return root
    make_dataset(root, n, sample_rate=SAMPLE_RATE, clip_seconds=clip_seconds, seed=seed)
    classes = (root / "classes.txt").read_text().split()
    classes += [f"class_{i:04d}" for i in range(len(classes), num_classes)]
    (root / "classes.txt").write_text("".join(c + "\n" for c in classes))
    return root


def export_teachers(folder: Path, names, num_classes: int, clip_seconds: float, frames: int | None = None) -> list[str]:
    """Zoo models with random (seeded) weights exported as .pt2 files: what ``dump`` loads."""
    from logitcache import models

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, name in enumerate(names):
        path = folder / f"{name}_C{num_classes}_{clip_seconds:g}s{'_T%d' % frames if frames else ''}.pt2"
        if not path.is_file():
            m = models.create_model(name, num_classes=num_classes, sample_rate=SAMPLE_RATE, frames=frames, seed=i)
            models.export_model(m, path, SAMPLE_RATE, int(round(clip_seconds * SAMPLE_RATE)))
        paths.append(str(path))
    return paths


# ---------------------------------------------------------------- synthetic cache rows
class SyntheticRows:
    """Cache rows that look like real ones, made without running teachers.

    A pool of ``pool`` target rows is drawn once: logits of C classes with a Zipf-like class prior
    (a few classes are in most top-k lists, as speech and music are on AudioSet) plus 1-3 strong
    events per row, through the real top-k + tail-statistic code. Augmentation parameters are
    drawn by the real Augmenter. Any number of rows is then made by taking pool rows in a fresh
    random order per chunk (no row repeats within a chunk of up to ``pool`` rows, so codecs see
    realistic data), with fresh seeds and a fresh epoch order. Row content does not affect
    timing; compressibility comes out close to the storage notes' figures for real top-k data.
    """

    def __init__(self, k: int, num_classes: int = 527, frames: int | None = None, augment: str = "ced",
                 clip_seconds: float = 10.0, pool: int = 1 << 16, value_dtype: str = "float16", seed: int = 0):
        from logitcache.augment import Augmenter, load_ops_spec
        from logitcache.targets import index_dtype, topk_targets

        self.k, self.C, self.frames, self.value_dtype = k, num_classes, frames, value_dtype
        self.index_dtype = index_dtype(num_classes)
        self.augmenter = Augmenter(load_ops_spec(augment), SAMPLE_RATE, clip_seconds)
        self.rng = np.random.default_rng(seed)
        g = torch.Generator().manual_seed(seed)
        T = frames or 1
        prior = -7.0 + 6.0 * torch.exp(-torch.arange(num_classes, dtype=torch.float32) / 30.0)
        prior = prior[torch.randperm(num_classes, generator=g)]
        rows = max(1, pool // T) if frames else pool
        vals, idxs, stats = [], [], []
        for a in range(0, rows, 8192):
            n = min(8192, rows - a)
            z = prior + 1.5 * torch.randn(n, T, num_classes, generator=g)
            events = torch.randint(0, num_classes, (n, 1, 3), generator=g)
            boost = (torch.rand(n, 1, 3, generator=g) * 6 + 4) * (torch.rand(n, 1, 3, generator=g) < 0.7)
            z.scatter_add_(-1, events.expand(n, T, 3), boost.expand(n, T, 3).contiguous())
            v, i, s = topk_targets(z, k, "multilabel")
            vals.append(v.clamp(-65504, 65504).numpy().astype(value_dtype))
            idxs.append(i.numpy().astype(self.index_dtype))
            stats.append(s.numpy().astype(np.float32))
        shape = (lambda x: x) if frames else (lambda x: x[:, 0])
        self.values, self.indices, self.stat = (shape(np.concatenate(x)) for x in (vals, idxs, stats))
        ctx = self.augmenter.context(num_samples=1 << 20, sample_index=0, source_samples=self.augmenter.clip_samples)
        drawn = [self.augmenter.draw(int(s), ctx) for s in self.rng.integers(0, 2**63, 2048)]
        self.params = {name: np.stack([d[name] for d in drawn]) for name in self.augmenter.param_specs}

    @property
    def param_specs(self) -> dict:
        return self.augmenter.param_specs

    def _take(self, n: int) -> np.ndarray:
        if n <= len(self.values):
            return self.rng.permutation(len(self.values))[:n]
        return self.rng.integers(0, len(self.values), n)

    def block(self, order: np.ndarray, start: int, stop: int, members: list[str] = ()) -> dict[str, np.ndarray]:
        n = stop - start
        take = self._take(n)
        ptake = self.rng.integers(0, 2048, n)
        seeds = self.rng.integers(0, 2**63, n, dtype=np.int64).view(np.uint64) * np.uint64(2) + np.uint64(1)
        block = {"order": order[start:stop], "seeds": seeds}
        block.update({f"params/{k}": v[ptake] for k, v in self.params.items()})
        block.update({"ensemble/values": self.values[take], "ensemble/indices": self.indices[take],
                      "ensemble/stat": self.stat[take]})
        for m in members:
            take = self._take(n)
            block.update({f"members/{m}/values": self.values[take], f"members/{m}/indices": self.indices[take],
                          f"members/{m}/stat": self.stat[take]})
        return block

    def raw_bytes_per_row(self) -> dict[str, int]:
        """Uncompressed bytes of one sample-epoch: the issue's payload and every stored array."""
        T = self.frames or 1
        target = T * self.k * (np.dtype(self.value_dtype).itemsize + np.dtype(self.index_dtype).itemsize)
        params = sum(np.dtype(d).itemsize * int(np.prod(s)) for d, s in self.param_specs.values())
        return {"payload": target + 8 + params, "stat": 4 * T, "order": 4}


def write_synthetic(path: Path, rows: SyntheticRows, n: int, epochs: int = 1, backend: str | None = None,
                    chunk_rows: int | None = None, codec: str | None = None, ids_prefix: str = "audio/clip_",
                    members: int = 0) -> float:
    """A cache of ``n`` samples x ``epochs`` written through the real CacheWriter (background thread,
    whole chunks) from synthetic rows; returns the seconds it took (layout, writes, finish)."""
    from logitcache.cache import CacheWriter, choose_chunk_rows
    from logitcache.storage import BACKENDS, backend_for_new

    cls = BACKENDS[backend] if backend else backend_for_new(path)
    old_codec = cls.codec
    if codec:
        cls.codec = codec
    try:
        T = rows.frames or 1
        row_bytes = T * rows.k * (np.dtype(rows.value_dtype).itemsize + np.dtype(rows.index_dtype).itemsize)
        R = int(chunk_rows or choose_chunk_rows(row_bytes, n))
        manifest = {
            "dataset": {"fingerprint": "synthetic", "num_samples": n, "audio_bytes": 0, "path": "synthetic"},
            "classes": [f"class_{i}" for i in range(rows.C)], "augment": rows.augmenter.spec,
            "teachers": [{"name": "synthetic", "source": "synthetic", "sha256": ""}],
            "members": [f"teacher{i}" for i in range(members)],
            "output_kind": "multilabel", "aggregation": "mean_prob", "weights": None, "topk": rows.k,
            "frames": rows.frames, "value_dtype": rows.value_dtype, "index_dtype": rows.index_dtype,
            "order_dtype": "uint32", "epochs": epochs, "seed": 0, "chunk_rows": R, "precision": "fp32",
            "device": "cpu", "synthetic": True,
        }
        ids = [f"{ids_prefix}{i:07d}.wav" for i in range(n)]
        t0 = time.perf_counter()
        writer = CacheWriter(path, manifest, ids, rows.param_specs, backend=cls.name)
        try:
            for e in range(epochs):
                order = rows.rng.permutation(n).astype(np.uint32)
                for c, a in enumerate(range(0, n, R)):
                    writer.put(e, c, rows.block(order, a, min(a + R, n), manifest["members"]))
            writer.finish(complete=True)
        except BaseException:
            writer.abort()
            raise
        writer.close()
        return time.perf_counter() - t0
    finally:
        cls.codec = old_codec


def disk_bytes(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def evict(path: Path) -> None:
    """Drop this path's files (only them) from the page cache, so the next read comes from disk."""
    path = Path(path)
    for f in ([path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
