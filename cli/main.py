"""The ``logitcache`` command: a thin layer over the library, one command per function.

    logitcache dump --data data/train --teacher a.pt2 --teacher b.pt2 --out run.zarr --epochs 8
    logitcache train --cache run.zarr --data data/train --student cnn_tiny --out runs/kd
    logitcache inspect run.zarr          logitcache verify run.zarr
    logitcache fidelity run.zarr --data data/train --teacher a.pt2 --teacher b.pt2 --html report.html
    logitcache plan --samples 2000000 --epochs 8 --topk 32 --classes 527
    logitcache compare runs/kd --eval-data data/eval --teacher a.pt2 --teacher b.pt2
    logitcache copy run.zarr s3://bucket/run.zarr
    logitcache dump --data data/train --add-teacher c.pt2 --out run.zarr     logitcache members drop run.zarr c
    torchrun --nproc_per_node=8 -m logitcache dump ...   (or train: see README, Scaling out)

Human output is plain aligned text on stdout; ``--json`` prints exactly one JSON object on
stdout and nothing else (progress bars and chatter go to stderr). User errors print one
``error: ...`` line on stderr and exit 1 (130 on Ctrl-C, 143 on SIGTERM); ``logitcache --debug ...``
adds the traceback.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import sys
import traceback

import click
import numpy as np

from logitcache import __version__
from logitcache.codecs.topk import VALUE_DTYPES
from logitcache.device import PRECISIONS
from logitcache.errors import LogitCacheError, Terminated, sigterm_as_interrupt
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


MAX_MESSAGE = 300  # characters of an error line; longer ones are cut with "..."

# What an interrupted command leaves behind, and how to continue.
_KEPT = {"dump": "the chunks written so far are kept: re-run with --resume",
         "train": "the run's last checkpoint is kept: re-run with --resume"}


def _interrupted(what: str, command: str | None) -> str:
    kept = _KEPT.get(command or "")
    return f"{what}; {kept}" if kept else what


def _url_in_args() -> str | None:
    return next((a for a in sys.argv[1:] if "://" in a), None)


class _Group(click.Group):
    """Turns the exceptions users cause into ``error: <one line>`` and an exit code.

    SIGTERM is treated like Ctrl-C (it unwinds the command, which keeps what it wrote) and exits
    143, the status a process killed by SIGTERM has. Any other exception is a bug and keeps its
    traceback."""

    def invoke(self, ctx: click.Context):
        from logitcache.storage import credentials_message

        try:
            with sigterm_as_interrupt():
                return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise  # click prints its own usage errors (exit 2)
        except Terminated:
            self._fail(ctx, _interrupted("terminated (SIGTERM)", ctx.invoked_subcommand), 143)
        except KeyboardInterrupt:
            self._fail(ctx, _interrupted("interrupted", ctx.invoked_subcommand), 130)
        except (LogitCacheError, OSError) as e:
            self._fail(ctx, _one_line(e), 1)
        except Exception as e:  # an object store without credentials, from a path the library does not wrap
            message = credentials_message(_url_in_args(), e)
            if message is None:
                raise
            self._fail(ctx, message, 1)

    @staticmethod
    def _fail(ctx: click.Context, message: str, code: int) -> None:
        if ctx.params.get("debug"):
            traceback.print_exc()
        line = (message.strip().splitlines() or [""])[0]
        if len(line) > MAX_MESSAGE:
            line = line[:MAX_MESSAGE - 3] + "..."
        click.echo(f"error: {line}", err=True)
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


def _json_safe(obj):
    """``obj`` with NaN/Infinity as None (JSON has no such numbers) and numpy scalars as Python's."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        return float(obj) if math.isfinite(obj) else None
    return obj


def _print_json(obj) -> None:
    click.echo(json.dumps(_json_safe(obj), indent=2, default=str, allow_nan=False))


def _threads_option(f):
    return click.option("--threads", type=int, default=None, metavar="N",
                        help="torch intra-op threads. [default: on CPU, the cores the --workers leave free, "
                             "unless OMP_NUM_THREADS is set]")(f)


def _kv_table(pairs: list[tuple[str, object]]) -> str:
    from logitcache.report import format_table

    return format_table([[k, v] for k, v in pairs])


class _Aliased(click.Option):
    """An option whose later spellings (kept so old scripts still run) are not shown in --help."""

    def get_help_record(self, ctx):
        opts, self.opts = self.opts, self.opts[:1]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = opts


def _factory_options(f):
    """--state-dict and --teacher-arg, the same for dump, fidelity and compare."""
    f = click.option("--teacher-arg", "teacher_args", multiple=True, metavar="KEY=VALUE",
                     help="Keyword argument for every factory --teacher that takes KEY (VALUE: a JSON literal, "
                          "else a string). Repeatable.")(f)
    return click.option("--state-dict", "--weights", "state_dicts", cls=_Aliased, multiple=True, metavar="PATH",
                        help="State dict for each factory --teacher, in order ('-' for none; loaded "
                             "weights-only).")(f)


def _hetero_options(f):
    """Teachers that differ (logitcache.hetero): their own rate, clip length and classes."""
    f = click.option("--unmapped", type=click.Choice(["error", "ignore"]), default="error", show_default=True,
                     help="A dataset class a --class-map does not reach: an error, or (ignore) the teacher is a "
                          "specialist that contributes only to the classes it maps.")(f)
    f = click.option("--class-map", "class_maps", multiple=True, metavar="FILE",
                     help="JSON map of each --teacher's classes onto the dataset's, by name, in --teacher order "
                          "('-' for none).")(f)
    f = click.option("--teacher-clip-seconds", "teacher_clip_seconds", multiple=True, metavar="S",
                     help="Clip length of each --teacher, in order ('-' for the dump's): its resampled view is "
                          "cropped or zero-padded at the end.")(f)
    return click.option("--teacher-sample-rate", "teacher_sample_rates", multiple=True, metavar="HZ",
                        help="Input rate of each --teacher, in order ('-' for the dump's): it gets the drawn "
                             "view resampled to it.")(f)


def _per_teacher(values: tuple[str, ...], number) -> list | None:
    """Per-teacher CLI strings: '-' or 'none' -> None, numbers parsed (else kept, for the library's error)."""
    out = []
    for v in values:
        try:
            out.append(None if v in ("-", "none") else number(v))
        except ValueError:
            out.append(v)
    return out or None


def _teacher_kwargs(state_dicts: tuple[str, ...], teacher_args: tuple[str, ...]) -> dict:
    """The library's state_dicts= and teacher_args= from the CLI's strings."""
    from logitcache.teacher_factory import parse_teacher_args

    return {"state_dicts": [None if p in ("-", "none") else p for p in state_dicts] or None,
            "teacher_args": parse_teacher_args(teacher_args) or None}


def _recompose_options(f):
    """--ensemble, --ensemble-weights/--ensemble-weight, --aggregation, --member-weighting: the same
    for train and fidelity (logitcache.recompose)."""
    from logitcache.recompose import AGGREGATIONS as RECOMPOSE_AGGREGATIONS, MEMBER_WEIGHTINGS

    f = click.option("--member-weighting", type=click.Choice(MEMBER_WEIGHTINGS), default=None,
                     help="With --ensemble: 'confidence' weights the members per row by exp(-entropy) of their "
                          "stored rows. [default: none]")(f)
    f = click.option("--aggregation", type=click.Choice(RECOMPOSE_AGGREGATIONS), default=None,
                     help="With --ensemble: how member logits combine; the _zscore variants standardise each "
                          "member by its logit statistics measured at dump time. [default: the cache's]")(f)
    f = click.option("--ensemble-weight", "ensemble_weight", multiple=True, type=float, metavar="W",
                     help="With --ensemble: one weight per member, repeatable (as dump's --ensemble-weight).")(f)
    f = click.option("--ensemble-weights", "ensemble_weights", default=None, metavar="W,W,...",
                     help="With --ensemble: one weight per member, in --ensemble order, comma-separated "
                          "(normalised, as dump's --ensemble-weight). [default: equal]")(f)
    return click.option("--ensemble", "ensemble", multiple=True, metavar="NAME,NAME,...",
                        help="Recompose the targets from these stored members (comma-separated or repeated), "
                             "without the teachers.")(f)


def _recompose_kwargs(ensemble, ensemble_weights, ensemble_weight, aggregation, member_weighting) -> dict:
    """The library's ensemble=, ensemble_weights=, aggregation=, member_weighting= from the CLI's."""
    from logitcache.recompose import split_weights

    if ensemble_weights is not None and ensemble_weight:
        raise LogitCacheError("--ensemble-weights and --ensemble-weight: give the weights one way")
    weights = split_weights(ensemble_weights) if ensemble_weights is not None else list(ensemble_weight) or None
    return {"ensemble": list(ensemble) or None, "ensemble_weights": weights, "aggregation": aggregation,
            "member_weighting": member_weighting}


def _source_option(f):
    return click.option("--source", default=None, metavar="KIND",
                        help="The data's source kind: audio_folder, image_folder, manifest or tokens. [default: "
                             "detected from --data]")(f)


# ---------------------------------------------------------------- dump
@main.command()
@click.option("--data", required=True, metavar="PATH",
              help="Data: a folder (labels.csv + audio or images, or one image sub-folder per class), a "
                   ".csv/.jsonl manifest of files and labels, or a token corpus (a nanoGPT .bin beside its JSON, "
                   "or a JSON naming a JSONL file and a tokenizers file).")
@_source_option
@click.option("--teacher", "teachers", multiple=True, metavar="T",
              help="Teacher: a .pt2 torch.export file, an .onnx model, a TorchScript file, "
                   "package.module:callable or a teacher .json spec. Repeat for an ensemble. With "
                   "--add-teacher: the ensemble's teachers as dumped, to recompute the ensemble.")
@click.option("--add-teacher", "add_teachers", multiple=True, metavar="T",
              help="Add T as a member of the complete cache --out: only T runs, on the stored views "
                   "(the cache's settings apply). Repeatable. See README, Adding and dropping members.")
@click.option("--out", required=True, metavar="CACHE",
              help="Cache to create (.zarr folder, or .h5 for HDF5).")
@click.option("--epochs", default=1, show_default=True, help="Augmented views stored per sample.")
@click.option("--topk", default=20, show_default=True, help="Logits stored per view (and frame, or token position).")
@click.option("--augment", default=None, metavar="NAME|FILE",
              help="Augmentation preset (audio: none, ced, strong; tokens: offset, none) or a JSON/TOML ops file. "
                   "[default: ced for audio, the image preset for images, offset for tokens]")
@click.option("--seed", default=0, show_default=True, help="Base seed of orders and augmentations.")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--output-kind", type=click.Choice(KINDS), default=None,
              help="Sigmoid (multilabel) or softmax (multiclass) teachers.  [default: multilabel; multiclass for "
                   "token data]")
@click.option("--aggregation", type=click.Choice(AGGREGATIONS), default="mean_prob", show_default=True,
              help="How member logits become the ensemble's.")
@click.option("--ensemble-weight", "--teacher-weight", "ensemble_weights", cls=_Aliased, multiple=True, type=float,
              metavar="W", help="Ensemble weight of each --teacher, in order (default: equal).")
@_factory_options
@_hetero_options
@click.option("--members/--no-members", default=True, show_default=True,
              help="Also store each teacher's own top-k.")
@click.option("--value-dtype", type=click.Choice(VALUE_DTYPES), default="float16", show_default=True)
@click.option("--codec", default="topk", show_default=True, metavar="NAME",
              help="Target codec: topk (raw top-k logits), compact (about half the bytes) or sampled "
                   "(ids drawn from the teacher, unbiased; README, Target codecs).")
@click.option("--value-bits", type=int, default=None, metavar="B",
              help="compact: bits per stored value, 1..16. [default: 8]")
@click.option("--sample-n", type=int, default=None, metavar="N",
              help="sampled (required): ids drawn per row, 1..65535.")
@click.option("--sample-head", type=int, default=None, metavar="H",
              help="sampled: classes stored exactly before sampling the rest, 0..C-1. [default: 0]")
@click.option("--sample-temperature", type=float, default=None, metavar="T",
              help="sampled: teacher temperature the ids are drawn at; train at the same T for an "
                   "unbiased loss. [default: 1]")
@click.option("--sample-rate", type=int, default=None, metavar="HZ",
              help="Default: the dataset's (dataset.json).")
@click.option("--clip-seconds", type=float, default=None, metavar="S",
              help="Default: the dataset's (dataset.json).")
@click.option("--image-size", default=None, metavar="PX|HxW",
              help="Images: the view size. [default: dataset.json's image_size, else 224]")
@click.option("--backend", type=click.Choice(list(BACKENDS)), default=None,
              help="Default: from --out's suffix, else zarr.")
@click.option("--precision", type=click.Choice(list(PRECISIONS)), default="fp32", show_default=True,
              help="Teacher inference precision (autocast).")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile each teacher (for long dumps on an accelerator).")
@click.option("--channels-last", is_flag=True, help="Teachers' weights in channels-last memory format.")
@click.option("--workers", type=int, default=None,
              help="DataLoader workers making the views. [default: on CPU, chosen from the measured cost of the first "
                   "views and of the teachers on them (README, Performance); min(8, cores-1) on CUDA]")
@click.option("--chunk-rows", type=int, default=None, metavar="R",
              help="Rows per chunk (default: about 8 MiB of targets per chunk).")
@_threads_option
@click.option("--resume", is_flag=True,
              help="Continue an unfinished dump at --out (same settings), or extend a complete one to a larger "
                   "--epochs; creates --out if it is missing.")
@click.option("--distributed/--no-distributed", default=None,
              help="One rank of a torch.distributed job (torchrun): each rank writes its own chunks of one "
                   "zarr cache. [default: on when WORLD_SIZE > 1]")
@_json_option
def dump(data, source, teachers, add_teachers, out, epochs, topk, augment, seed, batch_size, device, output_kind, aggregation,
         ensemble_weights, state_dicts, teacher_args, teacher_sample_rates, teacher_clip_seconds, class_maps,
         unmapped, members, value_dtype, codec, value_bits, sample_n, sample_head, sample_temperature, sample_rate,
         clip_seconds, image_size, backend, precision, compile_, channels_last, workers, chunk_rows, threads, resume,
         distributed, as_json):
    """Run the teachers on augmented views and write a cache.

    Each of EPOCHS passes draws one augmented view per sample (parameters stored, so the view
    replays exactly), runs every teacher on it and stores the ensemble's (and each member's)
    top-k logits plus one statistic that keeps the tail mass exact.

    A killed or failed dump keeps every chunk it finished: re-run the same command with --resume
    to write only the rest (the same command with a larger --epochs and --resume adds epochs).

    \b
    Example:
      logitcache dump --data data/train --teacher a.pt2 --teacher b.pt2 \\
          --out run.zarr --epochs 8 --topk 20 --augment ced
      torchrun --nproc_per_node=8 -m logitcache dump --data data/train --teacher a.pt2 \\
          --out run.zarr --epochs 8        # 8 GPUs, one zarr cache, identical bytes
    """
    import logitcache
    from logitcache.distributed import current_rank
    from logitcache.report import human_bytes, inspect_cache

    if add_teachers:
        _add_teachers(data, teachers, add_teachers, out, ensemble_weights, state_dicts, teacher_args, batch_size,
                      device, workers, threads, as_json)
        return
    with _quiet_stdout(as_json):
        path = logitcache.dump(
            data, list(teachers), out, epochs=epochs, topk=topk, augment=augment, seed=seed,
            batch_size=batch_size, device=device, output_kind=output_kind, aggregation=aggregation,
            ensemble_weights=list(ensemble_weights) or None, **_teacher_kwargs(state_dicts, teacher_args),
            members=members,
            value_dtype=value_dtype, backend=backend, sample_rate=sample_rate, clip_seconds=clip_seconds,
            image_size=image_size, source=source, precision=precision, compile=compile_,
            channels_last=channels_last, num_workers=workers,
            chunk_rows=chunk_rows, resume=resume, progress=True, distributed=distributed, threads=threads,
            codec=codec, value_bits=value_bits, sample_n=sample_n, sample_head=sample_head,
            sample_temperature=sample_temperature, teacher_sample_rates=_per_teacher(teacher_sample_rates, int),
            teacher_clip_seconds=_per_teacher(teacher_clip_seconds, float),
            class_maps=[None if p in ("-", "none") else p for p in class_maps] or None, unmapped=unmapped)
        if current_rank() != 0:
            return  # rank 0 reports for the job
        info = inspect_cache(path)
    if as_json:
        _print_json(info)
        return
    share = f", {100 * info['share_of_audio']:.2f}% of the audio" if info["share_of_audio"] else ""
    click.echo(f"{info['path']}: {info['epochs'] * info['samples']} views ({info['epochs']} epochs x "
               f"{info['samples']} samples), {_rows_what(info)} of {info['classes']} ({info['codec']}), "
               f"{human_bytes(info['bytes_on_disk'])}, "
               f"{info['bytes_per_sample_epoch']:.0f} B/sample-epoch{share}"
               + (f", {info['tokens']['bytes_per_token']:.1f} B/token" if info.get("tokens") else ""))


# dump options that describe a new cache: the cache's own settings apply to an added teacher
_ADD_REFUSES = ("epochs", "topk", "augment", "seed", "output_kind", "aggregation", "members", "value_dtype", "codec",
                "value_bits", "sample_n", "sample_head", "sample_temperature", "sample_rate", "clip_seconds",
                "backend", "precision", "compile_", "channels_last", "chunk_rows", "distributed",
                "teacher_sample_rates", "teacher_clip_seconds", "class_maps", "unmapped")
_FLAGS = {"teacher_sample_rates": "--teacher-sample-rate", "teacher_clip_seconds": "--teacher-clip-seconds",
          "class_maps": "--class-map"}


def _add_teachers(data, teachers, add_teachers, out, ensemble_weights, state_dicts, teacher_args, batch_size,
                  device, workers, threads, as_json) -> None:
    """``dump --add-teacher``: :func:`logitcache.add_teachers` on the cache --out."""
    import logitcache
    from logitcache.report import inspect_cache

    ctx = click.get_current_context()
    for name in _ADD_REFUSES:
        if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE:
            flag = _FLAGS.get(name, "--" + name.rstrip("_").replace("_", "-"))
            raise LogitCacheError(f"{flag}: does not apply with --add-teacher (the cache's own settings are used)")
    with _quiet_stdout(as_json):
        path = logitcache.add_teachers(out, data, list(add_teachers), ensemble_teachers=list(teachers) or None,
                                       ensemble_weights=list(ensemble_weights) or None,
                                       **_teacher_kwargs(state_dicts, teacher_args), batch_size=batch_size,
                                       device=device, num_workers=workers, threads=threads, progress=True)
        info = inspect_cache(path)
    if as_json:
        _print_json(info)
        return
    click.echo(f"{info['path']}: members {', '.join(info['members'])}")
    for line in _provenance_lines(info):
        click.echo(f"  {line}")


def _provenance_lines(info: dict) -> list[str]:
    """One line per target set: how, when and from what it was written."""
    from logitcache.reports.inspect import provenance_lines

    return provenance_lines(info["provenance"])


def _rows_what(info: dict) -> str:
    """What one stored row holds, for the one-line summary."""
    if info["codec"] == "sampled":
        o = info["codec_options"]
        return f"{o['n']} draws" + (f" + head {o['head']}" if o.get("head") else "")
    return f"top-{info['topk']}"


# ---------------------------------------------------------------- train
@main.command()
@click.option("--cache", required=True, metavar="CACHE", help="Cache written by 'logitcache dump'.")
@click.option("--data", required=True, metavar="PATH", help="The data the cache was dumped from.")
@_source_option
@click.option("--student", required=True, metavar="NAME|module:callable",
              help="A model zoo name (cnn_tiny, cnn_small, crnn_small, transformer_tiny; image_cnn_tiny; "
                   "gpt_tiny for token caches) or a factory.")
@click.option("--out", required=True, metavar="RUN", help="Run folder (checkpoint.pt, metrics.jsonl).")
@click.option("--epochs", type=int, default=None, help="Default: one per stored epoch.")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--weight-decay", default=1e-4, show_default=True)
@click.option("--temperature", default=1.0, show_default=True, help="Distillation temperature T.")
@click.option("--alpha", default=0.0, show_default=True, help="Weight of the hard-label loss (0 = pure KD).")
@click.option("--member", default=None, help="Distil from one stored member instead of the ensemble.")
@click.option("--heads", default="ensemble", show_default=True, metavar="ensemble|members",
              help="members: one output head per stored member (shared body), each distilled from its own "
                   "member; the prediction combines the heads as the cache's ensemble combines the members.")
@_recompose_options
@click.option("--eval-data", default=None, metavar="PATH",
              help="Labelled folder to report mAP (multilabel) or top-1 accuracy (multiclass) on after each epoch; "
                   "for a token cache, a held-out corpus (.bin or its JSON) to report next-token perplexity on "
                   "(eval_nll, eval_ppl over eval_tokens unmasked positions).")
@click.option("--device", default="auto", show_default=True)
@click.option("--precision", type=click.Choice(list(PRECISIONS)), default="fp32", show_default=True)
@click.option("--workers", default=0, show_default=True, help="DataLoader workers replaying views.")
@_threads_option
@click.option("--seed", default=0, show_default=True)
@click.option("--allow-partial", is_flag=True, help="Train on the complete epochs of an unfinished cache.")
@click.option("--distributed/--no-distributed", default=None,
              help="One rank of a DDP job (torchrun); --batch-size is then the global batch, split over the "
                   "ranks. [default: on when WORLD_SIZE > 1]")
@click.option("--resume", is_flag=True,
              help="Continue the run in --out from its checkpoint.pt, at the exact next batch of the stored order.")
@click.option("--checkpoint-every", type=int, default=None, metavar="STEPS",
              help="Also write checkpoint.pt every STEPS steps (default: after each epoch only).")
@_json_option
def train(cache, data, source, student, out, epochs, batch_size, lr, weight_decay, temperature, alpha, member, heads,
          ensemble, ensemble_weights, ensemble_weight, aggregation, member_weighting,
          eval_data, device, precision, workers, threads, seed, allow_partial, distributed, resume, checkpoint_every,
          as_json):
    """Train a student from a cache (teachers are never loaded).

    Views are replayed from the stored augmentation parameters, targets stream from the cache
    in stored order. Prints the last epoch's metrics.

    \b
    Example:
      logitcache train --cache run.zarr --data data/train --student cnn_tiny \\
          --out runs/kd --epochs 8 --temperature 2 --eval-data data/eval
      torchrun --nproc_per_node=4 -m logitcache train --cache run.zarr --data data/train \\
          --student cnn_tiny --out runs/ddp --batch-size 256    # 64 per rank
      logitcache train --cache run.zarr --data data/train --student cnn_tiny --out runs/ab \\
          --ensemble a,b --ensemble-weights 2,1    # members a and b recomposed, no teacher run
    """
    from logitcache.distributed import current_rank
    from logitcache.train import train as run_train

    with _quiet_stdout(as_json):
        metrics = run_train(cache, data, student, out, epochs=epochs, batch_size=batch_size, lr=lr,
                            weight_decay=weight_decay, temperature=temperature, alpha=alpha, member=member,
                            heads=heads, eval_data=eval_data, device=device, precision=precision,
                            num_workers=workers,
                            seed=seed, allow_partial=allow_partial, progress=True, distributed=distributed,
                            resume=resume, checkpoint_every=checkpoint_every, threads=threads, source=source,
                            **_recompose_kwargs(ensemble, ensemble_weights, ensemble_weight, aggregation,
                                                member_weighting))
    if current_rank() != 0:
        return  # rank 0 reports for the job
    if as_json:
        _print_json(metrics)
        return
    click.echo(_kv_table([(k, v) for k, v in metrics.items() if k != "step_losses"]))
    click.echo(f"run written to {out}")


# ---------------------------------------------------------------- inspect
@main.command()
@click.argument("cache", metavar="CACHE")
@click.option("--project-samples", type=int, default=None, metavar="N",
              help="Also project the size to N samples (default: this cache's), from its measured bytes.")
@click.option("--project-epochs", type=int, default=None, metavar="E",
              help="Also project the size to E epochs (default: this cache's).")
@_json_option
def inspect(cache, project_samples, project_epochs, as_json):
    """Summarise a cache and its size on disk.

    Prints what the cache holds (views, top-k, classes, teachers), what each array, each target
    set (ensemble, members) and each epoch costs, and optionally the size at full scale.

    \b
    Example:
      logitcache inspect run.zarr
      logitcache inspect run.zarr --project-samples 2000000 --project-epochs 8
      logitcache inspect run.zarr --json | jq .bytes_per_sample_epoch
    """
    from logitcache.report import format_table, human_bytes, inspect_cache

    if project_samples is None and project_epochs is None:
        info = inspect_cache(cache)
    else:
        info = inspect_cache(cache, project_samples=project_samples, project_epochs=project_epochs)
    if as_json:
        _print_json(info)
        return
    members = f" (members stored: {', '.join(info['members'])})" if info["members"] else " (members not stored)"
    share, frames = "", ""
    if info["share_of_audio"]:
        share = f", {100 * info['share_of_audio']:.2f}% of the audio ({human_bytes(info['audio_bytes'])})"
    if info["frames"]:
        frames = f", {info['frames']} frames"
    if info.get("positions"):
        frames = f", a {'x'.join(map(str, info['positions']))} map ({info['frames']} positions)"
    tok = info.get("tokens")
    views, classes, per = f"{info['epochs']} epochs x {info['samples']} samples", f"{info['classes']} classes", ""
    if tok:  # a token cache: windows of L positions over a vocabulary, sized per token
        views += f" (windows of {tok['context']} tokens, {tok['tokens']} positions)"
        classes, frames, per = f"a vocabulary of {tok['vocab_size']}", "", f", {tok['bytes_per_token']:.1f} B per token"
    click.echo(_kv_table([
        ("cache", f"{info['path']} ({info['backend']}, {'complete' if info['complete'] else 'INCOMPLETE'})"),
        ("views", views),
        ("targets", (f"{_rows_what(info)} of {classes}{frames}, {info['output_kind']}, "
                     f"{info['aggregation']}" + (f", {info['value_dtype']} values, {info['index_dtype']} indices"
                                                 if info["codec"] == "topk" else ""))),
        ("codec", f"{info['codec']} {json.dumps(info['codec_options'])}, {info['target_row_bytes']} B raw per view "
                  f"and target set (format {info['format_version']})"),
        ("teachers", ", ".join(info["teachers"]) + members),
        ("chunks", f"{info['chunk_rows']} rows each, {info['chunks_done']}/{info['chunks_total']} written"),
        ("size", (f"{human_bytes(info['bytes_on_disk'])} on disk "
                  f"({human_bytes(info['bytes_uncompressed'])} raw), "
                  f"{info['bytes_per_sample_epoch']:.1f} B per sample-epoch{per}{share}")),
    ]))
    click.echo()
    click.echo("target sets:")
    for line in _provenance_lines(info):
        click.echo(f"  {line}")
    click.echo()
    rows = [[a["name"], "x".join(map(str, a["shape"])), a["dtype"], human_bytes(a["stored_bytes"]),
             human_bytes(a["raw_bytes"]), a["ratio"]] for a in info["arrays"]]
    click.echo(format_table(rows, ["array", "shape", "dtype", "stored", "raw", "raw/stored"]))
    for line in _inspect_tables(info):
        click.echo(line)


def _inspect_tables(info: dict) -> list[str]:
    """The per-target-set, per-epoch and projection tables of ``inspect`` (text)."""
    from logitcache.report import format_table, human_bytes

    per = "bytes_per_token" if info.get("tokens") else "bytes_per_view"
    out = ["", format_table([[t["name"], human_bytes(t["stored_bytes"]), human_bytes(t["raw_bytes"]), t["ratio"],
                              round(t[per], 2 if info.get("tokens") else 1)] for t in info.get("targets_table", [])],
                            ["targets", "stored", "raw", "raw/stored", "B/token" if info.get("tokens") else "B/view"])]
    if info.get("epochs_table"):
        out += ["", format_table([[e["epoch"], human_bytes(e["stored_bytes"]), round(e["bytes_per_view"], 1),
                                   e["chunks_done"]] for e in info["epochs_table"]],
                                 ["epoch", "stored", "B/view", "chunks written"])]
    p = info.get("projection")
    if p:
        share = f", {100 * p['share_of_audio']:.3g}% of the audio" if p.get("share_of_audio") else ""
        out += ["", f"projected: {human_bytes(p['bytes_on_disk'])} for {p['epochs']} epochs x {p['samples']} samples "
                    f"({p['bytes_per_sample_epoch']:.1f} B per sample-epoch{share}; scaled from this cache's "
                    f"measured bytes, {info['chunk_rows']}-row chunks)",
                format_table([[g, human_bytes(b)] for g, b in p["groups"].items()], ["part", "projected"])]
    return out


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


# ---------------------------------------------------------------- members
@main.group()
def members() -> None:
    """Manage a cache's stored members (add one with 'logitcache dump --add-teacher').

    \b
    Example:
      logitcache dump --data data/train --add-teacher c.pt2 --out run.zarr
      logitcache members drop run.zarr c
    """


@members.command("drop")
@click.argument("cache", metavar="CACHE")
@click.argument("name", metavar="NAME")
@_json_option
def members_drop(cache, name, as_json):
    """Remove member NAME's arrays from CACHE (the cache shrinks on disk).

    The manifest stops naming the member before anything is removed, so a kill leaves a valid
    cache. The ensemble keeps the member's contribution (inspect says so). Dropping a member of
    an unfinished --add-teacher cancels it.
    """
    import logitcache
    from logitcache.report import human_bytes

    result = logitcache.drop_member(cache, name)
    if as_json:
        _print_json(result)
        return
    click.echo(f"dropped member {name} from {cache}: {human_bytes(result['bytes_before'])} -> "
               f"{human_bytes(result['bytes_after'])} on disk")


# ---------------------------------------------------------------- fidelity
@main.command()
@click.argument("cache", metavar="CACHE")
@click.option("--data", required=True, metavar="PATH", help="The data the cache was dumped from.")
@_source_option
@click.option("--teacher", "teachers", required=True, multiple=True, metavar="T",
              help="The teachers of the dump, in the same order.")
@_factory_options
@click.option("--samples", default=64, show_default=True, help="Stored views to re-run.")
@click.option("--seed", default=0, show_default=True, help="Seed of the random pick of views.")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--html", "html_out", default=None, metavar="OUT.html",
              help="Also write a self-contained HTML report with plots (cache summary included).")
@_recompose_options
@_json_option
def fidelity(cache, data, source, teachers, state_dicts, teacher_args, samples, seed, batch_size, device, html_out,
             ensemble, ensemble_weights, ensemble_weight, aggregation, member_weighting, as_json):
    """Compare the cache with freshly re-run teachers.

    Re-runs the teachers on a seeded random sample of stored views and compares with the cache.

    Reports the logit error at the stored top-k, how many stored top-k indices are still in the
    fresh top-k, top-1 agreement and the KL from the fresh teacher distribution to the one
    reconstructed from the cache (per member too). Teachers that differ from the dumped ones
    (count, names, sha256) are reported with a warning, not refused. Then, per k' <= k (the cache truncated to its top k'):
    KL, agreement, covered probability mass (softmax) or sigmoid probability error, the effect
    of float16 vs float32 values, the members' disagreement and the least covered classes.

    \b
    Example:
      logitcache fidelity run.zarr --data data/train --teacher a.pt2 --teacher b.pt2 --samples 64
      logitcache fidelity run.zarr --data data/train --teacher a.pt2 --html fidelity.html
      logitcache fidelity run.zarr --data data/train --teacher a.pt2 --teacher b.pt2 \\
          --ensemble a,b --ensemble-weights 2,1

    With --ensemble (and --ensemble-weights, --aggregation, --member-weighting as for train),
    also the KL from that composition of the re-run teachers to the one recomposed from the
    stored members.
    """
    from logitcache.report import fidelity as run_fidelity
    from logitcache.report import format_table

    with _quiet_stdout(as_json):
        result = run_fidelity(cache, data, list(teachers), samples=samples, seed=seed, device=device,
                              **_teacher_kwargs(state_dicts, teacher_args), batch_size=batch_size, progress=True,
                              source=source,
                              **_recompose_kwargs(ensemble, ensemble_weights, ensemble_weight, aggregation,
                                                  member_weighting))
    if html_out:
        from logitcache.html import write_report
        from logitcache.report import inspect_cache

        path = write_report(html_out, inspect=inspect_cache(cache), fidelity=result,
                            title=f"logitcache fidelity: {cache}")
        click.echo(f"report written to {path}", err=True)
    if as_json:
        _print_json(result)
        return
    keys = ["max_abs_logit_error", "mean_abs_logit_error", "topk_index_agreement", "top1_agreement",
            "kl_mean", "kl_max"]
    rows = [["ensemble", *[result[k] for k in keys]]]
    rows += [[name, *[m[k] for k in keys]] for name, m in result["members"].items()]
    stored = (f"top-{result['topk']}, {result['value_dtype']} values" if result.get("per_k") is not None
              else f"codec {result['codec']}")
    views = f"{result['samples_checked']} stored views"
    if result.get("modality") == "tokens":
        views = (f"{result['samples_checked']} stored windows ({result['positions']} unmasked positions of "
                 f"{result['samples_checked'] * result['frames']}; every figure is a mean over them)")
    click.echo(f"{cache}: {views} re-run, {stored}; teachers match the manifest: "
               f"{'yes' if result['teachers_match'] else 'NO'}")
    headers = ["targets", "max |dz|", "mean |dz|", "top-k agree", "top-1 agree", "KL mean", "KL max"]
    click.echo(format_table(rows, headers))
    for line in _fidelity_tables(result) + _recomposed_table(result.get("recomposed") or []):
        click.echo(line)


def _recomposed_table(recomposed: list[dict]) -> list[str]:
    """The recompositions of ``fidelity --ensemble`` as text."""
    from logitcache.report import format_table

    if not recomposed:
        return []
    rows = [[",".join(r["ensemble"]), ",".join(f"{w:g}" for w in r["ensemble_weights"]) if r["ensemble_weights"]
             else "equal", r["aggregation"], r["member_weighting"], r["width"], r["kl_mean"], r["kl_max"],
             r["top1_agreement"]] for r in recomposed]
    return ["", f"recomposed from the stored members vs the same composition of the re-run teachers "
                f"({recomposed[0]['rows']} rows):",
            format_table(rows, ["ensemble", "weights", "aggregation", "weighting", "classes/row",
                                "KL mean", "KL max", "top-1 agree"])]


def _fidelity_tables(r: dict) -> list[str]:
    """The report part of ``fidelity`` as text: per k', value dtype, members, weakest classes."""
    from logitcache.report import format_table

    if r["per_k"] is None:
        return ["", f"not applicable: {r['not_applicable']}"]
    softmax = r["output_kind"] == "multiclass"
    tokens = r.get("modality") == "tokens"  # sizes per token (position), classes are token ids
    per, unit = (r["frames"], "B/token") if tokens else (1, "B/view")
    out = ["", f"per k' (the cache truncated to its top k'; {r['rows_checked']} {'positions' if tokens else 'rows'}):",
           format_table([[x["k"], x["kl_mean"], x["kl_max"], x["top1_agreement"], x["topk_agreement"],
                          x["covered_mass_mean"] if softmax else x["prob_max_abs_error"], x["tail_mass_mean"],
                          round(x["bytes_per_view"] / per, 1)] for x in r["per_k"]],
                        ["k'", "KL mean", "KL max", "top-1 agree", "top-k' agree",
                         "covered mass" if softmax else "max |dp|", "tail mass", unit])]
    fp16 = {x["k"]: x for x in r["dtype_effect"]["float16"]}
    fp32 = {x["k"]: x for x in r["dtype_effect"]["float32"]}
    out += ["", "value dtype (the fresh logits' own top-k' rounded as each dtype stores it):",
            format_table([[k, fp16[k]["kl_mean"], fp32[k]["kl_mean"], fp16[k]["max_abs_logit_error"],
                           fp16[k]["prob_max_abs_error"], fp32[k]["prob_max_abs_error"]] for k in sorted(fp16)],
                         ["k'", "KL fp16", "KL fp32", "max |dz| fp16", "max |dp| fp16", "max |dp| fp32"])]
    out += ["", f"target codecs at k = {r['tail_mass']['k']} (the fresh logits' own top-k stored by each, "
                f"then decoded; B per row of one target set, uncompressed):",
            format_table([[x["codec"], round(x["target_bytes_per_row"]), x["kl_mean"], x["kl_max"],
                           x["top1_agreement"]] for x in r["codec_effect"]],
                         ["codec", "B/row", "KL mean", "KL max", "top-1 agree"])]
    d = r["disagreement"]
    if d["members"]:
        out += ["", f"teachers (re-run): mean pairwise top-1 disagreement {d['mean_pairwise_disagreement']:.4g}, "
                    f"diversity (mean KL member || ensemble) {d['diversity_kl']:.4g}",
                format_table([[n, v["top1_agreement"], v["kl_to_ensemble"]]
                              for n, v in d["member_vs_ensemble"].items()],
                             ["member", "top-1 = ensemble's", "KL(member || ensemble)"])]
    worst = sorted(r["per_class"], key=lambda x: x["coverage"])[:5]
    out += ["", f"least covered {'token ids' if tokens else 'classes'} (share of their probability in the stored top-k): "
            + ", ".join(f"{x['class']} {x['coverage']:.3g}" for x in worst)]
    return out


# ---------------------------------------------------------------- plan
@main.command()
@click.option("--samples", type=int, default=None, metavar="N",
              help="Samples in the dataset (required unless --tokens).")
@click.option("--tokens", type=int, default=None, metavar="N",
              help="A token cache: tokens in the corpus (windows of --context; --classes is the vocabulary V).")
@click.option("--context", type=int, default=None, metavar="L", help="With --tokens: tokens per window.")
@click.option("--epochs", type=int, required=True, metavar="E", help="Augmented views to store per sample.")
@click.option("--topk", type=int, required=True, metavar="K", help="Logits stored per view (and frame).")
@click.option("--classes", type=int, required=True, metavar="C", help="Classes the teachers output.")
@click.option("--frames", type=int, default=None, metavar="T", help="Frames per view (frame-level teachers).")
@click.option("--members", type=int, default=0, show_default=True, metavar="M",
              help="Teachers whose own top-k are stored besides the ensemble's (0 = --no-members).")
@click.option("--value-dtype", type=click.Choice(VALUE_DTYPES), default="float16", show_default=True)
@click.option("--codec", default="topk", show_default=True, metavar="NAME", help="Target codec, as for dump.")
@click.option("--value-bits", type=int, default=None, metavar="B", help="compact: bits per stored value, as for dump.")
@click.option("--sample-n", type=int, default=None, metavar="N", help="sampled: ids drawn per row, as for dump.")
@click.option("--sample-head", type=int, default=None, metavar="H", help="sampled: exact head classes, as for dump.")
@click.option("--sample-temperature", type=float, default=None, metavar="T",
              help="sampled: the temperature ids are drawn at, as for dump.")
@click.option("--output-kind", type=click.Choice(KINDS), default="multilabel", show_default=True)
@click.option("--augment", default="ced", show_default=True, metavar="NAME|FILE",
              help="Augmentation preset or ops file (its parameters are stored per view).")
@click.option("--sample-rate", type=int, default=16000, show_default=True, metavar="HZ")
@click.option("--clip-seconds", type=float, default=10.0, show_default=True, metavar="S")
@click.option("--audio-bytes", type=int, default=None, metavar="B",
              help="Size of the dataset's audio, for the share.")
@click.option("--audio-hours", type=float, default=None, metavar="H",
              help="Or its duration (counted as 16-bit mono PCM at --sample-rate).")
@click.option("--backend", "backends", multiple=True, type=click.Choice(list(BACKENDS)),
              help="Backends to measure (repeatable; default: all).")
@click.option("--chunk-rows", type=int, default=None, metavar="R",
              help="As for dump (default: about 8 MiB of targets per chunk).")
@_json_option
def plan(samples, tokens, context, epochs, topk, classes, frames, members, value_dtype, codec, value_bits, sample_n, sample_head,
         sample_temperature, output_kind, augment,
         sample_rate, clip_seconds, audio_bytes, audio_hours, backends, chunk_rows, as_json):
    """Project a cache's size on disk before dumping it.

    Writes a synthetic sample of teacher-like top-k rows (sorted logits, class indices, view
    seeds, augmentation parameters) through each backend's real codecs, measures the bytes and
    scales them to the planned views. No teacher, data or GPU is needed.

    \b
    Example:
      logitcache plan --samples 2000000 --epochs 8 --topk 32 --classes 527 --members 3 --audio-hours 5500
      logitcache plan --tokens 100000000 --context 1024 --classes 151936 --epochs 1 --topk 32 --members 2
    """
    from logitcache.plan import plan_cache
    from logitcache.report import format_table, human_bytes

    result = plan_cache(samples, epochs, topk, classes, frames=frames, members=members, value_dtype=value_dtype,
                        output_kind=output_kind, augment=augment, sample_rate=sample_rate,
                        clip_seconds=clip_seconds, audio_bytes=audio_bytes, audio_hours=audio_hours,
                        backends=tuple(backends) or tuple(BACKENDS), chunk_rows=chunk_rows, codec=codec,
                        value_bits=value_bits, sample_n=sample_n, sample_head=sample_head,
                        sample_temperature=sample_temperature, tokens=tokens, context=context)
    if as_json:
        _print_json(result)
        return
    r = result
    frame = f" x {r['frames']} frames" if r["frames"] else ""
    unit = "windows" if r.get("tokens") else "samples"
    if r.get("tokens"):
        frame = f" x {r['frames']} positions"
    who = f"ensemble + {r['members']} member(s)" if r["members"] else "ensemble only"
    click.echo(f"plan: {r['epochs']} epochs x {r['samples']:,} {unit} = {r['views']:,} views{frame}, "
               f"{_rows_what(r)} of {r['classes']} (codec {r['codec']}, {r['target_row_bytes']} B per target set; "
               f"{r['index_dtype']} indices, {r['value_dtype']} values), {who}, "
               f"{r['chunk_rows']}-row chunks")
    tok = r.get("tokens")
    if tok:
        click.echo(f"  (a token cache: {tok['tokens']:,} tokens in windows of {tok['context']}, "
                   f"{tok['positions']:,} positions stored; classes = the vocabulary)")
        rows = [[b["backend"], b["codec"], human_bytes(b["bytes_on_disk"]), round(tok["bytes_per_token"][b["backend"]], 2),
                 b["ratio"]] for b in r["backends"]]
        click.echo(format_table(rows, ["backend", "codec", "projected", "B/token", "raw/stored"]))
    else:
        rows = [[b["backend"], b["codec"], human_bytes(b["bytes_on_disk"]), round(b["bytes_per_sample_epoch"], 1),
                 b["ratio"], f"{100 * b['share_of_audio']:.3g}%" if b["share_of_audio"] else "-"]
                for b in r["backends"]]
        click.echo(format_table(rows, ["backend", "codec", "projected", "B/view", "raw/stored", "share of audio"]))
    click.echo()
    parts = [[b["backend"], *[human_bytes(b["groups"][g]) for g in b["groups"]]] for b in r["backends"]]
    click.echo(format_table(parts, ["by part", *r["backends"][0]["groups"]]))
    if r["audio_basis"]:
        click.echo(f"\naudio: {human_bytes(r['audio_bytes'])} ({r['audio_basis']})")
    click.echo(f"\n{r['method']} ({r['measured_views']} views measured in {r['seconds']} s)")


# ---------------------------------------------------------------- compare
@main.command()
@click.argument("run", metavar="RUN")
@click.option("--cache", default=None, metavar="CACHE", help="The cache the run trained on (default: RUN's).")
@click.option("--data", default=None, metavar="PATH", help="The data of that cache (default: RUN's).")
@_source_option
@click.option("--eval-data", default=None, metavar="PATH", help="Held-out labelled data (un-augmented views).")
@click.option("--teacher", "teachers", multiple=True, metavar="T",
              help="Re-run these teachers on --eval-data (the dump's teachers, in order).")
@_factory_options
@click.option("--samples", default=256, show_default=True, help="Cached training views to compare on.")
@click.option("--seed", default=0, show_default=True, help="Seed of the random pick of views.")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--html", "html_out", default=None, metavar="OUT.html",
              help="Also write a self-contained HTML report with the learning curve.")
@click.option("--student", default=None, metavar="module:callable",
              help="The run's student factory, named by you: needed to import a factory the run's "
                   "config.json names (zoo names need nothing).")
@click.option("--trust-run", is_flag=True,
              help="Import the student factory named in RUN's config.json without --student.")
@_json_option
def compare(run, cache, data, source, eval_data, teachers, state_dicts, teacher_args, samples, seed, batch_size, device,
            html_out, student, trust_run, as_json):
    """Does a trained student match the ensemble?

    On cached training views (replayed exactly) the student is compared with the ensemble
    rebuilt from the cache: top-1 agreement, KL, mAP against the ensemble's decisions and
    against labels. With --eval-data, the same on held-out clips, and with --teacher the
    teachers are re-run there. Lists the run's per-epoch log (metrics.jsonl).

    Epochs are numbered from 1 in the tables and plots; --json keeps metrics.jsonl's 0-based
    "epoch" field as stored. A run folder is data: a student factory (module:callable) named in
    its config.json is imported only with --student naming it too, or with --trust-run.

    \b
    Example:
      logitcache compare runs/kd --cache run.zarr --data data/train
      logitcache compare runs/kd --eval-data data/eval --teacher a.pt2 --teacher b.pt2 --html kd.html
    """
    from logitcache.report import compare as run_compare
    from logitcache.report import format_table

    with _quiet_stdout(as_json):
        r = run_compare(run, cache, data, eval_data=eval_data, teachers=list(teachers),
                        **_teacher_kwargs(state_dicts, teacher_args), samples=samples,
                        seed=seed, device=device, batch_size=batch_size, progress=True, student=student,
                        trust_run=trust_run, source=source)
    if html_out:
        from logitcache.html import write_report

        path = write_report(html_out, compare=r, title=f"logitcache compare: {run}")
        click.echo(f"report written to {path}", err=True)
    if as_json:
        _print_json(r)
        return
    if not r["cache_matches_run"]:
        click.echo(f"warning: {r['cache']} is not the cache {run} was trained on (config digests differ)",
                   err=True)
    metric = r["metric"]
    after = "-" if r["checkpoint_epoch"] is None else r["checkpoint_epoch"] + 1  # epochs from 1, for people
    click.echo(f"{run}: student {r['student']}, checkpoint after epoch {after}; targets: "
               f"{r['targets']}; {r['output_kind']}")
    v, e = r["views"], r["eval"]
    if r.get("modality") == "tokens":
        click.echo(_token_compare_table(v, e))
    else:
        click.echo(_views_compare_table(v, e, metric))
    if r.get("heads"):
        click.echo()
        click.echo(_heads_table(v["heads"], (e or {}).get("heads")))
    if r["epochs"]:
        key = "eval_ppl" if r.get("modality") == "tokens" else "eval_mAP" if metric == "mAP" else "eval_top1"
        click.echo()
        click.echo(format_table([[_human_epoch(x), x.get("train_loss"), x.get(key)] for x in r["epochs"]],
                                ["epoch", "train loss", f"held-out {key[len('eval_'):]}"]))


def _views_compare_table(v: dict, e: dict | None, metric: str) -> str:
    """compare's rows for audio and image caches: views and clips."""
    from logitcache.report import format_table

    rows = [["cached training views", v["views"], v["top1_agreement"], v["kl_mean"], v["map_vs_ensemble"],
             v["student_vs_labels"], v["ensemble_vs_labels"]]]
    if e:
        rows.append(["held-out clips", e["clips"], e.get("top1_agreement"), e.get("kl_mean"),
                     e.get("map_vs_ensemble"), e["student_vs_labels"], e.get("ensemble_vs_labels")])
    return format_table(rows, ["where", "n", "top-1 = ensemble's", "KL(ens || student)", "mAP vs ensemble",
                               f"student {metric}", f"ensemble {metric}"])


def _token_compare_table(v: dict, e: dict | None) -> str:
    """compare's rows for a token cache: windows, the unmasked positions every figure is a mean over,
    next-token accuracy and perplexity (no mAP: one softmax per position)."""
    from logitcache.report import format_table

    rows = [["cached training windows", v["views"], v["positions"], v["top1_agreement"], v["kl_mean"],
             v["student_vs_labels"], v["ensemble_vs_labels"], v["student_ppl"], v["ensemble_ppl"]]]
    if e:
        rows.append(["held-out windows", e["clips"], e["positions"], e.get("top1_agreement"), e.get("kl_mean"),
                     e["student_vs_labels"], e.get("ensemble_vs_labels"), e["student_ppl"], e.get("ensemble_ppl")])
    return format_table(rows, ["where", "windows", "positions", "top-1 = ensemble's", "KL(ens || student)",
                               "student next-token top-1", "ensemble next-token top-1", "student ppl", "ensemble ppl"])


def _heads_table(views: list[dict], held: list[dict] | None) -> str:
    """compare's per-head rows: each head against its own member (cached views) and teacher (held out)."""
    from logitcache.report import format_table

    rows = [[h["member"], h["top1_agreement"], h["kl_mean"],
             *((held[i]["top1_agreement"], held[i]["kl_mean"]) if held else ())] for i, h in enumerate(views)]
    names = ["head of member", "views: top-1 = member's", "KL(member || head)"]
    return format_table(rows, names + (["held-out: top-1 = teacher's", "KL(teacher || head)"] if held else []))


def _human_epoch(line: dict):
    """A metrics.jsonl line's epoch as tables show it: from 1 (the log counts from 0)."""
    e = line.get("epoch")
    return e + 1 if isinstance(e, int) else e


# ---------------------------------------------------------------- copy
@main.command()
@click.argument("src", metavar="SRC")
@click.argument("dst", metavar="DST")
@click.option("--no-verify", is_flag=True, help="Skip reading the copy back through its checksums.")
@_json_option
def copy(src, dst, no_verify, as_json):
    """Copy a finished cache between local disk and object storage, then verify the copy.

    Either side may be a local path or an fsspec URL (s3://bucket/run.zarr; zarr caches only
    there). Credentials and endpoints come from the usual environment (AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL for S3-compatible stores) or ~/.aws.

    \b
    Example:
      logitcache copy run.zarr s3://bucket/kd/run.zarr
      logitcache train --cache s3://bucket/kd/run.zarr --data data/train --student cnn_tiny --out runs/kd
    """
    from logitcache.copy import copy_cache
    from logitcache.report import human_bytes

    r = copy_cache(src, dst, verify=not no_verify)
    if as_json:
        _print_json(r)
        return
    click.echo(f"{r['dst']}: {r['files']} files, {human_bytes(r['bytes'])} copied in {r['seconds']} s"
               f"{', verified' if r['verified'] else ' (not verified)'}")


# ---------------------------------------------------------------- demo
@main.command()
@click.option("--out", default=None, metavar="DIR",
              help="Working folder of the demo. [default: demo_out, demo_image_out with --image, "
                   "demo_lm_out with --lm]")
@click.option("--quick", is_flag=True,
              help="The same steps on a few short clips, one epoch each (seconds; the numbers mean nothing).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the data, the teachers' initialisation, the dumped views and the students.")
@click.option("--image", is_flag=True,
              help="The image demo: scikit-learn's handwritten digits, three CNN teachers, a cache of crops and "
                   "flips, eval top-1 (a few minutes).")
@click.option("--lm", is_flag=True,
              help="The language-model demo: Python standard-library source, a byte-level BPE, two tiny GPT "
                   "teachers, a token cache, validation perplexity of a student from the cache and one from "
                   "next-token labels (a few minutes).")
@_json_option
def demo(out, quick, seed, image, lm, as_json):
    """End-to-end demo on synthetic audio (about two minutes on a 2-core CPU), or with --image on
    real images: scikit-learn's 1,797 handwritten digits, or with --lm on text: Python's own
    standard-library source (a few minutes each).

    Makes the data, trains three small teachers, dumps their ensemble, trains a student
    from the cache and one from labels alone, and prints the table (audio: mAP, cache size, and
    DIR/report.html; images: eval top-1; text: validation perplexity; both with a replay check of
    the stored top-k).

    \b
    Example:
      logitcache demo --out demo_out
      logitcache demo --image --out demo_image_out
      logitcache demo --lm --out demo_lm_out
    """
    if image and lm:
        raise LogitCacheError("--lm: cannot be combined with --image; choose one demo")
    if lm:
        from logitcache.demo_lm import run_lm_demo as run
    elif image:
        from logitcache.demo_image import run_image_demo as run
    else:
        from logitcache.demo import run_demo as run

    with _quiet_stdout(as_json):
        default = "demo_lm_out" if lm else "demo_image_out" if image else "demo_out"
        summary = run(out or default, quick=quick, seed=seed, progress=True)
    if as_json:
        _print_json(summary)


if __name__ == "__main__":
    main()
