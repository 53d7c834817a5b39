"""The token modality end to end: token sources (.bin + JSON, JSONL + tokenizer), windows and their
mask, LM teachers dumped in bounded memory, replay, big vocabularies, training on the mask."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import toy_lm_teachers
from conftest import assert_one_line_error
from logitcache import LogitCacheError, lm, open_cache, replay
from logitcache.augment import Augmenter
from logitcache.dump import dump
from logitcache.sources import open_source
from logitcache.sources.tokens import TokenSource
from logitcache.targets import aggregate, topk_targets
from logitcache.views import CacheStream

V, L, K = 50, 8, 5
DOCS = [0, 37, 90]
ARGS = {"vocab_size": V, "context": L}
TEACHERS = ["toy_lm_teachers:gpt_a", "toy_lm_teachers:gpt_b"]


def write_corpus(folder: Path, n: int = 149, vocab: int = V, docs=DOCS, dtype: str = "uint16", block: int = L) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tokens = np.random.default_rng(0).integers(0, vocab, n).astype(dtype)
    (folder / "corpus.bin").write_bytes(tokens.tobytes())
    (folder / "corpus.json").write_text(json.dumps({"vocab_size": vocab, "dtype": dtype, "documents": docs,
                                                    "block_size": block}))
    return folder / "corpus.bin"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("tokens"))


@pytest.fixture(scope="module")
def lm_cache(corpus) -> Path:
    return dump(corpus, TEACHERS, corpus.parent / "lm.zarr", topk=K, teacher_args=ARGS, batch_size=4,
                num_workers=0, progress=False)


def tokens_of(corpus: Path) -> np.ndarray:
    return np.fromfile(corpus, dtype=np.uint16).astype(np.int64)


def test_bin_source_slots_and_spans(corpus):
    src = open_source(corpus)
    assert src.kind == "tokens" and src.modality == "tokens"
    assert src.ids == [f"w{i}" for i in range(19)]  # ceil(148 targets / 8)
    assert len(src.classes) == V and src.classes[7] == "7"
    x, crc = src.load_with_crc(4)  # span [32, 48): document 1 starts at 37
    np.testing.assert_array_equal(x[0].numpy(), tokens_of(corpus)[32:48])
    np.testing.assert_array_equal(x[1].numpy(), [0] * 5 + [1] * 11)
    assert src.load_with_crc(18)[0].shape == (2, 5)  # the last slot: [144, 149)


def test_window_mask_rule(corpus):
    src = open_source(corpus)
    aug = Augmenter.from_spec({"version": 1, "modality": "tokens", "context": L, "vocab_size": V,
                               "ops": [{"op": "window"}]})
    toks = tokens_of(corpus)
    x, _ = src.load_with_crc(4)
    ids = aug.apply(x, {"window.offset": np.float32(3)})
    np.testing.assert_array_equal(ids.numpy(), toks[35:43])
    nxt, mask = aug.targets(x, {"window.offset": np.float32(3)})
    # position 1 (token 36) predicts token 37, the first of document 1: masked
    assert mask.tolist() == [True, False] + [True] * 6
    np.testing.assert_array_equal(nxt.numpy(), np.where(mask.numpy(), toks[36:44], -1))
    last, _ = src.load_with_crc(18)
    ids = aug.apply(last, {"window.offset": np.float32(2)})  # tokens 146..148 then padding
    np.testing.assert_array_equal(ids.numpy(), list(toks[146:149]) + [0] * 5)
    nxt, mask = aug.targets(last, {"window.offset": np.float32(2)})
    assert mask.tolist() == [True, True] + [False] * 6
    assert nxt.tolist() == list(toks[147:149]) + [-1] * 6


def triple(t):
    return t.values, t.indices, t.stat


def _gpt(name):
    return getattr(toy_lm_teachers, name)(V, L)


def test_stored_topk_equals_teachers_on_replayed_window(lm_cache, corpus):
    c = open_cache(lm_cache)
    assert c.frames == L and len(c.classes) == V and c.output_kind == "multiclass"
    src = open_source(corpus)
    a, b = _gpt("gpt_a"), _gpt("gpt_b")
    for sid in src.ids:
        window = replay(c, src, 0, sid)
        assert window.dtype == torch.int64 and window.shape == (L,)
        with torch.no_grad():
            za, zb = a(window[None])[0], b(window[None])[0]
        for member, z in (("gpt_a", za), ("gpt_b", zb)):
            values, indices, stat = triple(c.targets(0, [sid], member=member))
            tv, ti, ts = topk_targets(z, K, "multiclass")
            np.testing.assert_array_equal(indices[0], ti.numpy())
            np.testing.assert_allclose(values[0].astype(np.float32), tv.numpy(), rtol=1e-3, atol=1e-3)
            np.testing.assert_allclose(stat[0], ts.numpy(), rtol=1e-5, atol=1e-5)
        values, indices, stat = triple(c.targets(0, [sid]))
        tv, ti, ts = topk_targets(aggregate([za, zb], "multiclass"), K, "multiclass")
        np.testing.assert_array_equal(indices[0], ti.numpy())
        np.testing.assert_allclose(stat[0], ts.numpy(), rtol=1e-5, atol=1e-5)


def test_window_offset_stored_on_integer_grid(lm_cache):
    c = open_cache(lm_cache)
    assert c.manifest["param_storage"] == {"window.offset": {"dtype": "uint8", "num": 1, "den": 1}}
    offsets = c.params(0, c.ids)["window.offset"]
    assert offsets.min() >= 0 and offsets.max() <= L - 1 and len(set(offsets.tolist())) > 1
    assert np.array_equal(offsets, np.rint(offsets))


def test_stream_batch_gives_ids_mask_and_next_tokens(lm_cache, corpus):
    toks = tokens_of(corpus)
    c = open_cache(lm_cache)
    batch = next(iter(CacheStream(lm_cache, corpus, 0, batch_size=19)))
    assert batch["tokens"].dtype == torch.int64 and batch["tokens"].shape == (19, L)
    starts = np.array([int(sid[1:]) * L for sid in c.ids])[batch["order"].numpy()]
    starts = starts + c.params(0, [c.ids[i] for i in batch["order"].tolist()])["window.offset"].astype(np.int64)
    for r, a in enumerate(starts):
        target = a + 1 + np.arange(L)
        valid = (target < len(toks)) & ~np.isin(target, DOCS)
        assert batch["mask"][r].tolist() == valid.tolist()
        np.testing.assert_array_equal(batch["labels"][r].numpy(), np.where(valid, toks[np.minimum(target, 148)], -1))
    assert batch["values"].shape == (19, L, K)


def test_masked_positions_cost_nothing(lm_cache, corpus):
    from logitcache.models import create_model
    from logitcache.train import distill_step

    batch = next(iter(CacheStream(lm_cache, corpus, 0, batch_size=8)))
    assert not batch["mask"].all()
    model = create_model("gpt_tiny", num_classes=V, frames=L, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    before = distill_step(model, opt, batch, "multiclass", torch.device("cpu"), 2.0, alpha=0.5)
    garbage = dict(batch)
    off = ~batch["mask"]
    garbage["values"] = batch["values"].masked_fill(off[..., None], 77.0)
    garbage["stat"] = batch["stat"].masked_fill(off, -5.0)
    garbage["indices"] = batch["indices"].masked_fill(off[..., None], 3)
    assert distill_step(model, opt, garbage, "multiclass", torch.device("cpu"), 2.0, alpha=0.5) == before
    garbage["values"] = batch["values"].masked_fill(batch["mask"][..., None], 77.0)
    assert distill_step(model, opt, garbage, "multiclass", torch.device("cpu"), 2.0, alpha=0.5) != before


def test_train_a_token_cache(lm_cache, corpus, tmp_path):
    from logitcache.train import train

    m = train(lm_cache, corpus, "gpt_tiny", tmp_path / "run", batch_size=4, max_steps=2, alpha=0.5,
              temperature=2.0, eval_data=corpus, progress=False)
    assert np.isfinite(m["train_loss"]) and m["eval_tokens"] == 148 - 2  # two document starts masked
    assert np.isfinite(m["eval_ppl"])


def test_jsonl_with_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]"] + words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tok.json"))
    lines = ["the cat sat on the mat", "a dog ran", "the dog sat on a cat the end"]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    (tmp_path / "corpus.json").write_text(json.dumps({"jsonl": "c.jsonl", "tokenizer": "tok.json", "block_size": 4}))
    src = open_source(tmp_path / "corpus.json")
    expect = [tok.encode(t).ids for t in lines]
    np.testing.assert_array_equal(src.tokens, [i for e in expect for i in e])
    assert src.doc_starts.tolist() == [0, 6, 9] and src.vocab_size == 9 and len(src) == 4
    same = TokenSource.from_jsonl(tmp_path / "c.jsonl", tmp_path / "tok.json", 4)
    assert same.fingerprint == src.fingerprint and same.load_with_crc(2)[1] == src.load_with_crc(2)[1]
    out = dump(src, ["toy_lm_teachers:gpt_b"], tmp_path / "j.zarr", topk=3, teacher_args={"vocab_size": 9, "context": 4},
               num_workers=0, progress=False, augment="none")
    window = replay(out, src, 0, "w1")
    np.testing.assert_array_equal(window.numpy(), src.tokens[4:8])
    from logitcache.train import train

    m = train(out, same, "gpt_tiny", tmp_path / "run", batch_size=2, progress=False)  # an open source is data
    assert m["samples"] == 4 and json.loads((tmp_path / "run" / "config.json").read_text())["source"] == "tokens"


@pytest.mark.parametrize("vocab,codec", [(151_936, "topk"), (151_936, "compact"), (262_144, "topk"),
                                         (262_144, "compact"), (151_936, "sampled")])
def test_big_vocabulary_round_trips(tmp_path, vocab, codec):
    data = write_corpus(tmp_path / "c", n=25, vocab=vocab, docs=[0], dtype="uint32")
    opts = {"sample_n": 16} if codec == "sampled" else {}
    out = dump(data, ["toy_lm_teachers:synthetic"], tmp_path / "big.zarr", topk=8, codec=codec,
               teacher_args={"vocab_size": vocab, "context": L}, num_workers=0, progress=False, **opts)
    c = open_cache(out)
    assert len(c.classes) == vocab
    teacher = toy_lm_teachers.synthetic(vocab, L)
    top = 0
    for sid in c.ids:
        with torch.no_grad():
            z = teacher(replay(c, data, 0, sid)[None])[0]
        got = c.targets(0, [sid], member="synthetic")
        if codec == "sampled":
            ids = np.asarray(got["ids"])
            top = max(top, int(ids[ids < vocab].max()))  # the sentinel (= vocab) pads unused slots
            continue
        values, indices, stat = triple(got)
        tv, ti, ts = topk_targets(z, 8, "multiclass")
        np.testing.assert_array_equal(np.sort(indices[0], -1), np.sort(ti.numpy(), -1))
        np.testing.assert_allclose(stat[0], ts.numpy(), rtol=1e-3)
        top = max(top, int(indices.max()))
    assert top >= 131_072  # ids above Megatron's 2^17 cap are kept exactly (no 17-bit wrap)


def test_teachers_disagreeing_on_vocabulary(corpus, tmp_path):
    with pytest.raises(LogitCacheError) as e:
        dump(corpus, ["toy_lm_teachers:gpt_a", "toy_lm_teachers:gpt_v60"], tmp_path / "x.zarr",
             teacher_args={"vocab_size": V, "context": L}, num_workers=0, progress=False)
    assert_one_line_error(e, "vocabulary size", "V=50", "V=60")


def test_teachers_vocabulary_differs_from_corpus(corpus, tmp_path):
    with pytest.raises(LogitCacheError) as e:
        dump(corpus, ["toy_lm_teachers:gpt_a"], tmp_path / "x.zarr", teacher_args={"vocab_size": 64, "context": L},
             num_workers=0, progress=False)
    assert_one_line_error(e, "V=64", "vocab_size 50")


def test_multilabel_refused_for_tokens(corpus, tmp_path):
    with pytest.raises(LogitCacheError) as e:
        dump(corpus, TEACHERS, tmp_path / "x.zarr", output_kind="multilabel", teacher_args=ARGS, progress=False)
    assert_one_line_error(e, "--output-kind multilabel", "multiclass")


def test_token_out_of_vocabulary_refused(tmp_path):
    data = write_corpus(tmp_path, vocab=V)
    meta = json.loads((tmp_path / "corpus.json").read_text())
    (tmp_path / "corpus.json").write_text(json.dumps({**meta, "vocab_size": 20}))
    with pytest.raises(LogitCacheError) as e:
        dump(data, TEACHERS, tmp_path / "x.zarr", teacher_args=ARGS, progress=False)
    assert_one_line_error(e, "corpus.json", "outside the vocabulary (vocab_size 20)")


def test_changed_corpus_refused(lm_cache, corpus, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(corpus.parent, folder, ignore=shutil.ignore_patterns("*.zarr"))
    toks = tokens_of(folder / "corpus.bin")
    toks[20] = (toks[20] + 1) % V  # inside slots w1 and w2's spans
    toks.astype(np.uint16).tofile(folder / "corpus.bin")
    assert replay(lm_cache, folder / "corpus.bin", 0, "w5").shape == (L,)  # an untouched span
    with pytest.raises(LogitCacheError) as e:
        replay(lm_cache, folder / "corpus.bin", 0, "w2")
    assert_one_line_error(e, "tokens [16, 32)", "changed since the dump")


def test_streamed_blocks_do_not_change_rows(corpus, monkeypatch):
    """Blocks of one position or the whole window: the same stored rows (sampled: the same draws)."""
    from logitcache.codecs import get_codec
    from logitcache.teachers import load_teachers, probe_teachers

    teachers = load_teachers(TEACHERS, None, ARGS, torch.device("cpu"))
    x = torch.randint(0, V, (3, L), generator=torch.Generator().manual_seed(1))
    probe_teachers(teachers, (L,), torch.device("cpu"), inputs=lambda n: torch.randint(0, V, (n, L)))
    seeds = np.array([1, 2, 3], np.uint64)
    for name, options in (("topk", {"value_dtype": "float16"}), ("sampled", {"n": 8})):
        codec = get_codec(name)(K, V, "multiclass", L, options)
        runs = []
        for block in (1, 1 << 24):
            monkeypatch.setattr(lm, "BLOCK_VALUES", block)
            runs.append(lm.stream_encode(teachers, x, lambda: ["a"], torch.device("cpu"), "fp32", codec,
                                         "mean_prob", None, True, seeds)[1])
        for f in runs[0]:
            assert torch.equal(runs[0][f], runs[1][f]), f
    monkeypatch.undo()
    assert lm.position_blocks(2, 1024, 151_936) == [(a, min(a + 13, 1024)) for a in range(0, 1024, 13)]


def test_token_cache_inspects_verifies_and_reports_fidelity(lm_cache, corpus):
    from logitcache.report import fidelity, inspect_cache, verify_cache

    info = inspect_cache(lm_cache)
    assert info["classes"] == V and info["frames"] == L
    assert verify_cache(lm_cache)["ok"]
    f = fidelity(lm_cache, corpus, TEACHERS, samples=6, teacher_args=ARGS)
    assert f["teachers_match"] and f["samples_checked"] == 6 and f["rows_checked"] == 6 * L
    assert f["topk_index_agreement"] == 1.0 and f["max_abs_logit_error"] < 0.01  # float16 values


def test_exported_pt2_lm_teacher(corpus, tmp_path):
    """A torch.export program of an LM (int64 ids in) is a teacher like any other."""
    model = toy_lm_teachers.gpt_a(V, L)
    ids = torch.zeros(2, L, dtype=torch.int64)
    program = torch.export.export(model, (ids,), dynamic_shapes=({0: torch.export.Dim("batch", max=1024)},))
    torch.export.save(program, tmp_path / "gpt_a.pt2")
    out = dump(corpus, [str(tmp_path / "gpt_a.pt2")], tmp_path / "pt2.zarr", topk=K, num_workers=0, progress=False)
    c = open_cache(out)
    with torch.no_grad():
        z = model(replay(c, corpus, 0, "w3")[None])[0]
    np.testing.assert_array_equal(c.targets(0, ["w3"]).indices[0], topk_targets(z, K, "multiclass")[1].numpy())


def test_audio_option_refused_for_tokens(corpus, tmp_path):
    with pytest.raises(LogitCacheError) as e:
        dump(corpus, TEACHERS, tmp_path / "x.zarr", sample_rate=16000, teacher_args=ARGS, progress=False)
    assert_one_line_error(e, "--sample-rate", "is tokens")


BAD_CORPORA = {
    "dtype": ({"dtype": "int8"}, "dtype 'int8' must be one of uint16, uint32"),
    "vocab": ({"vocab_size": "50"}, "vocab_size must be a positive whole number"),
    "uint16_too_small": ({"vocab_size": 70_000}, "vocab_size 70000 does not fit dtype uint16"),
    "bin_missing": ({"bin": "nope.bin"}, "nope.bin: token file not found"),
    "documents": ({"documents": [0, 50, 40]}, "documents must be increasing token offsets"),
    "block_size": ({"block_size": 0}, "block_size must be a positive whole number"),
    "tokenizer_missing": ({"jsonl": "c.jsonl", "tokenizer": "none.json"}, "tokenizer file not found"),
}


@pytest.mark.parametrize("case", sorted(BAD_CORPORA))
def test_bad_token_corpus(tmp_path, case):
    write_corpus(tmp_path)
    change, needle = BAD_CORPORA[case]
    meta = json.loads((tmp_path / "corpus.json").read_text())
    (tmp_path / "corpus.json").write_text(json.dumps({**meta, **change}))
    with pytest.raises(LogitCacheError) as e:
        open_source(tmp_path / "corpus.json")
    assert_one_line_error(e, "corpus.json" if case != "bin_missing" else "named by", needle)


def test_bad_token_files(tmp_path):
    write_corpus(tmp_path)
    with open(tmp_path / "corpus.bin", "ab") as f:
        f.write(b"\x00")  # an odd byte count: not whole uint16 tokens
    with pytest.raises(LogitCacheError) as e:
        open_source(tmp_path / "corpus.bin")
    assert_one_line_error(e, "corpus.bin", "is not a whole number of uint16 tokens")
    (tmp_path / "c.jsonl").write_text('{"text": "a"}\nnot json\n')
    (tmp_path / "tok.json").write_text("{}")
    (tmp_path / "j.json").write_text(json.dumps({"jsonl": "c.jsonl", "tokenizer": "tok.json"}))
    with pytest.raises(LogitCacheError) as e:
        open_source(tmp_path / "j.json")
    assert_one_line_error(e, "tok.json", "not a tokenizers file")


def test_jsonl_line_not_json(tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]")).save(str(tmp_path / "tok.json"))
    (tmp_path / "c.jsonl").write_text('{"text": "a"}\nnot json\n')
    (tmp_path / "j.json").write_text(json.dumps({"jsonl": "c.jsonl", "tokenizer": "tok.json"}))
    with pytest.raises(LogitCacheError) as e:
        open_source(tmp_path / "j.json")
    assert_one_line_error(e, "c.jsonl:2", "not JSON")
    (tmp_path / "c.jsonl").write_text('{"body": "a"}\n')
    with pytest.raises(LogitCacheError) as e:
        open_source(tmp_path / "j.json")
    assert_one_line_error(e, "c.jsonl:1", "no text field 'text'")


def test_class_map_refused_for_tokens(corpus, tmp_path):
    with pytest.raises(LogitCacheError) as e:
        dump(corpus, TEACHERS, tmp_path / "x.zarr", class_maps=["m.json", None], teacher_args=ARGS, progress=False)
    assert_one_line_error(e, "--class-map", "LM teachers")


def test_train_a_sampled_token_cache(corpus, tmp_path):
    from logitcache.train import train

    out = dump(corpus, TEACHERS, tmp_path / "s.zarr", codec="sampled", sample_n=12, teacher_args=ARGS,
               num_workers=0, progress=False)
    batch = next(iter(CacheStream(out, corpus, 0, batch_size=19)))
    assert batch["tokens"].shape == (19, L) and batch["ids"].shape == (19, L, 12) and not batch["mask"].all()
    m = train(out, corpus, "gpt_tiny", tmp_path / "run", batch_size=8, max_steps=2, progress=False)
    assert np.isfinite(m["train_loss"])


@pytest.mark.parametrize("codec", ["topk", "sampled"])
def test_add_teacher_to_token_cache_matches_dump(corpus, tmp_path, codec):
    """Added LM members (streamed, one teacher and block of positions at a time) get the rows a dump
    with them from the start stores; sampled: the same draws, from the same seed group."""
    from logitcache import add_teachers

    opts = {"codec": codec, "topk": K, "teacher_args": ARGS, "batch_size": 4, "num_workers": 0, "progress": False,
            **({"sample_n": 12} if codec == "sampled" else {})}
    both = dump(corpus, TEACHERS, tmp_path / "both.zarr", **opts)
    out = dump(corpus, TEACHERS[:1], tmp_path / "one.zarr", **opts)
    add_teachers(out, corpus, TEACHERS[1:], teacher_args=ARGS, batch_size=4, num_workers=0, progress=False)
    added = open_cache(out).read_block(0, 0, 19, member="gpt_b", params=False)
    dumped = open_cache(both).read_block(0, 0, 19, member="gpt_b", params=False)
    assert set(added) == set(dumped) and len(added) >= 4
    for k in dumped:
        np.testing.assert_array_equal(added[k], dumped[k], err_msg=k)


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_fast_window_read_equals_the_rule(tmp_path, dtype):
    """load_with_crc and the one-pass window (what training reads) against the definitions:
    document of each position by search, crc of the ids as <u4 then the documents as <i4, and
    apply + targets, for every slot and offset (document starts on and next to span edges)."""
    import zlib

    docs = [0, 8, 9, 16, 31, 32, 33, 70, 140]
    src = open_source(write_corpus(tmp_path, n=147, docs=docs, dtype=dtype))
    aug = Augmenter.from_spec({"version": 1, "modality": "tokens", "context": L, "vocab_size": V,
                               "ops": [{"op": "window"}]})
    toks = np.fromfile(tmp_path / "corpus.bin", dtype=dtype).astype(np.int64)
    for i in range(len(src)):
        x, crc = src.load_with_crc(i)
        a, b = i * L, min(i * L + 2 * L, len(toks))
        doc = np.searchsorted(docs, np.arange(a, b), side="right") - np.searchsorted(docs, a, side="right")
        np.testing.assert_array_equal(x.numpy(), np.stack([toks[a:b], doc]))
        assert crc == zlib.crc32(doc.astype("<i4").tobytes(), zlib.crc32(toks[a:b].astype("<u4").tobytes()))
        for o in range(L):
            p = {"window.offset": np.float32(o)}
            got, want = aug.window(x, p), (aug.apply(x, p), *aug.targets(x, p))
            for g, w in zip(got, want):
                assert g.dtype == w.dtype and g.shape == w.shape
                np.testing.assert_array_equal(g.numpy(), w.numpy())
