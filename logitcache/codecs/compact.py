"""Compact target rows: a fixed number of bytes per row, close to the information floor.

A cached target row is (values: top-k logits sorted descending, indices: their class ids, stat: the
tail statistic of logitcache.targets). This codec stores the same row as five fixed-shape arrays,
so a chunked array store holds them as they are:

==========  ==================  =====================================================================
array       dtype, row shape    content
==========  ==================  =====================================================================
``ids``     uint8 [W]           the k ids as a *set* (Elias-Fano, below). Rank order is not stored:
                                the values imply it (log2 k! bits, 61 at k = 20)
``codes``   uint8 [ceil(kb/8)]  the values in id order, ``value_bits`` (b) bits each, packed
``offset``  float16             the row's top value
``step``    uint8               the row's quantisation step, on a 2^(1/8) log grid (``STEPS``)
``stat``    float16             multiclass: logit of the tail mass; multilabel: the stat itself
==========  ==================  =====================================================================

Top-20 of 527 at 8 bits: 17 + 20 + 2 + 1 + 2 = 42 B per row (float16 top-k today: 84 B); blosc
does not shrink it further (41 B), today's rows only to 62 B. All figures below are from
``benchmarks/bench_codecs.py`` (2 shared cores, CPU time per core, realistic ensemble rows).

Ids: Elias-Fano of y_i = x_i - i, fixed width, no escape
    The sorted ids x_0 < ... < x_{k-1} become y_i = x_i - i, non-decreasing in [0, C - k]. Each y_i
    is split into L low bits, stored as k fixed-width fields, and a high part y_i >> L, stored in
    unary as a bitmap with a one at (y_i >> L) + i: k + ((C - k) >> L) + 1 bits. Every set takes the
    same k L + k + ((C - k) >> L) + 1 bits, so the row width is fixed with no overflow and no escape
    path. L gives the fewest bytes; among equal sizes, low fields that decode by byte lookups (4, 8
    or 16 bits from a byte boundary), else the widest (fewer bitmap bits to scan). L = 0 is a plain
    membership bitmap (plus one bit), which wins for k close to C.

    Decoding is one ``unpackbits`` + ``flatnonzero`` over a block of rows (the ones come out
    row-major, exactly k per row, so a reshape gives every row's positions) and, for the low fields
    (and the b-bit values), groups of 8 or 4 fields read as one uint64 each through strided views
    and spread into byte or 16-bit slots by whole-array shift-and-mask stages: no per-row or
    per-element Python, every pass contiguous. Top-k id sets of C = 527:

    ===============================  ====  ====  ====  ==========================================
    ids stored as                    k=5   k=20  k=50  decode rows/s at k = 20; row width
    ===============================  ====  ====  ====  ==========================================
    floor log2 C(C, k)               4.8   14.9  29.3
    uint16 (today)                   10    40    100   (a view)
    Elias-Fano (this)                6     17    33    11-13M; fixed, no escape
    Golomb-Rice of the gaps          6     17    33    0.35M; fixed (gaps sum to <= C - k)
    fixed-width gaps + width header  7     21    45    1.5M; widest row seen, needs an escape
    Elias-gamma of the gaps          9     23    41    0.19M; widest row seen, needs an escape
    combinatorial number system      5     15    30    0.02M; fixed, 119-bit integers
    ===============================  ====  ====  ====  ==========================================

    Rice matches Elias-Fano's size, but its unary and binary parts interleave, so a decoder walks
    each row element by element (a k-step loop in numpy); the combinatorial number system reaches
    the floor, 2 B less, but needs big integers and a search per id. At C = 151,936, k = 20:
    38 B (floor 36 B, uint32 ids 80 B).

Values: b bits per value, linear in the logit domain, per-row grid anchored at the top value
    code q = round((offset - v) / step), decoded v' = offset - q * step. ``step`` is the smallest
    grid step >= max((offset - min v) / (2^b - 1), float16 spacing at the offset), so no code
    clips and every decoded value is within step / 2 of the input (plus float32 rounding), the
    top one included. Logits are clamped to the float16 range first, as float16 storage does.
    Against the dense teacher the top-k truncation (the tail spread evenly) dominates the error:
    KL(teacher || row) is within 1.0002x of float16 top-k at 8 bits, 1.003x at 6, 1.06x at 4
    (top-20 of 527). 8 bits is the default: plain-byte codes decode fastest, the storage error
    alone stays small (KL to the float32 row 2e-5; median step 0.034 logit), and two values
    closer than a step tie (top-1 agreement 99.85%). 6 bits saves 5 B per row at k = 20.

Stat, float16
    multilabel: the stat itself (logit of the mean tail probability; KL change < 1e-5).
    multiclass: not the log-sum-exp: its float16 rounding (up to 2^-11 of it) moves the top-k mass
    by as much and wipes out smaller tails (the reconstruction clamps a negative tail to 0). On
    softmax rows whose log-sum-exp is 2..12 (a single teacher's raw logits), a float16 stat puts
    44% of the tails > 1e-5 more than 10% off, and so do float16 values with today's float32 stat
    (42%). The logit of the tail mass t is stored instead, and decode sets stat = logsumexp(decoded
    values) + softplus(logit t), so the decoded top-k mass is 1 - t (t to 2^-11 |logit t| relative)
    whatever the value quantisation did: 0.01% of those rows are off.

Decode returns the triple logitcache.targets.kd_loss consumes: float32 values sorted descending
(ties: lower id first), their ids (the index dtype a cache uses for C), float32 stat; or, with
``sort=False``, the same rows in id order, which the losses do not mind (~1.5x faster). Every
function takes any leading shape ``[..., k]`` (frames included) and works on blocks of rows at
once.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from logitcache.errors import LogitCacheError
from logitcache.targets import KINDS, index_dtype

# 6 bits: KL to the teachers 1.002-1.003x of float16 top-k (8 bits: 1.0002x) for 5 B less per
# row at top-20, what a CED-sized view needs to fit 48 B (benchmarks/bench_view_bytes.py).
DEFAULT_VALUE_BITS = 6
FLOAT16_MAX = 65504.0
# The per-row step grid: 2^(c/8 - 14), c = 0..255, i.e. 6e-5 .. 2.4e5 logits per code. A step at
# most 9% above the one needed costs < 0.13 bits per value, and the byte saves one against float16.
STEPS = np.exp2(np.arange(256) / 8.0 - 14.0).astype(np.float32)
# decode works on blocks of rows whose temporaries stay in L2 (~2x faster than whole 64Ki-row
# chunks): this many values per block, 4096 rows at k = 20. Blocks of SUM_BLOCKS of those run
# ~1.1x faster (fewer numpy calls); the stat's matmul still sums each original block on its own,
# because BLAS's row sums can change in the last bit with a row's place in the call.
BLOCK_VALUES = 4096 * 20
SUM_BLOCKS = 2


# ---------------------------------------------------------------- layouts
@dataclass(frozen=True)
class IdLayout:
    """Bit layout of one row of ``ids``: the unary high-part bitmap (``high_bits`` bits from bit 0),
    then k fields of ``low_bits`` bits from bit ``low_offset``."""

    k: int
    num_classes: int
    low_bits: int
    high_bits: int
    low_offset: int
    nbytes: int


@lru_cache(maxsize=256)
def id_layout(k: int, num_classes: int) -> IdLayout:
    """The fixed row layout of ``k`` ids out of ``num_classes``: the fewest bytes; among those, low
    fields that decode by byte lookups (4, 8 or 16 bits from a byte boundary), else the widest."""
    _check_k(k, num_classes)
    options = []
    for low in range((num_classes - k).bit_length() + 1):
        high = k + ((num_classes - k) >> low) + 1
        nbytes = -(-(high + k * low) // 8)
        aligned = -(-high // 8) * 8  # the low fields start on a byte when that costs no byte
        offset = aligned if -(-(aligned + k * low) // 8) == nbytes else high
        fast = low in (4, 8, 16) and offset % 8 == 0
        options.append((-nbytes, fast, low, IdLayout(k, num_classes, low, high, offset, nbytes)))
    return max(options, key=lambda o: o[:3])[3]


def array_specs(k: int, num_classes: int,
                value_bits: int = DEFAULT_VALUE_BITS) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The arrays of one encoded row: name -> (dtype, trailing shape), like Augmenter.param_specs."""
    _check_bits(value_bits)
    return {"ids": ("uint8", (id_layout(k, num_classes).nbytes,)),
            "codes": ("uint8", (-(-k * value_bits // 8),)),
            "offset": ("float16", ()), "step": ("uint8", ()), "stat": ("float16", ())}


def row_bytes(k: int, num_classes: int, value_bits: int = DEFAULT_VALUE_BITS) -> int:
    """Bytes per encoded target row (all arrays of :func:`array_specs`)."""
    specs = array_specs(k, num_classes, value_bits).values()
    return sum(np.dtype(d).itemsize * int(np.prod(s)) for d, s in specs)


def _check_k(k: int, num_classes: int) -> None:
    if not 1 <= k <= num_classes:
        raise LogitCacheError(f"top-k {k} must be between 1 and the number of classes ({num_classes})")


def _check_bits(value_bits: int) -> None:
    if not 1 <= value_bits <= 16:
        raise LogitCacheError(f"value_bits {value_bits} must be between 1 and 16")


def _rows(a: np.ndarray, width: int | None, name: str) -> tuple[np.ndarray, tuple[int, ...]]:
    """``a [..., width]`` as 2-D rows, and its leading shape."""
    a = np.asarray(a)
    if a.ndim < 1 or (width is not None and a.shape[-1] != width):
        raise LogitCacheError(f"{name}: expected rows of {width} on the last axis, got shape {a.shape}")
    return a.reshape(-1, a.shape[-1]), a.shape[:-1]


# ---------------------------------------------------------------- bit fields
_NIBBLES = np.stack([np.arange(256) & 15, np.arange(256) >> 4], axis=1).astype(np.uint8)


def _field_bits(fields: np.ndarray, width: int) -> np.ndarray:
    """[R, n] unsigned fields -> [R, n * width] bits, least significant first."""
    dtype = np.uint8 if width <= 8 else np.uint32 if width <= 32 else np.uint64
    shifts = np.arange(width, dtype=dtype)
    bits = (fields.astype(dtype)[..., None] >> shifts) & dtype(1)
    return bits.astype(np.uint8).reshape(len(fields), fields.shape[1] * width)


def _read_fields(packed: np.ndarray, offset: int, n: int, width: int) -> np.ndarray:
    """n fields of ``width`` bits from bit ``offset`` of each row of ``packed`` [R, W] (LSB first)."""
    if offset % 8 == 0:
        first = offset // 8
        if width == 8:
            return packed[:, first:first + n]
        if width == 16:
            return np.ascontiguousarray(packed[:, first:first + 2 * n]).view("<u2")
        if width == 4:
            pairs = np.take(_NIBBLES, packed[:, first:first + (n + 1) // 2], axis=0)
            return pairs.reshape(len(packed), -1)[:, :n]
        if width == 6 and first + 3 * -(-n // 4) <= packed.shape[1]:  # 4 fields per 3 bytes (the default)
            b = packed[:, first:first + 3 * -(-n // 4)].reshape(len(packed), -1, 3)
            out = np.empty((len(packed), b.shape[1], 4), np.uint8)
            out[..., 0] = b[..., 0] & 63
            out[..., 1] = (b[..., 0] >> 6) | ((b[..., 1] & 15) << 2)
            out[..., 2] = (b[..., 1] >> 4) | ((b[..., 2] & 3) << 4)
            out[..., 3] = b[..., 2] >> 2
            return out.reshape(len(packed), -1)[:, :n]
    if width <= 16 and n >= 8:
        fields = _read_spread(packed, offset, n, width)
        if fields is not None:
            return fields
    if width <= 25 and n >= 16:  # below, its fixed per-block work costs more than it saves
        return _read_words(packed, offset, n, width)
    dtype = np.uint32 if width <= 25 else np.uint64
    starts = offset + width * np.arange(n)
    first, shift = starts >> 3, (starts & 7).astype(dtype)
    last = packed.shape[1] - 1
    # a clipped byte only lands in bits above the field, which the mask drops
    # np.take keeps rows contiguous (packed[:, cols] does not, and row sorts then crawl)
    acc = np.take(packed, first, axis=1).astype(dtype)
    for j in range(1, (7 + width + 7) // 8):
        acc |= np.take(packed, np.minimum(first + j, last), axis=1).astype(dtype) << dtype(8 * j)
    acc >>= shift
    acc &= dtype((1 << width) - 1)
    return acc


def _read_words(packed: np.ndarray, offset: int, n: int, width: int) -> np.ndarray:
    """:func:`_read_fields` for widths up to 25 bits: every field lies in the 32-bit little-endian
    word at its first byte (shift <= 7), so the row's words at each of the 4 byte phases are made
    once (aligned views of a zero-padded copy) and each field is one gather, shift and mask: ~2x
    faster than gathering and merging bytes (11- and 12-bit ids at V = 151,936)."""
    starts = offset + width * np.arange(n)
    first, shift = starts >> 3, (starts & 7).astype(np.uint32)
    lo, R = int(first[0]), len(packed)
    m = -(-(int(first[-1]) + 4 - lo) // 4)  # words per phase
    buf = np.zeros((R, 4 * m + 3), np.uint8)  # zeros past the row: bits above every field, masked off
    have = min(packed.shape[1] - lo, 4 * m + 3)
    buf[:, :have] = packed[:, lo:lo + have]
    words = np.empty((R, 4, m), np.uint32)
    for phase in range(4):
        words[:, phase] = buf[:, phase:phase + 4 * m].view("<u4")
    rel = first - lo
    acc = np.take(words.reshape(R, 4 * m), (rel % 4) * m + rel // 4, axis=1)
    acc >>= shift
    acc &= np.uint32((1 << width) - 1)
    return acc



@lru_cache(maxsize=64)
def _spread_masks(width: int, slot: int) -> tuple[tuple[int, int, int], ...]:
    """(low mask, high mask, shift) per stage that moves ``64 // slot`` packed ``width``-bit fields of
    a uint64 into ``slot``-bit slots: each stage halves the blocks, moving every upper half up."""
    stages, h = [], 64 // slot // 2
    while h:
        low = up = 0
        for b in range(0, 64, 2 * h * slot):
            low |= ((1 << (h * width)) - 1) << b
            up |= ((1 << (h * width)) - 1) << (b + h * width)
        stages.append((low, up & (2**64 - 1), h * (slot - width)))
        h //= 2
    return tuple(stages)


def _read_spread(packed: np.ndarray, offset: int, n: int, width: int) -> np.ndarray | None:
    """:func:`_read_fields` for widths up to 16 bits, into uint8 (width <= 8) or uint16 slots: groups
    of g = 8 or 4 fields are read as one uint64 each (strided views, no gather) and spread into
    their slots by log2(g) whole-array shift-and-mask stages, so every pass is a contiguous SIMD
    one: ~2-3x faster than per-field gathers (6-bit values, 11/12-bit Elias-Fano low parts). None
    when a group does not fit a word."""
    slot = 8 if width <= 8 else 16
    g = 64 // slot
    group_bits = g * width
    phases = 8 // np.gcd(group_bits, 8)  # group starts repeat their bit phase after this many
    R, W = packed.shape
    bit0 = [(offset & 7) + group_bits * ph for ph in range(phases)]
    if max(b & 7 for b in bit0) + group_bits > 64:
        return None
    per = -(-(-(-n // g)) // phases)  # groups per phase
    stride = group_bits * phases // 8
    need = (offset >> 3) + (bit0[-1] >> 3) + stride * (per - 1) + 8
    if need > W or not packed.flags.c_contiguous:  # zeros past the row: bits above every field
        buf = np.zeros((R, max(need, W)), np.uint8)
        buf[:, :W] = packed
        packed = buf
    out = np.empty((R, per, phases), np.uint64)
    tmp = np.empty((R, per), np.uint64)
    for ph, b in enumerate(bit0):
        words = np.ndarray((R, per), np.uint64, packed, (offset >> 3) + (b >> 3), (packed.strides[0], stride))
        x = np.right_shift(words, np.uint64(b & 7))
        if group_bits < 64:
            x &= np.uint64((1 << group_bits) - 1)
        for low, up, shift in _spread_masks(width, slot):
            np.bitwise_and(x, np.uint64(up), out=tmp)
            x &= np.uint64(low)
            tmp <<= np.uint64(shift)
            x |= tmp
        if phases == 1:
            out = x
        else:
            out[:, :, ph] = x
    return out.reshape(R, -1).view(np.uint8 if slot == 8 else np.uint16)[:, :n]


# ---------------------------------------------------------------- ids
def encode_ids(indices: np.ndarray, num_classes: int) -> np.ndarray:
    """Sets of k distinct class ids ``[..., k]`` (any order) -> ``[..., W]`` uint8 (:func:`id_layout`)."""
    ids, lead = _rows(indices, None, "indices")
    k = ids.shape[1]
    lay = id_layout(k, num_classes)
    if not np.issubdtype(ids.dtype, np.integer):
        raise LogitCacheError(f"indices: expected integer class ids, got {ids.dtype}")
    s = np.sort(ids.astype(np.int64), axis=1)
    if len(s) and (s[:, 0].min() < 0 or s[:, -1].max() >= num_classes):
        raise LogitCacheError(f"indices: class ids must be in [0, {num_classes}), got {s.min()}..{s.max()}")
    repeats = (np.diff(s, axis=1) == 0).any(axis=1)
    if repeats.any():
        row = int(np.flatnonzero(repeats)[0])
        raise LogitCacheError(f"indices: row {row} repeats a class id; a top-k row is a set")
    bits = np.zeros((len(s), lay.nbytes * 8), np.uint8)
    y = s - np.arange(k)  # non-decreasing, in [0, C - k]
    np.put_along_axis(bits, (y >> lay.low_bits) + np.arange(k), 1, axis=1)
    low = y & ((1 << lay.low_bits) - 1)
    bits[:, lay.low_offset:lay.low_offset + k * lay.low_bits] = _field_bits(low, lay.low_bits)
    return np.packbits(bits, axis=1, bitorder="little").reshape(*lead, lay.nbytes)


def block_rows(k: int) -> int:
    """Rows per decode block."""
    return SUM_BLOCKS * _sum_rows(k)


def _sum_rows(k: int) -> int:
    """Rows per matmul of the stat's row sums (fixed: the decoded stat's bits depend on it)."""
    return max(1, BLOCK_VALUES // k)


def _ids_dtype(lay: IdLayout) -> np.dtype:
    """The dtype ids are computed in: the index dtype of C (what decode returns, so no cast pass and
    at uint16 a quarter of int64's traffic) when every id a row's bitmap can express fits it, else
    int64. The intermediate (position << L) - take wraps around in it, harmlessly: the arithmetic
    is exact modulo 2^bits, and the result fits."""
    out = np.dtype(index_dtype(lay.num_classes))
    top = ((8 * -(-lay.high_bits // 8) - lay.k) << lay.low_bits) + (1 << lay.low_bits) + lay.k
    return out if top < 2 ** (8 * out.itemsize - (out.kind == "i")) else np.dtype(np.int64)


@lru_cache(maxsize=16)
def _bit_starts(lay: IdLayout) -> tuple[np.ndarray, np.ndarray]:
    """Where each row's bitmap starts among a block's unpacked bits ``[block_rows(k)]``, and
    ``[block_rows(k), k]`` to take from (one's position << L) + low to get x_i: the i-th one sits at
    h_i + i and x_i = (h_i << L) + low_i + i, so that is (start << L) + i (2^L - 1); in
    :func:`_ids_dtype`, wrapped modulo its range."""
    rows, L = block_rows(lay.k), lay.low_bits
    starts = 8 * -(-lay.high_bits // 8) * np.arange(rows, dtype=np.int64)
    take = (starts[:, None] << L) + np.arange(lay.k, dtype=np.int64) * ((1 << L) - 1)
    return starts, take.astype(_ids_dtype(lay))


def _ids_block(p: np.ndarray, lay: IdLayout, out: np.ndarray | None = None) -> np.ndarray:
    """Ascending ids ``[R, k]`` (:func:`_ids_dtype`) of at most ``block_rows(k)`` rows, into ``out``
    when given (of that dtype)."""
    k, R, hb = lay.k, len(p), -(-lay.high_bits // 8)
    high = p[:, :hb]
    if lay.high_bits % 8 and lay.low_offset < 8 * hb:  # low fields share the bitmap's last byte
        high = high.copy()
        high[:, -1] &= (1 << lay.high_bits % 8) - 1
    # flat (contiguous) unpacking is ~2x faster than unpackbits along axis 1
    ones = np.flatnonzero(np.unpackbits(np.ascontiguousarray(high).reshape(-1), bitorder="little").view(bool))
    if ones.size != R * k:
        raise LogitCacheError(f"ids: {ones.size} ids in {R} rows, expected {k} per row (corrupt data)")
    starts, take = _bit_starts(lay)
    ones = ones.reshape(R, k)
    # ones come out row-major: a row with too many or too few of them shifts every later row,
    # and the first bad row then has a first or last one outside its own bitmap
    if R and ((ones[:, 0] < starts[:R]).any() or (ones[:, -1] >= starts[:R] + 8 * hb).any()):
        raise LogitCacheError(f"ids: some rows do not hold exactly {k} ids (corrupt data)")
    # the cast rides in the shift's pass
    pos = np.left_shift(ones, lay.low_bits, out=out, dtype=take.dtype, casting="unsafe")
    pos -= take[:R]
    if lay.low_bits:
        low = _read_fields(p, lay.low_offset, k, lay.low_bits)
        if low.dtype.itemsize == pos.dtype.itemsize:  # same bits (fields < 2^31): a same-type add, no cast loop
            low = low.view(pos.dtype)
        np.add(pos, low, out=pos, casting="unsafe")  # fields < 2^L fit pos's dtype
    if R and pos[:, -1].max() >= lay.num_classes:
        raise LogitCacheError(f"ids: decoded class id {pos[:, -1].max()} >= {lay.num_classes} classes "
                              "(corrupt data)")
    return pos


def decode_ids(packed: np.ndarray, k: int, num_classes: int) -> np.ndarray:
    """``[..., W]`` uint8 from :func:`encode_ids` -> ``[..., k]`` ascending ids (the index dtype of C)."""
    lay = id_layout(k, num_classes)
    p, lead = _rows(packed, lay.nbytes, "ids")
    if p.dtype != np.uint8:
        raise LogitCacheError(f"ids: expected uint8 rows, got {p.dtype}")
    out = np.empty((len(p), k), index_dtype(num_classes))
    B, direct = block_rows(k), _ids_dtype(lay) == out.dtype
    for a in range(0, len(p), B):
        if direct:
            _ids_block(p[a:a + B], lay, out=out[a:a + B])
        else:
            out[a:a + B] = _ids_block(p[a:a + B], lay)
    return out.reshape(*lead, k)


# ---------------------------------------------------------------- values
def encode_values(values: np.ndarray, value_bits: int = DEFAULT_VALUE_BITS) -> dict[str, np.ndarray]:
    """Logits ``[..., k]`` (in the order the ids are stored) -> ``codes``, ``offset``, ``step``."""
    _check_bits(value_bits)
    v, lead = _rows(values, None, "values")
    v = v.astype(np.float32)
    if np.isnan(v).any():
        raise LogitCacheError("values: NaN logits cannot be stored")
    v = np.clip(v, -FLOAT16_MAX, FLOAT16_MAX)
    offset = (v.max(axis=1) if v.size else np.zeros(len(v), np.float32)).astype(np.float16)
    o = offset.astype(np.float32)
    levels = (1 << value_bits) - 1
    with np.errstate(over="ignore"):  # spacing(65504) is inf; the largest float16 spacing is 32
        ulp = np.minimum(np.abs(np.spacing(offset)), 32).astype(np.float32)
    # a step of at least float16's spacing at the offset keeps the top value's code at 0
    need = np.maximum((o - (v.min(axis=1) if v.size else o)) / np.float32(levels), ulp)
    step = np.searchsorted(STEPS, need).astype(np.uint8)
    q = np.clip(np.rint((o[:, None] - v) / STEPS[step][:, None]), 0, levels).astype(np.uint32)
    if value_bits == 8:
        codes = q.astype(np.uint8)
    else:
        codes = np.packbits(_field_bits(q, value_bits), axis=1, bitorder="little")
    return {"codes": codes.reshape(*lead, codes.shape[1]), "offset": offset.reshape(lead),
            "step": step.reshape(lead)}


def decode_values(codes: np.ndarray, offset: np.ndarray, step: np.ndarray, k: int,
                  value_bits: int = DEFAULT_VALUE_BITS) -> np.ndarray:
    """The ``encode_values`` arrays -> float32 logits ``[..., k]`` in stored (id) order."""
    _check_bits(value_bits)
    c, lead = _rows(codes, -(-k * value_bits // 8), "codes")
    q = _read_fields(c, 0, k, value_bits)
    v = _drops(q, np.reshape(step, -1))
    v += np.reshape(offset, -1).astype(np.float32)[:, None]
    return v.reshape(*lead, k)


def _drops(q: np.ndarray, step: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Decoded value minus the row's offset: -q * step, float32 (exact: q < 2^16)."""
    return np.multiply(q, -STEPS[step.astype(np.uint8)][:, None], out=out, dtype=np.float32)


# ---------------------------------------------------------------- stat
def encode_stat(values: np.ndarray, stat: np.ndarray, kind: str) -> np.ndarray:
    """The stored float16 stat from the true (unquantised) values ``[..., k]`` and stat (module doc)."""
    _check_kind(kind)
    if np.isnan(stat).any():
        raise LogitCacheError("stat: NaN tail statistics cannot be stored")
    if kind == "multilabel":
        return np.asarray(stat, np.float32).astype(np.float16)
    mass = np.exp(np.asarray(values, np.float64) - np.asarray(stat, np.float64)[..., None]).sum(-1)
    tail = np.clip(1.0 - mass, 0.0, 1.0)
    with np.errstate(divide="ignore"):
        return (np.log(tail) - np.log1p(-tail)).astype(np.float16)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise LogitCacheError(f"kind {kind!r} is not one of {', '.join(KINDS)}")


# ---------------------------------------------------------------- rows
def encode(values: np.ndarray, indices: np.ndarray, stat: np.ndarray, num_classes: int, kind: str,
           value_bits: int = DEFAULT_VALUE_BITS) -> dict[str, np.ndarray]:
    """Target rows (as logitcache.targets.topk_targets gives them: ``[..., k]``, ``[..., k]``,
    ``[...]``) -> the fixed-shape arrays of :func:`array_specs`, rows first."""
    _check_kind(kind)
    v, lead = _rows(values, None, "values")
    i, _ = _rows(indices, v.shape[1], "indices")
    if i.shape[0] != v.shape[0] or np.shape(stat) != lead:
        raise LogitCacheError(f"values {np.shape(values)}, indices {np.shape(indices)} and stat "
                              f"{np.shape(stat)} do not describe the same rows")
    by_id = np.argsort(i, axis=1, kind="stable")
    out = {"ids": encode_ids(i, num_classes)}
    out.update(encode_values(np.take_along_axis(v, by_id, axis=1), value_bits))
    out["stat"] = encode_stat(v, np.reshape(stat, -1), kind)
    return {name: a.reshape(*lead, *a.shape[1:]) for name, a in out.items()}


def decode(arrays: dict[str, np.ndarray], k: int, num_classes: int, kind: str,
           value_bits: int = DEFAULT_VALUE_BITS, sort: bool = True
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The arrays of :func:`encode` -> (values float32, indices, stat float32) for kd_loss.

    ``sort``: values descending as top-k rows are (ties: lower id first); ``False`` leaves them in
    id order, which the losses do not mind (they gather and scatter by index) and is faster."""
    _check_kind(kind)
    specs = array_specs(k, num_classes, value_bits)
    missing = sorted(set(specs) - set(arrays))
    if missing:
        raise LogitCacheError(f"compact rows: missing array(s) {', '.join(missing)}")
    lead = np.shape(arrays["stat"])
    flat = {}
    for name, (dtype, shape) in specs.items():
        a = np.asarray(arrays[name])
        if a.shape != lead + shape or a.dtype != dtype:
            raise LogitCacheError(f"compact rows: {name} is {a.dtype} {a.shape}, "
                                  f"expected {dtype} {lead + shape}")
        flat[name] = a.reshape(-1, *shape)
    lay, N = id_layout(k, num_classes), len(flat["stat"])
    values, ids = np.empty((N, k), np.float32), np.empty((N, k), index_dtype(num_classes))
    stat = np.empty(N, np.float32)
    for a in range(0, N, block_rows(k)):
        rows = slice(a, a + block_rows(k))
        _decode_block({n: x[rows] for n, x in flat.items()}, lay, kind, value_bits, sort,
                      values[rows], ids[rows], stat[rows])
    return values.reshape(*lead, k), ids.reshape(*lead, k), stat.reshape(lead)


def _decode_block(rows: dict[str, np.ndarray], lay: IdLayout, kind: str, value_bits: int, sort: bool,
                  values: np.ndarray, ids: np.ndarray, stat: np.ndarray) -> None:
    """One block of encoded rows into the output slices ``values``, ``ids``, ``stat``."""
    direct = not sort and ids.dtype == _ids_dtype(lay)
    i = _ids_block(rows["ids"], lay, out=ids if direct else None)
    q = _read_fields(rows["codes"], 0, lay.k, value_bits)
    if sort:
        q = _sort_by_code(q, i, value_bits, lay.num_classes, ids)
    elif not direct:
        ids[...] = i
    w = _drops(q, rows["step"], out=values)  # the offset is added last, in place
    o = rows["offset"].astype(np.float32)
    if kind == "multiclass":
        # the top code is 0 (w = 0), so no exp overflows; matmul sums short rows ~6x faster than sum()
        e, lse, S = np.exp(w), np.empty(len(w), np.float32), _sum_rows(lay.k)
        for a in range(0, len(w), S):
            np.matmul(e[a:a + S], np.ones(lay.k, np.float32), out=lse[a:a + S])
        np.log(lse, out=lse)
        lse += o
        # log(1 / (1 - t)) = softplus(logit t): the decoded top-k mass is exactly 1 - t
        np.add(lse, _softplus16()[rows["stat"].view(np.uint16)], out=stat)
    else:
        stat[...] = rows["stat"]
    values += o[:, None]


@lru_cache(maxsize=1)
def _softplus16() -> np.ndarray:
    """float32 softplus (numpy's logaddexp(0, x), so bit for bit the same) of every float16, by its
    bits: a lookup instead of ~20 ns of logaddexp per row."""
    x = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
    with np.errstate(invalid="ignore"):
        return np.logaddexp(np.float32(0), x)


def _sort_by_code(q: np.ndarray, ids: np.ndarray, value_bits: int, num_classes: int,
                  out_ids: np.ndarray) -> np.ndarray:
    """Codes of each row ascending (values descending), ties by id; the ids in that order go to
    ``out_ids``. One in-place sort of (code, id) integer keys: numpy's SIMD sort does that ~5x
    faster than an argsort of the values."""
    shift = max(1, (num_classes - 1).bit_length())
    dtype = np.int32 if value_bits + shift <= 31 else np.int64
    key = np.left_shift(q, shift, dtype=dtype)
    key |= ids.view(dtype) if ids.dtype.itemsize == key.itemsize else ids  # ids < 2^shift: same bits
    key.sort(axis=1)
    np.bitwise_and(key, dtype((1 << shift) - 1), out=out_ids, casting="unsafe")
    key >>= dtype(shift)
    return key


# ---------------------------------------------------------------- the registered codec
from logitcache.codecs import FLOAT16_MAX as _CLAMP, TargetCodec, register_codec  # noqa: E402


@register_codec
class CompactCodec(TargetCodec):
    """The arrays of :func:`array_specs` per row (frames included); option ``value_bits``."""

    name = "compact"

    @classmethod
    def default_options(cls, value_dtype: str = "float16") -> dict:
        return {"value_bits": DEFAULT_VALUE_BITS}

    @property
    def value_bits(self) -> int:
        return int(self.options.get("value_bits", DEFAULT_VALUE_BITS))

    def fields(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {n: (d, (*self.frame, *s)) for n, (d, s) in array_specs(self.k, self.num_classes,
                                                                         self.value_bits).items()}

    def encode(self, logits, seeds=None):
        import torch

        from logitcache.targets import topk_targets

        values, indices, stat = topk_targets(logits, self.k, self.kind)
        return {"values": values.clamp(-_CLAMP, _CLAMP), "indices": indices.to(torch.int64), "stat": stat.float()}

    def pack(self, host: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return encode(host["values"], host["indices"], host["stat"], self.num_classes, self.kind, self.value_bits)

    def decode(self, arrays: dict[str, np.ndarray], sort: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return decode(arrays, self.k, self.num_classes, self.kind, self.value_bits, sort=sort)

    def check(self, rows: dict[str, np.ndarray]) -> list[tuple[str, str]]:
        bad = []
        if "offset" in rows and not np.isfinite(rows["offset"]).all():
            bad.append(("offset", f"{int((~np.isfinite(rows['offset'])).sum())} non-finite value(s)"))
        if "stat" in rows and np.isnan(rows["stat"]).any():
            bad.append(("stat", f"{int(np.isnan(rows['stat']).sum())} NaN value(s)"))
        if "ids" in rows:
            try:
                decode_ids(rows["ids"], self.k, self.num_classes)
            except LogitCacheError as e:
                bad.append(("ids", str(e).removeprefix("ids: ")))
        return bad
