"""Members are first-class: ``add_teachers`` / ``dump --add-teacher`` and ``drop_member`` /
``members drop``. An added member holds exactly the bytes a dump that had the teacher from the
start holds (zarr and HDF5; codecs topk, compact, sampled); kills at every step leave a cache
that readers trust and that the same call finishes; a dropped member's space goes back to the disk.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import logitcache
from logitcache import LogitCacheError
from logitcache.cli.main import main
from logitcache.layout import MEMBER_STATS, Layout
from logitcache.report import inspect_cache, verify_cache
from logitcache.storage import open_store
from conftest import assert_one_line_error

sys.path.insert(0, str(Path(__file__).resolve().parent / "stress"))
import kill_resume  # noqa: E402
from kill_resume import arrays, differing, run_api_child  # noqa: E402

A, B, C3 = "toy_teachers:toy_a", "toy_teachers:toy_b", "toy_teachers:toy_c"
# chunks of 12 rows and batches of 8: a batch straddles a chunk edge, as in any real dump
KW = dict(topk=4, chunk_rows=12)
CODECS = {"topk": {}, "compact": {"codec": "compact"}, "sampled": {"codec": "sampled", "sample_n": 4}}
ADD = dict(batch_size=8, num_workers=0, progress=False)


def _copy(src: Path, dst: Path) -> Path:
    (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
    return dst


def _base(dumper, tmp_path, suffix=".zarr", teachers=(A, B), **kw) -> Path:
    """A private copy of the memoised dump of ``teachers`` (these tests change the cache)."""
    return _copy(dumper(teachers=teachers, suffix=suffix, **{**KW, **kw}), tmp_path / f"run{suffix}")


def _manifest(path: Path) -> dict:
    with logitcache.open_cache(path, check_digest=False) as c:
        return c.manifest


def _disk(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _fields(path: Path) -> list[str]:
    with logitcache.open_cache(path) as c:
        return c.layout.fields()


# ---------------------------------------------------------------- bit identity
@pytest.mark.parametrize("codec", list(CODECS))
@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_added_member_is_bit_identical_to_a_dump_that_had_it(dumper, dataset, tmp_path, suffix, codec):
    kw = {**KW, **CODECS[codec]}
    reference = dumper(teachers=(A, B, C3), suffix=suffix, **kw)
    out = _base(dumper, tmp_path, suffix, **CODECS[codec])
    before = arrays(out)
    logitcache.add_teachers(out, dataset, [C3], **ADD)

    # every array is the from-scratch dump's (read through the store, compared as bytes), except
    # the ensemble, which keeps its composition: the [a, b] dump's
    want = {**arrays(reference), **{k: v for k, v in before.items() if k.startswith("ensemble/")}}
    assert differing(out, want) == []
    assert {f"members/toy_c/{f}" for f in _fields(out)} <= set(arrays(out))
    m, ref = _manifest(out), _manifest(reference)
    assert m["members"] == ["toy_a", "toy_b", "toy_c"] and m["complete"]
    assert m["config_digest"] == _manifest(dumper(teachers=(A, B), suffix=suffix, **kw))["config_digest"]
    p = m["target_sets"]["members/toy_c"]
    assert p["added"] and p["seed_group"] == 3 and not p["in_ensemble"] and p["codec"] == codec
    assert p["teachers"] == [{"name": "toy_c", "sha256": ref["teachers"][2]["sha256"]}]
    assert p["teacher"]["source"] == C3 and p["added_at"] == p["written_at"]
    assert m["target_sets"]["ensemble"]["excluded_members"] == ["toy_c"]
    assert "adding" not in m and "leftovers" not in m
    assert not any(n.endswith("/done") and n != "done" for n in arrays(out))  # markers go with the commit
    assert verify_cache(out)["ok"]


@pytest.mark.parametrize("suffix,codec", [(".zarr", "topk"), (".h5", "sampled")])
def test_ensemble_is_recomputed_exactly_when_its_teachers_are_given(dumper, dataset, tmp_path, suffix, codec):
    reference = dumper(teachers=(A, B, C3), suffix=suffix, **KW, **CODECS[codec])
    out = _base(dumper, tmp_path, suffix, **CODECS[codec])
    logitcache.add_teachers(out, dataset, [C3], ensemble_teachers=[A, B], **ADD)
    assert differing(out, arrays(reference)) == []  # the ensemble too: every array, bit for bit
    m, ref = _manifest(out), _manifest(reference)
    assert m["teachers"] == ref["teachers"] and m["config_digest"] == ref["config_digest"]
    p = m["target_sets"]["ensemble"]
    assert p["recomputed"] and [t["name"] for t in p["teachers"]] == ["toy_a", "toy_b", "toy_c"]
    assert "excluded_members" not in p and m["target_sets"]["members/toy_c"]["in_ensemble"]
    assert verify_cache(out)["ok"]


def test_extending_epochs_after_an_addition(dumper, dataset, tmp_path):
    """After a recomputed addition the cache is what a dump of all teachers is, so --resume with
    all of them extends it; an added member outside the ensemble makes the member lists differ."""
    reference = dumper(teachers=(A, B, C3), **{**KW, "epochs": 3})
    out = _base(dumper, tmp_path)
    logitcache.add_teachers(out, dataset, [C3], ensemble_teachers=[A, B], **ADD)
    logitcache.dump(dataset, [A, B, C3], out, resume=True, **{**dumper.defaults(), **KW, "epochs": 3})
    assert differing(out, arrays(reference)) == []

    kept = _copy(dumper(teachers=(A, B), **KW), tmp_path / "kept.zarr")
    logitcache.add_teachers(kept, dataset, [C3], **ADD)
    with pytest.raises(LogitCacheError) as e:
        logitcache.dump(dataset, [A, B], kept, resume=True, **{**dumper.defaults(), **KW, "epochs": 3})
    assert_one_line_error(e, f"{kept}: cannot resume: this dump differs from the cache in members")


def test_a_skipped_member_is_added_with_the_seeds_it_would_have_had(dumper, dataset, tmp_path):
    """A --no-members cache: toy_b is in the ensemble already; added later, its sampled rows draw
    from seed group 2, as in the dump that stored it."""
    reference = dumper(teachers=(A, B), **KW, **CODECS["sampled"])
    out = _base(dumper, tmp_path, members=False, **CODECS["sampled"])
    logitcache.add_teachers(out, dataset, [B], **ADD)
    got, want = arrays(out), arrays(reference)
    for f in _fields(out):
        assert got[f"members/toy_b/{f}"].tobytes() == want[f"members/toy_b/{f}"].tobytes()
    p = _manifest(out)["target_sets"]
    assert p["members/toy_b"]["seed_group"] == 2 and p["members/toy_b"]["in_ensemble"]
    assert "excluded_members" not in p["ensemble"]


# ---------------------------------------------------------------- kills
@pytest.fixture(scope="module")
def ctx():
    return kill_resume.context()


def _kill_add(ctx, data, out, point, **kw) -> None:
    code = run_api_child(ctx, point, "add_teachers", str(out), str(data), [C3], **ADD, **kw)
    assert code == -signal.SIGKILL, f"{point}: exit {code}"


def _marked_chunks_right(out: Path, reference: dict) -> int:
    """Chunks marked in the pending member's own done marker, each checked to hold the reference's bytes."""
    store = open_store(out, "r")
    try:
        marker = Layout.target_done_path("members/toy_c")
        if not store.has(marker):
            return 0
        done, R = store.read(marker).astype(bool), 12
        for name in [n for n in reference if n.startswith("members/toy_c/")]:
            for e, c in np.argwhere(done):
                # the member statistics hold one row per chunk, the rest one row per view
                key = (int(e), slice(c, c + 1) if name.endswith(MEMBER_STATS) else slice(c * R, (c + 1) * R))
                assert store.read(name, key).tobytes() == reference[name][key].tobytes(), (name, e, c)
        return int(done.sum())
    finally:
        store.close()


def _trusted(out: Path, members: list[str]) -> None:
    """What a reader sees after a kill: a complete cache with exactly ``members``, that verifies."""
    with logitcache.open_cache(out) as c:
        assert c.complete and c.members == members
        c.targets(0)  # the ensemble reads
    assert verify_cache(out)["ok"], verify_cache(out)["problems"]


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_killed_add_is_invisible_until_committed_and_resumes_bit_identical(ctx, dumper, dataset, tmp_path, suffix):
    reference = arrays(dumper(teachers=(A, B, C3), suffix=suffix, **KW))
    out = _base(dumper, tmp_path, suffix)
    want = {**reference, **{k: v for k, v in arrays(out).items() if k.startswith("ensemble/")}}
    P = 4  # writer kill points per chunk: one per field (values, indices, stat), one after the markers

    _kill_add(ctx, dataset, out, "write:2")  # inside the first chunk
    assert _marked_chunks_right(out, reference) == 0
    _trusted(out, ["toy_a", "toy_b"])  # the half-added member is not a member
    with logitcache.open_cache(out) as c, pytest.raises(LogitCacheError) as e:
        c.targets(0, member="toy_c")
    assert_one_line_error(e, "unknown member 'toy_c'")
    _kill_add(ctx, dataset, out, f"write:{P + P // 2}")  # chunk 0 marked, chunk 1 half written
    assert _marked_chunks_right(out, reference) == 1
    _trusted(out, ["toy_a", "toy_b"])
    if suffix == ".zarr":
        _kill_add(ctx, dataset, out, "commit:1")  # every chunk written, nothing committed
        assert _marked_chunks_right(out, reference) == 4
        _trusted(out, ["toy_a", "toy_b"])
        _kill_add(ctx, dataset, out, "sweep:1")  # committed; markers left for removal
        _trusted(out, ["toy_a", "toy_b", "toy_c"])
        assert _manifest(out)["leftovers"] == ["members/toy_c/done"]

    logitcache.add_teachers(out, dataset, [C3], **ADD)  # the same call finishes it
    assert differing(out, want) == []
    m = _manifest(out)
    assert m["members"] == ["toy_a", "toy_b", "toy_c"] and "adding" not in m and "leftovers" not in m


def test_killed_ensemble_swap_is_finished_by_the_same_call(ctx, dumper, dataset, tmp_path):
    reference = dumper(teachers=(A, B, C3), **KW)
    out = _base(dumper, tmp_path)
    _kill_add(ctx, dataset, out, "swap:2", ensemble_teachers=[A, B])  # the old ensemble moved away
    with logitcache.open_cache(out) as c:
        assert not c.complete  # readers are told, not served a half-swapped ensemble
    store = open_store(out, "r")
    assert not store.has("ensemble")
    store.close()
    with pytest.raises(LogitCacheError) as e:  # a dump --resume would mark it complete: refused
        logitcache.dump(dataset, [A, B], out, resume=True, **{**dumper.defaults(), **KW})
    assert_one_line_error(e, "an --add-teacher of this cache is unfinished")
    with pytest.raises(LogitCacheError) as e:  # the same call, without the ensemble's teachers
        logitcache.add_teachers(out, dataset, [C3], **ADD)
    assert_one_line_error(e, "re-run it with the same --add-teacher and the ensemble's --teacher")
    logitcache.add_teachers(out, dataset, [C3], ensemble_teachers=[A, B], **ADD)
    assert differing(out, arrays(reference)) == []
    assert verify_cache(out)["ok"]


# ---------------------------------------------------------------- drop
@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_drop_shrinks_the_cache_which_verifies_trains_and_can_take_the_member_back(dumper, dataset, tmp_path,
                                                                                    suffix):
    from logitcache.train import train

    out = _base(dumper, tmp_path, suffix, teachers=(A, B, C3))
    original = arrays(out)
    size = _disk(out)
    result = logitcache.drop_member(out, "toy_b")
    assert result["bytes_before"] == size and result["bytes_after"] == _disk(out) < size
    assert not [n for n in arrays(out) if n.startswith("members/toy_b")]
    assert verify_cache(out)["ok"]
    m = _manifest(out)
    assert m["members"] == ["toy_a", "toy_c"] and "members/toy_b" not in m["target_sets"]
    assert m["target_sets"]["ensemble"]["dropped_members"] == ["toy_b"]  # its contribution stays
    assert [d["name"] for d in m["dropped_members"]] == ["toy_b"] and m["dropped_members"][0]["seed_group"] == 2
    metrics = train(out, dataset, "cnn_tiny", tmp_path / "run", epochs=1, batch_size=12, member="toy_c",
                    progress=False)
    assert np.isfinite(metrics["train_loss"])

    logitcache.add_teachers(out, dataset, [B], **ADD)  # back, with the bytes (and seeds) it had
    assert differing(out, original) == []
    assert _manifest(out)["target_sets"]["members/toy_b"]["in_ensemble"]


def test_killed_drop_leaves_a_valid_cache_and_the_same_call_finishes(ctx, dumper, dataset, tmp_path):
    out = _base(dumper, tmp_path, teachers=(A, B, C3))
    size = _disk(out)
    code = run_api_child(ctx, "drop:1", "drop_member", str(out), "toy_b")
    assert code == -signal.SIGKILL
    m = _manifest(out)
    assert m["members"] == ["toy_a", "toy_c"] and m["leftovers"] == ["members/toy_b"]  # no manifest names missing arrays
    assert verify_cache(out)["ok"]
    logitcache.drop_member(out, "toy_b")  # finishes: removes what the manifest left for removal
    assert "leftovers" not in _manifest(out) and _disk(out) < size
    assert not [n for n in arrays(out) if n.startswith("members/toy_b")]


def test_dropping_a_pending_member_cancels_the_addition(ctx, dumper, dataset, tmp_path):
    out = _base(dumper, tmp_path)
    before = arrays(out)
    _kill_add(ctx, dataset, out, "write:6")
    with pytest.raises(LogitCacheError) as e:  # another member cannot be dropped meanwhile
        logitcache.drop_member(out, "toy_a")
    assert_one_line_error(e, "an addition of toy_c is unfinished")
    logitcache.drop_member(out, "toy_c")
    assert differing(out, before) == [] and "adding" not in _manifest(out)


def test_drop_refuses_the_ensemble_and_unknown_members(dumper, tmp_path):
    out = _base(dumper, tmp_path)
    with pytest.raises(LogitCacheError) as e:
        logitcache.drop_member(out, "ensemble")
    assert_one_line_error(e, f"{out}: the ensemble cannot be dropped")
    with pytest.raises(LogitCacheError) as e:
        logitcache.drop_member(out, "toy_z")
    assert_one_line_error(e, f"{out}: unknown member 'toy_z' (members: toy_a, toy_b)")
    r = CliRunner().invoke(main, ["members", "drop", str(out), "toy_z"])
    assert r.exit_code == 1 and r.output.strip().splitlines() == [
        f"error: {out}: unknown member 'toy_z' (members: toy_a, toy_b)"]


# ---------------------------------------------------------------- refusals
def _refused(out, data, teachers, *needles, untouched=True, **kw) -> None:
    before = arrays(out) if untouched else None
    with pytest.raises(LogitCacheError) as e:
        logitcache.add_teachers(out, data, teachers, **ADD, **kw)
    assert_one_line_error(e, *needles)
    if untouched:
        assert differing(out, before) == []  # refused before anything was written


def test_teacher_with_another_class_count_is_refused(dumper, dataset, tmp_path):
    out = _base(dumper, tmp_path)
    _refused(out, dataset, ["toy_teachers:toy_c11"],
             f"teacher toy_teachers:toy_c11: outputs C=11, clip level but cache {out} holds C=10, clip level")


def test_teacher_at_another_output_level_is_refused(dumper, dataset, tmp_path):
    out = _base(dumper, tmp_path)
    _refused(out, dataset, ["toy_teachers:toy_frames"],
             f"teacher toy_teachers:toy_frames: outputs C=10, T=6 but cache {out} holds C=10, clip level")


def test_name_clash_with_a_member_is_refused(dumper, dataset, tmp_path):
    out = _base(dumper, tmp_path)
    spec = tmp_path / "toy_a.json"  # named toy_a, but toy_c's weights
    spec.write_text(json.dumps({"factory": "toy_teachers:toy_c"}))
    _refused(out, dataset, [str(spec)], f"teacher {spec}: cache {out} already has a member named 'toy_a'")
    logitcache.add_teachers(out, dataset, [A], **ADD)  # the member itself again: nothing to do
    assert _manifest(out)["members"] == ["toy_a", "toy_b"]


def test_incomplete_cache_is_refused(dumper, dataset, tmp_path):
    out = _base(dumper, tmp_path)
    store = open_store(out, "r+")
    store.write_manifest({**store.read_manifest(), "complete": False})
    store.close()
    _refused(out, dataset, [C3], f"{out}: the cache is not complete (the dump did not finish)")


def test_format1_cache_is_refused(dataset, tmp_path):
    fixture = Path(__file__).resolve().parent / "fixtures" / "format1"
    out = _copy(fixture / "strong.zarr", tmp_path / "strong.zarr")
    _refused(out, fixture / "data", [C3], f"{out}: a format-1 cache has no per-target-set provenance")
    with pytest.raises(LogitCacheError) as e:
        logitcache.drop_member(out, "toy_a")
    assert_one_line_error(e, f"{out}: a format-1 cache has no per-target-set provenance")


def test_audio_changed_since_the_dump_is_refused(dumper, dataset, tmp_path):
    import soundfile

    out = _base(dumper, tmp_path)
    data = _copy(dataset, tmp_path / "data")
    victim = next(p for p in sorted((data / "audio").iterdir()) if p.suffix == ".wav")
    audio, sr = soundfile.read(str(victim), dtype="int16", always_2d=True)
    soundfile.write(str(victim), audio ^ np.int16(1), sr, subtype=soundfile.info(str(victim)).subtype)
    _refused(out, data, [C3], f"{victim}: changed since the dump (content crc differs)", untouched=False)
    m = _manifest(out)
    assert m["members"] == ["toy_a", "toy_b"] and "members/toy_c" in m["adding"]["target_sets"]


def test_wrong_ensemble_teachers_are_refused(dumper, dataset, tmp_path):
    out = _base(dumper, tmp_path)
    _refused(out, dataset, [C3], "--teacher: not the ensemble's teachers of", "teacher 2 is toy_c, toy_b was dumped",
             ensemble_teachers=[A, C3])


def test_weighted_ensemble_needs_weights_to_be_recomputed(dumper, dataset, tmp_path):
    out = _base(dumper, tmp_path, ensemble_weights=(1.0, 3.0))
    _refused(out, dataset, [C3], "--ensemble-weight: the ensemble of", "is weighted (1.0, 3.0); give one weight "
             "per teacher of the new ensemble (3: toy_a, toy_b, toy_c)", ensemble_teachers=[A, B])
    _refused(out, dataset, [C3], "--ensemble-weight: applies only when the ensemble is recomputed",
             ensemble_weights=[1.0, 1.0, 1.0])


def test_unfinished_addition_of_other_teachers_is_refused(ctx, dumper, dataset, tmp_path):
    out = _base(dumper, tmp_path)
    _kill_add(ctx, dataset, out, "write:2")
    _refused(out, dataset, ["toy_teachers:toy_conv"], f"{out}: an unfinished addition of toy_c (started",
             f"re-run it with the same --add-teacher, or cancel it with 'logitcache members drop {out} NAME'")


def test_object_storage_cache_is_refused(dataset):
    _refused("s3://bucket/run.zarr", dataset, [C3], "s3://bucket/run.zarr: cannot add teachers to a cache on "
             "object storage", untouched=False)


def test_cli_add_teacher_refuses_options_of_a_new_cache(dumper, dataset, tmp_path):
    out = _base(dumper, tmp_path)
    r = CliRunner().invoke(main, ["dump", "--data", str(dataset), "--add-teacher", C3, "--out", str(out),
                                  "--topk", "3"])
    assert r.exit_code == 1
    assert r.output.strip().splitlines() == [
        "error: --topk: does not apply with --add-teacher (the cache's own settings are used)"]


def test_cli_dump_without_any_teacher_is_one_line(dataset, tmp_path):
    """--teacher is optional now (--add-teacher alone is a dump command): the library says what is missing."""
    r = CliRunner().invoke(main, ["dump", "--data", str(dataset), "--out", str(tmp_path / "x.zarr")])
    assert r.exit_code == 1 and r.output.strip().splitlines() == ["error: at least one --teacher is needed"]
    assert not (tmp_path / "x.zarr").exists()


# ---------------------------------------------------------------- inspect
def test_inspect_lists_members_with_when_and_from_what(dumper, dataset, tmp_path):
    out = _base(dumper, tmp_path)
    r = CliRunner().invoke(main, ["dump", "--data", str(dataset), "--add-teacher", C3, "--out", str(out),
                                  "--workers", "0", "--batch-size", "8"])
    assert r.exit_code == 0, r.output
    logitcache.drop_member(out, "toy_b")
    m = _manifest(out)
    added = m["target_sets"]["members/toy_c"]["added_at"]
    sha = m["target_sets"]["members/toy_c"]["teachers"][0]["sha256"]

    info = json.loads(CliRunner().invoke(main, ["inspect", str(out), "--json"]).output)
    rows = {r["name"]: r for r in info["provenance"]["target_sets"]}
    assert list(rows) == ["ensemble", "toy_a", "toy_c"]
    assert rows["toy_c"]["kind"] == "added" and rows["toy_c"]["written_at"] == added
    assert rows["toy_c"]["source"] == C3 and rows["toy_c"]["sha256"] == sha and not rows["toy_c"]["in_ensemble"]
    assert rows["toy_a"]["kind"] == "dumped" and rows["toy_a"]["in_ensemble"]
    assert rows["ensemble"]["teachers"] == ["toy_a", "toy_b"]
    assert rows["ensemble"]["notes"] == ["does not aggregate toy_c", "still holds dropped toy_b"]
    assert [d["name"] for d in info["provenance"]["dropped"]] == ["toy_b"]

    text = CliRunner().invoke(main, ["inspect", str(out)]).output
    assert f"  toy_c: added {added} from {C3} (sha256 {sha[:12]}), not in the ensemble\n" in text
    assert "  ensemble: dumped" in text and "from toy_a, toy_b; does not aggregate toy_c; still holds dropped toy_b" \
        in text
    assert f"  toy_b: dropped {m['dropped_members'][0]['dropped_at']}\n" in text
