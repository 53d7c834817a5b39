"""Looking at a cache: what it holds and costs (inspect), whether it is intact (verify), how well
its targets match the teachers and what a smaller k or another value dtype would lose (fidelity),
and whether a student trained from it matches the ensemble (compare). The CLI prints these dicts;
:mod:`logitcache.html` draws them.

    inspect_cache("run.zarr", project_samples=2_000_000)["projection"]["bytes_on_disk"]
    verify_cache("run.zarr")["ok"]
    fidelity("run.zarr", "data/train", ["teacher.pt2"], samples=64)["per_k"]
    compare("runs/kd", eval_data="data/eval", teachers=["teacher.pt2"])["eval"]["top1_agreement"]
    write_cache_report("report.html", "run.zarr", "data/train", ["teacher.pt2"], run="runs/kd")

Every function returns plain JSON-serialisable dicts (numbers, strings, lists), so ``--json``
output is the dict itself and the key names are part of the interface (see the README).
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from logitcache import checks
from logitcache.augment import Augmenter
from logitcache.cache import Cache, config_digest, open_cache
from logitcache.data import AudioFolder, fingerprint
from logitcache.dump import VALUE_DTYPES
from logitcache.errors import LogitCacheError
from logitcache.html import human_bytes  # noqa: F401  (the CLI's text tables use it from here)
from logitcache.layout import LAYOUT_ARRAYS, MARKER_ARRAYS, SAMPLE_ARRAYS, Layout, Manifest
from logitcache.storage import cache_location, is_url, url_fs
from logitcache.targets import aggregate, teacher_probs, topk_targets

MAX_PROBLEMS = 100  # a wholly damaged cache would otherwise list one problem per chunk


# ---------------------------------------------------------------- inspect
def _disk_bytes(path: Path | str) -> int:
    """Bytes of every file of the cache (a zarr folder or one HDF5 file), metadata included."""
    if is_url(path):
        fs, root = url_fs(str(path))
        fs.invalidate_cache()
        return int(sum(v.get("size") or 0 for v in fs.find(root, detail=True).values()))
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _epoch_bytes(cache: Cache, name: str) -> list[int] | None:
    """Stored bytes of each epoch's chunks of a per-view array (None: the backend cannot tell)."""
    store, out = cache.store, [0] * cache.epochs
    try:
        if store.name == "zarr":
            for rel, size in store.file_sizes(name).items():
                parts = rel[len(name) + 1:].split("/")
                # chunk keys are c/<epoch>/<chunk>/... (zarr v3 default encoding)
                if len(parts) > 2 and parts[0] == "c" and parts[1].isdigit():
                    out[int(parts[1])] += size
            return out
        if store.name == "hdf5":
            d = store.file[name]

            def add(chunk) -> None:
                out[chunk.chunk_offset[0] // d.chunks[0]] += chunk.size

            d.id.chunk_iter(add)
            return out
    except (OSError, RuntimeError, AttributeError, IndexError, ValueError):  # old HDF5 without chunk_iter, odd files
        return None
    return None


def inspect_cache(path: str | Path, project_samples: int | None = None, project_epochs: int | None = None) -> dict:
    """Manifest summary and per-array size table of a cache.

    ``bytes_on_disk`` is the whole cache as stored (all array chunks plus the small metadata and
    manifest files); ``arrays[i].stored_bytes`` are the arrays' own shares and
    ``arrays[i].ratio`` is raw / stored (how well that array compresses).

    Keys: path, backend, complete, samples, epochs, topk, classes (count), frames, output_kind,
    aggregation, members, teachers (names), value_dtype, index_dtype, chunk_rows, chunks_done,
    chunks_total, bytes_on_disk, bytes_arrays, bytes_uncompressed, bytes_per_sample_epoch,
    audio_bytes, share_of_audio, arrays (name, shape, dtype, stored_bytes, raw_bytes, ratio),
    targets_table (per target set, "ensemble" and each member: name, stored_bytes, raw_bytes,
    ratio, bytes_per_view), epochs_table (per epoch: epoch, stored_bytes of its per-view arrays,
    bytes_per_view, chunks_done; empty where the backend cannot split by epoch) and projection.

    ``projection`` (None unless ``project_samples`` or ``project_epochs`` is given) scales this
    cache's measured bytes to that many samples and epochs (each defaults to this cache's):
    per-view arrays by views, ids by samples, metadata as is. Keys: samples, epochs, chunk_rows,
    bytes_on_disk, bytes_per_sample_epoch, audio_bytes (scaled by samples), share_of_audio,
    groups (ensemble, members, params, order_seeds, ids, other).
    """
    project_samples = checks.optional_whole("--project-samples", project_samples)
    project_epochs = checks.optional_whole("--project-epochs", project_epochs)
    with open_cache(path, check_digest=False) as cache:
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
        views = max(samples * epochs, 1)
        by_name = {a["name"]: a for a in arrays}
        targets_table = []
        for prefix in cache.layout.target_sets():
            parts = [by_name[n] for n in (x.name for x in cache.layout.target_arrays(prefix).values())
                     if n in by_name]
            stored, raw = sum(a["stored_bytes"] for a in parts), sum(a["raw_bytes"] for a in parts)
            targets_table.append({"name": prefix.rpartition("/")[2], "stored_bytes": stored, "raw_bytes": raw,
                                  "ratio": round(raw / stored, 3) if stored else None,
                                  "bytes_per_view": stored / views})
        per_view = [a["name"] for a in arrays
                    if not a["name"].startswith("ids/") and a["name"] not in ("done", *SAMPLE_ARRAYS)]
        per_epoch = [_epoch_bytes(cache, n) for n in per_view]
        epochs_table = []
        if per_view and all(b is not None for b in per_epoch):
            done_rows = cache.chunks_done().sum(1) if chunks_done is not None else [None] * epochs
            for e in range(epochs):
                b = sum(x[e] for x in per_epoch)
                epochs_table.append({"epoch": e, "stored_bytes": b, "bytes_per_view": b / max(samples, 1),
                                     "chunks_done": None if done_rows[e] is None else int(done_rows[e])})
        projection = None
        if project_samples is not None or project_epochs is not None:
            from logitcache.cache import choose_chunk_rows
            from logitcache.plan import measure, scale_arrays

            N2, E2 = int(project_samples or samples), int(project_epochs or epochs)
            R2 = choose_chunk_rows(cache.codec.chunk_sizing_bytes(), N2)
            chunk_bytes, meta = measure(cache.store, cache.path)
            p = scale_arrays(chunk_bytes, meta, epochs, samples, cache.chunk_rows, E2, N2, R2)
            audio2 = audio * N2 / samples if audio else None
            projection = {"samples": N2, "epochs": E2, "chunk_rows": R2, "bytes_on_disk": p["bytes_on_disk"],
                          "bytes_per_sample_epoch": p["bytes_on_disk"] / (N2 * E2), "audio_bytes": audio2,
                          "share_of_audio": p["bytes_on_disk"] / audio2 if audio2 else None,
                          "groups": p["groups"]}
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
            "format_version": cache.spec.format_version,
            "codec": cache.spec.codec,
            "codec_options": cache.spec.codec_options,
            "target_row_bytes": cache.codec.row_bytes(),
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
            "targets_table": targets_table,
            "epochs_table": epochs_table,
            "projection": projection,
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
                len(m["classes"]), int(m["chunk_rows"])
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
        expected = {n: (x.shape, x.dtype) for n, x in layout.per_position().items()} if layout else {}
        present = set(cache.store.arrays())
        for name in sorted(set(expected) - present):
            problems.add(f"{name}: array missing")
        for name in sorted(present - set(expected) - set(LAYOUT_ARRAYS) - set(MARKER_ARRAYS)):
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
                        rows_of = (slice(a, b),) if name in SAMPLE_ARRAYS else (epoch, slice(a, b))
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
                        if spec.target_set:
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


# ---------------------------------------------------------------- fidelity report: per k', dtype, classes, members
TAIL_BINS = [0.0] + [10.0 ** (e / 4) for e in range(-32, 1)]  # tail mass 0, 1e-8 .. 1, four bins a decade


def k_grid(k: int) -> list[int]:
    """The k' values a report looks at: every k' up to 16, then about two per octave, and k itself."""
    steps = {1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024}
    grid = set(range(1, min(k, 16) + 1)) | {s for s in steps if s <= k}
    grid |= {2 ** e for e in range(11, 30) if 2 ** e <= k}
    return sorted(grid | {k})


def truncate_targets(values: torch.Tensor, indices: torch.Tensor, stat: torch.Tensor, k2: int, num_classes: int,
                     kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The targets a top-``k2`` cache would have stored, from a top-k cache's row (k2 <= k).

    softmax: the log-normaliser does not depend on k, so only the top entries are dropped.
    sigmoid: the dropped entries join the tail, whose mean probability (``stat``) is recomputed
    exactly from them and the old tail's mean (see targets.py).
    """
    k = values.shape[-1]
    if k2 == k or kind == "multiclass":
        return values[..., :k2], indices[..., :k2], stat
    tail = torch.sigmoid(values[..., k2:].double()).sum(-1)
    if k < num_classes:  # with k == C the stored stat is a placeholder 0, not a tail
        tail = tail + (num_classes - k) * torch.sigmoid(stat.double())
    mean = tail / (num_classes - k2)
    return values[..., :k2], indices[..., :k2], (torch.log(mean) - torch.log1p(-mean)).float()


def _dense_log_targets(values: torch.Tensor, indices: torch.Tensor, stat: torch.Tensor, num_classes: int,
                       kind: str) -> torch.Tensor:
    """Dense ``[R, C]`` float64 reconstruction of cache rows, as log-probabilities (softmax) or as
    logits (sigmoid): :func:`teacher_probs` at T = 1 without its float32 rounding, so extreme
    logits (p within 1e-8 of 0 or 1) keep finite, exact KLs."""
    v, s, idx = values.double(), stat.double(), indices.long()
    k = v.shape[-1]
    if kind == "multiclass":
        logp = v - s[..., None]
        tail = (1.0 - logp.exp().sum(-1)).clamp_min(0.0) / max(num_classes - k, 1)
        fill = torch.log(tail.clamp_min(1e-300))
    else:
        logp, fill = v, s
    out = fill[..., None].expand(*v.shape[:-1], num_classes).clone()
    return out.scatter_(-1, idx, logp)


def _row_figures(z: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, stat: torch.Tensor,
                 kind: str) -> dict[str, torch.Tensor]:
    """Per-row figures of targets ``[R, k]`` against fresh logits ``[R, C]`` (float64 throughout).

    kl: KL(fresh || reconstruction); for sigmoid the mean over classes of the Bernoulli KL.
    covered: softmax, the stored top-k probability mass; sigmoid, the top-k's share of the summed
    class probabilities. Both come from the cache alone. prob_err: max |p_fresh - p_reconstructed|.
    """
    C, k = z.shape[-1], values.shape[-1]
    z = z.double()
    v, s = values.double(), stat.double()
    rec = _dense_log_targets(v, indices, s, C, kind)
    if kind == "multiclass":
        logp = F.log_softmax(z, dim=-1)
        p, q = logp.exp(), rec.exp()
        kl = (p * (logp - rec)).sum(-1)
        covered = torch.exp(v - s[..., None]).sum(-1)
    else:
        p, q = torch.sigmoid(z), torch.sigmoid(rec)
        kl = (p * (F.logsigmoid(z) - F.logsigmoid(rec))
              + torch.sigmoid(-z) * (F.logsigmoid(-z) - F.logsigmoid(-rec))).mean(-1)
        top = torch.sigmoid(v).sum(-1)
        covered = top / (top + (C - k) * torch.sigmoid(s)) if k < C else torch.ones_like(top)
    fresh_top = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, torch.topk(z, k, dim=-1).indices, True)
    return {"kl": kl.clamp_min(0.0), "covered": covered.clamp(0.0, 1.0), "prob_err": (p - q).abs().max(-1).values,
            "top1": (indices[..., 0].long() == z.argmax(-1)).double(),
            "agree": fresh_top.gather(-1, indices.long()).double().mean(-1)}


def _rounded(values: torch.Tensor, dtype: str) -> torch.Tensor:
    """Values as a cache of ``dtype`` stores them (fp16 saturates instead of overflowing)."""
    v = values.float()
    if dtype == "float16":
        v = v.clamp(-65504.0, 65504.0)
    return v.to(getattr(torch, dtype)).float()


class _ReportAccumulator:
    """Collects the fidelity report's figures batch by batch (rows = views, or view frames)."""

    SIM_ROWS = 8192  # rows per batch the dtype simulation looks at (it builds dense [rows, C] tensors)

    def __init__(self, kind: str, num_classes: int, k: int, members: list[str]):
        self.kind, self.C, self.k, self.members = kind, num_classes, k, members
        self.grid = k_grid(k)
        self.sim_grid = sorted(set(k_grid(num_classes)) | {k})
        self.per_k: dict[int, list[dict[str, torch.Tensor]]] = {k2: [] for k2 in self.grid}
        self.sim: dict[tuple[str, int], list[dict[str, torch.Tensor]]] = {}
        self.class_mass = torch.zeros(num_classes, dtype=torch.float64)
        self.class_covered = torch.zeros(num_classes, dtype=torch.float64)
        self.class_in_topk = torch.zeros(num_classes, dtype=torch.float64)
        self.rows = 0
        M = len(members)
        self.pair_agree = torch.zeros(M, M, dtype=torch.float64)
        self.member_top1 = torch.zeros(M, dtype=torch.float64)
        self.member_kl = torch.zeros(M, dtype=torch.float64)

    def add(self, stored: dict[str, torch.Tensor], z: torch.Tensor, member_logits: list[torch.Tensor]) -> None:
        C = self.C
        z = z.double().reshape(-1, C)
        v = stored["values"].float().reshape(z.shape[0], -1)
        idx = stored["indices"].long().reshape(z.shape[0], -1)
        stat = stored["stat"].float().reshape(-1)
        for k2 in self.grid:
            self.per_k[k2].append(_row_figures(z, *truncate_targets(v, idx, stat, k2, C, self.kind), self.kind))
        # Which classes the stored top-k keeps, weighted by how much probability each holds.
        p = F.softmax(z, -1) if self.kind == "multiclass" else torch.sigmoid(z)
        kept = torch.zeros_like(p, dtype=torch.bool).scatter_(-1, idx, True)
        self.class_mass += p.sum(0)
        self.class_covered += (p * kept).sum(0)
        self.class_in_topk += kept.double().sum(0)
        self.rows += z.shape[0]
        # The value dtype: the fresh logits' own top-k' rounded as each dtype would store them.
        zs = z[: self.SIM_ROWS].float()
        for k2 in self.sim_grid:
            exact, ind, st = topk_targets(zs, k2, self.kind)
            for dtype in VALUE_DTYPES:
                rv = _rounded(exact, dtype)
                fig = _row_figures(zs, rv, ind, st, self.kind)
                fig["logit_err"] = (rv - exact).abs().max(-1).values.double()
                self.sim.setdefault((dtype, k2), []).append(fig)
        # Members against each other and against the ensemble, on the same views.
        tops = [m.reshape(-1, C).argmax(-1) for m in member_logits]
        ens_top = z.argmax(-1)
        for i, mi in enumerate(member_logits):
            for j in range(len(member_logits)):
                self.pair_agree[i, j] += float((tops[i] == tops[j]).double().sum())
            self.member_top1[i] += float((tops[i] == ens_top).double().sum())
            self.member_kl[i] += float(_divergence(mi.reshape(-1, C).double(), z, self.kind).sum())

    def result(self, class_names: list[str], size_of) -> dict:
        def mean(parts, key):
            return float(torch.cat([x[key] for x in parts]).mean())

        def worst(parts, key):
            return float(torch.cat([x[key] for x in parts]).max())

        per_k = []
        for k2, parts in self.per_k.items():
            per_k.append({"k": k2, "kl_mean": mean(parts, "kl"), "kl_max": worst(parts, "kl"),
                          "top1_agreement": mean(parts, "top1"), "topk_agreement": mean(parts, "agree"),
                          "covered_mass_mean": mean(parts, "covered"),
                          "covered_mass_min": float(torch.cat([x["covered"] for x in parts]).min()),
                          "tail_mass_mean": float((1 - torch.cat([x["covered"] for x in parts])).mean()),
                          "prob_max_abs_error": worst(parts, "prob_err"),
                          "prob_mean_max_abs_error": mean(parts, "prob_err"),
                          "bytes_per_view": size_of(k2, None)})
        dtype_effect: dict[str, list[dict]] = {d: [] for d in VALUE_DTYPES}
        for (dtype, k2), parts in sorted(self.sim.items(), key=lambda x: (x[0][0], x[0][1])):
            dtype_effect[dtype].append({"k": k2, "kl_mean": mean(parts, "kl"), "kl_max": worst(parts, "kl"),
                                        "max_abs_logit_error": worst(parts, "logit_err"),
                                        "prob_max_abs_error": worst(parts, "prob_err"),
                                        "covered_mass_mean": mean(parts, "covered"),
                                        "bytes_per_view": size_of(k2, dtype)})
        tail = (1 - torch.cat([x["covered"] for x in self.per_k[self.k]])).clamp_min(0).numpy()
        counts, _ = np.histogram(tail, bins=TAIL_BINS)
        quant = np.quantile(tail, [0.5, 0.9, 0.99]) if len(tail) else [math.nan] * 3
        n, M = max(self.rows, 1), len(self.members)
        coverage = (self.class_covered / self.class_mass.clamp_min(1e-300)).tolist()
        per_class = [{"class": name, "coverage": cov, "in_topk_rate": float(r / n), "mean_prob": float(mass / n)}
                     for name, cov, r, mass in zip(class_names, coverage, self.class_in_topk, self.class_mass)]
        pair = (self.pair_agree / n).tolist()
        off = [pair[i][j] for i in range(M) for j in range(M) if i < j]
        disagreement = {
            "members": list(self.members),
            "pairwise_top1_agreement": pair,
            "mean_pairwise_disagreement": float(1 - np.mean(off)) if off else 0.0,
            "diversity_kl": float(self.member_kl.sum() / (n * M)) if M else 0.0,
            "member_vs_ensemble": {name: {"top1_agreement": float(self.member_top1[i] / n),
                                          "kl_to_ensemble": float(self.member_kl[i] / n)}
                                   for i, name in enumerate(self.members)},
        }
        return {"k_grid": self.grid, "per_k": per_k, "dtype_effect": dtype_effect,
                "tail_mass": {"k": self.k, "edges": TAIL_BINS, "counts": counts.tolist(), "rows": int(len(tail)),
                              "p50": float(quant[0]), "p90": float(quant[1]), "p99": float(quant[2]),
                              "max": float(tail.max()) if len(tail) else math.nan},
                "per_class": per_class, "disagreement": disagreement, "rows_checked": int(self.rows)}


def _divergence(member: torch.Tensor, ensemble: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-row KL(member || ensemble) from logits (sigmoid: mean Bernoulli KL over classes)."""
    if kind == "multiclass":
        lp, lq = F.log_softmax(member, -1), F.log_softmax(ensemble, -1)
        return (lp.exp() * (lp - lq)).sum(-1).clamp_min(0)
    lp, lq = F.logsigmoid(member), F.logsigmoid(ensemble)
    ln, lnq = F.logsigmoid(-member), F.logsigmoid(-ensemble)
    return (lp.exp() * (lp - lq) + ln.exp() * (ln - lnq)).mean(-1).clamp_min(0)


def _size_model(cache: Cache):
    """``size_of(k', dtype)`` -> stored bytes per view of this cache's per-view arrays, had it kept
    top-k' (and values of ``dtype``; None = as stored).

    Measured on this cache: value and index arrays scale with k' at their measured bytes per
    entry (values by the itemsize ratio for another dtype, an estimate), everything else per view
    (seeds, order, params, stats) is kept as measured. Ids, done markers and metadata are left out:
    they do not grow with views; nor does ``content`` (one crc per sample).
    """
    m = cache.manifest
    views = max(cache.epochs * cache.num_samples, 1)
    k, stored_dtype = cache.topk, m["value_dtype"]
    vals = idxs = rest = 0
    present = set(cache.store.arrays())
    for name, spec in cache.layout.arrays.items():
        if spec.per != "view" or name not in present:
            continue
        b = int(cache.store.info(name)["stored_bytes"])
        if spec.field in ("values", "codes"):  # what grows with k' (compact: ids about so)
            vals += b
        elif spec.field in ("indices", "ids"):
            idxs += b
        else:
            rest += b

    def size_of(k2: int, dtype: str | None) -> float:
        scale = np.dtype(dtype).itemsize / np.dtype(stored_dtype).itemsize if dtype else 1.0
        return float((rest + (vals * scale + idxs) * k2 / k) / views)

    return size_of


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
    kl = _kl_to(teacher_probs(v, idx, stat, C, kind), z, kind)
    S = z.shape[0]
    err, agree, top1, kl = (t.reshape(S, -1) for t in (err, agree, top1, kl))  # frame rows -> one per view
    return {"err_max": err.max(1).values, "err_sum": err.sum(1),
            "err_n": torch.full((S,), float(err.shape[1])), "agree": agree.mean(1), "top1": top1.mean(1),
            "kl": kl.mean(1), "kl_max": kl.max(1).values}


def _kl_to(q: torch.Tensor, z: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-row KL(fresh teacher logits ``z`` || stored probabilities ``q``), q clamped away from 0
    and 1 (a class the cache gives no mass would make it infinite); sigmoid: mean Bernoulli KL."""
    q = q.clamp(1e-12, 1.0)
    if kind == "multiclass":
        logp = F.log_softmax(z, dim=-1)
        kl = (logp.exp() * (logp - q.log())).sum(-1)
    else:
        p = torch.sigmoid(z).clamp(1e-12, 1 - 1e-7)
        q = q.clamp(max=1 - 1e-7)
        kl = (p * (p.log() - q.log()) + (1 - p) * (torch.log1p(-p) - torch.log1p(-q))).mean(-1)
    return kl.clamp_min(0.0)  # tiny negatives are float rounding, not information


def _compare_dense(q: torch.Tensor, logits: torch.Tensor, kind: str) -> dict[str, torch.Tensor]:
    """Per-view figures of a codec's dense distribution ``q`` (no top-k triple, e.g. sampled)
    against fresh logits: KL and top-1 agreement only (see :data:`NOT_TOPK`)."""
    z = logits.float()
    S = z.shape[0]
    kl, top1 = _kl_to(q.float(), z, kind).reshape(S, -1), (q.argmax(-1) == z.argmax(-1)).float().reshape(S, -1)
    return {"top1": top1.mean(1), "kl": kl.mean(1), "kl_max": kl.max(1).values}


NOT_TOPK = ("the codec stores no top-k logits (sampled: ids drawn from the teacher and their counts), so "
            "logit errors, top-k index agreement and the per-k/dtype figures do not apply; KL and top-1 "
            "agreement compare the stored (empirical) distribution with the fresh teacher")


def _summary(parts: list[dict[str, torch.Tensor]]) -> dict:
    cat = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    if "err_max" not in cat:  # a codec without a top-k triple
        return {"max_abs_logit_error": None, "mean_abs_logit_error": None, "topk_index_agreement": None,
                "top1_agreement": float(cat["top1"].mean()), "kl_mean": float(cat["kl"].mean()),
                "kl_max": float(cat["kl_max"].max())}
    return {
        "max_abs_logit_error": float(cat["err_max"].max()),
        "mean_abs_logit_error": float(cat["err_sum"].sum() / cat["err_n"].sum()),
        "topk_index_agreement": float(cat["agree"].mean()),
        "top1_agreement": float(cat["top1"].mean()),
        "kl_mean": float(cat["kl"].mean()),
        "kl_max": float(cat["kl_max"].max()),
    }


def fidelity(path: str | Path, data_dir: str | Path, teachers: list[str], samples: int = 64, seed: int = 0,
             device: str = "auto", state_dicts: list[str | None] | None = None, teacher_args: dict | None = None,
             batch_size: int = 32, progress: bool = False) -> dict:
    """Re-run the teachers on a seeded random sample of stored views and compare with the cache.

    Views are replayed from stored parameters, the teachers run at the dump's precision and are
    aggregated the way the manifest says, and the stored top-k is compared with the fresh
    logits. Teachers that differ from the manifest's (count, names, sha256) are reported
    (``teachers_match: false`` and a ``warning:`` line on stderr), not refused: float results
    differ slightly across hardware, and the error figures say by how much. ``state_dicts`` and
    ``teacher_args`` are as for :func:`logitcache.dump`.

    Returns ``samples_checked, teachers_match, teachers, max_abs_logit_error,
    mean_abs_logit_error, topk_index_agreement, top1_agreement, kl_mean, kl_max`` and
    ``members`` (stored member name -> the same figures, comparing each stored member with the
    --teacher at the same position; empty when members were not stored or the counts differ).
    KL is KL(fresh teacher || reconstruction from the cache): it includes the top-k
    truncation, so it is ~0 only when k == C.

    The report part (rows = views, or view frames for frame-level teachers):

    * ``per_k``: for each k' of ``k_grid`` (k' <= k, the cache truncated to its top k'): kl_mean,
      kl_max, top1_agreement, topk_agreement (stored top-k' classes among the fresh top-k'),
      covered_mass_mean/min (softmax: probability mass of the top-k'; sigmoid: the top-k' share
      of the summed class probabilities), tail_mass_mean (1 - covered), prob_max_abs_error and
      prob_mean_max_abs_error (|p_fresh - p_reconstructed|, max over classes), bytes_per_view.
    * ``dtype_effect``: {float16, float32} -> the same per k' up to C, for the fresh logits' own
      top-k' rounded to that dtype (what a dump with that --value-dtype would have stored),
      plus max_abs_logit_error of the rounding.
    * ``tail_mass``: histogram (``edges``, ``counts``) and quantiles of the per-row tail mass at k.
    * ``per_class``: per class, coverage (share of its fresh probability that falls in the stored
      top-k), in_topk_rate and mean_prob.
    * ``disagreement``: the fresh members' pairwise_top1_agreement matrix,
      mean_pairwise_disagreement, diversity_kl (mean KL(member || ensemble)) and
      member_vs_ensemble.
    """
    import sys

    from logitcache.dump import autocast, resolve_device
    from logitcache.teachers import load_teachers, probe_teachers, run_teachers, teacher_differences
    from logitcache.views import SourceContent, ViewSource, check_compatible

    samples, batch_size = checks.whole("--samples", samples), checks.whole("--batch-size", batch_size)
    seed = checks.seed("--seed", seed)
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
        loaded = load_teachers(teachers, state_dicts, teacher_args, dev)
        augmenter = Augmenter.from_spec(m["augment"])
        num_classes, frames = probe_teachers(loaded, augmenter.clip_samples, dev, kind)
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
        differences = teacher_differences(dumped, loaded)
        teachers_match = not differences
        if differences:
            print(f"warning: the teachers given are not the ones {cache.path} was dumped with "
                  f"({'; '.join(differences)}); the figures compare different models", file=sys.stderr)
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
        source = ViewSource(folder, augmenter, SourceContent.of_cache(cache))
        parts: dict[str, list] = {"ensemble": [], **{n: [] for n in member_of.values()}}
        acc = _ReportAccumulator(kind, len(m["classes"]), cache.topk, [t.name for t in loaded])
        size_of = _size_model(cache)
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
                        logits = run_teachers(loaded, wave, lambda: ids)
                    groups = [("ensemble", None, aggregate(logits, kind, aggregation, weights))]
                    groups += [(n, n, logits[i]) for i, n in member_of.items()]
                    for key, member, z in groups:
                        t = cache.targets(int(epoch), ids, member=member)
                        if not cache.codec.triple:
                            parts[key].append(_compare_dense(cache.codec.dense(t), z.cpu(), kind))
                            continue
                        stored = {f: torch.from_numpy(np.asarray(getattr(t, f))) for f in ("values", "indices", "stat")}
                        parts[key].append(_compare(stored, z.cpu(), kind))
                        if member is None:
                            acc.add(stored, z.cpu(), [x.cpu() for x in logits])
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
        "path": str(cache_location(path)),
        "classes": len(m["classes"]),
        "frames": m.get("frames"),
        "codec": cache.spec.codec,
        **(acc.result(m["classes"], size_of) if cache.codec.triple else _not_topk_report(len(flat))),
    }


def _not_topk_report(rows: int) -> dict:
    """The report part for a codec without a top-k triple: every top-k figure None, and why."""
    keys = ("k_grid", "per_k", "dtype_effect", "tail_mass", "per_class", "disagreement")
    return {**dict.fromkeys(keys), "rows_checked": rows, "not_applicable": NOT_TOPK}


# ---------------------------------------------------------------- compare: a trained student vs the ensemble
def _label_score(scores: np.ndarray, labels: np.ndarray, kind: str) -> float | None:
    """mAP (multilabel) or top-1 accuracy (multiclass) of clip scores ``[n, C]`` against ``labels``."""
    from logitcache.train import average_precision

    if kind == "multiclass":
        return float((scores.argmax(1) == labels.argmax(1)).mean())
    ap = average_precision(scores, labels)
    return float(np.nanmean(ap)) if np.isfinite(ap).any() else None


def _pseudo_labels(probs: np.ndarray, kind: str) -> np.ndarray:
    """The ensemble's own hard decisions: its top-1 class, and (sigmoid) every class with p >= 0.5.

    The top-1 class always counts, so an unsure ensemble (no p >= 0.5 anywhere) still names
    positives and the AP stays defined."""
    top1 = np.eye(probs.shape[1], dtype=np.float32)[probs.argmax(1)]
    if kind == "multiclass":
        return top1
    return np.maximum(top1, (probs >= 0.5).astype(np.float32))


def _map_vs(scores: np.ndarray, probs: np.ndarray, kind: str) -> float | None:
    from logitcache.train import average_precision

    ap = average_precision(scores, _pseudo_labels(probs, kind))
    return float(np.nanmean(ap)) if np.isfinite(ap).any() else None


def _student_figures(student: torch.Tensor, teacher_p: torch.Tensor,
                     kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (top-1 agreement, KL(teacher || student)) of student logits against teacher
    probabilities ``[R, C]`` (sigmoid: the mean Bernoulli KL over classes)."""
    s, p = student.double(), teacher_p.double()
    top1 = (s.argmax(-1) == p.argmax(-1)).double()
    if kind == "multiclass":
        logq = F.log_softmax(s, -1)
        kl = (p * (torch.log(p.clamp_min(1e-300)) - logq)).sum(-1)
    else:
        pc = p.clamp(1e-300, 1 - 1e-16)
        kl = (pc * (pc.log() - F.logsigmoid(s)) + (1 - pc) * (torch.log1p(-pc) - F.logsigmoid(-s))).mean(-1)
    return top1, kl.clamp_min(0.0)


def _clip_level(x: np.ndarray) -> np.ndarray:
    """Frame-level rows ``[n, T, C]`` -> clip level by max over frames (how train.evaluate scores)."""
    return x.max(axis=1) if x.ndim == 3 else x


def _probs(logits: torch.Tensor, kind: str) -> torch.Tensor:
    return F.softmax(logits.float(), -1) if kind == "multiclass" else torch.sigmoid(logits.float())


def _run_student(run: Path, config: dict, student: str | None, trust_run: bool) -> str:
    """The student to rebuild. A run folder is data: a ``module:callable`` it names is imported
    only when the user names the same factory (``student``) or trusts the run (``trust_run``)."""
    stored = config["student"]
    if not isinstance(stored, str) or not stored:
        raise LogitCacheError(f"{run}/config.json: 'student' is {stored!r}, not a model name")
    if student is not None and student != stored:
        raise LogitCacheError(f"--student {student}: the run {run} trained {stored}, not {student}")
    if ":" in stored and student is None and not trust_run:
        raise LogitCacheError(f"{run}/config.json: the student is the factory {stored}; compare does not import "
                              f"code named in a run folder: pass --student {stored} to import it (or --trust-run)")
    return stored


def _run_path(run: Path, config: dict, key: str, flag: str) -> str:
    """The run's cache or data folder. Runs store absolute paths; older ones stored them as given
    to train, relative to where it ran: tried against the current folder, then the run folder's
    parent."""
    value = config.get(key)
    if not value:
        raise LogitCacheError(f"{run}: config.json names no {key}; pass {flag}")
    value = str(value)
    if is_url(value) or Path(value).is_absolute():
        return value
    tries = [Path.cwd() / value, run.resolve().parent / value]
    found = next((t for t in tries if t.exists()), None)
    if found is None:
        raise LogitCacheError(f"{run}/config.json: {key} {value!r} is found neither in the current folder "
                              f"({tries[0].parent}) nor next to the run folder ({tries[1].parent}); pass {flag}")
    return str(found)


def compare(run: str | Path, cache: str | Path | None = None, data: str | Path | None = None, *,
            eval_data: str | Path | None = None, teachers: list[str] | None = None,
            state_dicts: list[str | None] | None = None, teacher_args: dict | None = None,
            samples: int = 256, seed: int = 0, device: str = "auto", batch_size: int = 32,
            progress: bool = False, student: str | None = None, trust_run: bool = False) -> dict:
    """Does the student match the ensemble? A trained run (``logitcache train``) against its cache.

    ``views``: on a seeded sample of the cached training views the run trained on (replayed
    exactly), the student against the ensemble rebuilt from the cache (no teacher needed):
    top1_agreement, kl_mean (KL(rebuilt ensemble || student)), map_vs_ensemble (AP against the
    ensemble's own decisions: its top-1 class, and for sigmoid every class with p >= 0.5),
    student_vs_labels and ensemble_vs_labels (mAP, or top-1 accuracy for softmax, against the
    views' mixed labels).

    ``eval`` (with ``eval_data``, the held-out split, un-augmented clips): student_vs_labels;
    with ``teachers`` they are re-run on the same clips and aggregated as the manifest says, adding
    top1_agreement, kl_mean (KL(ensemble || student), exact: full logits), map_vs_ensemble,
    ensemble_vs_labels and per_class (class, student_ap, ensemble_ap).

    ``epochs``: the run's metrics.jsonl, one dict per epoch (``epoch`` counts from 0 as stored;
    the CLI's tables and the HTML plots number epochs from 1). ``cache`` and ``data`` default to
    the run's own (config.json). Frame-level outputs are compared per frame and scored per clip
    (max over frames).

    A student given as ``module:callable`` in the run's config.json is imported only if
    ``student`` names the same factory or ``trust_run`` is set: a run folder is data, and
    comparing one must not run code it names. Zoo names need neither.
    """
    import json

    from logitcache.dump import autocast, resolve_device
    from logitcache.teachers import load_teachers, probe_teachers, run_teachers
    from logitcache.train import check_student_output, load_student
    from logitcache.views import SourceContent, ViewSource, check_compatible

    samples, batch_size = checks.whole("--samples", samples), checks.whole("--batch-size", batch_size)
    seed = checks.seed("--seed", seed)
    run = Path(run)
    if not (run / "config.json").is_file():
        raise LogitCacheError(f"{run}: not a training run (no config.json; runs are made by 'logitcache train')")
    if not (run / "checkpoint.pt").is_file():
        raise LogitCacheError(f"{run}: no checkpoint.pt (the run did not finish an epoch)")
    try:
        config = json.loads((run / "config.json").read_text())
        log = run / "metrics.jsonl"
        epochs_log = [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log.is_file() else []
    except ValueError as e:
        raise LogitCacheError(f"{run}: config.json or metrics.jsonl is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise LogitCacheError(f"{run}/config.json: not a JSON object")
    if "student" not in config:
        raise LogitCacheError(f"{run}/config.json: no 'student' entry")
    student = _run_student(run, config, student, trust_run)
    teachers = list(teachers or [])
    if (state_dicts or teacher_args) and not teachers:
        raise LogitCacheError("--state-dict and --teacher-arg apply to --teacher teachers, and none is given")
    if teachers and eval_data is None:
        raise LogitCacheError("--teacher needs --eval-data: the teachers are re-run on the held-out clips")
    cache = cache or _run_path(run, config, "cache", "--cache")
    data = data or _run_path(run, config, "data", "--data")
    member = config.get("member")

    with open_cache(cache) as c:
        m = c.manifest
        folder = AudioFolder(data)
        check_compatible(c, folder)
        kind, C = c.output_kind, len(c.classes)
        augmenter = Augmenter.from_spec(m["augment"])
        dev = resolve_device(device)
        net = load_student(run, student, C, augmenter.sample_rate, c.frames).to(dev)
        check_student_output(net, student, c, augmenter.clip_samples, dev)

        # -- cached training views: a seeded sample of (epoch, position) from the epochs trained on
        stored = [int(e) for e in config.get("stored_epochs", range(c.epochs)) if 0 <= int(e) < c.epochs]
        if not stored:
            raise LogitCacheError(f"{c.path}: none of the run's stored epochs {config.get('stored_epochs')} is in "
                                  f"this cache")
        N = c.num_samples
        rng = np.random.default_rng(seed)
        flat = np.sort(rng.choice(len(stored) * N, size=min(samples, len(stored) * N), replace=False))
        source = ViewSource(folder, augmenter, SourceContent.of_cache(c))
        top1, kl, s_clip, p_clip, y_clip = [], [], [], [], []
        bar = tqdm(total=len(flat), unit="view", desc="compare", disable=not progress, dynamic_ncols=True)
        try:
            for slot in np.unique(flat // N):
                epoch = stored[int(slot)]
                pos = flat[flat // N == slot] % N
                for a in range(0, len(pos), batch_size):
                    index = c.order(epoch)[pos[a:a + batch_size]]
                    ids = [c.ids[i] for i in index]
                    params = c.params(epoch, ids)
                    rows = [{n: v[r] for n, v in params.items()} for r in range(len(ids))]
                    wave = torch.stack([source.replay(i, p) for i, p in zip(index, rows)]).to(dev)
                    with torch.inference_mode(), autocast(dev, "fp32"):
                        zs = net(wave).float().cpu()
                    t = c.targets(epoch, ids, member=member)
                    if not c.codec.triple:  # sampled: its stored (empirical) distribution
                        q = c.codec.dense(t)
                    else:
                        q = teacher_probs(torch.from_numpy(np.asarray(t.values)).float(),
                                          torch.from_numpy(np.asarray(t.indices).astype(np.int64)),
                                          torch.from_numpy(np.asarray(t.stat)).float(), C, kind)
                    a1, k1 = _student_figures(zs.reshape(-1, C), q.reshape(-1, C), kind)
                    top1.append(a1)
                    kl.append(k1)
                    s_clip.append(_clip_level(zs.numpy()))
                    p_clip.append(_clip_level(q.numpy()))
                    y_clip.append(np.stack([source.labels(i, p) for i, p in zip(index, rows)]))
                    bar.update(len(ids))
        finally:
            bar.close()
        s_all, p_all, y_all = np.concatenate(s_clip), np.concatenate(p_clip), np.concatenate(y_clip)
        views = {"views": int(len(flat)), "epochs": sorted({stored[int(x)] for x in np.unique(flat // N)}),
                 "top1_agreement": float(torch.cat(top1).mean()), "kl_mean": float(torch.cat(kl).mean()),
                 "map_vs_ensemble": _map_vs(s_all, p_all, kind),
                 "student_vs_labels": _label_score(s_all, y_all, kind),
                 "ensemble_vs_labels": _label_score(p_all, y_all, kind)}

        # -- held-out clips, un-augmented; teachers re-run on them when given
        evaluation = None
        if eval_data is not None:
            held = AudioFolder(eval_data)
            if held.classes != c.classes:
                raise LogitCacheError(f"{eval_data}: class list differs from the one cache {c.path} was "
                                      f"dumped with")
            loaded = []
            if teachers:
                loaded = load_teachers(teachers, state_dicts, teacher_args, dev)
                n_classes, frames = probe_teachers(loaded, augmenter.clip_samples, dev, kind)
                if n_classes != C or frames != c.frames:
                    raise LogitCacheError(f"teachers output C={n_classes} but cache {c.path} holds C={C}")
            s_list, e_list = [], []
            for a in range(0, len(held), batch_size):
                clips = range(a, min(a + batch_size, len(held)))
                x = torch.stack([augmenter.fit_clip(held.load(i, augmenter.sample_rate)) for i in clips]).to(dev)
                with torch.inference_mode():
                    s_list.append(net(x).float().cpu())
                    if loaded:
                        with autocast(dev, m.get("precision", "fp32")):
                            z = run_teachers(loaded, x, lambda: [held.ids[i] for i in clips])
                        e_list.append(aggregate(z, kind, m["aggregation"], m.get("weights")).cpu())
            zs = torch.cat(s_list)
            s_eval = _clip_level(zs.numpy())
            evaluation = {"data": str(eval_data), "clips": len(held), "student_vs_labels": _label_score(
                s_eval, held.labels, kind), "teachers": [t.name for t in loaded]}
            if loaded:
                from logitcache.train import average_precision

                ze = torch.cat(e_list)
                pe = _probs(ze, kind)
                a1, k1 = _student_figures(zs.reshape(-1, C), pe.reshape(-1, C), kind)
                e_clip = _clip_level(pe.numpy())
                s_ap = average_precision(s_eval, held.labels) if kind == "multilabel" else None
                e_ap = average_precision(e_clip, held.labels) if kind == "multilabel" else None
                evaluation.update({
                    "top1_agreement": float(a1.mean()), "kl_mean": float(k1.mean()),
                    "map_vs_ensemble": _map_vs(s_eval, e_clip, kind),
                    "ensemble_vs_labels": _label_score(e_clip, held.labels, kind),
                    "per_class": [] if s_ap is None else [
                        {"class": name, "student_ap": None if np.isnan(sa) else float(sa),
                         "ensemble_ap": None if np.isnan(ea) else float(ea)}
                        for name, sa, ea in zip(c.classes, s_ap, e_ap)]})
        return {
            "run": str(run),
            "student": student,
            "cache": str(c.path),
            "data": str(data),
            "output_kind": kind,
            "metric": "mAP" if kind == "multilabel" else "top1",
            "targets": "ensemble" if member is None else f"member {member}",
            "cache_matches_run": config.get("cache_config_digest") == m.get("config_digest"),
            "checkpoint_epoch": epochs_log[-1].get("epoch") if epochs_log else None,
            "epochs": epochs_log,
            "views": views,
            "eval": evaluation,
        }


def write_cache_report(out_html: str | Path, cache: str | Path, data: str | Path, teachers: list[str], *,
                       run: str | Path | None = None, eval_data: str | Path | None = None, samples: int = 64,
                       compare_samples: int = 256, seed: int = 0, device: str = "auto",
                       state_dicts: list[str | None] | None = None, teacher_args: dict | None = None,
                       progress: bool = False, student: str | None = None, trust_run: bool = False) -> dict:
    """One HTML report of a cache: inspect, fidelity (teachers re-run on ``samples`` stored views)
    and, given a training ``run``, compare (``student``, ``trust_run``: as for :func:`compare`).
    Returns ``{"html", "inspect", "fidelity", "compare"}``."""
    from logitcache.html import write_report

    info = inspect_cache(cache)
    fid = fidelity(cache, data, teachers, samples=samples, seed=seed, device=device,
                   state_dicts=state_dicts, teacher_args=teacher_args, progress=progress)
    cmp = None
    if run is not None:
        cmp = compare(run, cache, data, eval_data=eval_data, teachers=teachers if eval_data else None,
                      state_dicts=state_dicts, teacher_args=teacher_args, samples=compare_samples, seed=seed,
                      device=device, progress=progress, student=student, trust_run=trust_run)
    path = write_report(out_html, inspect=info, fidelity=fid, compare=cmp,
                        title=f"logitcache report: {str(cache).rstrip('/').rpartition('/')[2]}",
                        subtitle=f"{cache if is_url(cache) else Path(cache).resolve()} ·")
    return {"html": str(path), "inspect": info, "fidelity": fid, "compare": cmp}


# ---------------------------------------------------------------- text helpers for the CLI
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


__all__ = ["compare", "fidelity", "format_table", "human_bytes", "inspect_cache", "k_grid", "truncate_targets",
           "verify_cache", "write_cache_report"]
