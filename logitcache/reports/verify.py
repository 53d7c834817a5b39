"""``verify_cache``: read every chunk of a cache and check it against its manifest."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from logitcache.cache import Cache, config_digest, open_cache
from logitcache.data import fingerprint
from logitcache.errors import LogitCacheError
from logitcache.layout import (LAYOUT_ARRAYS, MARKER_ARRAYS, MEMBER_STATS, SAMPLE_ARRAYS, Layout, Manifest,
                               num_classes, unlisted)


MAX_PROBLEMS = 100  # a wholly damaged cache would otherwise list one problem per chunk


class _Problems(list):
    """A capped problem list that still counts what it dropped."""

    dropped = 0

    def add(self, msg: str) -> None:
        if len(self) < MAX_PROBLEMS:
            self.append(msg)
        else:
            self.dropped += 1


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def _read_reason(e: BaseException) -> str:
    """Why a chunk read failed: the store's own reason when it named the chunk (storage.chunk_error)."""
    return getattr(e, "reason", None) or _first_line(e)


def _expected_arrays(m: dict, problems: _Problems) -> Layout | None:
    """The layout the manifest implies (None, with the problem listed, if it cannot be built)."""
    try:
        spec = Manifest.from_json(m)
    except (LogitCacheError, KeyError, TypeError, ValueError) as e:
        problems.add(f"manifest: the layout cannot be rebuilt ({_first_line(e)})")
        return None
    try:
        return Layout(spec)
    except (LogitCacheError, KeyError, TypeError) as e:
        problems.add(f"manifest: augmentation spec cannot be rebuilt ({_first_line(e)})")
        return Layout(spec, param_specs={})


def _missing_chunks(cache: Cache, name: str) -> list[tuple[int, ...]]:
    """Chunks of a whole-written array (see ``LAYOUT_ARRAYS``) that are absent from storage."""
    shape, chunks = cache.store.geometry(name)
    grid = [range(-(-n // c)) for n, c in zip(shape, chunks)]
    return [xs for xs in itertools.product(*grid) if cache.store.chunk_stored(name, xs) is False]


def _check_rows(name: str, rows: np.ndarray, num_samples: int) -> list[str]:
    """Content checks of one chunk of a non-target array; returns what is wrong (empty when fine).
    Target arrays are their codec's to check."""
    bad = []
    if name.startswith("params/") and rows.dtype.kind == "f":  # +inf is a legal "off" (noise SNR)
        if np.isnan(rows).any():
            bad.append(f"{int(np.isnan(rows).sum())} NaN parameter(s)")
    elif name.endswith(".partner") and rows.size and (rows.min() < -1 or rows.max() >= num_samples):
        bad.append(f"mixup partner index out of range [-1, {num_samples})")  # -1 means no mix
    elif name.endswith("/" + MEMBER_STATS) and not (np.isfinite(rows).all() and (rows[..., 1:] >= 0).all()):
        bad.append("logit sums not finite, or a sum of squares below 0")
    return bad


def verify_cache(path: str | Path, progress: bool = False) -> dict:
    """Read every chunk of every array and check it against the manifest.

    Checks shapes, dtypes and chunking against the manifest, every chunk's ``done`` marker and
    presence in storage, per-chunk checksums (zarr crc32c / HDF5 fletcher32, via the read),
    finite and sorted top-k values, class indices < C and distinct per row, finite stats that
    agree with the top-k, no NaN parameters, ``order`` being a permutation per epoch, the ids
    fingerprint and the config digest. Read errors are reported with the array and chunk, never
    raised. Only a path that is not a cache at all raises :class:`LogitCacheError`.

    Returns ``{"ok", "problems", "arrays_checked", "chunks_checked", "rows_checked"}``.
    """
    problems = _Problems()
    chunks_checked = rows_checked = 0
    checked: set[str] = set()
    with open_cache(path, check_digest=False) as cache:
        m = cache.manifest
        try:
            E, N, k, C, R = int(m["epochs"]), int(m["dataset"]["num_samples"]), int(m["topk"]), \
                num_classes(m), int(m["chunk_rows"])
            frames, idx_dtype = m.get("frames"), m["index_dtype"]
        except (KeyError, TypeError, ValueError) as e:
            raise LogitCacheError(f"{path}: manifest is missing required fields ({_first_line(e)})") from None

        # -- manifest self-consistency
        if not m.get("complete"):
            problems.add("manifest: cache is not complete (the dump did not finish)")
        if m.get("config_digest") != config_digest(m):
            problems.add("manifest: config_digest does not match the manifest's contents (edited by hand?)")
        if not 1 <= k <= C:
            problems.add(f"manifest: topk={k} is not within 1..C={C}")
        try:
            if np.iinfo(np.dtype(idx_dtype)).max < C - 1:
                problems.add(f"manifest: index dtype {idx_dtype} cannot hold class indices up to {C - 1}")
        except (TypeError, ValueError):
            problems.add(f"manifest: index dtype {idx_dtype!r} is not an integer type")
        if frames is not None and int(frames) < 1:
            problems.add(f"manifest: frames={frames} is not a positive count")

        # -- layout: every expected array present with the expected shape, dtype and chunking
        layout = _expected_arrays(m, problems)
        written = {**layout.per_position(), **layout.per_chunk()} if layout else {}
        expected = {n: (x.shape, x.dtype) for n, x in written.items()}
        present = set(cache.store.arrays())
        for name in sorted(set(expected) - present):
            problems.add(f"{name}: array missing")
        # arrays of an unfinished add or drop are known to the manifest, not unexpected
        for name in sorted(n for n in present - set(expected) - set(LAYOUT_ARRAYS) - set(MARKER_ARRAYS)
                           if not unlisted(m, n)):
            problems.add(f"{name}: unexpected array (not implied by the manifest)")
        layout_intact = True
        for name in LAYOUT_ARRAYS:
            if name not in present:
                problems.add(f"{name}: array missing")
                layout_intact = False
                continue
            for coords in _missing_chunks(cache, name):
                problems.add(f"{name}: chunk {'.'.join(map(str, coords))} missing from storage (reads back as "
                             f"fill value 0)")
                layout_intact = False
        layout_ok = {}
        for name, (shape, dtype) in expected.items():
            if name not in present:
                continue
            info = cache.store.info(name)
            ok = True
            if tuple(info["shape"]) != tuple(shape):
                problems.add(f"{name}: shape {tuple(info['shape'])}, manifest implies {tuple(shape)}")
                ok = False
            if np.dtype(info["dtype"]) != np.dtype(dtype):
                problems.add(f"{name}: dtype {info['dtype']}, manifest says {dtype}")
                ok = False
            want = tuple(layout.arrays[name].chunks[:1 if name in SAMPLE_ARRAYS else 2])
            if tuple(info["chunks"][:len(want)]) != want:
                implied = f"({R},)" if name in SAMPLE_ARRAYS else f"(1, {R}, ...)"
                problems.add(f"{name}: chunks {tuple(info['chunks'])}, manifest says {implied}")
                ok = False
            layout_ok[name] = ok

        # -- ids: count and fingerprint (unless a missing ids chunk is already listed)
        try:
            ids = cache.ids if layout_intact else None
            checked.update({"ids/utf8", "ids/offsets"} if layout_intact else ())
            if ids is not None and len(ids) != N:
                problems.add(f"ids: {len(ids)} ids, manifest says {N} samples")
            if ids is not None and fingerprint(ids) != m["dataset"].get("fingerprint"):
                problems.add("ids: fingerprint does not match the manifest's dataset fingerprint")
        except Exception as e:
            problems.add(f"ids: read failed ({_read_reason(e)})")

        # -- done markers
        n_chunks = -(-N // R)
        done = None
        try:
            done = cache.chunks_done()
            checked.add("done")
            if done.shape != (E, n_chunks):
                problems.add(f"done: shape {done.shape}, expected ({E}, {n_chunks})")
                done = None
        except Exception as e:
            problems.add(f"done: read failed ({_first_line(e)})")
        if done is not None:
            for epoch in range(E):
                missing = np.flatnonzero(~done[epoch])
                if len(missing):
                    shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
                    problems.add(f"epoch {epoch}: {len(missing)} of {n_chunks} chunk(s) not written "
                                 f"(done marker unset: chunks {shown})")

        # -- every chunk of every per-position array, epoch by epoch
        names = [n for n in expected if layout_ok.get(n)]
        bar = tqdm(total=E * n_chunks, unit="chunk", desc="verify", disable=not progress, dynamic_ncols=True)
        try:
            for epoch in range(E):
                order_seen = np.zeros(N, np.int64)
                order_complete = True
                for c in range(n_chunks):
                    a, b = c * R, min((c + 1) * R, N)
                    where = f"epoch {epoch} chunk {c} (rows {a}..{b - 1})"
                    if done is None or not done[epoch, c]:
                        order_complete = False
                        bar.update(1)
                        continue
                    target_rows: dict[str, dict[str, np.ndarray]] = {}  # target set -> field -> this chunk
                    for name in names:
                        if name in SAMPLE_ARRAYS and epoch:
                            continue  # stored once, with epoch 0's chunks
                        per_chunk = layout.arrays[name].per == "chunk"  # one row per chunk: row c
                        rows_of = (slice(a, b),) if name in SAMPLE_ARRAYS else \
                            (epoch, slice(c, c + 1) if per_chunk else slice(a, b))
                        trailing = (0,) * (len(expected[name][0]) - 2)
                        # Every chunk is written, even an all-zero one: absent means lost.
                        coords = (c,) if name in SAMPLE_ARRAYS else (epoch, c, *trailing)
                        if cache.store.chunk_stored(name, coords) is False:
                            problems.add(f"{name}: {where}: chunk missing from storage although marked "
                                         f"done (reads back as fill value 0)")
                            if name == "order":
                                order_complete = False
                            continue
                        try:
                            rows = cache.store.read(name, rows_of)
                        except Exception as e:  # checksum mismatch, truncated file, codec error ...
                            problems.add(f"{name}: {where}: read failed ({_read_reason(e)})")
                            if name == "order":
                                order_complete = False
                            continue
                        chunks_checked += 1
                        checked.add(name)
                        spec = layout.arrays[name]
                        if spec.target_set and not per_chunk:
                            target_rows.setdefault(spec.target_set, {})[spec.field] = rows
                        for msg in _check_rows(name, rows, N):
                            problems.add(f"{name}: {where}: {msg}")
                        if name == "order":
                            o = rows.astype(np.int64)
                            if o.size and (o.min() < 0 or o.max() >= N):
                                problems.add(f"order: {where}: dataset index out of range [0, {N})")
                                order_complete = False
                            else:
                                np.add.at(order_seen, o, 1)
                    for ts, rows in target_rows.items():
                        for f, msg in layout.codec.check(rows):
                            problems.add(f"{layout.target_path(ts, f)}: {where}: {msg}")
                    rows_checked += b - a
                    bar.update(1)
                if order_complete and "order" in names and not (order_seen == 1).all():
                    problems.add(f"order: epoch {epoch} is not a permutation of 0..{N - 1} "
                                 f"({int((order_seen == 0).sum())} index(es) missing, "
                                 f"{int((order_seen > 1).sum())} repeated)")
        finally:
            bar.close()

    if problems.dropped:
        problems.append(f"... and {problems.dropped} more problem(s) not listed")
    return {"ok": not problems, "problems": list(problems), "arrays_checked": len(checked),
            "chunks_checked": chunks_checked, "rows_checked": rows_checked}
