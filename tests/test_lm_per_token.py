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
from test_token_pipeline import K, L, V, teachers, unmasked, window_start, write_bin

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
    assert 250 < positions < 38 * L  # padding and document starts are left out
    assert f["recomposed"][0]["rows"] == positions
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
    got_members = [ours["gpt_a"]["kl_to_ensemble"], ours["gpt_b"]["kl_to_ensemble"]]
    assert got_members == pytest.approx(per_member.tolist(), rel=1e-6)
    text = run("fidelity", cache, "--data", corpus, "--teacher", NAMES[0], "--teacher", NAMES[1],
               "--samples", 1000, "--teacher-arg", f"vocab_size={V}", "--teacher-arg", f"context={L}")
    assert text.exit_code == 0, text.output
    assert f"38 stored windows ({positions} unmasked positions of {38 * L}" in text.stdout
    from logitcache.html import fidelity_section

    assert f"38 stored windows re-run ({positions} unmasked positions)" in fidelity_section(f)


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


def test_train_loss_of_a_token_run_is_per_unmasked_token(cache, corpus, tmp_path):
    """train_loss is the mean over the epoch's unmasked positions: each batch's loss (a mean over
    its own unmasked positions) weighted by how many it has, not by its window count."""
    from logitcache.train import train

    m = train(cache, corpus, "gpt_tiny", tmp_path / "run", epochs=1, batch_size=8, lr=0.01, record_steps=True,
              progress=False)
    c = open_cache(cache)
    order = c.order(0)
    per_batch = [sum(int(unmasked(window_start(c, c.ids[i], 0)).sum()) for i in order[a:a + 8])
                 for a in range(0, len(order), 8)]
    losses = m["step_losses"]
    assert len(losses) == len(per_batch) == 3 and len(set(per_batch)) > 1
    per_token = sum(x * n for x, n in zip(losses, per_batch)) / sum(per_batch)
    per_window = sum(x * len(order[a:a + 8]) for x, a in zip(losses, range(0, len(order), 8))) / len(order)
    assert m["tokens"] == sum(per_batch)
    assert m["train_loss"] == pytest.approx(per_token, rel=1e-12)
    assert per_token != pytest.approx(per_window, rel=1e-9)  # the old figure: this cache tells them apart


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_the_optimised_loss_pools_a_batch_per_token(cache, corpus, alpha):
    """The loss a step optimises is one mean over every unmasked position of the batch (windows
    with fewer of them weigh less), for the KD term and the next-token term alike."""
    from logitcache.models import create_model
    from logitcache.train import distill_step
    from logitcache.views import CacheStream

    c = open_cache(cache)
    uneven = (b for b in CacheStream(cache, corpus, 0, batch_size=8) if len(set(b["mask"].sum(1).tolist())) > 1)
    batch = next(uneven)  # windows with different numbers of unmasked positions
    model = create_model("gpt_tiny", num_classes=V, frames=L, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    got = distill_step(model, opt, batch, "multiclass", torch.device("cpu"), 1.0, alpha, codec=c.codec)
    with torch.no_grad():
        logq = F.log_softmax(model(batch["tokens"]).double(), -1)
    mask = batch["mask"]
    if alpha == 1.0:
        per_position = -logq.gather(-1, batch["labels"].clamp_min(0)[..., None])[..., 0]
    else:  # KL(stored top-k + tail bucket || student's top-k + tail bucket)
        i = batch["indices"].long()
        logp = batch["values"].double() - batch["stat"].double()[..., None]
        p_tail = (1 - logp.exp().sum(-1)).clamp_min(1e-300)
        q_top = logq.gather(-1, i)
        q_tail = (1 - q_top.exp().sum(-1)).clamp_min(1e-300)
        per_position = (logp.exp() * (logp - q_top)).sum(-1) + p_tail * (p_tail.log() - q_tail.log())
    pooled = float(per_position[mask].mean())
    by_window = float(torch.stack([per_position[w][mask[w]].mean() for w in range(len(mask))]).mean())
    assert got == pytest.approx(pooled, rel=1e-5) and pooled != pytest.approx(by_window, rel=1e-4)


def test_compare_streams_the_rerun_teachers_with_the_same_figures(cache, corpus, tmp_path, monkeypatch):
    """compare --teacher on a token cache runs one teacher at a time and folds its output into the
    ensemble two positions at a time (a tiny block), and every held-out figure, per head too,
    equals the unstreamed computation written here: every teacher's full logits, log mean p."""
    import logitcache.lm as lm
    from logitcache.report import compare
    from logitcache.students import load_student
    from logitcache.train import train

    held_n, held_docs = 60, [0, 30]
    held = write_bin(tmp_path / "held", n=held_n, docs=held_docs)
    run_dir = tmp_path / "run"
    train(cache, corpus, "gpt_tiny", run_dir, batch_size=8, max_steps=2, lr=0.01, heads="members", progress=False)
    calls = []
    real = lm.run_teachers
    monkeypatch.setattr(lm, "run_teachers", lambda ts, *a: calls.append(len(ts)) or real(ts, *a))
    monkeypatch.setattr(lm, "BLOCK_VALUES", 2 * 5 * V)  # two positions of a batch of 5 windows per block
    e = compare(run_dir, samples=1, batch_size=5, eval_data=held, teachers=NAMES, teacher_args=ARGS)["eval"]
    windows = -(-held_n // L)
    assert calls == [1] * (2 * -(-windows // 5))  # each teacher alone, for every batch

    config = json.loads((run_dir / "config.json").read_text())
    net = load_student(run_dir, config["student"], V, None, L, config, "multiclass")
    toks = np.concatenate([np.fromfile(held, np.uint16).astype(np.int64), np.zeros(L, np.int64)])
    ids = torch.from_numpy(np.stack([toks[s * L:(s + 1) * L] for s in range(windows)]))
    keep = torch.from_numpy(np.stack([unmasked(s * L, held_n, held_docs) for s in range(windows)]))
    nxt = torch.from_numpy(np.stack([toks[s * L + 1:(s + 1) * L + 1] for s in range(windows)]))[keep]
    with torch.no_grad():
        zt = [F.log_softmax(m(ids).double(), -1)[keep] for m in teachers().values()]
        zs, zh = net(ids).double()[keep], net(ids, all_heads=True).double()[:, keep]
    lp = torch.logsumexp(torch.stack(zt), 0) - math.log(2)
    ls = F.log_softmax(zs, -1)
    assert e["positions"] == int(keep.sum()) == held_n - 2
    assert e["top1_agreement"] == pytest.approx(float((ls.argmax(-1) == lp.argmax(-1)).double().mean()), abs=1e-12)
    assert e["kl_mean"] == pytest.approx(float(_kl(lp, ls).mean()), rel=1e-5)
    assert e["ensemble_nll"] == pytest.approx(float(-lp.gather(-1, nxt[:, None]).mean()), rel=1e-6)
    assert e["ensemble_vs_labels"] == pytest.approx(float((lp.argmax(-1) == nxt).double().mean()), abs=1e-12)
    for h, (row, t) in enumerate(zip(e["heads"], zt)):
        lh = F.log_softmax(zh[h], -1)
        assert row["teacher"] == ["gpt_a", "gpt_b"][h]
        assert row["kl_mean"] == pytest.approx(float(_kl(t, lh).mean()), rel=1e-5)
        assert row["top1_agreement"] == pytest.approx(float((lh.argmax(-1) == t.argmax(-1)).double().mean()),
                                                      abs=1e-12)


def test_a_resumed_token_epoch_logs_the_same_per_token_loss(cache, corpus, tmp_path, monkeypatch):
    """A token run stopped mid-epoch and resumed logs the epoch's per-token loss and token count
    of the run that never stopped (the checkpoint carries the token-weighted sum)."""
    import logitcache.train as train_mod

    kw = dict(epochs=1, batch_size=8, seed=0, lr=0.01, progress=False, checkpoint_every=1)
    whole = train_mod.train(cache, corpus, "gpt_tiny", tmp_path / "whole", **kw)
    real_step, calls = train_mod.distill_step, []

    def dies_at_step_3(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the checkpoint after batch 2 is the latest
        return real_step(*a, **k)

    monkeypatch.setattr(train_mod, "distill_step", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train_mod.train(cache, corpus, "gpt_tiny", tmp_path / "cut", **kw)
    monkeypatch.setattr(train_mod, "distill_step", real_step)
    cut = train_mod.train(cache, corpus, "gpt_tiny", tmp_path / "cut", resume=True, **kw)
    assert cut["tokens"] == whole["tokens"] and cut["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-6)
