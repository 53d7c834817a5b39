"""Caches on object storage: a real S3 API (moto's server, on 127.0.0.1 only, started here),
reached through zarr's fsspec store and s3fs: dump, resume, inspect, verify, train, copy."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

sys.path.insert(0, str(Path(__file__).resolve().parent / "stress"))
import logitcache  # noqa: E402
from conftest import assert_one_line_error  # noqa: E402
from kill_resume import DUMP_KW, TEACHERS, arrays, differing  # noqa: E402
from logitcache import LogitCacheError  # noqa: E402
from logitcache.cli.main import main  # noqa: E402
from logitcache.copy import copy_cache  # noqa: E402
from logitcache.pipeline import TeacherPass  # noqa: E402
from logitcache.report import inspect_cache, verify_cache  # noqa: E402
from logitcache.storage import stored_files  # noqa: E402
from logitcache.train import train  # noqa: E402


@pytest.fixture(scope="module")
def s3():
    """An empty bucket on a moto S3 server bound to 127.0.0.1; s3fs finds it through the
    standard AWS_* environment variables, as it would a real endpoint. The server runs in its own
    process: in this one it would share the GIL with zarr's event loop (2-3x slower tests)."""
    import socket
    import subprocess
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert server.poll() is None, "moto server did not start"
                time.sleep(0.05)
        with pytest.MonkeyPatch.context() as mp:
            for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                         "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
                mp.setenv(k, v)
            import s3fs

            s3fs.S3FileSystem.clear_instance_cache()  # instances made before would keep another endpoint
            s3fs.S3FileSystem().mkdir("kd-caches")
            yield "s3://kd-caches"
            s3fs.S3FileSystem.clear_instance_cache()
    finally:
        server.terminate()
        server.wait(10)


# 12-row chunks (2 per epoch): every chunk is one request per array to the server, ~10 ms each.
KW = {**DUMP_KW, "epochs": 2, "chunk_rows": 12}


@pytest.fixture(scope="module")
def local(dumper):
    return dumper(epochs=2, chunk_rows=KW["chunk_rows"])


def _dump(data, out, **kw):
    return logitcache.dump(data, TEACHERS, out, **{**KW, **kw})


def test_dump_inspect_verify_and_train_on_s3(s3, dataset, local, tmp_path):
    url = f"{s3}/run.zarr"
    assert _dump(dataset, url) == url
    assert differing(url, arrays(local)) == []  # the same bytes as on local disk
    info = inspect_cache(url)
    assert info["complete"] and info["chunks_done"] == 4 and info["path"] == url
    assert info["bytes_on_disk"] == sum(stored_files(url).values()) > 0
    assert [e["chunks_done"] for e in info["epochs_table"]] == [2, 2]
    assert sum(e["stored_bytes"] for e in info["epochs_table"]) > 0
    report = verify_cache(url)
    assert report["ok"], report["problems"][:3]
    kw = dict(student="cnn_tiny", epochs=1, batch_size=8, record_steps=True, progress=False)
    remote = train(url, dataset, out=tmp_path / "s3run", **kw)
    here = train(local, dataset, out=tmp_path / "localrun", **kw)
    assert remote["step_losses"] == here["step_losses"] and len(remote["step_losses"]) == 3


def test_failed_dump_resumes_on_s3(s3, dataset, local, monkeypatch):
    url = f"{s3}/resume.zarr"
    real, calls = TeacherPass.submit, []

    def fails_on_batch_5(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("teacher crashed")
        return real(*a, **k)

    monkeypatch.setattr(TeacherPass, "submit", fails_on_batch_5)
    with pytest.raises(RuntimeError):
        _dump(dataset, url)
    monkeypatch.setattr(TeacherPass, "submit", real)
    with logitcache.open_cache(url) as c:
        assert not c.complete and 0 < int(c.chunks_done().sum()) < 4
    with pytest.raises(LogitCacheError) as e:
        _dump(dataset, url)
    assert_one_line_error(e, "resume.zarr", "unfinished dump", "--resume")
    _dump(dataset, url, resume=True)
    assert differing(url, arrays(local)) == []
    assert logitcache.open_cache(url).complete


def test_copy_between_disk_and_s3_verifies(s3, dataset, local, tmp_path):
    url = f"{s3}/copied.zarr"
    up = copy_cache(local, url)
    assert up["verified"] and up["files"] == len(stored_files(local))
    assert stored_files(url) == stored_files(local)
    back = tmp_path / "back.zarr"
    r = CliRunner().invoke(main, ["copy", url, str(back)])
    assert r.exit_code == 0, r.output
    assert "verified" in r.output
    assert differing(back, arrays(local)) == []

    with pytest.raises(LogitCacheError) as e:
        copy_cache(local, url)
    assert_one_line_error(e, "copied.zarr", "already exists")
    h5 = _dump(dataset, tmp_path / "run.h5", epochs=1)
    with pytest.raises(LogitCacheError) as e:
        copy_cache(h5, f"{s3}/run.h5")
    assert_one_line_error(e, "run.h5", "hdf5", "zarr caches only")


def test_bad_object_storage_input_is_one_line(s3, dataset):
    with pytest.raises(LogitCacheError) as e:
        _dump(dataset, f"{s3}/run.h5", epochs=1)
    assert_one_line_error(e, "run.h5", "zarr caches only")
    with pytest.raises(LogitCacheError) as e:
        logitcache.open_cache(f"{s3}/missing.zarr")
    assert_one_line_error(e, "missing.zarr", "not found")
    with pytest.raises(LogitCacheError) as e:
        logitcache.open_cache("nosuchproto://bucket/run.zarr")
    assert_one_line_error(e, "nosuchproto://bucket/run.zarr")


def test_distributed_dump_to_s3(s3, dataset, local):
    """Two gloo ranks writing their own chunk objects of one S3 cache: the single-process bytes."""
    import os

    from dist_ranks import context, run_ranks

    url = f"{s3}/ranks.zarr"
    aws = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    assert run_ranks(context(), 2, "test_distributed.dump_rank", str(dataset), url, env=aws,
                     chunk_rows=KW["chunk_rows"]) == {}
    assert differing(url, arrays(local)) == []
    assert logitcache.open_cache(url).complete
