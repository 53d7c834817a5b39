"""Manifest size of a token cache: the vocabulary described (now) against its V names listed (before).

A tiny token corpus of vocabulary V (a flat uint32 .bin, 25 tokens) is dumped with one synthetic
LM teacher (top-4); the cache's manifest JSON is measured as written (``vocabulary``: size and
fingerprint) and as the same manifest with the V class names ``"0"`` .. ``"V-1"`` listed in
``classes`` instead (what logitcache wrote before, and what caches from then still hold). Also
the time to open the cache both ways (the JSON is parsed on every open), median of interleaved
rounds. Bytes are exact; the open times are noisy on a shared box.

    python benchmarks/bench_manifest_vocab.py              # V = 262,144 and 151,936 (about 30 s)
    python benchmarks/bench_manifest_vocab.py --quick      # V = 262,144 only
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _common import parser, workdir  # noqa: E402


def corpus(folder: Path, vocab: int, n: int = 25, block: int = 8) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "c.bin").write_bytes(np.random.default_rng(0).integers(0, vocab, n).astype("uint32").tobytes())
    (folder / "c.json").write_text(json.dumps({"vocab_size": vocab, "dtype": "uint32", "block_size": block}))
    return folder / "c.bin"


def measure(root: Path, vocab: int, rounds: int) -> dict:
    import zarr

    from logitcache import open_cache
    from logitcache.dump import dump
    from logitcache.layout import config_digest

    data = corpus(root / f"v{vocab}", vocab)
    now = dump(data, ["toy_lm_teachers:synthetic"], root / f"now{vocab}.zarr", topk=4, num_workers=0,
               teacher_args={"vocab_size": vocab, "context": 8}, progress=False)
    m = open_cache(now).manifest
    listed = {k: v for k, v in m.items() if k != "vocabulary"} | {"classes": [str(i) for i in range(vocab)]}
    listed["config_digest"] = config_digest(listed)
    before = Path(str(now).replace("now", "before"))
    import shutil

    shutil.copytree(now, before)
    zarr.open_group(str(before), mode="r+").attrs["logitcache"] = listed
    times = {"now": [], "before": []}
    for _ in range(rounds):  # interleaved, so drifts of the box hit both alike
        for name, path in (("now", now), ("before", before)):
            t = time.perf_counter()
            with open_cache(path) as c:
                assert len(c.classes) == vocab
            times[name].append(time.perf_counter() - t)
    return {"vocab": vocab, "bytes_now": len(json.dumps(m)), "bytes_listed": len(json.dumps(listed)),
            "open_s_now": statistics.median(times["now"]), "open_s_listed": statistics.median(times["before"])}


def main() -> None:
    args = parser(__doc__).parse_args()
    root = workdir(args.workdir)
    vocabs = [262_144] if args.quick else [262_144, 151_936]
    print(f"{'V':>8} {'manifest now':>13} {'names listed':>13} {'ratio':>8} {'open now':>9} {'open listed':>12}")
    for v in vocabs:
        r = measure(root, v, 3 if args.quick else 7)
        print(f"{r['vocab']:>8,} {r['bytes_now']:>11,} B {r['bytes_listed']:>11,} B "
              f"{r['bytes_listed'] / r['bytes_now']:>7.0f}x {r['open_s_now'] * 1e3:>7.1f} ms "
              f"{r['open_s_listed'] * 1e3:>9.1f} ms")


if __name__ == "__main__":
    main()
