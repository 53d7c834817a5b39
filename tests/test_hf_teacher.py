"""Hugging Face causal LMs from a local folder as teachers (logitcache.teacher_hf): tiny LLaMA and
GPT-2 models built from configs, a token cache dumped with them, the stored top-k against the
models re-run on the replayed windows, and the folders refused with one line."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import assert_one_line_error
from logitcache import LogitCacheError, open_cache, replay
from logitcache.dump import dump
from logitcache.targets import aggregate, topk_targets
from logitcache.teachers import load_teacher, teacher_format
from test_tokens import write_corpus

transformers = pytest.importorskip("transformers")

V, K = 300, 6


def _llama(vocab: int = V):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def _gpt2(vocab: int = V):
    torch.manual_seed(1)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_embd=16, n_layer=2, n_head=2, n_positions=64)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    _llama().save_pretrained(root / "llama", safe_serialization=True)
    _gpt2().save_pretrained(root / "gpt2", safe_serialization=True)
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("hfc"), vocab=V)


def _logits(folder, window):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True).float().eval()
    with torch.no_grad():
        return model(input_ids=window[None]).logits[0]


def test_hf_teachers_dump_and_replay(models, corpus, tmp_path):
    """hf:DIR and a bare folder with config.json are teachers; every stored row is the models' top-k
    on the replayed window."""
    specs = [f"hf:{models / 'llama'}", str(models / "gpt2")]
    assert [teacher_format(s) for s in specs] == ["hf", "hf"]
    out = dump(corpus, specs, tmp_path / "hf.zarr", topk=K, batch_size=4, num_workers=0, progress=False)
    c = open_cache(out)
    assert c.members == ["llama", "gpt2"] and len(c.classes) == V
    assert [t["sha256"] for t in c.manifest["teachers"]] == [load_teacher(s).sha256 for s in specs]
    for sid in c.ids:
        window = replay(c, corpus, 0, sid)
        za, zb = _logits(models / "llama", window), _logits(models / "gpt2", window)
        for member, z in (("llama", za), ("gpt2", zb)):
            t = c.targets(0, [sid], member=member)
            tv, ti, ts = topk_targets(z, K, "multiclass")
            np.testing.assert_array_equal(t.indices[0], ti.numpy())
            np.testing.assert_allclose(t.values[0].astype(np.float32), tv.numpy(), rtol=1e-3, atol=1e-3)
            np.testing.assert_allclose(t.stat[0], ts.numpy(), rtol=1e-5, atol=1e-5)
        t = c.targets(0, [sid])
        np.testing.assert_array_equal(t.indices[0], topk_targets(aggregate([za, zb], "multiclass"), K,
                                                                 "multiclass")[1].numpy())


def test_hf_vocabulary_mismatch_names_both_sizes(corpus, tmp_path):
    _llama(V + 20).save_pretrained(tmp_path / "big", safe_serialization=True)
    with pytest.raises(LogitCacheError) as e:
        dump(corpus, [f"hf:{tmp_path / 'big'}"], tmp_path / "x.zarr", topk=K, num_workers=0, progress=False)
    assert_one_line_error(e, f"V={V + 20}", f"vocab_size {V}")


def test_hf_pickle_weights_refused(tmp_path):
    model = _gpt2()  # a folder as older transformers wrote it (pickle weights; v5 writes safetensors only)
    model.config.save_pretrained(tmp_path / "pickled")
    torch.save(model.state_dict(), tmp_path / "pickled" / "pytorch_model.bin")
    with pytest.raises(LogitCacheError) as e:
        load_teacher(f"hf:{tmp_path / 'pickled'}")
    assert_one_line_error(e, str(tmp_path / "pickled"), "pickle weights only (pytorch_model.bin)",
                          "safe_serialization=True")


def test_hf_remote_code_refused(models, tmp_path):
    import shutil

    shutil.copytree(models / "gpt2", tmp_path / "custom")
    config = json.loads((tmp_path / "custom" / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilLM"}
    (tmp_path / "custom" / "config.json").write_text(json.dumps(config))
    (tmp_path / "custom" / "modeling_evil.py").write_text("raise SystemExit('ran code from a model folder')\n")
    with pytest.raises(LogitCacheError) as e:
        load_teacher(str(tmp_path / "custom"))
    assert_one_line_error(e, "config.json: names custom model code (auto_map)", "trust_remote_code=False")


def test_hf_folder_without_config_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LogitCacheError) as e:
        load_teacher(f"hf:{tmp_path / 'empty'}")
    assert_one_line_error(e, str(tmp_path / "empty"), "not a Hugging Face model folder (no config.json")


def test_hf_folder_without_weights_refused(models, tmp_path):
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_text((models / "gpt2" / "config.json").read_text())
    with pytest.raises(LogitCacheError) as e:
        load_teacher(str(tmp_path / "bare"))
    assert_one_line_error(e, str(tmp_path / "bare"), "no model weights (*.safetensors)")


def test_hf_teacher_takes_no_arguments(models):
    with pytest.raises(LogitCacheError) as e:
        load_teacher(f"hf:{models / 'gpt2'}", kwargs={"seed": 1})
    assert_one_line_error(e, "is a Hugging Face model folder: it takes no arguments (seed)")


def test_transformers_not_imported_on_cli_start():
    code = "import sys, logitcache.cli.main, logitcache.teachers; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_hf_teacher_from_the_cli_dump_and_fidelity(models, corpus, tmp_path):
    from click.testing import CliRunner

    from logitcache.cli.main import main

    spec = f"hf:{models / 'gpt2'}"
    out = CliRunner().invoke(main, ["dump", "--data", str(corpus), "--teacher", spec, "--topk", str(K),
                                    "--out", str(tmp_path / "cli.zarr"), "--workers", "0"])
    assert out.exit_code == 0, out.output
    out = CliRunner().invoke(main, ["fidelity", str(tmp_path / "cli.zarr"), "--data", str(corpus), "--teacher", spec,
                                    "--samples", "3", "--json"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.stdout)
    assert report["teachers_match"] and report["topk_index_agreement"] == 1.0


def test_hf_teacher_without_transformers_is_one_line(models, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers raises ImportError
    with pytest.raises(LogitCacheError) as e:
        load_teacher(f"hf:{models / 'gpt2'}")
    assert_one_line_error(e, "Hugging Face teachers need transformers (not installed)", "logitcache[hf]")
