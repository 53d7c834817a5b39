"""Students: building one from a zoo name or a ``module:callable`` factory, checking its output
shape against a cache, and loading a trained one from a run folder. Used by train and compare."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from logitcache.cache import Cache
from logitcache.errors import LogitCacheError
from logitcache.heads import from_config
from logitcache.teachers import first_line, flat_positions, load_state_dict  # noqa: F401  (re-exported)


def build_student(spec: str, num_classes: int, sample_rate: int | None, frames: int | None,
                  seed: int = 0, positions: tuple[int, ...] | None = None) -> torch.nn.Module:
    """A zoo name (see ``logitcache.models.list_models``) or ``package.module:callable``.

    Factories receive whichever of ``num_classes``, ``sample_rate``, ``frames`` and ``positions``
    they accept (``sample_rate`` is None for image views; ``positions`` is the cache's ``(H', W')``
    for dense-map targets, else None). A zoo model gets ``positions`` instead of ``frames``.
    """
    from logitcache import models

    torch.manual_seed(seed)
    if ":" not in spec:
        dense = {"frames": None, "positions": tuple(positions)} if positions else {"frames": frames}
        return models.create_model(spec, num_classes=num_classes, sample_rate=sample_rate, **dense)
    from logitcache.teacher_factory import import_callable

    fn = import_callable(spec)  # from sys.path and the current directory, as python -m does
    offered = {"num_classes": num_classes, "sample_rate": sample_rate, "frames": frames,
               "positions": tuple(positions) if positions else None}
    accepted = inspect.signature(fn).parameters
    try:
        model = fn(**{k: v for k, v in offered.items() if k in accepted})
    except TypeError as e:  # e.g. a required argument that is none of the three offered
        raise LogitCacheError(f"{spec}: cannot build the student ({first_line(e)}; it is offered "
                              f"num_classes, sample_rate, frames and positions)") from None
    if not isinstance(model, torch.nn.Module):
        raise LogitCacheError(f"{spec}: returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _shape_words(shape: tuple[int, ...]) -> str:
    if len(shape) == 2:
        return f"[B, C={shape[1]}] (clip level)"
    if len(shape) == 3:
        return f"[B, T={shape[1]}, C={shape[2]}] (frame level)"
    if len(shape) == 4:
        return f"[B, H'={shape[1]}, W'={shape[2]}, C={shape[3]}] (a dense map)"
    return f"{list(shape)} (neither [B, C], [B, T, C] nor [B, H', W', C])"


def check_student_output(model: torch.nn.Module, spec: str, cache: Cache, view_shape: tuple[int, ...] | int,
                         device: torch.device, view_dtype: torch.dtype = torch.float32) -> None:
    """Refuse a student whose output does not have the shape of the cache's targets: a clip-level
    student on frame-level targets (or the reverse), or another class count. The student runs
    once on one all-zero view (``view_shape``, the augmenter's), before any training step."""
    was_training = model.training
    model.eval()
    view_shape = (view_shape,) if isinstance(view_shape, int) else tuple(view_shape)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        try:
            shape = tuple(model(torch.zeros(1, *view_shape, dtype=view_dtype, device=device)).shape)
        except Exception as e:  # an audio student given images, say
            raise LogitCacheError(f"student {spec} cannot take the cache's views [B, "
                                  f"{', '.join(map(str, view_shape))}] ({first_line(e)})") from None
    model.train(was_training)
    C, T, P = len(cache.classes), cache.frames, cache.position_shape
    want = (1, C) if T is None else (1, T, C) if P is None else (1, *P, C)
    if shape != want:
        targets = (f"clip-level targets [B, C={C}]" if T is None else f"frame-level targets [B, T={T}, C={C}]"
                   if P is None else f"dense-map targets [B, {', '.join(map(str, P))}, C={C}] (T={T} positions)")
        raise LogitCacheError(f"student {spec} outputs {_shape_words(shape)} but cache {cache.path} holds {targets}")


def load_student(run_dir: str | Path, student: str, num_classes: int, sample_rate: int,
                 frames: int | None = None, config: dict | None = None,
                 kind: str | None = None, positions: tuple[int, ...] | None = None) -> torch.nn.Module:
    """A trained student from ``run_dir/checkpoint.pt`` (loaded with ``weights_only=True``).

    ``config``: the run's config.json; a run with per-teacher heads (``heads`` "members") gives a
    :class:`~logitcache.heads.HeadsStudent`, combining its heads as ``kind`` (the cache's
    output kind) says."""
    model = build_student(student, num_classes, sample_rate, frames, positions=positions)
    if config is not None and config.get("heads") == "members":
        model = from_config(model, config, num_classes, kind, f"{Path(run_dir) / 'config.json'}")
    model.load_state_dict(load_state_dict(Path(run_dir) / "checkpoint.pt"))
    return model.eval()
