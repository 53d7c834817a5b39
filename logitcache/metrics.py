"""Scores shared by training (its eval) and the reports (compare)."""

from __future__ import annotations

import numpy as np


def average_precision(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-class AP ``[C]`` (NaN for classes without positives), ties broken by order."""
    order = np.argsort(-scores, axis=0, kind="stable")
    y = np.take_along_axis(labels > 0.5, order, axis=0)
    hits = np.cumsum(y, axis=0)
    precision = hits / np.arange(1, len(y) + 1)[:, None]
    positives = y.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(positives > 0, (precision * y).sum(0) / positives, np.nan)
