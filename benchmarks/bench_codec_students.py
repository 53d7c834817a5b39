"""Students from `topk`, `compact` and `sampled` caches of the demo: the quality cost of the bytes saved.

The demo's data and teachers (logitcache.demo: synthetic 10-class multilabel audio, three small
teachers trained on labels) are made once in --workdir and reused. The same teachers, views
(seed) and epochs are dumped three times, once per codec, at the demo's top-5:

  topk      float16 values + uint8 ids + float32 stat: 19 B per target set (C = 10, k = 5)
  compact   8-bit values (default --value-bits): 12 B
  sampled   --sample-n N ids drawn at T = 1, trained at T = 1 (unbiased); 3N + 4 B: by default
            N = 5 (18 B raw, the N whose raw bytes come closest to topk's without exceeding them)
            and N = 8 (24 B raw, ~18 B stored: counts compress, so closest to topk's stored bytes)

The same student (cnn_tiny, same seed, epochs, learning rate and replayed views) is trained from
each cache (alpha = 0: KD only), plus one on labels alone (alpha = 1) from the topk cache's views.
Students train two at a time, side by side, one thread each (as the demo does).

  bytes/view   the ensemble target set's stored bytes per view (inspect's targets_table), and the
               whole cache's bytes on disk per sample-epoch (targets + augmentation params + ids)
  eval mAP     the student on the demo's eval split (plain clips)
  train loss   the last epoch's mean training loss (not comparable across codecs: each codec's
               loss is its own estimator; sampled's is the unbiased KL estimate)

    python benchmarks/bench_codec_students.py --seeds 0 1 2 --workdir /tmp/lc-cs  # demo's default
                        # sizes; ~2.5 min per seed on 2 shared cores (teachers made once per seed)
    python benchmarks/bench_codec_students.py --quick --workdir /tmp/lc-csq   # smoke run (seconds)
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from logitcache import demo  # noqa: E402
from logitcache.dump import dump  # noqa: E402
from logitcache.reports.inspect import inspect_cache  # noqa: E402

TOPK = 5
SAMPLE_NS = (5, 8)


def codecs(sample_ns) -> list[tuple[str, str, dict]]:
    """(label, codec, dump options)."""
    return [("topk", "topk", {}), ("compact", "compact", {})] + [
        (f"sampled n={n}", "sampled", {"sample_n": n}) for n in sample_ns]


def dump_all(out: Path, s: dict, seed: int, teachers: list[str], whole, sample_ns) -> dict[str, Path]:
    caches = {}
    for label, name, options in codecs(sample_ns):
        path = out / f"cache_{label.replace(' ', '_').replace('=', '')}.zarr"
        shutil.rmtree(path, ignore_errors=True)
        with demo._threads(whole.threads):
            dump(out / "data" / "train", teachers, path, epochs=s["dump_epochs"], topk=TOPK, augment="ced",
                 seed=seed, batch_size=s["batch_size"], num_workers=whole.workers, progress=False,
                 codec=name, **options)
        caches[label] = path
    return caches


def train_all(out: Path, s: dict, seed: int, caches: dict[str, Path], pair) -> dict[str, dict]:
    common = dict(data=out / "data" / "train", student=demo.STUDENT, epochs=s["student_epochs"],
                  batch_size=s["batch_size"], lr=s["student_lr"], eval_data=out / "data" / "eval", seed=seed,
                  num_workers=pair.workers, threads=pair.threads, progress=False)
    jobs = {name: dict(common, cache=path, out=out / f"student_{path.stem[6:]}_s{seed}", alpha=0.0)
            for name, path in caches.items()}
    jobs["labels"] = dict(common, cache=caches["topk"], out=out / f"student_labels_s{seed}", alpha=1.0)
    for job in jobs.values():
        shutil.rmtree(job["out"], ignore_errors=True)
    results = demo._side_by_side(demo._student_job, list(jobs.values()), pair.jobs)
    return dict(zip(jobs, results))


def run_seed(out: Path, s: dict, seed: int, quick: bool, sample_ns) -> tuple[list[list], dict, float]:
    cores = os.cpu_count() or 1
    pair, whole = demo._Cores.split(cores, 2, quick), demo._Cores.split(cores, 1, quick)
    torch.manual_seed(seed)
    with demo._threads(1):
        teachers, teacher_rows = demo._data_and_teachers(out, s, seed, False, lambda *_: None, pair)
        caches = dump_all(out, s, seed, teachers, whole, sample_ns)
        students = train_all(out, s, seed, caches, pair)
    ensemble = dict(teacher_rows)["ensemble (mean prob)"]
    rows, stats = [], {}
    for name, path in caches.items():
        info = inspect_cache(path)
        target = next(t for t in info["targets_table"] if t["name"] == "ensemble")
        m = students[name]
        raw = target["raw_bytes"] / (info["samples"] * info["epochs"])
        stats[name] = {"mAP": m["eval_mAP"], "bytes": target["bytes_per_view"], "raw": raw, "codec": info.get("codec")}
        label = name + (" (8-bit)" if name == "compact" else "")
        rows.append([seed, label, round(raw, 1), round(target["bytes_per_view"], 1), round(info["bytes_per_sample_epoch"], 1),
                     f"{m['eval_mAP']:.3f}", f"{m['train_loss']:.4f}"])
    lab = students["labels"]
    stats["labels"] = {"mAP": lab["eval_mAP"]}
    rows.append([seed, "labels only (no targets)", "-", "-", "-", f"{lab['eval_mAP']:.3f}", f"{lab['train_loss']:.4f}"])
    return rows, stats, ensemble


def main() -> None:
    p = C.parser(__doc__)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="demo seeds (data, teachers, views, "
                   "students); each gets its own data and teachers in --workdir/seed<N> (default: 0)")
    p.add_argument("--sample-n", type=int, nargs="+", default=list(SAMPLE_NS),
                   help="sampled caches' ids drawn per row, one cache each (default: 5 8)")
    for key in ("n_train", "n_eval", "teacher_epochs", "dump_epochs", "student_epochs"):
        p.add_argument("--" + key.replace("_", "-"), type=int, default=None, help="override the demo's size")
    args = p.parse_args()
    overrides = {k: getattr(args, k) for k in ("n_train", "n_eval", "teacher_epochs", "dump_epochs",
                                               "student_epochs")}
    s = demo._settings(args.quick, overrides)
    root = C.workdir(args.workdir)
    print(f"# bench_codec_students: demo sizes {s}, top-{TOPK}, sampled n = {args.sample_n}, seeds {args.seeds}")
    print(f"# machine: {C.machine()}", flush=True)
    rows, ratios = [], []
    t0 = time.perf_counter()
    for seed in args.seeds:
        r, st, ens = run_seed(root / f"seed{seed}", s, seed, args.quick, args.sample_n)
        rows += r
        ratios.append((seed, st, ens))
        print(f"#   seed {seed}: done at {time.perf_counter() - t0:.0f} s (ensemble teacher mAP {ens:.3f})",
              flush=True)
    print()
    print(C.table(["seed", "codec", "target B/view raw", "stored", "cache B/sample-epoch", "eval mAP", "final train loss"], rows))
    print()
    parts = []
    for seed, st, _ in ratios:
        t, others = st["topk"], [k for k in st if k not in ("topk", "labels")]
        mAPs = ", ".join(f"{k}/topk {st[k]['mAP'] / t['mAP']:.3f}" for k in others)
        stored = ", ".join(f"{k}/topk {st[k]['bytes'] / t['bytes']:.2f}" for k in others)
        raw = ", ".join(f"{st[k]['raw'] / t['raw']:.2f}" for k in others)
        parts.append(f"seed {seed}: mAP {mAPs} (labels/topk {st['labels']['mAP'] / t['mAP']:.3f}); "
                     f"target bytes stored {stored} (raw {raw})")
    print("ratios: " + "; ".join(parts))


if __name__ == "__main__":
    main()
