"""Bad inputs not covered elsewhere (see the README's Reliability table for the whole catalogue),
caches that must never be unpickled, read-only caches, corruption in every array, and training
on a data folder or spec the cache does not match."""

from __future__ import annotations

import base64
import json
import pickle
import shutil
import stat
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
import soundfile
import torch
import zarr

import logitcache
from logitcache import LogitCacheError
from logitcache.augment import epoch_order, id_hashes
from logitcache.cache import config_digest
from logitcache.report import inspect_cache, verify_cache
from logitcache.storage import BACKENDS
from logitcache.train import load_student, train
from conftest import CLIP_SECONDS, SR, Boom, assert_one_line_error, flip_byte, labels_csv_ids
from test_cli import assert_error, run

TEACHER = "toy_teachers:toy_a"
R = 8  # rows per chunk of the caches damaged below (the same caches as test_report's)


def _dump(data, out, teachers=(TEACHER,), **kw):
    cfg = dict(epochs=1, topk=3, augment="none", sample_rate=SR, clip_seconds=CLIP_SECONDS, progress=False)
    return logitcache.dump(data, list(teachers), out, **{**cfg, **kw})


def _copy(src: Path, dst: Path) -> Path:
    (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    return dst


def _payload(marker: Path) -> bytes:
    data = pickle.dumps(Boom(marker), protocol=4)
    control = marker.with_name(marker.name + ".control")
    pickle.loads(pickle.dumps(Boom(control), protocol=4))  # the payload is live: unpickling does run it
    assert control.exists()
    control.unlink()
    return data


# ---------------------------------------------------------------- audio
@pytest.mark.parametrize("damage,needles", [
    (lambda p: p.write_bytes(b"this is not audio at all" * 40), ["cannot decode audio"]),
    (lambda p: p.write_bytes(b""), ["cannot decode audio"]),
    (lambda p: soundfile.write(p, np.zeros(0, np.float32), soundfile.info(p).samplerate), ["zero-length audio"]),
], ids=["unreadable", "empty_file", "zero_frames"])
def test_unreadable_empty_or_zero_length_audio(dataset, tmp_path, damage, needles):
    data = _copy(dataset, tmp_path / "data")
    name = labels_csv_ids(data)[17]
    damage(data / name)
    out = tmp_path / "out.zarr"
    with pytest.raises(LogitCacheError) as e:
        _dump(data, out)
    assert_one_line_error(e, name, *needles)
    assert not out.exists()  # found by the header scan, before any teacher ran
    assert_error(run("dump", "--data", data, "--teacher", TEACHER, "--out", out, "--topk", 3,
                     "--clip-seconds", CLIP_SECONDS), name, *needles)


def test_source_sample_rates_are_resampled_and_recorded(strong_cache, dataset):
    m = logitcache.open_cache(strong_cache).manifest
    rates = Counter(soundfile.info(dataset / i).samplerate for i in labels_csv_ids(dataset))
    assert len(rates) > 1 and SR in rates  # the synthetic set mixes sample rates
    assert m["dataset"]["source_sample_rates"] == {str(r): n for r, n in sorted(rates.items())}
    assert m["dataset"]["resampled_files"] == sum(n for r, n in rates.items() if r != SR) > 0
    assert m["augment"]["sample_rate"] == SR  # what every file was resampled to


# ---------------------------------------------------------------- NaN / Inf mid-dump
@pytest.mark.parametrize("teacher", ["toy_nan_on_silence", "toy_inf_on_silence"])
def test_non_finite_logits_stop_the_dump_without_marking_their_chunk(dataset, tmp_path, teacher):
    data = _copy(dataset, tmp_path / "data")
    ids = labels_csv_ids(data)
    order = epoch_order(0, 0, id_hashes(ids))
    victim = ids[order[13]]  # stored position 13 of epoch 0: chunk 3 of 4-row chunks
    soundfile.write(data / victim, np.zeros(SR, np.float32), soundfile.info(data / victim).samplerate)
    out = tmp_path / "bad.zarr"
    with pytest.raises(LogitCacheError) as e:
        _dump(data, out, (f"toy_teachers:{teacher}",), epochs=2, batch_size=4, chunk_rows=4)
    assert_one_line_error(e, teacher, "NaN/Inf", victim)
    cache = logitcache.open_cache(out)
    done = cache.chunks_done()
    assert done[0, :3].all() and not done[0, 3:].any() and not done[1].any()
    assert not cache.complete
    # what was marked done is intact and finite; the rest is reported as unwritten, nothing else
    problems = verify_cache(out)["problems"]
    assert all("not complete" in p or "not written" in p for p in problems), problems


# ---------------------------------------------------------------- teacher and weights files
def test_teacher_file_that_is_not_a_model(dataset, tmp_path):
    marker = tmp_path / "pwned"
    cases = [("teacher.pt", b"just some text\n", ["teacher.pt", "not a model"]),
             ("teacher.pt2", b"PK\x03\x04 not really a zip", ["teacher.pt2", "not a torch.export program"]),
             ("evil.pt", _payload(marker), ["evil.pt", "not a model"])]
    for name, content, needles in cases:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(LogitCacheError) as e:
            _dump(dataset, tmp_path / "out.zarr", (str(tmp_path / name),))
        assert_one_line_error(e, *needles)
    assert_error(run("dump", "--data", dataset, "--teacher", tmp_path / "teacher.pt", "--out", tmp_path / "o.zarr"),
                 "not a model")
    assert not marker.exists() and not (tmp_path / "out.zarr").exists()


def test_weights_that_weights_only_refuses_are_never_unpickled(dataset, tmp_path):
    from logitcache.teachers import load_state_dict
    import toy_teachers

    good = tmp_path / "good.pt"
    torch.save(toy_teachers.toy_a().state_dict(), good)
    assert set(load_state_dict(good)) == {"filters", "weight", "bias"}  # a real state dict loads

    marker = tmp_path / "pwned"
    _payload(marker)
    evil = tmp_path / "evil.pt"
    torch.save({"weight": Boom(marker)}, evil)
    with pytest.raises(LogitCacheError) as e:
        _dump(dataset, tmp_path / "out.zarr", state_dicts=[str(evil)])
    assert_one_line_error(e, str(evil), "weights_only=True")
    assert_error(run("dump", "--data", dataset, "--teacher", TEACHER, "--state-dict", evil, "--out", tmp_path / "o.zarr"),
                 "evil.pt", "weights_only=True")
    # a student checkpoint is loaded the same way
    (tmp_path / "run").mkdir()
    shutil.copy(evil, tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(LogitCacheError) as e:
        load_student(tmp_path / "run", "cnn_tiny", 10, SR)
    assert_one_line_error(e, "checkpoint.pt", "weights_only=True")
    assert not marker.exists()


# ---------------------------------------------------------------- caches hold no pickles
def test_pickle_payloads_in_a_cache_are_never_unpickled(dumper, dataset, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    payload = _payload(marker)
    text = base64.b64encode(payload).decode()

    z = _copy(dumper(chunk_rows=R), tmp_path / "evil.zarr")
    group = zarr.open_group(str(z), mode="r+")
    group.attrs["logitcache"] = {**group.attrs["logitcache"], "note": text, "teachers_pickle": text}
    group.attrs["evil"] = text
    group.create_array("evil", shape=(len(payload),), dtype="uint8")[:] = np.frombuffer(payload, np.uint8)

    h = _copy(dumper(chunk_rows=R, suffix=".h5"), tmp_path / "evil.h5")
    with h5py.File(h, "r+") as f:
        f.attrs["evil"] = np.void(payload)
        f.create_dataset("evil", data=np.frombuffer(payload, np.uint8)).attrs["evil"] = np.void(payload)
        f["ensemble/values"].attrs["evil"] = np.void(payload)
    h_manifest = _copy(h, tmp_path / "manifest_is_a_pickle.h5")
    with h5py.File(h_manifest, "r+") as f:
        f.attrs["logitcache"] = np.void(payload)

    import torch._dynamo  # noqa: F401  (the first optimizer step imports it, and it unpickles its own config)

    unpickled = []
    for name in ("loads", "load"):
        monkeypatch.setattr(pickle, name, lambda *a, _n=name, **k: unpickled.append(_n))
    monkeypatch.setattr(pickle, "Unpickler", lambda *a, **k: unpickled.append("Unpickler"))

    for path in (z, h):
        cache = logitcache.open_cache(path)
        assert cache.targets(0).values.shape[0] == cache.num_samples
        assert cache.manifest.get("note", text) == text  # an unknown field stays an inert string
        info = inspect_cache(path)
        assert "evil" in [a["name"] for a in info["arrays"]]
        problems = verify_cache(path)["problems"]
        assert problems == ["evil: unexpected array (not implied by the manifest)"]
        logitcache.replay(cache, dataset, 0, cache.ids[0])
        train(path, dataset, "cnn_tiny", tmp_path / f"run{path.suffix}", epochs=1, batch_size=8, max_steps=2,
              progress=False)
        result = run("inspect", path)
        assert result.exit_code == 0, result.output
    with pytest.raises(LogitCacheError) as e:
        logitcache.open_cache(h_manifest)
    assert_one_line_error(e, str(h_manifest), "manifest is not a JSON object")
    assert unpickled == [] and not marker.exists()


# ---------------------------------------------------------------- read-only caches
@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_train_on_a_read_only_cache(dumper, dataset, tmp_path, monkeypatch, suffix):
    """chmod a-w does not stop root (the tests may run as root), so writes are also trapped."""
    path = _copy(dumper(chunk_rows=R, suffix=suffix), tmp_path / f"ro{suffix}")
    files = sorted(p for p in [path, *path.rglob("*")])
    before = {p: (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None) for p in files}
    for p in files:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))

    def forbidden(*a, **k):
        raise AssertionError("a write was attempted on a read-only cache")

    for cls in BACKENDS.values():
        for method in ("write", "resize", "write_manifest", "create_array", "flush"):
            monkeypatch.setattr(cls, method, forbidden)
    for method in ("set", "set_if_not_exists", "delete"):
        monkeypatch.setattr(zarr.storage.LocalStore, method, forbidden)
    modes = []
    real_init = h5py.File.__init__

    def h5_init(self, name, mode="r", *a, **k):
        modes.append(mode)
        return real_init(self, name, mode, *a, **k)

    monkeypatch.setattr(h5py.File, "__init__", h5_init)
    try:
        metrics = train(path, dataset, "cnn_tiny", tmp_path / "run", epochs=1, batch_size=8, progress=False)
        assert metrics["samples"] == 24 and np.isfinite(metrics["train_loss"])
        assert verify_cache(path)["ok"]
    finally:
        for p in files:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)
    assert set(modes) <= {"r"} and (suffix == ".zarr" or modes)
    assert {p: (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None) for p in files} == before


# ---------------------------------------------------------------- training on a mismatched cache
def test_training_refuses_another_class_list_or_spec_version(dumper, dataset, tmp_path):
    cache = dumper(chunk_rows=R)
    data = _copy(dataset, tmp_path / "data")
    classes = (data / "classes.txt").read_text().split()
    classes[0], classes[1] = classes[1], classes[0]  # same names, same count, another order
    (data / "classes.txt").write_text("\n".join(classes) + "\n")
    with pytest.raises(LogitCacheError) as e:
        train(cache, data, "cnn_tiny", tmp_path / "run", progress=False)
    assert_one_line_error(e, str(data), "class list differs", str(cache))

    future = _copy(cache, tmp_path / "future.zarr")
    group = zarr.open_group(str(future), mode="r+")
    manifest = group.attrs["logitcache"]
    future_manifest = {**manifest, "augment": {**manifest["augment"], "version": 99}}
    # as a newer logitcache would write it: its digest covers the spec it wrote
    group.attrs["logitcache"] = {**future_manifest, "config_digest": config_digest(future_manifest)}
    with pytest.raises(LogitCacheError) as e:
        train(future, dataset, "cnn_tiny", tmp_path / "run2", progress=False)
    assert_one_line_error(e, str(future), "augmentation spec version 99 is not supported")
    assert_error(run("train", "--cache", future, "--data", dataset, "--student", "cnn_tiny", "--out", tmp_path / "r3"),
                 "augmentation spec version 99")


def test_train_cli_bad_cache_member_or_partial(dumper, dataset, tmp_path):
    cache = dumper(chunk_rows=R)
    base = ["train", "--data", dataset, "--student", "cnn_tiny", "--out", tmp_path / "run"]
    assert_error(run(*base, "--cache", dataset), "not a logitcache cache")
    assert_error(run(*base, "--cache", cache, "--member", "nobody"), "unknown member 'nobody'", "toy_a, toy_b")

    partial = _copy(cache, tmp_path / "partial.zarr")
    group = zarr.open_group(str(partial), mode="r+")
    group.attrs["logitcache"] = {**group.attrs["logitcache"], "complete": False}
    group["done"][1, :] = 0
    assert_error(run(*base, "--cache", partial), "incomplete", "--allow-partial")
    result = run(*base, "--cache", partial, "--allow-partial", "--epochs", 1, "--batch-size", 12, "--json")
    assert result.exit_code == 0, result.output
    assert "training on its 1 complete epoch(s) only (stored epochs 0)" in result.stderr
    assert json.loads(result.stdout)["stored_epoch"] == 0


# ---------------------------------------------------------------- a flipped byte in every array
def _zarr_chunk_file(root: Path, name: str, epoch: int, chunk: int) -> Path:
    p = root / name / "c" / str(chunk) if name == "content" else root / name / "c" / str(epoch) / str(chunk)
    while p.is_dir():  # trailing (frame, k) axes are one chunk each: .../0/0
        p = p / "0"
    return p


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_verify_finds_a_flipped_byte_in_every_array(dumper, tmp_path, suffix):
    src = dumper(chunk_rows=R, suffix=suffix)
    names = [n for n in logitcache.open_cache(src).store.arrays() if not n.startswith("ids/") and n != "done"]
    assert len(names) >= 20
    path = _copy(src, tmp_path / f"flipped{suffix}")
    # (epoch, chunk), spread out; content is stored once, with epoch 0
    where = {name: (0 if name == "content" else i % 2, i % 3) for i, name in enumerate(names)}
    if suffix == ".zarr":
        for name, (e, c) in where.items():
            f = _zarr_chunk_file(path, name, e, c)
            flip_byte(f, f.stat().st_size // 2, mask=0x5A)
    else:
        with h5py.File(path, "r") as f:
            offsets = {}
            for name, (e, c) in where.items():
                d = f[name]
                row = c if name.endswith("/logit_moments") else c * R  # member sums: one row per chunk
                info = next(d.id.get_chunk_info(i) for i in range(d.id.get_num_chunks())
                            if tuple(d.id.get_chunk_info(i).chunk_offset[:2]) in ((e, row), (c * R,)))
                offsets[name] = info.byte_offset + info.size // 2
        for name, off in offsets.items():
            flip_byte(path, off, mask=0x5A)
    problems = verify_cache(path)["problems"]
    for name, (e, c) in where.items():
        assert any(p.startswith(f"{name}: epoch {e} chunk {c} ") and "read failed" in p for p in problems), name
    assert len(problems) == len(names), problems  # one problem per flipped chunk, nothing else

    # the arrays outside the per-position layout: ids and the done markers
    path2 = _copy(src, tmp_path / f"flipped2{suffix}")
    if suffix == ".zarr":
        for name, f in (("done", path2 / "done/c/1/2"), ("ids/utf8", path2 / "ids/utf8/c/0")):
            flip_byte(f, f.stat().st_size // 2, mask=0x5A)
    else:
        with h5py.File(path2, "r") as f:
            offs = [(lambda i: i.byte_offset + i.size // 2)(f[n].id.get_chunk_info(0)) for n in ("done", "ids/utf8")]
        for off in offs:
            flip_byte(path2, off, mask=0x5A)
    problems = verify_cache(path2)["problems"]
    assert any(p.startswith("done: read failed") for p in problems), problems
    assert any(p.startswith("ids: read failed") for p in problems), problems
