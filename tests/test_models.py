"""The model zoo: shapes, determinism, and torch.export round trips with a dynamic batch."""

from __future__ import annotations

import pytest
import torch

from logitcache.errors import LogitCacheError
from logitcache.models import create_model, export_model, list_models, load_exported, model_config, num_params

SR = 16000
C = 5
SAMPLES = 8000  # 0.5 s keeps every forward cheap; the architectures don't care about length


def _warmed(name: str, frames: int | None = None) -> torch.nn.Module:
    """An eval-mode model whose BatchNorm statistics are no longer the identity defaults."""
    model = create_model(name, C, SR, frames, seed=0)
    model.train()
    with torch.no_grad():
        model(0.1 * torch.randn(4, SAMPLES, generator=torch.Generator().manual_seed(1)))
    return model.eval()


def test_registry_has_the_documented_models():
    assert {"cnn_tiny", "cnn_small", "crnn_small", "transformer_tiny"} <= set(list_models())
    assert list_models() == sorted(list_models())


@pytest.mark.parametrize("name", list_models())
def test_output_shapes(name):
    x = torch.randn(3, SAMPLES)
    with torch.no_grad():
        assert create_model(name, C, SR).eval()(x).shape == (3, C)
        # frame level: exactly `frames` steps whatever the input length, fewer or more than the encoder's
        for frames, samples in [(7, SAMPLES), (7, 2 * SAMPLES), (60, SAMPLES)]:
            y = create_model(name, C, SR, frames=frames).eval()(torch.randn(2, samples))
            assert y.shape == (2, frames, C)


@pytest.mark.parametrize("name", list_models())
def test_eval_is_deterministic_and_seed_reproducible(name):
    state = torch.random.get_rng_state()
    a, b = create_model(name, C, SR, seed=3), create_model(name, C, SR, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # seeding did not touch the global RNG
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    x = torch.randn(2, SAMPLES)
    other = create_model(name, C, SR, seed=4).eval()
    with torch.no_grad():
        ya = a.eval()(x)
        assert torch.equal(ya, b.eval()(x))  # two models built from one seed agree exactly
        assert not torch.allclose(ya, other(x), atol=1e-3)  # ... and the seed matters


def test_param_counts_are_in_their_size_class():
    assert 20_000 <= num_params(create_model("cnn_tiny", 10)) <= 60_000
    assert 100_000 <= num_params(create_model("cnn_small", 10)) <= 300_000
    for name in ("crnn_small", "transformer_tiny"):
        assert 50_000 <= num_params(create_model(name, 10)) <= 300_000


def test_config_rebuilds_the_architecture():
    model = create_model("transformer_tiny", C, 22050, frames=10, n_mels=40, dim=64)
    config = model_config(model)
    assert config["n_mels"] == 40 and config["sample_rate"] == 22050 and config["frames"] == 10
    twin = create_model(**config)
    twin.load_state_dict(model.state_dict())  # same parameter names and shapes
    with pytest.raises(LogitCacheError):
        model_config(torch.nn.Linear(2, 2))


def test_bad_arguments_raise_logitcache_error():
    with pytest.raises(LogitCacheError, match="unknown model 'resnet9000'; choose one of: .*cnn_tiny"):
        create_model("resnet9000", C)
    with pytest.raises(LogitCacheError, match="bad options"):
        create_model("cnn_tiny", C, widht=8)
    with pytest.raises(LogitCacheError):
        create_model("cnn_tiny", 0)
    with pytest.raises(LogitCacheError):
        create_model("cnn_tiny", C, frames=0)


@pytest.mark.parametrize("name,frames", [(n, None) for n in list_models()] + [("cnn_tiny", 6)])
def test_export_round_trip_matches_eager(tmp_path, name, frames):
    model = _warmed(name, frames)
    model.train()  # export must evaluate in eval mode and then hand the mode back
    path = export_model(model, tmp_path / f"{name}.pt2", SR, SAMPLES)
    assert model.training
    model.eval()
    loaded, meta = load_exported(path)
    assert meta["sample_rate"] == SR and meta["clip_samples"] == SAMPLES and meta["config"]["name"] == name
    plain = torch.export.load(str(path)).module()  # loads without logitcache's helpers too
    g = torch.Generator().manual_seed(2)
    for batch in (1, 3, 8):
        x = torch.randn(batch, SAMPLES, generator=g)
        with torch.no_grad():
            want = model(x)
            assert want.shape == ((batch, C) if frames is None else (batch, frames, C))
            torch.testing.assert_close(loaded(x), want, rtol=0, atol=1e-5)
            torch.testing.assert_close(plain(x), want, rtol=0, atol=1e-5)


def test_export_checks_the_sample_rate(tmp_path):
    with pytest.raises(LogitCacheError, match="16000 Hz"):
        export_model(create_model("cnn_tiny", C, SR), tmp_path / "m.pt2", 22050, SAMPLES)
    with pytest.raises(LogitCacheError, match="not found"):
        load_exported(tmp_path / "missing.pt2")
