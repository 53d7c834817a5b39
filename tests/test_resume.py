"""Crash-safe dumps: SIGKILL at fixed points then resume (bit-identical to an uninterrupted dump),
extension by more epochs, the dump lock, disk full, and the messages that say what to do.

tests/stress/kill_resume.py runs the same kill/resume loop at many random points.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import logitcache
from logitcache import LogitCacheError
from logitcache.cache import config_digest
from logitcache.cli.main import main
from logitcache.lock import DumpLock, lock_path
from conftest import assert_one_line_error

sys.path.insert(0, str(Path(__file__).resolve().parent / "stress"))
import kill_resume  # noqa: E402
from kill_resume import DUMP_KW, TEACHERS, differing, done_chunks_wrong, run_child, writes_per_chunk  # noqa: E402

R = DUMP_KW["chunk_rows"]  # 4 rows: 6 chunks per epoch of the 24-clip dataset


@pytest.fixture(scope="module")
def reference3(dumper) -> dict[str, np.ndarray]:
    """Every array of an uninterrupted 3-epoch dump. Epoch e depends only on (seed, e), so its
    first two epochs are what an uninterrupted 2-epoch dump holds (the extension test checks it)."""
    return kill_resume.arrays(dumper(epochs=3, chunk_rows=R))


def _epochs(reference: dict[str, np.ndarray], epochs: int) -> dict[str, np.ndarray]:
    return {k: v if k.startswith("ids/") or k == "content" else v[:epochs] for k, v in reference.items()}


@pytest.fixture(scope="module")
def ctx():
    return kill_resume.context()


def _dump(data, out, **kw):
    return logitcache.dump(data, TEACHERS, out, **{**DUMP_KW, "epochs": 2, **kw})


def _done(out: Path) -> int:
    with logitcache.open_cache(out) as c:
        return int(c.chunks_done().sum())


def _kill(ctx, dataset, out, point, reference, epochs=2) -> None:
    code = run_child(ctx, dataset, out, point, {**DUMP_KW, "epochs": epochs})
    assert code == -signal.SIGKILL, f"{point}: exit {code}"
    assert done_chunks_wrong(out, reference) == []  # a chunk marked done is always a whole, right chunk


# ---------------------------------------------------------------- kill and resume
def test_killed_dump_resumes_bit_identical(ctx, dataset, tmp_path, reference3):
    ref2 = _epochs(reference3, 2)
    P = writes_per_chunk(ref2)  # the writer's store writes per chunk, the done marker last
    out = tmp_path / "run.zarr"

    _kill(ctx, dataset, out, "layout:1", ref2)  # layout built, not yet renamed into place
    assert not out.exists() and out.with_name("run.zarr.creating").is_dir()
    _kill(ctx, dataset, out, "write:1", ref2)  # first array of the first chunk
    assert _done(out) == 0
    _kill(ctx, dataset, out, f"write:{P + P // 2}", ref2)  # chunk 0 done, chunk 1 half written
    assert _done(out) == 1
    _kill(ctx, dataset, out, f"write:{3 * P}", ref2)  # right after chunk 3's done marker
    assert _done(out) == 4
    _kill(ctx, dataset, out, f"write:{2 * P}", ref2)  # right after the last marker of epoch 0
    assert _done(out) == 6
    _kill(ctx, dataset, out, "finish:1", ref2)  # every chunk written, manifest not yet complete
    assert _done(out) == 12 and not logitcache.open_cache(out).complete

    _dump(dataset, out, resume=True)
    assert differing(out, ref2) == []
    assert logitcache.open_cache(out).complete
    assert not out.with_name("run.zarr.creating").exists() and not lock_path(out).exists()
    assert not list(out.rglob("*.partial"))

    # extending to 3 epochs survives kills too
    _kill(ctx, dataset, out, "resize:3", reference3, epochs=3)  # some arrays grown, some not
    new_epoch = writes_per_chunk(ref2, epoch=2)  # no content row: that is stored with epoch 0
    _kill(ctx, dataset, out, f"write:{new_epoch + 5}", reference3, epochs=3)  # inside the new epoch
    assert _done(out) == 13
    _dump(dataset, out, epochs=3, resume=True)
    assert differing(out, reference3) == []


def test_killed_hdf5_dump_resumes_bit_identical(ctx, dataset, tmp_path, reference3):
    """HDF5 keeps its chunk index in a metadata cache: the writer flushes before each done marker."""
    ref2 = _epochs(reference3, 2)
    P = writes_per_chunk(ref2)
    out = tmp_path / "run.h5"
    _kill(ctx, dataset, out, f"write:{P // 2}", ref2)
    assert _done(out) == 0
    _kill(ctx, dataset, out, f"write:{4 * P}", ref2)
    assert _done(out) == 4
    _kill(ctx, dataset, out, "finish:1", ref2)
    assert _done(out) == 12
    _dump(dataset, out, resume=True)
    assert differing(out, ref2) == []  # the same bytes as the zarr dump (backends hold identical arrays)
    assert not lock_path(out).exists()


def test_extension_leaves_stored_epochs_untouched(dataset, tmp_path, reference3):
    out = tmp_path / "grow.zarr"
    _dump(dataset, out, epochs=1)
    before = {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in out.rglob("c/0/*") if f.is_file()}
    before.update({f: (f.stat().st_mtime_ns, f.read_bytes()) for f in out.rglob("c/0") if f.is_file()})
    assert len(before) > 20
    _dump(dataset, out, epochs=3, resume=True)
    assert differing(out, reference3) == []
    after = {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in before}
    assert after == before  # epoch 0's chunk files were not even rewritten
    m = logitcache.open_cache(out).manifest
    assert m["epochs"] == 3 and m["complete"] and m["resumes"][-1]["epochs"] == 3
    assert m["config_digest"] == config_digest(m)  # epochs are not part of the digest

    h5 = tmp_path / "grow.h5"
    _dump(dataset, h5, epochs=1)
    _dump(dataset, h5, epochs=3, resume=True)
    assert differing(h5, reference3) == []


def test_rerun_without_resume_says_what_to_do(dataset, tmp_path, dumper, capsys, monkeypatch):
    out = tmp_path / "run.zarr"
    monkeypatch.setenv("LOGITCACHE_MIN_FREE_BYTES", str(1 << 62))  # stops before the first chunk
    with pytest.raises(LogitCacheError):
        _dump(dataset, out)
    monkeypatch.delenv("LOGITCACHE_MIN_FREE_BYTES")
    with pytest.raises(LogitCacheError) as e:
        _dump(dataset, out)
    assert_one_line_error(e, str(out), "unfinished dump", "0 of 12 chunks", "add --resume")

    complete = dumper(chunk_rows=R)
    with pytest.raises(LogitCacheError) as e:
        _dump(dataset, complete, epochs=3)
    assert_one_line_error(e, str(complete), "complete 2-epoch cache", "--resume to extend it to 3 epochs")
    with pytest.raises(LogitCacheError) as e:
        _dump(dataset, complete)
    assert_one_line_error(e, str(complete), "already exists")

    # a complete cache with --resume and the same epochs: nothing written, and it says so
    files = {f: f.stat().st_mtime_ns for f in complete.rglob("*") if f.is_file()}
    capsys.readouterr()
    _dump(dataset, complete, resume=True)
    assert "already complete with 2 epoch(s); nothing to do" in capsys.readouterr().err
    assert {f: f.stat().st_mtime_ns for f in complete.rglob("*") if f.is_file()} == files


@pytest.mark.parametrize("change,needles", [
    ({"seed": 1}, ["seed (0 in the cache, 1 now)"]),
    ({"topk": 5}, ["topk (10 in the cache, 5 now)"]),
    ({"augment": "ced"}, ["augment"]),
    ({"value_dtype": "float16"}, ["value_dtype"]),
    ({"teachers": ["toy_teachers:toy_a", "toy_teachers:toy_c"]}, ["teacher 2 (toy_b: source)", "members"]),
    ({"chunk_rows": 8}, ["chunk_rows (4 in the cache, 8 now)"]),
    ({"epochs": 1}, ["holds 2 epochs but --epochs is 1", "--epochs 2"]),
], ids=["seed", "topk", "augment", "value_dtype", "teacher", "chunk_rows", "fewer_epochs"])
def test_resume_refuses_a_different_dump(dataset, dumper, change, needles):
    cache = dumper(chunk_rows=R)
    files = {f: f.stat().st_mtime_ns for f in cache.rglob("*") if f.is_file()}
    teachers = change.pop("teachers", TEACHERS)
    with pytest.raises(LogitCacheError) as e:
        logitcache.dump(dataset, teachers, cache, **{**DUMP_KW, "epochs": 2, "resume": True, **change})
    assert_one_line_error(e, str(cache), *needles)
    assert {f: f.stat().st_mtime_ns for f in cache.rglob("*") if f.is_file()} == files
    assert not lock_path(cache).exists()


def test_resume_of_something_that_is_not_a_cache(dataset, tmp_path):
    out = tmp_path / "notes.zarr"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(LogitCacheError) as e:
        _dump(dataset, out, resume=True)
    assert_one_line_error(e, str(out), "not a logitcache cache")
    assert (out / "keep.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["keep.txt"]


# ---------------------------------------------------------------- lock
def _hold_lock(path, ready, stop):
    lock = DumpLock(path).acquire()
    ready.set()
    stop.wait(60)
    lock.release()


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_lock_refuses_a_second_writer_and_takes_over_a_dead_ones(ctx, dataset, tmp_path, suffix, capsys):
    out = tmp_path / f"run{suffix}"
    ready, stop = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(out, ready, stop))
    holder.start()
    try:
        assert ready.wait(30)
        lock = tmp_path / f"run{suffix}.lock"  # beside the cache, also for HDF5's single file
        assert lock_path(out) == lock and lock.is_file()
        with pytest.raises(LogitCacheError) as e:
            _dump(dataset, out)
        assert_one_line_error(e, str(out), "another dump is writing it", str(lock), f"pid {holder.pid}",
                              f"host {socket.gethostname()}")
        assert not out.exists()
        result = CliRunner().invoke(main, ["dump", "--data", str(dataset), "--teacher", TEACHERS[0], "--out", str(out),
                                           "--clip-seconds", "1", "--resume"])
        assert result.exit_code == 1 and result.stderr.strip().splitlines()[-1].startswith("error: ")
        assert f"pid {holder.pid}" in result.stderr and "Traceback" not in result.output
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # dies holding the lock: the file stays, the flock goes
        holder.join()
    assert lock_path(out).is_file()
    capsys.readouterr()
    _dump(dataset, out, epochs=1)
    err = capsys.readouterr().err
    assert f"took over stale lock {lock_path(out)}" in err and f"pid {holder.pid}" in err
    assert "no longer running" in err
    assert not lock_path(out).exists() and logitcache.open_cache(out).complete


def test_lock_of_another_host_or_live_pid_is_not_taken(dataset, tmp_path):
    out = tmp_path / "run.zarr"
    lock_path(out).write_text(json.dumps({"pid": 4242, "host": "gpu-node-7", "started": "2026-01-01T00:00:00"}))
    with pytest.raises(LogitCacheError) as e:
        _dump(dataset, out)
    assert_one_line_error(e, str(lock_path(out)), "pid 4242 on host gpu-node-7", "another host", "delete the lock")
    # same host, a live process that is not holding the flock (a filesystem without flock?)
    lock_path(out).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    with pytest.raises(LogitCacheError) as e:
        _dump(dataset, out)
    assert_one_line_error(e, f"pid {os.getppid()}", "still running")
    assert not out.exists()


def test_lock_is_released_after_success_and_failure(dataset, tmp_path):
    out = tmp_path / "run.zarr"
    _dump(dataset, out, epochs=1)
    assert not lock_path(out).exists()
    with pytest.raises(LogitCacheError):
        logitcache.dump(dataset, ["toy_teachers:toy_nan"], tmp_path / "nan.zarr", **{**DUMP_KW, "epochs": 1})
    assert (tmp_path / "nan.zarr").exists() and not lock_path(tmp_path / "nan.zarr").exists()


# ---------------------------------------------------------------- disk full
@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_disk_full_is_one_line_and_resumable(dataset, tmp_path, monkeypatch, reference3, suffix):
    from logitcache.storage import BACKENDS

    cls = BACKENDS["zarr" if suffix == ".zarr" else "hdf5"]
    real_write, calls = cls.write, []

    def full_after_40(self, name, key, data):
        calls.append(name)
        if len(calls) > 40:  # mid-chunk of the second chunk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, name, key, data)

    out = tmp_path / f"full{suffix}"
    monkeypatch.setattr(cls, "write", full_after_40)
    with pytest.raises(LogitCacheError) as e:
        _dump(dataset, out)
    assert_one_line_error(e, str(out), "write failed (No space left on device)", "--resume")
    monkeypatch.setattr(cls, "write", real_write)
    ref2 = _epochs(reference3, 2)
    assert _done(out) == 1 and done_chunks_wrong(out, ref2) == []
    result = CliRunner().invoke(main, ["dump", "--data", str(dataset), *sum((["--teacher", t] for t in TEACHERS), []),
                                       "--out", str(out), "--resume", "--epochs", "2", "--topk", "10",
                                       "--augment", "strong", "--batch-size", "8", "--output-kind", "multiclass",
                                       "--value-dtype", "float32", "--clip-seconds", "1", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "resuming, 1 of 12 chunks already written" in result.stderr
    assert differing(out, ref2) == []


def test_free_space_reserve_stops_cleanly(dataset, tmp_path, monkeypatch):
    out = tmp_path / "run.h5"
    monkeypatch.setenv("LOGITCACHE_MIN_FREE_BYTES", str(1 << 62))
    with pytest.raises(LogitCacheError) as e:
        _dump(dataset, out, epochs=1)
    assert_one_line_error(e, str(out), "No space left on device", "KiB kept in reserve", "LOGITCACHE_MIN_FREE_BYTES",
                          "--resume")
    monkeypatch.delenv("LOGITCACHE_MIN_FREE_BYTES")
    _dump(dataset, out, epochs=1, resume=True)
    assert logitcache.open_cache(out).complete
