"""Dense outputs: teachers giving a map ``[B, H', W', C]`` (channels last) are stored per position
as frames (T = H' * W', row-major), the manifest records ``positions``; students giving a map train
against them by KD. Tiny PNG images (3 classes x 3), 8x8 views, 4x4 toy dense teachers
(tests/toy_image_teachers.py), 1 epoch."""

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
from logitcache.cache import check_manifest
from logitcache.cli.main import main
from logitcache.errors import LogitCacheError
from logitcache.layout import config_digest
from logitcache.targets import aggregate
from logitcache.train import train

CLASSES = ["cat", "dog", "owl"]
PER_CLASS = 3
DENSE = ["toy_image_teachers:dense_a", "toy_image_teachers:dense_b"]
C = toy_image_teachers.NUM_CLASSES
DUMP = dict(epochs=1, topk=2, augment="image_basic", image_size=8, output_kind="multiclass", value_dtype="float32",
            batch_size=4, num_workers=0, progress=False, seed=5)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dense_imgs") / "train"
    for c, name in enumerate(CLASSES):
        for n in range(PER_CLASS):
            rgb = np.random.default_rng(10 * c + n).uniform(0, 55, (10, 12, 3))
            rgb[..., c] += 200.0
            (root / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rgb.astype(np.uint8), "RGB").save(root / name / f"{name}_{n}.png")
    return root


@pytest.fixture(scope="module", params=["topk", "compact"])
def dense_cache(request, folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dense") / f"{request.param}.zarr"
    return logitcache.dump(folder, DENSE, out, codec=request.param, **DUMP)


TOPK_ONLY = pytest.mark.parametrize("dense_cache", ["topk"], indirect=True)  # checks of the manifest, not the codec


def _fresh(cache, folder, epoch: int, ids: list[str]) -> dict[str, torch.Tensor]:
    """Each teacher re-run on the replayed views: its map [n, 4, 4, C]."""
    views = torch.stack([logitcache.replay(cache, folder, epoch, i) for i in ids])
    return {name.split(":")[1]: getattr(toy_image_teachers, name.split(":")[1])()(views) for name in DENSE}


def _stored_as(cache, logits: torch.Tensor):
    """What the cache's codec stores and reads back for these logits [n, T, C] (exact for both codecs)."""
    codec = cache.codec
    encoded = {k: v.numpy() for k, v in codec.encode(logits).items()}
    return codec.decode(codec.pack(encoded))


def test_dense_targets_are_the_teachers_maps_per_position(dense_cache, folder):
    cache = logitcache.open_cache(dense_cache)
    m = cache.manifest
    assert (m["frames"], m["positions"], cache.position_shape) == (16, [4, 4], (4, 4))
    ids = cache.ids
    fresh = _fresh(cache, folder, 0, ids)
    assert tuple(fresh["dense_a"].shape) == (len(ids), 4, 4, C)
    flat = {k: v.reshape(len(ids), 16, C) for k, v in fresh.items()}  # row-major positions
    for member, z in flat.items():
        t = cache.targets(0, ids, member=member)
        assert t.values.shape == (len(ids), 16, 2)
        v, i, s = _stored_as(cache, z)
        assert np.array_equal(t.values, v) and np.array_equal(t.indices, i) and np.array_equal(t.stat, s)
        if cache.codec.name == "topk":  # float32 top-k: the teacher's own top-2 logits at each position
            top = torch.topk(z, 2, dim=-1)
            assert np.array_equal(t.values, top.values.numpy()) and np.array_equal(t.indices, top.indices.numpy())
    ensemble = aggregate(list(flat.values()), "multiclass", m["aggregation"])
    t = cache.targets(0, ids)
    assert all(np.array_equal(a, b) for a, b in zip((t.values, t.indices, t.stat), _stored_as(cache, ensemble)))
    # by_position: rows [n, 4, 4, k], position (r, c) is the map's pixel (r, c)
    mapped = cache.by_position(cache.targets(0, ids, member="dense_a"))
    assert mapped.values.shape == (len(ids), 4, 4, 2) and mapped.stat.shape == (len(ids), 4, 4)
    assert np.array_equal(mapped.indices[:, 1, 2], torch.topk(fresh["dense_a"][:, 1, 2], 2).indices.numpy())


@TOPK_ONLY
def test_positions_count_in_the_digest_only_when_present(dense_cache):
    m = logitcache.open_cache(dense_cache).manifest
    assert m["config_digest"] == config_digest(m)
    without = {k: v for k, v in m.items() if k != "positions"}
    assert config_digest(without) != m["config_digest"]  # a 4x4 map is not 16 frames


def test_train_dense_student(dense_cache, folder, tmp_path):
    metrics = train(dense_cache, folder, "image_dense_tiny", tmp_path / "run", epochs=1, batch_size=4,
                    max_steps=2, record_steps=True, eval_data=folder, progress=False)
    assert len(metrics["step_losses"]) == 2 and all(np.isfinite(metrics["step_losses"]))
    assert 0.0 <= metrics["eval_top1"] <= 1.0
    from logitcache.reports.compare import compare

    c = compare(tmp_path / "run", eval_data=folder, teachers=DENSE, samples=4, progress=False)
    assert c["views"]["views"] == 4 and 0.0 <= c["views"]["top1_agreement"] <= 1.0


def test_verify_and_inspect_dense(dense_cache):
    r = CliRunner().invoke(main, ["verify", str(dense_cache), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["ok"] is True
    r = CliRunner().invoke(main, ["inspect", str(dense_cache), "--json"])
    info = json.loads(r.stdout)
    assert r.exit_code == 0 and (info["frames"], info["positions"]) == (16, [4, 4])
    r = CliRunner().invoke(main, ["inspect", str(dense_cache)])
    assert r.exit_code == 0 and "a 4x4 map (16 positions)" in r.stdout


@TOPK_ONLY
def test_fidelity_of_dense_cache(dense_cache, folder):
    from logitcache.reports.fidelity import fidelity

    f = fidelity(dense_cache, folder, DENSE, samples=4, progress=False)
    assert f["frames"] == 16 and f["max_abs_logit_error"] == 0.0 and f["top1_agreement"] == 1.0


# ------------------------------------------------------------------ bad input, one line each
def test_teachers_disagree_on_map_shape(folder, tmp_path):
    r = CliRunner().invoke(main, ["dump", "--data", str(folder), "--teacher", DENSE[0], "--teacher",
                                  "toy_image_teachers:dense_2x2", "--out", str(tmp_path / "bad.zarr"),
                                  "--image-size", "8", "--output-kind", "multiclass", "--topk", "2"])
    assert r.exit_code != 0 and r.stdout.count("\n") <= 1 and "Traceback" not in r.output
    assert ("error: teachers disagree on clip/frame/map level: toy_image_teachers:dense_a -> map 4x4, "
            "toy_image_teachers:dense_2x2 -> map 2x2") in r.output
    assert not (tmp_path / "bad.zarr").exists()


def test_clip_and_map_teachers_disagree(folder, tmp_path):
    with pytest.raises(LogitCacheError, match=r"clip/frame/map level: toy_image_teachers:dense_a -> map 4x4, "
                                              r"toy_image_teachers:image_a -> clip"):
        logitcache.dump(folder, [DENSE[0], "toy_image_teachers:image_a"], tmp_path / "bad.zarr", **DUMP)


@TOPK_ONLY
def test_label_loss_on_dense_map_is_refused(dense_cache, folder, tmp_path):
    with pytest.raises(LogitCacheError, match=r"--alpha 0.5: the labels are per image but cache .* holds a 4x4 map "
                                              r"per view; train a dense-map student with --alpha 0 \(KD only\)"):
        train(dense_cache, folder, "image_dense_tiny", tmp_path / "run", alpha=0.5, progress=False)


@TOPK_ONLY
def test_clip_student_on_dense_cache_is_refused(dense_cache, folder, tmp_path):
    r = CliRunner().invoke(main, ["train", "--cache", str(dense_cache), "--data", str(folder), "--student",
                                  "image_cnn_tiny", "--out", str(tmp_path / "run")])
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert ("error: model 'image_cnn_tiny' gives clip-level logits and the targets are a 4x4 map; choose one of: "
            "image_dense_tiny") in r.output


@TOPK_ONLY
def test_dense_factory_student_of_wrong_map_is_refused(dense_cache, folder, tmp_path):
    with pytest.raises(LogitCacheError, match=r"student toy_image_teachers:dense_2x2 outputs \[B, H'=2, W'=2, C=3\] "
                                              r"\(a dense map\) but cache .* holds dense-map targets \[B, 4, 4, C=3\]"):
        train(dense_cache, folder, "toy_image_teachers:dense_2x2", tmp_path / "run", progress=False)


@TOPK_ONLY
def test_edited_positions_is_one_line(dense_cache):
    m = dict(logitcache.open_cache(dense_cache).manifest)
    with pytest.raises(LogitCacheError, match=r"x.zarr: manifest entry 'positions' is \[4, 5\], not a list of "
                                              r"position counts whose product is frames=16"):
        check_manifest("x.zarr", {**m, "positions": [4, 5]})


def test_add_teacher_to_a_dense_cache(folder, tmp_path):
    out = logitcache.dump(folder, DENSE[:1], tmp_path / "one.zarr", **DUMP)
    with pytest.raises(LogitCacheError, match=r"teacher toy_image_teachers:dense_2x2: outputs C=3, T=4 \(a 2x2 map\) "
                                              r"but cache .* holds C=3, T=16 \(a 4x4 map\)"):
        logitcache.add_teachers(out, folder, ["toy_image_teachers:dense_2x2"], progress=False)
    logitcache.add_teachers(out, folder, [DENSE[1]], progress=False)
    cache = logitcache.open_cache(out)
    fresh = _fresh(cache, folder, 0, cache.ids)["dense_b"].reshape(len(cache.ids), 16, C)
    t = cache.targets(0, cache.ids, member="dense_b")
    assert np.array_equal(t.values, torch.topk(fresh, 2, dim=-1).values.numpy())


@TOPK_ONLY
def test_heads_members_on_dense_map_is_refused(dense_cache, folder, tmp_path):
    with pytest.raises(LogitCacheError, match=r"--heads members: not supported for dense-map targets \(cache .* holds "
                                              r"a 4x4 map per view\)"):
        train(dense_cache, folder, "image_dense_tiny", tmp_path / "run", heads="members", progress=False)


def test_by_position_of_a_clip_cache_is_refused(folder, tmp_path):
    out = logitcache.dump(folder, ["toy_image_teachers:image_a"], tmp_path / "clip.zarr", **{**DUMP, "topk": C})
    cache = logitcache.open_cache(out)
    assert "positions" not in cache.manifest and cache.position_shape is None
    with pytest.raises(LogitCacheError, match=r"clip.zarr: targets have no position map \(frames=None\); by_position "
                                              r"applies to dense-map caches"):
        cache.by_position(cache.targets(0))
