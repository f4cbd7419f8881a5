"""Readable output: outputs checked before any work, tables that are never cut to ``…``, whole method names in a
pipe, help with examples, plots whose legend, markers and task numbers can be read, and ignored run records."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from cilbench.errors import CilbenchError
from cilbench.results import plots, tables
from cilbench.utils import NAME_MAX, check_writable
from tests.test_results import cil, make_record, write_results

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------- writable outputs


def test_check_writable_accepts_new_files_and_missing_folders(tmp_path):
    assert check_writable(tmp_path / "t.md") == tmp_path / "t.md"
    assert check_writable(tmp_path / "new" / "deeper" / "t.md") == tmp_path / "new" / "deeper" / "t.md"
    assert not (tmp_path / "new").exists()  # checking creates nothing
    (tmp_path / "old.md").write_text("x")
    assert check_writable(tmp_path / "old.md") == tmp_path / "old.md"  # replaced atomically


@pytest.mark.parametrize("make, message", [
    (lambda d: d, "it is a folder"),
    (lambda d: Path(os.devnull), "it exists and is not a regular file"),
    (lambda d: d / ("x" * (NAME_MAX + 1) + ".md"), "bytes; at most"),
    (lambda d: d / ("x" * (NAME_MAX - 5) + ".md"), "bytes; at most"),  # fits NAME_MAX, not its atomic temp name
    (lambda d: d / "file.txt" / "t.md", "is not a folder"),
    (lambda d: "", "path is empty"),
])
def test_check_writable_refuses_in_one_line(tmp_path, make, message):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(CilbenchError) as err:
        check_writable(make(tmp_path))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_check_writable_refuses_a_folder_without_write_permission(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() != 0:  # root writes anywhere: then only the permission answer itself can be faked
        locked.chmod(0o500)
    else:
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real(p, mode))
    try:
        with pytest.raises(CilbenchError, match=f"no permission to write in {locked}"):
            check_writable(locked / "sub" / "t.md")
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("args, message", [
    (["table", "-o", "{tmp}"], "cannot write table {tmp}: it is a folder"),
    (["table", "-o", os.devnull], f"cannot write table {os.devnull}: it exists and is not a regular file"),
    (["table", "-o", "{tmp}/" + "n" * 300 + ".md"], "bytes; at most 241 fit"),
    (["plot", "curves", "-d", "cub", "-o", "{tmp}"], "cannot write plot {tmp}: it is a folder"),
    (["plot", "matrix", "{tmp}/absent.json", "-o", os.devnull], "is not a regular file"),
    (["plot", "curves", "-d", "cub", "-o", "{tmp}/" + "n" * 300 + ".png"], "bytes; at most 241 fit"),
    (["plot", "curves", "-d", "cub", "-o", "{tmp}/c.pdf"], "should end in .png"),
])
def test_outputs_are_refused_before_any_record_is_read(cli, tmp_path, args, message):
    # --results names no folder: reading records first would fail with "no results folder" instead
    r = cli(*[a.replace("{tmp}", str(tmp_path)) for a in args], "--results", tmp_path / "absent")
    assert r.code == 2 and "Traceback" not in r.err
    assert message.replace("{tmp}", str(tmp_path)) in r.err and len(r.err.strip().splitlines()) == 1


def test_table_output_file(cli, tmp_path):
    results = write_results(tmp_path / "r")
    r = cli("table", "--results", results, "-o", tmp_path / "new" / "t.md", "--no-paper")
    assert r.code == 0 and (tmp_path / "new" / "t.md").read_text().startswith("| method |")


# --------------------------------------------------------------------------------------------- tables


def test_table_piped_is_markdown_and_never_cut(cli, tmp_path):
    results = write_results(tmp_path / "r")
    r = cli("table", "--results", results)  # default --format rich; stdout is not a terminal here
    assert r.code == 0 and "…" not in r.out
    assert r.out.startswith("| method | cifar100 B0Inc10 A_avg |")
    assert "| simplecil [quick] | 70.00 | 60.00 |" in r.out


def _wide_table(tmp_path: Path) -> tables.TableData:
    folder = tmp_path / "wide"
    folder.mkdir()
    datasets = ["imagenet-r", "imagenet-a", "cub", "cifar100", "objectnet", "omnibenchmark", "vtab"]
    for i, dataset in enumerate(datasets):
        for method in ("finetune-adapter", "aper-adapter", "simplecil"):
            for seed in (1, 2):
                record = make_record(method, dataset, "B0Inc10", seed, cil(80.0 + seed + i, 70.0 - seed))
                (folder / f"{method}-{dataset}-{seed}.json").write_text(json.dumps(record))
    return tables.build_table(folder)


def test_rich_tables_fold_to_80_columns_without_ellipsis(tmp_path):
    table = _wide_table(tmp_path)
    console = Console(width=80, file=io.StringIO(), record=True, color_system=None)
    parts = tables.fold_rich(table, 80)
    assert len(parts) > 1  # seven datasets x two metrics do not fit 80 columns: split, the method column repeated
    for part in parts:
        console.print(part)
    text = console.export_text()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    assert text.count("finetune-adapter") == len(parts)  # the name whole, once per part
    for dataset in ("imagenet-r", "omnibenchmark", "vtab"):
        assert f"{dataset} B0Inc10" in text
    assert text.count("± 0.71") == 7 * 2 * 3  # every cell, whole
    # a column too wide for the console alone folds its words instead of cutting them
    narrow = Console(width=30, file=io.StringIO(), record=True, color_system=None)
    for part in tables.fold_rich(table, 30):
        narrow.print(part)
    assert "…" not in narrow.export_text()


def test_check_table_is_never_cut(tmp_path):
    from cilbench.results.check import check, render_check

    results = write_results(tmp_path / "r")
    baseline = write_results(tmp_path / "b", shift=5.0)
    console = Console(width=80, file=io.StringIO(), record=True, color_system=None)
    console.print(render_check(check(results, baseline, 1.0)))
    assert "…" not in console.export_text()


# --------------------------------------------------------------------------------------------- methods list, help


def _method_names() -> list[str]:
    from cilbench.methods import load_all

    return list(load_all())


def test_methods_list_piped_keeps_every_name_whole_on_one_line(cli):
    r = cli("methods", "list")
    assert r.code == 0
    lines = r.out.splitlines()
    for name in _method_names():  # what `grep -w NAME` finds: the name between non-word characters
        hits = [line for line in lines if re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", line)]
        assert hits and hits[0].startswith(f"| {name} |"), name


def test_methods_list_on_a_narrow_terminal_never_wraps_a_name(cli, monkeypatch):
    from cilbench import cli as cli_module

    screen = Console(width=60, file=io.StringIO(), force_terminal=True, color_system=None, record=True)
    monkeypatch.setattr(cli_module, "console", screen)
    assert cli("methods", "list").code == 0
    text = screen.export_text()
    for name in _method_names():
        assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text), name
    assert "…" not in text


def test_methods_list_json(cli):
    r = cli("methods", "list", "--json")
    items = json.loads(r.out)
    assert [i["name"] for i in items] == _method_names()
    assert {"family", "default_backbone", "paper", "summary"} <= set(items[0])


@pytest.mark.parametrize("group", [[], ["methods"], ["datasets"]])
def test_group_help_has_an_example(cli, group):
    r = cli(*group, "--help")
    assert r.code == 0 and "Example" in r.out


def test_sweep_help_example_names_existing_suites(cli, monkeypatch):
    from cilbench.suites import list_suites

    monkeypatch.setenv("COLUMNS", "200")
    r = cli("sweep", "--help")
    named = re.findall(r"cilbench sweep ([\w.-]+)", r.out)
    named = [n for n in named if not n.startswith("-")]
    assert named and set(named) <= set(list_suites())


# --------------------------------------------------------------------------------------------- plots


def _renderer(fig):
    """A renderer of the (closed) figure as saved: an Agg canvas laid out again."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()
    return fig.canvas.get_renderer()


def _curve_records(folder: Path) -> Path:
    folder.mkdir()
    down = list(np.linspace(95, 80, 10).round(2))
    runs = [("simplecil", down, 1), ("aper-adapter", down, 1), ("ease", [v - 5 for v in down], 1),
            ("ease", [v - 4 for v in down], 2), ("joint", [93.0], 1)]
    for i, (method, per_task, seed) in enumerate(runs):
        record = make_record(method, "cifar100", "B0Inc10", seed, cil(per_task[0], per_task[-1]))
        record["accuracy_per_task"] = per_task
        record["increments"] = [10] * len(per_task) if len(per_task) > 1 else [100]  # joint: one task of 100
        (folder / f"{i}.json").write_text(json.dumps(record))
    return folder


def test_curves_legend_outside_markers_overlaps_and_a_single_point(tmp_path):
    out = tmp_path / "curves.png"
    fig = plots.plot_curves(_curve_records(tmp_path / "r"), "cifar100", None, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax = fig.axes[0]
    renderer = _renderer(fig)
    [legend] = fig.legends
    assert legend.get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1  # beside, not over
    lines = {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}
    assert set(lines) == {"aper-adapter", "ease", "joint", "simplecil (same as aper-adapter)"}
    assert all(line.get_marker() not in (None, "", "None") for line in lines.values())
    assert len({line.get_marker() for line in lines.values()}) == len(lines)
    same, first = lines["simplecil (same as aper-adapter)"], lines["aper-adapter"]
    assert same.get_linestyle() == "--" and same.get_linewidth() < first.get_linewidth()
    assert same.get_zorder() > first.get_zorder()  # the dashed copy lies on top, so both stay visible
    joint = lines["joint"]
    assert list(joint.get_xdata()) == [10.0] and joint.get_markersize() >= 8  # at the last task, large
    assert any(list(line.get_ydata()) == [93.0, 93.0] for line in ax.get_lines())  # its level across the axes
    assert [t.get_text() for t in ax.get_xticklabels()][:3] == ["1", "2", "3"]
    assert ax.get_xlim()[0] < 1 < 10 < ax.get_xlim()[1]  # no point at the edge is cut


def test_matrix_title_clears_the_colour_bar_and_tasks_count_from_1(tmp_path):
    record = make_record("cicae", "imagenet-a", "B0Inc20", 1, cil(1.0, 2.0))
    record["accuracy_matrix"] = [[80.0, None, None], [70.0, 60.0, None], [65.0, 55.0, 50.0]]
    (tmp_path / "r.json").write_text(json.dumps(record))
    fig = plots.plot_matrix(tmp_path / "r.json", tmp_path / "m.png")
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    renderer = _renderer(fig)
    ax, bar = fig.axes
    title = fig._suptitle.get_window_extent(renderer)
    assert not title.overlaps(bar.get_window_extent(renderer)) and not title.overlaps(ax.get_window_extent(renderer))
    assert title.x0 >= 0 and title.x1 <= fig.bbox.width
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "3"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["1", "2", "3"]
    mtil = make_record("zscl", "mtil", "order-I", 1, {}, kind="mtil")
    mtil["task_names"] = ["aircraft", "caltech101"]
    (tmp_path / "mtil.json").write_text(json.dumps(mtil))
    fig = plots.plot_matrix(tmp_path / "mtil.json", tmp_path / "mtil.png")
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["1 aircraft", "2 caltech101"]


def test_plot_curves_warns_about_damaged_records(cli, tmp_path):
    folder = _curve_records(tmp_path / "r")
    (folder / "cut.json").write_text('{"schema_version": 2, "method": ')
    r = cli("plot", "curves", "--results", folder, "-d", "cifar100", "-o", tmp_path / "c.png")
    assert r.code == 0 and f"warning: skipped {folder / 'cut.json'}: truncated JSON" in r.err


# --------------------------------------------------------------------------------------------- git


def test_run_records_under_results_are_ignored_but_its_readme_is_not():
    if subprocess.run(["git", "-C", str(REPO), "rev-parse"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    names = ["results/simplecil__digits__B0Inc2__vit-tiny__seed1993__quick.json", "results/.checkpoints/x.pt",
             "results/README.md"]
    r = subprocess.run(["git", "-C", str(REPO), "check-ignore", "--no-index", *names], capture_output=True, text=True)
    assert r.stdout.split() == names[:2]
