"""The ``logitcache`` command line through click's CliRunner: every command, --json, and bad inputs
that must end in one ``error: ...`` line (exit 1), never a traceback."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from logitcache.cli.main import main
from logitcache.storage import open_store
from conftest import CLIP_SECONDS, N_CLIPS, C

TEACHERS = ["--teacher", "toy_teachers:toy_a", "--teacher", "toy_teachers:toy_b"]
COMMANDS = ["dump", "train", "inspect", "verify", "fidelity", "demo"]
N = N_CLIPS


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_error(result, *needles: str, code: int = 1) -> str:
    """Exit ``code``, nothing on stdout, exactly one ``error:`` line (the last on stderr), no traceback."""
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = [ln for ln in result.stderr.replace("\r", "\n").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr  # progress bars may come before it
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


@pytest.fixture(scope="module")
def cli_cache(tmp_path_factory, dataset):
    """A cache written through the CLI: k = C, float32, softmax (so fidelity is exact)."""
    out = tmp_path_factory.mktemp("cli") / "run.zarr"
    result = run("dump", "--data", dataset, *TEACHERS, "--out", out, "--epochs", 1, "--topk", C,
                 "--augment", "strong", "--output-kind", "multiclass", "--value-dtype", "float32",
                 "--batch-size", 8, "--chunk-rows", 8, "--clip-seconds", CLIP_SECONDS, "--device", "cpu")
    assert result.exit_code == 0, result.output
    line = result.stdout.strip()
    assert "\n" not in line and line.startswith(f"{out}: {N} views (1 epochs x {N} samples), top-{C} of {C}")
    assert "B/sample-epoch" in line
    return out


def _copy_dataset(dataset, tmp_path):
    return shutil.copytree(dataset, tmp_path / "data")


# ---------------------------------------------------------------- help
@pytest.mark.parametrize("command", [None] + COMMANDS)
def test_help_says_what_and_shows_an_example(command):
    result = run(*([command] if command else []), "--help")
    assert result.exit_code == 0
    assert "Example:" in result.stdout
    assert f"logitcache {command or 'dump'} " in result.stdout


def test_version_and_python_dash_m():
    out = subprocess.run([sys.executable, "-m", "logitcache", "--version"], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and out.stdout.startswith("logitcache, version ")


# ---------------------------------------------------------------- commands
def test_inspect_json_and_text(cli_cache):
    result = run("inspect", cli_cache, "--json")
    assert result.exit_code == 0
    info = json.loads(result.stdout)  # exactly one JSON object on stdout
    assert (info["samples"], info["epochs"], info["topk"], info["classes"]) == (N, 1, C, C)
    assert info["bytes_on_disk"] > 0
    assert info["bytes_per_sample_epoch"] == pytest.approx(info["bytes_on_disk"] / N)
    text = run("inspect", cli_cache)
    assert text.exit_code == 0
    assert f"1 epochs x {N} samples" in text.stdout and "ensemble/values" in text.stdout
    assert "B per sample-epoch" in text.stdout


def test_dump_json_prints_only_the_summary(dataset, tmp_path):
    result = run("dump", "--data", dataset, "--teacher", "toy_teachers:toy_c", "--out", tmp_path / "c.h5",
                 "--topk", 3, "--augment", "none", "--no-members", "--clip-seconds", CLIP_SECONDS, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["backend"] == "hdf5" and info["members"] == [] and info["topk"] == 3
    assert "dump" in result.stderr  # the progress bar went to stderr


def test_verify_ok_and_damaged(cli_cache, tmp_path):
    result = run("verify", cli_cache)
    assert result.exit_code == 0 and result.stdout.startswith(f"ok: {cli_cache}: ")
    assert json.loads(run("verify", cli_cache, "--json").stdout)["ok"] is True

    bad = shutil.copytree(cli_cache, tmp_path / "bad.zarr")
    store = open_store(bad, "r+")
    rows = store.read("ensemble/indices", (0, slice(0, 8)))
    rows[0, 0] = C
    store.write("ensemble/indices", (0, slice(0, 8)), rows)
    result = run("verify", bad)
    assert result.exit_code == 1
    assert "1 problem(s):" in result.stdout
    assert f"  - ensemble/indices: epoch 0 chunk 0 (rows 0..7): class index {C} out of range" in result.stdout
    result = run("verify", bad, "--json")
    assert result.exit_code == 1 and json.loads(result.stdout)["ok"] is False


def test_fidelity_json_and_text(cli_cache, dataset):
    result = run("fidelity", cli_cache, "--data", dataset, *TEACHERS, "--samples", 6, "--json")
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)
    for key in ("samples_checked", "max_abs_logit_error", "topk_index_agreement", "top1_agreement", "kl_mean"):
        assert key in r
    assert r["samples_checked"] == 6 and r["max_abs_logit_error"] < 1e-4 and r["top1_agreement"] == 1
    text = run("fidelity", cli_cache, "--data", dataset, "--teacher", "toy_teachers:toy_a",
               "--teacher", "toy_teachers:toy_c", "--samples", 4)
    assert text.exit_code == 0  # another teacher is reported, not refused
    assert "teachers match the manifest: NO" in text.stdout
    assert "warning: the teachers given are not the ones" in text.stderr and "teacher 2 is toy_c" in text.stderr
    assert [ln.split()[0] for ln in text.stdout.splitlines()[3:6]] == ["ensemble", "toy_a", "toy_b"]
    assert text.stdout.splitlines()[6] == ""  # the per-k' report follows (tested in test_report)


def test_train_through_cli(cli_cache, dataset, tmp_path):
    pytest.importorskip("logitcache.train")
    result = run("train", "--cache", cli_cache, "--data", dataset, "--student", "cnn_tiny", "--out", tmp_path / "run",
                 "--epochs", 1, "--batch-size", 8, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["samples"] == N and metrics["train_loss"] > 0
    assert (tmp_path / "run" / "checkpoint.pt").is_file()


def test_demo_quick_runs_the_whole_pipeline(tmp_path):
    """``demo --quick``: every step for real on a few short clips (the numbers mean nothing)."""
    from logitcache.demo import STUDENT, TEACHERS
    from logitcache.report import verify_cache

    out = tmp_path / "d"
    result = run("demo", "--quick", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)  # --json: the table went to stderr
    names = [f"teacher {t}" for t in TEACHERS] + ["ensemble (mean prob)", f"student {STUDENT} from cache (KD)",
                                                  f"student {STUDENT} from labels"]
    assert list(summary["mAP"]) == names
    assert all(0.0 <= v <= 1.0 for v in summary["mAP"].values())
    table = [ln.split() for ln in result.stderr.splitlines()]
    for name, value in summary["mAP"].items():
        assert name.split() + [f"{value:.3f}"] in table, name
    assert json.loads((out / "summary.json").read_text()) == summary
    assert all((out / "teachers" / f"{t}.pt2").is_file() for t in TEACHERS)
    assert all((out / run_dir / "checkpoint.pt").is_file() for run_dir in ("student_kd", "student_labels"))
    check = verify_cache(out / "cache.zarr")
    assert check["ok"] and check["problems"] == [] and check["rows_checked"] > 0
    page = (out / "report.html").read_text()
    assert summary["report"] == str(out / "report.html")
    for section in ("<h2>Cache</h2>", "<h2>Fidelity: cache vs re-run teachers</h2>", "<h2>Student vs ensemble: "):
        assert section in page
    pngs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert pngs and all(base64.b64decode(p).startswith(b"\x89PNG\r\n") for p in pngs)


def test_demo_cli_passes_its_options(monkeypatch, tmp_path):
    """The CLI's part: options in, the table on stdout without --json."""
    demo = pytest.importorskip("logitcache.demo")
    calls = []

    def fake_run_demo(out_dir, quick=False, seed=0, progress=True):
        calls.append((out_dir, quick, seed, progress))
        print("model   eval mAP")  # run_demo prints its table to stdout
        return {"mAP": {"student": 0.5}, "cache_bytes": 123}

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    result = run("demo", "--out", tmp_path / "d", "--seed", 3)
    assert result.exit_code == 0 and result.stdout.startswith("model   eval mAP")
    assert calls == [(str(tmp_path / "d"), False, 3, True)]


def test_demo_negative_seed(tmp_path):
    assert_error(run("demo", "--out", tmp_path / "d", "--seed", -1), "--seed -1")
    assert not (tmp_path / "d").exists()


# ---------------------------------------------------------------- bad inputs: one line, exit 1
@pytest.mark.parametrize("workers", [0, 1])
def test_missing_audio_file(dataset, tmp_path, workers):
    data = _copy_dataset(dataset, tmp_path)
    (data / "audio" / "clip_00003.wav").unlink(missing_ok=True)
    (data / "audio" / "clip_00003.flac").unlink(missing_ok=True)
    # with workers the error is raised in a DataLoader worker and re-raised wrapped by torch
    assert_error(run("dump", "--data", data, *TEACHERS, "--out", tmp_path / "c.zarr", "--topk", 5, "--batch-size", 4,
                     "--workers", workers, "--clip-seconds", CLIP_SECONDS),
                 "clip_00003", "audio file not found")


def test_unknown_class_in_labels_csv(dataset, tmp_path):
    data = _copy_dataset(dataset, tmp_path)
    labels = data / "labels.csv"
    lines = labels.read_text().splitlines()
    lines[2] = lines[2].split(",")[0] + ",tone;bagpipes"
    labels.write_text("\n".join(lines) + "\n")
    assert_error(run("dump", "--data", data, *TEACHERS, "--out", tmp_path / "c.zarr"),
                 "labels.csv", "unknown class 'bagpipes'")


def test_teachers_disagree_on_classes(dataset, tmp_path):
    assert_error(run("dump", "--data", dataset, "--teacher", "toy_teachers:toy_a", "--teacher", "toy_teachers:toy_c11",
                     "--out", tmp_path / "c.zarr", "--clip-seconds", CLIP_SECONDS),
                 "disagree on the number of classes")


def test_topk_larger_than_classes(dataset, tmp_path):
    assert_error(run("dump", "--data", dataset, *TEACHERS, "--out", tmp_path / "c.zarr", "--topk", C + 1,
                     "--clip-seconds", CLIP_SECONDS),
                 f"--topk {C + 1}", f"({C})")


@pytest.mark.parametrize("command", ["inspect", "verify", "fidelity"])
def test_not_a_cache(command, dataset, tmp_path):
    extra = ["--data", dataset, "--teacher", "toy_teachers:toy_a"] if command == "fidelity" else []
    assert_error(run(command, dataset, *extra), "not a logitcache cache")
    assert_error(run(command, tmp_path / "missing.zarr", *extra), "cache not found")


def test_other_user_errors(dataset, cli_cache, tmp_path):
    assert_error(run("dump", "--data", tmp_path / "nowhere", *TEACHERS, "--out", tmp_path / "c.zarr"),
                 "data folder not found")
    assert_error(run("dump", "--data", dataset, "--teacher", "no_such_module:f", "--out", tmp_path / "c.zarr"),
                 "cannot import")
    assert_error(run("dump", "--data", dataset, *TEACHERS, "--out", cli_cache), "already exists")
    assert_error(run("dump", "--data", dataset, *TEACHERS, "--out", tmp_path / "c.zarr", "--augment", "wild"),
                 "neither a preset")


def test_usage_errors_keep_clicks_exit_2(dataset, tmp_path):
    assert run("dump").exit_code == 2
    assert run("dump", "--data", dataset, *TEACHERS, "--out", tmp_path / "c", "--output-kind", "x").exit_code == 2


def test_debug_shows_the_traceback(dataset):
    result = run("--debug", "inspect", dataset)
    assert result.exit_code == 1
    assert "Traceback" in result.stderr and result.stderr.rstrip().splitlines()[-1].startswith("error: ")


def test_os_errors_and_ctrl_c(monkeypatch, cli_cache):
    import logitcache.report

    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(logitcache.report, "inspect_cache", denied)
    assert_error(run("inspect", cli_cache), f"error: {cli_cache}: Permission denied")

    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(logitcache.report, "inspect_cache", interrupted)
    assert_error(run("inspect", cli_cache), "error: interrupted", code=130)
