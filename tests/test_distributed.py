"""torch.distributed dumps (gloo on CPU): the cache does not depend on the number of ranks, resume
works with any number of ranks, HDF5 refuses several writers."""

from __future__ import annotations

import json
import signal
import sys
import time

from pathlib import Path

import numpy as np
import pytest
import torch

import logitcache
from conftest import assert_one_line_error
from dist_ranks import context, run_ranks
from kill_resume import DUMP_KW, TEACHERS, differing, run_child, writes_per_chunk
from logitcache import LogitCacheError
from logitcache.distributed import DistContext, deal_chunks, shard_bounds
from logitcache.lock import lock_path


@pytest.fixture(scope="module")
def ctx():
    return context()


@pytest.fixture(scope="module")
def reference(dumper):
    """Every array of a plain single-process dump (chunk_rows=4: 6 chunks per epoch, 2 epochs)."""
    from kill_resume import arrays

    return arrays(dumper(epochs=2, chunk_rows=DUMP_KW["chunk_rows"]))


def dump_rank(data, out, **kw):
    logitcache.dump(data, TEACHERS, out, **{**DUMP_KW, "epochs": 2, **kw}, distributed=True)


def test_dump_with_2_and_3_ranks_is_bit_identical_to_1(ctx, dataset, tmp_path, reference):
    for world in (2, 3):
        out = tmp_path / f"run{world}.zarr"
        started = time.perf_counter()
        assert run_ranks(ctx, world, "test_distributed.dump_rank", str(dataset), str(out)) == {}
        print(f"{world} ranks: {time.perf_counter() - started:.1f} s")
        assert differing(out, reference) == []
        with logitcache.open_cache(out) as c:
            assert c.complete and c.chunks_done().all()
        assert not lock_path(out).exists()


def test_killed_dump_resumes_with_another_number_of_ranks(ctx, dataset, tmp_path, reference):
    out = tmp_path / "run.zarr"
    P = writes_per_chunk(reference)
    code = run_child(ctx, dataset, out, f"write:{3 * P}", {**DUMP_KW, "epochs": 2})  # one process, 3 chunks
    assert code == -signal.SIGKILL
    with logitcache.open_cache(out) as c:
        assert int(c.chunks_done().sum()) == 3 and not c.complete
    assert run_ranks(ctx, 3, "test_distributed.dump_rank", str(dataset), str(out), resume=True) == {}
    assert differing(out, reference) == []
    with logitcache.open_cache(out) as c:
        assert c.complete and len(c.manifest["resumes"]) == 1


def test_a_rank_that_fails_stops_every_rank(ctx, dataset, tmp_path):
    """Rank 0 refuses an existing cache without --resume: every rank raises, none hangs."""
    out = tmp_path / "done.zarr"
    assert run_ranks(ctx, 2, "test_distributed.dump_rank", str(dataset), str(out), epochs=1) == {}
    errors = run_ranks(ctx, 2, "test_distributed.dump_rank", str(dataset), str(out), epochs=1, timeout=60)
    assert set(errors) == {0, 1}
    assert "already exists" in errors[0] and "failed on rank 0" in errors[1]


def test_hdf5_refuses_several_ranks(dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules["logitcache.dump"], "dist_setup",
                        lambda distributed, device: (DistContext(rank=0, world=2), device))
    with pytest.raises(LogitCacheError) as e:
        logitcache.dump(dataset, TEACHERS, tmp_path / "run.h5", **{**DUMP_KW, "epochs": 1}, distributed=True)
    assert_one_line_error(e, "run.h5", "HDF5 allows one writer", "2 ranks", ".zarr")
    assert not (tmp_path / "run.h5").exists()


def test_distributed_without_a_launcher_is_one_line(dataset, tmp_path, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(LogitCacheError) as e:
        logitcache.dump(dataset, TEACHERS, tmp_path / "x.zarr", **{**DUMP_KW, "epochs": 1}, distributed=True)
    assert_one_line_error(e, "--distributed", "torchrun")


def test_chunks_are_dealt_round_robin_over_what_is_left():
    todo = np.array([[False, True, True, True], [True, True, False, True]])
    shares = [deal_chunks(todo, r, 3) for r in range(3)]
    assert (sum(s.astype(int) for s in shares) == todo).all()  # disjoint, and everything left is owned
    assert [int(s.sum()) for s in shares] == [2, 2, 2]
    assert shares[0][0, 1] and shares[1][0, 2] and shares[2][0, 3] and shares[0][1, 0]


def test_training_shards_are_contiguous_whole_chunks():
    bounds = [shard_bounds(1000, 64, r, 3) for r in range(3)]  # 16 chunks: 6, 5, 5
    assert bounds == [(0, 384), (384, 704), (704, 1000)]
    assert shard_bounds(10, 64, 1, 2) == (10, 10)  # fewer chunks than ranks: an empty share


def test_torchrun_cli_dump(dataset, tmp_path, reference):
    """The launch command the README gives: torchrun -m logitcache dump; one summary line, by rank 0."""
    import os
    import subprocess

    from dist_ranks import TESTS, free_port

    out = tmp_path / "cli.zarr"
    env = {**os.environ, "PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1"}
    kw = DUMP_KW
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "logitcache", "dump", "--data", str(dataset),
           *[a for t in TEACHERS for a in ("--teacher", t)], "--out", str(out), "--epochs", "2",
           "--topk", str(kw["topk"]), "--augment", kw["augment"], "--batch-size", str(kw["batch_size"]),
           "--output-kind", kw["output_kind"], "--value-dtype", kw["value_dtype"], "--workers", "0",
           "--chunk-rows", str(kw["chunk_rows"]), "--sample-rate", "16000", "--clip-seconds", "1.0"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("48 views (2 epochs x 24 samples)") == 1  # rank 0 reports, rank 1 does not
    assert differing(out, reference) == []


# ---------------------------------------------------------------- DDP training
def _ddp(ctx, cache, dataset, tmp_path, world, **kw) -> list[dict]:
    out, result = tmp_path / f"ddp{world}", tmp_path / f"result{world}"
    assert run_ranks(ctx, world, "dist_ranks.train_rank", str(cache), str(dataset), str(out), str(result),
                     **kw) == {}
    return [json.loads(Path(f"{result}.{r}").read_text()) for r in range(world)]


def union_batch_losses(cache, data, world, batch_size, student, epochs, stored_epochs):
    """The reference: one process, whose step t trains on the union of the ranks' step-t batches."""
    from logitcache.train import build_student, distill_step, make_optimizer
    from logitcache.views import CacheStream

    with logitcache.open_cache(cache) as c:
        N, R, kind = c.num_samples, c.chunk_rows, c.output_kind
    b = batch_size // world
    model = build_student(student, 10, 16000, None, seed=0)
    steps = min(len(range(*shard_bounds(N, R, r, world), b)) for r in range(world))
    optimizer, schedule = make_optimizer(model, 1e-3, 1e-4, epochs * steps)
    losses = []
    for epoch in range(epochs):
        shares = [list(CacheStream(cache, data, stored_epochs[epoch % len(stored_epochs)], b,
                                   start=a, stop=z))[:steps] for a, z in (shard_bounds(N, R, r, world)
                                                                           for r in range(world))]
        for parts in zip(*shares):
            batch = {k: torch.cat([p[k] for p in parts]) for k in ("wave", "values", "indices", "stat")}
            losses.append(distill_step(model, optimizer, batch, kind, torch.device("cpu"), 2.0))
            schedule.step()
    return losses, model


def test_ddp_equals_one_process_on_the_union_of_rank_batches(ctx, dumper, dataset, tmp_path):
    cache = dumper(epochs=2, chunk_rows=4)
    ranks = _ddp(ctx, cache, dataset, tmp_path, 2, student="dist_ranks:tiny_student", epochs=3, batch_size=8,
                 temperature=2.0, device="cpu")
    ddp = ranks[0]["step_losses"]
    assert len(ddp) == 9 and ranks[1]["step_losses"] == ddp  # every rank reports the job's mean loss
    ref, model = union_batch_losses(cache, dataset, 2, 8, "dist_ranks:tiny_student", 3, [0, 1])
    np.testing.assert_allclose(ddp, ref, rtol=1e-5)
    run = tmp_path / "ddp2"
    saved = torch.load(run / "checkpoint.pt", weights_only=True)["model"]  # plain keys, not DDP's "module."
    assert saved.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(saved[k], v, rtol=1e-5, atol=1e-6)
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3  # rank 0 alone writes the log
    assert json.loads((run / "config.json").read_text())["rank_batch_size"] == 4


def test_ddp_loss_curve_matches_one_process_with_the_same_global_batch(ctx, dumper, dataset, tmp_path):
    """The zoo student (BatchNorm: per-rank batch statistics), 2 ranks x 4 vs 1 process x 8."""
    from logitcache.train import train

    cache = dumper(epochs=2, chunk_rows=4)
    kw = dict(student="cnn_tiny", epochs=4, batch_size=8, temperature=2.0, lr=3e-3, device="cpu")
    _ddp(ctx, cache, dataset, tmp_path, 2, **kw)
    train(cache, dataset, out=tmp_path / "one", progress=False, **kw)
    curves = [[json.loads(line)["train_loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("ddp2", "one")]
    # Not step for step: the ranks' chunk-aligned shards make other batches than one process's
    # consecutive ones, and BatchNorm sees 4 rows per rank. Measured: within 10 % per epoch.
    np.testing.assert_allclose(curves[0], curves[1], rtol=0.15)
    assert curves[0][-1] < 0.7 * curves[0][0]  # and both really learn
