"""``.onnx`` teachers, run by onnxruntime (``pip install 'logitcache[onnx]'``).

An ONNX file is a graph and its weights, so loading it runs nothing the file brings along. The
session is wrapped in a ``torch.nn.Module`` that takes and returns torch tensors, so the rest of
logitcache treats it like any other teacher. The fingerprint covers the model file and any
external-data files its tensors point to (large models keep their weights beside the graph).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from logitcache.errors import LogitCacheError
from logitcache.digest import file_sha256
from logitcache.teachers import first_line

INSTALL = "pip install 'logitcache[onnx]'"


def _import():
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise LogitCacheError(f"ONNX teachers need onnxruntime and onnx ({e.name} is not installed): {INSTALL}") from None
    return onnx, onnxruntime


class OnnxTeacher(torch.nn.Module):
    """An onnxruntime session behind ``forward(wave [B, samples]) -> logits`` on ``wave``'s device."""

    def __init__(self, path: Path, session):
        super().__init__()
        self.path, self.session = path, session
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if len(inputs) != 1 or inputs[0].type != "tensor(float)" or len(inputs[0].shape) != 2:
            got = ", ".join(f"{i.name} {i.type} {i.shape}" for i in inputs)
            raise LogitCacheError(f"{path}: a teacher takes one float32 waveform input [batch, samples]; this "
                                  f"model takes {got}")
        if len(outputs) != 1:
            raise LogitCacheError(f"{path}: a teacher has one output (logits); this model has {len(outputs)}: "
                                  f"{', '.join(o.name for o in outputs)}")
        self.input, self.output = inputs[0], outputs[0].name
        self.fixed_batch = self.input.shape[0] if isinstance(self.input.shape[0], int) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fixed_batch is not None and x.shape[0] != self.fixed_batch:
            raise LogitCacheError(f"{self.path}: the batch axis of input '{self.input.name}' is fixed at "
                                  f"{self.fixed_batch}, got a batch of {x.shape[0]}; export the model with a "
                                  f"dynamic batch axis")
        wave = x.detach().float().cpu().contiguous().numpy()
        out = self.session.run([self.output], {self.input.name: wave})[0]
        return torch.from_numpy(out).to(x.device)


def load_onnx(path: Path, device: torch.device) -> tuple[OnnxTeacher, str]:
    """(module, sha256 of the model file and its external data)."""
    onnx, ort = _import()
    if not path.is_file():
        raise LogitCacheError(f"{path}: teacher file not found")
    digest = _fingerprint(path, onnx)
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise LogitCacheError(f"{path}: this onnxruntime has no CUDA provider (install onnxruntime-gpu, "
                                  f"or use --device cpu)")
        providers = [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the same budget torch teachers get
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as e:
        raise LogitCacheError(f"{path}: onnxruntime cannot load it ({first_line(e)})") from None
    if device.type == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        raise LogitCacheError(f"{path}: onnxruntime could not start its CUDA provider (it would run on the CPU)")
    return OnnxTeacher(path, session), digest


def _fingerprint(path: Path, onnx) -> str:
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise LogitCacheError(f"{path}: not an ONNX model ({first_line(e)})") from None
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    external = sorted({e.value for t in _get_all_tensors(model) if uses_external_data(t)
                       for e in t.external_data if e.key == "location"})
    digest = file_sha256(path)
    if not external:
        return digest
    h = hashlib.sha256(digest.encode())
    for name in external:
        if not (path.parent / name).is_file():
            raise LogitCacheError(f"{path}: external data file {name} not found")
        h.update(f"\0{name}\0{file_sha256(path.parent / name)}".encode())
    return h.hexdigest()
