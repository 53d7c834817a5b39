"""``demo``: the whole pipeline on synthetic data, on CPU, in a few minutes.

synthetic data -> three small, different teachers trained on labels and exported (.pt2)
-> dump a cache -> a student distilled from the cache, and one trained on labels alone
(same replayed views) -> a table of mAP, cache size and throughput -> report.html.

``quick=True`` runs the same steps on a few clips for one epoch each (seconds; used by the tests).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from logitcache import models
from logitcache.augment import Augmenter, epoch_order, id_hashes, load_ops_spec, view_seeds
from logitcache.data import AudioFolder
from logitcache.dump import dump
from logitcache.errors import LogitCacheError
from logitcache.synth import make_splits
from logitcache.targets import aggregate, hard_label_loss
from logitcache.train import average_precision, train
from logitcache.views import DrawnViews, ViewSource, collate_views

TEACHERS = ("cnn_small", "crnn_small", "transformer_tiny")
STUDENT = "cnn_tiny"
# the demo's two sizes; keyword arguments of run_demo override single settings
SIZES = {
    "full": dict(n_train=400, n_eval=200, clip_seconds=1.0, teacher_epochs=12, dump_epochs=6, student_epochs=12,
                 batch_size=16, teacher_lr=5e-3, student_lr=3e-3),
    "quick": dict(n_train=16, n_eval=8, clip_seconds=0.5, teacher_epochs=1, dump_epochs=1, student_epochs=1,
                  batch_size=8, teacher_lr=5e-3, student_lr=3e-3),
}


def fit_on_labels(models_: list[torch.nn.Module], folder: AudioFolder, augmenter: Augmenter, epochs: int,
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
        for wave, params, pos in DataLoader(views, batch_size=batch_size, collate_fn=collate_views,
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
def clip_logits(model: torch.nn.Module, folder: AudioFolder, augmenter: Augmenter, batch_size: int = 64) -> torch.Tensor:
    outs = []
    for a in range(0, len(folder), batch_size):
        x = torch.stack([augmenter.fit_clip(folder.load(i, augmenter.sample_rate))
                         for i in range(a, min(a + batch_size, len(folder)))])
        outs.append(model(x).float())
    return torch.cat(outs)


def mean_ap(logits: torch.Tensor, folder: AudioFolder) -> float:
    return float(np.nanmean(average_precision(logits.numpy(), folder.labels)))


@contextlib.contextmanager
def _threads(n: int):
    # the DataLoader worker that makes views takes one core; more intra-op threads than the cores
    # left only make the two fight over them
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _settings(quick: bool, overrides: dict) -> dict:
    s = dict(SIZES["quick" if quick else "full"])
    unknown = set(overrides) - set(s)
    if unknown:
        raise LogitCacheError(f"run_demo: unknown setting(s) {sorted(unknown)}; known: {sorted(s)}")
    return {**s, **{k: v for k, v in overrides.items() if v is not None}}


def run_demo(out_dir: str | Path = "demo_out", *, quick: bool = False, seed: int = 0, topk: int = 5,
             progress: bool = True, **sizes) -> dict:
    """Run the demo; returns the figures it prints (also written to ``out_dir/summary.json``).

    ``sizes`` override single entries of :data:`SIZES` (n_train, n_eval, clip_seconds,
    teacher_epochs, dump_epochs, student_epochs, batch_size). ``seed`` changes the data, the
    teachers' initialisation, the dump's views and the students' initialisation."""
    s = _settings(quick, sizes)
    if seed < 0:
        raise LogitCacheError(f"--seed {seed}: must be 0 or more")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    workers = 1 if (os.cpu_count() or 1) > 1 and not quick else 0  # a worker costs more than a few clips
    with _threads(max(1, (os.cpu_count() or 1) - workers)):
        return _run(out, s, seed, topk, workers, progress)


def _run(out: Path, s: dict, seed: int, topk: int, workers: int, progress: bool) -> dict:
    say = tqdm.write if progress else (lambda *_: None)
    torch.manual_seed(seed)
    data = out / "data"
    teacher_files, rows = _data_and_teachers(out, s, seed, workers, progress, say)
    train_set = AudioFolder(data / "train")
    C, E = len(train_set.classes), s["dump_epochs"]
    say(f"[3/6] dumping {E} epochs x {len(train_set)} views, top-{topk} of {C} classes")
    cache_path = out / "cache.zarr"
    shutil.rmtree(cache_path, ignore_errors=True)
    started = time.perf_counter()
    dump(data / "train", teacher_files, cache_path, epochs=E, topk=topk, augment="ced", seed=seed,
         batch_size=s["batch_size"], num_workers=workers, progress=progress)
    dump_rate = E * len(train_set) / (time.perf_counter() - started)
    from logitcache.report import inspect_cache, write_cache_report

    size = inspect_cache(cache_path)
    students = {}
    for step, (label, run, alpha) in enumerate([("from the cache (KD)", "student_kd", 0.0),
                                                ("from labels alone (same replayed views)", "student_labels", 1.0)]):
        say(f"[{4 + step}/6] student {STUDENT} {label}, {s['student_epochs']} epochs")
        students[run] = train(cache_path, data / "train", STUDENT, out / run, epochs=s["student_epochs"],
                              batch_size=s["batch_size"], lr=s["student_lr"], alpha=alpha,
                              eval_data=data / "eval", seed=seed, num_workers=workers, progress=progress)
    rows += [(f"student {STUDENT} from cache (KD)", students["student_kd"]["eval_mAP"]),
             (f"student {STUDENT} from labels", students["student_labels"]["eval_mAP"])]
    summary = {
        "mAP": dict(rows),
        "seed": seed,
        "cache_bytes": size["bytes_on_disk"],
        "bytes_per_sample_epoch": size["bytes_per_sample_epoch"],
        "share_of_audio": size["share_of_audio"],
        "dump_views_per_s": round(dump_rate, 1),
        "train_views_per_s": students["student_kd"]["samples_per_s"],
        "epochs_stored": E,
        "topk": topk,
        "classes": C,
    }
    print(_table(rows, summary))
    say("[6/6] report: inspect, fidelity, student vs ensemble")
    report = write_cache_report(out / "report.html", cache_path, data / "train", teacher_files,
                                run=out / "student_kd", eval_data=data / "eval", progress=progress)
    summary["report"] = report["html"]
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"report: {report['html']}")
    return summary


def _data_and_teachers(out: Path, s: dict, seed: int, workers: int, progress: bool, say
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
        say(f"[1/6] synthesising {s['n_train']}+{s['n_eval']} clips of {s['clip_seconds']:g} s -> {data}")
        make_splits(data, n_train=s["n_train"], n_eval=s["n_eval"], clip_seconds=s["clip_seconds"], seed=seed,
                    overwrite=True)
    train_set, eval_set = AudioFolder(data / "train"), AudioFolder(data / "eval")
    sr, C = train_set.default_sample_rate, len(train_set.classes)
    augmenter = Augmenter(load_ops_spec("ced"), sr, s["clip_seconds"])
    say(f"[2/6] training {len(TEACHERS)} teachers on labels: {', '.join(TEACHERS)}")
    files = [out / "teachers" / f"{name}.pt2" for name in TEACHERS]
    if reuse and all(p.is_file() for p in files):
        teachers = [torch.export.load(str(p)).module() for p in files]
    else:
        teachers = [models.create_model(name, num_classes=C, sample_rate=sr, seed=10 * seed + i)
                    for i, name in enumerate(TEACHERS)]
        # plain clips: in a dozen short epochs, masked views whose labels still name the masked event
        # teach these teachers less than clean clips do (ensemble mAP 0.57 vs 0.74 in a trial)
        plain = Augmenter(load_ops_spec("none"), sr, s["clip_seconds"])
        fit_on_labels(teachers, train_set, plain, s["teacher_epochs"], seed=100 + seed, lr=s["teacher_lr"],
                      batch_size=s["batch_size"], num_workers=workers, progress=progress)
        for model, path in zip(teachers, files):
            models.export_model(model, path, sr, augmenter.clip_samples)
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
