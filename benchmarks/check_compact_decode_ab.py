"""Bit-identity of the compact decode against a baseline commit's, on many random combinations.

Encodes random top-k rows (k 1..100, C 16..262,144, value_bits 1..16, multiclass / multilabel, 1..9,000
rows across decode-block boundaries, value scales 0.01..40) with both the current and the baseline
``compact.py`` (loaded from git as bench_compact_decode.py does), checks the encoded arrays are equal,
then decode (sorted and id order) and decode_ids byte for byte, and random corrupt id rows (the same
error text or the same result). Prints the differing rows if any; exit status 1 then.

    python benchmarks/check_compact_decode_ab.py [SEED] [--baseline REV]   # ~1 min per seed
"""
import argparse
import itertools
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_compact_decode import baseline_module  # noqa: E402

from logitcache.codecs import compact as new  # noqa: E402

ap = argparse.ArgumentParser(description="compact decode: bit-identity against a baseline commit")
ap.add_argument("seed", nargs="?", type=int, default=0)
ap.add_argument("--baseline", default="bdd2986")
args = ap.parse_args()
old = baseline_module(args.baseline)
rng = np.random.default_rng(args.seed)
failed = 0


def rows(k: int, C: int, kind: str, N: int, scale: float):
    v = -np.sort(-rng.standard_normal((N, k)).astype(np.float32) * scale, 1)
    if C <= 4000:
        i = np.argsort(rng.random((N, C)), axis=1)[:, :k]
    else:
        pool = np.stack([rng.choice(C, k, replace=False) for _ in range(min(N, 64))])
        i = pool[np.arange(N) % min(N, 64)]
    s = (np.log(np.exp(v.astype(np.float64)).sum(1)) + rng.random(N) * 3).astype(np.float32)
    if kind == "multilabel":
        s = rng.standard_normal(N).astype(np.float32) * 4
    return v, i, s


def decode_ids_or_error(module, packed, k, C):
    try:
        return module.decode_ids(packed, k, C)
    except Exception as e:  # noqa: BLE001 - the error text is what is compared
        return str(e)


n = 0
for k, C, bits, kind in itertools.product([1, 3, 7, 8, 16, 20, 32, 50, 64, 100],
                                          [16, 100, 527, 1000, 32768, 50257, 151936, 262144],
                                          [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16], ["multiclass", "multilabel"]):
    if k > C or rng.random() > 0.35:
        continue
    N = int(rng.choice([1, 5, 333, 4097, 9000]))
    scale = float(rng.choice([0.01, 1, 5, 40]))
    v, i, s = rows(k, C, kind, N, scale)
    a, b = new.encode(v, i, s, C, kind, bits), old.encode(v, i, s, C, kind, bits)
    assert all(np.array_equal(a[name], b[name]) for name in a), (k, C, bits, kind)
    for sort in (True, False):
        mine, theirs = new.decode(a, k, C, kind, bits, sort=sort), old.decode(a, k, C, kind, bits, sort=sort)
        for p, q in zip(mine, theirs):
            if p.dtype != q.dtype or not np.array_equal(p.view(np.uint8), q.view(np.uint8)):
                bad = np.flatnonzero((p != q).reshape(N, -1).any(1))
                print("DIFF", k, C, bits, kind, sort, N, scale, p.dtype, q.dtype, len(bad), bad[:8])
                failed += 1
    assert np.array_equal(new.decode_ids(a["ids"], k, C), old.decode_ids(a["ids"], k, C))
    n += 1
for k, C in [(32, 151936), (64, 151936), (20, 527)]:  # corrupt ids: the same error or the same result
    packed = rng.integers(0, 256, (50, new.id_layout(k, C).nbytes), dtype=np.uint8)
    for r in range(50):
        x = decode_ids_or_error(new, packed[r:r + 1], k, C)
        y = decode_ids_or_error(old, packed[r:r + 1], k, C)
        if not ((x == y) if isinstance(x, str) else np.array_equal(x, y)):
            print("DIFF corrupt ids", k, C, r, x, y)
            failed += 1
print(f"{n} combos x 2 orders and 150 corrupt id rows checked against {args.baseline}: {failed} differ")
sys.exit(1 if failed else 0)
