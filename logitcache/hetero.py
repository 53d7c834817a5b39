"""Teachers that differ from the dataset: their own input rate and clip length, their own classes.

Inputs
    A teacher may declare its ``sample_rate`` (Hz) and ``clip_seconds``: ``--teacher-sample-rate``
    and ``--teacher-clip-seconds`` (API ``teacher_sample_rates=``, ``teacher_clip_seconds=``; one
    per ``--teacher`` in order, None / '-' for the dump's), or the same keys in a teacher .json spec.
    The view is drawn once, at the dump's rate and clip length; each teacher that declares its own
    gets that view, on the device and in float32 outside autocast:

    1. resampled to its rate with the kernel of ``torchaudio.functional.resample`` at its defaults
       (sinc_interp_hann, 6 zero crossings, rolloff 0.99), built once on the CPU so every device
       applies the same kernel, one row at a time (a batched convolution rounds differently with
       the batch size, so a row would depend on its batch-mates). On the CPU each row is bit for
       bit ``torchaudio.functional.resample(view, dump_rate, teacher_rate)``: ceil(L r_t / r)
       samples;
    2. with ``clip_seconds``: its first round(clip_seconds r_t) samples, zero-padded at the end when
       the view is shorter (the view's start stays aligned; nothing new is drawn).

Label spaces
    ``--class-map FILE`` (API ``class_maps=``, one per ``--teacher`` in order, or ``class_map`` in
    a teacher .json spec) is JSON::

        {"teacher_classes": ["Speech", "Dog", "Cat", ...],   # the teacher's outputs, in order
         "map": {"Dog": "dog", "Cat": "cat"}}                 # teacher class -> dataset class

    ``map`` is optional (default: every teacher class whose name is a dataset class). Teacher
    classes not mapped are dropped (softmax: the teacher's distribution conditioned on the mapped
    classes). One-to-one: a name twice, a name outside the teacher's or the dataset's classes, or
    two teacher classes onto one dataset class is refused, and so is a teacher whose output width
    is not ``len(teacher_classes)``. A dataset class the map does not reach is an error unless
    ``--unmapped ignore``: then the teacher is a specialist (Hinton et al. 2015) and contributes
    only to the classes it maps.

    A specialist's own member target set has the dataset's C classes, the ones it does not cover
    at logit :data:`ABSENT_LOGIT` (probability 0 for softmax and sigmoid, finite so every codec
    stores it), and its provenance lists them (``absent_classes``).

    The ensemble, per class c, over the members m that cover c (weights w_m):

    * sigmoid: mean_prob p_c = sum w_m p_mc / sum w_m; mean_logit z_c = sum w_m z_mc / sum w_m.
    * softmax: a specialist's probabilities are conditional on its class set S_m, so they are first
      scaled into the mass that the full-coverage members' own ensemble (same aggregation) gives
      S_m: p'_m(c) = p_m(c | S_m) P_full(S_m). mean_prob averages p'_m(c), mean_logit log p'_m(c),
      over the covering members; the row is then renormalised to sum 1 (a no-op up to rounding
      unless specialists' class sets partly overlap). At least one teacher must cover every class.

    Without specialists this is exactly :func:`logitcache.targets.aggregate`.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from logitcache import checks
from logitcache.errors import LogitCacheError
from logitcache.layout import num_classes
from logitcache.targets import aggregate, stacked

ABSENT_LOGIT = -65504.0  # log 0 as the codecs store it (the float16 floor): a class a teacher does not cover
UNMAPPED = ("error", "ignore")
MAX_RATE = 768_000  # Hz; the highest rate audio hardware uses (a typo's 10^9 would build a huge kernel)
MAP_KEYS = ("teacher_classes", "map")
SPEC_INPUTS = ("sample_rate", "clip_seconds", "class_map")  # what a teacher .json spec may declare


# ---------------------------------------------------------------- inputs
@lru_cache(maxsize=32)
def _kernel(orig: int, new: int, device: torch.device):
    from logitcache.data import _resample_kernel

    gcd, kernel, width = _resample_kernel(orig, new)
    return gcd, kernel.to(device), width


def resample_rows(x: torch.Tensor, orig: int, new: int) -> torch.Tensor:
    """``[B, L]`` at ``orig`` Hz -> ``[B, ceil(L new / orig)]`` at ``new`` Hz, row by row (see module doc)."""
    from torchaudio.functional.functional import _apply_sinc_resample_kernel

    gcd, kernel, width = _kernel(int(orig), int(new), x.device)
    rows = [_apply_sinc_resample_kernel(row, int(orig), int(new), gcd, kernel, width) for row in x]
    return torch.stack(rows)


def fit_length(x: torch.Tensor, samples: int) -> torch.Tensor:
    """The first ``samples`` of each row, zero-padded at the end."""
    x = x[..., :samples]
    return F.pad(x, (0, samples - x.shape[-1])) if x.shape[-1] < samples else x


def clip_samples(clip_seconds: float, rate: int) -> int:
    return int(round(clip_seconds * rate))


def adapt_input(x: torch.Tensor, view_rate: int, rate: int | None,
                clip_seconds: float | None) -> torch.Tensor:
    """A batch of views at ``view_rate`` as a teacher declaring ``rate`` / ``clip_seconds`` takes it."""
    with torch.autocast(x.device.type, enabled=False):  # a half-precision resampler would round the input
        x = x.float()
        rate = rate or view_rate
        if rate != view_rate:
            x = resample_rows(x, view_rate, rate)
        if clip_seconds is not None:
            x = fit_length(x, clip_samples(clip_seconds, rate))
    return x


# ---------------------------------------------------------------- class maps
@dataclass(frozen=True)
class ClassMap:
    """A teacher's outputs on the dataset's classes: ``columns[c]`` is the teacher output that
    dataset class c takes, -1 when the teacher does not cover c."""

    source: str
    sha256: str
    width: int  # the teacher's output classes
    columns: tuple[int, ...]

    @property
    def covered(self) -> list[bool]:
        return [c >= 0 for c in self.columns]

    @property
    def specialist(self) -> bool:
        return min(self.columns) < 0

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        """Teacher logits ``[..., width]`` -> ``[..., C]`` on the dataset's classes."""
        cols = torch.tensor(self.columns, device=z.device)
        out = z.index_select(-1, cols.clamp_min(0))
        return out.masked_fill(cols < 0, ABSENT_LOGIT) if self.specialist else out

    def describe(self) -> dict:
        return {"file": self.source, "sha256": self.sha256, "teacher_classes": self.width,
                "columns": list(self.columns)}

    @classmethod
    def from_record(cls, record: dict, num_classes: int, where: str) -> "ClassMap":
        """A manifest's record (``describe``), checked: a reader must not index with a damaged one."""
        try:
            width, cols = int(record["teacher_classes"]), [int(c) for c in record["columns"]]
        except (KeyError, TypeError, ValueError):
            raise LogitCacheError(f"{where}: class_map record is damaged (expected teacher_classes and "
                                  f"columns)") from None
        used = [c for c in cols if c >= 0]
        fits = used and len(set(used)) == len(used) and max(used) < width and min(cols) >= -1
        if len(cols) != num_classes or not fits:
            raise LogitCacheError(f"{where}: class_map columns do not fit {num_classes} classes of {width} "
                                  f"outputs")
        return cls(str(record.get("file", "")), str(record.get("sha256", "")), width, tuple(cols))


def _no_duplicate_keys(path: str):
    def hook(pairs):
        seen = set()
        for k, _ in pairs:
            if k in seen:
                raise LogitCacheError(f"--class-map {path}: {k!r} is given twice")
            seen.add(k)
        return dict(pairs)
    return hook


def read_class_map(path: str | Path, classes: list[str], unmapped: str = "error") -> ClassMap:
    """The class map in JSON file ``path`` onto the dataset ``classes`` (format: module doc)."""
    path = str(path)
    try:
        data = Path(path).read_bytes()
        doc = json.loads(data, object_pairs_hook=_no_duplicate_keys(path))
    except FileNotFoundError:
        raise LogitCacheError(f"--class-map {path}: file not found") from None
    except (ValueError, UnicodeDecodeError) as e:
        if isinstance(e, LogitCacheError):
            raise
        raise LogitCacheError(f"--class-map {path}: not valid JSON ({str(e).splitlines()[0][:120]})") from None
    teacher, mapping = (doc.get("teacher_classes"), doc.get("map")) if isinstance(doc, dict) else (None, None)
    names = isinstance(teacher, list) and teacher and all(isinstance(c, str) and c for c in teacher)
    pairs = mapping is None or (isinstance(mapping, dict) and all(isinstance(v, str) for v in mapping.values()))
    if not isinstance(doc, dict) or set(doc) - set(MAP_KEYS) or not names or not pairs:
        raise LogitCacheError(f'--class-map {path}: expected {{"teacher_classes": ["name", ...], "map": '
                              f'{{"teacher class": "dataset class", ...}}}} (map optional: by name)')
    twice = sorted({c for c in teacher if teacher.count(c) > 1})
    if twice:
        raise LogitCacheError(f"--class-map {path}: teacher class {twice[0]!r} is listed twice in "
                              f"teacher_classes")
    if mapping is None:
        mapping = {c: c for c in teacher if c in classes}
    position = {c: i for i, c in enumerate(teacher)}
    dataset = {c: i for i, c in enumerate(classes)}
    columns = [-1] * len(classes)
    for src, dst in mapping.items():
        if src not in position:
            raise LogitCacheError(f"--class-map {path}: {src!r} is not one of the teacher's classes "
                                  f"(teacher_classes)")
        if dst not in dataset:
            raise LogitCacheError(f"--class-map {path}: {dst!r} (for teacher class {src!r}) is not a class of the "
                                  f"dataset")
        if columns[dataset[dst]] >= 0:
            raise LogitCacheError(f"--class-map {path}: dataset class {dst!r} is mapped from both "
                                  f"{teacher[columns[dataset[dst]]]!r} and {src!r}")
        columns[dataset[dst]] = position[src]
    missing = [c for c, col in zip(classes, columns) if col < 0]
    if len(missing) == len(classes):
        raise LogitCacheError(f"--class-map {path}: maps none of the dataset's {len(classes)} classes")
    if missing and unmapped != "ignore":
        raise LogitCacheError(f"--class-map {path}: {len(missing)} of the dataset's {len(classes)} classes are not "
                              f"mapped (first: {missing[0]!r}); map them, or give --unmapped ignore to let this "
                              f"teacher contribute only to the classes it maps")
    return ClassMap(path, hashlib.sha256(data).hexdigest(), len(teacher), tuple(columns))


# ---------------------------------------------------------------- configuring loaded teachers
def _per_teacher(option: str, values, n: int) -> list:
    values = list(values or [])
    if len(values) > n:
        raise LogitCacheError(f"{len(values)} {option} values for {n} --teacher(s)")
    return [None if v in ("-", "none", "") else v for v in values] + [None] * (n - len(values))


def _declared(t) -> dict:
    """What a teacher .json spec declares about its inputs and classes (nothing for other formats)."""
    if t.format != "spec":
        return {}
    from logitcache.teacher_factory import read_spec_file

    return dict(read_spec_file(t.source).inputs)


def _one_place(key: str, option: str, given, declared: dict, source: str):
    if given is not None and declared.get(key) is not None:
        raise LogitCacheError(f"{option} {given}: {source} declares its {key} too ({declared[key]}); give it in one "
                              f"place")
    return given if given is not None else declared.get(key)


def configure_teachers(teachers: list, view_rate: int | None, classes: list[str], *, sample_rates=None,
                       clip_seconds=None, class_maps=None, unmapped: str = "error") -> None:
    """Bind each loaded teacher's input rate, clip length and class map (given per teacher in
    ``--teacher`` order, or declared by its .json spec); one-line errors for bad ones."""
    if unmapped not in UNMAPPED:
        raise LogitCacheError(f"--unmapped {unmapped!r}: choose one of {', '.join(UNMAPPED)}")
    n = len(teachers)
    rates = _per_teacher("--teacher-sample-rate", sample_rates, n)
    clips = _per_teacher("--teacher-clip-seconds", clip_seconds, n)
    maps = _per_teacher("--class-map", class_maps, n)
    for t, rate, clip, cmap in zip(teachers, rates, clips, maps):
        declared = _declared(t)
        rate = _one_place("sample_rate", "--teacher-sample-rate", rate, declared, t.source)
        clip = _one_place("clip_seconds", "--teacher-clip-seconds", clip, declared, t.source)
        cmap = _one_place("class_map", "--class-map", cmap, declared, t.source)
        if view_rate is None and (rate, clip) != (None, None):  # image views have no rate or length
            option = "--teacher-sample-rate" if rate is not None else "--teacher-clip-seconds"
            raise LogitCacheError(f"{option}: applies to audio data, and the views are images (teacher {t.name})")
        t.view_rate = None if view_rate is None else int(view_rate)
        try:
            t.sample_rate = checks.optional_whole("--teacher-sample-rate", rate, 1, MAX_RATE)
            t.clip_seconds = checks.optional_real("--teacher-clip-seconds", clip, 0, above=True)
            if t.clip_seconds is not None and clip_samples(t.clip_seconds, t.sample_rate or view_rate) < 1:
                raise LogitCacheError(f"--teacher-clip-seconds {t.clip_seconds:g}: under one sample at "
                                      f"{t.sample_rate or view_rate} Hz")
        except LogitCacheError as e:
            raise LogitCacheError(f"{e} (teacher {t.name})") from None
        t.class_map = read_class_map(cmap, classes, unmapped) if cmap is not None else None


def apply_recorded(teachers: list, manifest: dict) -> None:
    """Give re-run teachers (fidelity, compare) the inputs and class maps the manifest records for
    the teacher at the same position, as the dump ran them."""
    rate = manifest["augment"].get("sample_rate")  # None: image views
    view_rate = None if rate is None else int(rate)
    for t, rec in zip(teachers, manifest.get("teachers") or []):
        t.view_rate, t.sample_rate, t.clip_seconds = view_rate, rec.get("sample_rate"), rec.get("clip_seconds")
        cmap, where = rec.get("class_map"), f"teacher {t.name}"
        t.class_map = ClassMap.from_record(cmap, num_classes(manifest), where) if cmap else None


def coverage(teachers: list) -> torch.Tensor | None:
    """bool ``[M, C]``: which dataset classes each teacher covers; None when every teacher covers all."""
    if not any(t.class_map is not None and t.class_map.specialist for t in teachers):
        return None
    width = next(len(t.class_map.columns) for t in teachers if t.class_map is not None)
    return torch.tensor([[True] * width if t.class_map is None else t.class_map.covered for t in teachers])


def check_specialists(teachers: list, classes: list[str], kind: str, codec: str, topk: int) -> None:
    """Refuse ensembles of specialists whose targets are undefined or that a codec would mangle."""
    cov = coverage(teachers)
    if cov is None:
        return
    if kind == "multiclass" and not cov.all(1).any():
        raise LogitCacheError(f"--unmapped ignore: with --output-kind multiclass at least one teacher must cover "
                              f"every class (its probabilities give each specialist's share of the mass); all "
                              f"{len(teachers)} teachers here are specialists")
    lost = [c for c, hit in zip(classes, cov.any(0).tolist()) if not hit]
    if lost:
        raise LogitCacheError(f"class {lost[0]!r} is covered by no teacher ({len(lost)} such classes; every class "
                              f"needs at least one)")
    if codec == "compact":
        covered, i = min((int(row.sum()), i) for i, row in enumerate(cov))
        t = teachers[i]
        if covered < topk:
            raise LogitCacheError(f"--codec compact: teacher {t.name} covers {covered} classes, fewer than --topk "
                                  f"{topk}; its rows would quantise absent classes with the rest (use --topk "
                                  f"{covered} or --codec topk)")


def absent_classes(t, classes: list[str]) -> list[str]:
    """The dataset classes teacher ``t`` does not cover (stored at ABSENT_LOGIT in its member set)."""
    if t.class_map is None:
        return []
    return [c for c, hit in zip(classes, t.class_map.covered) if not hit]


# ---------------------------------------------------------------- the ensemble
def ensemble_logits(member_logits: list[torch.Tensor] | torch.Tensor, kind: str, method: str = "mean_prob",
                    weights: list[float] | None = None, covered: torch.Tensor | None = None) -> torch.Tensor:
    """Ensemble logits of members that may each cover only some classes (``covered`` bool [M, C],
    None: all); the rules are in the module doc."""
    if covered is None or bool(covered.all()):
        return aggregate(member_logits, kind, method, weights)
    if method not in ("mean_prob", "mean_logit"):
        raise ValueError(f"unknown aggregation {method!r}")
    weights = checks.ensemble_weights(weights, len(member_logits), option="ensemble weights")
    z = stacked(member_logits)  # [M, ..., C]
    M, C = z.shape[0], z.shape[-1]
    w = torch.tensor(weights if weights else [1.0] * M, dtype=torch.float32, device=z.device)
    cov = covered.to(z.device).view(M, *([1] * (z.dim() - 2)), C)
    wc = (w / w.sum()).view(M, *([1] * (z.dim() - 1))) * cov  # [M, ..., C]: 0 where a member is absent
    total = wc.sum(0)
    if kind == "multilabel":
        if method == "mean_logit":
            return (z.masked_fill(~cov, 0.0) * wc).sum(0) / total
        logw = torch.log(wc)  # the per-class normaliser cancels in log p - log(1 - p)
        return torch.logsumexp(F.logsigmoid(z) + logw, 0) - torch.logsumexp(F.logsigmoid(-z) + logw, 0)
    logp = F.log_softmax(z.masked_fill(~cov, -math.inf), dim=-1)  # each member on its own classes
    full = cov.reshape(M, C).all(-1)
    ref = aggregate([member_logits[i] for i in torch.nonzero(full).flatten().tolist()], kind, method,
                    [weights[i] for i in full.nonzero().flatten().tolist()] if weights else None)
    ref = F.log_softmax(ref.float(), dim=-1)
    share = torch.logsumexp(torch.where(cov, ref.unsqueeze(0), -math.inf), dim=-1, keepdim=True)
    share = share.masked_fill(full.view(M, *([1] * (z.dim() - 1))), 0.0)  # a full member keeps its own mass
    logp = logp + share
    if method == "mean_prob":
        out = torch.logsumexp(logp + torch.log(wc), 0) - torch.log(total)
    else:
        out = (logp.masked_fill(~cov, 0.0) * wc).sum(0) / total
    return out - torch.logsumexp(out, -1, keepdim=True)
