"""logitcache: an offline teacher-logit cache for ensemble knowledge distillation.

Dump once (teachers run on exactly replayable augmented views), train many times (targets
streamed from disk, teachers never loaded).

    cache = logitcache.open_cache("run.zarr")
    t = cache.targets(epoch=0, ids=["audio/a.wav"])   # values, indices, stat
    wave = logitcache.replay(cache, "data/train", epoch=0, sample_id="audio/a.wav")
"""

__version__ = "0.1.0"

from logitcache.errors import LogitCacheError  # noqa: E402
from logitcache.cache import Cache, Targets, open_cache  # noqa: E402
from logitcache.views import replay  # noqa: E402
from logitcache.dump import dump  # noqa: E402
from logitcache.members import add_teachers, drop_member  # noqa: E402

__all__ = ["Cache", "LogitCacheError", "Targets", "add_teachers", "drop_member", "dump", "open_cache", "replay",
           "__version__"]
