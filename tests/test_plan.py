"""plan: projected sizes are measured, and they match what a dump of the same configuration takes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import logitcache
from logitcache import plan as plan_module
from logitcache.cli.main import main
from logitcache.data import AudioFolder
from logitcache.plan import plan_cache
from logitcache.report import inspect_cache
from conftest import C, CLIP_SECONDS, SR, assert_one_line_error

TEACHERS = ["toy_teachers:toy_a", "toy_teachers:toy_b"]
# Stated tolerance of a projection against a real dump of the same configuration: the synthetic
# logits stand in for the teachers' (measured: within 2% for the tiny cache, 3% for the bigger one).
TOLERANCE = 0.06


def _row(result: dict, backend: str) -> dict:
    return next(r for r in result["backends"] if r["backend"] == backend)


@pytest.mark.parametrize("suffix,backend", [(".zarr", "zarr"), (".h5", "hdf5")])
def test_plan_of_a_tiny_config_matches_its_dump(dumper, dataset, suffix, backend):
    """24 clips x 2 epochs, top-4 of 10 sigmoid float16, two members, 'ced' parameters: written whole."""
    cache = dumper(topk=4, output_kind="multilabel", value_dtype="float16", augment="ced", suffix=suffix)
    actual = inspect_cache(cache)
    audio = AudioFolder(dataset).audio_bytes()
    p = plan_cache(24, 2, 4, C, members=2, value_dtype="float16", output_kind="multilabel", augment="ced",
                   sample_rate=SR, clip_seconds=CLIP_SECONDS, audio_bytes=audio, backends=(backend,))
    assert not p["extrapolated"] and p["measured_views"] == 48 and p["chunk_rows"] == actual["chunk_rows"]
    row = _row(p, backend)
    assert row["bytes_on_disk"] == pytest.approx(actual["bytes_on_disk"], rel=TOLERANCE)
    assert row["bytes_per_sample_epoch"] == pytest.approx(row["bytes_on_disk"] / 48)
    assert row["share_of_audio"] == pytest.approx(row["bytes_on_disk"] / audio)
    assert sum(row["groups"].values()) == pytest.approx(row["bytes_on_disk"], abs=8)  # rounding per group
    # the uncompressed row is exact: every array of the layout at its itemsize, except that the plan
    # cannot know the ids, so it counts 19 bytes ("audio/00000000.flac") per sample
    ids = next(a["raw_bytes"] for a in actual["arrays"] if a["name"] == "ids/utf8")
    assert _row(p, "raw")["bytes_on_disk"] == actual["bytes_uncompressed"] - ids + 19 * 24


def test_plan_of_a_bigger_config_matches_its_dump(tmp_path):
    """512 short clips: enough rows that the targets, not the metadata, make most of the bytes."""
    from logitcache.synth import make_dataset

    data = make_dataset(tmp_path / "big", 512, sample_rate=8000, clip_seconds=0.1, seed=3, vary_format=False)
    cache = logitcache.dump(data, TEACHERS, tmp_path / "big.zarr", epochs=1, topk=4, output_kind="multilabel",
                            value_dtype="float16", augment="none", clip_seconds=0.1, sample_rate=8000,
                            batch_size=256, progress=False)
    actual = inspect_cache(cache)
    targets = sum(a["stored_bytes"] for a in actual["arrays"] if a["name"].startswith(("ensemble/", "members/")))
    assert targets > actual["bytes_on_disk"] / 2
    p = plan_cache(512, 1, 4, C, members=2, augment="none", sample_rate=8000, clip_seconds=0.1,
                   backends=("zarr",))
    assert _row(p, "zarr")["bytes_on_disk"] == pytest.approx(actual["bytes_on_disk"], rel=TOLERANCE)


def test_sampled_projection_matches_writing_the_whole_config(monkeypatch):
    """A big configuration is measured on one epoch of a sample and scaled per array; writing it whole
    (what LITERAL_ROWS allows for small ones) gives the same bytes within 3%."""
    kw = dict(samples=40_000, epochs=2, topk=2, classes=20, members=0, augment="none", backends=("zarr", "hdf5"))
    sampled = plan_cache(**kw)
    assert sampled["extrapolated"] and sampled["measured_views"] == plan_module.SAMPLE_CHUNK
    monkeypatch.setattr(plan_module, "LITERAL_ROWS", 10**9)
    whole = plan_cache(**kw)
    assert not whole["extrapolated"] and whole["measured_views"] == 80_000
    for backend in ("zarr", "hdf5"):
        assert _row(sampled, backend)["bytes_on_disk"] == pytest.approx(_row(whole, backend)["bytes_on_disk"],
                                                                         rel=0.03)
    assert _row(sampled, "raw") == _row(whole, "raw")


def test_plan_arithmetic_by_hand():
    """Uncompressed bytes, per-view scaling, the audio share and the PCM conversion, computed by hand."""
    N, E, k, M = 300_000, 4, 8, 1
    p = plan_cache(N, E, k, 600, members=M, value_dtype="float32", augment="none", audio_hours=2.5,
                   sample_rate=16000)
    assert p["index_dtype"] == "uint16"
    # values+indices+stat per target set; order and seeds are derived from (seed, epoch, id), not stored
    per_view = (M + 1) * (k * (4 + 2) + 4)
    ids = len("audio/00000000.flac") * N + 8 * (N + 1) + 4 * N  # ids, offsets, content (crc32 per sample)
    done = E * -(-N // p["chunk_rows"])
    done += M * E * -(-N // p["chunk_rows"]) * 3 * 8  # each member's logit sums: 3 float64 per chunk
    assert _row(p, "raw")["bytes_on_disk"] == E * N * per_view + ids + done
    assert p["audio_bytes"] == int(2.5 * 3600 * 16000 * 2) and "16-bit mono PCM" in p["audio_basis"]
    for row in p["backends"]:
        assert row["share_of_audio"] == pytest.approx(row["bytes_on_disk"] / p["audio_bytes"])
        assert row["ratio"] == pytest.approx(_row(p, "raw")["bytes_on_disk"] / row["bytes_on_disk"], rel=1e-3)
    compressed = _row(p, "zarr")
    assert 1.05 < compressed["ratio"] < 3  # top-k logits compress a little
    # twice the samples: per-view cost unchanged (measured on the same-sized sample), total doubles
    twice = plan_cache(2 * N, E, k, 600, members=M, value_dtype="float32", augment="none", backends=("zarr",))
    assert _row(twice, "zarr")["bytes_per_sample_epoch"] == pytest.approx(compressed["bytes_per_sample_epoch"],
                                                                          rel=0.02)


def test_plan_frame_level_and_float16_halves_the_values():
    frames = plan_cache(5000, 1, 8, 50, frames=25, augment="none", backends=("hdf5",))
    clip = plan_cache(5000, 1, 8, 50, augment="none", backends=("hdf5",))
    assert _row(frames, "raw")["groups"]["ensemble"] == 25 * _row(clip, "raw")["groups"]["ensemble"]
    assert 15 < _row(frames, "hdf5")["groups"]["ensemble"] / _row(clip, "hdf5")["groups"]["ensemble"] < 35
    fp32 = plan_cache(5000, 1, 8, 50, value_dtype="float32", augment="none", backends=("hdf5",))
    raw16, raw32 = _row(clip, "raw")["groups"]["ensemble"], _row(fp32, "raw")["groups"]["ensemble"]
    assert raw32 - raw16 == 5000 * 8 * 2


@pytest.mark.parametrize("kw,needle", [
    (dict(topk=11), "--topk 11"),
    (dict(samples=0), "--samples 0"),
    (dict(frames=0), "--frames 0"),
    (dict(members=-1), "--members -1"),
    (dict(value_dtype="int8"), "--value-dtype 'int8'"),
    (dict(audio_bytes=10, audio_hours=1.0), "give one, not both"),
    (dict(augment="wild"), "neither a preset"),
    (dict(backends=("tape",)), "backend 'tape'"),
])
def test_plan_bad_input_is_one_line(kw, needle):
    args = {"samples": 10, "epochs": 1, "topk": 4, "classes": 10, **kw}
    with pytest.raises(logitcache.LogitCacheError) as e:
        plan_cache(**args)
    assert_one_line_error(e, needle)


def test_plan_cli_text_and_json():
    args = ["plan", "--samples", "2000", "--epochs", "2", "--topk", "5", "--classes", "10", "--members", "2",
            "--audio-bytes", "123456789"]
    result = CliRunner().invoke(main, args + ["--json"])
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)
    assert [b["backend"] for b in r["backends"]] == ["zarr", "hdf5", "raw"]
    assert r["method"].startswith("measured: ") and r["views"] == 4000
    text = CliRunner().invoke(main, args)
    assert text.exit_code == 0
    lines = text.stdout.splitlines()
    assert lines[0].startswith("plan: 2 epochs x 2,000 samples = 4,000 views, top-5 of 10")
    assert [ln.split()[0] for ln in lines[3:6]] == ["zarr", "hdf5", "raw"]
    assert "% " in lines[3] + " " and "measured: " in text.stdout
    bad = CliRunner().invoke(main, ["plan", "--samples", "10", "--epochs", "1", "--topk", "12", "--classes", "10"])
    assert bad.exit_code == 1 and bad.stderr.strip() == "error: --topk 12: must be between 1 and --classes (10)"


def test_synthetic_logits_look_like_a_tagger():
    """A few confident classes per clip, most far below: the shape the compression was measured on."""
    logits = plan_module.synthetic_logits(np.random.default_rng(0), 2000, 200, members=2)
    assert len(logits) == 2 and logits[0].shape == (2000, 200)
    p = 1 / (1 + np.exp(-logits[0].numpy()))
    confident = (p > 0.5).sum(1)
    assert 0.8 < confident.mean() < 4 and np.median(p) < 0.05
    agree = (logits[0].argmax(1) == logits[1].argmax(1)).float().mean()
    assert 0.6 < float(agree) < 1  # members of an ensemble mostly agree
