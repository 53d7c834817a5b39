"""Augmented views: drawn (dump) or replayed from stored parameters (training, fidelity).

Each view is computed per sample, from the decoded source and its parameters only, so the
same (epoch, sample) gives the same float32 view (waveform or image) alone, in any batch, in any
worker. Data comes from a :class:`~logitcache.sources.Source` of any kind.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, default_collate, get_worker_info

from logitcache.augment import Augmenter
from logitcache.cache import Cache, open_cache
from logitcache.data import PATH_LIMIT
from logitcache.errors import LogitCacheError, shorten
from logitcache.vocabulary import words
from logitcache.recompose import Composition, requested
from logitcache.recompose import read_block as read_recomposed
from logitcache.sources import Source, check_kind, open_source


MEMBER_PREFIX = "members/"  # batch keys of the members' targets for per-teacher heads, [B, M, ...]


def check_compatible(cache: Cache, folder: Source) -> None:
    """Refuse data other than the one the cache was dumped from (another source kind, other ids
    or classes)."""
    m = cache.manifest
    check_kind(m, folder, cache.path)
    if folder.fingerprint != m["dataset"]["fingerprint"]:
        raise LogitCacheError(
            f"{folder.root}: dataset does not match cache {cache.path} (its ids differ: "
            f"{len(folder)} samples here, {m['dataset']['num_samples']} in the cache)")
    classes = cache.classes
    if folder.classes != classes:
        if folder.modality == "tokens":  # a vocabulary is described, not listed: name both
            raise LogitCacheError(f"{folder.root}: vocabulary {words(folder.classes)} differs from the one cache "
                                  f"{cache.path} was dumped with ({words(classes)})")
        raise LogitCacheError(f"{folder.root}: class list differs from the one cache {cache.path} was dumped with")


class SourceContent:
    """crc32 of each sample's source file (dataset order) where known: what the cache's targets
    were computed from. Readers check every file they decode against it (``check``); the dump
    checks and extends it with every view it draws (``record``)."""

    def __init__(self, crc: np.ndarray, known: np.ndarray):
        self.crc, self.known = crc, known

    @classmethod
    def empty(cls, num_samples: int) -> "SourceContent":
        return cls(np.zeros(num_samples, np.uint32), np.zeros(num_samples, bool))

    @classmethod
    def of_cache(cls, cache: Cache) -> "SourceContent | None":
        """From the cache's ``content`` array; None for a cache written before it existed."""
        stored = cache.content()
        return None if stored is None else cls(*stored)

    def check(self, folder: Source, index: int, crc: int) -> None:
        if self.known[index] and int(self.crc[index]) != crc:
            path = shorten(folder.path_of(index), PATH_LIMIT)
            raise LogitCacheError(f"{path}: changed since the dump (content crc differs); the cache's "
                                  f"targets belong to the old file")

    def record(self, folder: Source, index: np.ndarray, crc: np.ndarray) -> None:
        """Take the crcs of files just decoded (``index`` may repeat); refuse any that differs from
        what an earlier view of the same file, or the cache, holds."""
        new = ~self.known[index]
        if new.any():  # first sight: the first occurrence defines it, any later one is compared
            first, at = np.unique(index[new], return_index=True)
            self.crc[first], self.known[first] = crc[new][at], True
        bad = np.flatnonzero(self.crc[index] != crc)
        if len(bad):
            i = int(index[bad[0]])
            now, was = int(crc[bad[0]]), int(self.crc[i])
            raise LogitCacheError(f"data changed since the dump started: {shorten(folder.ids[i])} "
                                  f"(crc {now:08x} now, {was:08x} in the cache); restore it or dump to a "
                                  f"new --out")


class ViewSource:
    """Decodes a sample and applies parameters to it; shared by dump, replay and training.

    With ``content``, every file decoded (a view's own source and its mixup partner) is checked
    against the crc its targets were computed from. Methods taking ``seen`` append
    ``(dataset index, crc)`` of each file they decode to it, the view's own source first."""

    def __init__(self, folder: Source, augmenter: Augmenter, content: SourceContent | None = None):
        self.folder, self.augmenter, self.content = folder, augmenter, content
        folder.configure(augmenter.spec)  # decode as the views need it (audio: at the spec's rate)

    def load(self, index: int, seen: list | None = None) -> torch.Tensor:
        wave, crc = self.folder.load_with_crc(int(index))
        if self.content is not None:
            self.content.check(self.folder, int(index), crc)
        if seen is not None:
            seen.append((int(index), crc))
        return wave

    def context(self, index: int, source: torch.Tensor, seen: list | None = None):
        aug, n = self.augmenter, len(self.folder)
        if self.folder.modality == "image":  # partners come as sources: mixup and cutmix fit them their own way
            return aug.context(num_samples=n, sample_index=int(index), source_size=tuple(source.shape[-2:]),
                               load_partner=lambda j: self.load(j, seen))
        return aug.context(num_samples=n, sample_index=int(index), source_samples=source.shape[-1],
                           load_partner=lambda j: aug.fit_clip(self.load(j, seen)))

    def plain(self, index: int) -> torch.Tensor:
        """The un-augmented view of a sample (evaluation): its source fitted to the view shape."""
        return self.augmenter.fit(self.load(index))

    def draw(self, index: int, seed: int, seen: list | None = None,
             share: bool = False) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
        """A view and its drawn params. ``share`` (audio): the view may share the decoded
        source's memory, for a caller that copies it at once (see ``Augmenter.apply``)."""
        source = self.load(index, seen)
        ctx = self.context(index, source, seen)
        params = self.augmenter.draw(int(seed), ctx)
        if share and self.folder.modality == "audio":
            return self.augmenter.apply(source, params, ctx, share=True), params
        return self.augmenter.apply(source, params, ctx), params

    def replay(self, index: int, params: dict[str, np.ndarray], seen: list | None = None) -> torch.Tensor:
        source = self.load(index, seen)
        return self.augmenter.apply(source, params, self.context(index, source, seen))

    def replay_tokens(self, index: int, params: dict[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
        """A token window (``tokens`` sources): (ids [L], next-token ids [L] with -1 where masked,
        mask [L]), all from the source and the stored params (the rule: :mod:`logitcache.augment_tokens`)."""
        return self.augmenter.window(self.load(index), params)

    def labels(self, index: int, params: dict[str, np.ndarray]) -> np.ndarray:
        """Hard labels of the view, mixed as the view was (mixup, cutmix: see :func:`batch_labels`)."""
        one = {k: np.asarray(v)[None] for k, v in params.items()}
        return batch_labels(self.folder, np.array([int(index)]), one, self.augmenter.mixers)[0]


class DrawnViews(Dataset):
    """Positions of one epoch's stored order -> (view, drawn params, position, files decoded as
    ``[(dataset index, crc)]``, own source first). Used by dump, through ``collate_views``: an
    audio view may share the (cached) decoded source's memory until the batch is stacked."""

    def __init__(self, source: ViewSource, order: np.ndarray, seeds: np.ndarray):
        self.source, self.order, self.seeds = source, order, seeds

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, pos: int):
        seen: list[tuple[int, int]] = []
        # items go straight to collate_views, whose stack is the view's one copy
        wave, params = self.source.draw(self.order[pos], self.seeds[pos], seen, share=True)
        return wave, params, pos, seen


class Decoded(NamedTuple):
    """The files a batch of views decoded: ``own`` [B] crc32 of each view's source; ``index`` /
    ``crc`` [M] every file decoded (sources and mixup partners), dataset index and crc32."""

    own: np.ndarray
    index: np.ndarray
    crc: np.ndarray


def collate_views(items):
    waves, params, pos, seen = zip(*items)
    stacked = {k: np.stack([p[k] for p in params]) for k in params[0]}
    flat = [x for s in seen for x in s]
    decoded = Decoded(np.array([s[0][1] for s in seen], np.uint32), np.array([i for i, _ in flat], np.int64),
                      np.array([c for _, c in flat], np.uint32))
    # default_collate stacks into shared memory inside a DataLoader worker, so the batch reaches
    # the main process without the copy that pickling a plain tensor makes
    return default_collate(list(waves)), stacked, np.asarray(pos, dtype=np.int64), decoded


def row_params(block: dict[str, np.ndarray], row: int) -> dict[str, np.ndarray]:
    return {k[len("params/"):]: v[row] for k, v in block.items() if k.startswith("params/")}


def batch_labels(folder: Source, index: np.ndarray, params: dict[str, np.ndarray],
                 mixers: tuple[str, ...] | list[str] = ("mixup",)) -> np.ndarray:
    """Hard labels of many views (``params``: name -> rows): each op in ``mixers`` (the augmenter's
    ops that mix in a partner, in the order applied) mixes ``y = lam y + (1 - lam) y[partner]``
    where its ``partner`` >= 0; float32 math."""
    y = folder.label_rows(np.asarray(index, dtype=np.int64))
    for op in mixers:
        partner = params.get(f"{op}.partner")
        if partner is None:
            continue
        mixed = np.flatnonzero(np.asarray(partner).reshape(-1) >= 0)
        if len(mixed):
            lam = np.asarray(params[f"{op}.lam"], dtype=np.float32).reshape(-1)[mixed, None]
            y[mixed] = lam * y[mixed] + (np.float32(1) - lam) * folder.label_rows(np.asarray(partner).reshape(-1)[mixed])
    return y


class ChunkReader:
    """Rows of one stored epoch, read as whole chunks (one store call per array per chunk), in the
    order they will be needed, with ``ahead`` chunks read in a background thread while the
    caller works on the current one (decoding and augmenting audio, in a DataLoader worker).
    With ``composition`` the targets are recomposed from stored members, in that thread too."""

    def __init__(self, cache: Cache, epoch: int, chunks: list[int], member: str | None = None, ahead: int = 1,
                 members: list[str] | None = None, composition: Composition | None = None):
        from concurrent.futures import ThreadPoolExecutor

        self.cache, self.epoch, self.member, self.composition = cache, int(epoch), member, composition
        self.members = list(members) if members else None
        self.chunks, self.ahead = list(chunks), int(ahead)
        self._next = 0  # index in self.chunks of the next chunk to submit
        self._pending: dict[int, object] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="logitcache-read") if self.ahead > 0 else None
        self._current: tuple[int, dict[str, np.ndarray]] | None = None

    def _read(self, chunk: int) -> dict[str, np.ndarray]:
        R, N = self.cache.chunk_rows, self.cache.num_samples
        # the losses gather by index, so rows need not be sorted by value (compact decodes ~1.4x faster)
        a, b = chunk * R, min((chunk + 1) * R, N)
        if self.composition is not None:
            return read_recomposed(self.cache, self.epoch, a, b, self.composition)
        if self.members is None:
            return self.cache.read_block(self.epoch, a, b, member=self.member, sort=False)
        return self._read_members(a, b)

    def _read_members(self, a: int, b: int) -> dict[str, np.ndarray]:
        """Rows ``a:b`` with every listed member's decoded targets stacked as
        ``members/<array>`` ``[rows, M, ...]`` (one read per member per chunk; no ensemble targets)."""
        block = self.cache.read_block(self.epoch, a, b, targets=False)
        own = [self.cache.read_block(self.epoch, a, b, member=m, params=False, sort=False) for m in self.members]
        for k in (k for k in own[0] if k not in block):
            block[MEMBER_PREFIX + k] = np.stack([o[k] for o in own], axis=1)
        return block

    def chunk(self, chunk: int) -> dict[str, np.ndarray]:
        if self._current is not None and self._current[0] == chunk:
            return self._current[1]
        if chunk not in self._pending and self._pool is not None:
            # Out of the planned order (or the first call): restart the plan at ``chunk``.
            self._next = self.chunks.index(chunk) if chunk in self.chunks else len(self.chunks)
        future = self._pending.pop(chunk, None)
        if self._pool is not None:
            while self._next < len(self.chunks) and len(self._pending) < self.ahead:
                c = self.chunks[self._next]
                self._next += 1
                if c != chunk and c not in self._pending:
                    self._pending[c] = self._pool.submit(self._read, c)
        block = future.result() if future is not None else self._read(chunk)
        self._current = (chunk, block)
        return block

    def rows(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Rows ``start:stop`` of stored order (slices of the chunk blocks; concatenated only
        where the range crosses a chunk edge)."""
        R = self.cache.chunk_rows
        parts = []
        for c in range(start // R, (stop - 1) // R + 1):
            block = self.chunk(c)
            lo, hi = max(start, c * R) - c * R, min(stop, (c + 1) * R) - c * R
            parts.append({k: v[lo:hi] for k, v in block.items()})
        if len(parts) == 1:
            return parts[0]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def close(self) -> None:
        if self._pool is not None:
            for f in self._pending.values():
                f.cancel()
            self._pool.shutdown(wait=True)
            self._pending.clear()


class CacheStream(IterableDataset):
    """Training batches of one stored epoch, in stored order: replayed views + stored targets.

    The stream is cut into batches of ``batch_size`` consecutive positions; DataLoader worker w
    makes batches w, w+W, ... and DataLoader hands them back round-robin, so the batch sequence
    is the same for any worker count. Each worker reads whole chunks (one store call per array
    per chunk, the next chunk read ahead in a thread while it replays audio) and slices batches
    from memory; targets, orders and labels are handed over as whole-batch arrays. ``start`` and
    ``stop`` pick a share of positions (e.g. chunk-aligned, for data-parallel training).
    ``members`` (per-teacher heads): instead of the ensemble's targets, each listed member's, as
    ``members/<array>`` ``[B, M, ...]`` in the order listed (each member read a whole chunk at a time).

    ``ensemble`` (member names), with ``ensemble_weights``, ``aggregation`` and
    ``member_weighting``, recomposes the targets from those stored members (see
    :mod:`logitcache.recompose`; checked here, one-line errors); batches then carry the
    recomposed values, indices and stat, of width min(M k, C).
    """

    def __init__(self, cache_path: str | Path, data_dir: str | Path | Source, epoch: int, batch_size: int,
                 member: str | None = None, start: int = 0, stop: int | None = None, read_ahead: int = 1,
                 members: list[str] | None = None, ensemble=None, ensemble_weights=None,
                 aggregation: str | None = None, member_weighting: str | None = None,
                 source: str | None = None):
        # The source (ids, labels) is parsed once, here, and inherited by forked workers, not
        # re-parsed by every worker every epoch (labels.csv of a 2M-clip dataset takes seconds).
        self.folder = open_source(data_dir, source)
        self.cache_path, self.data_dir = str(cache_path), str(self.folder.root)
        self.epoch, self.batch_size, self.member = int(epoch), int(batch_size), member
        self.read_ahead = int(read_ahead)
        self.members = list(members) if members else None
        cache = open_cache(self.cache_path)
        try:
            self.stop = cache.num_samples if stop is None else int(stop)
            self.start = int(start)
            self.composition = requested(cache, ensemble, ensemble_weights, aggregation, member_weighting, member)
        finally:
            cache.close()

    def __len__(self) -> int:
        return -(-(self.stop - self.start) // self.batch_size)

    def _span(self, b: int) -> tuple[int, int]:
        a = self.start + b * self.batch_size
        return a, min(a + self.batch_size, self.stop)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        cache = open_cache(self.cache_path)
        augmenter = Augmenter.from_spec(cache.manifest["augment"])
        source = ViewSource(self.folder, augmenter, SourceContent.of_cache(cache))
        R = cache.chunk_rows
        mine = range(worker, len(self), workers)
        chunks = self._chunks_of(mine, R)
        reader = ChunkReader(cache, self.epoch, chunks, member=self.member, ahead=self.read_ahead,
                             members=self.members, composition=self.composition)
        try:
            for b in mine:
                yield self._batch(source, reader.rows(*self._span(b)))
        finally:
            reader.close()
            cache.close()

    def _chunks_of(self, batches: range, R: int) -> list[int]:
        """The chunks that ``batches`` touch, in order (array work: a 2M-row epoch has 60k batches)."""
        first = self.start + np.arange(batches.start, batches.stop, batches.step, dtype=np.int64) * self.batch_size
        last = np.minimum(first + self.batch_size, self.stop) - 1
        if self.batch_size <= R:  # a batch touches at most two neighbouring chunks
            return np.unique(np.concatenate([first // R, last // R])).tolist()
        return sorted({c for a, z in zip((first // R).tolist(), (last // R).tolist()) for c in range(a, z + 1)})

    @staticmethod
    def _batch(source: ViewSource, rows: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        params = {k[len("params/"):]: v for k, v in rows.items() if k.startswith("params/")}
        order = rows["order"]
        # The rest are the codec's decoded targets (topk: values, indices, stat); integer ones as
        # int64, what torch gathers and indexes with.
        targets = {k: v.astype(np.int64) if v.dtype.kind in "iu" else np.ascontiguousarray(v)
                   for k, v in rows.items() if k not in ("order", "seeds") and not k.startswith("params/")}
        batch = {**{k: torch.from_numpy(v) for k, v in targets.items()},
                 "order": torch.from_numpy(np.ascontiguousarray(order))}
        # Replay is per sample by design (bit-identical views in any batch); everything else is
        # whole-batch array work.
        each = [{k: v[r] for k, v in params.items()} for r in range(len(order))]
        if source.folder.modality == "tokens":  # labels: the next tokens, [B, L] (never [B, V] rows)
            ids, nxt, mask = (torch.stack(x) for x in zip(*(source.replay_tokens(i, p)
                                                            for i, p in zip(order.tolist(), each))))
            # "tokens", not "ids": the sampled codec's targets have an "ids" array
            return {**batch, "wave": ids, "tokens": ids, "labels": nxt, "mask": mask}
        waves = [source.replay(index, p) for index, p in zip(order.tolist(), each)]
        return {**batch, "wave": torch.stack(waves),
                "labels": torch.from_numpy(batch_labels(source.folder, order, params, source.augmenter.mixers))}


def replay(cache: Cache | str | Path, data_dir: str | Path | Source, epoch: int, sample_id: str,
           source: str | None = None) -> torch.Tensor:
    """The view the teachers saw for ``sample_id`` in stored ``epoch``: a float32 waveform
    ``[samples]`` (audio) or image ``[3, H, W]``, or the int64 token window ``[L]`` (tokens).

    ``data_dir`` is the data (a path, detected or opened as the kind ``source`` names, or an open
    :class:`~logitcache.sources.Source`). Pass an open ``Cache`` and source when replaying many
    views, to parse each once.
    """
    cache = cache if isinstance(cache, Cache) else open_cache(cache)
    folder = open_source(data_dir, source)
    check_compatible(cache, folder)
    params = {k: v[0] for k, v in cache.params(epoch, [sample_id]).items()}
    source = ViewSource(folder, Augmenter.from_spec(cache.manifest["augment"]), SourceContent.of_cache(cache))
    return source.replay(folder.index[sample_id], params)
