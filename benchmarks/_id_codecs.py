"""Other ways to store a top-k id set, measured against compact's Elias-Fano (bench_codecs.py).

Each ``encode(ids [R, k] sorted, C) -> (packed [R, W] uint8 or object rows, W)`` and
``decode(packed, k, C) -> [R, k]``; decoders are vectorised over rows the best way I found in
numpy (a loop over the k elements at most), so the comparison is about the codes, not the effort.
Variable-length codes get a fixed row width W = the largest row in the data they are given: a
real format would need an escape for rarer, longer rows on top.
"""

from __future__ import annotations

import math

import numpy as np


def _gaps(ids: np.ndarray) -> np.ndarray:
    """x_0, then x_i - x_{i-1} - 1 (>= 0 for a sorted set)."""
    g = ids.astype(np.int64).copy()
    g[:, 1:] = np.diff(ids.astype(np.int64), axis=1) - 1
    return g


def _pack(bit_rows: np.ndarray) -> np.ndarray:
    return np.packbits(bit_rows, axis=1, bitorder="little")


def _next_one(u: np.ndarray) -> np.ndarray:
    """[R, n+1]: the position of the first one at or after each position (n if none)."""
    R, n = u.shape
    idx = np.where(u.astype(bool), np.arange(n), n)
    out = np.minimum.accumulate(idx[:, ::-1], axis=1)[:, ::-1]
    return np.concatenate([out, np.full((R, 1), n)], axis=1)


def _window(u: np.ndarray, width: int) -> np.ndarray:
    """[R, n+1]: the ``width`` bits from each position read MSB first (zeros past the end)."""
    R, n = u.shape
    padded = np.concatenate([u.astype(np.int64), np.zeros((R, width + 1), np.int64)], axis=1)
    out = np.zeros((R, n + 1), np.int64)
    for j in range(width):
        out = (out << 1) | padded[:, j:j + n + 1]
    return out


# ---------------------------------------------------------------- fixed-width gaps, 4-bit header
def fixed_gaps_encode(ids: np.ndarray, C: int):
    R, k = ids.shape
    g = _gaps(ids)
    first_bits = max(1, (C - 1).bit_length())
    w = np.zeros(R, np.int64) if k == 1 else np.array([int(x).bit_length() for x in g[:, 1:].max(1)])
    nbits = 4 + first_bits + (k - 1) * w
    W = int(-(-nbits.max() // 8))
    bits = np.zeros((R, 8 * W), np.uint8)
    for j in range(4):
        bits[:, j] = (w >> j) & 1
    for j in range(first_bits):
        bits[:, 4 + j] = (g[:, 0] >> j) & 1
    rows = np.arange(R)
    for i in range(1, k):
        for j in range(int(w.max())):
            on = j < w
            bits[rows[on], 4 + first_bits + (i - 1) * w[on] + j] = (g[on, i] >> j) & 1
    return _pack(bits), W


def fixed_gaps_decode(packed: np.ndarray, k: int, C: int) -> np.ndarray:
    R = len(packed)
    first_bits = max(1, (C - 1).bit_length())
    w = (packed[:, 0] & 15).astype(np.int64)
    first = _fields(packed, np.full((R, 1), 4), first_bits)[:, 0]
    offs = 4 + first_bits + w[:, None] * np.arange(k - 1)
    gaps = _fields(packed, offs, w[:, None]) + 1
    out = np.empty((R, k), np.int64)
    out[:, 0] = first
    out[:, 1:] = first[:, None] + np.cumsum(gaps, axis=1)
    return out


def _fields(packed: np.ndarray, offs: np.ndarray, width) -> np.ndarray:
    """Per-element LSB-first fields at per-element bit offsets (widths up to 25 bits)."""
    W = packed.shape[1]
    first = offs >> 3
    acc = np.zeros(offs.shape, np.int64)
    for j in range(4):
        acc |= np.take_along_axis(packed, np.minimum(first + j, W - 1), axis=1).astype(np.int64) << (8 * j)
    return (acc >> (offs & 7)) & ((np.int64(1) << width) - 1)


# ---------------------------------------------------------------- Golomb-Rice
def rice_parameter(k: int, C: int) -> int:
    """The b that minimises the worst-case row k (b + 1) + ((C - k) >> b)."""
    return min(range(max(1, C.bit_length())), key=lambda b: k * (b + 1) + ((C - k) >> b))


def rice_encode(ids: np.ndarray, C: int):
    """Gaps as unary(g >> b) (zeros, then a one) + b bits MSB first. The gaps sum to at most
    C - k, so every row fits k (b + 1) + ((C - k) >> b) bits: a fixed width without escape."""
    R, k = ids.shape
    b = rice_parameter(k, C)
    W = -(-(k * (b + 1) + ((C - k) >> b)) // 8)
    g = _gaps(ids)
    q = g >> b
    lengths = q + 1 + b
    starts = np.concatenate([np.zeros((R, 1), np.int64), np.cumsum(lengths, axis=1)[:, :-1]], axis=1)
    bits = np.zeros((R, 8 * W), np.uint8)
    rows = np.repeat(np.arange(R), k)
    one = (starts + q).ravel()
    bits[rows, one] = 1
    for j in range(b):
        bits[rows, one + 1 + j] = ((g.ravel() >> (b - 1 - j)) & 1)
    return _pack(bits), W


def rice_decode(packed: np.ndarray, k: int, C: int) -> np.ndarray:
    b = rice_parameter(k, C)
    u = np.unpackbits(packed, axis=1, bitorder="little")
    nxt, rem = _next_one(u), _window(u, b)
    rows = np.arange(len(packed))
    pos = np.zeros(len(packed), np.int64)
    out = np.empty((len(packed), k), np.int64)
    prev = np.full(len(packed), -1, np.int64)
    for i in range(k):
        one = nxt[rows, pos]
        prev = prev + 1 + (((one - pos) << b) | rem[rows, one + 1])
        out[:, i] = prev
        pos = one + 1 + b
    return out


# ---------------------------------------------------------------- Elias-gamma
def gamma_encode(ids: np.ndarray, C: int):
    """Each gap + 1 = x as floor(log2 x) zeros, then x MSB first (its leading one ends the zeros)."""
    R, k = ids.shape
    x = _gaps(ids) + 1
    n = np.floor(np.log2(x)).astype(np.int64)
    lengths = 2 * n + 1
    starts = np.concatenate([np.zeros((R, 1), np.int64), np.cumsum(lengths, axis=1)[:, :-1]], axis=1)
    W = int(-(-lengths.sum(1).max() // 8))
    bits = np.zeros((R, 8 * W), np.uint8)
    for i in range(k):
        for j in range(int(n[:, i].max()) + 1):
            on = j <= n[:, i]
            bits[np.flatnonzero(on), (starts[on, i] + n[on, i] + j)] = (x[on, i] >> (n[on, i] - j)) & 1
    return _pack(bits), W


def gamma_decode(packed: np.ndarray, k: int, C: int) -> np.ndarray:
    width = C.bit_length() + 1
    u = np.unpackbits(packed, axis=1, bitorder="little")
    nxt, win = _next_one(u), _window(u, width)
    rows = np.arange(len(packed))
    pos = np.zeros(len(packed), np.int64)
    out = np.empty((len(packed), k), np.int64)
    prev = np.full(len(packed), -1, np.int64)
    for i in range(k):
        one = nxt[rows, pos]
        n = one - pos
        prev = prev + (win[rows, one] >> (width - n - 1))
        out[:, i] = prev
        pos = one + n + 1
    return out


# ---------------------------------------------------------------- combinatorial number system
def cns_bytes(k: int, C: int) -> int:
    return -(-(math.comb(C, k) - 1).bit_length() // 8)


def cns_encode(ids: np.ndarray, C: int):
    """The rank of the set among all C-choose-k sets: sum of comb(x_i, i + 1). Python integers."""
    W = cns_bytes(ids.shape[1], C)
    ranks = [sum(math.comb(int(x), i + 1) for i, x in enumerate(row)) for row in ids]
    return np.array([list(r.to_bytes(W, "little")) for r in ranks], np.uint8).reshape(len(ids), W), W


def cns_decode(packed: np.ndarray, k: int, C: int) -> np.ndarray:
    """Per row, per element a binary search for the largest x with comb(x, i) <= rank."""
    out = np.empty((len(packed), k), np.int64)
    for r, row in enumerate(packed):
        n = int.from_bytes(row.tobytes(), "little")
        hi = C
        for i in range(k, 0, -1):
            lo = i - 1
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if math.comb(mid, i) <= n:
                    lo = mid
                else:
                    hi = mid
            out[r, i - 1] = lo
            n -= math.comb(lo, i)
            hi = lo
    return out
