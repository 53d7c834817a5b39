"""torch.distributed plumbing shared by ``dump`` and ``train`` (launch with ``torchrun``).

Dump: rank 0 owns the cache's lock and metadata (layout, manifest, resizes); every rank writes
only whole chunks it owns, plus their done markers. Ownership is dealt round-robin over the
chunks not yet marked done, so a relaunch with any number of ranks finishes what is left.

Control messages (who failed, which chunks are left) go over a gloo group even when the
default group is NCCL: they are small Python objects, and the dump exchanges no tensors.
"""

from __future__ import annotations

import atexit
import datetime
import os
from dataclasses import dataclass, field

import numpy as np

from logitcache.errors import LogitCacheError

_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise LogitCacheError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r}: not an integer") from None


@dataclass
class DistContext:
    """This process's place in the job. ``world == 1`` (the default) means no torch.distributed."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    group: object = None  # gloo group for control messages
    synced: bool = field(default=False)

    @property
    def active(self) -> bool:
        return self.world > 1

    def _gather(self, obj) -> list:
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def agree(self, error: BaseException | None = None, what: str = "dump") -> None:
        """A barrier that carries failures: if any rank passes an error, every rank raises, so no
        rank is left waiting in a later collective for one that gave up."""
        if not self.active:
            if error is not None:
                raise error
            return
        reports = self._gather(None if error is None else _one_line(error))
        if error is not None:
            raise error
        failed = [(r, m) for r, m in enumerate(reports) if m is not None]
        if failed:
            r, m = failed[0]
            raise LogitCacheError(f"{what} failed on rank {r}: {m}")

    def broadcast(self, obj, src: int = 0):
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def report_failure(self, error: BaseException, what: str = "dump") -> None:
        """Called on a rank's way out with an error: join the final sync the other ranks wait in."""
        if self.active and not self.synced:
            self.synced = True
            try:
                self.agree(error, what)
            except BaseException:
                pass  # the caller re-raises its own error

    def final_sync(self, what: str = "dump") -> None:
        self.synced = True
        self.agree(None, what)


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines() or [type(e).__name__])[0][:300]


def setup(distributed: bool | None, device: str = "auto") -> tuple[DistContext, str]:
    """Join (or create) the process group when ``distributed`` is True, or None with WORLD_SIZE > 1.

    Returns the context and the device spec this rank should use: ``cuda:LOCAL_RANK`` for an
    ``auto``/``cuda`` device on a GPU box. The default group uses NCCL on GPUs and gloo on CPU.
    """
    if distributed is None:
        distributed = env_world_size() > 1
    if not distributed:
        return DistContext(), device
    import torch
    import torch.distributed as dist

    missing = [k for k in _ENV if k not in os.environ] if not dist.is_initialized() else []
    if missing:
        raise LogitCacheError(f"--distributed: {', '.join(missing)} not set; launch with torchrun "
                              f"(torchrun --nproc_per_node=N -m logitcache ...)")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if cuda:
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=60))
        # Tear down on exit: a process group left alive makes torch warn at interpreter shutdown.
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    return DistContext(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank,
                       group=group), device


def current_rank() -> int:
    """This process's rank, 0 outside a torch.distributed job (who prints and writes run files)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def deal_chunks(todo: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This rank's share of ``todo`` [E, n_chunks]: the chunks still to write, in (epoch, chunk)
    order, dealt round-robin (rank r takes the r-th, r+W-th, ... of them)."""
    mine = np.zeros_like(todo)
    flat = np.flatnonzero(todo)
    mine.flat[flat[rank::world]] = True
    return mine


def shard_bounds(num_samples: int, chunk_rows: int, rank: int, world: int) -> tuple[int, int]:
    """Positions ``[start, stop)`` of one epoch's stored order that rank ``rank`` trains on: a
    contiguous run of whole chunks (so each rank reads sequentially), chunks split as evenly as
    possible, earlier ranks taking the extra ones."""
    n_chunks = -(-num_samples // chunk_rows)
    per, extra = divmod(n_chunks, world)
    first = rank * per + min(rank, extra)
    last = first + per + (1 if rank < extra else 0)
    return min(first * chunk_rows, num_samples), min(last * chunk_rows, num_samples)
