"""Target codecs through the whole cache: dump, verify, inspect, read, train, fidelity, resume."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

import logitcache
from logitcache.cli.main import main
from logitcache.codecs import compact as cc
from logitcache.codecs import get_codec
from logitcache.cache import config_differences
from logitcache.errors import LogitCacheError
from logitcache.layout import codec_entries
from logitcache.report import fidelity, inspect_cache, verify_cache
from logitcache.train import train
from test_format1 import CACHES, FIXTURE, _raw_arrays, _sha

TEACHERS = ["toy_teachers:toy_a", "toy_teachers:toy_b"]
C = 10
K = 5
# topk float32 and compact dumps of the same views: the topk cache is the compact one's reference
KW = dict(topk=K, epochs=1, value_dtype="float32", output_kind="multiclass", augment="strong", chunk_rows=8)


@pytest.fixture(scope="module")
def pair(dumper):
    return dumper(codec="topk", **KW), dumper(codec="compact", **KW)


def test_compact_cache_verifies_and_inspects_smaller(pair):
    topk, compact = pair
    assert verify_cache(compact)["ok"], verify_cache(compact)["problems"]
    a, b = inspect_cache(topk), inspect_cache(compact)
    assert (a["codec"], b["codec"], a["format_version"], b["format_version"]) == ("topk", "compact", 2, 2)
    assert b["codec_options"] == {"value_bits": 6}  # the default
    # top-5 of 10: topk float32 20 + 5 + 4 B; compact ids 2 + codes 4 (5 x 6 bits) + offset 2 + step 1 + stat 2 B
    assert (a["target_row_bytes"], b["target_row_bytes"]) == (29, cc.row_bytes(K, C)) == (29, 11)
    views = a["samples"] * a["epochs"]
    # raw bytes per view: stored bytes of 24 views are mostly array metadata (5 arrays against 3)
    assert [(x["name"], x["raw_bytes"] / views) for x in a["targets_table"]] == \
        [("ensemble", 29), ("toy_a", 29), ("toy_b", 29)]
    assert [(x["name"], x["raw_bytes"] / views) for x in b["targets_table"]] == \
        [("ensemble", 11), ("toy_a", 11), ("toy_b", 11)]
    names = {n["name"] for n in b["arrays"]}
    assert {"ensemble/ids", "ensemble/codes", "ensemble/offset", "ensemble/step", "ensemble/stat",
            "members/toy_a/ids"} <= names and "ensemble/values" not in names


@pytest.mark.parametrize("member", [None, "toy_b"])
def test_compact_targets_are_the_codec_round_trip_of_topk_rows(pair, member):
    topk, compact = pair
    with logitcache.open_cache(topk) as a, logitcache.open_cache(compact) as b:
        assert a.order(0).tolist() == b.order(0).tolist()
        t = a.targets(0, member=member)
        want = cc.decode(cc.encode(t.values, t.indices, t.stat, C, "multiclass"), K, C, "multiclass")
        got = b.targets(0, member=member)
        for w, g in zip(want, (got.values, got.indices, got.stat)):
            assert w.dtype == g.dtype and np.array_equal(w, g)
        some = [b.ids[i] for i in b.order(0)[[3, 0, 17]]]
        picked = b.targets(0, some, member=member)
        assert np.array_equal(picked.values, got.values[[3, 0, 17]])
        block = b.read_block(0, 8, 16, member=member)
        assert np.array_equal(block["indices"], got.indices[8:16]) and np.array_equal(block["stat"], got.stat[8:16])


def test_compact_cache_trains_and_runs_fidelity(pair, dataset, tmp_path):
    topk, compact = pair
    result = train(compact, dataset, "cnn_tiny", tmp_path / "run", epochs=1, batch_size=8, max_steps=2,
                   device="cpu", progress=False)
    assert np.isfinite(result["train_loss"])
    r = fidelity(compact, dataset, TEACHERS, samples=6, device="cpu")
    ref = fidelity(topk, dataset, TEACHERS, samples=6, device="cpu")  # the same views (same seed)
    assert r["samples_checked"] == 6 and r["teachers_match"]
    # decoded 8-bit rows against the re-run teachers: within a quantisation step, KL as topk's
    assert 0 < r["max_abs_logit_error"] < 0.05 and ref["max_abs_logit_error"] < 1e-5
    assert r["top1_agreement"] == ref["top1_agreement"] == 1.0
    assert abs(r["kl_mean"] - ref["kl_mean"]) <= 0.01 * ref["kl_mean"] + 1e-6


def test_topk_codec_writes_format1_bytes_but_for_what_format2_derives_or_bins(tmp_path):
    """A topk dump of the format-1 fixture's data and settings stores what format 1 stored (the
    fixture's sha256s, read before codecs existed), except: order and seeds are derived (equal to
    the fixture's stored ones), grid parameters are integers (decoding to the fixture's float32
    bytes), and freq_mask bands are drawn in whole STFT bins since then, so they and the targets
    of the views they changed differ; their dtypes and shapes do not."""
    want = CACHES["strong.zarr"]["arrays"]
    path = logitcache.dump(FIXTURE / "data", TEACHERS, tmp_path / "strong.zarr", epochs=2, seed=7, batch_size=4,
                           value_dtype="float16", chunk_rows=4, device="cpu", num_workers=0, progress=False,
                           augment="strong", output_kind="multilabel", topk=5, backend="zarr", codec="topk")
    raw = _raw_arrays(path)
    # added since format 1: the content checksums and each member's per-chunk logit sums
    assert set(raw) == (set(want) - {"order", "seeds"}) | {"content", "members/toy_a/logit_moments",
                                                           "members/toy_b/logit_moments"}
    targets = {n for n in want if n.startswith(("ensemble/", "members/"))}
    assert len(targets) == 9
    old = logitcache.open_cache(FIXTURE / "strong.zarr")
    with logitcache.open_cache(path) as cache:
        assert cache.manifest["format_version"] == 2 and cache.manifest["codec"] == "topk"
        assert cache.manifest["codec_options"] == {"value_dtype": "float16", "index_dtype": "uint8"}
        assert sorted(cache.manifest["target_sets"]) == ["ensemble", "members/toy_a", "members/toy_b"]
        assert [t["name"] for t in cache.manifest["target_sets"]["ensemble"]["teachers"]] == ["toy_a", "toy_b"]
        for epoch in range(2):
            np.testing.assert_array_equal(cache.order(epoch), old.order(epoch))
            np.testing.assert_array_equal(cache.seeds(epoch), old.read_block(epoch, 0, 8)["seeds"])
            new_rows, old_rows = cache.read_block(epoch, 0, 8), old.read_block(epoch, 0, 8)
            for name in old_rows:
                if name.startswith("params/") and not name.startswith("params/freq_mask."):
                    assert new_rows[name].tobytes() == old_rows[name].tobytes(), (epoch, name)
            bins = new_rows["params/freq_mask.low_hz"] / (cache.manifest["augment"]["sample_rate"] / 512)
            np.testing.assert_array_equal(bins, np.round(bins))
    for name in set(want) - {"order", "seeds"}:
        grid = name.startswith("params/") and name[7:] in cache.manifest["param_storage"]
        if not grid:
            assert (str(raw[name].dtype), raw[name].shape) == want[name][:2], name
        if not grid and not name.startswith(("ensemble/", "members/", "params/freq_mask.")):
            assert _sha(raw[name]) == want[name][2], name


def test_format1_fixture_reports_codec_topk(tmp_path):
    shutil.copytree(FIXTURE / "strong.zarr", tmp_path / "strong.zarr")
    info = inspect_cache(tmp_path / "strong.zarr")
    assert (info["format_version"], info["codec"], info["codec_options"]) == \
        (1, "topk", {"value_dtype": "float16", "index_dtype": "uint8"})
    assert info["target_row_bytes"] == 5 * 2 + 5 + 4
    with logitcache.open_cache(tmp_path / "strong.zarr") as cache:
        assert "codec" not in cache.manifest and cache.spec.codec == "topk"


def test_unknown_codec_is_one_error_listing_the_known(dataset, tmp_path):
    with pytest.raises(LogitCacheError, match=r"^codec 'nope' is not known \(known codecs: compact, sampled, topk\)$"):
        get_codec("nope")
    r = CliRunner().invoke(main, ["dump", "--data", str(dataset), "--teacher", TEACHERS[0], "--out",
                                  str(tmp_path / "x.zarr"), "--codec", "nope"])
    assert r.exit_code == 1 and r.output == "error: codec 'nope' is not known (known codecs: compact, sampled, topk)\n"
    assert not (tmp_path / "x.zarr").exists()
    r = CliRunner().invoke(main, ["dump", "--data", str(dataset), "--teacher", TEACHERS[0], "--out",
                                  str(tmp_path / "x.zarr"), "--value-bits", "6"])
    assert r.exit_code == 1 and r.output == \
        "error: --value-bits 6: applies to --codec compact only (this dump is --codec topk)\n"


def test_verify_names_a_corrupt_compact_row(pair, tmp_path):
    _, compact = pair
    bad = tmp_path / "bad.zarr"
    shutil.copytree(compact, bad)
    ids = zarr.open_array(str(bad / "members" / "toy_a" / "ids"), mode="r+")
    row = np.asarray(ids[0, 9]).copy()
    row[:] = 0xFF  # every bit set: far more than k ones in the high-part bitmap
    ids[0, 9] = row  # written through zarr: the chunk checksum is valid, the content is not
    r = verify_cache(bad)
    assert not r["ok"]
    assert r["problems"] == ["members/toy_a/ids: epoch 0 chunk 1 (rows 8..15): 43 ids in 8 rows, "
                             "expected 5 per row (corrupt data)"]


def test_resume_refuses_another_codec(pair, dataset):
    topk, _ = pair
    with pytest.raises(LogitCacheError) as e:
        logitcache.dump(dataset, TEACHERS, topk, resume=True, codec="compact", sample_rate=16000, clip_seconds=1.0,
                        batch_size=8, members=True, num_workers=0, progress=False, **KW)
    assert "differs from the cache in codec (\"topk\" in the cache, \"compact\" now)" in str(e.value)
    assert "\n" not in str(e.value)


def test_format1_cache_resumes_as_topk(tmp_path):
    """A format-1 manifest has no codec entry: it migrates to topk with its dtypes, so a topk dump
    of the same settings may resume it and a compact one is refused, naming the codec."""
    shutil.copytree(FIXTURE / "strong.zarr", tmp_path / "strong.zarr")
    with logitcache.open_cache(tmp_path / "strong.zarr") as cache:
        old = cache.manifest
    assert "codec" not in old
    assert config_differences(old, {**old, **codec_entries("topk", "float16", "uint8")}) == []
    assert config_differences(old, {**old, **codec_entries("compact", "float16", "uint8")}) == \
        ['codec ("topk" in the cache, "compact" now)', "codec_options (a different value in the cache, "
         '{"value_bits": 6} now)']


@pytest.mark.parametrize("bits, message", [
    (17, "error: --value-bits 17: must be between 1 and 16\n"),
    (0, "error: --value-bits 0: must be at least 1 (a whole number)\n")])
def test_value_bits_out_of_range_is_one_error(dataset, tmp_path, bits, message):
    r = CliRunner().invoke(main, ["dump", "--data", str(dataset), "--teacher", TEACHERS[0], "--out",
                                  str(tmp_path / "x.zarr"), "--codec", "compact", "--value-bits", str(bits)])
    assert (r.exit_code, r.output) == (1, message)
    assert not (tmp_path / "x.zarr").exists()


def test_manifest_naming_an_unknown_codec_is_refused(pair, tmp_path):
    from logitcache.storage import open_store

    _, compact = pair
    bad = tmp_path / "bad.zarr"
    shutil.copytree(compact, bad)
    store = open_store(bad, "r+")
    store.write_manifest({**store.read_manifest(), "codec": "zstd-magic"})
    store.close()
    r = CliRunner().invoke(main, ["inspect", str(bad)])
    assert (r.exit_code, r.output) == \
        (1, f"error: {bad}: codec 'zstd-magic' is not known (known codecs: compact, sampled, topk)\n")
    r = CliRunner().invoke(main, ["verify", str(bad)])
    assert (r.exit_code, r.output) == \
        (1, f"error: {bad}: codec 'zstd-magic' is not known (known codecs: compact, sampled, topk)\n")


def test_compact_frames_in_hdf5_at_6_bits(dumper):
    """Frame-level targets [E, N, T, ...], the HDF5 backend and a non-default value_bits."""
    kw = dict(teachers=("toy_teachers:toy_frames",), topk=3, epochs=1, output_kind="multilabel", members=False)
    ref = dumper(codec="topk", **kw)
    path = dumper(codec="compact", value_bits=6, suffix=".h5", **kw)
    assert verify_cache(path)["ok"]
    with logitcache.open_cache(ref) as a, logitcache.open_cache(path) as b:
        assert b.spec.codec_options == {"value_bits": 6} and b.frames == a.frames > 1
        t, C = a.targets(0), len(a.classes)
        want = cc.decode(cc.encode(t.values, t.indices, t.stat, C, "multilabel", 6), 3, C, "multilabel", 6)
        got = b.targets(0)
        assert got.values.shape == (b.num_samples, b.frames, 3)
        assert all(np.array_equal(w, g) for w, g in zip(want, (got.values, got.indices, got.stat)))
        assert tuple(b.store.info("ensemble/codes")["shape"]) == (1, b.num_samples, b.frames, 3)  # 3 x 6 bits


def test_manifest_round_trips_through_its_type(pair):
    from logitcache.layout import Manifest

    _, compact = pair
    with logitcache.open_cache(compact) as cache:
        m = cache.manifest
    spec = Manifest.from_json(m)
    assert spec.to_json() == m
    assert (spec.format_version, spec.codec, spec.topk, spec.num_classes, spec.members) == \
        (2, "compact", K, C, ["toy_a", "toy_b"])
    old = json.loads((FIXTURE / "strong.zarr" / "zarr.json").read_text())["attributes"]["logitcache"]
    v1 = Manifest.from_json(old)
    assert v1.to_json() == old and (v1.format_version, v1.codec) == (1, "topk")


def test_codec_loss_and_dense_match_topk_on_the_same_views(pair):
    import torch

    from logitcache.targets import kd_loss

    topk, compact = pair
    with logitcache.open_cache(topk) as a, logitcache.open_cache(compact) as b:
        ta, tb = a.targets(0), b.targets(0)
        ca, cb = a.codec, b.codec
    student = torch.randn(len(ta.stat), C, generator=torch.Generator().manual_seed(0))
    rows = [torch.from_numpy(np.asarray(x)) for x in (ta.values, ta.indices, ta.stat)]
    assert float(ca.loss(student, rows, temperature=2.0)) == float(kd_loss(student, *rows, "multiclass", 2.0))
    lb = float(cb.loss(student, [torch.from_numpy(np.asarray(x)) for x in (tb.values, tb.indices, tb.stat)]))
    # 6-bit values (the default) are off by at most half a step of range / 63: ~0.1 % of the loss
    assert abs(lb - float(ca.loss(student, rows))) < 3e-3 * abs(lb)
    pa, pb = ca.dense((ta.values, ta.indices, ta.stat)), cb.dense((tb.values, tb.indices, tb.stat))
    assert pa.shape == pb.shape == (len(ta.stat), C)
    assert torch.allclose(pa.sum(-1), torch.ones(len(ta.stat)), atol=1e-5)
    assert float((pa - pb).abs().max()) < 0.02  # 8-bit values: within a step's worth of probability


def test_plan_sizes_the_compact_codec():
    from logitcache.plan import plan_cache

    a = plan_cache(2000, 1, 20, 527, backends=("zarr",), augment="none")
    b = plan_cache(2000, 1, 20, 527, backends=("zarr",), augment="none", codec="compact")
    assert (a["codec"], a["target_row_bytes"], b["codec"], b["target_row_bytes"]) == ("topk", 84, "compact", 37)
    raw_a, raw_b = (next(r for r in x["backends"] if r["backend"] == "raw") for x in (a, b))
    assert (raw_a["groups"]["ensemble"], raw_b["groups"]["ensemble"]) == (84 * 2000, 37 * 2000)
    zarr_a, zarr_b = (next(r for r in x["backends"] if r["backend"] == "zarr") for x in (a, b))
    assert zarr_b["groups"]["ensemble"] < zarr_a["groups"]["ensemble"]
