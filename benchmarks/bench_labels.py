"""Start-up label work at AudioSet scale: the old dense [N, C] matrix against the sparse LabelTable.

Writes a synthetic labels.csv of N samples (default 2M; --quick 200k) with AudioSet-like ids
(``audio/<11-char YouTube id>_<start ms>.wav``) and 1-3 of 527 classes per row (``/m/...``
machine ids, listed in classes.txt); no audio files (opening a folder reads none). Then, each in
a fresh subprocess so one's memory does not count against the other:

  old     what AudioFolder(root) did before labels went sparse: the whole file decoded, a
          (id, [names]) tuple per row, then a dense float32 [N, C] 0/1 matrix (a faithful copy
          of that code, kept here as the reference)
  new     AudioFolder(root) today: labels.csv streamed into a LabelTable (CSR), ids + index

and prints, per way, the peak resident memory of the process (VmHWM), that above its peak
after importing logitcache (torch and all: every command pays it, label work or not), the wall time, and the old/new ratios. Goal: new < 1 GB at 2M samples. It also checks
that both give the same dense rows for a few thousand random samples.

    python benchmarks/bench_labels.py            # ~2-3 min on 2 cores; "old" needs ~6 GB free memory
    python benchmarks/bench_labels.py --quick
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parser, workdir  # noqa: E402

NUM_CLASSES = 527
CHECK_ROWS = 4096
ALPHABET = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"))


def write_folder(root: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    classes = [f"/m/0{''.join(ALPHABET[rng.integers(0, 36, 4)])}{i}" for i in range(NUM_CLASSES)]  # like /m/09x0r
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    yt = ["".join(r) for r in ALPHABET[rng.integers(0, len(ALPHABET), (n, 11))]]
    starts = rng.integers(0, 300, n) * 1000
    counts = rng.integers(1, 4, n)
    picks = rng.integers(0, NUM_CLASSES, (n, 3))
    with open(root / "labels.csv", "w") as f:
        f.write("filename,labels\n")
        for i in range(n):
            names = ";".join(classes[c] for c in picks[i, :counts[i]])
            f.write(f"audio/{yt[i]}_{starts[i]}.wav,{names}\n")


def old_dense(root: Path):
    """The label work of AudioFolder.__init__ before the sparse table (reference copy)."""
    import csv
    import io

    from logitcache.data import _leaves_folder, _read_text

    path = root / "labels.csv"
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    rows, seen = [], set()
    for r in reader:
        sample_id = (r["filename"] or "").strip()
        assert sample_id and sample_id not in seen and not _leaves_folder(sample_id)
        seen.add(sample_id)
        rows.append((sample_id, [c.strip() for c in (r["labels"] or "").split(";") if c.strip()]))
    ids = [r[0] for r in rows]
    classes = [c.strip() for c in _read_text(root / "classes.txt").splitlines() if c.strip()]
    class_index = {c: i for i, c in enumerate(classes)}
    labels = np.zeros((len(rows), len(classes)), dtype=np.float32)
    for row, (_, names) in enumerate(rows):
        for c in names:
            labels[row, class_index[c]] = 1.0
    index = {s: i for i, s in enumerate(ids)}
    return ids, index, labels


def peak_rss_kb() -> int:
    """Peak resident memory of this process, KiB. Linux's VmHWM, not ru_maxrss: a child's
    ru_maxrss starts at its parent's RSS at fork (the parent holding the generated rows here)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child(way: str, root: Path, check: Path) -> None:
    """Runs in the subprocess: one way, its memory and time, and the rows to compare."""
    import logitcache  # noqa: F401  (what every command imports anyway: not the label work)
    from logitcache.data import AudioFolder

    base = peak_rss_kb()
    t0 = time.perf_counter()
    if way == "old":
        ids, _, labels = old_dense(root)
        n = len(ids)
        rows = lambda index: labels[index]  # noqa: E731
    else:
        folder = AudioFolder(root)
        n = len(folder)
        rows = folder.label_rows
    seconds = time.perf_counter() - t0
    peak = peak_rss_kb()
    index = np.random.default_rng(1).choice(n, min(CHECK_ROWS, n), replace=False)
    np.save(check / f"{way}.npy", rows(index))
    print(json.dumps({"samples": n, "seconds": seconds, "peak_kb": peak, "above_imports_kb": peak - base}))


def run(way: str, root: Path, check: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", way, str(root), str(check)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--samples", type=int, default=None, help="rows of labels.csv (default 2M; --quick 200k)")
    p.add_argument("--child", nargs=3, help=ARG_HELP_INTERNAL)
    args = p.parse_args()
    if args.child:
        return child(args.child[0], Path(args.child[1]), Path(args.child[2]))
    n = args.samples or (200_000 if args.quick else 2_000_000)
    root = workdir(args.workdir) / f"labels_{n}"
    t0 = time.perf_counter()
    if not (root / "labels.csv").is_file():
        write_folder(root, n)
    mb = (root / "labels.csv").stat().st_size / 2**20
    print(f"labels.csv: {n:,} rows, {NUM_CLASSES} classes, {mb:.0f} MiB (written in {time.perf_counter() - t0:.0f} s)")
    got = {way: run(way, root, root) for way in ("new", "old")}
    print(f"{'way':6} {'peak RSS MiB':>13} {'imports MiB':>12} {'label work MiB':>15} {'seconds':>8}")
    for way, r in got.items():
        print(f"{way:6} {r['peak_kb'] / 1024:13.0f} {(r['peak_kb'] - r['above_imports_kb']) / 1024:12.0f} "
              f"{r['above_imports_kb'] / 1024:15.0f} {r['seconds']:8.1f}")
    ratio = got["old"]["above_imports_kb"] / max(got["new"]["above_imports_kb"], 1)
    print(f"old/new: label work memory x{ratio:.1f}, peak RSS x{got['old']['peak_kb'] / got['new']['peak_kb']:.1f}, "
          f"time x{got['old']['seconds'] / got['new']['seconds']:.2f}")
    same = np.array_equal(np.load(root / "old.npy"), np.load(root / "new.npy"))
    print(f"same dense rows for {min(CHECK_ROWS, n)} random samples: {same}")
    goal = got["new"]["peak_kb"] < 2**20
    print(f"goal (new peak RSS, imports included, < 1 GiB): {'met' if goal else 'NOT met'}")


ARG_HELP_INTERNAL = "internal: run one way in this process (way, folder, where to save rows)"

if __name__ == "__main__":
    main()
