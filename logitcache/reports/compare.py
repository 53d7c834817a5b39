"""``compare``: does a student trained from a cache (``logitcache train``) match the ensemble?"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from logitcache import checks
from logitcache.augment import Augmenter, view_rate
from logitcache.cache import Targets, open_cache
from logitcache.sources import open_source
from logitcache.errors import LogitCacheError
from logitcache.labels import LabelTable
from logitcache.metrics import average_precision, top1_accuracy
from logitcache.recompose import requested as requested_composition
from logitcache.recompose import targets as recomposed_targets
from logitcache.storage import is_url
from logitcache.targets import kl_divergence, teacher_probs


def _label_score(scores: np.ndarray, labels: np.ndarray | LabelTable, kind: str) -> float | None:
    """mAP (multilabel) or top-1 accuracy (multiclass) of clip scores ``[n, C]`` against ``labels``."""
    if kind == "multiclass":
        return top1_accuracy(scores, labels)
    ap = average_precision(scores, labels)
    return float(np.nanmean(ap)) if np.isfinite(ap).any() else None


def _pseudo_labels(probs: np.ndarray, kind: str) -> np.ndarray:
    """The ensemble's own hard decisions: its top-1 class, and (sigmoid) every class with p >= 0.5.

    The top-1 class always counts, so an unsure ensemble (no p >= 0.5 anywhere) still names
    positives and the AP stays defined."""
    top1 = np.eye(probs.shape[1], dtype=np.float32)[probs.argmax(1)]
    if kind == "multiclass":
        return top1
    return np.maximum(top1, (probs >= 0.5).astype(np.float32))


def _map_vs(scores: np.ndarray, probs: np.ndarray, kind: str) -> float | None:
    ap = average_precision(scores, _pseudo_labels(probs, kind))
    return float(np.nanmean(ap)) if np.isfinite(ap).any() else None


def _student_figures(student: torch.Tensor, teacher_p: torch.Tensor,
                     kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (top-1 agreement, KL(teacher || student)) of student logits against teacher
    probabilities ``[R, C]`` (sigmoid: the mean Bernoulli KL over classes)."""
    s, p = student.double(), teacher_p.double()
    top1 = (s.argmax(-1) == p.argmax(-1)).double()
    return top1, kl_divergence(p, s, kind, p_probs=True)


def _dense_targets(c, t, C: int, kind: str) -> torch.Tensor:
    """Dense teacher probabilities ``[..., C]`` of stored targets ``t`` (``cache.targets``)."""
    if not c.codec.triple:  # sampled: its stored (empirical) distribution
        return c.codec.dense(t)
    return teacher_probs(torch.from_numpy(np.asarray(t.values)).float(),
                         torch.from_numpy(np.asarray(t.indices).astype(np.int64)),
                         torch.from_numpy(np.asarray(t.stat)).float(), C, kind)


def _head_rows(names: list[str], pairs: list[list[tuple[torch.Tensor, torch.Tensor]]], who: str) -> list[dict]:
    """Per head: its top-1 agreement with and KL from its own teacher, over the (top-1, KL) rows
    collected for it."""
    return [{"head": h, who: name, "top1_agreement": float(torch.cat([a for a, _ in got]).mean()),
             "kl_mean": float(torch.cat([k for _, k in got]).mean())}
            for h, (name, got) in enumerate(zip(names, pairs))]


def _clip_level(x: np.ndarray) -> np.ndarray:
    """Frame-level rows ``[n, T, C]`` -> clip level by max over frames (how train.evaluate scores)."""
    return x.max(axis=1) if x.ndim == 3 else x


def _probs(logits: torch.Tensor, kind: str) -> torch.Tensor:
    return F.softmax(logits.float(), -1) if kind == "multiclass" else torch.sigmoid(logits.float())


def _token_views(c, net, source, stored, flat, batch_size, dev, kind, comp, member, heads, progress) -> dict:
    """compare's ``views`` for a token cache (:mod:`logitcache.reports.compare_tokens`), on the
    same seeded (epoch, position) picks ``flat`` as for clips."""
    from logitcache.reports.compare_tokens import cached_views

    N = c.num_samples
    picks = [(stored[int(s)], flat[flat // N == s] % N) for s in np.unique(flat // N)]

    def targets_of(epoch, ids):
        if comp is not None:
            return Targets(*recomposed_targets(c, epoch, ids, comp))
        return c.targets(epoch, ids, member=member)

    bar = tqdm(total=len(flat), unit="window", desc="compare", disable=not progress, dynamic_ncols=True)
    try:
        return cached_views(c, net, source, picks, batch_size, dev, kind, targets_of, heads, bar)
    finally:
        bar.close()


def _run_student(run: Path, config: dict, student: str | None, trust_run: bool) -> str:
    """The student to rebuild. A run folder is data: a ``module:callable`` it names is imported
    only when the user names the same factory (``student``) or trusts the run (``trust_run``)."""
    stored = config["student"]
    if not isinstance(stored, str) or not stored:
        raise LogitCacheError(f"{run}/config.json: 'student' is {stored!r}, not a model name")
    if student is not None and student != stored:
        raise LogitCacheError(f"--student {student}: the run {run} trained {stored}, not {student}")
    if ":" in stored and student is None and not trust_run:
        raise LogitCacheError(f"{run}/config.json: the student is the factory {stored}; compare does not import "
                              f"code named in a run folder: pass --student {stored} to import it (or --trust-run)")
    return stored


def _run_path(run: Path, config: dict, key: str, flag: str) -> str:
    """The run's cache or data folder. Runs store absolute paths; older ones stored them as given
    to train, relative to where it ran: tried against the current folder, then the run folder's
    parent."""
    value = config.get(key)
    if not value:
        raise LogitCacheError(f"{run}: config.json names no {key}; pass {flag}")
    value = str(value)
    if is_url(value) or Path(value).is_absolute():
        return value
    tries = [Path.cwd() / value, run.resolve().parent / value]
    found = next((t for t in tries if t.exists()), None)
    if found is None:
        raise LogitCacheError(f"{run}/config.json: {key} {value!r} is found neither in the current folder "
                              f"({tries[0].parent}) nor next to the run folder ({tries[1].parent}); pass {flag}")
    return str(found)


def compare(run: str | Path, cache: str | Path | None = None, data: str | Path | None = None, *,
            eval_data: str | Path | None = None, teachers: list[str] | None = None,
            state_dicts: list[str | None] | None = None, teacher_args: dict | None = None,
            samples: int = 256, seed: int = 0, device: str = "auto", batch_size: int = 32,
            progress: bool = False, student: str | None = None, trust_run: bool = False,
            source: str | None = None) -> dict:
    """Does the student match the ensemble? A trained run (``logitcache train``) against its cache.

    ``views``: on a seeded sample of the cached training views the run trained on (replayed
    exactly), the student against the ensemble rebuilt from the cache (no teacher needed):
    top1_agreement, kl_mean (KL(rebuilt ensemble || student)), map_vs_ensemble (AP against the
    ensemble's own decisions: its top-1 class, and for sigmoid every class with p >= 0.5),
    student_vs_labels and ensemble_vs_labels (mAP, or top-1 accuracy for softmax, against the
    views' mixed labels).

    ``eval`` (with ``eval_data``, the held-out split, un-augmented clips): student_vs_labels;
    with ``teachers`` they are re-run on the same clips and aggregated as the manifest says, adding
    top1_agreement, kl_mean (KL(ensemble || student), exact: full logits), map_vs_ensemble,
    ensemble_vs_labels and per_class (class, student_ap, ensemble_ap).

    ``epochs``: the run's metrics.jsonl, one dict per epoch (``epoch`` counts from 0 as stored;
    the CLI's tables and the HTML plots number epochs from 1). ``cache`` and ``data`` default to
    the run's own (config.json). Frame-level outputs are compared per frame and scored per clip
    (max over frames).

    A student given as ``module:callable`` in the run's config.json is imported only if
    ``student`` names the same factory or ``trust_run`` is set: a run folder is data, and
    comparing one must not run code it names. Zoo names need neither.
    """
    import json

    from logitcache.device import autocast, resolve_device
    from logitcache.hetero import apply_recorded, coverage, ensemble_logits
    from logitcache.teachers import load_teachers, probe_teachers, run_teachers
    from logitcache.students import check_student_output, flat_positions, load_student
    from logitcache.views import SourceContent, ViewSource, check_compatible

    samples, batch_size = checks.whole("--samples", samples), checks.whole("--batch-size", batch_size)
    seed = checks.seed("--seed", seed)
    run = Path(run)
    if not (run / "config.json").is_file():
        raise LogitCacheError(f"{run}: not a training run (no config.json; runs are made by 'logitcache train')")
    if not (run / "checkpoint.pt").is_file():
        raise LogitCacheError(f"{run}: no checkpoint.pt (the run did not finish an epoch)")
    try:
        config = json.loads((run / "config.json").read_text())
        log = run / "metrics.jsonl"
        epochs_log = [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log.is_file() else []
    except ValueError as e:
        raise LogitCacheError(f"{run}: config.json or metrics.jsonl is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise LogitCacheError(f"{run}/config.json: not a JSON object")
    if "student" not in config:
        raise LogitCacheError(f"{run}/config.json: no 'student' entry")
    student = _run_student(run, config, student, trust_run)
    teachers = list(teachers or [])
    if (state_dicts or teacher_args) and not teachers:
        raise LogitCacheError("--state-dict and --teacher-arg apply to --teacher teachers, and none is given")
    if teachers and eval_data is None:
        raise LogitCacheError("--teacher needs --eval-data: the teachers are re-run on the held-out clips")
    cache = cache or _run_path(run, config, "cache", "--cache")
    data = data or _run_path(run, config, "data", "--data")
    member = config.get("member")
    heads = config["head_members"] if config.get("heads") == "members" else None

    with open_cache(cache) as c:
        m = c.manifest
        kind_given = source
        folder = open_source(data, source or config.get("source"))  # the kind the run trained on
        check_compatible(c, folder)
        kind, C = c.output_kind, len(c.classes)
        # a run trained on a recomposition (train --ensemble) is compared with that recomposition
        comp = requested_composition(c, config.get("ensemble"), config.get("ensemble_weights"),
                                     config.get("aggregation"), config.get("member_weighting"))
        augmenter = Augmenter.from_spec(m["augment"])
        dev = resolve_device(device)
        net = load_student(run, student, C, view_rate(augmenter), c.frames, config, kind, c.position_shape)
        net = net.to(dev)
        check_student_output(net, student, c, augmenter.view_shape, dev,
                             getattr(augmenter, "view_dtype", torch.float32))

        # -- cached training views: a seeded sample of (epoch, position) from the epochs trained on
        stored = [int(e) for e in config.get("stored_epochs", range(c.epochs)) if 0 <= int(e) < c.epochs]
        if not stored:
            raise LogitCacheError(f"{c.path}: none of the run's stored epochs {config.get('stored_epochs')} is in "
                                  f"this cache")
        N = c.num_samples
        rng = np.random.default_rng(seed)
        flat = np.sort(rng.choice(len(stored) * N, size=min(samples, len(stored) * N), replace=False))
        source = ViewSource(folder, augmenter, SourceContent.of_cache(c))
        if folder.modality == "tokens":  # per-token figures over unmasked positions
            views = _token_views(c, net, source, stored, flat, batch_size, dev, kind, comp, member, heads, progress)
        else:
            top1, kl, s_clip, p_clip, y_clip = [], [], [], [], []
            head_pairs = [[] for _ in heads or []]  # per head: (top-1, KL) rows against its own member
            bar = tqdm(total=len(flat), unit="view", desc="compare", disable=not progress, dynamic_ncols=True)
            try:
                for slot in np.unique(flat // N):
                    epoch = stored[int(slot)]
                    pos = flat[flat // N == slot] % N
                    for a in range(0, len(pos), batch_size):
                        index = c.order(epoch)[pos[a:a + batch_size]]
                        ids = [c.ids[i] for i in index]
                        params = c.params(epoch, ids)
                        rows = [{n: v[r] for n, v in params.items()} for r in range(len(ids))]
                        wave = torch.stack([source.replay(i, p) for i, p in zip(index, rows)]).to(dev)
                        with torch.inference_mode(), autocast(dev, "fp32"):
                            zh = net(wave, all_heads=True).float().cpu() if heads else None
                            zs = flat_positions(net(wave).float().cpu()) if zh is None else net.combine(zh)
                        for h, name in enumerate(heads or []):
                            qh = _dense_targets(c, c.targets(epoch, ids, member=name), C, kind)
                            head_pairs[h].append(_student_figures(zh[h].reshape(-1, C), qh.reshape(-1, C), kind))
                        if comp is not None:
                            t = Targets(*recomposed_targets(c, epoch, ids, comp))
                        else:
                            t = c.targets(epoch, ids, member=member)
                        q = _dense_targets(c, t, C, kind)
                        a1, k1 = _student_figures(zs.reshape(-1, C), q.reshape(-1, C), kind)
                        top1.append(a1)
                        kl.append(k1)
                        s_clip.append(_clip_level(zs.numpy()))
                        p_clip.append(_clip_level(q.numpy()))
                        y_clip.append(np.stack([source.labels(i, p) for i, p in zip(index, rows)]))
                        bar.update(len(ids))
            finally:
                bar.close()
            s_all, p_all, y_all = np.concatenate(s_clip), np.concatenate(p_clip), np.concatenate(y_clip)
            views = {"views": int(len(flat)), "epochs": sorted({stored[int(x)] for x in np.unique(flat // N)}),
                     "top1_agreement": float(torch.cat(top1).mean()), "kl_mean": float(torch.cat(kl).mean()),
                     "map_vs_ensemble": _map_vs(s_all, p_all, kind),
                     "student_vs_labels": _label_score(s_all, y_all, kind),
                     "ensemble_vs_labels": _label_score(p_all, y_all, kind)}
            if heads:
                views["heads"] = _head_rows(heads, head_pairs, "member")

        # -- held-out clips, un-augmented; teachers re-run on them when given
        evaluation = None
        if eval_data is not None:
            held = open_source(eval_data, kind_given)
            if held.classes != c.classes:
                raise LogitCacheError(f"{eval_data}: class list differs from the one cache {c.path} was "
                                      f"dumped with")
            loaded = []
            if teachers:
                loaded = load_teachers(teachers, state_dicts, teacher_args, dev)
                apply_recorded(loaded, m)  # each teacher's own rate, clip length and class map, as dumped
                n_classes, frames = probe_teachers(loaded, augmenter.view_shape, dev, kind,
                                                    inputs=getattr(augmenter, "probe_views", None))
                if n_classes != C or frames != c.frames:
                    raise LogitCacheError(f"teachers output C={n_classes} but cache {c.path} holds C={C}")
            if held.modality == "tokens":
                from logitcache.reports.compare_tokens import held_out

                evaluation = held_out(net, held, augmenter, loaded, m, batch_size, dev, heads, eval_data)
            else:
                s_list, e_list = [], []
                # per head against its own re-run teacher, paired by position (the dump's order)
                eval_pairs = [[] for _ in heads or []] if len(loaded) == len(heads or []) else []
                plain = ViewSource(held, augmenter)
                for a in range(0, len(held), batch_size):
                    clips = range(a, min(a + batch_size, len(held)))
                    x = torch.stack([plain.plain(i) for i in clips]).to(dev)
                    with torch.inference_mode():
                        zh = net(x, all_heads=True).float().cpu() if heads else None
                        s_list.append(flat_positions(net(x).float().cpu()) if zh is None else net.combine(zh))
                        if loaded:
                            with autocast(dev, m.get("precision", "fp32")):
                                z = run_teachers(loaded, x, lambda: [held.ids[i] for i in clips])
                            e_list.append(ensemble_logits(z, kind, m["aggregation"], m.get("weights"),
                                                          coverage(loaded)).cpu())
                            for h, got in enumerate(eval_pairs):
                                pt = _probs(z[h].cpu(), kind)
                                got.append(_student_figures(zh[h].reshape(-1, C), pt.reshape(-1, C), kind))
                zs = torch.cat(s_list)
                s_eval = _clip_level(zs.numpy())
                evaluation = {"data": str(eval_data), "clips": len(held), "student_vs_labels": _label_score(
                    s_eval, held.table, kind), "teachers": [t.name for t in loaded]}
                if loaded:
                    ze = torch.cat(e_list)
                    pe = _probs(ze, kind)
                    a1, k1 = _student_figures(zs.reshape(-1, C), pe.reshape(-1, C), kind)
                    e_clip = _clip_level(pe.numpy())
                    s_ap = average_precision(s_eval, held.table) if kind == "multilabel" else None
                    e_ap = average_precision(e_clip, held.table) if kind == "multilabel" else None
                    evaluation.update({
                        "top1_agreement": float(a1.mean()), "kl_mean": float(k1.mean()),
                        "map_vs_ensemble": _map_vs(s_eval, e_clip, kind),
                        "ensemble_vs_labels": _label_score(e_clip, held.table, kind),
                        "per_class": [] if s_ap is None else [
                            {"class": name, "student_ap": None if np.isnan(sa) else float(sa),
                             "ensemble_ap": None if np.isnan(ea) else float(ea)}
                            for name, sa, ea in zip(c.classes, s_ap, e_ap)]})
                    if eval_pairs:
                        evaluation["heads"] = _head_rows([t.name for t in loaded], eval_pairs, "teacher")
        return {
            "run": str(run),
            "student": student,
            "cache": str(c.path),
            "data": str(data),
            "output_kind": kind,
            "modality": folder.modality,  # tokens: every figure is per unmasked position
            "metric": "mAP" if kind == "multilabel" else "top1",
            "targets": (f"members, one head each ({', '.join(heads)})" if heads else
                        f"recomposed {','.join(comp.members)}" if comp else
                        "ensemble" if member is None else f"member {member}"),
            "heads": heads,
            "cache_matches_run": config.get("cache_config_digest") == m.get("config_digest"),
            "checkpoint_epoch": epochs_log[-1].get("epoch") if epochs_log else None,
            "epochs": epochs_log,
            "views": views,
            "eval": evaluation,
        }
