"""The sampled codec (RS-KD) through the whole cache: dump, verify, inspect, read, train, fidelity.

The reference for what a dump stored is independent of the dump: the toy teachers re-run on views
replayed with ``logitcache.replay``, aggregated, and encoded by ``codecs.sampled.encode`` with the
seeds derived from the stored view seeds.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

import logitcache
from conftest import replayed, teacher_logits
from logitcache.cli.main import main
from logitcache.codecs import sampled as sc
from logitcache.codecs import target_set_seeds
from logitcache.errors import LogitCacheError
from logitcache.pipeline import TeacherPass
from logitcache.report import compare, fidelity, inspect_cache, verify_cache
from logitcache.targets import aggregate
from logitcache.train import distill_step, train
from logitcache.views import CacheStream

TEACHERS = ["toy_teachers:toy_a", "toy_teachers:toy_b"]
C = 10
KW = dict(codec="sampled", sample_n=6, sample_head=2, epochs=1, topk=5, chunk_rows=8, output_kind="multiclass")


@pytest.fixture(scope="module")
def cache8(dumper):
    return dumper(batch_size=8, **KW)


@pytest.fixture(scope="module")
def cache5(dumper):
    return dumper(batch_size=5, **KW)


def _stored(path) -> dict[str, np.ndarray]:
    with logitcache.open_cache(path) as cache:
        names = [n for n in cache.layout.arrays if cache.layout.arrays[n].target_set]
        return {n: cache.store.read(n) for n in names}


def _stored_rows(path) -> dict[str, np.ndarray]:
    """The stored arrays with each target set's Elias-Fano draws as the ids and counts they hold."""
    with logitcache.open_cache(path) as cache:
        stored, out = _stored(path), {}
        for ts in cache.layout.target_sets():
            own = {n.split("/")[-1]: a for n, a in stored.items() if n.rsplit("/", 1)[0] == ts}
            out.update({f"{ts}/{f}": a for f, a in cache.codec._ids_counts(own).items()})
        return out


def _reference(path, data, teachers, kind, members=True, epoch=0) -> dict[str, dict[str, torch.Tensor]]:
    """Target set -> the arrays ``sampled.encode`` gives for the re-run teachers on replayed views,
    rows in stored order, seeds derived from the stored view seeds."""
    with logitcache.open_cache(path) as cache:
        opts = cache.spec.codec_options
        order = cache.order(epoch)
        seeds = cache.read_block(epoch, 0, cache.num_samples, params=False, targets=False)["seeds"]
        waves = replayed(cache, data, epoch, [cache.ids[i] for i in order])
    logits = [torch.from_numpy(teacher_logits(t.split(":")[1], waves)) for t in teachers]
    groups = [aggregate(logits, kind, "mean_prob", None)] + (logits if members else [])
    derived = target_set_seeds(seeds, len(groups))
    names = ["ensemble"] + ([f"members/{t.split(':')[1]}" for t in teachers] if members else [])
    return {name: sc.encode(z, opts["n"], kind, opts["temperature"], opts["head"], seeds=derived[g])
            for g, (name, z) in enumerate(zip(names, groups))}


def test_sampled_cache_verifies_and_inspects(cache8):
    assert verify_cache(cache8)["ok"], verify_cache(cache8)["problems"]
    info = inspect_cache(cache8)
    assert (info["codec"], info["codec_options"]) == \
        ("sampled", {"draws": "elias_fano", "n": 6, "head": 2, "temperature": 1.0})
    # the 6 draws of 0..10 as an Elias-Fano multiset (3 B) + entropy 4 + mass 4 + head ids 2 x uint8
    # + head values 2 x 2 B; as ids + counts (caches from before) 6 + 6 instead of the 3
    assert info["target_row_bytes"] == 3 + 4 + 4 + 2 + 4 == sc.row_bytes(6, C, 2) - 9
    names = {a["name"] for a in info["arrays"]}
    assert {"ensemble/draws", "ensemble/entropy", "ensemble/mass", "ensemble/head_ids",
            "ensemble/head_values", "members/toy_a/draws"} <= names and "ensemble/ids" not in names


def test_arrays_do_not_depend_on_the_batch_size(cache8, cache5):
    a, b = _stored(cache8), _stored(cache5)
    assert sorted(a) == sorted(b) and len(a) == 15  # 3 target sets x draws, entropy, mass, head ids, values
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name


def test_stored_rows_are_the_encode_of_the_rerun_teachers(cache8, dataset):
    ref = _reference(cache8, dataset, TEACHERS, "multiclass")
    stored = _stored_rows(cache8)
    for ts, arrays in ref.items():
        for field, want in arrays.items():
            got = stored[f"{ts}/{field}"][0]
            assert np.array_equal(got, want.numpy()), (ts, field)
            assert field in ("ids", "counts") or got.dtype == want.numpy().dtype, (ts, field)
    # target sets draw independently: the same position's ids differ somewhere between sets
    assert not np.array_equal(stored["members/toy_a/ids"], stored["members/toy_b/ids"])
    with logitcache.open_cache(cache8) as cache:
        t = cache.targets(0, member="toy_b")
    want = sc.decode(ref["members/toy_b"])
    assert sorted(t) == sorted(want) and all(np.array_equal(t[k], want[k].numpy()) for k in want)


def test_training_loss_is_the_codec_loss_of_the_reencoded_rows(cache8, dataset):
    ref = sc.decode(_reference(cache8, dataset, TEACHERS, "multiclass")["ensemble"])
    batch = next(iter(CacheStream(cache8, dataset, 0, batch_size=8)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(batch["wave"].shape[-1], C))
    with torch.no_grad():
        want = float(sc.loss(model(batch["wave"]), {k: v[:8] for k, v in ref.items()}, "multiclass", 2.0))
    with logitcache.open_cache(cache8) as cache:
        codec = cache.codec
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    got = distill_step(model, opt, batch, "multiclass", torch.device("cpu"), temperature=2.0, codec=codec)
    assert got == pytest.approx(want, rel=1e-6, abs=1e-7) and np.isfinite(got) and got != 0


def test_sampled_cache_trains_and_runs_fidelity(cache8, dataset, tmp_path, capsys):
    result = train(cache8, dataset, "cnn_tiny", tmp_path / "run", epochs=1, batch_size=8, max_steps=2,
                   device="cpu", progress=False)
    assert np.isfinite(result["train_loss"]) and capsys.readouterr().err == ""
    r = fidelity(cache8, dataset, TEACHERS, samples=6, device="cpu")
    assert r["samples_checked"] == 6 and r["teachers_match"] and r["codec"] == "sampled"
    for figures in [r, *r["members"].values()]:
        assert figures["max_abs_logit_error"] is figures["topk_index_agreement"] is None
        assert 0 <= figures["kl_mean"] <= figures["kl_max"] < float("inf")
        assert 0 <= figures["top1_agreement"] <= 1
    assert r["per_k"] is None and "do not apply" in r["not_applicable"]
    # compare: the student against the cache's stored (empirical) distribution
    c = compare(tmp_path / "run", samples=8, device="cpu")
    assert c["views"]["views"] == 8 and 0 <= c["views"]["top1_agreement"] <= 1
    assert np.isfinite(c["views"]["kl_mean"])


def test_training_at_another_temperature_warns(cache8, dataset, tmp_path, capsys):
    train(cache8, dataset, "cnn_tiny", tmp_path / "run", epochs=1, batch_size=8, max_steps=1, device="cpu",
          progress=False, temperature=2.0)
    err = capsys.readouterr().err
    assert err.startswith("warning: ") and err.count("\n") == 1
    assert "--sample-temperature 1, trained at --temperature 2" in err


def test_verify_names_a_corrupt_draws_row(cache8, tmp_path):
    bad = tmp_path / "bad.zarr"
    shutil.copytree(cache8, bad)
    draws = zarr.open_array(str(bad / "members" / "toy_a" / "draws"), mode="r+")
    draws[0, 9] = np.full(draws.shape[-1], 0xFF, np.uint8)  # through zarr: a valid checksum, not a valid set
    r = verify_cache(bad)
    assert len(r["problems"]) == 1
    assert r["problems"][0].startswith("members/toy_a/draws: epoch 0 chunk 1 (rows 8..15): ")
    assert "corrupt" in r["problems"][0]


def test_multilabel_frames_through_the_cli(dataset, tmp_path):
    """multilabel, frame-level rows (one sub-stream per frame), HDF5, a dump temperature, the CLI."""
    out = tmp_path / "frames.h5"
    r = CliRunner().invoke(main, ["dump", "--data", str(dataset), "--teacher", "toy_teachers:toy_frames",
                                  "--out", str(out), "--epochs", "1", "--topk", "3", "--codec", "sampled",
                                  "--sample-n", "5",
                                  "--sample-temperature", "2", "--output-kind", "multilabel", "--no-members",
                                  "--workers", "0", "--batch-size", "7"])
    assert r.exit_code == 0, r.output
    assert "5 draws of 10 (sampled)" in r.output
    assert verify_cache(out)["ok"]
    ref = _reference(out, dataset, ["toy_teachers:toy_frames"], "multilabel", members=False)["ensemble"]
    stored = _stored_rows(out)
    assert ref["ids"].shape == (24, 6, 5)  # [N, frames, n]
    for field, want in ref.items():
        assert np.array_equal(stored[f"ensemble/{field}"][0], want.numpy()), field
    ids = stored["ensemble/ids"][0]
    assert not np.array_equal(ids[:, 0], ids[:, 1])  # frames draw from their own streams


@pytest.mark.parametrize("args, message", [
    (["--codec", "sampled"], "error: --codec sampled needs --sample-n N (ids drawn per row)\n"),
    (["--codec", "sampled", "--sample-n", "0"], "error: --sample-n 0: must be from 1 to 65535 (a whole number)\n"),
    (["--codec", "sampled", "--topk", "5", "--sample-n", "4", "--sample-head", "10"],
     "error: --sample-head 10: must be from 0 to 9 (a whole number)\n"),
    (["--codec", "sampled", "--sample-n", "4", "--sample-temperature", "0"],
     "error: --sample-temperature 0.0: must be above 0 (a finite number)\n"),
    (["--codec", "sampled", "--sample-n", "4", "--sample-temperature", "inf"],
     "error: --sample-temperature inf: must be above 0 (a finite number)\n"),
    (["--sample-n", "4"], "error: --sample-n 4: applies to --codec sampled only (this dump is --codec topk)\n"),
])
def test_bad_sampling_options_are_one_error(dataset, tmp_path, args, message):
    r = CliRunner().invoke(main, ["dump", "--data", str(dataset), "--teacher", TEACHERS[0], "--out",
                                  str(tmp_path / "x.zarr"), "--workers", "0", *args])
    assert (r.exit_code, r.output) == (1, message)
    assert not (tmp_path / "x.zarr").exists()


def test_nan_teacher_is_named_not_the_sampler(dataset, tmp_path):
    with pytest.raises(LogitCacheError, match=r"^teacher toy_nan produced NaN/Inf logits for sample\(s\) "):
        logitcache.dump(dataset, ["toy_teachers:toy_nan"], tmp_path / "x.zarr", codec="sampled", sample_n=4, topk=5,
                        epochs=1, num_workers=0, progress=False)


def test_plan_sizes_the_sampled_codec():
    from logitcache.plan import plan_cache

    r = plan_cache(2000, 1, 20, 527, members=0, backends=("zarr",), augment="none", codec="sampled", sample_n=25,
                   output_kind="multiclass")
    from logitcache.codecs.compact import id_layout

    row = id_layout(25, 527 + 25).nbytes + 4  # the draws' Elias-Fano multiset + entropy (ids + counts: 3 n + 4)
    assert (r["codec"], r["codec_options"], r["target_row_bytes"]) == \
        ("sampled", {"draws": "elias_fano", "n": 25, "head": 0, "temperature": 1.0}, row)
    assert row < 3 * 25 + 4
    raw = next(b for b in r["backends"] if b["backend"] == "raw")
    assert raw["groups"]["ensemble"] == row * 2000


def test_failed_dump_resumes_to_the_same_arrays(cache8, dumper, dataset, tmp_path, monkeypatch):
    """A dump that dies mid-epoch (batches of 5) and is resumed (batches of 8, only the missing
    chunks) stores what an uninterrupted dump stores: draws follow the views, not the run."""
    real, calls = TeacherPass.submit, []

    def fails_on_batch_3(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("teacher crashed")
        return real(*a, **k)

    out = tmp_path / "run.zarr"
    kw = {**dumper.defaults(), **KW}  # cache8's settings
    del kw["batch_size"]
    monkeypatch.setattr(TeacherPass, "submit", fails_on_batch_3)
    with pytest.raises(RuntimeError):
        logitcache.dump(dataset, TEACHERS, out, batch_size=5, **kw)
    monkeypatch.setattr(TeacherPass, "submit", real)
    with logitcache.open_cache(out) as c:
        assert c.chunks_done().tolist() == [[True, False, False]]
    logitcache.dump(dataset, TEACHERS, out, batch_size=8, resume=True, **kw)
    a, b = _stored(cache8), _stored(out)
    assert sorted(a) == sorted(b) and [n for n in a if not np.array_equal(a[n], b[n])] == []


def test_fidelity_cli_and_html_of_a_sampled_cache(cache8, dataset, tmp_path):
    out = tmp_path / "f.html"
    r = CliRunner().invoke(main, ["fidelity", str(cache8), "--data", str(dataset), "--teacher", TEACHERS[0],
                                  "--teacher", TEACHERS[1], "--samples", "4", "--device", "cpu",
                                  "--html", str(out)])
    assert r.exit_code == 0, r.output
    assert "4 stored views re-run, codec sampled; teachers match the manifest: yes" in r.output
    assert "not applicable: the codec stores no top-k logits" in r.output
    page = out.read_text()
    assert "codec sampled" in page and "Not applicable: the codec stores no top-k logits" in page


def test_inspect_cli_says_draws_not_top_k(cache8):
    r = CliRunner().invoke(main, ["inspect", str(cache8)])
    assert r.exit_code == 0, r.output
    assert "6 draws + head 2 of 10 classes, multiclass" in r.output and "top-5" not in r.output
