"""The other tools' formats re-encoded by benchmarks/bench_lm_bytes.py: byte counts by hand, and
what they store is a distribution (benchmarks/_lm_formats.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _lm_formats as LF  # noqa: E402

V = 151_936


@pytest.fixture(scope="module")
def teacher():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, V, generator=g) * 2.0
    z[:, 7] = 20.0  # one near-certain next token
    return z


def test_pack_bits_round_trip_and_width():
    ids = np.array([[0, 131_071, 131_072, V - 1]], np.uint64)
    packed = LF.pack_bits(ids, 18)
    assert packed.shape == (1, 9)  # 4 x 18 = 72 bits
    assert (LF.unpack_bits(packed, 4, 18) == ids).all()
    with pytest.raises(ValueError):
        LF.pack_bits(ids, 17)  # 151,935 needs 18 bits


def test_megatron_bytes_and_distribution(teacher):
    rows = LF.megatron(teacher, 128, 18)
    assert rows.row_bytes == 128 * 2 + 128 * 18 // 8 == 544
    assert LF.id_bits(V) == 18 and V > LF.MEGATRON_MAX_VOCAB
    p = LF.dense(rows, V)
    assert torch.allclose(p.sum(-1), torch.ones(4, dtype=torch.float64))
    assert ((p > 0).sum(-1) == 128).all() and (p.argmax(-1) == 7).all()


@pytest.mark.parametrize("cfg, expected", [(LF.DISTILLKIT[0], 344), (LF.DISTILLKIT[1], 127), (LF.DISTILLKIT[2], 428)])
def test_distillkit_bytes_by_hand(teacher, cfg, expected):
    # recommended: 16 bf16 + 6 float32 terms = 56 B, 128 x 18 bits = 288 B: README's ~300 B, 344 at V = 151,936
    # budget: 1 bf16 + 3 terms = 14 B, 50 x 18 bits = 113 B (README: ~114 B at a smaller V)
    # quickstart: 32 float32 + 3 terms = 140 B, + 288 B
    assert LF.distillkit_row_bytes(cfg, V) == expected
    rows = LF.distillkit(teacher, cfg)
    assert rows.row_bytes == expected


@pytest.mark.parametrize("missing", ["zero", "symmetric_uniform"])
def test_distillkit_reconstruction_is_a_distribution(teacher, missing):
    rows = LF.distillkit(teacher, LF.DISTILLKIT[0], missing)
    p = LF.dense(rows, V)
    assert (p >= 0).all() and torch.allclose(p.sum(-1), torch.ones(4, dtype=torch.float64))
    # the exact head is the teacher's, to bfloat16
    lp = torch.log_softmax(teacher.double(), -1).gather(-1, rows.ids[:, :16])
    assert torch.allclose(rows.logp[:, :16].double(), lp, rtol=2**-8, atol=0)
    loss = rows.loss(torch.zeros(4, V, requires_grad=True))
    assert torch.isfinite(loss)


def test_rskd37_bytes_wrap_and_distribution():
    ids = torch.tensor([[5, 131_072 + 5, 140_000] + [V] * 9])
    counts = torch.tensor([[6, 4, 2] + [0] * 9])
    rows = LF.rskd37(ids, counts, 12)
    assert rows.row_bytes == 37  # 12 x (17 + 7) bits = 36 B, + 1 B slot count
    assert rows.ids[0, :3].tolist() == [5, 5, 140_000 - 131_072]  # wrapped, no check
    slots = LF.unpack_bits(rows.packed[:, :36], 12, 24)
    assert (slots[0, :3] & 127).tolist() == [64, 42, 21]  # round(count / 12 x 127)
    assert rows.packed[0, 36] == 3
    p = LF.dense(rows, V)
    assert torch.allclose(p.sum(-1), torch.ones(1, dtype=torch.float64))
    assert p[0, 5] == pytest.approx((64 + 42) / 127)  # token 131,077's mass landed on token 5


# ---------------------------------------------------------------- the tail spread by a prior (codecs.evaluate)
def _rows(V=50, R=3, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(R, V, generator=g, dtype=torch.float64) * 2
    prior = torch.rand(V, generator=g, dtype=torch.float64) + 0.01
    v, i = torch.topk(z, k, -1)
    return z, v, i, torch.logsumexp(z, -1), (prior / prior.sum()).log()


def test_prior_tail_equals_a_dense_computation_by_hand():
    from logitcache.codecs.evaluate import prior_tail_probs

    z, v, i, s, lp = _rows()
    beta = np.array([1.0, 0.5, 2.0])
    q = prior_tail_probs(v.numpy(), i.numpy(), s.numpy(), lp.numpy(), beta)
    for r in range(3):  # row by row, in plain Python sums
        top = {int(c): float(np.exp(v[r, j] - s[r])) for j, c in enumerate(i[r])}
        tail = 1.0 - sum(top.values())
        w = {c: float(np.exp(beta[r] * lp[c])) for c in range(50) if c not in top}
        total = sum(w.values())
        for c in range(50):
            want = top[c] if c in top else tail * w[c] / total
            assert q[r, c].item() == pytest.approx(want, rel=1e-12)
    assert torch.allclose(q.sum(-1), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12)


def test_prior_tail_with_a_uniform_prior_is_the_even_tail():
    from logitcache.codecs.evaluate import prior_tail_probs

    z, v, i, s, _ = _rows()
    q = prior_tail_probs(v.numpy(), i.numpy(), s.numpy(), np.zeros(50))
    top = torch.exp(v - s[:, None])
    even = ((1 - top.sum(-1, keepdim=True)) / 46).expand(3, 50).clone().scatter_(-1, i, top)
    assert torch.allclose(q, even, rtol=1e-13, atol=0)


def test_fit_tail_beta_recovers_the_exponent_of_a_powered_prior():
    from logitcache.codecs.evaluate import fit_tail_beta, prior_tail_probs

    _, _, _, _, lp = _rows(V=200)
    beta = np.array([0.25, 0.75, 1.5, 3.0])
    z = beta[:, None] * lp.numpy()[None]  # each row's tail is exactly prior ** beta
    i = torch.topk(torch.from_numpy(z), 5, -1).indices.numpy()
    fit = fit_tail_beta(z, i, lp.numpy())
    assert np.abs(fit - beta).max() <= 1 / 128  # rounded to the byte's 1/64 grid
    q = prior_tail_probs(np.take_along_axis(z, i, -1), i, np.log(np.exp(z).sum(-1)), lp.numpy(), beta)
    assert torch.allclose(q, torch.softmax(torch.from_numpy(z), -1), rtol=1e-10, atol=0)


def test_mean_probs_does_not_depend_on_the_blocks():
    from logitcache.codecs.evaluate import mean_probs

    z = _rows(R=10)[0].numpy()
    whole = mean_probs([z])
    assert np.allclose(mean_probs([z[:3], z[3:7], z[7:]]), whole, rtol=1e-14, atol=0)
    assert whole[7] == pytest.approx(np.mean(np.exp(z[:, 7]) / np.exp(z).sum(-1)), rel=1e-12)


def test_even_tail_kl_by_k_equals_dense_kl_of_each_top_k():
    import bench_lm_bytes as B
    from logitcache.codecs.evaluate import dense_kl

    z = _rows(V=60, R=4)[0].float()
    kl = B.even_tail_kl_by_k(z, 10)
    for k in (1, 3, 10):
        v, i = torch.topk(z, k, -1)
        want = dense_kl(z.numpy(), v.numpy(), i.numpy(), torch.logsumexp(z, -1).numpy(), "multiclass")
        assert np.allclose(kl[:, k], want, rtol=1e-6, atol=1e-9)


def test_allocate_ids_spends_the_budget_where_kl_drops_most():
    import bench_lm_bytes as B

    kl = np.array([[1.0, 0.2, 0.1, 0.05], [1.0, 0.95, 0.9, 0.85], [0.5, 0.1, 0.05, 0.0]])
    k = B.allocate_ids(kl, 1)  # 3 ids: the drops 0.8 (row 0), 0.4 (row 2), then 0.1 (row 0 again)
    assert k.sum() == 3 and k.tolist() == [2, 0, 1]
