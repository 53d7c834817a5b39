"""A token cache through every command, as an LM user runs them: dump (.bin and JSONL + tokenizer;
topk, compact, sampled), inspect, verify (then a damaged chunk), fidelity, compare, copy, train
(--eval-data, --ensemble, --member), replay, resume after an interrupted dump, an added teacher and
V = 262,144. Expectations are computed here from the corpus file and the teacher modules
themselves, not from logitcache's own helpers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import toy_lm_teachers
from conftest import assert_one_line_error, flip_byte
from test_cli import assert_error, run
from logitcache import LogitCacheError, open_cache, replay
from logitcache.models import gpt_tiny

V, L, K, N = 50, 8, 5, 149
DOCS = [0, 37, 90]
ARGS = ["--teacher-arg", f"vocab_size={V}", "--teacher-arg", f"context={L}"]
TEACHERS = ["--teacher", "toy_lm_teachers:gpt_a", "--teacher", "toy_lm_teachers:gpt_b"]
SMALL = ["--batch-size", "4", "--workers", "0", "--chunk-rows", "8"]


def write_bin(folder: Path, n: int = N, vocab: int = V, docs=DOCS, dtype: str = "uint16") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    toks = np.random.default_rng(7).integers(0, vocab, n).astype(dtype)
    (folder / "corpus.bin").write_bytes(toks.tobytes())
    (folder / "corpus.json").write_text(json.dumps({"vocab_size": vocab, "dtype": dtype, "documents": docs,
                                                    "block_size": L}))
    return folder / "corpus.bin"


def ok(result) -> str:
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


def teachers() -> dict[str, torch.nn.Module]:
    """The dumped teachers, built here from the model zoo with their own seeds (tests/toy_lm_teachers.py)."""
    return {"gpt_a": gpt_tiny(V, L, dim=16, depth=2, heads=2, seed=1).eval(),
            "gpt_b": gpt_tiny(V, L, dim=8, depth=1, heads=1, seed=2).eval()}


def window_start(cache, sid: str, epoch: int) -> int:
    return int(sid[1:]) * L + int(cache.params(epoch, [sid])["window.offset"][0])


def unmasked(start: int, n: int = N, docs=DOCS) -> np.ndarray:
    """Positions of a window starting at token ``start`` whose next token exists and starts no document."""
    nxt = start + 1 + np.arange(L)
    return (nxt < n) & ~np.isin(nxt, docs)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_bin(tmp_path_factory.mktemp("tp"))


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> Path:
    return write_bin(tmp_path_factory.mktemp("tp_eval"), n=60, docs=[0, 30])


@pytest.fixture(scope="module")
def cache(corpus) -> Path:
    out = corpus.parent / "lm.zarr"
    ok(run("dump", "--data", corpus, *TEACHERS, *ARGS, *SMALL, "--out", out, "--topk", K, "--epochs", 2))
    return out


def test_stored_topk_equals_teachers_rerun_on_the_replayed_window(cache, corpus):
    toks = np.fromfile(corpus, np.uint16).astype(np.int64)
    c, models = open_cache(cache), teachers()
    checked = 0
    for epoch in range(2):
        for sid in c.ids:
            start = window_start(c, sid, epoch)
            window = replay(c, corpus, epoch, sid)
            padded = np.concatenate([toks, np.zeros(2 * L, np.int64)])[start:start + L]  # the padding is id 0
            np.testing.assert_array_equal(window.numpy(), padded)
            keep = unmasked(start)
            with torch.no_grad():
                z = {name: m(window[None])[0][keep] for name, m in models.items()}
            log_mean_p = torch.log(torch.stack([F.softmax(x, -1) for x in z.values()]).mean(0))
            for name, ref in (*z.items(), (None, log_mean_p)):
                got = c.targets(epoch, [sid], member=name)
                values, indices, stat = (np.asarray(a)[0][keep] for a in (got.values, got.indices, got.stat))
                top = torch.topk(ref, K, -1)
                np.testing.assert_array_equal(indices, top.indices.numpy(), err_msg=f"{epoch} {sid} {name}")
                np.testing.assert_allclose(values.astype(np.float32), top.values.numpy(), atol=2e-3, rtol=1e-3)
                np.testing.assert_allclose(stat, torch.logsumexp(ref, -1).numpy(), atol=1e-5)
            checked += int(keep.sum())
    assert checked > 250  # of 304 window positions: padding and document starts are the rest


def test_inspect_counts_tokens(cache):
    info = json.loads(ok(run("inspect", cache, "--json")))
    tok = info["tokens"]
    assert info["modality"] == "tokens" and tok["context"] == L and tok["vocab_size"] == V
    assert tok["tokens"] == 2 * 19 * L and tok["bytes_per_token"] == info["bytes_on_disk"] / (2 * 19 * L)
    assert {t["name"] for t in info["targets_table"]} == {"ensemble", "gpt_a", "gpt_b"}
    text = ok(run("inspect", cache))
    assert "windows of 8 tokens, 304 positions" in text and "a vocabulary of 50" in text and "B/token" in text
    assert "frames" not in text and "audio" not in text


def test_verify_passes_then_names_the_damaged_chunk(cache, tmp_path):
    assert ok(run("verify", cache)).startswith("ok: ")
    copy = tmp_path / "copy.zarr"
    out = json.loads(ok(run("copy", cache, copy, "--json")))
    assert out["verified"] is True
    files = sorted(p.relative_to(cache) for p in cache.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(copy) for p in copy.rglob("*") if p.is_file())
    assert all((cache / f).read_bytes() == (copy / f).read_bytes() for f in files)
    chunk = copy / "ensemble" / "values" / "c" / "1" / "1" / "0" / "0"  # epoch 1, rows 8..15
    flip_byte(chunk, chunk.stat().st_size // 2, mask=0x5A)
    r = run("verify", copy)
    assert r.exit_code == 1
    problems = [ln for ln in r.stdout.splitlines() if ln.startswith("  ")]
    assert problems == ["  - ensemble/values: epoch 1 chunk 1 (rows 8..15): read failed (crc32c checksum mismatch)"]


def test_copy_to_another_backend_is_refused_in_one_line(cache, tmp_path):
    assert_error(run("copy", cache, tmp_path / "x.h5"), "x.h5", "give the copy a .zarr name")


def test_fidelity_is_exact_on_the_dumped_teachers(cache, corpus):
    from logitcache.report import fidelity

    f = fidelity(cache, corpus, ["toy_lm_teachers:gpt_a", "toy_lm_teachers:gpt_b"], samples=5,
                 teacher_args={"vocab_size": V, "context": L})
    assert f["teachers_match"] and f["samples_checked"] == 5 and f["rows_checked"] == f["positions"] <= 5 * L
    assert f["topk_index_agreement"] == 1.0 and f["top1_agreement"] == 1.0 and f["max_abs_logit_error"] < 4e-3


def test_train_loss_falls_and_eval_perplexity_is_finite(cache, corpus, held_out, tmp_path):
    run_dir = tmp_path / "kd"
    last = json.loads(ok(run("train", "--cache", cache, "--data", corpus, "--student", "gpt_tiny", "--out", run_dir,
                             "--epochs", 6, "--batch-size", 8, "--lr", "0.01", "--temperature", 2,
                             "--eval-data", held_out, "--json")))
    log = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == 6 and log[-1]["train_loss"] < log[0]["train_loss"]
    c = open_cache(cache)
    for line in log:  # the unmasked positions of the stored epoch replayed, every window once
        assert line["tokens"] == sum(int(unmasked(window_start(c, s, line["stored_epoch"])).sum()) for s in c.ids)
    assert last["eval_tokens"] == 60 - 1 - 1  # every next token but the second document's start
    assert math.isfinite(last["eval_ppl"]) and last["eval_ppl"] == pytest.approx(math.exp(last["eval_nll"]))
    text = ok(run("compare", run_dir, "--eval-data", held_out, "--samples", 1000))
    assert "cached training windows" in text and "held-out windows" in text and "clips" not in text
    r = json.loads(ok(run("compare", run_dir, "--samples", 1000, "--json")))
    expect = sum(int(unmasked(window_start(c, s, e)).sum()) for e in range(2) for s in c.ids)
    assert r["modality"] == "tokens" and r["views"]["views"] == 38 and r["views"]["positions"] == expect
    assert r["views"]["map_vs_ensemble"] is None and math.isfinite(r["views"]["student_ppl"])


@pytest.mark.parametrize("how", [("--member", "gpt_a"), ("--ensemble", "gpt_a,gpt_b", "--ensemble-weights", "2,1")])
def test_train_from_a_member_or_a_recomposition(cache, corpus, tmp_path, how):
    out = json.loads(ok(run("train", "--cache", cache, "--data", corpus, "--student", "gpt_tiny",
                            "--out", tmp_path / "r", "--epochs", 1, "--batch-size", 8, *how, "--json")))
    assert math.isfinite(out["train_loss"]) and out["samples"] == 19
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert json.dumps(how[1].split(",")[0]) in json.dumps(cfg)


def test_resume_after_an_interrupted_dump(cache, corpus, tmp_path, monkeypatch):
    from logitcache.cache import CacheWriter
    from logitcache.dump import dump

    kw = dict(topk=K, epochs=2, batch_size=4, num_workers=0, chunk_rows=8, progress=False,
              teacher_args={"vocab_size": V, "context": L})
    real_put, puts = CacheWriter.put, []

    def put_then_stop(self, epoch, chunk, block):
        puts.append((epoch, chunk))
        if len(puts) == 4:
            raise KeyboardInterrupt  # the user's Ctrl-C halfway through epoch 1
        real_put(self, epoch, chunk, block)

    monkeypatch.setattr(CacheWriter, "put", put_then_stop)
    out = tmp_path / "cut.zarr"
    with pytest.raises(KeyboardInterrupt):
        dump(corpus, ["toy_lm_teachers:gpt_a", "toy_lm_teachers:gpt_b"], out, **kw)
    monkeypatch.setattr(CacheWriter, "put", real_put)
    assert not open_cache(out).complete
    with pytest.raises(LogitCacheError) as e:
        dump(corpus, ["toy_lm_teachers:gpt_a", "toy_lm_teachers:gpt_b"], out, **kw)
    assert_one_line_error(e, "unfinished dump", "--resume")
    dump(corpus, ["toy_lm_teachers:gpt_a", "toy_lm_teachers:gpt_b"], out, resume=True, **kw)
    a, b = open_cache(out), open_cache(cache)
    assert a.complete
    for epoch in range(2):
        for member in (None, "gpt_a", "gpt_b"):
            x, y = a.read_block(epoch, 0, 19, member=member), b.read_block(epoch, 0, 19, member=member)
            assert set(x) == set(y)
            for k in y:
                np.testing.assert_array_equal(x[k], y[k], err_msg=f"{epoch} {member} {k}")


def test_add_a_teacher_to_a_token_cache(cache, corpus, tmp_path):
    one = tmp_path / "one.zarr"
    ok(run("dump", "--data", corpus, "--teacher", "toy_lm_teachers:gpt_a", *ARGS, *SMALL, "--out", one,
           "--topk", K, "--epochs", 2))
    ok(run("dump", "--data", corpus, "--add-teacher", "toy_lm_teachers:gpt_b", *ARGS, "--batch-size", 4,
           "--workers", 0, "--out", one))
    a, b = open_cache(one), open_cache(cache)
    assert a.members == ["gpt_a", "gpt_b"]
    for epoch in range(2):
        x, y = a.targets(epoch, b.ids, member="gpt_b"), b.targets(epoch, b.ids, member="gpt_b")
        np.testing.assert_array_equal(x.indices, y.indices)
        np.testing.assert_array_equal(x.values, y.values)
    assert ok(run("verify", one)).startswith("ok: ")


def _jsonl_corpus(folder: Path) -> tuple[Path, list[int]]:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = "the cat sat on a mat dog ran to big red hat".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]"] + words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tok.json"))
    rng = np.random.default_rng(3)
    lines = [" ".join(rng.choice(words, int(rng.integers(3, 12)))) for _ in range(8)]
    (folder / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    (folder / "corpus.json").write_text(json.dumps({"jsonl": "c.jsonl", "tokenizer": "tok.json", "block_size": L}))
    return folder / "corpus.json", [i for t in lines for i in tok.encode(t).ids]


@pytest.mark.parametrize("codec", [["--codec", "compact", "--value-bits", "6"], ["--codec", "sampled", "--sample-n", "6"]])
def test_jsonl_corpus_through_compact_and_sampled(tmp_path, codec):
    data, ids = _jsonl_corpus(tmp_path)
    vocab = 13
    out = tmp_path / "j.zarr"
    ok(run("dump", "--data", data, "--teacher", "toy_lm_teachers:gpt_b", "--teacher-arg", f"vocab_size={vocab}",
           "--teacher-arg", f"context={L}", *SMALL, "--out", out, "--topk", 4, "--augment", "none", *codec))
    c = open_cache(out)
    assert c.spec.codec == codec[1] and len(c.classes) == vocab
    for sid in c.ids[:3]:
        i = int(sid[1:]) * L
        np.testing.assert_array_equal(replay(c, data, 0, sid).numpy(), (ids + [0] * L)[i:i + L])
    assert ok(run("verify", out)).startswith("ok: ")
    info = json.loads(ok(run("inspect", out, "--json")))
    assert info["tokens"]["tokens"] == len(c.ids) * L
    r = json.loads(ok(run("train", "--cache", out, "--data", data, "--student", "gpt_tiny", "--out", tmp_path / "r",
                          "--batch-size", 4, "--json")))
    assert math.isfinite(r["train_loss"])


def test_vocabulary_of_262144_round_trips_through_the_cli(tmp_path):
    big = 262_144
    data = write_bin(tmp_path / "c", n=25, vocab=big, docs=[0], dtype="uint32")
    out = tmp_path / "big.zarr"
    ok(run("dump", "--data", data, "--teacher", "toy_lm_teachers:synthetic", "--teacher-arg", f"vocab_size={big}",
           "--teacher-arg", f"context={L}", "--workers", 0, "--out", out, "--topk", 8, "--codec", "compact"))
    assert ok(run("verify", out)).startswith("ok: ")
    c, teacher = open_cache(out), toy_lm_teachers.Synthetic(big, L).eval()
    assert len(c.classes) == big
    top = 0
    for sid in c.ids:
        with torch.no_grad():
            z = teacher(replay(c, data, 0, sid)[None])[0]
        keep = unmasked(window_start(c, sid, 0), n=25, docs=[0])
        got = np.asarray(c.targets(0, [sid]).indices)[0][keep]
        np.testing.assert_array_equal(np.sort(got, -1), np.sort(torch.topk(z[keep], 8).indices.numpy(), -1))
        top = max(top, int(got.max()))
    assert top >= 1 << 17  # above Megatron's cap and the 17-bit id mask, stored exactly


def test_plan_sizes_a_token_cache_before_the_dump(cache):
    p = json.loads(ok(run("plan", "--tokens", N, "--context", L, "--classes", V, "--topk", K, "--epochs", 2,
                          "--members", 2, "--chunk-rows", 8, "--json")))
    info = json.loads(ok(run("inspect", cache, "--json")))
    assert p["samples"] == info["samples"] == 19 and p["frames"] == L and p["output_kind"] == "multiclass"
    assert p["tokens"]["positions"] == info["tokens"]["tokens"] == 304
    raw = next(b for b in p["backends"] if b["backend"] == "raw")
    for group in ("ensemble", "members"):  # the raw bytes are exact: same arrays, shapes and dtypes
        assert raw["groups"][group] == sum(a["raw_bytes"] for a in info["arrays"] if a["name"].startswith(group + "/"))
    zarr = p["tokens"]["bytes_per_token"]["zarr"]
    assert 0.5 < zarr / info["tokens"]["bytes_per_token"] < 2  # synthetic rows: about the real size
    text = ok(run("plan", "--tokens", N, "--context", L, "--classes", V, "--topk", K, "--epochs", 1,
                  "--backend", "zarr"))
    assert "19 windows" in text and "x 8 positions" in text and "B/token" in text and "audio" not in text


@pytest.mark.parametrize("args,needles", [
    (["--tokens", "1000", "--context", "8", "--samples", "5"], ["--samples", "does not apply to a token cache"]),
    (["--tokens", "1000", "--context", "8", "--audio-hours", "2"], ["--audio-hours", "does not apply to a token cache"]),
    (["--tokens", "1000"], ["--context: a token cache needs both --tokens", "--context (tokens per window)"]),
    (["--context", "8"], ["--tokens: a token cache needs both"]),
    (["--tokens", "1", "--context", "8"], ["--tokens 1: must be at least 2"]),
    (["--tokens", "1000", "--context", "8", "--augment", "ced_strong"], ["--augment 'ced_strong'", "offset"]),
    ([], ["--samples", "--tokens and --context"]),
])
def test_plan_refusals_for_token_caches(args, needles):
    assert_error(run("plan", "--classes", V, "--topk", K, "--epochs", 1, *args), *needles)
