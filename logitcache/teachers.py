"""Loading teachers: ``torch.export`` programs (.pt2), TorchScript files, or ``package.module:callable``.

A teacher maps a float32 waveform ``[B, samples]`` to logits ``[B, C]`` (clip level) or
``[B, T, C]`` (frame level). Factory specs run only code the user named on the command line;
``--weights`` state dicts load with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import importlib
import pickle
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from logitcache.errors import LogitCacheError


@dataclass
class Teacher:
    name: str
    source: str
    module: torch.nn.Module
    sha256: str

    def describe(self) -> dict:
        return {"name": self.name, "source": self.source, "sha256": self.sha256}


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_state_dict(path: str | Path) -> dict:
    """A state dict saved with torch.save, loaded with ``weights_only=True`` (no arbitrary pickles)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise LogitCacheError(f"{path}: weights file not found") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile) as e:
        raise LogitCacheError(f"{path}: refused by torch.load(weights_only=True) ({str(e).splitlines()[0][:160]})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a logitcache training checkpoint
    if not isinstance(state, dict):
        raise LogitCacheError(f"{path}: not a state dict")
    return state


def load_factory(spec: str) -> torch.nn.Module:
    """``package.module:callable`` -> the module it returns (called with no arguments)."""
    module_name, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise LogitCacheError(f"{spec}: cannot import ({e})") from None
    model = fn()
    if not isinstance(model, torch.nn.Module):
        raise LogitCacheError(f"{spec}: returned {type(model).__name__}, not a torch.nn.Module")
    return model


def load_teacher(spec: str, weights: str | None = None, device: torch.device | str = "cpu") -> Teacher:
    path = Path(spec)
    if path.suffix == ".pt2":
        if not path.is_file():
            raise LogitCacheError(f"{spec}: teacher file not found")
        try:
            program = torch.export.load(str(path))
        except Exception as e:
            raise LogitCacheError(f"{spec}: not a torch.export program ({str(e).splitlines()[0][:160]})") from None
        if torch.device(device).type != "cpu":
            from torch.export.passes import move_to_device_pass

            program = move_to_device_pass(program, torch.device(device))
        module, digest = program.module(), file_sha256(path)
    elif path.suffix in (".pt", ".ts", ".jit", ".torchscript") or path.is_file():
        if not path.is_file():
            raise LogitCacheError(f"{spec}: teacher file not found")
        try:
            with warnings.catch_warnings():  # TorchScript is deprecated; still accepted as an input
                warnings.simplefilter("ignore")
                module = torch.jit.load(str(path), map_location=device)
        except Exception:
            raise LogitCacheError(
                f"{spec}: not a model (expected a torch.export .pt2, a TorchScript file or package.module:callable)"
            ) from None
        digest = file_sha256(path)
    elif ":" in spec:
        module = load_factory(spec)
        digest = hashlib.sha256(spec.encode()).hexdigest()
        if weights:
            try:
                module.load_state_dict(load_state_dict(weights))
            except RuntimeError as e:
                raise LogitCacheError(f"{weights}: does not fit {spec} ({str(e).splitlines()[0][:160]})") from None
            digest = file_sha256(weights)
        module = module.to(device)
    else:
        raise LogitCacheError(f"{spec}: teacher file not found (or use package.module:callable)")
    try:
        module.eval()
    except (NotImplementedError, RuntimeError):
        pass  # exported programs have no train/eval switch; they are traced in eval mode
    name = path.stem if path.suffix else spec.rpartition(":")[2]
    return Teacher(name=name, source=spec, module=module, sha256=digest)


def unique_names(teachers: list[Teacher]) -> None:
    seen: dict[str, int] = {}
    for t in teachers:
        n = seen.get(t.name, 0)
        seen[t.name] = n + 1
        if n:
            t.name = f"{t.name}_{n + 1}"
