"""Trusting the data folder: ids stay inside it, only regular files are read, labels.csv /
classes.txt / dataset.json are decoded strictly with one-line errors, long ids make short errors,
and audio changed under a cache (content crc32 per source file) is refused by dump --resume,
train, replay and fidelity."""

from __future__ import annotations

import builtins
import io
import os
import shutil
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile
from click.testing import CliRunner

import logitcache
from logitcache import LogitCacheError
from logitcache.augment import Augmenter, epoch_order, id_hashes, load_ops_spec, view_seeds
from logitcache.cache import CacheWriter
from logitcache.cli.main import main
from logitcache.data import AudioFolder, _decode
from logitcache.errors import quote
from logitcache.report import fidelity, inspect_cache, verify_cache
from logitcache.storage import open_store
from logitcache.train import train
from logitcache.views import CacheStream, DrawnViews, SourceContent, ViewSource, collate_views
from conftest import CLIP_SECONDS, SR, assert_one_line_error

TEACHERS = ["toy_teachers:toy_a"]
KW = dict(topk=5, augment="strong", seed=0, batch_size=8, output_kind="multilabel", members=False,
          value_dtype="float32", sample_rate=SR, clip_seconds=CLIP_SECONDS, num_workers=0, chunk_rows=8,
          progress=False)


def _copy(dataset: Path, dst: Path) -> Path:
    shutil.copytree(dataset, dst)
    return dst


def _edit_in_place(path: Path) -> None:
    """Flip the lowest bit of every sample: same format, same size, other bytes."""
    before, info = path.read_bytes(), soundfile.info(str(path))
    audio, sr = soundfile.read(str(path), dtype="int16", always_2d=True)
    soundfile.write(str(path), audio ^ np.int16(1), sr, subtype=info.subtype, format=info.format)
    assert path.stat().st_size == len(before) and path.read_bytes() != before


def _crc(path: Path) -> int:
    return zlib.crc32(path.read_bytes())


@pytest.fixture(scope="module")
def pristine(dataset, tmp_path_factory) -> Path:
    """A copy of the dataset the module's cache is dumped from; tests edit copies of it."""
    return _copy(dataset, tmp_path_factory.mktemp("trust") / "data")


@pytest.fixture(scope="module")
def cache(pristine, tmp_path_factory) -> Path:
    """One epoch of 'strong' views (mixup included), 3 chunks of 8 rows."""
    out = tmp_path_factory.mktemp("trust") / "c.zarr"
    return Path(logitcache.dump(pristine, TEACHERS, out, epochs=1, **KW))


@pytest.fixture
def data(pristine, tmp_path) -> Path:
    return _copy(pristine, tmp_path / "data")


def _wav_ids(folder_or_ids) -> list[str]:
    ids = folder_or_ids.ids if hasattr(folder_or_ids, "ids") else folder_or_ids
    return [i for i in ids if i.endswith(".wav")]


# ---------------------------------------------------------------- 1. ids stay inside the data folder
@pytest.mark.parametrize("how", ["dotdot", "absolute", "inner_dotdot"])
def test_ids_that_leave_the_data_folder_are_refused(data, tmp_path, how):
    outside = tmp_path / "x.wav"
    shutil.copy(data / _wav_ids(AudioFolder(data))[0], outside)  # exists: today it would be read
    bad = {"dotdot": "../x.wav", "absolute": str(outside), "inner_dotdot": "audio/../../x.wav"}[how]
    labels = data / "labels.csv"
    lines = labels.read_text().splitlines()
    lines[3] = f"{bad},tone"
    labels.write_text("\n".join(lines) + "\n")
    with pytest.raises(LogitCacheError) as e:
        AudioFolder(data)
    assert_one_line_error(e, f"{labels}: id {quote(bad)} leaves the data folder")


def test_a_symlink_out_of_the_data_folder_is_refused(data, tmp_path):
    folder = AudioFolder(data)
    victim = _wav_ids(folder)[1]
    outside = tmp_path / "elsewhere.wav"
    shutil.move(data / victim, outside)
    (data / victim).symlink_to(outside)
    out = tmp_path / "out.zarr"
    with pytest.raises(LogitCacheError) as e:
        logitcache.dump(data, TEACHERS, out, **KW)
    assert_one_line_error(e, f"id {victim!r} leaves the data folder", f"resolves to {outside.resolve()}")
    assert not out.exists()
    # a link that stays inside is fine
    (data / victim).unlink()
    shutil.move(outside, data / "audio" / "real.wav")
    (data / victim).symlink_to(Path("real.wav"))
    assert sum(AudioFolder(data).source_sample_rates().values()) == len(folder)
    # a linked directory that leads out: its first file is named
    shutil.move(data / "audio", tmp_path / "audio_elsewhere")
    (data / "audio").symlink_to(tmp_path / "audio_elsewhere")
    with pytest.raises(LogitCacheError) as e:
        AudioFolder(data).source_sample_rates()
    assert_one_line_error(e, f"id {folder.ids[0]!r} leaves the data folder",
                          f"resolves to {(tmp_path / 'audio_elsewhere').resolve() / Path(folder.ids[0]).name}")


# ---------------------------------------------------------------- 2. non-regular files
class _FifoUnblocker:
    """Opens the write end of a FIFO whenever a reader waits on it and closes it at once, so a
    reader gets end-of-file instead of blocking forever (what the code before the check did)."""

    def __init__(self, path: Path):
        self.path, self.stop = path, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.wait(0.01):
            try:
                os.close(os.open(self.path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:  # ENXIO: no reader yet
                pass

    def close(self):
        self.stop.set()
        self.thread.join()


def test_a_fifo_in_labels_csv_is_refused_not_read(data):
    victim = _wav_ids(AudioFolder(data))[2]
    (data / victim).unlink()
    os.mkfifo(data / victim)
    unblock = _FifoUnblocker(data / victim)
    try:
        folder = AudioFolder(data)
        with pytest.raises(LogitCacheError) as e:
            folder.source_sample_rates()  # the dump's header scan
        assert_one_line_error(e, f"{data / victim}: a FIFO, not an audio file")
        with pytest.raises(LogitCacheError) as e:  # training has no header scan: the load checks too
            folder.load(folder.index[victim], SR)
        assert_one_line_error(e, f"{data / victim}: a FIFO, not an audio file")
    finally:
        unblock.close()


def test_a_directory_in_labels_csv_is_refused(data, tmp_path):
    labels = data / "labels.csv"
    lines = labels.read_text().splitlines()
    lines[1] = "audio,tone"
    labels.write_text("\n".join(lines) + "\n")
    with pytest.raises(LogitCacheError) as e:
        logitcache.dump(data, TEACHERS, tmp_path / "out.zarr", **KW)
    assert_one_line_error(e, f"{data / 'audio'}: a directory, not an audio file")


# ---------------------------------------------------------------- 3. labels.csv, classes.txt, dataset.json
@pytest.mark.parametrize("name", ["labels.csv", "classes.txt"])
def test_text_that_is_not_utf8_names_the_byte_and_line(data, name):
    path = data / name
    raw = path.read_bytes()
    at = raw.index(b"\n", raw.index(b"\n") + 1) + 1  # start of line 3
    path.write_bytes(raw[:at] + b"\xff" + raw[at:])
    with pytest.raises(LogitCacheError) as e:
        AudioFolder(data)
    assert_one_line_error(e, f"{path}: not UTF-8 text (byte {at}, line 3")


def test_a_utf8_byte_order_mark_is_accepted(data, pristine):
    for name in ("labels.csv", "classes.txt"):
        (data / name).write_bytes(b"\xef\xbb\xbf" + (data / name).read_bytes())
    got, want = AudioFolder(data), AudioFolder(pristine)
    assert got.ids == want.ids and got.classes == want.classes
    assert np.array_equal(got.label_rows(np.arange(len(got))), want.label_rows(np.arange(len(want))))
    # the byte offset of a bad byte counts the mark too
    (data / "labels.csv").write_bytes((data / "labels.csv").read_bytes() + b"x\xfe,tone\n")
    with pytest.raises(LogitCacheError) as e:
        AudioFolder(data)
    assert_one_line_error(e, f"byte {(data / 'labels.csv').stat().st_size - 7}, line {len(want) + 2}")


def test_a_field_over_the_csv_limit_names_the_line(data):
    labels = data / "labels.csv"
    lines = labels.read_text().splitlines()
    lines[2] = "a" * 200_000 + ".wav,tone"
    labels.write_text("\n".join(lines) + "\n")
    with pytest.raises(LogitCacheError) as e:
        AudioFolder(data)
    assert_one_line_error(e, f"{labels}: line 3: field larger than field limit (131072)")
    assert len(str(e.value)) < 300


@pytest.mark.parametrize("text,needle", [
    ("{sample_rate: 16000}",
     "not valid JSON (Expecting property name enclosed in double quotes at line 1 column 2)"),
    ("[16000]", "must be a JSON object"),
    ('{"sample_rate": "16k"}', 'sample_rate must be a positive whole number of Hz (got "16k")'),
    ('{"sample_rate": 0}', "sample_rate must be a positive whole number of Hz (got 0)"),
    ('{"sample_rate": 16000.5}', "sample_rate must be a positive whole number of Hz (got 16000.5)"),
    ('{"sample_rate": true}', "sample_rate must be a positive whole number of Hz (got true)"),
    ('{"clip_seconds": -1}', "clip_seconds must be a positive number of seconds (got -1)"),
    ('{"clip_seconds": NaN}', "clip_seconds must be a positive number of seconds (got NaN)"),
    ('{"clip_seconds": "2"}', 'clip_seconds must be a positive number of seconds (got "2")'),
], ids=["not_json", "not_object", "rate_text", "rate_zero", "rate_fraction", "rate_bool", "clip_negative",
        "clip_nan", "clip_text"])
def test_bad_dataset_json_names_the_file_and_key(data, text, needle):
    (data / "dataset.json").write_text(text)
    with pytest.raises(LogitCacheError) as e:
        AudioFolder(data)
    assert_one_line_error(e, f"{data / 'dataset.json'}: {needle}")


def test_a_good_dataset_json_sets_the_defaults(data):
    (data / "dataset.json").write_text('{"sample_rate": 22050, "clip_seconds": 2, "description": "x"}')
    folder = AudioFolder(data)
    assert (folder.default_sample_rate, folder.default_clip_seconds) == (22050, 2.0)


def test_cli_bad_labels_csv_encoding_is_one_line(data, tmp_path):
    (data / "labels.csv").write_bytes(b"filename,labels\n\xe9t\xe9.wav,tone\n")
    r = CliRunner().invoke(main, ["dump", "--data", str(data), "--teacher", TEACHERS[0], "--out",
                                  str(tmp_path / "c.zarr")])
    assert r.exit_code == 1 and "Traceback" not in r.output
    last = r.stderr.strip().splitlines()[-1]
    assert last == f"error: {data / 'labels.csv'}: not UTF-8 text (byte 16, line 2: " \
                   "invalid continuation byte)"


# ---------------------------------------------------------------- 4. long ids make short errors
def test_a_100k_character_id_gives_a_short_error(data, tmp_path):
    long_id = "audio/" + "x" * 100_000 + ".wav"
    labels = data / "labels.csv"
    text = labels.read_text()
    labels.write_text(text + f"{long_id},tone\n{long_id},tone\n")
    with pytest.raises(LogitCacheError) as e:
        AudioFolder(data)
    assert_one_line_error(e, "duplicate id 'audio/xxx", "…", "xxx.wav'")
    assert len(str(e.value)) < len(str(labels)) + 120
    labels.write_text(text + f"{long_id},tone\n")  # listed once: the header scan names the file, shortened
    with pytest.raises(LogitCacheError) as e:
        AudioFolder(data).source_sample_rates()
    assert_one_line_error(e, "…", "xxx.wav")
    assert len(str(e.value)) < 300


# ---------------------------------------------------------------- 5. multiclass dump over multi-label rows
def test_multiclass_dump_over_multi_label_rows_warns(pristine, tmp_path, capfd):
    folder = AudioFolder(pristine)
    multi = [i for i in range(len(folder)) if folder.label_rows([i]).sum() >= 2]
    assert 0 < len(multi) < len(folder)
    kw = {**KW, "augment": "none", "output_kind": "multiclass"}
    logitcache.dump(pristine, TEACHERS, tmp_path / "mc.zarr", epochs=1, **kw)
    warnings = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("warning: ")]
    assert warnings == [f"warning: --output-kind multiclass, but {len(multi)} of {len(folder)} rows of "
                        f"{pristine / 'labels.csv'} carry two or more labels "
                        f"(first: {folder.ids[multi[0]]!r}); "
                        f"use --output-kind multilabel if a clip can hold several classes"]
    logitcache.dump(pristine, TEACHERS, tmp_path / "ml.zarr", epochs=1, **{**kw, "output_kind": "multilabel"})
    assert "warning: " not in capfd.readouterr().err


# ---------------------------------------------------------------- 6. content fingerprints
def test_content_holds_the_crc32_of_each_source_file(cache, pristine):
    with logitcache.open_cache(cache) as c:
        content, order = c.store.read("content"), c.order(0)
        assert content.dtype == np.uint32 and content.shape == (c.num_samples,)
        assert content.tolist() == [_crc(pristine / c.ids[i]) for i in order]
        crc, known = c.content()
        assert known.all() and crc.tolist() == [_crc(pristine / i) for i in c.ids]
    assert verify_cache(cache)["ok"]
    assert "content" in {a["name"] for a in inspect_cache(cache)["arrays"]}


@pytest.mark.parametrize("ext", [".wav", ".flac"])
def test_load_audio_reads_each_file_once(pristine, monkeypatch, ext):
    """One open of the file: its bytes give the crc, and the samples come from those bytes (a
    16-bit WAV) or from libsndfile decoding that same open file (anything else)."""
    from logitcache import data as lcdata

    folder = AudioFolder(pristine)
    i = next(j for j, sid in enumerate(folder.ids) if sid.endswith(ext))
    path = str(pristine / folder.ids[i])
    opened, decoded_from = [], []
    real_open, real_decode_fd = builtins.open, lcdata._decode_fd

    def counting_open(f, *a, **k):
        opened.append(str(f))
        return real_open(f, *a, **k)

    def recording_decode_fd(fd):
        decoded_from.append(os.fstat(fd).st_ino)
        return real_decode_fd(fd)

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(lcdata, "_decode_fd", recording_decode_fd)
    _decode.cache_clear()
    wave, crc = folder.load_with_crc(i, SR)
    assert opened.count(path) == 1 and decoded_from == ([] if ext == ".wav" else [os.stat(path).st_ino])
    assert crc == _crc(Path(path))
    assert folder.load(i, SR) is wave and opened.count(path) == 1  # served from the decode cache


@pytest.mark.parametrize("fmt,subtype,channels", [("WAV", "PCM_16", 1), ("WAV", "PCM_16", 2), ("WAV", "PCM_24", 2),
                                                  ("WAV", "FLOAT", 1), ("FLAC", "PCM_16", 2), ("OGG", "VORBIS", 1)])
def test_decode_matches_soundfile_bit_for_bit(tmp_path, fmt, subtype, channels):
    """The WAV fast path and libsndfile called directly give soundfile.read's float32 samples."""
    from logitcache.data import _read_decode

    x = np.random.default_rng(channels).uniform(-0.9, 0.9, (3001, channels)).astype(np.float32)
    path = tmp_path / f"a.{fmt.lower()}"
    soundfile.write(str(path), x, 22050, subtype=subtype, format=fmt)
    st = path.stat()
    audio, sr, crc = _read_decode(str(path), st.st_size, st.st_mtime_ns)
    want, want_sr = soundfile.read(str(path), dtype="float32")
    assert (sr, audio.dtype, audio.shape) == (want_sr, np.float32, want.shape) and np.array_equal(audio, want)
    assert crc == _crc(path)


def test_decode_of_a_file_changing_while_read_uses_the_crcs_bytes(pristine, tmp_path, monkeypatch):
    """A file whose size or mtime is not what stat saw is decoded from the very bytes its crc is
    of (never libsndfile re-reading a file that changed under it)."""
    from logitcache import data as lcdata

    folder = AudioFolder(pristine)
    path = pristine / next(i for i in folder.ids if i.endswith(".flac"))  # not a 16-bit WAV: libsndfile's
    st = path.stat()
    monkeypatch.setattr(lcdata, "_decode_fd", lambda fd: pytest.fail("decoded the file again"))
    audio, sr, crc = lcdata._read_decode(str(path), st.st_size, st.st_mtime_ns - 1)
    want, want_sr = soundfile.read(str(path), dtype="float32")
    assert sr == want_sr and np.array_equal(audio, want) and crc == _crc(path)


def test_train_refuses_audio_edited_in_place(cache, data, tmp_path):
    victim = _wav_ids(AudioFolder(data))[0]
    _edit_in_place(data / victim)
    for workers in (0, 2):
        with pytest.raises(LogitCacheError) as e:
            train(cache, data, "cnn_tiny", tmp_path / f"run{workers}", epochs=1, batch_size=8,
                             num_workers=workers, progress=False)
        assert_one_line_error(e, f"{data / victim}: changed since the dump (content crc differs); "
                                 f"the cache's targets belong to the old file")


def test_replay_and_fidelity_refuse_audio_edited_in_place(cache, data):
    folder = AudioFolder(data)
    victim = _wav_ids(folder)[0]
    with logitcache.open_cache(cache) as c:
        partners = c.params(0, c.ids)["mixup.partner"]
    clean = next(i for i, p in zip(folder.ids, partners) if i != victim and p != folder.index[victim])
    _edit_in_place(data / victim)
    logitcache.replay(cache, data, 0, clean)  # views that do not touch the file still replay
    with pytest.raises(LogitCacheError) as e:
        logitcache.replay(cache, data, 0, victim)
    assert_one_line_error(e, f"{data / victim}: changed since the dump (content crc differs)")
    with pytest.raises(LogitCacheError) as e:
        fidelity(cache, data, TEACHERS, samples=len(folder), device="cpu")
    assert_one_line_error(e, f"{data / victim}: changed since the dump (content crc differs)")


def test_an_edited_mixup_partner_is_detected(cache, data):
    folder = AudioFolder(data)
    with logitcache.open_cache(cache) as c:
        partners = c.params(0, c.ids)["mixup.partner"]
    # a view mixed with a WAV partner, the view's own file left alone
    view = next(i for i, p in enumerate(partners) if p >= 0 and folder.ids[p].endswith(".wav"))
    partner = folder.ids[partners[view]]
    _edit_in_place(data / partner)
    with pytest.raises(LogitCacheError) as e:
        logitcache.replay(cache, data, 0, folder.ids[view])
    assert_one_line_error(e, f"{data / partner}: changed since the dump")


def test_dump_checks_mixup_partners_too(pristine):
    """The dump sees the crc of every file a view decodes, the partner's included."""
    folder = AudioFolder(pristine)
    aug = Augmenter(load_ops_spec("strong"), SR, CLIP_SECONDS)
    hashes = id_hashes(folder.ids)
    order = epoch_order(0, 0, hashes)
    views = DrawnViews(ViewSource(folder, aug), order, view_seeds(0, 0, hashes)[order])
    items = [views[p] for p in range(len(views))]
    pos = next(p for p, item in enumerate(items) if item[1]["mixup.partner"] >= 0)
    own, partner = int(order[pos]), int(items[pos][1]["mixup.partner"])
    _, _, _, decoded = collate_views([items[pos]])
    crcs = [_crc(pristine / folder.ids[i]) for i in (own, partner)]
    assert decoded.own.tolist() == crcs[:1]
    assert decoded.index.tolist() == [own, partner] and decoded.crc.tolist() == crcs
    table = SourceContent.empty(len(folder))
    table.record(folder, decoded.index, decoded.crc)
    table.crc[partner] ^= 1  # the cache holds another version of the partner
    with pytest.raises(LogitCacheError) as e:
        table.record(folder, decoded.index, decoded.crc)
    assert_one_line_error(e, f"data changed since the dump started: {folder.ids[partner]} "
                             f"(crc {crcs[1]:08x} now, {crcs[1] ^ 1:08x} in the cache)")


class _Stop(Exception):
    pass


def test_resume_refuses_a_file_edited_after_its_views_were_written(data, tmp_path, monkeypatch):
    out = tmp_path / "run.zarr"
    real_put = CacheWriter.put

    def put_one_chunk_then_stop(self, epoch, chunk, block):
        real_put(self, epoch, chunk, block)
        raise _Stop()  # the dump stops here; chunk 0 is written and marked done

    monkeypatch.setattr(CacheWriter, "put", put_one_chunk_then_stop)
    with pytest.raises(_Stop):
        logitcache.dump(data, TEACHERS, out, epochs=2, **KW)
    monkeypatch.setattr(CacheWriter, "put", real_put)
    with logitcache.open_cache(out) as c:
        assert c.chunks_done().sum() == 1
        first = c.read_block(0, 0, KW["chunk_rows"], params=False, targets=False)["order"]
        written = [c.ids[i] for i in first]
    victim = _wav_ids(written)[0]
    original = (data / victim).read_bytes()
    _edit_in_place(data / victim)
    with pytest.raises(LogitCacheError) as e:
        logitcache.dump(data, TEACHERS, out, epochs=2, resume=True, **KW)
    now, was = _crc(data / victim), zlib.crc32(original)
    assert_one_line_error(e, f"data changed since the dump started: {victim} (crc {now:08x} now, {was:08x} "
                             f"in the cache); restore it or dump to a new --out")
    with logitcache.open_cache(out) as c:
        assert c.chunks_done()[0, 0] and not c.complete  # nothing written is lost
    (data / victim).write_bytes(original)  # restored: the resume finishes
    logitcache.dump(data, TEACHERS, out, epochs=2, resume=True, **KW)
    assert verify_cache(out)["ok"]


def _without_content(cache: Path, dst: Path, manifest_too: bool = True) -> Path:
    """A cache as the version before ``content`` wrote it."""
    shutil.copytree(cache, dst)
    shutil.rmtree(dst / "content")
    if manifest_too:
        store = open_store(dst, "r+")
        m = store.read_manifest()
        m.pop("content")
        store.write_manifest(m)
        store.close()
    return dst


def test_a_cache_without_content_still_trains_verifies_and_extends(cache, data, tmp_path):
    old = _without_content(cache, tmp_path / "old.zarr")
    report = verify_cache(old)
    assert report["ok"] and report["problems"] == []
    with logitcache.open_cache(old) as c:
        assert c.content() is None
    victim = _wav_ids(AudioFolder(data))[0]
    _edit_in_place(data / victim)  # nothing to compare with: used as before
    batches = list(CacheStream(old, data, 0, batch_size=8))
    assert sum(len(b["order"]) for b in batches) == len(AudioFolder(data))
    train(old, data, "cnn_tiny", tmp_path / "run", epochs=1, batch_size=8, progress=False)
    logitcache.dump(data, TEACHERS, old, epochs=2, resume=True, **KW)  # extended by an epoch
    with logitcache.open_cache(old) as c:
        assert c.complete and c.epochs == 2 and "content" not in c.store.arrays()
    assert verify_cache(old)["ok"]
    # the array gone while the manifest says it is there: damage, named
    broken = _without_content(cache, tmp_path / "broken.zarr", manifest_too=False)
    assert verify_cache(broken)["problems"] == ["content: array missing"]
    with pytest.raises(LogitCacheError) as e:
        logitcache.replay(broken, data, 0, victim)
    assert_one_line_error(e, f"{broken}: the content checksums cannot be read")



def test_pcm16_wav_fast_path_matches_libsndfile_and_leaves_odd_files_to_it(tmp_path):
    """16-bit WAVs with extra chunks (odd-sized, padded) decode from memory as soundfile does;
    a data chunk cut short, or any other encoding, is left to libsndfile."""
    import struct

    from logitcache.data import _pcm16_wav

    x = np.random.default_rng(0).integers(-32768, 32768, (500, 2), dtype=np.int16)
    x[0] = -32768
    b = io.BytesIO()
    soundfile.write(b, x, 22050, subtype="PCM_16", format="WAV")
    plain = b.getvalue()
    at = plain.index(b"data")
    listed = plain[:at] + b"LIST" + struct.pack("<I", 5) + b"abcde\0" + plain[at:] + b"junk" + struct.pack("<I", 2) + b"zz"
    for data in (plain, listed):
        got, rate = _pcm16_wav(data)
        want, want_rate = soundfile.read(io.BytesIO(data), dtype="float32")
        assert rate == want_rate == 22050 and got.shape == want.shape == (500, 2) and np.array_equal(got, want)
    assert _pcm16_wav(plain[:-10]) is None
    b = io.BytesIO()
    soundfile.write(b, x, 22050, subtype="PCM_24", format="WAV")
    assert _pcm16_wav(b.getvalue()) is None
