"""logitcache.codecs.sampled: unbiased KD gradients, reproducible draws, fixed shapes, 151,936 classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from logitcache.augment import splitmix64 as np_splitmix64
from logitcache.augment import uniforms
from logitcache.codecs import get_codec
from logitcache.codecs import sampled as sc
from logitcache.errors import LogitCacheError
from logitcache.targets import kd_loss, topk_targets

C = 40


def teacher_row(C: int = C, seed: int = 0) -> torch.Tensor:
    """A peaked row with a heavy tail: top-k caches lose a real share of the mass."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(C, generator=g) * 1.5 - 0.05 * torch.arange(C)).float()


def seeds(n: int, start: int = 0) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)


def draw_gradients(teacher, student, n, kind, head=0, T=1.0, draws=4000):
    """Per-draw gradient of sampled.loss w.r.t. the student logits, ``[draws, C]``."""
    arrays = sc.encode(teacher.expand(draws, -1), n, kind, temperature=T, head=head, seeds=seeds(draws))
    s = student.expand(draws, -1).clone().requires_grad_(True)
    (sc.loss(s, sc.decode(arrays), kind, T) * draws).backward()  # the mean over rows: one row's own gradient
    return s.grad


def dense_gradient(teacher, student, kind, T=1.0):
    """The full-vocabulary KD gradient, written out: T (q - p) softmax; T (sigmoid - p) / C sigmoid."""
    if kind == "multiclass":
        return T * (F.softmax(student / T, -1) - F.softmax(teacher / T, -1))
    return T * (torch.sigmoid(student / T) - torch.sigmoid(teacher / T)) / teacher.shape[-1]


def assert_unbiased(g, ref):
    """Within 5 standard errors per class, plus float16 head rounding (head classes have se = 0)."""
    mean, se = g.mean(0), g.std(0) / g.shape[0] ** 0.5
    z = ((mean - ref).abs() - 5e-4).clamp_min(0) / (se + 1e-12)
    assert z.max() < 5, f"largest error {z.max():.1f} standard errors"
    return (mean - ref).norm()


# ---------------------------------------------------------------- (a), (d) unbiasedness
@pytest.mark.parametrize("head", [0, 3])
def test_multiclass_gradient_is_unbiased_and_topk_is_not(head):
    t, s = teacher_row(), teacher_row(seed=1) * 0.5
    ref = dense_gradient(t, s, "multiclass")
    err = assert_unbiased(draw_gradients(t, s, 6, "multiclass", head=head), ref)
    # a naive top-k cache renormalises over its k classes; logitcache's topk keeps a tail bucket
    k = 6
    v, i, stat = topk_targets(t[None], k, "multiclass")
    renorm = torch.zeros(C).scatter_(0, i[0], F.softmax(v[0], -1))
    bias_renorm = (F.softmax(s, -1) - renorm - ref).norm()
    s1 = s[None].clone().requires_grad_(True)
    kd_loss(s1, v, i, stat, "multiclass").backward()
    bias_bucket = (s1.grad[0] - ref).norm()
    assert bias_renorm > 10 * err and bias_bucket > 10 * err


def test_multilabel_gradient_is_unbiased_with_and_without_head():
    t, s = teacher_row() - 2.0, teacher_row(seed=1) * 0.5 - 1.0
    ref = dense_gradient(t, s, "multilabel")
    for head in (0, 4):
        assert_unbiased(draw_gradients(t, s, 8, "multilabel", head=head), ref)


def test_loss_value_estimates_the_dense_kl():
    t, s, draws = teacher_row(), teacher_row(seed=1) * 0.5, 4000
    arrays = sc.encode(t.expand(draws, -1), 6, "multiclass", seeds=seeds(draws))
    decoded = sc.decode(arrays)
    per_draw = torch.stack([sc.loss(s[None], {k: v[j:j + 1] for k, v in decoded.items()}, "multiclass")
                            for j in range(0, draws, 8)])
    full = kd_loss(s[None], *topk_targets(t[None], C, "multiclass"), "multiclass")
    assert abs(per_draw.mean() - full) < 5 * per_draw.std() / len(per_draw) ** 0.5


def test_same_temperature_is_unbiased_for_the_tempered_kd_gradient():
    t, s, T = teacher_row(), teacher_row(seed=1) * 0.5, 2.0
    assert_unbiased(draw_gradients(t, s, 6, "multiclass", T=T), dense_gradient(t, s, "multiclass", T))
    # a student at T = 1 against a dump at T_d = 2 targets p at T_d, not p at 1 (module doc)
    g = draw_gradients(t, s, 6, "multiclass", T=2.0)
    arrays = sc.encode(t.expand(2000, -1), 6, "multiclass", temperature=2.0, seeds=seeds(2000))
    s1 = s.expand(2000, -1).clone().requires_grad_(True)
    (sc.loss(s1, sc.decode(arrays), "multiclass", 1.0) * 2000).backward()
    towards_dump_t = F.softmax(s, -1) - F.softmax(t / 2.0, -1)
    assert_unbiased(s1.grad, towards_dump_t)
    assert (s1.grad.mean(0) - dense_gradient(t, s, "multiclass", 1.0)).norm() > 10 * (
        g.mean(0) - dense_gradient(t, s, "multiclass", T)).norm() / T


# ---------------------------------------------------------------- (b) reproducibility
def test_same_seeds_give_identical_arrays_whatever_the_batch():
    z = torch.stack([teacher_row(seed=j) for j in range(6)])
    sd = seeds(6, 100)
    for kind in ("multiclass", "multilabel"):
        a = sc.encode(z, 9, kind, head=2, seeds=sd)
        b = sc.encode(z, 9, kind, head=2, seeds=sd)
        perm = [4, 0, 5, 2, 1, 3]
        c = sc.encode(z[perm], 9, kind, head=2, seeds=sd[perm])
        one = sc.encode(z[3], 9, kind, head=2, seeds=sd[3])
        other = sc.encode(z, 9, kind, head=2, seeds=seeds(6, 200))
        for name in a:
            assert torch.equal(a[name], b[name]) and torch.equal(a[name][perm], c[name])
            assert torch.equal(a[name][3], one[name])
        assert not torch.equal(a["ids"], other["ids"])


def test_row_uniforms_are_the_augment_stream_of_the_salted_seed():
    got = sc.row_uniforms(torch.tensor(seeds(3, 7).view(np.int64)), 5)
    for r, s in enumerate(seeds(3, 7)):
        key = int(np_splitmix64(s ^ np.uint64(sc.SALT)))
        np.testing.assert_array_equal(got[r].numpy(), uniforms(key, 0, 5))


def test_seed_prefix_gives_each_frame_its_own_stream():
    z = teacher_row().expand(2, 3, -1)
    a = sc.encode(z, 12, "multiclass", seeds=seeds(2))
    assert not torch.equal(a["ids"][0, 0], a["ids"][0, 1])
    assert torch.equal(a["ids"], sc.encode(z, 12, "multiclass", seeds=seeds(2))["ids"])


# ---------------------------------------------------------------- (c) shapes, padding, sentinel
@pytest.mark.parametrize("kind", ["multiclass", "multilabel"])
@pytest.mark.parametrize("head", [0, 5])
def test_fixed_shapes_sentinels_and_counts(kind, head):
    z = torch.stack([teacher_row(seed=j) for j in range(5)])
    z[0] = -30.0
    z[0, 7] = 30.0  # one class holds all mass: one id, n draws
    n = 10
    a = sc.encode(z, n, kind, head=head, seeds=seeds(5))
    specs = sc.array_specs(n, C, kind, head)
    assert set(a) == set(specs)
    for name, (dtype, shape) in specs.items():
        assert a[name].dtype == getattr(torch, dtype) and tuple(a[name].shape) == (5, *shape)
    ids, counts = a["ids"].long(), a["counts"].long()
    real = counts > 0
    assert ((ids == C) == ~real).all()  # sentinel exactly where the count is 0
    assert (real[:, :-1] >= real[:, 1:]).all()  # real slots first
    assert ((ids[:, 1:] > ids[:, :-1]) | ~real[:, 1:]).all()  # ascending, distinct
    assert (counts.sum(-1) == n).all()
    if head == 0 and kind == "multiclass":
        assert ids[0, 0] == 7 and counts[0, 0] == n
    if head:
        assert torch.equal(a["head_ids"].long(), torch.topk(z, head, -1).indices)
        in_head = (ids[:, :, None] == a["head_ids"].long()[:, None, :]).any(-1)
        assert not (in_head & real).any()  # the tail never draws a head id
    assert sum(x[0].numel() * x.element_size() for x in a.values()) == sc.row_bytes(n, C, head, kind)


def test_no_tail_mass_gives_only_sentinels():
    a = sc.encode(teacher_row(), 4, "multiclass", head=C, seeds=seeds(1)[0])
    assert (a["ids"].long() == C).all() and (a["counts"] == 0).all() and a["mass"] == 0
    d = sc.decode(a)
    assert torch.allclose(sc.dense(d, C), F.softmax(teacher_row(), -1), atol=2e-3)


def test_id_dtype_holds_the_sentinel():
    assert sc.array_specs(4, 255, "multiclass")["ids"][0] == "uint8"
    assert sc.array_specs(4, 256, "multiclass")["ids"][0] == "uint16"
    assert sc.array_specs(4, 65536, "multiclass")["ids"][0] == "uint32"
    assert sc.array_specs(256, 527, "multiclass")["counts"][0] == "uint16"
    assert sc.row_bytes(12, 527) == 12 * 3 + 4
    assert sc.row_bytes(7, 151_936) == 7 * 5 + 4
    assert sc.row_bytes(8, 527, head=4, kind="multilabel") == 8 * 3 + 4 + 4 + 4 * 4


def test_dense_is_the_empirical_distribution():
    a = sc.encode(teacher_row(), 8, "multiclass", head=2, seeds=seeds(1)[0])
    d = sc.decode({k: v.numpy() for k, v in a.items()})  # numpy arrays decode too
    p = sc.dense(d, C)
    assert abs(float(p.sum()) - 1) < 1e-3
    tail = p.clone()
    tail[a["head_ids"].long()] = 0
    expect = torch.zeros(C).scatter_add_(0, a["ids"].long().clamp_max(C - 1),
                                         a["counts"].float() * a["mass"] / 8)
    assert torch.allclose(tail, expect)


def test_bad_input_is_named():
    z = teacher_row()
    with pytest.raises(LogitCacheError, match="n 0 must be"):
        sc.encode(z, 0, "multiclass")
    with pytest.raises(LogitCacheError, match="head 41 must be"):
        sc.encode(z, 4, "multiclass", head=41)
    with pytest.raises(LogitCacheError, match="kind 'soft'"):
        sc.encode(z, 4, "soft")
    with pytest.raises(LogitCacheError, match="NaN teacher logits"):
        sc.encode(torch.full((2, C), float("nan")), 4, "multiclass")
    with pytest.raises(LogitCacheError, match=r"seeds of shape \(3,\)"):
        sc.encode(z.expand(2, -1), 4, "multiclass", seeds=seeds(3))
    with pytest.raises(LogitCacheError, match="torch.Generator"):
        sc.encode(z, 4, "multiclass", seeds=torch.Generator())
    with pytest.raises(LogitCacheError, match="temperature 0"):
        sc.encode(z, 4, "multiclass", temperature=0)
    with pytest.raises(LogitCacheError, match="missing array"):
        sc.decode({"ids": np.zeros((1, 4), np.uint8)})


# ---------------------------------------------------------------- (e) 151,936 classes
def test_151936_classes_in_blocks(monkeypatch):
    big = 151_936
    g = torch.Generator().manual_seed(3)
    z = torch.randn(3, big, generator=g) * 3
    a = sc.encode(z, 16, "multiclass", head=4, seeds=seeds(3))
    # one row per block: the same arrays, so no block ever needs more than its own rows
    monkeypatch.setattr(sc, "BLOCK_VALUES", big)
    b = sc.encode(z, 16, "multiclass", head=4, seeds=seeds(3))
    for name in a:
        assert torch.equal(a[name], b[name])
    assert a["ids"].dtype == torch.uint32 and (a["counts"].long().sum(-1) == 16).all()
    s = torch.zeros(3, big, requires_grad=True)
    value = sc.loss(s, sc.decode(a), "multiclass")
    value.backward()
    assert torch.isfinite(value) and abs(float(s.grad.sum())) < 1e-5  # sum(q - w) = 0
    assert abs(float(a["entropy"][0]) - float(-(F.softmax(z[0].double(), -1) * F.log_softmax(
        z[0].double(), -1)).sum())) < 1e-4


def test_check_accepts_encoded_rows_and_names_corruption():
    z = torch.stack([teacher_row(seed=j) for j in range(4)])
    for kind in ("multiclass", "multilabel"):
        a = {k: v.numpy() for k, v in sc.encode(z, 9, kind, head=2, seeds=seeds(4)).items()}
        sc.check(a, C, kind)
        cases = [("counts", lambda x: x["counts"].__setitem__((2, 0), x["counts"][2, 0] + 1), "do not sum"),
                 ("ids", lambda x: x["ids"].__setitem__((1, -1), 3), "sentinel with a count"),
                 ("ids", lambda x: x["ids"].__setitem__((3, 0), C + 1), r"id >= 40"),
                 ("entropy", lambda x: x["entropy"].__setitem__(0, np.nan), "finite number"),
                 ("mass", lambda x: x["mass"].__setitem__(2, -1.0), "finite mass"),
                 ("head_ids", lambda x: x["head_ids"].__setitem__((1, 1), x["head_ids"][1, 0]), "repeated")]
        for name, spoil, msg in cases:
            b = {k: v.copy() for k, v in a.items()}
            spoil(b)
            with pytest.raises(LogitCacheError, match=f"{name} of row .*{msg}"):
                sc.check(b, C, kind)


def test_elias_fano_draws_round_trip_ids_and_counts_exactly():
    """The stored form of new sampled caches: the n draws as an Elias-Fano coded sorted multiset;
    ids, counts (and rows that drew nothing) come back exactly, in fewer bytes."""
    C, n = 151_936, 12
    ids = np.full((3, n), C, np.int64)
    counts = np.zeros((3, n), np.int64)
    ids[0, :3], counts[0, :3] = [5, 70_000, C - 1], [10, 1, 1]  # repeats, the last class
    ids[1, :n], counts[1, :n] = np.arange(n) * 1000, 1  # all distinct
    # row 2 drew nothing (no tail mass): all sentinel, all 0
    draws = sc.draws_from_ids(ids, counts, C)
    np.testing.assert_array_equal(draws[0], [5] * 10 + [70_000, C - 1])
    assert (draws[2] == C).all()
    back_ids, back_counts = sc.ids_from_draws(draws, C)
    np.testing.assert_array_equal(back_ids, ids)
    np.testing.assert_array_equal(back_counts, counts)
    codec = get_codec("sampled")(1, C, "multiclass", None, sc.codec_options(n))
    assert codec.options["draws"] == "elias_fano" and set(codec.fields()) == {"draws", "entropy"}
    assert codec.row_bytes() == 24 + 4 < 37  # uint32 ids + uint8 counts: 5 n + 4 = 64 B
    host = {"ids": ids.astype(np.uint32), "counts": counts.astype(np.uint8), "entropy": np.ones(3, np.float32)}
    stored = codec.pack(host)
    got = codec.decode(stored)
    np.testing.assert_array_equal(got["ids"], ids)
    np.testing.assert_array_equal(got["counts"], counts)
    bad = dict(stored, draws=np.full_like(stored["draws"], 0xFF))
    assert [f for f, _ in codec.check(bad)] == ["draws"]


def test_sampled_caches_from_before_the_draws_option_keep_their_arrays():
    codec = get_codec("sampled")(1, 527, "multiclass", None, {"n": 12, "head": 0, "temperature": 1.0})
    assert set(codec.fields()) == {"ids", "counts", "entropy"} and codec.row_bytes() == 3 * 12 + 4


def test_an_unknown_draws_storage_is_one_error():
    with pytest.raises(LogitCacheError) as e:
        get_codec("sampled")(1, 527, "multiclass", None, {"n": 12, "draws": "zip"})
    assert str(e.value) == ("codec option 'draws' is 'zip', not 'elias_fano' or 'ids_counts' (edited or damaged "
                            "manifest)")
