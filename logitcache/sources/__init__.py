"""Sources: what a dataset must offer the pipeline, and the ones shipped.

Dump, train, replay, fidelity and compare talk to a :class:`Source` only; none of them asks which
modality it carries. A source is opened from ``--data PATH`` (API ``data=``), detected from what
PATH holds or named with ``--source KIND`` (API ``source=``); see :func:`open_source`.

Adding one: a file in this package with a :class:`Source` subclass decorated with
``@register_source``, and its module name in ``_SHIPPED`` below.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from logitcache.errors import LogitCacheError, quote
from logitcache.labels import LabelTable

DEFAULT_KIND = "audio_folder"  # what a manifest without a ``source`` entry was dumped from
AUDIO_EXTS = frozenset({".wav", ".flac", ".ogg", ".oga", ".mp3", ".opus", ".aiff", ".aif", ".au", ".w64", ".caf"})
IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})


class Source(ABC):
    """A labelled dataset the pipeline reads samples from, by dataset index.

    The contract (every method below; the pipeline uses nothing else):

    * ``kind`` — the registered name (``audio_folder``, ``image_folder``, ``manifest``), recorded
      in a cache's manifest as ``source`` (:meth:`describe`) and checked on every later use.
    * ``modality`` — ``"audio"``, ``"image"`` or ``"tokens"``: which augmenter family its views need
      (:func:`logitcache.augment.make_spec`). Fixed per instance; one source never mixes them.
    * ``ids`` — sample ids in dataset order (list[str]); seeds and the cache follow them.
      ``fingerprint`` is the sha256 of that list (a cache's ``dataset.fingerprint``).
    * ``table`` — the sparse :class:`~logitcache.labels.LabelTable` (ids, classes, positives);
      ``label_rows(index)`` gives dense 0/1 rows of the indices asked for only.
    * ``load_with_crc(index)`` — the decoded sample and the zlib crc32 of its file's bytes, from one
      read: audio a 1-D float32 waveform at the rate :meth:`configure` set; image a float32
      ``[3, H0, W0]`` in [0, 1] (RGB). The crc is what a cache's ``content`` array holds.
    * ``scan()`` — check every sample's file cheaply (header only) before any teacher runs, raising
      the one-line error of the first bad one; ``dataset_entry()`` then gives the manifest's
      ``dataset`` statistics of the modality.
    * ``defaults()`` — the modality's augmentation settings from the data (audio ``sample_rate``,
      ``clip_seconds``; image ``size``), overridable by the dump.
    * ``configure(spec)`` — adapt decoding to a cache's augmentation spec (audio: its sample rate).
    * ``describe()`` — the manifest's ``source`` entry, ``{"kind": ..., ...}`` (no paths: the
      digest covers it; ``dataset.path`` records where the data was).

    ``root`` is where the data lives (a folder, or a manifest file); ``labels_file`` the file that
    lists the ids (named in errors); ``path_of(index)`` a sample's file.
    """

    kind: ClassVar[str] = ""
    modality: ClassVar[str] = ""
    root: Path
    table: LabelTable

    # -------------------------------------------------------------- ids and labels
    @property
    def ids(self) -> list[str]:
        return self.table.ids

    @property
    def classes(self) -> list[str]:
        return self.table.classes

    @property
    def index(self) -> dict[str, int]:
        """Sample id -> dataset index (made on first use)."""
        return self.table.index

    def __len__(self) -> int:
        return len(self.table)

    @property
    def fingerprint(self) -> str:
        from logitcache.data import fingerprint

        return fingerprint(self.ids)

    def label_rows(self, index) -> np.ndarray:
        """Dense float32 ``[len(index), C]`` 0/1 rows of the dataset indices ``index``."""
        return self.table.rows(index)

    @property
    def multi_label_rows(self) -> np.ndarray:
        """Dataset indices of the rows that carry two or more labels."""
        return self.table.multi_label_rows()

    # -------------------------------------------------------------- samples
    @property
    @abstractmethod
    def labels_file(self) -> Path: ...

    @abstractmethod
    def path_of(self, index: int) -> str: ...

    @abstractmethod
    def load_with_crc(self, index: int) -> tuple[torch.Tensor, int]: ...

    def load(self, index: int) -> torch.Tensor:
        return self.load_with_crc(index)[0]

    @abstractmethod
    def scan(self) -> None: ...

    @abstractmethod
    def dataset_entry(self) -> dict: ...

    @abstractmethod
    def defaults(self) -> dict: ...

    def configure(self, spec: dict) -> "Source":
        return self

    def describe(self) -> dict:
        return {"kind": self.kind}


# ------------------------------------------------------------------ registry
_REGISTRY: dict[str, type[Source]] = {}
_SHIPPED = ("audio_folder", "image_folder", "manifest", "tokens")  # modules of this package, one per source


def register_source(cls: type[Source]) -> type[Source]:
    """Class decorator: make ``cls`` available as ``--source cls.kind``."""
    if not cls.kind or cls.kind in _REGISTRY and _REGISTRY[cls.kind] is not cls:
        raise LogitCacheError(f"source kind {cls.kind!r} is empty or registered twice")
    _REGISTRY[cls.kind] = cls
    return cls


def _load_shipped() -> None:
    for name in _SHIPPED:
        importlib.import_module(f"logitcache.sources.{name}")


def source_kinds() -> list[str]:
    _load_shipped()
    return sorted(_REGISTRY)


def get_source(kind: str) -> type[Source]:
    """The source class registered as ``kind``."""
    _load_shipped()
    if kind not in _REGISTRY:
        raise LogitCacheError(f"--source {kind}: unknown source kind; choose one of {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[kind]


# ------------------------------------------------------------------ choosing one
def open_source(data, source: str | None = None) -> Source:
    """The source ``data`` names: an open :class:`Source` as is, else a path opened as ``source``
    (a registered kind) or, without one, detected: a ``.csv``/``.jsonl`` file is a ``manifest``; a
    folder with ``labels.csv`` is an ``image_folder`` when its ids are image files, else an
    ``audio_folder``; a folder of class sub-folders (and no labels.csv) is an ``image_folder``."""
    if isinstance(data, Source):
        if source is not None and data.kind != source:
            raise LogitCacheError(f"--source {source}: the data given is a {data.kind} source")
        return data
    path = Path(data)
    if source is not None:
        return get_source(source)(path)
    return get_source(detect_kind(path))(path)


def detect_kind(path: Path) -> str:
    if path.is_file():
        if path.suffix.lower() in (".csv", ".jsonl"):
            return "manifest"
        if path.suffix.lower() in (".bin", ".json"):
            return "tokens"
        raise LogitCacheError(f"{path}: --data is a file but not a .csv or .jsonl manifest nor a token "
                              f".bin/.json (or give a data folder)")
    if path.is_dir() and not (path / "labels.csv").is_file() and _has_subfolders(path):
        return "image_folder"
    if path.is_dir() and (path / "labels.csv").is_file():
        return modality_kind(path / "labels.csv", _first_ids(path / "labels.csv"), "image_folder", "audio_folder")
    return DEFAULT_KIND  # its own error names what is missing


def _has_subfolders(path: Path) -> bool:
    return any(p.is_dir() and not p.name.startswith(".") for p in path.iterdir())


def _first_ids(labels_csv: Path, limit: int = 4096) -> list[str]:
    """The filename column of the first rows: enough to tell images from audio without parsing
    a 2M-row table twice (the source parses it, and refuses a mix, in full)."""
    import csv
    import itertools

    with open(labels_csv, encoding="utf-8-sig", newline="", errors="replace") as f:
        rows = csv.reader(f)
        header = next(rows, None) or []
        if "filename" not in header:
            return []
        at = len(header) - 1 - header[::-1].index("filename")
        return [r[at].strip() for r in itertools.islice(rows, limit) if len(r) > at]


def modality_of(where, ids: list[str]) -> str:
    """``"image"`` when every id is an image file by its extension, ``"audio"`` when none is; a
    mix is refused (one source holds one modality)."""
    image = next((i for i in ids if Path(i).suffix.lower() in IMAGE_EXTS), None)
    if image is None:
        return "audio"
    other = next((i for i in ids if Path(i).suffix.lower() not in IMAGE_EXTS), None)
    if other is not None:
        raise LogitCacheError(f"{where}: mixes image and non-image files ({quote(image)} and {quote(other)}); "
                              f"one source holds one modality")
    return "image"


def modality_kind(where, ids: list[str], image_kind: str, audio_kind: str) -> str:
    return image_kind if modality_of(where, ids) == "image" else audio_kind


# ------------------------------------------------------------------ what a cache records
def stored_kind(manifest: dict) -> str:
    """The source kind a cache was dumped from (caches without the entry: the audio folder)."""
    entry = manifest.get("source")
    return entry.get("kind", DEFAULT_KIND) if isinstance(entry, dict) else DEFAULT_KIND


def check_kind(manifest: dict, source: Source, cache) -> None:
    """Refuse a source of another kind than the one the cache at ``cache`` was dumped from."""
    kind = stored_kind(manifest)
    if source.kind != kind:
        raise LogitCacheError(f"{source.root}: is a {source.kind} source but cache {cache} was dumped from a "
                              f"{kind} source (give its data, or --source {kind})")


def settings_for(source: Source, given: dict) -> dict:
    """The source's augmentation defaults with the options given (name -> value, None: not
    given); an option the modality has no use for is refused."""
    defaults = source.defaults()
    out = dict(defaults)
    for option, (key, value) in given.items():
        if value is None:
            continue
        if key not in defaults:
            raise LogitCacheError(f"{option}: applies to {_other(source.modality)} data, and {source.root} is "
                                  f"{source.modality} ({source.kind})")
        out[key] = value
    return out


def image_size(value, where) -> list[int]:
    """``[H, W]`` from an int (square), a pair of positive ints, or text ``"224"`` / ``"224x192"``."""
    if isinstance(value, str):
        parts = value.lower().split("x")
        value = [int(p) if p.strip().isdigit() else p for p in parts] if len(parts) == 2 else \
            (int(value) if value.strip().isdigit() else value)
    pair = [value, value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not (isinstance(pair, (list, tuple)) and len(pair) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair)):
        raise LogitCacheError(f"{where}: image size must be a positive whole number or [H, W] (got {value!r})")
    return [int(pair[0]), int(pair[1])]


def _other(modality: str) -> str:
    return {"audio": "image", "image": "audio"}.get(modality, "audio or image")

