"""Factory teachers: ``package.module:callable`` and teacher spec files. Code the user runs.

A spec file (``teacher.json``) names a factory with its own arguments and weights::

    {"factory": "mymodels:build", "kwargs": {"width": 64}, "state_dict": "build_w64.pt",
     "sample_rate": 32000, "clip_seconds": 10.0, "class_map": "audioset_to_mine.json"}

(``state_dict`` and ``class_map`` relative to the spec file's folder; ``sample_rate``,
``clip_seconds`` and ``class_map``, all optional, declare the teacher's own input and classes:
see :mod:`logitcache.hetero`). Modules are imported from ``sys.path`` and
the current directory (as ``python -m`` does). The fingerprint covers what the built teacher
computes with: the factory and its arguments, every tensor of its state dict once built (and
loaded, so weights set in code count too) and the source file defining the callable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import inspect
import json
import os
import sys
from pathlib import Path

import torch

from logitcache.errors import LogitCacheError
from logitcache.teachers import first_line, load_state_dict, teacher_format

SPEC_KEYS = ("factory", "kwargs", "state_dict", "sample_rate", "clip_seconds", "class_map")


@dataclasses.dataclass(frozen=True)
class FactorySpec:
    factory: str  # package.module:callable
    kwargs: dict = dataclasses.field(default_factory=dict)
    state_dict: str | None = None
    origin: str = ""  # the spec file, when there is one
    inputs: dict = dataclasses.field(default_factory=dict)  # sample_rate, clip_seconds, class_map it declares

    def merged_kwargs(self, given: dict) -> dict:
        both = sorted(set(self.kwargs) & set(given))
        if both:
            raise LogitCacheError(f"--teacher-arg {both[0]}: {self.origin} sets it too; give it in one place")
        return {**self.kwargs, **given}

    def with_state_dict(self, path: str | None) -> "FactorySpec":
        if path and self.state_dict:
            raise LogitCacheError(f"--state-dict {path}: {self.origin} names its own state_dict "
                                  f"({self.state_dict}); give it in one place")
        return dataclasses.replace(self, state_dict=path or self.state_dict)


def read_spec_file(path: str | Path) -> FactorySpec:
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise LogitCacheError(f"{path}: teacher spec file not found") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise LogitCacheError(f"{path}: not valid JSON ({first_line(e)})") from None
    expected = '{"factory": "package.module:callable", "kwargs": {...}, "state_dict": "path"}'
    if not isinstance(doc, dict) or set(doc) - set(SPEC_KEYS) or not isinstance(doc.get("factory"), str):
        raise LogitCacheError(f"{path}: a teacher spec is {expected} (kwargs and state_dict optional; also "
                              f"sample_rate, clip_seconds, class_map)")
    kwargs, state = doc.get("kwargs") or {}, doc.get("state_dict")
    if ":" not in doc["factory"] or not isinstance(kwargs, dict) or not (state is None or isinstance(state, str)):
        raise LogitCacheError(f"{path}: a teacher spec is {expected} (kwargs and state_dict optional)")
    if state:
        state = str(path.parent / state)  # relative to the spec, not to wherever dump runs
    return FactorySpec(doc["factory"], kwargs, state, str(path), _declared_inputs(path, doc))


def _declared_inputs(path: Path, doc: dict) -> dict:
    """The spec's sample_rate, clip_seconds and class_map (relative to the spec), type-checked."""
    rate, clip, cmap = doc.get("sample_rate"), doc.get("clip_seconds"), doc.get("class_map")
    if rate is not None and not (type(rate) is int and rate > 0):
        raise LogitCacheError(f"{path}: sample_rate {rate!r} must be a positive whole number of Hz")
    if clip is not None and not (type(clip) in (int, float) and clip > 0 and clip < float("inf")):
        raise LogitCacheError(f"{path}: clip_seconds {clip!r} must be a positive number of seconds")
    if cmap is not None and not (isinstance(cmap, str) and cmap):
        raise LogitCacheError(f"{path}: class_map {cmap!r} must be the path of a class map file")
    out = {"sample_rate": rate, "clip_seconds": clip, "class_map": str(path.parent / cmap) if cmap else None}
    return {k: v for k, v in out.items() if v is not None}


def parse_teacher_args(items) -> dict:
    """``KEY=VALUE`` strings (the CLI's --teacher-arg) -> dict; VALUE is a JSON literal when it
    parses as one (3, 0.5, true, [1, 2], "3"), else the string itself."""
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.isidentifier():
            raise LogitCacheError(f"--teacher-arg {item}: expected KEY=VALUE (KEY a parameter name)")
        if key in out:
            raise LogitCacheError(f"--teacher-arg {key}: given twice")
        try:
            out[key] = json.loads(text)
        except ValueError:
            out[key] = text
    return out


def route_teacher_args(specs: list[str], teacher_args: dict) -> list[dict]:
    """Per teacher, the ``teacher_args`` its factory's signature takes; an error for an
    argument that no teacher takes."""
    if not teacher_args:
        return [{} for _ in specs]
    params = [_parameters(s) for s in specs]
    for key in teacher_args:
        if not any(p is not None and (key in p or "**" in p) for p in params):
            takes = "; ".join(f"{s} takes {', '.join(sorted(p)) or 'nothing'}" if p is not None
                              else f"{s} is not a factory" for s, p in zip(specs, params))
            raise LogitCacheError(f"--teacher-arg {key}: no teacher takes it ({takes})")
    return [{k: v for k, v in teacher_args.items() if p is not None and (k in p or "**" in p)} for p in params]


def _parameters(spec: str) -> set[str] | None:
    """Keyword parameters of the factory ``spec`` names ("**" if it takes any); None if not a factory."""
    fmt = teacher_format(spec)
    if fmt not in ("factory", "spec"):
        return None
    fn = import_callable(read_spec_file(spec).factory if fmt == "spec" else spec)
    names = set()
    for p in _signature(fn).values():
        if p.kind == p.VAR_KEYWORD:
            names.add("**")
        elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            names.add(p.name)
    return names


def _signature(fn) -> dict:
    try:
        return dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # some builtins have none: call them as given
        return {}


@contextlib.contextmanager
def _cwd_importable():
    """The current directory on sys.path while a factory is imported and called (python -m's rule)."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def import_callable(spec: str, cwd: bool = True):
    """The callable ``package.module:callable`` names, imported from sys.path and (with ``cwd``)
    the current directory."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise LogitCacheError(f"{spec}: expected package.module:callable")
    try:
        with _cwd_importable() if cwd else contextlib.nullcontext():
            obj = importlib.import_module(module_name)
    except ImportError as e:
        where = f"sys.path and {os.getcwd()}" if cwd else "sys.path"
        raise LogitCacheError(f"{spec}: cannot import ({e}; looked on {where})") from None
    except Exception as e:  # the module's own code failed
        raise LogitCacheError(f"{spec}: cannot import: importing {module_name} raised {type(e).__name__}: "
                              f"{first_line(e)}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise LogitCacheError(f"{spec}: cannot import ({module_name} has no attribute {attr})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise LogitCacheError(f"{spec}: {attr} is not callable")
    return obj


def build_factory(spec: FactorySpec, device, kwargs: dict | None = None, cwd: bool = True) -> tuple[torch.nn.Module, str]:
    """(the module ``spec`` builds, loaded and on ``device``; its fingerprint)."""
    kwargs = dict(spec.kwargs if kwargs is None else kwargs)
    where = f"{spec.origin}: " if spec.origin else ""
    fn = import_callable(spec.factory, cwd)
    params = _signature(fn)
    unknown = [k for k in kwargs if k not in params and not any(p.kind == p.VAR_KEYWORD for p in params.values())]
    if unknown:
        raise LogitCacheError(f"{where}{spec.factory} takes no parameter {', '.join(unknown)} "
                              f"(it takes {', '.join(params) or 'none'})")
    missing = [p.name for p in params.values() if p.default is p.empty and p.name not in kwargs
               and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if missing:
        raise LogitCacheError(f"{where}{spec.factory} needs {', '.join(missing)} (give --teacher-arg KEY=VALUE, "
                              f"or kwargs in a teacher .json spec)")
    try:
        with _cwd_importable() if cwd else contextlib.nullcontext():
            model = fn(**kwargs)
    except Exception as e:
        raise LogitCacheError(f"{where}{spec.factory} raised {type(e).__name__}: {first_line(e)}") from None
    if not isinstance(model, torch.nn.Module):
        raise LogitCacheError(f"{where}{spec.factory}: returned {type(model).__name__}, not a torch.nn.Module")
    if spec.state_dict:
        try:
            model.load_state_dict(load_state_dict(spec.state_dict))
        except RuntimeError as e:
            raise LogitCacheError(f"{spec.state_dict}: does not fit {spec.factory} ({first_line(e)})") from None
    return model.to(device), fingerprint(spec.factory, kwargs, model, fn)


def fingerprint(factory: str, kwargs: dict, model: torch.nn.Module, fn) -> str:
    """sha256 of the factory and its arguments, the built module's tensors (by sorted name:
    name, dtype, shape, bytes) and the source file defining ``fn``."""
    h = hashlib.sha256(json.dumps({"factory": factory, "kwargs": kwargs}, sort_keys=True, default=repr).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
        try:
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        except (RuntimeError, TypeError) as e:  # quantized, sparse, ...: no plain bytes to hash
            raise LogitCacheError(f"{factory}: cannot fingerprint tensor {name} ({first_line(e)})") from None
    try:
        source = inspect.getsourcefile(inspect.unwrap(fn))
    except TypeError:  # a builtin or C extension: no source to hash
        source = None
    if source and os.path.isfile(source):
        h.update(b"\0source\0" + Path(source).read_bytes())
    return h.hexdigest()
