"""PNG plots of run records: accuracy-per-task curves per method, an accuracy matrix as a heat map, and a suite's
scaling plot (a metric against the number of tasks, one line per row, one panel per dataset).

Both number tasks from 1. Curves put the legend beside the axes (never over the lines), mark every point with a
marker of its own per series, draw a curve that lies on an earlier one dashed and thinner on top of it (and say so in
the legend), and show a one-task run (joint training: every class at once) as a large marker at the last task with a
dotted level line across.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from cilbench.errors import CilbenchError
from cilbench.results.record import RunRecord, Skipped, iter_records, load_record
from cilbench.utils import atomic_path, check_writable

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")
DASHES = ("-", "--", ":", "-.")
_SAME = 0.05  # percentage points: curves closer than this everywhere are drawn as overlapping


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def check_png_output(output: str | Path) -> Path:
    """Refuse, before any work, an output that is not a writable ``.png`` file path (one line)."""
    output = check_writable(output, "plot")
    if output.suffix.lower() != ".png":
        raise CilbenchError(f"plots are written as PNG: {output} should end in .png")
    return output


@dataclass
class Series:
    """One curve: mean A_t over seeds at each task (``tasks`` 1-based on the scenario's task axis)."""

    label: str
    tasks: np.ndarray
    seen: np.ndarray  # classes seen after each of the series' tasks
    mean: np.ndarray
    std: np.ndarray | None
    seeds: int


def curve_series(results_dir: str | Path, dataset: str, scenario: str | None,
                 on_skip: Callable[[Skipped], None] | None = None) -> tuple[str, list[Series], np.ndarray]:
    """The scenario, one ``Series`` per (method, profile, configuration, backbone) and the classes seen after each
    task of the scenario (the x axis)."""
    found: dict[str, dict[tuple, list]] = {}
    scenarios = set()
    for path, rec in iter_records(results_dir, on_skip):
        if rec.dataset != dataset or rec.kind != "cil":
            continue
        scenarios.add(rec.scenario)
        if scenario and rec.scenario != scenario:
            continue
        if not rec.accuracy_per_task:
            if on_skip:
                on_skip(Skipped(path, "no accuracy_per_task to plot", damaged=False))
            continue
        key = (rec.method, rec.profile, rec.config_key, rec.backbone)
        found.setdefault(rec.scenario, {}).setdefault(key, []).append((path, rec))
    if not scenarios:
        raise CilbenchError(f"no class-incremental run records of {dataset} under {results_dir}")
    if scenario is None:
        if len(scenarios) > 1:
            raise CilbenchError(f"{dataset} has runs of several scenarios ({', '.join(sorted(scenarios))}); "
                                f"pick one with --scenario")
        scenario = next(iter(scenarios))
    if scenario not in found:
        raise CilbenchError(f"no run records of {dataset} {scenario} (found: {', '.join(sorted(scenarios))})")
    groups = found[scenario]
    backbones = {key[3] for key in groups}
    raw = []
    for key, recs in sorted(groups.items()):
        length = len(recs[0][1].accuracy_per_task)
        kept = [r for p, r in recs if len(r.accuracy_per_task) == length]
        for p, r in recs:
            if len(r.accuracy_per_task) != length and on_skip:
                on_skip(Skipped(p, f"{len(r.accuracy_per_task)} tasks where seed {kept[0].seed} has "
                                   f"{length}", damaged=False))
        method, profile, _, backbone = key
        label = method + (f" [{profile}]" if profile != "full" else "")
        config = kept[0].config_label
        label += f" [{config}]" if config else ""
        label += f" ({backbone})" if len(backbones) > 1 and backbone else ""
        per_task = np.array([[np.nan if v is None else v for v in r.accuracy_per_task] for r in kept], float)
        increments = kept[0].increments or [1] * length
        seen = np.cumsum(increments[:length]).astype(float) if len(increments) >= length else \
            np.arange(1, length + 1, dtype=float)
        std = np.nanstd(per_task, 0, ddof=1) if len(kept) > 1 else None
        raw.append((label, seen, np.nanmean(per_task, 0), std, len(kept)))
    axis = max((s for _, s, *_ in raw), key=len)  # the scenario's own steps: the run with the most tasks
    series = [Series(label, _task_positions(seen, axis), seen, mean, std, n) for label, seen, mean, std, n in raw]
    return scenario, series, axis


def _task_positions(seen: np.ndarray, axis: np.ndarray) -> np.ndarray:
    """1-based task numbers on ``axis`` (classes seen after each task) of a run's classes-seen points: a run that
    merged tasks (joint: one task of every class) sits at the task where as many classes are seen."""
    return np.interp(seen, axis, np.arange(1, len(axis) + 1, dtype=float))


def plot_curves(results_dir: str | Path, dataset: str, scenario: str | None, output: str | Path,
                on_skip: Callable[[Skipped], None] | None = None):
    """A_t after each task, one line per method (and configuration), as a PNG; returns the figure (closed)."""
    output = check_png_output(output)
    scenario, series, axis = curve_series(results_dir, dataset, scenario, on_skip)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.2), layout="constrained")
    drawn: list[Series] = []
    for i, s in enumerate(series):
        same = [d for d in drawn if len(d.mean) == len(s.mean) and np.allclose(d.tasks, s.tasks)
                and np.allclose(d.mean, s.mean, atol=_SAME, equal_nan=True)]
        k = len(same)  # overlapping an earlier curve: dashed, thinner and smaller, drawn on top of it
        label = s.label + (f" (same as {same[0].label})" if same else "")
        style = dict(marker=MARKERS[i % len(MARKERS)], ms=max(3.0, 7.0 - 1.6 * k), lw=max(0.8, 2.2 - 0.6 * k),
                     ls=DASHES[k % len(DASHES)], zorder=2 + i, clip_on=False, label=label)
        if len(s.mean) == 1:  # one task (joint training): a point at its classes seen, and its level across
            style.update(ms=10, ls="none")
            (line,) = ax.plot(s.tasks, s.mean, **style)
            ax.axhline(s.mean[0], color=line.get_color(), ls=":", lw=1.2, zorder=1)
        else:
            (line,) = ax.plot(s.tasks, s.mean, **style)
            if s.std is not None:
                ax.fill_between(s.tasks, s.mean - s.std, s.mean + s.std, color=line.get_color(), alpha=0.15,
                                lw=0)
        drawn.append(s)
    positions = np.arange(1, len(axis) + 1)
    step = max(1, int(np.ceil(len(axis) / 20)))  # at most ~20 labelled ticks
    ax.set_xticks(positions[::step], [str(t) for t in positions[::step]])
    ax.set_xlim(0.5, len(axis) + 0.5)
    top = ax.secondary_xaxis("top")
    top.set_xticks(positions[::step], [f"{v:g}" for v in axis[::step]], fontsize=7)
    top.set_xlabel("classes seen", fontsize=8)
    ax.set_xlabel("task")
    ax.set_ylabel("A_t: accuracy on all seen classes (%)")
    ax.set_title(f"{dataset} {scenario}", fontsize=10)
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=7, title="method", title_fontsize=8)
    _save(fig, output)
    return fig


def scaling_series(suite, results_dir: str | Path | None, profile: str = "full", metric: str = "A_last",
                   on_skip: Callable[[Skipped], None] | None = None) -> dict[str, tuple[list[int], list[Series]]]:
    """Per dataset of ``suite``: the numbers of tasks of its columns, and one ``Series`` per row with runs, ``metric``
    (mean and std over seeds) against the number of tasks (``tasks``), read through the suite's table, so each row
    holds exactly the runs the sweep makes for it."""
    from cilbench.data.catalog import get_spec
    from cilbench.data.scenario import increments, parse_scenario
    from cilbench.results.tables import suite_table

    columns: dict[str, list[tuple[int, int]]] = {}  # dataset -> [(number of tasks, column index)]
    for j, c in enumerate(suite.columns):
        if c.scenario.startswith("order-"):
            raise CilbenchError(f"plot scaling: {suite.name} has an MTIL column ({c.dataset} {c.scenario}); scaling "
                                f"plots take class-incremental columns B<base>Inc<step>")
        base, inc = parse_scenario(c.scenario)
        columns.setdefault(c.dataset, []).append((len(increments(get_spec(c.dataset).num_classes, base, inc)), j))
    [table] = suite_table(suite, results_dir, None, profile, on_skip)[:1]
    out: dict[str, tuple[list[int], list[Series]]] = {}
    for dataset, cols in columns.items():
        cols.sort()
        lines: list[Series] = []
        for row, line in zip(table.rows, table.cells):
            points = [(n, line[j].get(metric)) for n, j in cols]
            points = [(n, cell) for n, cell in points if cell is not None and cell.mean is not None]
            if not points:
                continue
            tasks = np.array([n for n, _ in points], float)
            mean = np.array([cell.mean for _, cell in points], float)
            std = np.array([cell.std or 0.0 for _, cell in points], float)
            seeds = min(cell.n for _, cell in points)
            lines.append(Series(row.label, tasks, tasks, mean, std if seeds > 1 else None, seeds))
        if lines:
            out[dataset] = ([n for n, _ in cols], lines)
    if not out:
        where = f"under {results_dir}" if results_dir else "(no results folder)"
        raise CilbenchError(f"no {profile} runs of {suite.name} {where}: run `cilbench sweep {suite.name}"
                            f"{' --quick' if profile != 'full' else ''}` first")
    return out


def plot_scaling(suite, results_dir: str | Path | None, output: str | Path, profile: str = "full",
                 metric: str = "A_last", on_skip: Callable[[Skipped], None] | None = None):
    """``metric`` against the number of tasks, one line per suite row, one panel per dataset, as a PNG (the HAM
    claim: the gap to the baselines grows with the number of tasks); returns the figure (closed)."""
    from cilbench.results.tables import METRIC_LABELS

    output = check_png_output(output)
    panels = scaling_series(suite, results_dir, profile, metric, on_skip)
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels) + 2.2, 3.8), layout="constrained",
                             squeeze=False)
    labels = [s.label for _, series in panels.values() for s in series]
    order = list(dict.fromkeys(labels))  # one marker and colour per row across the panels
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (dataset, (ticks, series)) in zip(axes[0], panels.items()):
        for s in series:
            k = order.index(s.label)
            (line,) = ax.plot(s.tasks, s.mean, marker=MARKERS[k % len(MARKERS)], color=colours[k % len(colours)],
                              lw=1.8, clip_on=False, label=s.label)
            if s.std is not None:
                ax.fill_between(s.tasks, s.mean - s.std, s.mean + s.std, color=line.get_color(), alpha=0.15, lw=0)
        ax.set_xscale("log")
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("number of tasks")
        ax.set_title(dataset, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{METRIC_LABELS.get(metric, metric)} (%)")
    handles = {h.get_label(): h for ax in axes[0] for h in ax.get_lines()}
    # the legend under the panels (never over the lines or the title), the title wrapped to the figure's width
    fig.legend([handles[name] for name in order], order, loc="outside lower center", fontsize=7,
               ncol=min(3, len(order)))
    width = fig.get_size_inches()[0]
    fig.suptitle(textwrap.fill(suite.title + (f" [{profile}]" if profile != "full" else ""),
                               max(30, int(width * 72 / (10 * 0.62)))), fontsize=10)
    _save(fig, output)
    return fig


def _task_labels(rec: RunRecord, count: int) -> list[str]:
    """``1``, ``2``, ... for CIL tasks (named "task N" or unnamed); ``1 aircraft``, ... for named datasets."""
    names = rec.short_task_names
    if len(names) < count or all(n.lower().startswith("task") for n in names):
        return [str(i + 1) for i in range(count)]
    return [f"{i + 1} {n}" for i, n in enumerate(names[:count])]


def plot_matrix(record: str | Path, output: str | Path):
    """A run record's accuracy matrix as a heat map PNG; returns the figure (closed)."""
    output = check_png_output(output)
    rec = load_record(record)
    if not rec.accuracy_matrix:
        raise CilbenchError(f"{record}: the run record has no accuracy matrix")
    acc = np.array([[np.nan if v is None else v for v in row] for row in rec.accuracy_matrix], dtype=float)
    labels = _task_labels(rec, acc.shape[1])
    plt = _pyplot()
    width = max(5.0, 0.55 * acc.shape[1] + 3)
    fig, ax = plt.subplots(figsize=(width, max(4.0, 0.5 * acc.shape[0] + 2.2)), layout="constrained")
    im = ax.imshow(acc, cmap="viridis", vmin=0, vmax=100)
    named = labels[0] != "1"
    ax.set_xticks(range(acc.shape[1]), labels, rotation=60 if named else 0, ha="right" if named else "center",
                  fontsize=7)
    ax.set_yticks(range(acc.shape[0]), labels[: acc.shape[0]], fontsize=7)
    for i in range(acc.shape[0]):
        for j in range(acc.shape[1]):
            if not np.isnan(acc[i, j]):
                ax.text(j, i, f"{acc[i, j]:.0f}", ha="center", va="center", fontsize=6,
                        color="white" if acc[i, j] < 60 else "black")
    ax.set_xlabel("evaluated on task")
    ax.set_ylabel("after training task")
    fig.colorbar(im, ax=ax, label="accuracy (%)", shrink=0.9)
    # The title spans the figure (axes and colour bar), wrapped to its width, so it never runs over the colour bar.
    title = f"{rec.method} on {rec.dataset} {rec.scenario}"
    fig.suptitle(textwrap.fill(title, max(20, int(width * 72 / (10 * 0.62)))), fontsize=10)
    _save(fig, output)
    return fig


def _save(fig, output: str | Path) -> None:
    output = Path(output)
    if output.suffix.lower() != ".png":
        raise CilbenchError(f"plots are written as PNG: {output} should end in .png")
    fig.canvas.draw()  # lay the figure out before saving: the returned figure keeps its final positions
    with atomic_path(output) as tmp:
        fig.savefig(tmp, dpi=150, format="png")
    _pyplot().close(fig)
