"""logitcache.targets.kd_loss (softmax): its one-exp forward and closed-form gradient against a
dense float64 computation written here, at LM vocabulary sizes and in the corners (confident
students whose tail underflows float32, no teacher tail, temperatures)."""

from __future__ import annotations

import math

import pytest
import torch

from logitcache.targets import kd_loss, topk_targets


def dense_reference(z: torch.Tensor, values, indices, stat, T: float) -> torch.Tensor:
    """The definition, in float64, over the dense vocabulary: KL(teacher || student) over the top-k
    plus one tail bucket (teacher tail spread evenly at T != 1), mean over rows, times T^2."""
    z, v, s = z.double(), values.double(), stat.double()
    C, k = z.shape[-1], v.shape[-1]
    logq_all = torch.log_softmax(z / T, -1)
    if T == 1.0:
        logp = v - s[..., None]
    else:
        tail_mass = (1 - torch.exp(v - s[..., None]).sum(-1)).clamp_min(1e-30)
        tail_logit = s + torch.log(tail_mass) - math.log(C - k)
        parts = torch.cat([v / T, (tail_logit / T + math.log(C - k))[..., None]], -1)
        logp = v / T - torch.logsumexp(parts, -1, keepdim=True)
    p = logp.exp()
    p_tail = (1 - p.sum(-1)).clamp_min(0)
    in_k = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, indices.long(), True)
    logq_tail = torch.logsumexp(logq_all.masked_fill(in_k, -math.inf), -1)
    kl = (p * (logp - logq_all.gather(-1, indices.long()))).sum(-1)
    kl = kl + torch.xlogy(p_tail, p_tail) - p_tail * logq_tail
    return kl.mean() * T * T


def rows(P: int, C: int, k: int, seed: int, student_scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(P, C, generator=g) * 3
    values, indices, stat = topk_targets(teacher, k, "multiclass")
    z = torch.randn(P, C, generator=g) * student_scale
    return z, values, indices, stat


def check(z, values, indices, stat, T, rtol=2e-5):
    zq = z.clone().requires_grad_(True)
    loss = kd_loss(zq, values, indices, stat, "multiclass", T)
    loss.backward()
    zr = z.double().clone().requires_grad_(True)
    want = dense_reference(zr, values, indices, stat, T)
    want.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), want.detach(), rtol=rtol, atol=1e-6)
    scale = zr.grad.abs().max()
    torch.testing.assert_close(zq.grad.double(), zr.grad, rtol=0, atol=2e-5 * float(scale))


@pytest.mark.parametrize("T", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("C,k", [(151_936, 32), (262_144, 8), (527, 20)])
def test_softmax_kd_loss_equals_the_dense_definition(C, k, T):
    check(*rows(6 if C > 1000 else 64, C, k, seed=C + k), T)


def test_leading_shape_and_confident_students():
    """[B, L, C] rows; some students so confident that their tail underflows float32's exp (those
    rows take the log-space formula) and one row whose teacher has no tail (k = C is not needed:
    a one-hot teacher top-1)."""
    z, values, indices, stat = rows(8, 4096, 16, seed=1)
    z[0, indices[0, 0]] += 200.0  # tail ~ e^-200 of the row: below float32's exp
    z[1] *= 40.0
    values[2, 0], stat[2] = 50.0, 50.0  # teacher: all mass on its top-1, tail 0
    check(z.reshape(2, 4, 4096), values.reshape(2, 4, 16), indices.reshape(2, 4, 16), stat.reshape(2, 4), 1.0)
    check(z, values, indices, stat, 2.0)
