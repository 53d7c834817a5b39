"""Sparse labels: the positive classes of each sample, never an ``N x C`` matrix.

A 2M-sample AudioSet table as dense float32 is 4.2 GB, built by every process that opens the data
folder (dump, train, each loader worker, compare). ``LabelTable`` holds it as CSR instead — row
``i``'s classes are ``class_ids[offsets[i]:offsets[i + 1]]``, sorted and unique — and hands out
dense rows only for the rows a caller asks for (one batch, one block of eval columns).
"""

from __future__ import annotations

import csv
from array import array
from functools import cached_property
from pathlib import Path

import numpy as np

from logitcache.errors import LogitCacheError, quote


class LabelTable:
    """Sample ids, class names and the positive classes of every sample (CSR, see the module doc)."""

    def __init__(self, ids: list[str], classes: list[str], offsets: np.ndarray, class_ids: np.ndarray):
        self.ids, self.classes = ids, classes
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.class_ids = np.asarray(class_ids, dtype=np.int32)

    @cached_property
    def index(self) -> dict[str, int]:
        """Sample id -> row. Made on first use (replay by id): at 2M rows it is ~150 MB that
        dump and train never need."""
        return {s: i for i, s in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def counts(self) -> np.ndarray:
        """Number of positive classes of each sample ``[N]``."""
        return np.diff(self.offsets)

    def rows(self, index) -> np.ndarray:
        """Dense float32 ``[len(index), C]`` 0/1 rows of the samples ``index``, in that order."""
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        out = np.zeros((len(index), self.num_classes), dtype=np.float32)
        starts = self.offsets[index]
        counts = self.offsets[index + 1] - starts
        total = int(counts.sum())
        if total:
            row = np.repeat(np.arange(len(index)), counts)
            # position of each wanted entry in class_ids: its row's start + its rank within the row
            skip = np.repeat(starts - (np.cumsum(counts) - counts), counts)
            out[row, self.class_ids[skip + np.arange(total)]] = 1.0
        return out

    def columns(self, lo: int, hi: int) -> np.ndarray:
        """Dense float32 ``[N, hi - lo]`` 0/1 columns of the classes ``lo:hi`` (metrics per class block)."""
        out = np.zeros((len(self), hi - lo), dtype=np.float32)
        sel = np.flatnonzero((self.class_ids >= lo) & (self.class_ids < hi))
        row = np.searchsorted(self.offsets, sel, side="right") - 1
        out[row, self.class_ids[sel] - lo] = 1.0
        return out

    def first_class(self) -> np.ndarray:
        """Lowest positive class of each sample, 0 for a sample without labels: ``argmax`` of the
        dense rows, which multiclass top-1 accuracy compares against."""
        counts = self.counts()
        first = np.zeros(len(self), dtype=np.int64)
        has = counts > 0
        first[has] = self.class_ids[self.offsets[:-1][has]]
        return first

    def multi_label_rows(self) -> np.ndarray:
        """Dataset indices of the rows that carry two or more labels."""
        return np.flatnonzero(self.counts() >= 2)

    @classmethod
    def from_csv(cls, path: str | Path, classes_txt: str | Path | None = None) -> LabelTable:
        """The table of a ``labels.csv`` (header ``filename,labels``; labels ``;``-separated), its
        classes from ``classes_txt`` or, without one, the sorted names used. Streamed: no per-row
        Python objects are kept beyond the id strings and their index."""
        from logitcache.data import _read_text  # data imports this module

        path = Path(path)
        try:
            ids, names, flat, offsets = _parse(path)
        except (LogitCacheError, UnicodeDecodeError):
            # A file that is not UTF-8 is refused as such, wherever the bad byte lies and whatever
            # row error the stream met first; the whole-file decode names its byte and line.
            _read_text(path)
            raise
        if classes_txt is not None:
            classes = [c.strip() for c in _read_text(Path(classes_txt)).splitlines() if c.strip()]
            if len(set(classes)) != len(classes):
                raise LogitCacheError(f"{classes_txt}: a class name is listed twice")
        else:
            classes = sorted(names)
        class_ids, offsets = _to_csr(path, ids, names, classes, flat, offsets)
        return cls(ids, classes, offsets, class_ids)


def _parse(path: Path) -> tuple[list[str], dict[str, int], np.ndarray, np.ndarray]:
    """(ids, class name -> provisional id by first use, provisional ids of every label as written,
    row offsets into them). Errors name the first bad row, in file order."""
    ids: list[str] = []
    names: dict[str, int] = {}
    flat, offsets = array("i"), array("q", [0])
    try:
        _read_rows(path, ids, names, flat, offsets)
    except LogitCacheError:
        _refuse_duplicates(path, ids)  # a duplicate before the bad row is the first error
        raise
    _refuse_duplicates(path, ids)
    if not ids:
        raise LogitCacheError(f"{path}: no rows")
    return ids, names, np.frombuffer(flat, dtype=np.int32), np.frombuffer(offsets, dtype=np.int64)


def _read_rows(path: Path, ids: list[str], names: dict[str, int], flat: array, offsets: array) -> None:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None) or []
            missing = {"filename", "labels"} - set(header)
            if missing:
                raise LogitCacheError(f"{path}: missing column(s) {', '.join(sorted(missing))} "
                                      f"(header must be filename,labels)")
            # a repeated column: the last one wins, as with csv.DictReader
            at_id, at_labels = (len(header) - 1 - header[::-1].index(n) for n in ("filename", "labels"))
            for row in reader:
                if not row:
                    continue
                sample_id = row[at_id].strip() if at_id < len(row) else ""
                _check_id(path, sample_id, reader.line_num)
                ids.append(sample_id)
                for c in (row[at_labels] if at_labels < len(row) else "").split(";"):
                    c = c.strip()
                    if c:
                        flat.append(names.setdefault(c, len(names)))
                offsets.append(len(flat))
        except csv.Error as e:  # e.g. a field over csv's limit (131072 characters): no id is that long
            raise LogitCacheError(f"{path}: line {reader.line_num}: {e}") from None


def _check_id(path: Path, sample_id: str, line: int) -> None:
    from logitcache.data import _leaves_folder

    if not sample_id:
        raise LogitCacheError(f"{path}: line {line} has an empty filename")
    if _leaves_folder(sample_id):
        raise LogitCacheError(f"{path}: id {quote(sample_id)} leaves the data folder")


def _refuse_duplicates(path: Path, ids: list[str]) -> None:
    """Refuses the first id (in file order) equal to an earlier one. Found through sorted string
    hashes (16 bytes a row) rather than a set or dict of 2M strings (~150 MB); equal hashes are
    compared as strings, so a collision is no duplicate."""
    if len(ids) < 2:
        return
    h = np.fromiter(map(hash, ids), dtype=np.int64, count=len(ids))
    order = np.argsort(h, kind="stable")  # equal hashes: rows ascending
    h = h[order]
    first = None
    for p in np.flatnonzero(h[1:] == h[:-1]) + 1:
        q = p - 1
        while q >= 0 and h[q] == h[p] and ids[order[q]] != ids[order[p]]:
            q -= 1
        if q >= 0 and h[q] == h[p] and (first is None or order[p] < first):
            first = int(order[p])
    if first is not None:
        raise LogitCacheError(f"{path}: duplicate id {quote(ids[first])}")


def _to_csr(path: Path, ids: list[str], names: dict[str, int], classes: list[str], flat: np.ndarray,
            offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Provisional ids -> class indices, each row's sorted and de-duplicated (a label written twice
    is one positive, as in a 0/1 row). The first unknown class in file order is refused."""
    class_index = {c: i for i, c in enumerate(classes)}
    remap = np.array([class_index.get(n, -1) for n in names], dtype=np.int32)
    final = remap[flat] if len(flat) else np.zeros(0, dtype=np.int32)
    unknown = np.flatnonzero(final < 0)
    if len(unknown):
        at = int(unknown[0])
        row = int(np.searchsorted(offsets, at, side="right")) - 1
        name = next(n for n, i in names.items() if i == flat[at])
        raise LogitCacheError(f"{path}: row {quote(ids[row])} has unknown class {quote(name)} "
                              f"(not in classes.txt)")
    C = max(len(classes), 1)
    key = np.repeat(np.arange(0, len(ids) * C, C, dtype=np.int64), np.diff(offsets))
    key += final
    del final
    key.sort()  # row-major already: this sorts each row's classes
    keep = np.ones(len(key), dtype=bool)
    keep[1:] = key[1:] != key[:-1]
    key = key[keep]
    del keep
    counts = np.bincount(key // C, minlength=len(ids))
    new_offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(counts, out=new_offsets[1:])
    return (key % C).astype(np.int32), new_offsets
