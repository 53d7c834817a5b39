"""Storage backends: zarr and HDF5 hold the same data, and a cache's backend is read from the cache itself."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
import torch
import zarr

import logitcache
from logitcache import LogitCacheError
from logitcache.views import CacheStream
from conftest import CLIP_SECONDS, SR, assert_one_line_error


def _arrays(cache) -> dict[str, np.ndarray]:
    return {name: cache.store.read(name) for name in cache.store.arrays()}


@pytest.fixture(scope="session")
def hdf5_cache(dumper):
    """The strong_cache config, written to HDF5 (backend chosen by the .h5 suffix)."""
    return dumper(suffix=".h5")


def test_zarr_and_hdf5_hold_identical_arrays(strong_cache, hdf5_cache, strong_views, dataset):
    z, h = logitcache.open_cache(strong_cache), logitcache.open_cache(hdf5_cache)
    assert z.manifest["backend"] == "zarr" and h.manifest["backend"] == "hdf5"
    assert h5py.is_hdf5(hdf5_cache) and (strong_cache / "zarr.json").is_file()
    za, ha = _arrays(z), _arrays(h)
    assert za.keys() == ha.keys()
    assert {"ids/utf8", "params/mixup.lam", "members/toy_b/values", "done"} <= za.keys()
    for name in za:
        assert za[name].dtype == ha[name].dtype and za[name].shape == ha[name].shape, name
        assert np.array_equal(za[name], ha[name]), name
    volatile = {"backend", "created", "dump_seconds", "target_sets"}  # target sets: written_at
    assert [{k: v for k, v in t.items() if k != "written_at"} for t in z.manifest["target_sets"].values()] == \
        [{k: v for k, v in t.items() if k != "written_at"} for t in h.manifest["target_sets"].values()]
    assert {k: v for k, v in z.manifest.items() if k not in volatile} == \
        {k: v for k, v in h.manifest.items() if k not in volatile}
    # and through the reading API
    assert z.ids == h.ids
    for epoch in range(z.epochs):
        for member in (None, "toy_a"):
            tz, th = z.targets(epoch, z.ids[::-1], member=member), h.targets(epoch, h.ids[::-1], member=member)
            for f in ("values", "indices", "stat"):
                assert np.array_equal(getattr(tz, f), getattr(th, f))
        for i in (0, len(z.ids) - 1):
            assert torch.equal(logitcache.replay(h, dataset, epoch, h.ids[i]), strong_views[epoch][i])
    for a, b in zip(CacheStream(strong_cache, dataset, 1, 9), CacheStream(hdf5_cache, dataset, 1, 9)):
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_open_cache_reads_the_backend_from_the_cache(hdf5_cache, dumper, tmp_path):
    # an HDF5 cache renamed to a name without a suffix is still HDF5
    renamed = tmp_path / "renamed_cache"
    shutil.copy(hdf5_cache, renamed)
    c = logitcache.open_cache(renamed)
    assert c.manifest["backend"] == "hdf5" and type(c.store).__name__ == "Hdf5Store"
    assert np.array_equal(c.targets(1).values, logitcache.open_cache(hdf5_cache).targets(1).values)
    # a zarr store named like an HDF5 file is zarr
    zarr_h5 = dumper(suffix=".h5", backend="zarr", epochs=1, augment="none", topk=3)
    assert zarr_h5.name.endswith(".h5") and zarr_h5.is_dir()
    c = logitcache.open_cache(zarr_h5)
    assert c.manifest["backend"] == "zarr" and type(c.store).__name__ == "ZarrStore"
    # ... and holds the same as an HDF5 dump of that config
    hdf = logitcache.open_cache(dumper(suffix=".h5", backend="hdf5", epochs=1, augment="none", topk=3))
    assert hdf.manifest["backend"] == "hdf5"
    a, b = _arrays(c), _arrays(hdf)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # a zarr dir renamed to a plain name still opens
    plain = tmp_path / "plain"
    shutil.copytree(zarr_h5, plain)
    assert logitcache.open_cache(plain).manifest["backend"] == "zarr"


def test_new_cache_backend_follows_suffix_or_argument(dataset, tmp_path):
    kw = dict(epochs=1, topk=3, augment="none", sample_rate=SR, clip_seconds=CLIP_SECONDS, progress=False)
    for name, backend, want in [("a.hdf5", None, "hdf5"), ("b", None, "zarr"), ("c.zarr", None, "zarr"),
                                ("d", "hdf5", "hdf5")]:
        out = logitcache.dump(dataset, ["toy_teachers:toy_a"], tmp_path / name, backend=backend, **kw)
        assert logitcache.open_cache(out).manifest["backend"] == want, name
        assert h5py.is_hdf5(out) == (want == "hdf5")
    with pytest.raises(LogitCacheError) as e:
        logitcache.dump(dataset, ["toy_teachers:toy_a"], tmp_path / "e", backend="sqlite", **kw)
    assert_one_line_error(e, "sqlite", "zarr", "hdf5")


def _not_caches(tmp_path, strong_cache):
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "text.h5").write_text("hello, not a cache\n")
    (tmp_path / "random.zarr").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "truncated.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))
    zarr.open_group(str(tmp_path / "bare.zarr"), mode="w").attrs["hello"] = 1
    with h5py.File(tmp_path / "bare.h5", "w") as f:
        f.create_dataset("x", data=np.arange(3))
    # a zarr store whose manifest says hdf5
    shutil.copytree(strong_cache, tmp_path / "liar.zarr")
    g = zarr.open_group(str(tmp_path / "liar.zarr"), mode="r+")
    g.attrs["logitcache"] = {**g.attrs["logitcache"], "backend": "hdf5"}
    return {
        "missing": (tmp_path / "nope.zarr", ["not found"]),
        "empty_dir": (tmp_path / "empty_dir", ["not a logitcache cache"]),
        "text": (tmp_path / "text.h5", ["not a logitcache cache"]),
        "random": (tmp_path / "random.zarr", ["not a logitcache cache"]),
        "truncated": (tmp_path / "truncated.h5", ["hdf5"]),
        "bare_zarr": (tmp_path / "bare.zarr", ["not a logitcache cache"]),
        "bare_h5": (tmp_path / "bare.h5", ["not a logitcache cache"]),
        "liar": (tmp_path / "liar.zarr", ["hdf5", "zarr"]),
    }


def test_a_path_that_is_not_a_cache_gives_an_error(tmp_path, strong_cache):
    for case, (path, needles) in _not_caches(tmp_path, strong_cache).items():
        with pytest.raises(LogitCacheError) as e:
            logitcache.open_cache(path)
        assert_one_line_error(e, str(path), *needles)


def test_hdf5_reader_errors(hdf5_cache):
    cache = logitcache.open_cache(hdf5_cache)
    for call, needles in [(lambda: cache.targets(2), ["epoch 2"]),
                          (lambda: cache.targets(0, member="toy_z"), ["toy_z", "toy_a, toy_b"]),
                          (lambda: cache.read_block(5, 0, 4), ["epoch 5"])]:
        with pytest.raises(LogitCacheError) as e:
            call()
        assert_one_line_error(e, *needles)
