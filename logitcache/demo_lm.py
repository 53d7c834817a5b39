"""``demo --lm``: BabyLlama's table in miniature, on CPU, in a few minutes on 2 cores.

The corpus is Python's own standard library: the source files of :data:`MODULES` (this
interpreter's ``Lib/``, read as UTF-8; each module one document), real text with real structure
that every Python install ships. The last :data:`HELD_OUT` modules are the validation split. A
byte-level BPE (``tokenizers``) is trained on the training modules only and saved to
``out/tokenizer.json``; both splits are written as nanoGPT ``.bin`` + ``.json`` token corpora
(documents = modules) -> two :func:`~logitcache.models.gpt_tiny` teachers of different sizes,
trained on random windows for a minute, exported to ``.pt2`` -> a token cache of their averaged
softmax (and each member's) over windows at random offsets -> the student ``gpt_tiny`` (smaller
than either teacher) from the cache (KD, ``alpha=0``), and the same student from next-token labels
on the same replayed windows (same seed and steps) -> a table of validation perplexity, with the
teachers' and the ensemble's, plus a check that :func:`logitcache.replay` gives the windows the
teachers saw and the re-run teachers give the stored top-k.

``quick=True`` runs the same steps on a few small modules at a short context (seconds; the tests).
"""

from __future__ import annotations

import json
import os
import shutil
import sysconfig
import time
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from logitcache import models
from logitcache.augment import Augmenter, make_spec
from logitcache.cache import open_cache
from logitcache.demo import _Cores, _settings_of, _side_by_side, kd_and_label_students, timed_run
from logitcache.dump import dump
from logitcache.errors import LogitCacheError
from logitcache.lm import evaluate_lm
from logitcache.sources import open_source
from logitcache.targets import aggregate, topk_targets
from logitcache.views import replay

# Pure-Python standard-library modules, in this order; the last HELD_OUT are validation.
MODULES = ("argparse", "collections", "dataclasses", "functools", "heapq", "pprint", "random", "shlex", "string",
           "textwrap", "fractions", "calendar", "csv", "json.decoder", "json.encoder", "contextlib", "copy", "glob",
           "fnmatch", "getopt", "queue", "base64")
HELD_OUT = 4
QUICK_MODULES = ("textwrap", "shlex", "string", "fnmatch", "getopt", "bisect")  # the last 2 held out
STUDENT = "gpt_tiny"  # the zoo's defaults: dim 32, 2 layers, 2 heads
TEACHERS = {"gpt_2x48": dict(dim=48, depth=2, heads=2), "gpt_4x64": dict(dim=64, depth=4, heads=4)}
SIZES = {
    "full": dict(vocab=512, context=64, teacher_steps=700, teacher_batch=32, teacher_lr=3e-3, dump_epochs=3,
                 topk=64, codec="compact", student_epochs=6, batch_size=32, student_lr=3e-3),
    "quick": dict(vocab=300, context=32, teacher_steps=25, teacher_batch=16, teacher_lr=3e-3, dump_epochs=1,
                  topk=8, codec="compact", student_epochs=1, batch_size=16, student_lr=3e-3),
}
REPLAY_CHECK = 4  # windows of epoch 0 replayed and re-run through the teachers


def stdlib_texts(names: tuple[str, ...]) -> list[str]:
    """The source text of each module (``__init__.py`` for a package) in this Python's ``Lib/``
    (read from the files: some modules, e.g. ``abc``, are frozen into the interpreter)."""
    lib, texts = Path(sysconfig.get_paths()["stdlib"]), []
    for name in names:
        base = lib.joinpath(*name.split("."))
        path = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
        if not path.is_file():
            raise LogitCacheError(f"demo corpus: {path}: no source of module {name!r} in this Python install")
        texts.append(path.read_text(encoding="utf-8"))
    return texts


def train_tokenizer(texts: list[str], vocab: int, path: Path):
    """A byte-level BPE of at most ``vocab`` ids, trained on ``texts`` (deterministic), saved to ``path``."""
    from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers, trainers

    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return tok


def write_token_corpus(tok, texts: list[str], path: Path, block_size: int) -> Path:
    """``path`` (``.bin``, uint16) and its ``.json``: the texts tokenised, one document each."""
    ids = [np.asarray(e.ids, np.uint16) for e in tok.encode_batch(texts)]
    starts = np.cumsum([0] + [len(a) for a in ids[:-1]]).tolist()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.concatenate(ids).tobytes())
    path.with_suffix(".json").write_text(json.dumps({"vocab_size": tok.get_vocab_size(), "dtype": "uint16",
                                                     "documents": starts, "block_size": block_size}))
    return path


# ------------------------------------------------------------------ teachers
def _teacher_job(name: str, tokens: np.ndarray, vocab: int, s: dict, seed: int, threads: int, progress: bool,
                 out: Path) -> dict:
    """Train one teacher on random windows of the training tokens, export it; returns its state dict."""
    torch.set_num_threads(threads)
    model = models.gpt_tiny(vocab, s["context"], seed=10 * seed + list(TEACHERS).index(name), **TEACHERS[name])
    fit_lm(model, tokens, s["context"], s["teacher_steps"], s["teacher_batch"], s["teacher_lr"], seed, progress, name)
    export_lm(model, out / "teachers" / f"{name}.pt2", s["context"])
    return {k: v.numpy() for k, v in model.state_dict().items()}  # numpy: see demo._teacher_job


def fit_lm(model: nn.Module, tokens: np.ndarray, context: int, steps: int, batch: int, lr: float, seed: int,
           progress: bool, name: str) -> nn.Module:
    """Next-token cross-entropy on windows drawn uniformly from ``tokens`` (not the dump's windows;
    a window may cross a module boundary, as nanoGPT's do), AdamW with a cosine decay."""
    rng = np.random.default_rng(1000 + seed)
    data = torch.from_numpy(tokens.astype(np.int64))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in tqdm(range(steps), desc=f"teacher {name}", unit="step", disable=not progress):
        starts = torch.from_numpy(rng.integers(0, len(data) - context - 1, batch))
        w = data[starts[:, None] + torch.arange(context + 1)]
        loss = F.cross_entropy(model(w[:, :-1]).flatten(0, 1), w[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def export_lm(model: nn.Module, path: Path, context: int) -> Path:
    """``model`` as a torch.export program taking int64 ``[B, context]`` (dynamic batch)."""
    ids = torch.zeros(2, context, dtype=torch.int64)  # batch 2: 1 would specialise
    program = torch.export.export(model.eval(), (ids,), dynamic_shapes=({0: torch.export.Dim("batch", max=4096)},))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, path)
    return path


class MeanProb(nn.Module):
    """The teachers' ensemble as one LM: log of their mean softmax (what the cache stores)."""

    def __init__(self, teachers: list[nn.Module]):
        super().__init__()
        self.teachers = teachers

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return aggregate([t(ids) for t in self.teachers], "multiclass", "mean_prob")


@torch.no_grad()
def replay_check(cache_path: Path, data: Path, teacher_files: list[str], ids: list[str], epoch: int = 0) -> dict:
    """Replay ``ids``' windows of ``epoch`` and re-run the teachers on them: every position's stored
    top-k ids (each member's and the ensemble's) must come back, the values to the stored precision."""
    cache, source = open_cache(cache_path), open_source(data)
    windows = torch.stack([replay(cache, source, epoch, i) for i in ids])
    names = [Path(f).stem for f in teacher_files]
    z = [torch.export.load(f).module()(windows).float() for f in teacher_files]
    k, equal, rows, worst = cache.manifest["topk"], 0, 0, 0.0
    for member, logits in [*zip(names, z), (None, aggregate(z, "multiclass", "mean_prob"))]:
        stored = by_id(cache.targets(epoch, ids, member=member))
        values, indices = by_id(topk_targets(logits, k, "multiclass"))
        equal += int((indices == stored[1]).all(axis=-1).sum())
        rows += indices.shape[0] * indices.shape[1]
        worst = max(worst, float(np.abs(values - stored[0]).max()))
    return {"windows": len(ids), "positions": rows, "topk_equal": equal, "max_abs_diff": worst,
            "codec": cache.manifest.get("codec"), "windows_tokens": windows}


def by_id(targets) -> tuple[np.ndarray, np.ndarray]:
    """(values, indices) of a top-k triple in ascending id order, float32: how ``compact`` stores
    them and ``topk`` does not (rank order), so the two compare alike."""
    values, indices = (np.asarray(t) for t in ((targets.values, targets.indices) if hasattr(targets, "values")
                                               else targets[:2]))
    values = values.astype(np.float32)
    order = np.argsort(indices, axis=-1, kind="stable")
    return np.take_along_axis(values, order, -1), np.take_along_axis(indices, order, -1)


def run_lm_demo(out_dir: str | Path = "demo_lm_out", *, quick: bool = False, seed: int = 0,
                progress: bool = True, **sizes) -> dict:
    """Run the LM demo; returns the figures it prints (also written to ``out_dir/summary.json``).

    ``sizes`` override single entries of :data:`SIZES` (vocab, context, teacher_steps,
    teacher_batch, teacher_lr, dump_epochs, topk, student_epochs, batch_size, student_lr)."""
    s = _settings_of(SIZES, quick, sizes, "run_lm_demo")
    if seed < 0:
        raise LogitCacheError(f"--seed {seed}: must be 0 or more")
    cores = os.cpu_count() or 1
    return timed_run(out_dir, lambda out: _run(out, s, seed, progress, _Cores.split(cores, 2, True), quick), _table)


def _corpus(out: Path, s: dict, quick: bool, say) -> tuple[Path, Path, dict]:
    names = QUICK_MODULES if quick else MODULES
    held = 2 if quick else HELD_OUT
    texts = stdlib_texts(names)
    train_texts, val_texts = texts[:-held], texts[-held:]
    tok = train_tokenizer(train_texts, s["vocab"], out / "tokenizer.json")
    train_bin = write_token_corpus(tok, train_texts, out / "data" / "train.bin", s["context"])
    val_bin = write_token_corpus(tok, val_texts, out / "data" / "val.bin", s["context"])
    raw = "".join(texts).encode("utf-8")
    info = {"modules": list(names), "held_out": list(names[-held:]), "bytes": len(raw),
            "crc32": f"{zlib.crc32(raw):08x}", "vocab_size": tok.get_vocab_size(),
            "train_tokens": os.path.getsize(train_bin) // 2, "val_tokens": os.path.getsize(val_bin) // 2}
    say(f"[1/5] corpus: {len(names)} stdlib modules ({info['bytes'] / 1e3:.0f} KB), byte-level BPE of "
        f"{info['vocab_size']} ids -> {info['train_tokens']} train + {info['val_tokens']} held-out tokens")
    return train_bin, val_bin, info


def _run(out: Path, s: dict, seed: int, progress: bool, pair: _Cores, quick: bool) -> dict:
    say = tqdm.write if progress else (lambda *_: None)
    train_bin, val_bin, corpus = _corpus(out, s, quick, say)
    V, L = corpus["vocab_size"], s["context"]
    tokens = np.fromfile(train_bin, dtype=np.uint16)

    say(f"[2/5] training teachers {', '.join(TEACHERS)} for {s['teacher_steps']} steps each")
    t0 = time.perf_counter()
    states = _side_by_side(_teacher_job, [dict(name=n, tokens=tokens, vocab=V, s=s, seed=seed, threads=pair.threads,
                                               progress=progress and k == 0, out=out)
                                          for k, n in enumerate(TEACHERS)], pair.jobs)
    teacher_s = time.perf_counter() - t0
    teachers = []
    for name, state in zip(TEACHERS, states):
        model = models.gpt_tiny(V, L, **TEACHERS[name])
        model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
        teachers.append(model.eval())
    files = [str(out / "teachers" / f"{n}.pt2") for n in TEACHERS]
    val = open_source(val_bin)
    augmenter = Augmenter.from_spec(make_spec("tokens", [{"op": "window"}], {"context": L, "vocab_size": V}))
    cpu = torch.device("cpu")
    rows = [(f"teacher {n} ({_params(m)} params)", evaluate_lm(m, val, augmenter, cpu)["ppl"])
            for n, m in zip(TEACHERS, teachers)]
    rows.append(("ensemble (mean softmax)", evaluate_lm(MeanProb(teachers), val, augmenter, cpu)["ppl"]))

    E, cache_path = s["dump_epochs"], out / "cache.zarr"
    say(f"[3/5] dumping {E} epoch(s) of windows at random offsets, {s['codec']} top-{s['topk']} of {V} "
        f"(ensemble + members)")
    shutil.rmtree(cache_path, ignore_errors=True)
    t0 = time.perf_counter()
    dump(train_bin, files, cache_path, epochs=E, topk=s["topk"], codec=s["codec"], seed=seed, aggregation="mean_prob",
         batch_size=s["batch_size"], num_workers=0, progress=progress)
    dump_s = time.perf_counter() - t0
    cache = open_cache(cache_path)

    say("[4/5] replay check: stored windows re-made, teachers re-run, top-k compared at every position")
    check = {k: v for k, v in replay_check(cache_path, train_bin, files, cache.ids[:REPLAY_CHECK]).items()
             if k != "windows_tokens"}

    say(f"[5/5] student {STUDENT}, {s['student_epochs']} epoch(s): from the cache (KD) and, side by side, "
        f"from next-token labels (same windows, seed and steps)")
    for run_dir in ("student_kd", "student_labels"):
        shutil.rmtree(out / run_dir, ignore_errors=True)
    common = dict(cache=cache_path, data=train_bin, student=STUDENT, epochs=s["student_epochs"],
                  batch_size=s["batch_size"], lr=s["student_lr"], eval_data=val_bin, seed=seed, num_workers=0,
                  threads=pair.threads)
    kd, labels = kd_and_label_students(common, out, pair, progress)
    student = models.create_model(STUDENT, num_classes=V, frames=L)
    rows += [(f"student {STUDENT} ({_params(student)} params) from cache (KD)", kd["eval_ppl"]),
             (f"student {STUDENT} from next-token labels", labels["eval_ppl"])]
    return {"ppl": dict(rows), "seed": seed, "settings": s, "corpus": corpus, "topk": s["topk"],
            "codec": s["codec"], "epochs_stored": E, "windows_per_epoch": len(cache.ids), "replay_check": check,
            "student_steps": s["student_epochs"] * -(-len(cache.ids) // s["batch_size"]), "cache_bytes": _bytes(cache_path),
            "teacher_train_s": round(teacher_s, 1), "dump_s": round(dump_s, 1),
            "dump_tokens_per_s": round(E * len(cache.ids) * L / dump_s, 1),
            "train_tokens_per_s": round(kd["samples_per_s"] * L, 1)}


def _params(model: nn.Module) -> str:
    return f"{sum(p.numel() for p in model.parameters()) / 1e3:.0f}k"


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _table(summary: dict) -> str:
    c, rows, corpus = summary["replay_check"], summary["ppl"], summary["corpus"]
    tokens = summary["epochs_stored"] * summary["windows_per_epoch"] * summary["settings"]["context"]
    lines = ["", f"{'model':<52} {'val ppl':>9}", "-" * 62]
    lines += [f"{name:<52} {value:>9.2f}" for name, value in rows.items()]
    lines += ["-" * 62,
              f"corpus: {len(corpus['modules'])} stdlib modules, {corpus['bytes'] / 1e3:.0f} KB; BPE V={corpus['vocab_size']}; "
              f"{corpus['train_tokens']} train / {corpus['val_tokens']} held-out tokens "
              f"({', '.join(corpus['held_out'])})",
              f"cache: {summary['epochs_stored']} epoch(s) x {summary['windows_per_epoch']} windows of "
              f"{summary['settings']['context']}, {summary['codec']} top-{summary['topk']}/{corpus['vocab_size']}, "
              f"{summary['cache_bytes'] / tokens:.0f} B/token on disk (ensemble + 2 members); "
              f"dump {summary['dump_tokens_per_s']:.0f} tokens/s, train from cache "
              f"{summary['train_tokens_per_s']:.0f} tokens/s",
              f"replay: {c['topk_equal']}/{c['positions']} positions of {c['windows']} replayed windows give the "
              f"stored top-k ids (3 target sets; values within {c['max_abs_diff']:.2g} of the teachers')",
              f"wall: {summary.get('wall_s', float('nan')):.0f} s (teachers {summary['teacher_train_s']:.0f} s)", ""]
    return "\n".join(lines)
