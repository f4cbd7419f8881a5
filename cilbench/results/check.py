"""Regression check: our aggregated results against a reference (another results folder, or the paper store).

Every (method, dataset, scenario, backbone, profile, config_key) group of ``results_dir`` is compared on its
headline metrics (A_avg, A_last for CIL; transfer, average, last for MTIL; forgetting is not checked) by the mean over
seeds, with the group of the same identity in the reference: a run with ``--set`` overrides or a ``--weights`` file
(a non-empty ``config_key``) is compared only with runs of that configuration, never with the default runs nor with
paper numbers. A metric regresses when ``ours < reference - tolerance`` (percentage points).

Groups without a reference are listed as ``missing-reference`` and do not fail. Against a folder, a run the
reference has and we lack (a whole group, or some of its seeds) is ``missing-run``, and a file under either folder
that is a damaged run record (truncated, wrong types, newer schema; see ``iter_records``) is listed in
``CheckResult.damaged``: both fail the check unless ``allow_missing`` / ``allow_damaged``. ``CheckResult.compared``
counts the metrics actually compared: when it is 0 the check proved nothing, and the CLI must not report a pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from cilbench.errors import CilbenchError
from cilbench.results.record import Skipped
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
    damaged: list[Skipped] = field(default_factory=list)  # damaged records under either folder
    allow_missing: bool = False  # a missing-run row does not fail the check
    allow_damaged: bool = False  # a damaged record does not fail the check

    @property
    def failures(self) -> list[str]:
        """One line per reason the check fails: regressions, and (unless allowed) missing runs, damaged records."""
        out = []
        if self.regressed:
            out.append(f"{self.count('regressed')} metric(s) regressed by more than {self.tolerance:g} pp")
        missing = sorted({r.group for r in self.rows if r.status == "missing-run"})
        if missing and not self.allow_missing:
            out.append(f"{len(missing)} group(s) of the reference lack runs in our results ({missing[0]}"
                       + (", ..." if len(missing) > 1 else "") + "); --allow-missing accepts that")
        if self.damaged and not self.allow_damaged:
            out.append(f"{len(self.damaged)} damaged run record(s) ({self.damaged[0].path}"
                       + (", ..." if len(self.damaged) > 1 else "") + "); --allow-damaged accepts that")
        return out

    @property
    def failed(self) -> bool:
        return bool(self.failures)

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
        if self.damaged:
            parts.append(f"{len(self.damaged)} damaged record(s) skipped")
        return ", ".join(parts)


def group_label(group: dict) -> str:
    """``method dataset scenario backbone`` plus ``[quick]`` and ``[lambda1=0, lambda2=0]`` where they apply."""
    label = " ".join(str(group[k]) for k in ("method", "dataset", "scenario", "backbone") if group[k])
    label += f" [{group['profile']}]" if group["profile"] != "full" else ""
    if group.get("config_key"):
        label += f" [{group.get('config_label') or 'cfg-' + group['config_key']}]"
    return label


def check(results_dir: str | Path, against: str | Path, tolerance: float,
          references: pd.DataFrame | None = None, on_skip: Callable[[Skipped], None] | None = None,
          allow_missing: bool = False, allow_damaged: bool = False) -> CheckResult:
    """Compare ``results_dir`` with ``against``: the string ``"paper"`` (the paper store, or ``references`` when
    given) or a results folder (a ``Path``, or any other string). Every skipped file of either folder goes to
    ``on_skip``; the damaged ones are kept in ``CheckResult.damaged``."""
    if not tolerance >= 0:
        raise CilbenchError(f"tolerance must be a non-negative number of percentage points, got {tolerance}")
    damaged: list[Skipped] = []
    seen: set[Path] = set()

    def skip(item: Skipped) -> None:
        if item.path.resolve() in seen:  # --against the same folder: one warning per file
            return
        seen.add(item.path.resolve())
        if item.damaged:
            damaged.append(item)
        if on_skip:
            on_skip(item)

    ours = aggregate(collect(results_dir, skip))
    if isinstance(against, str) and against == "paper":
        refs = references if references is not None else load_references()
        rows = _against_paper(ours, refs, tolerance)
    else:
        rows = _against_runs(ours, aggregate(collect(against, skip)), tolerance)
    return CheckResult("paper" if isinstance(against, str) and against == "paper" else str(against), tolerance,
                       rows, damaged, allow_missing, allow_damaged)


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
            elif g.get("config_key"):
                row = _compare(group_label(g), metric, _value(g, metric), None, tolerance,
                               "settings other than the method's own: never compared with paper numbers")
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
        lacking = sorted(set(other["seeds"]) - set(g["seeds"])) if other is not None else []
        if lacking:  # the means cover different runs: say which runs of the reference we lack
            rows.append(CheckRow(group_label(g), "seeds", None, None, "missing-run",
                                 f"seed(s) {', '.join(map(str, lacking))} in the reference, not in our results"))
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
        table.add_column(name, justify=justify, overflow="fold")  # a narrow console wraps, never cuts to "…"

    def num(v: float | None, fmt: str = ".2f") -> str:
        return "-" if v is None else format(v, fmt)

    for r in result.rows:
        table.add_row(Text(r.group), METRIC_LABELS.get(r.metric, r.metric), num(r.ours), num(r.reference),
                      num(r.delta, "+.2f"), Text(r.status, style=styles[r.status]), Text(r.note))
    return table
