"""The dump's per-batch path: teachers and codec on the device, rows back to the host, whole chunks
to the background writer. Pipelined, so that the device never waits for the host.

For each batch the main process queues, in this order: the copy of its views to the device (a
side stream, overlapping the forward still running), the teachers' forward and the codec's encode
(the compute stream), the copy of its rows and bad-row flags into pinned host buffers (another
side stream); only then does it materialise the *previous* batch's rows (wait for their copy,
check them, pack them, add them to their chunk, which the writer thread assembles). The one wait
per batch is where the data is needed, and by then the device already holds the next batch's work.
On CPU the streams are no-ops and the same code runs in the same order, so the tests exercise it.

:func:`run_epoch` is the loop, :class:`TeacherPass` the device side, :class:`ChunkRows` the chunk
bookkeeping (:class:`ChunkParts`, assembled on the writer thread); ``benchmarks/bench_dump_host.py``
drives exactly these on premade batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch

from logitcache.codecs import target_set_seeds
from logitcache.device import autocast
from logitcache.errors import LogitCacheError
from logitcache.hetero import coverage, ensemble_logits
from logitcache.layout import Layout, target_sets
from logitcache.teachers import run_teachers


def logit_moments(z: torch.Tensor) -> torch.Tensor:
    """[B, 3] float64 per view of one teacher's logits ``[B, (T,) C]``: the sum of its logits, of their
    squares, and of each row's (frame's) logit sum squared over C (``layout.MOMENTS``)."""
    z = z.double()
    s = z.sum(-1)
    parts = [s, (z * z).sum(-1), s * s / z.shape[-1]]
    return torch.stack([p.reshape(z.shape[0], -1).sum(1) for p in parts], -1)


@dataclass
class Pending:
    """One batch between its device work being queued and its rows being materialised."""

    index: np.ndarray  # dataset index of each view (names samples in errors)
    fields: list[str]  # what the codec's encode gave (its pack turns them into the stored fields)
    host: dict[str, torch.Tensor]  # host tensors the device copies into (valid once ``ready``)
    ready: "torch.cuda.Event | None"  # None: already on the host
    device: dict[str, torch.Tensor]  # the device tensors being copied: held until the copy is done
    pos: np.ndarray | None = None  # positions in the epoch's stored order
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # host-made rows (order, params, content)


def host_buffers(tensors: dict[str, torch.Tensor], pin: bool) -> dict[str, torch.Tensor]:
    """Empty host tensors shaped like ``tensors``, carved from one buffer: one (pinned) allocation per
    batch, not one per field (clip level holds thousands of batches in flight per chunk; small
    pinned blocks each cost a page and a driver call)."""
    sizes = [t.numel() * t.element_size() for t in tensors.values()]
    starts = np.concatenate([[0], np.cumsum([-(-n // 64) * 64 for n in sizes])])  # aligned for any dtype
    buf = torch.empty(int(starts[-1]), dtype=torch.uint8, pin_memory=pin)
    return {name: buf[int(a):int(a) + n].view(t.dtype).view(t.shape)
            for (name, t), a, n in zip(tensors.items(), starts, sizes)}


class Streams:
    """Copies to and from a CUDA device on side streams, through pinned host buffers; on any other
    device the views are used where they are and results read in place (no streams).

    Each batch's results get a fresh pinned buffer (:func:`host_buffers`, from torch's caching host
    allocator: a buffer comes back for reuse once freed and its copy is done), because a chunk's
    rows are copied out of them on the writer thread, whenever it gets to them (:class:`ChunkParts`);
    the writer's bounded queue bounds how many are held (the batches of the chunk being filled and
    of at most ``queue_size`` + 1 chunks handed over)."""

    def __init__(self, dev: torch.device):
        self.dev, self.cuda = dev, dev.type == "cuda"
        if self.cuda:
            self.h2d, self.d2h = torch.cuda.Stream(dev), torch.cuda.Stream(dev)

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        if not self.cuda:
            return x.to(self.dev, non_blocking=True)
        compute = torch.cuda.current_stream(self.dev)
        with torch.cuda.stream(self.h2d):
            y = x.to(self.dev, non_blocking=True)
        compute.wait_stream(self.h2d)
        y.record_stream(compute)  # made on h2d, used (and freed) on the compute stream
        return y

    def to_host(self, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], "torch.cuda.Event | None"]:
        """(host tensors, event set once they hold the values; None when they already do)."""
        if not self.cuda:
            return {name: t.cpu() for name, t in tensors.items()}, None
        self.d2h.wait_stream(torch.cuda.current_stream(self.dev))
        host = host_buffers(tensors, pin=True)
        with torch.cuda.stream(self.d2h):
            for name, t in tensors.items():
                host[name].copy_(t, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(self.d2h)
        return host, ready

    def fetch(self, tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """``to_host`` and the wait at once."""
        host, ready = self.to_host(tensors)
        if ready is not None:
            ready.synchronize()
        return {name: t.numpy() for name, t in host.items()}


class TeacherPass:
    """The teachers back to back on one batch and the codec's encode of every stored target set, on
    the device; ``submit`` queues it, ``rows`` waits for the results and returns the stored rows.

    Each teacher's output is held to the probed shape, and every stored target set (members and
    the ensemble, whose weights can make it NaN on their own) must be finite, or the batch is
    refused whole, naming its samples. ``moments``: also each member's per-view logit sums
    (:func:`logit_moments`), for the member statistics."""

    def __init__(self, teachers, dev: torch.device, precision: str, codec, kind: str, aggregation: str,
                 weights, members: bool, ids: list[str], tokens: bool = False, moments: bool = False):
        self.teachers, self.dev, self.precision, self.codec = teachers, dev, precision, codec
        self.kind, self.aggregation, self.weights, self.members = kind, aggregation, weights, members
        self.ids, self.tokens, self.moments = ids, tokens, moments and members
        self.prefixes = target_sets({"members": [t.name for t in teachers] if members else []})
        self.paths: dict[str, list[str]] = {}  # stored field -> its array in each target set
        self.stats_paths = [Layout.stats_path(t.name) for t in teachers]
        self.covered = coverage(teachers)
        self.seeded = codec.seeded  # only codecs that draw need per-row seeds (derived per batch, on the host)
        self.narrow = codec.narrow_dtypes()
        self.streams = Streams(dev)

    def names(self, index: np.ndarray, rows=None) -> list[str]:
        return [self.ids[i] for i in (index if rows is None else index[rows])]

    def submit(self, wave: torch.Tensor, index: np.ndarray, view_seeds=None) -> Pending:
        """Queue one batch's device work and the copy of its results to the host; returns at once
        on an accelerator (unless a teacher itself waits)."""
        index = np.asarray(index)
        x = self.streams.to_device(wave)
        with torch.inference_mode():
            fields, device = self._encode(x, index, view_seeds)
            host, ready = self.streams.to_host(device)
        return Pending(index, fields, host, ready, device)

    def _encode(self, x: torch.Tensor, index: np.ndarray, view_seeds) -> tuple[list[str], dict[str, torch.Tensor]]:
        """The device section: (the codec's encoded fields, every tensor to bring back: bad-row flags
        per teacher and per target set, the encoded rows, member moments)."""
        bad, encoded, extra = (self._streamed if self.tokens else self._stacked)(x, index, view_seeds)
        G, B = len(self.prefixes), x.shape[0]
        bad_sets = ~self.codec.finite_rows(encoded).reshape(G, B, -1).all(-1)
        return list(encoded), {"bad": bad, "bad_sets": bad_sets, **self._narrowed(encoded), **extra}

    def _narrowed(self, encoded: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Integer fields cast on the device to their stored dtype (frame level: half the bytes of
        the indices to copy back, and no cast on the host)."""
        try:
            return {**encoded, **{f: encoded[f].to(dt) for f, dt in self.narrow.items() if f in encoded}}
        except (RuntimeError, TypeError):  # a device without kernels for the type: pack casts on the host
            self.narrow = {}
            return encoded

    def _stacked(self, x: torch.Tensor, index: np.ndarray, view_seeds):
        """Ensemble and members stacked [G, B, (T,) C]: one encode pass for all (row-wise, so the same
        bits as one group at a time), a fraction of the kernel launches of one pass per set."""
        with autocast(self.dev, self.precision):
            logits = run_teachers(self.teachers, x, lambda: self.names(index))
        zs = torch.stack(logits)  # [M, B, (T,) C]
        M, B = zs.shape[:2]
        bad = ~torch.isfinite(zs).reshape(M, B, -1).all(-1)
        ensemble = ensemble_logits(zs, self.kind, self.aggregation, self.weights, self.covered)
        z = torch.cat([ensemble[None], zs]) if self.members else ensemble[None]
        seeds = target_set_seeds(view_seeds, len(z)) if self.seeded and view_seeds is not None else None
        encoded = self.codec.encode(z, seeds)
        extra = {"moments": logit_moments(zs.flatten(0, 1)).reshape(M, B, 3)} if self.moments else {}
        return bad, encoded, extra

    def _streamed(self, x: torch.Tensor, index: np.ndarray, view_seeds):
        """Tokens: [B, L, V] per teacher, one teacher and one block of positions at a time."""
        from logitcache.lm import stream_encode

        bad, encoded, stats = stream_encode(self.teachers, x, lambda rows=None: self.names(index, rows), self.dev,
                                            self.precision, self.codec, self.aggregation, self.weights,
                                            self.members, view_seeds, self.moments)
        return bad, encoded, ({"moments": stats} if stats is not None else {})

    def rows(self, pending: Pending) -> dict[str, np.ndarray]:
        """The batch's stored rows (array name -> [B, ...]), once its copy to the host is done. They
        are views of this batch's own host buffers (never written again), so they can be kept."""
        if pending.ready is not None:
            pending.ready.synchronize()
        host = {name: t.numpy() for name, t in pending.host.items()}
        pending.device = {}
        if host["bad"].any() or host["bad_sets"].any():
            self._refuse(host, pending.index)
        stored = self.codec.pack({f: host[f] for f in pending.fields})  # all groups at once: [G, B, ...]
        out = {path: a[g] for f, a in stored.items() for g, path in enumerate(self._paths(f))}
        if "moments" in host:
            out.update(zip(self.stats_paths, host["moments"]))
        out.update(pending.extra)
        return out

    def _paths(self, field: str) -> list[str]:
        if field not in self.paths:
            self.paths[field] = [Layout.target_path(p, field) for p in self.prefixes]
        return self.paths[field]

    def _refuse(self, host: dict[str, np.ndarray], index: np.ndarray) -> None:
        for t, row_bad in zip(self.teachers, host["bad"]):
            if row_bad.any():
                raise LogitCacheError(f"teacher {t.name} produced NaN/Inf logits for sample(s) "
                                      f"{', '.join(self.names(index, row_bad)[:5])}")
        for prefix, row_bad in zip(self.prefixes, host["bad_sets"]):
            if row_bad.any():
                hint = " (check --ensemble-weight)" if prefix == "ensemble" and self.weights else ""
                raise LogitCacheError(f"target set {prefix}: NaN/Inf values for sample(s) "
                                      f"{', '.join(self.names(index, row_bad)[:5])}{hint}")


class ChunkParts:
    """One chunk's rows as the batches gave them (references, no copy), assembled when called:
    on the writer thread, so the main thread never copies a row (at frame level, T = 250, that
    copy was 84-404 KB per view). Each array is allocated once and filled in place, in position
    order; ``per_chunk`` arrays (member logit sums, one row per view here) are then summed into the
    chunk's one row, so the sum does not depend on how the chunk's views were batched.

    The rows must not change after they are added: fresh arrays per batch (the encode's outputs on
    CPU, a fresh pinned buffer per batch on CUDA: :class:`Streams`)."""

    def __init__(self, size: int, per_chunk: set[str]):
        self.size, self.per_chunk = size, per_chunk
        self.parts: list[tuple[int, dict[str, np.ndarray], int, int]] = []  # (offset, rows, a, b)

    def add(self, offset: int, rows: dict[str, np.ndarray], a: int, b: int) -> None:
        self.parts.append((offset, rows, a, b))

    def __call__(self) -> dict[str, np.ndarray]:
        first = self.parts[0][1]
        block = {k: np.empty((self.size, *v.shape[1:]), v.dtype) for k, v in first.items()}
        for o, rows, a, b in self.parts:
            for k, v in rows.items():
                block[k][o:o + b - a] = v[a:b]
        self.parts = []  # the batches' buffers go back as soon as the chunk holds their rows
        for k in self.per_chunk & set(block):
            block[k] = block[k].sum(0, keepdims=True)
        return block


class ChunkRows:
    """Rows of one epoch in stored order -> whole chunks handed to the writer as they fill.

    Batches may straddle chunk edges. A chunk is handed over as its :class:`ChunkParts` (the
    writer assembles it on its thread); the writer's bounded queue holds the main thread back when
    it falls behind, as it does for assembled chunks."""

    def __init__(self, writer, epoch: int, rows: int, num_samples: int, per_chunk: set[str]):
        self.writer, self.epoch, self.R, self.N, self.per_chunk = writer, epoch, rows, num_samples, per_chunk
        self.chunk, self.parts = -1, ChunkParts(0, per_chunk)

    def add(self, pos: np.ndarray, rows: dict[str, np.ndarray]) -> None:
        a, R = 0, self.R
        while a < len(pos):
            p = int(pos[a])
            c = p // R
            b = min(len(pos), a + (c + 1) * R - p)  # positions within one chunk are consecutive
            if c != self.chunk:
                self.chunk, self.parts = c, ChunkParts(min(R, self.N - c * R), self.per_chunk)
            self.parts.add(p - c * R, rows, a, b)
            if int(pos[b - 1]) + 1 == min((c + 1) * R, self.N):
                parts, self.chunk, self.parts = self.parts, -1, ChunkParts(0, self.per_chunk)
                self.hand_over(c, parts)
            a = b

    def hand_over(self, chunk: int, parts: ChunkParts) -> None:
        self.writer.put(self.epoch, chunk, parts)


class EpochStep:
    """One epoch of the dump, batch by batch: ``start`` takes a loader batch (views, drawn params,
    positions, files decoded), checks its files' content and queues its device work; ``finish``
    stores its rows in their chunk. ``view_rows(pos, params, decoded)`` gives the rows made on the
    host (order, seeds, params, content)."""

    def __init__(self, teacher_pass: TeacherPass, chunks: ChunkRows, content, folder, order: np.ndarray,
                 seeds: np.ndarray, view_rows: Callable, progress: Callable[[int], object] = lambda n: None):
        self.teacher_pass, self.chunks, self.content, self.folder = teacher_pass, chunks, content, folder
        self.order, self.seeds, self.view_rows, self.progress = order, seeds, view_rows, progress

    def start(self, batch) -> Pending:
        wave, params, pos, decoded = batch
        self.content.record(self.folder, decoded.index, decoded.crc)  # before any teacher time is spent
        pending = self.teacher_pass.submit(wave, self.order[pos], self.seeds[pos])
        pending.pos, pending.extra = pos, self.view_rows(pos, params, decoded)
        return pending

    def finish(self, pending: Pending) -> None:
        self.chunks.add(pending.pos, self.teacher_pass.rows(pending))
        self.progress(len(pending.pos))


def run_epoch(batches: Iterable, step: EpochStep) -> None:
    """Every batch through ``step``, a batch's rows finished only once the next batch is queued.

    On any error (a bad batch, a failing teacher, a worker's error, an interrupt) the batch
    already queued is finished first, so exactly the chunks the unpipelined loop would have
    written are handed to the writer, and an earlier batch's error is the one raised."""
    pending = None
    try:
        for batch in batches:
            queued = step.start(batch)
            done, pending = pending, None
            if done is not None:
                step.finish(done)
            pending = queued
        done, pending = pending, None
        if done is not None:
            step.finish(done)
    except BaseException:
        if pending is not None:
            step.finish(pending)
        raise
    finally:
        close = getattr(batches, "close", None)  # a generator over a DataLoader: its workers stop now,
        if close is not None:  # not when the traceback holding this frame is collected
            close()
