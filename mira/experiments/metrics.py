"""Continual-learning metrics and seed aggregation.

``acc[i][j]`` is the accuracy (in [0, 1]) on task ``j``'s test set after training task ``i``,
defined for ``j <= i``; entries above the diagonal are ``nan``.

- average accuracy: mean over tasks of the final row, ``mean_j acc[T-1][j]``;
- average forgetting (method.md section 3: "accuracy when first learned minus current"):
  ``mean_{j < T-1} (acc[j][j] - acc[T-1][j])``, over every task but the last; 0 for T = 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["average_accuracy", "average_forgetting", "mean_std"]


def _matrix(acc: Sequence[Sequence[float]]) -> np.ndarray:
    m = np.asarray(acc, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(f"accuracy matrix must be square and non-empty, got shape {m.shape}")
    if np.isnan(np.tril(m)).any():
        raise ValueError("accuracy matrix has nan on or below the diagonal")
    return m


def average_accuracy(acc: Sequence[Sequence[float]]) -> float:
    """Mean accuracy over all tasks after the last task."""
    return float(_matrix(acc)[-1].mean())


def average_forgetting(acc: Sequence[Sequence[float]]) -> float:
    """Mean over tasks 0..T-2 of (accuracy right after learning it - accuracy after the last task)."""
    m = _matrix(acc)
    t = m.shape[0]
    if t == 1:
        return 0.0
    return float(np.mean([m[j, j] - m[-1, j] for j in range(t - 1)]))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for one value) of finite values."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0
