"""logitcache.codecs.compact: exact id round trips, value error bounds, KL against float16 top-k."""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest
import torch

from logitcache.codecs import compact as cc
from logitcache.codecs.evaluate import dense_kl, stored_kl, tail_mass, teacher_rows
from logitcache.errors import LogitCacheError
from logitcache.targets import kd_loss

CLASS_COUNTS = (2, 3, 527, 10_000, 151_936)


def random_sets(rng, rows: int, k: int, C: int) -> np.ndarray:
    if C <= 4096:
        return np.argsort(rng.random((rows, C)), axis=1)[:, :k]
    return np.stack([rng.choice(C, k, replace=False) for _ in range(rows)])


def adversarial_sets(k: int, C: int) -> np.ndarray:
    """Consecutive ids at both ends and in the middle, 0 and C-1 together, the widest gaps,
    the widest first gap, evenly spread ids."""
    rows = [np.arange(k), np.arange(C - k, C), np.arange(k) + (C - k) // 2,
            np.linspace(0, C - 1, k).round().astype(np.int64)]
    if k >= 2:
        rows += [np.r_[0, np.arange(C - k + 1, C)], np.r_[np.arange(k - 1), C - 1],
                 np.r_[C - 1, np.arange(k - 1)]]  # unsorted on purpose
    return np.stack([np.asarray(r, np.int64) for r in rows])


def round_trip(ids: np.ndarray, C: int) -> None:
    packed = cc.encode_ids(ids, C)
    width = cc.id_layout(ids.shape[-1], C).nbytes
    assert packed.dtype == np.uint8 and packed.shape == (*ids.shape[:-1], width)
    out = cc.decode_ids(packed, ids.shape[-1], C)
    np.testing.assert_array_equal(out, np.sort(ids, axis=-1))
    assert out.dtype == np.dtype("uint8" if C <= 256 else "uint16" if C <= 65536 else "uint32")


@pytest.mark.parametrize("C", CLASS_COUNTS)
def test_ids_round_trip_random_and_adversarial(C):
    rng = np.random.default_rng(C)
    ks = sorted({1, 2, min(5, C), min(20, C), min(50, C), C - 1, C} - {0})
    for k in ks:
        rows = 300 if C * k < 10**6 else 2
        round_trip(random_sets(rng, rows, k, C), C)
        round_trip(adversarial_sets(k, C), C)


def test_ids_every_subset_of_small_class_counts():
    for C in (2, 3, 5, 9):
        for k in range(1, C + 1):
            round_trip(np.array(list(itertools.combinations(range(C), k))), C)


def test_ids_block_boundaries_and_leading_shape():
    rng = np.random.default_rng(1)
    # 3 blocks of rows (not of [3, 20] items), the last one short
    rows = 2 * cc.block_rows(20) + 4
    ids = random_sets(rng, rows - rows % 3, 20, 527).reshape(-1, 3, 20)
    round_trip(ids, 527)
    round_trip(ids[:0], 527)


@pytest.mark.parametrize("k,C", [(3, 200), (20, 256), (20, 527), (50, 60_000), (7, 65_536), (64, 70_000)])
def test_ids_computed_in_the_index_dtype_wrap_exactly(k, C):
    """Ids are computed in the index dtype when every expressible id fits it (uint8 / uint16 here):
    the bit positions of later rows far exceed it and wrap around; the ids come out exact, the
    widest sets and the last rows of full blocks included."""
    rng = np.random.default_rng(C)
    rows = 2 * cc.block_rows(k) + 3
    ids = random_sets(rng, rows, k, C)
    ids[-len(adversarial_sets(k, C)):] = adversarial_sets(k, C)[:rows]
    round_trip(ids, C)
    # where ids near the top of uint8 / uint16 could be expressed, the computation stays int64
    narrow = {527: np.uint16, 60_000: np.uint16, 70_000: np.uint32}.get(C, np.int64)
    assert cc._ids_dtype(cc.id_layout(k, C)) == narrow


def test_id_row_sizes_are_near_the_floor():
    assert cc.id_layout(20, 527).nbytes == 17  # floor log2 C(527, 20) = 119 bits = 15 B
    assert cc.id_layout(20, 151_936).nbytes == 38  # floor 283 bits = 36 B
    assert cc.id_layout(527, 527).nbytes == 66  # L = 0: a membership bitmap (+ one bit)
    assert cc.row_bytes(20, 527) == 17 + 15 + 2 + 1 + 2  # 20 values x 6 bits (the default) = 15 B
    assert cc.row_bytes(20, 527, value_bits=8) == 17 + 20 + 2 + 1 + 2
    assert cc.row_bytes(20, 527, value_bits=6) == 17 + 15 + 5


def test_ids_bad_input_is_one_error():
    with pytest.raises(LogitCacheError, match=r"indices: class ids must be in \[0, 527\)"):
        cc.encode_ids(np.array([[0, 527]]), 527)
    with pytest.raises(LogitCacheError, match="indices: row 1 repeats a class id"):
        cc.encode_ids(np.array([[0, 1], [3, 3]]), 527)
    with pytest.raises(LogitCacheError, match="top-k 3 must be between 1 and the number of classes"):
        cc.encode_ids(np.array([[0, 1, 2]]), 2)
    with pytest.raises(LogitCacheError, match="ids: expected rows of 17"):
        cc.decode_ids(np.zeros((4, 16), np.uint8), 20, 527)


def test_corrupt_ids_are_detected():
    rng = np.random.default_rng(2)
    packed = cc.encode_ids(random_sets(rng, 64, 20, 527), 527)
    one_less = packed.copy()
    one_less[5, 0] &= 0  # drops the ones of row 5's first bitmap byte
    with pytest.raises(LogitCacheError, match="ids: .* expected 20 per row"):
        cc.decode_ids(one_less, 20, 527)
    moved = packed.copy()  # same total count, but row 3 gets one more and row 4 one less
    high = cc.id_layout(20, 527).high_bits
    bits = np.unpackbits(moved, axis=1, bitorder="little")
    bits[3, np.flatnonzero(bits[3, :high] == 0)[-1]] = 1
    bits[4, np.flatnonzero(bits[4, :high] == 1)[0]] = 0
    moved = np.packbits(bits, axis=1, bitorder="little")
    with pytest.raises(LogitCacheError, match="ids: some rows do not hold exactly 20 ids"):
        cc.decode_ids(moved, 20, 527)


# ---------------------------------------------------------------- values
def value_rows(rng) -> np.ndarray:
    """Rows of 20 logits: realistic spreads, huge and tiny ranges, constant rows, float16 edges."""
    v = rng.normal(0, 3, (500, 20)).astype(np.float32)
    v[:50] *= 1000
    v[50:100] *= 1e-4
    v[100:110] = 7.25
    v[110:120, :10] = 65504.0
    v[120:130, 10:] = -np.inf
    v[130:140] += 3000
    return v


@pytest.mark.parametrize("bits", [1, 2, 4, 6, 7, 8, 12, 16])
def test_values_within_half_a_step(bits):
    rng = np.random.default_rng(bits)
    v = value_rows(rng)
    arrays = cc.encode_values(v, bits)
    out = cc.decode_values(arrays["codes"], arrays["offset"], arrays["step"], 20, bits)
    step = cc.STEPS[arrays["step"]][:, None].astype(np.float64)
    ref = np.clip(v, -65504, 65504).astype(np.float64)
    err = np.abs(out - ref)
    # half a step, plus the float32 rounding of offset - q * step
    assert (err <= step / 2 + 2 * np.spacing(np.abs(ref).astype(np.float32))).all()
    # and the step is the smallest grid step that covers the row: one grid step finer would not
    need = (arrays["offset"].astype(np.float64) - ref.min(1)) / (2**bits - 1)
    finer = cc.STEPS[np.maximum(arrays["step"].astype(int) - 1, 0)]
    with np.errstate(over="ignore"):
        coarse = (arrays["step"] > 0) & (need > np.abs(np.spacing(arrays["offset"])))
    assert (finer[coarse] < need[coarse] * (1 + 1e-5)).all()


def test_values_reject_nan_and_bad_bits():
    with pytest.raises(LogitCacheError, match="values: NaN logits cannot be stored"):
        cc.encode_values(np.array([[1.0, np.nan]]))
    with pytest.raises(LogitCacheError, match="stat: NaN tail statistics cannot be stored"):
        cc.encode(np.zeros((2, 2)), np.array([[0, 1], [2, 3]]), np.array([0.0, np.nan]), 527, "multiclass")
    with pytest.raises(LogitCacheError, match=r"indices: expected rows of 2 on the last axis, got shape"):
        cc.encode(np.zeros((2, 2)), np.zeros((2, 3), int), np.zeros(2), 527, "multiclass")
    with pytest.raises(LogitCacheError, match=r"values \(2, 2\), indices \(3, 2\) and stat \(2,\) do not"):
        cc.encode(np.zeros((2, 2)), np.zeros((3, 2), int), np.zeros(2), 527, "multiclass")
    with pytest.raises(LogitCacheError, match="value_bits 17 must be between 1 and 16"):
        cc.encode_values(np.zeros((1, 2)), 17)


# ---------------------------------------------------------------- rows and KL
@functools.lru_cache(maxsize=2)
def realistic(kind: str):
    return (kind, *teacher_rows(2048, 527, 20, kind, seed=3))


@pytest.fixture(params=["multiclass", "multilabel"])
def rows(request):
    return realistic(request.param)


def test_decode_gives_sorted_rows_of_the_same_pairs(rows):
    kind, z, v, i, s = rows
    arrays = cc.encode(v, i, s, 527, kind)
    assert {n: (a.dtype.name, a.shape[1:]) for n, a in arrays.items()} == \
        {n: (d, sh) for n, (d, sh) in cc.array_specs(20, 527).items()}
    dv, di, ds = cc.decode(arrays, 20, 527, kind)
    assert (np.diff(dv, axis=1) <= 0).all()
    ties = np.diff(dv, axis=1) == 0
    assert (np.diff(di.astype(int), axis=1)[ties] > 0).all()  # equal values: lower id first
    # every decoded (id, value) pair is the input's pair, within half a step
    by_id = np.take_along_axis(v, np.argsort(i, 1), 1)
    dec_by_id = np.take_along_axis(dv, np.argsort(di, 1), 1)
    np.testing.assert_array_equal(np.sort(di, 1), np.sort(i, 1))
    half = cc.STEPS[arrays["step"]][:, None] / 2 + 1e-6
    assert (np.abs(dec_by_id - by_id) <= half).all()
    if kind == "multilabel":
        np.testing.assert_array_equal(ds, s.astype(np.float16).astype(np.float32))
    # unsorted decode: the same rows in id order
    uv, ui, us = cc.decode(arrays, 20, 527, kind, sort=False)
    np.testing.assert_array_equal(ui, np.sort(i, 1))
    np.testing.assert_array_equal(uv, dec_by_id)
    np.testing.assert_allclose(us, ds, rtol=1e-6, atol=1e-6)  # float32 sums in another order


def test_softmax_tail_mass_is_kept():
    kind, z, v, i, s = realistic("multiclass")
    dv, di, ds = cc.decode(cc.encode(v, i, s, 527, kind), 20, 527, kind)
    t, dt = tail_mass(v, s), tail_mass(dv, ds)
    # float16 logit(t) is good to 2^-11 |logit t| relative; float32 sums of ~1 to a few 2^-23
    assert (np.abs(dt - t) <= 2**-11 * np.abs(np.log(np.maximum(t, 1e-30))) * t + 4 * 2**-23).all()
    kept = t > 1e-5
    # float16 values with the float32 stat lose small tails; compact does not
    t16 = tail_mass(v.astype(np.float16), s)
    assert (np.abs(t16[kept] - t[kept]) > 0.1 * t[kept]).sum() > 10


@pytest.mark.parametrize("bits, storage_share", [(8, 1e-3), (6, 1e-2)])  # 6: the default
def test_kl_to_teacher_within_1_1x_of_float16(rows, bits, storage_share):
    kind, z, v, i, s = rows
    dv, di, ds = cc.decode(cc.encode(v, i, s, 527, kind, value_bits=bits), 20, 527, kind, value_bits=bits)
    kl16 = dense_kl(z, v.astype(np.float16), i, s, kind)
    kl = dense_kl(z, dv, di, ds, kind)
    assert np.isfinite(kl).all() and kl.mean() <= 1.1 * kl16.mean()
    assert kl.mean() <= 1.01 * kl16.mean()  # the margin at 6 and 8 bits is much larger than 1.1x
    # storage error alone (against the float32 row): small next to the top-k truncation
    assert stored_kl((v, i, s), (dv, di, ds), 527, kind).mean() < storage_share * kl16.mean()


def test_kd_loss_on_decoded_rows_matches_float32_rows(rows):
    kind, z, v, i, s = rows
    dv, di, ds = cc.decode(cc.encode(v, i, s, 527, kind), 20, 527, kind)
    student = torch.randn(len(v), 527, generator=torch.Generator().manual_seed(0))
    ref = kd_loss(student, torch.from_numpy(v), torch.from_numpy(i), torch.from_numpy(s), kind)
    got = kd_loss(student, torch.from_numpy(dv), torch.from_numpy(di.astype(np.int64)), torch.from_numpy(ds),
                  kind)
    assert abs(float(got) - float(ref)) <= 1e-3 * abs(float(ref))


def test_frame_rows_and_large_class_counts():
    z, v, i, s = teacher_rows(48, 151_936, 20, "multiclass", seed=4)
    shape = (4, 12)
    arrays = cc.encode(v.reshape(*shape, 20), i.reshape(*shape, 20), s.reshape(shape), 151_936, "multiclass")
    assert arrays["ids"].shape == (*shape, 38) and arrays["stat"].shape == shape
    dv, di, ds = cc.decode(arrays, 20, 151_936, "multiclass")
    assert dv.shape == di.shape == (*shape, 20) and ds.shape == shape and di.dtype == np.uint32
    np.testing.assert_array_equal(np.sort(di.reshape(-1, 20), 1), np.sort(i, 1))
    kl16 = dense_kl(z, v.astype(np.float16), i, s, "multiclass")
    kl = dense_kl(z, dv.reshape(-1, 20), di.reshape(-1, 20), ds.reshape(-1), "multiclass")
    assert kl.mean() <= 1.1 * kl16.mean()


def test_no_rows():
    arrays = cc.encode(np.zeros((0, 5, 20), np.float32), np.zeros((0, 5, 20), np.int64), np.zeros((0, 5)),
                       527, "multiclass")
    assert {n: a.shape for n, a in arrays.items()} == {
        "ids": (0, 5, 17), "codes": (0, 5, 15), "offset": (0, 5), "step": (0, 5), "stat": (0, 5)}
    assert [x.shape for x in cc.decode(arrays, 20, 527, "multiclass")] == [(0, 5, 20), (0, 5, 20), (0, 5)]


def test_decode_rejects_arrays_that_do_not_fit():
    arrays = cc.encode(np.zeros((3, 20), np.float32), np.tile(np.arange(20), (3, 1)), np.zeros(3), 527,
                       "multilabel")
    with pytest.raises(LogitCacheError, match="compact rows: missing array\\(s\\) step"):
        cc.decode({n: a for n, a in arrays.items() if n != "step"}, 20, 527, "multilabel")
    with pytest.raises(LogitCacheError, match=r"codes is uint8 \(3, 15\), expected uint8 \(3, 20\)"):
        cc.decode(arrays, 20, 527, "multilabel", value_bits=8)
    with pytest.raises(LogitCacheError, match="kind 'softmax' is not one of multilabel, multiclass"):
        cc.decode(arrays, 20, 527, "softmax")


@pytest.mark.parametrize("n", [20, 5, 1, 8])
def test_six_bit_fields_read_as_the_bitstream_says(n):
    """The 4-fields-per-3-bytes path of the default width equals reading the little-endian
    bitstream field by field (numpy's unpackbits, independent of the codec's readers)."""
    rng = np.random.default_rng(n)
    packed = rng.integers(0, 256, (64, -(-6 * n // 8)), dtype=np.uint8)
    bits = np.unpackbits(packed, axis=1, bitorder="little")[:, :6 * n].reshape(64, n, 6)
    want = (bits.astype(np.int64) << np.arange(6)).sum(-1)
    np.testing.assert_array_equal(cc._read_fields(packed, 0, n, 6).astype(np.int64), want)
    q = rng.integers(0, 64, (64, n), dtype=np.uint32)
    codes = cc.encode_values(np.zeros((64, n), np.float32), 6)["codes"]
    assert codes.shape == (64, -(-6 * n // 8))
    np.testing.assert_array_equal(cc._read_fields(np.packbits(cc._field_bits(q, 6), axis=1, bitorder="little"),
                                                  0, n, 6), q)


@pytest.mark.parametrize("width", [1, 3, 7, 9, 11, 12, 13, 17, 24, 25, 31])
def test_fields_of_any_width_read_as_the_bitstream_says(width):
    """Every field reader (uint64 groups spread into slots up to 16 bits, word gathers up to 25,
    bytes above) equals the little-endian bitstream read field by field, at every bit offset,
    with fields ending on the row's last bit."""
    rng = np.random.default_rng(width)
    for offset, n in itertools.product(range(9), (1, 5, 20, 32, 64)):
        nbytes = -(-(offset + n * width) // 8)
        packed = rng.integers(0, 256, (17, nbytes), dtype=np.uint8)
        bits = np.unpackbits(packed, axis=1, bitorder="little")[:, offset:offset + n * width].reshape(17, n, width)
        want = (bits.astype(np.int64) << np.arange(width)).sum(-1)
        got = cc._read_fields(packed, offset, n, width)
        assert got.dtype.kind == "u" and 8 * got.dtype.itemsize >= width
        np.testing.assert_array_equal(got.astype(np.int64), want)
