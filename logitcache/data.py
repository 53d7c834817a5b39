"""Reading data files: text, ``dataset.json``, audio decoding and its checks, the id fingerprint.

The sources (:mod:`logitcache.sources`) build on these; ``AudioFolder`` lives in
:mod:`logitcache.sources.audio_folder` and is still importable from here.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import json
import math
import os
import stat
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile
import torch
import torchaudio.functional as AF

from logitcache.errors import LogitCacheError, quote, shorten


DEFAULT_SAMPLE_RATE = 16000
DEFAULT_CLIP_SECONDS = 10.0


def fingerprint(items: list[str]) -> str:
    """sha256 over a list of strings (length-prefixed, so no two lists collide by joining)."""
    h = hashlib.sha256()
    for s in items:
        b = s.encode()
        h.update(len(b).to_bytes(8, "little") + b)
    return h.hexdigest()


def __getattr__(name: str):
    # The audio folder is a source now (logitcache.sources.audio_folder); its old home still names it.
    if name == "AudioFolder":
        from logitcache.sources.audio_folder import AudioFolder

        return AudioFolder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _read_text(path: Path) -> str:
    """A text file of the data folder, UTF-8 with or without a byte-order mark."""
    data = path.read_bytes()
    bom = data.startswith(codecs.BOM_UTF8)
    try:
        return data[len(codecs.BOM_UTF8) if bom else 0:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = e.start + (len(codecs.BOM_UTF8) if bom else 0)
        line = data.count(b"\n", 0, at) + 1
        raise LogitCacheError(f"{path}: not UTF-8 text (byte {at}, line {line}: {e.reason})") from None


def _read_info(path: Path) -> dict:
    """dataset.json, checked: an object whose sample_rate / clip_seconds, if present, are usable."""
    if not path.is_file():
        return {}
    try:
        info = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        where = f"line {e.lineno} column {e.colno}"
        raise LogitCacheError(f"{path}: not valid JSON ({e.msg} at {where})") from None
    except RecursionError:
        raise LogitCacheError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(info, dict):
        raise LogitCacheError(f"{path}: must be a JSON object like {{\"sample_rate\": 16000}}, not a "
                              f"{type(info).__name__}")
    checks = {"sample_rate": (lambda v: type(v) is int and v > 0, "a positive whole number of Hz"),
              "clip_seconds": (lambda v: type(v) in (int, float) and math.isfinite(v) and v > 0,
                               "a positive number of seconds")}
    for key, (ok, what) in checks.items():
        if key in info and not ok(info[key]):
            raise LogitCacheError(f"{path}: {key} must be {what} (got {shorten(json.dumps(info[key]))})")
    return info


def _leaves_folder(sample_id: str) -> bool:
    """An id that names a path outside the data folder by its text alone (absolute, or climbing
    out with ``..``); symlinks are resolved by the header scan. String tests first: this runs
    for every row of a 2M-row labels.csv."""
    if os.path.isabs(sample_id) or os.path.splitdrive(sample_id)[0]:
        return True
    return ".." in sample_id and os.path.normpath(sample_id).split(os.sep)[0] == os.pardir


PATH_LIMIT = 160  # characters of a file path quoted in an error (the folder and the id's tail stay)

_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _audio_error(path: str, e: Exception, listed_in: str = "labels.csv") -> LogitCacheError:
    if isinstance(e, FileNotFoundError) or not os.path.exists(path):
        return LogitCacheError(f"{shorten(path, PATH_LIMIT)}: audio file not found (listed in {listed_in})")
    # an OSError's and libsndfile's texts repeat the path: keep the reason, short
    if isinstance(e, OSError) and e.strerror:
        reason = e.strerror
    else:
        reason = shorten((str(e).splitlines() or [type(e).__name__])[0], PATH_LIMIT)
    return LogitCacheError(f"{shorten(path, PATH_LIMIT)}: cannot decode audio ({reason})")


def _stat_regular(path: str, listed_in: str = "labels.csv", what: str = "audio") -> os.stat_result:
    """``os.stat`` of a data file, refusing anything but a regular file: reading a FIFO or a
    device blocks forever or never ends."""
    try:
        st = os.stat(path)
    except OSError as e:
        if what != "audio" and (isinstance(e, FileNotFoundError) or not os.path.exists(path)):
            raise LogitCacheError(f"{shorten(path, PATH_LIMIT)}: {what} file not found "
                                  f"(listed in {listed_in})") from None
        raise _audio_error(path, e, listed_in) from None
    if not stat.S_ISREG(st.st_mode):
        kind = next((k for test, k in _FILE_KINDS if test(st.st_mode)), "not a regular file")
        raise LogitCacheError(f"{shorten(path, PATH_LIMIT)}: {kind}, not an {what} file "
                              f"(listed in {listed_in})")
    return st


@lru_cache(maxsize=4096)
def _real_dir(path: str) -> str:
    return os.path.realpath(path)


def _resolved(path: str) -> str:
    """``os.path.realpath(path)`` with each directory resolved once (a 2M-clip folder has few
    directories), so a file costs one ``lstat``, not one per path component."""
    head, tail = os.path.split(path)
    if tail in ("", ".", ".."):
        return os.path.realpath(path)
    real = os.path.join(_real_dir(head), tail)
    return os.path.realpath(real) if os.path.islink(real) else real


def _header_rate(root: Path, real_root: str, sample_id: str) -> int:
    path = str(root / sample_id)
    _stat_regular(path)
    real = _resolved(path)
    if not real.startswith(real_root.rstrip(os.sep) + os.sep):
        raise LogitCacheError(f"{root / 'labels.csv'}: id {quote(sample_id)} leaves the data folder "
                              f"(it resolves to {shorten(real, PATH_LIMIT)})")
    try:
        rate, frames = _header(path)
    except (soundfile.LibsndfileError, RuntimeError, OSError) as e:
        raise _audio_error(path, e) from None
    if frames == 0:
        raise LogitCacheError(f"{shorten(path, PATH_LIMIT)}: zero-length audio")
    return rate


def _header(path: str) -> tuple[int, int]:
    """(sample rate, frames) from the file's header. libsndfile's open alone: ``soundfile.info``
    also formats a text description of the file, 5x the cost (~120 of ~170 us per file of the
    dump's header scan). A file libsndfile refuses goes through ``soundfile.info`` for its error."""
    try:
        from soundfile import _ffi, _snd

        info = _ffi.new("SF_INFO*")
        handle = _snd.sf_open(os.fsencode(path), 0x10, info)  # SFM_READ
    except (ImportError, AttributeError):  # a soundfile without these internals
        handle = None
    if not handle:  # None or NULL
        info = soundfile.info(path)
        return int(info.samplerate), int(info.frames)
    _snd.sf_close(handle)
    return int(info.samplerate), int(info.frames)


def _load_audio(path: str, sample_rate: int, listed_in: str = "labels.csv") -> tuple[torch.Tensor, int]:
    """(decoded audio, crc32 of the file's bytes). The decode cache is keyed by the file's
    identity and modification time too, so a file edited in place is read again, not served
    (with its old crc) from memory."""
    st = _stat_regular(path, listed_in)
    return _decode(path, sample_rate, st.st_ino, st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=64)  # mixup partners and replays reload the same clips; decoding is the costly part
def _decode(path: str, sample_rate: int, inode: int, size: int, mtime_ns: int) -> tuple[torch.Tensor, int]:
    try:
        audio, sr, crc = _read_decode(path, size, mtime_ns)
    except (soundfile.LibsndfileError, RuntimeError, OSError) as e:
        raise _audio_error(path, e) from None
    if audio.shape[0] == 0:
        raise LogitCacheError(f"{shorten(path, PATH_LIMIT)}: zero-length audio")
    # a mono file is its own mix (its mean over one channel is itself, bit for bit), without the copy
    wave = torch.from_numpy(audio if audio.ndim == 1 else np.ascontiguousarray(audio.mean(axis=1)))
    if sr != sample_rate:
        wave = _resample(wave, sr, sample_rate)
    return wave, crc


def _read_decode(path: str, size: int, mtime_ns: int) -> tuple[np.ndarray, int, int]:
    """(float32 samples, file rate, crc32 of the file's bytes) from one open file: the bytes are
    read once for the crc, then libsndfile decodes the same open file with its own C reads
    (through Python file-object callbacks, decoding a 1 s clip cost ~25% more). A file written to
    while it is read (size or mtime other than ``stat`` saw) is decoded from the bytes the crc
    was taken of; so is one this path cannot open, for libsndfile's own error."""
    with open(path, "rb", buffering=0) as f:
        data = f.readall()
        pcm = _pcm16_wav(data)
        if pcm is not None:
            return (*pcm, zlib.crc32(data))
        fd = f.fileno()
        if len(data) == size and _unchanged(fd, size, mtime_ns):
            f.seek(0)
            decoded = _decode_fd(fd)
            if decoded is not None and _unchanged(fd, size, mtime_ns):
                return (*decoded, zlib.crc32(data))
    audio, sr = soundfile.read(io.BytesIO(data), dtype="float32")
    return audio, sr, zlib.crc32(data)


def _pcm16_wav(data: bytes) -> tuple[np.ndarray, int] | None:
    """(samples, rate) of a plain 16-bit PCM WAV (format tag 1, ``fmt `` before ``data``, a data
    chunk the file holds whole), decoded from the bytes in memory; None for anything else
    (libsndfile decodes those). Bit for bit libsndfile's: it converts a 16-bit sample s to
    float32 as ``s * (1 / 32768)``, exact in float32, which is what numpy does here."""
    if len(data) < 44 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    pos, fmt = 12, None
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        body = pos + 8
        if cid == b"fmt ":
            if size < 16:
                return None
            tag, channels, rate = (int.from_bytes(data[body + a:body + b], "little") for a, b in ((0, 2), (2, 4), (4, 8)))
            align, bits = (int.from_bytes(data[body + a:body + b], "little") for a, b in ((12, 14), (14, 16)))
            fmt = (tag, channels, rate, align, bits)
        elif cid == b"data":
            if fmt is None or fmt[0] != 1 or fmt[4] != 16 or fmt[1] < 1 or fmt[3] != 2 * fmt[1] or fmt[2] < 1:
                return None
            if size == 0 or size % fmt[3] or body + size > len(data):
                return None  # empty, ragged or cut short: libsndfile's rules (and errors) apply
            samples = np.frombuffer(data, "<i2", size // 2, body).astype(np.float32)
            samples *= np.float32(1.0 / 32768.0)
            return (samples if fmt[1] == 1 else samples.reshape(-1, fmt[1])), fmt[2]
        pos = body + size + (size & 1)
    return None


def _unchanged(fd: int, size: int, mtime_ns: int) -> bool:
    st = os.fstat(fd)
    return st.st_size == size and st.st_mtime_ns == mtime_ns


_MAX_FRAMES = 1 << 36  # above this libsndfile's count is "unknown" (a stream), not a length


def _decode_fd(fd: int) -> tuple[np.ndarray, int] | None:
    """``soundfile.read(fd, dtype="float32")`` (mono as 1-D), bit for bit, calling libsndfile
    directly: soundfile's Python wrapper is half the cost of decoding a 1 s clip. None where
    libsndfile cannot open it or this soundfile lacks the internals (the caller then decodes
    through soundfile, which also words the error)."""
    try:
        from soundfile import _ffi, _snd
    except ImportError:
        return None
    try:
        info = _ffi.new("SF_INFO*")
        handle = _snd.sf_open_fd(fd, 0x10, info, 0)  # SFM_READ; 0: the descriptor stays ours
    except AttributeError:
        return None
    if handle == _ffi.NULL:
        return None
    try:
        if not 0 <= info.frames < _MAX_FRAMES:
            return None
        shape = (info.frames,) if info.channels == 1 else (info.frames, info.channels)
        out = np.empty(shape, np.float32)
        read = _snd.sf_readf_float(handle, _ffi.cast("float*", out.__array_interface__["data"][0]), info.frames)
        if _snd.sf_error(handle):  # soundfile raises here: let it, with its words
            return None
        return out[:read], int(info.samplerate)
    finally:
        _snd.sf_close(handle)


@lru_cache(maxsize=16)
def _resample_kernel(orig: int, new: int):
    """torchaudio's sinc kernel for ``orig`` -> ``new`` Hz, made once per rate pair: resample()
    rebuilds it on every call (~0.7 ms here: 60% of resampling a 1 s clip, 20% of a 10 s one)."""
    import math

    from torchaudio.functional.functional import _get_sinc_resample_kernel

    gcd = math.gcd(orig, new)
    kernel, width = _get_sinc_resample_kernel(orig, new, gcd, 6, 0.99, "sinc_interp_hann", None,
                                              torch.device("cpu"), torch.float32)
    return gcd, kernel, width


def _resample(wave: torch.Tensor, orig: int, new: int) -> torch.Tensor:
    """``torchaudio.functional.resample(wave, orig, new)`` with its default settings, bit for bit,
    with the kernel cached."""
    try:
        from torchaudio.functional.functional import _apply_sinc_resample_kernel

        gcd, kernel, width = _resample_kernel(int(orig), int(new))
    except (ImportError, AttributeError, TypeError):  # another torchaudio: its public function
        return AF.resample(wave, orig, new)
    return _apply_sinc_resample_kernel(wave, int(orig), int(new), gcd, kernel, width)


# ---------------------------------------------------------------- images
def _image_error(path: str, e: Exception) -> LogitCacheError:
    reason = e.strerror if isinstance(e, OSError) and e.strerror else \
        shorten((str(e).splitlines() or [type(e).__name__])[0], PATH_LIMIT)
    return LogitCacheError(f"{shorten(path, PATH_LIMIT)}: cannot decode image ({reason})")


def _image_header(path: str, listed_in: str) -> tuple[int, int]:
    """(H, W) from the image's header (Pillow reads no pixels until asked); the scan's check."""
    from PIL import Image

    _stat_regular(path, listed_in, "image")
    try:
        with Image.open(path) as im:
            w, h = im.size
    except (OSError, ValueError, SyntaxError) as e:  # PIL.UnidentifiedImageError is an OSError
        raise _image_error(path, e) from None
    if not (h and w):
        raise LogitCacheError(f"{shorten(path, PATH_LIMIT)}: empty image (0 pixels)")
    return h, w


def _load_image(path: str, listed_in: str) -> tuple[torch.Tensor, int]:
    """(float32 ``[3, H0, W0]`` in [0, 1], crc32 of the file's bytes), cached like audio."""
    st = _stat_regular(path, listed_in, "image")
    return _decode_image(path, st.st_ino, st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=64)
def _decode_image(path: str, inode: int, size: int, mtime_ns: int) -> tuple[torch.Tensor, int]:
    from PIL import Image

    try:
        with open(path, "rb") as f:
            data = f.read()  # one read: the crc and the decode see the same bytes
        with Image.open(io.BytesIO(data)) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)  # greyscale, palette and RGBA alike
    except (OSError, ValueError, SyntaxError) as e:
        raise _image_error(path, e) from None
    if rgb.size == 0:
        raise LogitCacheError(f"{shorten(path, PATH_LIMIT)}: empty image (0 pixels)")
    image = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).to(torch.float32) / 255.0
    return image, zlib.crc32(data)
