"""``demo --lm`` (logitcache.demo_lm): the quick path end to end on stdlib source, ~20 s."""

from __future__ import annotations

import json
import math
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import assert_one_line_error
from logitcache.cache import open_cache
from logitcache.cli.main import main
from logitcache.demo_lm import QUICK_MODULES, TEACHERS, by_id, run_lm_demo, stdlib_texts, train_tokenizer
from logitcache.errors import LogitCacheError
from logitcache.sources import open_source
from logitcache.targets import aggregate, topk_targets
from logitcache.views import replay


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("lm_demo")
    return out, run_lm_demo(out, quick=True, progress=False)


def test_corpus_is_the_stdlib_source_tokenised_by_the_bpe(quick_run):
    from tokenizers import Tokenizer

    out, summary = quick_run
    lib = Path(sysconfig.get_paths()["stdlib"])
    raw = [(lib / f"{name}.py").read_text(encoding="utf-8") for name in QUICK_MODULES]  # all plain modules
    assert stdlib_texts(QUICK_MODULES) == raw
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    V = tok.get_vocab_size()
    assert V == summary["corpus"]["vocab_size"] == 300  # a trained BPE, past the 256 bytes
    train = np.fromfile(out / "data" / "train.bin", dtype=np.uint16)
    expect = np.concatenate([tok.encode(t).ids for t in raw[:-2]])
    np.testing.assert_array_equal(train, expect)
    meta = json.loads((out / "data" / "train.json").read_text())
    assert meta["documents"] == [0, *np.cumsum([len(tok.encode(t).ids) for t in raw[:-3]]).tolist()]
    assert train.max() >= 256 and tok.decode(train[:meta["documents"][1]].tolist()) == raw[0]  # byte-level: exact
    assert summary["corpus"]["held_out"] == list(QUICK_MODULES[-2:])


def test_tokenizer_training_is_deterministic(tmp_path):
    texts = stdlib_texts(QUICK_MODULES[:2])
    train_tokenizer(texts, 300, tmp_path / "a.json")
    train_tokenizer(texts, 300, tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_cache_holds_the_teachers_on_the_replayed_windows(quick_run):
    """The window replay gives is the corpus at the stored offset, and re-running the exported
    teachers on it gives the stored top-k ids at every position (each member and the ensemble)."""
    out, summary = quick_run
    cache, source = open_cache(out / "cache.zarr"), open_source(out / "data" / "train.bin")
    L, k = summary["settings"]["context"], summary["topk"]
    tokens = np.fromfile(out / "data" / "train.bin", dtype=np.uint16).astype(np.int64)
    ids = [cache.ids[0], cache.ids[7], cache.ids[len(cache.ids) // 2]]
    offsets = cache.params(0, ids)["window.offset"]
    windows = torch.stack([replay(cache, source, 0, i) for i in ids])
    for w, i, off in zip(windows, ids, offsets):
        start = int(i[1:]) * L + int(off)
        np.testing.assert_array_equal(w.numpy(), tokens[start:start + L])
    teachers = [torch.export.load(str(out / "teachers" / f"{n}.pt2")).module() for n in TEACHERS]
    with torch.no_grad():
        z = [t(windows).float() for t in teachers]
    for member, logits in [*zip(TEACHERS, z), (None, aggregate(z, "multiclass", "mean_prob"))]:
        stored = cache.targets(0, ids, member=member)
        fresh = topk_targets(logits, k, "multiclass")
        (sv, si), (fv, fi) = by_id(stored), by_id(fresh)
        np.testing.assert_array_equal(si, fi)  # compact stores the ids as a set
        step = (fv.max(-1) - fv.min(-1)) / 63  # compact's 6-bit grid spans the row's values
        assert (np.abs(sv - fv) <= step[..., None] / 2 + 0.02).all()  # + float16 offset
        np.testing.assert_allclose(stored.stat, fresh[2].numpy(), rtol=1e-2, atol=1e-2)  # float16 stat
    check = summary["replay_check"]
    assert check["topk_equal"] == check["positions"] == 3 * check["windows"] * L


def test_perplexities_are_finite_and_kd_beats_a_uniform_model(quick_run):
    _, summary = quick_run
    assert summary["codec"] == "compact" and open_cache(quick_run[0] / "cache.zarr").manifest["codec"] == "compact"
    V, ppl = summary["corpus"]["vocab_size"], summary["ppl"]
    assert len(ppl) == 5 and all(math.isfinite(p) and p > 1 for p in ppl.values())
    kd = next(p for name, p in ppl.items() if name.endswith("from cache (KD)"))
    assert kd < V  # a uniform model over the vocabulary has perplexity V


def test_cli_lm_with_image_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ["demo", "--lm", "--image", "--quick", "--out", str(tmp_path / "d")])
    assert result.exit_code != 0
    assert result.output.strip() == "error: --lm: cannot be combined with --image; choose one demo"
    assert not (tmp_path / "d").exists()


def test_lm_demo_unknown_setting_is_one_line(tmp_path):
    with pytest.raises(LogitCacheError) as e:
        run_lm_demo(tmp_path, quick=True, progress=False, layers=3)
    assert_one_line_error(e, "run_lm_demo", "layers")


def test_lm_demo_negative_seed_is_one_line(tmp_path):
    with pytest.raises(LogitCacheError) as e:
        run_lm_demo(tmp_path / "d", quick=True, progress=False, seed=-1)
    assert_one_line_error(e, "--seed -1", "0 or more")
    assert not (tmp_path / "d").exists()
