"""Replay: every stored (epoch, sample) view is reproduced bit for bit, and it is what the teachers saw."""

from __future__ import annotations

import csv
import json

import numpy as np
import soundfile
import torch
from torch.utils.data import DataLoader

import logitcache
from logitcache.views import CacheStream
from conftest import CLIP, SR, C, dense, raw_clip, teacher_logits


def _stream_rows(path, data, epoch, batch_size, workers=0) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """dataset index -> (wave, labels) of one epoch streamed through a DataLoader."""
    rows = {}
    loader = DataLoader(CacheStream(path, data, epoch, batch_size), batch_size=None, num_workers=workers)
    for batch in loader:
        assert batch["wave"].dtype == torch.float32 and batch["wave"].shape[1:] == (CLIP,)
        for r, index in enumerate(batch["order"].tolist()):
            assert index not in rows
            rows[index] = (batch["wave"][r], batch["labels"][r])
    return rows


def test_replay_is_bit_identical_in_any_order_and_batch(strong_cache, strong_views, dataset):
    cache = logitcache.open_cache(strong_cache)
    ids = cache.ids
    # alone, in another order (after other samples and their mixup partners were decoded), from a path
    for n in np.random.default_rng(0).permutation(len(ids)):
        assert torch.equal(logitcache.replay(strong_cache, dataset, 1, ids[n]), strong_views[1][n])
    # in any batch: rows of CacheStream batches equal the lone replay
    for epoch, batch_size in ((0, 1), (0, 5), (1, len(ids))):
        rows = _stream_rows(strong_cache, dataset, epoch, batch_size)
        assert sorted(rows) == list(range(len(ids)))
        for n, (wave, _) in rows.items():
            assert torch.equal(wave, strong_views[epoch][n]), (epoch, batch_size, ids[n])


def test_stream_with_two_workers_equals_no_workers(strong_cache, dataset):
    def batches(workers):
        stream = CacheStream(strong_cache, dataset, epoch=1, batch_size=5)
        return list(DataLoader(stream, batch_size=None, num_workers=workers))

    cache = logitcache.open_cache(strong_cache)
    solo, pair = batches(0), batches(2)
    assert len(solo) == len(pair) == -(-len(cache.ids) // 5)
    for a, b in zip(solo, pair):
        assert a.keys() == b.keys() >= {"wave", "labels", "values", "indices", "stat", "order"}
        for k in a:
            assert torch.equal(a[k], b[k]), k
    # batches come in stored order and carry the stored targets
    assert np.array_equal(torch.cat([b["order"] for b in solo]).numpy(), cache.order(1))
    t = cache.targets(1)
    assert np.array_equal(torch.cat([b["values"] for b in solo]).numpy(), t.values)
    assert np.array_equal(torch.cat([b["indices"] for b in solo]).numpy(), t.indices.astype(np.int64))
    assert np.array_equal(torch.cat([b["stat"] for b in solo]).numpy(), t.stat)


def test_replayed_view_is_what_the_teachers_saw(strong_cache, strong_views, dataset):
    """'strong' views, k = C, float32: the stored logits are the teachers' logits on replay(...)."""
    cache = logitcache.open_cache(strong_cache)
    assert cache.topk == C and cache.manifest["value_dtype"] == "float32"
    ids = cache.ids
    raw = torch.stack([raw_clip(dataset / i) for i in ids])
    for epoch in range(cache.epochs):
        # the views really are augmented: mixup, noise and shifts all occur
        p = cache.params(epoch, ids)
        assert (p["mixup.partner"] >= 0).any() and np.isfinite(p["noise.snr_db"]).any()
        assert (p["shift.seconds"] != 0).any() and (p["gain.db"] != 0).all()
        for member in ("toy_a", "toy_b"):
            t = cache.targets(epoch, ids, member=member)
            stored = dense(t.values, t.indices, C)
            assert not np.isnan(stored).any()  # k = C: every class stored exactly once
            np.testing.assert_allclose(stored, teacher_logits(member, strong_views[epoch]), rtol=0, atol=1e-5)
            # control: the un-augmented clips would not pass, so the comparison has teeth
            off = np.abs(stored - teacher_logits(member, raw)).max(axis=1)
            assert (off > 1e-3).mean() > 0.9


def test_epochs_give_different_views(strong_cache, strong_views):
    cache = logitcache.open_cache(strong_cache)
    for n in range(len(cache.ids)):
        assert not torch.equal(strong_views[0][n], strong_views[1][n])
    assert not np.array_equal(cache.order(0), cache.order(1))
    assert sorted(cache.order(0)) == list(range(len(cache.ids)))
    assert not np.array_equal(cache.params(0, cache.ids)["gain.db"], cache.params(1, cache.ids)["gain.db"])


def test_augment_none_replays_the_raw_clip(dumper, dataset):
    cache = logitcache.open_cache(dumper(augment="none", epochs=1, topk=3))
    assert cache.param_names() == []
    rates, lengths = set(), set()
    for i in cache.ids:
        info = soundfile.info(str(dataset / i))
        rates.add(info.samplerate)
        lengths.add(info.frames / info.samplerate)
        assert torch.equal(logitcache.replay(cache, dataset, 0, i), raw_clip(dataset / i)), i
    # the dataset exercises resampling, cropping and padding
    assert len(rates) > 1 and min(lengths) < CLIP / SR < max(lengths)


def test_mixup_is_replayed(dumper, dataset, tmp_path_factory):
    spec = tmp_path_factory.mktemp("aug") / "crop_mixup.json"
    spec.write_text(json.dumps({"ops": [{"op": "crop"}, {"op": "mixup", "p": 0.6, "min_lam": 0.3}]}))
    path = dumper(augment=str(spec), epochs=2, topk=C)
    cache = logitcache.open_cache(path)
    ids, labels = cache.ids, _labels(dataset, cache.classes)
    mixed = 0
    for epoch in range(cache.epochs):
        p = cache.params(epoch, ids)
        streamed = _stream_rows(path, dataset, epoch, batch_size=7)
        for n, i in enumerate(ids):
            x = raw_clip(dataset / i, int(round(float(p["crop.start_s"][n]) * SR)))
            partner, lam = int(p["mixup.partner"][n]), float(p["mixup.lam"][n])
            want_y = labels[n]
            if partner >= 0:
                mixed += 1
                assert partner != n and 0.3 <= lam <= 1.0
                x = lam * x + (1.0 - lam) * raw_clip(dataset / ids[partner])  # partner: its clip, uncropped
                want_y = lam * labels[n] + (1.0 - lam) * labels[partner]
            else:
                assert lam == 1.0
            wave, y = streamed[n]
            torch.testing.assert_close(wave, x, rtol=0, atol=1e-6)
            np.testing.assert_allclose(y.numpy(), want_y, rtol=0, atol=1e-6)
            if epoch == 0:
                assert torch.equal(logitcache.replay(cache, dataset, epoch, i), wave)
        # and the teachers saw the mix
        t = cache.targets(epoch, ids, member="toy_a")
        view = torch.stack([streamed[n][0] for n in range(len(ids))])
        np.testing.assert_allclose(dense(t.values, t.indices, C), teacher_logits("toy_a", view), rtol=0, atol=1e-5)
    assert 0 < mixed < 2 * len(ids)
    assert (cache.params(0, ids)["crop.start_s"] > 0).any()  # the longer clips really were cropped


def _labels(dataset, classes) -> np.ndarray:
    with open(dataset / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    y = np.zeros((len(rows), len(classes)), np.float32)
    for n, r in enumerate(rows):
        for c in filter(None, r["labels"].split(";")):
            y[n, classes.index(c)] = 1
    return y
