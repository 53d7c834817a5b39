"""Dataset folders: ``labels.csv`` (+ optional ``classes.txt`` and ``dataset.json``) and audio files.

The sample id is the ``filename`` string of labels.csv. Audio of any format soundfile reads,
any sample rate (resampled with torchaudio) and any length (cropped/padded by the augmenter).
The folder format is documented in data/README.md.
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
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
import soundfile
import torch
import torchaudio.functional as AF

from logitcache.errors import LogitCacheError, quote, shorten
from logitcache.labels import LabelTable

DEFAULT_SAMPLE_RATE = 16000
DEFAULT_CLIP_SECONDS = 10.0


def fingerprint(items: list[str]) -> str:
    """sha256 over a list of strings (length-prefixed, so no two lists collide by joining)."""
    h = hashlib.sha256()
    for s in items:
        b = s.encode()
        h.update(len(b).to_bytes(8, "little") + b)
    return h.hexdigest()


class AudioFolder:
    """A labelled audio dataset folder; rows are addressed by sample id or dataset index."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise LogitCacheError(f"{self.root}: data folder not found")
        labels_csv = self.root / "labels.csv"
        if not labels_csv.is_file():
            raise LogitCacheError(f"{labels_csv}: missing (a data folder needs labels.csv with filename,labels)")
        classes_txt = self.root / "classes.txt"
        self.table = LabelTable.from_csv(labels_csv, classes_txt if classes_txt.is_file() else None)
        self.ids: list[str] = self.table.ids
        self.classes: list[str] = self.table.classes
        self.info = _read_info(self.root / "dataset.json")

    def label_rows(self, index) -> np.ndarray:
        """Dense float32 ``[len(index), C]`` 0/1 label rows of the dataset indices ``index``. The
        folder keeps its labels sparse (``self.table``); ask for the rows a batch needs."""
        return self.table.rows(index)

    @property
    def index(self) -> dict[str, int]:
        """Sample id -> dataset index (made on first use)."""
        return self.table.index

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.ids)

    @property
    def default_sample_rate(self) -> int:
        return int(self.info.get("sample_rate", DEFAULT_SAMPLE_RATE))

    @property
    def default_clip_seconds(self) -> float:
        return float(self.info.get("clip_seconds", DEFAULT_CLIP_SECONDS))

    @property
    def multi_label_rows(self) -> np.ndarray:
        """Dataset indices of the rows that carry two or more labels."""
        return self.table.multi_label_rows()

    def load(self, index: int, sample_rate: int) -> torch.Tensor:
        """Decoded mono float32 audio at ``sample_rate`` (full length; the augmenter fits it to the clip)."""
        return self.load_with_crc(index, sample_rate)[0]

    def load_with_crc(self, index: int, sample_rate: int) -> tuple[torch.Tensor, int]:
        """``load`` and the zlib crc32 of the file's bytes, from the same single read of the file."""
        return _load_audio(str(self.root / self.ids[index]), int(sample_rate))

    def audio_bytes(self) -> int:
        return sum((self.root / i).stat().st_size for i in self.ids if (self.root / i).is_file())

    def source_sample_rates(self, threads: int = 8) -> dict[int, int]:
        """Sample rate -> number of files, from the headers only. Raises the error of the first bad
        file in labels.csv order (missing, not a regular file, resolving outside the folder,
        undecodable, zero-length), so a dump fails before any teacher time is spent rather than
        hours in."""
        from collections import Counter
        from concurrent.futures import ThreadPoolExecutor

        _real_dir.cache_clear()  # links may have changed since an earlier scan in this process
        scan = partial(_header_rate, self.root, os.path.realpath(self.root))
        with ThreadPoolExecutor(threads) as pool:  # libsndfile releases the GIL: headers on slow disks overlap
            return dict(sorted(Counter(pool.map(scan, self.ids)).items()))


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


def _audio_error(path: str, e: Exception) -> LogitCacheError:
    if isinstance(e, FileNotFoundError) or not os.path.exists(path):
        return LogitCacheError(f"{shorten(path, PATH_LIMIT)}: audio file not found (listed in labels.csv)")
    # an OSError's and libsndfile's texts repeat the path: keep the reason, short
    if isinstance(e, OSError) and e.strerror:
        reason = e.strerror
    else:
        reason = shorten((str(e).splitlines() or [type(e).__name__])[0], PATH_LIMIT)
    return LogitCacheError(f"{shorten(path, PATH_LIMIT)}: cannot decode audio ({reason})")


def _stat_regular(path: str) -> os.stat_result:
    """``os.stat`` of an audio file, refusing anything but a regular file: reading a FIFO or a
    device blocks forever or never ends."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise _audio_error(path, e) from None
    if not stat.S_ISREG(st.st_mode):
        kind = next((k for test, k in _FILE_KINDS if test(st.st_mode)), "not a regular file")
        raise LogitCacheError(f"{shorten(path, PATH_LIMIT)}: {kind}, not an audio file "
                              f"(listed in labels.csv)")
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
        info = soundfile.info(path)
    except (soundfile.LibsndfileError, RuntimeError, OSError) as e:
        raise _audio_error(path, e) from None
    if info.frames == 0:
        raise LogitCacheError(f"{shorten(path, PATH_LIMIT)}: zero-length audio")
    return int(info.samplerate)


def _load_audio(path: str, sample_rate: int) -> tuple[torch.Tensor, int]:
    """(decoded audio, crc32 of the file's bytes). The decode cache is keyed by the file's
    identity and modification time too, so a file edited in place is read again, not served
    (with its old crc) from memory."""
    st = _stat_regular(path)
    return _decode(path, sample_rate, st.st_ino, st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=64)  # mixup partners and replays reload the same clips; decoding is the costly part
def _decode(path: str, sample_rate: int, inode: int, size: int, mtime_ns: int) -> tuple[torch.Tensor, int]:
    try:
        with open(path, "rb") as f:
            data = f.read()  # one read: the crc and the decode see the same bytes
        audio, sr = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, OSError) as e:
        raise _audio_error(path, e) from None
    if audio.shape[0] == 0:
        raise LogitCacheError(f"{shorten(path, PATH_LIMIT)}: zero-length audio")
    wave = torch.from_numpy(np.ascontiguousarray(audio.mean(axis=1)))
    if sr != sample_rate:
        wave = _resample(wave, sr, sample_rate)
    return wave, zlib.crc32(data)


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
