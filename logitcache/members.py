"""Members are first-class: add teachers to a finished cache, drop stored members.

``add_teachers`` runs only the new teachers, on the views the cache already stores (replayed from
the stored parameters), and writes one member target set per teacher with the cache's codec and
options. Its rows are bit-identical to those of a dump that had the teacher from the start: the
same views, the same batches, the same codec, and for ``sampled`` the same per-target-set seeds
(``seed_group``: the teacher's position in the order teachers entered the cache).

The stored ensemble keeps its composition unless the ensemble's own teachers are given too
(``ensemble_teachers``, checked against the stored fingerprints): then every teacher runs and the
ensemble is recomputed exactly, into a staged target set swapped in at the end. Top-k codecs
keep too little of each member to recompute it from the stored members.

Kill safety, as for a dump: every new target set has its own done marker (written after its
chunk is durable), the manifest lists a member only once all of its chunks are written
(``adding`` records an unfinished addition, which the same call continues), and arrays that an
interrupted add or drop leaves behind are listed as ``leftovers`` until the next add or drop
removes them. ``drop_member`` commits a manifest without the member, then removes its arrays
(HDF5: rewrites the file, since HDF5 never gives space back in place).
"""

from __future__ import annotations

import datetime
import queue
import sys
import threading
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from logitcache import checks
from logitcache.augment import Augmenter, view_rate
from logitcache.cache import CacheWriter, _min_free_bytes, _NoLock, _test_kill, open_cache
from logitcache.codecs import target_set_seeds
from logitcache.sources import Source, open_source
from logitcache.device import autocast, resolve_device
from logitcache.errors import LogitCacheError, one_line_worker_errors
from logitcache.pipeline import ChunkRows, Streams, logit_moments
from logitcache.layout import MEMBER_STATS, MOMENTS, PARAMS, Layout, class_names, config_digest, num_classes
from logitcache.lock import DumpLock
from logitcache.storage import cache_location, is_url, open_store
from logitcache.hetero import apply_recorded, configure_teachers, coverage, ensemble_logits
from logitcache.teachers import (Teacher, load_teachers, position_shape, probe_teachers, run_teachers,
                                 teacher_differences)
from logitcache.views import SourceContent, ViewSource, check_compatible

ENSEMBLE = Layout.target_set_of(None)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------- add
def add_teachers(cache: str | Path, data: str | Path, teachers: list[str], *,
                 ensemble_teachers: list[str] | None = None, ensemble_weights: list[float] | None = None,
                 state_dicts: list[str | None] | None = None, teacher_args: dict | None = None,
                 batch_size: int = 32, device: str = "auto", num_workers: int | None = None,
                 threads: int | None = None, progress: bool = True) -> Path:
    """Add ``teachers`` as members of the complete cache ``cache`` dumped from ``data``.

    Only the new teachers run, on every stored view (replayed from its parameters; each source
    file checked against the crc the cache holds). Their target sets get the cache's codec and
    options, and rows bit-identical to a dump that had them from the start when ``batch_size``
    is the dump's (teachers on accelerators are not always batch-invariant).

    ``ensemble_teachers``: the ensemble's teachers, as dumped (same names and fingerprints).
    When given, they run too and the ensemble is recomputed over them and the new teachers
    (``ensemble_weights``: one per teacher of the new ensemble; required when the cache's
    ensemble is weighted). Otherwise the ensemble keeps its composition, and its provenance
    (``target_sets["ensemble"]``) lists the members it does not aggregate.

    ``state_dicts`` go to ``ensemble_teachers`` then ``teachers``, in order. A call killed at any
    point is continued by the same call. Returns the cache path.
    """
    path = _local(cache, "add teachers to")
    batch_size = checks.whole("--batch-size", batch_size)
    num_workers = checks.optional_whole("--workers", num_workers, 0)
    threads = checks.optional_whole("--threads", threads)
    if not teachers:
        raise LogitCacheError("at least one --add-teacher is needed")
    lock = _lock(path)
    try:
        store = open_store(path, "r+")
        try:
            manifest = store.read_manifest()
            _check_addable(path, manifest)
            folder = open_source(data)
            with open_cache(path) as reader:
                check_compatible(reader, folder)
            dev = resolve_device(device)
            plan = _plan(path, manifest, teachers, ensemble_teachers, ensemble_weights, state_dicts, teacher_args,
                         dev)
            if plan is not None:
                _begin(store, manifest, plan)
                _write(store, manifest, plan, folder, dev, batch_size, num_workers, threads, progress)
                _commit(store, manifest)
        finally:
            store.close()
        _sweep(path)
    finally:
        lock.release()
    return path


class _Plan:
    """What an addition runs and writes: ``run`` (teachers in the order they run), ``adding``
    (the manifest's record of the unfinished addition: new teachers, target sets and their
    provenance), and for a recomputed ensemble its teachers and weights."""

    def __init__(self, run: list[Teacher], adding: dict, ensemble: list[str] | None, weights):
        self.run, self.adding, self.ensemble, self.weights = run, adding, ensemble, weights

    @property
    def sets(self) -> dict[str, dict]:
        return self.adding["target_sets"]


def _local(cache, what: str) -> Path:
    path = cache_location(cache)
    if is_url(path):
        raise LogitCacheError(f"{path}: cannot {what} a cache on object storage (no lock, no renames); "
                              f"copy it to a local disk, change it there and copy it back")
    return path


def _lock(path: Path) -> DumpLock:
    if not path.exists():
        raise LogitCacheError(f"{path}: cache not found")
    lock = DumpLock(path).acquire()
    if lock.note:
        print(f"note: {lock.note}", file=sys.stderr)
    return lock


def _check_addable(path: Path, m: dict) -> None:
    if m.get("format_version", 1) < 2:
        raise LogitCacheError(f"{path}: a format-1 cache has no per-target-set provenance, so members cannot be "
                              f"added to it; dump it again with this logitcache")
    if not m.get("complete") and (m.get("adding") or {}).get("phase") != "swap":
        raise LogitCacheError(f"{path}: the cache is not complete (the dump did not finish); finish it with "
                              f"'logitcache dump --resume' before adding teachers")


def _plan(path, m, specs, ensemble_specs, weights, state_dicts, teacher_args, dev) -> _Plan | None:
    """Load and check the teachers; the record of what this addition writes (or the stored one,
    when an unfinished addition of the same teachers is continued; None when every teacher is
    already a member: a re-run after a kill that came after the commit)."""
    ensemble_specs = list(ensemble_specs or [])
    loaded = load_teachers(ensemble_specs + list(specs), state_dicts, teacher_args, dev)
    originals, new = loaded[:len(ensemble_specs)], loaded[len(ensemble_specs):]
    # inputs and class maps: the dumped teachers' as recorded, a new one's as its .json spec declares
    apply_recorded(originals, m)
    configure_teachers(new, view_rate(Augmenter.from_spec(m["augment"])), class_names(m))
    _check_outputs(path, m, loaded, new[0], dev)
    if m.get("adding") is not None:
        return _continued(path, m, m["adding"], loaded, new)
    if originals:
        differences = teacher_differences(m.get("teachers", []), originals)
        if differences:
            raise LogitCacheError(f"--teacher: not the ensemble's teachers of {path} ({'; '.join(differences)}); "
                                  f"give them as dumped to recompute the ensemble, or none to keep it")
    if all(_is_member(m, t) for t in new):
        print(f"note: {path}: {', '.join(t.name for t in new)} already added; nothing to do", file=sys.stderr)
        return None
    known = {t["name"]: t for t in m.get("teachers", [])}
    for t in new:
        _check_name(path, m, t, known)
    joining = [t for t in new if t.name not in known]
    if originals and not joining:
        print(f"note: every added teacher is already in the ensemble of {path}; it is not recomputed",
              file=sys.stderr)
    recompute = bool(originals) and bool(joining)
    ensemble = m["teachers"] + [t.describe() for t in joining] if recompute else None
    weights = _weights(path, m, weights, None if ensemble is None else [d["name"] for d in ensemble])
    adding = {"started": _now(), "phase": "write", "target_sets": _new_sets(m, new, ensemble),
              "new_teachers": [t.describe() for t in new],
              "ensemble": None if ensemble is None else {"teachers": ensemble, "weights": weights}}
    run = (originals if recompute else []) + new
    return _Plan(run, adding, None if ensemble is None else [d["name"] for d in ensemble], weights)


def _check_outputs(path: Path, m: dict, loaded: list[Teacher], first_new: Teacher, dev) -> None:
    """The teachers must output what the cache holds: C classes, at its clip or frame level."""
    aug = Augmenter.from_spec(m["augment"])
    classes, frames = probe_teachers(loaded, aug.view_shape, dev, m["output_kind"],
                                     inputs=getattr(aug, "probe_views", None))
    positions = position_shape(loaded)
    if classes != num_classes(m) or frames != m.get("frames") or positions != m.get("positions"):
        theirs = f"C={classes}" + (f", T={frames}" if frames else ", clip level") + _map_words(positions)
        ours = (f"C={num_classes(m)}" + (f", T={m['frames']}" if m.get("frames") else ", clip level")
                + _map_words(m.get("positions")))
        raise LogitCacheError(f"teacher {first_new.source}: outputs {theirs} but cache {path} holds {ours}")


def _map_words(positions) -> str:
    return f" (a {'x'.join(map(str, positions))} map)" if positions else ""


def _new_sets(m: dict, new: list[Teacher], ensemble: list[dict] | None) -> dict[str, dict]:
    """Write location -> provenance of every target set the addition writes: a member per new
    teacher, and the staged ensemble when it is recomputed (over ``ensemble``, described)."""
    known = [t["name"] for t in m.get("teachers", [])]
    group = _next_seed_group(m)
    sets: dict[str, dict] = {}
    for t in new:
        if t.name in known:  # already in the ensemble (--no-members, or dropped): the group it had
            g = 1 + known.index(t.name)
        else:
            g, group = group, group + 1
        sets[Layout.target_set_of(t.name)] = {
            "teachers": [{"name": t.name, "sha256": t.sha256}], "codec": m["codec"], "added": True,
            "teacher": t.describe(), "seed_group": g, "in_ensemble": t.name in known or ensemble is not None}
    if ensemble is not None:
        sets[Layout.staged(ENSEMBLE)] = {"teachers": [{"name": d["name"], "sha256": d.get("sha256")} for d in ensemble],
                                         "codec": m["codec"], "recomputed": True, "seed_group": 0}
    return sets


def _is_member(m: dict, t: Teacher) -> bool:
    """Whether ``t`` (same name, same fingerprint) is a stored member already."""
    p = (m.get("target_sets") or {}).get(Layout.target_set_of(t.name)) or {}
    return t.name in m.get("members", []) and [x.get("sha256") for x in p.get("teachers", [])] == [t.sha256]


def _check_name(path: Path, m: dict, t: Teacher, known: dict) -> None:
    if t.name in m.get("members", []):
        raise LogitCacheError(f"teacher {t.source}: cache {path} already has a member named {t.name!r}; "
                              f"drop it first ('logitcache members drop') or give the teacher another name")
    if t.name in known and known[t.name].get("sha256") != t.sha256:
        raise LogitCacheError(f"teacher {t.source}: the ensemble of {path} has a teacher named {t.name!r} with "
                              f"another sha256; give the new teacher another name")


def _weights(path: Path, m: dict, weights, ensemble: list[str] | None):
    if ensemble is None:
        if weights:
            raise LogitCacheError("--ensemble-weight: applies only when the ensemble is recomputed (give its "
                                  "teachers with --teacher)")
        return None
    if m.get("weights") and not weights:
        raise LogitCacheError(f"--ensemble-weight: the ensemble of {path} is weighted "
                              f"({', '.join(map(str, m['weights']))}); give one weight per teacher of the new "
                              f"ensemble ({len(ensemble)}: {', '.join(ensemble)})")
    weights = checks.ensemble_weights(weights, len(ensemble))
    return list(map(float, weights)) if weights else None


def _next_seed_group(m: dict) -> int:
    """The seed group of the next teacher to enter the cache: after every teacher that ever did
    (the ensemble's, added and dropped members), so no two target sets share a sampled stream."""
    used = [len(m.get("teachers", []))] + [p.get("seed_group", 0) for p in (m.get("target_sets") or {}).values()]
    used += [p.get("seed_group", 0) for p in m.get("dropped_members") or []]
    return max(used) + 1


def _continued(path: Path, m: dict, stored: dict, loaded: list[Teacher], new: list[Teacher]) -> _Plan:
    """The plan of an unfinished addition, if these are its teachers."""
    want = [(d["name"], d.get("sha256")) for d in stored["new_teachers"]]
    ensemble = stored.get("ensemble")
    if ensemble:
        want = [(d["name"], d.get("sha256")) for d in m["teachers"]] + want
    if [(t.name, t.sha256) for t in (loaded if ensemble else new)] != want:
        names = ", ".join(d["name"] for d in stored["new_teachers"])
        again = " and the ensemble's --teacher (it is being recomputed)" if ensemble else ""
        raise LogitCacheError(f"{path}: an unfinished addition of {names} (started {stored.get('started')}) is there; "
                              f"re-run it with the same --add-teacher{again}, or cancel it with "
                              f"'logitcache members drop {path} NAME'")
    print(f"note: {path}: continuing the addition of {', '.join(d['name'] for d in stored['new_teachers'])}",
          file=sys.stderr)
    run = loaded if ensemble else new
    names = [d["name"] for d in ensemble["teachers"]] if ensemble else None
    return _Plan(run, stored, names, ensemble["weights"] if ensemble else None)


def _stats_path(manifest: dict, ts: str) -> str | None:
    """The per-chunk logit sums of a new member target set, when the cache keeps member statistics
    (so an added member has what a dump that had it from the start has); None otherwise."""
    if manifest.get("member_stats") != MEMBER_STATS or not ts.startswith(Layout.target_set_of("")):
        return None
    return Layout.stats_path(ts[len(Layout.target_set_of("")):])


def _begin(store, manifest: dict, plan: _Plan) -> None:
    """Record the addition, then create its arrays (a kill in between: the next call creates them)."""
    if manifest.get("adding") is None:
        manifest["adding"] = plan.adding
        store.write_manifest(manifest)
    if manifest["adding"]["phase"] != "write":
        return
    layout = Layout(manifest, param_specs={})
    codec_fields = layout.codec.fields()
    E, N, R = layout.spec.epochs, layout.spec.num_samples, layout.spec.chunk_rows
    for ts in plan.sets:
        for f, (dtype, trailing) in codec_fields.items():
            name = Layout.target_path(ts, f)
            if not store.has(name):
                store.create_array(name, (E, N, *trailing), dtype, (1, R, *trailing))
        stats = _stats_path(manifest, ts)
        if stats is not None and not store.has(stats):
            spec = Layout(manifest, param_specs={}).arrays["done"]
            store.create_array(stats, (*spec.shape, len(MOMENTS)), "float64", (1, 1, len(MOMENTS)), compress=False)
        marker = Layout.target_done_path(ts)
        if not store.has(marker):
            store.create_array(marker, layout.arrays["done"].shape, "uint8", (1, 1), compress=False)
    store.flush()


# ---------------------------------------------------------------- the teacher pass
class _Replayed(Dataset):
    """Positions of one stored epoch -> (view replayed from its stored parameters, position)."""

    def __init__(self, source: ViewSource, order: np.ndarray, params: dict[str, np.ndarray]):
        self.source, self.order, self.params = source, order, params

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, pos: int):
        return self.source.replay(self.order[pos], {k: v[pos] for k, v in self.params.items()}), pos


class _SetWriter(CacheWriter):
    """The dump's background chunk writer, on an open store, with one done marker per target set."""

    def __init__(self, store, manifest: dict, markers: list[str], per_chunk: set[str]):
        self.path, self.store, self.manifest, self.lock = store.path, store, manifest, _NoLock()
        self.markers, self.notes = tuple(markers), []
        self._chunk_rows_arrays = set(per_chunk)
        self._min_free = _min_free_bytes()
        self._queue, self._error = queue.Queue(maxsize=4), None
        self._thread = threading.Thread(target=self._run, name="logitcache-writer", daemon=True)
        self._thread.start()


def _write(store, manifest: dict, plan: _Plan, folder: Source, dev, batch_size: int, num_workers, threads,
           progress: bool) -> None:
    """Run the teachers on every view of every chunk not yet marked done in all new target sets."""
    from logitcache.dump import _batching, cpu_threads, default_workers, optimise_teachers, set_threads

    if manifest["adding"]["phase"] != "write":
        return
    markers = [Layout.target_done_path(ts) for ts in plan.sets]
    todo = ~np.logical_and.reduce([store.read(mk).astype(bool) for mk in markers])
    if not todo.any():
        return
    cache = open_cache(store.path)
    optimise_teachers(plan.run, dev, compile=bool(manifest.get("compile")),
                      channels_last=bool(manifest.get("channels_last")))
    num_workers = default_workers(dev) if num_workers is None else num_workers
    source = ViewSource(folder, Augmenter.from_spec(manifest["augment"]), SourceContent.of_cache(cache))
    N, R = cache.num_samples, cache.chunk_rows
    encode = _Encoder(cache, manifest, plan, folder, dev)
    per_chunk = {p for p in (_stats_path(manifest, ts) for ts in plan.sets) if p is not None}
    writer = _SetWriter(store, manifest, markers, per_chunk)
    threads_before = set_threads(cpu_threads(dev, num_workers, threads))
    sizes = np.minimum(R, N - np.arange(todo.shape[1]) * R)
    bar = tqdm(total=int((todo * sizes).sum()), unit="view", desc="add-teacher", disable=not progress,
               dynamic_ncols=True)
    try:
        for epoch in np.flatnonzero(todo.any(1)).tolist():
            block = cache.read_block(epoch, 0, N, targets=False)
            params = {k[len(PARAMS):]: v for k, v in block.items() if k.startswith(PARAMS)}
            loader = DataLoader(_Replayed(source, block["order"], params), num_workers=num_workers,
                                **_batching(todo[epoch], R, N, batch_size), pin_memory=dev.type == "cuda",
                                prefetch_factor=4 if num_workers else None)
            chunks = ChunkRows(writer, epoch, R, N, per_chunk)
            for wave, pos in one_line_worker_errors(loader):
                pos = pos.numpy()
                chunks.add(pos, encode(wave, block["order"][pos], block["seeds"][pos]))
                bar.update(len(pos))
        writer.drain()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
        torch.set_num_threads(threads_before)
        cache.close()


class _Encoder:
    """One batch of views -> the stored rows of every new target set, as the dump makes them: the
    same aggregation, the same codec pass (row-wise: a subset of target sets gets the same bits)
    and, for drawing codecs, each target set's own seed group."""

    def __init__(self, cache, manifest: dict, plan: _Plan, folder: Source, dev):
        self.codec, self.plan, self.folder, self.dev = cache.codec, plan, folder, dev
        self.kind, self.aggregation = manifest["output_kind"], manifest["aggregation"]
        self.precision = manifest.get("precision", "fp32")
        self.sets = list(plan.sets)
        self.groups = np.array([plan.sets[ts]["seed_group"] for ts in self.sets])
        self.stats = {ts: _stats_path(manifest, ts) for ts in self.sets if _stats_path(manifest, ts)}
        self.streams = Streams(dev)  # on CUDA a pinned buffer per batch, kept until its chunk is assembled

    def __call__(self, wave: torch.Tensor, index: np.ndarray, view_seeds: np.ndarray) -> dict[str, np.ndarray]:
        def ids(rows=None) -> list[str]:
            return [self.folder.ids[i] for i in (index if rows is None else index[rows])]

        x = wave.to(self.dev, non_blocking=True)
        streamed = self.folder.modality == "tokens" and Layout.staged(ENSEMBLE) not in self.sets
        with torch.inference_mode():
            if streamed:  # LM members: one teacher, one block of positions at a time (logitcache.lm)
                encoded, moments = self._streamed(x, ids, view_seeds)
            else:
                with autocast(self.dev, self.precision):
                    logits = dict(zip([t.name for t in self.plan.run], run_teachers(self.plan.run, x, ids)))
                for name, z in logits.items():
                    _refuse_bad(name, ~torch.isfinite(z).reshape(z.shape[0], -1).all(dim=1), ids)
                z = torch.stack([self._logits(ts, logits) for ts in self.sets])
                seeds = target_set_seeds(view_seeds, int(self.groups.max()) + 1)[self.groups]
                encoded = self.codec.encode(z, seeds)
            bad_sets = ~self.codec.finite_rows(encoded).reshape(len(self.sets), len(index), -1).all(-1)
            host = self.streams.fetch({"bad_sets": bad_sets, **encoded})
        for ts, row_bad in zip(self.sets, host["bad_sets"]):
            if row_bad.any():
                raise LogitCacheError(f"target set {ts}: NaN/Inf values for sample(s) {', '.join(ids(row_bad)[:5])}")
        stored = self.codec.pack({f: host[f] for f in encoded})
        out = {Layout.target_path(ts, f): a[g] for g, ts in enumerate(self.sets) for f, a in stored.items()}
        for ts, path in self.stats.items():  # the dump's per-view logit sums of this member
            out[path] = (moments[ts] if streamed else logit_moments(self._logits(ts, logits))).cpu().numpy()
        return out

    def _streamed(self, x: torch.Tensor, ids, view_seeds) -> tuple[dict, dict]:
        """(encoded [S, B, L, ...], per-view moments by target set) of member sets only, in bounded memory."""
        from logitcache.lm import encode_members, row_seeds

        by_name = {t.name: t for t in self.plan.run}
        teachers = [by_name[self.plan.sets[ts]["teachers"][0]["name"]] for ts in self.sets]
        seeds = row_seeds(view_seeds, int(self.groups.max()) + 1, x.shape[0], x.shape[1], self.dev)
        bad, encoded, stats = encode_members(teachers, x, ids, self.dev, self.precision, self.codec,
                                             seeds[torch.from_numpy(self.groups)], bool(self.stats))
        for t, rows in zip(teachers, bad):
            _refuse_bad(t.name, rows, ids)
        return encoded, {ts: stats[i] for i, ts in enumerate(self.sets)} if stats is not None else {}

    def _logits(self, ts: str, logits: dict[str, torch.Tensor]) -> torch.Tensor:
        if ts == Layout.staged(ENSEMBLE):
            by_name = {t.name: t for t in self.plan.run}
            return ensemble_logits([logits[n] for n in self.plan.ensemble], self.kind, self.aggregation,
                                   self.plan.weights, coverage([by_name[n] for n in self.plan.ensemble]))
        return logits[self.plan.sets[ts]["teachers"][0]["name"]]


def _refuse_bad(name: str, bad: torch.Tensor, ids) -> None:
    if bad.any():
        raise LogitCacheError(f"teacher {name} produced NaN/Inf logits for sample(s) "
                              f"{', '.join(ids(bad.cpu().numpy())[:5])}")


# ---------------------------------------------------------------- commit
def _commit(store, manifest: dict) -> None:
    """Make the written target sets the cache's: swap a recomputed ensemble in, then one manifest
    write lists the new members (the commit point); markers and the old ensemble become leftovers."""
    adding = manifest["adding"]
    staged = Layout.staged(ENSEMBLE)
    when = _now()
    if adding.get("ensemble"):
        if adding["phase"] == "write":
            # Readers refuse the cache while the ensemble is being swapped (it is briefly absent).
            adding["phase"] = "swap"
            manifest.update(complete=False, leftovers=sorted(set(manifest.get("leftovers") or []) | {"staging"}))
            store.write_manifest(manifest)
            _test_kill("swap")
        store.delete(Layout.target_done_path(staged))
        if store.has(staged):
            if store.has(ENSEMBLE):
                store.rename(ENSEMBLE, f"{staged}.old")
                _test_kill("swap")
            store.rename(staged, ENSEMBLE)
        store.flush()
        new = adding["ensemble"]
        manifest.update(teachers=new["teachers"], weights=new["weights"])
        manifest["target_sets"][ENSEMBLE] = {**adding["target_sets"][staged], "written_at": when}
        manifest["target_sets"][ENSEMBLE].pop("seed_group", None)
    members = [ts for ts in adding["target_sets"] if ts != staged]
    for ts in members:
        manifest["target_sets"][ts] = {**adding["target_sets"][ts], "written_at": when, "added_at": when}
        manifest["members"].append(ts.partition("/")[2])
    _note_ensemble(manifest)
    manifest["leftovers"] = sorted(set(manifest.get("leftovers") or []) | {Layout.target_done_path(ts) for ts in members})
    manifest.pop("adding")
    manifest.update(complete=True, config_digest=config_digest(manifest))
    _test_kill("commit")
    store.write_manifest(manifest)
    store.flush()


def _note_ensemble(m: dict) -> None:
    """Say in the ensemble's provenance which stored members it does not aggregate, and which of
    the teachers it aggregates are no longer stored as members (their contribution stays in it)."""
    p = m["target_sets"][ENSEMBLE]
    inside = {t["name"] for t in p["teachers"]}
    p["excluded_members"] = [n for n in m["members"] if n not in inside]
    p["dropped_members"] = [d["name"] for d in m.get("dropped_members") or [] if d["name"] in inside
                            and d["name"] not in m["members"]]
    for key in ("excluded_members", "dropped_members"):
        if not p[key]:
            p.pop(key)


def _sweep(path: Path) -> None:
    """Remove the arrays an add or drop left behind (``leftovers``), then forget them; HDF5
    rewrites the file when a whole target set goes, so its space is given back."""
    store = open_store(path, "r+")
    try:
        m = store.read_manifest()
        leftovers = m.get("leftovers") or []
        if not leftovers or m.get("adding") is not None:
            return
        m.pop("leftovers")
        if store.name == "hdf5" and any(not n.endswith("/done") for n in leftovers):
            present = [n for n in leftovers if store.has(n)]
            store.close()
            store = None
            from logitcache.storage import Hdf5Store

            Hdf5Store.rewrite_without(path, present, m)
            return
        for name in leftovers:
            store.delete(name)
            _test_kill("sweep")
        store.flush()
        store.write_manifest(m)
    finally:
        if store is not None:
            store.close()


# ---------------------------------------------------------------- drop
def drop_member(cache: str | Path, name: str) -> dict:
    """Remove member ``name`` from ``cache``: its arrays go (the cache shrinks on disk) and the
    manifest stops listing it, in one write before anything is removed, so a kill at any point
    leaves a valid cache. The ensemble keeps the dropped teacher's contribution; its provenance
    says so (``dropped_members``). Dropping a member of an unfinished addition cancels it.

    Returns ``{"dropped", "bytes_before", "bytes_after"}``."""
    from logitcache.reports.inspect import _disk_bytes

    path = _local(cache, "drop members of")
    lock = _lock(path)
    try:
        before = _disk_bytes(path)
        store = open_store(path, "r+")
        try:
            m = store.read_manifest()
            _drop(path, store, m, name)
        finally:
            store.close()
        _sweep(path)
        return {"dropped": name, "bytes_before": before, "bytes_after": _disk_bytes(path)}
    finally:
        lock.release()


def _drop(path: Path, store, m: dict, name: str) -> None:
    ts, adding = Layout.target_set_of(name), m.get("adding")
    if name == ENSEMBLE:
        raise LogitCacheError(f"{path}: the ensemble cannot be dropped (it is the default target set); "
                              f"drop members only")
    if m.get("format_version", 1) < 2:
        raise LogitCacheError(f"{path}: a format-1 cache has no per-target-set provenance; dump it again with "
                              f"this logitcache to drop members")
    if adding is not None:
        if ts in adding["target_sets"] and adding["phase"] == "write":
            _cancel(store, m, ts)
            return
        raise LogitCacheError(f"{path}: an addition of {', '.join(d['name'] for d in adding['new_teachers'])} is "
                              f"unfinished; re-run it to finish it (or drop one of those to cancel it) first")
    if name not in m.get("members", []):
        if ts in (m.get("leftovers") or []):
            return  # dropped already; the sweep removes what a killed drop left
        known = ", ".join(m.get("members") or []) or "none stored"
        raise LogitCacheError(f"{path}: unknown member {name!r} (members: {known})")
    provenance = m["target_sets"].pop(ts, {})
    m["members"].remove(name)
    dumped = [t["name"] for t in m["teachers"]]
    m["dropped_members"] = (m.get("dropped_members") or []) + [{
        "name": name, **{k: v for k, v in provenance.items() if k != "teachers"},
        "sha256": (provenance.get("teachers") or [{}])[0].get("sha256"),
        # kept so a teacher added later draws from a stream of its own (see _next_seed_group)
        "seed_group": provenance.get("seed_group", 1 + dumped.index(name) if name in dumped else 0),
        "dropped_at": _now()}]
    m["leftovers"] = sorted(set(m.get("leftovers") or []) | {ts})
    _note_ensemble(m)
    store.write_manifest(m)  # the commit point: from here on no reader sees the member
    store.flush()
    _test_kill("drop")


def _cancel(store, m: dict, ts: str) -> None:
    """Drop a target set of an unfinished addition; the last one cancels it (and a staged ensemble)."""
    adding = m["adding"]
    adding["target_sets"].pop(ts)
    adding["new_teachers"] = [d for d in adding["new_teachers"] if Layout.target_set_of(d["name"]) != ts]
    gone = [ts]
    if not adding["new_teachers"]:
        gone += list(adding["target_sets"])
        m.pop("adding")
    m["leftovers"] = sorted(set(m.get("leftovers") or []) | set(gone))
    store.write_manifest(m)
    store.flush()


__all__ = ["add_teachers", "drop_member"]
