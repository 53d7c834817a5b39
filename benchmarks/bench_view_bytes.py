"""Bytes per sample-epoch of a CED-sized view, before and after the compact layout, side by side.

A CED-sized view: top-20 of 527 classes (multilabel), the ``ced`` augmentation of a 10 s clip at
16 kHz, the ensemble's targets only, 2M clips x 10 epochs (AudioSet scale). Measured with
``logitcache.plan.plan_cache`` (synthetic teacher-like rows written through the real cache writer,
zarr + blosc-lz4, scaled per array), for

* ``topk fp16, stored``: the default codec in the layout before this change (order, uint64 seeds
  and float32 parameters stored per view);
* ``compact, derived``: ``dump --codec compact`` today (order and seeds derived from (seed, epoch,
  id), parameters as integers at their physical resolution, 6-bit values);

and the KL of each codec's rows to the teachers' full distributions on the same synthetic views
(``logitcache.codecs.evaluate``). CED's ~95 B/view on disk is the published figure
(../shared/prior-art.md), not measured here. Prints a table and a ``ratios:`` line.

    python benchmarks/bench_view_bytes.py            # ~1 min
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, parser  # noqa: E402

import logitcache.layout as layout  # noqa: E402
from logitcache.codecs import compact, evaluate  # noqa: E402
from logitcache.plan import plan_cache  # noqa: E402

CED_BYTES = 95.0  # CED's bytes per clip-epoch on disk (../shared/prior-art.md)
SAMPLES, EPOCHS, K, C = 2_000_000, 10, 20, 527


@contextlib.contextmanager
def stored_order_seeds_and_float_params():
    """The format-2 layout before derived arrays: new manifests without the entries that derive
    order and seeds and store parameters as integers."""
    real = layout.new_manifest

    def old(**kw):
        m = real(**kw)
        del m["derived_arrays"], m["param_storage"]
        return m

    layout.new_manifest = old
    try:
        yield
    finally:
        layout.new_manifest = real


def view_bytes(codec: str) -> tuple[float, dict]:
    p = plan_cache(SAMPLES, EPOCHS, K, C, members=0, codec=codec, backends=("zarr",), output_kind="multilabel")
    row = next(r for r in p["backends"] if r["backend"] == "zarr")
    views = p["views"]
    return row["bytes_per_sample_epoch"], {g: n / views for g, n in row["groups"].items()}


def kl_to_teachers(rows: int) -> tuple[float, float, float, float]:
    """Mean KL to the teachers of topk float16 rows and of compact (default bits) rows; top-1 agreement."""
    z, v, i, s = evaluate.teacher_rows(rows, C, K, "multilabel", seed=0)
    kl16 = evaluate.dense_kl(z, v.astype(np.float16).astype(np.float32), i, s, "multilabel")
    dv, di, ds = compact.decode(compact.encode(v, i, s, C, "multilabel"), K, C, "multilabel")
    kl = evaluate.dense_kl(z, dv, di, ds, "multilabel")
    return float(kl16.mean()), float(kl.mean()), float(kl16.max()), float(kl.max())


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--kl-rows", type=int, default=16384, help="views for the KL measurement")
    args = p.parse_args()
    print(machine())
    with stored_order_seeds_and_float_params():
        before, before_groups = view_bytes("topk")
        compact_before, _ = view_bytes("compact")
    after, after_groups = view_bytes("compact")
    kl16, klc, max16, maxc = kl_to_teachers(args.kl_rows)
    groups = ["ensemble", "params", "order_seeds", "ids", "other"]
    print(f"\nCED-sized view: top-{K} of {C}, ced augmentation (10 s at 16 kHz), ensemble only, "
          f"{SAMPLES:,} clips x {EPOCHS} epochs, zarr blosc-lz4; B per sample-epoch on disk")
    print(f"| layout | B/view | {' | '.join(groups)} | KL to teachers (mean / max) |")
    print("|---|---|" + "---|" * len(groups) + "---|")
    print(f"| topk fp16, order+seeds+float params stored | {before:.1f} | "
          + " | ".join(f"{before_groups[g]:.1f}" for g in groups) + f" | {kl16:.5f} / {max16:.3f} |")
    print(f"| compact {compact.DEFAULT_VALUE_BITS}-bit, order+seeds+float params stored | {compact_before:.1f} | "
          + " | ".join("" for _ in groups) + " | |")
    print(f"| compact {compact.DEFAULT_VALUE_BITS}-bit, order+seeds derived, integer params | {after:.1f} | "
          + " | ".join(f"{after_groups[g]:.1f}" for g in groups) + f" | {klc:.5f} / {maxc:.3f} |")
    print(f"| CED (published, not measured) | {CED_BYTES:.0f} | " + " | ".join("" for _ in groups) + " | |")
    print(f"\nratios: compact/topk bytes {after / before:.3f}x, compact/CED bytes {after / CED_BYTES:.3f}x, "
          f"compact KL / topk fp16 KL {klc / kl16:.4f}x (goal: <= 48 B, KL <= 1.1x); "
          f"{'meets' if after <= 48 and klc <= 1.1 * kl16 else 'misses'} the goal")


if __name__ == "__main__":
    main()
