"""``demo --image``: scikit-learn's digits as an image folder, three exported CNN teachers, a cache of
crops and flips whose stored top-k the re-run teachers reproduce on replayed views, and students that
learn from it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from logitcache.cache import open_cache
from logitcache.cli.main import main
from logitcache.demo_image import STUDENT, TEACHERS, digits_folders, run_image_demo
from logitcache.errors import LogitCacheError
from logitcache.sources import open_source
from logitcache.targets import aggregate
from logitcache.views import replay

pytest.importorskip("sklearn")

# bigger than --quick, so that the numbers mean something (chance is 0.1), still seconds at 16x16
SMALL = dict(n_train=240, n_eval=100, size=16, teacher_epochs=5, dump_epochs=2, student_epochs=5, batch_size=32)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("image_demo")
    return out, run_image_demo(out, seed=0, progress=False, **SMALL)


def test_digits_folders_are_load_digits_upscaled(tmp_path):
    """Ids name the index into load_digits, the class folder is its digit, the pixels its upscaled ink."""
    from PIL import Image
    from sklearn.datasets import load_digits

    train_dir, eval_dir = digits_folders(tmp_path, n_train=40, n_eval=20, size=24, seed=1)
    train, held_out = open_source(train_dir), open_source(eval_dir)
    assert train.kind == held_out.kind == "image_folder"
    assert train.classes == held_out.classes == [str(d) for d in range(10)]
    assert (len(train), len(held_out)) == (40, 20)
    index = lambda folder: {int(i.split("/")[1][:4]) for i in folder.ids}  # noqa: E731
    assert not index(train) & index(held_out)
    digits = load_digits()
    for folder in (train, held_out):
        labels = folder.label_rows(np.arange(len(folder))).argmax(1)
        assert [int(digits.target[int(i.split("/")[1][:4])]) for i in folder.ids] == labels.tolist()
        assert sorted(set(labels.tolist())) == list(range(10))  # every digit on both sides
    i = sorted(index(held_out))[0]
    image = held_out.load(held_out.index[f"{digits.target[i]}/{i:04d}.png"])
    assert image.shape == (3, 24, 24) and image.dtype == torch.float32
    ink = Image.fromarray(np.round(digits.images[i] * 255 / 16).astype(np.uint8), "L").resize((24, 24), Image.BILINEAR)
    expected = torch.from_numpy(np.asarray(ink, np.float32) / 255)
    assert all(torch.equal(image[c], expected) for c in range(3))


def test_cache_holds_the_teachers_on_the_replayed_views(small_run):
    """Every stored epoch: replay a few ids, run the exported teachers on those views alone, average
    their softmax: the stored top-k classes come back, values to float16, stat = log-sum-exp."""
    out, summary = small_run
    cache = open_cache(out / "cache.zarr")
    assert cache.manifest["output_kind"] == "multiclass" and cache.manifest["aggregation"] == "mean_prob"
    assert [o["op"] for o in cache.manifest["augment"]["ops"]] == ["random_resized_crop", "hflip"]
    folder = open_source(out / "data" / "train")
    teachers = [torch.export.load(str(out / "teachers" / f"{t}.pt2")).module() for t in TEACHERS]
    flips = 0
    for epoch in range(SMALL["dump_epochs"]):
        ids = list(cache.ids[epoch::59][:5])  # spread over the classes
        views = torch.stack([replay(cache, folder, epoch, i) for i in ids])
        assert views.shape == (5, 3, 16, 16)
        with torch.no_grad():
            fresh = aggregate([t(views) for t in teachers], "multiclass", "mean_prob")
        stored = cache.targets(epoch, ids)
        values, indices = fresh.topk(stored.indices.shape[1], dim=1)
        np.testing.assert_array_equal(stored.indices, indices.numpy())
        np.testing.assert_allclose(stored.values.astype(np.float32), values.numpy(), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(stored.stat, torch.logsumexp(fresh, 1).numpy(), atol=1e-5)
        flips += int(cache.params(epoch, ids)["hflip.flip"].sum())
    assert summary["replay_check"]["topk_equal"] == summary["replay_check"]["ids"] == 8
    assert 0 < flips < 10  # some views flipped, some not


def test_students_learn_from_the_cache(small_run):
    """Chance is 0.1; the ensemble and the student distilled from its cache do better."""
    out, summary = small_run
    top1 = summary["top1"]
    assert list(top1) == [f"teacher {t}" for t in TEACHERS] + [
        "ensemble (mean softmax)", f"student {STUDENT} from cache (KD)", f"student {STUDENT} from labels"]
    assert top1["ensemble (mean softmax)"] > 0.4
    assert top1[f"student {STUDENT} from cache (KD)"] > 0.2
    for run_dir, alpha in (("student_kd", 0.0), ("student_labels", 1.0)):
        config = json.loads((out / run_dir / "config.json").read_text())
        assert (config["alpha"], config["epochs"], config["student"]) == (alpha, SMALL["student_epochs"], STUDENT)
        last = json.loads((out / run_dir / "metrics.jsonl").read_text().splitlines()[-1])
        assert last["eval_top1"] == top1[f"student {STUDENT} from {'cache (KD)' if alpha == 0 else 'labels'}"]
    assert json.loads((out / "summary.json").read_text()) == summary


def test_cli_demo_image_quick(tmp_path):
    """``logitcache demo --image --quick --json``: the summary on stdout, the table on stderr."""
    result = CliRunner().invoke(main, ["demo", "--image", "--quick", "--out", str(tmp_path / "d"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["settings"]["n_train"] == 60 and summary["epochs_stored"] == 1
    table = [ln.split() for ln in result.stderr.splitlines()]
    for name, value in summary["top1"].items():
        assert name.split() + [f"{value:.3f}"] in table, name
    assert summary["replay_check"]["topk_equal"] == 8


def test_image_demo_bad_sizes_are_one_line(tmp_path):
    with pytest.raises(LogitCacheError, match=r"^digits: n_train=5, n_eval=30 must be 10 or more each"):
        run_image_demo(tmp_path / "d", quick=True, n_train=5)
    with pytest.raises(LogitCacheError, match=r"^run_image_demo: unknown setting\(s\) \['clip_seconds'\]"):
        run_image_demo(tmp_path / "d", quick=True, clip_seconds=1.0)
