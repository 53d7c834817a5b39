"""Shared fixtures: a small synthetic dataset and a memoised ``dump`` so tests share caches.

Keep everything small (24 clips of 1 s, 2 epochs, toy teachers): the whole suite must stay fast
on two CPU cores.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))  # teachers are given as "toy_teachers:<factory>"

import logitcache  # noqa: E402
import toy_teachers  # noqa: E402

SR = 16000
CLIP_SECONDS = 1.0
CLIP = int(SR * CLIP_SECONDS)
N_CLIPS = 24
C = toy_teachers.NUM_CLASSES


# One intra-op thread: with tiny tensors on a busy 2-core box, OpenMP hand-offs cost 5-10 ms per op
# (10-30x the op itself). DataLoader workers use one thread each anyway.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # or dump/train would pick cores - workers threads themselves


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """24 synthetic clips (mixed sample rates, WAV/FLAC, a few shorter/longer than 1 s), 10 classes."""
    from logitcache.synth import make_dataset

    root = make_dataset(tmp_path_factory.mktemp("data") / "train", N_CLIPS, sample_rate=SR,
                        clip_seconds=CLIP_SECONDS, seed=0)
    assert len((root / "classes.txt").read_text().split()) == C
    return root


class Dumper:
    """``dumper(**kw)`` dumps ``dataset`` once per distinct config and returns the cache path."""

    def __init__(self, root: Path, data: Path):
        self.root, self.data, self.memo = root, data, {}

    def defaults(self) -> dict:
        return dict(epochs=2, topk=C, augment="strong", seed=0, batch_size=8, output_kind="multiclass",
                    aggregation="mean_prob", members=True, value_dtype="float32", backend=None,
                    sample_rate=SR, clip_seconds=CLIP_SECONDS, num_workers=0, progress=False)

    def __call__(self, teachers=("toy_teachers:toy_a", "toy_teachers:toy_b"), data: Path | None = None,
                 suffix: str = ".zarr", **kw) -> Path:
        data = Path(data or self.data)
        cfg = {**self.defaults(), **kw}
        key = (str(data), tuple(teachers), suffix, tuple(sorted(cfg.items())))
        if key not in self.memo:
            out = self.root / f"cache{len(self.memo)}{suffix}"
            self.memo[key] = Path(logitcache.dump(data, list(teachers), out, **cfg))
        return self.memo[key]


@pytest.fixture(scope="session")
def dumper(tmp_path_factory, dataset) -> Dumper:
    return Dumper(tmp_path_factory.mktemp("caches"), dataset)


@pytest.fixture(scope="session")
def strong_cache(dumper) -> Path:
    """'strong' augmentation (crop, shift, gain, mixup, noise, masks), k = C, float32, 2 epochs."""
    return dumper()


@pytest.fixture(scope="session")
def strong_views(strong_cache, dataset) -> dict[int, torch.Tensor]:
    """epoch -> ``[N, samples]`` views of ``strong_cache`` from ``logitcache.replay``, dataset order."""
    cache = logitcache.open_cache(strong_cache)
    return {e: replayed(cache, dataset, e) for e in range(cache.epochs)}


# ---------------------------------------------------------------- helpers used by several test files
def replayed(cache, data: Path, epoch: int, ids: list[str] | None = None) -> torch.Tensor:
    """``[N, samples]`` replayed views of ``ids`` (default: all, dataset order)."""
    ids = cache.ids if ids is None else ids
    return torch.stack([logitcache.replay(cache, data, epoch, i) for i in ids])


def stream_views(path: Path, data: Path, epoch: int) -> torch.Tensor:
    """``[N, samples]`` views of one epoch from ``CacheStream`` (checked equal to ``replay`` in
    test_replay), reordered to dataset order. Much faster than N ``replay`` calls."""
    from logitcache.views import CacheStream

    batches = list(CacheStream(path, data, epoch, batch_size=64))
    wave, order = torch.cat([b["wave"] for b in batches]), torch.cat([b["order"] for b in batches])
    out = torch.empty_like(wave)
    out[order] = wave
    return out


@functools.lru_cache(maxsize=None)
def _raw_clip_cached(path: str, start: int) -> torch.Tensor:
    import soundfile
    import torchaudio.functional as AF

    audio, sr = soundfile.read(path, dtype="float32", always_2d=True)
    wave = torch.from_numpy(np.ascontiguousarray(audio.mean(axis=1)))
    if sr != SR:
        wave = AF.resample(wave, sr, SR)
    wave = wave[start:start + CLIP]
    return torch.nn.functional.pad(wave, (0, CLIP - wave.shape[0]))


def raw_clip(path: Path, start: int = 0) -> torch.Tensor:
    """Decode, downmix, resample and crop/pad by hand (soundfile + torchaudio), independent of logitcache."""
    return _raw_clip_cached(str(path), int(start)).clone()


def teacher_logits(name: str, wave: torch.Tensor) -> np.ndarray:
    """A fresh toy teacher's float32 logits on ``wave`` (one row at a time: no batching effects)."""
    model = getattr(toy_teachers, name)().eval()
    with torch.inference_mode():
        return torch.cat([model(w[None]) for w in wave]).numpy()


def dense(values: np.ndarray, indices: np.ndarray, num_classes: int) -> np.ndarray:
    """Scatter top-k rows back into dense ``[..., C]`` rows (NaN where nothing is stored)."""
    out = np.full(values.shape[:-1] + (num_classes,), np.nan, dtype=np.float64)
    np.put_along_axis(out, indices.astype(np.int64), values.astype(np.float64), axis=-1)
    return out


def assert_one_line_error(excinfo, *needles: str) -> None:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, f"not a one-line message: {msg!r}"
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"


def labels_csv_ids(data: Path) -> list[str]:
    """The ids of a data folder's labels.csv, read without logitcache (an independent reference)."""
    return [line.split(",")[0] for line in (data / "labels.csv").read_text().splitlines()[1:]]


class Boom:
    """Unpickling this creates ``marker``: the proof that something unpickled (ran) it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (Path(self.marker),)


def flip_byte(path: Path, offset: int, mask: int = 0xFF) -> None:
    """XOR one byte of a file in place: the damage a checksum must catch."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ mask]))
