"""The synthetic dataset writer: determinism, folder format, and the format variety loaders must handle."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import soundfile as sf

from logitcache.errors import LogitCacheError
from logitcache.synth import CLASSES, make_dataset, make_splits

N = 30  # enough that seed 0 has resampled, FLAC and off-length files


def _rows(root: Path) -> list[dict]:
    with open(root / "labels.csv", newline="") as f:
        return list(csv.DictReader(f))


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("synth") / "a", N, seed=0)


def test_same_seed_same_bytes(synth, tmp_path):
    again = make_dataset(tmp_path / "b", N, seed=0)
    assert _files(again) == _files(synth)
    other = make_dataset(tmp_path / "c", N, seed=1)
    assert (other / "labels.csv").read_bytes() != (synth / "labels.csv").read_bytes()


def test_clip_depends_only_on_seed_and_index(synth, tmp_path):
    few = make_dataset(tmp_path / "few", 5, seed=0)
    for row in _rows(few):
        assert (few / row["filename"]).read_bytes() == (synth / row["filename"]).read_bytes()


def test_folder_format(synth):
    assert (synth / "labels.csv").read_text().splitlines()[0] == "filename,labels"
    assert (synth / "classes.txt").read_text().splitlines() == list(CLASSES)
    info = json.loads((synth / "dataset.json").read_text())
    assert info["sample_rate"] == 16000 and info["clip_seconds"] == 2.0 and info["description"]
    rows = _rows(synth)
    assert len(rows) == N and len({r["filename"] for r in rows}) == N
    counts = []
    for r in rows:
        assert r["filename"].startswith("audio/") and (synth / r["filename"]).is_file()
        labels = [c for c in r["labels"].split(";") if c]
        assert set(labels) <= set(CLASSES) and len(set(labels)) == len(labels)
        assert labels == sorted(labels, key=CLASSES.index)  # written in class order
        counts.append(len(labels))
    assert max(counts) <= 3 and len(set(counts)) > 1
    # the strong labels agree with the weak ones
    with open(synth / "events.csv", newline="") as f:
        events = list(csv.DictReader(f))
    by_file: dict[str, set[str]] = {}
    for e in events:
        assert 0 <= float(e["onset"]) < float(e["offset"]) <= 2.0 * 1.15
        by_file.setdefault(e["filename"], set()).add(e["label"])
    for r in rows:
        assert by_file.get(r["filename"], set()) == {c for c in r["labels"].split(";") if c}


def test_varied_formats(synth):
    infos = [sf.info(str(synth / r["filename"])) for r in _rows(synth)]
    rates = {i.samplerate for i in infos}
    assert 16000 in rates and rates & {22050, 44100}
    assert {i.format for i in infos} == {"WAV", "FLAC"}
    assert any(i.frames != round(2.0 * i.samplerate) for i in infos)
    assert all(i.channels == 1 and i.subtype == "PCM_16" for i in infos)


def test_plain_format(tmp_path):
    root = make_dataset(tmp_path / "plain", 12, sample_rate=8000, clip_seconds=0.5, seed=4, vary_format=False)
    for r in _rows(root):
        info = sf.info(str(root / r["filename"]))
        assert (info.format, info.samplerate, info.frames) == ("WAV", 8000, 4000)


def test_class_subset_and_errors(tmp_path):
    root = make_dataset(tmp_path / "sub", 10, classes=["high_hiss", "tone"], vary_format=False)
    assert (root / "classes.txt").read_text().split() == ["high_hiss", "tone"]
    assert {c for r in _rows(root) for c in r["labels"].split(";") if c} <= {"high_hiss", "tone"}
    with pytest.raises(LogitCacheError, match="classes"):
        make_dataset(tmp_path / "bad", 3, classes=["tone", "violin"])
    with pytest.raises(LogitCacheError, match="overwrite"):
        make_dataset(root, 3)
    assert len(_rows(make_dataset(root, 3, overwrite=True, vary_format=False))) == 3
    assert len(list((root / "audio").iterdir())) == 3  # old clips are gone


def test_splits(tmp_path):
    train, evaluation = make_splits(tmp_path / "demo", n_train=6, n_eval=4, clip_seconds=0.5)
    assert (train, evaluation) == (tmp_path / "demo" / "train", tmp_path / "demo" / "eval")
    assert len(_rows(train)) == 6 and len(_rows(evaluation)) == 4
    assert (train / "classes.txt").read_text() == (evaluation / "classes.txt").read_text()
    first = [(root / _rows(root)[0]["filename"]).read_bytes() for root in (train, evaluation)]
    assert first[0] != first[1]  # different seeds
