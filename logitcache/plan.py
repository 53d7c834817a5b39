"""``plan``: how big will a cache be, before any dump?

The size is *measured*, not guessed: a synthetic sample of teacher-like top-k rows (sorted logits
of random teacher-like distributions, their class indices, real view seeds, drawn augmentation
parameters, ids, a manifest) is written through logitcache's own cache writer with every
backend's real codecs (zarr: blosc-lz4 + byte shuffle + crc32c; HDF5: lzf + shuffle +
fletcher32), and the bytes it takes are scaled up to the planned number of views.

    plan_cache(samples=2_000_000, epochs=8, topk=32, classes=527, members=3)["backends"]

Small configurations are written whole, so their projection is the dump's layout exactly; only
the synthetic logits stand in for the teachers'. Large ones are sampled: one epoch of about 4096
views (x frames), enough for the codecs' ratios to level off, scaled linearly per array.
Real teachers' logits compress a little differently: ``logitcache inspect CACHE
--project-samples N --project-epochs E`` projects from a real (small) dump instead.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from logitcache import checks
from logitcache.errors import LogitCacheError

PCM_BYTES_PER_SECOND = 2  # --audio-hours is converted as 16-bit mono PCM at --sample-rate
CODECS = {"zarr": "blosc-lz4 + shuffle, crc32c", "hdf5": "lzf + shuffle, fletcher32", "raw": "none (uncompressed)"}
GROUPS = ("ensemble", "members", "params", "order_seeds", "ids", "other")
LITERAL_ROWS = 8192  # views (x frames): up to this many a plan writes the configuration whole
SAMPLE_ROWS = 4096  # views (x frames) measured for a bigger configuration ...
SAMPLE_CHUNK = 16384  # ... in chunks of up to this many views (see plan_cache)
_PARAM_DRAWS = 1024  # distinct augmentation draws per sample (drawing costs ~0.3 ms per view)


# ---------------------------------------------------------------- synthetic teacher-like logits
def synthetic_logits(rng: np.random.Generator, rows: int, classes: int, members: int, frames: int | None = None,
                     prior: np.ndarray | None = None) -> list[torch.Tensor]:
    """``members`` teachers' logits ``[rows, (frames,) classes]`` that look like tagger outputs.

    Per class a Zipf-like prior (a few common classes, a long tail of rare, very negative ones),
    one to a few active events per clip far above the rest, and per-teacher noise around a shared
    clip latent (teachers of an ensemble mostly agree). Frames add an AR(1) drift around the clip.
    What matters for compression is the value range, the ordering and how often the same classes
    recur, and these follow the same shape as a real tagger's.
    """
    C = classes
    if prior is None:
        prior = -3.0 - 1.2 * np.log1p(rng.permutation(C)).astype(np.float32)
    rank_weight = np.exp(prior - prior.max())
    rank_weight /= rank_weight.sum()
    base = prior[None, :] + rng.standard_normal((rows, C), dtype=np.float32)
    active = 1 + rng.poisson(1.0, rows)
    events = rng.choice(C, size=int(active.sum()), p=rank_weight)
    np.add.at(base, (np.repeat(np.arange(rows), active), events),
              rng.uniform(3.0, 9.0, len(events)).astype(np.float32))
    out = []
    for _ in range(max(members, 1)):
        offset = 0.3 * rng.standard_normal(C, dtype=np.float32)
        z = base + offset + 0.6 * rng.standard_normal((rows, C), dtype=np.float32)
        if frames:
            drift = np.empty((rows, frames, C), np.float32)
            drift[:, 0] = 0.8 * rng.standard_normal((rows, C), dtype=np.float32)
            for t in range(1, frames):
                drift[:, t] = 0.9 * drift[:, t - 1] + 0.35 * rng.standard_normal((rows, C), dtype=np.float32)
            z = z[:, None, :] + drift
        out.append(torch.from_numpy(np.ascontiguousarray(z)))
    return out


def synthetic_lm_logits(rng: np.random.Generator, positions: int, vocab: int, members: int,
                        prior: np.ndarray) -> list[torch.Tensor]:
    """``members`` LM teachers' logits ``[positions, V]`` for one block of a window's positions:
    a Zipf-like prior over the vocabulary, a few likely next tokens per position far above it,
    and per-teacher noise around the shared position (teachers mostly agree)."""
    rank_weight = np.exp(prior - prior.max())
    rank_weight /= rank_weight.sum()
    base = prior[None, :] + rng.standard_normal((positions, vocab), dtype=np.float32)
    likely = rng.choice(vocab, size=(positions, 3), p=rank_weight)
    np.add.at(base, (np.repeat(np.arange(positions), 3), likely.ravel()),
              rng.uniform(6.0, 14.0, 3 * positions).astype(np.float32))
    return [torch.from_numpy(base + 0.5 * rng.standard_normal((positions, vocab), dtype=np.float32))
            for _ in range(max(members, 1))]


def _token_rows(rng, encoder, names: list[str], rows: int, frames: int, classes: int, topk: int,
                prior: np.ndarray, seeds: np.ndarray) -> dict[str, np.ndarray]:
    """The stored target arrays of ``rows`` synthetic windows, generated and encoded a window and
    a block of positions at a time, so [rows, L, V] never sits in memory (V = 151,936, L = 1,024
    would be 600 MB a window and teacher)."""
    from logitcache.codecs import target_set_seeds
    from logitcache.layout import Layout
    from logitcache.lm import position_blocks
    from logitcache.targets import aggregate

    parts: dict[str, list[np.ndarray]] = {}
    for r in range(rows):
        derived = target_set_seeds(seeds[r:r + 1], 1 + len(names))
        window: dict[str, list[np.ndarray]] = {}
        for a, b in position_blocks(1, frames, classes):
            logits = synthetic_lm_logits(rng, b - a, classes, len(names), prior)
            groups = [(Layout.target_set_of(None), aggregate(logits, "multiclass", "mean_logit"))]
            groups += [(Layout.target_set_of(n), z) for n, z in zip(names, logits)]
            for g, (prefix, z) in enumerate(groups):
                for f, x in _encoded_rows(encoder, z[None], topk, "multiclass", derived[g]).items():
                    window.setdefault(Layout.target_path(prefix, f), []).append(x)
        for f, blocks in window.items():
            parts.setdefault(f, []).append(np.concatenate(blocks, axis=1))
    return {f: np.concatenate(x) for f, x in parts.items()}


def synthetic_targets(z: torch.Tensor, k: int, kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``topk_targets`` for planning: the same values, indices and (up to float rounding) stat.

    The sigmoid tail statistic comes from sums of probabilities instead of log-sum-exps, which
    loses precision on extreme logits but is several times cheaper; sizes do not notice.
    """
    from logitcache.targets import topk_targets

    C = z.shape[-1]
    if kind == "multiclass" or k == C:
        return topk_targets(z, k, kind)
    values, indices = torch.topk(z, k, dim=-1, sorted=True)
    tail_p = (torch.sigmoid(z).sum(-1, dtype=torch.float64) - torch.sigmoid(values).sum(-1, dtype=torch.float64))
    tail_p = tail_p.clamp_min(1e-30)
    return values, indices, (torch.log(tail_p) - torch.log((C - k) - tail_p)).float()


# ---------------------------------------------------------------- measuring
def _disk_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure(store, path: Path) -> tuple[dict[str, int], int]:
    """(chunk bytes per array, everything else) of an open store: array descriptions and the
    manifest go to the second part, because they do not grow with the data."""
    arrays = {}
    for name in store.arrays():
        stored = int(store.info(name)["stored_bytes"])
        if store.name == "zarr":  # the array folder also holds its zarr.json
            meta = Path(store.path) / name / "zarr.json"
            stored -= meta.stat().st_size if meta.is_file() else 0
        arrays[name] = stored
    return arrays, _disk_bytes(Path(path)) - sum(arrays.values())


def group_of(name: str) -> str:
    """Which size group an array belongs to (the rows of plan's and inspect's tables)."""
    if name.startswith("ensemble/"):
        return "ensemble"
    if name.startswith("members/"):
        return "members"
    if name.startswith("params/"):
        return "params"
    if name in ("order", "seeds"):
        return "order_seeds"
    if name.startswith("ids/") or name == "content":  # one row per sample
        return "ids"
    return "other"


def scale_arrays(arrays: dict[str, int], meta_bytes: int, epochs: int, samples: int, chunk_rows: int,
                 to_epochs: int, to_samples: int, to_chunk_rows: int | None = None) -> dict:
    """Project measured per-array bytes of an (epochs x samples) cache to (to_epochs x to_samples).

    Per-view arrays scale with views, ids and ``content`` with samples, the one-byte-per-chunk
    ``done`` markers with the chunk count, and the metadata (array descriptions, manifest) stays as it is.
    Returns ``{"bytes_on_disk", "groups": {group: bytes}, "arrays": {name: bytes}}``.
    """
    R2 = to_chunk_rows or chunk_rows
    chunks, chunks2 = epochs * -(-samples // chunk_rows), to_epochs * -(-to_samples // R2)
    out = {}
    for name, b in arrays.items():
        if group_of(name) == "ids":
            f = to_samples / samples
        elif name == "done":
            f = chunks2 / chunks
        else:
            f = (to_epochs * to_samples) / (epochs * samples)
        out[name] = b * f
    groups = {g: 0.0 for g in GROUPS}
    for name, b in out.items():
        groups[group_of(name)] += b
    groups["other"] += meta_bytes
    total = sum(out.values()) + meta_bytes
    return {"bytes_on_disk": int(round(total)), "groups": {g: int(round(b)) for g, b in groups.items()},
            "arrays": {n: int(round(b)) for n, b in out.items()}}


def _synthetic_cache(*, samples: int, epochs: int, topk: int, classes: int, frames: int | None, members: int,
                     value_dtype: str, output_kind: str, augmenter, chunk_rows: int, seed: int,
                     sample_of: int, codec: dict) -> tuple[dict, list[str], list[tuple[int, int, dict]]]:
    """(manifest, ids, [(epoch, chunk, block)]) of a synthetic cache of ``samples`` x ``epochs`` views,
    laid out as ``dump`` lays out a real one.

    ``sample_of`` is the planned dataset size: ids and orders take values of that range, so their
    entropy (and hence their compressed size) is the full-scale one.
    """
    from logitcache.augment import epoch_order, id_hashes, view_seeds
    from logitcache.codecs import target_set_seeds
    from logitcache.layout import MEMBER_STATS, MOMENTS, Layout, new_manifest
    from logitcache.targets import aggregate
    from logitcache.vocabulary import Vocabulary

    rng = np.random.default_rng(seed)
    tokens = getattr(augmenter, "modality", None) == "tokens"
    ids = [f"w{i}" if tokens else f"audio/{i:08d}.flac" for i in rng.choice(sample_of, size=samples, replace=False)]
    hashes = id_hashes(ids)
    names = [f"teacher_{i + 1}" for i in range(members)]
    teachers = [{"name": n, "source": f"/planned/teachers/{n}.pt2", "sha256": "0" * 64} for n in (names or ["teacher_1"])]
    manifest = new_manifest(
        dataset={"fingerprint": "0" * 64, "num_samples": samples, "audio_bytes": 0, "path": "/planned/dataset/train"},
        classes=Vocabulary(classes) if tokens else [f"class {c:04d}" for c in range(classes)], augmenter=augmenter, teachers=teachers, members=names,
        output_kind=output_kind, aggregation="mean_prob", weights=None, topk=topk, frames=frames,
        value_dtype=value_dtype, epochs=epochs, seed=seed, chunk_rows=chunk_rows, codec=codec,
        run={"precision": "fp32", "device": "cpu"})
    manifest["order_dtype"] = "uint32" if sample_of < 2**32 else "uint64"  # sized to the planned dataset
    encoder = Layout(manifest, augmenter.param_specs).codec
    # Augmentation parameters: drawn for a subset of views and resampled, because drawing is slow.
    ctx = augmenter.context(num_samples=sample_of, sample_index=0, source_samples=getattr(augmenter, "clip_samples", 0))
    draws = [augmenter.draw(int(x), ctx)
             for x in rng.integers(0, 2**63, size=min(samples * epochs, _PARAM_DRAWS), dtype=np.uint64)]
    prior = -3.0 - 1.2 * np.log1p(rng.permutation(classes)).astype(np.float32)
    blocks = []
    for epoch in range(epochs):
        order = epoch_order(seed, epoch, hashes)
        seeds = view_seeds(seed, epoch, hashes)[order]
        stored_order = rng.choice(sample_of, size=samples, replace=False) if sample_of > samples else order
        for c in range(-(-samples // chunk_rows)):
            a, b = c * chunk_rows, min((c + 1) * chunk_rows, samples)
            block = {"order": stored_order[a:b].astype(manifest["order_dtype"]), "seeds": seeds[a:b]}
            if epoch == 0:  # crc32s of the source files: random bits (not drawn from rng: it makes the rest)
                block["content"] = (seeds[a:b] >> np.uint64(32)).astype(np.uint32)
            pick = rng.integers(0, len(draws), b - a)
            for name in augmenter.param_specs:
                block[Layout.param_path(name)] = np.stack([draws[i][name] for i in pick])
            # Generated in slices so [rows, frames, C] logits never sit in memory whole.
            step = max(1, 4096 // (frames or 1))
            parts: dict[str, list[np.ndarray]] = {}
            if tokens:
                block.update(_token_rows(rng, encoder, names, b - a, frames, classes, topk, prior, seeds[a:b]))
            for s in range(a, b, step) if not tokens else ():
                logits = synthetic_logits(rng, min(step, b - s), classes, members, frames, prior)
                # mean_logit, not the dump's default mean_prob: as teacher-like and 3x cheaper.
                groups = [(Layout.target_set_of(None), aggregate(logits, output_kind, "mean_logit"))]
                groups += [(Layout.target_set_of(n), z) for n, z in zip(names, logits)]
                derived = target_set_seeds(seeds[s:s + len(groups[0][1])], len(groups))
                for g, (prefix, z) in enumerate(groups):
                    for f, rows in _encoded_rows(encoder, z, topk, output_kind, derived[g]).items():
                        parts.setdefault(Layout.target_path(prefix, f), []).append(rows)
            block.update({n: np.concatenate(p) for n, p in parts.items()})
            if manifest.get("member_stats") == MEMBER_STATS:  # each member's logit sums: one row per chunk
                block.update({Layout.stats_path(n): rng.standard_normal((1, len(MOMENTS))) for n in names})
            blocks.append((epoch, c, block))
    return manifest, ids, blocks


def _encoded_rows(encoder, z, topk: int, kind: str, seeds: np.ndarray) -> dict[str, np.ndarray]:
    """The stored arrays of synthetic logits ``z``: top-k codecs from teacher-like top-k rows,
    others (sampled) from the logits themselves, drawn with the seeds a dump would use."""
    if encoder.triple:
        v, i, st = synthetic_targets(z, topk, kind)
        return encoder.encode_rows(v.float(), i, st.float())
    return encoder.pack({f: t.cpu().numpy() for f, t in encoder.encode(z, seeds).items()})


def _write_and_measure(path: Path, backend: str, manifest: dict, ids: list[str], param_specs: dict,
                       blocks: list[tuple[int, int, dict]]) -> tuple[dict[str, int], int]:
    """Write blocks through the real cache writer; returns (stored bytes per array, metadata bytes)."""
    from logitcache.cache import CacheWriter
    from logitcache.storage import open_store

    writer = CacheWriter(path, manifest, ids, param_specs, backend=backend)
    try:
        for epoch, c, block in blocks:
            writer.put(epoch, c, block)
        writer.finish(complete=True, dump_seconds=0.0)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    store = open_store(path)
    try:
        return measure(store, path)
    finally:
        store.close()


# ---------------------------------------------------------------- the plan
def plan_cache(samples: int | None, epochs: int, topk: int, classes: int, *, frames: int | None = None, members: int = 0,
               value_dtype: str = "float16", output_kind: str = "multilabel", augment: str = "ced",
               sample_rate: int = 16000, clip_seconds: float = 10.0, audio_bytes: int | None = None,
               audio_hours: float | None = None, backends: tuple[str, ...] = ("zarr", "hdf5"),
               chunk_rows: int | None = None, seed: int = 0, codec: str = "topk",
               value_bits: int | None = None, sample_n: int | None = None, sample_head: int | None = None,
               sample_temperature: float | None = None, tokens: int | None = None, context: int | None = None) -> dict:
    """Projected size of a cache per backend (and uncompressed), measured on a synthetic sample.

    ``codec`` (and ``value_bits`` for compact, ``sample_n``, ``sample_head``,
    ``sample_temperature`` for sampled) choose the target codec, as for ``dump``.
    ``members`` is the number of teachers whose own top-k are stored besides the ensemble's
    (0 = ``--no-members``). The share of the audio uses ``audio_bytes``, or ``audio_hours``
    converted as 16-bit mono PCM at ``sample_rate``.

    Keys: samples, epochs, topk, classes, frames, members, value_dtype, index_dtype, output_kind, codec,
    codec_options, target_row_bytes (raw bytes per view of one target set),
    augment, chunk_rows, views, method, measured_views, extrapolated, seconds, audio_bytes,
    audio_basis, backends (list of {backend, codec, bytes_on_disk, bytes_per_sample_epoch, ratio,
    share_of_audio, groups}). ``ratio`` is uncompressed / projected; ``groups`` splits the bytes
    into ensemble, members, params, order_seeds, ids and other (done markers and metadata).
    """
    from logitcache.augment import Augmenter, load_ops_spec
    from logitcache.cache import choose_chunk_rows
    from logitcache.codecs.topk import VALUE_DTYPES
    from logitcache.codecs import get_codec
    from logitcache.layout import Layout, codec_entries
    from logitcache.storage import BACKENDS
    from logitcache.targets import KINDS, index_dtype

    token_spec = None
    if tokens is not None or context is not None:  # a token cache: windows of L positions over V ids
        samples, frames, output_kind, token_spec = _token_plan(tokens, context, samples, frames, augment,
                                                               audio_bytes, audio_hours)
        augment = "offset" if augment == "ced" else augment
    elif samples is None:
        raise LogitCacheError("--samples: give the samples in the dataset (or --tokens and --context for a token cache)")
    samples, epochs = checks.whole("--samples", samples), checks.whole("--epochs", epochs)
    classes = checks.whole("--classes", classes)
    if not (checks.is_whole(topk) and 1 <= topk <= classes):
        raise LogitCacheError(f"--topk {topk}: must be between 1 and --classes ({classes})")
    frames = checks.optional_whole("--frames", frames)
    members = checks.whole("--members", members, 0)
    sample_rate = checks.whole("--sample-rate", sample_rate)
    clip_seconds = checks.real("--clip-seconds", clip_seconds, 0, above=True)
    audio_bytes = checks.optional_whole("--audio-bytes", audio_bytes)
    audio_hours = checks.optional_real("--audio-hours", audio_hours, 0, above=True)
    chunk_rows = checks.optional_whole("--chunk-rows", chunk_rows)
    seed = checks.seed("seed", seed)
    if value_dtype not in VALUE_DTYPES:
        raise LogitCacheError(f"--value-dtype {value_dtype!r}: choose one of {', '.join(VALUE_DTYPES)}")
    if output_kind not in KINDS:
        raise LogitCacheError(f"--output-kind {output_kind!r}: choose one of {', '.join(KINDS)}")
    if audio_bytes is not None and audio_hours is not None:
        raise LogitCacheError("--audio-bytes and --audio-hours: give one, not both")
    for b in backends:
        if b not in BACKENDS:
            raise LogitCacheError(f"backend {b!r}: choose from {', '.join(BACKENDS)}")
    if token_spec is None:
        augmenter = Augmenter(load_ops_spec(augment), sample_rate, clip_seconds)
    else:
        augmenter = Augmenter.from_spec({**token_spec, "vocab_size": classes})

    idx_dtype = index_dtype(classes)
    entries = codec_entries(codec, value_dtype, idx_dtype, value_bits, sample_n, sample_head, sample_temperature)
    encoder = get_codec(codec)(topk, classes, output_kind, frames, entries["codec_options"])
    R = chunk_rows if chunk_rows is not None else choose_chunk_rows(encoder.chunk_sizing_bytes(), samples)
    views = epochs * samples
    # Whole configuration if small; else one epoch of whole chunks, enough rows for the codecs'
    # ratios to level off (they do above a few thousand rows per chunk).
    literal = views * (frames or 1) <= LITERAL_ROWS
    if literal:
        s_samples, s_epochs, s_chunk = samples, epochs, R
    else:
        # One epoch, enough rows (x frames) for the codecs' ratios to level off: blosc and lzf
        # work on blocks of tens of KiB, so a bigger chunk would not compress better.
        # Chunks of at least SAMPLE_CHUNK rows: blosc picks its block size from the chunk size, and
        # the one-value-per-view arrays (stat, seeds, params) only reach their full-scale ratio
        # with tens of KiB per chunk (measured: 3-6% worse at 4096 rows than at 16384).
        want = max(1, -(-SAMPLE_ROWS // (frames or 1)))
        # token windows: each row is already L positions, so a few windows are the sample
        s_chunk = min(R, want if token_spec else max(want, SAMPLE_CHUNK))
        s_samples, s_epochs = min(samples, s_chunk * -(-want // s_chunk)), 1
    started = time.perf_counter()
    manifest, ids, blocks = _synthetic_cache(samples=s_samples, epochs=s_epochs, topk=topk, classes=classes,
                                             frames=frames, members=members, value_dtype=value_dtype,
                                             output_kind=output_kind, augmenter=augmenter, chunk_rows=s_chunk,
                                             seed=seed, sample_of=samples, codec=entries)
    measured: dict[str, tuple[dict, int]] = {}
    with tempfile.TemporaryDirectory(prefix="logitcache-plan-") as tmp:
        for b in backends:
            measured[b] = _write_and_measure(Path(tmp) / f"plan-{b}", b, manifest, ids, augmenter.param_specs,
                                             blocks)
    seconds = time.perf_counter() - started

    if audio_hours is not None:
        audio_bytes = int(round(audio_hours * 3600 * sample_rate * PCM_BYTES_PER_SECOND))
        basis = f"{audio_hours:g} h as 16-bit mono PCM at {sample_rate} Hz"
    else:
        basis = "stated (--audio-bytes)" if audio_bytes is not None else None
    id_bytes = (len(f"w{samples}") if token_spec else len("audio/00000000.flac")) * samples
    full = {**manifest, "dataset": {**manifest["dataset"], "num_samples": samples}, "epochs": epochs,
            "chunk_rows": R, "order_dtype": "uint32" if samples < 2**32 else "uint64"}
    raw = Layout(full, augmenter.param_specs).raw_bytes(id_bytes)
    raw_total = sum(raw.values())
    rows = []
    for b, (arrays, meta) in measured.items():
        p = scale_arrays(arrays, meta, s_epochs, s_samples, s_chunk, epochs, samples, R)
        rows.append({"backend": b, "codec": CODECS.get(b, "?"), "bytes_on_disk": p["bytes_on_disk"],
                     "bytes_per_sample_epoch": p["bytes_on_disk"] / views,
                     "ratio": round(raw_total / p["bytes_on_disk"], 3),
                     "share_of_audio": p["bytes_on_disk"] / audio_bytes if audio_bytes else None,
                     "groups": p["groups"]})
    raw_groups = {g: 0 for g in GROUPS}
    for name, n in raw.items():
        raw_groups[group_of(name)] += n
    rows.append({"backend": "raw", "codec": CODECS["raw"], "bytes_on_disk": raw_total,
                 "bytes_per_sample_epoch": raw_total / views, "ratio": 1.0,
                 "share_of_audio": raw_total / audio_bytes if audio_bytes else None, "groups": raw_groups})
    how = "whole configuration" if literal else f"a sample of {s_samples} views, scaled per array"
    return {
        "samples": samples, "epochs": epochs, "topk": topk, "classes": classes, "frames": frames,
        "members": members, "value_dtype": value_dtype, "index_dtype": idx_dtype, "output_kind": output_kind,
        "codec": codec, "codec_options": entries["codec_options"], "target_row_bytes": encoder.row_bytes(),
        "augment": augment, "chunk_rows": R, "views": views,
        "method": (f"measured: synthetic teacher-like top-k rows written through logitcache's cache writer with "
                   f"each backend's codecs ({how}); real logits compress a little differently, so re-check with "
                   f"'logitcache inspect CACHE --project-samples N' on a small real dump"),
        "measured_views": s_samples * s_epochs,
        "extrapolated": not literal,
        "seconds": round(seconds, 2),
        "audio_bytes": audio_bytes,
        "audio_basis": basis,
        "backends": rows,
        "tokens": None if token_spec is None else _token_sizes(tokens, context, views, rows),
    }


def _token_plan(tokens, context, samples, frames, augment, audio_bytes, audio_hours):
    """(samples, frames, output kind, augmentation spec) of a planned token cache: the corpus of
    ``tokens`` cut into windows of ``context`` (a token source's slots); audio and frame options refused."""
    from logitcache.augment import SPEC_VERSION

    if tokens is None or context is None:
        raise LogitCacheError(f"{'--context' if context is None else '--tokens'}: a token cache needs both --tokens "
                              f"(tokens in the corpus) and --context (tokens per window)")
    tokens, context = checks.whole("--tokens", tokens, 2), checks.whole("--context", context)
    for flag, value in (("--samples", samples), ("--frames", frames), ("--audio-bytes", audio_bytes),
                        ("--audio-hours", audio_hours)):
        if value is not None:
            raise LogitCacheError(f"{flag}: does not apply to a token cache (--tokens and --context size it)")
    if augment not in ("offset", "none", "ced"):  # ced: the CLI's audio default, not chosen for tokens
        raise LogitCacheError(f"--augment {augment!r}: a token cache takes offset (the default) or none")
    ops = [] if augment == "none" else [{"op": "window"}]
    spec = {"version": SPEC_VERSION, "modality": "tokens", "context": context, "ops": ops}
    return -(-(tokens - 1) // context), context, "multiclass", spec


def _token_sizes(tokens: int, context: int, views: int, rows: list[dict]) -> dict:
    """Per-token figures of a token plan: bytes per stored position, per backend."""
    positions = views * context
    return {"tokens": tokens, "context": context, "positions": positions,
            "bytes_per_token": {b["backend"]: b["bytes_on_disk"] / positions for b in rows}}


__all__ = ["plan_cache", "scale_arrays", "synthetic_logits"]
