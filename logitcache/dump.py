"""``dump``: run the teacher ensemble on drawn augmented views and write the cache.

Per epoch: a seeded order of the dataset, a uint64 seed per view, parameters drawn from it,
the view the teachers see, and their top-k + tail statistic per member and for the ensemble.
Views are made in DataLoader workers, teachers run back to back on each batch on the device,
top-k is taken on the device, and whole chunks go to a background writer; the per-batch path,
pipelined so the device never waits for the host, is :mod:`logitcache.pipeline`.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from logitcache import checks
from logitcache.augment import (Augmenter, epoch_order, id_hashes, load_ops_spec, make_spec, presets_for, view_rate,
                                view_seeds)
from logitcache.cache import (CacheWriter, choose_chunk_rows, existing_cache_message, existing_manifest,
                              stored_content)
from logitcache.codecs import get_codec
from logitcache.codecs.topk import VALUE_DTYPES
from logitcache.device import autocast, resolve_device
from logitcache.distributed import deal_chunks
from logitcache.distributed import setup as dist_setup
from logitcache.errors import LogitCacheError, one_line_worker_errors, quote
from logitcache.lm import check_lm_dump
from logitcache.layout import MEMBER_STATS, Layout, codec_entries, new_manifest
from logitcache.sources import Source, check_kind, open_source, settings_for
from logitcache.sources import image_size as check_image_size
from logitcache.storage import backend_for_new, cache_location, is_url
from logitcache.hetero import absent_classes, check_specialists, configure_teachers
from logitcache.targets import AGGREGATIONS, KINDS, index_dtype
from logitcache.teachers import Teacher, load_teachers, position_shape, probe_teachers, run_teachers
from logitcache.pipeline import ChunkRows, EpochStep, TeacherPass, run_epoch
from logitcache.views import DrawnViews, SourceContent, ViewSource, collate_views

def default_workers(dev: torch.device) -> int:
    """DataLoader workers making views when ``--workers`` is not given (see README, Performance)."""
    cpus = os.cpu_count() or 1
    if dev.type == "cuda":
        return max(1, min(8, cpus - 1))
    return max(0, min(2, cpus - 1))


def choose_workers(view_seconds: float, teacher_seconds: float, cores: int, threads: int | None = None) -> int:
    """DataLoader workers for a CPU dump from measured costs per view (one core each): the count
    with the fewest estimated seconds per view. With no worker the main process makes each view,
    then the teachers run on their threads; with w workers, the views (w cores) and the teachers
    overlap and the slower side sets the pace. The teachers get ``threads`` (None: the cores the
    workers leave, as :func:`cpu_threads` sets), at most the cores left:

        est(0) = view + teachers / t(0)        est(w) = max(view / w, teachers / t(w))

    Teachers are taken to scale linearly with threads (a bound: they rarely do better), so a
    worker is chosen only when it pays even then; ties go to fewer workers. On 2 cores with the
    default threads: no worker while views cost at most half the teachers. See README, Performance."""
    cores = max(1, cores)

    def est(w: int) -> float:
        t = max(1, min(threads or cores, cores - w))
        return view_seconds + teacher_seconds / t if w == 0 else max(view_seconds / w, teacher_seconds / t)
    return min(range(min(8, cores - 1) + 1), key=lambda w: (est(w), w))


def measure_costs(views: DrawnViews, teachers: list[Teacher], dev: torch.device, precision: str,
                  n: int = 8) -> tuple[float, float]:
    """(CPU seconds to make one view, the teachers' CPU seconds on one view), both on one thread,
    from the epoch's first ``n`` views in two equal batches, each cost the cheaper batch's (the
    first pays one-time costs: a new batch shape's kernels, first file reads). CPU time of this
    thread, not wall time: on a shared box the wall time of either swung 5-20x with the other
    jobs, its CPU time by 20 %. So waits for a slow disk do not count: there, ``--workers``.
    The views' decoding stays cached for the loop and for forked workers."""
    h = max(1, min(n, len(views)) // 2)
    ids = lambda: [views.source.folder.ids[i] for i in views.order[:2 * h]]  # noqa: E731
    before = set_threads(1)
    view_s, teacher_s = [], []
    try:
        with torch.inference_mode(), autocast(dev, precision):
            for a in range(0, min(2 * h, len(views)), h):
                t0 = time.thread_time()
                wave = collate_views([views[i] for i in range(a, a + h)])[0]
                t1 = time.thread_time()
                run_teachers(teachers, wave.to(dev), ids)
                view_s.append(t1 - t0)
                teacher_s.append(time.thread_time() - t1)
    finally:
        torch.set_num_threads(before)
    return min(view_s) / h, min(teacher_s) / h


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what this process may use (SLURM/cgroup limits), not the box
    except AttributeError:
        return os.cpu_count() or 1


def cpu_threads(dev: torch.device, workers: int, threads: int | None = None) -> int | None:
    """torch's intra-op threads for a dump or training run: ``threads`` if given; on CPU the cores the
    DataLoader workers leave free, unless OMP_NUM_THREADS is set (then torch's own choice stands);
    None means "leave torch's setting". torch's default, one thread per core, competes with the
    workers making views: a CPU dump next to one worker ran 2.7x slower (measured)."""
    if threads is not None:
        return threads
    if dev.type != "cpu" or os.environ.get("OMP_NUM_THREADS"):
        return None
    return max(1, _cores() - workers)


def set_threads(n: int | None) -> int:
    """Set torch's intra-op threads to ``n`` (None: leave them); returns the previous count, to restore."""
    before = torch.get_num_threads()
    if n is not None and n != before:
        torch.set_num_threads(n)
    return before


def check_out(out) -> None:
    """A local ``--out`` must name the cache itself: ".", "/" or "x/.." name a folder that a dump
    would write into (and the lock file beside it would have no name)."""
    if not is_url(out) and Path(out).name in ("", ".", ".."):
        raise LogitCacheError(f"--out {out}: names a folder, not a cache; give the cache's own path "
                              f"(for example {Path(out) / 'run.zarr'})")


def optimise_teachers(teachers: list[Teacher], dev: torch.device, compile: bool = False,
                      channels_last: bool = False) -> None:
    """Opt-in speed-ups for an accelerator box: channels-last weights and ``torch.compile``.

    Both change float rounding (not what is computed), so a cache's bytes depend on them; the
    manifest records them."""
    for t in teachers:
        if channels_last:
            try:
                t.module = t.module.to(memory_format=torch.channels_last)
            except (AttributeError, RuntimeError, TypeError) as e:
                raise LogitCacheError(f"teacher {t.source}: --channels-last failed ({str(e).splitlines()[0][:160]})") from None
        if compile:
            t.module = torch.compile(t.module, dynamic=None)


def dump(
    data: str | Path,
    teachers: list[str],
    out: str | Path,
    *,
    epochs: int = 1,
    topk: int = 20,
    augment: str | None = None,
    seed: int = 0,
    batch_size: int = 32,
    device: str = "auto",
    output_kind: str | None = None,
    aggregation: str = "mean_prob",
    ensemble_weights: list[float] | None = None,
    state_dicts: list[str | None] | None = None,
    teacher_args: dict | None = None,
    members: bool = True,
    value_dtype: str = "float16",
    backend: str | None = None,
    sample_rate: int | None = None,
    clip_seconds: float | None = None,
    image_size: int | list[int] | None = None,
    source: str | None = None,
    precision: str = "fp32",
    compile: bool = False,
    channels_last: bool = False,
    num_workers: int | None = None,
    chunk_rows: int | None = None,
    resume: bool = False,
    progress: bool = True,
    distributed: bool | None = None,
    threads: int | None = None,
    codec: str = "topk",
    value_bits: int | None = None,
    sample_n: int | None = None,
    sample_head: int | None = None,
    sample_temperature: float | None = None,
    teacher_sample_rates: list[int | None] | None = None,
    teacher_clip_seconds: list[float | None] | None = None,
    class_maps: list[str | None] | None = None,
    unmapped: str = "error",
) -> Path:
    """Dump a cache of ``epochs`` augmented views per sample of the data ``data``.

    ``data`` is a data folder or manifest file (its source kind detected, or named by ``source``;
    see :func:`logitcache.sources.open_source`) or an open :class:`~logitcache.sources.Source`.
    ``output_kind`` defaults to ``multilabel``, and to ``multiclass`` for token data (LM teachers:
    a softmax over the vocabulary, the only kind they take; see :mod:`logitcache.lm`).
    ``augment`` defaults to the modality's preset (audio ``ced``, tokens ``offset``); ``sample_rate`` and
    ``clip_seconds`` (audio) and ``image_size`` (images: an int or ``[H, W]``) override the
    data's defaults.

    With ``resume``, an unfinished cache at ``out`` is continued (chunks not marked done are
    written, nothing else), a complete one is extended to ``epochs`` if that is more, and a
    missing one is created; the settings must match the cache's. Returns the cache path. See the
    README for every option; the CLI maps onto this 1:1. ``state_dicts`` (one per teacher, None
    for none) and ``teacher_args`` (keyword -> value, for every factory that takes it) are as in
    :func:`logitcache.teachers.load_teachers`.

    With ``distributed`` (default: when WORLD_SIZE > 1, as under torchrun) every rank of the
    torch.distributed job calls this with the same arguments: rank 0 creates or reopens the cache
    and holds its lock, each rank draws, runs and writes only the chunks dealt to it (see
    :mod:`logitcache.distributed`), and rank 0 marks the cache complete once all are written.

    ``threads`` sets torch's intra-op threads while the teachers run (see :func:`cpu_threads`);
    the previous setting is restored on return. It does not change the cache's bytes.

    ``codec`` names the target codec of every target set (``topk``, ``compact``, ``sampled``; see
    :mod:`logitcache.codecs`); ``value_bits`` (compact only, 1..16, default 8) its value resolution;
    ``sample_n`` (sampled, required: ids drawn per row), ``sample_head`` (sampled: exact head
    classes, default 0) and ``sample_temperature`` (sampled: the teacher temperature drawn from,
    default 1). Sampled rows are drawn with seeds derived from each view's seed, so they do not
    depend on the batch size or on a resume.

    Teachers that differ (see :mod:`logitcache.hetero`): ``teacher_sample_rates`` and
    ``teacher_clip_seconds`` (one per teacher, None for the dump's) feed a teacher the drawn view
    resampled to its rate and cropped or padded to its length; ``class_maps`` (one JSON file per
    teacher, None for none) map its outputs onto the dataset's classes by name, and ``unmapped``
    ("error" or "ignore") says whether a dataset class its map misses is an error or makes it a
    specialist that contributes to the classes it maps only.
    """
    codec_cls = get_codec(codec)
    sampling = {"sample_n": sample_n, "sample_head": sample_head, "sample_temperature": sample_temperature}
    codec_entries(codec, value_dtype, None, value_bits, **sampling)  # a bad option fails before any work
    if output_kind is not None and output_kind not in KINDS:
        raise LogitCacheError(f"--output-kind {output_kind!r}: choose one of {', '.join(KINDS)}")
    if aggregation not in AGGREGATIONS:
        raise LogitCacheError(f"--aggregation {aggregation!r}: choose one of {', '.join(AGGREGATIONS)}")
    if value_dtype not in VALUE_DTYPES:
        raise LogitCacheError(f"--value-dtype {value_dtype!r}: choose one of {', '.join(VALUE_DTYPES)}")
    if not teachers:
        raise LogitCacheError("at least one --teacher is needed")
    epochs, topk, seed = checks.whole("--epochs", epochs), checks.whole("--topk", topk), checks.seed("--seed", seed)
    batch_size = checks.whole("--batch-size", batch_size)
    sample_rate = checks.optional_whole("--sample-rate", sample_rate)
    clip_seconds = checks.optional_real("--clip-seconds", clip_seconds, 0, above=True)
    num_workers = checks.optional_whole("--workers", num_workers, 0)
    chunk_rows = checks.optional_whole("--chunk-rows", chunk_rows)
    threads = checks.optional_whole("--threads", threads)
    ensemble_weights = checks.ensemble_weights(ensemble_weights, len(teachers))
    check_out(out)
    ctx, device = dist_setup(distributed, device)
    if ctx.active and backend_for_new(out, backend).name != "zarr":  # checked by content again on attach
        raise LogitCacheError(f"{out}: HDF5 allows one writer, so {ctx.world} ranks cannot dump to it; "
                              f"dump to a .zarr cache, or with one rank")
    stored = _stored_manifest(ctx, out, resume, epochs)  # None when out does not exist yet
    if stored is not None and chunk_rows is None:
        chunk_rows = stored.get("chunk_rows")  # a layout choice, not content: keep the cache's

    folder = open_source(data, source)
    if stored is not None:
        check_kind(stored, folder, out)
    output_kind = output_kind or ("multiclass" if folder.modality == "tokens" else "multilabel")
    if folder.modality == "tokens":
        check_lm_dump(output_kind, class_maps, teacher_sample_rates, teacher_clip_seconds)
    if output_kind == "multiclass" and ctx.rank == 0:
        _warn_multi_label(folder)
    size = None if image_size is None else check_image_size(image_size, "--image-size")
    settings = settings_for(folder, {"--sample-rate": ("sample_rate", sample_rate),
                                     "--clip-seconds": ("clip_seconds", clip_seconds), "--image-size": ("size", size)})
    folder.scan()  # fails fast on missing, undecodable or empty files, before any teacher time is spent
    presets, default_preset = presets_for(folder.modality)
    augmenter = Augmenter.from_spec(make_spec(folder.modality, load_ops_spec(augment or default_preset, presets),
                                              settings))
    folder.configure(augmenter.spec)
    dev = resolve_device(device)
    loaded = load_teachers(teachers, state_dicts, teacher_args, dev)
    configure_teachers(loaded, view_rate(augmenter), folder.classes, sample_rates=teacher_sample_rates,
                       clip_seconds=teacher_clip_seconds, class_maps=class_maps, unmapped=unmapped)
    num_classes, frames = probe_teachers(loaded, augmenter.view_shape, dev, output_kind,
                                         inputs=getattr(augmenter, "probe_views", None))
    optimise_teachers(loaded, dev, compile=compile, channels_last=channels_last)
    if folder.modality == "tokens" and num_classes != len(folder.classes):
        raise LogitCacheError(f"teachers output V={num_classes} but {folder.root} has vocab_size {len(folder.classes)}")
    if num_classes != len(folder.classes):
        raise LogitCacheError(f"teachers output C={num_classes} classes but {folder.root} defines "
                              f"{len(folder.classes)} (classes.txt / labels.csv)")
    if not 1 <= topk <= num_classes:
        raise LogitCacheError(f"--topk {topk}: must be between 1 and the number of classes ({num_classes})")
    check_specialists(loaded, folder.classes, output_kind, codec, topk)

    N = len(folder)
    member_names = [t.name for t in loaded] if members else []
    entries = codec_entries(codec, value_dtype, index_dtype(num_classes), value_bits, **sampling)
    encoder = codec_cls(topk, num_classes, output_kind, frames, entries["codec_options"])
    encoder.fields()  # bad options fail here, before anything is written
    dataset = {"fingerprint": folder.fingerprint, "num_samples": N, **folder.dataset_entry()}
    R = chunk_rows if chunk_rows is not None else choose_chunk_rows(encoder.chunk_sizing_bytes(), N)
    manifest = new_manifest(
        dataset=dataset, source=folder.describe(), classes=folder.classes, augmenter=augmenter,
        teachers=[t.describe() for t in loaded],
        members=member_names, output_kind=output_kind, aggregation=aggregation, weights=ensemble_weights,
        topk=topk, frames=frames, value_dtype=value_dtype, epochs=epochs, seed=seed, chunk_rows=R, codec=entries,
        run={"precision": precision, "compile": bool(compile), "channels_last": bool(channels_last),
             "device": dev.type}, positions=position_shape(loaded))
    for t in loaded:  # a specialist's member set: the classes it stores at ABSENT_LOGIT (probability 0)
        absent, ts = absent_classes(t, folder.classes), manifest["target_sets"].get(Layout.target_set_of(t.name))
        if absent and ts is not None:
            ts["absent_classes"] = absent
    writer = _open_writer(ctx, out, manifest, folder.ids, augmenter.param_specs, backend, resume)
    for note in writer.notes:
        print(f"note: {note}", file=sys.stderr)
    if not writer.todo.any() and writer.manifest.get("complete"):
        writer.close()
        return cache_location(out)
    source = ViewSource(folder, augmenter)
    content, store_content = _content_so_far(writer, N)
    hashes = id_hashes(folder.ids)
    R = manifest["chunk_rows"]
    moments = writer.manifest.get("member_stats") == MEMBER_STATS  # a resumed older cache has none
    per_chunk = set(Layout.stats_path(n) for n in member_names) if moments else set()
    chunk_sizes = np.minimum(R, N - np.arange(writer.todo.shape[1]) * R)
    if num_workers is None:
        try:  # the views measured are real: a bad file fails here, as it would in the loop
            num_workers = _default_workers(source, loaded, dev, precision, writer.todo, seed, hashes, threads)
        except BaseException as e:
            writer.abort()
            ctx.report_failure(e)
            raise
    teacher_pass = TeacherPass(loaded, dev, precision, encoder, output_kind, aggregation, ensemble_weights, members,
                               folder.ids, tokens=folder.modality == "tokens", moments=moments)
    started = time.perf_counter()
    threads_before = set_threads(cpu_threads(dev, num_workers, threads))
    bar = tqdm(total=int((writer.todo * chunk_sizes).sum()), unit="view",
               desc=(f"dump (rank 0 of {ctx.world})" if ctx.active else "dump")
               + f" [{num_workers} worker{'s' * (num_workers != 1)}, {torch.get_num_threads()} thread(s)]",
               disable=not progress or ctx.rank != 0, dynamic_ncols=True)  # one bar per job, not per rank
    try:
        for epoch in range(epochs):
            if not writer.todo[epoch].any():
                continue  # written by an earlier run
            order = epoch_order(seed, epoch, hashes)
            seeds = view_seeds(seed, epoch, hashes)[order]
            loader = DataLoader(DrawnViews(source, order, seeds), **_batching(writer.todo[epoch], R, N, batch_size),
                                num_workers=num_workers, collate_fn=collate_views, pin_memory=dev.type == "cuda",
                                persistent_workers=False, prefetch_factor=4 if num_workers else None)
            chunks = ChunkRows(writer, epoch, R, N, per_chunk)
            view_rows = _view_rows(order, seeds, writer.manifest, store_content and epoch == 0)
            step = EpochStep(teacher_pass, chunks, content, folder, order, seeds, view_rows, bar.update)
            run_epoch(one_line_worker_errors(loader), step)
        writer.drain()
        ctx.final_sync()  # every rank's chunks are durable before rank 0 calls the cache complete
        if ctx.rank == 0:
            if ctx.active and not writer.store.read("done").astype(bool).all():
                raise LogitCacheError(f"{out}: some chunks were not written by any rank; re-run with --resume")
            writer.finish(complete=True, dump_seconds=round(time.perf_counter() - started, 3))
    except BaseException as e:
        writer.abort()
        ctx.report_failure(e)  # the other ranks wait in final_sync: tell them, or they hang
        raise
    finally:
        bar.close()
        torch.set_num_threads(threads_before)
    writer.close()
    return cache_location(out)


def _default_workers(source: ViewSource, teachers, dev, precision, todo, seed, hashes, threads) -> int:
    """Workers for a dump without ``--workers``: on CPU (not token data, whose teachers stream),
    chosen from the measured costs of the first epoch's first views (:func:`choose_workers`);
    elsewhere :func:`default_workers`. Rows never depend on it."""
    if dev.type != "cpu" or source.folder.modality == "tokens":
        return default_workers(dev)
    if _cores() < 2 or not todo.any():
        return 0  # nothing to overlap on, or nothing left to make (a resume that only finishes)
    epoch = int(np.flatnonzero(todo.any(axis=1))[0])
    order = epoch_order(seed, epoch, hashes)
    view_s, teacher_s = measure_costs(DrawnViews(source, order, view_seeds(seed, epoch, hashes)[order]), teachers,
                                      dev, precision)
    fixed = threads or (torch.get_num_threads() if os.environ.get("OMP_NUM_THREADS") else None)
    return choose_workers(view_s, teacher_s, _cores(), fixed)


def _warn_multi_label(folder: Source) -> None:
    multi = folder.multi_label_rows
    if len(multi):
        print(f"warning: --output-kind multiclass, but {len(multi)} of {len(folder)} rows of "
              f"{folder.labels_file} carry two or more labels "
              f"(first: {quote(folder.ids[multi[0]])}); "
              f"use --output-kind multilabel if a clip can hold several classes", file=sys.stderr)


def _content_so_far(writer: CacheWriter, num_samples: int) -> tuple[SourceContent, bool]:
    """(crc32 of every source file as far as the cache knows it, whether this cache stores
    ``content``). A resumed dump compares every file it decodes with these, so a file edited since
    its views were written is refused instead of mixing two versions of it in one cache. A cache
    from before ``content`` existed has none stored; the files decoded in this run still are."""
    if not writer.manifest.get("content"):
        return SourceContent.empty(num_samples), False
    return SourceContent(*stored_content(writer.store, writer.manifest)), True


def _stored_manifest(ctx, out, resume: bool, epochs: int) -> dict | None:
    """The manifest of the cache at ``out`` (None if there is none), read by rank 0 only: it is
    about to take the lock, and another rank looking would trip over it. Every rank gets the
    answer, or the error."""
    stored, error = None, None
    if ctx.rank == 0:
        try:
            stored = existing_manifest(out)
            if stored is not None and not resume:
                raise LogitCacheError(existing_cache_message(out, stored, epochs))
        except LogitCacheError as e:
            error = e
    ctx.agree(error)
    return ctx.broadcast(stored)


def _open_writer(ctx, out, manifest, ids, param_specs, backend, resume) -> CacheWriter:
    """Rank 0 creates/reopens the cache (layout, manifest, lock); then the other ranks attach to
    it. ``todo`` becomes this rank's share of the chunks still to write."""
    if not ctx.active:
        return CacheWriter(out, manifest, ids, param_specs, backend=backend, resume=resume)
    writer, error = None, None
    if ctx.rank == 0:
        try:
            writer = CacheWriter(out, manifest, ids, param_specs, backend=backend, resume=resume)
        except Exception as e:
            error = e
    ctx.agree(error)
    if ctx.rank != 0:
        try:
            writer = CacheWriter.attach(out)
        except Exception as e:
            error = e
    try:
        ctx.agree(error)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    todo = ctx.broadcast(writer.todo if ctx.rank == 0 else None)
    writer.todo = deal_chunks(todo, ctx.rank, ctx.world)
    return writer


class _TodoBatches:
    """Batches of a resumed epoch: the uninterrupted run's batches (consecutive positions from 0)
    cut down to the chunks still to write, so most batches hold the same views as they would have
    (teachers on accelerators are not always bit-invariant to batch composition)."""

    def __init__(self, todo: np.ndarray, rows: int, num_samples: int, batch_size: int):
        self.need = np.repeat(todo, rows)[:num_samples]
        self.batch_size = batch_size
        starts = range(0, num_samples, batch_size)
        self.count = sum(bool(self.need[a:a + batch_size].any()) for a in starts)

    def __iter__(self):
        B = self.batch_size
        for a in range(0, len(self.need), B):
            pos = np.flatnonzero(self.need[a:a + B])
            if len(pos):
                yield (pos + a).tolist()

    def __len__(self) -> int:
        return self.count


def _batching(todo: np.ndarray, rows: int, num_samples: int, batch_size: int) -> dict:
    """DataLoader batching over the positions of the chunks in ``todo`` (skipped views are never drawn)."""
    if todo.all():
        return {"batch_size": batch_size, "shuffle": False}
    return {"batch_sampler": _TodoBatches(todo, rows, num_samples, batch_size)}


def _view_rows(order: np.ndarray, seeds: np.ndarray, manifest: dict, content: bool) -> Callable:
    """The rows of a batch made on the host: order and seeds (unless the cache derives them on
    read), the drawn params and, in a cache's first epoch, each view's source crc (``content``)."""
    derived = set(manifest.get("derived_arrays") or ())
    dtype = manifest["order_dtype"]

    def rows(pos: np.ndarray, params: dict[str, np.ndarray], decoded) -> dict[str, np.ndarray]:
        out = {} if "order" in derived else {"order": order[pos].astype(dtype)}
        if "seeds" not in derived:
            out["seeds"] = seeds[pos]
        out.update((Layout.param_path(k), v) for k, v in params.items())
        if content:
            out["content"] = decoded.own
        return out

    return rows
