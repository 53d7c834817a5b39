"""Training from the cache: equals online KD, never touches teachers, frame level, epochs cycling."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch

import logitcache
import toy_teachers
from conftest import C, assert_one_line_error
from logitcache.errors import LogitCacheError
from logitcache.targets import aggregate, kd_loss, topk_targets
from logitcache.train import build_student, make_optimizer, train
from logitcache.views import CacheStream


def online_kd_losses(cache_path, data, teachers, k, kind, temperature, batch_size, steps, lr=1e-3):
    """The reference: same student init and optimiser, teachers run on each replayed batch."""
    model = build_student("cnn_tiny", C, 16000, None, seed=0)
    batches = list(CacheStream(cache_path, data, 0, batch_size))[:steps]
    optimizer, schedule = make_optimizer(model, lr, 1e-4, len(batches))
    members = [getattr(toy_teachers, t)().eval() for t in teachers]
    losses = []
    for batch in batches:
        with torch.inference_mode():
            logits = [m(batch["wave"]) for m in members]
        values, indices, stat = topk_targets(aggregate(logits, kind, "mean_prob"), k, kind)
        loss = kd_loss(model(batch["wave"]), values.clone(), indices.clone(), stat.clone(), kind, temperature)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("kind,value_dtype,rtol", [("multiclass", "float32", 1e-4), ("multilabel", "float16", 3e-3)])
def test_training_from_cache_equals_online_kd(dumper, dataset, tmp_path, kind, value_dtype, rtol):
    teachers = ("toy_a", "toy_b")
    cache = dumper(teachers=[f"toy_teachers:{t}" for t in teachers], topk=4, output_kind=kind,
                   value_dtype=value_dtype, augment="strong")
    result = train(cache, dataset, "cnn_tiny", tmp_path / "run", epochs=1, batch_size=8, temperature=2.0,
                   seed=0, record_steps=True, progress=False)
    offline = result["step_losses"]
    online = online_kd_losses(cache, dataset, teachers, 4, kind, 2.0, 8, len(offline))
    assert len(offline) == 3
    np.testing.assert_allclose(offline, online, rtol=rtol)
    assert offline[0] != offline[-1]  # the student really trained


def test_training_never_imports_or_loads_teachers(dumper, dataset, tmp_path, monkeypatch):
    cache = dumper()

    def forbidden(*a, **k):
        raise AssertionError("a teacher was loaded during training")

    class BlockTeachers:
        def find_spec(self, name, path=None, target=None):
            if name == "toy_teachers":
                raise AssertionError("teacher module imported during training")
            return None

    monkeypatch.delitem(sys.modules, "toy_teachers")
    monkeypatch.setattr(sys, "meta_path", [BlockTeachers(), *sys.meta_path])
    monkeypatch.setattr(torch.export, "load", forbidden)
    monkeypatch.setattr(torch.jit, "load", forbidden)
    import logitcache.teachers

    monkeypatch.setattr(logitcache.teachers, "load_teacher", forbidden)
    result = train(cache, dataset, "cnn_tiny", tmp_path / "run", epochs=1, batch_size=12, progress=False)
    assert np.isfinite(result["train_loss"]) and "toy_teachers" not in sys.modules


def test_frame_level_targets_train_a_frame_level_student(dumper, dataset, tmp_path):
    cache = dumper(teachers=["toy_teachers:toy_frames", "toy_teachers:toy_frames_b"], topk=3,
                   output_kind="multilabel", value_dtype="float16", epochs=1)
    result = train(cache, dataset, "cnn_tiny", tmp_path / "run", epochs=1, batch_size=8, eval_data=dataset,
                   progress=False)
    assert np.isfinite(result["train_loss"]) and 0.0 <= result["eval_mAP"] <= 1.0
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["model"]
    frames = logitcache.open_cache(cache).frames
    model = build_student("cnn_tiny", C, 16000, frames)
    model.load_state_dict(state)
    assert frames and model(torch.zeros(2, 16000)).shape == (2, frames, C)


def test_more_epochs_than_stored_cycle_through_stored_epochs(dumper, dataset, tmp_path):
    cache = dumper()  # 2 stored epochs
    train(cache, dataset, "cnn_tiny", tmp_path / "run", epochs=3, batch_size=12, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["stored_epoch"] for m in lines] == [0, 1, 0]


def test_hard_label_term_and_member_targets(dumper, dataset, tmp_path):
    cache = dumper()
    a = train(cache, dataset, "cnn_tiny", tmp_path / "a", epochs=1, batch_size=12, member="toy_a",
              record_steps=True, progress=False)
    b = train(cache, dataset, "cnn_tiny", tmp_path / "b", epochs=1, batch_size=12, member="toy_b",
              record_steps=True, progress=False)
    h = train(cache, dataset, "cnn_tiny", tmp_path / "h", epochs=1, batch_size=12, alpha=1.0,
              record_steps=True, progress=False)
    assert a["step_losses"] != b["step_losses"] != h["step_losses"]
    with pytest.raises(LogitCacheError) as e:
        train(cache, dataset, "cnn_tiny", tmp_path / "x", member="nope", progress=False)
    assert_one_line_error(e, "nope")


def test_incomplete_cache_is_refused_unless_allowed(dumper, dataset, tmp_path):
    import zarr

    path = tmp_path / "partial.zarr"
    shutil.copytree(dumper(), path)
    group = zarr.open_group(str(path), mode="r+")
    manifest = dict(group.attrs["logitcache"], complete=False)
    group.attrs["logitcache"] = manifest
    done = group["done"]
    done[1, :] = 0  # epoch 1 never finished
    with pytest.raises(LogitCacheError) as e:
        train(path, dataset, "cnn_tiny", tmp_path / "run", progress=False)
    assert_one_line_error(e, "incomplete", "--allow-partial")
    train(path, dataset, "cnn_tiny", tmp_path / "run", epochs=2, batch_size=12, allow_partial=True, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["stored_epoch"] for m in lines] == [0, 0]


def test_training_refuses_another_dataset(dumper, dataset, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(dataset, other)
    lines = (other / "labels.csv").read_text().splitlines()
    (other / "labels.csv").write_text("\n".join(lines[:-1]) + "\n")  # one clip fewer
    with pytest.raises(LogitCacheError) as e:
        train(dumper(), other, "cnn_tiny", tmp_path / "run", progress=False)
    assert_one_line_error(e, "does not match")


def test_resumed_training_continues_at_the_exact_batch(dumper, dataset, tmp_path, monkeypatch):
    """A run stopped mid-epoch and resumed from its last checkpoint ends with the same weights, step
    losses and log as one that never stopped: the checkpoint holds the reader's position."""
    import logitcache.train as train_mod

    cache = dumper()
    kw = dict(epochs=3, batch_size=8, seed=0, record_steps=True, progress=False, checkpoint_every=2)
    whole = train(cache, dataset, "cnn_tiny", tmp_path / "whole", **kw)
    real_step, calls = train_mod.distill_step, []

    def dies_at_step_6(*a, **k):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt  # after 5 steps; the checkpoint of step 4 is the latest
        return real_step(*a, **k)

    monkeypatch.setattr(train_mod, "distill_step", dies_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        train(cache, dataset, "cnn_tiny", tmp_path / "cut", **kw)
    monkeypatch.setattr(train_mod, "distill_step", real_step)
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["position"] == \
        {"epoch": 1, "batch": 1, "steps": 4}
    resumed = train(cache, dataset, "cnn_tiny", tmp_path / "cut", resume=True, **kw)
    np.testing.assert_array_equal(resumed["step_losses"], whole["step_losses"][4:])
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in log] == [0, 1, 2] and log[-1]["train_loss"] == whole["train_loss"]

    with pytest.raises(LogitCacheError) as e:  # a position counts batches: the batch size must match
        train(cache, dataset, "cnn_tiny", tmp_path / "cut", resume=True, **{**kw, "batch_size": 4})
    assert_one_line_error(e, "checkpoint.pt", "cannot resume", "batch_size")
