"""Per-teacher heads (CERBERUS): ``train --heads members`` against a hand-written multi-head
student, the gradient of each head, the heads' prediction, compare's per-head figures, resume,
every codec, and the one-line refusals."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import logitcache
from conftest import C, assert_one_line_error, stream_views, teacher_logits
from logitcache.augment import Augmenter
from logitcache.data import AudioFolder
from logitcache.errors import LogitCacheError
from logitcache.heads import heads_kd_loss, with_heads
from logitcache.metrics import average_precision
from logitcache.report import compare
from logitcache.students import load_student
from logitcache.targets import hard_label_loss, kd_loss
from logitcache.train import build_student, evaluate, make_optimizer, train
from logitcache.views import CacheStream

FRAMES = ["toy_teachers:toy_frames", "toy_teachers:toy_frames_b"]


# ---------------------------------------------------------------- a hand-written CERBERUS student
class HandHeads(torch.nn.Module):
    """The plain student's body, and M separate copies of its classifier ``fc`` as parameters:
    head h = F.linear(features, W_h, b_h). Written without logitcache.heads."""

    def __init__(self, plain: torch.nn.Module, members: int):
        super().__init__()
        self.body = plain
        copies = [(plain.fc.weight.detach().clone(), plain.fc.bias.detach().clone()) for _ in range(members)]
        self.w = torch.nn.ParameterList([torch.nn.Parameter(w) for w, _ in copies])
        self.b = torch.nn.ParameterList([torch.nn.Parameter(b) for _, b in copies])

    def heads(self, wave: torch.Tensor) -> list[torch.Tensor]:
        seen = []
        hook = self.body.fc.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
        try:
            self.body(wave)
        finally:
            hook.remove()
        return [F.linear(seen[0], w, b) for w, b in zip(self.w, self.b)]


def mean_of_probs_as_logits(z: list[torch.Tensor], kind: str) -> torch.Tensor:
    """log(mean softmax) or logit(mean sigmoid) of the heads, by hand."""
    if kind == "multiclass":
        return torch.log(torch.stack([F.softmax(x, -1) for x in z]).mean(0))
    p = torch.stack([torch.sigmoid(x.double()) for x in z]).mean(0)
    return (torch.log(p) - torch.log1p(-p)).float()


def member_targets(cache, epoch: int, order: torch.Tensor, member: str):
    """A member's stored targets for a batch's rows, through the random-access API (not the stream)."""
    t = cache.targets(epoch, [cache.ids[i] for i in order.tolist()], member=member)
    return [torch.from_numpy(np.asarray(a)) for a in (t.values, t.indices.astype(np.int64), t.stat)]


def hand_losses(cache_path, data, kind, temperature, alpha, steps, batch_size=8):
    """The step losses a CERBERUS student takes, written out: same init, same optimiser."""
    cache = logitcache.open_cache(cache_path)
    plain = build_student("cnn_tiny", C, 16000, cache.frames, seed=0)
    model = HandHeads(plain, len(cache.members))
    batches = list(CacheStream(cache_path, data, 0, batch_size))[:steps]
    optimizer, schedule = make_optimizer(model, 1e-3, 1e-4, steps)
    losses = []
    for batch in batches:
        z = model.heads(batch["wave"])
        kd = torch.stack([kd_loss(zh, *member_targets(cache, 0, batch["order"], m), kind, temperature)
                          for zh, m in zip(z, cache.members)]).mean()
        loss = (1 - alpha) * kd
        if alpha:
            loss = loss + alpha * hard_label_loss(mean_of_probs_as_logits(z, kind), batch["labels"], kind)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("kind,teachers,alpha", [("multiclass", None, 0.0), ("multilabel", None, 0.3),
                                                 ("multilabel", FRAMES, 0.0)])
def test_heads_training_takes_the_steps_of_a_hand_written_cerberus(dumper, dataset, tmp_path, kind, teachers,
                                                                    alpha):
    """Loss = mean over heads of kd_loss(head h, member h's stored targets) (+ alpha x the label
    loss of the heads' mean probability): three steps of train equal the hand-written student's,
    so each head is trained by its own member only (a head fed another member's targets, or the
    ensemble's, would take other steps)."""
    cache = dumper(**({"teachers": teachers} if teachers else {}), topk=4, output_kind=kind, epochs=1)
    result = train(cache, dataset, "cnn_tiny", tmp_path / "run", epochs=1, batch_size=8, temperature=2.0,
                   alpha=alpha, heads="members", record_steps=True, progress=False)
    hand = hand_losses(cache, dataset, kind, 2.0, alpha, 3)
    assert len(result["step_losses"]) == 3
    np.testing.assert_allclose(result["step_losses"], hand, rtol=1e-4)
    assert hand[0] != hand[-1]
    # the plain student on the ensemble takes other steps: the heads' loss is not the ensemble's
    plain = train(cache, dataset, "cnn_tiny", tmp_path / "plain", epochs=1, batch_size=8, temperature=2.0,
                  alpha=alpha, record_steps=True, progress=False)
    assert abs(plain["step_losses"][0] - hand[0]) > 1e-3


def test_each_heads_gradient_comes_from_its_own_member_only(dumper, dataset):
    cache_path = dumper(topk=4, epochs=1)
    cache = logitcache.open_cache(cache_path)
    batch = next(iter(CacheStream(cache_path, dataset, 0, 8, members=cache.members)))
    model = with_heads(build_student("cnn_tiny", C, 16000, None, seed=0), "cnn_tiny", cache.members, C,
                       "multiclass", 16000)
    z = model(batch["wave"], all_heads=True)
    heads_kd_loss(z, batch, cache.codec, "multiclass", 2.0).backward()
    grad = model.body.fc.weight.grad.clone()
    M = len(cache.members)
    for h, name in enumerate(cache.members):
        model.zero_grad()
        z = model(batch["wave"], all_heads=True)
        (kd_loss(z[h], *member_targets(cache, 0, batch["order"], name), "multiclass", 2.0) / M).backward()
        alone = model.body.fc.weight.grad
        rows = slice(h * C, (h + 1) * C)
        torch.testing.assert_close(grad[rows], alone[rows], rtol=1e-5, atol=1e-7)
        others = torch.ones(M * C, dtype=torch.bool)
        others[rows] = False
        assert alone[others].abs().max() == 0  # member h moves no other head
    assert grad[:C].abs().max() > 0 and not torch.equal(grad[:C], grad[C:])


def test_stream_delivers_every_members_targets_per_batch(dumper, dataset):
    cache_path = dumper(topk=4, epochs=1)
    cache = logitcache.open_cache(cache_path)
    for batch in CacheStream(cache_path, dataset, 0, 10, members=cache.members):
        assert "values" not in batch  # the ensemble's targets are not read
        for h, name in enumerate(cache.members):
            values, indices, stat = member_targets(cache, 0, batch["order"], name)
            torch.testing.assert_close(batch["members/values"][:, h], values, rtol=0, atol=0)
            assert torch.equal(batch["members/indices"][:, h], indices)
            torch.testing.assert_close(batch["members/stat"][:, h], stat, rtol=0, atol=0)


@pytest.mark.parametrize("codec,extra", [("compact", {}), ("sampled", {"sample_n": 6})])
def test_heads_train_on_every_codec(dumper, dataset, tmp_path, codec, extra):
    """The first step's loss (every head still a copy of the plain classifier) is the mean over
    members of the codec's own loss against that member's decoded rows."""
    cache_path = dumper(topk=4, epochs=1, codec=codec, **extra)
    cache = logitcache.open_cache(cache_path)
    result = train(cache_path, dataset, "cnn_tiny", tmp_path / "run", epochs=1, batch_size=8, heads="members",
                   record_steps=True, progress=False, max_steps=1)
    batch = next(iter(CacheStream(cache_path, dataset, 0, 8)))
    with torch.no_grad():
        z = build_student("cnn_tiny", C, 16000, None, seed=0)(batch["wave"])
    ids = [cache.ids[i] for i in batch["order"].tolist()]

    def decoded(member):
        t = cache.targets(0, ids, member=member)
        if not cache.codec.triple:
            return t
        return tuple(torch.from_numpy(np.asarray(a)) for a in (t.values, t.indices.astype(np.int64), t.stat))

    want = np.mean([float(cache.codec.loss(z, decoded(m), "multiclass", 1.0)) for m in cache.members])
    np.testing.assert_allclose(result["step_losses"], [want], rtol=1e-5)


# ---------------------------------------------------------------- the prediction, the checkpoint
def test_evaluation_uses_the_heads_mean_probability(dumper, dataset, tmp_path):
    cache_path = dumper(topk=4, output_kind="multilabel", epochs=1)
    cache = logitcache.open_cache(cache_path)
    result = train(cache_path, dataset, "cnn_tiny", tmp_path / "run", epochs=1, batch_size=8, heads="members",
                   eval_data=dataset, progress=False)
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["heads"] == cache.members == ["toy_a", "toy_b"]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["heads"] == "members" and config["head_members"] == cache.members
    assert ckpt["config"]["head_members"] == cache.members
    # rebuild by hand: the plain student with the trained fc rows split into heads
    state = ckpt["model"]
    plain = build_student("cnn_tiny", C, 16000, None)
    plain.load_state_dict({k[len("body."):]: v[:C] if k.startswith("body.fc.") else v for k, v in state.items()})
    hand = HandHeads(plain, 2)
    with torch.no_grad():
        for h in range(2):
            hand.w[h].copy_(state["body.fc.weight"][h * C:(h + 1) * C])
            hand.b[h].copy_(state["body.fc.bias"][h * C:(h + 1) * C])
    folder = AudioFolder(dataset)
    aug = Augmenter.from_spec(cache.manifest["augment"])
    x = torch.stack([aug.fit_clip(folder.load(i, aug.sample_rate)) for i in range(len(folder))])
    with torch.no_grad():
        z = hand.eval().heads(x)
    assert not torch.equal(z[0], z[1])  # the heads did part
    p = torch.stack([torch.sigmoid(zh.double()) for zh in z]).mean(0).numpy()
    np.testing.assert_allclose(result["eval_mAP"], np.nanmean(average_precision(p, folder.label_rows(np.arange(len(folder))))), rtol=1e-6)
    # Heads that disagree much (head 1 random and large): evaluate scores the probabilities' mean,
    # which ranks the clips otherwise than the logits' mean would.
    loaded = load_student(tmp_path / "run", "cnn_tiny", C, 16000, None, config, "multilabel")
    far = torch.randn(C, hand.w[1].shape[1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loaded.body.fc.weight[C:] = far
        hand.w[1].copy_(far)
        z = hand.heads(x)
    p = torch.stack([torch.sigmoid(zh.double()) for zh in z]).mean(0).numpy()
    with torch.no_grad():
        np.testing.assert_allclose(torch.sigmoid(loaded(x).double()).numpy(), p, rtol=1e-5, atol=1e-7)
    by_probs = np.nanmean(average_precision(p, folder.label_rows(np.arange(len(folder)))))
    by_logits = np.nanmean(average_precision(((z[0] + z[1]) / 2).numpy(), folder.label_rows(np.arange(len(folder)))))
    assert abs(by_probs - by_logits) > 1e-4  # far above the rtol below
    got = evaluate(loaded, folder, aug, "multilabel", torch.device("cpu"))["mAP"]
    np.testing.assert_allclose(got, by_probs, rtol=1e-6)


def test_multiclass_prediction_is_the_log_of_the_heads_mean_probability():
    torch.manual_seed(0)
    model = with_heads(build_student("cnn_tiny", C, 16000, None, seed=0), "cnn_tiny", ["a", "b", "c"], C,
                       "multiclass", 16000)
    with torch.no_grad():
        model.body.fc.weight.copy_(torch.randn_like(model.body.fc.weight))
        x = 0.1 * torch.randn(4, 16000)
        z = model.eval()(x, all_heads=True)
        assert z.shape == (3, 4, C)
        want = torch.log((F.softmax(z[0], -1) + F.softmax(z[1], -1) + F.softmax(z[2], -1)) / 3)
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(model(x), z.mean(0), atol=1e-3)


def test_resumed_heads_run_ends_as_an_uninterrupted_one(dumper, dataset, tmp_path, monkeypatch):
    import logitcache.train as train_mod

    cache = dumper(topk=4, epochs=1)
    kw = dict(epochs=2, batch_size=8, seed=0, record_steps=True, progress=False, checkpoint_every=2,
              heads="members")
    whole = train(cache, dataset, "cnn_tiny", tmp_path / "whole", **kw)
    real_step, calls = train_mod.distill_step, []

    def dies_at_step_4(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_step(*a, **k)

    monkeypatch.setattr(train_mod, "distill_step", dies_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(cache, dataset, "cnn_tiny", tmp_path / "cut", **kw)
    monkeypatch.setattr(train_mod, "distill_step", real_step)
    resumed = train(cache, dataset, "cnn_tiny", tmp_path / "cut", resume=True, **kw)
    np.testing.assert_array_equal(resumed["step_losses"], whole["step_losses"][3:])
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["model"]
    assert a["body.fc.weight"].shape == (2 * C, 64)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_of_a_heads_run_without_heads_is_refused(dumper, dataset, tmp_path):
    cache = dumper(topk=4, epochs=1)
    train(cache, dataset, "cnn_tiny", tmp_path / "run", epochs=1, batch_size=8, heads="members", progress=False)
    with pytest.raises(LogitCacheError) as e:
        train(cache, dataset, "cnn_tiny", tmp_path / "run", epochs=1, batch_size=8, resume=True, progress=False)
    assert_one_line_error(e, "checkpoint.pt: cannot resume", "heads ('members' there, None now)")


# ---------------------------------------------------------------- compare
def _figures(z: torch.Tensor, p: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(top-1 agreement, KL(p || softmax z)) per row, in float64 numpy."""
    z, p = z.double().numpy(), p.double().numpy()
    logq = z - z.max(-1, keepdims=True)
    logq = logq - np.log(np.exp(logq).sum(-1, keepdims=True))
    kl = (p * (np.log(np.maximum(p, 1e-300)) - logq)).sum(-1)
    return (z.argmax(-1) == p.argmax(-1)).astype(float), kl


def test_compare_reports_each_heads_agreement_with_its_own_teacher(dumper, dataset, tmp_path):
    """Every cached view (samples = all) and the held-out clips with the teachers re-run: each
    head's top-1 agreement and KL against its own member, computed here from replayed views, the
    member's stored rows (k = C: exact) and the teachers' logits."""
    cache_path = dumper()  # k = C, multiclass, float32, 2 epochs
    cache = logitcache.open_cache(cache_path)
    train(cache_path, dataset, "cnn_tiny", tmp_path / "run", epochs=1, batch_size=8, heads="members",
          progress=False)
    r = compare(tmp_path / "run", samples=2 * cache.num_samples, eval_data=dataset,
                                  teachers=["toy_teachers:toy_a", "toy_teachers:toy_b"])
    assert r["heads"] == ["toy_a", "toy_b"] and r["targets"].startswith("members")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    net = load_student(tmp_path / "run", "cnn_tiny", C, 16000, None, config, "multiclass")
    for h, name in enumerate(cache.members):
        agree, kl = [], []
        for epoch in range(2):
            with torch.no_grad():
                z = net(stream_views(cache_path, dataset, epoch), all_heads=True)[h]
            t = cache.targets(epoch, cache.ids, member=name)  # dataset order, as the views
            p = torch.exp(torch.from_numpy(t.values - t.stat[:, None]).double())
            at = torch.from_numpy(t.indices.astype(np.int64))
            p = torch.zeros(len(p), C, dtype=torch.float64).scatter_(-1, at, p)
            a, k = _figures(z, p)
            agree.append(a)
            kl.append(k)
        got = r["views"]["heads"][h]
        assert got["head"] == h and got["member"] == name
        assert got["top1_agreement"] == pytest.approx(np.concatenate(agree).mean(), abs=1e-12)
        assert got["kl_mean"] == pytest.approx(np.concatenate(kl).mean(), rel=1e-5)
        # held out: against the re-run teacher, un-augmented clips
        folder = AudioFolder(dataset)
        aug = Augmenter.from_spec(cache.manifest["augment"])
        x = torch.stack([aug.fit_clip(folder.load(i, aug.sample_rate)) for i in range(len(folder))])
        with torch.no_grad():
            z = net(x, all_heads=True)[h]
        teacher = torch.from_numpy(teacher_logits(name, x)).double()
        a, k = _figures(z, torch.softmax(teacher, -1))
        held = r["eval"]["heads"][h]
        assert held["teacher"] == name
        assert held["top1_agreement"] == pytest.approx(a.mean(), abs=1e-12)
        assert held["kl_mean"] == pytest.approx(k.mean(), rel=1e-5)
    assert len({x["kl_mean"] for x in r["views"]["heads"]}) == 2


def test_compare_cli_prints_the_heads_table(dumper, dataset, tmp_path):
    from test_cli import run

    cache = dumper(topk=4, epochs=1)
    result = run("train", "--cache", cache, "--data", dataset, "--student", "cnn_tiny", "--out", tmp_path / "run",
                 "--batch-size", 8, "--heads", "members", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["samples"] == 24
    text = run("compare", tmp_path / "run", "--samples", 8)
    assert text.exit_code == 0, text.output
    assert "targets: members, one head each (toy_a, toy_b)" in text.stdout
    lines = text.stdout.splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.startswith("head of member"))
    assert [ln.split()[0] for ln in lines[at + 2:at + 4]] == ["toy_a", "toy_b"]
    js = json.loads(run("compare", tmp_path / "run", "--samples", 8, "--json").stdout)
    assert [h["member"] for h in js["views"]["heads"]] == ["toy_a", "toy_b"]
    assert all(math.isfinite(h["kl_mean"]) for h in js["views"]["heads"])


# ---------------------------------------------------------------- refusals: one line each
def test_heads_refuse_a_cache_without_members(dumper, dataset, tmp_path):
    cache = dumper(topk=4, epochs=1, members=False)
    with pytest.raises(LogitCacheError) as e:
        train(cache, dataset, "cnn_tiny", tmp_path / "run", heads="members", progress=False)
    assert_one_line_error(e, str(cache), "--heads members", "stores none")
    assert not (tmp_path / "run").exists()


def test_heads_refuse_member_too(dumper, dataset, tmp_path):
    cache = dumper(topk=4, epochs=1)
    with pytest.raises(LogitCacheError) as e:
        train(cache, dataset, "cnn_tiny", tmp_path / "run", heads="members", member="toy_a", progress=False)
    assert_one_line_error(e, "--heads members and --member toy_a")


def test_heads_refuse_an_unknown_value_cli(dumper, dataset, tmp_path):
    from test_cli import assert_error, run

    cache = dumper(topk=4, epochs=1)
    result = run("train", "--cache", cache, "--data", dataset, "--student", "cnn_tiny", "--out", tmp_path / "run",
                 "--heads", "teachers")
    assert_error(result, "--heads 'teachers': unknown (choose ensemble or members)")
    with pytest.raises(LogitCacheError):
        train(cache, dataset, "cnn_tiny", tmp_path / "run", heads="member", progress=False)


class ClassMixer(torch.nn.Module):
    """A student whose classifier output goes through a softmax: its classes are not independent."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.fc = torch.nn.Linear(4, num_classes)

    def forward(self, x):
        h = torch.stack([x.mean(-1), x.std(-1), x.amax(-1), x.amin(-1)], -1)
        return torch.log_softmax(self.fc(h), -1)


def class_mixer(num_classes: int) -> torch.nn.Module:
    return ClassMixer(num_classes)


class NoClassifier(torch.nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(num_classes))

    def forward(self, x):
        return x.mean(-1, keepdim=True) * self.w


def no_classifier(num_classes: int) -> torch.nn.Module:
    return NoClassifier(num_classes)


@pytest.mark.parametrize("factory,needle", [("test_heads:class_mixer", "mix classes"),
                                            ("test_heads:no_classifier", "has none")])
def test_heads_refuse_a_student_they_cannot_split(dumper, dataset, tmp_path, factory, needle):
    cache = dumper(topk=4, epochs=1)
    with pytest.raises(LogitCacheError) as e:
        train(cache, dataset, factory, tmp_path / "run", heads="members", progress=False)
    assert_one_line_error(e, f"student {factory}", needle)
    # the same student trains with one head
    train(cache, dataset, factory, tmp_path / "plain", epochs=1, batch_size=8, max_steps=1, progress=False)


def test_compare_refuses_a_damaged_head_layer(dumper, dataset, tmp_path):
    cache = dumper(topk=4, epochs=1)
    train(cache, dataset, "cnn_tiny", tmp_path / "run", epochs=1, batch_size=8, heads="members", progress=False)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    (tmp_path / "run" / "config.json").write_text(json.dumps({**config, "head_layer": "encoder"}))
    with pytest.raises(LogitCacheError) as e:
        compare(tmp_path / "run", samples=4)
    assert_one_line_error(e, "config.json: 'head_layer' 'encoder' is not the student's classifier")


def test_ddp_heads_equal_one_process_on_the_union_of_rank_batches(dumper, dataset, tmp_path):
    """Two DDP ranks of a heads run (forward with all_heads through DistributedDataParallel) take
    the steps one process takes on the union of their batches."""
    from dist_ranks import context, run_ranks
    from logitcache.distributed import shard_bounds
    from logitcache.train import distill_step

    cache_path = dumper(epochs=2, chunk_rows=4)
    kw = dict(student="dist_ranks:tiny_student", epochs=1, batch_size=8, temperature=2.0, device="cpu",
              heads="members")
    assert run_ranks(context(), 2, "dist_ranks.train_rank", str(cache_path), str(dataset), str(tmp_path / "ddp"),
                     str(tmp_path / "result"), **kw) == {}
    ddp = json.loads((tmp_path / "result.0").read_text())["step_losses"]
    cache = logitcache.open_cache(cache_path)
    model = with_heads(build_student(kw["student"], C, 16000, None, seed=0), kw["student"], cache.members, C,
                       "multiclass", 16000)
    bounds = [shard_bounds(cache.num_samples, cache.chunk_rows, r, 2) for r in range(2)]
    steps = min(len(range(a, z, 4)) for a, z in bounds)
    optimizer, schedule = make_optimizer(model, 1e-3, 1e-4, steps)
    shares = [list(CacheStream(cache_path, dataset, 0, 4, start=a, stop=z, members=cache.members))[:steps]
              for a, z in bounds]
    ref = []
    for parts in zip(*shares):
        batch = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        ref.append(distill_step(model, optimizer, batch, "multiclass", torch.device("cpu"), 2.0,
                                codec=cache.codec, heads=True))
        schedule.step()
    assert len(ddp) == steps == 3
    np.testing.assert_allclose(ddp, ref, rtol=1e-5)
    saved = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)
    assert saved["heads"] == cache.members and saved["model"].keys() == model.state_dict().keys()


def test_heads_refuse_a_recomposed_ensemble_too(dumper, dataset, tmp_path):
    from logitcache.errors import LogitCacheError
    from logitcache.train import train

    with pytest.raises(LogitCacheError) as e:
        train(dumper(), dataset, "cnn_tiny", tmp_path / "run", heads="members", ensemble=["toy_a", "toy_b"],
              epochs=1, progress=False)
    assert str(e.value).startswith("--heads members and --ensemble toy_a,toy_b: choose one") and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()
