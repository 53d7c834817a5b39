"""Teachers that differ from the dataset (logitcache.hetero): their own input rate and clip length,
their own label space (class maps, specialists).

Every target is checked against an independent computation: the views replayed from the cache,
resampled with ``torchaudio.functional.resample`` and cropped/padded by hand, a fresh toy teacher
run one row at a time, its outputs picked by class name, and the ensemble rule in float64 numpy.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torchaudio.functional as AF
from click.testing import CliRunner

import logitcache
import toy_teachers
from conftest import SR, C, assert_one_line_error, dense, stream_views
from logitcache.cli.main import main
from logitcache.errors import LogitCacheError
from logitcache.hetero import ABSENT_LOGIT
from logitcache.synth import CLASSES

COMMON = dict(epochs=1, topk=C, seed=3, batch_size=8, value_dtype="float32", sample_rate=SR, clip_seconds=1.0,
              num_workers=0, progress=False)
# (seed, classes, scale) of the ToyTeacher each spec builds
TOYS = {"toy_a": (1, C, 3.0), "toy_b": (2, C, 3.0), "toy_c": (3, C, 2.0), "wide": (11, 16, 3.0),
        "renamed": (2, C, 3.0), "spec4": (12, 4, 3.0)}
EXTRA = ["speech", "music", "dog", "rain", "siren", "engine"]
WIDE_CLASSES = [CLASSES[i] for i in (7, 2, 9, 0, 4, 1, 8, 3, 6, 5)][:5] + EXTRA[:3] + \
    [CLASSES[i] for i in (5, 6, 3, 8, 1)] + EXTRA[3:]  # 16 outputs: the 10 dataset classes shuffled among 6 others
RENAMED = {f"T{i}": CLASSES[(3 * i + 1) % C] for i in range(C)}  # output i -> dataset class (3i+1) mod 10
SPEC4 = {"s0": "am_tone", "s1": "tone", "s2": "low_hum", "s3": "chirp_up"}  # a specialist on 4 classes


@pytest.fixture(scope="module")
def aug(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("aug") / "cheap.toml"
    path.write_text('ops = [\n  {op = "shift", p = 1.0},\n  {op = "gain"},\n  {op = "noise", p = 0.7},\n]\n')
    return str(path)


# spec name -> (the toy it builds, what else the spec declares)
SPECS = {"t32": ("toy_b", {"sample_rate": 32000}), "wide": ("wide", {"class_map": "wide_map.json"}),
         "renamed": ("renamed", {"class_map": "renamed_map.json"}), "spec4": ("spec4", {"class_map": "spec4_map.json"}),
         "plain4": ("spec4", {}), "plain16": ("wide", {})}


@pytest.fixture(scope="module")
def specs(tmp_path_factory) -> dict[str, str]:
    """Teacher .json specs (and their class maps) in one folder; name -> spec path."""
    d = tmp_path_factory.mktemp("specs")
    (d / "wide_map.json").write_text(json.dumps({"teacher_classes": WIDE_CLASSES}))  # by name
    (d / "renamed_map.json").write_text(json.dumps({"teacher_classes": list(RENAMED), "map": RENAMED}))
    (d / "spec4_map.json").write_text(json.dumps({"teacher_classes": list(SPEC4), "map": SPEC4}))
    for name, (toy, extra) in SPECS.items():
        seed, classes, scale = TOYS[toy]
        doc = {"factory": "toy_teachers:ToyTeacher", "kwargs": {"seed": seed, "num_classes": classes, "scale": scale},
               **extra}
        (d / f"{name}.json").write_text(json.dumps(doc))
    return {name: str(d / f"{name}.json") for name in SPECS}


# ---------------------------------------------------------------- independent references
def toy_logits(name: str, waves: list[torch.Tensor]) -> np.ndarray:
    """A fresh toy teacher, one row at a time (float32 logits, as the teacher returns them)."""
    seed, classes, scale = TOYS[SPECS[name][0] if name in SPECS else name]
    model = toy_teachers.ToyTeacher(seed, num_classes=classes, scale=scale).eval()
    with torch.inference_mode():
        return torch.cat([model(w[None]) for w in waves]).numpy()


def teacher_input(view: torch.Tensor, rate: int | None = None, seconds: float | None = None) -> torch.Tensor:
    w = view if rate is None else AF.resample(view, SR, rate)
    if seconds is not None:
        n = round(seconds * (rate or SR))
        w = torch.nn.functional.pad(w[:n], (0, max(0, n - w.shape[-1])))
    return w


def by_name(teacher_classes: list[str], mapping: dict[str, str] | None = None) -> list[int]:
    """Per dataset class, the teacher output it takes (-1: not covered)."""
    mapping = mapping or {c: c for c in teacher_classes if c in CLASSES}
    back = {dst: teacher_classes.index(src) for src, dst in mapping.items()}
    return [back.get(c, -1) for c in CLASSES]


def mapped(z: np.ndarray, cols: list[int]) -> np.ndarray:
    out = z[:, np.maximum(cols, 0)].copy()
    out[:, np.asarray(cols) < 0] = ABSENT_LOGIT
    return out


def sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0, -z))


def _lse(z: np.ndarray) -> np.ndarray:
    m = z.max(-1, keepdims=True)
    return m + np.log(np.exp(z - m).sum(-1, keepdims=True))


def reference_ensemble(zs: list[np.ndarray], covers: list[list[bool]], kind: str, method: str,
                       weights: list[float] | None = None) -> np.ndarray:
    """The README's rule in float64: per class, a weighted mean over the members covering it;
    softmax specialists scaled into the mass the full members' ensemble gives their class set,
    the row renormalised. Returns logits (sigmoid) or log-probabilities (softmax)."""
    z, cov = np.stack([x.astype(np.float64) for x in zs]), np.asarray(covers, bool)[:, None, :]
    w = np.ones(len(zs)) if weights is None else np.asarray(weights, np.float64)
    wc = w[:, None, None] * cov
    n = wc.sum(0)
    if kind == "multilabel":
        if method == "mean_logit":
            return (wc * z).sum(0) / n
        p = (wc * sigmoid(z)).sum(0) / n
        return np.log(p) - np.log1p(-p)
    masked = np.where(cov, z, -np.inf)
    P = np.exp(masked - _lse(masked))  # each member's softmax over its own classes
    full = np.asarray(covers).all(1)
    wf = w[full] / w[full].sum()
    if method == "mean_prob":
        ref = (wf[:, None, None] * P[full]).sum(0)
    else:
        mean = (wf[:, None, None] * z[full]).sum(0)
        ref = np.exp(mean - _lse(mean))
    scaled = np.stack([P[m] if full[m] else P[m] * (ref * cov[m]).sum(-1, keepdims=True) for m in range(len(zs))])
    if method == "mean_prob":
        p = (wc * scaled).sum(0) / n
        return np.log(p / p.sum(-1, keepdims=True))
    with np.errstate(divide="ignore", invalid="ignore"):  # log 0 where a member is absent, masked out
        logs = np.where(cov, wc * np.log(scaled), 0).sum(0) / n
    return logs - _lse(logs)


def stored_dense(t) -> np.ndarray:
    return dense(t.values, t.indices, C)


def as_logprob(t) -> np.ndarray:
    return stored_dense(t) - t.stat.astype(np.float64)[:, None]


# ---------------------------------------------------------------- per-teacher rates and clip lengths
@pytest.fixture(scope="module")
def rates_cache(tmp_path_factory, dataset, specs, aug):
    """toy_a at the dump's rate cropped to 0.5 s, t32 (toy_b) declaring 32 kHz in its spec, toy_c at
    22.05 kHz padded to 1.25 s; softmax, k = C, float32."""
    out = tmp_path_factory.mktemp("rates") / "rates.zarr"
    return logitcache.dump(dataset, ["toy_teachers:toy_a", specs["t32"], "toy_teachers:toy_c"], out,
                           augment=aug, output_kind="multiclass", teacher_sample_rates=[None, None, 22050],
                           teacher_clip_seconds=[0.5, None, 1.25], **COMMON)


def _rates_inputs(views: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    return {"toy_a": [teacher_input(v, None, 0.5) for v in views], "t32": [teacher_input(v, 32000) for v in views],
            "toy_c": [teacher_input(v, 22050, 1.25) for v in views]}


def test_teacher_at_twice_the_rate_gets_torchaudio_resample_of_the_view(rates_cache, dataset):
    cache = logitcache.open_cache(rates_cache)
    views = stream_views(rates_cache, dataset, 0)
    waves = [AF.resample(v, SR, 2 * SR) for v in views]
    assert all(w.shape == (2 * views.shape[1],) for w in waves)
    want = toy_logits("t32", waves)
    got = stored_dense(cache.targets(0, cache.ids, member="t32"))
    assert np.array_equal(got, want.astype(np.float64))  # bit for bit: the same resampler, row by row
    # and the test can tell: the view at the dump's rate gives other logits
    assert not np.allclose(toy_logits("t32", list(views)), want, atol=1e-3)


def test_teachers_at_different_rates_in_one_dump(rates_cache, dataset):
    cache = logitcache.open_cache(rates_cache)
    teachers = {t["name"]: t for t in cache.manifest["teachers"]}
    assert {n: (t.get("sample_rate"), t.get("clip_seconds")) for n, t in teachers.items()} == \
        {"toy_a": (None, 0.5), "t32": (32000, None), "toy_c": (22050, 1.25)}
    assert cache.manifest["augment"]["sample_rate"] == SR  # the view is drawn once, at the dataset's rate
    views = stream_views(rates_cache, dataset, 0)
    inputs = _rates_inputs(views)
    # cropped; padded to round(1.25 * 22050) = 27562 (half to even, as the augmenter rounds)
    assert inputs["toy_a"][0].shape == (8000,) and inputs["toy_c"][0].shape == (27562,)
    online = {m: toy_logits(m, inputs[m]) for m in cache.members}
    for m in cache.members:
        assert np.array_equal(stored_dense(cache.targets(0, cache.ids, member=m)), online[m].astype(np.float64)), m
    ens = reference_ensemble(list(online.values()), [[True] * C] * 3, "multiclass", "mean_prob")
    np.testing.assert_allclose(as_logprob(cache.targets(0, cache.ids)), ens, rtol=0, atol=2e-5)


def test_resampling_does_not_depend_on_the_batch(rates_cache, dataset, specs, aug, tmp_path):
    other = logitcache.dump(dataset, ["toy_teachers:toy_a", specs["t32"], "toy_teachers:toy_c"], tmp_path / "b5.zarr",
                            augment=aug, output_kind="multiclass", teacher_sample_rates=[None, None, 22050],
                            teacher_clip_seconds=[0.5, None, 1.25], **{**COMMON, "batch_size": 5})
    a, b = logitcache.open_cache(rates_cache), logitcache.open_cache(other)
    for member in [None, *a.members]:
        ta, tb = a.targets(0, a.ids, member=member), b.targets(0, b.ids, member=member)
        for f in ("values", "indices", "stat"):
            assert np.array_equal(getattr(ta, f), getattr(tb, f)), (member, f)


def test_fidelity_reruns_each_teacher_at_its_recorded_rate(rates_cache, dataset, specs):
    from logitcache.reports.fidelity import fidelity

    report = fidelity(rates_cache, dataset, ["toy_teachers:toy_a", specs["t32"], "toy_teachers:toy_c"], samples=8,
                      device="cpu")
    assert report["teachers_match"] and report["max_abs_logit_error"] == 0.0
    assert all(r["max_abs_logit_error"] == 0.0 for r in report["members"].values())


def test_teacher_sample_rate_from_the_cli(dataset, tmp_path, aug):
    out = tmp_path / "cli.zarr"
    result = CliRunner().invoke(main, ["dump", "--data", str(dataset), "--teacher", "toy_teachers:toy_a", "--teacher",
                                       "toy_teachers:toy_b", "--teacher-sample-rate", "-", "--teacher-sample-rate",
                                       "32000", "--teacher-clip-seconds", "-", "--teacher-clip-seconds", "0.75",
                                       "--out", str(out), "--topk", str(C), "--augment", aug, "--device", "cpu",
                                       "--value-dtype", "float32", "--clip-seconds", "1", "--workers", "0"])
    assert result.exit_code == 0, result.output
    cache = logitcache.open_cache(out)
    assert [(t.get("sample_rate"), t.get("clip_seconds")) for t in cache.manifest["teachers"]] == \
        [(None, None), (32000, 0.75)]
    views = stream_views(out, dataset, 0)
    want = toy_logits("toy_b", [teacher_input(v, 32000, 0.75) for v in views])
    assert np.array_equal(stored_dense(cache.targets(0, cache.ids, member="toy_b")), want.astype(np.float64))


def test_resume_with_another_teacher_sample_rate_is_refused(dataset, tmp_path):
    kw = dict(COMMON, augment="none", output_kind="multiclass")
    out = logitcache.dump(dataset, ["toy_teachers:toy_a"], tmp_path / "r.zarr", teacher_sample_rates=[32000], **kw)
    before = logitcache.open_cache(out).targets(0).values.copy()
    with pytest.raises(LogitCacheError) as e:
        logitcache.dump(dataset, ["toy_teachers:toy_a"], out, teacher_sample_rates=[22050], resume=True, **kw)
    assert_one_line_error(e, "cannot resume", "teacher 1 (toy_a: sample_rate)")
    assert np.array_equal(logitcache.open_cache(out).targets(0).values, before)


# ---------------------------------------------------------------- bad rates: one line, nothing written
BAD_RATES = {
    "zero": (dict(teacher_sample_rates=[0]), ["--teacher-sample-rate 0", "teacher toy_a"]),
    "negative": (dict(teacher_sample_rates=[-16000]), ["--teacher-sample-rate -16000"]),
    "fractional": (dict(teacher_sample_rates=[44100.5]), ["--teacher-sample-rate 44100.5", "whole number"]),
    "text": (dict(teacher_sample_rates=["16k"]), ["--teacher-sample-rate 16k"]),
    "absurd": (dict(teacher_sample_rates=[10**9]), ["--teacher-sample-rate 1000000000", "768000"]),
    "more_than_teachers": (dict(teacher_sample_rates=[16000, 32000]), ["2 --teacher-sample-rate values for 1"]),
    "clip_zero": (dict(teacher_clip_seconds=[0]), ["--teacher-clip-seconds 0"]),
    "clip_under_a_sample": (dict(teacher_clip_seconds=[1e-6]), ["under one sample at 16000 Hz"]),
}


@pytest.mark.parametrize("case", list(BAD_RATES))
def test_bad_teacher_rate_is_one_line(dataset, tmp_path, case):
    kw, needles = BAD_RATES[case]
    with pytest.raises(LogitCacheError) as e:
        logitcache.dump(dataset, ["toy_teachers:toy_a"], tmp_path / "x.zarr", augment="none", **{**COMMON, **kw})
    assert_one_line_error(e, *needles)
    assert not (tmp_path / "x.zarr").exists()


def test_bad_teacher_rate_in_a_spec_file_is_one_line(dataset, tmp_path):
    spec = tmp_path / "t.json"
    spec.write_text(json.dumps({"factory": "toy_teachers:toy_a", "sample_rate": "32k"}))
    with pytest.raises(LogitCacheError) as e:
        logitcache.dump(dataset, [str(spec)], tmp_path / "x.zarr", augment="none", **COMMON)
    assert_one_line_error(e, str(spec), "sample_rate '32k'")


def test_teacher_rate_given_in_spec_and_option_is_refused(dataset, specs, tmp_path):
    with pytest.raises(LogitCacheError) as e:
        logitcache.dump(dataset, [specs["t32"]], tmp_path / "x.zarr", augment="none", teacher_sample_rates=[22050],
                        **COMMON)
    assert_one_line_error(e, "--teacher-sample-rate 22050", "t32.json", "one place")


def test_bad_teacher_sample_rate_from_the_cli_is_one_line(dataset, tmp_path):
    result = CliRunner().invoke(main, ["dump", "--data", str(dataset), "--teacher", "toy_teachers:toy_a",
                                       "--teacher-sample-rate", "fast", "--out", str(tmp_path / "x.zarr")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.strip().splitlines()[-1].startswith("error: --teacher-sample-rate fast: must be")


# ---------------------------------------------------------------- class maps: other label spaces
@pytest.fixture(scope="module")
def mapped_cache(tmp_path_factory, dataset, specs, aug):
    """toy_a, a 16-class teacher mapped by name (wide), a renamed and reordered one; sigmoid, k = C."""
    out = tmp_path_factory.mktemp("maps") / "maps.zarr"
    return logitcache.dump(dataset, ["toy_teachers:toy_a", specs["wide"], specs["renamed"]], out, augment=aug,
                           output_kind="multilabel", **COMMON)


def test_larger_label_space_is_mapped_by_name(mapped_cache, dataset):
    cache = logitcache.open_cache(mapped_cache)
    views = list(stream_views(mapped_cache, dataset, 0))
    cols = by_name(WIDE_CLASSES)
    assert min(cols) >= 0 and len(set(cols)) == C
    want = mapped(toy_logits("wide", views), cols)
    assert np.array_equal(stored_dense(cache.targets(0, cache.ids, member="wide")), want.astype(np.float64))
    record = next(t for t in cache.manifest["teachers"] if t["name"] == "wide")["class_map"]
    assert record["teacher_classes"] == 16 and record["columns"] == cols and record["file"].endswith("wide_map.json")


def test_differently_ordered_label_space_is_mapped(mapped_cache, dataset):
    cache = logitcache.open_cache(mapped_cache)
    views = list(stream_views(mapped_cache, dataset, 0))
    z = toy_logits("renamed", views)
    want = np.empty_like(z)
    for i in range(C):  # teacher output i is dataset class (3i+1) mod 10
        want[:, (3 * i + 1) % C] = z[:, i]
    assert np.array_equal(stored_dense(cache.targets(0, cache.ids, member="renamed")), want.astype(np.float64))
    online = [toy_logits("toy_a", views), mapped(toy_logits("wide", views), by_name(WIDE_CLASSES)), want]
    ens = reference_ensemble(online, [[True] * C] * 3, "multilabel", "mean_prob")
    np.testing.assert_allclose(stored_dense(cache.targets(0, cache.ids)), ens, rtol=1e-5, atol=1e-5)


def test_fidelity_applies_the_recorded_class_maps(mapped_cache, dataset, specs):
    from logitcache.reports.fidelity import fidelity

    report = fidelity(mapped_cache, dataset, ["toy_teachers:toy_a", specs["wide"], specs["renamed"]], samples=6,
                      device="cpu")
    assert report["max_abs_logit_error"] == 0.0 and report["members"]["wide"]["max_abs_logit_error"] == 0.0


# ---------------------------------------------------------------- specialists
def _specialist_dump(dataset, specs, aug, tmp_path, kind, aggregation, **kw):
    return logitcache.dump(dataset, ["toy_teachers:toy_a", specs["wide"], specs["spec4"]], tmp_path / "s.zarr",
                           augment=aug, output_kind=kind, aggregation=aggregation, unmapped="ignore",
                           **{**COMMON, **kw})


@pytest.mark.parametrize("kind,aggregation", [("multilabel", "mean_prob"), ("multilabel", "mean_logit"),
                                              ("multiclass", "mean_prob"), ("multiclass", "mean_logit")])
def test_specialist_contributes_only_to_its_classes(dataset, specs, aug, tmp_path, kind, aggregation):
    path = _specialist_dump(dataset, specs, aug, tmp_path, kind, aggregation)
    cache = logitcache.open_cache(path)
    views = list(stream_views(path, dataset, 0))
    cols4 = by_name(list(SPEC4), SPEC4)
    covers = [[True] * C, [True] * C, [c >= 0 for c in cols4]]
    online = [toy_logits("toy_a", views), mapped(toy_logits("wide", views), by_name(WIDE_CLASSES)),
              mapped(toy_logits("spec4", views), cols4)]
    member = stored_dense(cache.targets(0, cache.ids, member="spec4"))
    assert np.array_equal(member, online[2].astype(np.float64))  # absent classes at ABSENT_LOGIT
    absent = [c for c, col in zip(CLASSES, cols4) if col < 0]
    assert cache.manifest["target_sets"]["members/spec4"]["absent_classes"] == absent
    assert "absent_classes" not in cache.manifest["target_sets"]["ensemble"]
    want = reference_ensemble(online, covers, kind, aggregation)
    got = stored_dense(cache.targets(0, cache.ids)) if kind == "multilabel" else as_logprob(cache.targets(0, cache.ids))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)
    # the specialist moved the classes it covers, and only those
    without = reference_ensemble(online[:2], covers[:2], kind, aggregation)
    moved = ~np.isclose(want, without, rtol=0, atol=1e-4).all(0)
    if kind == "multilabel":
        assert moved.tolist() == covers[2]


def test_fidelity_rebuilds_a_specialist_ensemble(dataset, specs, aug, tmp_path):
    from logitcache.reports.fidelity import fidelity

    path = _specialist_dump(dataset, specs, aug, tmp_path, "multilabel", "mean_prob")
    report = fidelity(path, dataset, ["toy_teachers:toy_a", specs["wide"], specs["spec4"]], samples=8, device="cpu")
    assert report["max_abs_logit_error"] == 0.0 and report["members"]["spec4"]["max_abs_logit_error"] == 0.0


def test_softmax_specialist_keeps_the_full_members_mass_on_its_classes(dataset, specs, aug, tmp_path):
    path = _specialist_dump(dataset, specs, aug, tmp_path, "multiclass", "mean_prob")
    cache = logitcache.open_cache(path)
    views = list(stream_views(path, dataset, 0))
    full = [toy_logits("toy_a", views), mapped(toy_logits("wide", views), by_name(WIDE_CLASSES))]
    p_full = np.exp(reference_ensemble(full, [[True] * C] * 2, "multiclass", "mean_prob"))
    p = np.exp(as_logprob(cache.targets(0, cache.ids)))
    inside = np.asarray(by_name(list(SPEC4), SPEC4)) >= 0
    np.testing.assert_allclose(p[:, inside].sum(-1), p_full[:, inside].sum(-1), rtol=0, atol=1e-5)
    np.testing.assert_allclose(p[:, ~inside], p_full[:, ~inside], rtol=0, atol=1e-5)  # untouched outside
    assert not np.allclose(p[:, inside], p_full[:, inside], atol=1e-3)  # but redistributed inside


@pytest.mark.parametrize("kind", ["multiclass", "multilabel"])
def test_kd_loss_consumes_a_specialist_member(dataset, specs, aug, tmp_path, kind):
    from logitcache.targets import kd_loss

    path = _specialist_dump(dataset, specs, aug, tmp_path, kind, "mean_prob")
    cache = logitcache.open_cache(path)
    t = cache.targets(0, cache.ids, member="spec4")
    student = torch.randn(len(cache.ids), C, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    loss = kd_loss(student.float(), *(torch.from_numpy(np.asarray(a)) for a in (t.values, t.indices, t.stat)), kind)
    views = list(stream_views(path, dataset, 0))
    z = mapped(toy_logits("spec4", views), by_name(list(SPEC4), SPEC4)).astype(np.float64)
    s = student.numpy()
    if kind == "multiclass":  # KL(teacher || student), the teacher 0 on the classes it does not cover
        p = np.exp(z - _lse(z))
        logq = s - _lse(s)
        want = np.where(p > 0, p * (np.log(np.where(p > 0, p, 1)) - logq), 0).sum(-1).mean()
    else:  # BCE against the teacher's probabilities, 0 on the classes it does not cover
        p = sigmoid(z)
        want = np.mean(np.logaddexp(0, s) - p * s)
    assert float(loss) == pytest.approx(want, rel=1e-5, abs=1e-6)


def codec_dense(cache, t) -> np.ndarray:
    """The dense teacher distribution a codec's rows decode to."""
    return cache.codec.dense((t.values, t.indices, t.stat) if cache.codec.triple else t).numpy()


@pytest.mark.parametrize("codec,kw", [("compact", {"topk": 4}), ("sampled", {"sample_n": 64})])
def test_specialist_with_other_codecs(dataset, specs, aug, tmp_path, codec, kw):
    path = _specialist_dump(dataset, specs, aug, tmp_path, "multiclass", "mean_prob", codec=codec,
                            value_dtype="float16", **kw)
    cache = logitcache.open_cache(path)
    absent = np.asarray(by_name(list(SPEC4), SPEC4)) < 0
    p = codec_dense(cache, cache.targets(0, cache.ids, member="spec4"))
    # absent classes get no mass (compact: up to its float16 tail rounding, spread evenly)
    assert p[:, absent].max() < 1e-7 and (p[:, ~absent].sum(-1) > 1 - 1e-6).all()
    views = list(stream_views(path, dataset, 0))
    online = [toy_logits("toy_a", views), mapped(toy_logits("wide", views), by_name(WIDE_CLASSES)),
              mapped(toy_logits("spec4", views), by_name(list(SPEC4), SPEC4))]
    want = np.exp(reference_ensemble(online, [[True] * C, [True] * C, (~absent).tolist()], "multiclass", "mean_prob"))
    got = codec_dense(cache, cache.targets(0, cache.ids))
    if codec == "compact":  # top-4 quantised, the rest spread evenly: the top classes agree
        assert (got.argmax(-1) == want.argmax(-1)).all()
    else:  # 64 draws per row: an unbiased estimate, close on average over the rows
        assert np.abs(got - want).sum(-1).mean() < 0.5


# ---------------------------------------------------------------- class maps: refused
def _write(tmp_path, doc) -> str:
    path = tmp_path / "map.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return str(path)


BAD_MAPS = {  # name -> (class map document, teacher, needles)
    "unmapped_dataset_class": ({"teacher_classes": list(SPEC4), "map": SPEC4}, "plain4",
                               ["6 of the dataset's 10 classes are not mapped", "--unmapped ignore"]),
    "teacher_name_unknown": ({"teacher_classes": list(RENAMED), "map": {**RENAMED, "T99": "tone"}}, "toy_b",
                             ["'T99' is not one of the teacher's classes"]),
    "dataset_name_unknown": ({"teacher_classes": list(RENAMED), "map": {**RENAMED, "T0": "kitten"}}, "toy_b",
                             ["'kitten' (for teacher class 'T0') is not a class of the dataset"]),
    "teacher_class_twice": ({"teacher_classes": list(CLASSES[:9]) + ["tone"]}, "toy_b",
                            ["teacher class 'tone' is listed twice"]),
    "map_key_twice": ('{"teacher_classes": ["a", "b"], "map": {"a": "tone", "a": "chirp_up"}}', "toy_b",
                      ["'a' is given twice"]),
    "two_onto_one": ({"teacher_classes": list(RENAMED), "map": {**RENAMED, "T1": RENAMED["T0"]}}, "toy_b",
                     ["dataset class 'chirp_up' is mapped from both 'T0' and 'T1'"]),
    "maps_nothing": ({"teacher_classes": ["x", "y"]}, "toy_b", ["maps none of the dataset's 10 classes"]),
    "width_mismatch": ({"teacher_classes": list(CLASSES) + ["x", "y"]}, "toy_b",
                       ["outputs C=10 classes but its class map", "lists 12 teacher_classes"]),
    "not_json": ("{teacher_classes", "toy_b", ["not valid JSON"]),
    "wrong_shape": ({"classes": list(CLASSES)}, "toy_b", ['expected {"teacher_classes"']),
    "map_not_names": ({"teacher_classes": ["a"], "map": {"a": 3}}, "toy_b", ['expected {"teacher_classes"']),
}


@pytest.mark.parametrize("case", list(BAD_MAPS))
def test_bad_class_map_is_one_line(dataset, specs, tmp_path, case):
    doc, teacher, needles = BAD_MAPS[case]
    path = _write(tmp_path, doc)
    teacher = specs[teacher] if teacher in specs else f"toy_teachers:{teacher}"
    with pytest.raises(LogitCacheError) as e:
        logitcache.dump(dataset, [teacher], tmp_path / "x.zarr", augment="none", class_maps=[path], **COMMON)
    assert_one_line_error(e, *needles)
    assert path in str(e.value) and not (tmp_path / "x.zarr").exists()


def test_class_map_file_missing_is_one_line(dataset, tmp_path):
    with pytest.raises(LogitCacheError) as e:
        logitcache.dump(dataset, ["toy_teachers:toy_a"], tmp_path / "x.zarr", augment="none",
                        class_maps=[str(tmp_path / "nope.json")], **COMMON)
    assert_one_line_error(e, "--class-map", "nope.json: file not found")


def test_teacher_wider_than_the_dataset_without_a_class_map_is_refused(dataset, specs, tmp_path):
    with pytest.raises(LogitCacheError) as e:
        logitcache.dump(dataset, [specs["plain16"]], tmp_path / "x.zarr", augment="none", **COMMON)
    assert_one_line_error(e, "C=16", "defines 10")


def test_softmax_ensemble_of_specialists_only_is_refused(dataset, specs, tmp_path):
    with pytest.raises(LogitCacheError) as e:
        logitcache.dump(dataset, [specs["spec4"]], tmp_path / "x.zarr", augment="none", output_kind="multiclass",
                        unmapped="ignore", **COMMON)
    assert_one_line_error(e, "at least one teacher must cover every class")


def test_class_covered_by_no_teacher_is_refused(dataset, specs, tmp_path):
    with pytest.raises(LogitCacheError) as e:
        logitcache.dump(dataset, [specs["spec4"]], tmp_path / "x.zarr", augment="none", output_kind="multilabel",
                        unmapped="ignore", **COMMON)
    assert_one_line_error(e, "class 'chirp_down' is covered by no teacher", "6 such classes")


def test_compact_specialist_covering_fewer_than_topk_is_refused(dataset, specs, tmp_path):
    with pytest.raises(LogitCacheError) as e:
        logitcache.dump(dataset, ["toy_teachers:toy_a", specs["spec4"]], tmp_path / "x.zarr", augment="none",
                        unmapped="ignore", codec="compact", **{**COMMON, "value_dtype": "float16", "topk": 5})
    assert_one_line_error(e, "--codec compact: teacher spec4 covers 4 classes, fewer than --topk 5")


def test_bad_unmapped_rule_is_one_line(dataset, tmp_path):
    with pytest.raises(LogitCacheError) as e:
        logitcache.dump(dataset, ["toy_teachers:toy_a"], tmp_path / "x.zarr", augment="none", unmapped="drop",
                        **COMMON)
    assert_one_line_error(e, "--unmapped 'drop'", "error, ignore")


def test_class_map_from_the_cli(dataset, specs, tmp_path):
    path = _write(tmp_path, {"teacher_classes": list(RENAMED), "map": RENAMED})
    out = tmp_path / "cli.zarr"
    args = ["dump", "--data", str(dataset), "--teacher", "toy_teachers:toy_a", "--teacher", "toy_teachers:toy_b",
            "--class-map", "-", "--class-map", path, "--out", str(out), "--topk", str(C), "--augment", "none",
            "--value-dtype", "float32", "--clip-seconds", "1", "--workers", "0", "--device", "cpu"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    cache = logitcache.open_cache(out)
    assert "class_map" not in cache.manifest["teachers"][0]
    assert cache.manifest["teachers"][1]["class_map"]["columns"] == by_name(list(RENAMED), RENAMED)
    z = toy_logits("toy_b", list(stream_views(out, dataset, 0)))
    assert np.array_equal(stored_dense(cache.targets(0, cache.ids, member="toy_b")),
                          z[:, by_name(list(RENAMED), RENAMED)].astype(np.float64))


def test_unmapped_classes_from_the_cli_is_one_line(dataset, specs, tmp_path):
    path = _write(tmp_path, {"teacher_classes": list(SPEC4), "map": SPEC4})
    result = CliRunner().invoke(main, ["dump", "--data", str(dataset), "--teacher", specs["plain4"], "--class-map",
                                       path, "--out", str(tmp_path / "x.zarr"), "--device", "cpu"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: --class-map {path}: 6 of the dataset's 10 classes are not mapped")
    assert not (tmp_path / "x.zarr").exists()


def test_ensemble_logits_without_specialists_is_aggregate():
    from logitcache.hetero import ensemble_logits
    from logitcache.targets import aggregate

    g = torch.Generator().manual_seed(1)
    zs = [torch.randn(5, C, generator=g) * 3 for _ in range(3)]
    for kind in ("multiclass", "multilabel"):
        for method in ("mean_prob", "mean_logit"):
            full = torch.ones(3, C, dtype=torch.bool)
            want = aggregate(zs, kind, method, [1, 2, 3])
            assert torch.equal(ensemble_logits(zs, kind, method, [1, 2, 3], full), want)
            assert torch.equal(ensemble_logits(zs, kind, method), aggregate(zs, kind, method))


def test_weighted_specialist_ensemble_matches_the_rule():
    from logitcache.hetero import ensemble_logits

    g = torch.Generator().manual_seed(2)
    zs = [torch.randn(7, C, generator=g, dtype=torch.float64) * 3 for _ in range(3)]
    covers = [[True] * C, [i % 3 != 0 for i in range(C)], [i < 6 for i in range(C)]]  # two overlapping specialists
    w = [2.0, 1.0, 0.5]
    for kind in ("multiclass", "multilabel"):
        for method in ("mean_prob", "mean_logit"):
            got = ensemble_logits([z.float() for z in zs], kind, method, w, torch.tensor(covers)).double().numpy()
            want = reference_ensemble([z.float().numpy() for z in zs], covers, kind, method, w)
            if kind == "multiclass":
                got = got - _lse(got)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5, err_msg=f"{kind} {method}")
            frames = ensemble_logits([z.float().reshape(7, 1, C) for z in zs], kind, method, w, torch.tensor(covers))
            assert frames.shape == (7, 1, C)  # frame-level rows [B, T, C]: the same rule per frame
            np.testing.assert_allclose(frames[:, 0].double().numpy() - (_lse(frames[:, 0].double().numpy())
                                       if kind == "multiclass" else 0), want, rtol=1e-5, atol=2e-5)


def test_absent_logit_is_log_zero_in_every_dtype():
    assert math.exp(ABSENT_LOGIT) == 0.0 and float(np.float16(ABSENT_LOGIT)) == ABSENT_LOGIT
    assert float(torch.sigmoid(torch.tensor(ABSENT_LOGIT))) == 0.0
