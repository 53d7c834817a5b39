"""Token caches are measured per unmasked token everywhere: fidelity's figures, train's reported
loss, and compare's re-run teachers (streamed one teacher and one block of positions at a time).
Expectations are computed here from the corpus file, the teacher modules and the stored rows,
with plain torch, over exactly the positions whose next token exists and starts no document."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from logitcache import open_cache
from logitcache.dump import dump
from test_cli import assert_error, run
from test_token_pipeline import DOCS, K, L, N, V, teachers, unmasked, window_start, write_bin

NAMES = ["toy_lm_teachers:gpt_a", "toy_lm_teachers:gpt_b"]
ARGS = {"vocab_size": V, "context": L}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_bin(tmp_path_factory.mktemp("pertoken"))


@pytest.fixture(scope="module")
def cache(corpus):
    return dump(corpus, NAMES, corpus.parent / "lm.zarr", topk=K, teacher_args=ARGS, epochs=2, batch_size=4,
                num_workers=0, chunk_rows=8, progress=False)


def _windows(cache, corpus):
    """(epoch, sid, window ids [L], mask [L]) of every stored view, the window cut from the corpus file."""
    toks = np.concatenate([np.fromfile(corpus, np.uint16).astype(np.int64), np.zeros(2 * L, np.int64)])
    c = open_cache(cache)
    for epoch in range(c.epochs):
        for sid in c.ids:
            start = window_start(c, sid, epoch)
            yield epoch, sid, torch.from_numpy(toks[start:start + L]), torch.from_numpy(unmasked(start))


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    return (logp.exp() * (logp - logq)).sum(-1)


def _reconstruction(values, indices, stat) -> torch.Tensor:
    """log q [P, V]: the stored top-k's probabilities, the rest of the mass spread evenly."""
    top = (values.double() - stat.double()[:, None]).exp()
    q = ((1 - top.sum(-1)) / (V - K))[:, None].expand(-1, V).clone()
    return q.scatter_(-1, indices.long(), top).log()


def test_fidelity_figures_are_means_over_unmasked_positions(cache, corpus):
    """Every per-token figure of fidelity (KL, top-1, coverage, least-covered ids, codec rows, the
    members' KL) is a mean over the unmasked positions of the windows checked, never over padding
    or document starts (they were in the means before)."""
    from logitcache.report import fidelity

    f = fidelity(cache, corpus, NAMES, samples=1000, teacher_args=ARGS, ensemble=["gpt_a", "gpt_b"],
                 ensemble_weights=[2, 1])
    c, models = open_cache(cache), teachers()
    kl, top1, covered, fresh_kl, member_kl = [], [], [], [], []
    mass, kept_mass = torch.zeros(V, dtype=torch.float64), torch.zeros(V, dtype=torch.float64)
    for epoch, sid, ids, keep in _windows(cache, corpus):
        with torch.no_grad():
            zm = [m(ids[None])[0][keep].double() for m in models.values()]
        lp = torch.logsumexp(torch.stack([F.log_softmax(z, -1) for z in zm]), 0) - math.log(2)
        t = c.targets(epoch, [sid])
        v, s = (torch.from_numpy(np.asarray(a)[0].astype(np.float64))[keep] for a in (t.values, t.stat))
        i = torch.from_numpy(np.asarray(t.indices)[0].astype(np.int64))[keep]
        kl.append(_kl(lp, _reconstruction(v, i, s)))
        top1.append((i[:, 0] == lp.argmax(-1)).double())
        covered.append((v - s[:, None]).exp().sum(-1))
        p = lp.exp()
        mass += p.sum(0)
        kept_mass += (p * torch.zeros_like(p).scatter_(-1, i, 1.0)).sum(0)
        ft = torch.topk(lp, K, -1)  # the fresh rows' own top-k, as a float32 topk cache stores them
        fresh_kl.append(_kl(lp, _reconstruction(ft.values, ft.indices, torch.logsumexp(lp, -1))))
        member_kl.append(torch.stack([_kl(F.log_softmax(z, -1), lp) for z in zm]))
    positions = sum(len(x) for x in kl)
    assert f["samples_checked"] == 38 and f["positions"] == f["rows_checked"] == positions
    assert 250 < positions < 38 * L and f["recomposed"][0]["rows"] == positions  # padding, document starts left out
    assert f["kl_mean"] == pytest.approx(float(torch.cat(kl).mean()), rel=1e-6)
    assert f["top1_agreement"] == pytest.approx(float(torch.cat(top1).mean()), abs=1e-12)
    at_k = next(x for x in f["per_k"] if x["k"] == K)
    assert at_k["kl_mean"] == pytest.approx(float(torch.cat(kl).mean()), rel=1e-6)
    assert at_k["covered_mass_mean"] == pytest.approx(float(torch.cat(covered).mean()), rel=1e-6)
    coverage = (kept_mass / mass).numpy()
    got = {x["class"]: x["coverage"] for x in f["per_class"]}
    assert [got[name] for name in c.classes] == pytest.approx(coverage.tolist(), rel=1e-6)
    row = next(x for x in f["codec_effect"] if x["codec"] == "topk float32")
    assert row["kl_mean"] == pytest.approx(float(torch.cat(fresh_kl).mean()), rel=1e-6)
    per_member = torch.cat(member_kl, dim=1).mean(1)
    ours = f["disagreement"]["member_vs_ensemble"]
    assert [ours["gpt_a"]["kl_to_ensemble"], ours["gpt_b"]["kl_to_ensemble"]] == pytest.approx(per_member.tolist(),
                                                                                              rel=1e-6)
    text = run("fidelity", cache, "--data", corpus, "--teacher", NAMES[0], "--teacher", NAMES[1], "--samples", 1000,
               "--teacher-arg", f"vocab_size={V}", "--teacher-arg", f"context={L}")
    assert text.exit_code == 0, text.output
    assert f"38 stored windows ({positions} unmasked positions of {38 * L}" in text.stdout


def test_fidelity_of_windows_without_an_unmasked_position_is_one_line(tmp_path):
    """Every token starts a document: no position has a next token to predict, so there is
    nothing to measure; fidelity says so in one line instead of averaging nothing."""
    corpus = write_bin(tmp_path / "d", n=20, docs=list(range(20)))
    out = tmp_path / "c.zarr"
    dump(corpus, NAMES, out, topk=K, teacher_args=ARGS, batch_size=4, num_workers=0, progress=False)
    r = run("fidelity", out, "--data", corpus, "--teacher", NAMES[0], "--teacher", NAMES[1],
            "--teacher-arg", f"vocab_size={V}", "--teacher-arg", f"context={L}")
    assert_error(r, "c.zarr", "3 window(s) checked hold no unmasked position", "--samples")


def test_fidelity_of_a_sampled_token_cache_counts_unmasked_positions(corpus, tmp_path):
    """A codec without a top-k triple (sampled) is measured over the same unmasked positions."""
    from logitcache.report import fidelity

    out = dump(corpus, NAMES, tmp_path / "s.zarr", topk=K, codec="sampled", sample_n=12, teacher_args=ARGS,
               batch_size=4, num_workers=0, progress=False)
    f = fidelity(out, corpus, NAMES, samples=1000, teacher_args=ARGS)
    expect = sum(int(keep.sum()) for *_, keep in _windows(out, corpus))
    assert f["samples_checked"] == 19 and f["positions"] == f["rows_checked"] == expect < 19 * L
    assert f["per_k"] is None and 0 < f["top1_agreement"] <= 1 and math.isfinite(f["kl_mean"])
