"""Target codecs: compact rows (logitcache.codecs.compact) against float16 top-k as stored today.

Rows are realistic ensemble targets (logitcache.codecs.evaluate.teacher_rows: three synthetic
teachers, Zipf-like class prior, aggregated by mean probability, through the real topk_targets),
for softmax (multiclass) and sigmoid (multilabel) heads. No cache is written: this measures the
codec math; the cache format does not use it yet.

  targets      bytes per row, raw and after blosc-lz4 + shuffle (a zarr cache's codec) of one
               chunk (64Ki rows at C = 527); topk = float16 values + uint16/uint32 ids + float32
               stat, as stored today; compact = its five fixed-shape arrays (8-bit values)
  KL           mean and max per row KL(teacher || row) over C classes (softmax; sigmoid: the sum
               of per-class Bernoulli KLs), tail spread evenly as the losses do; "storage KL" is
               KL(float32 row || stored row), the storage error alone; top-1 = the row's first id
               is the teacher's argmax
  speed        encode / decode rows per second of CPU time (one thread, numpy; CPU time, not wall
               time, because this box is shared: wall time under load is 2-3x worse), decode
               sorted (values descending, as top-k rows are) and in id order (what the losses
               need; sort=False)
  value bits   compact at 4-8 bits per value (C = 527, k = 20)
  stat         the tail statistic's precision: float16 of the stat vs compact's float16 logit of
               the tail mass, on softmax rows whose log-sum-exp is 2..12 (one teacher's raw logits)
               instead of ~0 (a mean-probability ensemble); "tail mass off" counts rows whose
               stored tail mass is > 10% off the teacher's (of rows with teacher tails > 1e-5)
  id codes     other id-set codes: bytes per row and decode speed (C = 527)
  view         bytes per sample-epoch of a CED-sized view (top-20 of 527, 'ced' augmentation,
               16 kHz, 10 s clips): targets + augmentation parameters (today's float32; at their
               physical resolution, i.e. samples and STFT bins) + seed (derivable: 0 B)

    python benchmarks/bench_codecs.py            # ~8 min on 2 shared cores
    python benchmarks/bench_codecs.py --quick    # ~2 min
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import _id_codecs as X  # noqa: E402

from logitcache.codecs import compact as cc  # noqa: E402
from logitcache.codecs.evaluate import dense_kl, stored_kl, tail_mass, teacher_rows  # noqa: E402
from logitcache.targets import index_dtype, topk_targets  # noqa: E402

KINDS = ("multilabel", "multiclass")
VIEW_K, VIEW_C = 20, 527


# ---------------------------------------------------------------- helpers
def cpu_rate(fn, rows: int, repeats: int = 3) -> float:
    """Rows per second of CPU time, best of ``repeats``."""
    best = math.inf
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return rows / max(best, 1e-9)


def blosc_bytes(arrays) -> int:
    from numcodecs import Blosc

    codec = Blosc(cname="lz4", clevel=5, shuffle=Blosc.SHUFFLE)
    return sum(len(codec.encode(np.ascontiguousarray(a))) for a in arrays)


def topk_of(logits: np.ndarray, k: int, kind: str):
    parts = [topk_targets(torch.from_numpy(logits[a:a + 8192]), k, kind) for a in range(0, len(logits), 8192)]
    return tuple(np.concatenate([p[j].numpy() for p in parts]) for j in range(3))


def mrows(x: float) -> str:
    return f"{x / 1e6:.2f}M"


# ---------------------------------------------------------------- tables
def targets_table(data, configs, kl_rows: int, repeats: int):
    """One row per (C, k, kind): sizes, KL, speed. Returns the rows and a dict for the ratios line."""
    rows, speed, res = [], [], {}
    for Cn, k in configs:
        for kind in KINDS:
            z = data[(Cn, kind)]
            v, i, s = topk_of(z, k, kind)
            R = len(v)
            idt = index_dtype(Cn)
            today = [np.clip(v, -65504, 65504).astype(np.float16), i.astype(idt), s.astype(np.float32)]
            arrays = cc.encode(v, i, s, Cn, kind)
            dv, di, ds = cc.decode(arrays, k, Cn, kind)
            n = min(kl_rows, R)
            zk = z[:n]
            kl16 = dense_kl(zk, today[0][:n], today[1][:n], s[:n], kind)
            klc = dense_kl(zk, dv[:n], di[:n], ds[:n], kind)
            ref = (v[:n], i[:n], s[:n])
            st16 = stored_kl(ref, (today[0][:n], today[1][:n], s[:n]), Cn, kind)
            stc = stored_kl(ref, (dv[:n], di[:n], ds[:n]), Cn, kind)
            top = z[:n].argmax(1)
            raw_t = sum(a[0].nbytes for a in today)
            raw_c = cc.row_bytes(k, Cn)
            comp_t, comp_c = blosc_bytes(today) / R, blosc_bytes(arrays.values()) / R
            enc = cpu_rate(lambda: cc.encode(v, i, s, Cn, kind), R, 1)
            dec = cpu_rate(lambda: cc.decode(arrays, k, Cn, kind), R, repeats)
            dec_u = cpu_rate(lambda: cc.decode(arrays, k, Cn, kind, sort=False), R, repeats)
            rows.append([Cn, k, kind, raw_t, raw_c, round(comp_t, 1), round(comp_c, 1),
                         f"{kl16.mean():.4g}", f"{klc.mean():.4g}", f"{klc.mean() / kl16.mean():.4f}",
                         f"{kl16.max():.3g}", f"{klc.max():.3g}", f"{st16.mean():.2g}", f"{stc.mean():.2g}",
                         f"{(today[1][:n, 0] == top).mean():.4f}", f"{(di[:n, 0] == top).mean():.4f}"])
            speed.append([Cn, k, kind, R, mrows(enc), mrows(dec), mrows(dec_u)])
            res[(Cn, k, kind)] = dict(raw=raw_c / raw_t, comp=comp_c / comp_t, kl=klc.mean() / kl16.mean(),
                                      dec=dec, dec_u=dec_u, comp_t=comp_t, comp_c=comp_c)
            print(f"#   C={Cn} k={k} {kind} done", flush=True)
    print()
    print(C.table(["C", "k", "kind", "topk B/row", "compact B/row", "topk blosc", "compact blosc",
                   "KL topk fp16", "KL compact", "KL ratio", "max KL topk", "max KL compact",
                   "storage KL topk", "storage KL compact", "top-1 topk", "top-1 compact"], rows))
    print()
    print(C.table(["C", "k", "kind", "rows", "encode rows/s", "decode rows/s (sorted)",
                   "decode rows/s (id order)"], speed))
    return res


def bits_table(data, kl_rows: int, repeats: int):
    rows = []
    for kind in KINDS:
        z = data[(VIEW_C, kind)]
        v, i, s = topk_of(z, VIEW_K, kind)
        n = min(kl_rows, len(v))
        kl16 = dense_kl(z[:n], v[:n].astype(np.float16), i[:n], s[:n], kind).mean()
        for bits in (4, 5, 6, 7, 8):
            arrays = cc.encode(v, i, s, VIEW_C, kind, bits)
            dv, di, ds = cc.decode(arrays, VIEW_K, VIEW_C, kind, bits)
            kl = dense_kl(z[:n], dv[:n], di[:n], ds[:n], kind).mean()
            st = stored_kl((v[:n], i[:n], s[:n]), (dv[:n], di[:n], ds[:n]), VIEW_C, kind).mean()
            step = np.median(cc.STEPS[arrays["step"]])
            dec = cpu_rate(lambda: cc.decode(arrays, VIEW_K, VIEW_C, kind, bits), len(v), repeats)
            rows.append([kind, bits, cc.row_bytes(VIEW_K, VIEW_C, bits), f"{step:.3g}", f"{kl / kl16:.4f}",
                         f"{st:.2g}", f"{(di[:n, 0] == z[:n].argmax(1)).mean():.4f}", mrows(dec)])
    print()
    print(C.table(["kind", "value bits", "B/row", "median step (logit)", "KL / KL topk fp16", "storage KL",
                   "top-1", "decode rows/s"], rows))


def stat_table(data, kl_rows: int):
    rows = []
    for kind in KINDS:
        z = data[(VIEW_C, kind)][:kl_rows]
        if kind == "multiclass":  # softmax is shift-invariant: the same teacher, log-sum-exp 2..12
            z = z + np.random.default_rng(5).uniform(2, 12, (len(z), 1)).astype(np.float32)
        v, i, s = topk_of(z, VIEW_K, kind)
        v16, s16 = v.astype(np.float16), s.astype(np.float16).astype(np.float32)
        dv, di, ds = cc.decode(cc.encode(v, i, s, VIEW_C, kind), VIEW_K, VIEW_C, kind)
        exact = s
        if kind == "multiclass":  # compact values with the float32 stat that keeps the tail exact
            top = dv.max(1).astype(np.float64)
            lse = top + np.log(np.exp(dv - top[:, None]).sum(1))
            with np.errstate(divide="ignore"):
                exact = (lse - np.log1p(-np.clip(tail_mass(v, s), 0, 1))).astype(np.float32)
            # the teacher's own tail, 1 - exp(lse(top-k) - lse(all)), in float64
            z64 = torch.from_numpy(z.astype(np.float64))
            top_lse = torch.logsumexp(torch.topk(z64, VIEW_K, dim=-1).values, -1)
            teacher_tail = (-torch.expm1(top_lse - torch.logsumexp(z64, -1))).numpy()
            real = teacher_tail > 1e-5  # float32 sums resolve ~1e-7: smaller tails are noisy anywhere
        variants = [("float32 values, float32 stat (exact top-k)", v, i, s),
                    ("float32 values, float16 stat", v, i, s16),
                    ("topk today: float16 values, float32 stat", v16, i, s),
                    ("compact: 8-bit values, float16 stat field", dv, di, ds),
                    ("compact: 8-bit values, float32 stat", dv, di, exact)]
        base = None
        for name, vv, ii, ss in variants:
            kl = dense_kl(z, vv, ii, ss, kind).mean()
            base = base or kl
            lost = "-"
            if kind == "multiclass":
                off = np.abs(tail_mass(vv, ss) - teacher_tail)[real] > 0.1 * teacher_tail[real]
                lost = f"{off.mean():.2%}"
            rows.append([kind, name, f"{kl:.5g}", f"{kl / base:.4f}", lost])
    print()
    print(C.table(["kind", "stored as", "KL to teacher", "/ exact top-k", "rows with tail mass off > 10%"],
                  rows))


def id_codes_table(data, rows_n: int, repeats: int):
    out = []
    z = data[(VIEW_C, "multilabel")]
    for k in (5, 20, 50):
        ids = np.sort(topk_of(z[:rows_n], k, "multilabel")[1].astype(np.int64), axis=1)
        floor = math.log2(math.comb(VIEW_C, k)) / 8
        B = cc.block_rows(k)

        def blocks(dec, packed, n=len(ids)):
            return lambda: [dec(packed[a:a + B], k, VIEW_C) for a in range(0, n, B)]

        ef = cc.encode_ids(ids, VIEW_C)
        assert (cc.decode_ids(ef, k, VIEW_C) == ids).all()
        out.append([k, "uint16 ids (today)", 2 * k, f"{floor:.1f}", "-", "fixed"])
        speed = cpu_rate(lambda: cc.decode_ids(ef, k, VIEW_C), len(ids), repeats)
        out.append([k, "compact: Elias-Fano (sorted set)", ef.shape[1], f"{floor:.1f}", mrows(speed),
                    "fixed, no escape"])
        for name, enc, dec, note in [
                ("Golomb-Rice of gaps", X.rice_encode, X.rice_decode, "fixed (bounded), no escape"),
                ("fixed-width gaps + width header", X.fixed_gaps_encode, X.fixed_gaps_decode,
                 "W = widest row seen; needs an escape"),
                ("Elias-gamma of gaps", X.gamma_encode, X.gamma_decode,
                 "W = widest row seen; needs an escape")]:
            packed, W = enc(ids, VIEW_C)
            got = np.concatenate([dec(packed[a:a + B], k, VIEW_C) for a in range(0, len(ids), B)])
            assert (got == ids).all(), name
            speed = cpu_rate(blocks(dec, packed), len(ids), repeats)
            out.append([k, name, W, f"{floor:.1f}", mrows(speed), note])
        few = ids[:1000]
        packed, W = X.cns_encode(few, VIEW_C)
        assert (X.cns_decode(packed, k, VIEW_C) == few).all()
        speed = cpu_rate(lambda: X.cns_decode(packed, k, VIEW_C), len(few), 1)
        out.append([k, "combinatorial number system", W, f"{floor:.1f}", mrows(speed),
                    "fixed; Python integers"])
    print()
    print(C.table(["k", "ids stored as (C = 527)", "B/row", "floor B", "decode rows/s", "row width"], out))


# ---------------------------------------------------------------- a CED-sized view
def physical_params(augmenter) -> list[tuple[str, int, str, int]]:
    """Per stored parameter: (name, bytes today, physical unit, number of distinct values)."""
    sr, clip = augmenter.sample_rate, augmenter.clip_samples
    out = []
    for op in augmenter.ops:
        h = op.hyper
        for pname, (dtype, shape) in op.params.items():
            count = int(np.prod(shape))
            today = np.dtype(dtype).itemsize * count
            if op.name == "shift":
                unit, n = "samples", 2 * int(h["max_fraction"] * clip) + 1
            elif op.name == "time_mask":
                max_w = int(round(h["max_seconds"] * sr))
                unit, n = ("samples", clip + 1) if pname == "start_s" else ("samples", max_w + 1)
            elif op.name == "freq_mask":
                bins, spacing = h["n_fft"] // 2 + 1, sr / h["n_fft"]
                widest = int(min(h["max_hz"], sr / 2) // spacing) + 1
                unit, n = ("STFT bin", bins) if pname == "low_hz" else ("STFT bins", widest + 1)
            else:
                unit, n = "as stored", 256 ** np.dtype(dtype).itemsize
            for c in range(count):
                out.append((f"{op.name}.{pname}" + (f"[{c}]" if count > 1 else ""), today // count, unit, n))
    return out


def physical_arrays(augmenter, draws: list[dict]) -> list[np.ndarray]:
    """The drawn 'ced' parameters as the smallest integer arrays at their physical resolution."""
    sr = augmenter.sample_rate
    by_op = {op.name: op for op in augmenter.ops}
    out = []
    for name in augmenter.param_specs:
        x = np.stack([d[name] for d in draws]).reshape(len(draws), -1).astype(np.float64)
        op = name.split(".")[0]
        if op == "freq_mask":
            x = np.round(x / (sr / by_op[op].hyper["n_fft"]))
        elif op in ("shift", "time_mask"):
            x = np.round(x * sr)
        x = x.astype(np.int64)
        lo, hi = int(x.min()), int(x.max())
        dtype = np.int32 if lo < 0 else np.uint8 if hi < 256 else np.uint16 if hi < 65536 else np.uint32
        out.append(x.astype(dtype))
    return out


def view_table(data, chunk_rows: int):
    from logitcache.augment import Augmenter, load_ops_spec

    aug = Augmenter(load_ops_spec("ced"), C.SAMPLE_RATE, 10.0)
    params = physical_params(aug)
    prow = [[name, today, unit, n, math.ceil(math.log2(n)), math.ceil(math.ceil(math.log2(n)) / 8)]
            for name, today, unit, n in params]
    print()
    print(C.table(["'ced' parameter (16 kHz, 10 s)", "B today", "physical unit", "distinct values", "bits",
                   "B byte-aligned"], prow))
    p_today = sum(r[1] for r in prow)
    p_bits = sum(r[4] for r in prow)
    p_packed, p_aligned = math.ceil(p_bits / 8), sum(r[5] for r in prow)

    n = min(chunk_rows, 8192)  # drawing costs ~0.3 ms per view
    ctx = aug.context(num_samples=1 << 20, sample_index=0, source_samples=aug.clip_samples)
    rng = np.random.default_rng(0)
    draws = [aug.draw(int(s), ctx) for s in rng.integers(0, 2**63, n)]
    today_params = [np.stack([d[k] for d in draws]) for k in aug.param_specs]
    seeds = rng.integers(0, 2**63, n, dtype=np.int64).view(np.uint64)
    p_today_z = blosc_bytes(today_params) / n
    p_aligned_z = blosc_bytes(physical_arrays(aug, draws)) / n
    seed_z = blosc_bytes([seeds]) / n

    kind = "multilabel"
    v, i, s = topk_of(data[(VIEW_C, kind)][:chunk_rows], VIEW_K, kind)
    R = len(v)
    today_t = [v.astype(np.float16), i.astype(np.uint16), s.astype(np.float32)]
    t_raw, t_z = sum(a[0].nbytes for a in today_t), blosc_bytes(today_t) / R
    rows, totals = [], {}
    rows.append(["today: float16 top-k + float32 stat, float32 params, uint64 seed",
                 t_raw, p_today, 8, t_raw + p_today + 8, round(t_z + p_today_z + seed_z, 1)])
    for bits in (8, 7, 6, 5):
        arrays = cc.encode(v, i, s, VIEW_C, kind, bits)
        c_raw, c_z = cc.row_bytes(VIEW_K, VIEW_C, bits), blosc_bytes(arrays.values()) / R
        for label, p_raw, p_z in [("params at physical resolution, bit-packed", p_packed, None),
                                  ("params at physical resolution, byte-aligned", p_aligned, p_aligned_z),
                                  ("params re-drawn from the seed", 0, 0.0)]:
            total = c_raw + p_raw
            totals[(bits, label)] = total
            rows.append([f"compact {bits}-bit values; {label}; seed derived", c_raw, p_raw, 0, total,
                         "-" if p_z is None else round(c_z + p_z, 1)])
    print()
    print(C.table(["view (top-20 of 527, 'ced'), ensemble only", "targets B", "params B", "seed B",
                   "total B raw", "total B blosc"], rows))
    return {"today": t_raw + p_today + 8, "today_z": t_z + p_today_z + seed_z, "bits": p_bits, **{
        f"{b}/{lab.split(',')[-1].strip()}": t for (b, lab), t in totals.items()}}


# ---------------------------------------------------------------- main
def main() -> None:
    p = C.parser(__doc__)
    p.add_argument("--chunk-rows", type=int, default=None, help="rows per measured chunk at C = 527 "
                   "(default 65,536; --quick 16,384)")
    p.add_argument("--kl-rows", type=int, default=None,
                   help="rows whose dense KL is computed (default 16,384; --quick 4,096)")
    p.add_argument("--large-rows", type=int, default=None,
                   help="rows at C = 151,936 (default 1,024; --quick 256)")
    args = p.parse_args()
    torch.set_num_threads(args.threads or 1)
    chunk = args.chunk_rows or (16384 if args.quick else 65536)
    kl_rows = args.kl_rows or (4096 if args.quick else 16384)
    large = args.large_rows or (256 if args.quick else 1024)
    repeats = 2 if args.quick else 5
    print(f"# bench_codecs: compact target rows vs float16 top-k; {chunk:,} realistic ensemble rows per "
          f"kind at C = 527 (dense KL on {min(kl_rows, chunk):,}), {large:,} at C = 151,936")
    print(f"# machine: {C.machine()}")
    t0 = time.perf_counter()
    data = {}
    for kind in KINDS:
        data[(VIEW_C, kind)] = teacher_rows(chunk, VIEW_C, 1, kind, seed=0)[0]
        data[(151_936, kind)] = teacher_rows(large, 151_936, 1, kind, seed=1)[0]
    print(f"#   teacher rows made in {time.perf_counter() - t0:.0f} s", flush=True)
    configs = [(VIEW_C, k) for k in (5, 10, 20, 50)] + [(151_936, 20)]
    res = targets_table(data, configs, kl_rows, repeats)
    bits_table(data, kl_rows, repeats)
    stat_table(data, kl_rows)
    id_codes_table(data, min(chunk, 16384), repeats)
    view = view_table(data, chunk)

    ml, mc = res[(VIEW_C, VIEW_K, "multilabel")], res[(VIEW_C, VIEW_K, "multiclass")]
    print()
    print(f"ratios: top-{VIEW_K} of {VIEW_C}: compact/topk bytes raw {ml['raw']:.2f}, blosc {ml['comp']:.2f} "
          f"(multilabel) {mc['comp']:.2f} (multiclass); KL compact/topk fp16 multilabel {ml['kl']:.4f} "
          f"multiclass {mc['kl']:.4f} (goal <= 1.1); decode rows/s per core sorted {mrows(ml['dec'])} "
          f"id order {mrows(ml['dec_u'])} (goal >= 5M); view B/sample-epoch today {view['today']} raw "
          f"{view['today_z']:.0f} blosc, compact 8-bit + params bit-packed {view['8/bit-packed']}, "
          f"6-bit + params byte-aligned {view['6/byte-aligned']}, 8-bit + params from seed "
          f"{view['8/params re-drawn from the seed']} (goal <= 48)")


if __name__ == "__main__":
    main()
