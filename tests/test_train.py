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
from logitcache.targets import aggregate, kd_loss, teacher_probs, topk_targets
from logitcache.train import build_student, make_optimizer, train
from logitcache.views import CacheStream


def online_kd_losses(cache_path, data, teachers, k, kind, temperature, batch_size, steps, lr=1e-3):
    """Same student init and optimiser, teachers run on each replayed batch. It uses the library's own
    target math, so it checks the store-and-replay round trip; the math itself is checked against
    dense references below (test_kd_loss_*, test_teacher_probs_*)."""
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
def test_training_from_cache_takes_the_steps_online_kd_takes(dumper, dataset, tmp_path, kind, value_dtype, rtol):
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


# ---------------------------------------------------------------- the target math against dense references
# Written out with numpy in float64 from the teachers' *full* logits; nothing from logitcache.targets.
def _stored_row(teacher: np.ndarray, k: int, kind: str):
    """(values, indices, stat) as the README defines a cache row, and the tail mask."""
    indices = np.argsort(-teacher, axis=-1, kind="stable")[..., :k]
    values = np.take_along_axis(teacher, indices, -1)
    tail = np.ones(teacher.shape, bool)
    np.put_along_axis(tail, indices, False, -1)
    if kind == "multiclass":
        stat = np.log(np.exp(teacher).sum(-1))  # log-normaliser of all C logits
    else:
        p = 1 / (1 + np.exp(-teacher))
        m = np.where(tail, p, 0).sum(-1) / np.maximum(tail.sum(-1), 1)  # mean tail probability
        stat = np.where(tail.any(-1), np.log(np.maximum(m, 1e-300)) - np.log1p(-m), 0.0)  # 0: no tail
    row = [torch.from_numpy(a) for a in (values.astype(np.float32), indices, stat.astype(np.float32))]
    return row, tail


def _dense_teacher(teacher: np.ndarray, tail: np.ndarray, kind: str, T: float) -> np.ndarray:
    """Dense teacher probabilities at temperature T as the cache can know them."""
    if kind == "multilabel":  # top-k exact, each tail class at the tail's mean probability, re-tempered
        p = 1 / (1 + np.exp(-teacher))
        m = np.where(tail, p, 0).sum(-1, keepdims=True) / np.maximum(tail.sum(-1, keepdims=True), 1)
        z = np.where(tail, np.log(np.maximum(m, 1e-300)) - np.log1p(-m), teacher)  # (m = 0: no tail)
        return 1 / (1 + np.exp(-z / T))
    p = np.exp(teacher - teacher.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    # the tail's own spread is not stored: its exact mass at T = 1, spread evenly over the tail classes
    # (at T = 1 only the tail bucket's sum is used, and that is exact), then re-tempered as a whole
    even = np.where(tail, p, 0).sum(-1, keepdims=True) / np.maximum(tail.sum(-1, keepdims=True), 1)
    p = np.where(tail, even, p) ** (1 / T)
    return p / p.sum(-1, keepdims=True)


def _dense_kd(student: np.ndarray, teacher: np.ndarray, tail: np.ndarray, kind: str, T: float) -> float:
    p = _dense_teacher(teacher, tail, kind, T)
    s = student / T
    if kind == "multilabel":  # BCE against the dense targets, mean over every class and row
        log_q, log_not_q = -np.log1p(np.exp(-s)), -np.log1p(np.exp(s))
        return float(-(p * log_q + (1 - p) * log_not_q).mean() * T * T)
    q = np.exp(s - s.max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    # KL(teacher || student) over the top-k classes plus one bucket holding all of the tail
    top = np.where(tail, 0.0, p * (np.log(p) - np.log(q))).sum(-1)
    p_tail, q_tail = np.where(tail, p, 0).sum(-1), np.where(tail, q, 0).sum(-1)
    bucket = np.where(p_tail > 0, p_tail * np.log(np.maximum(p_tail, 1e-300) / np.maximum(q_tail, 1e-300)), 0.0)
    return float((top + bucket).mean() * T * T)


def _logits(shape, scale, seed):
    return scale * np.random.default_rng(seed).standard_normal(shape)


@pytest.mark.parametrize("kind", ["multiclass", "multilabel"])
@pytest.mark.parametrize("T", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("k", [3, C])
@pytest.mark.parametrize("shape", [(6,), (2, 4)], ids=["clip", "frames"])
def test_kd_loss_equals_the_dense_reference(kind, T, k, shape):
    teacher, student = _logits((*shape, C), 3.0, 1), _logits((*shape, C), 2.0, 2)
    row, tail = _stored_row(teacher, k, kind)
    got = float(kd_loss(torch.from_numpy(student.astype(np.float32)), *row, kind, T))
    want = _dense_kd(student.astype(np.float32).astype(np.float64), teacher, tail, kind, T)
    assert got == pytest.approx(want, rel=2e-5, abs=1e-6)


@pytest.mark.parametrize("kind", ["multiclass", "multilabel"])
@pytest.mark.parametrize("T", [1.0, 2.0, 0.5])
def test_teacher_probs_equal_the_dense_reference(kind, T):
    teacher = _logits((5, C), 3.0, 3)
    row, tail = _stored_row(teacher, 4, kind)
    got = teacher_probs(*row, C, kind, T).numpy()
    # the stored row is float32: a tiny tail mass (1 - sum of top-k) keeps only ~1e-7 of absolute
    # precision, which re-tempering at T = 2 turns into up to ~3e-6 per tail class
    np.testing.assert_allclose(got, _dense_teacher(teacher, tail, kind, T), rtol=1e-4, atol=1e-5)


def test_softmax_tail_at_t1_is_exact_not_the_even_spread():
    """At T = 1 the tail bucket's KL term needs only the tail's total, which the cache holds exactly:
    the loss equals the KL of the true teacher distribution with its tail summed into one bucket."""
    teacher, student = _logits((6, C), 3.0, 4), _logits((6, C), 2.0, 5)
    row, tail = _stored_row(teacher, 3, "multiclass")
    p = np.exp(teacher) / np.exp(teacher).sum(-1, keepdims=True)
    q = np.exp(student) / np.exp(student).sum(-1, keepdims=True)
    kl = np.where(tail, 0.0, p * np.log(p / q)).sum(-1)
    p_tail, q_tail = (p * tail).sum(-1), (q * tail).sum(-1)
    want = float((kl + p_tail * np.log(p_tail / q_tail)).mean())
    got = float(kd_loss(torch.from_numpy(student.astype(np.float32)), *row, "multiclass", 1.0))
    assert got == pytest.approx(want, rel=2e-5)


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
    losses = [a["step_losses"], b["step_losses"], h["step_losses"]]
    assert all(len(x) == 2 for x in losses)
    assert losses[0] != losses[1] and losses[0] != losses[2] and losses[1] != losses[2]
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
