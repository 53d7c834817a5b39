"""Augmented views: drawn (dump) or replayed from stored parameters (training, fidelity).

Each view is computed per sample, from the decoded source and its parameters only, so the
same (epoch, sample) gives the same float32 waveform alone, in any batch, in any worker.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from logitcache.augment import Augmenter
from logitcache.cache import Cache, open_cache
from logitcache.data import AudioFolder
from logitcache.errors import LogitCacheError


def check_compatible(cache: Cache, folder: AudioFolder) -> None:
    """Refuse a data folder other than the one the cache was dumped from."""
    m = cache.manifest
    if folder.fingerprint != m["dataset"]["fingerprint"]:
        raise LogitCacheError(
            f"{folder.root}: dataset does not match cache {cache.path} (its ids differ: "
            f"{len(folder)} samples here, {m['dataset']['num_samples']} in the cache)")
    if folder.classes != m["classes"]:
        raise LogitCacheError(f"{folder.root}: class list differs from the one cache {cache.path} was dumped with")


class ViewSource:
    """Decodes a sample and applies parameters to it; shared by dump, replay and training."""

    def __init__(self, folder: AudioFolder, augmenter: Augmenter):
        self.folder, self.augmenter = folder, augmenter

    def context(self, index: int, source: torch.Tensor):
        aug = self.augmenter
        return aug.context(num_samples=len(self.folder), sample_index=int(index), source_samples=source.shape[-1],
                           load_partner=lambda j: aug.fit_clip(self.folder.load(j, aug.sample_rate)))

    def draw(self, index: int, seed: int) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
        source = self.folder.load(int(index), self.augmenter.sample_rate)
        ctx = self.context(index, source)
        params = self.augmenter.draw(int(seed), ctx)
        return self.augmenter.apply(source, params, ctx), params

    def replay(self, index: int, params: dict[str, np.ndarray]) -> torch.Tensor:
        source = self.folder.load(int(index), self.augmenter.sample_rate)
        return self.augmenter.apply(source, params, self.context(index, source))

    def labels(self, index: int, params: dict[str, np.ndarray]) -> np.ndarray:
        """Hard labels of the view: mixed like the audio when mixup was applied."""
        y = self.folder.labels[int(index)]
        partner = int(params.get("mixup.partner", -1))
        if partner >= 0:
            lam = np.float32(params["mixup.lam"])
            y = lam * y + (np.float32(1) - lam) * self.folder.labels[partner]
        return y


class DrawnViews(Dataset):
    """Positions of one epoch's stored order -> (view, drawn params). Used by dump."""

    def __init__(self, source: ViewSource, order: np.ndarray, seeds: np.ndarray):
        self.source, self.order, self.seeds = source, order, seeds

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, pos: int):
        wave, params = self.source.draw(self.order[pos], self.seeds[pos])
        return wave, params, pos


def collate_views(items):
    waves, params, pos = zip(*items)
    stacked = {k: np.stack([p[k] for p in params]) for k in params[0]}
    return torch.stack(waves), stacked, np.asarray(pos, dtype=np.int64)


def row_params(block: dict[str, np.ndarray], row: int) -> dict[str, np.ndarray]:
    return {k[len("params/"):]: v[row] for k, v in block.items() if k.startswith("params/")}


class CacheStream(IterableDataset):
    """Training batches of one stored epoch, in stored order: replayed views + stored targets.

    The stream is cut into batches of ``batch_size`` consecutive positions; DataLoader worker w
    makes batches w, w+W, ... and DataLoader hands them back round-robin, so the batch sequence
    is the same for any worker count. Each worker reads whole chunks (one store call per array
    per chunk) and slices batches from memory. ``ranks`` picks a chunk-aligned share of
    positions for data-parallel training.
    """

    def __init__(self, cache_path: str | Path, data_dir: str | Path, epoch: int, batch_size: int,
                 member: str | None = None, start: int = 0, stop: int | None = None):
        self.cache_path, self.data_dir = str(cache_path), str(data_dir)
        self.epoch, self.batch_size, self.member = int(epoch), int(batch_size), member
        cache = open_cache(self.cache_path)
        self.stop = cache.num_samples if stop is None else int(stop)
        self.start = int(start)
        cache.close()

    def __len__(self) -> int:
        return -(-(self.stop - self.start) // self.batch_size)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        cache = open_cache(self.cache_path)
        folder = AudioFolder(self.data_dir)
        source = ViewSource(folder, Augmenter.from_spec(cache.manifest["augment"]))
        R = cache.chunk_rows
        block, block_chunk = None, -1
        try:
            for b in range(worker, len(self), workers):
                a = self.start + b * self.batch_size
                z = min(a + self.batch_size, self.stop)
                parts = []
                for chunk in range(a // R, (z - 1) // R + 1):
                    if chunk != block_chunk:
                        block = cache.read_block(self.epoch, chunk * R, min((chunk + 1) * R, cache.num_samples),
                                                 member=self.member)
                        block_chunk = chunk
                    lo, hi = max(a, chunk * R) - chunk * R, min(z, (chunk + 1) * R) - chunk * R
                    parts.append({k: v[lo:hi] for k, v in block.items()})
                rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
                yield self._batch(source, rows)
        finally:
            cache.close()

    @staticmethod
    def _batch(source: ViewSource, rows: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        waves, labels = [], []
        for r, index in enumerate(rows["order"]):
            params = row_params(rows, r)
            waves.append(source.replay(index, params))
            labels.append(source.labels(index, params))
        return {
            "wave": torch.stack(waves),
            "labels": torch.from_numpy(np.stack(labels)),
            "values": torch.from_numpy(rows["values"]),
            "indices": torch.from_numpy(rows["indices"].astype(np.int64)),
            "stat": torch.from_numpy(rows["stat"]),
            "order": torch.from_numpy(rows["order"]),
        }


def replay(cache: Cache | str | Path, data_dir: str | Path | AudioFolder, epoch: int, sample_id: str) -> torch.Tensor:
    """The float32 waveform ``[samples]`` the teachers saw for ``sample_id`` in stored ``epoch``.

    Pass an open ``Cache`` and an ``AudioFolder`` when replaying many views, to parse each once.
    """
    cache = cache if isinstance(cache, Cache) else open_cache(cache)
    folder = data_dir if isinstance(data_dir, AudioFolder) else AudioFolder(data_dir)
    check_compatible(cache, folder)
    params = {k: v[0] for k, v in cache.params(epoch, [sample_id]).items()}
    source = ViewSource(folder, Augmenter.from_spec(cache.manifest["augment"]))
    return source.replay(folder.index[sample_id], params)
