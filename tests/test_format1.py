"""Caches written by format 1 stay readable, exactly as written.

tests/fixtures/format1 holds a data folder and two caches dumped by the code of commit
75306bc50ddf2cf1bdaf1b45b4b6afcdfaf80c7b (format_version 1; see make_fixture.py there). The
literals below were read from them at that commit. They must never be regenerated from the code
under test: a failure means this logitcache reads format 1 differently from how it was written,
so every format-1 cache out there would now train on other targets or other views.
"""

from __future__ import annotations

import hashlib
import math
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

import logitcache
from logitcache.cache import config_digest
from logitcache.cli.main import main
from logitcache.report import inspect_cache, verify_cache
from logitcache.train import train
from conftest import teacher_logits

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "format1"
IDS = [f"audio/clip_{i:05d}.{'flac' if i == 1 else 'wav'}" for i in range(8)]
CLASSES = ["tone", "chirp_up", "chirp_down", "noise_burst", "click_train", "harmonic_stack", "am_tone",
           "fm_warble", "low_hum", "high_hiss"]
MEMBERS = ["toy_a", "toy_b"]
ORDER = [[5, 4, 3, 1, 7, 0, 6, 2], [4, 1, 3, 7, 0, 2, 6, 5]]  # both caches: same seed, same ids

# Shared by both caches: ids, order, seeds and done markers depend only on (data, seed, chunk_rows).
SHARED = {
    "done": ("uint8", (2, 2), "27ecd0a598e76f8a2fd264d427df0a119903e8eae384e478902541756f089dd1"),
    "ids/offsets": ("int64", (9,), "fd0fbcc53554f6bfd0fb3bfcee61d7561a77490934bbfe206a67d2d73589e1af"),
    "ids/utf8": ("uint8", (161,), "979d7198da3c5ddef3bd72587e11548bca3ddbf5749bd99cf81e1153d238796a"),
    "order": ("uint32", (2, 8), "0c1c7d5d64a3f438da43a718a2b4d9c85bd17702645d7c30f579e795bb07c56d"),
    "seeds": ("uint64", (2, 8), "bf171ebd13c389959412cac743b238a60324e15f95718a5bb122dd451db71913"),
}

# name -> what format 1 stored: manifest fields, first stored row of epoch 0, and per array
# (dtype, shape, sha256 of the C-order bytes).
CACHES = {
    "strong.zarr": {
        "backend": "zarr", "output_kind": "multilabel", "topk": 5,
        "config_digest": "f3a8b07fbc6ae6750186e476d445c358258d5c0a12ef54673b8a16ece2e11d4e",
        "first_row": ([3, 6, 4, 0, 9], [1.66796875, 1.650390625, 1.6123046875, 1.419921875, 0.84326171875],
                      -0.4293479919433594),
        "arrays": {
            **SHARED,
            "ensemble/indices": ("uint8", (2, 8, 5),
                                 "827a089917076ade71caeecda0be8c3f8935d6d31d3ec2e95f81554a43dd1153"),
            "ensemble/stat": ("float32", (2, 8),
                              "ca6a2987c40fb152ca774ed806037b4d4ef78e7a4ff1d1454421a64c308d866a"),
            "ensemble/values": ("float16", (2, 8, 5),
                                "8d73d5b70d0fc29a07470fe976e975b1fd22d105bc54717ac133fd257a766205"),
            "members/toy_a/indices": ("uint8", (2, 8, 5),
                                      "0a4a219f01bb37dc343317f30530d8ef9569d7b3fbedf9f1b7284c6b564d174b"),
            "members/toy_a/stat": ("float32", (2, 8),
                                   "73008665753b06427875c0d7fb71cf2537cf6e4cd53bbffd3cf263d569fcc35e"),
            "members/toy_a/values": ("float16", (2, 8, 5),
                                     "01ccb8513f92c966d8a4f8a890369c559cbb169af8da0d6173a67068e5b8e3fc"),
            "members/toy_b/indices": ("uint8", (2, 8, 5),
                                      "f5c5a384de3366d53525aeb20e7c63741d48f4f2de24011f12df4f6597817227"),
            "members/toy_b/stat": ("float32", (2, 8),
                                   "08409e56eafa55bef59a0a7ff3c91241b1feca12a78a12522a2b0be4bc4c064d"),
            "members/toy_b/values": ("float16", (2, 8, 5),
                                     "6153cd2d7f5f7b30f54da1ca1acf705b19fa2b378d0df77437f98c24ff5170ad"),
            "params/crop.start_s": ("float32", (2, 8),
                                    "d19b90c7926827b8da71a316ecdb681f5343786893b094d6031b8898ff394f3d"),
            "params/freq_mask.low_hz": ("float32", (2, 8, 2),
                                        "9ce56372f18bdda058e47693c585d184a220b09764e4dd2130c3e7bad18eed0a"),
            "params/freq_mask.width_hz": ("float32", (2, 8, 2),
                                          "f929758ddbe8d01cfa669369baca66152f4ed4350c31cca3fd5614636c219c17"),
            "params/gain.db": ("float32", (2, 8),
                               "7254481cf456a62d99d3537e019c4c4b2a847cbc1178b461bfb5d6e4b1785263"),
            "params/mixup.lam": ("float32", (2, 8),
                                 "e8c03e94dc7da22648a71e8c8852c1eeb8da9cca018687af70f3d66d5bd946e9"),
            "params/mixup.partner": ("int64", (2, 8),
                                     "34742074207f96cc6b733fd01188d1521980fcfb626fce0c131d71bde9f56f44"),
            "params/noise.seed": ("uint64", (2, 8),
                                  "4e1ca9521338652975cb73dacc09df2dff368dce3b02e0c7a7bebc6c6db05317"),
            "params/noise.snr_db": ("float32", (2, 8),
                                    "da0e759d6b80871a9c7f5b7d921ae965e07721b3381f31c563b08d9b3b216ce7"),
            "params/shift.seconds": ("float32", (2, 8),
                                     "6916796c9851d405fade06d489a5c13de3fd0ae5f2dbdc10d18ed5e56a2ebae6"),
            "params/time_mask.start_s": ("float32", (2, 8, 2),
                                         "b17f3ba10df1fe6f7eebf95eff770e6d9d5a65d9d1b2b6790b5e5f06532ea266"),
            "params/time_mask.width_s": ("float32", (2, 8, 2),
                                         "f3bed81e30c1728c5d9266221029c1d52e54b507d9c02c338134ffe514fd77fb"),
        },
    },
    "ced.h5": {
        "backend": "hdf5", "output_kind": "multiclass", "topk": 3,
        "config_digest": "9433c9c9c41527cf0a582ff5c6ff97e27b0f583cd002c5463e7e389f7e13fa93",
        "first_row": ([9, 7, 4], [-1.5341796875, -1.564453125, -1.7763671875], -1.1920928955078125e-07),
        "arrays": {
            **SHARED,
            "ensemble/indices": ("uint8", (2, 8, 3),
                                 "148e14316aa172019fadf99edd360a730dcf62f088a7e7b1bce3ca0fbb14ee91"),
            "ensemble/stat": ("float32", (2, 8),
                              "c9e0efcadc914681c4b52e0487bb0c1c7a6e9bcb2bab9ce22eaa0b0418195711"),
            "ensemble/values": ("float16", (2, 8, 3),
                                "6a45ad8850af145a2fee450d4b3b71a22a792e1b2b74f77e322f1dc14123d5f3"),
            "members/toy_a/indices": ("uint8", (2, 8, 3),
                                      "74c7dc66e7853bf1a61b9bc4ed17938adbcb7e1e779c2bd8d8791ebed081c3f6"),
            "members/toy_a/stat": ("float32", (2, 8),
                                   "0a921250bad2265643a852491e2acfeb2883e520f61f1965a032e1d799d1a6bd"),
            "members/toy_a/values": ("float16", (2, 8, 3),
                                     "f9b52dd7c5d8cd90c2eeee5fd9646ec99ae5906725412d098947d3dbbc87f388"),
            "members/toy_b/indices": ("uint8", (2, 8, 3),
                                      "a9e428a39925ac467df72594987c37285336e16b4373694cfd29b18c3361e7c9"),
            "members/toy_b/stat": ("float32", (2, 8),
                                   "1b5469728b673823a8470e5ed47906460dea18ddce70f0fcf8c2dde4a14e0907"),
            "members/toy_b/values": ("float16", (2, 8, 3),
                                     "82ec9b2430f72b59a98a4361598eb8cc4d662f3f52ecca77dff645f08d7cf787"),
            "params/freq_mask.low_hz": ("float32", (2, 8, 1),
                                        "da25f6c4e97937b37912c3ffffc52c05a9a237d1875c8ffae8c9ed0885ee741b"),
            "params/freq_mask.width_hz": ("float32", (2, 8, 1),
                                          "b2460786b9d50b0bf4657f13385727ed6209d12fa530e2c2bef4c32e117ab859"),
            "params/shift.seconds": ("float32", (2, 8),
                                     "f7b83092bb2fa763441d3df57ea4f1b302346795a25a0838bca381d731a6706f"),
            "params/time_mask.start_s": ("float32", (2, 8, 1),
                                         "59acf8a1d0acba68dc4042caa0e7e92704c54c862e5c273f809e50608e11b455"),
            "params/time_mask.width_s": ("float32", (2, 8, 1),
                                         "2dd997ca3a231af8314b323b8c10e9cf7023d4847f8f5df1f2abbff3f818a4cd"),
        },
    },
}
NAMES = list(CACHES)


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> Path:
    """A copy of the fixture folder: tests never open the committed bytes, so nothing can touch them."""
    root = tmp_path_factory.mktemp("format1")
    for name in ["data", *CACHES]:
        src = FIXTURE / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, root / name)
    return root


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _raw_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array read with zarr / h5py directly, bypassing logitcache."""
    if path.suffix == ".zarr":
        return {name: arr[...] for name, arr in _walk_zarr(zarr.open_group(str(path), mode="r"))}
    out = {}
    with h5py.File(path, "r") as f:
        def keep(name, obj):
            if isinstance(obj, h5py.Dataset):
                out[name] = obj[()]

        f.visititems(keep)
    return out


def _walk_zarr(group, prefix: str = ""):
    for name, arr in group.arrays():
        yield prefix + name, arr
    for name, sub in group.groups():
        yield from _walk_zarr(sub, f"{prefix}{name}/")


# ---------------------------------------------------------------- bytes and manifest
def test_committed_fixture_bytes_are_the_format1_ones(fx):
    """The fixture itself (read with zarr/h5py, not logitcache) still holds what format 1 wrote."""
    for name, want in CACHES.items():
        raw = _raw_arrays(fx / name)
        assert {k: (str(v.dtype), v.shape, _sha(v)) for k, v in raw.items()} == want["arrays"], name


@pytest.mark.parametrize("name", NAMES)
def test_format1_cache_opens_with_its_manifest(fx, name):
    want = CACHES[name]
    with logitcache.open_cache(fx / name) as cache:
        m = cache.manifest
        assert (m["format"], m["format_version"], m["backend"], m["tool_version"]) == \
            ("logitcache", 1, want["backend"], "0.1.0")
        assert m["config_digest"] == want["config_digest"] == config_digest(m)
        assert m["dataset"]["fingerprint"] == \
            "e2bc906cc1017dfdd1321fa0f93cf2a8d3c89d73acdf3d0a1923620de05d7073"
        shape = (cache.complete, cache.epochs, cache.num_samples, cache.topk, cache.chunk_rows, cache.frames)
        assert shape == (True, 2, 8, want["topk"], 4, None)
        assert (cache.output_kind, m["aggregation"], m["value_dtype"], m["index_dtype"], m["seed"]) == \
            (want["output_kind"], "mean_prob", "float16", "uint8", 7)
        assert cache.classes == CLASSES and cache.members == MEMBERS and cache.ids == IDS
        assert [cache.order(e).tolist() for e in range(2)] == ORDER
        assert cache.chunks_done().tolist() == [[True, True], [True, True]]


@pytest.mark.parametrize("name", NAMES)
def test_format1_arrays_read_back_bit_for_bit(fx, name):
    want = CACHES[name]["arrays"]
    with logitcache.open_cache(fx / name) as cache:
        assert sorted(cache.store.arrays()) == sorted(want)
        got = {n: cache.store.read(n) for n in want}
        assert {n: (str(a.dtype), a.shape, _sha(a)) for n, a in got.items()} == want
        params = sorted(n.removeprefix("params/") for n in want if n.startswith("params/"))
        assert sorted(cache.param_names()) == params
        for epoch in range(2):
            # random access (targets/params of ids) gathers the very rows the arrays hold
            pos = cache.positions(epoch)[cache.dataset_index(IDS[::-1])]
            for member in [None, *MEMBERS]:
                prefix = "ensemble" if member is None else f"members/{member}"
                whole = cache.targets(epoch, member=member)
                picked = cache.targets(epoch, IDS[::-1], member=member)
                for field in ("values", "indices", "stat"):
                    assert np.array_equal(getattr(whole, field), got[f"{prefix}/{field}"][epoch])
                    assert np.array_equal(getattr(picked, field), got[f"{prefix}/{field}"][epoch][pos])
            for p, rows in cache.params(epoch, IDS[::-1]).items():
                assert np.array_equal(rows, got[f"params/{p}"][epoch][pos], equal_nan=True)


@pytest.mark.parametrize("name", NAMES)
def test_first_stored_row_literal(fx, name):
    indices, values, stat = CACHES[name]["first_row"]
    with logitcache.open_cache(fx / name) as cache:
        t = cache.targets(0, [IDS[ORDER[0][0]]])
    assert t.indices.tolist() == [indices]
    assert t.values.dtype == np.float16 and t.values.astype(np.float64).tolist() == [values]
    assert t.stat.tolist() == [stat]


def test_strong_fixture_holds_every_kind_of_drawn_parameter(fx):
    """The zarr fixture exercises crop, mixup and noise both on and off, so replay below has teeth."""
    with logitcache.open_cache(fx / "strong.zarr") as cache:
        p = cache.params(0, IDS)
    assert p["crop.start_s"].tolist() == pytest.approx([0.00725, 0, 0, 0, 0, 0, 0.04175, 0])
    assert p["mixup.partner"].tolist() == [-1, -1, -1, -1, -1, 3, 4, -1]
    assert np.isinf(p["noise.snr_db"]).tolist() == [False, True, True, False, False, True, True, False]
    assert p["noise.seed"].tolist()[:4] == [2442229630581976, 0, 0, 3322744787231668]


# ---------------------------------------------------------------- tools on a format-1 cache
@pytest.mark.parametrize("name,arrays,chunks", [("strong.zarr", 25, 88), ("ced.h5", 19, 64)])
def test_verify_passes_on_format1(fx, name, arrays, chunks):
    report = verify_cache(fx / name)
    assert report == {"ok": True, "problems": [], "arrays_checked": arrays, "chunks_checked": chunks,
                      "rows_checked": 16}


@pytest.mark.parametrize("name", NAMES)
def test_inspect_works_on_format1(fx, name):
    info = inspect_cache(fx / name)
    want = CACHES[name]
    assert {k: info[k] for k in ("backend", "complete", "samples", "epochs", "topk", "classes", "output_kind",
                                 "members", "value_dtype", "chunk_rows", "chunks_done", "chunks_total")} == \
        {"backend": want["backend"], "complete": True, "samples": 8, "epochs": 2, "topk": want["topk"],
         "classes": 10, "output_kind": want["output_kind"], "members": MEMBERS, "value_dtype": "float16",
         "chunk_rows": 4, "chunks_done": 4, "chunks_total": 4}
    assert sorted(a["name"] for a in info["arrays"]) == sorted(want["arrays"])
    assert info["bytes_on_disk"] > 0 and info["audio_bytes"] == 153459


def test_cli_inspect_and_verify_on_format1(fx):
    for name in NAMES:
        verify = CliRunner().invoke(main, ["verify", str(fx / name)])
        assert verify.exit_code == 0, verify.output
        assert verify.stdout.startswith(f"ok: {fx / name}: ")
        shown = CliRunner().invoke(main, ["inspect", str(fx / name)])
        assert shown.exit_code == 0, shown.output
        assert f"top-{CACHES[name]['topk']} of 10 classes" in shown.stdout


# ---------------------------------------------------------------- replay and train
def _ensemble(logits: list[np.ndarray], kind: str) -> np.ndarray:
    """mean_prob ensemble logits, in float64 numpy (independent of logitcache.targets)."""
    z = np.stack([x.astype(np.float64) for x in logits])
    if kind == "multiclass":
        p = np.exp(z - z.max(-1, keepdims=True))
        return np.log((p / p.sum(-1, keepdims=True)).mean(0))
    p = (1 / (1 + np.exp(-z))).mean(0)
    return np.log(p) - np.log1p(-p)


def _stat(z: np.ndarray, indices: np.ndarray, kind: str) -> np.ndarray:
    if kind == "multiclass":
        m = z.max(-1, keepdims=True)
        return (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))[..., 0]
    tail = np.ones(z.shape, bool)
    np.put_along_axis(tail, indices, False, axis=-1)
    p = np.where(tail, 1 / (1 + np.exp(-z)), 0.0).sum(-1) / tail.sum(-1)
    return np.log(p) - np.log1p(-p)


def _assert_rows_match(stored, z: np.ndarray, kind: str, what: str, exact: bool) -> None:
    """Stored top-k of logits ``z``; with ``exact`` (z holds the teacher's float32 logits, not a
    float64 recomputation) the stored float16 values are z's own rounding, bit for bit."""
    k = stored.indices.shape[-1]
    want = np.argsort(-z, axis=-1, kind="stable")[:, :k]
    assert np.array_equal(stored.indices.astype(np.int64), want), what
    top = np.take_along_axis(z, want, -1)
    # float16 keeps 11 significant bits: a stored value is within half an ulp (2**-11 relative) of the logit
    np.testing.assert_allclose(stored.values.astype(np.float64), top, rtol=2**-11, atol=1e-6, err_msg=what)
    if exact:
        assert np.array_equal(stored.values, top.astype(np.float32).astype(np.float16)), what
    np.testing.assert_allclose(stored.stat, _stat(z, want, kind), rtol=1e-5, atol=1e-5, err_msg=what)


@pytest.mark.parametrize("name", NAMES)
def test_replayed_format1_views_are_what_the_teachers_saw(fx, name):
    """Re-running the toy teachers on ``replay``'s views reproduces every stored top-k row."""
    kind = CACHES[name]["output_kind"]
    with logitcache.open_cache(fx / name) as cache:
        for epoch in range(2):
            views = torch.stack([logitcache.replay(cache, fx / "data", epoch, i) for i in IDS])
            assert views.shape == (8, 8000) and views.dtype == torch.float32
            logits = {m: teacher_logits(m, views) for m in MEMBERS}
            for member in MEMBERS:
                stored = cache.targets(epoch, IDS, member=member)
                _assert_rows_match(stored, logits[member].astype(np.float64), kind,
                                   f"{name} epoch {epoch} {member}", exact=True)
            ens = _ensemble(list(logits.values()), kind)
            _assert_rows_match(cache.targets(epoch, IDS), ens, kind, f"{name} epoch {epoch} ensemble",
                               exact=False)


@pytest.mark.parametrize("name", NAMES)
def test_train_runs_from_a_format1_cache(fx, name, tmp_path):
    result = train(fx / name, fx / "data", "cnn_tiny", tmp_path / "run", epochs=1, batch_size=4, max_steps=2,
                   record_steps=True, device="cpu", progress=False)
    assert len(result["step_losses"]) == 2 and all(math.isfinite(x) for x in result["step_losses"])
    assert result["samples"] == 8


def test_verify_finds_a_stored_order_that_is_not_a_permutation(fx, tmp_path):
    """Format 1 (and format 2 before derived arrays) stores ``order``; verify checks it per epoch."""
    from logitcache.storage import open_store

    path = tmp_path / "strong.zarr"
    shutil.copytree(fx / "strong.zarr", path)
    store = open_store(path, "r+")
    order = store.read("order", (1, slice(0, 4)))
    order[0] = order[1]
    store.write("order", (1, slice(0, 4)), order)  # rewritten whole: its checksum is valid
    problems = verify_cache(path)["problems"]
    assert "order: epoch 1 is not a permutation of 0..7 (1 index(es) missing, 1 repeated)" in problems
