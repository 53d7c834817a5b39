"""``train``: distil a student from a cache. Teachers are never imported or loaded here.

Views are replayed from the stored augmentation parameters and targets are streamed in
stored order (whole chunks, read ahead in DataLoader workers). Loss: KD on the stored
targets at a train-time temperature, plus an optional hard-label term weighted by ``alpha``.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from logitcache import checks
from logitcache.augment import Augmenter, view_rate
from logitcache.cache import Cache, open_cache
from logitcache.device import autocast, resolve_device
from logitcache.distributed import setup as dist_setup
from logitcache.distributed import shard_bounds
from logitcache.dump import cpu_threads, set_threads
from logitcache.errors import LogitCacheError, one_line_worker_errors
from logitcache.heads import check_heads, heads_aggregation, heads_kd_loss, with_heads
from logitcache.lm import evaluate_lm, masked_rows, next_token_loss
from logitcache.metrics import average_precision, top1_accuracy
from logitcache.recompose import requested as requested_composition
from logitcache.sources import Source, open_source
from logitcache.storage import is_url
from logitcache.students import build_student, check_student_output, flat_positions, load_student  # noqa: F401
from logitcache.targets import hard_label_loss, kd_loss
from logitcache.views import CacheStream, ViewSource, check_compatible


def _stored_path(path: str | Path) -> str:
    """A path for config.json: absolute, so the run can be compared from any folder (URLs as given)."""
    return str(path) if is_url(path) else str(Path(path).resolve())


@torch.no_grad()
def evaluate(model: torch.nn.Module, folder: Source, augmenter: Augmenter, kind: str,
             device: torch.device, batch_size: int = 64) -> dict:
    """mAP (multilabel) or top-1 accuracy (multiclass) of clip-level predictions on un-augmented views;
    next-token NLL and perplexity for token windows."""
    if folder.modality == "tokens":
        return evaluate_lm(model, folder, augmenter, device, batch_size)
    model.eval()
    scores = []
    plain = ViewSource(folder, augmenter)
    for a in range(0, len(folder), batch_size):
        x = torch.stack([plain.plain(i) for i in range(a, min(a + batch_size, len(folder)))])
        z = flat_positions(model(x.to(device)).float())
        if z.dim() == 3:
            z = z.max(dim=1).values  # frame-level: a clip holds a class if any frame does
        scores.append(z.cpu().numpy())
    model.train()
    s = np.concatenate(scores)
    if kind == "multiclass":
        return {"top1": top1_accuracy(s, folder.table)}
    ap = average_precision(s, folder.table)
    # No class with a positive clip: mAP is undefined, NaN (null under --json), without numpy's warning.
    return {"mAP": float(np.nanmean(ap)) if np.isfinite(ap).any() else math.nan}


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, total_steps: int):
    """AdamW with a cosine decay to 5 % of ``lr`` over the run (no warm-up: step 0 uses ``lr``)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    total = max(int(total_steps), 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
    return optimizer, schedule


def distill_step(model, optimizer, batch: dict, kind: str, device: torch.device, temperature: float = 1.0,
                 alpha: float = 0.0, precision: str = "fp32", codec=None, heads: bool = False) -> float:
    """One optimiser step on a CacheStream batch; returns the loss. ``codec`` (the cache's,
    ``cache.codec``) computes the KD loss from the batch's decoded targets; None means a top-k
    triple (values, indices, stat), as topk and compact caches give. ``heads``: ``model`` is a
    :class:`~logitcache.heads.HeadsStudent` (or DDP around one) and the batch holds the members'
    targets; the KD loss is the mean of the heads' own, the label loss is on their prediction."""
    x = batch["wave"].to(device, non_blocking=True)
    with autocast(device, precision):
        if heads:
            z_heads = model(x, all_heads=True)
            z = getattr(model, "module", model).combine(z_heads)
        else:
            z = flat_positions(model(x))  # a dense map [B, H', W', C] against its positions stored as frames
    # Token windows: only the unmasked positions [P] reach the losses (padding, document starts).
    mask = batch["mask"].to(device, non_blocking=True) if "mask" in batch else None
    z_kd = z if mask is None else z[mask]
    loss = torch.zeros((), device=device)
    if mask is not None and not bool(mask.any()):
        loss = z.sum() * 0.0  # nothing to learn from this batch; still a step, so the schedule stays aligned
    elif alpha < 1.0:
        if heads:
            kd = heads_kd_loss(z_heads, batch, codec, kind, temperature, device, mask)
        elif codec is None:
            t = [batch[k].to(device, non_blocking=True) for k in ("values", "indices", "stat")]
            kd = kd_loss(z_kd, *(t if mask is None else masked_rows(t, mask)), kind=kind, temperature=temperature)
        else:
            decoded = codec.from_arrays(batch, device)
            kd = codec.loss(z_kd, decoded if mask is None else masked_rows(decoded, mask), kind, temperature)
        loss = loss + (1.0 - alpha) * kd
    if alpha > 0.0 and (mask is None or bool(mask.any())):
        labels = batch["labels"].to(device, non_blocking=True)
        loss = loss + alpha * (hard_label_loss(z, labels, kind) if mask is None else
                               next_token_loss(z_kd, labels[mask]))
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
    heads: str = "ensemble",
    eval_data: str | Path | None = None,
    device: str = "auto",
    precision: str = "fp32",
    num_workers: int = 0,
    seed: int = 0,
    allow_partial: bool = False,
    max_steps: int | None = None,
    record_steps: bool = False,
    progress: bool = True,
    distributed: bool | None = None,
    resume: bool = False,
    checkpoint_every: int | None = None,
    threads: int | None = None,
    ensemble: list[str] | str | None = None,
    ensemble_weights: list[float] | None = None,
    aggregation: str | None = None,
    member_weighting: str | None = None,
    source: str | None = None,
) -> dict:
    """Train ``student`` on the cache's targets; writes checkpoint.pt and metrics.jsonl to ``out``.

    Returns the last epoch's metrics (plus ``step_losses`` when ``record_steps``).

    checkpoint.pt is written after every epoch, and every ``checkpoint_every`` steps. It holds the
    reader's position (stored epoch, batches done), so ``resume`` continues at the exact next
    batch of the stored order, as if never stopped (same global batch and number of ranks needed).

    With ``distributed`` (default: when WORLD_SIZE > 1, as under torchrun) this is one rank of
    a DistributedDataParallel job: ``batch_size`` is the global batch (each of W ranks takes
    ``batch_size / W``), each rank streams its own contiguous, chunk-aligned share of every
    stored epoch, every rank takes the same number of steps (the smallest share's; the rest of
    the longer shares is skipped that epoch), and only rank 0 writes the run folder. Losses in
    the metrics are averaged over ranks.

    An existing run in ``out`` (checkpoint.pt or metrics.jsonl) is continued with ``resume`` and
    refused without it. A loss that becomes NaN or infinite stops the run with a one-line
    :class:`LogitCacheError` naming the epoch and batch; the last checkpoint written stays.
    ``threads``: torch's intra-op threads during the run (see :func:`logitcache.dump.cpu_threads`),
    restored on return.

    ``data`` (and ``eval_data``) as for :func:`logitcache.dump.dump`: a path whose source kind is
    detected or named by ``source``, or an open source; it must be of the kind the cache records.

    ``heads="members"`` (CERBERUS) gives the student one output head per stored member on a shared
    body (see :mod:`logitcache.heads`): each head is distilled from its own member's targets, the
    loss is the mean over heads (plus ``alpha`` times the label loss of the heads' prediction),
    and evaluation, the checkpoint and ``compare`` use the heads' prediction, combined as the
    cache's ensemble is.

    ``ensemble`` (stored member names) distils from a recomposition of those members instead of
    the stored ensemble, the teachers still never loaded: ``ensemble_weights`` (one per member,
    normalised, as dump's), ``aggregation`` (``mean_prob``, ``mean_logit`` or their ``_zscore``
    variants; default: the cache's) and ``member_weighting`` (``confidence``: per row); see
    :mod:`logitcache.recompose`. Not with ``member``, nor on a ``sampled`` cache.
    """
    epochs = checks.optional_whole("--epochs", epochs)
    batch_size = checks.whole("--batch-size", batch_size)
    lr = checks.real("--lr", lr, 0, above=True)
    weight_decay = checks.real("--weight-decay", weight_decay, 0)
    temperature = checks.real("--temperature", temperature, 0, above=True)
    alpha = checks.real("--alpha", alpha, 0, 1)
    num_workers = checks.whole("--workers", num_workers, 0)
    seed = checks.seed("--seed", seed)
    max_steps = checks.optional_whole("max_steps", max_steps)
    checkpoint_every = checks.optional_whole("--checkpoint-every", checkpoint_every)
    threads = checks.optional_whole("--threads", threads)
    heads = check_heads(heads)
    if heads == "members" and member is not None:
        raise LogitCacheError(f"--heads members and --member {member}: choose one (--heads members distils "
                              f"every member, each into its own head)")
    if heads == "members" and ensemble:
        raise LogitCacheError(f"--heads members and --ensemble {','.join(ensemble)}: choose one (each head is "
                              f"distilled from its own member; a recomposed target has no member of its own)")
    _check_run_folder(Path(out), resume)
    c = open_cache(cache)
    folder = open_source(data, source)
    check_compatible(c, folder)
    stored = usable_epochs(c, allow_partial)
    if not c.complete:
        print(f"note: {cache}: the dump did not finish; training on its {len(stored)} complete epoch(s) only "
              f"(stored epochs {', '.join(map(str, stored))})", file=sys.stderr)
    comp = requested_composition(c, ensemble, ensemble_weights, aggregation, member_weighting, member)
    if member is not None and member not in c.members:
        raise LogitCacheError(f"{cache}: unknown member {member!r} (members: {', '.join(c.members) or 'none stored'})")
    if heads == "members" and not c.members:
        raise LogitCacheError(f"{cache}: --heads members needs the members' own targets, and this cache stores "
                              f"none (dumped with --no-members)")
    epochs = epochs if epochs is not None else len(stored)
    if epochs > len(stored) and progress:
        tqdm.write(f"training {epochs} epochs over {len(stored)} stored epoch(s): epoch i replays stored epoch "
                   f"i mod {len(stored)}")
    try:
        augmenter = Augmenter.from_spec(c.manifest["augment"])
    except LogitCacheError as e:  # name the cache: the spec came from it, not from the user
        raise LogitCacheError(f"{cache}: {e}") from None
    eval_folder = open_source(eval_data, source) if eval_data else None
    if eval_folder is not None and eval_folder.modality != folder.modality:
        raise LogitCacheError(f"{eval_data}: {eval_folder.modality} data, but the cache's views are {folder.modality}")
    if eval_folder is not None and eval_folder.classes != c.classes:
        raise LogitCacheError(f"{eval_data}: class list differs from the cache's")
    kind = c.output_kind
    t_dump = c.codec.options.get("temperature") if c.codec.name == "sampled" else None
    if t_dump is not None and float(t_dump) != temperature:
        print(f"warning: {cache}: sampled at --sample-temperature {t_dump:g}, trained at --temperature "
              f"{temperature:g}: the loss distils the teacher at {t_dump:g} (unbiased only when they are "
              f"equal)", file=sys.stderr)
    ctx, device = dist_setup(distributed, device)
    dev = resolve_device(device)
    if batch_size < 1 or batch_size % ctx.world:
        raise LogitCacheError(f"--batch-size {batch_size}: must be a positive multiple of the {ctx.world} ranks "
                              f"(it is the global batch)")
    rank_batch = batch_size // ctx.world
    start, stop = shard_bounds(c.num_samples, c.chunk_rows, ctx.rank, ctx.world)
    # Equal step counts on every rank, or DDP's gradient all-reduce waits forever on the longest share.
    steps_per_epoch = min(-(-(b - a) // rank_batch)
                          for a, b in (shard_bounds(c.num_samples, c.chunk_rows, r, ctx.world) for r in range(ctx.world)))
    if steps_per_epoch == 0:
        raise LogitCacheError(f"{cache}: {-(-c.num_samples // c.chunk_rows)} chunk(s) per epoch cannot be shared by "
                              f"{ctx.world} ranks; use fewer ranks (or dump with a smaller --chunk-rows)")
    _check_dense_labels(c, alpha, heads)
    model = build_student(student, len(c.classes), view_rate(augmenter), c.frames, seed, c.position_shape)
    model = model.to(dev)
    check_student_output(model, student, c, augmenter.view_shape, dev,
                         getattr(augmenter, "view_dtype", torch.float32))
    if heads == "members":
        model = with_heads(model, student, c.members, len(c.classes), c.output_kind, augmenter.view_shape,
                           *heads_aggregation(c.manifest), view_dtype=getattr(augmenter, "view_dtype", torch.float32))
    net = model
    if ctx.active:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    optimizer, schedule = make_optimizer(model, lr, weight_decay, min(epochs * steps_per_epoch, max_steps or 1 << 62))
    out = Path(out)
    lead = ctx.rank == 0  # writes the run folder and shows progress
    progress = progress and lead
    if lead:
        out.mkdir(parents=True, exist_ok=True)
    config = {"cache": _stored_path(cache), "data": _stored_path(folder.root if isinstance(data, Source) else data), "student": student, "epochs": epochs, "batch_size": batch_size,
              "lr": lr, "temperature": temperature, "alpha": alpha, "member": member, "seed": seed,
              "cache_config_digest": c.manifest.get("config_digest"), "stored_epochs": stored, "source": folder.kind}
    if comp is not None:
        config.update(comp.describe())
    if ctx.active:
        config.update(ranks=ctx.world, rank_batch_size=rank_batch)
    if heads == "members":
        config.update(model.config())
    position = {"epoch": 0, "batch": 0, "steps": 0}  # where the next batch comes from
    so_far = _NO_SUMS  # the job's loss sum, samples and seconds of position's epoch before position
    if resume and (out / "checkpoint.pt").exists():
        position, so_far = _restore(out / "checkpoint.pt", config, model, optimizer, schedule)
    if lead:
        (out / "config.json").write_text(json.dumps(config, indent=2))
    log = open(out / "metrics.jsonl", "a" if position["steps"] else "w") if lead else None
    step_losses: list[float] = []
    metrics: dict = {}
    steps = position["steps"]

    def save(epoch: int, at: dict, sums: dict = _NO_SUMS) -> None:
        if lead:  # written aside, then renamed: a kill while saving leaves the previous checkpoint
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "schedule": schedule.state_dict(), "epoch": epoch, "position": at,
                        "epoch_so_far": sums, "config": config, "heads": config.get("head_members")},
                       out / "checkpoint.pt.tmp")
            (out / "checkpoint.pt.tmp").replace(out / "checkpoint.pt")

    model.train()
    threads_before = set_threads(cpu_threads(dev, num_workers, threads))
    try:
        for epoch in range(position["epoch"], epochs):
            stored_epoch = stored[epoch % len(stored)]
            skip = position["batch"] if epoch == position["epoch"] else 0  # batches done before a resume
            recomposed = comp.describe() if comp is not None else {}
            stream = CacheStream(cache, folder, stored_epoch, rank_batch, member=member,
                                 start=start + skip * rank_batch, stop=stop,
                                 members=c.members if heads == "members" else None, **recomposed)
            loader = DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=dev.type == "cuda",
                                prefetch_factor=4 if num_workers else None)
            started, seen, total, done, before, tokens = time.perf_counter(), 0, 0.0, skip, 0.0, 0
            if skip and ctx.rank == 0:  # the epoch's loss covers the batches before the resume too
                total, seen, before = so_far["loss_sum"], so_far["samples"], so_far["seconds"]
                tokens = so_far["tokens"]
            batches = itertools.islice(one_line_worker_errors(loader), steps_per_epoch - skip)
            bar = tqdm(batches, total=steps_per_epoch, initial=skip, unit="batch",
                       desc=f"train {epoch + 1}/{epochs}", disable=not progress, dynamic_ncols=True)
            for done, batch in enumerate(bar, start=skip + 1):
                loss = distill_step(net, optimizer, batch, kind, dev, temperature, alpha, precision, c.codec,
                                    heads == "members")
                if not math.isfinite(loss):
                    raise LogitCacheError(_diverged(out, loss, epoch, done))
                schedule.step()
                seen += len(batch["wave"])
                unmasked = int(batch["mask"].sum()) if "mask" in batch else 0  # token caches: positions trained
                tokens += unmasked
                # The batch's loss is a mean over its unmasked positions: an LM's epoch loss is per token.
                total += loss * (unmasked if "mask" in batch else len(batch["wave"]))
                steps += 1
                if record_steps:
                    step_losses.append(_rank_mean(ctx, loss, dev))
                bar.set_postfix(loss=f"{loss:.4f}")
                if checkpoint_every and steps % checkpoint_every == 0 and done < steps_per_epoch:
                    save(epoch, {"epoch": epoch, "batch": done, "steps": steps},
                         _sums(ctx, total, seen, before + time.perf_counter() - started, dev, tokens))
                if max_steps and steps >= max_steps:
                    break
            seconds = before + time.perf_counter() - started
            if ctx.active:  # the job's figures, not this rank's
                total, seen, tokens = _rank_sum(ctx, [total, seen, tokens], dev)
                seen, tokens = int(seen), int(tokens)
            lm = (c.manifest.get("augment") or {}).get("modality") == "tokens"
            metrics = {"epoch": epoch, "stored_epoch": stored_epoch,
                       "train_loss": total / max(tokens if lm else seen, 1), "samples": seen,
                       "seconds": round(seconds, 3), "samples_per_s": round(seen / seconds, 1)}
            if lm:  # an LM user counts tokens
                metrics.update(tokens=tokens, tokens_per_s=round(tokens / seconds, 1))
            if eval_folder is not None and lead:
                metrics.update({f"eval_{k}": v for k, v in evaluate(model, eval_folder, augmenter, kind, dev).items()})
            if lead:
                log.write(json.dumps(metrics) + "\n")
                log.flush()
            if done >= steps_per_epoch:
                save(epoch, {"epoch": epoch + 1, "batch": 0, "steps": steps})
            else:  # total and seen are the job's already
                save(epoch, {"epoch": epoch, "batch": done, "steps": steps},
                     {"loss_sum": total, "samples": seen, "seconds": seconds, "tokens": tokens})
            if max_steps and steps >= max_steps:
                break
    finally:
        torch.set_num_threads(threads_before)
        if log is not None:
            log.close()
        c.close()
    if record_steps:
        metrics["step_losses"] = step_losses
    return metrics


# What a resumed run must share with the checkpoint: a position counts per-rank batches.
_RESUME_KEYS = ("student", "batch_size", "epochs", "cache_config_digest", "stored_epochs", "ranks", "heads",
                "head_members", "ensemble", "ensemble_weights", "aggregation", "member_weighting")


def _check_dense_labels(c: Cache, alpha: float, heads: str) -> None:
    """Dense-map targets are distilled by KD alone: the labels are per image, and no rule says which
    of a map's positions hold an image's class (a max over frames would claim every map holds it)."""
    if c.position_shape is None:
        return
    where = f"cache {c.path} holds a {'x'.join(map(str, c.position_shape))} map per view"
    if alpha > 0:
        raise LogitCacheError(f"--alpha {alpha:g}: the labels are per image but {where}; train a dense-map "
                              f"student with --alpha 0 (KD only)")
    if heads == "members":
        raise LogitCacheError(f"--heads members: not supported for dense-map targets ({where})")


def _check_run_folder(out: Path, resume: bool) -> None:
    """One run per folder: another run's files are continued (``resume``), never overwritten."""
    found = [name for name in ("checkpoint.pt", "metrics.jsonl") if (out / name).exists()]
    if found and not resume:
        raise LogitCacheError(f"{out}: already holds a training run ({' and '.join(found)}); add --resume to "
                              f"continue it, or choose another --out")


def _diverged(out: Path, loss: float, epoch: int, batch: int) -> str:
    what = "NaN" if math.isnan(loss) else "infinite"
    kept = (f"{out / 'checkpoint.pt'} keeps the last checkpoint before it" if (out / "checkpoint.pt").exists()
            else "no checkpoint was written before it")
    return (f"train: loss became {what} at epoch {epoch + 1}, batch {batch}; {kept} (try a lower --lr, "
            f"--precision fp32, or check the cache with 'logitcache verify')")


_NO_SUMS = {"loss_sum": 0.0, "samples": 0, "seconds": 0.0, "tokens": 0}  # tokens: absent from older checkpoints


def _sums(ctx, total: float, seen: int, seconds: float, dev: torch.device, tokens: int = 0) -> dict:
    """The job's running loss sum, samples (and unmasked token positions) of the epoch so far (what a
    resume continues from)."""
    if ctx.active:
        total, seen, tokens = _rank_sum(ctx, [total, seen, tokens], dev)
    return {"loss_sum": total, "samples": int(seen), "seconds": seconds, "tokens": int(tokens)}


def _restore(path: Path, config: dict, model, optimizer, schedule) -> tuple[dict, dict]:
    """Load a checkpoint into model, optimiser and schedule; returns the reader position saved and
    the job's running loss sum, samples and seconds of that epoch before it."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise LogitCacheError(f"{path}: cannot be loaded ({str(e).splitlines()[0][:160]})") from None
    if "position" not in ckpt:
        raise LogitCacheError(f"{path}: written by a logitcache without resumable checkpoints; start a new --out")
    old = ckpt.get("config", {})
    diffs = [f"{k} ({old.get(k)!r} there, {config.get(k)!r} now)" for k in _RESUME_KEYS if old.get(k) != config.get(k)]
    if diffs:
        raise LogitCacheError(f"{path}: cannot resume: the run differs in {'; '.join(diffs)}")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    schedule.load_state_dict(ckpt["schedule"])
    return dict(ckpt["position"]), {**_NO_SUMS, **ckpt.get("epoch_so_far", {})}


def _rank_sum(ctx, values: list[float], dev: torch.device) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return t.tolist()


def _rank_mean(ctx, value: float, dev: torch.device) -> float:
    return value if not ctx.active else _rank_sum(ctx, [value], dev)[0] / ctx.world
