"""inspect / verify / fidelity: numbers equal direct computation, damage is found and named."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest

import logitcache
from logitcache.report import fidelity, format_table, human_bytes, inspect_cache, verify_cache
from logitcache.storage import open_store
from conftest import C, N_CLIPS

TEACHERS = ["toy_teachers:toy_a", "toy_teachers:toy_b"]
N = N_CLIPS
R = 8  # rows per chunk of the caches damaged below: several chunks per epoch
LAST = N // R - 1  # index of the last chunk (N is a multiple of R)


@pytest.fixture(scope="module")
def zarr_cache(dumper):
    return dumper(chunk_rows=R)


@pytest.fixture(scope="module")
def h5_cache(dumper):
    return dumper(chunk_rows=R, suffix=".h5")


def _copy(src, tmp_path):
    dst = tmp_path / src.name
    (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    return dst


def _flip_byte(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ 0xFF]))


# ---------------------------------------------------------------- inspect
def test_inspect_numbers_equal_direct_computation(zarr_cache, dataset):
    info = inspect_cache(zarr_cache)
    assert (info["samples"], info["epochs"], info["topk"], info["classes"]) == (N, 2, C, C)
    assert info["backend"] == "zarr" and info["complete"] and info["chunk_rows"] == R
    assert info["members"] == ["toy_a", "toy_b"] and info["teachers"] == ["toy_a", "toy_b"]
    assert (info["value_dtype"], info["index_dtype"], info["output_kind"]) == ("float32", "uint8", "multiclass")
    assert (info["chunks_done"], info["chunks_total"]) == (2 * (LAST + 1),) * 2

    files = [f for f in zarr_cache.rglob("*") if f.is_file()]
    assert info["bytes_on_disk"] == sum(f.stat().st_size for f in files)
    assert info["bytes_per_sample_epoch"] == pytest.approx(info["bytes_on_disk"] / (N * 2))
    audio = sum((dataset / line.split(",")[0]).stat().st_size
                for line in (dataset / "labels.csv").read_text().splitlines()[1:])
    assert info["audio_bytes"] == audio
    assert info["share_of_audio"] == pytest.approx(info["bytes_on_disk"] / audio)

    arrays = {a["name"]: a for a in info["arrays"]}
    store = open_store(zarr_cache)
    assert set(arrays) == set(store.arrays())
    for name, a in arrays.items():
        stored = sum(f.stat().st_size for f in (zarr_cache / name).rglob("*") if f.is_file())
        data = store.read(name)
        assert a["stored_bytes"] == stored, name
        assert (tuple(a["shape"]), a["dtype"], a["raw_bytes"]) == (data.shape, str(data.dtype), data.nbytes), name
        assert a["ratio"] == pytest.approx(data.nbytes / stored, abs=1e-3)
    assert arrays["ensemble/values"]["shape"] == [2, N, C]
    assert info["bytes_uncompressed"] == sum(a["raw_bytes"] for a in arrays.values())
    # group metadata (the manifest lives in the root zarr.json) is on disk but in no array
    assert info["bytes_arrays"] == sum(a["stored_bytes"] for a in arrays.values()) < info["bytes_on_disk"]
    json.dumps(info)  # the CLI's --json prints it as is


def test_inspect_hdf5_counts_the_whole_file(h5_cache):
    info = inspect_cache(h5_cache)
    assert info["backend"] == "hdf5"
    assert info["bytes_on_disk"] == h5_cache.stat().st_size
    with h5py.File(h5_cache, "r") as f:
        assert info["bytes_arrays"] == sum(f[a["name"]].id.get_storage_size() for a in info["arrays"])
    assert info["bytes_arrays"] < info["bytes_on_disk"]


# ---------------------------------------------------------------- verify
@pytest.mark.parametrize("which", ["zarr_cache", "h5_cache"])
def test_verify_passes_on_a_fresh_cache(which, request):
    path = request.getfixturevalue(which)
    result = verify_cache(path)
    assert result == {**result, "ok": True, "problems": []}
    store = open_store(path)
    per_position = [n for n in store.arrays() if n not in ("ids/utf8", "ids/offsets", "done")]
    assert N % R == 0 and result["rows_checked"] == 2 * N
    assert result["chunks_checked"] == 2 * (N // R) * len(per_position)
    assert result["arrays_checked"] == len(store.arrays())


def test_verify_finds_a_flipped_byte_in_a_zarr_chunk(zarr_cache, tmp_path):
    path = _copy(zarr_cache, tmp_path)
    chunk = path / "ensemble/values/c/1/2/0"  # epoch 1, chunk 2 (rows 16..23)
    _flip_byte(chunk, chunk.stat().st_size // 2)
    result = verify_cache(path)
    assert not result["ok"]
    assert len(result["problems"]) == 1, result["problems"]
    assert result["problems"][0].startswith("ensemble/values: epoch 1 chunk 2 (rows 16..23): read failed")


def test_verify_finds_a_flipped_byte_in_an_hdf5_chunk(h5_cache, tmp_path):
    path = _copy(h5_cache, tmp_path)
    with h5py.File(path, "r") as f:
        d = f["members/toy_b/indices"]
        infos = [d.id.get_chunk_info(i) for i in range(d.id.get_num_chunks())]
        info = next(i for i in infos if tuple(i.chunk_offset) == (0, LAST * R, 0))  # epoch 0, last chunk
    _flip_byte(path, info.byte_offset + info.size // 2)
    result = verify_cache(path)
    assert not result["ok"]
    assert len(result["problems"]) == 1, result["problems"]
    problem = result["problems"][0]
    assert problem.startswith(f"members/toy_b/indices: epoch 0 chunk {LAST} (rows {LAST * R}..{N - 1}): read failed")
    assert "filter returned failure" in problem  # the fletcher32 checksum filter refused the chunk


def test_verify_finds_deleted_zarr_chunk_files(zarr_cache, tmp_path):
    """zarr reads a missing chunk as fill value 0 without error, and the done marker (its own array)
    still says 1: only the storage presence probe and the content checks see it."""
    path = _copy(zarr_cache, tmp_path)
    store = open_store(path)
    assert np.all(store.read("ensemble/values", (0, slice(R, 2 * R))) != 0)
    (path / "ensemble/values/c/0/1/0").unlink()
    (path / "order/c/1/0").unlink()
    (path / "members/toy_a/stat/c/0/2").unlink()
    assert np.all(open_store(path).read("ensemble/values", (0, slice(R, 2 * R))) == 0)  # silently zeros

    problems = verify_cache(path)["problems"]
    assert any(p.startswith("ensemble/values: epoch 0 chunk 1 (rows 8..15): chunk missing from storage")
               for p in problems), problems
    assert any(p.startswith("order: epoch 1 chunk 0 (rows 0..7): chunk missing from storage") for p in problems)
    # a zeroed stat chunk can be legitimate in zarr (all-zero chunks are never written), so it is
    # caught by content instead: a softmax log-normaliser below the top logit
    assert any(p.startswith("members/toy_a/stat: epoch 0 chunk 2 (rows 16..23): ") and "tail statistic" in p
               for p in problems), problems


def test_verify_finds_out_of_range_and_repeated_indices(zarr_cache, tmp_path):
    path = _copy(zarr_cache, tmp_path)
    store = open_store(path, "r+")
    rows = store.read("ensemble/indices", (1, slice(0, R)))
    rows[3, 0] = C  # a class that does not exist (uint8 holds it: only the range check can tell)
    rows[5, 1] = rows[5, 0]
    store.write("ensemble/indices", (1, slice(0, R)), rows)  # rewritten whole: checksum is valid
    problems = verify_cache(path)["problems"]
    assert problems == [f"ensemble/indices: epoch 1 chunk 0 (rows 0..7): class index {C} out of range (C={C})",
                        "ensemble/indices: epoch 1 chunk 0 (rows 0..7): 1 row(s) repeat a class index"]


def test_verify_finds_unsorted_values_bad_order_unfinished_chunks_and_edited_manifest(zarr_cache, tmp_path):
    path = _copy(zarr_cache, tmp_path)
    store = open_store(path, "r+")
    v = store.read("members/toy_a/values", (0, slice(0, R)))
    v[2, [0, 1]] = v[2, [1, 0]]
    store.write("members/toy_a/values", (0, slice(0, R)), v)
    v[4, 0] = np.nan
    store.write("members/toy_b/values", (1, slice(0, R)), v)
    order = store.read("order", (1, slice(R, 2 * R)))
    order[0] = order[1]
    store.write("order", (1, slice(R, 2 * R)), order)
    store.write("done", (0, slice(LAST, LAST + 1)), np.zeros(1, np.uint8))
    manifest = store.read_manifest()
    manifest["seed"] = 123
    store.write_manifest(manifest)

    problems = "\n".join(verify_cache(path)["problems"])
    assert "members/toy_a/values: epoch 0 chunk 0 (rows 0..7): 1 row(s) not sorted descending" in problems
    assert "members/toy_b/values: epoch 1 chunk 0 (rows 0..7): 1 non-finite value(s)" in problems
    assert f"order: epoch 1 is not a permutation of 0..{N - 1} (1 index(es) missing, 1 repeated)" in problems
    assert f"epoch 0: 1 of {LAST + 1} chunk(s) not written (done marker unset: chunks {LAST})" in problems
    assert "config_digest does not match" in problems


def test_verify_refuses_what_is_not_a_cache(dataset):
    with pytest.raises(logitcache.LogitCacheError, match="not a logitcache cache"):
        verify_cache(dataset)


# ---------------------------------------------------------------- fidelity
def test_fidelity_is_exact_on_a_fresh_cache(strong_cache, dataset):
    """k = C, float32 values, same teachers, same machine: nothing is lost."""
    r = fidelity(strong_cache, dataset, TEACHERS, samples=16, seed=1, device="cpu", batch_size=5)
    assert r["samples_checked"] == 16 and r["teachers_match"]
    assert [t["match"] for t in r["teachers"]] == [True, True]
    for figures in [r, *r["members"].values()]:
        assert figures["max_abs_logit_error"] < 1e-4
        assert figures["mean_abs_logit_error"] <= figures["max_abs_logit_error"]
        assert figures["kl_mean"] == pytest.approx(0, abs=1e-6) and figures["kl_max"] < 1e-5
        assert figures["top1_agreement"] == 1 and figures["topk_index_agreement"] == 1
    assert set(r["members"]) == {"toy_a", "toy_b"}
    json.dumps(r)


def test_fidelity_notices_another_teacher(strong_cache, dataset):
    r = fidelity(strong_cache, dataset, ["toy_teachers:toy_a", "toy_teachers:toy_c"], samples=16, device="cpu")
    assert not r["teachers_match"]
    assert [t["match"] for t in r["teachers"]] == [True, False]
    assert r["max_abs_logit_error"] > 0.1 and r["kl_mean"] > 1e-3 and r["top1_agreement"] < 1
    assert r["members"]["toy_a"]["max_abs_logit_error"] < 1e-4  # the unchanged member still matches
    assert r["members"]["toy_b"]["max_abs_logit_error"] > 0.1  # toy_c compared with what toy_b stored


def test_fidelity_only_samples_written_chunks(zarr_cache, dataset, tmp_path):
    path = _copy(zarr_cache, tmp_path)
    open_store(path, "r+").write("done", (1, slice(0, 1)), np.zeros(1, np.uint8))  # as if never written
    r = fidelity(path, dataset, TEACHERS, samples=10_000, device="cpu")
    assert r["samples_checked"] == 2 * N - R and r["max_abs_logit_error"] < 1e-4


def test_fidelity_frame_level_multilabel_topk_float16(dumper, dataset):
    """Frame logits, sigmoid targets, k < C, float16: small rounding error, the top-k itself intact,
    and a KL that is the (small, nonzero) cost of spreading the tail evenly."""
    path = dumper(teachers=("toy_teachers:toy_frames",), epochs=1, topk=4, output_kind="multilabel",
                  value_dtype="float16", augment="ced")
    r = fidelity(path, dataset, ["toy_teachers:toy_frames"], samples=12, device="cpu")
    assert r["teachers_match"] and r["samples_checked"] == 12
    assert 0 < r["max_abs_logit_error"] < 2e-2
    assert r["topk_index_agreement"] == 1 and r["top1_agreement"] == 1
    assert 0 < r["kl_mean"] <= r["kl_max"] < 0.5
    # one member: the ensemble is that member (logit(sigmoid(z)) == z up to rounding)
    assert r["members"]["toy_frames"] == pytest.approx({k: r[k] for k in r["members"]["toy_frames"]}, rel=1e-3)


def test_fidelity_refuses_another_dataset(strong_cache, tmp_path):
    from logitcache.synth import make_dataset

    other = make_dataset(tmp_path / "other", 4, sample_rate=16000, clip_seconds=1.0, seed=5)
    with pytest.raises(logitcache.LogitCacheError, match="dataset does not match"):
        fidelity(strong_cache, other, TEACHERS, samples=2)


# ---------------------------------------------------------------- text helpers
def test_text_helpers():
    assert human_bytes(512) == "512 B" and human_bytes(1536) == "1.5 KiB" and human_bytes(None) == "-"
    table = format_table([["a", 1, 0.5], ["bbb", 10, None]], ["name", "n", "x"]).splitlines()
    assert table[0].split() == ["name", "n", "x"] and set(table[1]) <= {"-", " "}
    assert table[2] == "a      1  0.5" and table[3] == "bbb   10  -"
