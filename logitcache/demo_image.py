"""``demo --image``: the pipeline on real images nobody here made, on CPU, in a few minutes on 2 cores.

scikit-learn's 1,797 handwritten 8x8 digits (``sklearn.datasets.load_digits``, UCI's test set of 1998),
upscaled with Pillow's bilinear filter to ``size`` x ``size`` RGB PNGs in the torchvision ``ImageFolder``
layout (``<digit>/<index>.png``, the index into ``load_digits``), split per class into train and a
held-out eval set -> three small CNN teachers of different shapes, trained on freshly drawn crops and
flips for about a minute, exported to ``.pt2`` -> a cache of their averaged softmax (MEAL V2:
``aggregation="mean_prob"``, multiclass) over crops and flips -> the student ``image_cnn_small`` from
the cache, and the same student from labels alone on the same replayed views -> a table of eval
top-1, plus a check that :func:`logitcache.replay` and the re-run teachers give the stored top-k.

``quick=True`` runs the same steps on a few images at 16x16 (seconds; used by the tests).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from logitcache import models
from logitcache.augment import Augmenter, id_hashes, make_spec, view_seeds
from logitcache.cache import open_cache
from logitcache.demo import _Cores, _settings_of, _threads, kd_and_label_students, timed_run
from logitcache.dump import dump
from logitcache.errors import LogitCacheError
from logitcache.metrics import top1_accuracy
from logitcache.sources import Source, open_source
from logitcache.targets import aggregate
from logitcache.views import ViewSource, replay

TEACHERS = ("lenet", "wide_cnn", "res_cnn")
STUDENT = "image_cnn_small"
# crops of at least 35 % of the digit (ImageNet's 8 % leaves a stroke) and flips, as FKD / MEAL V2 store them
AUGMENT_OPS = [{"op": "random_resized_crop", "scale": [0.35, 1.0]}, {"op": "hflip", "p": 0.5}]
SIZES = {
    "full": dict(n_train=1297, n_eval=500, size=32, teacher_epochs=10, dump_epochs=6, student_epochs=18,
                 batch_size=32, teacher_lr=4e-3, student_lr=1e-2),
    "quick": dict(n_train=60, n_eval=30, size=16, teacher_epochs=2, dump_epochs=1, student_epochs=2,
                  batch_size=16, teacher_lr=4e-3, student_lr=1e-2),
}
REPLAY_CHECK = 8  # ids of epoch 0 replayed and re-run through the teachers


def digits_folders(out: str | Path, n_train: int, n_eval: int, size: int, seed: int = 0) -> tuple[Path, Path]:
    """Write ``load_digits`` as two image folders, ``out/train`` and ``out/eval`` (disjoint).

    Each class's images are shuffled by ``seed`` and dealt in turn, so every split of at least ten
    images holds every digit; eval takes the first ``n_eval`` dealt, train the next ``n_train``."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    if n_train < 10 or n_eval < 10 or n_train + n_eval > len(digits.target):
        raise LogitCacheError(f"digits: n_train={n_train}, n_eval={n_eval} must be 10 or more each and "
                              f"{len(digits.target)} together at most")
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(digits.target == c)) for c in range(10)]
    dealt = [int(i) for row in zip(*[np.resize(p, max(map(len, per_class))) for p in per_class]) for i in row]
    dealt = list(dict.fromkeys(dealt))  # np.resize repeats the short classes' images: keep the first
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)  # 0..16 ink levels
    roots = (Path(out) / "train", Path(out) / "eval")
    for root, picked in zip(roots, (dealt[n_eval:n_eval + n_train], dealt[:n_eval])):
        shutil.rmtree(root, ignore_errors=True)
        for i in picked:
            path = root / str(digits.target[i]) / f"{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels[i], "L").resize((size, size), Image.BILINEAR).convert("RGB").save(path)
    return roots


# ------------------------------------------------------------------ teachers: three shapes, [B, 3, H, W] -> [B, C]
def make_teacher(name: str, num_classes: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if name == "lenet":  # 5x5 convolutions, max pooling, a two-layer head
        return nn.Sequential(nn.Conv2d(3, 8, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(8, 16, 5, padding=2), nn.ReLU(), nn.AdaptiveMaxPool2d(4), nn.Flatten(),
                             nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, num_classes))
    if name == "wide_cnn":  # wide strided 3x3 layers with batch norm, average pooled to 2x2
        return nn.Sequential(nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                             nn.Conv2d(32, 48, 3, stride=2, padding=1), nn.BatchNorm2d(48), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(192, num_classes))
    if name == "res_cnn":
        return _ResCNN(num_classes)
    raise LogitCacheError(f"unknown demo teacher {name!r}; known: {', '.join(TEACHERS)}")


class _ResCNN(nn.Module):
    """A strided stem, one residual block with batch norm, a strided convolution, 2x2 average pooling."""

    def __init__(self, num_classes: int, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                   nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width))
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(8 * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        return self.head(self.down(F.relu(h + self.block(h))))


def export_image_model(model: nn.Module, path: Path, view_shape: tuple[int, ...]) -> Path:
    """``model`` (eval mode) as a torch.export program with a dynamic batch, input ``[B, *view_shape]``."""
    model.eval()
    example = torch.rand(2, *view_shape, generator=torch.Generator().manual_seed(0))  # batch 2: 1 would specialise
    program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, path, extra_files={models._META_FILE: json.dumps({"view_shape": list(view_shape)})})
    return path


def drawn_views(source: ViewSource, seed: int, epoch: int) -> torch.Tensor:
    """One freshly drawn view per sample, in dataset order (the dump's seeds for ``seed``, ``epoch``)."""
    seeds = view_seeds(seed, epoch, id_hashes(source.folder.ids))
    return torch.stack([source.draw(i, seeds[i], [])[0] for i in range(len(seeds))])


def train_teachers(folder: Source, augmenter: Augmenter, s: dict, seed: int, progress: bool) -> list[nn.Module]:
    """Cross-entropy on views drawn afresh each epoch; all teachers step on the same batches."""
    nets = [make_teacher(n, len(folder.classes), 10 * seed + k) for k, n in enumerate(TEACHERS)]
    y = torch.from_numpy(folder.label_rows(np.arange(len(folder))).argmax(1))
    source, B = ViewSource(folder, augmenter), s["batch_size"]
    steps = s["teacher_epochs"] * -(-len(folder) // B)
    opts = [torch.optim.AdamW(m.parameters(), lr=s["teacher_lr"], weight_decay=1e-4) for m in nets]
    scheds = [torch.optim.lr_scheduler.OneCycleLR(o, s["teacher_lr"], total_steps=steps) for o in opts]
    g = torch.Generator().manual_seed(seed)
    for epoch in tqdm(range(s["teacher_epochs"]), desc="teachers", unit="epoch", disable=not progress):
        x = drawn_views(source, 100 + seed, epoch)  # not the dump's views
        for batch in torch.randperm(len(folder), generator=g).split(B):
            for net, opt, sched in zip(nets, opts, scheds):
                net.train()
                loss = F.cross_entropy(net(x[batch]), y[batch])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
    return [m.eval() for m in nets]


@torch.no_grad()
def plain_logits(model, folder: Source, augmenter: Augmenter) -> torch.Tensor:
    """Logits of the un-augmented views (the whole image resized), in dataset order."""
    plain = ViewSource(folder, augmenter)
    return model(torch.stack([plain.plain(i) for i in range(len(folder))])).float()


def top1(logits: torch.Tensor, folder: Source) -> float:
    return float(top1_accuracy(logits.numpy(), folder.table))


@torch.no_grad()
def replay_check(cache_path: Path, folder: Source, teacher_files: list[str], ids: list[str], epoch: int = 0) -> dict:
    """Replay ``ids``' stored views of ``epoch``, re-run the teachers on them alone (batch of the
    replayed views), average their softmax: the stored top-k indices must come back, and the values
    to the stored precision. Returns the counts and the largest value difference."""
    cache = open_cache(cache_path)
    stored = cache.targets(epoch, ids)
    views = torch.stack([replay(cache, folder, epoch, i) for i in ids])
    teachers = [torch.export.load(p).module() for p in teacher_files]
    fresh = aggregate([t(views).float() for t in teachers], "multiclass", "mean_prob")
    k = stored.indices.shape[1]
    values, indices = fresh.topk(k, dim=1)
    return {"ids": len(ids), "topk_equal": int((indices.numpy() == stored.indices).all(axis=1).sum()),
            "max_abs_diff": float(np.abs(values.numpy() - stored.values.astype(np.float32)).max()),
            "value_dtype": str(stored.values.dtype), "views": views, "stored": stored, "fresh": fresh}


def run_image_demo(out_dir: str | Path = "demo_image_out", *, quick: bool = False, seed: int = 0, topk: int = 5,
                   progress: bool = True, **sizes) -> dict:
    """Run the image demo; returns the figures it prints (also written to ``out_dir/summary.json``).

    ``sizes`` override single entries of :data:`SIZES` (n_train, n_eval, size, teacher_epochs,
    dump_epochs, student_epochs, batch_size, teacher_lr, student_lr)."""
    s = _settings_of(SIZES, quick, sizes, "run_image_demo")
    if seed < 0:
        raise LogitCacheError(f"--seed {seed}: must be 0 or more")
    cores = os.cpu_count() or 1
    return timed_run(out_dir, lambda out: _run(out, s, seed, topk, progress, _Cores.split(cores, 2, quick), cores),
                     _table)


def _run(out: Path, s: dict, seed: int, topk: int, progress: bool, pair: _Cores, cores: int) -> dict:
    say = tqdm.write if progress else (lambda *_: None)
    say(f"[1/5] load_digits -> {s['n_train']}+{s['n_eval']} PNGs of {s['size']}x{s['size']} under {out / 'data'}")
    train_dir, eval_dir = digits_folders(out / "data", s["n_train"], s["n_eval"], s["size"], seed)
    train_set, eval_set = open_source(train_dir), open_source(eval_dir)
    size = [s["size"], s["size"]]
    augmenter = Augmenter.from_spec(make_spec("image", AUGMENT_OPS, {"size": size}))
    (out / "augment.json").write_text(json.dumps({"ops": AUGMENT_OPS}, indent=2))

    say(f"[2/5] training {len(TEACHERS)} teachers on crops and flips: {', '.join(TEACHERS)}")
    t0 = time.perf_counter()
    with _threads(min(cores, 2)):
        teachers = train_teachers(train_set, augmenter, s, seed, progress)
    teacher_s = time.perf_counter() - t0
    files = [str(export_image_model(m, out / "teachers" / f"{n}.pt2", augmenter.view_shape))
             for n, m in zip(TEACHERS, teachers)]
    logits = [plain_logits(m, eval_set, augmenter) for m in teachers]
    rows = [(f"teacher {n}", top1(z, eval_set)) for n, z in zip(TEACHERS, logits)]
    rows.append(("ensemble (mean softmax)", top1(aggregate(logits, "multiclass", "mean_prob"), eval_set)))

    E, cache_path = s["dump_epochs"], out / "cache.zarr"
    say(f"[3/5] dumping {E} epochs x {len(train_set)} crops+flips, top-{topk} of {len(train_set.classes)}")
    shutil.rmtree(cache_path, ignore_errors=True)
    t0 = time.perf_counter()
    with _threads(min(cores, 2)):
        dump(train_dir, files, cache_path, epochs=E, topk=topk, augment=str(out / "augment.json"), seed=seed,
             image_size=size, output_kind="multiclass", aggregation="mean_prob", batch_size=s["batch_size"],
             num_workers=0, progress=progress)
    dump_s = time.perf_counter() - t0

    say("[4/5] replay check: stored views re-made, teachers re-run, top-k compared")
    ids = open_cache(cache_path).ids[:REPLAY_CHECK]
    check = {k: v for k, v in replay_check(cache_path, train_set, files, ids).items()
             if k not in ("views", "stored", "fresh")}

    say(f"[5/5] student {STUDENT}, {s['student_epochs']} epochs: from the cache (KD) and, side by side, "
        f"from labels alone (same replayed views)")
    for run_dir in ("student_kd", "student_labels"):  # this demo's own runs of an earlier call
        shutil.rmtree(out / run_dir, ignore_errors=True)
    common = dict(cache=cache_path, data=train_dir, student=STUDENT, epochs=s["student_epochs"],
                  batch_size=s["batch_size"], lr=s["student_lr"], eval_data=eval_dir, seed=seed,
                  num_workers=pair.workers, threads=pair.threads)
    kd, labels = kd_and_label_students(common, out, pair, progress)
    rows += [(f"student {STUDENT} from cache (KD)", kd["eval_top1"]),
             (f"student {STUDENT} from labels", labels["eval_top1"])]
    info = open_cache(cache_path).manifest
    return {"top1": dict(rows), "seed": seed, "settings": s, "classes": len(train_set.classes), "topk": topk,
            "epochs_stored": E, "augment": info["augment"], "replay_check": check,
            "teacher_train_s": round(teacher_s, 1), "dump_s": round(dump_s, 1),
            "dump_views_per_s": round(E * len(train_set) / dump_s, 1), "train_views_per_s": kd["samples_per_s"]}


def _table(summary: dict) -> str:
    c, rows = summary["replay_check"], summary["top1"]
    lines = ["", f"{'model':<40} {'eval top-1':>10}", "-" * 51]
    lines += [f"{name:<40} {value:>10.3f}" for name, value in rows.items()]
    lines += ["-" * 51,
              f"cache: {summary['epochs_stored']} epochs of crops+flips, top-{summary['topk']}/{summary['classes']}; "
              f"dump {summary['dump_views_per_s']:.0f} views/s ({len(TEACHERS)} teachers), "
              f"train from cache {summary['train_views_per_s']:.0f} views/s",
              f"replay: {c['topk_equal']}/{c['ids']} replayed views give the stored top-k "
              f"(values within {c['max_abs_diff']:.2g}, stored {c['value_dtype']})",
              f"wall: {summary.get('wall_s', float('nan')):.0f} s (teachers {summary['teacher_train_s']:.0f} s)", ""]
    return "\n".join(lines)
