"""The ``logitcache`` command: a thin layer over the library, one command per function.

    logitcache dump --data data/train --teacher a.pt2 --teacher b.pt2 --out run.zarr --epochs 8
    logitcache train --cache run.zarr --data data/train --student cnn_tiny --out runs/kd
    logitcache inspect run.zarr          logitcache verify run.zarr
    logitcache fidelity run.zarr --data data/train --teacher a.pt2 --teacher b.pt2

Human output is plain aligned text on stdout; ``--json`` prints exactly one JSON object on
stdout and nothing else (progress bars and chatter go to stderr). User errors print one
``error: ...`` line on stderr and exit 1 (130 on Ctrl-C); ``logitcache --debug ...`` adds the
traceback.
"""

from __future__ import annotations

import contextlib
import json
import sys
import traceback

import click

from logitcache import __version__
from logitcache.dump import PRECISIONS, VALUE_DTYPES
from logitcache.errors import LogitCacheError
from logitcache.storage import BACKENDS
from logitcache.targets import AGGREGATIONS, KINDS


# ---------------------------------------------------------------- errors -> one line
def _one_line(e: BaseException) -> str:
    """A one-line message for a user-facing error, including ones re-raised by DataLoader workers."""
    text = str(e).strip()
    if isinstance(e, OSError) and e.strerror and e.filename:
        return f"{e.filename}: {e.strerror}"
    if text.startswith("Caught ") and "Original Traceback" in text:
        # torch re-raises a worker's exception as "Caught X in DataLoader worker ...\n<traceback>";
        # the worker's own message is the traceback's last line, "module.Class: message".
        last = [ln for ln in text.splitlines() if ln.strip()][-1]
        head, sep, msg = last.partition(": ")
        text = msg if sep and "." in head else last
    return text.splitlines()[0] if text else type(e).__name__


class _Group(click.Group):
    """Turns the exceptions users cause into ``error: <one line>`` and an exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise  # click prints its own usage errors (exit 2)
        except KeyboardInterrupt:
            self._fail(ctx, "interrupted", 130)
        except (LogitCacheError, OSError) as e:
            self._fail(ctx, _one_line(e), 1)

    @staticmethod
    def _fail(ctx: click.Context, message: str, code: int) -> None:
        if ctx.params.get("debug"):
            traceback.print_exc()
        click.echo(f"error: {message}", err=True)
        ctx.exit(code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show the full traceback on errors.")
@click.version_option(__version__, prog_name="logitcache")
def main(debug: bool) -> None:
    """Offline teacher-logit cache for ensemble knowledge distillation of audio taggers.

    Dump the teachers' top-k logits on exactly replayable augmented views once, then train
    students from the cache as often as you like without loading a teacher.

    \b
    Example:
      logitcache dump --data data/train --teacher a.pt2 --teacher b.pt2 --out run.zarr
      logitcache train --cache run.zarr --data data/train --student cnn_tiny --out runs/kd
    """


# ---------------------------------------------------------------- output helpers
def _json_option(f):
    return click.option("--json", "as_json", is_flag=True,
                        help="Print one JSON object on stdout and nothing else.")(f)


@contextlib.contextmanager
def _quiet_stdout(as_json: bool):
    """Under --json, anything the library prints (tqdm.write, tables) goes to stderr instead."""
    if not as_json:
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _print_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def _kv_table(pairs: list[tuple[str, object]]) -> str:
    from logitcache.report import format_table

    return format_table([[k, v] for k, v in pairs])


def _weights_files(paths: tuple[str, ...], n_teachers: int) -> list[str | None]:
    if len(paths) > n_teachers:
        raise click.UsageError(f"{len(paths)} --weights files for {n_teachers} --teacher(s)")
    return [None if p in ("-", "none") else p for p in paths]


# ---------------------------------------------------------------- dump
@main.command()
@click.option("--data", required=True, metavar="DIR", help="Dataset folder (labels.csv + audio).")
@click.option("--teacher", "teachers", required=True, multiple=True, metavar="T",
              help="Teacher: a .pt2 torch.export file, a TorchScript file or package.module:callable. "
                   "Repeat for an ensemble.")
@click.option("--out", required=True, metavar="CACHE",
              help="Cache to create (.zarr folder, or .h5 for HDF5).")
@click.option("--epochs", default=1, show_default=True, help="Augmented views stored per sample.")
@click.option("--topk", default=20, show_default=True, help="Logits stored per view (and frame).")
@click.option("--augment", default="ced", show_default=True, metavar="NAME|FILE",
              help="Augmentation preset (none, ced, strong) or a JSON/TOML ops file.")
@click.option("--seed", default=0, show_default=True, help="Base seed of orders and augmentations.")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--output-kind", type=click.Choice(KINDS), default="multilabel", show_default=True,
              help="Sigmoid (multilabel) or softmax (multiclass) teachers.")
@click.option("--aggregation", type=click.Choice(AGGREGATIONS), default="mean_prob", show_default=True,
              help="How member logits become the ensemble's.")
@click.option("--teacher-weight", "ensemble_weights", multiple=True, type=float, metavar="W",
              help="Ensemble weight of each --teacher, in order (default: equal).")
@click.option("--weights", "weights_files", multiple=True, metavar="PATH",
              help="State dict for each factory --teacher, in order ('-' for none).")
@click.option("--members/--no-members", default=True, show_default=True,
              help="Also store each teacher's own top-k.")
@click.option("--value-dtype", type=click.Choice(VALUE_DTYPES), default="float16", show_default=True)
@click.option("--sample-rate", type=int, default=None, metavar="HZ",
              help="Default: the dataset's (dataset.json).")
@click.option("--clip-seconds", type=float, default=None, metavar="S",
              help="Default: the dataset's (dataset.json).")
@click.option("--backend", type=click.Choice(list(BACKENDS)), default=None,
              help="Default: from --out's suffix, else zarr.")
@click.option("--precision", type=click.Choice(list(PRECISIONS)), default="fp32", show_default=True,
              help="Teacher inference precision (autocast).")
@click.option("--workers", default=0, show_default=True, help="DataLoader workers making the views.")
@click.option("--chunk-rows", type=int, default=None, metavar="R",
              help="Rows per chunk (default: about 2 MiB chunks).")
@_json_option
def dump(data, teachers, out, epochs, topk, augment, seed, batch_size, device, output_kind, aggregation,
         ensemble_weights, weights_files, members, value_dtype, sample_rate, clip_seconds, backend, precision,
         workers, chunk_rows, as_json):
    """Run the teachers on augmented views and write a cache.

    Each of EPOCHS passes draws one augmented view per sample (parameters stored, so the view
    replays exactly), runs every teacher on it and stores the ensemble's (and each member's)
    top-k logits plus one statistic that keeps the tail mass exact.

    \b
    Example:
      logitcache dump --data data/train --teacher a.pt2 --teacher b.pt2 \\
          --out run.zarr --epochs 8 --topk 20 --augment ced
    """
    import logitcache
    from logitcache.report import human_bytes, inspect_cache

    with _quiet_stdout(as_json):
        path = logitcache.dump(
            data, list(teachers), out, epochs=epochs, topk=topk, augment=augment, seed=seed,
            batch_size=batch_size, device=device, output_kind=output_kind, aggregation=aggregation,
            ensemble_weights=list(ensemble_weights) or None,
            teacher_weights=_weights_files(weights_files, len(teachers)) or None, members=members,
            value_dtype=value_dtype, backend=backend, sample_rate=sample_rate, clip_seconds=clip_seconds,
            precision=precision, num_workers=workers, chunk_rows=chunk_rows, progress=True)
        info = inspect_cache(path)
    if as_json:
        _print_json(info)
        return
    share = f", {100 * info['share_of_audio']:.2f}% of the audio" if info["share_of_audio"] else ""
    click.echo(f"{info['path']}: {info['epochs'] * info['samples']} views ({info['epochs']} epochs x "
               f"{info['samples']} samples), top-{info['topk']} of {info['classes']}, "
               f"{human_bytes(info['bytes_on_disk'])}, "
               f"{info['bytes_per_sample_epoch']:.0f} B/sample-epoch{share}")


# ---------------------------------------------------------------- train
@main.command()
@click.option("--cache", required=True, metavar="CACHE", help="Cache written by 'logitcache dump'.")
@click.option("--data", required=True, metavar="DIR", help="The dataset folder the cache was dumped from.")
@click.option("--student", required=True, metavar="NAME|module:callable",
              help="A model zoo name (cnn_tiny, cnn_small, crnn_small, transformer_tiny) or a factory.")
@click.option("--out", required=True, metavar="RUN", help="Run folder (checkpoint.pt, metrics.jsonl).")
@click.option("--epochs", type=int, default=None, help="Default: one per stored epoch.")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--weight-decay", default=1e-4, show_default=True)
@click.option("--temperature", default=1.0, show_default=True, help="Distillation temperature T.")
@click.option("--alpha", default=0.0, show_default=True, help="Weight of the hard-label loss (0 = pure KD).")
@click.option("--member", default=None, help="Distil from one stored member instead of the ensemble.")
@click.option("--eval-data", default=None, metavar="DIR",
              help="Labelled folder to report mAP on after each epoch.")
@click.option("--device", default="auto", show_default=True)
@click.option("--precision", type=click.Choice(list(PRECISIONS)), default="fp32", show_default=True)
@click.option("--workers", default=0, show_default=True, help="DataLoader workers replaying views.")
@click.option("--seed", default=0, show_default=True)
@click.option("--allow-partial", is_flag=True, help="Train on the complete epochs of an unfinished cache.")
@_json_option
def train(cache, data, student, out, epochs, batch_size, lr, weight_decay, temperature, alpha, member,
          eval_data, device, precision, workers, seed, allow_partial, as_json):
    """Train a student from a cache (teachers are never loaded).

    Views are replayed from the stored augmentation parameters, targets stream from the cache
    in stored order. Prints the last epoch's metrics.

    \b
    Example:
      logitcache train --cache run.zarr --data data/train --student cnn_tiny \\
          --out runs/kd --epochs 8 --temperature 2 --eval-data data/eval
    """
    from logitcache.train import train as run_train

    with _quiet_stdout(as_json):
        metrics = run_train(cache, data, student, out, epochs=epochs, batch_size=batch_size, lr=lr,
                            weight_decay=weight_decay, temperature=temperature, alpha=alpha, member=member,
                            eval_data=eval_data, device=device, precision=precision, num_workers=workers,
                            seed=seed, allow_partial=allow_partial, progress=True)
    if as_json:
        _print_json(metrics)
        return
    click.echo(_kv_table([(k, v) for k, v in metrics.items() if k != "step_losses"]))
    click.echo(f"run written to {out}")


# ---------------------------------------------------------------- inspect
@main.command()
@click.argument("cache", metavar="CACHE")
@_json_option
def inspect(cache, as_json):
    """Summarise a cache and its size on disk.

    Prints what the cache holds (views, top-k, classes, teachers) and what each array costs.

    \b
    Example:
      logitcache inspect run.zarr
      logitcache inspect run.zarr --json | jq .bytes_per_sample_epoch
    """
    from logitcache.report import format_table, human_bytes, inspect_cache

    info = inspect_cache(cache)
    if as_json:
        _print_json(info)
        return
    members = f" (members stored: {', '.join(info['members'])})" if info["members"] else " (members not stored)"
    share, frames = "", ""
    if info["share_of_audio"]:
        share = f", {100 * info['share_of_audio']:.2f}% of the audio ({human_bytes(info['audio_bytes'])})"
    if info["frames"]:
        frames = f", {info['frames']} frames"
    click.echo(_kv_table([
        ("cache", f"{info['path']} ({info['backend']}, {'complete' if info['complete'] else 'INCOMPLETE'})"),
        ("views", f"{info['epochs']} epochs x {info['samples']} samples"),
        ("targets", (f"top-{info['topk']} of {info['classes']} classes{frames}, {info['output_kind']}, "
                     f"{info['aggregation']}, {info['value_dtype']} values, {info['index_dtype']} indices")),
        ("teachers", ", ".join(info["teachers"]) + members),
        ("chunks", f"{info['chunk_rows']} rows each, {info['chunks_done']}/{info['chunks_total']} written"),
        ("size", (f"{human_bytes(info['bytes_on_disk'])} on disk "
                  f"({human_bytes(info['bytes_uncompressed'])} raw), "
                  f"{info['bytes_per_sample_epoch']:.1f} B per sample-epoch{share}")),
    ]))
    click.echo()
    rows = [[a["name"], "x".join(map(str, a["shape"])), a["dtype"], human_bytes(a["stored_bytes"]),
             human_bytes(a["raw_bytes"]), a["ratio"]] for a in info["arrays"]]
    click.echo(format_table(rows, ["array", "shape", "dtype", "stored", "raw", "raw/stored"]))


# ---------------------------------------------------------------- verify
@main.command()
@click.argument("cache", metavar="CACHE")
@_json_option
def verify(cache, as_json):
    """Check every chunk of a cache (exit 1 if bad).

    Reads every chunk of every array; exits 1 when anything is wrong, listing the problems.

    Checks checksums, chunk completion markers, shapes and dtypes against the manifest, class
    index ranges, finite and sorted top-k values, per-epoch orders, ids and config digest.

    \b
    Example:
      logitcache verify run.zarr && echo intact
    """
    from logitcache.report import verify_cache

    with _quiet_stdout(as_json):
        result = verify_cache(cache, progress=True)
    if as_json:
        _print_json(result)
    elif result["ok"]:
        click.echo(f"ok: {cache}: {result['arrays_checked']} arrays, {result['chunks_checked']} chunks, "
                   f"{result['rows_checked']} rows checked")
    else:
        click.echo(f"{cache}: {len(result['problems'])} problem(s):")
        for p in result["problems"]:
            click.echo(f"  - {p}")
    if not result["ok"]:
        sys.exit(1)


# ---------------------------------------------------------------- fidelity
@main.command()
@click.argument("cache", metavar="CACHE")
@click.option("--data", required=True, metavar="DIR", help="The dataset folder the cache was dumped from.")
@click.option("--teacher", "teachers", required=True, multiple=True, metavar="T",
              help="The teachers of the dump, in the same order.")
@click.option("--weights", "weights_files", multiple=True, metavar="PATH",
              help="State dict for each factory --teacher, in order ('-' for none).")
@click.option("--samples", default=64, show_default=True, help="Stored views to re-run.")
@click.option("--seed", default=0, show_default=True, help="Seed of the random pick of views.")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--device", default="auto", show_default=True)
@_json_option
def fidelity(cache, data, teachers, weights_files, samples, seed, batch_size, device, as_json):
    """Compare the cache with freshly re-run teachers.

    Re-runs the teachers on a seeded random sample of stored views and compares with the cache.

    Reports the logit error at the stored top-k, how many stored top-k indices are still in the
    fresh top-k, top-1 agreement and the KL from the fresh teacher distribution to the one
    reconstructed from the cache (per member too). Teachers that differ from the dumped ones
    (sha256) are reported, not refused.

    \b
    Example:
      logitcache fidelity run.zarr --data data/train --teacher a.pt2 --teacher b.pt2 --samples 64
    """
    from logitcache.report import fidelity as run_fidelity
    from logitcache.report import format_table

    with _quiet_stdout(as_json):
        result = run_fidelity(cache, data, list(teachers), samples=samples, seed=seed, device=device,
                              teacher_weights=_weights_files(weights_files, len(teachers)) or None,
                              batch_size=batch_size, progress=True)
    if as_json:
        _print_json(result)
        return
    for t in result["teachers"]:
        if not t["match"]:
            click.echo(f"warning: teacher {t['name']} is not the one dumped (sha256 {t['sha256'][:12]} vs "
                       f"{(t['manifest_sha256'] or 'none')[:12]} in the manifest)", err=True)
    keys = ["max_abs_logit_error", "mean_abs_logit_error", "topk_index_agreement", "top1_agreement",
            "kl_mean", "kl_max"]
    rows = [["ensemble", *[result[k] for k in keys]]]
    rows += [[name, *[m[k] for k in keys]] for name, m in result["members"].items()]
    click.echo(f"{cache}: {result['samples_checked']} stored views re-run, top-{result['topk']}, "
               f"{result['value_dtype']} values; teachers match the manifest: "
               f"{'yes' if result['teachers_match'] else 'NO'}")
    headers = ["targets", "max |dz|", "mean |dz|", "top-k agree", "top-1 agree", "KL mean", "KL max"]
    click.echo(format_table(rows, headers))


# ---------------------------------------------------------------- demo
@main.command()
@click.option("--out", default="demo_out", show_default=True, metavar="DIR",
              help="Working folder of the demo.")
@_json_option
def demo(out, as_json):
    """End-to-end demo on synthetic audio (minutes on a CPU).

    Synthesises a dataset, trains three small teachers, dumps their ensemble, and trains a
    student from the cache and one from labels alone; prints the mAP table and cache size.

    \b
    Example:
      logitcache demo --out demo_out
    """
    from logitcache.demo import run_demo

    with _quiet_stdout(as_json):
        summary = run_demo(out, progress=True)
    if as_json:
        _print_json(summary)


if __name__ == "__main__":
    main()
