"""Storage backends, registered by name (as lhotse does) behind one small array-store interface.

A cache is a tree of named numeric arrays plus one JSON manifest. The backend of an existing
cache is read from the cache itself (zarr.json or the HDF5 signature), then confirmed against
the manifest's ``backend`` field, so a reader never guesses from a file name.

Every chunk carries a checksum: zarr's crc32c codec, HDF5's fletcher32 filter.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
from pathlib import Path

import numpy as np

from logitcache.errors import LogitCacheError

MANIFEST_KEY = "logitcache"
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def is_url(path) -> bool:
    """An fsspec URL (``s3://bucket/run.zarr``, ``gs://…``, ``memory://…``) rather than a local path."""
    return "://" in str(path)


def cache_location(path: str | Path) -> str | Path:
    """A local cache path as a Path; a URL as a string (``Path`` would fold ``s3://`` into ``s3:/``)."""
    return str(path).rstrip("/") if is_url(path) else Path(path)


def url_fs(url: str):
    """(fsspec filesystem, path inside it) for ``url``; credentials and endpoints come from the
    usual environment and config files of that filesystem (for S3: AWS_* variables, ~/.aws)."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise LogitCacheError(f"{url}: no filesystem for this URL ({_line(e)}; for s3:// install s3fs)") from None


# Raised by botocore (S3) and google-auth (GCS) when no credentials are found; matched by name so
# neither is imported unless an fsspec filesystem already did.
_NO_CREDENTIALS = ("NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError")


def credentials_message(url: str | None, e: BaseException) -> str | None:
    """A one-line "no credentials" message for ``e`` (or an exception it wraps), else None."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if any(c.__name__ in _NO_CREDENTIALS for c in type(e).__mro__):
            where = url or "object storage"
            if str(url or "").startswith(("s3://", "s3a://")) or "botocore" in type(e).__module__:
                how = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL for an "
                       "S3-compatible store), or AWS_PROFILE with ~/.aws/credentials")
            else:
                how = "set up that filesystem's credentials (see its fsspec documentation)"
            return f"{where}: no credentials to reach it ({_line(e)}); {how}"
        e = e.__cause__ or e.__context__
    return None


@contextlib.contextmanager
def credentials_checked(url):
    """Turn a missing-credentials error raised inside into a one-line :class:`LogitCacheError`."""
    try:
        yield
    except Exception as e:
        message = credentials_message(str(url), e)
        if message is None:
            raise
        raise LogitCacheError(message) from None


def location_exists(path: str | Path) -> bool:
    if not is_url(path):
        return Path(path).exists()
    fs, root = url_fs(str(path))
    fs.invalidate_cache()  # another fsspec instance (zarr's) may have written since we last listed
    with credentials_checked(path):
        return bool(fs.exists(root))


def stored_files(path: str | Path, prefix: str = "") -> dict[str, int]:
    """Bytes of every file (object) of a zarr cache under ``prefix``, by path relative to the cache."""
    if is_url(path):
        fs, root = url_fs(str(path))
        fs.invalidate_cache()
        base = f"{root}/{prefix}".rstrip("/")
        with credentials_checked(path):
            found = fs.find(base, detail=True) if fs.exists(base) else {}
        return {k[len(root) + 1:]: int(v.get("size") or 0) for k, v in found.items() if v.get("type") != "directory"}
    path = Path(path)
    base = path / prefix if prefix else path
    return {f.relative_to(path).as_posix(): f.stat().st_size for f in base.rglob("*") if f.is_file()}


def _line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]


def _as_manifest(path, raw) -> dict:
    """The manifest as a dict: absent is ``{}`` (not a cache); anything but a JSON object is damage."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise LogitCacheError(f"{path}: manifest is not a JSON object")
    return dict(raw)


def touched_chunks(key: tuple, shape: tuple[int, ...], chunks: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Chunk-grid coordinates a basic-indexing ``key`` (ints, step-1 slices, ``()`` for all) reads."""
    key = tuple(key) if isinstance(key, tuple) else (key,)
    key = tuple(k for k in key if k is not Ellipsis)
    ranges = []
    for dim, (size, chunk) in enumerate(zip(shape, chunks)):
        k = key[dim] if dim < len(key) else slice(None)
        if isinstance(k, slice):
            a, b, _ = k.indices(size)
            ranges.append(range(a // chunk, (b - 1) // chunk + 1) if b > a else range(0))
        else:
            i = int(k) % size if size else 0
            ranges.append(range(i // chunk, i // chunk + 1))
    return [tuple(c) for c in itertools.product(*ranges)]


def chunk_name(name: str, coords: tuple[int, ...], chunks: tuple[int, ...]) -> str:
    """How a user reads a chunk's place: per-view arrays (chunked one epoch at a time) by epoch."""
    if len(coords) >= 2 and chunks[0] == 1:
        return f"chunk {coords[1]} of array {name} (epoch {coords[0]})"
    return f"chunk {'.'.join(map(str, coords))} of array {name}"


def _reason(e: BaseException) -> str:
    text = _line(e)
    if "checksum" in text.lower() and "do not match" in text:  # zarr's crc32c: drop the raw bytes it prints
        return "crc32c checksum mismatch"
    return text


def chunk_error(path, where: str, reason: str | None = None) -> LogitCacheError:
    """The one-line error of an unreadable or missing chunk; ``reason`` stays on the error for verify."""
    what = "is missing" if reason is None else f"cannot be read ({reason})"
    err = LogitCacheError(f"{path}: {where} {what}; the cache is damaged ('logitcache verify' lists every problem)")
    err.reason = reason or "missing"
    return err


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

    def chunk_stored(self, name: str, coords: tuple[int, ...]) -> bool | None:
        """Whether the chunk at grid ``coords`` (trailing zeros implied) exists in storage; None:
        cannot tell. A chunk never written reads back as the fill value, without any error."""
        return None

    def _read_failed(self, name: str, key: tuple, error: BaseException, read_region) -> LogitCacheError:
        """Name the chunk behind a failed read: each chunk the read touched is read alone
        (``read_region(slices)``) until one fails; the others were fine."""
        shape, chunks = self.geometry(name)
        for coords in touched_chunks(key, shape, chunks):
            region = tuple(slice(c * s, min((c + 1) * s, n)) for c, s, n in zip(coords, chunks, shape))
            try:
                read_region(region)
            except Exception as e:
                return chunk_error(self.path, chunk_name(name, coords, chunks), _reason(e))
        return LogitCacheError(f"{self.path}: array {name} cannot be read ({_reason(error)}); the cache may be "
                               f"damaged ('logitcache verify' lists every problem)")

    def geometry(self, name: str) -> tuple[tuple[int, ...], tuple[int, ...]]: ...

    def info(self, name: str) -> dict: ...  # shape, dtype, chunks, stored_bytes
    def arrays(self) -> list[str]: ...
    def read_manifest(self) -> dict: ...
    def write_manifest(self, manifest: dict) -> None: ...
    def flush(self) -> None: ...  # make every write so far survive the death of this process
    def close(self) -> None: ...

    def delete(self, name: str) -> None:
        """Remove the array or group ``name`` and everything under it (nothing if absent)."""
        raise LogitCacheError(f"{self.path}: a {self.name} cache cannot remove arrays")

    def rename(self, src: str, dst: str) -> None:
        """Move the array or group ``src`` to ``dst`` (absent: the parent of ``dst`` must exist)."""
        raise LogitCacheError(f"{self.path}: a {self.name} cache cannot rename arrays")

    def has(self, name: str) -> bool:
        """Whether an array or group ``name`` exists."""
        return any(a == name or a.startswith(name + "/") for a in self.arrays())


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

        self.path = cache_location(path)
        self._zarr = zarr
        self.mode = mode
        zmode = {"w": "w-", "r": "r", "r+": "r+"}[mode]
        if is_url(self.path):
            from zarr.storage import FsspecStore

            url_fs(self.path)  # a one-line error when no fsspec filesystem serves the URL
            with credentials_checked(self.path):
                store = FsspecStore.from_url(self.path, read_only=mode == "r")
                self.group = zarr.open_group(store, mode=zmode)
        else:
            self.group = zarr.open_group(str(self.path), mode=zmode)
        self._arrays: dict = {}
        self._listing: dict[str, set[str]] = {}
        self._root = str(self.path)

    @staticmethod
    def detect(path) -> bool:
        if is_url(path):
            fs, root = url_fs(str(path))
            return bool(fs.exists(f"{root}/zarr.json"))
        return (path / "zarr.json").is_file()

    def file_sizes(self, prefix: str = "") -> dict[str, int]:
        return stored_files(self.path, prefix)

    def chunk_stored(self, name, coords):
        arr = self._array(name)
        coords = tuple(coords) + (0,) * (arr.ndim - len(coords))
        key = arr.metadata.encode_chunk_key(coords)
        if not is_url(self.path):
            return os.path.isfile(f"{self._root}/{name}/{key}")  # one stat (~10 us) per chunk of up to 128Ki rows
        # Object stores: one listing per array (not one request per chunk), listed again only
        # when a chunk seems absent, in case a writer added it since.
        listed = self._listing.get(name)
        if listed is None or key not in listed:
            fs, root = url_fs(self.path)
            fs.invalidate_cache(f"{root}/{name}")
            base = f"{root}/{name}/"
            listed = {p[len(base):] for p in fs.find(base)} if fs.exists(base) else set()
            self._listing[name] = listed
        return key in listed

    def geometry(self, name):
        arr = self._array(name)
        return tuple(arr.shape), tuple(arr.chunks)

    def _array(self, name: str):
        if name not in self._arrays:
            try:
                arr = self.group[name]
            except KeyError:
                raise LogitCacheError(f"{self.path}: array {name} is missing; the cache is damaged "
                                      f"('logitcache verify' lists every problem)") from None
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
        arr = self._array(name)
        try:
            return np.asarray(arr[key if key != () else ...])
        except Exception as e:  # crc32c mismatch, truncated chunk, codec error ...
            raise self._read_failed(name, key, e, lambda region: arr[region]) from None

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

        try:
            return [np.asarray(x) for x in sync(gather())]
        except Exception:  # one array failed: read them one by one, so the error names the chunk
            return [self.read(n, key) for n in names]

    def resize(self, name, shape):
        self._array(name).resize(tuple(shape))

    def info(self, name):
        arr = self._array(name)
        stored = sum(self.file_sizes(name).values())
        return {"shape": tuple(arr.shape), "dtype": str(arr.dtype), "chunks": tuple(arr.chunks), "stored_bytes": stored}

    def arrays(self):
        return sorted(name for name, obj in self.group.members(max_depth=None) if isinstance(obj, self._zarr.Array))

    def read_manifest(self):
        return _as_manifest(self.path, self.group.attrs.get(MANIFEST_KEY))

    def write_manifest(self, manifest):
        self.group.attrs[MANIFEST_KEY] = manifest

    def flush(self):
        pass  # every chunk and metadata write is already its own file, renamed into place

    def close(self):
        self._arrays.clear()

    def delete(self, name):
        if self.has(name):
            del self.group[name]
        self._forget(name)

    def rename(self, src, dst):
        if is_url(self.path):  # object stores copy and delete: not one step
            raise LogitCacheError(f"{self.path}: arrays of a cache on object storage cannot be renamed")
        target = Path(self._root) / dst
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(Path(self._root) / src, target)  # one directory rename: all of its chunks at once
        self._forget(src)

    def _forget(self, name: str) -> None:
        for key in [k for k in self._arrays if k == name or k.startswith(name + "/")]:
            del self._arrays[key]

    @staticmethod
    def remove(path) -> None:
        if is_url(path):
            fs, root = url_fs(str(path))
            fs.rm(root, recursive=True)
        else:
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
        self._datasets: dict = {}
        self._whole: set[str] = set()  # arrays known to have every chunk allocated

    @staticmethod
    def detect(path) -> bool:
        if is_url(path) or not path.is_file():
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

    def _dataset(self, name: str):
        # Kept open: looking a dataset up by name costs ~0.1 ms, more than a chunk-existence probe.
        if name not in self._datasets:
            try:
                self._datasets[name] = self.file[name]
            except KeyError:
                raise LogitCacheError(f"{self.path}: array {name} is missing; the cache is damaged "
                                      f"('logitcache verify' lists every problem)") from None
        return self._datasets[name]

    def read(self, name, key=()):
        d = self._dataset(name)
        try:
            return np.asarray(d[key if key != () else ...])
        except Exception as e:  # fletcher32 mismatch ("filter returned failure"), truncated file ...
            raise self._read_failed(name, key, e, lambda region: d[region]) from None

    def geometry(self, name):
        d = self._dataset(name)
        return tuple(d.shape), tuple(d.chunks or d.shape)

    def chunk_stored(self, name, coords):
        # HDF5 allocates a chunk in the file when it is first written; one never written (or
        # whose index entry was lost) reads back as the fill value.
        if name in self._whole:
            return True
        d = self._dataset(name)
        if d.chunks is None:
            return None
        coords = tuple(coords) + (0,) * (d.ndim - len(coords))
        offset = tuple(c * s for c, s in zip(coords, d.chunks))
        try:
            if self._all_chunks(name, d):
                return True
            return d.id.get_chunk_info_by_coord(offset).byte_offset is not None
        except (AttributeError, RuntimeError, ValueError):  # an HDF5 library without these calls
            return None

    def _all_chunks(self, name: str, d) -> bool:
        """Whether every chunk of the array is allocated: one count per array, remembered once true
        (a chunk lookup costs ~20 us, as much as 5-15 % of reading it from a warm file)."""
        if name not in self._whole:
            grid = int(np.prod([-(-n // c) for n, c in zip(d.shape, d.chunks)]))
            if d.id.get_num_chunks() != grid:
                return False
            self._whole.add(name)
        return True

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
            raw = json.loads(raw)
        except (TypeError, ValueError):
            raise LogitCacheError(f"{self.path}: manifest is not a JSON object") from None
        return _as_manifest(self.path, raw)

    def write_manifest(self, manifest):
        self.file.attrs[MANIFEST_KEY] = json.dumps(manifest)
        self.file.flush()

    def flush(self):
        # Chunks land in the file at once, but the index that finds them lives in HDF5's metadata
        # cache until a flush: a writer killed before it loses the chunks (measured).
        self.file.flush()

    def close(self):
        self._datasets.clear()
        self.file.close()

    def delete(self, name):
        # HDF5 does not give the space back: see ``rewrite_without``.
        if name in self.file:
            del self.file[name]
        self._forget(name)

    def rename(self, src, dst):
        parent = dst.rpartition("/")[0]
        if parent:
            self.file.require_group(parent)
        self.file.move(src, dst)
        self._forget(src)

    def has(self, name):
        return name in self.file

    def _forget(self, name: str) -> None:
        for key in [k for k in self._datasets if k == name or k.startswith(name + "/")]:
            del self._datasets[key]
        self._whole = {k for k in self._whole if not (k == name or k.startswith(name + "/"))}

    @staticmethod
    def rewrite_without(path: Path, names: list[str], manifest: dict) -> None:
        """Rewrite the file without the arrays and groups ``names`` and with ``manifest``, so their
        space goes back to the disk (HDF5 never shrinks a file in place). Chunks are copied as
        stored (H5Ocopy: no decompression, checksums kept); the copy replaces the file in one
        rename, so a kill at any point leaves either the old file or the new one."""
        import h5py

        path = Path(path)
        tmp = path.with_name(path.name + ".rewrite")
        if tmp.exists():
            tmp.unlink()  # left by a rewrite killed before its rename
        drop = set(names)
        try:
            with h5py.File(path, "r") as src, h5py.File(tmp, "w-") as dst:
                _copy_group(src, dst, "", drop)
                dst.attrs[MANIFEST_KEY] = json.dumps(manifest)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if tmp.exists():
                tmp.unlink()
            raise

    @staticmethod
    def remove(path: Path) -> None:
        os.remove(path)


def _copy_group(src, dst, prefix: str, drop: set[str]) -> None:
    """Copy every member of the HDF5 group ``src`` into ``dst`` except the names in ``drop``."""
    import h5py

    for key, obj in src.items():
        name = f"{prefix}{key}"
        if name in drop:
            continue
        if isinstance(obj, h5py.Group) and any(d.startswith(name + "/") for d in drop):
            _copy_group(obj, dst.require_group(key), name + "/", drop)
        else:
            src.copy(obj, dst, name=key)


def backend_for_new(path: str | Path, backend: str | None = None) -> type[ArrayStore]:
    """The backend for a new cache: ``backend`` if given, else by suffix, else zarr."""
    if backend and backend not in BACKENDS:
        raise LogitCacheError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    suffix = Path(str(path)).suffix.lower()
    cls = BACKENDS[backend] if backend else next((b for b in BACKENDS.values() if suffix in b.suffixes), ZarrStore)
    if is_url(path) and cls is not ZarrStore:
        raise LogitCacheError(f"{path}: object storage holds zarr caches only; use a .zarr URL")
    return cls


def open_store(path: str | Path, mode: str = "r") -> ArrayStore:
    """Open an existing cache, with the backend detected from the cache's own bytes."""
    path = cache_location(path)
    if not location_exists(path):
        raise LogitCacheError(f"{path}: cache not found")
    for cls in BACKENDS.values():
        if cls.detect(path):
            try:
                store = cls(path, mode)
            except LogitCacheError:
                raise
            except Exception as e:  # a damaged container: name it, don't dump a traceback
                raise LogitCacheError(f"{path}: cannot open as {cls.name} ({str(e).splitlines()[0]})") from None
            try:
                manifest = store.read_manifest()
            except LogitCacheError:
                store.close()
                raise
            if manifest.get("format") != "logitcache":
                store.close()
                raise LogitCacheError(f"{path}: a {cls.name} store but not a logitcache cache (no manifest)")
            if manifest.get("backend") != cls.name:
                store.close()
                raise LogitCacheError(f"{path}: manifest says backend {manifest.get('backend')!r} but the files are {cls.name}")
            return store
    raise LogitCacheError(f"{path}: not a logitcache cache (neither a zarr store nor an HDF5 file)")
