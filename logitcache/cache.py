"""The cache format: layout, writer and reader.

Layout (E epochs, N samples, k top entries, optional frame axis T; "pos" = position in an
epoch's stored order, which is a seeded permutation written at dump time):

    ids/utf8, ids/offsets        sample ids (UTF-8 bytes + offsets), dataset order
    order        [E, N]          dataset index of the sample stored at each position
    seeds        [E, N]          uint64 seed each view's augmentation was drawn from
    params/<op>.<name> [E, N, …] the drawn augmentation parameters, physical units
    ensemble/<field> [E, N, ...]      the ensemble's targets, one array per field of the
                                      manifest's codec (topk: values, indices, stat; see codecs/)
    members/<name>/<field>            each teacher's own targets, same shapes
    content      [N]             crc32 of the source file of the sample epoch 0 stores at each
                                 position (written with epoch 0's chunks; absent in older caches)
    done         [E, n_chunks]   1 once every array of that chunk is written

All per-view arrays are chunked ``(1, chunk_rows, …)`` along positions, ``content`` ``(chunk_rows,)``;
writers write whole chunks, readers read whole chunks. The manifest is JSON only; nothing here
unpickles or runs code. Which arrays exist, with which shapes and dtypes, is
:class:`logitcache.layout.Layout`'s to say; this module writes and reads them.
"""

from __future__ import annotations

import datetime
import errno
import json
import operator
import os
import queue
import re
import shutil
import signal
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from logitcache import __version__
from logitcache.errors import LogitCacheError, quote
from logitcache.augment import epoch_order, id_hashes, view_seeds
from logitcache.layout import (FORMAT_VERSION, PARAMS, READABLE_VERSIONS, SAMPLE_ARRAYS, Layout,  # noqa: F401
                               Manifest, class_names, codec_entries, config_digest)
from logitcache.lock import DumpLock
from logitcache.vocabulary import Vocabulary
from logitcache.storage import (ArrayStore, backend_for_new, cache_location, chunk_error, chunk_name, is_url,
                                location_exists, open_store)

Block = dict[str, np.ndarray]  # one chunk's rows: array name -> rows


def choose_chunk_rows(row_bytes: int, num_samples: int, target_bytes: int = 8 << 20) -> int:
    """Rows per chunk: the power of two at or below ``target_bytes`` of targets (values + indices,
    ``row_bytes`` per row), at least 64 and at most 2**17 rows, capped at N.

    Picked by benchmarks/bench_store.py (README, Performance): zarr's fixed cost per read call
    makes sequential reads 2-5x faster at 64Ki-128Ki-row chunks than at 8Ki-16Ki; HDF5 barely
    cares; random access is served from decoded chunks kept in memory (``Cache``), not by
    small chunks. Clip-level top-20 of 527 classes: 2**16 rows (5 MiB of targets).
    """
    rows = 1 << max(int(np.log2(max(target_bytes // max(row_bytes, 1), 1))), 6)
    return int(max(1, min(rows, 1 << 17, num_samples)))


# What a resumed dump must share with the cache it continues: everything in the digest, plus
# the layout and inference settings that change stored bytes without being "configuration".
RESUME_KEYS = ("dataset", "classes", "augment", "teachers", "members", "output_kind", "aggregation", "weights",
               "topk", "frames", "value_dtype", "index_dtype", "order_dtype", "seed", "chunk_rows", "precision",
               "codec", "codec_options", "positions", "vocabulary")


def _short(v) -> str:
    text = json.dumps(v)
    return text if len(text) <= 24 else "a different value"


def config_differences(stored: dict, new: dict) -> list[str]:
    """What differs between a cache's manifest and a new dump request, as short phrases."""
    out = []
    stored, new = _described(_with_codec(stored)), _described(_with_codec(new))
    for key in RESUME_KEYS:
        a, b = stored.get(key), new.get(key)
        if key == "dataset":
            a, b = ({k: v for k, v in (x or {}).items() if k != "path"} for x in (a, b))
            out += [f"dataset {k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif key == "teachers" and a != b:
            if len(a or []) != len(b or []):
                out.append(f"teachers ({len(a or [])} in the cache, {len(b or [])} now)")
            else:
                out += [f"teacher {i + 1} ({x.get('name')}: "
                        f"{next(k for k in ('source', 'sha256', *sorted(set(x) | set(y))) if x.get(k) != y.get(k))})"
                        for i, (x, y) in enumerate(zip(a, b)) if x != y]
        elif a != b:
            out.append(f"{key} ({_short(a)} in the cache, {_short(b)} now)")
    return out


def _with_codec(m: dict) -> dict:
    """A format-1 manifest (or request) with the codec it implies, so a resume compares codecs."""
    if "codec" in m or "value_dtype" not in m:
        return m
    return {**m, "codec": "topk", "codec_options": {"value_dtype": m["value_dtype"], "index_dtype": m.get("index_dtype")}}


def _described(m: dict) -> dict:
    """A token manifest that lists its id names, with its ``vocabulary`` entry instead (as
    :class:`~logitcache.layout.Manifest` migrates it), so an older token cache can be resumed."""
    if "vocabulary" in m or (m.get("augment") or {}).get("modality") != "tokens" or "classes" not in m:
        return m
    return {**{k: v for k, v in m.items() if k != "classes"}, "vocabulary": Manifest.from_json(m).vocabulary}


def existing_manifest(path: str | Path, check_lock: bool = True) -> dict | None:
    """The manifest of the cache at ``path``; None if nothing is there; an error if it is not a cache
    (or, with ``check_lock``, if another dump holds its lock: an HDF5 file being written cannot be read)."""
    path = cache_location(path)
    held = DumpLock(path).holder() if check_lock and not is_url(path) else None
    if held:
        raise LogitCacheError(held)
    if not location_exists(path):
        return None
    try:
        store = open_store(path, "r")
    except LogitCacheError as e:
        reason = str(e).removeprefix(f"{path}: ")
        detail = "" if reason.startswith("not a logitcache cache") else f" ({reason})"
        raise LogitCacheError(f"{path}: already exists and is not a logitcache cache{detail}; remove it or "
                              f"choose another --out") from None
    try:
        manifest = store.read_manifest()
        manifest["_chunks_done"] = int(store.read("done").astype(bool).sum())
    except Exception:  # a damaged marker array: the resume itself will say what is wrong
        manifest["_chunks_done"] = None
    finally:
        store.close()
    return manifest


def existing_cache_message(path: str | Path, manifest: dict, epochs: int) -> str:
    """Why a dump without ``resume`` refuses a cache that is already there, and what to do."""
    stored = int(manifest.get("epochs", 0))
    if not manifest.get("complete"):
        try:
            total = stored * -(-int(manifest["dataset"]["num_samples"]) // int(manifest["chunk_rows"]))
            written = f" ({manifest.get('_chunks_done')} of {total} chunks written)"
        except (KeyError, TypeError, ValueError):
            written = ""
        return f"{path}: an unfinished dump is there{written}; add --resume to continue it"
    if epochs > stored:
        return f"{path}: already holds a complete {stored}-epoch cache; add --resume to extend it to {epochs} epochs"
    return f"{path}: already exists (a complete cache; remove it or choose another --out)"


_KILL_COUNTS: dict[str, int] = {}


def _test_kill(point: str) -> None:
    """Test hook: ``LOGITCACHE_TEST_KILL=<point>:<n>`` SIGKILLs this process the n-th time it reaches
    ``point`` (layout, write, resize, finish), so the tests can die exactly where they mean to;
    ``<point>:<n>:TERM`` sends SIGTERM instead (what a scheduler sends first)."""
    spec = os.environ.get("LOGITCACHE_TEST_KILL")
    if not spec or spec.partition(":")[0] != point:
        return
    _, n, sig = (spec.split(":") + ["", ""])[:3]
    _KILL_COUNTS[point] = _KILL_COUNTS.get(point, 0) + 1
    if _KILL_COUNTS[point] == int(n or 1):
        os.kill(os.getpid(), getattr(signal, f"SIG{sig or 'KILL'}"))


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _write_failed(path: Path, e: BaseException) -> LogitCacheError:
    text = str(e)
    h5 = re.search(r"error message = '([^']*)'", text)  # h5py reports the OS error inside a RuntimeError
    if isinstance(e, OSError) and e.strerror:
        reason = e.strerror
    else:
        reason = h5.group(1) if h5 else _first_line(e)
    return LogitCacheError(f"{path}: write failed ({reason}); the chunks written so far are kept: "
                           f"fix that and re-run the dump with --resume")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _min_free_bytes() -> int:
    raw = os.environ.get("LOGITCACHE_MIN_FREE_BYTES", str(64 << 20))
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise LogitCacheError(f"LOGITCACHE_MIN_FREE_BYTES={raw!r}: must be a whole number of bytes, at least 0")
    return value


HDF5_MIN_RESERVE = 16 << 20


def reserve_bytes(backend: str, min_free: int, chunk_bytes: int) -> int:
    """Free space a chunk write must leave: ``min_free`` (LOGITCACHE_MIN_FREE_BYTES), and at least
    twice the chunk. HDF5 gets a floor of 16 MiB + 4 chunks whatever ``min_free`` says: a real
    ENOSPC in the middle of its metadata flush left a file HDF5 could not reopen (measured on a
    full tmpfs), so the written chunks would not be kept; zarr survives a real ENOSPC."""
    need = max(min_free, 2 * chunk_bytes)
    if backend == "hdf5":
        need = max(need, HDF5_MIN_RESERVE + 4 * chunk_bytes)
    return need


@dataclass
class Targets:
    """Stored targets of some rows: numpy arrays with rows first."""

    values: np.ndarray
    indices: np.ndarray
    stat: np.ndarray


def stored_content(store: ArrayStore, manifest: dict) -> tuple[np.ndarray, np.ndarray]:
    """``content`` turned into dataset order through epoch 0's ``order``: (crc32 [N], known [N]).
    Only rows of chunks marked done count (the rest were never written). Reads N x 8 bytes."""
    N, R = int(manifest["dataset"]["num_samples"]), int(manifest["chunk_rows"])
    crc, known = np.zeros(N, np.uint32), np.zeros(N, bool)
    try:
        rows = np.repeat(store.read("done", (0,)).astype(bool), R)[:N]
        if rows.any():
            order = stored_order(store, manifest, 0)[rows]
            crc[order], known[order] = store.read("content")[rows], True
    except Exception as e:  # damage: name it; verify says which chunk
        raise LogitCacheError(f"{store.path}: the content checksums cannot be read ({_first_line(e)}); "
                              f"'logitcache verify' says more") from None
    return crc, known


def read_ids(store: ArrayStore) -> list[str]:
    """Sample ids in dataset order (every chunk of the ids arrays must be in storage)."""
    for name in ("ids/utf8", "ids/offsets"):  # written whole at creation
        shape, chunks = store.geometry(name)
        for c in range(-(-shape[0] // chunks[0])):
            if store.chunk_stored(name, (c,)) is False:
                raise chunk_error(store.path, chunk_name(name, (c,), chunks))
    utf8 = store.read("ids/utf8").tobytes()
    off = store.read("ids/offsets").tolist()
    text = utf8.decode()
    if len(text) == len(utf8):  # ASCII: byte offsets are character offsets, slice the str
        return [text[a:b] for a, b in zip(off[:-1], off[1:])]
    return [utf8[a:b].decode() for a, b in zip(off[:-1], off[1:])]


def stored_order(store: ArrayStore, manifest: dict, epoch: int, hashes: np.ndarray | None = None) -> np.ndarray:
    """Dataset index of each stored position of ``epoch`` (int64): read, or derived from (seed,
    epoch, ids) where the manifest says ``order`` is derived (``hashes``: the ids' id_hashes)."""
    if "order" not in (manifest.get("derived_arrays") or []):
        return store.read("order", (epoch,)).astype(np.int64)
    if hashes is None:
        hashes = id_hashes(read_ids(store))
    return epoch_order(int(manifest["seed"]), epoch, hashes)


# ---------------------------------------------------------------- writer
class _NoLock:
    note = None

    def release(self) -> None:
        pass


class CacheWriter:
    """Creates a cache (or, with ``resume``, reopens one) and writes whole chunks from a background
    thread (bounded queue).

    Holds the dump lock (:mod:`logitcache.lock`) from construction to ``close``/``abort``. A new
    cache is built under ``<name>.creating`` and renamed into place once its layout and manifest
    exist, so a dump killed that early leaves no half-made cache at the real path. ``todo`` [E,
    n_chunks] marks the chunks still to write; ``notes`` are one-line remarks for the user.
    """

    markers: tuple[str, ...] = ("done",)  # set once a chunk's arrays are durable (members.py: per target set)

    def __init__(self, path: str | Path, manifest: dict, ids: list[str], param_specs: dict,
                 backend: str | None = None, queue_size: int = 4, resume: bool = False):
        cls = backend_for_new(path, backend)
        self._min_free = _min_free_bytes()  # before the lock: a bad setting must not leave it held
        self.path = cache_location(path)
        # Object stores have no file locks: there, one dump per cache at a time is up to the user.
        self.lock = _NoLock() if is_url(self.path) else DumpLock(self.path).acquire()
        self.notes: list[str] = [self.lock.note] if self.lock.note else []
        try:
            if location_exists(self.path):
                if not resume:
                    raise LogitCacheError(existing_cache_message(
                        self.path, existing_manifest(self.path, check_lock=False) or {}, manifest["epochs"]))
                self._reopen(manifest, backend)
            else:
                self._create(cls, manifest, ids, param_specs)
        except BaseException:
            self.lock.release()
            raise
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="logitcache-writer", daemon=True)
        self._thread.start()

    @classmethod
    def attach(cls, path: str | Path, queue_size: int = 4) -> "CacheWriter":
        """A writer for a non-zero rank of a distributed dump: opens the cache rank 0 created (or
        reopened) and writes chunks only. It takes no lock and never writes the manifest or
        resizes: rank 0 holds the lock for the whole job and owns all metadata (a zarr metadata
        document has one writer, or updates are lost)."""
        self = cls.__new__(cls)
        self.path = cache_location(path)
        self.lock = _NoLock()
        self.notes = []
        self.store = open_store(self.path, "r+")
        if self.store.name != "zarr":
            self.store.close()
            raise LogitCacheError(f"{self.path}: a {self.store.name} cache allows one writer; dump it with one rank, "
                                  f"or to a .zarr cache for several ranks")
        self.manifest = self.store.read_manifest()
        self.todo = ~self.store.read("done").astype(bool)
        self._queue = queue.Queue(maxsize=queue_size)
        self._error = None
        self._min_free = _min_free_bytes()
        self._thread = threading.Thread(target=self._run, name="logitcache-writer", daemon=True)
        self._thread.start()
        return self

    def _create(self, cls, manifest: dict, ids: list[str], param_specs: dict) -> None:
        self.manifest = json.loads(json.dumps(manifest))  # a deep copy: provenance gets written_at
        if "codec" not in self.manifest:  # a caller that predates codecs: today's default
            self.manifest.update(codec_entries("topk", manifest["value_dtype"], manifest["index_dtype"]))
        self.manifest.update(format="logitcache", format_version=FORMAT_VERSION, tool_version=__version__,
                             backend=cls.name, complete=False, created=_now())
        for provenance in (self.manifest.get("target_sets") or {}).values():
            provenance.setdefault("written_at", self.manifest["created"])
        self.manifest["config_digest"] = config_digest(self.manifest)
        if is_url(self.path):
            self._create_in_place(cls, ids, param_specs)
            return
        tmp = self.path.with_name(self.path.name + ".creating")
        _remove(tmp)  # left by a dump killed while creating; we hold the lock, so it is no one's
        try:
            self.store: ArrayStore = cls(tmp, "w")
            try:
                self._create_layout(ids, param_specs)
                self.store.write_manifest(self.manifest)
            finally:
                self.store.close()
            _test_kill("layout")
            os.rename(tmp, self.path)
        except (OSError, RuntimeError) as e:  # h5py raises RuntimeError for some I/O failures
            _remove(tmp)
            raise _write_failed(self.path, e) from e
        self.store = cls(self.path, "r+")
        self.todo = np.ones((self.manifest["epochs"], self._n_chunks()), bool)

    def _create_in_place(self, cls, ids: list[str], param_specs: dict) -> None:
        """On object storage, where a folder cannot be renamed: the layout first, the manifest
        last, so a dump killed in between leaves no cache that claims to be one."""
        try:
            self.store = cls(self.path, "w")
            self._create_layout(ids, param_specs)
            _test_kill("layout")
            self.store.write_manifest(self.manifest)
        except (OSError, RuntimeError) as e:
            raise _write_failed(self.path, e) from e
        self.todo = np.ones((self.manifest["epochs"], self._n_chunks()), bool)

    def _reopen(self, manifest: dict, backend: str | None) -> None:
        """Continue an unfinished cache, or grow a complete one to more epochs."""
        try:
            store = open_store(self.path, "r+")
        except LogitCacheError as e:
            hint = "--resume continues only a cache made by logitcache dump" if "not a logitcache" in str(e) \
                else "'logitcache verify' says more"
            raise LogitCacheError(f"{e}; {hint}") from None
        try:
            old = store.read_manifest()
            if old.get("format_version") not in READABLE_VERSIONS:
                raise LogitCacheError(f"{self.path}: cache format version {old.get('format_version')} cannot be "
                                      f"resumed by this logitcache (formats {', '.join(map(str, READABLE_VERSIONS))})")
            if old.get("adding"):  # members.add_teachers owns the cache until it finishes
                raise LogitCacheError(f"{self.path}: an --add-teacher of this cache is unfinished; re-run it to "
                                      f"finish it (or cancel it with 'logitcache members drop') before --resume")
            if backend and backend != old.get("backend"):
                raise LogitCacheError(f"{self.path}: cannot resume: the cache is {old.get('backend')}, "
                                      f"not --backend {backend}")
            diffs = config_differences(old, manifest)
            if diffs:
                raise LogitCacheError(f"{self.path}: cannot resume: this dump differs from the cache in "
                                      f"{'; '.join(diffs)} (use another --out for a different dump)")
            stored, epochs = int(old["epochs"]), int(manifest["epochs"])
            if epochs < stored:
                raise LogitCacheError(f"{self.path}: holds {stored} epochs but --epochs is {epochs}; resume with "
                                      f"--epochs {stored} (or more, to extend it)")
            try:
                done = store.read("done").astype(bool)
                shapes = {name: tuple(store.info(name)["shape"]) for name in store.arrays()}
            except Exception as e:
                raise LogitCacheError(f"{self.path}: cannot resume: the cache is damaged ({_first_line(e)}); "
                                      f"'logitcache verify' says more") from e
        except BaseException:
            store.close()
            raise
        self.store, self.manifest = store, dict(old)
        # ``done`` can be shorter than ``stored`` when a kill interrupted an extension's resizes.
        self.todo = np.ones((epochs, done.shape[1]), bool)
        self.todo[:done.shape[0]] = ~done[:epochs]
        if not self.todo.any() and old.get("complete"):
            self.notes.append(f"{self.path}: already complete with {stored} epoch(s); nothing to do")
            return
        if epochs > stored:
            self.notes.append(f"{self.path}: extending from {stored} to {epochs} epochs (stored epochs untouched)")
        else:
            self.notes.append(f"{self.path}: resuming, {int(done.sum())} of {done.size} chunks already written")
        self.manifest.update(epochs=epochs, complete=False, tool_version=__version__)
        self.manifest["resumes"] = self.manifest.get("resumes", []) + [
            {"at": _now(), "chunks_done": int(done.sum()), "epochs": epochs, "device": manifest.get("device")}]
        try:
            # The manifest first: a kill during the resizes below leaves it saying ``epochs``, and the
            # next resume finishes growing whatever arrays are still short.
            store.write_manifest(self.manifest)
            for name, shape in shapes.items():
                if not name.startswith("ids/") and name not in SAMPLE_ARRAYS and shape[0] < epochs:
                    store.resize(name, (epochs, *shape[1:]))
                    _test_kill("resize")
            store.flush()
            if store.name == "zarr" and not is_url(self.path):  # temp files of chunk writes that a kill cut short
                for leftover in self.path.rglob("*.partial"):
                    leftover.unlink()
        except (OSError, RuntimeError) as e:
            store.close()
            raise _write_failed(self.path, e) from e

    def _n_chunks(self) -> int:
        return -(-int(self.manifest["dataset"]["num_samples"]) // int(self.manifest["chunk_rows"]))

    def _create_layout(self, ids: list[str], param_specs: dict) -> None:
        s, N = self.store, len(ids)
        utf8 = np.frombuffer("".join(ids).encode(), dtype=np.uint8)
        offsets = np.zeros(N + 1, np.int64)
        offsets[1:] = np.cumsum([len(i.encode()) for i in ids])
        for x in Layout(self.manifest, param_specs).arrays.values():
            if x.name == "ids/utf8":
                s.create_array(x.name, utf8.shape, x.dtype, (max(min(len(utf8), 1 << 22), 1),))
            else:
                s.create_array(x.name, x.shape, x.dtype, x.chunks, compress=x.compress)
        s.write("ids/utf8", (slice(None),), utf8)
        s.write("ids/offsets", (slice(None),), offsets)

    _spec: Manifest | None = None  # the typed manifest, made on the first put

    def put(self, epoch: int, chunk: int, block: Block | Callable[[], Block]) -> None:
        """Queue one whole chunk: ``block`` maps array name -> rows of that chunk, or is a callable
        that returns that mapping (``pipeline.ChunkParts``), called on the writer thread so that the
        chunk's assembly costs the caller nothing."""
        self._raise_if_failed()
        if self._spec is None:
            self._spec = Manifest.from_json(self.manifest)
        self._queue.put((epoch, chunk, block if callable(block) else self._spec.stored_rows(block)))

    def _assembled(self, block: Block | Callable[[], Block]) -> Block:
        """A queued chunk's arrays. A bad row found here (a param off its grid) is the caller's error,
        raised as is on its next put, not a write failure."""
        if not callable(block):
            return block
        try:
            return self._spec.stored_rows(block())
        except LogitCacheError:
            self._input_error = True
            raise

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue  # drain so producers never block on a dead writer
            epoch, chunk, block = item
            try:
                block = self._assembled(block)
                self._check_space(block)
                start = chunk * self.manifest["chunk_rows"]
                for name, rows in block.items():
                    rows_of = slice(start, start + len(rows))
                    if name in self._per_chunk():  # one row per chunk (member statistics)
                        key = (epoch, slice(chunk, chunk + 1))
                    else:
                        key = (rows_of,) if name in SAMPLE_ARRAYS else (epoch, rows_of)
                    self.store.write(name, key, rows)
                    _test_kill("write")
                # The marker goes last, after a flush: a chunk counts as written only once all its
                # arrays are durable, and a resume rewrites every chunk whose marker is unset.
                self.store.flush()
                for marker in self.markers:
                    self.store.write(marker, (epoch, slice(chunk, chunk + 1)), np.ones(1, np.uint8))
                self.store.flush()
                _test_kill("write")
            except BaseException as e:  # surfaced to the producer on its next put/close
                self._error = e

    def _per_chunk(self) -> set[str]:
        """Names of the arrays written one row per chunk (``Layout.per_chunk``), from the manifest."""
        if getattr(self, "_chunk_rows_arrays", None) is None:
            self._chunk_rows_arrays = set(Layout(self.manifest, param_specs={}).per_chunk())
        return self._chunk_rows_arrays

    def _check_space(self, block: dict[str, np.ndarray]) -> None:
        """Stop cleanly before the disk is full. A zarr chunk write that fails leaves only a temp
        file, but HDF5 hit by ENOSPC in the middle of a metadata flush leaves a file it cannot
        reopen (measured on a full tmpfs), so both stop while there is still room."""
        if is_url(self.path):
            return  # object storage: no local disk to fill
        need = reserve_bytes(self.store.name, self._min_free, sum(v.nbytes for v in block.values()))
        st = os.statvfs(self.path.parent)
        free = st.f_bavail * st.f_frsize
        if free < need:
            floor = ", at least 16 MiB for HDF5" if self.store.name == "hdf5" else ""
            raise OSError(errno.ENOSPC, f"No space left on device: {free >> 10} KiB free, less than the "
                                        f"{need >> 10} KiB kept in reserve (LOGITCACHE_MIN_FREE_BYTES{floor})")

    _input_error = False  # set when the error is in the rows handed over, not in writing them

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            e = self._error
            if isinstance(e, Exception) and not self._input_error:  # OSError, or h5py's RuntimeError around one
                raise _write_failed(self.path, e) from e
            raise e

    def drain(self) -> None:
        """Wait until every queued chunk (and its done marker) is written."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise_if_failed()

    def finish(self, **manifest_updates) -> None:
        """Wait for queued chunks, then record manifest updates (e.g. ``complete=True``)."""
        self.drain()
        _test_kill("finish")
        self.manifest.update(manifest_updates)
        try:
            self.store.write_manifest(self.manifest)
        except (OSError, RuntimeError) as e:
            raise _write_failed(self.path, e) from e

    def abort(self) -> None:
        """Write what is queued (whole chunks only), close, and release the lock."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        try:
            self.store.close()
        except Exception:  # the error being handled is the one to report; a failed write can fail close too
            pass
        finally:
            self.lock.release()

    def close(self) -> None:
        try:
            self.store.close()
        finally:
            self.lock.release()


# ---------------------------------------------------------------- reader
# Manifest entries every reader relies on, and their JSON types: a manifest edited by hand or
# cut short fails here with the entry named, not deep inside a command with a KeyError.
REQUIRED_ENTRIES = (("epochs", int), ("dataset", dict), ("dataset.num_samples", int),
                    ("dataset.fingerprint", str), ("topk", int), ("chunk_rows", int),
                    ("output_kind", str), ("aggregation", str), ("members", list), ("value_dtype", str),
                    ("index_dtype", str), ("augment", dict))
_TYPE_WORDS = {int: "a whole number", dict: "a JSON object", list: "a list", str: "a string"}


def check_manifest(path, manifest: dict) -> None:
    """Refuse a manifest that lacks an entry readers need (or holds the wrong kind of value)."""
    for key, kind in REQUIRED_ENTRIES:
        value = manifest
        for part in key.split("."):
            if not isinstance(value, dict) or part not in value:
                raise LogitCacheError(f"{path}: manifest has no '{key}' entry (edited or damaged)")
            value = value[part]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise LogitCacheError(f"{path}: manifest entry '{key}' is {_short(value)}, not {_TYPE_WORDS[kind]} "
                                  f"(edited or damaged)")
    _check_classes(path, manifest)
    frames = manifest.get("frames")
    if frames is not None and (not isinstance(frames, int) or isinstance(frames, bool) or frames < 1):
        raise LogitCacheError(f"{path}: manifest entry 'frames' is {_short(frames)}, not a positive whole number "
                              f"(edited or damaged)")
    _check_positions(path, manifest.get("positions"), frames)
    for key in ("epochs", "topk", "chunk_rows"):
        if manifest[key] < (0 if key == "epochs" else 1):
            raise LogitCacheError(f"{path}: manifest entry '{key}' is {manifest[key]}, out of range "
                                  f"(edited or damaged)")


def _check_classes(path, manifest: dict) -> None:
    """A ``classes`` list, or (token caches) a ``vocabulary`` entry describing the classes."""
    if "vocabulary" in manifest:
        Vocabulary.from_entry(manifest["vocabulary"], f"{path}: manifest")
    elif not isinstance(manifest.get("classes"), list):
        what = "has no 'classes' entry" if "classes" not in manifest else \
            f"entry 'classes' is {_short(manifest['classes'])}, not a list"
        raise LogitCacheError(f"{path}: manifest {what} (edited or damaged)")


def _check_positions(path, positions, frames) -> None:
    if positions is None:
        return
    whole = isinstance(positions, list) and len(positions) >= 2 and all(
        isinstance(p, int) and not isinstance(p, bool) and p >= 1 for p in positions)
    if not whole or frames != int(np.prod(positions)):
        raise LogitCacheError(f"{path}: manifest entry 'positions' is {_short(positions)}, not a list of position "
                              f"counts whose product is frames={frames} (edited or damaged)")


class Cache:
    """A read-only view of a cache. Opening is O(1) in N: ids and orders load on first use.

    Random access (``targets``/``params`` of ids) reads whole chunks and keeps up to
    ``chunk_cache_bytes`` of decoded chunks (least recently used first out), so repeated random
    batches over a clip-level epoch (~100 B/row) are served from memory after one pass.

    Every read refuses a chunk that is absent from storage (it would read back as zeros) and
    names a chunk that fails its checksum. With ``check_digest`` (the default; inspect and
    verify open without it) a manifest whose contents no longer match its ``config_digest`` is
    refused: targets read under an edited ``output_kind`` or ``topk`` would be silently wrong.
    """

    def __init__(self, path: str | Path, chunk_cache_bytes: int = 256 << 20, check_digest: bool = True):
        self.path = cache_location(path)
        self.chunk_cache_bytes = int(chunk_cache_bytes)
        self._chunk_cache: OrderedDict[tuple[str, int, int], np.ndarray] = OrderedDict()
        self._chunk_cache_used = 0
        self.store = open_store(self.path, "r")
        try:
            self.manifest: dict = self._checked_manifest(check_digest)
        except BaseException:
            self.store.close()
            raise
        self._ids: list[str] | None = None
        self._index: dict[str, int] | None = None
        self._orders: dict[int, np.ndarray] = {}
        self._positions: dict[int, np.ndarray] = {}
        self._param_names: list[str] | None = None
        self._content: tuple[np.ndarray, np.ndarray] | None = None
        self._layout: Layout | None = None
        self._id_hashes: np.ndarray | None = None

    def _checked_manifest(self, check_digest: bool) -> dict:
        manifest = self.store.read_manifest()
        if manifest.get("format_version") not in READABLE_VERSIONS:
            raise LogitCacheError(
                f"{self.path}: cache format version {manifest.get('format_version')} is not supported "
                f"(this logitcache reads {', '.join(map(str, READABLE_VERSIONS))})")
        check_manifest(self.path, manifest)
        try:
            self.spec = Manifest.from_json(manifest)
        except LogitCacheError as e:
            raise LogitCacheError(f"{self.path}: {e}") from None
        if check_digest and manifest.get("config_digest") != config_digest(manifest):
            raise LogitCacheError(f"{self.path}: manifest does not match its config_digest (edited or damaged); "
                                  f"'logitcache verify' says more")
        return manifest

    # -- manifest shortcuts
    @property
    def layout(self) -> Layout:
        """Every array this cache's manifest implies (built on first use)."""
        if self._layout is None:
            try:
                self._layout = Layout(self.spec)
            except (LogitCacheError, KeyError, TypeError):
                # an augmentation spec this version cannot rebuild: targets stay readable (the
                # reader lists params/* from storage), and replay says what is wrong with it
                self._layout = Layout(self.spec, param_specs={})
        return self._layout

    @property
    def codec(self):
        """The target codec the manifest names (``topk`` for format 1)."""
        return self.layout.codec

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
        """The class names; a token cache's vocabulary (:class:`~logitcache.vocabulary.Vocabulary`,
        the id names, never materialised) when its manifest describes it instead of listing it."""
        return class_names(self.manifest)

    @property
    def output_kind(self) -> str:
        return self.manifest["output_kind"]

    @property
    def frames(self) -> int | None:
        return self.manifest.get("frames")

    @property
    def position_shape(self) -> tuple[int, ...] | None:
        """(H', W') when the targets' frames are the positions of dense-map teachers (stored
        row-major, ``frames = H' * W'``), else None. :meth:`by_position` views rows that way."""
        positions = self.manifest.get("positions")
        return tuple(positions) if positions else None

    def by_position(self, rows):
        """Rows with the frame axis second (``targets(...)`` fields ``[n, T, ...]``, a student's
        ``[n, T, C]``) viewed as ``[n, H', W', ...]``; a :class:`Targets` or a dict field by field.
        A cache without ``positions`` is refused (its frames are a time axis)."""
        if self.position_shape is None:
            raise LogitCacheError(f"{self.path}: targets have no position map (frames={self.frames}); "
                                  f"by_position applies to dense-map caches")
        if isinstance(rows, Targets):
            return Targets(*(self.by_position(a) for a in (rows.values, rows.indices, rows.stat)))
        if isinstance(rows, dict):
            return {k: self.by_position(v) for k, v in rows.items()}
        return rows.reshape(rows.shape[0], *self.position_shape, *rows.shape[2:])

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
            self._ids = read_ids(self.store)
        return self._ids

    def _hashes(self) -> np.ndarray:
        if self._id_hashes is None:
            self._id_hashes = id_hashes(self.ids)
        return self._id_hashes

    def dataset_index(self, ids: list[str]) -> np.ndarray:
        if self._index is None:
            self._index = {s: i for i, s in enumerate(self.ids)}
        try:
            if len(ids) == 1:
                return np.array([self._index[ids[0]]], dtype=np.int64)
            return np.array(operator.itemgetter(*ids)(self._index) if ids else [], dtype=np.int64)
        except KeyError as e:
            raise LogitCacheError(f"{self.path}: sample id {quote(e.args[0])} is not in this cache") from None

    def _check_epoch(self, epoch: int) -> int:
        if not 0 <= int(epoch) < self.epochs:
            raise LogitCacheError(f"{self.path}: epoch {epoch} is out of range (cache has epochs 0..{self.epochs - 1})")
        return int(epoch)

    def order(self, epoch: int) -> np.ndarray:
        """Dataset index of each stored position of ``epoch``."""
        epoch = self._check_epoch(epoch)
        if epoch not in self._orders:
            if "order" in self.spec.derived:
                self._orders[epoch] = stored_order(self.store, self.manifest, epoch, self._hashes())
            else:
                self._orders[epoch] = self._read("order", epoch).astype(np.int64)
        return self._orders[epoch]

    def seeds(self, epoch: int) -> np.ndarray:
        """uint64 seed each stored position's view was drawn from, in stored order."""
        epoch = self._check_epoch(epoch)
        if "seeds" in self.spec.derived:
            return view_seeds(int(self.manifest["seed"]), epoch, self._hashes())[self.order(epoch)]
        return self._read("seeds", epoch)

    def positions(self, epoch: int) -> np.ndarray:
        """Stored position of each dataset index (the inverse of ``order``)."""
        if epoch not in self._positions:
            order = self.order(epoch)
            pos = np.empty_like(order)
            pos[order] = np.arange(len(order))
            self._positions[epoch] = pos
        return self._positions[epoch]

    def content(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(crc32 of each sample's source file as dumped, dataset order; which are known: those
        of epoch-0 chunks marked done). None for a cache written before ``content`` existed."""
        if self._content is None and self.manifest.get("content"):
            self._content = stored_content(self.store, self.manifest)
        return self._content

    def param_names(self) -> list[str]:
        if self._param_names is None:  # listing a store walks its tree: do it once
            self._param_names = [n[len(PARAMS):] for n in self.store.arrays() if n.startswith(PARAMS)]
        return self._param_names

    def _member_prefix(self, member: str | None) -> str:
        if member is not None and member not in self.members:
            known = ", ".join(self.members) or "none stored"
            raise LogitCacheError(f"{self.path}: unknown member {member!r} (members: {known})")
        return Layout.target_set_of(member)

    # -- block reads (whole chunks, stored order): what training streams
    def read_block(self, epoch: int, start: int, stop: int, member: str | None = None,
                   params: bool = True, targets: bool = True, sort: bool = True) -> dict[str, np.ndarray]:
        """Rows ``start:stop`` of stored order, all arrays in one ``read_many`` (zarr overlaps them):
        order, seeds, params/…, and the targets decoded by the codec, under the names of its
        ``decoded_arrays`` (topk, compact: values, indices, stat; sampled: ids, counts, weights,
        entropy, head_ids, head_values). ``sort=False``: a row's targets in whatever order the
        codec decodes fastest (compact: id order), which the losses accept; not for top-1 reads."""
        epoch = self._check_epoch(epoch)
        derived = self.spec.derived
        keys = [n for n in ("order", "seeds") if n not in derived]
        keys += [Layout.param_path(n) for n in self.param_names()] if params else []
        names = list(keys)
        if targets:
            target_set = self._member_prefix(member)
            fields = self.layout.fields()
            keys += [f"target:{f}" for f in fields]
            names += [self.layout.target_path(target_set, f) for f in fields]
        self._require_chunks(names, epoch, start, stop)
        block = self.spec.decoded_params(dict(zip(keys, self.store.read_many(names, (epoch, slice(start, stop))))))
        if "order" in derived:
            block["order"] = self.order(epoch)[start:stop]
        if "seeds" in derived:
            block["seeds"] = view_seeds(int(self.manifest["seed"]), epoch, self._hashes()[block["order"]])
        block["order"] = block["order"].astype(np.int64)
        if targets:
            stored = {f: block.pop(f"target:{f}") for f in fields}
            block.update(self.codec.decoded_arrays(self.codec.decode(stored, sort=sort)))
        return block

    def chunks_done(self) -> np.ndarray:
        """[E, n_chunks] booleans: which chunks were completely written."""
        return self.store.read("done").astype(bool)

    def _require_chunks(self, names: list[str], epoch: int, start: int = 0, stop: int | None = None) -> None:
        """Refuse rows ``start:stop`` of ``epoch`` if any chunk holding them is absent from storage.

        The writer stores every chunk, even all-zero ones, so an absent chunk is one deleted or
        lost (or, in an unfinished cache, not written yet); read anyway, it would come back as
        zeros without an error. One existence probe per array and chunk (a stat on local disk,
        a cached listing on object storage): far below 1 % of reading the chunk.
        """
        R = self.chunk_rows
        stop = self.num_samples if stop is None else min(int(stop), self.num_samples)
        if stop <= start:
            return
        for name in names:
            for c in range(start // R, (stop - 1) // R + 1):
                if self.store.chunk_stored(name, (epoch, c)) is False:
                    raise self._absent(name, epoch, c)

    def _absent(self, name: str, epoch: int, chunk: int) -> LogitCacheError:
        if not self.complete:
            try:
                written = bool(self.store.read("done", (epoch, slice(chunk, chunk + 1)))[0])
            except LogitCacheError:
                written = True
            if not written:
                return LogitCacheError(f"{self.path}: chunk {chunk} of epoch {epoch} is not written yet (the dump "
                                       f"did not finish; its complete epochs can be read)")
        return chunk_error(self.path, chunk_name(name, (epoch, chunk), (1,)))

    def _read(self, name: str, epoch: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` (default all) of ``epoch`` of a per-view array, chunks checked first."""
        self._require_chunks([name], epoch, start, stop)
        if start == 0 and stop is None:
            return self.store.read(name, (epoch,))
        return self.store.read(name, (epoch, slice(start, stop)))

    # -- random access (inspection, fidelity): vectorised gathers over whole chunks
    def targets(self, epoch: int, ids: list[str] | None = None, member: str | None = None) -> Targets:
        """Targets of ``ids`` (rows in the given order; default all, in stored order).

        A :class:`Targets` (values, indices, stat) for codecs that decode to a top-k triple
        (topk, compact); for ``sampled`` the codec's decoded form, a dict of numpy arrays (ids,
        counts, weights, entropy, and head_ids, head_values with a head; see
        :mod:`logitcache.codecs.sampled`) that ``self.codec.loss`` and ``.dense`` take."""
        epoch = self._check_epoch(epoch)
        target_set = self._member_prefix(member)
        fields = self.layout.fields()
        names = [self.layout.target_path(target_set, f) for f in fields]
        if ids is None:
            arrays = [self._read(n, epoch) for n in names]
        else:
            pos = self.positions(epoch)[self.dataset_index(list(ids))]
            arrays = self._gather(epoch, pos, names)
        decoded = self.codec.decode(dict(zip(fields, arrays)))
        return Targets(*decoded) if self.codec.triple else decoded

    def params(self, epoch: int, ids: list[str]) -> dict[str, np.ndarray]:
        """Stored augmentation parameters of ``ids`` in ``epoch``: name -> rows."""
        epoch = self._check_epoch(epoch)
        pos = self.positions(epoch)[self.dataset_index(list(ids))]
        names = self.param_names()
        return self.spec.decoded_params(dict(zip(names, self._gather(epoch, pos, [Layout.param_path(n) for n in names]))))

    def _gather(self, epoch: int, pos: np.ndarray, names: list[str]) -> list[np.ndarray]:
        """Rows at stored positions ``pos`` of each array: the chunks they fall in are fetched
        (``_chunks``), then one vectorised take per chunk; no per-row Python."""
        R = self.chunk_rows
        pos = np.asarray(pos, dtype=np.int64).reshape(-1)
        grouped = None
        out = []
        for name in names:
            if not len(pos):
                out.append(self.store.read(name, (epoch, slice(0, 0))))
                continue
            whole = self._resident(name, epoch)
            if whole is not None:
                out.append(whole[pos])
                continue
            if grouped is None:  # positions grouped by chunk, once for all arrays
                chunk_of = pos // R
                sort = np.argsort(chunk_of, kind="stable")
                chunks, starts = np.unique(chunk_of[sort], return_index=True)
                bounds = np.append(starts, len(pos)).tolist()
                grouped = True
            blocks = self._chunks(name, epoch, chunks.tolist())
            res = np.empty((len(pos),) + blocks[0].shape[1:], blocks[0].dtype)
            for c, block, a, b in zip(chunks.tolist(), blocks, bounds[:-1], bounds[1:]):
                rows = sort[a:b]
                res[rows] = block[pos[rows] - c * R]
            out.append(res)
        return out

    def _row_nbytes(self, name: str) -> int | None:
        """Bytes per row of a target array, from the manifest alone (None for other arrays)."""
        return self.layout.row_nbytes(name)

    def _resident(self, name: str, epoch: int) -> np.ndarray | None:
        """A target array's whole epoch in memory, when it takes at most a third of the chunk
        cache (clip-level epochs: ~40 MB per 1M rows at k=20 fp16): read once, in one call,
        then every random batch is a single fancy index, like a memmap's."""
        row = self._row_nbytes(name)
        if row is None or not self.complete or row * self.num_samples * 3 > self.chunk_cache_bytes:
            return None
        key = (name, epoch, -1)
        whole = self._chunk_cache.get(key)
        if whole is None:
            whole = self._read(name, epoch)
            self._remember(key, whole)
        else:
            self._chunk_cache.move_to_end(key)
        return whole

    def _chunks(self, name: str, epoch: int, chunks: list[int]) -> list[np.ndarray]:
        """Decoded chunks ``chunks`` (sorted) of array ``name``: from the LRU, else read with one
        store call per run of neighbouring missing chunks (gaps of up to 2 chunks are read too:
        cheaper than another call) and remembered."""
        R, N, lru = self.chunk_rows, self.num_samples, self._chunk_cache
        found: dict[int, np.ndarray] = {}
        for c in chunks:
            block = lru.get((name, epoch, c))
            if block is not None:
                lru.move_to_end((name, epoch, c))
                found[c] = block
        missing = [c for c in chunks if c not in found]
        runs: list[list[int]] = []
        for c in missing:
            if runs and c - runs[-1][1] <= 2:
                runs[-1][1] = c + 1
            else:
                runs.append([c, c + 1])
        for a, b in runs:
            data = self._read(name, epoch, a * R, min(b * R, N))
            for c in range(a, b):
                block = data[(c - a) * R:(c - a + 1) * R]
                if b - a > 1:
                    block = block.copy()  # don't let one cached chunk pin the whole run's buffer
                found[c] = block
                self._remember((name, epoch, c), block)
        return [found[c] for c in chunks]

    def _remember(self, key: tuple[str, int, int], block: np.ndarray) -> None:
        if block.nbytes > self.chunk_cache_bytes or not self.complete:
            return  # an unfinished cache may still be written to: never serve a stale chunk
        lru = self._chunk_cache
        old = lru.pop(key, None)
        self._chunk_cache_used += block.nbytes - (old.nbytes if old is not None else 0)
        lru[key] = block
        while self._chunk_cache_used > self.chunk_cache_bytes:
            _, dropped = lru.popitem(last=False)
            self._chunk_cache_used -= dropped.nbytes

    def close(self) -> None:
        self._chunk_cache.clear()
        self._chunk_cache_used = 0
        self.store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_cache(path: str | Path, chunk_cache_bytes: int = 256 << 20, check_digest: bool = True) -> Cache:
    """Open a cache for reading. The backend is detected from the cache itself.

    ``chunk_cache_bytes`` bounds the decoded chunks kept for random access; ``check_digest``
    refuses a manifest that no longer matches its config_digest (see ``Cache``).
    """
    return Cache(path, chunk_cache_bytes=chunk_cache_bytes, check_digest=check_digest)
