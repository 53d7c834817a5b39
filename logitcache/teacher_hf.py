"""Hugging Face causal LMs as teachers, from a local folder (``pip install 'logitcache[hf]'``).

``--teacher hf:/path/to/model`` (or the folder itself, when it holds a ``config.json``) loads
``transformers.AutoModelForCausalLM`` from a folder written by ``save_pretrained``. The teacher
maps int64 token ids ``[B, L]`` to the model's ``.logits`` ``[B, L, V]`` like every LM teacher;
it is loaded in float32 and moved to the dump's device (``--precision`` autocasts as for other
teachers), in eval mode, without a KV cache.

A model folder is data, and loading it must not run anything it brings along:

* ``trust_remote_code=False``, and a ``config.json`` naming custom code (``auto_map``) is refused
  before transformers sees it;
* weights load from ``safetensors`` only (``use_safetensors=True``): a folder with pickle weights
  only (``pytorch_model.bin``, ``.pt``, ``.ckpt``) is refused, as unpickling runs code;
* ``local_files_only=True``: the hub is never asked for anything.

The fingerprint covers ``config.json`` and every ``.safetensors`` file (names and contents). The
``transformers`` import happens here, when such a teacher is loaded, never on CLI start.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from logitcache.errors import LogitCacheError
from logitcache.digest import file_sha256
from logitcache.teachers import first_line

PREFIX = "hf:"
INSTALL = "pip install 'logitcache[hf]'"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def is_model_folder(spec: str) -> bool:
    """Whether ``spec`` names a Hugging Face model folder (``hf:`` prefix, or a folder with a config.json)."""
    return spec.startswith(PREFIX) or (Path(spec).is_dir() and (Path(spec) / "config.json").is_file())


class HFCausalLM(torch.nn.Module):
    """``forward(ids [B, L]) -> logits [B, L, V]`` of a transformers causal LM."""

    def __init__(self, model: torch.nn.Module, path: Path):
        super().__init__()
        self.model, self.path = model, path

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dim() != 2 or ids.is_floating_point():
            raise LogitCacheError(f"{self.path}: a causal LM takes int64 token ids [B, L], got {ids.dtype} "
                                  f"{list(ids.shape)}")
        return self.model(input_ids=ids.long(), use_cache=False).logits


def _folder(spec: str) -> Path:
    path = Path(spec[len(PREFIX):] if spec.startswith(PREFIX) else spec)
    if not (path / "config.json").is_file():
        raise LogitCacheError(f"{path}: not a Hugging Face model folder (no config.json; one written by "
                              f"save_pretrained is expected)")
    return path


def _config(path: Path) -> dict:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise LogitCacheError(f"{path / 'config.json'}: not valid JSON ({first_line(e)})") from None
    if not isinstance(config, dict):
        raise LogitCacheError(f"{path / 'config.json'}: not a JSON object")
    if config.get("auto_map"):
        raise LogitCacheError(f"{path / 'config.json'}: names custom model code (auto_map); logitcache does not "
                              f"run code from a model folder (trust_remote_code=False)")
    return config


def _weights(path: Path) -> list[Path]:
    """The folder's safetensors files; one error if it has none (naming the pickle files it holds)."""
    safe = sorted(path.glob("*.safetensors"))
    if safe:
        return safe
    pickled = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickled:
        raise LogitCacheError(f"{path}: holds pickle weights only ({', '.join(pickled[:3])}); logitcache loads "
                              f"safetensors only (unpickling runs code): re-save the model with "
                              f"save_pretrained(safe_serialization=True)")
    raise LogitCacheError(f"{path}: no model weights (*.safetensors) in the folder")


def fingerprint(path: Path, weights: list[Path]) -> str:
    h = hashlib.sha256(file_sha256(path / "config.json").encode())
    for w in weights:
        h.update(f"\0{w.name}\0{file_sha256(w)}".encode())
    return h.hexdigest()


def load_hf(spec: str, device: torch.device) -> tuple[HFCausalLM, str, str]:
    """(module, sha256, name) of the model folder ``spec`` names (see the module doc)."""
    path = _folder(spec)
    _config(path)
    weights = _weights(path)
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise LogitCacheError(f"teacher {spec}: Hugging Face teachers need transformers (not installed): "
                              f"{INSTALL}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=False, use_safetensors=True,
                                                     local_files_only=True)
    except Exception as e:
        raise LogitCacheError(f"{path}: transformers cannot load it as a causal LM ({first_line(e)[:200]})") from None
    model = model.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
    return HFCausalLM(model, path), fingerprint(path, weights), path.name
