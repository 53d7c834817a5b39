"""Stress test (not part of the suite): flip one random byte in every stored chunk of every array
of a small cache, one chunk at a time, and check that ``verify`` names that array each time.

    python tests/stress/flip_bytes.py                 # both backends, ~2 minutes on 2 CPU cores
    python tests/stress/flip_bytes.py --backend hdf5 --seed 3

zarr chunks are checked by their crc32c codec, HDF5 chunks by the fletcher32 filter; the suite
(tests/test_reliability.py) flips one chunk per array at once.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
for p in (TESTS, TESTS / "stress"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from kill_resume import DUMP_KW, TEACHERS  # noqa: E402


def _flip(path: Path, offset: int) -> bytes:
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(1)
        f.seek(offset)
        f.write(bytes([old[0] ^ 0xFF]))
    return old


def _restore(path: Path, offset: int, old: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(old)


def _zarr_chunks(cache: Path):
    """(array name, chunk file) for every chunk file of every array."""
    for meta in sorted(cache.rglob("zarr.json")):
        folder = meta.parent
        if folder == cache or not (folder / "c").is_dir():
            continue
        name = folder.relative_to(cache).as_posix()
        for f in sorted((folder / "c").rglob("*")):
            if f.is_file():
                yield name, f


def _hdf5_chunks(cache: Path):
    """(array name, byte offset, size) for every chunk of every dataset."""
    import h5py

    out = []
    with h5py.File(cache, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and obj.chunks:
                for i in range(obj.id.get_num_chunks()):
                    info = obj.id.get_chunk_info(i)
                    out.append((name, info.byte_offset, info.size))
        f.visititems(visit)
    return out


def _named(problems: list[str], name: str) -> bool:
    head = "ids" if name.startswith("ids/") else name
    return any(p.startswith(f"{head}:") for p in problems)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["zarr", "hdf5", "both"], default="both")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import logitcache
    from logitcache.report import verify_cache
    from logitcache.synth import make_dataset

    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="flip_bytes_"))
    data = make_dataset(root / "data", 24, sample_rate=16000, clip_seconds=1.0, seed=0)
    suffixes = {"zarr": [".zarr"], "hdf5": [".h5"], "both": [".zarr", ".h5"]}[args.backend]
    total = missed = 0
    started = time.time()
    for suffix in suffixes:
        cache = logitcache.dump(data, TEACHERS, root / f"cache{suffix}", epochs=2, **DUMP_KW)
        assert verify_cache(cache)["ok"]
        if suffix == ".zarr":
            targets = [(name, f, rng.randrange(f.stat().st_size)) for name, f in _zarr_chunks(cache)]
        else:
            targets = [(name, cache, off + rng.randrange(size)) for name, off, size in _hdf5_chunks(cache)]
        found = 0
        for name, path, offset in targets:
            old = _flip(path, offset)
            problems = verify_cache(cache)["problems"]
            _restore(path, offset, old)
            if _named(problems, name):
                found += 1
            else:
                print(f"{suffix}: MISSED a flipped byte in {name} ({path.name} @ {offset}): {problems[:3]}")
        total += len(targets)
        missed += len(targets) - found
        print(f"{suffix}: {found} of {len(targets)} flipped chunks detected and named "
              f"({len({t[0] for t in targets})} arrays)", flush=True)
        assert verify_cache(cache)["ok"]  # every flip was undone
    print(f"\n{total - missed} of {total} corruptions detected in {time.time() - started:.0f} s")
    shutil.rmtree(root, ignore_errors=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
