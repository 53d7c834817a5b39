"""Decode speed of the ``compact`` codec: this tree's against a baseline commit's, side by side.

The baseline is ``logitcache/codecs/compact.py`` as of ``--baseline`` (a git revision of this
repository, default ``bdd2986``: before the decode round of the third session), loaded as a
separate module from ``git show``; the current one is the installed ``logitcache.codecs.compact``.
Both decode the same encoded rows (synthetic top-k rows: values N(0, 3) sorted, distinct random
ids, a tail of mass ~0.4), one thread, one process. Cases (rows are decoded whole, as a cache chunk
is; 6-bit values, the default):

  lm k=32 / k=64   token rows at V = 151,936 in id order (``sort=False``: what training reads),
                   multiclass, 64Ki / 32Ki rows
  audio mc / ml    top-20 of 527, id order, multiclass / multilabel, 128Ki rows (issue 10's
                   figure: bench_codecs.py's "decode rows/s (id order)")
  ... sorted       the same, values sorted descending (``sort=True``)

Every round times both decoders on every case in alternating order; reported: median rows per
second of CPU time (``time.process_time``) and of wall time, per decoder, and the median of the
per-round paired ratios new / baseline (CPU). Before timing, the outputs are checked bit for bit
(values, ids, stat) against the baseline's on every case.

    python benchmarks/bench_compact_decode.py            # ~45 s (21 rounds)
    python benchmarks/bench_compact_decode.py --quick    # ~10 s (5 rounds, a quarter of the rows)
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy: the stat's matmul row sums, one thread
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from logitcache.codecs import compact as current  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CASES = [("lm k=32", 32, 151_936, "multiclass", False, 65_536),
         ("lm k=64", 64, 151_936, "multiclass", False, 32_768),
         ("audio mc", 20, 527, "multiclass", False, 131_072),
         ("audio ml", 20, 527, "multilabel", False, 131_072),
         ("lm k=32 sorted", 32, 151_936, "multiclass", True, 65_536),
         ("audio mc sorted", 20, 527, "multiclass", True, 131_072)]


def baseline_module(rev: str):
    """``compact.py`` at ``rev`` as its own module (the registry keeps the current codec)."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:logitcache/codecs/compact.py"],
                         check=True, capture_output=True, text=True).stdout
    src = src.replace("@register_codec\n", "")  # do not replace the registered current codec
    path = Path(tempfile.mkdtemp(prefix="compact-baseline-")) / "compact_baseline.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("compact_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["compact_baseline"] = mod
    spec.loader.exec_module(mod)
    return mod


def rows(k: int, V: int, kind: str, n: int, rng) -> dict[str, np.ndarray]:
    v = -np.sort(-rng.standard_normal((n, k)).astype(np.float32) * 3, axis=1)
    pool = np.stack([rng.choice(V, k, replace=False) for _ in range(256)])
    ids = pool[rng.integers(0, 256, n)]
    if kind == "multiclass":
        stat = (np.log(np.exp(v.astype(np.float64)).sum(1)) + 0.5).astype(np.float32)
    else:
        stat = rng.standard_normal(n).astype(np.float32)
    return current.encode(v, ids, stat, V, kind)


def timed(fn) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    p = C.parser(__doc__)
    p.add_argument("--baseline", default="bdd2986", help="git revision to compare against")
    args = p.parse_args()
    base = baseline_module(args.baseline)
    rounds = 5 if args.quick else 21
    rng = np.random.default_rng(0)
    data = {}
    for name, k, V, kind, sort, n in CASES:
        n = n // 4 if args.quick else n
        data[name] = rows(k, V, kind, n, rng)
        for a, b in zip(current.decode(data[name], k, V, kind, sort=sort),
                        base.decode(data[name], k, V, kind, sort=sort)):
            assert a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8)), name
    print(f"# machine: {C.machine()}")
    print(f"# baseline {args.baseline}; outputs bit-identical to it on every case")
    res = {(name, who): [] for name, *_ in CASES for who in ("base", "new")}
    for r in range(rounds):
        for name, k, V, kind, sort, n in CASES:
            order = [("base", base), ("new", current)]
            for who, mod in (order if r % 2 == 0 else order[::-1]):
                res[(name, who)].append(timed(lambda: mod.decode(data[name], k, V, kind, sort=sort)))
    out, ratios = [], []
    for name, k, V, kind, sort, n in CASES:
        n = len(data[name]["stat"])
        b, c = res[(name, "base")], res[(name, "new")]
        ratio = C.median([bb[1] / cc[1] for bb, cc in zip(b, c)])
        out.append([name, k, V, kind, "sorted" if sort else "id order", n,
                    n / C.median([x[1] for x in b]) / 1e6, n / C.median([x[1] for x in c]) / 1e6,
                    n / C.median([x[0] for x in b]) / 1e6, n / C.median([x[0] for x in c]) / 1e6, ratio])
        ratios.append(f"{name} {ratio:.2f}x")
    print(C.table(["case", "k", "C", "kind", "order", "rows", "base M rows/CPU s", "new M rows/CPU s",
                   "base M rows/s wall", "new M rows/s wall", "speedup (CPU, paired)"], out))
    print(f"ratios: new vs {args.baseline} (median of {rounds} paired rounds, CPU time): "
          + ", ".join(ratios))


if __name__ == "__main__":
    main()
