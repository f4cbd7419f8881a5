"""Results tables: run records -> one row per run -> mean ± std over seeds -> method x (dataset, scenario) table.

``collect`` reads every complete run record under a folder, ``aggregate`` groups the runs by (method, dataset,
scenario, backbone, profile, config_key) over seeds, ``build_table`` lays the groups out as ``TableData`` (rows =
method, columns = dataset + scenario, one sub-column per headline metric) with the paper's number and the difference
ours - paper where the reference store has one, and ``render`` prints it as a rich table, markdown, CSV or LaTeX
(booktabs).

Quick-profile runs (``profile != "full"``) get their own rows, labelled ``method [quick]``, and are never matched to
paper numbers. So do runs of another configuration than the method's own (``--set`` overrides or a ``--weights`` file:
a non-empty ``config_key``, see ``cilbench.identity``): labelled ``method [lambda1=0, lambda2=0]``, never averaged with
the default runs and never matched to the paper's numbers, which were made with the paper's settings.

Row and column orders default to sorted order; pass ``rows`` / ``columns`` (``RowSpec`` / ``ColumnSpec``) to fix
them, e.g. to rebuild a paper's table with its own order, labels and empty cells.
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from cilbench.data.user_catalog import is_user_dataset
from cilbench.errors import CilbenchError
from cilbench.results.record import Skipped, iter_records
from cilbench.results.references import paper_number

GROUP_KEYS = ("method", "dataset", "scenario", "backbone", "profile", "config_key")
# config_label: the readable name of config_key ("lambda1=0, lambda2=0"), the same for every run of a group
RUN_KEYS = (*GROUP_KEYS, "config_label", "seed", "kind", "finished_at", "path")  # the non-metric columns of ``collect``
RUN_METRICS = {"cil": ("A_avg", "A_last", "forgetting"), "mtil": ("transfer", "average", "last", "accuracy")}
HEADLINE_METRICS = {"cil": ("A_avg", "A_last"), "mtil": ("transfer", "average", "last")}
ALL_METRICS = RUN_METRICS["cil"] + RUN_METRICS["mtil"]
METRIC_LABELS = {"A_avg": "A_avg", "A_last": "A_last", "forgetting": "Forgetting", "transfer": "Transfer",
                 "average": "Average", "last": "Last", "accuracy": "Accuracy", "flops_g": "GFLOPs",
                 "params_m": "Params (M)", "D": "D"}
# what one forward of the final model costs (the record's ``cost``): GFLOPs per image (the DNE paper's F) and
# millions of parameters
COST_METRICS = (("flops_g", "flops_per_image", 1e9), ("params_m", "params", 1e6))
FORMATS = ("rich", "markdown", "csv", "latex")
EMPTY = "-"  # a cell without runs


# --------------------------------------------------------------------------------------------- runs and groups


def collect(results_dir: str | Path, on_skip: Callable[[Skipped], None] | None = None) -> pd.DataFrame:
    """One row per complete run record under ``results_dir``: the group keys, seed, kind, the metrics, path.
    Files that are not readable records are skipped and reported to ``on_skip`` (see ``iter_records``)."""
    rows = []
    for path, record in iter_records(results_dir, on_skip):
        try:
            scores = record.scores()
        except (ValueError, TypeError) as err:
            if on_skip:
                on_skip(Skipped(path, f"its accuracy matrix cannot be scored ({err})"))
            continue
        row: dict[str, Any] = {
            "method": record.method, "dataset": record.dataset, "scenario": record.scenario_label,
            "backbone": record.backbone, "profile": record.profile, "config_key": record.config_key,
            "config_label": record.config_label, "seed": record.seed, "kind": record.kind,
            "finished_at": record.finished_at, "path": str(path),
        }
        for name in ALL_METRICS:
            value = scores.get(name)
            row[name] = float(value) if isinstance(value, (int, float)) else math.nan
        for name, key, scale in COST_METRICS:
            value = record.cost.get(key)
            row[name] = value / scale if isinstance(value, (int, float)) else math.nan
        if record.kind == "mtil":  # per-dataset cells of the paper tables: transfer_aircraft, last_cars, ...
            for name in RUN_METRICS["mtil"]:
                for task, value in zip(record.short_task_names, scores.get(f"{name}_per_dataset") or []):
                    row[f"{name}_{task}"] = float(value) if isinstance(value, (int, float)) else math.nan
        rows.append(row)
    columns = [*RUN_KEYS, *ALL_METRICS, *(name for name, _, _ in COST_METRICS)]
    extra = sorted({k for r in rows for k in r} - set(columns))
    return pd.DataFrame(rows, columns=columns + extra)


def _metric_columns(runs: pd.DataFrame) -> list[str]:
    return [c for c in runs.columns if c not in RUN_KEYS]


def aggregate(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean and std (ddof=1; 0 for a single seed) of every metric per (method, dataset, scenario, backbone,
    profile, config_key) group, with ``kind``, ``config_label``, ``n`` (seeds) and ``seeds``. When one seed of a
    group has several records, the last finished one counts; records of different configurations are never one
    group."""
    metric_names = _metric_columns(runs) if not runs.empty else list(ALL_METRICS)
    stats = [f"{m}_{s}" for m in metric_names for s in ("mean", "std")]
    columns = [*GROUP_KEYS, "config_label", "kind", "n", "seeds", *stats]
    if runs.empty:
        return pd.DataFrame(columns=columns)
    runs = runs.sort_values(["finished_at", "path"]).drop_duplicates([*GROUP_KEYS, "seed"], keep="last")
    groups = runs.groupby(list(GROUP_KEYS), sort=True, dropna=False)
    out = groups.agg(kind=("kind", "first"), config_label=("config_label", "first"), n=("seed", "size"),
                     seeds=("seed", lambda s: tuple(sorted(int(x) for x in s.dropna()))))
    for name in metric_names:
        out[f"{name}_mean"] = groups[name].mean()
        std = groups[name].std(ddof=1)
        out[f"{name}_std"] = std.where(out["n"] > 1, np.where(out[f"{name}_mean"].isna(), np.nan, 0.0))
    return out.reset_index()[columns]


# --------------------------------------------------------------------------------------------- table layout


@dataclass(frozen=True)
class RowSpec:
    """One requested row. ``backbone`` / ``profile`` / ``config_key`` None: every one found (one row each, full
    profile and the method's own configuration first).

    A row without runs is still shown (empty cells, paper numbers where the store has them); it is matched to
    paper rows that name ``backbone``, or to backbone-less ones when ``backbone`` is None."""

    method: str
    backbone: str | None = None
    profile: str | None = None
    label: str | None = None
    config_key: str | None = None


@dataclass(frozen=True)
class ColumnSpec:
    """One requested (dataset, scenario) column; ``metrics`` None: the kind's headline metrics."""

    dataset: str
    scenario: str
    metrics: tuple[str, ...] | None = None
    label: str | None = None


@dataclass
class Cell:
    """Our mean ± std over ``n`` seeds and, where matched, the paper's number."""

    mean: float | None = None
    std: float | None = None
    n: int = 0
    paper: float | None = None
    paper_source: str | None = None  # "file.csv:line" of the reference row
    paper_rank: int | None = None  # 1 / 2: the paper's best / second in its column (bold / underlined there)

    @property
    def delta(self) -> float | None:
        return None if self.mean is None or self.paper is None else self.mean - self.paper

    def text(self) -> str:
        """``mean ± std``, just ``mean`` for one seed, ``-`` without runs. Two decimals; a non-zero mean under 0.1
        (the GFLOPs of a tiny smoke model) keeps three significant digits instead of showing 0.00."""
        if self.mean is None:
            return EMPTY
        mean = f"{self.mean:.3g}" if 0 < abs(self.mean) < 0.1 else f"{self.mean:.2f}"
        if self.n < 2 or self.std is None:
            return mean
        return f"{mean} ± {self.std:.2f}"

    def paper_text(self, mark: Callable[[str, int | None], str] = lambda text, rank: text) -> str:
        """``paper 72.43, +0.51`` (``paper 72.43`` without our number); empty without a paper number. ``mark``
        decorates the paper's number by its rank (bold / underline in markdown and LaTeX)."""
        if self.paper is None:
            return ""
        return f"paper {mark(f'{self.paper:.2f}', self.paper_rank)}" + ("" if self.delta is None
                                                                          else f", {self.delta:+.2f}")


@dataclass
class TableRow:
    method: str
    backbone: str
    profile: str
    label: str
    config_key: str = ""  # "" the method's own settings; else another configuration, never matched to papers
    config_label: str = ""


@dataclass
class TableColumn:
    dataset: str
    scenario: str
    kind: str
    metrics: tuple[str, ...]
    label: str


@dataclass
class TableData:
    """A laid-out table: ``cells[i][j][metric]`` is the cell of ``rows[i]`` in ``columns[j]``."""

    rows: list[TableRow]
    columns: list[TableColumn]
    cells: list[list[dict[str, Cell]]]
    show_reference: bool = False
    notes: list[str] = field(default_factory=list)
    title: str | None = None
    metric_in_header: bool = True  # False where the title names the metric (a block of a paper table)

    def metric_label(self, m: str) -> str:
        return METRIC_LABELS.get(m, m) if self.metric_in_header else ""

    def headers(self) -> list[tuple[int, str, str]]:
        """Every (column index, metric, "label metric") sub-column, in order."""
        return [(j, m, f"{c.label} {self.metric_label(m)}".strip()) for j, c in enumerate(self.columns)
                for m in c.metrics]


def build_table(results_dir: str | Path, references: pd.DataFrame | None = None,
                rows: Sequence[str | RowSpec] | None = None, columns: Sequence[ColumnSpec] | None = None,
                title: str | None = None, on_skip: Callable[[Skipped], None] | None = None) -> TableData:
    """The table of every run under ``results_dir`` (see the module docstring); ``references`` (from
    ``load_references``) adds paper numbers and deltas; files that are not records go to ``on_skip``."""
    groups = aggregate(collect(results_dir, on_skip))
    if groups.empty and not rows:
        raise CilbenchError(f"no complete run records under {results_dir}")
    return layout(groups, references, rows, columns, title)


def layout(groups: pd.DataFrame, references: pd.DataFrame | None = None,
           rows: Sequence[str | RowSpec] | None = None, columns: Sequence[ColumnSpec] | None = None,
           title: str | None = None) -> TableData:
    """Lay out aggregated groups (from ``aggregate``) as a table; ``build_table`` without the reading."""
    table_rows = _rows(groups, rows)
    table_cols = _columns(groups, columns)
    index = {tuple(g[k] for k in GROUP_KEYS): g for g in groups.to_dict("records")}
    notes: list[str] = []
    cells = []
    for r in table_rows:
        line = []
        for c in table_cols:
            group = index.get((r.method, c.dataset, c.scenario, r.backbone, r.profile, r.config_key))
            line.append({m: _cell(group, r, c, m, references, notes) for m in c.metrics})
        cells.append(line)
    if any(r.config_key for r in table_rows):
        notes.insert(0, "[setting=value]: runs with settings other than the method's own (--set, --weights), each "
                        "configuration its own row, never averaged with others nor compared with paper numbers")
    if any(r.profile != "full" for r in table_rows):
        notes.insert(0, "[quick]: quick-profile smoke runs, never compared with paper numbers")
    return TableData(table_rows, table_cols, cells, references is not None, notes, title)


def _our_cell(group: dict | None, metric: str) -> Cell:
    """Our mean ± std of ``metric`` over the seeds of an aggregated group; empty without runs."""
    if group is None or _isnan(group.get(f"{metric}_mean")):
        return Cell()
    std = group.get(f"{metric}_std")
    return Cell(float(group[f"{metric}_mean"]), None if _isnan(std) else float(std), int(group["n"]))


def _cell(group: dict | None, row: TableRow, col: TableColumn, metric: str, references: pd.DataFrame | None,
          notes: list[str]) -> Cell:
    cell = _our_cell(group, metric)
    if references is not None and row.profile == "full" and not row.config_key:
        found = paper_number(references, row.method, col.dataset, col.scenario, metric, row.backbone)
        if found:
            cell.paper, cell.paper_source = found.value, found.source
            if found.conflict:
                notes.append(f"{row.label} {col.label} {METRIC_LABELS.get(metric, metric)}: paper numbers differ "
                             f"({found.conflict}); showing {found.source}")
    return cell


def _isnan(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _natural(text: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _rows(groups: pd.DataFrame, specs: Sequence[str | RowSpec] | None) -> list[TableRow]:
    labels = {g["config_key"]: g["config_label"] for g in groups.to_dict("records")}
    found = sorted({(g["method"], g["backbone"], g["profile"], g["config_key"]) for g in groups.to_dict("records")},
                   key=lambda k: (k[0], k[1], k[2] != "full", k[2], k[3] != "", labels.get(k[3], ""), k[3]))
    if specs is None:
        picked = [(*k, None) for k in found]
    else:
        picked = []
        for spec in specs:
            spec = RowSpec(spec) if isinstance(spec, str) else spec
            hits = [k for k in found if k[0] == spec.method and spec.backbone in (None, k[1])
                    and spec.profile in (None, k[2]) and spec.config_key in (None, k[3])]
            if not hits:
                hits = [(spec.method, spec.backbone or "", spec.profile or "full", spec.config_key or "")]
            picked += [(*k, spec.label) for k in hits]
    backbones: dict[str, set[str]] = {}
    for method, backbone, *_ in picked:
        backbones.setdefault(method, set()).add(backbone)
    out = []
    for method, backbone, profile, key, label in picked:
        text = label or method
        if len(backbones[method]) > 1 and backbone:  # name the backbone only where it tells rows apart
            text += f" ({backbone})"
        if profile != "full":
            text += f" [{profile}]"
        config = labels.get(key) or (f"cfg-{key}" if key else "")
        if config:
            text += f" [{config}]"
        out.append(TableRow(method, backbone, profile, text, key, config))
    # Two configurations may read alike (a schema-1 weights path and its hash): the key tells them apart.
    seen: dict[str, int] = {}
    for row in out:
        seen[row.label] = seen.get(row.label, 0) + 1
    for row in out:
        if seen[row.label] > 1 and row.config_key:
            row.label += f" cfg-{row.config_key}"
    return out


def _columns(groups: pd.DataFrame, specs: Sequence[ColumnSpec] | None) -> list[TableColumn]:
    kinds = {(g["dataset"], g["scenario"]): g["kind"] for g in groups.to_dict("records")}
    if specs is None:
        order = {"cil": 0, "mtil": 1}
        keys = sorted(kinds, key=lambda k: (order.get(kinds[k], 2), k[0], _natural(k[1])))
        specs = [ColumnSpec(dataset, scenario) for dataset, scenario in keys]
    out = []
    for spec in specs:
        kind = kinds.get((spec.dataset, spec.scenario)) or ("mtil" if spec.scenario.startswith("order-") else "cil")
        out.append(TableColumn(spec.dataset, spec.scenario, kind, tuple(spec.metrics or HEADLINE_METRICS[kind]),
                               spec.label or f"{spec.dataset} {spec.scenario}"))
    return out


# --------------------------------------------------------------------------------------------- renderers


def render(table: TableData, fmt: str) -> Any:
    """``rich``: a ``rich.table.Table``; ``markdown``, ``csv``, ``latex``: a string."""
    renderers = {"rich": render_rich, "markdown": render_markdown, "csv": render_csv, "latex": render_latex}
    if fmt not in renderers:
        raise CilbenchError(f"unknown table format {fmt!r} (one of {', '.join(FORMATS)})")
    return renderers[fmt](table)


def _md_mark(text: str, rank: int | None) -> str:
    return {1: f"**{text}**", 2: f"<u>{text}</u>"}.get(rank or 0, text)


def _latex_mark(text: str, rank: int | None) -> str:
    return {1: rf"\textbf{{{text}}}", 2: rf"\underline{{{text}}}"}.get(rank or 0, text)


def _with_paper(cell: Cell, mark=_md_mark, ours: str | None = None) -> str:
    extra = cell.paper_text(mark)
    ours = cell.text() if ours is None else ours
    return f"{ours} ({extra})" if extra else ours


def render_markdown(table: TableData) -> str:
    headers = table.headers()
    lines = [f"**{table.title}**", ""] if table.title else []
    lines.append("| " + " | ".join(["method"] + [h for _, _, h in headers]) + " |")
    lines.append("|:--" + "|--:" * len(headers) + "|")
    for i, row in enumerate(table.rows):
        cells = [_with_paper(table.cells[i][j][m]) for j, m, _ in headers]
        lines.append("| " + " | ".join([row.label.replace("|", "\\|")] + cells) + " |")
    if table.notes:
        lines += [""] + [f"- {note}" for note in table.notes]
    return "\n".join(lines) + "\n"


def render_csv(table: TableData) -> str:
    """One line per row: the label, then per sub-column our ``mean ± std`` (and, with references, the paper's
    number and the delta as plain numbers)."""
    header = ["method"]
    for _, _, h in table.headers():
        header += [h] + ([f"{h} paper", f"{h} delta"] if table.show_reference else [])
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for i, row in enumerate(table.rows):
        line = [row.label]
        for j, m, _ in table.headers():
            cell = table.cells[i][j][m]
            line.append(cell.text())
            if table.show_reference:
                line += ["" if cell.paper is None else f"{cell.paper:.2f}",
                         "" if cell.delta is None else f"{cell.delta:+.2f}"]
        writer.writerow(line)
    return buf.getvalue()


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def render_latex(table: TableData) -> str:
    """A booktabs ``tabular``: one column group per (dataset, scenario), one sub-column per metric."""
    widths = [len(c.metrics) for c in table.columns]
    lines = [f"% {table.title}"] if table.title else []
    lines += [r"\begin{tabular}{l" + "".join(" " + "r" * w for w in widths) + "}", r"\toprule"]
    groups, rules, start = [], [], 2
    for c, w in zip(table.columns, widths):
        groups.append(rf"\multicolumn{{{w}}}{{c}}{{{_latex_escape(c.label)}}}")
        rules.append(rf"\cmidrule(lr){{{start}-{start + w - 1}}}")
        start += w
    lines.append("Method & " + " & ".join(groups) + r" \\")
    lines.append(" ".join(rules))
    if table.metric_in_header:
        subs = [_latex_escape(METRIC_LABELS.get(m, m)) for c in table.columns for m in c.metrics]
        lines.append(" & " + " & ".join(subs) + r" \\")
    lines.append(r"\midrule")
    for i, row in enumerate(table.rows):
        cells = [_with_paper(cell, _latex_mark, _latex_escape(cell.text()).replace("±", r"$\pm$"))
                 for cell in (table.cells[i][j][m] for j, m, _ in table.headers())]
        lines.append(" & ".join([_latex_escape(row.label)] + cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def render_rich(table: TableData):
    """A ``rich.table.Table``; the paper's number and the delta (green when ours is higher) on a second line. Too
    narrow a console folds long words onto the next line instead of cutting them to ``…`` (see ``fold_rich``)."""
    from rich.table import Table
    from rich.text import Text

    out = Table(title=Text(table.title) if table.title else None,
                caption=Text("\n".join(table.notes)) if table.notes else None, caption_justify="left")
    out.add_column("method", overflow="fold")
    for j, m, _ in table.headers():
        out.add_column(Text(f"{table.columns[j].label}\n{table.metric_label(m)}".strip()), justify="right",
                       overflow="fold")
    for i, row in enumerate(table.rows):
        cells: list[Text] = []
        for j, m, _ in table.headers():
            cell = table.cells[i][j][m]
            text = Text(cell.text())
            if cell.paper is not None:
                text.append("\npaper ", style="dim")
                text.append(f"{cell.paper:.2f}", style={1: "bold", 2: "underline"}.get(cell.paper_rank or 0, "dim"))
                if cell.delta is not None:
                    text.append(f" {cell.delta:+.2f}", style="green" if cell.delta >= 0 else "red")
            cells.append(text)
        out.add_row(Text(row.label), *cells)
    return out


def split_columns(table: TableData, groups: Sequence[Sequence[int]]) -> list[TableData]:
    """``table`` as several tables of the given column indices each (rows repeated); the title goes to the first
    part, the notes to the last."""
    parts = []
    for i, idx in enumerate(groups):
        title = table.title if i == 0 else (f"{table.title} (continued)" if table.title else None)
        parts.append(TableData(table.rows, [table.columns[j] for j in idx],
                               [[line[j] for j in idx] for line in table.cells], table.show_reference,
                               table.notes if i == len(groups) - 1 else [], title, table.metric_in_header))
    return parts


def fold_rich(table: TableData, width: int) -> list:
    """Rich tables of ``table`` that fit ``width`` columns at their natural width: when the whole table does not
    fit, its (dataset, scenario) columns are spread over several tables, each repeating the method column. A single
    column too wide for ``width`` still folds its words (never ``…``)."""
    from rich.console import Console
    from rich.measure import Measurement

    probe = Console(width=100_000, file=io.StringIO(), color_system=None)

    def natural(part: TableData) -> int:
        return Measurement.get(probe, probe.options, render_rich(part)).maximum

    if not table.columns or natural(table) <= width:
        return [render_rich(table)]
    groups: list[list[int]] = []
    for j in range(len(table.columns)):
        if groups and natural(split_columns(table, [groups[-1] + [j]])[0]) <= width:
            groups[-1].append(j)
        else:
            groups.append([j])
    return [render_rich(part) for part in split_columns(table, groups)]


# --------------------------------------------------------------------------------------------- paper tables

LOWER_IS_BETTER = ("forgetting",)  # accuracy-like metrics rank high first; these and cost metrics rank low first


def _higher_is_better(metric: str) -> bool:
    if metric in LOWER_IS_BETTER:
        return False
    return metric in ALL_METRICS or metric.startswith(("A_", "transfer_", "average_", "last_", "acc"))


def suite_table(suite, results_dir: str | Path | None, references: pd.DataFrame | None,
                profile: str = "full", on_skip: Callable[[Skipped], None] | None = None) -> list[TableData]:
    """A paper table rebuilt from a suite (``cilbench.suites``): the suite's rows and columns in the paper's order
    (one ``TableData`` per block of rows when the paper prints blocks, else one), the paper's number of each cell
    from the reference store (matched by paper, table, row label, dataset, scenario, metric) marked best / second
    as the paper marks it (the ``best`` / ``second`` notes of the store; computed when the table has none), and
    our runs beside them. A row holds exactly the runs the sweep makes for it: its method with its ``sets``, that
    is the runs whose ``config_key`` is ``expected_config_key(method, dataset, quick, sets)``; a row with ``sets``
    says so in a note. A ``D`` cell is the A_last of the row's ``joint_row`` minus its own, in the same column."""
    have_runs = results_dir is not None and Path(results_dir).is_dir()
    groups = aggregate(collect(results_dir, on_skip) if have_runs else pd.DataFrame())
    index = {tuple(g[k] for k in GROUP_KEYS): g for g in groups.to_dict("records")}
    refs = None
    if references is not None and not references.empty and profile == "full":  # smoke runs never meet papers
        refs = references[(references["paper"] == suite.paper) & (references["table"].astype(str) == suite.table)]
    marked = refs is not None and refs["notes"].fillna("").str.match(r"^(best|second)\b").any()
    by_label = {r.label: r for r in suite.rows}
    keys, key_notes = _suite_config_keys(suite, profile != "full")
    table_rows = {r.label: _suite_row(r, suite, profile) for r in suite.rows}
    blocks = suite.blocks or [None]
    tables = []
    for block in blocks:
        specs = [by_label[name] for name in block.rows] if block else suite.rows
        rows = [table_rows[r.label] for r in specs]
        cols = []
        for c in suite.columns:
            kind = "mtil" if c.scenario.startswith("order-") else "cil"
            metrics = (block.metric_for(c),) if block else tuple(c.metrics or suite.metrics or HEADLINE_METRICS[kind])
            cols.append(TableColumn(c.dataset, c.scenario, kind, metrics, c.label))

        def group(spec, col: TableColumn, suite_col) -> dict | None:
            row = table_rows[spec.label]
            ours = col.scenario + ("-joint" if spec.joint else "") + \
                (f"-{suite_col.class_order}" if suite_col.class_order else "")
            key = keys.get((spec.label, suite_col.dataset))
            if not row.method or key is None:
                return None
            backbone = _suite_backbone(spec, suite, profile, col.dataset)
            return index.get((row.method, col.dataset, ours, backbone, row.profile, key))

        cells = [[{m: _suite_cell(group, spec, c, sc, m, refs, by_label) for m in c.metrics}
                  for c, sc in zip(cols, suite.columns)] for spec in specs]
        if not marked:
            _rank_paper_numbers(cols, cells)
        notes = []
        if refs is not None:
            how = "as the paper marks them" if marked else "computed: the paper's marks are not in the store"
            notes.append(f"paper numbers: {suite.paper} Table {suite.table} (benchmarks/references/{suite.paper}.csv);"
                         f" bold / underlined: best / second in each column, {how}")
        notes += key_notes + _d_notes(suite)
        if suite.notes:
            notes.append(suite.notes)
        if profile != "full":
            notes.append(f"[{profile}]: smoke runs, not comparable to the paper: its numbers are not shown")
        title = suite.title + (f" — {block.label}" if block else "")
        tables.append(TableData(rows, cols, cells, refs is not None, notes if block in (blocks[-1],) else [], title,
                                metric_in_header=block is None))
    return tables


def _suite_config_keys(suite, quick: bool) -> tuple[dict[tuple[str, str], str | None], list[str]]:
    """The ``config_key`` of each (row label, dataset) a suite row's runs carry, and the notes saying which runs a
    row with ``sets`` holds. A row whose ``sets`` do not resolve (an unknown setting) gets None: no runs."""
    from cilbench.identity import describe, expected_config_key, set_text

    keys: dict[tuple[str, str], str | None] = {}
    notes: list[str] = []
    for row in suite.rows:
        if not row.method:
            continue
        sets = {k: set_text(v) for k, v in row.sets.items()}
        problem = ""
        for dataset in dict.fromkeys(c.dataset for c in suite.columns):
            try:
                keys[(row.label, dataset)] = expected_config_key(row.method, dataset, quick, sets)
            except CilbenchError as err:
                keys[(row.label, dataset)], problem = None, str(err)
        if problem:
            notes.append(f"{row.label}: no runs shown, its settings do not resolve ({problem})")
        elif row.sets:
            notes.append(f"{row.label}: our runs of {row.method} with {describe(row.sets)}")
    return keys, notes



def _suite_row(r, suite, profile: str) -> TableRow:
    """The table row of suite row ``r``: its method and the backbone its runs carry (the tiny twin for smoke
    profiles)."""
    backbone = _suite_backbone(r, suite, profile, None)
    label = r.label + (f" [{profile}]" if profile != "full" and r.method else "")
    return TableRow(r.method or "", backbone, profile, label)


def _suite_backbone(r, suite, profile: str, dataset: str | None) -> str:
    """The backbone the runs of suite row ``r`` carry on ``dataset`` (None: the method's registered one)."""
    from cilbench.methods import load_method
    from cilbench.methods.base import METHODS, default_backbone
    from cilbench.models.backbones import BACKBONES

    if not r.method:
        return ""
    cls = load_method(r.method)  # registers its metadata (the default backbone)
    backbone = r.backbone or suite.backbone or (default_backbone(cls, dataset) if dataset is not None
                                                 else METHODS.metadata(r.method).get("backbone", ""))
    if profile != "full" and backbone in BACKBONES:
        backbone = BACKBONES.get(backbone).tiny or backbone
    return backbone


def _suite_cell(group: Callable, spec, col: TableColumn, suite_col, metric: str, refs: pd.DataFrame | None,
                by_label: dict) -> Cell:
    if metric == "D":  # the DNE paper's D: the LA of the row's joint minus the row's LA, same column
        ours, joint = group(spec, col, suite_col), None
        if spec.joint_row is not None:
            joint = group(by_label[spec.joint_row], col, suite_col)
        cell = Cell()
        if ours is not None and joint is not None and not (_isnan(ours.get("A_last_mean"))
                                                           or _isnan(joint.get("A_last_mean"))):
            cell = Cell(float(joint["A_last_mean"]) - float(ours["A_last_mean"]), None, int(ours["n"]))
    else:
        cell = _our_cell(group(spec, col, suite_col), metric)
    if refs is not None and not is_user_dataset(col.dataset):  # a user dataset never shows a paper's number
        hit = refs[(refs["paper_label"] == spec.label) & (refs["dataset"] == col.dataset)
                   & (refs["scenario"] == col.scenario) & (refs["metric"] == metric)]
        if not hit.empty:
            cell.paper, cell.paper_source = float(hit["value"].iloc[0]), str(hit["source"].iloc[0])
            note = str(hit["notes"].iloc[0] or "")
            cell.paper_rank = 1 if note.startswith("best") else 2 if note.startswith("second") else None
    return cell


def _d_notes(suite) -> list[str]:
    """Which joint each row's D is measured from (one note per joint row), when the suite shows D."""
    if "D" not in (suite.metrics or ()) and not any("D" in (c.metrics or ()) for c in suite.columns):
        return []
    against: dict[str, list[str]] = {}
    for r in suite.rows:
        if r.joint_row is not None and r.joint_row != r.label:
            against.setdefault(r.joint_row, []).append(r.label)
    return [f"D = A_last of {joint} - A_last, same column: {', '.join(labels)}" for joint, labels in against.items()]


def _rank_paper_numbers(cols: list[TableColumn], cells: list[list[dict[str, Cell]]]) -> None:
    for j, c in enumerate(cols):
        for m in c.metrics:
            values = sorted({line[j][m].paper for line in cells if line[j][m].paper is not None},
                            reverse=_higher_is_better(m))
            for line in cells:
                cell = line[j][m]
                if cell.paper is not None and len(values) > 1:
                    rank = values.index(cell.paper) + 1
                    cell.paper_rank = rank if rank <= 2 else None
