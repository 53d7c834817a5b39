"""Recomposing the ensemble from stored members at train time (``logitcache.recompose``).

Every figure is checked against an independent numpy computation in float64: from the teachers'
full logits on the replayed views (k == C: the recomposition is the re-run ensemble), and from
the stored member rows densified by hand (k < C: the even-spread tail estimate), plus the
dump-time per-teacher statistics against numpy over the re-run logits, across a kill and resume.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import logitcache
from conftest import C, N_CLIPS, assert_one_line_error, stream_views, teacher_logits
from logitcache import recompose
from logitcache.cli.main import main
from logitcache.errors import LogitCacheError
from logitcache.layout import Layout
from logitcache.report import fidelity, verify_cache
from logitcache.storage import open_store
from logitcache.students import build_student
from logitcache.targets import kd_loss, teacher_probs
from logitcache.train import train
from logitcache.views import CacheStream

THREE = ("toy_teachers:toy_a", "toy_teachers:toy_b", "toy_teachers:toy_c")
NAMES = ("toy_a", "toy_b", "toy_c")


# ---------------------------------------------------------------- independent references (numpy, float64)
def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def _probs(z, kind):
    return _softmax(z) if kind == "multiclass" else _sigmoid(z)


def _ensemble_probs(member_z: list[np.ndarray], kind: str, method: str, weights=None, row_weights=None):
    """Ensemble probabilities of member logits ``[N, C]``: mean_prob averages probabilities,
    mean_logit logits; ``row_weights`` [M, N] replace ``weights`` per row."""
    M = len(member_z)
    w = np.asarray(weights if weights else [1.0] * M, np.float64)
    w = (w / w.sum())[:, None, None] if row_weights is None else (row_weights / row_weights.sum(0))[..., None]
    z = np.stack([np.asarray(x, np.float64) for x in member_z])
    if method == "mean_prob":
        return (w * _probs(z, kind)).sum(0)
    return _probs((w * z).sum(0), kind)


def _densified(values, indices, stat, kind):
    """A stored member row made dense by hand: its own k logits, each tail class at the tail's
    exact mass spread evenly (softmax: as a log-probability; sigmoid: at the mean tail probability)."""
    v, s = np.asarray(values, np.float64), np.asarray(stat, np.float64)
    idx = np.asarray(indices).astype(np.int64)
    k = v.shape[-1]
    if kind == "multiclass":
        top = v - s[:, None]
        fill = np.log((1 - np.exp(top).sum(-1)).clip(1e-30) / (C - k)) if k < C else np.zeros(len(v))
    else:
        top, fill = v, s
    out = np.repeat(fill[:, None], C, 1)
    np.put_along_axis(out, idx, top, -1)
    return out


def _kl(p, q, kind):
    """Per-row KL(p || q) of probabilities: softmax summed, sigmoid the mean Bernoulli KL."""
    if kind == "multiclass":
        return (p * (np.log(p) - np.log(q))).sum(-1)
    return (p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))).mean(-1)


def _entropy(z, kind):
    p = _probs(z, kind)
    if kind == "multiclass":
        return -(p * np.log(p)).sum(-1)
    return -(p * np.log(p) + (1 - p) * np.log(1 - p)).sum(-1)


@functools.lru_cache(maxsize=None)
def _rerun(cache_path: str, data: str, epoch: int) -> dict[str, np.ndarray]:
    """Each toy teacher's full logits on the cache's views of ``epoch``, dataset order."""
    views = stream_views(Path(cache_path), Path(data), epoch)
    return {n: teacher_logits(n, views).astype(np.float64) for n in NAMES}


def _recomposed_probs(path, comp_kw: dict, epoch: int = 0) -> tuple[np.ndarray, tuple]:
    """teacher_probs of the library's recomposition of every row of ``epoch``, dataset order."""
    with logitcache.open_cache(path) as c:
        comp = recompose.composition(c, **comp_kw)
        v, i, s = recompose.targets(c, epoch, c.ids, comp)
        kind = c.output_kind
    p = teacher_probs(torch.from_numpy(v), torch.from_numpy(i), torch.from_numpy(s), C, kind)
    return p.double().numpy(), (v, i, s)


def _stored_members(path, names, epoch: int = 0) -> list[tuple]:
    with logitcache.open_cache(path) as c:
        return [tuple(np.asarray(x) for x in (t.values, t.indices, t.stat))
                for t in (c.targets(epoch, c.ids, member=n) for n in names)]


# ---------------------------------------------------------------- caches
@pytest.fixture(scope="module")
def full_softmax(dumper):
    """3 members, k == C, softmax, 2 epochs, chunks of 8 rows (3 per epoch)."""
    return dumper(teachers=THREE, epochs=2, chunk_rows=8)


@pytest.fixture(scope="module")
def full_sigmoid(dumper):
    return dumper(teachers=THREE, epochs=1, output_kind="multilabel")


@pytest.fixture(scope="module")
def top3_softmax(dumper):
    return dumper(teachers=THREE, epochs=1, topk=3)


@pytest.fixture(scope="module")
def top3_sigmoid_compact(dumper):
    return dumper(teachers=THREE, epochs=1, topk=3, output_kind="multilabel", codec="compact")


# ---------------------------------------------------------------- k == C: the re-run ensemble, exactly
@pytest.mark.parametrize("kind", ["multiclass", "multilabel"])
@pytest.mark.parametrize("method,names,weights", [("mean_prob", NAMES, None), ("mean_prob", ("toy_c", "toy_a"), [3, 1]),
                                                  ("mean_logit", ("toy_a", "toy_b"), [0.2, 0.8])])
def test_recomposition_with_k_equal_c_is_the_rerun_ensemble(request, dataset, kind, method, names, weights):
    path = request.getfixturevalue("full_softmax" if kind == "multiclass" else "full_sigmoid")
    got, (v, _, _) = _recomposed_probs(path, dict(ensemble=list(names), ensemble_weights=weights,
                                                  aggregation=method))
    z = _rerun(str(path), str(dataset), 0)
    want = _ensemble_probs([z[n] for n in names], kind, method, weights)
    assert v.shape == (N_CLIPS, C)  # M k >= C: every class listed
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)
    assert np.abs(_kl(want, got, kind)).max() < 1e-6  # float32 rounding only


def test_weights_are_honoured_one_member_alone_is_that_member(full_softmax, dataset):
    got, _ = _recomposed_probs(full_softmax, dict(ensemble=list(NAMES), ensemble_weights=[0, 1, 0]))
    np.testing.assert_allclose(got, _softmax(_rerun(str(full_softmax), str(dataset), 0)["toy_b"]), rtol=2e-5)
    # weights are normalised, as dump's --ensemble-weight: a scale changes nothing
    a, _ = _recomposed_probs(full_softmax, dict(ensemble=list(NAMES), ensemble_weights=[1, 2, 3]))
    b, _ = _recomposed_probs(full_softmax, dict(ensemble=list(NAMES), ensemble_weights=[10, 20, 30]))
    np.testing.assert_allclose(a, b, rtol=1e-6)
    assert np.abs(a - got).max() > 0.01  # and a different weighting is a different target


# ---------------------------------------------------------------- k < C: the even-spread estimate
@pytest.mark.parametrize("which,method", [("top3_softmax", "mean_prob"), ("top3_softmax", "mean_logit"),
                                          ("top3_sigmoid_compact", "mean_prob"),
                                          ("top3_sigmoid_compact", "mean_logit")])
def test_recomposition_from_topk_members_is_the_densified_estimate(request, which, method):
    path = request.getfixturevalue(which)
    kind = "multiclass" if which == "top3_softmax" else "multilabel"
    weights = [1, 2, 3]
    got, (v, i, s) = _recomposed_probs(path, dict(ensemble=list(NAMES), ensemble_weights=weights,
                                                  aggregation=method))
    rows = _stored_members(path, NAMES)
    want = _ensemble_probs([_densified(*r, kind) for r in rows], kind, method, weights)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    # the row lists the union of the members' ids (then padding classes at the tail's value)
    assert v.shape == (N_CLIPS, 9)
    union = [set(np.concatenate([r[1][n] for r in rows]).tolist()) for n in range(N_CLIPS)]
    assert all(u <= set(i[n].tolist()) for n, u in enumerate(union))
    assert (np.diff(v, axis=-1) <= 0).all()
    assert any(len(u) < 9 for u in union)  # some rows needed padding
    outside = [np.setdiff1d(np.arange(C), sorted(u)) for u in union]  # one constant outside the union
    assert all(np.ptp(got[n, o]) < 1e-6 for n, o in enumerate(outside) if len(o))


def test_recomposed_kl_to_the_rerun_ensemble_is_what_fidelity_reports(top3_softmax, dataset):
    r = fidelity(top3_softmax, dataset, [f"toy_teachers:{n}" for n in NAMES], samples=N_CLIPS,
                                   ensemble=["toy_a", "toy_c"], ensemble_weights=[2, 1],
                                   compositions=[dict(ensemble=list(NAMES), aggregation="mean_logit")])
    z = _rerun(str(top3_softmax), str(dataset), 0)
    rows = dict(zip(NAMES, _stored_members(top3_softmax, NAMES)))
    first, second = r["recomposed"]
    true = _ensemble_probs([z["toy_a"], z["toy_c"]], "multiclass", "mean_prob", [2, 1])
    est = _ensemble_probs([_densified(*rows[n], "multiclass") for n in ("toy_a", "toy_c")], "multiclass",
                          "mean_prob", [2, 1])
    assert first["ensemble"] == ["toy_a", "toy_c"] and first["ensemble_weights"] == [2, 1]
    assert first["rows"] == N_CLIPS and first["width"] == 6
    assert first["kl_mean"] == pytest.approx(_kl(true, est, "multiclass").mean(), rel=1e-4)
    assert first["kl_max"] == pytest.approx(_kl(true, est, "multiclass").max(), rel=1e-4)
    assert first["top1_agreement"] == pytest.approx((true.argmax(-1) == est.argmax(-1)).mean())
    true = _ensemble_probs([z[n] for n in NAMES], "multiclass", "mean_logit")
    est = _ensemble_probs([_densified(*rows[n], "multiclass") for n in NAMES], "multiclass", "mean_logit")
    assert second["kl_mean"] == pytest.approx(_kl(true, est, "multiclass").mean(), rel=1e-4)
    assert 1e-4 < first["kl_mean"] < 1.0  # k = 3 of 10: approximate, not exact


def test_fidelity_cli_reports_recomposition_kl_near_zero_when_k_equals_c(full_sigmoid, dataset):
    args = ["fidelity", full_sigmoid, "--data", dataset, "--samples", 8, "--json",
            "--ensemble", "toy_b,toy_c", "--ensemble-weights", "1,3", "--aggregation", "mean_logit"]
    for t in THREE:
        args += ["--teacher", t]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    (r,) = json.loads(result.stdout)["recomposed"]
    assert r["ensemble"] == ["toy_b", "toy_c"] and r["aggregation"] == "mean_logit" and r["width"] == C
    assert r["kl_max"] < 1e-9 and r["top1_agreement"] == 1.0


# ---------------------------------------------------------------- per-teacher statistics, z-scoring
def test_member_stats_are_numpy_mean_and_std_of_the_rerun_logits(full_softmax, dataset):
    with logitcache.open_cache(full_softmax) as c:
        stats = recompose.member_stats(c)
        assert c.chunks_done().shape == (2, 3)  # 2 epochs of 3 chunks: sums over 6 chunks
    assert set(stats) == set(NAMES)
    for n in NAMES:
        z = np.concatenate([_rerun(str(full_softmax), str(dataset), e)[n] for e in (0, 1)])  # [2N, C]
        assert stats[n]["count"] == z.size
        assert stats[n]["mean"] == pytest.approx(z.mean(), rel=1e-10, abs=1e-12)
        assert stats[n]["std"] == pytest.approx(z.std(), rel=1e-10)
        assert stats[n]["std_within"] == pytest.approx((z - z.mean(-1, keepdims=True)).std(), rel=1e-10)


@pytest.mark.parametrize("kind,method", [("multiclass", "mean_prob_zscore"), ("multilabel", "mean_logit_zscore"),
                                         ("multilabel", "mean_prob_zscore")])
def test_zscore_aggregation_standardises_each_member_by_its_stats(request, dataset, kind, method):
    path = request.getfixturevalue("full_softmax" if kind == "multiclass" else "full_sigmoid")
    got, _ = _recomposed_probs(path, dict(ensemble=list(NAMES), ensemble_weights=[1, 1, 2], aggregation=method))
    with logitcache.open_cache(path) as c:
        epochs = c.epochs
    z = {n: np.concatenate([_rerun(str(path), str(dataset), e)[n] for e in range(epochs)]) for n in NAMES}
    if kind == "multiclass":  # a softmax ignores shifts: the spread within rows is the scale
        scaled = [z[n][:N_CLIPS] / (z[n] - z[n].mean(-1, keepdims=True)).std() for n in NAMES]
    else:
        scaled = [(z[n][:N_CLIPS] - z[n].mean()) / z[n].std() for n in NAMES]
    want = _ensemble_probs(scaled, kind, method.removesuffix("_zscore"), [1, 1, 2])
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)
    plain, _ = _recomposed_probs(path, dict(ensemble=list(NAMES), ensemble_weights=[1, 1, 2],
                                            aggregation=method.removesuffix("_zscore")))
    assert np.abs(plain - got).max() > 1e-3  # standardising changed the target


def test_member_stats_survive_a_kill_and_a_resume_with_another_batch_size(dataset, dumper, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parent / "stress"))
    import kill_resume

    reference = kill_resume.arrays(dumper(epochs=2, chunk_rows=kill_resume.DUMP_KW["chunk_rows"]))
    stats = [n for n in reference if n.endswith("/logit_moments")]
    assert stats == [Layout.stats_path("toy_a"), Layout.stats_path("toy_b")]
    out = tmp_path / "run.zarr"
    P = kill_resume.writes_per_chunk(reference)
    code = kill_resume.run_child(kill_resume.context(), dataset, out, f"write:{2 * P + P // 2}",
                                 {**kill_resume.DUMP_KW, "epochs": 2})
    assert code == -signal.SIGKILL
    with logitcache.open_cache(out) as c:
        assert int(c.chunks_done().sum()) == 2  # killed in the middle of the third chunk
    logitcache.dump(dataset, list(kill_resume.TEACHERS), out, resume=True,
                    **{**kill_resume.DUMP_KW, "epochs": 2, "batch_size": 3})
    got = kill_resume.arrays(out)
    for name in stats:
        assert got[name].tobytes() == reference[name].tobytes(), name
    with logitcache.open_cache(out) as c:
        assert c.chunks_done().all() and verify_cache(out)["ok"]


def _as_older_cache(src: Path, dst: Path, unfinished: bool = True) -> Path:
    """A copy of ``src`` as a dump from before member statistics existed writes it: no
    ``member_stats`` entry, no logit_moments arrays (and, ``unfinished``, its last chunk not
    written yet)."""
    shutil.copytree(src, dst)
    for stats in dst.glob("members/*/logit_moments"):
        shutil.rmtree(stats)
    store = open_store(dst, "r+")
    m = store.read_manifest()
    m.pop("member_stats")
    if unfinished:
        m["complete"] = False
        done = store.read("done")
        done[0, -1] = 0
        store.write("done", (slice(None),), done)
    store.write_manifest(m)
    store.close()
    return dst


def test_older_cache_resumes_without_stats_and_refuses_zscore_in_one_line(dataset, dumper, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parent / "stress"))
    from kill_resume import DUMP_KW, TEACHERS

    old = _as_older_cache(dumper(epochs=1, chunk_rows=8), tmp_path / "old.zarr")
    logitcache.dump(dataset, TEACHERS, old, resume=True, **{**DUMP_KW, "epochs": 1, "chunk_rows": 8})
    assert verify_cache(old)["ok"]
    with logitcache.open_cache(old) as c:
        assert c.complete and recompose.member_stats(c) is None
        comp = recompose.composition(c, "toy_a,toy_b")  # plain aggregations need no statistics
        with pytest.raises(LogitCacheError) as e:
            recompose.composition(c, "toy_a,toy_b", aggregation="mean_prob_zscore")
    assert_one_line_error(e, "--aggregation mean_prob_zscore", "stores no per-teacher logit statistics", str(old))
    assert comp.members == ("toy_a", "toy_b")


def test_frame_level_members_recompose_and_measure_per_frame(dumper, dataset):
    names = ("toy_frames", "toy_frames_b")
    path = dumper(teachers=[f"toy_teachers:{n}" for n in names], epochs=1)
    views = stream_views(path, dataset, 0)
    z = {n: teacher_logits(n, views).astype(np.float64) for n in names}  # [N, T, C]
    with logitcache.open_cache(path) as c:
        v, i, s = recompose.targets(c, 0, c.ids, recompose.composition(c, list(names), [1, 3]))
        stats = recompose.member_stats(c)
    got = teacher_probs(torch.from_numpy(v), torch.from_numpy(i), torch.from_numpy(s), C, "multiclass")
    want = _ensemble_probs([x.reshape(-1, C) for x in z.values()], "multiclass", "mean_prob", [1, 3])
    assert v.shape == (N_CLIPS, 6, C)
    np.testing.assert_allclose(got.double().numpy().reshape(-1, C), want, rtol=2e-5, atol=1e-7)
    for n in names:  # rows are frames: the spread within a frame's C logits
        assert stats[n]["count"] == z[n].size
        assert stats[n]["std"] == pytest.approx(z[n].std(), rel=1e-10)
        assert stats[n]["std_within"] == pytest.approx((z[n] - z[n].mean(-1, keepdims=True)).std(), rel=1e-10)


# ---------------------------------------------------------------- per-row confidence weights
@pytest.mark.parametrize("kind", ["multiclass", "multilabel"])
def test_confidence_weighting_weights_members_per_row_by_exp_minus_entropy(request, dataset, kind):
    path = request.getfixturevalue("full_softmax" if kind == "multiclass" else "full_sigmoid")
    got, _ = _recomposed_probs(path, dict(ensemble=list(NAMES), ensemble_weights=[1, 2, 1],
                                          member_weighting="confidence"))
    z = _rerun(str(path), str(dataset), 0)
    h = np.stack([_entropy(z[n], kind) for n in NAMES])  # [M, N] nats
    row_w = np.array([1, 2, 1.0])[:, None] * np.exp(-h)
    want = _ensemble_probs([z[n] for n in NAMES], kind, "mean_prob", row_weights=row_w)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)
    assert np.ptp(row_w / row_w.sum(0), axis=1).max() > 0.05  # weights really vary by row


def test_confidence_entropy_of_a_topk_row_uses_the_even_tail(top3_softmax):
    (v, i, s), = _stored_members(top3_softmax, ["toy_a"])
    h = recompose.row_entropy(torch.from_numpy(v).float(), torch.from_numpy(s).float(), "multiclass", C)
    dense = _softmax(_densified(v, i, s, "multiclass"))
    np.testing.assert_allclose(h.numpy(), -(dense * np.log(dense)).sum(-1), rtol=1e-5)


# ---------------------------------------------------------------- the rows function itself
def test_union_rows_pad_with_classes_outside_the_union_at_the_tail_value():
    # two members sharing class 2; C = 6, k = 2: K = 4 slots, union {1, 2, 4}, padded with class 0
    a = (np.array([[3.0, 1.0]], np.float32), np.array([[2, 4]]), np.array([0.5], np.float32))
    b = (np.array([[2.0, 0.0]], np.float32), np.array([[1, 2]]), np.array([-1.0], np.float32))
    v, i, s = recompose.recompose_rows([a, b], "multilabel", 6, aggregation="mean_logit")
    assert i.tolist() == [[2, 1, 4, 0]]  # by value, descending
    logits = dict(zip(i[0].tolist(), v[0].tolist()))
    assert logits[2] == pytest.approx((3.0 + 0.0) / 2)  # both members list class 2
    assert logits[4] == pytest.approx((1.0 - 1.0) / 2)  # b's tail value for class 4
    assert logits[1] == pytest.approx((0.5 + 2.0) / 2)
    assert logits[0] == pytest.approx((0.5 - 1.0) / 2) == pytest.approx(float(s[0]))  # padding = outside


def test_recomposed_rows_cut_to_the_codec_k_encode_and_keep_the_tail_mass(top3_sigmoid_compact):
    rows = _stored_members(top3_sigmoid_compact, NAMES)
    v9, i9, s9 = recompose.recompose_rows(rows, "multilabel", C)
    v3, i3, s3 = recompose.recompose_rows(rows, "multilabel", C, k=3)
    assert v3.shape == (N_CLIPS, 3) and np.array_equal(i3, i9[:, :3])
    mass9 = _sigmoid(v9.astype(np.float64)).sum(-1) + (C - 9) * _sigmoid(s9.astype(np.float64))
    mass3 = _sigmoid(v3.astype(np.float64)).sum(-1) + (C - 3) * _sigmoid(s3.astype(np.float64))
    np.testing.assert_allclose(mass3, mass9, rtol=1e-6)
    with logitcache.open_cache(top3_sigmoid_compact) as c:
        back = c.codec.decode(c.codec.encode_rows(v3, i3, s3))
    np.testing.assert_allclose(np.sort(back[1], -1), np.sort(i3, -1))


# ---------------------------------------------------------------- streaming and training
def test_stream_batches_carry_the_recomposed_targets(top3_softmax, dataset):
    kw = dict(ensemble=["toy_b", "toy_a"], ensemble_weights=[1, 3], aggregation="mean_logit",
              member_weighting="confidence")
    batches = list(CacheStream(top3_softmax, dataset, 0, 8, **kw))
    with logitcache.open_cache(top3_softmax) as c:
        comp = recompose.composition(c, **kw)
        for b in batches:
            v, i, s = recompose.targets(c, 0, [c.ids[x] for x in b["order"].tolist()], comp)
            np.testing.assert_array_equal(b["values"].numpy(), v)
            np.testing.assert_array_equal(b["indices"].numpy(), i)
            np.testing.assert_array_equal(b["stat"].numpy(), s)
    assert sum(len(b["wave"]) for b in batches) == N_CLIPS and batches[0]["values"].shape[-1] == 6


def test_training_on_a_recomposition_steps_on_its_kd_loss(top3_softmax, dataset, tmp_path):
    kw = dict(ensemble="toy_c,toy_a", ensemble_weights=[2, 1], aggregation="mean_prob")
    result = train(top3_softmax, dataset, "cnn_tiny", tmp_path / "run", epochs=1, batch_size=8,
                                    temperature=2.0, seed=0, record_steps=True, progress=False, **kw)
    model = build_student("cnn_tiny", C, 16000, None, seed=0)
    first = next(iter(CacheStream(top3_softmax, dataset, 0, 8)))  # the views of the first batch
    with logitcache.open_cache(top3_softmax) as c:
        v, i, s = recompose.targets(c, 0, [c.ids[x] for x in first["order"].tolist()],
                                    recompose.composition(c, **kw))
    want = kd_loss(model(first["wave"]), *(torch.from_numpy(x) for x in (v, i, s)), "multiclass", 2.0)
    assert result["step_losses"][0] == pytest.approx(float(want.detach()), rel=1e-5)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["ensemble"] == ["toy_c", "toy_a"] and config["ensemble_weights"] == [2, 1]
    assert config["aggregation"] == "mean_prob" and config["member_weighting"] == "none"


def test_train_cli_recomposes_and_a_resume_must_keep_the_composition(top3_sigmoid_compact, dataset, tmp_path):
    base = ["train", "--cache", top3_sigmoid_compact, "--data", dataset, "--student", "cnn_tiny",
            "--out", tmp_path / "run", "--batch-size", 8, "--json"]
    ok = CliRunner().invoke(main, [str(a) for a in base + ["--ensemble", "toy_a", "--ensemble", "toy_b",
                                                          "--ensemble-weight", 1, "--ensemble-weight", 2]])
    assert ok.exit_code == 0, ok.output
    assert math.isfinite(json.loads(ok.stdout)["train_loss"])
    again = CliRunner().invoke(main, [str(a) for a in base + ["--resume", "--ensemble", "toy_a,toy_c"]])
    assert again.exit_code == 1 and "cannot resume" in again.stderr and "ensemble" in again.stderr


# ---------------------------------------------------------------- bad input: one line each
def _train_error(cache, dataset, tmp_path, *extra) -> str:
    args = ["train", "--cache", cache, "--data", dataset, "--student", "cnn_tiny", "--out", tmp_path / "run",
            *extra]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.stdout == ""
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was written
    return lines[0]


def test_train_ensemble_unknown_member_is_one_line(top3_softmax, dataset, tmp_path):
    line = _train_error(top3_softmax, dataset, tmp_path, "--ensemble", "toy_a,nope")
    assert "unknown member 'nope'" in line and "toy_a, toy_b, toy_c" in line


def test_train_ensemble_on_cache_without_members_is_one_line(dumper, dataset, tmp_path):
    cache = dumper(epochs=1, members=False)
    assert "stores no members" in _train_error(cache, dataset, tmp_path, "--ensemble", "toy_a")


def test_train_ensemble_weights_count_mismatch_is_one_line(top3_softmax, dataset, tmp_path):
    line = _train_error(top3_softmax, dataset, tmp_path, "--ensemble", "toy_a,toy_b", "--ensemble-weights", "1,2,3")
    assert "--ensemble-weights 1.0, 2.0, 3.0: 3 ensemble weights for 2 members" in line


@pytest.mark.parametrize("weights", ["-1,2", "nan,1", "0,0", "a,1"])
def test_train_ensemble_negative_or_nan_weights_are_one_line(top3_softmax, dataset, tmp_path, weights):
    line = _train_error(top3_softmax, dataset, tmp_path, "--ensemble", "toy_a,toy_b", "--ensemble-weights", weights)
    assert "--ensemble-weights" in line and "must be at least 0" in line


def test_train_ensemble_weights_given_both_ways_is_one_line(top3_softmax, dataset, tmp_path):
    line = _train_error(top3_softmax, dataset, tmp_path, "--ensemble", "toy_a,toy_b", "--ensemble-weights", "1,2",
                        "--ensemble-weight", 1, "--ensemble-weight", 2)
    assert "--ensemble-weights and --ensemble-weight: give the weights one way" in line


def test_train_ensemble_with_member_is_one_line(top3_softmax, dataset, tmp_path):
    line = _train_error(top3_softmax, dataset, tmp_path, "--ensemble", "toy_a,toy_b", "--member", "toy_a")
    assert "--member toy_a and --ensemble toy_a,toy_b: choose one" in line


def test_train_ensemble_member_named_twice_is_one_line(top3_softmax, dataset, tmp_path):
    assert "'toy_a' is named twice" in _train_error(top3_softmax, dataset, tmp_path, "--ensemble", "toy_a,toy_a")


def test_train_ensemble_on_sampled_cache_is_one_line(dumper, dataset, tmp_path):
    cache = dumper(teachers=THREE, epochs=1, codec="sampled", sample_n=4)
    line = _train_error(cache, dataset, tmp_path, "--ensemble", "toy_a,toy_b")
    assert "uses codec sampled" in line and "topk or compact" in line


def test_train_recompose_options_without_ensemble_are_one_line(top3_softmax, dataset, tmp_path):
    line = _train_error(top3_softmax, dataset, tmp_path, "--aggregation", "mean_logit")
    assert "--aggregation: applies with --ensemble only" in line
    line = _train_error(top3_softmax, dataset, tmp_path, "--ensemble-weights", "1,2")
    assert "--ensemble-weights: applies with --ensemble only" in line


def test_train_zscore_on_cache_without_stats_is_one_line(dumper, dataset, tmp_path):
    old = _as_older_cache(dumper(epochs=1, chunk_rows=8), tmp_path / "old.zarr", unfinished=False)
    line = _train_error(old, dataset, tmp_path, "--ensemble", "toy_a,toy_b",
                        "--aggregation", "mean_logit_zscore")
    assert "stores no per-teacher logit statistics" in line


def test_zscore_of_a_member_with_constant_logits_is_one_line(top3_softmax, monkeypatch):
    with logitcache.open_cache(top3_softmax) as c:
        real = recompose.member_stats(c)
        constant = {**real, "toy_b": {**real["toy_b"], "std_within": 0.0}}  # what a constant teacher measures
        monkeypatch.setattr(recompose, "member_stats", lambda cache: constant)
        with pytest.raises(LogitCacheError) as e:
            recompose.composition(c, "toy_a,toy_b", aggregation="mean_prob_zscore")
    assert_one_line_error(e, "member 'toy_b' has logit std 0", "cannot be standardised", str(top3_softmax))


def test_fidelity_ensemble_with_other_teacher_count_is_one_line(top3_softmax, dataset):
    result = CliRunner().invoke(main, [str(a) for a in [
        "fidelity", top3_softmax, "--data", dataset, "--teacher", "toy_teachers:toy_a", "--ensemble", "toy_a"]])
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.strip().startswith("error: --ensemble: 1 --teacher given")
    assert "stores 3 members" in result.stderr
