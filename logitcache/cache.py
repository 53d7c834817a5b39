"""The cache format: layout, writer and reader.

Layout (E epochs, N samples, k top entries, optional frame axis T; "pos" = position in an
epoch's stored order, which is a seeded permutation written at dump time):

    ids/utf8, ids/offsets        sample ids (UTF-8 bytes + offsets), dataset order
    order        [E, N]          dataset index of the sample stored at each position
    seeds        [E, N]          uint64 seed each view's augmentation was drawn from
    params/<op>.<name> [E, N, …] the drawn augmentation parameters, physical units
    ensemble/values  [E, N, (T,) k]   top-k logits, sorted descending
    ensemble/indices [E, N, (T,) k]   their class indices (smallest dtype that holds C)
    ensemble/stat    [E, N, (T)]      tail statistic (see targets.py)
    members/<name>/{values,indices,stat}   each teacher's own top-k, same shapes
    done         [E, n_chunks]   1 once every array of that chunk is written

All arrays are chunked ``(1, chunk_rows, …)`` along positions; writers write whole chunks,
readers read whole chunks. The manifest is JSON only; nothing here unpickles or runs code.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import queue
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from logitcache import __version__
from logitcache.errors import LogitCacheError
from logitcache.storage import ArrayStore, backend_for_new, open_store

FORMAT_VERSION = 1
TARGET_FIELDS = ("values", "indices", "stat")


def choose_chunk_rows(row_bytes: int, num_samples: int, target_bytes: int = 2 << 20) -> int:
    """Rows per chunk: a power of two near ``target_bytes`` of the widest array, capped at N."""
    rows = 1 << max(int(np.log2(max(target_bytes // max(row_bytes, 1), 1))), 6)
    return int(max(1, min(rows, 1 << 16, num_samples)))


def config_digest(manifest: dict) -> str:
    """sha256 of everything that determines the cache's contents (not timings or paths)."""
    keys = ("dataset", "classes", "augment", "teachers", "output_kind", "aggregation", "weights",
            "topk", "frames", "value_dtype", "seed", "chunk_rows")
    doc = {k: manifest.get(k) for k in keys}
    doc["dataset"] = {k: v for k, v in (doc["dataset"] or {}).items() if k != "path"}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


@dataclass
class Targets:
    """Stored targets of some rows: numpy arrays with rows first."""

    values: np.ndarray
    indices: np.ndarray
    stat: np.ndarray


def _target_prefix(member: str | None) -> str:
    return "ensemble" if member is None else f"members/{member}"


# ---------------------------------------------------------------- writer
class CacheWriter:
    """Creates the layout and writes whole chunks from a background thread (bounded queue)."""

    def __init__(self, path: str | Path, manifest: dict, ids: list[str], param_specs: dict,
                 backend: str | None = None, queue_size: int = 4):
        cls = backend_for_new(path, backend)
        self.path = Path(path)
        if self.path.exists():
            raise LogitCacheError(f"{self.path}: already exists (remove it or choose another --out)")
        self.manifest = dict(manifest)
        self.manifest.update(format="logitcache", format_version=FORMAT_VERSION, tool_version=__version__,
                             backend=cls.name, complete=False,
                             created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        self.manifest["config_digest"] = config_digest(self.manifest)
        self.store: ArrayStore = cls(self.path, "w")
        self._create_layout(ids, param_specs)
        self.store.write_manifest(self.manifest)
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="logitcache-writer", daemon=True)
        self._thread.start()

    def _create_layout(self, ids: list[str], param_specs: dict) -> None:
        m, s = self.manifest, self.store
        E, N, R, k = m["epochs"], len(ids), m["chunk_rows"], m["topk"]
        frame = (m["frames"],) if m.get("frames") else ()
        utf8 = np.frombuffer("".join(ids).encode(), dtype=np.uint8)
        offsets = np.zeros(N + 1, np.int64)
        offsets[1:] = np.cumsum([len(i.encode()) for i in ids])
        s.create_array("ids/utf8", utf8.shape, "uint8", (max(min(len(utf8), 1 << 22), 1),))
        s.create_array("ids/offsets", offsets.shape, "int64", (min(N + 1, 1 << 20),))
        s.write("ids/utf8", (slice(None),), utf8)
        s.write("ids/offsets", (slice(None),), offsets)
        s.create_array("order", (E, N), m["order_dtype"], (1, R))
        s.create_array("seeds", (E, N), "uint64", (1, R), compress=False)  # random bits: incompressible
        for name, (dtype, shape) in param_specs.items():
            s.create_array(f"params/{name}", (E, N, *shape), dtype, (1, R, *shape))
        for prefix in ["ensemble"] + [f"members/{n}" for n in m["members"]]:
            s.create_array(f"{prefix}/values", (E, N, *frame, k), m["value_dtype"], (1, R, *frame, k))
            s.create_array(f"{prefix}/indices", (E, N, *frame, k), m["index_dtype"], (1, R, *frame, k))
            s.create_array(f"{prefix}/stat", (E, N, *frame), "float32", (1, R, *frame))
        n_chunks = -(-N // R)
        s.create_array("done", (E, n_chunks), "uint8", (1, 1), compress=False)

    def put(self, epoch: int, chunk: int, block: dict[str, np.ndarray]) -> None:
        """Queue one whole chunk: ``block`` maps array name -> rows of that chunk."""
        self._raise_if_failed()
        self._queue.put((epoch, chunk, block))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue  # drain so producers never block on a dead writer
            epoch, chunk, block = item
            try:
                start = chunk * self.manifest["chunk_rows"]
                for name, rows in block.items():
                    self.store.write(name, (epoch, slice(start, start + len(rows))), rows)
                # The marker goes last: a chunk counts as written only once all its arrays are.
                self.store.write("done", (epoch, slice(chunk, chunk + 1)), np.ones(1, np.uint8))
            except BaseException as e:  # surfaced to the producer on its next put/close
                self._error = e

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            e = self._error
            if isinstance(e, OSError):
                raise LogitCacheError(f"{self.path}: write failed ({e.strerror or e})") from e
            raise e

    def finish(self, **manifest_updates) -> None:
        """Wait for queued chunks, then record manifest updates (e.g. ``complete=True``)."""
        self._queue.put(None)
        self._thread.join()
        self._raise_if_failed()
        self.manifest.update(manifest_updates)
        self.store.write_manifest(self.manifest)

    def abort(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self.store.close()

    def close(self) -> None:
        self.store.close()


# ---------------------------------------------------------------- reader
class Cache:
    """A read-only view of a cache. Opening is O(1) in N: ids and orders load on first use."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.store = open_store(self.path, "r")
        self.manifest: dict = self.store.read_manifest()
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise LogitCacheError(
                f"{self.path}: cache format version {self.manifest.get('format_version')} is not supported "
                f"(this logitcache reads {FORMAT_VERSION})")
        self._ids: list[str] | None = None
        self._index: dict[str, int] | None = None
        self._orders: dict[int, np.ndarray] = {}
        self._positions: dict[int, np.ndarray] = {}
        self._param_names: list[str] | None = None

    # -- manifest shortcuts
    @property
    def epochs(self) -> int:
        return int(self.manifest["epochs"])

    @property
    def num_samples(self) -> int:
        return int(self.manifest["dataset"]["num_samples"])

    @property
    def topk(self) -> int:
        return int(self.manifest["topk"])

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def output_kind(self) -> str:
        return self.manifest["output_kind"]

    @property
    def frames(self) -> int | None:
        return self.manifest.get("frames")

    @property
    def chunk_rows(self) -> int:
        return int(self.manifest["chunk_rows"])

    @property
    def members(self) -> list[str]:
        return list(self.manifest["members"])

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    # -- ids and orders
    @property
    def ids(self) -> list[str]:
        """Sample ids in dataset order."""
        if self._ids is None:
            utf8 = self.store.read("ids/utf8").tobytes()
            off = self.store.read("ids/offsets")
            self._ids = [utf8[a:b].decode() for a, b in zip(off[:-1], off[1:])]
        return self._ids

    def dataset_index(self, ids: list[str]) -> np.ndarray:
        if self._index is None:
            self._index = {s: i for i, s in enumerate(self.ids)}
        try:
            return np.array([self._index[i] for i in ids], dtype=np.int64)
        except KeyError as e:
            raise LogitCacheError(f"{self.path}: sample id {e.args[0]!r} is not in this cache") from None

    def _check_epoch(self, epoch: int) -> int:
        if not 0 <= int(epoch) < self.epochs:
            raise LogitCacheError(f"{self.path}: epoch {epoch} is out of range (cache has epochs 0..{self.epochs - 1})")
        return int(epoch)

    def order(self, epoch: int) -> np.ndarray:
        """Dataset index of each stored position of ``epoch``."""
        epoch = self._check_epoch(epoch)
        if epoch not in self._orders:
            self._orders[epoch] = self.store.read("order", (epoch,)).astype(np.int64)
        return self._orders[epoch]

    def positions(self, epoch: int) -> np.ndarray:
        """Stored position of each dataset index (the inverse of ``order``)."""
        if epoch not in self._positions:
            order = self.order(epoch)
            pos = np.empty_like(order)
            pos[order] = np.arange(len(order))
            self._positions[epoch] = pos
        return self._positions[epoch]

    def param_names(self) -> list[str]:
        if self._param_names is None:  # listing a store walks its tree: do it once
            self._param_names = [n[len("params/"):] for n in self.store.arrays() if n.startswith("params/")]
        return self._param_names

    def _member_prefix(self, member: str | None) -> str:
        if member is not None and member not in self.members:
            known = ", ".join(self.members) or "none stored"
            raise LogitCacheError(f"{self.path}: unknown member {member!r} (members: {known})")
        return _target_prefix(member)

    # -- block reads (whole chunks, stored order): what training streams
    def read_block(self, epoch: int, start: int, stop: int, member: str | None = None,
                   params: bool = True, targets: bool = True) -> dict[str, np.ndarray]:
        """Rows ``start:stop`` of stored order, one store call per array: order, seeds, params/…, values…"""
        epoch = self._check_epoch(epoch)
        key = (epoch, slice(start, stop))
        block = {"order": self.store.read("order", key).astype(np.int64), "seeds": self.store.read("seeds", key)}
        if params:
            for name in self.param_names():
                block[f"params/{name}"] = self.store.read(f"params/{name}", key)
        if targets:
            prefix = self._member_prefix(member)
            for field in TARGET_FIELDS:
                block[field] = self.store.read(f"{prefix}/{field}", key)
        return block

    def chunks_done(self) -> np.ndarray:
        """[E, n_chunks] booleans: which chunks were completely written."""
        return self.store.read("done").astype(bool)

    # -- random access (inspection, fidelity): vectorised gathers over whole chunks
    def targets(self, epoch: int, ids: list[str] | None = None, member: str | None = None) -> Targets:
        """Targets of ``ids`` (rows in the given order; default all, in stored order)."""
        epoch = self._check_epoch(epoch)
        prefix = self._member_prefix(member)
        if ids is None:
            arrays = [self.store.read(f"{prefix}/{f}", (epoch,)) for f in TARGET_FIELDS]
            return Targets(*arrays)
        pos = self.positions(epoch)[self.dataset_index(list(ids))]
        return Targets(*self._gather(epoch, pos, [f"{prefix}/{f}" for f in TARGET_FIELDS]))

    def params(self, epoch: int, ids: list[str]) -> dict[str, np.ndarray]:
        """Stored augmentation parameters of ``ids`` in ``epoch``: name -> rows."""
        epoch = self._check_epoch(epoch)
        pos = self.positions(epoch)[self.dataset_index(list(ids))]
        names = self.param_names()
        return dict(zip(names, self._gather(epoch, pos, [f"params/{n}" for n in names])))

    def _gather(self, epoch: int, pos: np.ndarray, names: list[str]) -> list[np.ndarray]:
        R = self.chunk_rows
        chunk_ids = np.unique(pos // R)
        out = []
        for name in names:
            parts = [self.store.read(name, (epoch, slice(c * R, (c + 1) * R))) for c in chunk_ids]
            base = np.concatenate(parts)
            # Row of each requested position inside the concatenation of the chunks read.
            local = np.searchsorted(chunk_ids, pos // R) * R + pos % R
            out.append(base[local])
        return out

    def close(self) -> None:
        self.store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_cache(path: str | Path) -> Cache:
    """Open a cache for reading. The backend is detected from the cache itself."""
    return Cache(path)
