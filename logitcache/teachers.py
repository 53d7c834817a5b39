"""Loading teachers, and the contract every teacher is held to.

A teacher maps a float32 view (a waveform ``[B, samples]`` or images ``[B, 3, H, W]``) to logits
``[B, C]`` (clip level), ``[B, T, C]`` (frame level) or ``[B, H', W', C]`` (a dense map, channels
last; stored per position as ``T = H' * W'`` frames in row-major order, see :func:`position_shape`).
Formats, by what loading them runs:

* data, loaded without executing anything from the file: a ``torch.export`` program (``.pt2``,
  see :mod:`logitcache.teacher_pt2`), an ONNX model (``.onnx``, :mod:`logitcache.teacher_onnx`)
  and a Hugging Face causal LM folder (``hf:DIR``, safetensors only, :mod:`logitcache.teacher_hf`);
* code the user must trust: ``package.module:callable`` factories and teacher spec files
  (``teacher.json``, :mod:`logitcache.teacher_factory`), and TorchScript files (their
  ``forward`` is code). Factory state dicts load with ``weights_only=True``.

:func:`probe_teachers` checks the contract once (shapes, batch independence, logits rather
than probabilities); :func:`run_teachers` checks shapes again on every batch.
"""

from __future__ import annotations

import json
import math
import pickle
import sys
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from logitcache.distributed import current_rank
from logitcache.digest import file_sha256
from logitcache.errors import LogitCacheError

TORCHSCRIPT_SUFFIXES = (".pt", ".ts", ".jit", ".torchscript")
# format -> what it is, as error messages say it ("teacher a.pt2 is a torch.export program")
FORMATS = {
    "pt2": "a torch.export program",
    "onnx": "an ONNX model",
    "torchscript": "a TorchScript file",
    "factory": "a package.module:callable factory",
    "spec": "a teacher spec file",
    "hf": "a Hugging Face model folder",
}


@dataclass
class Teacher:
    name: str
    source: str
    module: torch.nn.Module
    sha256: str
    format: str = ""
    kwargs: dict = field(default_factory=dict)
    out_shape: tuple | None = None  # [T,] C or H', W', C; set by probe_teachers and held to on every batch
    # Its own input rate, clip length and classes (logitcache.hetero.configure_teachers); None: the dump's.
    sample_rate: int | None = None
    clip_seconds: float | None = None
    class_map: "ClassMap | None" = None  # noqa: F821 (logitcache.hetero)
    view_rate: int | None = None  # the rate the views are drawn at

    def describe(self) -> dict:
        d = {"name": self.name, "source": self.source, "sha256": self.sha256}
        if self.kwargs:  # JSON as the manifest stores it (an API caller's non-JSON value as its repr)
            d["kwargs"] = json.loads(json.dumps(self.kwargs, default=repr))
        for key in ("sample_rate", "clip_seconds"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        return {**d, "class_map": self.class_map.describe()} if self.class_map is not None else d

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The views ``x`` as this teacher takes them (its own rate and clip length)."""
        if self.sample_rate is None and self.clip_seconds is None:
            return x
        from logitcache.hetero import adapt_input

        return adapt_input(x, self.view_rate, self.sample_rate, self.clip_seconds)

    def outputs(self, z: torch.Tensor) -> torch.Tensor:
        """Its logits on the dataset's classes; a dense map ``[B, H', W', C]`` as ``[B, H' * W', C]``
        (row-major: the positions are stored as frames)."""
        z = flat_positions(z)
        return z if self.class_map is None else self.class_map.apply(z)

    @property
    def mapped_shape(self) -> tuple | None:
        if self.out_shape is None or self.class_map is None:
            return self.out_shape
        return (*self.out_shape[:-1], len(self.class_map.columns))

    @property
    def positions(self) -> tuple | None:
        """(H', W') of a dense output map, else None (clip or frame level)."""
        return self.out_shape[:-1] if self.out_shape is not None and len(self.out_shape) > 2 else None


def flat_positions(z: torch.Tensor) -> torch.Tensor:
    """A dense map ``[B, H', W', C]`` as ``[B, H' * W', C]``, row-major: how a cache stores a map's
    positions (as frames), for teachers and students alike; other shapes as they are."""
    return z.flatten(1, -2) if z.dim() > 3 else z


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:160]


def load_state_dict(path: str | Path) -> dict:
    """A state dict saved with torch.save, loaded with ``weights_only=True`` (no arbitrary pickles)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise LogitCacheError(f"{path}: weights file not found") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile) as e:
        raise LogitCacheError(f"{path}: refused by torch.load(weights_only=True) ({first_line(e)})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a logitcache training checkpoint
    if not isinstance(state, dict):
        raise LogitCacheError(f"{path}: not a state dict")
    return state


def load_factory(spec: str) -> torch.nn.Module:
    """``package.module:callable`` (from sys.path) -> the module it returns, called with no
    arguments; one-line errors. (Teachers load through :func:`load_teacher`.)"""
    from logitcache.teacher_factory import FactorySpec, build_factory

    return build_factory(FactorySpec(spec), "cpu", cwd=False)[0]


def teacher_format(spec: str) -> str | None:
    """The format ``spec`` names (by suffix, else ``module:callable``); None if it names nothing."""
    from logitcache.teacher_hf import is_model_folder

    path = Path(spec)
    suffix = path.suffix.lower()
    if is_model_folder(spec):
        return "hf"
    if suffix in (".pt2", ".onnx"):
        return suffix[1:]
    if suffix == ".json":
        return "spec"
    if suffix in TORCHSCRIPT_SUFFIXES:
        return "torchscript"
    if ":" in spec:
        return "factory"
    return "torchscript" if path.is_file() else None


def load_teacher(spec: str, state_dict: str | None = None, device: torch.device | str = "cpu",
                 kwargs: dict | None = None) -> Teacher:
    """One teacher, in eval mode on ``device``. ``state_dict`` and ``kwargs`` apply to factories
    (``package.module:callable`` or a teacher spec file) only."""
    spec = str(spec)
    fmt, device = teacher_format(spec), torch.device(device)
    if fmt is None:
        raise LogitCacheError(f"{spec}: teacher file not found (or use package.module:callable)")
    if state_dict and fmt not in ("factory", "spec"):
        raise LogitCacheError(f"--state-dict {state_dict}: applies only to package.module:callable teachers; "
                              f"teacher {spec} is {FORMATS[fmt]}")
    if kwargs and fmt not in ("factory", "spec"):
        raise LogitCacheError(f"teacher {spec} is {FORMATS[fmt]}: it takes no arguments ({', '.join(kwargs)})")
    module, digest, name, kwargs = _LOADERS[fmt](spec, device, state_dict, kwargs or {})
    try:
        module.eval()
    except (NotImplementedError, RuntimeError):
        pass  # exported programs have no train/eval switch; probe_teachers catches batch statistics
    return Teacher(name=name, source=spec, module=module, sha256=digest, format=fmt, kwargs=kwargs)


def load_teachers(specs: list[str], state_dicts: list[str | None] | None = None, teacher_args: dict | None = None,
                  device: torch.device | str = "cpu") -> list[Teacher]:
    """The teachers of a dump, fidelity or compare, with unique names.

    ``state_dicts[i]`` (None for none) goes to ``specs[i]``; each ``teacher_args`` entry goes to
    every factory whose signature takes it, and must be taken by at least one."""
    specs = [str(s) for s in specs]
    if not specs:
        raise LogitCacheError("at least one --teacher is needed")
    state_dicts = list(state_dicts or [])
    if len(state_dicts) > len(specs):
        raise LogitCacheError(f"{len(state_dicts)} --state-dict paths for {len(specs)} --teacher(s)")
    state_dicts += [None] * (len(specs) - len(state_dicts))
    from logitcache.teacher_factory import route_teacher_args

    per_teacher = route_teacher_args(specs, dict(teacher_args or {}))
    loaded = [load_teacher(s, w, device, kw) for s, w, kw in zip(specs, state_dicts, per_teacher)]
    unique_names(loaded)
    return loaded


# Per format: (spec, device, state_dict, kwargs) -> (module, sha256, name, kwargs as used)
def _load_pt2(spec: str, device: torch.device, state_dict, kwargs):
    from logitcache.teacher_pt2 import load_program

    program = load_program(spec)
    if device.type != "cpu":
        from torch.export.passes import move_to_device_pass

        program = move_to_device_pass(program, device)
    return program.module(), file_sha256(spec), Path(spec).stem, {}


def _load_onnx(spec: str, device: torch.device, state_dict, kwargs):
    from logitcache.teacher_onnx import load_onnx

    return *load_onnx(Path(spec), device), Path(spec).stem, {}


def _load_torchscript(spec: str, device: torch.device, state_dict, kwargs):
    if not Path(spec).is_file():
        raise LogitCacheError(f"{spec}: teacher file not found")
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated; still accepted as an input
            warnings.simplefilter("ignore")
            module = torch.jit.load(spec, map_location=device)
    except Exception:
        raise LogitCacheError(f"{spec}: not a model (expected a torch.export .pt2, an .onnx model, a TorchScript "
                              f"file, a teacher .json spec or package.module:callable)") from None
    return module, file_sha256(spec), Path(spec).stem, {}


def _load_factory(spec: str, device: torch.device, state_dict, kwargs):
    from logitcache.teacher_factory import FactorySpec, build_factory, read_spec_file

    from_file = teacher_format(spec) == "spec"
    fs = read_spec_file(spec) if from_file else FactorySpec(spec)
    kwargs = fs.merged_kwargs(kwargs)
    module, digest = build_factory(fs.with_state_dict(state_dict), device, kwargs)
    return module, digest, Path(spec).stem if from_file else spec.rpartition(":")[2], kwargs


def _load_hf(spec: str, device: torch.device, state_dict, kwargs):
    from logitcache.teacher_hf import load_hf

    return *load_hf(spec, device), {}


_LOADERS = {"pt2": _load_pt2, "onnx": _load_onnx, "torchscript": _load_torchscript,
            "factory": _load_factory, "spec": _load_factory, "hf": _load_hf}


def unique_names(teachers: list[Teacher]) -> None:
    seen: dict[str, int] = {}
    for t in teachers:
        n = seen.get(t.name, 0)
        seen[t.name] = n + 1
        if n:
            t.name = f"{t.name}_{n + 1}"


# ---------------------------------------------------------------- the contract
def probe_teachers(teachers: list[Teacher], view_shape: tuple[int, ...] | int, device: torch.device,
                   kind: str | None = None, inputs=None) -> tuple[int, int | None]:
    """(num_classes, frames or None) that every teacher agrees on; sets each ``out_shape``.

    ``view_shape`` is the augmenter's (audio ``(samples,)``, image ``(3, H, W)``; an int means
    ``(int,)``). Each teacher runs on a seeded noise clip alone, then in two batches of 3 with different other
    clips: its row must not change (BatchNorm in train mode, say, makes it depend on the others).
    The two batches have the same size because accelerators pick other kernels (TF32 convolutions
    round differently) for other batch sizes; with the size fixed, only the companions differ.
    With ``kind``, a warning when the rows look like probabilities instead of logits. ``inputs``
    (``n -> n`` seeded views) makes the probe views of a modality whose views are not float
    signals (token ids: the augmenter's ``probe_views``)."""
    shape = (view_shape,) if isinstance(view_shape, int) else tuple(view_shape)
    clips = inputs(5) if inputs is not None else \
        0.1 * torch.randn(5, *shape, generator=torch.Generator().manual_seed(0))
    clips = clips.to(device)
    with torch.inference_mode():
        for t in teachers:
            alone, batch, other = (_probe_call(t, x) for x in (clips[:1], clips[:3], clips[[0, 3, 4]]))
            if alone.shape[1:] != batch.shape[1:]:
                raise LogitCacheError(f"teacher {t.source}: output {_shape(alone)} for 1 clip but {_shape(batch)} "
                                      f"for 3")
            t.out_shape = tuple(batch.shape[1:])
            if t.class_map is not None and t.out_shape[-1] != t.class_map.width:
                raise LogitCacheError(f"teacher {t.source}: outputs C={t.out_shape[-1]} classes but its class map "
                                      f"{t.class_map.source} lists {t.class_map.width} teacher_classes")
            _check_batch_independent(t, batch[0].float(), other[0].float())
            if kind:
                _warn_if_probabilities(t, batch.float(), kind)
    shapes = {t.source: t.mapped_shape for t in teachers}
    if not clips.is_floating_point() and len(set(s[-1] for s in shapes.values())) > 1:  # token ids
        raise LogitCacheError("teachers disagree on the vocabulary size: " +
                              ", ".join(f"{k} -> V={v[-1]}" for k, v in shapes.items()))
    if len(set(s[-1] for s in shapes.values())) > 1:
        raise LogitCacheError("teachers disagree on the number of classes: " +
                              ", ".join(f"{k} -> C={v[-1]}" for k, v in shapes.items()))
    if len(set(s[:-1] for s in shapes.values())) > 1:
        raise LogitCacheError("teachers disagree on clip/frame/map level: " +
                              ", ".join(f"{k} -> {_level(v)}" for k, v in shapes.items()))
    shape = teachers[0].mapped_shape
    return shape[-1], (math.prod(shape[:-1]) if len(shape) > 1 else None)


def position_shape(teachers: list[Teacher]) -> list[int] | None:
    """[H', W'] of probed dense-map teachers (their frames are ``H' * W'`` positions, row-major),
    else None. The manifest records it as ``positions``."""
    shape = teachers[0].positions
    return list(shape) if shape is not None else None


def _level(shape: tuple) -> str:
    if len(shape) == 1:
        return "clip"
    return f"T={shape[0]}" if len(shape) == 2 else "map " + "x".join(map(str, shape[:-1]))


def _probe_call(t: Teacher, x: torch.Tensor) -> torch.Tensor:
    x = t.inputs(x)  # the waveform batch it really gets (its own rate and clip length)
    try:
        out = t.module(x)
    except LogitCacheError:
        raise  # already one line naming the teacher's file (an ONNX batch axis, say)
    except Exception as e:
        raise LogitCacheError(f"teacher {t.source}: fails on a [{x.shape[0]}, {x.shape[1]}] waveform batch "
                              f"({first_line(e)})") from None
    if not isinstance(out, torch.Tensor) or out.dim() not in (2, 3, 4) or out.shape[0] != x.shape[0]:
        raise LogitCacheError(f"teacher {t.source}: output {_shape(out)} for a batch of {x.shape[0]} is not "
                              f"[B, C], [B, T, C] or [B, H', W', C] logits")
    return out


def _check_batch_independent(t: Teacher, row: torch.Tensor, same_row: torch.Tensor) -> None:
    if not (torch.isfinite(row).all() and torch.isfinite(same_row).all()):
        return  # non-finite logits are the dump's to report, with the samples that cause them
    scale = max(1.0, float(row.abs().max()))
    diff = (row - same_row).abs()
    if (diff > 1e-5 * scale + 1e-4 * row.abs()).any():
        raise LogitCacheError(f"teacher {t.name}: output for a clip depends on the other clips in its batch "
                              f"(max difference {float(diff.max()):.3g}); put it in eval mode (BatchNorm in train "
                              f"mode?)")


def _warn_if_probabilities(t: Teacher, out: torch.Tensor, kind: str) -> None:
    rows = out.reshape(-1, out.shape[-1])
    if not (torch.isfinite(rows).all() and rows.min() >= 0 and rows.max() <= 1):
        return
    if kind == "multiclass" and not torch.allclose(rows.sum(-1), torch.ones_like(rows[:, 0]), atol=1e-3):
        return
    what = "sum to 1 (softmax probabilities?)" if kind == "multiclass" else "lie in [0, 1] (sigmoid probabilities?)"
    if current_rank() == 0:  # one warning per job, not per rank
        print(f"warning: teacher {t.name}: its output rows all {what}; logitcache expects logits, so the stored "
              f"targets will be wrong unless these are logits", file=sys.stderr)


def run_teachers(teachers: list[Teacher], x: torch.Tensor, sample_ids: Callable[[], list[str]]) -> list[torch.Tensor]:
    """Every teacher's float32 logits on one batch, held to the shape the probe found.

    ``sample_ids()`` names the batch's samples for the one-line error (only called on failure)."""
    out = []
    for t in teachers:
        try:
            z = t.module(t.inputs(x))
        except Exception as e:
            raise LogitCacheError(f"teacher {t.name} failed on sample(s) {_some(sample_ids())}: {first_line(e)}") from None
        expected = (x.shape[0], *t.out_shape) if t.out_shape else None
        if not isinstance(z, torch.Tensor) or (expected and tuple(z.shape) != expected):
            raise LogitCacheError(f"teacher {t.name} returned {_shape(z)} for the batch starting at sample "
                                  f"{sample_ids()[0]} (expected {list(expected or ['B', '...'])}); nothing of "
                                  f"this batch was written")
        out.append(t.outputs(z.float()))
    return out


def teacher_differences(dumped: list[dict], given: list[Teacher]) -> list[str]:
    """How the given teachers differ from a manifest's (count, then names and sha256 by position)."""
    out = [f"{len(given)} given, {len(dumped)} dumped"] if len(dumped) != len(given) else []
    for i, (d, t) in enumerate(zip(dumped, given)):
        if d.get("name") != t.name:
            out.append(f"teacher {i + 1} is {t.name}, {d.get('name')} was dumped")
        elif d.get("sha256") != t.sha256:
            out.append(f"teacher {i + 1} ({t.name}) has another sha256")
    return out


def _shape(x) -> str:
    return str(list(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


def _some(ids: list[str], n: int = 5) -> str:
    return ", ".join(ids[:n]) + (f" (and {len(ids) - n} more)" if len(ids) > n else "")
