"""``demo``: the whole pipeline on synthetic data, on CPU, in about two minutes on 2 cores.

synthetic data -> three small, different teachers trained on labels and exported (.pt2)
-> dump a cache -> a student distilled from the cache, and one trained on labels alone
(same replayed views) -> a table of mAP, cache size and throughput -> report.html.

``quick=True`` runs the same steps on a few clips for one epoch each (seconds; used by the tests).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from logitcache import models
from logitcache.augment import Augmenter, epoch_order, id_hashes, load_ops_spec, view_seeds
from logitcache.dump import dump
from logitcache.errors import LogitCacheError
from logitcache.sources import Source, open_source
from logitcache.synth import make_splits
from logitcache.targets import aggregate, hard_label_loss
from logitcache.train import average_precision, train
from logitcache.views import DrawnViews, ViewSource, collate_views

TEACHERS = ("cnn_small", "crnn_small", "transformer_tiny")
TEACHER_GROUPS = (("cnn_small", "transformer_tiny"), ("crnn_small",))  # two side-by-side jobs of similar cost
STUDENT = "cnn_tiny"
# the demo's two sizes; keyword arguments of run_demo override single settings
SIZES = {
    "full": dict(n_train=400, n_eval=200, clip_seconds=1.0, teacher_epochs=12, dump_epochs=6, student_epochs=12,
                 batch_size=16, teacher_lr=5e-3, student_lr=3e-3),
    "quick": dict(n_train=16, n_eval=8, clip_seconds=0.5, teacher_epochs=1, dump_epochs=1, student_epochs=1,
                  batch_size=8, teacher_lr=5e-3, student_lr=3e-3),
}


def fit_on_labels(models_: list[torch.nn.Module], folder: Source, augmenter: Augmenter, epochs: int,
                  seed: int, batch_size: int = 32, lr: float = 2e-3, num_workers: int = 0,
                  progress: bool = True) -> list[torch.nn.Module]:
    """Plain supervised training on views freshly drawn by ``augmenter`` (how the demo's teachers are made).

    All models step on the same batches, so each view is decoded and augmented once, not once per
    model; their architectures and initialisations differ, which is what the ensemble needs."""
    source, hashes = ViewSource(folder, augmenter), id_hashes(folder.ids)
    steps = epochs * -(-len(folder) // batch_size)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=1e-4) for m in models_]
    schedules = [torch.optim.lr_scheduler.OneCycleLR(o, lr, total_steps=steps) for o in optimizers]
    for m in models_:
        m.train()
    for epoch in tqdm(range(epochs), desc="teachers", unit="epoch", disable=not progress, dynamic_ncols=True):
        order = epoch_order(seed, epoch, hashes)
        views = DrawnViews(source, order, view_seeds(seed, epoch, hashes)[order])
        for wave, params, pos, _ in DataLoader(views, batch_size=batch_size, collate_fn=collate_views,
                                               num_workers=num_workers):
            labels = torch.from_numpy(np.stack([source.labels(order[p], {k: v[i] for k, v in params.items()})
                                                for i, p in enumerate(pos)]))
            for model, optimizer, schedule in zip(models_, optimizers, schedules):
                loss = hard_label_loss(model(wave), labels, "multilabel")
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
    return [m.eval() for m in models_]


@torch.no_grad()
def clip_logits(model: torch.nn.Module, folder: Source, augmenter: Augmenter, batch_size: int = 64) -> torch.Tensor:
    outs, plain = [], ViewSource(folder, augmenter)
    for a in range(0, len(folder), batch_size):
        x = torch.stack([plain.plain(i) for i in range(a, min(a + batch_size, len(folder)))])
        outs.append(model(x).float())
    return torch.cat(outs)


def mean_ap(logits: torch.Tensor, folder: Source) -> float:
    return float(np.nanmean(average_precision(logits.numpy(), folder.table)))


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class _Cores:
    """How a step shares the machine's cores among ``jobs`` processes.

    The two students, and two groups of teachers, train side by side in forked processes: the
    models are small, so one intra-op thread each keeps a core busy, where two threads on one model
    mostly wait for each other (5x slower on a loaded 2-core box). A DataLoader worker making views
    takes one core of a job's share; intra-op threads get the rest."""

    jobs: int
    workers: int
    threads: int

    @classmethod
    def split(cls, cores: int, jobs: int, quick: bool) -> "_Cores":
        share = max(1, cores // jobs)
        if quick:  # a worker, or a second thread, costs more than it saves on a few clips
            return cls(min(jobs, cores), 0, 1)
        workers = 1 if share > 1 else 0
        return cls(min(jobs, cores), workers, max(1, share - workers))


def _side_by_side(fn: Callable, calls: list[dict], jobs: int) -> list:
    """``[fn(**kw) for kw in calls]``, in up to ``jobs`` forked processes (Linux; one by one elsewhere)."""
    if jobs < 2 or len(calls) < 2 or sys.platform != "linux":
        return [fn(**kw) for kw in calls]
    with ProcessPoolExecutor(min(jobs, len(calls)), mp_context=mp.get_context("fork")) as pool:
        return [f.result() for f in [pool.submit(fn, **kw) for kw in calls]]


def kd_and_label_students(common: dict, out: Path, pair, progress: bool) -> list[dict]:
    """The same student from the cache (KD, alpha 0) and from labels alone (alpha 1) on the same
    replayed views, side by side in ``pair``'s processes: [kd metrics, labels metrics]."""
    return _side_by_side(_student_job, [
        dict(common, out=out / "student_kd", alpha=0.0, progress=progress),
        dict(common, out=out / "student_labels", alpha=1.0, progress=progress and pair.jobs < 2)], pair.jobs)


def timed_run(out_dir, run: Callable, table: Callable) -> dict:
    """A demo's frame (the image and LM demos): ``run(out)`` in ``out_dir`` with one intra-op thread,
    its wall time added, the summary written to ``out_dir/summary.json`` and its table printed."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with _threads(1):
        summary = run(out)
    summary["wall_s"] = round(time.perf_counter() - started, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(table(summary))
    return summary


def _settings(quick: bool, overrides: dict) -> dict:
    return _settings_of(SIZES, quick, overrides, "run_demo")


def _settings_of(sizes: dict, quick: bool, overrides: dict, where: str) -> dict:
    """``sizes["quick" or "full"]`` with single entries overridden (shared with the image demo)."""
    s = dict(sizes["quick" if quick else "full"])
    unknown = set(overrides) - set(s)
    if unknown:
        raise LogitCacheError(f"{where}: unknown setting(s) {sorted(unknown)}; known: {sorted(s)}")
    return {**s, **{k: v for k, v in overrides.items() if v is not None}}


def run_demo(out_dir: str | Path = "demo_out", *, quick: bool = False, seed: int = 0, topk: int = 5,
             progress: bool = True, **sizes) -> dict:
    """Run the demo; returns the figures it prints (also written to ``out_dir/summary.json``).

    ``sizes`` override single entries of :data:`SIZES` (n_train, n_eval, clip_seconds,
    teacher_epochs, dump_epochs, student_epochs, batch_size, teacher_lr, student_lr). ``seed``
    changes the data, the teachers' initialisation, the dump's views and the students'
    initialisation."""
    s = _settings(quick, sizes)
    if seed < 0:
        raise LogitCacheError(f"--seed {seed}: must be 0 or more")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    with _threads(1):
        return _run(out, s, seed, topk, progress, _Cores.split(cores, 2, quick), _Cores.split(cores, 1, quick))


def _run(out: Path, s: dict, seed: int, topk: int, progress: bool, pair: _Cores, whole: _Cores) -> dict:
    """``pair``: how side-by-side trainings share the cores; ``whole``: how the dump uses them all."""
    say = tqdm.write if progress else (lambda *_: None)
    torch.manual_seed(seed)
    data = out / "data"
    teacher_files, rows = _data_and_teachers(out, s, seed, progress, say, pair)
    train_set = open_source(data / "train")
    C, E = len(train_set.classes), s["dump_epochs"]
    say(f"[3/5] dumping {E} epochs x {len(train_set)} views, top-{topk} of {C} classes")
    cache_path = out / "cache.zarr"
    shutil.rmtree(cache_path, ignore_errors=True)
    started = time.perf_counter()
    with _threads(whole.threads):
        dump(data / "train", teacher_files, cache_path, epochs=E, topk=topk, augment="ced", seed=seed,
             batch_size=s["batch_size"], num_workers=whole.workers, progress=progress)
    dump_rate = E * len(train_set) / (time.perf_counter() - started)
    from logitcache.report import inspect_cache, write_cache_report

    size = inspect_cache(cache_path)
    say(f"[4/5] student {STUDENT}, {s['student_epochs']} epochs: from the cache (KD) and, side by side, "
        f"from labels alone (same replayed views)")
    common = dict(cache=cache_path, data=data / "train", student=STUDENT, epochs=s["student_epochs"],
                  batch_size=s["batch_size"], lr=s["student_lr"], eval_data=data / "eval", seed=seed,
                  num_workers=pair.workers, threads=pair.threads)
    kd, labels = kd_and_label_students(common, out, pair, progress)
    rows += [(f"student {STUDENT} from cache (KD)", kd["eval_mAP"]),
             (f"student {STUDENT} from labels", labels["eval_mAP"])]
    summary = {
        "mAP": dict(rows),
        "seed": seed,
        "cache_bytes": size["bytes_on_disk"],
        "bytes_per_sample_epoch": size["bytes_per_sample_epoch"],
        "share_of_audio": size["share_of_audio"],
        "dump_views_per_s": round(dump_rate, 1),
        "train_views_per_s": kd["samples_per_s"],
        "epochs_stored": E,
        "topk": topk,
        "classes": C,
    }
    print(_table(rows, summary))
    say("[5/5] report: inspect, fidelity, student vs ensemble")
    report = write_cache_report(out / "report.html", cache_path, data / "train", teacher_files,
                                run=out / "student_kd", eval_data=data / "eval", progress=progress)
    summary["report"] = report["html"]
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"report: {report['html']}")
    return summary


def _student_job(threads: int, **kw) -> dict:
    torch.set_num_threads(threads)
    return train(**kw)


def _teacher_job(names: tuple[str, ...], data: Path, s: dict, seed: int, threads: int, workers: int,
                 progress: bool, out: Path) -> list[dict]:
    """Train and export some of the teachers; returns their state dicts (as numpy arrays)."""
    torch.set_num_threads(threads)
    train_set = open_source(data / "train")
    sr, C = train_set.defaults()["sample_rate"], len(train_set.classes)
    teachers = [models.create_model(n, num_classes=C, sample_rate=sr, seed=10 * seed + TEACHERS.index(n))
                for n in names]
    # plain clips: in a dozen short epochs, masked views whose labels still name the masked event
    # teach these teachers less than clean clips do (ensemble mAP 0.57 vs 0.74 in a trial)
    plain = Augmenter(load_ops_spec("none"), sr, s["clip_seconds"])
    fit_on_labels(teachers, train_set, plain, s["teacher_epochs"], seed=100 + seed, lr=s["teacher_lr"],
                  batch_size=s["batch_size"], num_workers=workers, progress=progress)
    for model, name in zip(teachers, names):
        models.export_model(model, out / "teachers" / f"{name}.pt2", sr, plain.clip_samples)
    # numpy, not tensors: torch would pass tensors between processes through shared-memory handles
    return [{k: v.numpy() for k, v in m.state_dict().items()} for m in teachers]


def _data_and_teachers(out: Path, s: dict, seed: int, progress: bool, say, pair: _Cores
                       ) -> tuple[list[str], list[tuple[str, float]]]:
    """Synthesise the data and train and export the teachers, or reuse those an earlier run with the
    same settings left in ``out``; returns the teacher files and the teachers' and ensemble's rows."""
    data = out / "data"
    stamp = {k: s[k] for k in ("n_train", "n_eval", "clip_seconds", "teacher_epochs", "teacher_lr", "batch_size")}
    stamp["seed"] = seed
    stamp_file = out / "demo_settings.json"
    reuse = stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp
    if not reuse:
        stamp_file.unlink(missing_ok=True)  # written again once data and teachers are made
        say(f"[1/5] synthesising {s['n_train']}+{s['n_eval']} clips of {s['clip_seconds']:g} s -> {data}")
        make_splits(data, n_train=s["n_train"], n_eval=s["n_eval"], clip_seconds=s["clip_seconds"], seed=seed,
                    overwrite=True)
    eval_set = open_source(data / "eval")
    augmenter = Augmenter(load_ops_spec("ced"), eval_set.defaults()["sample_rate"], s["clip_seconds"])
    files = [out / "teachers" / f"{name}.pt2" for name in TEACHERS]
    if reuse and all(p.is_file() for p in files):
        teachers = [torch.export.load(str(p)).module() for p in files]
    else:
        say(f"[2/5] training {len(TEACHERS)} teachers on labels: {', '.join(TEACHERS)}")
        groups = TEACHER_GROUPS if pair.jobs > 1 else (TEACHERS,)
        states = _side_by_side(_teacher_job, [
            dict(names=g, data=data, s=s, seed=seed, threads=pair.threads, workers=pair.workers,
                 progress=progress and i == 0, out=out) for i, g in enumerate(groups)], pair.jobs)
        state = dict(zip(sum(groups, ()), sum(states, [])))
        teachers = [models.create_model(n, num_classes=len(eval_set.classes), sample_rate=augmenter.sample_rate)
                    for n in TEACHERS]
        for name, model in zip(TEACHERS, teachers):
            model.load_state_dict({k: torch.from_numpy(v) for k, v in state[name].items()})
            model.eval()
    stamp_file.write_text(json.dumps(stamp, indent=2))
    logits = [clip_logits(m, eval_set, augmenter) for m in teachers]
    rows = [(f"teacher {name}", mean_ap(z, eval_set)) for name, z in zip(TEACHERS, logits)]
    rows.append(("ensemble (mean prob)", mean_ap(aggregate(logits, "multilabel"), eval_set)))
    return [str(p) for p in files], rows


def _table(rows: list[tuple[str, float]], summary: dict) -> str:
    lines = ["", f"{'model':<36} {'eval mAP':>9}", "-" * 46]
    lines += [f"{name:<36} {value:>9.3f}" for name, value in rows]
    lines += ["-" * 46,
              f"cache: {summary['cache_bytes'] / 1e6:.2f} MB on disk, {summary['bytes_per_sample_epoch']:.1f} B per "
              f"sample-epoch ({100 * summary['share_of_audio']:.2f}% of the audio), {summary['epochs_stored']} epochs, "
              f"top-{summary['topk']}/{summary['classes']}",
              f"dump: {summary['dump_views_per_s']:.0f} views/s ({len(TEACHERS)} teachers); train from cache: "
              f"{summary['train_views_per_s']:.0f} views/s", ""]
    return "\n".join(lines)
