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
    if arg:
        Path(arg).mkdir(parents=True, exist_ok=True)
        return Path(arg)
    return Path(tempfile.mkdtemp(prefix="logitcache-bench-"))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU only"
    return (f"{os.cpu_count()} cores ({cpu}), {dev}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} intra-op thread(s)")


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
