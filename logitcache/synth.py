"""A synthetic multi-label "sound events" dataset, written in logitcache's dataset folder format.

Ten classes of synthesised events (tones, chirps, noise bursts, clicks, hums, ...) are mixed at
random times and levels into coloured background noise. Some pairs are deliberately confusable
(tone / am_tone / fm_warble, harmonic_stack / low_hum, noise_burst / high_hiss) and levels go down
to below the background's, so a small CNN learns the task in minutes but does not ace it.

    make_splits("demo_data", n_train=400, n_eval=200)   # demo_data/train, demo_data/eval

Folder format (see data/README.md): labels.csv (filename,labels), classes.txt, dataset.json,
audio/*. With ``vary_format=True`` some files have another sample rate, some are FLAC and a few
are a little shorter or longer than ``clip_seconds``, so loaders must resample and crop/pad.
Everything is a pure function of the seed: clip i depends only on (seed, i).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import soundfile as sf

from logitcache.errors import LogitCacheError

# -----------------------------------------------------------------------------
# event generators: (rng, n samples, sample rate) -> float64 signal of length n, any scale


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _sine_from_freq(freq: np.ndarray, sr: int, rng: np.random.Generator) -> np.ndarray:
    # integrate instantaneous frequency so sweeps and warbles have a continuous phase
    return np.sin(2 * np.pi * np.cumsum(freq) / sr + rng.uniform(0, 2 * np.pi))


def _band_noise(rng: np.random.Generator, n: int, sr: int, lo: float, hi: float) -> np.ndarray:
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / sr)
    spec[(f < lo) | (f > hi)] = 0
    return np.fft.irfft(spec, n)


def _top(sr: int) -> float:
    # highest frequency any event uses: fixed in Hz so an event sounds the same at any file rate,
    # but below Nyquist for low target rates
    return min(7500.0, 0.45 * sr)


def tone(rng, n, sr):
    f = _log_uniform(rng, 300, min(3000, _top(sr)))
    return _sine_from_freq(np.full(n, f), sr, rng)


def am_tone(rng, n, sr):
    f = _log_uniform(rng, 300, min(3000, _top(sr)))
    t = np.arange(n) / sr
    depth, rate = rng.uniform(0.7, 1.0), rng.uniform(4, 12)
    return _sine_from_freq(np.full(n, f), sr, rng) * (1 - depth / 2 * (1 - np.cos(2 * np.pi * rate * t)))


def fm_warble(rng, n, sr):
    fc = _log_uniform(rng, 400, min(2500, _top(sr) / 1.2))
    t = np.arange(n) / sr
    beta, rate = rng.uniform(0.05, 0.15), rng.uniform(3, 8)
    return _sine_from_freq(fc * (1 + beta * np.sin(2 * np.pi * rate * t)), sr, rng)


def _sweep(rng, n, sr):
    f0 = _log_uniform(rng, 200, 1000)
    f1 = min(f0 * rng.uniform(2.5, 6), _top(sr))
    return _sine_from_freq(f0 * (f1 / f0) ** np.linspace(0, 1, n), sr, rng)  # exponential sweep


def chirp_up(rng, n, sr):
    return _sweep(rng, n, sr)


def chirp_down(rng, n, sr):
    return _sweep(rng, n, sr)[::-1].copy()


def harmonic_stack(rng, n, sr):
    f0 = _log_uniform(rng, 150, 450)
    out = np.zeros(n)
    for k in range(1, int(rng.integers(4, 11)) + 1):
        if k * f0 < _top(sr):
            out += rng.uniform(0.5, 1.0) / k * _sine_from_freq(np.full(n, k * f0), sr, rng)
    return out


def low_hum(rng, n, sr):
    f0 = rng.uniform(45, 120)
    amps = np.array([1.0, 0.5, 0.3, 0.2]) * rng.uniform(0.6, 1.0, 4)
    return sum(a * _sine_from_freq(np.full(n, (k + 1) * f0), sr, rng) for k, a in enumerate(amps))


def noise_burst(rng, n, sr):
    centre = _log_uniform(rng, 800, min(4000, _top(sr) / 1.5))
    half = 2 ** (rng.uniform(0.5, 1.0) / 2)  # half a bandwidth of 0.5-1 octave
    return _band_noise(rng, n, sr, centre / half, centre * half)


def high_hiss(rng, n, sr):
    lo = rng.uniform(0.6, 0.73) * _top(sr)  # about 4.5-5.5 kHz at rates >= 16 kHz
    return _band_noise(rng, n, sr, lo, _top(sr))


def click_train(rng, n, sr):
    period = sr / rng.uniform(8, 30)
    click_len = max(8, int(0.003 * sr))
    click = rng.standard_normal(click_len) * np.exp(-np.arange(click_len) / (0.0007 * sr))
    out = np.zeros(n)
    for start in np.arange(rng.uniform(0, period), n - click_len, period):
        i = int(start + rng.uniform(-0.05, 0.05) * period)  # slight jitter, still clearly periodic
        if 0 <= i <= n - click_len:
            out[i:i + click_len] += click
    return out


# name -> (generator, (min, max) duration in seconds)
EVENTS: dict[str, tuple[Callable[[np.random.Generator, int, int], np.ndarray], tuple[float, float]]] = {
    "tone": (tone, (0.3, 1.2)),
    "chirp_up": (chirp_up, (0.3, 1.0)),
    "chirp_down": (chirp_down, (0.3, 1.0)),
    "noise_burst": (noise_burst, (0.1, 0.4)),
    "click_train": (click_train, (0.4, 1.2)),
    "harmonic_stack": (harmonic_stack, (0.3, 1.2)),
    "am_tone": (am_tone, (0.5, 1.4)),
    "fm_warble": (fm_warble, (0.5, 1.4)),
    "low_hum": (low_hum, (0.6, 1.8)),
    "high_hiss": (high_hiss, (0.4, 1.5)),
}
CLASSES: tuple[str, ...] = tuple(EVENTS)

# mixing ranges, tuned so cnn_tiny trained for 2 min on 400 clips reaches eval mAP ~0.8 (chance ~0.17),
# with tone vs am_tone the hardest pair
BACKGROUND_DBFS = (-45.0, -20.0)
SNR_DB = (-12.0, 12.0)  # event RMS over background RMS, both broadband
N_EVENTS_P = (0.08, 0.37, 0.35, 0.20)  # P(0, 1, 2, 3 events)
OTHER_RATES = (22050, 44100, 16000, 32000)

# -----------------------------------------------------------------------------
# clips


def _background(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    # noise with a random spectral tilt between pink-ish and brown, so it masks low events more than
    # high ones and is never an exact match for the band-limited event classes
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.maximum(np.fft.rfftfreq(n, 1 / sr), 20.0)
    spec *= f ** (-rng.uniform(0.5, 2.0) / 2)
    x = np.fft.irfft(spec, n)
    return x / (np.sqrt(np.mean(x**2)) + 1e-12)


def _fade(n: int, sr: int) -> np.ndarray:
    # raised-cosine on/offsets: abrupt edges would add broadband clicks to every class
    k = min(int(0.01 * sr), n // 4)
    env = np.ones(n)
    if k > 0:
        ramp = 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, k))
        env[:k], env[n - k:] = ramp, ramp[::-1]
    return env


def make_clip(rng: np.random.Generator, n: int, sr: int, classes: tuple[str, ...]
              ) -> tuple[np.ndarray, list[tuple[str, float, float]]]:
    """One mixture of ``n`` samples at ``sr``: (waveform in [-1, 1], [(class, onset_s, offset_s), ...])."""
    level = 10 ** (rng.uniform(*BACKGROUND_DBFS) / 20)
    x = level * _background(rng, n, sr)
    k = min(int(rng.choice(len(N_EVENTS_P), p=N_EVENTS_P)), len(classes))
    events = []
    for c in rng.choice(len(classes), size=k, replace=False):
        name = classes[int(c)]
        gen, (dmin, dmax) = EVENTS[name]
        m = max(16, min(int(rng.uniform(dmin, dmax) * sr), int(0.9 * n)))
        start = int(rng.integers(0, n - m + 1))
        e = gen(rng, m, sr) * _fade(m, sr)
        e *= level * 10 ** (rng.uniform(*SNR_DB) / 20) / (np.sqrt(np.mean(e**2)) + 1e-12)
        x[start:start + m] += e
        events.append((name, round(start / sr, 4), round((start + m) / sr, 4)))
    peak = np.abs(x).max()
    if peak > 0.95:
        x *= 0.95 / peak  # scaling the whole mix keeps every SNR
    events.sort(key=lambda ev: (ev[1], classes.index(ev[0])))
    return x, events


def make_dataset(out_dir: str | Path, n_clips: int, *, sample_rate: int = 16000, clip_seconds: float = 2.0,
                 seed: int = 0, classes: list[str] | tuple[str, ...] | None = None, vary_format: bool = True,
                 overwrite: bool = False) -> Path:
    """Write ``n_clips`` synthetic clips as a dataset folder at ``out_dir``; returns its path.

    ``classes`` picks (and orders) a subset of :data:`CLASSES`. With ``vary_format`` about 20% of
    files use another sample rate, about 15% are FLAC and about 10% are 3-15% shorter or longer than
    ``clip_seconds``; otherwise every file is a 16-bit WAV of exactly ``clip_seconds`` at
    ``sample_rate``. An existing dataset is only replaced with ``overwrite=True``.
    """
    classes = tuple(CLASSES if classes is None else classes)
    unknown = [c for c in classes if c not in EVENTS]
    if unknown or not classes or len(set(classes)) != len(classes):
        raise LogitCacheError(
            f"classes must be distinct names from: {', '.join(CLASSES)}; got {list(classes)}")
    if n_clips < 1:
        raise LogitCacheError(f"n_clips must be positive, got {n_clips}")
    if sample_rate < 4000 or clip_seconds <= 0:
        raise LogitCacheError(
            f"need sample_rate >= 4000 and clip_seconds > 0, got {sample_rate}, {clip_seconds}")
    out = Path(out_dir)
    if (out / "labels.csv").exists():
        if not overwrite:
            raise LogitCacheError(f"{out} already holds a dataset; pass overwrite=True to replace it")
        shutil.rmtree(out / "audio", ignore_errors=True)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    other_rates = [r for r in OTHER_RATES if r != sample_rate][:2]

    rows, event_rows = [], []
    for i in range(n_clips):
        # one generator per clip: clip i is the same whatever n_clips is
        rng = np.random.default_rng([seed, i])
        sr, fmt, stretch = sample_rate, "wav", 1.0
        u_rate, u_fmt, u_len = rng.random(3)
        if vary_format:
            if u_rate < 0.2:
                sr = other_rates[int(rng.integers(len(other_rates)))]
            if u_fmt < 0.15:
                fmt = "flac"
            if u_len < 0.1:
                stretch = float(rng.choice([-1, 1]) * rng.uniform(0.03, 0.15) + 1)
        # synthesise at the file's own rate: the events are defined in Hz, so no resampling is needed
        x, events = make_clip(rng, int(round(clip_seconds * stretch * sr)), sr, classes)
        name = f"audio/clip_{i:05d}.{fmt}"
        sf.write(out / name, x.astype(np.float32), sr, subtype="PCM_16", format=fmt.upper())
        labels = sorted({e[0] for e in events}, key=classes.index)
        rows.append((name, ";".join(labels)))
        event_rows += [(name, c, on, off) for c, on, off in events]

    with open(out / "labels.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(("filename", "labels"))
        w.writerows(rows)
    with open(out / "events.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(("filename", "label", "onset", "offset"))
        w.writerows(event_rows)
    (out / "classes.txt").write_text("".join(c + "\n" for c in classes))
    meta = {
        "sample_rate": sample_rate,
        "clip_seconds": clip_seconds,
        "description": f"logitcache.synth: {n_clips} synthetic sound-event clips, {len(classes)} classes, "
                       f"seed {seed}" + (", mixed rates/formats/lengths" if vary_format else ""),
    }
    (out / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def make_splits(out_dir: str | Path, n_train: int = 400, n_eval: int = 200, *, seed: int = 0,
                **kw) -> tuple[Path, Path]:
    """Write ``out_dir/train`` (seed ``seed``) and ``out_dir/eval`` (seed ``seed + 1``), same classes.

    Other keyword arguments go to :func:`make_dataset`. Returns (train path, eval path).
    """
    out = Path(out_dir)
    train = make_dataset(out / "train", n_train, seed=seed, **kw)
    evaluation = make_dataset(out / "eval", n_eval, seed=seed + 1, **kw)
    return train, evaluation
