"""Nothing silent: numeric options, ensemble weights, devices, NaN losses, --json without NaN,
SIGTERM, the lock after a killed dump with workers, the HDF5 free-space floor, copy into itself,
existing training runs, resumed epoch losses, S3 without credentials and intra-op threads."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import logitcache
from conftest import C, CLIP_SECONDS, assert_one_line_error
from logitcache import LogitCacheError
from logitcache.cache import HDF5_MIN_RESERVE, reserve_bytes
from logitcache.lock import DumpLock, lock_path
from logitcache.train import train
from test_cli import TEACHERS, assert_error, run

sys.path.insert(0, str(Path(__file__).resolve().parent / "stress"))
import kill_resume  # noqa: E402
from kill_resume import DUMP_KW, differing, done_chunks_wrong  # noqa: E402

TESTS = Path(__file__).resolve().parent


def _dump(data, out, **kw):
    return logitcache.dump(data, kill_resume.TEACHERS, out, **{**DUMP_KW, "epochs": 2, **kw})


@pytest.fixture(scope="module")
def reference2(dumper) -> dict[str, np.ndarray]:
    """Every array of an uninterrupted 2-epoch dump with DUMP_KW (4-row chunks)."""
    return kill_resume.arrays(dumper(epochs=2, chunk_rows=DUMP_KW["chunk_rows"]))


# ---------------------------------------------------------------- 1. numeric options
DUMP = ["dump", "--data", "DATA", *TEACHERS, "--out", "OUT/c.zarr", "--clip-seconds", CLIP_SECONDS, "--topk", C]
TRAIN = ["train", "--cache", "OUT/none.zarr", "--data", "DATA", "--student", "cnn_tiny", "--out", "OUT/run"]
PLAN = ["plan", "--samples", 10, "--epochs", 1, "--topk", 4, "--classes", 10]


@pytest.mark.parametrize("base,extra,needle", [
    (DUMP, ["--epochs", -2], "--epochs -2: must be at least 1 (a whole number)"),
    (DUMP, ["--epochs", 0], "--epochs 0: must be at least 1 (a whole number)"),
    (DUMP, ["--chunk-rows", 0], "--chunk-rows 0: must be at least 1 (a whole number)"),
    (DUMP, ["--chunk-rows", -4], "--chunk-rows -4"),
    (DUMP, ["--sample-rate", 0], "--sample-rate 0: must be at least 1 (a whole number)"),
    (DUMP, ["--sample-rate", -1], "--sample-rate -1"),
    (DUMP, ["--clip-seconds", 0], "--clip-seconds 0.0: must be above 0 (a finite number)"),
    (DUMP, ["--clip-seconds", "nan"], "--clip-seconds nan: must be above 0 (a finite number)"),
    (DUMP, ["--clip-seconds", "inf"], "--clip-seconds inf"),
    (DUMP, ["--workers", -1], "--workers -1: must be at least 0 (a whole number)"),
    (DUMP, ["--batch-size", 0], "--batch-size 0: must be at least 1 (a whole number)"),
    (DUMP, ["--topk", 0], "--topk 0: must be at least 1 (a whole number)"),
    (DUMP, ["--seed", -1], "--seed -1: must be from 0 to 18446744073709551615 (a whole number)"),
    (DUMP, ["--seed", 2**64], f"--seed {2**64}: must be from 0 to {2**64 - 1} (a whole number)"),
    (DUMP, ["--threads", 0], "--threads 0: must be at least 1 (a whole number)"),
    (TRAIN, ["--epochs", -2], "--epochs -2: must be at least 1 (a whole number)"),
    (TRAIN, ["--epochs", 0], "--epochs 0: must be at least 1 (a whole number)"),
    (TRAIN, ["--temperature", "nan"], "--temperature nan: must be above 0 (a finite number)"),
    (TRAIN, ["--temperature", "inf"], "--temperature inf"),
    (TRAIN, ["--temperature", 0], "--temperature 0.0"),
    (TRAIN, ["--lr", "nan"], "--lr nan: must be above 0 (a finite number)"),
    (TRAIN, ["--lr", "inf"], "--lr inf"),
    (TRAIN, ["--lr", 0], "--lr 0.0"),
    (TRAIN, ["--lr", -1], "--lr -1.0"),
    (TRAIN, ["--weight-decay", -1], "--weight-decay -1.0: must be at least 0 (a finite number)"),
    (TRAIN, ["--weight-decay", "nan"], "--weight-decay nan"),
    (TRAIN, ["--alpha", "nan"], "--alpha nan: must be from 0 to 1 (a finite number)"),
    (TRAIN, ["--checkpoint-every", 0], "--checkpoint-every 0: must be at least 1 (a whole number)"),
    (TRAIN, ["--seed", -1], "--seed -1"),
    (TRAIN, ["--workers", -1], "--workers -1"),
    (TRAIN, ["--threads", 0], "--threads 0"),
    (PLAN, ["--clip-seconds", "nan"], "--clip-seconds nan"),
    (PLAN, ["--audio-hours", "inf"], "--audio-hours inf"),
    (PLAN, ["--sample-rate", 0], "--sample-rate 0"),
    (PLAN, ["--chunk-rows", 0], "--chunk-rows 0"),
    (["fidelity", "OUT/none.zarr", "--data", "DATA", *TEACHERS], ["--samples", 0], "--samples 0"),
    (["fidelity", "OUT/none.zarr", "--data", "DATA", *TEACHERS], ["--seed", -1], "--seed -1"),
    (["compare", "OUT/run"], ["--samples", 0], "--samples 0"),
    (["compare", "OUT/run"], ["--seed", -1], "--seed -1"),
])
def test_numeric_options_are_checked_before_anything_runs(dataset, tmp_path, base, extra, needle):
    args = [str(a).replace("DATA", str(dataset)).replace("OUT", str(tmp_path)) for a in base + extra]
    assert_error(run(*args), needle)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_seed_range_is_that_of_uint64():
    from logitcache import checks

    assert checks.seed("--seed", 2**64 - 1) == 2**64 - 1 and checks.seed("--seed", np.uint64(5)) == 5
    for bad in (-1, 2**64, 1.5, True):
        with pytest.raises(LogitCacheError):
            checks.seed("--seed", bad)


# ---------------------------------------------------------------- 2. ensemble weights
@pytest.mark.parametrize("weights", [[0, 0], [2, -1], [math.nan, 1], [math.inf, 1]])
def test_bad_ensemble_weights_are_refused(dataset, tmp_path, weights):
    with pytest.raises(LogitCacheError) as e:
        _dump(dataset, tmp_path / "w.zarr", ensemble_weights=weights)
    assert_one_line_error(e, "--ensemble-weight", "must be at least 0 (a finite number)", "sum above 0")
    assert not (tmp_path / "w.zarr").exists()
    with pytest.raises(LogitCacheError) as e:  # every other way in (fidelity and compare read the manifest's)
        logitcache.targets.aggregate([torch.zeros(2, C), torch.ones(2, C)], "multiclass", "mean_prob", weights)
    assert_one_line_error(e, "ensemble weights")


def test_ensemble_weight_count_is_one_per_teacher(dataset, tmp_path):
    assert_error(run("dump", "--data", dataset, *TEACHERS, "--out", tmp_path / "w.zarr", "--ensemble-weight", 1),
                 "1 ensemble weights for 2 teachers")
    with pytest.raises(LogitCacheError):
        logitcache.targets.aggregate([torch.zeros(2, C)] * 2, "multiclass", "mean_prob", [1.0])


# ---------------------------------------------------------------- 3. --device and --out
def test_device_that_holds_no_data_is_refused(dataset, tmp_path):
    assert_error(run("dump", "--data", dataset, *TEACHERS, "--out", tmp_path / "m.zarr", "--topk", C,
                     "--clip-seconds", CLIP_SECONDS, "--device", "meta"),
                 "--device 'meta': not a device logitcache runs on (use auto, cpu, cuda, cuda:N or mps)")
    assert not (tmp_path / "m.zarr").exists()


@pytest.mark.parametrize("out", [".", "./", "sub/.."])
def test_out_naming_a_folder_is_refused_and_nothing_deleted(dataset, tmp_path, monkeypatch, out):
    (tmp_path / "sub").mkdir()
    (tmp_path / "keep.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    assert_error(run("dump", "--data", dataset, *TEACHERS, "--out", out, "--topk", C, "--clip-seconds", CLIP_SECONDS),
                 f"--out {out}: names a folder, not a cache")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "sub"]
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_out_that_is_the_data_folder_is_refused(dataset, tmp_path):
    data = shutil.copytree(dataset, tmp_path / "data")
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    assert_error(run("dump", "--data", data, *TEACHERS, "--out", data, "--topk", C, "--clip-seconds", CLIP_SECONDS),
                 f"{data}: already exists and is not a logitcache cache")
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before


# ---------------------------------------------------------------- 4. NaN loss
class _NanOnCall(torch.nn.Module):
    """A student whose ``nan_call``-th training forward returns NaN logits (a diverging run); forwards
    in eval mode (train's shape probe) do not count."""

    def __init__(self, num_classes: int, nan_call: int = 5):
        super().__init__()
        self.fc = torch.nn.Linear(1, num_classes)
        self.calls, self.nan_call = 0, nan_call

    def forward(self, x):
        self.calls += self.training
        z = self.fc(x.abs().mean(-1, keepdim=True))
        return z * math.nan if self.calls == self.nan_call else z


def nan_student(num_classes: int) -> torch.nn.Module:
    return _NanOnCall(num_classes)


def test_training_stops_on_a_nan_loss_and_keeps_the_last_good_checkpoint(strong_cache, dataset, tmp_path):
    out = tmp_path / "run"  # 24 clips, batches of 8: 3 per epoch, so forward 5 is epoch 2, batch 2
    result = run("train", "--cache", strong_cache, "--data", dataset, "--student", "test_numbers:nan_student",
                 "--out", out, "--epochs", 2, "--batch-size", 8)
    assert_error(result, "train: loss became NaN at epoch 2, batch 2; ", "keeps the last checkpoint before it")
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["position"] == {"epoch": 1, "batch": 0, "steps": 3}
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in log] == [0] and math.isfinite(log[0]["train_loss"])


# ---------------------------------------------------------------- 5. --json never prints NaN
def _strict_json(text: str):
    def refuse(name):
        raise AssertionError(f"bare {name} in --json output")
    return json.loads(text, parse_constant=refuse)


NAN_RESULT = {"ok": True, "x": math.nan, "n": np.int64(3), "deep": [math.inf, {"y": -math.inf, "z": np.float32(math.nan)}],
              "fine": 0.5, "flag": np.bool_(False)}
SAFE_RESULT = {"ok": True, "x": None, "n": 3, "deep": [None, {"y": None, "z": None}], "fine": 0.5, "flag": False}


@pytest.mark.parametrize("args,module,attr", [
    (["inspect", "X"], "logitcache.report", "inspect_cache"),
    (["verify", "X"], "logitcache.report", "verify_cache"),
    (["fidelity", "X", "--data", "D", "--teacher", "t"], "logitcache.report", "fidelity"),
    (["compare", "X"], "logitcache.report", "compare"),
    (["plan", "--samples", 1, "--epochs", 1, "--topk", 1, "--classes", 1], "logitcache.plan", "plan_cache"),
    (["train", "--cache", "X", "--data", "D", "--student", "s", "--out", "R"], "logitcache.train", "train"),
    (["copy", "X", "Y"], "logitcache.copy", "copy_cache"),
])
def test_json_output_has_null_for_non_finite_numbers(monkeypatch, args, module, attr):
    import importlib

    monkeypatch.setattr(importlib.import_module(module), attr, lambda *a, **k: NAN_RESULT)
    result = run(*args, "--json")
    assert result.exit_code == 0, result.output
    assert _strict_json(result.stdout) == SAFE_RESULT


def test_eval_map_without_any_positive_is_null_in_json(dumper, dataset, tmp_path):
    """A real NaN: mAP on an eval folder where no clip has a label is undefined."""
    cache = dumper(output_kind="multilabel", epochs=1)
    unlabeled = shutil.copytree(dataset, tmp_path / "eval")
    rows = (unlabeled / "labels.csv").read_text().splitlines()
    (unlabeled / "labels.csv").write_text("\n".join([rows[0]] + [r.split(",")[0] + "," for r in rows[1:]]) + "\n")
    result = run("train", "--cache", cache, "--data", dataset, "--student", "cnn_tiny", "--out", tmp_path / "run",
                 "--batch-size", 12, "--eval-data", unlabeled, "--json")
    assert result.exit_code == 0, result.output
    metrics = _strict_json(result.stdout)
    assert metrics["eval_mAP"] is None and metrics["samples"] == 24
    assert "warning" not in result.stderr.lower()


# ---------------------------------------------------------------- 6. SIGTERM
def _cli_env(**extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    return env


DUMP_ARGS = ["--epochs", 2, "--topk", 10, "--augment", "strong", "--seed", 0, "--batch-size", 8,
             "--output-kind", "multiclass", "--aggregation", "mean_prob", "--value-dtype", "float32",
             "--sample-rate", 16000, "--clip-seconds", 1.0, "--chunk-rows", 4, "--device", "cpu"]


@pytest.fixture
def dump_command(dataset):
    def command(out, workers=0):
        args = [sys.executable, "-m", "logitcache", "dump", "--data", dataset, "--out", out,
                *sum((["--teacher", t] for t in kill_resume.TEACHERS), []), *DUMP_ARGS, "--workers", workers]
        return [str(a) for a in args]
    return command


def test_sigterm_keeps_the_chunks_and_exits_143(dataset, tmp_path, reference2, dump_command):
    out = tmp_path / "run.zarr"
    # The hook sends SIGTERM (not SIGKILL) to the dump after its first array write.
    proc = subprocess.run(dump_command(out), capture_output=True, text=True, timeout=600,
                          env=_cli_env(LOGITCACHE_TEST_KILL="write:1:TERM"))
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    lines = [ln for ln in proc.stderr.replace("\r", "\n").splitlines() if ln.strip()]
    assert [ln for ln in lines if ln.startswith("error: ")] == lines[-1:] == [
        "error: terminated (SIGTERM); the chunks written so far are kept: re-run with --resume"]
    assert not lock_path(out).exists()
    with logitcache.open_cache(out) as c:
        assert not c.complete and c.chunks_done()[0, 0]
    assert done_chunks_wrong(out, reference2) == []
    _dump(dataset, out, resume=True)
    assert differing(out, reference2) == []


def test_sigterm_handler_is_restored_after_the_cli(monkeypatch, tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    run("inspect", tmp_path / "missing.zarr")
    assert signal.getsignal(signal.SIGTERM) == before


# ---------------------------------------------------------------- 7. the lock after SIGKILL with workers
def test_resume_right_after_a_killed_dump_with_workers(dataset, tmp_path, reference2, dump_command):
    """The killed dump's DataLoader worker (forked, as under the CLI) lives on for up to 5 s; it must
    not hold the lock. (Not through kill_resume's forkserver: its children start workers by forkserver.)"""
    out = tmp_path / "run.zarr"
    proc = subprocess.run(dump_command(out, workers=1), capture_output=True, text=True, timeout=600,
                          env=_cli_env(LOGITCACHE_TEST_KILL="write:1"))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    _dump(dataset, out, resume=True)  # at once: no waiting for the orphaned worker to exit
    assert differing(out, reference2) == []


_FORKING_WRITER = """
import os, signal, sys, time
from logitcache.lock import DumpLock
lock = DumpLock(sys.argv[1]).acquire()
pid = os.fork()
if pid == 0:  # a DataLoader worker stand-in, still running after its parent is gone
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 1), os.dup2(null, 2)  # or the test would wait for the end of our output
    time.sleep(60)
    os._exit(0)
print(pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_forked_child_does_not_keep_the_lock_of_its_killed_parent(tmp_path):
    """The same as above without timing: the child sleeps, so it surely outlives its parent."""
    out = tmp_path / "run.zarr"
    proc = subprocess.run([sys.executable, "-c", _FORKING_WRITER, str(out)], capture_output=True, text=True,
                          timeout=120, env=_cli_env())
    orphan = int(proc.stdout)
    try:
        assert proc.returncode == -signal.SIGKILL and Path(f"/proc/{orphan}").exists()
        assert DumpLock(out).holder() is None
        lock = DumpLock(out).acquire()
        assert "took over stale lock" in lock.note and f"pid {orphan}" not in lock.note
        lock.release()
    finally:
        os.kill(orphan, signal.SIGKILL)


# ---------------------------------------------------------------- 8. HDF5 free-space floor
def test_hdf5_reserve_has_a_floor():
    assert reserve_bytes("hdf5", 0, 1000) == HDF5_MIN_RESERVE + 4000 == (16 << 20) + 4000
    assert reserve_bytes("hdf5", 1 << 30, 1000) == 1 << 30
    assert reserve_bytes("zarr", 0, 1000) == 2000
    assert reserve_bytes("zarr", 64 << 20, 1000) == 64 << 20


def test_hdf5_stops_at_the_floor_even_with_no_reserve(dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("LOGITCACHE_MIN_FREE_BYTES", "0")
    monkeypatch.setattr(os, "statvfs", lambda path: os.statvfs_result((4096, 4096, 0, 0, 2048, 0, 0, 0, 0, 255)))
    # 8 MiB free: enough for zarr's reserve (2 chunks), below HDF5's floor
    _dump(dataset, tmp_path / "ok.zarr", epochs=1)
    with pytest.raises(LogitCacheError) as e:
        _dump(dataset, tmp_path / "run.h5", epochs=1)
    assert_one_line_error(e, "No space left on device: 8192 KiB free", "(LOGITCACHE_MIN_FREE_BYTES, at least 16 MiB "
                                                                        "for HDF5)", "--resume")
    monkeypatch.undo()
    _dump(dataset, tmp_path / "run.h5", epochs=1, resume=True)
    assert logitcache.open_cache(tmp_path / "run.h5").complete


def test_bad_min_free_bytes_setting(dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("LOGITCACHE_MIN_FREE_BYTES", "-1")
    with pytest.raises(LogitCacheError) as e:
        _dump(dataset, tmp_path / "run.zarr", epochs=1)
    assert_one_line_error(e, "LOGITCACHE_MIN_FREE_BYTES='-1'")
    assert not lock_path(tmp_path / "run.zarr").exists()


# ---------------------------------------------------------------- 9. copy
def _snapshot(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {"": path.read_bytes()}
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_copy_refuses_overlapping_places_and_a_suffix_of_another_backend(dumper, tmp_path):
    src = shutil.copytree(dumper(epochs=1), tmp_path / "c.zarr")
    h5 = shutil.copy(dumper(epochs=1, suffix=".h5"), tmp_path / "x.h5")
    (tmp_path / "link").symlink_to(tmp_path)
    before, before_h5 = _snapshot(src), _snapshot(Path(h5))
    for dst, needle in [(src / "inner.zarr", "is inside the source"), (src, "is the source itself"),
                        (tmp_path / "link" / "c.zarr", "is the source itself"), (tmp_path, "contains the source"),
                        (tmp_path / "y.h5", "the name says hdf5, but")]:
        assert_error(run("copy", src, dst), str(dst), needle)
    assert_error(run("copy", h5, tmp_path / "y.zarr"), "y.zarr: the name says zarr, but", "a hdf5 cache",
                 "give the copy a .h5 or .hdf5 name")
    assert _snapshot(src) == before and _snapshot(Path(h5)) == before_h5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.zarr", "link", "x.h5"]
    assert run("copy", src, tmp_path / "backup").exit_code == 0  # no suffix: any backend


# ---------------------------------------------------------------- 10. an existing run folder
@pytest.mark.parametrize("name", ["checkpoint.pt", "metrics.jsonl"])
def test_train_refuses_an_existing_run_without_resume(strong_cache, dataset, tmp_path, name):
    out = tmp_path / "run"
    out.mkdir()
    (out / name).write_bytes(b"earlier run")
    assert_error(run("train", "--cache", strong_cache, "--data", dataset, "--student", "cnn_tiny", "--out", out),
                 f"{out}: already holds a training run ({name}); add --resume to continue it, or choose another --out")
    assert [p.name for p in out.iterdir()] == [name] and (out / name).read_bytes() == b"earlier run"


# ---------------------------------------------------------------- 11. the loss of a resumed epoch
def test_resumed_epoch_logs_the_loss_over_the_whole_epoch(strong_cache, dataset, tmp_path, monkeypatch):
    import logitcache.train as train_mod

    kw = dict(epochs=2, batch_size=8, seed=0, progress=False, checkpoint_every=2)
    train(strong_cache, dataset, "cnn_tiny", tmp_path / "whole", **kw)
    real_step, calls = train_mod.distill_step, []

    def dies_at_step_6(*a, **k):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt  # epoch 1, batch 3; the checkpoint of step 4 (epoch 1, batch 1) is the latest
        return real_step(*a, **k)

    monkeypatch.setattr(train_mod, "distill_step", dies_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        train(strong_cache, dataset, "cnn_tiny", tmp_path / "cut", **kw)
    monkeypatch.setattr(train_mod, "distill_step", real_step)
    train(strong_cache, dataset, "cnn_tiny", tmp_path / "cut", resume=True, **kw)
    whole, cut = ([json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
                  for d in ("whole", "cut"))
    assert [m["epoch"] for m in cut] == [0, 1] and [m["samples"] for m in cut] == [24, 24]
    assert cut[1]["train_loss"] == pytest.approx(whole[1]["train_loss"], rel=1e-6)


# ---------------------------------------------------------------- 12. S3 without credentials
@pytest.fixture
def no_aws_credentials(monkeypatch):
    s3fs = pytest.importorskip("s3fs")
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
              "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(k, raising=False)
    with socket.socket() as sock:  # an endpoint nobody listens on: nothing may leave this machine
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for k, v in {"AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent",
                 "AWS_EC2_METADATA_DISABLED": "true", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
        monkeypatch.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()  # an instance made earlier would keep its credentials
    yield "s3://kd-caches"
    s3fs.S3FileSystem.clear_instance_cache()


def test_s3_without_credentials_is_one_line(no_aws_credentials, dumper, dataset, tmp_path):
    url = f"{no_aws_credentials}/run.zarr"
    needles = (url, "no credentials", "AWS_ACCESS_KEY_ID", "~/.aws")
    for args in (["inspect", url], ["verify", url], ["copy", dumper(epochs=1), url],
                 ["dump", "--data", dataset, *TEACHERS, "--out", url, "--topk", C, "--clip-seconds", CLIP_SECONDS]):
        assert_error(run(*args), *needles)
    with pytest.raises(LogitCacheError) as e:
        logitcache.open_cache(url)
    assert_one_line_error(e, *needles)


def test_credentials_error_from_an_unwrapped_path_is_one_line(monkeypatch, no_aws_credentials):
    from botocore.exceptions import NoCredentialsError

    import logitcache.report

    def unwrapped(*a, **k):
        raise RuntimeError("listing failed") from NoCredentialsError()

    monkeypatch.setattr(logitcache.report, "inspect_cache", unwrapped)
    monkeypatch.setattr(sys, "argv", ["logitcache", "inspect", "s3://kd-caches/x.zarr"])
    assert_error(run("inspect", "s3://kd-caches/x.zarr"), "s3://kd-caches/x.zarr: no credentials", "AWS_ACCESS_KEY_ID")
    monkeypatch.setattr(logitcache.report, "inspect_cache", lambda *a, **k: 1 / 0)
    result = run("inspect", "x.zarr")  # any other exception is a bug: it keeps its traceback
    assert isinstance(result.exception, ZeroDivisionError)


# ---------------------------------------------------------------- 13. intra-op threads
SEEN_THREADS: list[int] = []


class _ThreadProbe(torch.nn.Module):
    def __init__(self, num_classes: int = C):
        super().__init__()
        self.fc = torch.nn.Linear(1, num_classes)
        with torch.no_grad():  # fixed weights: the same teacher (sha256) in every dump
            self.fc.weight.fill_(0.5)
            self.fc.bias.copy_(torch.linspace(-1, 1, num_classes))

    def forward(self, x):
        SEEN_THREADS.append(torch.get_num_threads())
        return self.fc(x.abs().mean(-1, keepdim=True))


def thread_probe(num_classes: int = C) -> torch.nn.Module:
    return _ThreadProbe(num_classes)


def _probe_dump(dataset, out, **kw):
    SEEN_THREADS.clear()
    logitcache.dump(dataset, ["test_numbers:thread_probe"], out, epochs=1, topk=3, batch_size=12, num_workers=0,
                    clip_seconds=CLIP_SECONDS, device="cpu", progress=False, **kw)
    return SEEN_THREADS[-1]  # the last batch (the first call is the teachers' probe)


def test_cpu_threads_leave_the_workers_their_cores(dataset, tmp_path, monkeypatch):
    dump_mod = sys.modules["logitcache.dump"]  # "logitcache.dump" the attribute is the function

    assert torch.get_num_threads() == 1  # tests/conftest.py
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(dump_mod, "_cores", lambda: 3)
    assert _probe_dump(dataset, tmp_path / "a.zarr") == 3  # 3 cores - 0 workers
    assert torch.get_num_threads() == 1  # restored
    assert dump_mod.cpu_threads(torch.device("cpu"), 2) == 1 and dump_mod.cpu_threads(torch.device("cpu"), 5) == 1
    assert dump_mod.cpu_threads(torch.device("cuda"), 1) is None
    assert _probe_dump(dataset, tmp_path / "b.zarr", threads=2) == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert _probe_dump(dataset, tmp_path / "c.zarr") == 1  # the user's setting stands
    assert torch.get_num_threads() == 1
    with logitcache.open_cache(tmp_path / "a.zarr") as a, logitcache.open_cache(tmp_path / "b.zarr") as b:
        assert a.manifest["config_digest"] == b.manifest["config_digest"]  # not recorded: no change in bytes


def test_default_workers_follow_measured_costs():
    from logitcache.dump import choose_workers

    # 2 cores, the teachers on the cores the workers leave: no worker while views cost <= half the teachers
    assert choose_workers(0.5, 1.0, 2) == 0 and choose_workers(0.51, 1.0, 2) == 1 and choose_workers(3.0, 1.0, 2) == 1
    assert choose_workers(0.1, 1.0, 2, threads=1) == 1  # one thread fixed (OMP_NUM_THREADS=1): a worker frees it
    assert choose_workers(0.001, 1.0, 16) == 0 and choose_workers(1.0, 1.0, 16) == 8  # at most 8
    assert choose_workers(5.0, 1.0, 1) == 0  # one core: nothing to overlap on


def test_train_threads_option(strong_cache, dataset, tmp_path):
    SEEN_THREADS.clear()
    result = run("train", "--cache", strong_cache, "--data", dataset, "--student", "test_numbers:thread_probe",
                 "--out", tmp_path / "run", "--epochs", 1, "--batch-size", 12, "--threads", 2)
    assert result.exit_code == 0, result.output
    # the first call is train's one-clip shape probe, before the run sets its threads
    assert SEEN_THREADS[1:] == [2, 2] and torch.get_num_threads() == 1


# ---------------------------------------------------------------- 14/15. help text and long messages
def test_eval_data_help_names_both_metrics():
    assert "mAP (multilabel) or top-1 accuracy (multiclass)" in " ".join(run("train", "--help").stdout.split())


def test_error_lines_are_capped(monkeypatch, tmp_path):
    import logitcache.report

    def long_error(*a, **k):
        raise LogitCacheError("x" * 1000)

    monkeypatch.setattr(logitcache.report, "inspect_cache", long_error)
    line = assert_error(run("inspect", tmp_path / "c.zarr"))
    assert len(line) == len("error: ") + 300 and line.endswith("x...")
