"""The paper reference store: numbers printed in papers, with provenance, as plain CSV files.

Every ``*.csv`` under ``benchmarks/references/`` (or ``$CILBENCH_REFERENCES``) has the columns of ``COLUMNS``; the
schema and conventions are described in ``benchmarks/references/README.md``. ``load_references`` reads and validates
them all into one DataFrame (``value`` as float, plus a ``source`` column ``file.csv:line``); ``match_references``
finds the paper rows for one of our (method, dataset, scenario, metric, backbone) cells and ``paper_number`` picks
the one that tables and checks show.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cilbench.errors import CilbenchError

COLUMNS = ("paper", "table", "method", "paper_label", "dataset", "scenario", "metric", "value", "backbone", "notes")
REQUIRED = ("paper", "table", "paper_label", "dataset", "scenario", "metric", "value")  # may not be empty
KEY = ("paper", "table", "paper_label", "dataset", "scenario", "metric", "backbone")
# metrics with a meaning fixed by cilbench.metrics; others (flops, params, ...) are free-form identifiers
KNOWN_METRICS = ("A_avg", "A_last", "forgetting", "transfer", "average", "last")
_METRIC_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


def default_folder() -> Path:
    """``$CILBENCH_REFERENCES`` if set, else ``benchmarks/references`` of the checkout holding this package."""
    env = os.environ.get("CILBENCH_REFERENCES")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[2] / "benchmarks" / "references"


def empty_references() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=float if c == "value" else object) for c in (*COLUMNS, "source")})


def load_references(folder: str | Path | None = None) -> pd.DataFrame:
    """Every reference row of every CSV in ``folder`` (default: ``default_folder()``), validated.

    Raises ``CilbenchError`` (one line naming the file and line) for a missing or unknown column, an empty required
    field, a non-numeric value, a malformed metric name, or a key (``KEY``) that occurs twice across the store.
    """
    folder = Path(folder).expanduser() if folder is not None else default_folder()
    if not folder.is_dir():
        raise CilbenchError(f"no paper reference folder {folder}; pass a folder or set $CILBENCH_REFERENCES")
    frames = [_read_file(path) for path in sorted(folder.glob("*.csv"))]
    if not frames:
        return empty_references()
    refs = pd.concat(frames, ignore_index=True)
    dup = refs.duplicated(list(KEY), keep=False)
    if dup.any():
        first = refs[dup].iloc[0]
        twins = refs[dup & (refs[list(KEY)] == first[list(KEY)]).all(axis=1)]["source"].tolist()
        key = ", ".join(f"{k}={first[k]!r}" for k in KEY)
        raise CilbenchError(f"duplicate paper reference ({key}) at {' and '.join(twins)}")
    return refs


def _read_file(path: Path) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise CilbenchError(f"{path}: not a readable CSV file: {err}")
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise CilbenchError(f"{path}: missing column {missing[0]!r} (columns: {', '.join(COLUMNS)})")
    unknown = [c for c in df.columns if c not in COLUMNS]
    if unknown:
        raise CilbenchError(f"{path}: unknown column {unknown[0]!r} (columns: {', '.join(COLUMNS)})")
    df = df[list(COLUMNS)].apply(lambda col: col.str.strip())
    df["source"] = [f"{path.name}:{i + 2}" for i in range(len(df))]  # line 1 is the header
    values = []
    for row in df.itertuples(index=False):
        for col in REQUIRED:
            if not getattr(row, col):
                raise CilbenchError(f"{row.source}: empty {col!r}")
        try:
            value = float(row.value)
        except ValueError:
            raise CilbenchError(f"{row.source}: value {row.value!r} is not a number")
        if not math.isfinite(value):
            raise CilbenchError(f"{row.source}: value {row.value!r} is not a finite number")
        _check_metric(row.metric, row.source)
        values.append(value)
    df["value"] = pd.Series(values, index=df.index, dtype=float)
    return df


def _check_metric(metric: str, where: str) -> None:
    if not _METRIC_NAME.match(metric):
        raise CilbenchError(f"{where}: metric {metric!r} is not a name (letters, digits, underscores)")
    for known in KNOWN_METRICS:
        if metric != known and metric.lower() == known.lower():
            raise CilbenchError(f"{where}: metric {metric!r}: did you mean {known!r}?")


def match_references(refs: pd.DataFrame, method: str, dataset: str, scenario: str, metric: str,
                     backbone: str | None) -> pd.DataFrame:
    """The reference rows for one of our cells, best first.

    Rows must name ``method`` (rows with an empty method are never matched) and the same dataset, scenario and
    metric; a row that names a backbone must name ours. Rows with our exact backbone come before backbone-less ones;
    otherwise the store's order (file name, line) is kept. Only datasets of the built-in catalog are ever matched:
    a user dataset (``cilbench datasets add``) has no paper numbers, whatever its name.
    """
    from cilbench.data.catalog import BUILTIN_DATASETS

    if refs.empty or not method or dataset not in BUILTIN_DATASETS:
        return refs.iloc[0:0]
    hit = refs[(refs["method"] == method) & (refs["dataset"] == dataset) & (refs["scenario"] == scenario)
               & (refs["metric"] == metric) & ((refs["backbone"] == "") | (refs["backbone"] == (backbone or "")))]
    if hit.empty:
        return hit
    exact = hit["backbone"] != ""
    return pd.concat([hit[exact], hit[~exact]])


@dataclass(frozen=True)
class PaperNumber:
    value: float
    source: str  # "file.csv:line"
    conflict: str = ""  # every matching row ("a.csv:2 91.00, b.csv:2 91.50") when their values differ


def paper_number(refs: pd.DataFrame, method: str, dataset: str, scenario: str, metric: str,
                 backbone: str | None) -> PaperNumber | None:
    """The first of ``match_references``, saying when other matching rows disagree with it; None without a match."""
    hits = match_references(refs, method, dataset, scenario, metric, backbone)
    if hits.empty:
        return None
    conflict = ""
    if hits["value"].nunique() > 1:
        conflict = ", ".join(f"{src} {value:.2f}" for src, value in zip(hits["source"], hits["value"]))
    return PaperNumber(float(hits["value"].iloc[0]), str(hits["source"].iloc[0]), conflict)
