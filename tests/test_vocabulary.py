"""A token cache's manifest describes its vocabulary (size + fingerprint, tokenizer hash) instead of
listing V class names; every reader of its classes keeps working, another vocabulary is refused
naming both, and caches that list the names still open (migrated by layout.Manifest)."""

from __future__ import annotations

import json
import shutil

import pytest
import zarr

from conftest import assert_one_line_error
from logitcache import LogitCacheError, open_cache
from logitcache.dump import dump
from logitcache.layout import Manifest, config_digest
from logitcache.report import inspect_cache, verify_cache
from logitcache.sources import open_source
from logitcache.train import train
from logitcache.vocabulary import Vocabulary, fingerprint
from test_tokens import L, V, write_corpus

SYNTH = ["toy_lm_teachers:synthetic"]


def _dump(corpus, out, vocab=V):
    return dump(corpus, SYNTH, out, topk=4, teacher_args={"vocab_size": vocab, "context": L}, num_workers=0,
                progress=False)


def _edit_manifest(path, edit) -> None:
    group = zarr.open_group(str(path), mode="r+")
    group.attrs["logitcache"] = edit(dict(group.attrs["logitcache"]))


def _word_tokenizer(path, words):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0])).save(str(path))
    return path.name


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("vocab"))


@pytest.fixture(scope="module")
def cache(corpus):
    return _dump(corpus, corpus.parent / "v.zarr")


def test_token_manifest_describes_the_vocabulary(cache, corpus, tmp_path):
    c = open_cache(cache)
    m = c.manifest
    assert "classes" not in m and m["vocabulary"] == {"vocab_size": V, "sha256": fingerprint(V)}
    assert isinstance(c.classes, Vocabulary) and len(c.classes) == V
    assert c.classes[7] == "7" and c.classes[-1] == str(V - 1) and list(c.classes)[:3] == ["0", "1", "2"]
    assert c.classes == [str(i) for i in range(V)] and c.classes != [str(i) for i in range(V + 1)]
    assert Manifest.from_json(m).num_classes == V
    assert inspect_cache(cache)["classes"] == V and verify_cache(cache)["ok"]
    assert train(cache, corpus, "gpt_tiny", tmp_path / "run", batch_size=8, max_steps=1, progress=False)["samples"]


def test_manifest_size_at_262144(tmp_path):
    """The manifest of a V = 262,144 token cache: a few KB, where listing the id names took 2.3 MB."""
    vocab = 262_144
    out = _dump(write_corpus(tmp_path / "c", n=25, vocab=vocab, docs=[0], dtype="uint32"), tmp_path / "big.zarr",
                vocab)
    m = open_cache(out).manifest
    size = len(json.dumps(m))
    listed = {k: v for k, v in m.items() if k != "vocabulary"} | {"classes": [str(i) for i in range(vocab)]}
    assert size < 10_000 and len(json.dumps(listed)) > 2_300_000
    assert len(open_cache(out).classes) == vocab


def test_other_vocabulary_size_refused_naming_both(cache, corpus, tmp_path):
    other = write_corpus(tmp_path / "o", vocab=V + 10)  # same token count: the same window ids
    with pytest.raises(LogitCacheError) as e:
        train(cache, other, "gpt_tiny", tmp_path / "run", progress=False)
    assert_one_line_error(e, "vocabulary V=60", f"(V={V} (vocabulary sha256 {fingerprint(V)[:12]}))", str(cache))


def test_other_tokenizer_of_same_size_refused(corpus, tmp_path):
    """A .bin corpus naming its tokenizer: a tokenizer with other tokens (same size) is another vocabulary."""
    words = [f"w{i}" for i in range(V)]
    data = write_corpus(tmp_path / "a")
    meta = json.loads(data.with_suffix(".json").read_text())
    data.with_suffix(".json").write_text(json.dumps({**meta, "tokenizer": _word_tokenizer(tmp_path / "a" / "t.json",
                                                                                          words)}))
    out = _dump(data, tmp_path / "t.zarr")
    vocab = open_cache(out).manifest["vocabulary"]
    assert vocab["sha256"] != fingerprint(V) and len(vocab["tokenizer_sha256"]) == 64
    assert open_source(data).classes == open_cache(out).classes
    _word_tokenizer(tmp_path / "a" / "t.json", words[::-1])  # the same ids, other tokens
    with pytest.raises(LogitCacheError) as e:
        train(out, data, "gpt_tiny", tmp_path / "run", progress=False)
    assert_one_line_error(e, f"vocabulary V={V} (vocabulary sha256 ", "differs from the one cache")


def _as_listed(m: dict) -> dict:
    """A manifest as token caches were written before the vocabulary entry: the V id names listed."""
    old = {k: v for k, v in m.items() if k != "vocabulary"}
    old["classes"] = [str(i) for i in range(m["vocabulary"]["vocab_size"])]
    old["config_digest"] = config_digest(old)
    return old


def test_old_token_cache_listing_names_still_opens(cache, corpus, tmp_path):
    path = tmp_path / "old.zarr"
    shutil.copytree(cache, path)
    _edit_manifest(path, _as_listed)
    c = open_cache(path)
    assert c.manifest["classes"][:2] == ["0", "1"] and "vocabulary" not in c.manifest
    assert c.classes == open_source(corpus).classes  # the source's vocabulary equals the listed id names
    assert Manifest.from_json(c.manifest).vocabulary == {"vocab_size": V, "sha256": fingerprint(V)}
    assert inspect_cache(path)["classes"] == V and verify_cache(path)["ok"]
    assert train(path, corpus, "gpt_tiny", tmp_path / "run", batch_size=8, max_steps=1, progress=False)["samples"]


def test_old_token_cache_with_other_names_refused(cache, tmp_path):
    path = tmp_path / "old.zarr"
    shutil.copytree(cache, path)
    _edit_manifest(path, lambda m: {**_as_listed(m), "classes": [f"t{i}" for i in range(V)]})
    with pytest.raises(LogitCacheError) as e:
        Manifest.from_json(open_cache(path, check_digest=False).manifest)
    assert_one_line_error(e, "manifest entry 'classes' of a token cache is not the 50 token ids")
    from click.testing import CliRunner

    from logitcache.cli.main import main

    out = CliRunner().invoke(main, ["inspect", str(path)])
    assert out.exit_code == 1 and out.stdout == "" and out.stderr.strip().splitlines()[-1] == (
        f'error: {path}: manifest entry \'classes\' of a token cache is not the 50 token ids "0" .. "49" '
        f'(edited or damaged)')


def test_damaged_vocabulary_entry_is_one_line(cache, tmp_path):
    path = tmp_path / "bad.zarr"
    shutil.copytree(cache, path)
    _edit_manifest(path, lambda m: {**m, "vocabulary": {"vocab_size": "50"}})
    with pytest.raises(LogitCacheError) as e:
        open_cache(path)
    assert_one_line_error(e, str(path), "entry 'vocabulary'", "edited or damaged")


def test_resume_compares_an_old_listing_with_a_described_vocabulary(cache):
    """A dump resuming a token cache that lists the id names sees no difference in its vocabulary."""
    from logitcache.cache import config_differences

    m = open_cache(cache).manifest
    assert config_differences(_as_listed(m), m) == []
    other = {**m, "vocabulary": Vocabulary(V + 1).describe()}
    assert config_differences(_as_listed(m), other) == ["vocabulary (a different value in the cache, "
                                                        "a different value now)"]


@pytest.mark.parametrize("named,needle", [(7, "tokenizer must be the name of a local tokenizers file (got 7)"),
                                          ("none.json", "none.json: tokenizer file not found")])
def test_bad_tokenizer_named_by_a_bin_corpus(tmp_path, named, needle):
    data = write_corpus(tmp_path / "b")
    meta = json.loads(data.with_suffix(".json").read_text())
    data.with_suffix(".json").write_text(json.dumps({**meta, "tokenizer": named}))
    with pytest.raises(LogitCacheError) as e:
        open_source(data)
    assert_one_line_error(e, needle)
