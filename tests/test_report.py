"""inspect / verify / fidelity / compare: numbers equal direct computation, damage is found and named."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import logitcache
from logitcache.cli.main import main
from logitcache.data import AudioFolder
from logitcache.report import fidelity, format_table, human_bytes, inspect_cache, verify_cache
from logitcache.storage import open_store
from conftest import C, N_CLIPS, assert_one_line_error, flip_byte

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
    per_view = [n for n in store.arrays() if n not in ("ids/utf8", "ids/offsets", "done", "content")]
    assert N % R == 0 and result["rows_checked"] == 2 * N
    # content (one crc per sample) is stored once, in epoch 0's positions
    assert result["chunks_checked"] == 2 * (N // R) * len(per_view) + N // R
    assert result["arrays_checked"] == len(store.arrays())


def test_verify_finds_a_flipped_byte_in_a_zarr_chunk(zarr_cache, tmp_path):
    path = _copy(zarr_cache, tmp_path)
    chunk = path / "ensemble/values/c/1/2/0"  # epoch 1, chunk 2 (rows 16..23)
    flip_byte(chunk, chunk.stat().st_size // 2)
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
    flip_byte(path, info.byte_offset + info.size // 2)
    result = verify_cache(path)
    assert not result["ok"]
    assert len(result["problems"]) == 1, result["problems"]
    problem = result["problems"][0]
    assert problem.startswith(f"members/toy_b/indices: epoch 0 chunk {LAST} (rows {LAST * R}..{N - 1}): read failed")
    assert "filter returned failure" in problem  # the fletcher32 checksum filter refused the chunk


def test_verify_finds_deleted_zarr_chunk_files(zarr_cache, tmp_path):
    """zarr reads a missing chunk as fill value 0 without error, and the done marker (its own array)
    still says 1. The writer stores every chunk, even all-zero ones (write_empty_chunks), so a
    missing chunk file of any array is damage, named by array and chunk."""
    path = _copy(zarr_cache, tmp_path)
    store = open_store(path)
    assert np.all(store.read("ensemble/values", (0, slice(R, 2 * R))) != 0)
    (path / "ensemble/values/c/0/1/0").unlink()
    (path / "params/mixup.partner/c/1/0").unlink()
    (path / "members/toy_a/stat/c/0/2").unlink()
    (path / "params/gain.db/c/1/2").unlink()
    assert np.all(open_store(path).read("ensemble/values", (0, slice(R, 2 * R))) == 0)  # silently zeros

    problems = verify_cache(path)["problems"]
    missing = "chunk missing from storage although marked done (reads back as fill value 0)"
    assert problems == [f"ensemble/values: epoch 0 chunk 1 (rows 8..15): {missing}",
                        f"members/toy_a/stat: epoch 0 chunk 2 (rows 16..23): {missing}",
                        f"params/mixup.partner: epoch 1 chunk 0 (rows 0..7): {missing}",
                        f"params/gain.db: epoch 1 chunk 2 (rows 16..23): {missing}"]


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


def test_verify_finds_unsorted_values_unfinished_chunks_and_edited_manifest(zarr_cache, tmp_path):
    path = _copy(zarr_cache, tmp_path)
    store = open_store(path, "r+")
    v = store.read("members/toy_a/values", (0, slice(0, R)))
    v[2, [0, 1]] = v[2, [1, 0]]
    store.write("members/toy_a/values", (0, slice(0, R)), v)
    v[4, 0] = np.nan
    store.write("members/toy_b/values", (1, slice(0, R)), v)
    store.write("done", (0, slice(LAST, LAST + 1)), np.zeros(1, np.uint8))
    manifest = store.read_manifest()
    manifest["seed"] = 123
    store.write_manifest(manifest)

    problems = "\n".join(verify_cache(path)["problems"])
    assert "members/toy_a/values: epoch 0 chunk 0 (rows 0..7): 1 row(s) not sorted descending" in problems
    assert "members/toy_b/values: epoch 1 chunk 0 (rows 0..7): 1 non-finite value(s)" in problems
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
    # the report counts frame rows: 12 views x 6 frames
    assert r["rows_checked"] == 72 and sum(r["tail_mass"]["counts"]) == 72 and r["k_grid"] == [1, 2, 3, 4]
    assert _by_k(r["per_k"])[4]["kl_mean"] == pytest.approx(r["kl_mean"], rel=1e-3)
    assert r["disagreement"]["members"] == ["toy_frames"] and r["disagreement"]["mean_pairwise_disagreement"] == 0


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


# ---------------------------------------------------------------- fidelity report: checked by hand
def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _by_k(rows: list[dict]) -> dict[int, dict]:
    return {r["k"]: r for r in rows}


def test_fidelity_report_per_k_equals_hand_computation(strong_cache, dataset, strong_views):
    """k = C softmax float32 cache, every view checked: the truncated cache's tail mass and KL, the
    members' disagreement and the per-class figures, all recomputed here from the teachers' logits."""
    from conftest import teacher_logits

    r = fidelity(strong_cache, dataset, TEACHERS, samples=10_000, device="cpu")
    assert r["samples_checked"] == r["rows_checked"] == 2 * N and r["k_grid"] == list(range(1, C + 1))
    za = np.concatenate([teacher_logits("toy_a", strong_views[e]) for e in (0, 1)]).astype(np.float64)
    zb = np.concatenate([teacher_logits("toy_b", strong_views[e]) for e in (0, 1)]).astype(np.float64)
    pa, pb = _softmax(za), _softmax(zb)
    p = (pa + pb) / 2  # mean_prob aggregation
    desc = -np.sort(-p, axis=1)
    per_k = _by_k(r["per_k"])
    for k2 in range(1, C + 1):
        tail = 1 - desc[:, :k2].sum(1)
        q = np.where(p >= desc[:, k2 - 1:k2], p, (tail / max(C - k2, 1))[:, None])  # top-k' kept, tail spread
        kl = (p * np.log(p / q)).sum(1)
        assert per_k[k2]["tail_mass_mean"] == pytest.approx(tail.mean(), rel=1e-5, abs=1e-7), k2
        assert per_k[k2]["covered_mass_min"] == pytest.approx(1 - tail.max(), rel=1e-5), k2
        assert per_k[k2]["kl_mean"] == pytest.approx(kl.mean(), rel=1e-4, abs=1e-7), k2
        assert per_k[k2]["top1_agreement"] == 1 and per_k[k2]["topk_agreement"] == 1
    assert per_k[C]["kl_mean"] == pytest.approx(0, abs=1e-7) and per_k[C]["tail_mass_mean"] < 1e-6
    assert per_k[1]["kl_mean"] > per_k[C // 2]["kl_mean"] > per_k[C]["kl_mean"]
    # the histogram holds every row, all of them in the lowest bins at k = C
    assert sum(r["tail_mass"]["counts"]) == 2 * N and r["tail_mass"]["max"] < 1e-6
    # members, re-run: pairwise top-1 agreement and KL(member || ensemble)
    d = r["disagreement"]
    agree = float((za.argmax(1) == zb.argmax(1)).mean())
    np.testing.assert_allclose(d["pairwise_top1_agreement"], [[1, agree], [agree, 1]])
    assert d["mean_pairwise_disagreement"] == pytest.approx(1 - agree)
    kl_a = (pa * np.log(pa / p)).sum(1).mean()
    assert d["member_vs_ensemble"]["toy_a"]["kl_to_ensemble"] == pytest.approx(kl_a, rel=1e-4)
    b_top1 = float((zb.argmax(1) == p.argmax(1)).mean())
    assert d["member_vs_ensemble"]["toy_b"]["top1_agreement"] == pytest.approx(b_top1)
    # every class is inside a k = C top-k; mean probabilities as computed here
    assert [c["coverage"] for c in r["per_class"]] == pytest.approx([1.0] * C)
    assert [c["mean_prob"] for c in r["per_class"]] == pytest.approx(p.mean(0).tolist(), rel=1e-5)
    # value dtype: float32 loses nothing at k = C, float16 rounding costs a little
    fp16, fp32 = _by_k(r["dtype_effect"]["float16"]), _by_k(r["dtype_effect"]["float32"])
    assert fp32[C]["max_abs_logit_error"] == 0 and fp32[C]["kl_mean"] == pytest.approx(0, abs=1e-7)
    z = np.log(p)
    assert 0 < fp16[C]["max_abs_logit_error"] <= np.abs(z).max() * 2**-11
    assert fp16[C]["kl_mean"] > fp32[C]["kl_mean"]
    assert fp16[3]["kl_mean"] == pytest.approx(fp32[3]["kl_mean"], rel=0.05)  # truncation dominates rounding
    # sizes: values and indices scale with k', the rest per view stays
    arrays = {a["name"]: a["stored_bytes"] for a in inspect_cache(strong_cache)["arrays"]}
    topk_bytes = sum(b for n, b in arrays.items() if n.endswith(("/values", "/indices")))
    assert per_k[C]["bytes_per_view"] - per_k[C // 2]["bytes_per_view"] == pytest.approx(topk_bytes / 2 / (2 * N))
    assert fp16[C]["bytes_per_view"] < fp32[C]["bytes_per_view"] == pytest.approx(per_k[C]["bytes_per_view"])
    json.dumps(r)


def test_truncating_a_sigmoid_cache_gives_the_smaller_dump(dumper, dataset):
    """A k = C multilabel cache truncated to k' = 4 holds what a top-4 dump of the same views holds,
    tail statistic included, and the two reports agree at k' = 4."""
    from logitcache.report import truncate_targets

    full = dumper(epochs=1, output_kind="multilabel", augment="ced")
    four = dumper(epochs=1, output_kind="multilabel", augment="ced", topk=4)
    a, b = logitcache.open_cache(full).targets(0), logitcache.open_cache(four).targets(0)
    v, i, s = truncate_targets(*(torch.from_numpy(np.asarray(x)) for x in (a.values, a.indices, a.stat)), 4, C,
                               "multilabel")
    assert np.array_equal(v.numpy(), b.values) and np.array_equal(i.numpy(), b.indices)
    np.testing.assert_allclose(s.numpy(), b.stat, rtol=1e-5, atol=1e-6)
    rf = fidelity(full, dataset, TEACHERS, samples=12, device="cpu")
    r4 = fidelity(four, dataset, TEACHERS, samples=12, device="cpu")
    f4, only = _by_k(rf["per_k"])[4], _by_k(r4["per_k"])[4]
    for key in ("kl_mean", "prob_max_abs_error", "covered_mass_mean", "tail_mass_mean"):
        assert f4[key] == pytest.approx(only[key], rel=1e-4), key
    assert _by_k(rf["per_k"])[C]["prob_max_abs_error"] < 1e-6  # k = C: the sigmoid probabilities are exact
    # per class: share of the fresh probability inside the stored top-4, by hand
    from conftest import stream_views, teacher_logits

    wave = stream_views(four, dataset, 0)
    pa = 1 / (1 + np.exp(-teacher_logits("toy_a", wave).astype(np.float64)))
    pb = 1 / (1 + np.exp(-teacher_logits("toy_b", wave).astype(np.float64)))
    p = (pa + pb) / 2
    r_all = fidelity(four, dataset, TEACHERS, samples=10_000, device="cpu")
    kept = np.argsort(-p, axis=1)[:, :4]
    mask = np.zeros_like(p, dtype=bool)
    np.put_along_axis(mask, kept, True, axis=1)
    coverage = (p * mask).sum(0) / p.sum(0)
    assert [c["coverage"] for c in r_all["per_class"]] == pytest.approx(coverage.tolist(), rel=1e-5)
    assert [c["in_topk_rate"] for c in r_all["per_class"]] == pytest.approx(mask.mean(0).tolist())


def test_inspect_size_tables_and_projection(strong_cache, h5_cache):
    info = inspect_cache(strong_cache, project_samples=N, project_epochs=2)
    arrays = {a["name"]: a for a in info["arrays"]}
    for t in info["targets_table"]:
        prefix = "ensemble" if t["name"] == "ensemble" else f"members/{t['name']}"
        assert t["stored_bytes"] == sum(arrays[f"{prefix}/{f}"]["stored_bytes"]
                                        for f in ("values", "indices", "stat"))
        assert t["bytes_per_view"] == pytest.approx(t["stored_bytes"] / (2 * N))
    assert [t["name"] for t in info["targets_table"]] == ["ensemble", "toy_a", "toy_b"]
    # per epoch: the chunk files of the per-view arrays (their zarr.json files belong to no epoch)
    per_view = [n for n in arrays if not n.startswith("ids/") and n not in ("done", "content")]
    meta = sum((strong_cache / n / "zarr.json").stat().st_size for n in per_view)
    per_view_bytes = sum(arrays[n]["stored_bytes"] for n in per_view)
    assert sum(e["stored_bytes"] for e in info["epochs_table"]) == per_view_bytes - meta
    assert [e["chunks_done"] for e in info["epochs_table"]] == [1, 1]
    # projecting to the cache's own size and chunking gives its own size back ...
    p = info["projection"]
    assert p["chunk_rows"] == info["chunk_rows"]
    assert p["bytes_on_disk"] == pytest.approx(info["bytes_on_disk"], abs=2)
    # ... and to 3x the samples, 5x the epochs the per-view groups grow 15x and the ids 3x (the
    # arithmetic of the projection itself is checked by hand in test_scale_arrays_by_hand)
    big = inspect_cache(strong_cache, project_samples=3 * N, project_epochs=10)["projection"]
    for group in ("ensemble", "members", "params", "order_seeds"):
        assert big["groups"][group] == pytest.approx(15 * p["groups"][group], abs=8), group
    assert big["groups"]["ids"] == pytest.approx(3 * p["groups"]["ids"], abs=2)
    assert big["share_of_audio"] == pytest.approx(big["bytes_on_disk"] / (3 * info["audio_bytes"]))
    assert inspect_cache(strong_cache)["projection"] is None
    # HDF5 splits by epoch too (chunk by chunk)
    h5 = inspect_cache(h5_cache)
    h5_arrays = {a["name"]: a["stored_bytes"] for a in h5["arrays"]}
    assert sum(e["stored_bytes"] for e in h5["epochs_table"]) == sum(
        b for n, b in h5_arrays.items() if not n.startswith("ids/") and n not in ("done", "content"))
    with pytest.raises(logitcache.LogitCacheError, match="--project-samples 0: must be at least 1"):
        inspect_cache(strong_cache, project_samples=0)


def test_scale_arrays_by_hand():
    from logitcache.plan import scale_arrays

    # 2 epochs x 10 samples in chunks of 5 rows (4 chunks) -> 4 epochs x 30 samples in chunks of 8
    # (4 x 4 = 16 chunks): per-view arrays x (4 * 30) / (2 * 10) = 6, ids x 3, done x 16 / 4 = 4,
    # the 50 bytes of metadata as they are
    arrays = {"ensemble/values": 1000, "members/a/values": 500, "params/gain.db": 70, "order": 200,
              "ids/path": 100, "done": 4}
    got = scale_arrays(arrays, 50, 2, 10, 5, 4, 30, 8)
    assert got["arrays"] == {"ensemble/values": 6000, "members/a/values": 3000, "params/gain.db": 420,
                             "order": 1200, "ids/path": 300, "done": 16}
    assert got["groups"] == {"ensemble": 6000, "members": 3000, "params": 420, "order_seeds": 1200,
                             "ids": 300, "other": 66}
    assert got["bytes_on_disk"] == 10986
    # the same chunk rows when none is given: 4 x ceil(30 / 5) = 24 chunks, done x 6
    assert scale_arrays(arrays, 50, 2, 10, 5, 4, 30)["arrays"]["done"] == 24


# ---------------------------------------------------------------- compare
@pytest.fixture(scope="module")
def trained_run(dumper, dataset, tmp_path_factory):
    """A student trained one epoch on a sigmoid top-4 cache, evaluated on a small held-out split."""
    from logitcache.synth import make_dataset
    from logitcache.train import train

    root = tmp_path_factory.mktemp("run")
    held = make_dataset(root / "eval", 10, sample_rate=16000, clip_seconds=1.0, seed=9)
    cache = dumper(epochs=1, output_kind="multilabel", augment="ced", topk=4)
    train(cache, dataset, "cnn_tiny", root / "run", epochs=2, batch_size=8, eval_data=held, device="cpu",
          progress=False)
    return root / "run", cache, held


def test_compare_student_against_ensemble_by_hand(trained_run, dataset):
    from conftest import teacher_logits
    from logitcache.augment import Augmenter
    from logitcache.report import compare
    from logitcache.train import average_precision, load_student

    run, cache, held = trained_run
    r = compare(run, eval_data=held, teachers=TEACHERS, samples=10_000, device="cpu")
    log = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert r["epochs"] == log and r["checkpoint_epoch"] == 1 and r["cache_matches_run"]
    assert r["cache"] == str(cache) and r["targets"] == "ensemble"
    # the held-out student mAP is what training logged after its last epoch (same checkpoint, same clips)
    assert r["eval"]["student_vs_labels"] == pytest.approx(log[-1]["eval_mAP"], rel=1e-6)

    c = logitcache.open_cache(cache)
    aug = Augmenter.from_spec(c.manifest["augment"])
    student = load_student(run, "cnn_tiny", C, aug.sample_rate)
    folder = AudioFolder(held)
    clips = torch.stack([aug.fit_clip(folder.load(i, aug.sample_rate)) for i in range(len(folder))])
    with torch.no_grad():
        zs = student(clips).double().numpy()
    pe = sum(1 / (1 + np.exp(-teacher_logits(t, clips).astype(np.float64))) for t in ("toy_a", "toy_b")) / 2
    ps = 1 / (1 + np.exp(-zs))
    kl = (pe * np.log(pe / ps) + (1 - pe) * np.log((1 - pe) / (1 - ps))).mean(1).mean()
    e = r["eval"]
    assert e["clips"] == 10 and e["teachers"] == ["toy_a", "toy_b"]
    assert e["top1_agreement"] == pytest.approx(float((zs.argmax(1) == pe.argmax(1)).mean()))
    assert e["kl_mean"] == pytest.approx(kl, rel=1e-4)
    assert e["ensemble_vs_labels"] == pytest.approx(np.nanmean(average_precision(pe, folder.label_rows(np.arange(len(folder))))), rel=1e-5)
    decided = (pe >= 0.5) | (pe == pe.max(1, keepdims=True))  # p >= 0.5, and always the ensemble's top-1
    assert e["map_vs_ensemble"] == pytest.approx(np.nanmean(average_precision(zs, decided.astype(np.float32))),
                                                 rel=1e-5)
    # cached training views, every one: the student against the stored top-1
    v = r["views"]
    assert v["views"] == N and v["epochs"] == [0]
    from conftest import stream_views

    with torch.no_grad():
        zv = student(stream_views(cache, dataset, 0)).numpy()  # dataset order
    stored = c.targets(0, c.ids).indices[:, 0]
    assert v["top1_agreement"] == pytest.approx(float((zv.argmax(1) == stored).mean()))
    assert 0 < v["kl_mean"] < 1 and 0 <= v["student_vs_labels"] <= 1


def test_compare_refuses_what_is_not_a_run(trained_run, tmp_path):
    from logitcache.report import compare

    run, cache, held = trained_run
    with pytest.raises(logitcache.LogitCacheError) as e:
        compare(tmp_path)
    assert_one_line_error(e, "not a training run", "config.json")
    with pytest.raises(logitcache.LogitCacheError) as e:
        compare(run, teachers=TEACHERS)
    assert_one_line_error(e, "--teacher needs --eval-data")


def test_compare_and_inspect_through_the_cli(trained_run, tmp_path):
    run, cache, held = trained_run
    out = tmp_path / "c.html"
    result = CliRunner().invoke(main, ["compare", str(run), "--eval-data", str(held), "--samples", "8",
                                       "--device", "cpu", "--html", str(out), "--json"])
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)
    assert r["views"]["views"] == 8 and r["eval"]["clips"] == 10 and "top1_agreement" not in r["eval"]
    assert out.read_text().count("data:image/png;base64,") == 1  # learning curve (no teachers: no per-class AP)
    text = CliRunner().invoke(main, ["compare", str(run), "--samples", "8", "--device", "cpu"])
    assert text.exit_code == 0 and text.stdout.splitlines()[0].startswith(f"{run}: student cnn_tiny")
    assert "cached training views" in text.stdout and "held-out clips" not in text.stdout
    bad = CliRunner().invoke(main, ["compare", str(tmp_path)])
    assert bad.exit_code == 1 and bad.stderr.startswith(f"error: {tmp_path}: not a training run")

    text = CliRunner().invoke(main, ["inspect", str(cache), "--project-samples", "2000000",
                                     "--project-epochs", "8"])
    assert text.exit_code == 0
    assert "targets" in text.stdout and "ensemble" in text.stdout and "chunks written" in text.stdout
    assert "projected: " in text.stdout and "for 8 epochs x 2000000 samples" in text.stdout


def test_fidelity_compares_the_codecs_on_the_fresh_logits(strong_cache, dataset):
    """codec_effect: the re-run teachers' own top-k stored by each codec choice and decoded; k = C
    here, so float32 topk loses nothing, float16 a little, compact more as its bits shrink."""
    r = fidelity(strong_cache, dataset, TEACHERS, samples=16, seed=1, device="cpu", batch_size=8)
    got = {x["codec"]: x for x in r["codec_effect"]}
    assert list(got) == ["topk float16", "topk float32", "compact 8-bit", "compact 6-bit", "compact 4-bit"]
    C = 10  # k = C = 10 classes: uint8 indices
    assert got["topk float32"]["target_bytes_per_row"] == C * (4 + 1) + 4
    assert got["topk float16"]["target_bytes_per_row"] == C * (2 + 1) + 4
    assert got["topk float32"]["kl_mean"] == pytest.approx(0, abs=1e-7) and got["topk float32"]["top1_agreement"] == 1
    for bits in (8, 6, 4):
        assert got[f"compact {bits}-bit"]["target_bytes_per_row"] < got["topk float16"]["target_bytes_per_row"]
    assert 0 < got["compact 8-bit"]["kl_mean"] < got["compact 4-bit"]["kl_mean"]
    assert got["compact 4-bit"]["kl_mean"] < 0.05
