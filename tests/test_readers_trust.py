"""Readers trust nothing they did not check (issue 9): a missing chunk, a chunk failing its
checksum, a manifest edited after the dump or not a JSON object, a student that cannot fit the
targets, and code named in a run folder are refused with one line, never read or run silently."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import h5py
import pytest
import zarr
from click.testing import CliRunner

import logitcache
from conftest import C, N_CLIPS, assert_one_line_error, flip_byte
from logitcache.cli.main import main
from logitcache.errors import LogitCacheError
from logitcache.report import compare, fidelity, inspect_cache, verify_cache
from logitcache.train import train

R = 8  # rows per chunk: three chunks per epoch of the 24 test clips
TEACHERS = ["toy_teachers:toy_a", "toy_teachers:toy_b"]
DAMAGED = "the cache is damaged ('logitcache verify' lists every problem)"

# A student factory module that leaves a marker file next to itself whenever it is imported.
STUDENTS = '''
import pathlib

pathlib.Path(__file__).with_name("imported.marker").write_text("imported")

from logitcache import models


def student(num_classes, sample_rate, frames):
    return models.create_model("cnn_tiny", num_classes=num_classes, sample_rate=sample_rate, frames=frames)


def clip_student(num_classes, sample_rate):
    return models.create_model("cnn_tiny", num_classes=num_classes, sample_rate=sample_rate)


def frame_student(num_classes, sample_rate):
    return models.create_model("cnn_tiny", num_classes=num_classes, sample_rate=sample_rate, frames=7)
'''


@pytest.fixture(scope="module")
def chunked(dumper):
    """The default test cache (strong augmentation, multiclass, k = C) in 8-row chunks."""
    return dumper(chunk_rows=R)


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    return dst


def _edit_manifest(path: Path, edit) -> None:
    """Replace the manifest of a zarr cache by ``edit(manifest)`` (any JSON value)."""
    group = zarr.open_group(str(path), mode="r+")
    group.attrs["logitcache"] = edit(dict(group.attrs["logitcache"]))


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _assert_one_line_cli(result, *needles: str) -> None:
    """Exit 1, nothing on stdout, one ``error:`` line last on stderr (progress bars may come before it)."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.stdout == ""
    lines = [ln for ln in result.stderr.replace("\r", "\n").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    for n in needles:
        assert n in errors[0], (n, errors[0])


# ---------------------------------------------------------------- missing chunks
def test_verify_names_a_missing_ids_chunk(chunked, tmp_path):
    path = _copy(chunked, tmp_path)
    (path / "ids/offsets/c/0").unlink()
    assert verify_cache(path)["problems"] == ["ids/offsets: chunk 0 missing from storage (reads back as fill value 0)"]
    with pytest.raises(LogitCacheError) as e:
        logitcache.open_cache(path).ids
    assert str(e.value) == f"{path}: chunk 0 of array ids/offsets is missing; {DAMAGED}"


def test_training_refuses_a_missing_chunk(chunked, dataset, tmp_path):
    """Read anyway, a deleted chunk file comes back as zeros without an error: training and random
    access refuse it, naming array, chunk and epoch."""
    path = _copy(chunked, tmp_path)
    (path / "ensemble/values/c/0/1/0").unlink()  # epoch 0, chunk 1
    message = f"{path}: chunk 1 of array ensemble/values (epoch 0) is missing; {DAMAGED}"
    with pytest.raises(LogitCacheError) as e:
        train(path, dataset, "cnn_tiny", tmp_path / "run", epochs=1, batch_size=8, progress=False)
    assert str(e.value) == message

    cache = logitcache.open_cache(path)
    assert cache.targets(1, cache.ids).values.shape == (N_CLIPS, C)  # the other epoch still reads
    with pytest.raises(LogitCacheError) as e:
        cache.targets(0, cache.ids[:3])
    assert str(e.value) == message
    (path / "params/gain.db/c/1/2").unlink()
    with pytest.raises(LogitCacheError) as e:
        cache.params(1, cache.ids)
    assert str(e.value) == f"{path}: chunk 2 of array params/gain.db (epoch 1) is missing; {DAMAGED}"


def test_an_unwritten_chunk_of_an_unfinished_cache_is_named(chunked, tmp_path):
    path = _copy(chunked, tmp_path)
    _edit_manifest(path, lambda m: {**m, "complete": False})
    group = zarr.open_group(str(path), mode="r+")
    group["done"][1, 2] = 0
    (path / "ensemble/stat/c/1/2").unlink()
    cache = logitcache.open_cache(path)
    with pytest.raises(LogitCacheError) as e:
        cache.targets(1)
    assert_one_line_error(e, str(path), "chunk 2 of epoch 1 is not written yet", "did not finish")


# ---------------------------------------------------------------- chunks failing their checksum
def _damage(kind: str, path: Path) -> str:
    """Damage chunk 2 of epoch 0 of ensemble/values; returns the reason a read of it gives."""
    if kind == "hdf5":
        with h5py.File(path, "r") as f:
            info = f["ensemble/values"].id.get_chunk_info_by_coord((0, 2 * R, 0))
        flip_byte(path, info.byte_offset + info.size // 2)
        return "filter returned failure"  # HDF5's fletcher32 filter
    chunk = path / "ensemble/values/c/0/2/0"
    if kind == "zarr-truncated":
        chunk.write_bytes(chunk.read_bytes()[:7])
    else:
        flip_byte(chunk, chunk.stat().st_size // 2)
    return "crc32c checksum mismatch"


@pytest.mark.parametrize("kind,workers", [("zarr", 1), ("zarr-truncated", 0), ("hdf5", 0)])
def test_a_chunk_failing_its_checksum_stops_training_with_one_line(dumper, dataset, tmp_path, kind, workers):
    path = _copy(dumper(chunk_rows=R, suffix=".h5" if kind == "hdf5" else ".zarr"), tmp_path)
    reason = _damage(kind, path)
    where = f"{path}: chunk 2 of array ensemble/values (epoch 0) cannot be read ("
    with pytest.raises(LogitCacheError) as e:
        train(path, dataset, "cnn_tiny", tmp_path / "run", epochs=1, batch_size=8, num_workers=workers,
              progress=False)
    assert_one_line_error(e, where, reason, DAMAGED)
    result = _cli("train", "--cache", path, "--data", dataset, "--student", "cnn_tiny", "--out", tmp_path / "cli",
                  "--batch-size", 8, "--workers", workers)
    _assert_one_line_cli(result, f"error: {where}", reason, DAMAGED)
    problems = verify_cache(path)["problems"]  # verify names the same chunk, with the reason alone
    assert len(problems) == 1, problems
    assert problems[0].startswith("ensemble/values: epoch 0 chunk 2 (rows 16..23): read failed (") and \
        reason in problems[0] and "damaged" not in problems[0]


# ---------------------------------------------------------------- manifests
def test_training_refuses_a_manifest_that_no_longer_matches_its_digest(chunked, dataset, trained, tmp_path):
    """A flipped output_kind once trained to a loss of 2038: every reader of targets refuses it;
    inspect and verify still open the cache, and verify lists the mismatch."""
    path = _copy(chunked, tmp_path)
    _edit_manifest(path, lambda m: {**m, "output_kind": "multilabel"})
    message = f"{path}: manifest does not match its config_digest (edited or damaged); 'logitcache verify' says more"
    calls = {"train": lambda: train(path, dataset, "cnn_tiny", tmp_path / "run", epochs=1, progress=False),
             "replay": lambda: logitcache.replay(path, dataset, 0, "clip_000"),
             "fidelity": lambda: fidelity(path, dataset, TEACHERS, samples=2, device="cpu"),
             "compare": lambda: compare(trained, cache=path, data=dataset, student="lc_students:student",
                                        samples=2, device="cpu"),
             "open_cache": lambda: logitcache.open_cache(path)}
    for name, call in calls.items():
        with pytest.raises(LogitCacheError) as e:
            call()
        assert str(e.value) == message, name
    assert not (tmp_path / "run").exists()
    assert inspect_cache(path)["output_kind"] == "multilabel"
    problems = verify_cache(path)["problems"]  # then what the flip does to the stored stats' meaning
    assert problems[0] == "manifest: config_digest does not match the manifest's contents (edited by hand?)"
    _assert_one_line_cli(_cli("train", "--cache", path, "--data", dataset, "--student", "cnn_tiny", "--out",
                              tmp_path / "cli"), f"error: {message}")


def _not_an_object(path: Path, how: str) -> None:
    if path.suffix == ".h5":
        with h5py.File(path, "r+") as f:
            f.attrs["logitcache"] = {"list": "[1, 2]", "number": "3", "invalid": "{'not': json"}[how]
    else:
        _edit_manifest(path, lambda m: {"list": [1, 2], "number": 3, "string": "{}"}[how])


@pytest.mark.parametrize("suffix,how", [(".zarr", "list"), (".zarr", "number"), (".zarr", "string"),
                                        (".h5", "list"), (".h5", "number"), (".h5", "invalid")])
def test_a_manifest_that_is_not_a_json_object_is_one_line_for_every_command(dumper, dataset, tmp_path, suffix, how):
    path = _copy(dumper(chunk_rows=R, suffix=suffix), tmp_path)
    _not_an_object(path, how)
    with pytest.raises(LogitCacheError) as e:
        logitcache.open_cache(path)
    assert str(e.value) == f"{path}: manifest is not a JSON object"
    for args in (["inspect", path], ["verify", path], ["train", "--cache", path, "--data", dataset, "--student",
                                                        "cnn_tiny", "--out", tmp_path / "run"],
                 ["fidelity", path, "--data", dataset, "--teacher", TEACHERS[0], "--samples", 2]):
        _assert_one_line_cli(_cli(*args), f"error: {path}: ", "manifest is not a JSON object")


@pytest.mark.parametrize("edit,needle", [
    (lambda m: {k: v for k, v in m.items() if k != "topk"}, "manifest has no 'topk' entry"),
    (lambda m: {**m, "dataset": {k: v for k, v in m["dataset"].items() if k != "num_samples"}},
     "manifest has no 'dataset.num_samples' entry"),
    (lambda m: {**m, "epochs": "two"}, "manifest entry 'epochs' is \"two\", not a whole number"),
    (lambda m: {**m, "classes": None}, "manifest entry 'classes' is null, not a list"),
    (lambda m: {**m, "chunk_rows": 0}, "manifest entry 'chunk_rows' is 0, out of range"),
])
def test_a_manifest_missing_an_entry_names_it(chunked, dataset, tmp_path, edit, needle):
    path = _copy(chunked, tmp_path)
    _edit_manifest(path, edit)
    with pytest.raises(LogitCacheError) as e:
        logitcache.open_cache(path)
    assert str(e.value) == f"{path}: {needle} (edited or damaged)"
    for args in (["inspect", path], ["verify", path],
                 ["train", "--cache", path, "--data", dataset, "--student", "cnn_tiny", "--out", tmp_path / "run"]):
        _assert_one_line_cli(_cli(*args), f"error: {path}: {needle}")


# ---------------------------------------------------------------- compare: run folders are data
@pytest.fixture(scope="module")
def workspace(dumper, dataset, tmp_path_factory):
    """work/{run.zarr, data} (links to the session's cache and data), the student factory module
    lc_students.py on sys.path, and a 2-epoch run trained from work/ with relative paths."""
    root = tmp_path_factory.mktemp("trust")
    work, code = root / "work", root / "code"
    work.mkdir()
    code.mkdir()
    (code / "lc_students.py").write_text(STUDENTS)
    cache = dumper(epochs=1, output_kind="multilabel", augment="ced", topk=4)
    (work / "run.zarr").symlink_to(cache, target_is_directory=True)
    (work / "data").symlink_to(dataset, target_is_directory=True)
    sys.path.insert(0, str(code))
    cwd = os.getcwd()
    try:
        os.chdir(work)
        train("run.zarr", "data", "lc_students:student", "kd", epochs=2, batch_size=12, device="cpu",
              progress=False)
    finally:
        os.chdir(cwd)
    yield {"root": root, "work": work, "marker": code / "imported.marker", "cache": cache, "data": dataset}
    sys.path.remove(str(code))
    sys.modules.pop("lc_students", None)


@pytest.fixture
def trained(workspace):
    return workspace["work"] / "kd"


def _forget_students(workspace) -> None:
    sys.modules.pop("lc_students", None)
    workspace["marker"].unlink(missing_ok=True)


def test_compare_does_not_import_a_student_factory_named_in_the_run_folder(workspace, trained):
    _forget_students(workspace)
    with pytest.raises(LogitCacheError) as e:
        compare(trained, samples=4, device="cpu")
    assert str(e.value) == (f"{trained}/config.json: the student is the factory lc_students:student; compare does "
                            f"not import code named in a run folder: pass --student lc_students:student to import "
                            f"it (or --trust-run)")
    _assert_one_line_cli(_cli("compare", trained, "--samples", 4, "--device", "cpu"), "--student", "--trust-run")
    with pytest.raises(LogitCacheError) as e:
        compare(trained, student="cnn_tiny", samples=4, device="cpu")
    assert_one_line_error(e, "--student cnn_tiny", "lc_students:student")
    assert not workspace["marker"].exists() and "lc_students" not in sys.modules

    r = compare(trained, student="lc_students:student", samples=4, device="cpu")
    assert r["student"] == "lc_students:student" and r["views"]["views"] == 4
    assert workspace["marker"].exists()  # named by the user: imported
    _forget_students(workspace)
    result = _cli("compare", trained, "--samples", 4, "--device", "cpu", "--trust-run", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["views"]["views"] == 4 and workspace["marker"].exists()


def test_compare_works_from_another_folder(workspace, trained, monkeypatch):
    config = json.loads((trained / "config.json").read_text())
    assert config["cache"] == str(workspace["cache"].resolve()) and config["data"] == str(workspace["data"].resolve())
    monkeypatch.chdir(workspace["root"])
    r = compare(trained, student="lc_students:student", samples=4, device="cpu")
    assert r["cache"] == config["cache"] and r["data"] == config["data"]


def test_compare_resolves_the_relative_paths_of_older_runs(workspace, trained, monkeypatch):
    """Runs written before config.json held absolute paths: tried against the current folder and
    against the run folder's parent."""
    work = workspace["work"]
    beside, nested = work / "kd_old", work / "runs" / "kd_old"
    for run in (beside, nested):
        shutil.copytree(trained, run)
        config = json.loads((run / "config.json").read_text())
        (run / "config.json").write_text(json.dumps({**config, "cache": "run.zarr", "data": "data"}))
    kw = dict(student="lc_students:student", samples=4, device="cpu")
    monkeypatch.chdir(workspace["root"])
    assert compare(beside, **kw)["cache"] == str(work / "run.zarr")  # next to the run folder
    with pytest.raises(LogitCacheError) as e:
        compare(nested, **kw)
    assert str(e.value) == (f"{nested}/config.json: cache 'run.zarr' is found neither in the current folder "
                            f"({workspace['root']}) nor next to the run folder ({work / 'runs'}); pass --cache")
    monkeypatch.chdir(work)
    r = compare(nested, **kw)  # in the current folder
    assert r["cache"] == str(work / "run.zarr") and r["data"] == str(work / "data")


def test_compare_numbers_epochs_from_one_for_people(trained, tmp_path):
    html_out = tmp_path / "c.html"
    result = _cli("compare", trained, "--student", "lc_students:student", "--samples", 4, "--device", "cpu",
                  "--html", html_out)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "checkpoint after epoch 2;" in lines[0]
    header = next(i for i, x in enumerate(lines) if x.startswith("epoch"))
    assert [x.split()[0] for x in lines[header + 2:]] == ["1", "2"]
    page = html_out.read_text()
    assert "checkpoint after epoch 2;" in page
    rows = page.split("<h3>Per epoch (from the run's log)</h3>")[1]
    assert [cell.split("<")[0] for cell in rows.split('<tr><td class="n">')[1:]] == ["1", "2"]
    r = json.loads(_cli("compare", trained, "--student", "lc_students:student", "--samples", 4, "--device", "cpu",
                        "--json").stdout)
    assert [e["epoch"] for e in r["epochs"]] == [0, 1] and r["checkpoint_epoch"] == 1  # as stored


# ---------------------------------------------------------------- student and targets at different levels
@pytest.fixture(scope="module")
def frame_cache(dumper):
    return dumper(teachers=["toy_teachers:toy_frames", "toy_teachers:toy_frames_b"], topk=3,
                  output_kind="multilabel", value_dtype="float16", epochs=1)


def test_a_student_at_another_level_than_the_targets_is_refused_before_training(
        workspace, frame_cache, chunked, dataset, tmp_path):
    T = logitcache.open_cache(frame_cache).frames
    with pytest.raises(LogitCacheError) as e:
        train(frame_cache, dataset, "lc_students:clip_student", tmp_path / "a", progress=False)
    assert str(e.value) == (f"student lc_students:clip_student outputs [B, C={C}] (clip level) but cache "
                            f"{frame_cache} holds frame-level targets [B, T={T}, C={C}]")
    with pytest.raises(LogitCacheError) as e:
        train(chunked, dataset, "lc_students:frame_student", tmp_path / "b", progress=False)
    assert str(e.value) == (f"student lc_students:frame_student outputs [B, T=7, C={C}] (frame level) but cache "
                            f"{chunked} holds clip-level targets [B, C={C}]")
    assert not (tmp_path / "a" / "metrics.jsonl").exists() and not (tmp_path / "b" / "metrics.jsonl").exists()


def test_compare_refuses_a_student_at_another_level_than_the_cache(workspace, frame_cache, dataset, tmp_path):
    run = tmp_path / "clip_run"
    train(workspace["cache"], dataset, "lc_students:clip_student", run, epochs=1, max_steps=1, batch_size=8,
          progress=False)
    T = logitcache.open_cache(frame_cache).frames
    with pytest.raises(LogitCacheError) as e:
        compare(run, cache=frame_cache, data=dataset, student="lc_students:clip_student", samples=4, device="cpu")
    assert str(e.value) == (f"student lc_students:clip_student outputs [B, C={C}] (clip level) but cache "
                            f"{frame_cache} holds frame-level targets [B, T={T}, C={C}]")


CWD_STUDENT = '''
import torch

class Energy(torch.nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.fc = torch.nn.Linear(1, num_classes)

    def forward(self, x):
        return self.fc(x.abs().mean(-1, keepdim=True))

def student(num_classes):
    return Energy(num_classes)

def needs_width(num_classes, width):
    return torch.nn.Linear(1, num_classes)
'''


def test_a_student_factory_is_imported_from_the_current_folder(workspace, tmp_path, monkeypatch):
    # as `python -m` does, and as teacher factories are: no PYTHONPATH needed for a file beside you
    (tmp_path / "cwd_students_lc.py").write_text(CWD_STUDENT)
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("cwd_students_lc", None)
    metrics = train(workspace["cache"], workspace["data"], "cwd_students_lc:student", tmp_path / "run",
                    epochs=1, batch_size=12, device="cpu", max_steps=1, progress=False)
    assert math.isfinite(metrics["train_loss"])
    with pytest.raises(LogitCacheError) as e:  # an argument none of num_classes/sample_rate/frames fills
        train(workspace["cache"], workspace["data"], "cwd_students_lc:needs_width", tmp_path / "run2",
              epochs=1, batch_size=12, device="cpu", progress=False)
    assert "cwd_students_lc:needs_width: cannot build the student" in str(e.value) and "\n" not in str(e.value)
    sys.modules.pop("cwd_students_lc", None)
