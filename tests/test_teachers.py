"""Teachers: formats loaded as data (.pt2 without running anything, ONNX), factories with
arguments, spec files and fingerprints, option names, and the contract held on every batch
(shapes, finite targets, batch independence, logits rather than probabilities)."""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import torch.nn.functional as F

import logitcache
from logitcache import LogitCacheError
from logitcache.augment import epoch_order, id_hashes
from logitcache.report import fidelity
from logitcache.targets import topk_targets
from logitcache.teachers import file_sha256, load_teacher
from conftest import C, CLIP, CLIP_SECONDS, SR, Boom, assert_one_line_error, labels_csv_ids, stream_views
from test_cli import assert_error, run
from toy_teachers import ToyTeacher


def _dump(data, teachers, out, **kw):
    cfg = dict(epochs=1, topk=3, augment="none", sample_rate=SR, clip_seconds=CLIP_SECONDS, batch_size=4,
               num_workers=0, progress=False)
    return logitcache.dump(data, list(teachers), out, **{**cfg, **kw})


# ---------------------------------------------------------------- tiny teachers used below
class Energies(torch.nn.Module):
    """Log energies of 100 equal slices of the clip, a fixed random linear map to C logits."""

    def __init__(self, seed: int = 0, bn: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter(torch.randn(100, C, generator=g))
        self.bn = torch.nn.BatchNorm1d(100) if bn else None

    def forward(self, x):
        e = x.reshape(x.shape[0], 100, -1).pow(2).mean(-1).add(1e-6).log()
        if self.bn is not None:
            e = self.bn(e[:, :, None].expand(-1, -1, 4))[:, :, 0]
        return e @ self.weight


class BatchStatistics(torch.nn.Module):
    """Normalises with the batch's own statistics inside forward: eval() cannot cure it."""

    def forward(self, x):
        feat = F.batch_norm(x.reshape(x.shape[0], 8, -1), None, None, training=True)
        return feat.pow(2).mean(-1) @ torch.linspace(-1, 1, 8 * C).reshape(8, C)


def batch_statistics():
    return BatchStatistics()


class Probabilities(ToyTeacher):
    softmax = True

    def forward(self, x):
        z = super().forward(x)
        return z.softmax(-1) if self.softmax else z.sigmoid()


def softmax_probs():
    return Probabilities(1, scale=3.0)


def sigmoid_probs():
    t = Probabilities(1, scale=3.0)
    t.softmax = False
    return t


class BreaksOnSilence(ToyTeacher):
    """toy_a, except on a batch holding an all-zero clip (never the probe's noise): ``mode``."""

    mode = ""

    def forward(self, x):
        z = super().forward(x)
        if not (x.abs().amax(-1) == 0).any():
            return z
        if self.mode == "rows":
            return z[1:]
        if self.mode == "classes":
            return torch.cat([z, z[:, :1]], -1)
        if self.mode == "level":
            return z[:, None].expand(-1, 2, -1)
        if self.mode == "raise":
            raise ValueError("boom on silence\nsecond line")
        silent = x.abs().amax(-1) == 0  # "extreme": finite logits whose log-softmax is -inf
        extreme = torch.full_like(z, -3e38)
        extreme[:, 0] = 3e38
        return torch.where(silent[:, None], extreme, z)


def breaks(mode):
    t = BreaksOnSilence(1, scale=3.0)
    t.mode = mode
    return t


def breaks_rows():
    return breaks("rows")


def breaks_classes():
    return breaks("classes")


def breaks_level():
    return breaks("level")


def breaks_raise():
    return breaks("raise")


def breaks_extreme():
    return breaks("extreme")


# ---------------------------------------------------------------- .pt2: data, never code
@pytest.fixture(scope="module")
def legit_pt2(tmp_path_factory) -> Path:
    from logitcache.models import export_model

    return export_model(Energies(3), tmp_path_factory.mktemp("pt2") / "energies.pt2", SR, CLIP)


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy a .pt2 archive entry by entry (torch's own reader and writer), ``edit`` changing the
    dict of entries on the way."""
    from torch.export.pt2_archive import PT2ArchiveReader, PT2ArchiveWriter

    with PT2ArchiveReader(str(src)) as r:
        records = {n: r.read_bytes(n) for n in r.get_file_names() if not n.startswith(".data/") and n != "byteorder"}
    edit(records)
    with PT2ArchiveWriter(str(dst)) as w:
        for name, data in records.items():
            w.write_bytes(name, data)
    return dst


def _flag_pickled_weight(records, marker):
    config = json.loads(records["data/weights/model_weights_config.json"])
    entry = next(iter(config["config"].values()))
    entry["use_pickle"] = True
    records["data/weights/model_weights_config.json"] = json.dumps(config).encode()
    records[f"data/weights/{entry['path_name']}"] = pickle.dumps(Boom(marker))


def _opaque_constant(records, marker):
    records["data/constants/model_constants_config.json"] = json.dumps({"config": {"c": {
        "path_name": "opaque_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}}}).encode()
    records["data/constants/opaque_obj_0"] = pickle.dumps(Boom(marker))


def _sample_inputs(records, marker):
    records["data/sample_inputs/model.pt"] = pickle.dumps(Boom(marker))


def _shape_expression(records, marker):
    text = records["models/model.json"].decode()
    head = f"(__import__('pathlib').Path('{marker}').touch() or 0) + "
    records["models/model.json"] = text.replace('"expr_str": "', '"expr_str": "' + head.replace('"', '\\"'), 1).encode()


def _aoti_library(records, marker):
    records["data/aotinductor/model/model.so"] = b"\x7fELF compiled code"


@pytest.mark.parametrize("plant,entry", [
    (_flag_pickled_weight, "data/weights/weight_0"),
    (_opaque_constant, "data/constants/opaque_obj_0"),
    (_sample_inputs, "data/sample_inputs/model.pt"),
    (_shape_expression, "models/model.json"),
    (_aoti_library, "data/aotinductor/model/model.so"),
], ids=["use_pickle_weight", "opaque_constant", "sample_inputs_pickle", "sympy_expression", "aoti_library"])
def test_pt2_that_would_run_code_is_refused_without_running_it(legit_pt2, dataset, tmp_path, plant, entry):
    marker = tmp_path / "pwned"
    evil = _rewrite(legit_pt2, tmp_path / "evil.pt2", lambda records: plant(records, marker))
    try:
        load_teacher(str(evil))
        message = "loaded"
    except Exception as e:  # noqa: BLE001 (whatever happens, the marker is checked first)
        message = str(e) if isinstance(e, LogitCacheError) else f"{type(e).__name__}: {e}"
    assert not marker.exists(), "loading the archive ran the planted code"
    assert "\n" not in message and message.startswith(f"{evil}: entry {entry}") and "refused" in message, message
    assert_error(run("dump", "--data", dataset, "--teacher", evil, "--out", tmp_path / "o.zarr"), "evil.pt2", entry)
    assert not marker.exists()
    assert not (tmp_path / "o.zarr").exists()


def test_legit_pt2_rewritten_entry_by_entry_still_loads(legit_pt2, tmp_path):
    """The refusals above are about the planted entries, not about the rewriting."""
    copy = _rewrite(legit_pt2, tmp_path / "copy.pt2", lambda records: None)
    x = torch.randn(3, CLIP, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = Energies(3)(x)
        for path in (legit_pt2, copy):
            t = load_teacher(str(path))
            assert t.format == "pt2" and t.sha256 == file_sha256(path)
            torch.testing.assert_close(t.module(x), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- ONNX
def _onnx_teacher(path: Path, batch="batch", frames: int | None = None, seed: int = 0) -> Path:
    """log energies of 100 slices -> linear map, written with onnx.helper (no exporter)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    per = 100 // (frames or 1)
    w = rng.standard_normal((per, C)).astype(np.float32)
    shape = [-1, frames, per] if frames else [-1, 100]
    nodes = [helper.make_node("Reshape", ["x", "slices"], ["s"]),
             helper.make_node("Mul", ["s", "s"], ["sq"]),
             helper.make_node("ReduceMean", ["sq"], ["e"], axes=[2], keepdims=0),
             helper.make_node("Add", ["e", "eps"], ["e1"]),
             helper.make_node("Log", ["e1"], ["le"]),
             helper.make_node("Reshape", ["le", "shape"], ["f"]),
             helper.make_node("MatMul", ["f", "w"], ["logits"])]
    init = [numpy_helper.from_array(np.array([-1, 100, CLIP // 100], np.int64), "slices"),
            numpy_helper.from_array(np.array(1e-6, np.float32), "eps"),
            numpy_helper.from_array(np.array(shape, np.int64), "shape"),
            numpy_helper.from_array(w, "w")]
    out_shape = [batch, frames, C] if frames else [batch, C]
    graph = helper.make_graph(nodes, "energies", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, CLIP])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, out_shape)], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("frames", [None, 5], ids=["clip", "frames"])
def test_onnx_teacher_targets_equal_onnxruntimes_own_topk(dataset, tmp_path, frames):
    import onnxruntime

    model = _onnx_teacher(tmp_path / "energies.onnx", frames=frames)
    out = _dump(dataset, [str(model)], tmp_path / "onnx.zarr", batch_size=5, topk=4, value_dtype="float32",
                augment="strong", aggregation="mean_logit")
    cache = logitcache.open_cache(out)
    assert cache.manifest["teachers"] == [{"name": "energies", "source": str(model), "sha256": file_sha256(model)}]
    assert cache.frames == frames
    views = stream_views(out, dataset, 0).numpy()
    session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    logits = torch.from_numpy(np.concatenate([session.run(None, {"x": v[None]})[0] for v in views]))
    values, indices, stat = topk_targets(logits, 4, "multilabel")
    for member in (None, "energies"):  # one teacher, mean_logit: the ensemble is the member
        t = cache.targets(0, cache.ids, member=member)
        np.testing.assert_array_equal(np.asarray(t.indices).astype(np.int64), indices.numpy())
        np.testing.assert_allclose(np.asarray(t.values), values.numpy(), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(t.stat), stat.numpy(), rtol=1e-5, atol=1e-6)


def test_onnx_with_a_fixed_batch_axis_says_so(dataset, tmp_path):
    model = _onnx_teacher(tmp_path / "fixed.onnx", batch=2)
    with pytest.raises(LogitCacheError) as e:
        _dump(dataset, [str(model)], tmp_path / "o.zarr")
    assert_one_line_error(e, "fixed.onnx", "fixed at 2", "dynamic batch axis")
    assert not (tmp_path / "o.zarr").exists()


def test_onnx_without_onnxruntime_names_the_extra(tmp_path, monkeypatch):
    model = _onnx_teacher(tmp_path / "m.onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(LogitCacheError) as e:
        load_teacher(str(model))
    assert_one_line_error(e, "onnxruntime", "pip install 'logitcache[onnx]'")


# ---------------------------------------------------------------- option names
def test_state_dict_for_a_file_teacher_is_refused_even_if_missing(dataset, tmp_path):
    for teacher, what in [("a.pt2", "a torch.export program"), ("b.onnx", "an ONNX model"),
                          ("c.pt", "a TorchScript file")]:
        want = f"--state-dict x.pt: applies only to package.module:callable teachers; teacher {teacher} is {what}"
        with pytest.raises(LogitCacheError) as e:
            _dump(dataset, ["toy_teachers:toy_a", teacher], tmp_path / "o.zarr", state_dicts=[None, "x.pt"])
        assert str(e.value) == want
        assert_error(run("dump", "--data", dataset, "--teacher", "toy_teachers:toy_a", "--teacher", teacher,
                         "--state-dict", "-", "--state-dict", "x.pt", "--out", tmp_path / "o.zarr"), want)
    with pytest.raises(LogitCacheError) as e:
        _dump(dataset, ["toy_teachers:toy_a"], tmp_path / "o.zarr", state_dicts=["x.pt", "y.pt"])
    assert_one_line_error(e, "2 --state-dict paths for 1 --teacher(s)")


def test_old_spellings_are_hidden_aliases_and_the_api_has_one_name(dataset, tmp_path):
    teachers = ["--teacher", "toy_teachers:toy_a", "--teacher", "toy_teachers:toy_b"]
    state = tmp_path / "a.pt"
    torch.save(ToyTeacher(11, scale=3.0).state_dict(), state)
    common = ["--data", dataset, *teachers, "--epochs", 1, "--topk", 3, "--augment", "none", "--batch-size", 8,
              "--clip-seconds", CLIP_SECONDS, "--workers", 0, "--json"]
    new = run("dump", *common, "--out", tmp_path / "new.zarr", "--ensemble-weight", 3, "--ensemble-weight", 1,
              "--state-dict", state)
    old = run("dump", *common, "--out", tmp_path / "old.zarr", "--teacher-weight", 3, "--teacher-weight", 1,
              "--weights", state)
    assert new.exit_code == 0 and old.exit_code == 0, (new.output, old.output)
    a, b = (logitcache.open_cache(tmp_path / f"{n}.zarr") for n in ("new", "old"))
    assert a.manifest["weights"] == b.manifest["weights"] == [3.0, 1.0]
    assert a.manifest["teachers"] == b.manifest["teachers"]
    assert a.manifest["teachers"][0]["sha256"] != logitcache.open_cache(
        _dump(dataset, ["toy_teachers:toy_a"], tmp_path / "plain.zarr")).manifest["teachers"][0]["sha256"]
    np.testing.assert_array_equal(np.asarray(a.targets(0).values), np.asarray(b.targets(0).values))
    for command in ("dump", "fidelity", "compare"):
        text = run(command, "--help").output
        assert "--state-dict" in text and "--teacher-arg" in text
        assert "--weights" not in text and "--teacher-weight" not in text
    assert "--ensemble-weight" in run("dump", "--help").output
    for call in (lambda: _dump(dataset, ["toy_teachers:toy_a"], tmp_path / "x.zarr", teacher_weights=["w.pt"]),
                 lambda: fidelity(tmp_path / "new.zarr", dataset, ["toy_teachers:toy_a"], teacher_weights=["w.pt"])):
        with pytest.raises(TypeError, match="teacher_weights"):
            call()


# ---------------------------------------------------------------- factories: cwd, arguments, specs
FACTORY_MODULE = '''
import torch

SCALE = {scale}


class Energies(torch.nn.Module):
    def __init__(self, seed, classes=10):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter(torch.randn(100, classes, generator=g) * SCALE)

    def forward(self, x):
        return x.reshape(x.shape[0], 100, -1).pow(2).mean(-1).add(1e-6).log() @ self.weight


def build(seed, classes=10):
    return Energies(seed, classes)


def fails():
    raise RuntimeError("no GPU here\\nmore")
'''


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh current directory holding a factory module that is not on sys.path (as for the
    installed ``logitcache`` script, whose sys.path[0] is its bin folder)."""
    cwd = tmp_path / "work"
    cwd.mkdir()
    name = f"factories_{abs(hash(str(tmp_path))) % 10**8}"
    (cwd / f"{name}.py").write_text(FACTORY_MODULE.format(scale=1.0))
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(cwd), os.getcwd())])
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # edits within a second must be seen
    yield cwd, name
    sys.modules.pop(name, None)


def _factories(cwd: Path, name: str):
    """The workdir's factory module, as the dump imports it (from the current directory)."""
    import importlib

    sys.path.insert(0, str(cwd))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(cwd))


def _logits(model, views: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(v[None]) for v in views])


def test_factory_from_the_current_directory_with_teacher_args(dataset, workdir, legit_pt2):
    cwd, name = workdir
    out = cwd / "run.zarr"
    result = run("dump", "--data", dataset, "--teacher", legit_pt2, "--teacher", f"{name}:build", "--out", out,
                 "--teacher-arg", "seed=3", "--teacher-arg", "classes=10", "--epochs", 1, "--topk", 3,
                 "--augment", "none", "--clip-seconds", CLIP_SECONDS, "--workers", 0, "--value-dtype", "float32")
    assert result.exit_code == 0, result.output
    cache = logitcache.open_cache(out)
    described = cache.manifest["teachers"][1]
    assert described["name"] == "build" and described["kwargs"] == {"seed": 3, "classes": 10}
    module = sys.modules[name]
    want = topk_targets(_logits(module.Energies(3), stream_views(out, dataset, 0)), 3, "multilabel")
    np.testing.assert_allclose(np.asarray(cache.targets(0, cache.ids, member="build").values), want[0].numpy(),
                               rtol=1e-6)


def test_teacher_arg_and_factory_errors_are_one_line(dataset, workdir, legit_pt2, tmp_path):
    _, name = workdir
    cases = [
        ([f"{name}:build"], {"teacher_args": {"seeds": 3}}, ["--teacher-arg seeds: no teacher takes it",
                                                             f"{name}:build takes classes, seed"]),
        ([str(legit_pt2)], {"teacher_args": {"seed": 3}}, ["--teacher-arg seed", "energies.pt2 is not a factory"]),
        ([f"{name}:build"], {}, [f"{name}:build needs seed"]),
        ([f"{name}:fails"], {}, [f"{name}:fails raised RuntimeError: no GPU here"]),
        ([f"{name}:nothing"], {}, [f"{name}:nothing: cannot import", "has no attribute nothing"]),
    ]
    for teachers, kw, needles in cases:
        with pytest.raises(LogitCacheError) as e:
            _dump(dataset, teachers, tmp_path / "o.zarr", **kw)
        assert_one_line_error(e, *needles)
    assert_error(run("dump", "--data", dataset, "--teacher", f"{name}:build", "--teacher-arg", "seed",
                     "--out", tmp_path / "o.zarr"), "--teacher-arg seed: expected KEY=VALUE")
    assert not (tmp_path / "o.zarr").exists()


def test_teacher_spec_file_with_kwargs_and_state_dict(dataset, workdir):
    cwd, name = workdir
    (cwd / "weights").mkdir()
    spec = cwd / "wide.json"
    spec.write_text(json.dumps({"factory": f"{name}:build", "kwargs": {"seed": 1}, "state_dict": "weights/w5.pt"}))
    out = cwd / "spec.zarr"
    with pytest.raises(LogitCacheError) as e:  # the weights file is looked for beside the spec
        _dump(dataset, [str(spec)], out)
    assert_one_line_error(e, str(cwd / "weights" / "w5.pt"), "not found")
    module = _factories(cwd, name)
    torch.save(module.Energies(5).state_dict(), cwd / "weights" / "w5.pt")
    _dump(dataset, [str(spec)], out, value_dtype="float32")
    cache = logitcache.open_cache(out)
    assert [(t["name"], t["kwargs"]) for t in cache.manifest["teachers"]] == [("wide", {"seed": 1})]
    want = topk_targets(_logits(module.Energies(5), stream_views(out, dataset, 0)), 3, "multilabel")
    np.testing.assert_allclose(np.asarray(cache.targets(0, cache.ids, member="wide").values), want[0].numpy(),
                               rtol=1e-6)
    for kw, needles in [({"teacher_args": {"seed": 2}}, ["--teacher-arg seed: ", "wide.json sets it too"]),
                        ({"state_dicts": ["other.pt"]}, ["--state-dict other.pt: ", "wide.json names its own state_dict"])]:
        with pytest.raises(LogitCacheError) as e:
            _dump(dataset, [str(spec)], cwd / "bad.zarr", **kw)
        assert_one_line_error(e, *needles)
    for text, needles in [("{nope", ["wide.json", "not valid JSON"]),
                          ('{"factory": "x:y", "weights": "w.pt"}', ["wide.json", "a teacher spec is"])]:
        spec.write_text(text)
        with pytest.raises(LogitCacheError) as e:
            _dump(dataset, [str(spec)], cwd / "bad.zarr")
        assert_one_line_error(e, *needles)


def test_resume_refuses_a_factory_whose_source_or_weights_changed(dataset, workdir, capsys):
    cwd, name = workdir
    out = cwd / "run.zarr"
    weights = cwd / "w.pt"
    _dump(dataset, [f"{name}:build"], out, teacher_args={"seed": 3})
    first = logitcache.open_cache(out).manifest["teachers"][0]["sha256"]

    # the same factory again: the same fingerprint (resume to 2 epochs is accepted)
    sys.modules.pop(name)
    _dump(dataset, [f"{name}:build"], out, teacher_args={"seed": 3}, epochs=2, resume=True)
    assert logitcache.open_cache(out).manifest["teachers"][0]["sha256"] == first

    # a constant edited in the source: other weights, other source
    (cwd / f"{name}.py").write_text(FACTORY_MODULE.format(scale=2.0))
    sys.modules.pop(name)
    with pytest.raises(LogitCacheError) as e:
        _dump(dataset, [f"{name}:build"], out, teacher_args={"seed": 3}, epochs=3, resume=True)
    assert_one_line_error(e, str(out), "teacher 1 (build: sha256)")
    r = fidelity(out, dataset, [f"{name}:build"], samples=4, teacher_args={"seed": 3})
    assert not r["teachers_match"]
    assert "warning: the teachers given are not the ones" in capsys.readouterr().err

    # the source back as it was, but a state dict with other weights
    (cwd / f"{name}.py").write_text(FACTORY_MODULE.format(scale=1.0))
    sys.modules.pop(name)
    torch.save(_factories(cwd, name).Energies(4).state_dict(), weights)
    with pytest.raises(LogitCacheError) as e:
        _dump(dataset, [f"{name}:build"], out, teacher_args={"seed": 3}, state_dicts=[str(weights)], epochs=3,
              resume=True)
    assert_one_line_error(e, "teacher 1 (build: sha256)")
    assert logitcache.open_cache(out).epochs == 2  # nothing written by the refused runs


def test_fidelity_warns_when_given_other_teachers(strong_cache, dataset, capsys):
    capsys.readouterr()
    r = fidelity(strong_cache, dataset, ["toy_teachers:toy_b", "toy_teachers:toy_a"], samples=4)
    err = capsys.readouterr().err.splitlines()
    assert not r["teachers_match"]
    assert err == [f"warning: the teachers given are not the ones {strong_cache} was dumped with (teacher 1 is "
                   f"toy_b, toy_a was dumped; teacher 2 is toy_a, toy_b was dumped); the figures compare different "
                   f"models"]
    fidelity(strong_cache, dataset, ["toy_teachers:toy_a"], samples=4)
    assert capsys.readouterr().err == (f"warning: the teachers given are not the ones {strong_cache} was dumped "
                                       f"with (1 given, 2 dumped); the figures compare different models\n")
    r = fidelity(strong_cache, dataset, ["toy_teachers:toy_a", "toy_teachers:toy_b"], samples=4)
    assert r["teachers_match"] and capsys.readouterr().err == ""


# ---------------------------------------------------------------- the contract, on every batch
@pytest.fixture
def silent_data(dataset, tmp_path):
    """The dataset with the clip at stored position 13 of epoch 0 silenced (chunk 3 of 4-row chunks)."""
    import shutil

    data = Path(shutil.copytree(dataset, tmp_path / "data"))
    ids = labels_csv_ids(data)
    victim = ids[epoch_order(0, 0, id_hashes(ids))[13]]
    soundfile.write(data / victim, np.zeros(SR, np.float32), soundfile.info(data / victim).samplerate)
    return data, victim, ids


@pytest.mark.parametrize("mode,needles", [
    ("rows", ["teacher breaks_rows returned [3, 10]", "(expected [4, 10])"]),
    ("classes", ["teacher breaks_classes returned [4, 11]", "(expected [4, 10])"]),
    ("level", ["teacher breaks_level returned [4, 2, 10]", "(expected [4, 10])"]),
    ("raise", ["teacher breaks_raise failed on sample(s)", "boom on silence"]),
    ("extreme", ["target set ensemble: NaN/Inf values for sample(s)"]),
])
def test_teacher_contract_is_held_on_every_batch(silent_data, tmp_path, mode, needles):
    data, victim, ids = silent_data
    batch = [ids[i] for i in epoch_order(0, 0, id_hashes(ids))[12:16]]
    out = tmp_path / "bad.zarr"
    with pytest.raises(LogitCacheError) as e:
        # one teacher for "extreme": its finite logits alone make the ensemble's log-probabilities -inf
        others = [] if mode == "extreme" else ["toy_teachers:toy_b"]
        _dump(data, [f"test_teachers:breaks_{mode}", *others], out, chunk_rows=4, topk=C,
              output_kind="multiclass", value_dtype="float32")
    assert_one_line_error(e, *needles, victim if mode in ("raise", "extreme") else batch[0])
    if mode == "raise":
        assert all(i in str(e.value) for i in batch)
    cache = logitcache.open_cache(out)
    done = cache.chunks_done()
    assert done[0, :3].all() and not done[0, 3:].any() and not cache.complete


def test_batch_dependent_teachers_are_refused_at_the_probe(dataset, tmp_path):
    from logitcache.models import export_model

    train_mode = Energies(3, bn=True)
    with torch.no_grad():
        train_mode.bn.running_var.fill_(4.0)
    pt2 = tmp_path / "bn_train.pt2"
    program = torch.export.export(train_mode.train(), (torch.randn(2, CLIP),),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    torch.export.save(program, str(pt2))
    for teacher, name in [("test_teachers:batch_statistics", "batch_statistics"), (str(pt2), "bn_train")]:
        with pytest.raises(LogitCacheError) as e:
            _dump(dataset, ["toy_teachers:toy_a", teacher], tmp_path / "o.zarr")
        assert_one_line_error(e, f"teacher {name}: output for a clip depends on the other clips in its batch",
                              "put it in eval mode (BatchNorm in train mode?)")
    # the same module exported in eval mode is fine
    eval_pt2 = export_model(Energies(3, bn=True), tmp_path / "bn_eval.pt2", SR, CLIP)
    _dump(dataset, [str(eval_pt2)], tmp_path / "ok.zarr")


@pytest.mark.parametrize("factory,kind,what", [("softmax_probs", "multiclass", "sum to 1"),
                                                ("sigmoid_probs", "multilabel", "lie in [0, 1]")])
def test_probabilities_instead_of_logits_warn(dataset, tmp_path, capsys, factory, kind, what):
    out = _dump(dataset, [f"test_teachers:{factory}"], tmp_path / "p.zarr", output_kind=kind)
    # (the synthetic rows carry several labels: the multiclass dump warns about that too)
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning: teacher")]
    assert warnings == [f"warning: teacher {factory}: its output rows all {what} "
                        f"({'softmax' if kind == 'multiclass' else 'sigmoid'} probabilities?); logitcache expects "
                        f"logits, so the stored targets will be wrong unless these are logits"]
    assert logitcache.open_cache(out).complete  # a warning, not an error
    _dump(dataset, ["toy_teachers:toy_a"], tmp_path / "logits.zarr", output_kind=kind)
    assert "warning: teacher" not in capsys.readouterr().err


def test_factory_options_without_a_teacher_to_apply_to(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"student": "cnn_tiny"}))
    (run_dir / "checkpoint.pt").write_bytes(b"")
    for option in (["--teacher-arg", "seed=1"], ["--state-dict", "w.pt"]):
        assert_error(run("compare", run_dir, *option),
                     "--state-dict and --teacher-arg apply to --teacher teachers, and none is given")


def test_onnx_fingerprint_covers_external_weights(tmp_path):
    import onnx

    model = onnx.load(str(_onnx_teacher(tmp_path / "inline.onnx")))
    path = tmp_path / "split.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="split.bin",
              size_threshold=1024)  # the weight matrix, not the small shape constants
    first = load_teacher(str(path)).sha256
    assert first != file_sha256(path) and load_teacher(str(tmp_path / "inline.onnx")).sha256 == file_sha256(
        tmp_path / "inline.onnx")
    data = bytearray((tmp_path / "split.bin").read_bytes())
    data[-1] ^= 1  # one bit of one weight
    (tmp_path / "split.bin").write_bytes(bytes(data))
    assert load_teacher(str(path)).sha256 != first
    (tmp_path / "split.bin").unlink()
    with pytest.raises(LogitCacheError) as e:
        load_teacher(str(path))
    assert_one_line_error(e, "split.onnx", "external data file split.bin not found")
