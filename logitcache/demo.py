"""``demo``: the whole pipeline on synthetic data, on CPU, in a few minutes.

synthetic data -> three small, different teachers trained on labels and exported (.pt2)
-> dump a cache -> a student distilled from the cache, and one trained on labels alone
(same replayed views) -> a table of mAP, cache size and throughput.
"""

from __future__ import annotations

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
from logitcache.synth import make_splits
from logitcache.targets import aggregate, hard_label_loss
from logitcache.train import average_precision, train
from logitcache.views import DrawnViews, ViewSource, collate_views

TEACHERS = ("cnn_small", "crnn_small", "transformer_tiny")
STUDENT = "cnn_tiny"


def fit_on_labels(model: torch.nn.Module, folder: AudioFolder, augmenter: Augmenter, epochs: int, seed: int,
                  batch_size: int = 32, lr: float = 2e-3, progress: bool = True, desc: str = "teacher") -> torch.nn.Module:
    """Plain supervised training with freshly drawn augmentations (how the demo's teachers are made)."""
    source, hashes = ViewSource(folder, augmenter), id_hashes(folder.ids)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=epochs * -(-len(folder) // batch_size))
    model.train()
    for epoch in tqdm(range(epochs), desc=desc, unit="epoch", disable=not progress, dynamic_ncols=True):
        order = epoch_order(seed, epoch, hashes)
        views = DrawnViews(source, order, view_seeds(seed, epoch, hashes)[order])
        for wave, params, pos, _ in DataLoader(views, batch_size=batch_size, collate_fn=collate_views):
            labels = torch.from_numpy(np.stack([source.labels(order[p], {k: v[i] for k, v in params.items()})
                                                for i, p in enumerate(pos)]))
            loss = hard_label_loss(model(wave), labels, "multilabel")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


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


def run_demo(out_dir: str | Path = "demo_out", *, n_train: int = 600, n_eval: int = 240, clip_seconds: float = 2.0,
             teacher_epochs: int = 24, dump_epochs: int = 8, student_epochs: int = 24, topk: int = 5,
             progress: bool = True) -> dict:
    """Run the demo; returns the figures it prints (also written to ``out_dir/summary.json``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say = tqdm.write if progress else (lambda *_: None)
    torch.manual_seed(0)
    data = out / "data"
    if not (data / "train" / "labels.csv").is_file():
        say(f"[1/5] synthesising {n_train}+{n_eval} clips of {clip_seconds:g} s -> {data}")
        make_splits(data, n_train=n_train, n_eval=n_eval, clip_seconds=clip_seconds, seed=0)
    train_set, eval_set = AudioFolder(data / "train"), AudioFolder(data / "eval")
    sr = train_set.default_sample_rate
    augmenter = Augmenter(load_ops_spec("ced"), sr, clip_seconds)
    C = len(train_set.classes)

    say(f"[2/5] training {len(TEACHERS)} teachers on labels: {', '.join(TEACHERS)}")
    teacher_files, teacher_logits, rows = [], [], []
    for i, name in enumerate(TEACHERS):
        path = out / "teachers" / f"{name}.pt2"
        model = models.create_model(name, num_classes=C, sample_rate=sr)
        if path.is_file():
            model = models.load_exported(path)[0]
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            fit_on_labels(model, train_set, augmenter, teacher_epochs, seed=100 + i, progress=progress, desc=name)
            models.export_model(model, path, sr, augmenter.clip_samples)
        teacher_files.append(str(path))
        logits = clip_logits(model, eval_set, augmenter)
        teacher_logits.append(logits)
        rows.append((f"teacher {name}", mean_ap(logits, eval_set)))
    rows.append(("ensemble (mean prob)", mean_ap(aggregate(teacher_logits, "multilabel"), eval_set)))

    say(f"[3/5] dumping {dump_epochs} epochs x {len(train_set)} views, top-{topk} of {C} classes")
    cache_path = out / "cache.zarr"
    if cache_path.exists():
        import shutil

        shutil.rmtree(cache_path)
    started = time.perf_counter()
    dump(data / "train", teacher_files, cache_path, epochs=dump_epochs, topk=topk, augment="ced", progress=progress)
    dump_rate = dump_epochs * len(train_set) / (time.perf_counter() - started)
    from logitcache.report import inspect_cache

    size = inspect_cache(cache_path)

    say(f"[4/5] student {STUDENT} from the cache ({student_epochs} epochs)")
    kd = train(cache_path, data / "train", STUDENT, out / "student_kd", epochs=student_epochs,
               eval_data=data / "eval", progress=progress)
    say(f"[5/5] student {STUDENT} from labels alone (same replayed views)")
    hard = train(cache_path, data / "train", STUDENT, out / "student_labels", epochs=student_epochs, alpha=1.0,
                 eval_data=data / "eval", progress=progress)
    rows += [(f"student {STUDENT} from cache (KD)", kd["eval_mAP"]), (f"student {STUDENT} from labels", hard["eval_mAP"])]

    summary = {
        "mAP": dict(rows),
        "cache_bytes": size["bytes_on_disk"],
        "bytes_per_sample_epoch": size["bytes_per_sample_epoch"],
        "share_of_audio": size["share_of_audio"],
        "dump_views_per_s": round(dump_rate, 1),
        "train_views_per_s": kd["samples_per_s"],
        "epochs_stored": dump_epochs,
        "topk": topk,
        "classes": C,
    }
    import json

    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    lines = ["", f"{'model':<36} {'eval mAP':>9}", "-" * 46]
    lines += [f"{name:<36} {value:>9.3f}" for name, value in rows]
    lines += ["-" * 46,
              f"cache: {size['bytes_on_disk'] / 1e6:.2f} MB on disk, {size['bytes_per_sample_epoch']:.1f} B per "
              f"sample-epoch ({100 * size['share_of_audio']:.2f}% of the audio), {dump_epochs} epochs, top-{topk}/{C}",
              f"dump: {dump_rate:.0f} views/s ({len(TEACHERS)} teachers); train from cache: "
              f"{kd['samples_per_s']:.0f} views/s", ""]
    print("\n".join(lines))
    from logitcache.report import write_cache_report

    report = write_cache_report(out / "report.html", cache_path, data / "train", teacher_files,
                                run=out / "student_kd", eval_data=data / "eval", progress=progress)
    summary["report"] = report["html"]
    print(f"report: {report['html']}")
    return summary
