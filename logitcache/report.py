"""Looking at a cache: what it holds (inspect), whether it is intact (verify), and whether its
targets still match the teachers (fidelity). The CLI's inspect/verify/fidelity print these dicts.

    inspect_cache("run.zarr")["bytes_per_sample_epoch"]
    verify_cache("run.zarr")["ok"]
    fidelity("run.zarr", "data/train", ["teacher.pt2"], samples=64)["max_abs_logit_error"]

Every function returns plain JSON-serialisable dicts (numbers, strings, lists), so ``--json``
output is the dict itself and the key names are part of the interface (see the README).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from logitcache.augment import Augmenter
from logitcache.cache import TARGET_FIELDS, Cache, config_digest, open_cache
from logitcache.data import AudioFolder, fingerprint
from logitcache.errors import LogitCacheError
from logitcache.targets import aggregate, teacher_probs

MAX_PROBLEMS = 100  # a wholly damaged cache would otherwise list one problem per chunk


# ---------------------------------------------------------------- inspect
def _disk_bytes(path: Path) -> int:
    """Bytes of every file of the cache (a zarr folder or one HDF5 file), metadata included."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def inspect_cache(path: str | Path) -> dict:
    """Manifest summary and per-array size table of a cache.

    ``bytes_on_disk`` is the whole cache as stored (all array chunks plus the small metadata and
    manifest files); ``arrays[i].stored_bytes`` are the arrays' own shares and
    ``arrays[i].ratio`` is raw / stored (how well that array compresses).

    Keys: path, backend, complete, samples, epochs, topk, classes (count), frames, output_kind,
    aggregation, members, teachers (names), value_dtype, index_dtype, chunk_rows, chunks_done,
    chunks_total, bytes_on_disk, bytes_arrays, bytes_uncompressed, bytes_per_sample_epoch,
    audio_bytes, share_of_audio, arrays (name, shape, dtype, stored_bytes, raw_bytes, ratio).
    """
    with open_cache(path) as cache:
        m = cache.manifest
        arrays = []
        for name in cache.store.arrays():
            info = cache.store.info(name)
            raw = int(np.prod(info["shape"], dtype=np.int64)) * np.dtype(info["dtype"]).itemsize
            stored = int(info["stored_bytes"])
            arrays.append({"name": name, "shape": list(info["shape"]), "dtype": info["dtype"],
                           "stored_bytes": stored, "raw_bytes": raw,
                           "ratio": round(raw / stored, 3) if stored else None})
        try:
            done = cache.chunks_done()
            chunks_done, chunks_total = int(done.sum()), int(done.size)
        except Exception:  # a damaged marker array is verify's business, not inspect's
            chunks_done, chunks_total = None, None
        samples, epochs = cache.num_samples, cache.epochs
        on_disk = _disk_bytes(cache.path)
        audio = m["dataset"].get("audio_bytes")
        return {
            "path": str(cache.path),
            "backend": m.get("backend"),
            "complete": cache.complete,
            "samples": samples,
            "epochs": epochs,
            "topk": cache.topk,
            "classes": len(m["classes"]),
            "frames": cache.frames,
            "output_kind": cache.output_kind,
            "aggregation": m.get("aggregation"),
            "members": cache.members,
            "teachers": [t.get("name") for t in m.get("teachers", [])],
            "value_dtype": m.get("value_dtype"),
            "index_dtype": m.get("index_dtype"),
            "chunk_rows": cache.chunk_rows,
            "chunks_done": chunks_done,
            "chunks_total": chunks_total,
            "bytes_on_disk": on_disk,
            "bytes_arrays": sum(a["stored_bytes"] for a in arrays),
            "bytes_uncompressed": sum(a["raw_bytes"] for a in arrays),
            "bytes_per_sample_epoch": on_disk / max(samples * epochs, 1),
            "audio_bytes": audio,
            "share_of_audio": on_disk / audio if audio else None,
            "arrays": arrays,
        }


# ---------------------------------------------------------------- verify
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


def _expected_arrays(m: dict, problems: _Problems) -> dict[str, tuple[tuple, str]]:
    """name -> (shape, dtype) of every per-position array the manifest implies."""
    E, N, k = int(m["epochs"]), int(m["dataset"]["num_samples"]), int(m["topk"])
    frame = (int(m["frames"]),) if m.get("frames") else ()
    out: dict[str, tuple[tuple, str]] = {"order": ((E, N), m.get("order_dtype", "uint32")),
                                         "seeds": ((E, N), "uint64")}
    try:
        for name, (dtype, shape) in Augmenter.from_spec(m["augment"]).param_specs.items():
            out[f"params/{name}"] = ((E, N, *shape), dtype)
    except (LogitCacheError, KeyError, TypeError) as e:
        problems.add(f"manifest: augmentation spec cannot be rebuilt ({_first_line(e)})")
    for prefix in ["ensemble"] + [f"members/{n}" for n in m.get("members", [])]:
        out[f"{prefix}/values"] = ((E, N, *frame, k), m["value_dtype"])
        out[f"{prefix}/indices"] = ((E, N, *frame, k), m["index_dtype"])
        out[f"{prefix}/stat"] = ((E, N, *frame), "float32")
    return out


def _chunk_stored(cache: Cache, name: str, coords: tuple[int, ...]) -> bool | None:
    """Whether the chunk at chunk-grid ``coords`` exists in storage (None: cannot tell).

    A missing chunk reads back as the fill value (zeros) without any error, so this is how a
    deleted chunk file is told apart from one that was written.
    """
    store = cache.store
    if store.name == "zarr":
        arr = store._array(name)
        return (Path(store.path) / name / arr.metadata.encode_chunk_key(coords)).is_file()
    if store.name == "hdf5":
        d = store.file[name]
        offset = tuple(c * s for c, s in zip(coords, d.chunks))
        return d.id.get_chunk_info_by_coord(offset).byte_offset is not None
    return None


def _zero_chunk_plausible(cache: Cache, name: str, rows: int) -> bool:
    """Could a correctly written chunk of ``name`` be all zeros (and so, in zarr, have no file)?

    zarr skips writing chunks that equal the fill value, so an absent chunk is only damage for
    arrays that can never be all zero: random seeds, a permutation of 2+ rows, top-k indices
    with k >= 2 (distinct per row) and top-k logits (a teacher whose top logit is exactly 0.0
    for every row of a chunk is not a real teacher). HDF5 stores every written chunk.
    """
    if cache.store.name != "zarr":
        return False
    if name == "seeds" or name.endswith("/values"):
        return False
    if name == "order":
        return rows < 2
    if name.endswith("/indices"):
        return cache.topk < 2
    return True


def _check_rows(name: str, rows: np.ndarray, num_classes: int, num_samples: int) -> list[str]:
    """Content checks of one chunk of one array; returns what is wrong (empty when fine)."""
    bad = []
    if name.endswith("/values"):
        if not np.isfinite(rows).all():
            bad.append(f"{int((~np.isfinite(rows)).sum())} non-finite value(s)")
        elif rows.shape[-1] > 1 and not (rows[..., :-1] >= rows[..., 1:]).all():
            n = int((~(rows[..., :-1] >= rows[..., 1:]).all(-1)).sum())
            bad.append(f"{n} row(s) not sorted descending along k")
    elif name.endswith("/indices"):
        top = int(rows.max()) if rows.size else 0
        if top >= num_classes:
            bad.append(f"class index {top} out of range (C={num_classes})")
        if rows.shape[-1] > 1:
            s = np.sort(rows, axis=-1)
            dup = int((s[..., 1:] == s[..., :-1]).any(-1).sum())
            if dup:
                bad.append(f"{dup} row(s) repeat a class index")
    elif name.endswith("/stat"):
        if not np.isfinite(rows).all():
            bad.append(f"{int((~np.isfinite(rows)).sum())} non-finite value(s)")
    elif name.startswith("params/") and rows.dtype.kind == "f":  # +inf is a legal "off" (noise SNR)
        if np.isnan(rows).any():
            bad.append(f"{int(np.isnan(rows).sum())} NaN parameter(s)")
    elif name.endswith(".partner") and rows.size and (rows.min() < -1 or rows.max() >= num_samples):
        bad.append(f"mixup partner index out of range [-1, {num_samples})")  # -1 means no mix
    return bad


def _check_stat(stat: np.ndarray, values: np.ndarray, kind: str, num_classes: int, value_dtype: str) -> str:
    """The tail statistic must agree with the top-k it was computed with (see targets.py).

    softmax: stat = logsumexp of all logits >= the top logit. sigmoid: stat = logit of the mean
    tail probability <= the k-th logit (every tail class is below it), and exactly 0 when k == C.
    Catches a stat chunk that was zeroed or mixed up with another chunk's.
    """
    v = values.astype(np.float64)
    s = stat.astype(np.float64)
    tol = np.abs(v) * 2 * np.finfo(np.dtype(value_dtype)).eps + 1e-4  # values were rounded to value_dtype
    if kind == "multiclass":
        bad = s < v[..., 0] - tol[..., 0]
        what = "below the top logit (a log-sum-exp cannot be)"
    elif values.shape[-1] == num_classes:
        bad = s != 0
        what = "not 0 although k == C (no tail)"
    else:
        bad = s > v[..., -1] + tol[..., -1]
        what = "above the k-th logit (the tail mean cannot be)"
    n = int(np.asarray(bad).reshape(len(stat), -1).any(-1).sum())
    return f"{n} row(s) with a tail statistic {what}" if n else ""


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
    with open_cache(path) as cache:
        m = cache.manifest
        try:
            E, N, k, C, R = int(m["epochs"]), int(m["dataset"]["num_samples"]), int(m["topk"]), \
                len(m["classes"]), int(m["chunk_rows"])
            frames, value_dtype, idx_dtype = m.get("frames"), m["value_dtype"], m["index_dtype"]
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
        expected = _expected_arrays(m, problems)
        present = set(cache.store.arrays())
        for name in sorted(set(expected) - present):
            problems.add(f"{name}: array missing")
        for name in sorted(present - set(expected) - {"ids/utf8", "ids/offsets", "done"}):
            problems.add(f"{name}: unexpected array (not implied by the manifest)")
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
            if tuple(info["chunks"][:2]) != (1, R):
                problems.add(f"{name}: chunks {tuple(info['chunks'])}, manifest says (1, {R}, ...)")
                ok = False
            layout_ok[name] = ok

        # -- ids: count and fingerprint
        try:
            ids = cache.ids
            checked.update({"ids/utf8", "ids/offsets"})
            if len(ids) != N:
                problems.add(f"ids: {len(ids)} ids, manifest says {N} samples")
            if fingerprint(ids) != m["dataset"].get("fingerprint"):
                problems.add("ids: fingerprint does not match the manifest's dataset fingerprint")
        except Exception as e:
            problems.add(f"ids: read failed ({_first_line(e)})")

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
                    values_of: dict[str, np.ndarray] = {}  # target prefix -> this chunk's values
                    for name in names:
                        trailing = (0,) * (len(expected[name][0]) - 2)
                        stored = _chunk_stored(cache, name, (epoch, c, *trailing))
                        if stored is False and not _zero_chunk_plausible(cache, name, b - a):
                            problems.add(f"{name}: {where}: chunk missing from storage although marked "
                                         f"done (reads back as fill value 0)")
                            if name == "order":
                                order_complete = False
                            continue
                        try:
                            rows = cache.store.read(name, (epoch, slice(a, b)))
                        except Exception as e:  # checksum mismatch, truncated file, codec error ...
                            problems.add(f"{name}: {where}: read failed ({_first_line(e)})")
                            if name == "order":
                                order_complete = False
                            continue
                        chunks_checked += 1
                        checked.add(name)
                        for msg in _check_rows(name, rows, C, N):
                            problems.add(f"{name}: {where}: {msg}")
                        prefix = name.rpartition("/")[0]
                        if name.endswith("/values"):
                            values_of[prefix] = rows
                        elif name.endswith("/stat") and prefix in values_of:
                            msg = _check_stat(rows, values_of.pop(prefix), m.get("output_kind"), C, value_dtype)
                            if msg:
                                problems.add(f"{name}: {where}: {msg}")
                        if name == "order":
                            o = rows.astype(np.int64)
                            if o.size and (o.min() < 0 or o.max() >= N):
                                problems.add(f"order: {where}: dataset index out of range [0, {N})")
                                order_complete = False
                            else:
                                np.add.at(order_seen, o, 1)
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


# ---------------------------------------------------------------- fidelity
def _compare(stored: dict[str, torch.Tensor], logits: torch.Tensor, kind: str) -> dict[str, torch.Tensor]:
    """Per-row figures of stored top-k targets vs freshly computed full logits ``[S, (T,) C]``.

    Returns tensors shaped ``[S]`` (frame rows averaged, max errors maxed) so that rows of
    different batches can simply be concatenated.
    """
    v, idx, stat = stored["values"].float(), stored["indices"].long(), stored["stat"].float()
    z = logits.float()
    C, k = z.shape[-1], v.shape[-1]
    err = (v - z.gather(-1, idx)).abs()  # [S, (T,) k]
    in_topk = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, torch.topk(z, k, dim=-1).indices, True)
    agree = in_topk.gather(-1, idx).float().mean(-1)  # fraction of stored indices in the fresh top-k
    top1 = (idx[..., 0] == z.argmax(-1)).float()
    q = teacher_probs(v, idx, stat, C, kind).clamp(1e-12, 1.0)
    if kind == "multiclass":
        logp = F.log_softmax(z, dim=-1)
        kl = (logp.exp() * (logp - q.log())).sum(-1)
    else:  # mean over classes of the Bernoulli KL(p || q)
        p = torch.sigmoid(z).clamp(1e-12, 1 - 1e-7)
        q = q.clamp(max=1 - 1e-7)
        kl = (p * (p.log() - q.log()) + (1 - p) * (torch.log1p(-p) - torch.log1p(-q))).mean(-1)
    kl = kl.clamp_min(0.0)  # tiny negatives are float rounding, not information
    S = z.shape[0]
    err, agree, top1, kl = (t.reshape(S, -1) for t in (err, agree, top1, kl))  # frame rows -> one per view
    return {"err_max": err.max(1).values, "err_sum": err.sum(1),
            "err_n": torch.full((S,), float(err.shape[1])), "agree": agree.mean(1), "top1": top1.mean(1),
            "kl": kl.mean(1), "kl_max": kl.max(1).values}


def _summary(parts: list[dict[str, torch.Tensor]]) -> dict:
    cat = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    return {
        "max_abs_logit_error": float(cat["err_max"].max()),
        "mean_abs_logit_error": float(cat["err_sum"].sum() / cat["err_n"].sum()),
        "topk_index_agreement": float(cat["agree"].mean()),
        "top1_agreement": float(cat["top1"].mean()),
        "kl_mean": float(cat["kl"].mean()),
        "kl_max": float(cat["kl_max"].max()),
    }


def fidelity(path: str | Path, data_dir: str | Path, teachers: list[str], samples: int = 64, seed: int = 0,
             device: str = "auto", teacher_weights: list[str | None] | None = None, batch_size: int = 32,
             progress: bool = False) -> dict:
    """Re-run the teachers on a seeded random sample of stored views and compare with the cache.

    Views are replayed from stored parameters, the teachers run at the dump's precision and are
    aggregated the way the manifest says, and the stored top-k is compared with the fresh
    logits. A teacher whose sha256 differs from the manifest's is reported
    (``teachers_match: false``), not refused: float results differ slightly across hardware,
    and the error figures say by how much.

    Returns ``samples_checked, teachers_match, teachers, max_abs_logit_error,
    mean_abs_logit_error, topk_index_agreement, top1_agreement, kl_mean, kl_max`` and
    ``members`` (stored member name -> the same figures, comparing each stored member with the
    --teacher at the same position; empty when members were not stored or the counts differ).
    KL is KL(fresh teacher || reconstruction from the cache): it includes the top-k
    truncation, so it is ~0 only when k == C.
    """
    from logitcache.dump import autocast, probe_teachers, resolve_device
    from logitcache.teachers import load_teacher, unique_names
    from logitcache.views import ViewSource, check_compatible

    if samples < 1 or batch_size < 1:
        raise LogitCacheError("--samples and --batch-size must be at least 1")
    if not teachers:
        raise LogitCacheError("at least one --teacher is needed")
    with open_cache(path) as cache:
        m = cache.manifest
        folder = AudioFolder(data_dir)
        check_compatible(cache, folder)
        kind, aggregation, weights = m["output_kind"], m["aggregation"], m.get("weights")
        if weights and len(weights) != len(teachers):
            raise LogitCacheError(f"cache {cache.path} was dumped with {len(weights)} weighted teachers; "
                                  f"got {len(teachers)} --teacher")
        dev = resolve_device(device)
        files = list(teacher_weights or []) + [None] * (len(teachers) - len(teacher_weights or []))
        loaded = [load_teacher(t, w, dev) for t, w in zip(teachers, files)]
        unique_names(loaded)
        augmenter = Augmenter.from_spec(m["augment"])
        num_classes, frames = probe_teachers(loaded, augmenter.clip_samples, dev)
        if num_classes != len(m["classes"]) or frames != m.get("frames"):
            theirs = f"C={num_classes}" + (f", T={frames}" if frames else "")
            ours = f"C={len(m['classes'])}" + (f", T={m['frames']}" if m.get("frames") else "")
            raise LogitCacheError(f"teachers output {theirs} but cache {cache.path} holds {ours}")

        dumped = m.get("teachers", [])
        described = []
        for i, t in enumerate(loaded):
            ref = dumped[i]["sha256"] if i < len(dumped) else None
            described.append({"name": t.name, "sha256": t.sha256, "manifest_sha256": ref,
                              "match": t.sha256 == ref})
        teachers_match = len(loaded) == len(dumped) and all(d["match"] for d in described)
        # Members map by position (the dump stored them in --teacher order); only when counts agree.
        member_of = dict(enumerate(cache.members)) if len(loaded) == len(cache.members) else {}

        # A seeded sample of (epoch, position) views from completely written chunks (an unfinished
        # cache reads zeros elsewhere), then read and replayed epoch by epoch in stored order.
        N, R = cache.num_samples, cache.chunk_rows
        done = np.argwhere(cache.chunks_done())  # [(epoch, chunk)], epoch-major
        if not len(done):
            raise LogitCacheError(f"{cache.path}: no chunk has been written yet")
        rows = np.minimum((done[:, 1] + 1) * R, N) - done[:, 1] * R
        ends = np.cumsum(rows)
        rng = np.random.default_rng(seed)
        pick = np.sort(rng.choice(int(ends[-1]), size=min(samples, int(ends[-1])), replace=False))
        which = np.searchsorted(ends, pick, side="right")
        flat = done[which, 0] * N + done[which, 1] * R + (pick - (ends[which] - rows[which]))
        source = ViewSource(folder, augmenter)
        parts: dict[str, list] = {"ensemble": [], **{n: [] for n in member_of.values()}}
        bar = tqdm(total=len(flat), unit="view", desc="fidelity", disable=not progress, dynamic_ncols=True)
        try:
            for epoch in np.unique(flat // N):
                pos = flat[flat // N == epoch] % N
                for a in range(0, len(pos), batch_size):
                    ids = [cache.ids[i] for i in cache.order(int(epoch))[pos[a:a + batch_size]]]
                    params = cache.params(int(epoch), ids)
                    wave = torch.stack([source.replay(folder.index[s], {n: v[r] for n, v in params.items()})
                                        for r, s in enumerate(ids)]).to(dev)
                    with torch.inference_mode(), autocast(dev, m.get("precision", "fp32")):
                        logits = [t.module(wave).float() for t in loaded]
                    groups = [("ensemble", None, aggregate(logits, kind, aggregation, weights))]
                    groups += [(n, n, logits[i]) for i, n in member_of.items()]
                    for key, member, z in groups:
                        t = cache.targets(int(epoch), ids, member=member)
                        stored = {f: torch.from_numpy(np.asarray(getattr(t, f))) for f in TARGET_FIELDS}
                        parts[key].append(_compare(stored, z.cpu(), kind))
                    bar.update(len(ids))
        finally:
            bar.close()

    return {
        "samples_checked": len(flat),
        "teachers_match": bool(teachers_match),
        "teachers": described,
        "output_kind": kind,
        "aggregation": aggregation,
        "topk": int(m["topk"]),
        "value_dtype": m["value_dtype"],
        "device": dev.type,
        **_summary(parts["ensemble"]),
        "members": {n: _summary(parts[n]) for n in member_of.values()},
    }


# ---------------------------------------------------------------- text helpers for the CLI
def human_bytes(n: float | None) -> str:
    """1536 -> '1.5 KiB' (binary units)."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def format_table(rows: list[list], headers: list[str] | None = None) -> str:
    """Plain-text table with aligned columns; numbers are right-aligned."""
    cells = [[_cell(x) for x in r] for r in rows]
    if headers:
        cells.insert(0, list(headers))
    if not cells:
        return ""
    widths = [max(len(r[i]) for r in cells if i < len(r)) for i in range(max(map(len, cells)))]
    numeric = [all(isinstance(r[i], (int, float)) and not isinstance(r[i], bool) for r in rows if i < len(r))
               for i in range(len(widths))]
    lines = []
    for j, r in enumerate(cells):
        parts = [c.rjust(widths[i]) if numeric[i] and not (headers and j == 0) else c.ljust(widths[i])
                 for i, c in enumerate(r)]
        lines.append("  ".join(parts).rstrip())
        if headers and j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if math.isnan(x) or math.isinf(x):
            return str(x)
        return f"{x:.4g}" if abs(x) < 1e-3 or abs(x) >= 1e5 else f"{x:.4f}".rstrip("0").rstrip(".")
    if isinstance(x, (list, tuple)):
        return ", ".join(map(str, x)) if x else "-"
    return str(x)


__all__ = ["fidelity", "format_table", "human_bytes", "inspect_cache", "verify_cache"]
