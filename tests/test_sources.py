"""Sources: image folders (class sub-folders and labels.csv), CSV/JSONL manifests, detection, the
source kind recorded in the manifest and checked on use, and one-line errors for bad inputs.

Tiny PNG/JPEG images made with Pillow (3 classes, 4 images each, 12x10 pixels), two toy image
teachers (tests/toy_image_teachers.py), 8x8 views, 1-2 epochs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import logitcache
import toy_image_teachers
from logitcache.cli.main import main
from logitcache.errors import LogitCacheError
from logitcache.sources import detect_kind, open_source, stored_kind
from logitcache.train import train

CLASSES = ["cat", "dog", "owl"]
PER_CLASS = 4
TEACHERS = ["toy_image_teachers:image_a", "toy_image_teachers:image_b"]
C = toy_image_teachers.NUM_CLASSES
DUMP = dict(epochs=2, topk=C, augment="flip", image_size=8, output_kind="multiclass", value_dtype="float32",
            batch_size=5, num_workers=0, progress=False, seed=3)


def _image(c: int, n: int) -> Image.Image:
    """A 12x10 image whose colour follows its class, with seeded noise; a few greyscale and RGBA."""
    rng = np.random.default_rng(10 * c + n)
    rgb = np.zeros((10, 12, 3), np.float64)
    rgb[..., c] = 200.0
    rgb += rng.uniform(0, 55, rgb.shape)
    im = Image.fromarray(rgb.astype(np.uint8), "RGB")
    return im.convert("L") if n == 1 else im.convert("RGBA") if n == 2 else im


def _save(im: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


@pytest.fixture(scope="module")
def class_folders(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imgs") / "train"
    for c, name in enumerate(CLASSES):
        for n in range(PER_CLASS):
            _save(_image(c, n), root / name / f"{name}_{n}.{'jpg' if n == 3 else 'png'}")
    return root


@pytest.fixture(scope="module")
def labels_csv_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imgs_csv") / "train"
    rows = ["filename,labels"]
    for c, name in enumerate(CLASSES):
        for n in range(PER_CLASS):
            _save(_image(c, n), root / "img" / f"{name}{n}.png")
            rows.append(f"img/{name}{n}.png,{name}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return root


@pytest.fixture(scope="module")
def image_cache(class_folders, tmp_path_factory) -> Path:
    return logitcache.dump(class_folders, TEACHERS, tmp_path_factory.mktemp("c") / "img.zarr", **DUMP)


def _teacher(name: str):
    return getattr(toy_image_teachers, name.split(":")[1])()


# ------------------------------------------------------------------ detection and layouts
def test_detects_each_kind(class_folders, labels_csv_folder, dataset, tmp_path):
    (tmp_path / "m.csv").write_text("path,labels\n")
    assert detect_kind(class_folders) == "image_folder"
    assert detect_kind(labels_csv_folder) == "image_folder"
    assert detect_kind(dataset) == "audio_folder"
    assert detect_kind(tmp_path / "m.csv") == "manifest"
    folders = open_source(class_folders)
    assert (folders.kind, folders.layout, folders.modality) == ("image_folder", "class_folders", "image")
    assert folders.classes == CLASSES and folders.ids[:2] == ["cat/cat_0.png", "cat/cat_1.png"]
    assert folders.table.first_class().tolist() == [c for c in range(3) for _ in range(PER_CLASS)]
    assert open_source(labels_csv_folder).layout == "labels_csv"


def test_image_decodes_to_rgb_float(class_folders):
    src = open_source(class_folders)
    for i in range(3):  # RGB, greyscale and RGBA files alike
        x, crc = src.load_with_crc(i)
        assert x.dtype == torch.float32 and tuple(x.shape) == (3, 10, 12)
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        import zlib
        assert crc == zlib.crc32((class_folders / src.ids[i]).read_bytes())
    grey = src.load(1)
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])


# ------------------------------------------------------------------ dump, replay, train
def test_image_folder_dump_records_source_and_replays(image_cache, class_folders):
    cache = logitcache.open_cache(image_cache)
    m = cache.manifest
    assert m["source"] == {"kind": "image_folder", "layout": "class_folders"}
    assert m["augment"]["modality"] == "image" and m["augment"]["size"] == [8, 8]
    assert m["dataset"]["image_bytes"] == sum(p.stat().st_size for p in class_folders.rglob("*.*"))
    ids = cache.ids
    flips = np.concatenate([cache.params(e, ids)["hflip.flip"] for e in range(cache.epochs)])
    assert 0 < flips.sum() < len(flips)  # both flipped and plain views occur
    for epoch in range(cache.epochs):
        views = torch.stack([logitcache.replay(cache, class_folders, epoch, i) for i in ids])
        assert tuple(views.shape) == (len(ids), 3, 8, 8)
        for member in ("image_a", "image_b"):
            t = cache.targets(epoch, ids, member=member)
            fresh = _teacher(f"x:{member}")(views).numpy()
            stored = np.full_like(fresh, np.nan)
            np.put_along_axis(stored, t.indices.astype(np.int64), t.values, axis=1)
            assert np.array_equal(stored, fresh)  # k = C, float32: the teachers' exact logits


def test_train_inspect_verify_on_images(image_cache, class_folders, tmp_path):
    metrics = train(image_cache, class_folders, "image_cnn_tiny", tmp_path / "run", epochs=1, batch_size=4,
                    eval_data=class_folders, progress=False)
    assert metrics["samples"] == len(CLASSES) * PER_CLASS and 0.0 <= metrics["eval_top1"] <= 1.0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["source"] == "image_folder"
    r = CliRunner().invoke(main, ["verify", str(image_cache), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["ok"] is True
    r = CliRunner().invoke(main, ["inspect", str(image_cache), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["samples"] == len(CLASSES) * PER_CLASS
    from logitcache.reports.compare import compare
    from logitcache.reports.fidelity import fidelity

    f = fidelity(image_cache, class_folders, TEACHERS, samples=8)
    assert f["max_abs_logit_error"] == 0.0 and f["top1_agreement"] == 1.0
    c = compare(tmp_path / "run", eval_data=class_folders, teachers=TEACHERS, samples=8)
    assert c["views"]["views"] == 8 and 0.0 <= c["views"]["top1_agreement"] <= 1.0


def test_labels_csv_layout_dumps_the_same_views(labels_csv_folder, tmp_path):
    out = logitcache.dump(labels_csv_folder, TEACHERS[:1], tmp_path / "csv.zarr", **{**DUMP, "epochs": 1})
    cache = logitcache.open_cache(out)
    assert cache.manifest["source"] == {"kind": "image_folder", "layout": "labels_csv"}
    assert cache.ids[0] == "img/cat0.png" and cache.classes == CLASSES
    view = logitcache.replay(cache, labels_csv_folder, 0, "img/dog2.png")
    assert tuple(view.shape) == (3, 8, 8)


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_manifest_source_of_absolute_paths(class_folders, tmp_path, fmt):
    files = sorted(class_folders.rglob("*.*"))
    path = tmp_path / f"train.{fmt}"
    if fmt == "csv":
        path.write_text("path,labels\n" + "".join(f"{p},{p.parent.name}\n" for p in files))
    else:
        path.write_text("".join(json.dumps({"path": str(p), "labels": [p.parent.name]}) + "\n" for p in files))
    src = open_source(path)
    assert (src.kind, src.modality, src.classes) == ("manifest", "image", CLASSES)
    assert src.ids == [str(p) for p in files]
    out = logitcache.dump(path, TEACHERS[:1], tmp_path / "m.zarr", **{**DUMP, "epochs": 1})
    cache = logitcache.open_cache(out)
    assert cache.manifest["source"] == {"kind": "manifest", "modality": "image", "format": fmt}
    x = logitcache.replay(cache, path, 0, str(files[5]))
    assert tuple(x.shape) == (3, 8, 8)


def test_audio_manifest_source(dataset, tmp_path):
    ids = open_source(dataset).ids[:4]
    path = tmp_path / "audio.csv"
    path.write_text("path,labels\n" + "".join(f"{dataset / i},{open_source(dataset).classes[0]}\n" for i in ids))
    src = open_source(path)
    assert src.modality == "audio" and len(src) == 4
    src.configure({"sample_rate": 16000})
    wave, _ = src.load_with_crc(0)
    assert wave.dim() == 1 and torch.equal(wave, open_source(dataset).load(0, 16000))


# ------------------------------------------------------------------ the recorded kind
def test_old_caches_count_as_audio_folder():
    assert stored_kind({}) == "audio_folder"
    assert stored_kind({"source": {"kind": "manifest"}}) == "manifest"


def test_train_with_another_source_kind_than_the_cache(image_cache, class_folders, tmp_path):
    files = sorted(class_folders.rglob("*.*"))
    path = tmp_path / "same.csv"
    path.write_text("path,labels\n" + "".join(f"{p},{p.parent.name}\n" for p in files))
    with pytest.raises(LogitCacheError, match=r"is a manifest source but cache .* was dumped from a image_folder"):
        train(image_cache, path, "image_cnn_tiny", tmp_path / "run", progress=False)
    r = CliRunner().invoke(main, ["train", "--cache", str(image_cache), "--data", str(class_folders), "--source",
                                  "manifest", "--student", "image_cnn_tiny", "--out", str(tmp_path / "r2")])
    assert r.exit_code == 1 and r.stderr.strip().splitlines()[-1].startswith("error: ")


def test_audio_cache_refuses_image_data(dumper, class_folders):
    cache = dumper(epochs=1, augment="none", topk=3)
    with pytest.raises(LogitCacheError, match="image_folder source but cache .* audio_folder"):
        logitcache.replay(cache, class_folders, 0, "cat/cat_0.png")


# ------------------------------------------------------------------ bad inputs: one line each
def _dump_error(data, tmp_path, **kw) -> str:
    r = CliRunner().invoke(main, ["dump", "--data", str(data), "--teacher", TEACHERS[0], "--out",
                                  str(tmp_path / "bad.zarr"), "--image-size", "8", "--output-kind", "multiclass",
                                  *[str(a) for kv in kw.items() for a in kv]])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert not (tmp_path / "bad.zarr").exists()
    return lines[0]


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_unreadable_image_is_one_line(class_folders, tmp_path):
    root = _copy(class_folders, tmp_path / "d")
    (root / "dog" / "dog_2.png").write_bytes(b"not a png at all")
    assert "dog_2.png: cannot decode image" in _dump_error(root, tmp_path)


def test_empty_class_folder_is_one_line(class_folders, tmp_path):
    root = _copy(class_folders, tmp_path / "d")
    (root / "zebra").mkdir()
    (root / "zebra" / "notes.txt").write_text("no images here")
    assert "zebra: class folder holds no images" in _dump_error(root, tmp_path)


def test_manifest_row_with_missing_path(class_folders, tmp_path):
    path = tmp_path / "m.csv"
    path.write_text(f"path,labels\n{class_folders / 'cat/cat_0.png'},cat\n{tmp_path / 'gone.png'},dog\n")
    assert "gone.png: image file not found (listed in m.csv)" in _dump_error(path, tmp_path)


def test_manifest_row_with_unknown_class(class_folders, tmp_path):
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"path": str(class_folders / "owl/owl_0.png"), "labels": ["owl"]}) + "\n")
    assert "has unknown class 'owl'" in _dump_error(path, tmp_path)


def test_mixing_modalities_is_refused(labels_csv_folder, tmp_path):
    root = _copy(labels_csv_folder, tmp_path / "d")
    with open(root / "labels.csv", "a") as f:
        f.write("sound.wav,cat\n")
    assert "mixes image and non-image files ('img/cat0.png' and 'sound.wav')" in _dump_error(root, tmp_path)


def test_audio_option_on_images_is_refused(class_folders, tmp_path):
    assert "--sample-rate: applies to audio data" in _dump_error(class_folders, tmp_path, **{"--sample-rate": 16000})


def test_unknown_source_kind_is_refused(class_folders, tmp_path):
    assert "--source webdataset: unknown source kind" in _dump_error(class_folders, tmp_path,
                                                                      **{"--source": "webdataset"})
