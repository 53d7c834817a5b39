"""A token corpus and a token cache at a real vocabulary size, made without running teachers
(shared by bench_lm_read.py and bench_lm_train.py; not part of the package).

Dumping 1M tokens at V = 151,936 means a top-k over 151,936 logits per token (minutes on 2 CPU
cores), and read or training speed does not depend on where the rows came from. So the cache is
written through the real CacheWriter with the manifest a dump makes (:func:`logitcache.layout.new_manifest`),
the token augmenter's drawn window offsets, the corpus's content crcs, and target rows encoded by
the real codec from next-token teacher rows (:func:`logitcache.codecs.evaluate.lm_teacher_rows`: a
pool, each row taken made unique, see :func:`fresh_rows`). Readers then open and check it like any dump.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


def make_corpus(root: Path, tokens: int, vocab: int, block_size: int, doc_tokens: int = 5000,
                seed: int = 0) -> Path:
    """A nanoGPT ``.bin`` (uint32 ids, Zipf-like) + ``.json`` with a document every ~``doc_tokens``."""
    root.mkdir(parents=True, exist_ok=True)
    meta = root / "corpus.json"
    if meta.is_file():
        return meta
    rng = np.random.default_rng(seed)
    ids = np.minimum(rng.zipf(1.2, tokens) - 1, vocab - 1).astype(np.uint32)
    ids.tofile(root / "corpus.bin")
    starts = np.unique(np.r_[0, rng.integers(1, tokens, max(0, tokens // doc_tokens))])
    meta.write_text(json.dumps({"vocab_size": vocab, "dtype": "uint32", "documents": starts.tolist(),
                                "block_size": block_size}))
    return meta


def teacher_pool(rows: int, vocab: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``rows`` next-token target rows (values, indices, stat: top-k with the exact log-normaliser)."""
    from logitcache.codecs.evaluate import lm_teacher_rows
    from logitcache.targets import topk_targets

    parts = [topk_targets(torch.from_numpy(z), k, "multiclass") for z in lm_teacher_rows(rows, vocab, seed=seed)]
    return tuple(torch.cat([p[j] for p in parts]).numpy() for j in range(3))


def fresh_rows(pool, n: int, vocab: int, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` rows from the pool, each made unique (so compression sees what real rows give it, not
    repeats): its ids rotated by a random amount modulo V (the set's gaps kept) and its values
    moved by N(0, 0.05) noise (a few codes change)."""
    values, indices, stat = pool
    take = rng.integers(0, len(stat), n)
    ids = (indices[take].astype(np.int64) + rng.integers(0, vocab, (n, 1))) % vocab
    v = values[take] + rng.normal(0.0, 0.05, values[take].shape).astype(np.float32)
    return np.clip(v, -65504, 65504), ids, stat[take]


def make_cache(out: Path, corpus: Path, k: int = 32, codec: str = "compact", epochs: int = 1,
               pool: int = 4096, seed: int = 0) -> Path:
    """A token cache of the corpus (ensemble target set only), as a dump with ``--codec codec
    --topk k --augment offset`` lays it out."""
    from logitcache.augment import Augmenter, epoch_order, id_hashes, load_ops_spec, make_spec, presets_for, view_seeds
    from logitcache.cache import CacheWriter, choose_chunk_rows
    from logitcache.codecs import get_codec
    from logitcache.layout import Layout, codec_entries, new_manifest
    from logitcache.sources import open_source
    from logitcache.targets import index_dtype

    if out.exists():
        return out
    folder = open_source(corpus)
    presets, default = presets_for(folder.modality)
    augmenter = Augmenter.from_spec(make_spec(folder.modality, load_ops_spec(default, presets), folder.defaults()))
    V, L, N = folder.vocab_size, folder.block_size, len(folder)
    entries = codec_entries(codec, "float16", index_dtype(V), None)
    enc = get_codec(codec)(k, V, "multiclass", L, entries["codec_options"])
    R = choose_chunk_rows(enc.chunk_sizing_bytes(), N)
    manifest = new_manifest(
        dataset={"fingerprint": folder.fingerprint, "num_samples": N, **folder.dataset_entry()},
        source=folder.describe(), classes=folder.classes, augmenter=augmenter,
        teachers=[{"name": "synthetic_lm", "source": "benchmarks/_lm_cache.py", "sha256": ""}], members=[],
        output_kind="multiclass", aggregation="mean_prob", weights=None, topk=k, frames=L, value_dtype="float16",
        epochs=epochs, seed=seed, chunk_rows=R, codec=entries, run={"precision": "fp32", "device": "cpu"})
    rows = teacher_pool(pool, V, k, seed)
    flat = get_codec(codec)(k, V, "multiclass", None, entries["codec_options"])
    rng = np.random.default_rng(seed)
    hashes = id_hashes(folder.ids)
    crc = np.array([folder.load_with_crc(i)[1] for i in range(N)], np.uint32)
    ctx = augmenter.context(num_samples=N)
    writer = CacheWriter(out, manifest, folder.ids, augmenter.param_specs)
    try:
        for e in range(epochs):
            order, seeds = epoch_order(seed, e, hashes), None
            seeds = view_seeds(seed, e, hashes)[order]
            for c, a in enumerate(range(0, N, R)):
                b = min(a + R, N)
                encoded = flat.encode_rows(*fresh_rows(rows, (b - a) * L, V, rng))
                block = {Layout.target_path("ensemble", f): x.reshape(b - a, L, *x.shape[1:])
                         for f, x in encoded.items()}
                drawn = [augmenter.draw(int(s), ctx) for s in seeds[a:b]]
                block.update({Layout.param_path(n): np.stack([d[n] for d in drawn]) for n in augmenter.param_specs})
                block.update({"order": order[a:b].astype(manifest["order_dtype"]), "seeds": seeds[a:b]})
                if e == 0:
                    block["content"] = crc[order[a:b]]
                writer.put(e, c, block)
        writer.finish(complete=True)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return out
