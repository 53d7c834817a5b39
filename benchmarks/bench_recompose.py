"""Students from compositions of one cache's stored members, no teacher run: recompose at train time.

The demo's data and teachers (logitcache.demo: synthetic 10-class multilabel audio, three small
teachers trained on labels) are made once in --workdir and reused, and dumped once, members
stored, at the demo's top-5. From that one cache, students (cnn_tiny, same seed, epochs, learning
rate and replayed views; KD only) are trained on:

  stored ensemble   the dump's own ensemble target set (reference)
  all members       the three members recomposed, equal weights, mean_prob
  two best          the two teachers with the best eval mAP (the demo's table), equal weights
  reweighted        all three, weights 3:2:1 from the best teacher to the worst
  confidence        all three, per-row weights exp(-entropy) (--member-weighting confidence)
  z-scored          all three, mean_prob_zscore (each standardised by its dump-time statistics)

No teacher runs while the students train. Then fidelity re-runs the teachers once on --samples
stored views and reports, per composition, KL(the same composition of the re-run teachers || the
one recomposed from the cache): the approximation of recomposing top-k members (each member's
exact tail mass spread evenly over its own tail), next to the stored ensemble's own KL (its top-k
truncation). Students train two at a time, side by side, one thread each (as the demo does).

    python benchmarks/bench_recompose.py --workdir /tmp/lc-rc             # demo sizes, ~4.5 min on 2 cores
    python benchmarks/bench_recompose.py --workdir /tmp/lc-rc --topk 2    # the same teachers, ~4 min
    python benchmarks/bench_recompose.py --quick --workdir /tmp/lc-rcq    # smoke run (seconds)
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
from logitcache.report import fidelity  # noqa: E402

TOPK = 5  # the demo's


def compositions(ranked: list[str]) -> dict[str, dict | None]:
    """label -> train/fidelity recomposition options (None: the stored ensemble). ``ranked``:
    member names, best teacher first."""
    every = list(demo.TEACHERS)
    by_rank = {n: w for n, w in zip(ranked, (3.0, 2.0, 1.0))}
    return {"stored ensemble": None,
            "all members": dict(ensemble=every),
            "two best": dict(ensemble=ranked[:2]),
            "reweighted 3:2:1": dict(ensemble=every, ensemble_weights=[by_rank[n] for n in every]),
            "confidence": dict(ensemble=every, member_weighting="confidence"),
            "z-scored": dict(ensemble=every, aggregation="mean_prob_zscore")}


def main() -> None:
    p = C.parser(__doc__)
    p.add_argument("--seed", type=int, default=0, help="demo seed (data, teachers, views, students)")
    p.add_argument("--samples", type=int, default=512, help="stored views fidelity re-runs the teachers on")
    p.add_argument("--topk", type=int, default=TOPK, help=f"the dump's k (default: {TOPK}, the demo's; C = 10)")
    for key in ("n_train", "n_eval", "teacher_epochs", "dump_epochs", "student_epochs"):
        p.add_argument("--" + key.replace("_", "-"), type=int, default=None, help="override the demo's size")
    args = p.parse_args()
    s = demo._settings(args.quick, {k: getattr(args, k) for k in ("n_train", "n_eval", "teacher_epochs",
                                                                  "dump_epochs", "student_epochs")})
    out = C.workdir(args.workdir)
    print(f"# bench_recompose: demo sizes {s}, top-{args.topk}, seed {args.seed}, fidelity on {args.samples} views")
    print(f"# machine: {C.machine()}", flush=True)
    cores = os.cpu_count() or 1
    pair, whole = demo._Cores.split(cores, 2, args.quick), demo._Cores.split(cores, 1, args.quick)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    with demo._threads(1):
        teachers, teacher_rows = demo._data_and_teachers(out, s, args.seed, False, lambda *_: None, pair)
        quality = {n: m for n, m in zip(demo.TEACHERS, (x[1] for x in teacher_rows))}
        ranked = sorted(demo.TEACHERS, key=lambda n: -quality[n])
        cache = out / f"cache_top{args.topk}.zarr"
        shutil.rmtree(cache, ignore_errors=True)
        with demo._threads(whole.threads):
            dump(out / "data" / "train", teachers, cache, epochs=s["dump_epochs"], topk=args.topk, augment="ced",
                 seed=args.seed, batch_size=s["batch_size"], num_workers=whole.workers, progress=False)
        print(f"#   teachers and cache ready at {time.perf_counter() - t0:.0f} s; teacher eval mAP "
              + ", ".join(f"{n} {quality[n]:.3f}" for n in ranked), flush=True)
        comps = compositions(ranked)
        common = dict(cache=cache, data=out / "data" / "train", student=demo.STUDENT, epochs=s["student_epochs"],
                      batch_size=s["batch_size"], lr=s["student_lr"], eval_data=out / "data" / "eval",
                      seed=args.seed, num_workers=pair.workers, threads=pair.threads, progress=False, alpha=0.0)
        jobs = []
        for i, (label, kw) in enumerate(comps.items()):
            run = out / f"student_top{args.topk}_{i}"
            shutil.rmtree(run, ignore_errors=True)
            jobs.append(dict(common, out=run, **(kw or {})))
        students = demo._side_by_side(demo._student_job, jobs, pair.jobs)
        print(f"#   {len(jobs)} students trained at {time.perf_counter() - t0:.0f} s", flush=True)
        r = fidelity(cache, out / "data" / "train", teachers, samples=args.samples, seed=args.seed,
                     compositions=[kw for kw in comps.values() if kw])
    print(f"#   fidelity done at {time.perf_counter() - t0:.0f} s", flush=True)
    kl = iter(r["recomposed"])
    rows = []
    for (label, kw), m in zip(comps.items(), students):
        f = next(kl) if kw else {"kl_mean": r["kl_mean"], "kl_max": r["kl_max"], "width": args.topk,
                                 "ensemble": list(demo.TEACHERS), "ensemble_weights": None,
                                 "aggregation": r["aggregation"], "member_weighting": "none"}
        weights = ":".join(f"{w:g}" for w in f["ensemble_weights"]) if f["ensemble_weights"] else "equal"
        rows.append([label, ", ".join(f["ensemble"]), weights, f["aggregation"],
                     f["member_weighting"], f["width"], f["kl_mean"], f["kl_max"], f"{m['eval_mAP']:.3f}"])
    print()
    print(C.table(["targets", "members", "weights", "aggregation", "row weights", "classes/row",
                   "KL mean to re-run", "KL max", "student eval mAP"], rows))
    print()
    print("teachers' eval mAP: " + ", ".join(f"{n} {quality[n]:.3f}" for n in ranked)
          + f"; their ensemble (mean prob) {dict(teacher_rows)['ensemble (mean prob)']:.3f}")


if __name__ == "__main__":
    main()
