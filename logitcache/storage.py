"""Storage backends, registered by name (as lhotse does) behind one small array-store interface.

A cache is a tree of named numeric arrays plus one JSON manifest. The backend of an existing
cache is read from the cache itself (zarr.json or the HDF5 signature), then confirmed against
the manifest's ``backend`` field, so a reader never guesses from a file name.

Every chunk carries a checksum: zarr's crc32c codec, HDF5's fletcher32 filter.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from logitcache.errors import LogitCacheError

MANIFEST_KEY = "logitcache"
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


class ArrayStore:
    """Interface every backend implements. ``key`` is any numpy basic-indexing tuple."""

    name = ""
    suffixes: tuple[str, ...] = ()

    def create_array(self, name: str, shape: tuple[int, ...], dtype: str, chunks: tuple[int, ...],
                     compress: bool = True) -> None: ...
    def write(self, name: str, key: tuple, data: np.ndarray) -> None: ...
    def read(self, name: str, key: tuple = ()) -> np.ndarray: ...

    def read_many(self, names: list[str], key: tuple = ()) -> list[np.ndarray]:
        """The same ``key`` of several arrays (backends may overlap the reads)."""
        return [self.read(n, key) for n in names]

    def resize(self, name: str, shape: tuple[int, ...]) -> None: ...
    def info(self, name: str) -> dict: ...  # shape, dtype, chunks, stored_bytes
    def arrays(self) -> list[str]: ...
    def read_manifest(self) -> dict: ...
    def write_manifest(self, manifest: dict) -> None: ...
    def flush(self) -> None: ...  # make every write so far survive the death of this process
    def close(self) -> None: ...


BACKENDS: dict[str, type[ArrayStore]] = {}


def register_backend(cls: type[ArrayStore]) -> type[ArrayStore]:
    BACKENDS[cls.name] = cls
    return cls


@register_backend
class ZarrStore(ArrayStore):
    """Zarr v3 directory store; unsharded, whole-chunk writes (safe for disjoint writers)."""

    name = "zarr"
    suffixes = (".zarr",)

    def __init__(self, path: str | Path, mode: str = "r"):
        import zarr

        self.path = Path(path)
        self._zarr = zarr
        self.mode = mode
        self.group = zarr.open_group(str(self.path), mode={"w": "w-", "r": "r", "r+": "r+"}[mode])
        self._arrays: dict = {}

    @staticmethod
    def detect(path: Path) -> bool:
        return (path / "zarr.json").is_file()

    def _array(self, name: str):
        if name not in self._arrays:
            arr = self.group[name]
            if self.mode != "r":  # the setting is not stored with the array; reapply it on reopen
                arr = arr.with_config({"write_empty_chunks": True})
            self._arrays[name] = arr
        return self._arrays[name]

    # Compressor of compressible arrays: "blosc-lz4" (default, picked by benchmarks/bench_store.py),
    # "zstd" or "none". Readers need nothing: the codec is in each array's metadata.
    codec = "blosc-lz4"

    def create_array(self, name, shape, dtype, chunks, compress=True):
        from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

        named = {"blosc-lz4": lambda: [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")],
                 "zstd": lambda: [ZstdCodec(level=3)], "none": list}
        codecs = named[self.codec]() if compress else []
        self._arrays[name] = self.group.create_array(
            name, shape=tuple(shape), dtype=dtype, chunks=tuple(chunks),
            compressors=codecs + [Crc32cCodec()], fill_value=0,
            # Every chunk gets a file, even all-zero ones, so a missing file always means damage.
            config={"write_empty_chunks": True},
        )

    def write(self, name, key, data):
        self._array(name)[key] = data

    def read(self, name, key=()):
        return np.asarray(self._array(name)[key if key != () else ...])

    def read_many(self, names, key=()):
        # One trip through zarr's event loop for all arrays, not one per array: its per-call
        # overhead (~1-2 ms) dominated block reads, and the chunks then decode concurrently.
        try:
            import asyncio

            from zarr.core.sync import sync

            arrays = [self._array(n)._async_array for n in names]
        except (ImportError, AttributeError):  # a zarr without these internals: one call each
            return [self.read(n, key) for n in names]

        async def gather():
            return await asyncio.gather(*[a.getitem(key if key != () else ...) for a in arrays])

        return [np.asarray(x) for x in sync(gather())]

    def resize(self, name, shape):
        self._array(name).resize(tuple(shape))

    def info(self, name):
        arr = self._array(name)
        folder = self.path / name
        stored = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        return {"shape": tuple(arr.shape), "dtype": str(arr.dtype), "chunks": tuple(arr.chunks), "stored_bytes": stored}

    def arrays(self):
        return sorted(name for name, obj in self.group.members(max_depth=None) if isinstance(obj, self._zarr.Array))

    def read_manifest(self):
        return dict(self.group.attrs.get(MANIFEST_KEY) or {})

    def write_manifest(self, manifest):
        self.group.attrs[MANIFEST_KEY] = manifest

    def flush(self):
        pass  # every chunk and metadata write is already its own file, renamed into place

    def close(self):
        self._arrays.clear()

    @staticmethod
    def remove(path: Path) -> None:
        shutil.rmtree(path)


@register_backend
class Hdf5Store(ArrayStore):
    """One HDF5 file; fast small reads, one writer at a time (HDF5's own file lock)."""

    name = "hdf5"
    suffixes = (".h5", ".hdf5")

    def __init__(self, path: str | Path, mode: str = "r"):
        import h5py

        self.path = Path(path)
        self.mode = mode
        try:
            # A chunk cache that holds whole chunks: too small a cache made reads 250x slower.
            self.file = h5py.File(self.path, {"w": "w-", "r": "r", "r+": "r+"}[mode], rdcc_nbytes=64 << 20)
        except BlockingIOError:
            raise LogitCacheError(f"{self.path}: locked by another writer (HDF5 allows one)") from None

    @staticmethod
    def detect(path: Path) -> bool:
        if not path.is_file():
            return False
        with open(path, "rb") as f:
            return f.read(8) == _HDF5_SIGNATURE

    # "lzf" (default, picked by benchmarks/bench_store.py), "gzip" or "none": filters built into
    # h5py, so readers need no plugin.
    codec = "lzf"

    def create_array(self, name, shape, dtype, chunks, compress=True):
        # fletcher32 is the per-chunk checksum.
        compression = {"lzf": "lzf", "gzip": "gzip", "none": None}[self.codec] if compress else None
        self.file.create_dataset(
            name, shape=tuple(shape), dtype=dtype, chunks=tuple(chunks), fletcher32=True,
            shuffle=compression is not None, compression=compression, maxshape=(None,) + tuple(shape[1:]),
        )

    def write(self, name, key, data):
        self.file[name][key] = data

    def read(self, name, key=()):
        return np.asarray(self.file[name][key if key != () else ...])

    def resize(self, name, shape):
        self.file[name].resize(tuple(shape))

    def info(self, name):
        d = self.file[name]
        # A contiguous dataset (not one logitcache writes, but a file may hold one) is one chunk.
        return {"shape": tuple(d.shape), "dtype": str(d.dtype), "chunks": tuple(d.chunks or d.shape),
                "stored_bytes": int(d.id.get_storage_size())}

    def arrays(self):
        import h5py

        names: list[str] = []
        self.file.visititems(lambda n, obj: names.append(n) if isinstance(obj, h5py.Dataset) else None)
        return sorted(names)

    def read_manifest(self):
        raw = self.file.attrs.get(MANIFEST_KEY)
        if raw is None:
            return {}
        try:
            return json.loads(raw)
        except (TypeError, ValueError):
            raise LogitCacheError(f"{self.path}: manifest is not a JSON document") from None

    def write_manifest(self, manifest):
        self.file.attrs[MANIFEST_KEY] = json.dumps(manifest)
        self.file.flush()

    def flush(self):
        # Chunks land in the file at once, but the index that finds them lives in HDF5's metadata
        # cache until a flush: a writer killed before it loses the chunks (measured).
        self.file.flush()

    def close(self):
        self.file.close()

    @staticmethod
    def remove(path: Path) -> None:
        os.remove(path)


def backend_for_new(path: str | Path, backend: str | None = None) -> type[ArrayStore]:
    """The backend for a new cache: ``backend`` if given, else by suffix, else zarr."""
    if backend:
        if backend not in BACKENDS:
            raise LogitCacheError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
        return BACKENDS[backend]
    suffix = Path(str(path)).suffix.lower()
    return next((b for b in BACKENDS.values() if suffix in b.suffixes), ZarrStore)


def open_store(path: str | Path, mode: str = "r") -> ArrayStore:
    """Open an existing cache, with the backend detected from the cache's own bytes."""
    path = Path(path)
    if not path.exists():
        raise LogitCacheError(f"{path}: cache not found")
    for cls in BACKENDS.values():
        if cls.detect(path):
            try:
                store = cls(path, mode)
            except LogitCacheError:
                raise
            except Exception as e:  # a damaged container: name it, don't dump a traceback
                raise LogitCacheError(f"{path}: cannot open as {cls.name} ({str(e).splitlines()[0]})") from None
            manifest = store.read_manifest()
            if manifest.get("format") != "logitcache":
                store.close()
                raise LogitCacheError(f"{path}: a {cls.name} store but not a logitcache cache (no manifest)")
            if manifest.get("backend") != cls.name:
                store.close()
                raise LogitCacheError(f"{path}: manifest says backend {manifest.get('backend')!r} but the files are {cls.name}")
            return store
    raise LogitCacheError(f"{path}: not a logitcache cache (neither a zarr store nor an HDF5 file)")
