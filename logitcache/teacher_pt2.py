"""``.pt2`` teachers: torch.export programs, loaded as data.

``torch.export.load`` is not safe on its own for a file from elsewhere: it unpickles payload
entries flagged ``use_pickle`` (and, on a failed weights-only load, the sample inputs) with
``weights_only=False``, ``pickle.loads`` opaque constants, evaluates every symbolic-shape
expression of the program with ``sympy.sympify`` (which is ``eval``), and loads AOTInductor
shared libraries shipped in the archive. So the archive is read first, with torch's own reader
(the one the loader uses, so both see the same entries), and refused with one line naming the
file and entry when any of that would happen; the load itself then runs with every
``torch.load`` forced to ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import re
import warnings
import zipfile
from pathlib import Path

import torch

from logitcache.errors import LogitCacheError
from logitcache.teachers import first_line

# What a torch.export.save archive holds; anything else (AOTInductor code, executorch, ...) is refused.
_PLAIN = re.compile(r"(archive_format|archive_version|byteorder|\.data/.*|models/[^/]+\.json|extra/.*|"
                    r"data/(weights|constants|sample_inputs)/[^/]+)$")
_PICKLES = re.compile(r"data/(sample_inputs|weights|constants)/[^/]+\.pt$")  # torch.load'ed as a whole
_PAYLOAD_CONFIG = re.compile(r"data/(weights|constants)/.+_(weights|constants)_config\.json$")


def load_program(path: str | Path, extra_files: dict | None = None):
    """The ExportedProgram in a ``.pt2`` file, after :func:`check_archive`. One-line errors."""
    path = Path(path)
    if not path.is_file():
        raise LogitCacheError(f"{path}: file not found")
    check_archive(path)
    try:
        with _weights_only_torch_load(), _quiet_torch_export():
            return torch.export.load(str(path), extra_files=extra_files)
    except Exception as e:  # a damaged archive raises assorted internal errors
        raise LogitCacheError(f"{path}: not a torch.export program ({first_line(e)})") from None


def check_archive(path: str | Path) -> None:
    """Refuse a ``.pt2`` whose loading would import, unpickle or evaluate anything."""
    from torch.export.pt2_archive import PT2ArchiveReader

    if not zipfile.is_zipfile(path):
        raise LogitCacheError(f"{path}: not a torch.export program (not a zip archive)")
    try:
        reader = PT2ArchiveReader(str(path))
        names = reader.get_file_names()
    except Exception as e:
        raise LogitCacheError(f"{path}: not a torch.export program (not a .pt2 archive written by "
                              f"torch.export.save: {first_line(e)})") from None
    for name in names:
        if not _PLAIN.match(name):
            what = "compiled AOTInductor code" if name.startswith("data/aotinductor/") else "not part of a program"
            raise LogitCacheError(f"{path}: entry {name}: {what}; refused (a .pt2 teacher is loaded as data only)")
    for name in names:
        if _PAYLOAD_CONFIG.match(name):
            _check_payload_config(path, name, _read_json(reader, path, name))
        elif _PICKLES.match(name):
            _check_weights_only(path, name, reader.read_bytes(name))
        elif name.startswith("models/"):
            _check_expressions(path, name, _read_json(reader, path, name))


def _check_payload_config(path, name: str, config) -> None:
    folder = name.rpartition("/")[0]
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise LogitCacheError(f"{path}: entry {name}: not a payload config")
    for fqn, meta in entries.items():
        file = meta.get("path_name", "") if isinstance(meta, dict) else ""
        if not isinstance(meta, dict) or meta.get("use_pickle") or not re.fullmatch(r"(weight|tensor)_\d+", file):
            raise LogitCacheError(f"{path}: entry {folder}/{file or '?'} ({fqn}) is a pickled object that "
                                  f"torch.export.load would unpickle; refused (a .pt2 teacher is loaded as data only)")


def _check_weights_only(path, name: str, data: bytes) -> None:
    try:
        with warnings.catch_warnings():  # about pickle protocols; the verdict is what counts
            warnings.simplefilter("ignore")
            torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise LogitCacheError(f"{path}: entry {name} is a pickle that torch.load(weights_only=True) refuses "
                              f"({first_line(e)}); refused") from None


# A symbolic-shape expression as torch.export writes it (sympy's srepr), e.g.
# "Mul(Integer(16000), Symbol('s51', positive=True, integer=True))". Only names of sympy classes,
# symbols like s51 / u0 and numbers: no attribute access, no other strings, so sympify runs no code.
_TOKEN = re.compile(r"\s*(?:([A-Za-z_]\w*)|'([^'\\]*)'|(\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)|([-+*/%(),=<>!&|~^]))")
_SYMBOL = re.compile(r"[a-z]+\d+")
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|[-+]?inf|nan")


@functools.lru_cache(maxsize=1)
def _allowed_names() -> frozenset[str]:
    import sympy
    from sympy.core.assumptions import _assume_defined

    import torch.utils._sympy.functions as fns

    def classes(module):
        return {n for n in dir(module) if isinstance(getattr(module, n), type) and issubclass(getattr(module, n), sympy.Basic)}

    return frozenset(classes(sympy) | classes(fns) | set(_assume_defined) |
                     {"True", "False", "None", "oo", "zoo", "nan", "pi", "E", "evaluate", "precision"})


def _check_expressions(path, name: str, doc) -> None:
    allowed = _allowed_names()
    for expr in _expr_strings(doc):
        pos, end = 0, len(expr.rstrip())
        while pos < end:
            m = _TOKEN.match(expr, pos)
            ident, text = (m.group(1), m.group(2)) if m else (None, None)
            if (m is None or (ident is not None and ident not in allowed and not _SYMBOL.fullmatch(ident))
                    or (text is not None and not (_SYMBOL.fullmatch(text) or _NUMBER.fullmatch(text)))):
                raise LogitCacheError(f"{path}: entry {name}: the shape expression {expr[:60]!r} is not plain "
                                      f"arithmetic; refused (torch.export.load would evaluate it as Python)")
            pos = m.end()


def _expr_strings(doc):
    stack = [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "expr_str":
                    yield value if isinstance(value, str) else repr(value)
                else:
                    stack.append(value)
        elif isinstance(node, list):
            stack.extend(node)


def _read_json(reader, path, name: str):
    try:
        return json.loads(reader.read_bytes(name))
    except ValueError as e:
        raise LogitCacheError(f"{path}: entry {name} is not valid JSON ({e})") from None


@contextlib.contextmanager
def _weights_only_torch_load():
    """Every torch.load inside the block is weights-only, whatever its caller asks for
    (belt and braces behind :func:`check_archive`)."""
    keys = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _quiet_torch_export():
    """torch.export.load logs a traceback before re-raising; the caller reports one line instead."""
    logger = logging.getLogger("torch.export")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)

