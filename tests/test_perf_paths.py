"""The fast paths of issue 3 return exactly what the plain paths do (no timings asserted here)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import logitcache
import toy_teachers
from logitcache.augment import Augmenter
from logitcache.cache import choose_chunk_rows
from logitcache.data import AudioFolder
from logitcache.dump import optimise_teachers
from logitcache.teachers import Teacher
from logitcache.views import CacheStream, ViewSource, batch_labels, row_params


@pytest.fixture(scope="module")
def chunked(dumper):
    """The strong cache again, in chunks of 5 rows (24 clips: 5 chunks, the last one partial)."""
    return dumper(chunk_rows=5)


@pytest.mark.parametrize("budget", [0, 200, 256 << 20])
def test_random_access_equals_full_read_for_any_chunk_cache(chunked, budget):
    cache = logitcache.open_cache(chunked, chunk_cache_bytes=budget)
    rng = np.random.default_rng(0)
    for epoch in range(cache.epochs):
        full = cache.targets(epoch)
        pos_of = cache.positions(epoch)
        for n in (0, 1, 3, 24, 40):
            ids = [cache.ids[i] for i in rng.integers(0, len(cache.ids), n)]  # repeats allowed
            for member in (None, "toy_b"):
                t = cache.targets(epoch, ids, member=member)
                ref = full if member is None else cache.targets(epoch, member=member)
                pos = pos_of[cache.dataset_index(ids)]
                for got, want in zip((t.values, t.indices, t.stat), (ref.values, ref.indices, ref.stat)):
                    assert got.dtype == want.dtype and np.array_equal(got, want[pos])
        params = cache.params(epoch, cache.ids[::-1])
        block = cache.read_block(epoch, 0, cache.num_samples)
        pos = pos_of[cache.dataset_index(cache.ids[::-1])]
        for name, rows in params.items():
            assert np.array_equal(rows, block[f"params/{name}"][pos])


@pytest.mark.parametrize("read_ahead", [0, 1, 3])
def test_stream_with_read_ahead_equals_block_reads(chunked, dataset, read_ahead):
    cache = logitcache.open_cache(chunked)
    block = cache.read_block(1, 0, cache.num_samples)
    batches = list(CacheStream(chunked, dataset, 1, batch_size=7, read_ahead=read_ahead))
    assert np.array_equal(torch.cat([b["order"] for b in batches]).numpy(), block["order"])
    assert np.array_equal(torch.cat([b["values"] for b in batches]).numpy(), block["values"])
    assert np.array_equal(torch.cat([b["stat"] for b in batches]).numpy(), block["stat"])
    part = list(CacheStream(chunked, dataset, 1, batch_size=4, start=3, stop=17, read_ahead=read_ahead))
    assert np.array_equal(torch.cat([b["order"] for b in part]).numpy(), block["order"][3:17])


def test_batch_labels_equal_per_row_labels(strong_cache, dataset):
    cache = logitcache.open_cache(strong_cache)
    source = ViewSource(AudioFolder(dataset), Augmenter.from_spec(cache.manifest["augment"]))
    for epoch in range(cache.epochs):
        block = cache.read_block(epoch, 0, cache.num_samples)
        assert (block["params/mixup.partner"] >= 0).any()  # the mixed branch is exercised
        per_row = np.stack([source.labels(i, row_params(block, r)) for r, i in enumerate(block["order"])])
        params = {k[len("params/"):]: v for k, v in block.items() if k.startswith("params/")}
        got = batch_labels(source.folder, block["order"], params)
        assert got.dtype == per_row.dtype and np.array_equal(got, per_row)


def test_channels_last_converts_conv_weights_and_keeps_outputs():
    plain = Teacher("toy_conv", "toy_teachers:toy_conv", toy_teachers.toy_conv().eval(), "")
    fast = Teacher("toy_conv", "toy_teachers:toy_conv", toy_teachers.toy_conv().eval(), "")
    cl = torch.channels_last
    assert not fast.module.conv2.weight.is_contiguous(memory_format=cl)  # the check below can fail
    optimise_teachers([fast], torch.device("cpu"), channels_last=True)
    assert fast.module.conv2.weight.is_contiguous(memory_format=cl)
    assert fast.module.conv2.weight.stride() != plain.module.conv2.weight.stride()
    x = 0.1 * torch.randn(5, 16000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = plain.module(x), fast.module(x)
    assert want.abs().max() > 1.0  # logits of a useful scale, not all ~0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_channels_last_dump_is_recorded_and_matches_the_plain_dump(dumper):
    teachers = ["toy_teachers:toy_conv", "toy_teachers:toy_a"]
    plain, cl = dumper(teachers, epochs=1), dumper(teachers, epochs=1, channels_last=True)
    a, b = logitcache.open_cache(plain), logitcache.open_cache(cl)
    assert b.manifest["channels_last"] is True and a.manifest["channels_last"] is False
    assert a.manifest["compile"] is False
    for m in (None, "toy_conv"):
        ta, tb = a.targets(0, member=m), b.targets(0, member=m)
        np.testing.assert_allclose(tb.values, ta.values, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(tb.stat, ta.stat, rtol=1e-5, atol=1e-5)
        assert np.array_equal(ta.indices, tb.indices)  # no two logits here tie within rounding


def test_chunk_rows_are_powers_of_two_within_bounds():
    for row_bytes in (1, 20, 80, 400, 20_000, 10**7):
        for n in (1, 100, 10**6, 10**8):
            r = choose_chunk_rows(row_bytes, n)
            assert 1 <= r <= min(n, 1 << 17)
            assert r == n or (r & (r - 1) == 0 and r >= 64)
    assert choose_chunk_rows(20 * 4, 10**6) == 1 << 16  # clip-level top-20 of 527: the benchmarked default


@pytest.mark.parametrize("n_fft", [256, 512, 1024])
@pytest.mark.parametrize("length", [4097, 16000, 16001, 44100])
def test_freq_mask_istft_equals_torch_istft_bit_for_bit(n_fft, length):
    """The freq mask's inverse STFT (numpy overlap-add, cached envelope) is torch.istft's output."""
    from logitcache.augment import _istft

    g = torch.Generator().manual_seed(n_fft + length)
    window = torch.hann_window(n_fft)
    for _ in range(3):
        spec = torch.stft(0.3 * torch.randn(length, generator=g), n_fft, hop_length=n_fft // 4, window=window,
                          return_complex=True)
        spec[5:12] = 0  # a masked band, as the op leaves it
        want = torch.istft(spec, n_fft, hop_length=n_fft // 4, window=window, length=length)
        got = _istft(spec, n_fft, n_fft // 4, length)
        assert got.dtype == torch.float32 and got.shape == want.shape and torch.equal(got, want)


@pytest.mark.parametrize("n_fft", [256, 512, 1024])
@pytest.mark.parametrize("length", [4097, 16000, 44100])
def test_freq_mask_stft_equals_torch_stft_bit_for_bit(n_fft, length):
    from logitcache.augment import _stft

    g = torch.Generator().manual_seed(n_fft * length)
    for _ in range(3):
        wave = torch.randn(length, generator=g)
        want = torch.stft(wave, n_fft, hop_length=n_fft // 4, window=torch.hann_window(n_fft), return_complex=True)
        got = _stft(wave, n_fft, n_fft // 4)
        assert got.shape == want.shape and torch.equal(got, want)


def test_ced_views_equal_torch_reference_ops():
    """A ced view (roll, time mask, freq mask) equals the same ops written with plain torch calls."""
    from logitcache.augment import load_ops_spec

    sr, aug = 16000, Augmenter(load_ops_spec("ced"), 16000, 1.0)
    source = 0.3 * torch.randn(20000, generator=torch.Generator().manual_seed(0))
    ctx = aug.context(num_samples=10, sample_index=0, source_samples=source.shape[-1])
    window = torch.hann_window(512)
    for seed in range(40):
        p = aug.draw(seed, ctx)
        want = torch.roll(source[:sr].clone(), int(round(float(p["shift.seconds"]) * sr)))
        a, w = (int(round(float(p[f"time_mask.{k}"][0]) * sr)) for k in ("start_s", "width_s"))
        want[a:a + w] = 0.0
        lo, width = float(p["freq_mask.low_hz"][0]), float(p["freq_mask.width_hz"][0])
        if width > 0:
            spec = torch.stft(want, 512, hop_length=128, window=window, return_complex=True)
            freqs = torch.linspace(0, sr / 2, spec.shape[0])
            keep = torch.ones(spec.shape[0])
            keep[(freqs >= lo) & (freqs < lo + width)] = 0.0
            want = torch.istft(spec * keep[:, None], 512, hop_length=128, window=window, length=sr)
        assert torch.equal(aug.apply(source, p, ctx), want)


@pytest.mark.parametrize("augment", ["none", "ced", "strong"])
def test_drawn_views_shared_with_the_decode_cache_are_copied_by_collate(dataset, augment):
    """DrawnViews hands collate_views views that may share the cached decode's memory: the
    batch equals fresh views, and writing into the batch changes no later view."""
    from logitcache.augment import load_ops_spec, view_seeds
    from logitcache.views import DrawnViews, collate_views

    folder = AudioFolder(dataset)
    source = ViewSource(folder, Augmenter(load_ops_spec(augment), 16000, 1.0))
    order = np.arange(len(folder), dtype=np.int64)
    seeds = view_seeds(3, 0, np.arange(len(folder), dtype=np.uint64))
    fresh = torch.stack([source.draw(i, seeds[i])[0] for i in order])
    batch = collate_views([DrawnViews(source, order, seeds)[p] for p in range(len(order))])[0]
    assert torch.equal(batch, fresh)
    batch.fill_(7.0)
    again = collate_views([DrawnViews(source, order, seeds)[p] for p in range(len(order))])[0]
    assert torch.equal(again, fresh)
