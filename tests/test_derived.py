"""Bytes a view need not store: order and seeds derived from (seed, epoch, id), augmentation
parameters stored as integers at their physical resolution (samples, STFT bins)."""

from __future__ import annotations

import numpy as np
import pytest

import logitcache
import importlib
from logitcache.augment import Augmenter
from logitcache.data import AudioFolder
from logitcache.errors import LogitCacheError
from logitcache.layout import Manifest
from logitcache.reports.verify import verify_cache
from logitcache.storage import open_store
from logitcache.views import ViewSource

dump_module = importlib.import_module("logitcache.dump")  # the module: logitcache.dump is the function


def test_a_new_cache_stores_neither_order_nor_seeds(strong_cache):
    cache = logitcache.open_cache(strong_cache)
    assert cache.manifest["derived_arrays"] == ["order", "seeds"]
    assert "order" not in cache.store.arrays() and "seeds" not in cache.store.arrays()
    assert "order" not in cache.layout.arrays and "seeds" not in cache.layout.arrays
    for epoch in range(cache.epochs):
        assert sorted(cache.order(epoch).tolist()) == list(range(cache.num_samples))
    assert not np.array_equal(cache.order(0), cache.order(1))


def test_derived_seeds_redraw_the_stored_parameters(strong_cache, dataset):
    """The derived seed of every view draws exactly the parameters the dump stored for it: the
    seeds a reader derives are the ones the dump drew from."""
    cache = logitcache.open_cache(strong_cache)
    folder = AudioFolder(dataset)
    source = ViewSource(folder, Augmenter.from_spec(cache.manifest["augment"]))
    for epoch in range(cache.epochs):
        block = cache.read_block(epoch, 0, cache.num_samples, targets=False)
        assert block["seeds"].dtype == np.uint64
        np.testing.assert_array_equal(block["seeds"], cache.seeds(epoch))
        for pos, index in enumerate(block["order"].tolist()):
            _, drawn = source.draw(index, int(block["seeds"][pos]))
            for name, value in drawn.items():
                stored = block[f"params/{name}"][pos]
                assert stored.dtype == value.dtype and stored.tobytes() == value.tobytes(), (epoch, pos, name)


def test_parameters_are_stored_as_integers_at_physical_resolution(strong_cache):
    cache = logitcache.open_cache(strong_cache)
    storage = cache.manifest["param_storage"]
    sr, clip = 16000, 16000  # the fixture's rate and 1 s clip
    assert storage["shift.seconds"] == {"dtype": "int16", "num": 1, "den": sr}  # |shift| <= 8000 samples
    assert storage["time_mask.start_s"] == {"dtype": "uint16", "num": 1, "den": sr}  # <= 16000
    assert storage["time_mask.width_s"] == {"dtype": "uint16", "num": 1, "den": sr}  # <= 3200
    assert storage["freq_mask.low_hz"] == {"dtype": "uint16", "num": sr, "den": 512}  # bins <= 256
    assert storage["freq_mask.width_hz"] == {"dtype": "uint8", "num": sr, "den": 512}  # <= 25 bins (800 Hz)
    assert storage["crop.start_s"]["dtype"] == "int64"  # a source has no length limit
    assert "gain.db" not in storage and "mixup.lam" not in storage  # continuous: stored as drawn
    store = open_store(strong_cache, "r")
    decoded = cache.read_block(0, 0, cache.num_samples, targets=False)
    for name, g in storage.items():
        raw = store.read(f"params/{name}", (0,))
        assert raw.dtype == np.dtype(g["dtype"])
        want = (raw.astype(np.float64) * g["num"] / g["den"]).astype(np.float32)
        np.testing.assert_array_equal(decoded[f"params/{name}"], want)
    shifts = store.read("params/shift.seconds", (0,))
    assert np.abs(shifts).max() <= clip // 2 and (shifts != 0).any()


def test_a_value_off_its_grid_is_refused_not_rounded():
    spec = Manifest.from_json({"format_version": 2, "codec": "topk", "codec_options": {}, "epochs": 1,
                               "dataset": {"num_samples": 1}, "classes": ["a"], "topk": 1, "chunk_rows": 1,
                               "output_kind": "multiclass", "index_dtype": "uint16",
                               "param_storage": {"shift.seconds": {"dtype": "int16", "num": 1, "den": 16000}}})
    ok = np.array([3 / 16000, -2 / 16000], np.float32)
    assert spec.stored_rows({"params/shift.seconds": ok})["params/shift.seconds"].tolist() == [3, -2]
    with pytest.raises(LogitCacheError) as e:
        spec.stored_rows({"params/shift.seconds": np.array([0.0001234], np.float32)})
    assert "params/shift.seconds: drawn value" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(LogitCacheError, match="not on its stored grid"):  # 3 s = 48000 samples > int16
        spec.stored_rows({"params/shift.seconds": np.array([3.0], np.float32)})


@pytest.mark.parametrize("value", [{"shift.seconds": {"dtype": "float32", "num": 1, "den": 2}},
                                   {"shift.seconds": {"dtype": "int16", "num": 0, "den": 2}}, ["x"]])
def test_a_damaged_param_storage_entry_is_one_error(value):
    with pytest.raises(LogitCacheError, match="manifest entry 'param_storage'"):
        Manifest.from_json({"format_version": 2, "codec": "topk", "epochs": 1, "dataset": {"num_samples": 1},
                            "classes": ["a"], "topk": 1, "chunk_rows": 1, "output_kind": "multiclass",
                            "index_dtype": "uint16", "param_storage": value})


def test_a_cache_that_stores_order_and_seeds_keeps_storing_them_when_extended(tmp_path, dataset, dumper,
                                                                             monkeypatch):
    """A format-2 cache from before derived arrays (order, seeds and float params stored) grows by
    an epoch under today's code in its own layout, and reads the same as a new-style dump."""
    def old_style(**kw):
        m = real(**kw)
        del m["derived_arrays"], m["param_storage"]
        return m

    real = dump_module.new_manifest
    kw = {**dumper.defaults(), "augment": "ced"}
    teachers = ["toy_teachers:toy_a", "toy_teachers:toy_b"]
    monkeypatch.setattr(dump_module, "new_manifest", old_style)
    old = logitcache.dump(dataset, teachers, tmp_path / "old.zarr", **{**kw, "epochs": 1})
    monkeypatch.undo()
    logitcache.dump(dataset, teachers, old, **{**kw, "epochs": 2}, resume=True)
    new = dumper(teachers, augment="ced")
    store = open_store(old, "r")
    assert {"order", "seeds"} <= set(store.arrays()) and store.read("params/shift.seconds").dtype == np.float32
    assert verify_cache(old)["ok"]
    a, b = logitcache.open_cache(old), logitcache.open_cache(new)
    assert "derived_arrays" not in a.manifest
    for epoch in (0, 1):
        np.testing.assert_array_equal(store.read("order", (epoch,)).astype(np.int64), b.order(epoch))
        np.testing.assert_array_equal(store.read("seeds", (epoch,)), b.seeds(epoch))
        x, y = a.read_block(epoch, 0, a.num_samples), b.read_block(epoch, 0, b.num_samples)
        assert sorted(x) == sorted(y)
        for name in x:
            assert x[name].tobytes() == y[name].tobytes(), (epoch, name)
