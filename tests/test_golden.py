"""Golden values of the replay contract: seeds, orders, uniforms, drawn parameters, digests.

A cache stores seeds and drawn parameters, and training replays them; a refactor that changed
dump and replay together would still pass every round-trip test while every cache already on
disk replayed other views. These literals pin the contract itself.

They were produced by the code of commit 75306bc50ddf2cf1bdaf1b45b4b6afcdfaf80c7b and must NEVER
be regenerated from the code under test. A failure here means the replay contract changed: old
caches would replay wrongly (or be refused). Such a change needs a new format/spec version, and
the old behaviour kept for old caches, not new literals.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch

from logitcache.augment import (OPS, Augmenter, epoch_order, gaussian_noise, id_hashes, load_ops_spec,
                                splitmix64, uniforms, view_seeds)
from logitcache.cache import config_digest
from logitcache.data import fingerprint

MASK64 = (1 << 64) - 1
IDS = ["a.wav", "dir/b.flac", "ünï.wav"]


def splitmix64_reference(x: int) -> int:
    """The published splitmix64 output function (Steele, Lea & Flood 2014; Vigna's splitmix64.c),
    in plain Python integers: one step from state ``x``."""
    z = (x + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


# ---------------------------------------------------------------- counter-based randomness
SPLITMIX64 = {
    0: 0xE220A8397B1DCDAF,
    1: 0x910A2DEC89025CC1,
    MASK64: 0xE4D971771B652C20,
    0x9E3779B97F4A7C15: 0x6E789E6AA1B965F4,
    0x3C6EF372FE94F82A: 0x06C45D188009454F,
    0x0123456789ABCDEF: 0x157A3807A48FAA9D,
}


def test_splitmix64_golden():
    got = splitmix64(np.array(list(SPLITMIX64), dtype=np.uint64))
    assert got.dtype == np.uint64
    assert [int(x) for x in got] == list(SPLITMIX64.values())
    assert int(splitmix64(np.uint64(0))) == 0xE220A8397B1DCDAF  # scalar input too


def test_splitmix64_is_the_published_algorithm():
    # Vigna's splitmix64.c seeded with 0 outputs e220a8397b1dcdaf, 6e789e6aa1b965f4, 06c45d188009454f:
    # augment.splitmix64(x) is that generator's output for state x, i.e. states 0, G, 2G.
    assert [splitmix64_reference(n * 0x9E3779B97F4A7C15 & MASK64) for n in range(3)] == \
        [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    xs = [0, 1, 2, MASK64, 1 << 63, 0xDEADBEEF, *range(1000, 1050), *SPLITMIX64]
    got = splitmix64(np.array(xs, dtype=np.uint64))
    assert [int(v) for v in got] == [splitmix64_reference(x) for x in xs]


HASHES = [0x46A1A73A6ACC7371, 0xC645DBF2FBA7E4B9, 0xF0A84DD68AC0ACCC]


def test_id_hashes_golden():
    got = id_hashes(IDS)
    assert got.dtype == np.uint64 and [int(x) for x in got] == HASHES
    # what they are: the first 8 bytes of blake2b-64 of the UTF-8 id, little-endian
    blake = [hashlib.blake2b(i.encode(), digest_size=8).digest() for i in IDS]
    assert [int.from_bytes(b, "little") for b in blake] == HASHES


VIEW_SEEDS = {
    (0, 0): [0x81A26AC6C33322DD, 0x7B3C971F2988DA31, 0xFCA7022E01554B9C],
    (0, 3): [0x30055981A45C2966, 0x1890B82E91E20C73, 0x8096768AD375BB11],
    (12345, 0): [0xEDD9AC61835B255A, 0x58DDEBDF8F8523EC, 0xF1BE1437E79E67C9],
    (12345, 3): [0x54423AD67924E3DF, 0xA4D75517A90A1BA8, 0x2DF6350453BED688],
}


def test_view_seeds_golden():
    for (base, epoch), want in VIEW_SEEDS.items():
        got = view_seeds(base, epoch, np.array(HASHES, dtype=np.uint64))
        assert got.dtype == np.uint64 and [int(x) for x in got] == want, (base, epoch)


def test_view_seeds_follow_the_published_mixing():
    # key = sm(base) ^ sm(epoch + G); seed = sm(hash ^ key): checked on plain Python integers
    for (base, epoch), want in VIEW_SEEDS.items():
        key = splitmix64_reference(base) ^ splitmix64_reference(epoch + 0x9E3779B97F4A7C15)
        assert [splitmix64_reference(h ^ key) for h in HASHES] == want


EPOCH_ORDER = {
    (0, 0): [2, 4, 9, 7, 5, 0, 1, 8, 6, 3],
    (0, 1): [1, 4, 0, 7, 8, 2, 5, 3, 6, 9],
    (12345, 0): [5, 4, 2, 8, 3, 6, 0, 1, 9, 7],
}


def test_epoch_order_golden():
    hashes = id_hashes([f"clip_{i:02d}.wav" for i in range(10)])
    for (base, epoch), want in EPOCH_ORDER.items():
        got = epoch_order(base, epoch, hashes)
        assert got.dtype == np.int64 and got.tolist() == want, (base, epoch)


UNIFORMS = {
    (0, 0, 4): [0.43152799704850997, 0.026433771592597743, 0.9708819781538285, 0.10634669156721244],
    (0x0123456789ABCDEF, 64, 3): [0.8441558572004795, 0.9999036913732693, 0.14439155942972814],
    (MASK64, 5, 2): [0.9426143746841554, 0.25142885573188245],
}


def test_uniforms_golden():
    for (seed, slot, n), want in UNIFORMS.items():
        got = uniforms(seed, slot, n)
        assert got.dtype == np.float64 and got.tolist() == want, (seed, slot, n)
        # slot i of seed s is the top 53 bits of sm(s + (i + 1) * G), over 2**53
        ref = [(splitmix64_reference((seed + (i + 1) * 0x9E3779B97F4A7C15) & MASK64) >> 11) / 2**53
               for i in range(slot, slot + n)]
        assert ref == want


def test_gaussian_noise_golden():
    got = gaussian_noise(0x0123456789ABCDEF, 5)
    assert got.dtype == torch.float32
    # Box-Muller goes through the platform's log/cos/sin: allow a float32 ulp, no more
    np.testing.assert_allclose(got.numpy(), [0.6026628, 1.6021868, -0.16296245, 0.018512642, 0.89394945],
                               rtol=2e-7, atol=0)


# ---------------------------------------------------------------- drawn parameters
SAMPLE_RATE, CLIP_SECONDS = 16000, 1.0
CONTEXT = dict(num_samples=10, sample_index=3, source_samples=17000)  # 1 s clip from a 1.0625 s source
DRAW_SEED = 0xA4D75517A90A1BA8  # view_seeds(12345, epoch 3, "dir/b.flac")
ALWAYS_ON = {"time_mask": {"count": 2}, "freq_mask": {"count": 2}}  # and p = 1 for every op

# op name -> its parameters drawn alone (slot 0) from DRAW_SEED with p = 1: name -> (dtype, value).
# Every registered op must be listed: a new op needs its own golden draw here.
OP_DRAWS = {
    "crop": {"crop.start_s": ("float32", 0.01075)},
    "shift": {"shift.seconds": ("float32", -0.3278125)},
    "gain": {"gain.db": ("float32", -3.9332247)},
    "noise": {"noise.snr_db": ("float32", 15.166938), "noise.seed": ("uint64", 8264866532387992)},
    "time_mask": {"time_mask.start_s": ("float32", [0.1535, 0.040125]),
                  "time_mask.width_s": ("float32", [0.1086875, 0.189625])},
    # whole STFT bins of 16000 / 512 = 31.25 Hz: bins 41 and 11, widths 17 and 31 bins (of at most
    # int(1000 Hz / 31.25 Hz) = 32); drawn before bins as 1284.2324 / 349.18005 Hz wide 543.5585 / 947.9037
    "freq_mask": {"freq_mask.low_hz": ("float32", [1281.25, 343.75]),
                  "freq_mask.width_hz": ("float32", [531.25, 968.75])},
    "mixup": {"mixup.partner": ("int64", 5), "mixup.lam": ("float32", 0.95879227)},
}

# The "strong" preset as one pipeline (op i reads slots 64 i ...), with its own p's: mixup, noise
# and shift each drawn on in one view and off in the other.
STRONG_DRAWS = {
    0x8096768AD375BB11: {  # view_seeds(0, epoch 3, "ünï.wav")
        "crop.start_s": ("float32", 0.0294375), "shift.seconds": ("float32", 0.0),
        "gain.db": ("float32", 4.8988385), "mixup.partner": ("int64", 1), "mixup.lam": ("float32", 0.8780039),
        "noise.snr_db": ("float32", 37.328938), "noise.seed": ("uint64", 7345075643172381),
        "time_mask.start_s": ("float32", [0.4854375, 0.89325]),
        "time_mask.width_s": ("float32", [0.130625, 0.083875]),
        "freq_mask.low_hz": ("float32", [7156.25, 5093.75]),  # bins 229, 163
        "freq_mask.width_hz": ("float32", [0.0, 93.75]),  # 0 and 3 bins
    },
    0x30055981A45C2966: {  # view_seeds(0, epoch 3, "a.wav")
        "crop.start_s": ("float32", 0.052375), "shift.seconds": ("float32", 0.2919375),
        "gain.db": ("float32", 1.0867668), "mixup.partner": ("int64", 5),
        "mixup.lam": ("float32", 0.83624816),
        "noise.snr_db": ("float32", math.inf), "noise.seed": ("uint64", 0),
        "time_mask.start_s": ("float32", [0.1284375, 0.2754375]),
        "time_mask.width_s": ("float32", [0.0645, 0.02825]),
        "freq_mask.low_hz": ("float32", [906.25, 781.25]),  # bins 29, 25
        "freq_mask.width_hz": ("float32", [0.0, 687.5]),  # 0 and 22 bins
    },
}


def _assert_draws(got: dict[str, np.ndarray], want: dict[str, tuple], what: str) -> None:
    assert list(got) == list(want), what
    for name, (dtype, value) in want.items():
        assert str(got[name].dtype) == dtype, (what, name)
        assert got[name].tobytes() == np.asarray(value, dtype=dtype).tobytes(), (what, name, got[name], value)


def test_every_registered_op_has_a_golden_draw():
    assert sorted(OPS) == sorted(OP_DRAWS)


@pytest.mark.parametrize("name", sorted(OPS))
def test_op_draw_golden(name):
    aug = Augmenter([{"op": name, "p": 1.0, **ALWAYS_ON.get(name, {})}], SAMPLE_RATE, CLIP_SECONDS)
    _assert_draws(aug.draw(DRAW_SEED, aug.context(**CONTEXT)), OP_DRAWS[name], name)


def test_strong_preset_draw_golden():
    aug = Augmenter(load_ops_spec("strong"), SAMPLE_RATE, CLIP_SECONDS)
    for seed, want in STRONG_DRAWS.items():
        _assert_draws(aug.draw(seed, aug.context(**CONTEXT)), want, hex(seed))


def test_op_draw_reads_fixed_slots():
    """An op's draw is a function of uniforms(seed, 64 * position) only: gain's db from slot 1."""
    u = uniforms(DRAW_SEED, 0, 2)
    assert u[0] < 1.0 and np.float32(-6.0 + u[1] * 12.0) == np.float32(OP_DRAWS["gain"]["gain.db"][1])


# ---------------------------------------------------------------- digests
MANIFEST = {
    "dataset": {"fingerprint": "ab" * 32, "num_samples": 3, "audio_bytes": 96000, "path": "/somewhere/data"},
    "classes": ["dog", "cat", "ünï"],
    "augment": {"version": 1, "sample_rate": 16000, "clip_seconds": 1.0,
                "ops": [{"op": "shift", "max_fraction": 0.5, "p": 0.5}]},
    "teachers": [{"name": "t", "source": "pkg.mod:t", "sha256": "cd" * 32}],
    "members": ["t"], "output_kind": "multilabel", "aggregation": "mean_prob", "weights": None, "topk": 2,
    "frames": None, "value_dtype": "float16", "index_dtype": "uint8", "seed": 7, "chunk_rows": 64,
    "epochs": 2, "created": "2024-01-01T00:00:00+00:00",
}
MANIFEST_DIGEST = "477ab2d87aff4f67c2468d5e34826301344095740c1b8f8ace9b6547d69776f6"


def test_config_digest_golden():
    assert config_digest(MANIFEST) == MANIFEST_DIGEST
    # where the data lives, when and for how many epochs it was dumped are not configuration
    moved = {**MANIFEST, "dataset": {**MANIFEST["dataset"], "path": "/elsewhere"}, "epochs": 5,
             "created": "x"}
    assert config_digest(moved) == MANIFEST_DIGEST
    assert config_digest({**MANIFEST, "topk": 3}) != MANIFEST_DIGEST


def test_ids_fingerprint_golden():
    """The dataset fingerprint a cache stores; replay and train refuse a folder whose ids differ."""
    assert fingerprint(IDS) == "6e1dd3e99887d14570bd200ea1280556174a3ff599ec852a1f348f91ea1fef3d"
