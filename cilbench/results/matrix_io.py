"""Read an accuracy matrix from a file and score it (``cilbench score``).

The matrix is ``acc[i, j]``: row = after training task i, column = task j, in percent, NaN where not evaluated.
Accepted files:

- a cilbench run record (JSON with ``schema_version``): its ``accuracy_matrix``, ``test_counts`` and ``kind``;
- a JSON list of rows, ``[[80.1, null, null], [75.0, 70.2, null], ...]`` (``null`` or ``NaN`` = missing; rows may
  be shorter than the widest one, the rest is missing);
- a JSON object ``{"matrix": [...], "counts": [...], "kind": "cil" | "mtil", "unit": "percent" | "fraction"}``
  (only ``matrix`` is required; ``accuracy_matrix`` / ``test_counts`` are accepted as the record's spellings);
- a CSV file (comma, tab or semicolon separated), with or without a header row (names, or task numbers
  ``0,1,2,...`` / ``1,2,3,...``) and with or without a first column of row labels (pandas' ``to_csv`` layout, with
  an empty top-left cell, included); empty cells and ``nan`` / ``na`` / ``null`` / ``-`` are missing. Lines
  starting with ``#`` may say ``# kind: mtil``, ``# unit: percent`` or ``# counts: 100, 100, 100``.

Units: run records are percent. Any other file may say its unit (``"unit"`` in JSON, ``# unit:`` in CSV, or the
``unit`` argument, which wins). When nothing says it and every value is <= 1.0, the values are taken as fractions
and multiplied by 100 (``MatrixFile.converted_from_fractions`` is then True so the CLI can say so); a percent matrix
whose accuracies are all <= 1 % must therefore say ``unit: percent``. Values must lie in [0, 100] percent.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cilbench import metrics
from cilbench.errors import CilbenchError
from cilbench.results.record import RecordError, RunRecord

KINDS = ("cil", "mtil")
UNITS = ("percent", "fraction")
_MISSING = {"", "nan", "na", "n/a", "null", "none", "-"}


@dataclass
class MatrixFile:
    """What ``read_matrix`` found in a file."""

    matrix: np.ndarray  # percent, NaN where missing
    counts: list[int] | None
    kind: str | None
    converted_from_fractions: bool
    source_format: str  # "record", "json" or "csv"


def load_matrix(path: str | Path, unit: str | None = None) -> tuple[np.ndarray, list[int] | None, str | None]:
    """``(matrix in percent, test counts or None, kind or None)`` read from ``path`` (see the module docstring)."""
    found = read_matrix(path, unit)
    return found.matrix, found.counts, found.kind


def read_matrix(path: str | Path, unit: str | None = None) -> MatrixFile:
    """Like ``load_matrix`` but also says whether fractions were converted and what kind of file it was."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise CilbenchError(f"no such file: {path}")
    except (OSError, UnicodeDecodeError) as err:
        raise CilbenchError(f"cannot read {path}: {err}")
    if path.suffix.lower() == ".json" or text.lstrip()[:1] in ("[", "{"):
        rows, counts, kind, file_unit, fmt = _from_json(text, path)
    else:
        rows, counts, kind, file_unit = _from_csv(text, path)
        fmt = "csv"
    if not rows or not any(rows):
        raise CilbenchError(f"{path}: no accuracy matrix in the file")
    width = max(len(r) for r in rows)
    matrix = np.array([r + [math.nan] * (width - len(r)) for r in rows], dtype=np.float64)
    unit = unit or file_unit
    if unit is not None and unit not in UNITS:
        raise CilbenchError(f"{path}: unknown unit {unit!r} (percent or fraction)")
    matrix, converted = _to_percent(matrix, unit, path)
    if kind is not None and kind not in KINDS:
        raise CilbenchError(f"{path}: unknown kind {kind!r} (cil or mtil)")
    if counts is not None and len(counts) != width:
        raise CilbenchError(f"{path}: {len(counts)} test counts for a matrix of {width} tasks")
    return MatrixFile(matrix, counts, kind, converted, fmt)


def score_matrix(path: str | Path, kind: str | None = None, unit: str | None = None) -> dict[str, Any]:
    """The metrics of the matrix in ``path``: ``{"kind", **cilbench.metrics.summary(...)}`` (``A_t, A_avg, A_last,
    forgetting`` or ``transfer, average, last, *_per_dataset``), plus ``"note"`` when fractions were converted.

    ``kind`` is the argument if given, else the file's (a run record's ``kind``), else ``"cil"``.
    """
    if kind is not None and kind not in KINDS:
        raise CilbenchError(f"unknown metric kind {kind!r} (cil or mtil)")
    found = read_matrix(path, unit)
    kind = kind or found.kind or "cil"
    try:
        scores = metrics.summary(kind, found.matrix, found.counts if kind == "cil" else None)
    except ValueError as err:
        raise CilbenchError(f"{path}: {err}")
    result: dict[str, Any] = {"kind": kind, **scores}
    if found.converted_from_fractions:
        result["note"] = "every value was <= 1: read as fractions and converted to percent (say unit: percent if not)"
    return result


def _to_percent(matrix: np.ndarray, unit: str | None, path: Path) -> tuple[np.ndarray, bool]:
    finite = matrix[~np.isnan(matrix)]
    if finite.size == 0:
        raise CilbenchError(f"{path}: the matrix has no values")
    if np.isinf(finite).any():
        raise CilbenchError(f"{path}: the matrix holds an infinite value")
    if unit is None:
        unit = "fraction" if finite.max() <= 1.0 else "percent"
    top = 1.0 if unit == "fraction" else 100.0
    if finite.min() < 0 or finite.max() > top:
        bad = finite[(finite < 0) | (finite > top)][0]
        raise CilbenchError(f"{path}: value {bad:g} lies outside 0..{top:g} ({unit})")
    if unit == "fraction":
        return matrix * 100.0, True
    return matrix, False


def _cell(value: Any, where: str) -> float:
    if value is None:
        return math.nan
    if isinstance(value, bool):
        raise CilbenchError(f"{where}: {value!r} is not an accuracy")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in _MISSING:
            return math.nan
        try:
            return float(text)
        except ValueError:
            pass
    raise CilbenchError(f"{where}: {value!r} is not an accuracy")


def _counts(value: Any, path: Path) -> list[int] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(
            isinstance(c, (int, float)) and not isinstance(c, bool) and float(c).is_integer() and c > 0
            for c in value):
        raise CilbenchError(f"{path}: test counts must be a list of positive whole numbers")
    return [int(c) for c in value]


def _rows(value: Any, path: Path) -> list[list[float]]:
    if not isinstance(value, list) or not all(isinstance(r, list) for r in value):
        raise CilbenchError(f"{path}: the matrix must be a list of rows (lists of numbers)")
    return [[_cell(v, f"{path} row {i + 1}") for v in row] for i, row in enumerate(value)]


def _from_json(text: str, path: Path):
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise CilbenchError(f"{path}: not valid JSON ({err})")
    if isinstance(data, list):
        return _rows(data, path), None, None, None, "json"
    if not isinstance(data, dict):
        raise CilbenchError(f"{path}: expected a list of rows or an object with a 'matrix'")
    if "schema_version" in data:
        try:
            record = RunRecord.from_json(data, path)
        except RecordError as err:
            raise CilbenchError(f"{path} is not a readable run record: {err.reason}")
        if not record.accuracy_matrix:
            raise CilbenchError(f"{path}: the run record has no accuracy_matrix")
        return _rows(record.accuracy_matrix, path), _counts(record.test_counts, path), record.kind, "percent", "record"
    matrix = data.get("matrix", data.get("accuracy_matrix"))
    if matrix is None:
        raise CilbenchError(f"{path}: the JSON object has no 'matrix'")
    return (_rows(matrix, path), _counts(data.get("counts", data.get("test_counts")), path), data.get("kind"),
            data.get("unit"), "json")


def _is_task_index(row: list[str]) -> bool:
    """A header of task numbers, ``0,1,2,...`` or ``1,2,3,...`` (at least two)."""
    try:
        numbers = [int(c) for c in row]
    except ValueError:
        return False
    return len(numbers) >= 2 and numbers in (list(range(len(numbers))), list(range(1, len(numbers) + 1)))


def _from_csv(text: str, path: Path):
    meta: dict[str, str] = {}
    lines = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            key, sep, value = stripped.lstrip("#").partition(":")
            if sep:
                meta[key.strip().lower()] = value.strip()
        elif stripped:
            lines.append(line)
    if not lines:
        raise CilbenchError(f"{path}: no accuracy matrix in the file")
    delimiter = next((d for d in (",", "\t", ";") if d in lines[0]), ",")
    table = [[c.strip() for c in row] for row in csv.reader(io.StringIO("\n".join(lines)), delimiter=delimiter)]

    def numeric(cell: str) -> bool:
        try:
            _cell(cell, "")
            return True
        except CilbenchError:
            return False

    # acc[0, 0] is always evaluated, so an empty first cell marks a header over a label column (pandas' to_csv)
    corner = table[0][0] == "" and len(table[0]) > 1
    if corner or not all(numeric(c) for c in table[0]) or _is_task_index(table[0]):
        table = table[1:]  # a header row
    if table and (corner or all(row and row[0] and not numeric(row[0]) for row in table)):
        table = [row[1:] for row in table]  # a column of row labels
    rows = []
    for i, row in enumerate(table):
        while row and row[-1] == "":
            row = row[:-1]  # trailing separators of a lower-triangular file
        rows.append([_cell(c, f"{path} data row {i + 1}") for c in row])
    counts = None
    if "counts" in meta:
        try:
            counts = _counts([float(c) for c in meta["counts"].replace(",", " ").split()], path)
        except ValueError:
            raise CilbenchError(f"{path}: '# counts:' must list whole numbers")
    return rows, counts, meta.get("kind"), meta.get("unit")
