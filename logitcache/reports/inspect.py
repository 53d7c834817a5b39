"""``inspect_cache``: what a cache holds and what it costs on disk (and, projected, at another size)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from logitcache import checks
from logitcache.cache import Cache, open_cache
from logitcache.layout import SAMPLE_ARRAYS, Layout, num_classes
from logitcache.storage import is_url, url_fs


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

    Keys: path, backend, complete, samples, epochs, topk, classes (count), frames,
    positions ([H', W'] of a dense map, else None), output_kind,
    aggregation, members, teachers (names), value_dtype, index_dtype, chunk_rows, chunks_done,
    chunks_total, bytes_on_disk, bytes_arrays, bytes_uncompressed, bytes_per_sample_epoch,
    audio_bytes, share_of_audio, arrays (name, shape, dtype, stored_bytes, raw_bytes, ratio),
    targets_table (per target set, "ensemble" and each member: name, stored_bytes, raw_bytes,
    ratio, bytes_per_view), epochs_table (per epoch: epoch, stored_bytes of its per-view arrays,
    bytes_per_view, chunks_done; empty where the backend cannot split by epoch), projection, and
    provenance (per target set: how, when and from what teacher it was written, whether the
    ensemble aggregates it; dropped members; an unfinished addition: see
    :func:`provenance`), modality, and tokens (None unless a token cache: context L, vocab_size,
    tokens = views x L, bytes_per_token on disk; each targets_table row then has bytes_per_token).

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
        tokens = _token_sizes(m, views * (cache.frames or 1), on_disk, targets_table)
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
            "classes": num_classes(m),
            "frames": cache.frames,
            "positions": list(cache.position_shape) if cache.position_shape else None,
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
            "provenance": provenance(m),
            "modality": (m.get("augment") or {}).get("modality", "audio"),
            "tokens": tokens,
        }


def _token_sizes(m: dict, positions: int, on_disk: int, targets_table: list[dict]) -> dict | None:
    """A token cache's sizes per stored position (the unit LM users count in), else None."""
    spec = m.get("augment") or {}
    if spec.get("modality") != "tokens":
        return None
    for t in targets_table:
        t["bytes_per_token"] = t["stored_bytes"] / max(positions, 1)
    return {"context": spec.get("context"), "vocab_size": num_classes(m), "tokens": positions,
            "bytes_per_token": on_disk / max(positions, 1)}


ENSEMBLE = Layout.target_set_of(None)


def provenance(m: dict) -> dict:
    """Where each target set came from: ``target_sets`` (per target set: name, target_set, kind
    dumped | added | recomputed, teachers, source, sha256, written_at, in_ensemble, notes),
    ``dropped`` (the manifest's ``dropped_members``) and ``adding`` (an unfinished addition, or None)."""
    described = {t["name"]: t for t in m.get("teachers", [])}
    rows = [_provenance_row(m, ts, described)
            for ts in [ENSEMBLE] + [Layout.target_set_of(n) for n in m.get("members", [])]]
    adding = m.get("adding")
    return {"target_sets": rows, "dropped": list(m.get("dropped_members") or []),
            "adding": None if adding is None else {"teachers": [d["name"] for d in adding["new_teachers"]],
                                                   "started": adding.get("started"), "phase": adding.get("phase")}}


def _provenance_row(m: dict, ts: str, described: dict) -> dict:
    p = (m.get("target_sets") or {}).get(ts, {})  # format 1: none, so it was dumped with the cache
    ensemble = ts == ENSEMBLE
    teachers = [t["name"] for t in p.get("teachers", [])] or (list(described) if ensemble else [ts.partition("/")[2]])
    first = {} if ensemble else p.get("teacher") or described.get(teachers[0], {})
    notes = []
    if p.get("excluded_members"):
        notes.append(f"does not aggregate {', '.join(p['excluded_members'])}")
    if p.get("dropped_members"):
        notes.append(f"still holds dropped {', '.join(p['dropped_members'])}")
    return {"name": ENSEMBLE if ensemble else ts.partition("/")[2], "target_set": ts,
            "kind": "added" if p.get("added") else "recomputed" if p.get("recomputed") else "dumped",
            "teachers": teachers, "source": first.get("source"), "sha256": first.get("sha256"),
            "written_at": p.get("written_at", m.get("created")),
            "in_ensemble": ensemble or p.get("in_ensemble", teachers[0] in described), "notes": notes}


def provenance_lines(p: dict) -> list[str]:
    """One line per target set of a :func:`provenance` (and per dropped member), for ``inspect``'s text."""
    lines = []
    for r in p["target_sets"]:
        what = ", ".join(r["teachers"]) if r["name"] == ENSEMBLE else f"{r['source']} (sha256 {str(r['sha256'])[:12]})"
        extra = "" if r["in_ensemble"] else ", not in the ensemble"
        notes = "".join(f"; {n}" for n in r["notes"])
        lines.append(f"{r['name']}: {r['kind']} {r['written_at']} from {what}{extra}{notes}")
    lines += [f"{d['name']}: dropped {d.get('dropped_at')}" for d in p["dropped"]]
    if p["adding"]:
        a = p["adding"]
        lines.append(f"adding {', '.join(a['teachers'])}: unfinished (started {a['started']}); re-run to finish")
    return lines
