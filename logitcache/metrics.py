"""Scores shared by training (its eval) and the reports (compare)."""

from __future__ import annotations

import numpy as np

from logitcache.labels import LabelTable

AP_BLOCK_ENTRIES = 1 << 22  # scores x classes per block when the labels are a sparse table


def average_precision(scores: np.ndarray, labels: np.ndarray | LabelTable) -> np.ndarray:
    """Per-class AP ``[C]`` (NaN for classes without positives), ties broken by order. ``labels``:
    dense ``[N, C]`` rows, or a ``LabelTable``, then taken a block of classes at a time so no
    ``N x C`` label matrix is made (each class's AP is computed alone either way: same figures)."""
    if not isinstance(labels, LabelTable):
        return _average_precision(scores, labels)
    C = labels.num_classes
    step = max(1, AP_BLOCK_ENTRIES // max(len(scores), 1))
    return np.concatenate([_average_precision(scores[:, a:a + step], labels.columns(a, min(a + step, C)))
                           for a in range(0, C, step)] or [np.zeros(0)])


def _average_precision(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    order = np.argsort(-scores, axis=0, kind="stable")
    y = np.take_along_axis(labels > 0.5, order, axis=0)
    hits = np.cumsum(y, axis=0)
    precision = hits / np.arange(1, len(y) + 1)[:, None]
    positives = y.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(positives > 0, (precision * y).sum(0) / positives, np.nan)


def top1_accuracy(scores: np.ndarray, labels: np.ndarray | LabelTable) -> float:
    """Share of rows whose top-scored class is the label's (the lowest positive class of a row
    with several: ``argmax`` of its dense row)."""
    target = labels.first_class() if isinstance(labels, LabelTable) else labels.argmax(1)
    return float((scores.argmax(1) == target).mean())
