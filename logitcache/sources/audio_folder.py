"""``audio_folder``: ``labels.csv`` (+ optional ``classes.txt`` and ``dataset.json``) and audio files.

The sample id is the ``filename`` string of labels.csv. Audio of any format soundfile reads,
any sample rate (resampled with torchaudio) and any length (cropped/padded by the augmenter).
The folder format is documented in data/README.md.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import torch

from logitcache.data import (DEFAULT_CLIP_SECONDS, DEFAULT_SAMPLE_RATE, _header_rate, _load_audio, _read_info,
                             _real_dir)
from logitcache.errors import LogitCacheError
from logitcache.labels import LabelTable
from logitcache.sources import Source, register_source


def read_folder_table(root: Path) -> LabelTable:
    """The label table of a data folder: ``labels.csv`` with ``classes.txt`` if there is one."""
    if not root.is_dir():
        raise LogitCacheError(f"{root}: data folder not found")
    labels_csv = root / "labels.csv"
    if not labels_csv.is_file():
        raise LogitCacheError(f"{labels_csv}: missing (a data folder needs labels.csv with filename,labels)")
    classes_txt = root / "classes.txt"
    return LabelTable.from_csv(labels_csv, classes_txt if classes_txt.is_file() else None)


@register_source
class AudioFolder(Source):
    """A labelled audio dataset folder; rows are addressed by sample id or dataset index."""

    kind = "audio_folder"
    modality = "audio"

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._root = str(self.root)
        self.table = read_folder_table(self.root)
        self.info = _read_info(self.root / "dataset.json")
        self.sample_rate = self.default_sample_rate  # what load() decodes at; configure() sets a cache's
        self._rates: dict[int, int] | None = None

    @property
    def labels_file(self) -> Path:
        return self.root / "labels.csv"

    def path_of(self, index: int) -> str:
        # joined as text: a pathlib join costs more than the stat it leads to, per view
        return os.path.join(self._root, self.ids[index])

    @property
    def default_sample_rate(self) -> int:
        return int(self.info.get("sample_rate", DEFAULT_SAMPLE_RATE))

    @property
    def default_clip_seconds(self) -> float:
        return float(self.info.get("clip_seconds", DEFAULT_CLIP_SECONDS))

    def defaults(self) -> dict:
        return {"sample_rate": self.default_sample_rate, "clip_seconds": self.default_clip_seconds}

    def configure(self, spec: dict) -> "AudioFolder":
        self.sample_rate = int(spec["sample_rate"])
        return self

    def load(self, index: int, sample_rate: int | None = None) -> torch.Tensor:
        """Decoded mono float32 audio at ``sample_rate`` (default: the configured rate; full
        length: the augmenter fits it to the clip)."""
        return self.load_with_crc(index, sample_rate)[0]

    def load_with_crc(self, index: int, sample_rate: int | None = None) -> tuple[torch.Tensor, int]:
        """``load`` and the zlib crc32 of the file's bytes, from the same single read of the file."""
        rate = self.sample_rate if sample_rate is None else sample_rate
        return _load_audio(self.path_of(index), int(rate))

    def audio_bytes(self) -> int:
        return sum((self.root / i).stat().st_size for i in self.ids if (self.root / i).is_file())

    def source_sample_rates(self, threads: int = 8) -> dict[int, int]:
        """Sample rate -> number of files, from the headers only. Raises the error of the first bad
        file in labels.csv order (missing, not a regular file, resolving outside the folder,
        undecodable, zero-length), so a dump fails before any teacher time is spent rather than
        hours in."""
        from collections import Counter
        from concurrent.futures import ThreadPoolExecutor

        _real_dir.cache_clear()  # links may have changed since an earlier scan in this process
        scan = partial(_header_rate, self.root, os.path.realpath(self.root))
        ids, step = self.ids, 256  # a task per 256 files: one per file cost ~25 us each, as much as a header
        with ThreadPoolExecutor(threads) as pool:  # libsndfile releases the GIL: headers on slow disks overlap
            parts = pool.map(lambda a: Counter(map(scan, ids[a:a + step])), range(0, len(ids), step))
            return dict(sorted(sum(parts, Counter()).items()))

    def scan(self) -> None:
        self._rates = self.source_sample_rates()

    def dataset_entry(self) -> dict:
        rates = self._rates if self._rates is not None else self.source_sample_rates()
        return {"audio_bytes": self.audio_bytes(), "path": str(self.root.resolve()),
                # JSON keys are strings: stored as such so a resume compares equal values
                "source_sample_rates": {str(r): n for r, n in rates.items()},
                "resampled_files": sum(n for r, n in rates.items() if r != self.sample_rate)}
