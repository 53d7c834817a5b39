"""``copy``: move a finished cache between local disk and object storage, then verify it.

"Dump on the GPU box, train elsewhere": ``logitcache copy run.zarr s3://bucket/run.zarr``. Files
(objects) are copied as they are, so the copy is byte-identical; it is then checked twice: the
same files with the same sizes on both sides, and ``verify`` on the copy (every chunk read back
through its checksum, every done marker, the manifest's digest).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path, PurePosixPath

from logitcache.cache import open_cache
from logitcache.errors import LogitCacheError
from logitcache.lock import DumpLock
from logitcache.storage import BACKENDS, cache_location, is_url, location_exists, stored_files, url_fs


def _files(path) -> dict[str, int]:
    """Relative path -> size of every file of a cache (one entry, "", for an HDF5 file)."""
    if not is_url(path) and Path(path).is_file():
        return {"": Path(path).stat().st_size}
    return stored_files(path)


def _check_destination(src, dst, backend: str) -> None:
    """Refuse a destination that overlaps the source (a copy into itself recurses and corrupts
    the source) or whose suffix names another backend (it would be opened as one)."""
    if is_url(src) == is_url(dst):  # URLs compare as written ("s3://b/x" -> "s3:/b/x" on both sides)
        a, b = ((PurePosixPath(str(src)), PurePosixPath(str(dst))) if is_url(src)
                else (Path(src).resolve(), Path(dst).resolve()))
        if a == b:
            raise LogitCacheError(f"{dst}: is the source itself; choose another destination")
        if a in b.parents:
            raise LogitCacheError(f"{dst}: is inside the source {src}; choose a destination outside it")
        if b in a.parents:
            raise LogitCacheError(f"{dst}: contains the source {src}; choose another destination")
    named = next((b for b in BACKENDS.values() if Path(str(dst)).suffix.lower() in b.suffixes), None)
    if named is not None and named.name != backend:
        ours = " or ".join(BACKENDS[backend].suffixes)
        raise LogitCacheError(f"{dst}: the name says {named.name}, but {src} is a {backend} cache; "
                              f"give the copy a {ours} name")


def copy_cache(src: str | Path, dst: str | Path, verify: bool = True, progress: bool = False) -> dict:
    """Copy the complete cache ``src`` to ``dst`` (which must not exist) and verify the copy.

    Either side may be an fsspec URL (zarr caches only there). Returns {src, dst, files, bytes,
    seconds, verified}. A copy that fails verification raises, naming the first problem.
    """
    from logitcache.report import verify_cache

    src, dst = cache_location(src), cache_location(dst)
    if not is_url(src):
        held = DumpLock(src).holder()
        if held:
            raise LogitCacheError(held)
    with open_cache(src) as c:  # also: "not found" / "not a cache", in one line
        backend, complete = c.store.name, c.complete
    if not complete:
        raise LogitCacheError(f"{src}: an unfinished dump; finish it (dump --resume) before copying")
    if backend != "zarr" and (is_url(src) or is_url(dst)):
        raise LogitCacheError(f"{src}: a {backend} cache; object storage holds zarr caches only")
    _check_destination(src, dst, backend)
    if location_exists(dst):
        raise LogitCacheError(f"{dst}: already exists; remove it or choose another destination")
    started = time.perf_counter()
    try:
        if not is_url(src) and not is_url(dst):
            Path(dst).parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if Path(src).is_dir() else shutil.copy2)(src, dst)
        elif is_url(dst) and not is_url(src):
            fs, root = url_fs(dst)
            for rel in _files(src):  # file by file: fsspec's recursive put nests folders differently by version
                fs.put_file(str(Path(src) / rel), f"{root}/{rel}")
        elif is_url(src) and not is_url(dst):
            fs, root = url_fs(src)
            for rel in _files(src):
                target = Path(dst) / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(f"{root}/{rel}", str(target))
        else:
            sfs, sroot = url_fs(src)
            dfs, droot = url_fs(dst)
            for rel in _files(src):
                with sfs.open(f"{sroot}/{rel}", "rb") as f:
                    dfs.pipe_file(f"{droot}/{rel}", f.read())
    except OSError as e:
        raise LogitCacheError(f"{dst}: copy failed ({e.strerror or e}); remove the partial copy and retry") from None
    seconds = time.perf_counter() - started
    want, got = _files(src), _files(dst)
    if want != got:
        wrong = sorted(set(want.items()) ^ set(got.items()))[0][0]
        raise LogitCacheError(f"{dst}: copy is incomplete ({len(got)} of {len(want)} files match; e.g. {wrong!r})")
    verified = False
    if verify:
        report = verify_cache(dst)
        if not report["ok"]:
            raise LogitCacheError(f"{dst}: copy does not verify ({report['problems'][0]})")
        verified = True
    return {"src": str(src), "dst": str(dst), "files": len(want), "bytes": sum(want.values()),
            "seconds": round(seconds, 3), "verified": verified}
