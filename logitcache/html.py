"""Self-contained HTML reports: one file, plots as base64 PNGs, no scripts, no network.

The report functions in :mod:`logitcache.report` return plain dicts; this module only draws
them, so ``--json`` and ``--html`` always show the same numbers.

    write_report("report.html", fidelity=fid, compare=cmp, inspect=info)

Plots use matplotlib's Agg canvas through ``matplotlib.figure.Figure`` (never pyplot), so
drawing works on headless machines and leaves any interactive backend of the caller alone.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import math
from pathlib import Path

import numpy as np

from logitcache.errors import LogitCacheError
from logitcache.reports.tables import human_bytes

FLOOR = 1e-12  # log-scale plots draw exact zeros here (a KL of exactly 0 has no logarithm)
COLOURS = {"stored": "#1f77b4", "float16": "#d62728", "float32": "#2ca02c", "student": "#9467bd",
           "ensemble": "#ff7f0e", "loss": "#7f7f7f"}

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif; color: #222;
       max-width: 1180px; margin: 24px auto; padding: 0 20px; background: #fff; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 2px solid #1f77b4; padding-bottom: 3px;
       margin-top: 1.8em; } h3 { margin-bottom: 0.3em; }
.meta { color: #666; font-size: 0.9em; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 9px; } th { background: #eef3f8; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.figs { display: grid; grid-template-columns: repeat(auto-fit, minmax(520px, 1fr)); gap: 14px; }
figure { margin: 0; border: 1px solid #e3e3e3; padding: 6px; background: #fafafa; }
figure img { width: 100%; height: auto; display: block; }
figcaption { font-size: 0.85em; color: #444; padding: 4px 2px 0; }
figure.wide { grid-column: 1 / -1; } figure.wide img { max-width: 1000px; margin: auto; }
figure.small img { max-width: 430px; margin: auto; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: 6px 10px; font-size: 0.9em; }
"""


# ---------------------------------------------------------------- building blocks
def _figure(width: float = 6.4, height: float = 3.8):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    return fig


def png(fig) -> str:
    """A matplotlib figure as a base64 PNG ``<img>`` tag."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", facecolor="white")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="plot" src="data:image/png;base64,{data}">'


def figure_html(fig, caption: str, kind: str = "") -> str:
    """``kind``: "" (one grid cell), "wide" (the whole row) or "small" (narrow, centred)."""
    cls = f' class="{kind}"' if kind else ""
    return f"<figure{cls}>{png(fig)}<figcaption>{html.escape(caption)}</figcaption></figure>"


def _k_axis(ax, ks: list[int]) -> None:
    """Log k' axis labelled with plain integers at powers of two (log ticks like 10^0 read badly)."""
    from matplotlib.ticker import NullFormatter, NullLocator

    top = max(ks)
    ticks = [2 ** e for e in range(0, 31) if 2 ** e <= top]
    if top not in ticks and top / ticks[-1] > 1.3:
        ticks.append(top)
    ax.set_xscale("log")
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(ticks, [str(t) for t in ticks])


def fmt(x, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    if isinstance(x, float):
        if math.isnan(x) or math.isinf(x):
            return str(x)
        if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e6):
            return f"{x:.{digits - 1}e}"
        return f"{x:.{digits}f}".rstrip("0").rstrip(".") if "." in f"{x:.{digits}f}" else f"{x:.{digits}f}"
    return html.escape(str(x))


def table(rows: list[list], headers: list[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for r in rows:
        cells = []
        for x in r:
            numeric = isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)
            cells.append(f'<td class="n">{fmt(x)}</td>' if numeric else f"<td>{fmt(x)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _floor(values) -> np.ndarray:
    return np.maximum(np.asarray(values, dtype=float), FLOOR)


# ---------------------------------------------------------------- fidelity plots
def plot_error_vs_k(f: dict):
    """KL and the kind's own error measure against k', for the truncated cache and both dtypes."""
    fig = _figure(10.0, 3.8)
    left, right = fig.subplots(1, 2)
    ks = [r["k"] for r in f["per_k"]]
    left.plot(ks, _floor([r["kl_mean"] for r in f["per_k"]]), "o-", color=COLOURS["stored"], lw=2,
              label=f"cache truncated to k' ({f['value_dtype']})", zorder=3)
    for dtype, rows in f["dtype_effect"].items():
        left.plot([r["k"] for r in rows], _floor([r["kl_mean"] for r in rows]),
                  "--" if dtype == "float16" else ":", color=COLOURS[dtype], lw=1.6, label=f"fresh top-k' as {dtype}")
    left.axvline(f["topk"], color="#555", lw=0.8, ls="-.")
    left.text(f["topk"], 1, f" k={f['topk']}", transform=left.get_xaxis_transform(), va="top", fontsize=8)
    left.set(yscale="log", xlabel="k' (logits kept per row)", ylabel="mean KL(fresh ‖ reconstruction)",
             title="KL vs k'")
    _k_axis(left, [r["k"] for rows in f["dtype_effect"].values() for r in rows] + ks)
    left.grid(True, which="both", alpha=0.25)
    left.legend(fontsize=7.5)
    if f["output_kind"] == "multiclass":
        right.plot(ks, [r["covered_mass_mean"] for r in f["per_k"]], "o-", color=COLOURS["stored"], lw=2,
                   label="mean")
        right.plot(ks, [r["covered_mass_min"] for r in f["per_k"]], "v--", color=COLOURS["stored"], alpha=0.6,
                   label="worst row")
        right.set(ylabel="probability mass in the top-k'", title="covered mass (softmax)", ylim=(0, 1.02))
    else:
        right.plot(ks, _floor([r["prob_max_abs_error"] for r in f["per_k"]]), "o-", color=COLOURS["stored"], lw=2,
                   label="max over rows")
        right.plot(ks, _floor([r["prob_mean_max_abs_error"] for r in f["per_k"]]), "v--", color=COLOURS["stored"],
                   alpha=0.6, label="mean over rows")
        right.set(yscale="log", ylabel="max |p − p̂| over classes", title="sigmoid probability error")
    right.set(xlabel="k'")
    _k_axis(right, ks)
    right.grid(True, which="both", alpha=0.25)
    right.legend(fontsize=7.5)
    return fig


def plot_tail_histogram(f: dict):
    t = f["tail_mass"]
    edges, counts = np.asarray(t["edges"], dtype=float), np.asarray(t["counts"], dtype=float)
    fig = _figure(6.0, 3.6)
    ax = fig.subplots()
    lo = np.where(edges[:-1] == 0, edges[1] / 10 ** 0.25, edges[:-1])  # the zero bin, drawn left of 1e-8
    ax.bar(lo, counts, width=edges[1:] - lo, align="edge", color=COLOURS["stored"], edgecolor="white")
    what = ("tail mass (probability outside the stored top-k)" if f["output_kind"] == "multiclass"
            else "tail share of the summed sigmoid probabilities")
    ax.set(xscale="log", xlabel=what, ylabel="rows",
           title=f"tail mass at k={t['k']} ({t['rows']} rows; median {t['p50']:.2g}, p99 {t['p99']:.2g})")
    ax.grid(True, axis="y", alpha=0.25)
    return fig


def plot_class_coverage(f: dict):
    rows = sorted(f["per_class"], key=lambda r: r["coverage"])
    cov = [r["coverage"] for r in rows]
    fig = _figure(6.0, 3.6 if len(rows) > 30 else max(2.4, 0.26 * len(rows) + 1.2))
    ax = fig.subplots()
    if len(rows) <= 30:
        y = np.arange(len(rows))
        ax.barh(y, cov, color=COLOURS["stored"])
        ax.set_yticks(y, [r["class"] for r in rows], fontsize=8)
        ax.set(xlim=(0, 1.0), xlabel="share of the class's probability inside the stored top-k")
    else:  # too many names to print: classes from the most to the least probable, where coverage drops
        by_mass = sorted(f["per_class"], key=lambda r: -r["mean_prob"])
        ax.plot(np.arange(len(by_mass)), [r["coverage"] for r in by_mass], ".", color=COLOURS["stored"], ms=3)
        ax.set(ylim=(-0.02, 1.02), xlabel="classes, most probable first", ylabel="coverage")
    ax.set_title(f"per-class coverage at k={f['topk']}")
    ax.grid(True, alpha=0.25)
    return fig


def plot_size_vs_fidelity(f: dict):
    fig = _figure(6.0, 3.6)
    ax = fig.subplots()
    for dtype, rows in f["dtype_effect"].items():
        ax.plot([r["bytes_per_view"] for r in rows], _floor([r["kl_mean"] for r in rows]),
                "--o" if dtype == "float16" else ":s", color=COLOURS[dtype], ms=3.5, lw=1.4, label=dtype)
    ks = f["per_k"]
    ax.plot([r["bytes_per_view"] for r in ks], _floor([r["kl_mean"] for r in ks]), "-", color=COLOURS["stored"],
            lw=2, label=f"this cache, truncated ({f['value_dtype']})")
    here = next(r for r in ks if r["k"] == f["topk"])
    ax.plot([here["bytes_per_view"]], [max(here["kl_mean"], FLOOR)], "*", color="black", ms=13,
            label=f"this cache (k={f['topk']})", zorder=4)
    for r in f["dtype_effect"].get(f["value_dtype"], []):
        if r["k"] in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) or r["k"] == f["classes"]:
            ax.annotate(f"k={r['k']}", (r["bytes_per_view"], max(r["kl_mean"], FLOOR)), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.set(xscale="log", yscale="log", xlabel="stored bytes per view (measured on this cache, scaled to k')",
           ylabel="mean KL(fresh ‖ reconstruction)", title="size vs fidelity")
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda x, _: f"{x:,.0f}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7.5)
    return fig


def plot_disagreement(f: dict):
    d = f["disagreement"]
    m = np.asarray(d["pairwise_top1_agreement"], dtype=float)
    fig = _figure(4.6, 3.6)
    ax = fig.subplots()
    im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(d["members"])), d["members"], rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(d["members"])), d["members"], fontsize=8)
    for i in range(len(m)):
        for j in range(len(m)):
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if m[i, j] < 0.6 else "black")
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set_title("members: pairwise top-1 agreement")
    return fig


def fidelity_section(f: dict) -> str:
    k = f["topk"]
    stored = (f"top-{k} of {f['classes']} classes, {html.escape(f['output_kind'])}, "
              f"{html.escape(f['value_dtype'])} values" if f.get("per_k") is not None
              else f"codec {html.escape(str(f.get('codec')))}, {f['classes']} classes, {html.escape(f['output_kind'])}")
    rows = (f"{f['samples_checked']} stored windows re-run ({f['positions']} unmasked positions)"
            if "positions" in f else f"{f['samples_checked']} stored views re-run ({f['rows_checked']} rows)")
    head = (f"<p>{rows}, {stored}; teachers match the "
            f"manifest: <b>{'yes' if f['teachers_match'] else 'NO'}</b>.</p>")
    summary = table([["ensemble", f["max_abs_logit_error"], f["mean_abs_logit_error"], f["topk_index_agreement"],
                      f["top1_agreement"], f["kl_mean"], f["kl_max"]]]
                    + [[n, m["max_abs_logit_error"], m["mean_abs_logit_error"], m["topk_index_agreement"],
                        m["top1_agreement"], m["kl_mean"], m["kl_max"]] for n, m in f["members"].items()],
                    ["targets", "max |Δz|", "mean |Δz|", "top-k agree", "top-1 agree", "KL mean", "KL max"])
    if f.get("per_k") is None:  # a codec without top-k rows (sampled): the summary is all there is
        return (f"<h2>Fidelity: cache vs re-run teachers</h2>{head}{summary}"
                f"<p>Not applicable: {html.escape(f['not_applicable'])}.</p>")
    err = "covered mass" if f["output_kind"] == "multiclass" else "max |Δp|"
    per_k = table([[r["k"], r["kl_mean"], r["kl_max"], r["top1_agreement"], r["topk_agreement"],
                    r["covered_mass_mean"] if f["output_kind"] == "multiclass" else r["prob_max_abs_error"],
                    r["tail_mass_mean"], r["bytes_per_view"]] for r in f["per_k"]],
                  ["k'", "KL mean", "KL max", "top-1 agree", "top-k' agree", err, "tail mass", "B/view"])
    by_k = {d: {r["k"]: r for r in rows} for d, rows in f["dtype_effect"].items()}
    dtype_rows = [[k2, by_k["float16"][k2]["kl_mean"], by_k["float32"][k2]["kl_mean"],
                   by_k["float16"][k2]["max_abs_logit_error"], by_k["float16"][k2]["prob_max_abs_error"],
                   by_k["float32"][k2]["prob_max_abs_error"]] for k2 in sorted(by_k["float16"])]
    dtypes = table(dtype_rows, ["k'", "KL fp16", "KL fp32", "max |Δz| fp16", "max |Δp| fp16", "max |Δp| fp32"])
    d = f["disagreement"]
    members = table([[n, v["top1_agreement"], v["kl_to_ensemble"]] for n, v in d["member_vs_ensemble"].items()],
                    ["member (fresh)", "top-1 = ensemble's", "KL(member ‖ ensemble)"])
    worst = sorted(f["per_class"], key=lambda r: r["coverage"])[:10]
    classes = table([[r["class"], r["coverage"], r["in_topk_rate"], r["mean_prob"]] for r in worst],
                    ["class", "coverage", "in top-k", "mean prob"])
    right = ("probability mass the top-k' covers." if f["output_kind"] == "multiclass"
             else "largest error on a sigmoid probability.")
    figs = [figure_html(plot_error_vs_k(f), "Left: mean KL(fresh teacher ‖ distribution rebuilt from the cache) as "
                        "the cache is truncated to its top k' (solid), and for the fresh logits' own top-k' stored "
                        f"as float16 / float32 (dashed / dotted). Right: {right}", "wide"),
            figure_html(plot_tail_histogram(f), "Per-row tail mass at the stored k (log bins, four per decade; the "
                        "leftmost bar holds rows below 1e-8)."),
            figure_html(plot_class_coverage(f), "Share of each class's fresh probability that falls inside the "
                        "stored top-k: classes at the bottom lose most to the evenly spread tail."),
            figure_html(plot_size_vs_fidelity(f), "Bytes per view against mean KL, for every k' and both value "
                        "dtypes; the star is this cache.")]
    if len(d["members"]) > 1:
        figs.append(figure_html(plot_disagreement(f), "How often two (freshly re-run) members pick the same top-1 "
                                "class on the sampled views.", "small"))
    return (f"<h2>Fidelity: cache vs re-run teachers</h2>{head}{summary}<div class='figs'>{''.join(figs)}</div>"
            f"<h3>Per k' (the cache truncated to its top k')</h3>{per_k}"
            f"<h3>Value dtype (fresh top-k' rounded as each dtype stores it)</h3>{dtypes}"
            f"<h3>Teacher disagreement</h3><p>mean pairwise top-1 disagreement "
            f"{fmt(d['mean_pairwise_disagreement'])}, ensemble diversity (mean KL member ‖ ensemble) "
            f"{fmt(d['diversity_kl'])}</p>{members}"
            f"<h3>Least covered classes</h3>{classes}")


# ---------------------------------------------------------------- compare plots
def plot_learning_curve(c: dict):
    epochs = c["epochs"]
    fig = _figure(7.0, 3.6)
    ax = fig.subplots()
    xs = [e["epoch"] + 1 for e in epochs]
    ax.plot(xs, [e.get("train_loss") for e in epochs], "o-", color=COLOURS["loss"], label="train loss (KD)")
    ax.set(xlabel="epoch", ylabel="train loss", title="learning curve")
    ax.set_xticks(xs if len(xs) <= 12 else xs[:: -(-len(xs) // 12)])
    ax.grid(True, alpha=0.25)
    metric = next((m for m in ("eval_mAP", "eval_top1") if any(m in e for e in epochs)), None)
    handles, labels = ax.get_legend_handles_labels()
    if metric:
        right = ax.twinx()
        right.plot(xs, [e.get(metric) for e in epochs], "s-", color=COLOURS["student"], label=f"student {metric}")
        ens = (c.get("eval") or {}).get("ensemble_vs_labels")
        if ens is not None:
            right.axhline(ens, color=COLOURS["ensemble"], ls="--", label="ensemble (re-run teachers)")
        right.set_ylabel(metric.replace("eval_", "held-out "))
        h2, l2 = right.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, fontsize=8, loc="center right")
    return fig


def plot_class_ap(c: dict):
    rows = [r for r in c["eval"]["per_class"] if r["student_ap"] is not None and r["ensemble_ap"] is not None]
    fig = _figure(7.0, 3.6)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="#999", lw=0.8)
    ax.scatter([r["ensemble_ap"] for r in rows], [r["student_ap"] for r in rows], color=COLOURS["student"], s=22)
    for i, r in enumerate(sorted(rows, key=lambda r: r["student_ap"] - r["ensemble_ap"])[:4]):
        ax.annotate(r["class"], (r["ensemble_ap"], r["student_ap"]), fontsize=7, textcoords="offset points",
                    xytext=(-4, -10 - 8 * (i % 2)), ha="right" if r["ensemble_ap"] > 0.7 else "left")
    ax.set(xlim=(0, 1.02), ylim=(0, 1.02), xlabel="ensemble AP", ylabel="student AP",
           title="held-out AP per class")
    ax.grid(True, alpha=0.25)
    return fig


def compare_section(c: dict) -> str:
    metric = "mAP" if c["output_kind"] == "multilabel" else "top-1 accuracy"
    rows = []
    v = c["views"]
    rows.append(["cached training views (ensemble rebuilt from the cache)", v["views"], v["top1_agreement"],
                 v["kl_mean"], v["map_vs_ensemble"], v["student_vs_labels"], v["ensemble_vs_labels"]])
    e = c.get("eval")
    if e:
        rows.append([f"held-out clips{' (teachers re-run)' if e.get('teachers') else ''}", e["clips"],
                     e.get("top1_agreement"), e.get("kl_mean"), e.get("map_vs_ensemble"), e["student_vs_labels"],
                     e.get("ensemble_vs_labels")])
    figures = table(rows, ["where", "n", "top-1 = ensemble's", "KL(ensemble ‖ student)", "mAP vs ensemble",
                           f"student {metric}", f"ensemble {metric}"])
    figs = []
    if c["epochs"]:
        figs.append(figure_html(plot_learning_curve(c), "Training loss and the held-out metric logged after each "
                                "epoch (metrics.jsonl); dashed: the re-run ensemble on the same clips."))
    if e and e.get("per_class") and c["output_kind"] == "multilabel":
        figs.append(figure_html(plot_class_ap(c), "Per-class AP of the student against the ensemble's on the "
                                "held-out clips; below the diagonal the student lags."))
    epochs = table([[x["epoch"] + 1, x.get("train_loss"), x.get("eval_mAP", x.get("eval_top1")),
                     x.get("samples_per_s")] for x in c["epochs"]],
                   ["epoch", "train loss", f"held-out {metric}", "views/s"])
    after = "-" if c["checkpoint_epoch"] is None else c["checkpoint_epoch"] + 1  # epochs from 1, as in the plot
    note = "" if c["cache_matches_run"] else ("<p class='note'>This cache is not the one the run was trained on "
                                              "(config digests differ).</p>")
    return (f"<h2>Student vs ensemble: {html.escape(c['student'])} ({html.escape(c['run'])})</h2>{note}"
            f"<p>checkpoint after epoch {after}; {c['output_kind']}; targets: "
            f"{html.escape(c['targets'])}</p>{figures}<div class='figs'>{''.join(figs)}</div>"
            f"<h3>Per epoch (from the run's log)</h3>{epochs}")


# ---------------------------------------------------------------- inspect / plan
def inspect_section(i: dict) -> str:
    rows = [["backend", i["backend"]], ["views", f"{i['epochs']} epochs x {i['samples']:,} samples"],
            ["targets", f"top-{i['topk']} of {i['classes']}, {i['value_dtype']} values, {i['output_kind']}"],
            ["teachers", ", ".join(i["teachers"])],
            ["on disk", f"{human_bytes(i['bytes_on_disk'])} ({i['bytes_per_sample_epoch']:.1f} B per view)"],
            ["share of the audio", f"{100 * i['share_of_audio']:.3g}%" if i.get("share_of_audio") else "-"]]
    p = i.get("projection")
    if p:
        rows.append(["projected", f"{human_bytes(p['bytes_on_disk'])} for {p['epochs']} epochs x {p['samples']:,} "
                     f"samples" + (f" ({100 * p['share_of_audio']:.3g}% of the audio)" if p.get("share_of_audio")
                                   else "")])
    out = table(rows, ["cache", html.escape(i["path"])])
    out += table([[g["name"], human_bytes(g["stored_bytes"]), human_bytes(g["raw_bytes"]), g["ratio"],
                   g["bytes_per_view"]] for g in i.get("targets_table", [])],
                 ["targets", "stored", "raw", "raw/stored", "B/view"])
    out += table([[e["epoch"], human_bytes(e["stored_bytes"]), e["bytes_per_view"], e["chunks_done"]]
                  for e in i.get("epochs_table", [])], ["epoch", "stored", "B/view", "chunks written"])
    return f"<h2>Cache</h2>{out}"


def plan_section(p: dict) -> str:
    rows = [[b["backend"], b["codec"], human_bytes(b["bytes_on_disk"]), b["bytes_per_sample_epoch"], b["ratio"],
             f"{100 * b['share_of_audio']:.3g}%" if b.get("share_of_audio") else "-"] for b in p["backends"]]
    return (f"<h2>Size plan</h2><p>{p['epochs']} epochs x {p['samples']:,} samples, top-{p['topk']} of "
            f"{p['classes']}, {p['members']} members, {p['value_dtype']}. {html.escape(p['method'])}.</p>"
            + table(rows, ["backend", "codec", "projected", "B/view", "ratio", "share of audio"]))


# ---------------------------------------------------------------- the page
def page(title: str, sections: list[str], subtitle: str = "") -> str:
    from logitcache import __version__

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p class='meta'>{html.escape(subtitle)} logitcache {__version__}, {now}</p>"
            + "".join(sections) + "</body></html>")


def write_report(path: str | Path, *, fidelity: dict | None = None, compare: dict | None = None,
                 inspect: dict | None = None, plan: dict | None = None, title: str = "logitcache report",
                 subtitle: str = "") -> Path:
    """Write one self-contained HTML file with a section per report given; returns its path."""
    sections = []
    if inspect:
        sections.append(inspect_section(inspect))
    if plan:
        sections.append(plan_section(plan))
    if fidelity:
        sections.append(fidelity_section(fidelity))
    if compare:
        sections.append(compare_section(compare))
    if not sections:
        raise LogitCacheError("nothing to report")
    path = Path(path)
    if path.parent and not path.parent.is_dir():
        raise LogitCacheError(f"{path}: folder {path.parent} does not exist")
    path.write_text(page(title, sections, subtitle), encoding="utf-8")
    return path


__all__ = ["write_report", "page", "png", "table"]
