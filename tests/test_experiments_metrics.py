"""Average accuracy / forgetting on hand-computed matrices; seed aggregation."""

import math

import pytest

from mira.experiments.metrics import average_accuracy, average_forgetting, mean_std

NAN = float("nan")


def test_average_accuracy_and_forgetting():
    acc = [[0.9, NAN, NAN],
           [0.7, 0.8, NAN],
           [0.6, 0.5, 1.0]]
    assert average_accuracy(acc) == pytest.approx((0.6 + 0.5 + 1.0) / 3)
    # first-learned minus final, over every task but the last: (0.9-0.6 + 0.8-0.5) / 2
    assert average_forgetting(acc) == pytest.approx(0.3)
    assert average_forgetting([[0.4]]) == 0.0
    # improving on an old task is negative forgetting (backward transfer), not clipped
    assert average_forgetting([[0.5, NAN], [0.7, 0.9]]) == pytest.approx(-0.2)


def test_bad_matrices_are_refused():
    with pytest.raises(ValueError):
        average_accuracy([[0.1, 0.2]])
    with pytest.raises(ValueError):
        average_forgetting([[0.1, NAN], [NAN, 0.2]])


def test_mean_std():
    m, s = mean_std([0.5, 0.7, 0.9])
    assert m == pytest.approx(0.7) and s == pytest.approx(0.2)
    assert mean_std([0.3]) == (0.3, 0.0)
    assert all(math.isnan(v) for v in mean_std([]))
