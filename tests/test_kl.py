"""targets.kl_divergence, the one KL that fidelity and compare report, against KL written out."""

import numpy as np
import pytest
import torch

from logitcache.targets import kl_divergence

Z = np.array([[2.0, -1.0, 0.5, 0.0], [-3.0, 4.0, 1.0, -0.5]])
W = np.array([[0.0, 1.0, -2.0, 0.3], [1.0, 1.0, 1.0, 1.0]])


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def test_softmax_is_the_sum_over_classes_from_logits_or_probabilities():
    p, q = _softmax(Z), _softmax(W)
    want = (p * np.log(p / q)).sum(1)
    z, w = torch.from_numpy(Z), torch.from_numpy(W)
    np.testing.assert_allclose(kl_divergence(z, w, "multiclass").numpy(), want, rtol=1e-12)
    from_p = kl_divergence(torch.from_numpy(p), w, "multiclass", p_probs=True)
    from_q = kl_divergence(z, torch.from_numpy(q), "multiclass", q_probs=True)
    np.testing.assert_allclose(from_p.numpy(), want, rtol=1e-12)
    np.testing.assert_allclose(from_q.numpy(), want, rtol=1e-12)


def test_sigmoid_is_the_mean_bernoulli_kl_over_classes():
    p, q = _sigmoid(Z), _sigmoid(W)
    want = (p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))).mean(1)
    z, w = torch.from_numpy(Z), torch.from_numpy(W)
    np.testing.assert_allclose(kl_divergence(z, w, "multilabel").numpy(), want, rtol=1e-12)
    probs = kl_divergence(torch.from_numpy(p), torch.from_numpy(q), "multilabel", p_probs=True, q_probs=True)
    np.testing.assert_allclose(probs.numpy(), want, rtol=1e-12)
    np.testing.assert_allclose(kl_divergence(z.float(), w.float(), "multilabel").numpy(), want, rtol=1e-5)


def test_a_class_given_no_mass_costs_a_finite_kl_at_the_dtype_floor():
    p = torch.tensor([[0.5, 0.5]])
    q = torch.tensor([[1.0, 0.0]])
    f32 = kl_divergence(p, q, "multiclass", p_probs=True, q_probs=True).item()
    f64 = kl_divergence(p.double(), q.double(), "multiclass", p_probs=True, q_probs=True).item()
    assert f32 == pytest.approx(0.5 * np.log(0.5 / 1.0) + 0.5 * np.log(0.5 / 1e-12), rel=1e-5)
    assert f64 == pytest.approx(0.5 * np.log(0.5) + 0.5 * np.log(0.5 / 1e-300), rel=1e-12)

