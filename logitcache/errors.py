"""The one exception type users see: a one-line message naming the thing at fault.

The CLI prints it without a traceback and exits non-zero; library users can catch it.
"""

import contextlib
import signal
import threading


class LogitCacheError(Exception):
    """Bad input or a cache that cannot be used as asked. ``str(err)`` is a one-line message."""


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (what SLURM, Kubernetes and ``kill`` send first) while inside
    :func:`sigterm_as_interrupt`. A KeyboardInterrupt, so it unwinds like Ctrl-C: a dump keeps the
    chunks it wrote and releases its lock, a training run keeps its last checkpoint."""


def _raise_terminated(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
    raise Terminated("terminated (SIGTERM)")


@contextlib.contextmanager
def sigterm_as_interrupt():
    """While inside, SIGTERM raises :class:`Terminated` in the main thread instead of killing the
    process at once; the previous handler is restored on the way out. The CLI wraps every command
    in it; API users wrap their ``dump``/``train`` call (``with sigterm_as_interrupt(): dump(...)``).
    Python handles signals in the main thread only, so elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def one_line_worker_errors(loader):
    """Iterate a DataLoader, turning a LogitCacheError raised in a worker back into one line.

    torch re-raises worker errors with the worker's traceback inside the message. The original
    is raised outside the ``except`` block, after dropping the loader iterator, so the workers
    shut down at once instead of at a later garbage collection (which waits 5 s per worker).
    """
    iterator = iter(loader)
    while True:
        message = None
        try:
            item = next(iterator)
        except StopIteration:
            return
        except LogitCacheError as e:
            if "\n" not in str(e):
                raise
            message = str(e).rstrip().splitlines()[-1].split("LogitCacheError: ", 1)[-1]
            e.__traceback__ = None  # torch's reraise() frame and the exception form a cycle
        if message is not None:
            del iterator
            raise LogitCacheError(message)
        yield item


def shorten(text, limit: int = 80) -> str:
    """``text`` cut to about ``limit`` characters for an error line: head and tail kept (a path's
    folder and file name), the middle elided. A 100k-character id must not make a 100k-character
    error."""
    text = str(text)
    if len(text) <= limit:
        return text
    tail = max(limit // 4, 1)
    return f"{text[:limit - tail - 1]}…{text[-tail:]}"


def quote(value, limit: int = 80) -> str:
    """``repr`` of an id or value quoted in an error, shortened like :func:`shorten`."""
    return repr(shorten(value, limit))
