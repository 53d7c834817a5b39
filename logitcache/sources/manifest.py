"""``manifest``: a CSV or JSONL file listing sample files (audio or images) with their labels, for
data that lives elsewhere (``--data train.csv``).

* CSV: header ``path,labels``; labels ``;``-separated (as in labels.csv).
* JSONL: one object a line, ``{"path": "/data/a.jpg", "labels": ["cat"]}`` (labels a list, or a
  ``;``-separated string).

A path is the sample id, as written; a relative one is read relative to the manifest's folder.
Classes come from ``classes.txt`` beside the manifest when there is one (a label outside it is
refused), else the sorted names used. The modality follows the files' extensions (all images:
image; none: audio; a mix is refused).
"""

from __future__ import annotations

import csv
import json
from array import array
from pathlib import Path

import numpy as np
import torch

from logitcache.data import (DEFAULT_CLIP_SECONDS, DEFAULT_SAMPLE_RATE, PATH_LIMIT, _audio_error, _load_audio,
                             _read_text, _stat_regular)
from logitcache.errors import LogitCacheError, shorten
from logitcache.labels import LabelTable, _refuse_duplicates, _to_csr
from logitcache.sources import Source, modality_of, register_source
from logitcache.sources.image_folder import DEFAULT_IMAGE_SIZE, file_bytes, scan_images


@register_source
class ManifestSource(Source):
    kind = "manifest"

    def __init__(self, path: str | Path):
        self.root = Path(path)
        if not self.root.is_file():
            raise LogitCacheError(f"{self.root}: manifest file not found")
        if self.root.suffix.lower() not in (".csv", ".jsonl"):
            raise LogitCacheError(f"{self.root}: a manifest is a .csv or .jsonl file")
        self.table = _read_manifest(self.root)
        self.modality = modality_of(self.root, self.ids)
        self.sample_rate = DEFAULT_SAMPLE_RATE

    @property
    def labels_file(self) -> Path:
        return self.root

    def path_of(self, index: int) -> str:
        return str(self.root.parent / self.ids[index])  # an absolute id stays itself

    def load_with_crc(self, index: int) -> tuple[torch.Tensor, int]:
        if self.modality == "image":
            from logitcache.data import _load_image

            return _load_image(self.path_of(index), self.root.name)
        return _load_audio(self.path_of(index), self.sample_rate, self.root.name)

    def defaults(self) -> dict:
        if self.modality == "image":
            return {"size": [DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE]}
        return {"sample_rate": DEFAULT_SAMPLE_RATE, "clip_seconds": DEFAULT_CLIP_SECONDS}

    def configure(self, spec: dict) -> "ManifestSource":
        if self.modality == "audio":
            self.sample_rate = int(spec["sample_rate"])
        return self

    def _paths(self) -> list[str]:
        return [self.path_of(i) for i in range(len(self))]

    def scan(self) -> None:
        if self.modality == "image":
            scan_images(self._paths(), self.root.name)
            return
        import soundfile

        for path in self._paths():
            _stat_regular(path, self.root.name)
            try:
                if soundfile.info(path).frames == 0:
                    raise LogitCacheError(f"{shorten(path, PATH_LIMIT)}: zero-length audio")
            except (soundfile.LibsndfileError, RuntimeError, OSError) as e:
                raise _audio_error(path, e, self.root.name) from None

    def dataset_entry(self) -> dict:
        key = "image_bytes" if self.modality == "image" else "audio_bytes"
        return {key: file_bytes(self._paths()), "path": str(self.root.resolve())}

    def describe(self) -> dict:
        return {"kind": self.kind, "modality": self.modality, "format": self.root.suffix.lower().lstrip(".")}


def _read_manifest(path: Path) -> LabelTable:
    rows = _jsonl_rows(path) if path.suffix.lower() == ".jsonl" else _csv_rows(path)
    ids: list[str] = []
    names: dict[str, int] = {}
    flat, offsets = array("i"), array("q", [0])
    for line, sample, labels in rows:
        if not sample:
            raise LogitCacheError(f"{path}: line {line} has an empty path")
        ids.append(sample)
        for c in labels:
            c = c.strip()
            if c:
                flat.append(names.setdefault(c, len(names)))
        offsets.append(len(flat))
    if not ids:
        raise LogitCacheError(f"{path}: no rows")
    _refuse_duplicates(path, ids)
    classes_txt = path.parent / "classes.txt"
    if classes_txt.is_file():
        classes = [c.strip() for c in _read_text(classes_txt).splitlines() if c.strip()]
    else:
        classes = sorted(names)
    class_ids, offs = _to_csr(path, ids, names, classes, np.frombuffer(flat, dtype=np.int32),
                              np.frombuffer(offsets, dtype=np.int64))
    return LabelTable(ids, classes, offs, class_ids)


def _csv_rows(path: Path):
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None) or []
        missing = {"path", "labels"} - set(header)
        if missing:
            raise LogitCacheError(f"{path}: missing column(s) {', '.join(sorted(missing))} (header must be path,labels)")
        at_path, at_labels = header.index("path"), header.index("labels")
        for row in reader:
            if row:
                get = (lambda i: row[i].strip() if i < len(row) else "")
                yield reader.line_num, get(at_path), get(at_labels).split(";")


def _jsonl_rows(path: Path):
    for n, text in enumerate(_read_text(path).splitlines(), start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise LogitCacheError(f"{path}: line {n} is not valid JSON ({e.msg})") from None
        labels = row.get("labels") if isinstance(row, dict) else None
        labels = labels.split(";") if isinstance(labels, str) else labels
        if not (isinstance(row, dict) and isinstance(row.get("path"), str) and isinstance(labels, list)
                and all(isinstance(c, str) for c in labels)):
            raise LogitCacheError(f"{path}: line {n} must be an object like "
                                  f"{{\"path\": \"/data/a.jpg\", \"labels\": [\"cat\"]}}")
        yield n, row["path"].strip(), labels

