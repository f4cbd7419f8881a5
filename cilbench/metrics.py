"""Pure functions over an accuracy matrix ``acc[i, j]``: row = after training task i, column = task j, percent.

Class-incremental (PILOT): A_t is the top-1 accuracy on the test images of every class seen after task t. From a
per-task matrix that is the mean of row t over columns 0..t weighted by each task's number of test images (plain
mean when the counts are not known). A_avg = mean(A_1..A_T), A_last = A_T; forgetting = mean over old tasks j of
(max over earlier rows of acc[i, j]) - acc[T, j].

MTIL (ZSCL): Transfer_j = mean(acc[0..j-1, j]) for j >= 1 and Transfer = mean over j >= 1; Average_j = mean of
column j over all rows and Average = mean over j; Last = mean of the last row. Accuracy_j = acc[j, j], each dataset
right after training on it (the upper-bound rows of MoE-Adapters Table 1, where every dataset is trained apart).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def as_matrix(matrix: Sequence[Sequence[float | None]] | np.ndarray) -> np.ndarray:
    """A float array with NaN where an entry is missing (``None``)."""
    arr = np.array([[np.nan if v is None else float(v) for v in row] for row in matrix], dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise ValueError("an accuracy matrix must be a non-empty list of rows")
    return arr


def accuracy_per_step(matrix, counts: Sequence[int] | None = None) -> list[float]:
    """A_t for every row: accuracy over the columns 0..t (weighted by test counts when given)."""
    acc = as_matrix(matrix)
    if acc.shape[0] > acc.shape[1]:
        raise ValueError(f"a CIL matrix cannot have more rows ({acc.shape[0]}) than tasks ({acc.shape[1]})")
    if counts is not None:
        if len(counts) != acc.shape[1]:
            raise ValueError(f"{len(counts)} test counts for a matrix of {acc.shape[1]} tasks")
        if any(c <= 0 for c in counts):
            raise ValueError("test counts must be positive")
    out = []
    for t in range(acc.shape[0]):
        row = acc[t, : t + 1]
        if np.isnan(row).any():
            raise ValueError(f"row {t} lacks an accuracy for a task seen by then")
        w = np.ones_like(row) if counts is None else np.asarray(counts[: t + 1], dtype=np.float64)
        out.append(float((row * w).sum() / w.sum()))
    return out


def forgetting(matrix) -> float | None:
    acc = as_matrix(matrix)
    t_last = acc.shape[0] - 1
    if t_last == 0:
        return None
    drops = [np.nanmax(acc[j:t_last, j]) - acc[t_last, j] for j in range(t_last)]
    return float(np.mean(drops))


def cil_metrics(matrix, counts: Sequence[int] | None = None) -> dict[str, float | list[float] | None]:
    a_t = accuracy_per_step(matrix, counts)
    return {"A_t": a_t, "A_avg": float(np.mean(a_t)), "A_last": a_t[-1], "forgetting": forgetting(matrix)}


def mtil_metrics(matrix) -> dict[str, float | list[float | None]]:
    acc = as_matrix(matrix)
    n_rows, n_cols = acc.shape
    if n_rows != n_cols:
        raise ValueError(f"an MTIL matrix must be square (rows = columns = datasets), got {n_rows} x {n_cols}")
    if np.isnan(acc).any():
        raise ValueError("an MTIL matrix needs every entry (unseen datasets too: Transfer uses them)")
    transfer = [None] + [float(acc[:j, j].mean()) for j in range(1, n_cols)]
    average = [float(acc[:, j].mean()) for j in range(n_cols)]
    diagonal = [float(acc[j, j]) for j in range(n_cols)]
    return {
        "transfer": float(np.mean(transfer[1:])) if n_cols > 1 else None,
        "average": float(np.mean(average)),
        "last": float(acc[-1].mean()),
        "transfer_per_dataset": transfer,
        "average_per_dataset": average,
        "last_per_dataset": [float(v) for v in acc[-1]],
        "accuracy": float(np.mean(diagonal)),
        "accuracy_per_dataset": diagonal,
    }


def summary(kind: str, matrix, counts: Sequence[int] | None = None) -> dict:
    if kind == "cil":
        return cil_metrics(matrix, counts)
    if kind == "mtil":
        return mtil_metrics(matrix)
    raise ValueError(f"unknown metric kind {kind!r} (cil or mtil)")
