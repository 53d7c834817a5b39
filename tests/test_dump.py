"""dump: determinism, offline = online target math, frame-level teachers, index dtypes, bad inputs."""

from __future__ import annotations

import multiprocessing
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import logitcache
from logitcache import LogitCacheError
from logitcache.augment import epoch_order, id_hashes
from logitcache.views import CacheStream
from conftest import CLIP_SECONDS, SR, C, assert_one_line_error, labels_csv_ids, raw_clip, stream_views, teacher_logits

TEACHERS3 = ("toy_teachers:toy_a", "toy_teachers:toy_b", "toy_teachers:toy_c")


@pytest.fixture(scope="session")
def cheap_augment(tmp_path_factory) -> str:
    """Replayable ops without the STFT (fast): shift, gain, noise, a time mask."""
    path = tmp_path_factory.mktemp("aug") / "cheap.toml"
    path.write_text('ops = [\n  {op = "shift", p = 1.0},\n  {op = "gain"},\n  {op = "noise", p = 0.7},\n'
                    '  {op = "time_mask", count = 1, max_seconds = 0.2},\n]\n')
    return str(path)


def _all_arrays(path) -> dict[str, np.ndarray]:
    cache = logitcache.open_cache(path)
    try:
        return {name: cache.store.read(name) for name in cache.store.arrays()}
    finally:
        cache.close()


def _copy_dataset(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------- determinism
def test_a_teacher_failing_on_the_measured_views_is_one_line_and_frees_the_cache(dataset, tmp_path):
    import soundfile

    from logitcache.lock import lock_path

    data = Path(shutil.copytree(dataset, tmp_path / "data"))
    ids = labels_csv_ids(data)
    victim = ids[epoch_order(0, 0, id_hashes(ids))[1]]  # among the first views, which choose the workers
    soundfile.write(data / victim, np.zeros(SR, np.float32), soundfile.info(data / victim).samplerate)
    out = tmp_path / "bad.zarr"
    with pytest.raises(LogitCacheError) as e:
        logitcache.dump(data, ["test_teachers:breaks_raise"], out, epochs=1, topk=3, augment="none", sample_rate=SR,
                        clip_seconds=CLIP_SECONDS, batch_size=4, device="cpu", progress=False)  # workers measured
    assert_one_line_error(e, "teacher breaks_raise failed on sample(s)", victim, "boom on silence")
    assert not lock_path(out).exists()
    with logitcache.open_cache(out) as cache:
        assert not cache.chunks_done().any() and not cache.complete


def test_measured_default_workers_store_the_same_rows(strong_cache, dumper, tmp_path, monkeypatch):
    dump_mod = sys.modules["logitcache.dump"]  # "logitcache.dump" the attribute is the function
    chosen, measured = [], []
    choose = dump_mod.choose_workers
    monkeypatch.setattr(dump_mod, "_cores", lambda: 2)
    monkeypatch.setattr(dump_mod, "choose_workers", lambda *a: chosen.append(choose(*a)) or chosen[-1])
    real = dump_mod.measure_costs
    # the real measurement runs on real views; its figures are replaced by views as costly as the teachers
    monkeypatch.setattr(dump_mod, "measure_costs", lambda *a, **k: measured.append(real(*a, **k)) or (1.0, 1.0))
    out = logitcache.dump(dumper.data, ["toy_teachers:toy_a", "toy_teachers:toy_b"], tmp_path / "w.zarr",
                          **{**dumper.defaults(), "num_workers": None})
    assert chosen == [1] and len(measured) == 1 and all(s > 0 for s in measured[0])  # a worker overlapped the views
    a, b = _all_arrays(strong_cache), _all_arrays(out)  # strong_cache: no worker
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name]), name


def test_arrays_do_not_depend_on_batch_size_workers_or_chunking(strong_cache, dumper):
    other = dumper(batch_size=5, num_workers=2, chunk_rows=8)  # batches straddle chunk edges
    a, b = _all_arrays(strong_cache), _all_arrays(other)
    assert a.keys() == b.keys()
    assert {"params/mixup.partner", "params/noise.seed", "ensemble/values"} <= a.keys()  # order, seeds: derived
    for name in a:
        if name == "done":  # one marker per chunk: its shape follows chunk_rows
            assert a[name].all() and b[name].all() and b[name].shape == (2, 3)
            continue
        if name.endswith("/logit_moments"):  # one row of sums per chunk: each epoch's totals agree
            assert b[name].shape[:2] == (2, 3)
            np.testing.assert_allclose(a[name].sum(1), b[name].sum(1), rtol=1e-12)
            continue
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name


def test_seeds_and_params_follow_base_seed_epoch_and_sample_id(strong_cache, dumper, dataset, tmp_path):
    # the same samples listed in another order in labels.csv
    shuffled = _copy_dataset(dataset, tmp_path / "shuffled")
    header, *rows = (dataset / "labels.csv").read_text().splitlines()
    perm = np.random.default_rng(1).permutation(len(rows))
    (shuffled / "labels.csv").write_text("\n".join([header] + [rows[j] for j in perm]) + "\n")
    a, b = logitcache.open_cache(strong_cache), logitcache.open_cache(dumper(data=shuffled))
    assert b.ids == [a.ids[j] for j in perm] and a.ids != b.ids
    for epoch in range(a.epochs):
        # stored order: the same sequence of sample ids
        assert [a.ids[i] for i in a.order(epoch)] == [b.ids[i] for i in b.order(epoch)]
        sa = dict(zip((a.ids[i] for i in a.order(epoch)), a.read_block(epoch, 0, len(a.ids))["seeds"]))
        sb = dict(zip((b.ids[i] for i in b.order(epoch)), b.read_block(epoch, 0, len(b.ids))["seeds"]))
        assert sa == sb
        pa, pb = a.params(epoch, a.ids), b.params(epoch, a.ids)  # rows: the same ids in both
        for name in pa:
            if name == "mixup.partner":  # a dataset index: same decision to mix, other index
                assert np.array_equal(pa[name] >= 0, pb[name] >= 0)
            else:
                assert np.array_equal(pa[name], pb[name]), name
        # unmixed views are the same views, so the teachers gave the same targets
        solo = [i for i, p in zip(a.ids, pa["mixup.partner"]) if p < 0]
        assert solo
        ta, tb = a.targets(epoch, solo), b.targets(epoch, solo)
        assert np.array_equal(ta.values, tb.values) and np.array_equal(ta.indices, tb.indices)
    # the seeds change with the epoch and with the base seed
    s0 = a.read_block(0, 0, len(a.ids))["seeds"]
    s1 = a.read_block(1, 0, len(a.ids))["seeds"]
    assert len(np.intersect1d(s0, s1)) == 0
    c = logitcache.open_cache(dumper(seed=1, epochs=1, augment="none", topk=3))
    assert not np.array_equal(c.order(0), a.order(0))
    assert len(np.intersect1d(c.read_block(0, 0, len(c.ids))["seeds"], s0)) == 0


# ---------------------------------------------------------------- offline = online
def _logsumexp(z: np.ndarray) -> np.ndarray:
    m = z.max(-1, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))[..., 0]


def _ensemble(members: list[np.ndarray], kind: str, aggregation: str) -> np.ndarray:
    """The ensemble logits by hand, in float64."""
    z = np.stack([m.astype(np.float64) for m in members])
    if aggregation == "mean_logit":
        return z.mean(0)
    if kind == "multiclass":  # log of the mean softmax probability
        return np.log(np.exp(z - _logsumexp(z)[..., None]).mean(0))
    p = (1 / (1 + np.exp(-z))).mean(0)  # logit of the mean sigmoid probability
    return np.log(p) - np.log1p(-p)


def _check_targets(t, ref: np.ndarray, k: int, kind: str, value_dtype: str) -> None:
    """Stored top-k rows ``t`` (dataset order) against the online logits ``ref`` [..., C] (float64)."""
    num_classes = ref.shape[-1]
    assert t.values.dtype == np.dtype(value_dtype) and t.values.shape == ref.shape[:-1] + (k,)
    assert t.indices.shape == t.values.shape and t.stat.shape == ref.shape[:-1]
    values, idx = t.values.astype(np.float64), t.indices.astype(np.int64)
    assert (np.diff(values, axis=-1) <= 0).all()  # sorted descending
    assert (np.diff(np.sort(idx, -1), axis=-1) > 0).all()  # k distinct classes
    want = np.take_along_axis(ref, idx, -1)
    if value_dtype == "float32":
        np.testing.assert_allclose(values, want, rtol=0, atol=1e-5)
    else:  # within fp16 rounding of the float32 logits, and mostly exactly the nearest fp16
        half_ulp = np.spacing(np.abs(want).astype(np.float16)).astype(np.float64) / 2
        assert (np.abs(values - want) <= half_ulp + 1e-5).all()
        assert (values == want.astype(np.float16)).mean() > 0.97
    in_topk = np.zeros(ref.shape, bool)
    np.put_along_axis(in_topk, idx, True, -1)
    if k < num_classes:  # exactly the top k: every stored class beats every other class
        assert (want.min(-1) >= np.where(in_topk, -np.inf, ref).max(-1) - 1e-5).all()
    stat = t.stat.astype(np.float64)
    if kind == "multiclass":
        lse = _logsumexp(ref)
        np.testing.assert_allclose(stat, lse, rtol=1e-6, atol=1e-5)
        p_top = np.exp(want - lse[..., None])
        true_tail = 1 - p_top.sum(-1)
        stored_tail = 1 - np.exp(values - stat[..., None]).sum(-1)
        if value_dtype == "float32":
            np.testing.assert_allclose(stored_tail, true_tail, rtol=0, atol=2e-6)
        else:
            tol = (p_top * 1.01 * np.spacing(np.abs(want).astype(np.float16)).astype(np.float64) / 2).sum(-1)
            assert (np.abs(stored_tail - true_tail) <= tol + 2e-6).all()
        if k == num_classes:
            np.testing.assert_allclose(true_tail, 0, atol=1e-6)
        else:
            assert (true_tail > 1e-3).mean() > 0.5  # there is a tail to get right
    elif k == num_classes:
        assert (stat == 0).all()
    else:  # logit of the mean sigmoid probability of the classes outside the top k
        p = np.where(in_topk, 0.0, 1 / (1 + np.exp(-ref))).sum(-1) / (num_classes - k)
        np.testing.assert_allclose(stat, np.log(p) - np.log1p(-p), rtol=1e-5, atol=1e-5)


MATRIX = [  # output_kind, aggregation, value_dtype, k
    ("multiclass", "mean_prob", "float16", C),
    ("multilabel", "mean_prob", "float16", C),
    ("multiclass", "mean_logit", "float16", C),
    ("multiclass", "mean_prob", "float32", 3),
    ("multiclass", "mean_prob", "float16", 3),
    ("multilabel", "mean_prob", "float32", 3),
    ("multilabel", "mean_prob", "float16", 4),
    ("multilabel", "mean_logit", "float32", 3),
]


@pytest.mark.parametrize("kind,aggregation,value_dtype,k", MATRIX)
def test_offline_equals_online(dumper, dataset, cheap_augment, kind, aggregation, value_dtype, k):
    path = dumper(teachers=TEACHERS3, augment=cheap_augment, output_kind=kind, aggregation=aggregation,
                  value_dtype=value_dtype, topk=k)
    cache = logitcache.open_cache(path)
    assert cache.members == ["toy_a", "toy_b", "toy_c"]
    assert cache.manifest["index_dtype"] == "uint8"
    for epoch in range(cache.epochs):
        views = stream_views(path, dataset, epoch)
        online = {m: teacher_logits(m, views) for m in cache.members}
        for m in cache.members:
            _check_targets(cache.targets(epoch, cache.ids, member=m), online[m].astype(np.float64), k, kind,
                           value_dtype)
        ens = _ensemble(list(online.values()), kind, aggregation)
        _check_targets(cache.targets(epoch, cache.ids), ens, k, kind, value_dtype)


def test_targets_of_all_rows_are_in_stored_order(strong_cache):
    cache = logitcache.open_cache(strong_cache)
    for epoch in range(cache.epochs):
        every, by_id = cache.targets(epoch), cache.targets(epoch, [cache.ids[i] for i in cache.order(epoch)])
        for f in ("values", "indices", "stat"):
            assert np.array_equal(getattr(every, f), getattr(by_id, f))
        block = cache.read_block(epoch, 3, 11)
        assert np.array_equal(block["values"], every.values[3:11])
        assert np.array_equal(block["order"], cache.order(epoch)[3:11])


# ---------------------------------------------------------------- frame-level teachers
def test_frame_level_teachers(dumper, dataset, cheap_augment):
    teachers = ("toy_teachers:toy_frames", "toy_teachers:toy_frames_b")
    k, T = 3, 6
    path = dumper(teachers=teachers, augment=cheap_augment, output_kind="multilabel", topk=k)
    cache = logitcache.open_cache(path)
    E, N = cache.epochs, len(cache.ids)
    assert cache.frames == T
    assert cache.store.read("ensemble/values").shape == (E, N, T, k)
    assert cache.store.read("members/toy_frames/indices").shape == (E, N, T, k)
    assert cache.store.read("ensemble/stat").shape == (E, N, T)
    for epoch in range(E):
        batches = list(CacheStream(path, dataset, epoch, batch_size=5))
        b = batches[0]
        assert b["values"].shape == (5, T, k) and b["indices"].shape == (5, T, k) and b["stat"].shape == (5, T)
        assert b["wave"].shape == (5, int(SR * CLIP_SECONDS)) and b["labels"].shape == (5, C)
        assert sum(len(x["order"]) for x in batches) == N
        views = stream_views(path, dataset, epoch)
        online = {m: teacher_logits(m, views) for m in cache.members}
        assert online["toy_frames"].shape == (N, T, C)
        for m in cache.members:
            _check_targets(cache.targets(epoch, cache.ids, member=m), online[m].astype(np.float64), k,
                           "multilabel", "float32")
        _check_targets(cache.targets(epoch, cache.ids), _ensemble(list(online.values()), "multilabel", "mean_prob"),
                       k, "multilabel", "float32")


# ---------------------------------------------------------------- index dtypes
@pytest.mark.parametrize("num_classes,teacher,dtype,backend", [
    (40_000, "toy_40k", "uint16", "zarr"),
    (40_000, "toy_40k", "uint16", "hdf5"),
    (70_000, "toy_70k", "uint32", "zarr"),
])
def test_index_dtype_for_many_classes(tmp_path, num_classes, teacher, dtype, backend):
    from logitcache.synth import make_dataset

    data = make_dataset(tmp_path / "data", 4, sample_rate=SR, clip_seconds=CLIP_SECONDS, seed=3)
    names = (data / "classes.txt").read_text().split()
    (data / "classes.txt").write_text("\n".join(names + [f"extra_{i}" for i in range(num_classes - len(names))]) + "\n")
    k = 256
    out = logitcache.dump(data, [f"toy_teachers:{teacher}"], tmp_path / "big", epochs=1, topk=k, augment="none",
                          output_kind="multiclass", value_dtype="float32", backend=backend, sample_rate=SR,
                          clip_seconds=CLIP_SECONDS, progress=False)
    cache = logitcache.open_cache(out)
    assert cache.manifest["index_dtype"] == dtype and len(cache.classes) == num_classes
    t = cache.targets(0, cache.ids, member=teacher)
    assert t.indices.dtype == np.dtype(dtype) and cache.targets(0).indices.dtype == np.dtype(dtype)
    limit = 32_767 if dtype == "uint16" else 65_535
    assert (t.indices > limit).any()  # a signed int16 / uint16 would have wrapped these
    views = torch.stack([raw_clip(data / i) for i in cache.ids])
    online = teacher_logits(teacher, views).astype(np.float64)
    assert np.array_equal(t.indices.astype(np.int64), np.argsort(-online, axis=-1, kind="stable")[:, :k])
    _check_targets(t, online, k, "multiclass", "float32")


def test_index_dtype_boundaries():
    from logitcache.targets import index_dtype

    assert [index_dtype(c) for c in (2, 256, 257, 32_768, 40_000, 65_536, 65_537, 70_000)] == \
        ["uint8", "uint8", "uint16", "uint16", "uint16", "uint16", "uint32", "uint32"]


# ---------------------------------------------------------------- bad inputs
def _dump(data, out, teachers=("toy_teachers:toy_a",), **kw):
    cfg = dict(epochs=1, topk=3, augment="none", sample_rate=SR, clip_seconds=CLIP_SECONDS, progress=False)
    return logitcache.dump(data, list(teachers), out, **{**cfg, **kw})


@pytest.mark.parametrize("workers", [0, 2])
def test_missing_audio_file(dataset, tmp_path, workers):
    data = _copy_dataset(dataset, tmp_path / "data")
    name = (data / "labels.csv").read_text().splitlines()[5].split(",")[0]
    (data / name).unlink()
    before = set(multiprocessing.active_children())
    with pytest.raises(LogitCacheError) as e:
        _dump(data, tmp_path / "out.zarr", num_workers=workers, batch_size=4)
    assert_one_line_error(e, name, "not found")
    # the loader's workers are gone already (not left to a later garbage collection, which stalls)
    assert set(multiprocessing.active_children()) - before == set()


@pytest.mark.parametrize("edit,needles", [
    (lambda text: text + "audio/clip_99999.wav,tone;no_such_class\n", ["no_such_class", "unknown class"]),
    (lambda text: text + text.splitlines()[3] + "\n", ["duplicate", "clip_00002"]),
    (lambda text: text.replace("filename,labels", "file,labels", 1), ["filename", "missing column"]),
    (lambda text: text.replace("filename,labels", "filename", 1), ["labels", "missing column"]),
], ids=["unknown_class", "duplicate_id", "no_filename_column", "no_labels_column"])
def test_bad_labels_csv(dataset, tmp_path, edit, needles):
    data = _copy_dataset(dataset, tmp_path / "data")
    (data / "labels.csv").write_text(edit((data / "labels.csv").read_text()))
    out = tmp_path / "out.zarr"
    with pytest.raises(LogitCacheError) as e:
        _dump(data, out)
    assert_one_line_error(e, *needles)
    assert not out.exists()


@pytest.mark.parametrize("teachers,kw,needles", [
    (("toy_teachers:toy_a", "toy_teachers:toy_c11"), {}, ["disagree", "C=10", "C=11"]),
    (("toy_teachers:toy_c11",), {}, ["C=11", "10"]),
    (("toy_teachers:toy_a", "toy_teachers:toy_frames"), {}, ["frame"]),
    (("toy_teachers:toy_a",), {"topk": C + 1}, ["--topk 11", "10"]),
    (("toy_teachers:toy_a",), {"topk": 0}, ["--topk 0"]),
    (("toy_teachers:toy_a",), {"augment": "bogus"}, ["bogus", "preset"]),
    (("toy_teachers:no_such_factory",), {}, ["no_such_factory"]),
    (("no_such_file.pt2",), {}, ["no_such_file.pt2", "not found"]),
], ids=["teachers_disagree_on_C", "C_differs_from_classes_txt", "clip_and_frame_teachers", "k_above_C", "k_zero",
        "unknown_preset", "unknown_factory", "missing_pt2"])
def test_bad_dump_config(dataset, tmp_path, teachers, kw, needles):
    out = tmp_path / "out.zarr"
    with pytest.raises(LogitCacheError) as e:
        _dump(dataset, out, teachers, **kw)
    assert_one_line_error(e, *needles)
    assert not out.exists()


@pytest.mark.parametrize("workers", [0, 2])
def test_nan_teacher_output_names_the_samples(dataset, tmp_path, workers):
    before = set(multiprocessing.active_children())
    with pytest.raises(LogitCacheError) as e:
        _dump(dataset, tmp_path / "out.zarr", ("toy_teachers:toy_a", "toy_teachers:toy_nan"), batch_size=4,
              num_workers=workers)
    ids = [line.split(",")[0] for line in (dataset / "labels.csv").read_text().splitlines()[1:]]
    first_batch = [ids[i] for i in epoch_order(0, 0, id_hashes(ids))[:4]]  # stored order, epoch 0
    assert_one_line_error(e, "toy_nan", "NaN", *first_batch)
    assert set(multiprocessing.active_children()) - before == set()


@pytest.mark.parametrize("make", [lambda p: p.write_text("keep me"), lambda p: p.mkdir()], ids=["file", "dir"])
def test_out_path_already_exists(dataset, tmp_path, make):
    out = tmp_path / "taken.zarr"
    make(out)
    with pytest.raises(LogitCacheError) as e:
        _dump(dataset, out)
    assert_one_line_error(e, str(out), "already exists")
    assert out.read_text() == "keep me" if out.is_file() else list(out.iterdir()) == []


def test_unknown_epoch_member_or_id_in_cache(strong_cache):
    cache = logitcache.open_cache(strong_cache)
    for call, needles in [
        (lambda: cache.targets(2), ["epoch 2", "0..1"]),
        (lambda: cache.targets(-1, cache.ids[:2]), ["epoch -1"]),
        (lambda: cache.targets(0, member="nobody"), ["nobody", "toy_a"]),
        (lambda: cache.params(7, cache.ids[:1]), ["epoch 7"]),
        (lambda: cache.targets(0, ["audio/nope.wav"]), ["audio/nope.wav"]),
        (lambda: cache.order(2), ["epoch 2"]),
    ]:
        with pytest.raises(LogitCacheError) as e:
            call()
        assert_one_line_error(e, *needles)
