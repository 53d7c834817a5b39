"""``train``: distil a student from a cache. Teachers are never imported or loaded here.

Views are replayed from the stored augmentation parameters and targets are streamed in
stored order (whole chunks, read ahead in DataLoader workers). Loss: KD on the stored
targets at a train-time temperature, plus an optional hard-label term weighted by ``alpha``.
"""

from __future__ import annotations

import inspect
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from logitcache.augment import Augmenter
from logitcache.cache import Cache, open_cache
from logitcache.data import AudioFolder
from logitcache.dump import autocast, resolve_device
from logitcache.errors import LogitCacheError, one_line_worker_errors
from logitcache.targets import hard_label_loss, kd_loss
from logitcache.teachers import load_factory, load_state_dict
from logitcache.views import CacheStream, check_compatible


def build_student(spec: str, num_classes: int, sample_rate: int, frames: int | None, seed: int = 0) -> torch.nn.Module:
    """A zoo name (see ``logitcache.models.list_models``) or ``package.module:callable``.

    Factories receive whichever of ``num_classes``, ``sample_rate``, ``frames`` they accept.
    """
    from logitcache import models

    torch.manual_seed(seed)
    if ":" not in spec:
        return models.create_model(spec, num_classes=num_classes, sample_rate=sample_rate, frames=frames)
    module_name, _, attr = spec.partition(":")
    try:
        fn = getattr(__import__(module_name, fromlist=[attr]), attr)
    except (ImportError, AttributeError):
        return load_factory(spec)  # raises the one-line error
    offered = {"num_classes": num_classes, "sample_rate": sample_rate, "frames": frames}
    accepted = inspect.signature(fn).parameters
    model = fn(**{k: v for k, v in offered.items() if k in accepted})
    if not isinstance(model, torch.nn.Module):
        raise LogitCacheError(f"{spec}: returned {type(model).__name__}, not a torch.nn.Module")
    return model


def average_precision(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-class AP ``[C]`` (NaN for classes without positives), ties broken by order."""
    order = np.argsort(-scores, axis=0, kind="stable")
    y = np.take_along_axis(labels > 0.5, order, axis=0)
    hits = np.cumsum(y, axis=0)
    precision = hits / np.arange(1, len(y) + 1)[:, None]
    positives = y.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(positives > 0, (precision * y).sum(0) / positives, np.nan)


@torch.no_grad()
def evaluate(model: torch.nn.Module, folder: AudioFolder, augmenter: Augmenter, kind: str,
             device: torch.device, batch_size: int = 64) -> dict:
    """mAP (multilabel) or top-1 accuracy (multiclass) of clip-level predictions on un-augmented clips."""
    model.eval()
    scores = []
    for a in range(0, len(folder), batch_size):
        x = torch.stack([augmenter.fit_clip(folder.load(i, augmenter.sample_rate))
                         for i in range(a, min(a + batch_size, len(folder)))])
        z = model(x.to(device)).float()
        if z.dim() == 3:
            z = z.max(dim=1).values  # frame-level: a clip holds a class if any frame does
        scores.append(z.cpu().numpy())
    model.train()
    s = np.concatenate(scores)
    if kind == "multiclass":
        return {"top1": float((s.argmax(1) == folder.labels.argmax(1)).mean())}
    return {"mAP": float(np.nanmean(average_precision(s, folder.labels)))}


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, total_steps: int):
    """AdamW with a cosine decay to 5 % of ``lr`` over the run (no warm-up: step 0 uses ``lr``)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    total = max(int(total_steps), 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
    return optimizer, schedule


def distill_step(model, optimizer, batch: dict, kind: str, device: torch.device, temperature: float = 1.0,
                 alpha: float = 0.0, precision: str = "fp32") -> float:
    """One optimiser step on a CacheStream batch; returns the loss."""
    x = batch["wave"].to(device, non_blocking=True)
    with autocast(device, precision):
        z = model(x)
    loss = torch.zeros((), device=device)
    if alpha < 1.0:
        t = [batch[k].to(device, non_blocking=True) for k in ("values", "indices", "stat")]
        loss = loss + (1.0 - alpha) * kd_loss(z, *t, kind=kind, temperature=temperature)
    if alpha > 0.0:
        loss = loss + alpha * hard_label_loss(z, batch["labels"].to(device, non_blocking=True), kind)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def usable_epochs(cache: Cache, allow_partial: bool) -> list[int]:
    if cache.complete:
        return list(range(cache.epochs))
    done = [e for e, row in enumerate(cache.chunks_done()) if row.all()]
    if not allow_partial:
        raise LogitCacheError(f"{cache.path}: cache is incomplete (dump did not finish); "
                              f"use --allow-partial to train on its {len(done)} complete epoch(s)")
    if not done:
        raise LogitCacheError(f"{cache.path}: cache has no complete epoch yet")
    return done


def train(
    cache: str | Path,
    data: str | Path,
    student: str,
    out: str | Path,
    *,
    epochs: int | None = None,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    temperature: float = 1.0,
    alpha: float = 0.0,
    member: str | None = None,
    eval_data: str | Path | None = None,
    device: str = "auto",
    precision: str = "fp32",
    num_workers: int = 0,
    seed: int = 0,
    allow_partial: bool = False,
    max_steps: int | None = None,
    record_steps: bool = False,
    progress: bool = True,
) -> dict:
    """Train ``student`` on the cache's targets; writes checkpoint.pt and metrics.jsonl to ``out``.

    Returns the last epoch's metrics (plus ``step_losses`` when ``record_steps``).
    """
    if not 0.0 <= alpha <= 1.0:
        raise LogitCacheError(f"--alpha {alpha}: must be in [0, 1]")
    if temperature <= 0:
        raise LogitCacheError(f"--temperature {temperature}: must be positive")
    c = open_cache(cache)
    folder = AudioFolder(data)
    check_compatible(c, folder)
    stored = usable_epochs(c, allow_partial)
    if not c.complete:
        print(f"note: {cache}: the dump did not finish; training on its {len(stored)} complete epoch(s) only "
              f"(stored epochs {', '.join(map(str, stored))})", file=sys.stderr)
    if member is not None and member not in c.members:
        raise LogitCacheError(f"{cache}: unknown member {member!r} (members: {', '.join(c.members) or 'none stored'})")
    epochs = int(epochs or len(stored))
    if epochs > len(stored) and progress:
        tqdm.write(f"training {epochs} epochs over {len(stored)} stored epoch(s): epoch i replays stored epoch "
                   f"i mod {len(stored)}")
    try:
        augmenter = Augmenter.from_spec(c.manifest["augment"])
    except LogitCacheError as e:  # name the cache: the spec came from it, not from the user
        raise LogitCacheError(f"{cache}: {e}") from None
    eval_folder = AudioFolder(eval_data) if eval_data else None
    if eval_folder is not None and eval_folder.classes != c.classes:
        raise LogitCacheError(f"{eval_data}: class list differs from the cache's")
    kind = c.output_kind
    dev = resolve_device(device)
    model = build_student(student, len(c.classes), augmenter.sample_rate, c.frames, seed).to(dev)
    steps_per_epoch = -(-c.num_samples // batch_size)
    optimizer, schedule = make_optimizer(model, lr, weight_decay, min(epochs * steps_per_epoch, max_steps or 1 << 62))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = {"cache": str(cache), "data": str(data), "student": student, "epochs": epochs, "batch_size": batch_size,
              "lr": lr, "temperature": temperature, "alpha": alpha, "member": member, "seed": seed,
              "cache_config_digest": c.manifest.get("config_digest"), "stored_epochs": stored}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    log = open(out / "metrics.jsonl", "w")
    step_losses: list[float] = []
    metrics: dict = {}
    steps = 0
    model.train()
    try:
        for epoch in range(epochs):
            stored_epoch = stored[epoch % len(stored)]
            stream = CacheStream(cache, data, stored_epoch, batch_size, member=member)
            loader = DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=dev.type == "cuda",
                                prefetch_factor=4 if num_workers else None)
            started, seen, total = time.perf_counter(), 0, 0.0
            bar = tqdm(one_line_worker_errors(loader), total=len(stream), unit="batch", desc=f"train {epoch + 1}/{epochs}",
                       disable=not progress, dynamic_ncols=True)
            for batch in bar:
                loss = distill_step(model, optimizer, batch, kind, dev, temperature, alpha, precision)
                schedule.step()
                seen += len(batch["wave"])
                total += loss * len(batch["wave"])
                steps += 1
                if record_steps:
                    step_losses.append(loss)
                bar.set_postfix(loss=f"{loss:.4f}")
                if max_steps and steps >= max_steps:
                    break
            seconds = time.perf_counter() - started
            metrics = {"epoch": epoch, "stored_epoch": stored_epoch, "train_loss": total / max(seen, 1),
                       "samples": seen, "seconds": round(seconds, 3), "samples_per_s": round(seen / seconds, 1)}
            if eval_folder is not None:
                metrics.update({f"eval_{k}": v for k, v in evaluate(model, eval_folder, augmenter, kind, dev).items()})
            log.write(json.dumps(metrics) + "\n")
            log.flush()
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "schedule": schedule.state_dict(), "epoch": epoch,
                        "config": config}, out / "checkpoint.pt")
            if max_steps and steps >= max_steps:
                break
    finally:
        log.close()
        c.close()
    if record_steps:
        metrics["step_losses"] = step_losses
    return metrics


def load_student(run_dir: str | Path, student: str, num_classes: int, sample_rate: int,
                 frames: int | None = None) -> torch.nn.Module:
    """A trained student from ``run_dir/checkpoint.pt`` (loaded with ``weights_only=True``)."""
    model = build_student(student, num_classes, sample_rate, frames)
    model.load_state_dict(load_state_dict(Path(run_dir) / "checkpoint.pt"))
    return model.eval()
