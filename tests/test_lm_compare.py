"""compare and per-teacher heads (``train --heads members``) on token caches: per-token figures
over unmasked positions, checked against sums written here from the cache, the replayed windows
and the trained student."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from logitcache import open_cache
from logitcache.augment import Augmenter
from logitcache.dump import dump
from logitcache.report import compare
from logitcache.sources import open_source
from logitcache.students import load_student
from logitcache.targets import teacher_probs
from logitcache.train import distill_step, train
from logitcache.views import CacheStream, ViewSource
from test_tokens import ARGS, K, L, TEACHERS, V, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("lmcmp"))


@pytest.fixture(scope="module")
def lm_cache(corpus):
    return dump(corpus, TEACHERS, corpus.parent / "lm.zarr", topk=K, teacher_args=ARGS, batch_size=4,
                num_workers=0, progress=False)


def _by_hand(cache, corpus, run, member=None, head=None):
    """(positions, top-1 agreement, mean KL, student NLL) over every unmasked position of epoch 0,
    written with teacher_probs and plain torch, from the run's checkpoint."""
    import json

    c, src = open_cache(cache), open_source(corpus)
    config = json.loads((run / "config.json").read_text())
    net = load_student(run, config["student"], V, None, L, config, "multiclass")
    views = ViewSource(src, Augmenter.from_spec(c.manifest["augment"]))
    agree, kl, nll = [], [], []
    for sid in c.ids:
        params = {k: v[0] for k, v in c.params(0, [sid]).items()}
        ids, nxt, mask = views.replay_tokens(c.ids.index(sid), params)
        with torch.no_grad():
            z = net(ids[None], all_heads=True)[head][0] if head is not None else net(ids[None])[0]
        t = c.targets(0, [sid], member=member)
        p = teacher_probs(*(torch.from_numpy(np.asarray(a)[0]).float() for a in (t.values, t.indices, t.stat)),
                          V, "multiclass").double()[mask]
        ls = F.log_softmax(z.double(), -1)[mask]
        kl.append((p * (p.clamp_min(1e-300).log() - ls)).sum(-1))
        agree.append((ls.argmax(-1) == p.argmax(-1)).double())
        nll.append(-ls.gather(-1, nxt[mask][:, None]).squeeze(-1))
    return (sum(len(x) for x in kl), float(torch.cat(agree).mean()), float(torch.cat(kl).mean()),
            float(torch.cat(nll).mean()))


def test_compare_token_run_over_unmasked_positions(lm_cache, corpus, tmp_path):
    m = train(lm_cache, corpus, "gpt_tiny", tmp_path / "run", batch_size=8, max_steps=3, lr=3e-3,
              eval_data=corpus, progress=False)
    r = compare(tmp_path / "run", samples=1000, batch_size=5, eval_data=corpus, teachers=TEACHERS,
                teacher_args=ARGS)
    v, e = r["views"], r["eval"]
    assert r["modality"] == "tokens" and v["views"] == 19 and v["epochs"] == [0]
    positions, agree, kl, nll = _by_hand(lm_cache, corpus, tmp_path / "run")
    assert v["positions"] == positions and 140 < positions < 19 * L  # padding and document starts left out
    assert v["top1_agreement"] == pytest.approx(agree, abs=1e-12)
    assert v["kl_mean"] == pytest.approx(kl, rel=1e-5)
    assert v["student_nll"] == pytest.approx(nll, rel=1e-6)
    assert v["student_ppl"] == pytest.approx(np.exp(nll), rel=1e-6)
    assert v["map_vs_ensemble"] is None and 0 <= v["ensemble_vs_labels"] <= 1
    # held out: the same windows train --eval-data scored (offset 0), the same NLL
    assert e["positions"] == m["eval_tokens"] == 146
    assert e["student_nll"] == pytest.approx(m["eval_nll"], rel=1e-5)
    assert e["teachers"] == ["gpt_a", "gpt_b"] and e["kl_mean"] > 0 and 0 <= e["top1_agreement"] <= 1
    assert e["ensemble_nll"] < v["student_nll"] + 5


def test_compare_token_run_against_a_member(lm_cache, corpus, tmp_path):
    train(lm_cache, corpus, "gpt_tiny", tmp_path / "run", batch_size=8, max_steps=1, member="gpt_b", progress=False)
    r = compare(tmp_path / "run", samples=1000)
    _, agree, kl, _ = _by_hand(lm_cache, corpus, tmp_path / "run", member="gpt_b")
    assert r["targets"] == "member gpt_b"
    from click.testing import CliRunner

    from logitcache.cli.main import main

    out = CliRunner().invoke(main, ["compare", str(tmp_path / "run"), "--samples", "4"])
    assert out.exit_code == 0, out.output
    assert "cached training windows" in out.output and "clips" not in out.output and "held-out ppl" in out.output
    assert r["views"]["kl_mean"] == pytest.approx(kl, rel=1e-5)
    assert r["views"]["top1_agreement"] == pytest.approx(agree, abs=1e-12)


def test_heads_members_train_and_compare_on_token_cache(lm_cache, corpus, tmp_path):
    m = train(lm_cache, corpus, "gpt_tiny", tmp_path / "run", batch_size=8, max_steps=2, heads="members",
              alpha=0.25, eval_data=corpus, progress=False)
    assert np.isfinite(m["train_loss"]) and m["eval_tokens"] == 146
    r = compare(tmp_path / "run", samples=1000, eval_data=corpus, teachers=TEACHERS, teacher_args=ARGS)
    assert r["heads"] == ["gpt_a", "gpt_b"]
    rows = r["views"]["heads"]
    for h, name in enumerate(["gpt_a", "gpt_b"]):
        _, agree, kl, _ = _by_hand(lm_cache, corpus, tmp_path / "run", member=name, head=h)
        assert rows[h]["member"] == name
        assert rows[h]["kl_mean"] == pytest.approx(kl, rel=1e-5)
        assert rows[h]["top1_agreement"] == pytest.approx(agree, abs=1e-12)
    assert [x["teacher"] for x in r["eval"]["heads"]] == ["gpt_a", "gpt_b"]


def test_heads_loss_ignores_masked_positions(lm_cache, corpus):
    from logitcache.heads import with_heads
    from logitcache.models import create_model

    c = open_cache(lm_cache)
    batch = next(iter(CacheStream(lm_cache, corpus, 0, batch_size=8, members=c.members)))
    assert not batch["mask"].all() and batch["members/values"].shape == (8, 2, L, K)
    model = with_heads(create_model("gpt_tiny", num_classes=V, frames=L, seed=0), "gpt_tiny", c.members, V,
                       "multiclass", (L,), view_dtype=torch.int64)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)

    def loss(b):
        return distill_step(model, opt, b, "multiclass", torch.device("cpu"), 2.0, codec=c.codec, heads=True)

    before = loss(batch)
    off = ~batch["mask"][:, None, :, None]
    garbage = dict(batch, **{"members/values": batch["members/values"].masked_fill(off, 77.0)})
    assert loss(garbage) == before
    garbage = dict(batch, **{"members/values": batch["members/values"].masked_fill(~off, 77.0)})
    assert loss(garbage) != before


def test_heads_probe_takes_token_ids():
    """The heads split probes the student with token ids below V (a float probe would not run)."""
    from logitcache.heads import with_heads
    from logitcache.models import create_model

    model = with_heads(create_model("gpt_tiny", num_classes=V, frames=L, seed=0), "gpt_tiny", ["a", "b", "c"], V,
                       "multiclass", (L,), view_dtype=torch.int64)
    ids = torch.randint(0, V, (2, L), generator=torch.Generator().manual_seed(1))
    z = model(ids, all_heads=True)
    assert z.shape == (3, 2, L, V)
    plain = create_model("gpt_tiny", num_classes=V, frames=L, seed=0)
    # equal heads: the plain student's distribution (combined as log mean p)
    torch.testing.assert_close(model(ids), F.log_softmax(plain(ids), -1), rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize("codec,extra", [("compact", {}), ("sampled", {"sample_n": 12})])
def test_compare_and_heads_on_every_codec(corpus, tmp_path, codec, extra):
    """compare and --heads members on compact and sampled token caches: the same unmasked positions,
    finite per-token figures, one row per head."""
    cache = dump(corpus, TEACHERS, tmp_path / f"{codec}.zarr", topk=K, codec=codec, teacher_args=ARGS,
                 batch_size=4, num_workers=0, progress=False, **extra)
    train(cache, corpus, "gpt_tiny", tmp_path / "run", batch_size=8, max_steps=2, heads="members",
          temperature=1.0, progress=False)
    v = compare(tmp_path / "run", samples=1000)["views"]
    c = open_cache(cache)
    views = ViewSource(open_source(corpus), Augmenter.from_spec(c.manifest["augment"]))
    masks = [views.replay_tokens(i, {k: v[0] for k, v in c.params(0, [sid]).items()})[2] for i, sid in enumerate(c.ids)]
    assert v["positions"] == int(sum(m.sum() for m in masks)) > 140
    assert np.isfinite(v["kl_mean"]) and v["kl_mean"] > 0 and [h["member"] for h in v["heads"]] == ["gpt_a", "gpt_b"]
    assert all(np.isfinite(h["kl_mean"]) for h in v["heads"])


def test_compare_bounds_the_windows_per_batch():
    """At V = 151,936 and L = 1,024 compare runs one window at a time, whatever --batch-size says."""
    from logitcache.reports.compare_tokens import window_batch

    assert window_batch(32, 1024, 151_936) == 1 and window_batch(32, 8, 50) == 32
    assert window_batch(32, 256, 50_257) == 20


def test_compare_token_run_trained_on_a_recomposition(lm_cache, corpus, tmp_path):
    """A run distilled from a recomposition (train --ensemble) is compared with that recomposition."""
    train(lm_cache, corpus, "gpt_tiny", tmp_path / "run", batch_size=8, max_steps=1, ensemble=["gpt_a", "gpt_b"],
          ensemble_weights=[2, 1], progress=False)
    r = compare(tmp_path / "run", samples=1000)
    plain = _by_hand(lm_cache, corpus, tmp_path / "run")  # the same student against the stored ensemble
    assert r["targets"] == "recomposed gpt_a,gpt_b" and r["views"]["positions"] == plain[0]
    assert np.isfinite(r["views"]["kl_mean"]) and r["views"]["kl_mean"] != pytest.approx(plain[2], rel=1e-6)
