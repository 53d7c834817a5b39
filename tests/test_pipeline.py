"""The dump's pipelined batch path (logitcache.pipeline): a batch's rows are materialised only once
the next batch is queued. On CPU the same code runs as on CUDA (streams are no-ops): these tests
check that deferring changes no row, that a bad batch is still refused naming its samples, and
that everything before it is handed to the writer (and nothing after it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import logitcache
from conftest import CLIP_SECONDS, SR, assert_one_line_error
from logitcache.augment import epoch_order, id_hashes
from logitcache.codecs import get_codec
from logitcache.errors import LogitCacheError
from logitcache.layout import codec_entries
from logitcache.pipeline import ChunkRows, EpochStep, TeacherPass, run_epoch
from logitcache.teachers import Teacher
from logitcache.views import Decoded, SourceContent

CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))
C, B, R, N = 12, 4, 8, 24  # classes, batch, chunk rows, views: batches 0-1 fill chunk 0, 2-3 chunk 1, ...


class Slice(torch.nn.Module):
    """Logits that are a slice of the views (frame level with ``frames``): NaN views give NaN logits."""

    def __init__(self, offset: int, frames: int | None = None):
        super().__init__()
        self.offset, self.frames = offset, frames

    def forward(self, x):
        z = x[:, self.offset:self.offset + C * (self.frames or 1)]
        return z.reshape(len(x), self.frames, C) if self.frames else z


class Writer:
    """Records the whole chunks handed to it, assembled (as the real writer's thread does) only at
    the end, after every batch: rows kept by reference must not have changed by then."""

    def __init__(self):
        self.handed: dict[int, object] = {}

    def put(self, epoch: int, chunk: int, block) -> None:
        self.handed[chunk] = block

    @property
    def chunks(self) -> dict[int, dict[str, np.ndarray]]:
        self.handed = {c: b() if callable(b) else b for c, b in self.handed.items()}
        return self.handed


class Folder:
    modality = "audio"
    ids = [f"clip_{i:02d}.wav" for i in range(N)]


def _pass(frames=None, codec="topk", k=3, dev="cpu") -> TeacherPass:
    teachers = [Teacher(f"t{i}", "slice", Slice(3 * i, frames), "") for i in range(3)]
    for t in teachers:
        t.out_shape = (frames, C) if frames else (C,)
    entries = codec_entries(codec, "float16", "uint8", sample_n=4 if codec == "sampled" else None)
    enc = get_codec(codec)(k, C, "multilabel", frames, entries["codec_options"])
    return TeacherPass(teachers, torch.device(dev), "fp32", enc, "multilabel", "mean_prob", None, True,
                       Folder.ids, moments=True)


def _batches(frames=None, nan_batch: int | None = None):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 6 + C * (frames or 1), generator=g) * 3
    out = []
    for i, a in enumerate(range(0, N, B)):
        pos = np.arange(a, a + B)
        wave = x[a:a + B].clone()
        if i == nan_batch:
            wave[1] = float("nan")
        params = {"gain.db": np.linspace(0, 1, B, dtype=np.float32) + i}
        out.append((wave, params, pos, Decoded(np.full(B, i, np.uint32), pos.copy(), np.full(B, i, np.uint32))))
    return out


def _rows(pos, params, decoded):
    return {"params/gain.db": params["gain.db"], "content": decoded.own}


def _step(tp, writer) -> EpochStep:
    order = np.arange(N)  # stored order = dataset order, so position p names Folder.ids[p]
    seeds = np.arange(N, dtype=np.uint64) * np.uint64(7919) + np.uint64(1)
    per_chunk = {p for p in tp.stats_paths}
    return EpochStep(tp, ChunkRows(writer, 0, R, N, per_chunk), SourceContent.empty(N), Folder, order, seeds, _rows)


def _straightforward(tp, batches) -> dict[int, dict[str, np.ndarray]]:
    """The unpipelined reference: each batch's rows at once, chunks concatenated from per-batch parts."""
    parts: dict[str, list] = {}
    seeds = np.arange(N, dtype=np.uint64) * np.uint64(7919) + np.uint64(1)
    for wave, params, pos, decoded in batches:
        rows = tp.rows(tp.submit(wave, pos, seeds[pos]))
        rows = {k: v.copy() for k, v in {**rows, **_rows(pos, params, decoded)}.items()}
        for k, v in rows.items():
            parts.setdefault(k, []).append(v)
    whole = {k: np.concatenate(v) for k, v in parts.items()}
    out = {}
    for c in range(N // R):
        block = {k: v[c * R:(c + 1) * R] for k, v in whole.items()}
        out[c] = {k: (v.sum(0, keepdims=True) if k in tp.stats_paths else v) for k, v in block.items()}
    return out


@pytest.mark.parametrize("dev", ["cpu", CUDA])
@pytest.mark.parametrize("frames,codec", [(None, "topk"), (5, "topk"), (None, "compact"), (None, "sampled")])
def test_pipelined_rows_equal_the_straightforward_rows(frames, codec, dev):
    """On CUDA: side streams, a pinned buffer per batch, one wait per batch."""
    batches = _batches(frames)
    want = _straightforward(_pass(frames, codec, dev=dev), batches)
    writer = Writer()
    run_epoch(iter(batches), _step(_pass(frames, codec, dev=dev), writer))
    assert sorted(writer.chunks) == [0, 1, 2]
    for c, block in want.items():
        got = writer.chunks[c]
        assert sorted(got) == sorted(block)
        assert [k for k in block if got[k].dtype != block[k].dtype or not np.array_equal(got[k], block[k])] == []
    assert "members/t2/values" in writer.chunks[0] or codec != "topk"


def test_chunks_do_not_share_memory_with_later_batches():
    """Rows may come back as views of reused host buffers: a chunk handed over must be its own copy."""
    writer = Writer()
    run_epoch(iter(_batches()), _step(_pass(), writer))
    arrays = [v for block in writer.chunks.values() for v in block.values()]
    assert not any(np.shares_memory(a, b) for i, a in enumerate(arrays) for b in arrays[i + 1:])


@pytest.mark.parametrize("dev", ["cpu", CUDA])
@pytest.mark.parametrize("nan_batch,done", [(3, [0]), (2, [0]), (0, [])])
def test_nan_batch_names_its_samples_and_earlier_chunks_are_handed_over(nan_batch, done, dev):
    """Batch ``nan_batch`` holds a NaN view (its row 1): the error names that sample; every chunk
    before it reaches the writer (also the one the batch queued before it completes), none after."""
    writer = Writer()
    with pytest.raises(LogitCacheError) as e:
        run_epoch(iter(_batches(nan_batch=nan_batch)), _step(_pass(dev=dev), writer))
    assert_one_line_error(e, "teacher t0", "NaN/Inf", Folder.ids[nan_batch * B + 1])
    assert sorted(writer.chunks) == done


def test_a_failing_teacher_still_hands_over_the_batch_queued_before_it():
    """A teacher raising on batch 2 (the first of chunk 1): batch 1, queued but not yet finished,
    completes chunk 0, which must reach the writer before the error propagates."""
    tp, calls = _pass(), []
    real = tp.teachers[1].module.forward

    def fails_on_third(x):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return real(x)

    tp.teachers[1].module.forward = fails_on_third
    writer = Writer()
    with pytest.raises(LogitCacheError) as e:
        run_epoch(iter(_batches()), _step(tp, writer))
    assert_one_line_error(e, "teacher t1 failed", "out of memory", Folder.ids[2 * B])
    assert sorted(writer.chunks) == [0]


def test_an_error_between_batches_hands_over_the_queued_batch():
    """The loader failing (a worker's decode error) after batch 1 was queued: chunk 0 is handed over."""
    def batches():
        yield from _batches()[:2]
        raise LogitCacheError("clip_08.wav: not a readable audio file")

    writer = Writer()
    with pytest.raises(LogitCacheError) as e:
        run_epoch(batches(), _step(_pass(), writer))
    assert_one_line_error(e, "clip_08.wav")
    assert sorted(writer.chunks) == [0]


def test_dump_with_a_bad_batch_keeps_its_earlier_chunks(dataset, tmp_path, monkeypatch):
    """The real dump, batches of 4, chunks of 8: a NaN in the third batch's second view is one line
    naming that sample; chunk 0 (batches 1-2) is durable although batch 3 was refused after batch 4
    was queued, and a resume completes the cache."""
    real, calls = TeacherPass._stacked, []

    def nan_in_third_batch(self, *a):
        bad, encoded, extra = real(self, *a)
        calls.append(1)
        if len(calls) == 3:
            encoded["values"][0, 1] = float("nan")
        return bad, encoded, extra

    kw = dict(epochs=1, topk=3, augment="none", sample_rate=SR, clip_seconds=CLIP_SECONDS, progress=False,
              batch_size=4, chunk_rows=8, num_workers=0)
    out = tmp_path / "bad.zarr"
    monkeypatch.setattr(TeacherPass, "_stacked", nan_in_third_batch)
    with pytest.raises(LogitCacheError) as e:
        logitcache.dump(dataset, ["toy_teachers:toy_a", "toy_teachers:toy_b"], out, **kw)
    ids = [line.split(",")[0] for line in (dataset / "labels.csv").read_text().splitlines()[1:]]
    assert_one_line_error(e, "target set ensemble", "NaN/Inf", ids[epoch_order(0, 0, id_hashes(ids))[2 * 4 + 1]])
    monkeypatch.setattr(TeacherPass, "_stacked", real)
    with logitcache.open_cache(out) as c:
        assert c.chunks_done().tolist() == [[True, False, False]]
    logitcache.dump(dataset, ["toy_teachers:toy_a", "toy_teachers:toy_b"], out, resume=True, **kw)
    with logitcache.open_cache(out) as c:
        assert c.complete


def test_a_param_off_its_grid_is_refused_as_is_and_earlier_chunks_are_kept(dataset, tmp_path, monkeypatch):
    """Chunks are assembled (and their params put on their stored grid) on the writer thread: a
    drawn value off its grid in the third batch (chunk 1) is still the one-line error naming the
    array, not a write failure, and chunk 0 is durable."""
    import importlib

    dump_module = importlib.import_module("logitcache.dump")
    real, calls = dump_module._view_rows, []

    def off_grid_in_third_batch(*a):
        rows = real(*a)

        def rows_of(pos, params, decoded):
            calls.append(1)
            if len(calls) == 3:
                params = {k: v * np.float32(1.0001) + np.float32(1e-3) for k, v in params.items()}
            return rows(pos, params, decoded)

        return rows_of

    kw = dict(epochs=1, topk=3, augment="strong", sample_rate=SR, clip_seconds=CLIP_SECONDS, progress=False,
              batch_size=4, chunk_rows=8, num_workers=0)
    out = tmp_path / "grid.zarr"
    monkeypatch.setattr(dump_module, "_view_rows", off_grid_in_third_batch)
    with pytest.raises(LogitCacheError) as e:
        logitcache.dump(dataset, ["toy_teachers:toy_a"], out, **kw)
    assert_one_line_error(e, "params/", "is not on its stored grid")
    assert "write failed" not in str(e.value)
    with logitcache.open_cache(out) as c:
        assert c.chunks_done().tolist() == [[True, False, False]]


def test_host_buffers_of_one_batch_hold_every_field_apart():
    """CUDA copies a batch's results into one pinned buffer carved per field (tested unpinned here):
    each field gets its own bytes, shape and dtype, and holds exactly what is copied into it."""
    from logitcache.pipeline import host_buffers

    g = torch.Generator().manual_seed(0)
    fields = {"bad": torch.rand(3, 5, generator=g) > 0.5, "values": torch.randn(4, 5, 7, generator=g).half(),
              "indices": torch.randint(0, 500, (4, 5, 7), generator=g, dtype=torch.int16),
              "moments": torch.randn(3, 5, 3, generator=g, dtype=torch.float64), "empty": torch.zeros(0, 2),
              "stat": torch.randn(4, 5, generator=g)[:, ::2]}  # not contiguous
    host = host_buffers(fields, pin=False)
    for name, t in fields.items():
        host[name].copy_(t)
    arrays = {name: h.numpy() for name, h in host.items()}
    for name, t in fields.items():
        assert arrays[name].dtype == t.numpy().dtype and np.array_equal(arrays[name], t.numpy()), name
    full = [a for a in arrays.values() if a.size]
    assert not any(np.shares_memory(a, b) for i, a in enumerate(full) for b in full[i + 1:])
