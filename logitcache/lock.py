"""The dump lock: one writer per cache, with an owner a human can find.

The lock is a file beside the cache (``run.zarr.lock``, ``run.h5.lock``), so it can be taken
before the cache exists and never becomes part of it. Ownership is an ``flock`` held for the
writer's lifetime: the kernel drops it when the process dies, even by SIGKILL, so a dead
writer never blocks the next one. The file's JSON body (pid, host, start time) names the owner
in errors, and is a second guard where flock is a no-op (some network or FUSE filesystems): a
lock left by a pid that is dead on this host is taken over (and said so), one whose pid is alive
or that was taken on another host (whose pids cannot be checked from here) is not. The lock is
the dump process's alone: a forked child (a DataLoader worker) closes its inherited copy at once,
so a worker outliving a killed dump does not keep the next one out.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from pathlib import Path

from logitcache.errors import LogitCacheError


def lock_path(cache_path: str | Path) -> Path:
    p = Path(cache_path)
    return p.with_name(p.name + ".lock")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


_HELD: dict[int, "DumpLock"] = {}  # descriptor -> lock, for every lock this process holds


def _drop_in_child() -> None:
    """In a forked child (a DataLoader worker), close the inherited descriptors of held locks. The
    flock belongs to the open file description, which the child's copy keeps alive: a worker left
    running after its parent was SIGKILLed would otherwise hold the lock for seconds. The child
    must not release (unlink) the lock either, so it forgets it."""
    for fd, lock in list(_HELD.items()):
        try:
            os.close(fd)
        except OSError:
            pass
        lock.fd = None
    _HELD.clear()


os.register_at_fork(after_in_child=_drop_in_child)


class DumpLock:
    """``acquire()`` or a one-line :class:`LogitCacheError`; ``release()`` removes the file."""

    def __init__(self, cache_path: str | Path):
        self.cache_path = Path(cache_path)
        self.path = lock_path(cache_path)
        self.fd: int | None = None
        self.note: str | None = None  # set when a stale lock was taken over

    def _owner(self, fd: int) -> dict:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            owner = json.loads(os.read(fd, 4096).decode() or "{}")
            return owner if isinstance(owner, dict) else {}
        except (OSError, ValueError):
            return {}

    @staticmethod
    def _who(owner: dict) -> str:
        since = f", since {owner['started']}" if owner.get("started") else ""
        return f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')}{since}"

    def holder(self) -> str | None:
        """The error a writer would get now if another process holds the lock, else None. Takes nothing."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None
        except BlockingIOError:
            return (f"{self.cache_path}: another dump is writing it (lock {self.path} held by "
                    f"{self._who(self._owner(fd))})")
        finally:
            os.close(fd)

    def acquire(self) -> "DumpLock":
        host = socket.gethostname()
        self.path.parent.mkdir(parents=True, exist_ok=True)  # --out may name a folder not made yet
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = self._owner(fd)
                os.close(fd)
                raise LogitCacheError(f"{self.cache_path}: another dump is writing it (lock {self.path} held by "
                                      f"{self._who(owner)})") from None
            # The holder we waited on may have removed the file after we opened it: then we
            # hold a lock on an orphaned inode, and must lock the file now at the path instead.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        owner = self._owner(fd)
        if owner and owner.get("host") not in (None, host):
            os.close(fd)
            raise LogitCacheError(
                f"{self.cache_path}: lock {self.path} belongs to {self._who(owner)}, another host, so it cannot be "
                f"checked from here; if that dump is dead, delete the lock file")
        if owner:
            pid = int(owner.get("pid", -1)) if str(owner.get("pid", "")).isdigit() else -1
            if pid != os.getpid() and pid > 0 and _pid_alive(pid):
                # We hold the flock, so that process does not; but on a filesystem where flock is a
                # no-op a live pid is the only sign of a live writer, so refuse rather than guess.
                os.close(fd)
                raise LogitCacheError(
                    f"{self.cache_path}: lock {self.path} belongs to {self._who(owner)}, which is still running; "
                    f"if it is not a logitcache dump, delete the lock file")
            self.note = f"took over stale lock {self.path} (left by {self._who(owner)}, which is no longer running)"
        os.ftruncate(fd, 0)
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": host, "started": started}).encode(), 0)
        self.fd = fd
        _HELD[fd] = self
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        # Unlink while still holding the flock, so no one can lock this inode and then lose the path.
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        _HELD.pop(self.fd, None)
        os.close(self.fd)
        self.fd = None
