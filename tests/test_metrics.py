"""cilbench.metrics on small matrices whose metrics are computed by hand below."""

from __future__ import annotations

import math

import pytest

from cilbench import metrics

NAN = math.nan

# CIL, 3 tasks. Column 0 peaks after task 1 (85), not when it was learned (80), so forgetting must take the max.
CIL = [[80.0, None, None],
       [85.0, 70.0, None],
       [60.0, 65.0, 50.0]]
COUNTS = [100, 200, 300]

# MTIL, 4 datasets, every entry different; above the diagonal = zero-shot accuracy on datasets not trained yet.
MTIL = [[50.0, 11.0, 22.0, 33.0],
        [45.0, 60.0, 24.0, 35.0],
        [40.0, 55.0, 70.0, 37.0],
        [38.0, 52.0, 66.0, 80.0]]


def test_cil_unweighted():
    a_t = metrics.accuracy_per_step(CIL)
    assert a_t == pytest.approx([80.0, (85 + 70) / 2, (60 + 65 + 50) / 3])
    m = metrics.cil_metrics(CIL)
    assert m["A_avg"] == pytest.approx((80.0 + 77.5 + 175 / 3) / 3)  # 71.944...
    assert m["A_last"] == pytest.approx(175 / 3)
    # task 0: best earlier 85 (after task 1) - final 60 = 25; task 1: 70 - 65 = 5; mean 15
    assert m["forgetting"] == pytest.approx(15.0)


def test_cil_weighted_by_test_counts():
    a_t = metrics.accuracy_per_step(CIL, COUNTS)
    a2 = (85 * 100 + 70 * 200) / 300  # 75
    a3 = (60 * 100 + 65 * 200 + 50 * 300) / 600  # 56.67
    assert a_t == pytest.approx([80.0, a2, a3])
    m = metrics.cil_metrics(CIL, COUNTS)
    assert m["A_avg"] == pytest.approx((80 + a2 + a3) / 3)  # 70.555...
    assert m["A_last"] == pytest.approx(a3)
    assert m["forgetting"] == pytest.approx(15.0)  # per-task accuracies: counts do not enter


def test_cil_single_task_and_missing_entries():
    assert metrics.cil_metrics([[77.0]]) == {"A_t": [77.0], "A_avg": 77.0, "A_last": 77.0, "forgetting": None}
    with pytest.raises(ValueError, match="row 1"):
        metrics.cil_metrics([[80.0, None], [NAN, 70.0]])
    with pytest.raises(ValueError, match="test counts"):
        metrics.cil_metrics(CIL, [100, 200])
    with pytest.raises(ValueError, match="more rows"):
        metrics.cil_metrics([[80.0], [70.0]])


def test_mtil_transfer_average_last():
    m = metrics.mtil_metrics(MTIL)
    # Transfer_j: rows above the diagonal only: j=1: 11; j=2: (22+24)/2 = 23; j=3: (33+35+37)/3 = 35
    assert m["transfer_per_dataset"] == [None, 11.0, 23.0, 35.0]
    assert m["transfer"] == pytest.approx((11 + 23 + 35) / 3)  # 23
    # Average_j: every row of column j
    avg = [(50 + 45 + 40 + 38) / 4, (11 + 60 + 55 + 52) / 4, (22 + 24 + 70 + 66) / 4, (33 + 35 + 37 + 80) / 4]
    assert m["average_per_dataset"] == pytest.approx(avg)  # 43.25, 44.5, 45.5, 46.25
    assert m["average"] == pytest.approx(44.875)
    assert m["last_per_dataset"] == [38.0, 52.0, 66.0, 80.0]
    assert m["last"] == pytest.approx(59.0)
    # the three formulas give three different numbers on this matrix, so none can stand in for another
    assert len({m["transfer"], m["average"], m["last"]}) == 3
    # Accuracy_j: each dataset right after training on it (the diagonal; the upper-bound rows of MoE-Adapters)
    assert m["accuracy_per_dataset"] == [50.0, 60.0, 70.0, 80.0] and m["accuracy"] == pytest.approx(65.0)


def test_mtil_needs_a_full_square_matrix():
    with pytest.raises(ValueError, match="square"):
        metrics.mtil_metrics([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    with pytest.raises(ValueError, match="every entry"):
        metrics.mtil_metrics([[50.0, None], [40.0, 60.0]])


def test_summary_dispatch():
    assert metrics.summary("cil", CIL)["A_last"] == pytest.approx(175 / 3)
    assert metrics.summary("mtil", MTIL)["last"] == pytest.approx(59.0)
    with pytest.raises(ValueError, match="unknown metric kind"):
        metrics.summary("dil", CIL)
