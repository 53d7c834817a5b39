"""Sparse labels (LabelTable): the same rows, batches and metrics as the dense matrix they replace."""

from __future__ import annotations

import numpy as np
import pytest

from logitcache.data import AudioFolder
from logitcache.errors import LogitCacheError
from logitcache.labels import LabelTable
from logitcache.metrics import average_precision, top1_accuracy
from logitcache.augment import Augmenter
from logitcache.views import ViewSource, batch_labels

CLASSES = ["dog", "cat", "bird", "rain", "car"]  # not sorted, "car" never used
ROWS = [("a.wav", "dog"), ("b.wav", "cat;dog"), ("c.wav", ""), ("d.wav", " bird ; rain ;cat"),
        ("e.wav", "rain;rain"), ("f.wav", "dog;;bird"), ("sub/g.wav", "cat")]


def _write(root, rows=ROWS, classes=CLASSES):
    root.mkdir(parents=True, exist_ok=True)
    (root / "labels.csv").write_text("filename,labels\n" + "".join(f"{f},{labels}\n" for f, labels in rows))
    if classes is not None:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


def _dense_reference(rows, classes):
    """What the dense code built: a float32 0/1 row per sample, one per named class."""
    y = np.zeros((len(rows), len(classes)), dtype=np.float32)
    for r, (_, labels) in enumerate(rows):
        for name in labels.split(";"):
            if name.strip():
                y[r, classes.index(name.strip())] = 1.0
    return y


@pytest.mark.parametrize("with_classes_txt", [True, False])
def test_sparse_rows_equal_the_dense_matrix(tmp_path, with_classes_txt):
    root = _write(tmp_path / "d", classes=CLASSES if with_classes_txt else None)
    classes = CLASSES if with_classes_txt else ["bird", "cat", "dog", "rain"]
    want = _dense_reference(ROWS, classes)
    table = LabelTable.from_csv(root / "labels.csv", root / "classes.txt" if with_classes_txt else None)
    assert table.ids == [f for f, _ in ROWS] and table.classes == classes
    assert table.index == {f: i for i, (f, _) in enumerate(ROWS)}
    assert np.array_equal(table.rows(np.arange(len(ROWS))), want)
    assert np.array_equal(table.rows([6, 1, 1, 2]), want[[6, 1, 1, 2]])
    assert table.rows([]).shape == (0, len(classes))
    assert np.array_equal(table.columns(1, 3), want[:, 1:3])
    assert np.array_equal(table.first_class(), want.argmax(1))
    assert list(table.multi_label_rows()) == [1, 3, 5]  # "rain;rain" is one label
    folder = AudioFolder(root)  # no audio needed to open a folder
    assert np.array_equal(folder.label_rows(np.arange(len(ROWS))), want)
    assert list(folder.multi_label_rows) == [1, 3, 5]


def test_batch_labels_mix_partners_like_an_independent_computation(tmp_path):
    folder = AudioFolder(_write(tmp_path / "d"))
    dense = _dense_reference(ROWS, CLASSES)
    index = np.array([3, 0, 5, 5, 6])
    partner = np.array([1, -1, 4, 5, -1])
    lam = np.array([0.25, 0.9, 0.6, 0.1, 0.5], dtype=np.float32)
    want = dense[index].copy()
    for r in range(len(index)):
        if partner[r] >= 0:
            want[r] = lam[r] * dense[index[r]] + (np.float32(1) - lam[r]) * dense[partner[r]]
    got = batch_labels(folder, index, {"mixup.partner": partner, "mixup.lam": lam})
    assert got.dtype == np.float32 and np.array_equal(got, want)
    np.testing.assert_array_equal(got[0], [0.75, 1.0, 0.25, 0.25, 0.0])  # by hand: .25*row3 + .75*row1
    assert np.array_equal(batch_labels(folder, index, {}), dense[index])
    source = ViewSource.__new__(ViewSource)  # labels() needs the folder and which ops mix
    source.folder, source.augmenter = folder, Augmenter([{"op": "mixup"}], 16000, 1.0)
    for r in range(len(index)):
        row = source.labels(index[r], {"mixup.partner": partner[r], "mixup.lam": lam[r]})
        assert np.array_equal(row, want[r])


def test_metrics_from_the_table_equal_those_from_dense_rows(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    rows = [(f"{i}.wav", ";".join(rng.choice(CLASSES[:4], rng.integers(0, 3)))) for i in range(300)]
    root = _write(tmp_path / "d", rows)
    table = LabelTable.from_csv(root / "labels.csv", root / "classes.txt")
    dense = _dense_reference(rows, CLASSES)
    scores = rng.normal(size=(300, len(CLASSES))).astype(np.float32).round(1)  # ties too
    monkeypatch.setattr("logitcache.metrics.AP_BLOCK_ENTRIES", 2 * 300)  # several class blocks
    got = average_precision(scores, table)
    assert np.isnan(got[4])  # "car": no positives
    assert np.array_equal(got, average_precision(scores, dense), equal_nan=True)
    assert top1_accuracy(scores, table) == top1_accuracy(scores, dense)


def test_unknown_class_names_its_first_row_in_file_order(tmp_path):
    rows = ROWS + [("h.wav", "dog;zebra"), ("i.wav", "yak"), ("j.wav", "zebra")]
    root = _write(tmp_path / "d", rows)
    with pytest.raises(LogitCacheError) as e:
        AudioFolder(root)
    assert str(e.value) == f"{root / 'labels.csv'}: row 'h.wav' has unknown class 'zebra' (not in classes.txt)"


def test_a_bad_byte_after_a_bad_row_is_reported_as_not_utf8(tmp_path):
    # the whole-file decode used to come first: a file that is not UTF-8 still says so
    root = _write(tmp_path / "d", ROWS + [("a.wav", "dog")])
    path = root / "labels.csv"
    raw = path.read_bytes()
    path.write_bytes(raw + b"x\xff.wav,dog\n")
    with pytest.raises(LogitCacheError) as e:
        AudioFolder(root)
    line = raw.count(b"\n") + 1
    assert str(e.value).startswith(f"{path}: not UTF-8 text (byte {len(raw) + 1}, line {line}:")


def test_csv_layout_quirks_read_as_before(tmp_path):
    """Blank lines are skipped, short rows have no labels, extra columns are ignored and a
    repeated header column takes its last value (csv.DictReader's rules)."""
    root = tmp_path / "d"
    root.mkdir()
    (root / "labels.csv").write_text("labels,filename,note,filename\n"
                                     "dog,x.wav,hi,a.wav\n\n"
                                     "cat;dog,y.wav,,b.wav,extra\n"
                                     "bird\n")
    with pytest.raises(LogitCacheError) as e:
        LabelTable.from_csv(root / "labels.csv")
    assert str(e.value) == f"{root / 'labels.csv'}: line 5 has an empty filename"
    (root / "labels.csv").write_text("labels,filename,note,filename\ndog,x.wav,hi,a.wav\n\ncat;dog,y.wav,,b.wav\n")
    table = LabelTable.from_csv(root / "labels.csv")
    assert table.ids == ["a.wav", "b.wav"] and table.classes == ["cat", "dog"]
    assert np.array_equal(table.rows([0, 1]), [[0, 1], [1, 1]])


@pytest.mark.parametrize("same_hash", [False, True], ids=["real_hashes", "every_hash_colliding"])
def test_the_first_duplicate_in_file_order_is_refused(tmp_path, monkeypatch, same_hash):
    if same_hash:  # colliding hashes are compared as strings: no false duplicate, the same first one
        monkeypatch.setattr("logitcache.labels.hash", lambda s: 7, raising=False)
    rows = ROWS + [("x.wav", "dog"), ("c.wav", "cat"), ("y.wav", ""), ("x.wav", ""), ("a.wav", "")]
    root = _write(tmp_path / "d", rows)
    with pytest.raises(LogitCacheError) as e:
        AudioFolder(root)
    assert str(e.value) == f"{root / 'labels.csv'}: duplicate id 'c.wav'"
    assert len(LabelTable.from_csv(_write(tmp_path / "ok", ROWS + [("x.wav", "dog")]) / "labels.csv")) == 8


def test_a_duplicate_before_a_bad_row_is_the_error_and_after_it_is_not(tmp_path):
    path = _write(tmp_path / "d", ROWS + [("b.wav", "dog"), ("/etc/passwd", "")]) / "labels.csv"
    with pytest.raises(LogitCacheError) as e:
        LabelTable.from_csv(path)
    assert str(e.value) == f"{path}: duplicate id 'b.wav'"
    path = _write(tmp_path / "e", ROWS + [("/etc/passwd", ""), ("b.wav", "dog")]) / "labels.csv"
    with pytest.raises(LogitCacheError) as e:
        LabelTable.from_csv(path)
    assert str(e.value) == f"{path}: id '/etc/passwd' leaves the data folder"


def test_batch_labels_mix_every_mixing_op_in_order(tmp_path):
    """mixup then cutmix (the image ops): y = lam2 (lam1 y + (1 - lam1) y[p1]) + (1 - lam2) y[p2],
    computed by hand on one-hot rows."""
    root = _write(tmp_path / "d", [(f"{i}.wav", CLASSES[i]) for i in range(4)])
    folder = AudioFolder(root)
    params = {"mixup.partner": np.array([1, -1]), "mixup.lam": np.array([0.75, 1.0], np.float32),
              "cutmix.partner": np.array([2, 3]), "cutmix.lam": np.array([0.5, 0.25], np.float32)}
    got = batch_labels(folder, np.array([0, 1]), params, ["mixup", "cutmix"])
    np.testing.assert_array_equal(got[0, :4], [0.375, 0.125, 0.5, 0.0])
    np.testing.assert_array_equal(got[1, :4], [0.0, 0.25, 0.0, 0.75])
    only_mixup = batch_labels(folder, np.array([0, 1]), params, ["mixup"])
    np.testing.assert_array_equal(only_mixup[0, :4], [0.75, 0.25, 0.0, 0.0])
