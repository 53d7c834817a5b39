"""Image augmentations that replay exactly (logitcache/augment_image.py).

The golden literals (draws and view digests) were produced by the code of the commit that added
this file and must NEVER be regenerated from the code under test: a failure means the replay
contract of image caches changed (see tests/test_golden.py for the audio ones).
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from logitcache.augment import uniforms
from logitcache.augment_image import (IMAGE_OPS, IMAGE_PRESETS, RAND_AUGMENT_OPS, ImageAugmenter,
                                      load_image_ops_spec, resize)
from logitcache.errors import LogitCacheError
from logitcache.layout import Manifest


def pattern(h: int, w: int, k: int) -> torch.Tensor:
    """A synthetic [3, h, w] image of exact float32 values (integers / 255)."""
    c, i, j = np.meshgrid(np.arange(3), np.arange(h), np.arange(w), indexing="ij")
    return torch.from_numpy(((i * 7 + j * 13 + c * 50 + k * i * j) % 256).astype(np.float32) / np.float32(255))


SOURCES = {0: pattern(37, 53, 0), 1: pattern(29, 41, 3)}
DRAW_SEED = 0xA4D75517A90A1BA8  # the audio golden draws' seed
STRONG_SEEDS = (0x8096768AD375BB11, 0x30055981A45C2966)
EXTRA = {"rand_augment": {"n": 4, "m": 9}}


@pytest.fixture(scope="module")
def photos() -> dict[int, torch.Tensor]:
    """scikit-learn's two photographs (427 x 640), downscaled to 107 x 160, as [3, H, W] in [0, 1]."""
    from sklearn.datasets import load_sample_images

    out = {}
    for i, a in enumerate(load_sample_images().images):
        img = torch.from_numpy(np.array(a)).permute(2, 0, 1).float() / 255
        out[i] = resize(img, (107, 160))
    return out


def alone(name: str, size=(24, 32)) -> ImageAugmenter:
    """The op alone, always on."""
    p = {"p": 1.0} if "p" in IMAGE_OPS[name].defaults else {}
    return ImageAugmenter([{"op": name, **p, **EXTRA.get(name, {})}], size)


def ctx_of(aug: ImageAugmenter, sources: dict, index: int = 0, **kw):
    return aug.context(source_size=tuple(sources[index].shape[1:]), num_samples=len(sources), sample_index=index,
                       load_partner=sources.__getitem__, **kw)


def digest(view: torch.Tensor) -> str:
    return hashlib.sha256(view.numpy().tobytes()).hexdigest()[:16]


# ---------------------------------------------------------------- golden draws
# op name -> its parameters drawn alone (slot 0) from DRAW_SEED, p = 1, for a (48, 64) view of a
# 427 x 640 source (sample 3 of 10): name -> (dtype, value). Every image op must be listed.
OP_DRAWS = {
    "resize": {},
    "random_resized_crop": {"random_resized_crop.box": ("int32", [191, 17, 226, 288])},
    "hflip": {"hflip.flip": ("uint8", 1)},
    "color_jitter": {"color_jitter.brightness": ("float32", 0.7377850413322449),
                     "color_jitter.contrast": ("float32", 1.3340675830841064),
                     "color_jitter.saturation": ("float32", 1.3583229780197144)},
    "mixup": {"mixup.partner": ("int64", 5), "mixup.lam": ("float32", 0.9587922692298889)},
    # 1 - 9 * 12 / (48 * 64) = 0.96484375
    "cutmix": {"cutmix.partner": ("int64", 5), "cutmix.lam": ("float32", 0.96484375),
               "cutmix.box": ("uint8", [39, 0, 9, 12])},
    # rotate 9 degrees, identity, autocontrast, posterize to 7 bits
    "rand_augment": {"rand_augment.op": ("uint8", [1, 0, 8, 6]),
                     "rand_augment.magnitude": ("float32", [9.0, 0.0, 0.0, 7.0])},
}

STRONG_DRAWS = {
    0x8096768AD375BB11: {
        "random_resized_crop.box": ("int32", [65, 179, 351, 400]), "hflip.flip": ("uint8", 0),
        "color_jitter.brightness": ("float32", 1.3265892267227173),
        "color_jitter.contrast": ("float32", 0.616915225982666),
        "color_jitter.saturation": ("float32", 1.1755682229995728),
        "rand_augment.op": ("uint8", [7, 8]), "rand_augment.magnitude": ("float32", [0.7, 0.0]),  # solarize
        "mixup.partner": ("int64", 2), "mixup.lam": ("float32", 0.9077336192131042),
        "cutmix.partner": ("int64", -1), "cutmix.lam": ("float32", 1.0), "cutmix.box": ("uint8", [0, 0, 0, 0]),
    },
    0x30055981A45C2966: {
        "random_resized_crop.box": ("int32", [69, 219, 286, 379]), "hflip.flip": ("uint8", 1),
        "color_jitter.brightness": ("float32", 1.072451114654541),
        "color_jitter.contrast": ("float32", 1.3558311462402344),
        "color_jitter.saturation": ("float32", 1.132212519645691),
        "rand_augment.op": ("uint8", [1, 8]), "rand_augment.magnitude": ("float32", [9.0, 0.0]),
        "mixup.partner": ("int64", -1), "mixup.lam": ("float32", 1.0),
        "cutmix.partner": ("int64", 5), "cutmix.lam": ("float32", 0.5374348759651184),
        "cutmix.box": ("uint8", [0, 0, 29, 49]),
    },
}


def _assert_draws(got: dict[str, np.ndarray], want: dict[str, tuple], what: str) -> None:
    assert list(got) == list(want), what
    for name, (dtype, value) in want.items():
        assert str(got[name].dtype) == dtype, (what, name)
        assert got[name].tobytes() == np.asarray(value, dtype=dtype).tobytes(), (what, name, got[name], value)


def test_every_image_op_has_a_golden_draw():
    assert sorted(IMAGE_OPS) == sorted(OP_DRAWS)


@pytest.mark.parametrize("name", sorted(IMAGE_OPS))
def test_image_op_draw_golden(name):
    aug = alone(name, (48, 64))
    ctx = aug.context(source_size=(427, 640), num_samples=10, sample_index=3)
    _assert_draws(aug.draw(DRAW_SEED, ctx), OP_DRAWS[name], name)


def test_image_strong_draw_golden():
    aug = ImageAugmenter(load_image_ops_spec("image_strong"), (48, 64))
    for seed, want in STRONG_DRAWS.items():
        _assert_draws(aug.draw(seed, aug.context(source_size=(427, 640), num_samples=10, sample_index=3)), want,
                      hex(seed))


def test_rand_augment_op_list_is_the_stored_contract():
    # a cache stores indices into this list: it may only grow at the end
    assert RAND_AUGMENT_OPS == ("identity", "rotate", "translate_x", "translate_y", "shear_x", "shear_y",
                                "posterize", "solarize", "autocontrast")


def test_crop_box_follows_torchvision_rule_on_the_fixed_slots():
    """The first attempt's box, computed here from the published RandomResizedCrop rule on
    uniforms 1..4 of the op's slots (scale, log-ratio, top, left)."""
    u = uniforms(DRAW_SEED, 0, 5)
    area = 427 * 640 * (0.08 + u[1] * 0.92)
    aspect = math.exp(math.log(3 / 4) + u[2] * (math.log(4 / 3) - math.log(3 / 4)))
    w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
    assert 0 < w <= 640 and 0 < h <= 427  # accepted at the first attempt
    want = [int(u[3] * (427 - h + 1)), int(u[4] * (640 - w + 1)), h, w]
    assert want == OP_DRAWS["random_resized_crop"]["random_resized_crop.box"][1]


def test_crop_falls_back_to_torchvision_centre_crop():
    # no box of 90-100 % of the area with w/h in [3, 4] fits a square: the centre crop w = W, h = W / 3
    aug = ImageAugmenter([{"op": "random_resized_crop", "scale": [0.9, 1.0], "ratio": [3.0, 4.0]}], (8, 8))
    box = aug.draw(DRAW_SEED, aug.context(source_size=(100, 100)))["random_resized_crop.box"]
    assert box.tolist() == [(100 - 33) // 2, 0, 33, 100]
    aug = ImageAugmenter([{"op": "random_resized_crop", "scale": [0.9, 1.0]}], (8, 8))  # in range: whole
    assert aug.draw(DRAW_SEED, aug.context(source_size=(10, 1000)))["random_resized_crop.box"].tolist() == \
        [0, (1000 - 13) // 2, 10, 13]  # w = round(10 * 4 / 3)


# ---------------------------------------------------------------- golden views
# sha256 (first 16 hex digits) of the float32 view of SOURCES[0] (partner SOURCES[1]) for a
# (24, 32) view: pins apply() as the draws pin draw(), on every CPU and thread count.
OP_VIEWS = {"resize": "517bc82e8eb9bacf", "random_resized_crop": "aca242da9d1f20c2", "hflip": "c40ea80ba415c540",
            "color_jitter": "b77177142c6d9e52", "mixup": "af2aff0cefa9c26b", "cutmix": "4d92c210002c6d1e",
            "rand_augment": "011ac46b38831866"}
STRONG_VIEWS = {0x8096768AD375BB11: "0138affc1453083c", 0x30055981A45C2966: "f5d5b401e5546284"}
# every RandAugment op once, in list order, with these magnitudes
ALL_RAND_AUGMENT = ([0, 20, -3, 5, 11.5, -8, 5, 0.6, 0], "1ba615f3bc5aabe8")


@pytest.mark.parametrize("name", sorted(IMAGE_OPS))
def test_image_op_view_golden(name):
    aug = alone(name)
    ctx = ctx_of(aug, SOURCES)
    assert digest(aug.apply(SOURCES[0], aug.draw(DRAW_SEED, ctx), ctx)) == OP_VIEWS[name]


def test_image_strong_view_golden():
    aug = ImageAugmenter(load_image_ops_spec("image_strong"), (24, 32))
    ctx = ctx_of(aug, SOURCES)
    for seed, want in STRONG_VIEWS.items():
        assert digest(aug.apply(SOURCES[0], aug.draw(seed, ctx), ctx)) == want, hex(seed)


def test_every_rand_augment_op_view_golden():
    aug = ImageAugmenter([{"op": "rand_augment", "n": len(RAND_AUGMENT_OPS)}], (24, 32))
    mags, want = ALL_RAND_AUGMENT
    params = {"rand_augment.op": np.arange(len(RAND_AUGMENT_OPS), dtype=np.uint8),
              "rand_augment.magnitude": np.array(mags, np.float32)}
    assert digest(aug.apply(SOURCES[0], params, ctx_of(aug, SOURCES))) == want


# ---------------------------------------------------------------- what the ops compute
@pytest.mark.parametrize("size", [(224, 224), (53, 97), (150, 250), (107, 160), (16, 9)])
def test_resize_is_torch_antialiased_bilinear(photos, size):
    img = photos[0]
    want = F.interpolate(img[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    got = resize(img, size)
    assert got.dtype == torch.float32 and got.shape == (3, *size)
    # torch computes its filter weights in float32, we in float64: the same filter to 3e-5
    assert (got - want).abs().max().item() < 3e-5


def test_crop_is_source_pixels_then_resize(photos):
    img = photos[1]
    aug = ImageAugmenter([{"op": "random_resized_crop"}], (24, 32))
    ctx = aug.context(source_size=(107, 160))
    params = {"random_resized_crop.box": np.array([10, 20, 50, 70], np.int32)}
    view = aug.apply(img, params, ctx)
    want = F.interpolate(img[None, :, 10:60, 20:90], size=(24, 32), mode="bilinear", antialias=True,
                         align_corners=False)[0]
    assert (view - want).abs().max().item() < 3e-5
    # a box the size of the view is those source pixels, exactly
    params = {"random_resized_crop.box": np.array([5, 7, 24, 32], np.int32)}
    assert torch.equal(aug.apply(img, params, ctx), img[:, 5:29, 7:39])


def test_no_crop_op_fits_the_whole_source(photos):
    for ops in ([], [{"op": "resize"}], [{"op": "hflip", "p": 0.0}]):
        aug = ImageAugmenter(ops, (24, 32))
        ctx = ctx_of(aug, photos)
        assert torch.equal(aug.apply(photos[0], aug.draw(1, ctx), ctx), resize(photos[0], (24, 32)))
    assert aug.fit(photos[0]).shape == (3, 24, 32)


def test_hflip_is_torch_flip(photos):
    aug = ImageAugmenter([{"op": "hflip"}], (24, 32))
    ctx = ctx_of(aug, photos)
    flipped = aug.apply(photos[0], {"hflip.flip": np.uint8(1)}, ctx)
    assert torch.equal(flipped, torch.flip(resize(photos[0], (24, 32)), [-1]))
    assert torch.equal(aug.apply(photos[0], {"hflip.flip": np.uint8(0)}, ctx), resize(photos[0], (24, 32)))


def test_color_jitter_is_torchvision_blends(photos):
    aug = ImageAugmenter([{"op": "color_jitter"}], (24, 32))
    x = resize(photos[0], (24, 32)).double()
    params = {"color_jitter.brightness": np.float32(1.25), "color_jitter.contrast": np.float32(0.6),
              "color_jitter.saturation": np.float32(1.5)}
    got = aug.apply(photos[0], params, ctx_of(aug, photos)).double()

    def grey(y):
        return 0.2989 * y[0] + 0.587 * y[1] + 0.114 * y[2]

    x = (x * 1.25).clamp(0, 1)
    x = (0.6 * x + 0.4 * grey(x).mean()).clamp(0, 1)
    x = (1.5 * x - 0.5 * grey(x)[None]).clamp(0, 1)
    assert (got - x).abs().max().item() < 1e-6


def test_mixup_is_the_real_mix_with_the_partner_resized_whole():
    aug = ImageAugmenter([{"op": "mixup"}], (24, 32))
    params = {"mixup.partner": np.int64(1), "mixup.lam": np.float32(0.75)}
    view = aug.apply(SOURCES[0], params, ctx_of(aug, SOURCES))
    own, other = resize(SOURCES[0], (24, 32)), resize(SOURCES[1], (24, 32))
    assert torch.equal(view, torch.tensor(np.float32(0.75)) * own + torch.tensor(np.float32(0.25)) * other)
    assert aug.mixers == ["mixup"]


def test_cutmix_box_is_exactly_the_partners_pixels():
    aug = ImageAugmenter([{"op": "hflip", "p": 1.0}, {"op": "cutmix", "p": 1.0}], (24, 32))
    ctx = ctx_of(aug, SOURCES)
    params = aug.draw(DRAW_SEED, ctx)
    top, left, h, w = params["cutmix.box"].tolist()
    assert h * w > 0 and params["cutmix.partner"] == 1
    assert params["cutmix.lam"] == np.float32(1 - h * w / (24 * 32))
    view = aug.apply(SOURCES[0], params, ctx)
    own, other = torch.flip(resize(SOURCES[0], (24, 32)), [-1]), resize(SOURCES[1], (24, 32))
    inside = torch.zeros(24, 32, dtype=torch.bool)
    inside[top: top + h, left: left + w] = True
    assert torch.equal(view[:, inside], other[:, inside]) and torch.equal(view[:, ~inside], own[:, ~inside])
    assert aug.mixers == ["cutmix"]


def test_rand_augment_geometry_is_exact():
    img = pattern(21, 21, 1)
    aug = ImageAugmenter([{"op": "rand_augment", "n": 1}], (21, 21))
    ctx = aug.context(source_size=(21, 21))

    def one(name, mag):
        return aug.apply(img, {"rand_augment.op": np.array([RAND_AUGMENT_OPS.index(name)], np.uint8),
                               "rand_augment.magnitude": np.array([mag], np.float32)}, ctx)

    assert torch.equal(one("rotate", 90.0), torch.rot90(img, 1, (-2, -1)))  # counter-clockwise
    shifted = torch.zeros_like(img)
    shifted[:, :, 3:] = img[:, :, :-3]
    assert torch.equal(one("translate_x", 3.0), shifted)  # content moves right, 0 fills
    shifted = torch.zeros_like(img)
    shifted[:, :-2] = img[:, 2:]
    assert torch.equal(one("translate_y", -2.0), shifted)
    assert torch.equal(one("solarize", 0.5), torch.where(img >= 0.5, 1 - img, img))
    assert torch.equal(one("posterize", 4.0) * 255, torch.floor(torch.round(img * 255) / 16) * 16)
    auto = one("autocontrast", 0.0)
    assert torch.equal(auto.amin(dim=(1, 2)), torch.zeros(3)) and torch.equal(auto.amax(dim=(1, 2)), torch.ones(3))
    assert torch.equal(one("identity", 0.0), img)


# ---------------------------------------------------------------- replay
def _stored(aug: ImageAugmenter, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rows through a cache's storage: the format-2 manifest's integer grid, then decoded back."""
    m = Manifest(format_version=2, codec="topk", codec_options={}, epochs=1, num_samples=2, num_classes=2,
                 topk=1, frames=None, chunk_rows=4, output_kind="multiclass", members=[], value_dtype="float16",
                 index_dtype="uint8", order_dtype="uint32", content=True, augment=aug.spec,
                 param_storage=json.loads(json.dumps(aug.param_grid())))
    stored = m.stored_rows({f"params/{k}": v for k, v in rows.items()})
    for k, (dtype, shape) in aug.param_specs.items():
        want = m.param_storage.get(k, {}).get("dtype", dtype)
        assert stored[f"params/{k}"].dtype == np.dtype(want) and stored[f"params/{k}"].shape[1:] == shape
    return {k[len("params/"):]: v for k, v in m.decoded_params(stored).items()}


def test_replay_from_stored_params_is_bit_identical(photos):
    drawn = ImageAugmenter(load_image_ops_spec("image_strong"), (40, 56))
    assert drawn.param_grid() == {"cutmix.lam": {"dtype": "uint16", "num": 1, "den": 40 * 56}}
    replayer = ImageAugmenter.from_spec(json.loads(json.dumps(drawn.spec)))
    assert replayer.spec == drawn.spec
    seeds = [*STRONG_SEEDS, *range(12)]
    views, rows = [], []
    for i, seed in enumerate(seeds):
        ctx = ctx_of(drawn, photos, i % 2)
        params = drawn.draw(seed, ctx)
        views.append(drawn.apply(photos[i % 2], params, ctx))
        rows.append(params)
    stacked = _stored(drawn, {k: np.stack([r[k] for r in rows]) for k in rows[0]})
    assert (stacked["cutmix.lam"] < 1).any()  # the grid is exercised
    for i in reversed(range(len(seeds))):  # any order
        params = {k: v[i] for k, v in stacked.items()}
        assert torch.equal(replayer.apply(photos[i % 2], params, ctx_of(replayer, photos, i % 2)), views[i]), i


def test_views_identical_alone_repeated_and_on_two_threads(photos):
    aug = ImageAugmenter(load_image_ops_spec("image_strong"), (64, 64))
    ctx = ctx_of(aug, photos)
    params = [aug.draw(s, ctx) for s in STRONG_SEEDS]
    first = [aug.apply(photos[0], p, ctx) for p in params]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert all(torch.equal(aug.apply(photos[0], p, ctx), v) for p, v in zip(params, first))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(aug.apply(photos[0], p, ctx), v) for p, v in zip(params[::-1], first[::-1]))


class _Views(Dataset):
    def __init__(self, aug, sources, seeds):
        self.aug, self.sources, self.seeds = aug, sources, seeds

    def __len__(self):
        return len(self.seeds)

    def __getitem__(self, i):
        ctx = ctx_of(self.aug, self.sources, i % 2)
        return self.aug.apply(self.sources[i % 2], self.aug.draw(self.seeds[i], ctx), ctx)


def test_views_identical_in_dataloader_workers(photos):
    aug = ImageAugmenter(load_image_ops_spec("image_strong"), (32, 32))
    data = _Views(aug, photos, list(range(6)))
    alone_ = torch.stack([data[i] for i in range(len(data))])
    batched = torch.cat(list(DataLoader(data, batch_size=4, num_workers=2)))
    assert torch.equal(batched, alone_)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("ops, message", [
    ([{"op": "random_resized_crop", "scale": [0.5, 0.1]}],
     "augmentation op 'random_resized_crop': scale=[0.5, 0.1] is not [low, high] with 1e-09 <= low <= high <= 1.0"),
    ([{"op": "random_resized_crop", "ratio": 1.0}],
     "augmentation op 'random_resized_crop': ratio=1.0 is not [low, high] with 1e-09 <= low <= high <= inf"),
    ([{"op": "hflip", "p": 1.5}], "augmentation op 'hflip': p=1.5 is not in [0, 1]"),
    ([{"op": "hflip", "p": "often"}], "augmentation op 'hflip': p='often' is not a number in [0, 1]"),
    ([{"op": "color_jitter", "contrast": -0.1}],
     "augmentation op 'color_jitter': contrast=-0.1 is not a finite number >= 0.0"),
    ([{"op": "color_jitter", "hue": 0.1}],
     "augmentation op 'color_jitter': unknown setting(s) ['hue']; known: ['brightness', 'contrast', 'p', "
     "'saturation']"),
    ([{"op": "color_jitter", "brightness": math.inf}],
     "augmentation op 'color_jitter': brightness=inf is not a finite number >= 0.0"),
    ([{"op": "mixup", "min_lam": 0.9, "max_lam": 0.5}], "augmentation op 'mixup': max_lam=0.5 is below min_lam"),
    ([{"op": "cutmix", "max_lam": 2}], "augmentation op 'cutmix': max_lam=2 is not a finite number in [0.0, 1.0]"),
    ([{"op": "rand_augment", "n": 22}], "augmentation op 'rand_augment': n=22 is not an integer in [0, 21]"),
    ([{"op": "rand_augment", "m": 31}], "augmentation op 'rand_augment': m=31 is not an integer in [0, 30]"),
    ([{"op": "sharpen"}], "unknown image augmentation op 'sharpen'; known: resize, random_resized_crop, hflip, "
                          "color_jitter, mixup, cutmix, rand_augment"),
    ([{"op": "hflip"}, {"op": "hflip"}], "augmentation op 'hflip' is listed twice"),
    ([{"op": "hflip"}, {"op": "random_resized_crop"}],
     "augmentation op 'random_resized_crop' must come first (it makes the view from the source)"),
])
def test_bad_image_op_settings_are_one_line(ops, message):
    with pytest.raises(LogitCacheError) as e:
        ImageAugmenter(ops, (8, 8))
    assert str(e.value) == message


@pytest.mark.parametrize("spec, message", [
    ({"version": 1, "modality": "image", "size": [0, 8], "ops": []},
     "image augmentation size [0, 8] is not [height, width] in positive pixels"),
    ({"version": 1, "modality": "image", "size": 8, "ops": []},
     "image augmentation size 8 is not [height, width] in positive pixels"),
    ({"version": 1, "modality": "audio", "size": [8, 8], "ops": []},
     "augmentation spec modality 'audio' is not 'image'"),
    ({"version": 9, "modality": "image", "size": [8, 8], "ops": []},
     "augmentation spec version 9 is not supported (this logitcache reads 1)"),
    ({"version": 1, "modality": "image", "size": [8, 8], "ops": "image_basic"},
     "augmentation spec 'ops' is 'image_basic', not a list of ops"),
])
def test_bad_image_spec_is_one_line(spec, message):
    with pytest.raises(LogitCacheError) as e:
        ImageAugmenter.from_spec(spec)
    assert str(e.value) == message


def test_bad_source_or_box_is_one_line(photos):
    aug = ImageAugmenter(load_image_ops_spec("image_basic"), (8, 8))
    with pytest.raises(LogitCacheError, match=r"^image source has shape \[107, 160\], not \[3, H, W\]$"):
        aug.fit(photos[0][0])
    with pytest.raises(LogitCacheError, match=r"^augmentation op 'random_resized_crop' needs the source size"):
        aug.draw(1, aug.context())
    params = {"random_resized_crop.box": np.array([100, 0, 50, 50], np.int32), "hflip.flip": np.uint8(0)}
    with pytest.raises(LogitCacheError, match=r"^augmentation op 'random_resized_crop': box \[100, 0, 50, 50\] "
                                              r"is outside the 107x160 source"):
        aug.apply(photos[0], params, aug.context())
    mix = ImageAugmenter([{"op": "mixup"}], (8, 8))
    with pytest.raises(LogitCacheError, match=r"^augmentation op 'mixup' needs the dataset to load partner images$"):
        mix.apply(photos[0], {"mixup.partner": np.int64(1), "mixup.lam": np.float32(0.5)}, mix.context())


def test_presets_and_spec_round_trip():
    assert sorted(IMAGE_PRESETS) == ["image_basic", "image_none", "image_strong"]
    for name in IMAGE_PRESETS:
        aug = ImageAugmenter(load_image_ops_spec(name), [24, 32])
        again = ImageAugmenter.from_spec(json.loads(json.dumps(aug.spec)))
        assert again.spec == aug.spec and again.param_specs == aug.param_specs and aug.view_shape == (3, 24, 32)
        ctx = aug.context(source_size=(100, 120), num_samples=5, sample_index=2)
        a, b = aug.draw(7, ctx), again.draw(7, again.context(source_size=(100, 120), num_samples=5, sample_index=2))
        assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)
    assert ImageAugmenter(load_image_ops_spec("image_strong"), (8, 8)).mixers == ["mixup", "cutmix"]
