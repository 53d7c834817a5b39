"""The one exception type users see: a one-line message naming the thing at fault.

The CLI prints it without a traceback and exits non-zero; library users can catch it.
"""


class LogitCacheError(Exception):
    """Bad input or a cache that cannot be used as asked. ``str(err)`` is a one-line message."""
