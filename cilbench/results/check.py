"""Regression check: our aggregated results against a reference (another results folder, or the paper store).

Every (method, dataset, scenario, backbone, profile) group of ``results_dir`` is compared on its headline metrics
(A_avg, A_last for CIL; transfer, average, last for MTIL; forgetting is not checked) by the mean over seeds. A
metric regresses when ``ours < reference - tolerance`` (percentage points). Groups without a reference are listed as
``missing-reference`` and do not fail; against a folder, groups the reference has and we lack are listed as
``missing-run`` and do not fail either. Quick-profile groups are compared with quick-profile groups of a folder
but never with paper numbers. ``CheckResult.compared`` counts the metrics actually compared: when it is 0 the
check proved nothing, and the CLI must not report a pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from cilbench.errors import CilbenchError
from cilbench.results.references import load_references, paper_number
from cilbench.results.tables import GROUP_KEYS, HEADLINE_METRICS, METRIC_LABELS, aggregate, collect

STATUSES = ("ok", "regressed", "missing-reference", "missing-run")
_EPS = 1e-9  # printed numbers have two decimals; float noise must not decide a regression


@dataclass
class CheckRow:
    group: str  # "method dataset scenario backbone", plus " [quick]" for a quick-profile group
    metric: str
    ours: float | None
    reference: float | None
    status: str
    note: str = ""

    @property
    def delta(self) -> float | None:
        return None if self.ours is None or self.reference is None else self.ours - self.reference


@dataclass
class CheckResult:
    against: str  # "paper" or the reference folder
    tolerance: float
    rows: list[CheckRow] = field(default_factory=list)

    @property
    def compared(self) -> int:
        """How many metrics were actually compared (status ok or regressed)."""
        return sum(r.status in ("ok", "regressed") for r in self.rows)

    @property
    def regressed(self) -> bool:
        return any(r.status == "regressed" for r in self.rows)

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.rows)

    def summary(self) -> str:
        """One line for the CLI."""
        if not self.compared:
            return (f"nothing compared against {self.against}: no metric of {len(self.rows)} had a reference value"
                    if self.rows else f"nothing compared against {self.against}: no run records to check")
        parts = [f"{self.compared} compared against {self.against} (tolerance {self.tolerance:g} pp)",
                 f"{self.count('regressed')} regressed", f"{self.count('ok')} ok"]
        parts += [f"{self.count(s)} {s}" for s in ("missing-reference", "missing-run") if self.count(s)]
        return ", ".join(parts)


def group_label(group: dict) -> str:
    label = " ".join(str(group[k]) for k in ("method", "dataset", "scenario", "backbone") if group[k])
    return label + (f" [{group['profile']}]" if group["profile"] != "full" else "")


def check(results_dir: str | Path, against: str | Path, tolerance: float,
          references: pd.DataFrame | None = None) -> CheckResult:
    """Compare ``results_dir`` with ``against``: the string ``"paper"`` (the paper store, or ``references`` when
    given) or a results folder (a ``Path``, or any other string)."""
    if not tolerance >= 0:
        raise CilbenchError(f"tolerance must be a non-negative number of percentage points, got {tolerance}")
    ours = aggregate(collect(results_dir))
    if isinstance(against, str) and against == "paper":
        refs = references if references is not None else load_references()
        return CheckResult("paper", tolerance, _against_paper(ours, refs, tolerance))
    theirs = aggregate(collect(against))
    return CheckResult(str(against), tolerance, _against_runs(ours, theirs, tolerance))


def _compare(group: str, metric: str, ours: float | None, reference: float | None, tolerance: float,
             note: str = "") -> CheckRow | None:
    if ours is None and reference is None:
        return None
    if reference is None:
        return CheckRow(group, metric, ours, None, "missing-reference", note)
    if ours is None:
        return CheckRow(group, metric, None, reference, "regressed", note or "no value in our runs")
    status = "regressed" if ours - reference < -tolerance - _EPS else "ok"
    return CheckRow(group, metric, ours, reference, status, note)


def _value(group: dict, metric: str) -> float | None:
    value = group.get(f"{metric}_mean")
    return None if value is None or math.isnan(value) else float(value)


def _against_paper(ours: pd.DataFrame, refs: pd.DataFrame, tolerance: float) -> list[CheckRow]:
    rows = []
    for g in ours.to_dict("records"):
        for metric in HEADLINE_METRICS.get(g["kind"], ()):
            if g["profile"] != "full":
                row = _compare(group_label(g), metric, _value(g, metric), None, tolerance,
                               "quick profile: never compared with paper numbers")
            else:
                found = paper_number(refs, g["method"], g["dataset"], g["scenario"], metric, g["backbone"])
                ref, note = (None, "") if found is None else (found.value, found.source)
                if found is not None and found.conflict:
                    note += f" (paper numbers differ: {found.conflict})"
                row = _compare(group_label(g), metric, _value(g, metric), ref, tolerance, note)
            if row:
                rows.append(row)
    return rows


def _against_runs(ours: pd.DataFrame, theirs: pd.DataFrame, tolerance: float) -> list[CheckRow]:
    index = {tuple(g[k] for k in GROUP_KEYS): g for g in theirs.to_dict("records")}
    rows = []
    seen = set()
    for g in ours.to_dict("records"):
        key = tuple(g[k] for k in GROUP_KEYS)
        seen.add(key)
        other = index.get(key)
        for metric in HEADLINE_METRICS.get(g["kind"], ()):
            ref = None if other is None else _value(other, metric)
            note = "" if other is None else f"seeds: ours {g['n']}, reference {other['n']}"
            row = _compare(group_label(g), metric, _value(g, metric), ref, tolerance, note)
            if row:
                rows.append(row)
    for key, other in index.items():
        if key not in seen:
            for metric in HEADLINE_METRICS.get(other["kind"], ()):
                if _value(other, metric) is not None:
                    rows.append(CheckRow(group_label(other), metric, None, _value(other, metric), "missing-run",
                                         "in the reference, not in our results"))
    return rows


def render_check(result: CheckResult):
    """A ``rich.table.Table`` of every row, regressions in red, with the summary as caption."""
    from rich.table import Table
    from rich.text import Text

    styles = {"ok": "green", "regressed": "bold red", "missing-reference": "yellow", "missing-run": "yellow"}
    table = Table(title=Text(f"check against {result.against}"), caption=Text(result.summary()),
                  caption_justify="left")
    for name, justify in (("group", "left"), ("metric", "left"), ("ours", "right"), ("reference", "right"),
                          ("delta", "right"), ("status", "left"), ("note", "left")):
        table.add_column(name, justify=justify)

    def num(v: float | None, fmt: str = ".2f") -> str:
        return "-" if v is None else format(v, fmt)

    for r in result.rows:
        table.add_row(Text(r.group), METRIC_LABELS.get(r.metric, r.metric), num(r.ours), num(r.reference),
                      num(r.delta, "+.2f"), Text(r.status, style=styles[r.status]), Text(r.note))
    return table
