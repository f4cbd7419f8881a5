"""Benchmark suites: parsing, the sweep (skipping finished runs), paper tables as printed, plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cilbench.errors import CilbenchError
from cilbench.results.references import load_references
from cilbench.results.tables import render, suite_table
from cilbench.suites import list_suites, load_suite, parse_suite
from tests.test_results import cil, make_record

REFS = """paper,table,method,paper_label,dataset,scenario,metric,value,backbone,notes
demo,2,,L2P,cifar100,B0Inc5,A_avg,85.94,vit-b16-in21k,
demo,2,,L2P,cifar100,B0Inc5,A_last,79.93,vit-b16-in21k,
demo,2,simplecil,SimpleCIL,cifar100,B0Inc5,A_avg,87.57,vit-b16-in21k,
demo,2,simplecil,SimpleCIL,cifar100,B0Inc5,A_last,81.26,vit-b16-in21k,
demo,2,ease,EASE,cifar100,B0Inc5,A_avg,91.51,vit-b16-in21k,
demo,2,ease,EASE,cifar100,B0Inc5,A_last,85.80,vit-b16-in21k,
demo,2,ease,EASE,cub,B0Inc10,A_avg,92.23,vit-b16-in21k,
demo,3,ease,EASE,cub,B0Inc10,A_avg,1.0,vit-b16-in21k,another table: never shown in table 2
"""

SUITE = """title: "Demo Table 2"
paper: demo
table: "2"
backbone: vit-b16-in21k
seeds: [1993, 1994]
columns:
  - {dataset: cifar100, scenario: B0Inc5, label: CIFAR}
  - {dataset: cub, scenario: B0Inc10, label: CUB, metrics: [A_avg]}
rows:
  - L2P
  - {label: SimpleCIL, method: simplecil}
  - {label: EASE, method: ease, datasets: [cifar100]}
"""


def _write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


def test_suite_parsing_and_its_runs(tmp_path):
    suite = load_suite(str(_write(tmp_path, "demo.yaml", SUITE)))
    assert (suite.name, suite.paper, suite.table, suite.seeds) == ("demo", "demo", "2", (1993, 1994))
    assert [r.label for r in suite.rows] == ["L2P", "SimpleCIL", "EASE"]
    assert suite.columns[1].metrics == ("A_avg",) and suite.columns[0].metrics is None
    # L2P has no method; EASE only on CIFAR; two seeds each
    assert [(r.method, c.dataset, s) for r, c, s in suite.runs()] == [
        ("simplecil", "cifar100", 1993), ("simplecil", "cifar100", 1994), ("simplecil", "cub", 1993),
        ("simplecil", "cub", 1994), ("ease", "cifar100", 1993), ("ease", "cifar100", 1994)]


@pytest.mark.parametrize("doc, message", [
    ({"paper": "p", "table": "1", "rows": ["A"]}, "missing 'columns'"),
    ({"paper": "p", "table": "1", "rows": ["A"], "columns": [{"dataset": "cub"}]}, "columns[0]: missing 'scenario'"),
    ({"paper": "p", "table": "1", "rows": ["A", "A"], "columns": [{"dataset": "cub", "scenario": "B0Inc10"}]},
     "row label 'A' appears twice"),
    ({"paper": "p", "table": "1", "rows": ["A"], "columns": [{"dataset": "cub", "scenario": "B0Inc10"}],
      "seed": [1]}, "unknown key 'seed'"),
])
def test_suite_schema_errors_are_one_line(doc, message):
    with pytest.raises(CilbenchError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_suite(doc, Path("x.yaml"))


def test_paper_table_as_printed_with_our_runs(tmp_path, monkeypatch):
    refs = load_references(_write(tmp_path / "refs", "demo.csv", REFS).parent)
    results = tmp_path / "results"
    results.mkdir()
    for seed, (a, b) in zip((1993, 1994), ((87.0, 81.0), (88.0, 82.0))):
        (results / f"s{seed}.json").write_text(json.dumps(make_record("simplecil", "cifar100", "B0Inc5", seed,
                                                                      cil(a, b))))
    suite = load_suite(str(_write(tmp_path, "demo.yaml", SUITE)))
    [table] = suite_table(suite, results, refs)
    assert render(table, "markdown") == (
        "**Demo Table 2**\n\n"
        "| method | CIFAR A_avg | CIFAR A_last | CUB A_avg |\n"
        "|:--|--:|--:|--:|\n"
        "| L2P | - (paper 85.94) | - (paper 79.93) | - |\n"
        "| SimpleCIL | 87.50 ± 0.71 (paper <u>87.57</u>, -0.07) | 81.50 ± 0.71 (paper <u>81.26</u>, +0.24) | - |\n"
        "| EASE | - (paper **91.51**) | - (paper **85.80**) | - (paper 92.23) |\n\n"
        "- paper numbers: demo Table 2 (benchmarks/references/demo.csv); bold / underlined: best / second in each "
        "column, computed: the paper's marks are not in the store\n")
    latex = render(table, "latex")
    assert r"\textbf{91.51}" in latex and r"\underline{87.57}" in latex and r"87.50 $\pm$ 0.71" in latex
    csv_text = render(table, "csv")
    assert csv_text.splitlines()[2].startswith("SimpleCIL,87.50 ± 0.71,87.57,-0.07")


def test_sweep_runs_what_is_missing_and_skips_finished_runs(cli, tmp_path):
    suite = _write(tmp_path, "tiny.yaml", """title: tiny
paper: cicae
table: I
columns:
  - {dataset: synthetic, scenario: B0Inc10}
rows:
  - {label: SimpleCIL, method: simplecil}
  - {label: previous best}
""")
    out = tmp_path / "results"
    dry = cli("sweep", str(suite), "--results", str(out), "--quick", "--dry-run")
    assert dry.code == 0 and "would run" in dry.out and not out.exists()
    first = cli("sweep", str(suite), "--results", str(out), "--quick")
    assert first.code == 0, first.err
    assert "0 already done, 1 ran, 0 failed" in first.out
    records = list(out.glob("*.json"))
    assert len(records) == 1 and "simplecil__synthetic__B0Inc10" in records[0].name
    stamp = records[0].stat().st_mtime_ns
    again = cli("sweep", str(suite), "--results", str(out), "--quick")
    assert again.code == 0 and "1 already done, 0 ran, 0 failed" in again.out
    assert records[0].stat().st_mtime_ns == stamp  # not rewritten
    table = cli("table", "--benchmark", str(suite), "--results", str(out), "--quick", "--format", "markdown")
    assert table.code == 0 and "| SimpleCIL [quick] |" in table.out and "(paper" not in table.out


def test_sweep_reports_a_failing_run_and_goes_on(cli, tmp_path, monkeypatch):
    suite = _write(tmp_path, "bad.yaml", """title: bad
paper: cicae
table: I
columns:
  - {dataset: synthetic, scenario: B0Inc10}
rows:
  - {label: A, method: simplecil, sets: {no_such_setting: 1}}
  - {label: B, method: simplecil}
""")
    res = cli("sweep", str(suite), "--results", str(tmp_path / "r"), "--quick")
    assert res.code == 1 and "no setting 'no_such_setting'" in res.out and "1 ran, 1 failed" in res.out


def test_unknown_suite_is_one_line(cli):
    res = cli("table", "--benchmark", "mos-tabel1")
    assert res.code == 2 and "no benchmark suite 'mos-tabel1'" in res.err


def test_shipped_suites_parse_and_match_the_reference_store():
    refs = load_references()
    names = list_suites()
    assert names, "benchmarks/suites holds the paper tables"
    for name in names:
        suite = load_suite(name)
        rows = refs[(refs["paper"] == suite.paper) & (refs["table"].astype(str) == suite.table)]
        if (refs["paper"] == suite.paper).any():  # a paper without readable tables (HAM) has no rows at all
            assert not rows.empty, f"{name}: no reference rows for {suite.paper} Table {suite.table}"
        else:
            assert suite.paper == "ham", f"{name}: no reference rows for paper {suite.paper}"
        labels = {r.label for r in suite.rows}
        cells = {(c.dataset, c.scenario) for c in suite.columns}
        stray = rows[~rows["paper_label"].isin(labels)]
        assert stray.empty, f"{name}: paper rows without a suite row: {sorted(set(stray['paper_label']))}"
        for row in rows.itertuples():
            assert (row.dataset, row.scenario) in cells, f"{name}: {row.dataset} {row.scenario} not a column"


def test_plots_are_png(cli, tmp_path):
    out = tmp_path / "r"
    assert cli("run", "simplecil", "--dataset", "synthetic", "--quick", "--out", str(out)).code == 0
    curves = cli("plot", "curves", "--results", str(out), "--dataset", "synthetic", "-o", str(tmp_path / "c.png"))
    assert curves.code == 0, curves.err
    record = next(out.glob("*.json"))
    matrix = cli("plot", "matrix", str(record), "-o", str(tmp_path / "m.png"))
    assert matrix.code == 0, matrix.err
    for name in ("c.png", "m.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = cli("plot", "curves", "--results", str(out), "--dataset", "cub", "-o", str(tmp_path / "x.png"))
    assert bad.code == 2 and "no class-incremental run records of cub" in bad.err


def test_blocks_lay_out_mtil_tables_as_printed_with_the_papers_marks(tmp_path):
    refs_text = """paper,table,method,paper_label,dataset,scenario,metric,value,backbone,notes
demo,1,,A,mtil,order-I,transfer_b,60.0,,
demo,1,,B,mtil,order-I,transfer_b,70.0,,"best (bold in the paper)"
demo,1,,A,mtil,order-I,transfer,61.0,,"second (underlined in the paper)"
demo,1,,B,mtil,order-I,transfer,50.0,,
demo,1,,A,mtil,order-I,last_a,80.0,,
"""
    refs = load_references(_write(tmp_path / "refs", "demo.csv", refs_text).parent)
    suite = load_suite(str(_write(tmp_path, "mtil.yaml", """title: Demo MTIL
paper: demo
table: "1"
columns:
  - {dataset: mtil, scenario: order-I, label: DatasetA, key: a}
  - {dataset: mtil, scenario: order-I, label: DatasetB, key: b}
  - {dataset: mtil, scenario: order-I, label: Mean, key: null}
rows: [A, B, {label: Zero-shot, method: zeroshot-clip}]
blocks:
  - {label: Transfer, metric: transfer, rows: [A, B]}
  - {label: Last, metric: last, rows: [A, Zero-shot]}
""")))
    assert [(r.method, c.dataset) for r, c, _ in suite.runs()] == [("zeroshot-clip", "mtil")]  # one run, not 3
    transfer, last = suite_table(suite, None, refs)
    assert transfer.title == "Demo MTIL — Transfer" and [r.label for r in last.rows] == ["A", "Zero-shot"]
    md = render(transfer, "markdown")
    assert "| method | DatasetA | DatasetB | Mean |" in md
    # the marks are the paper's (stored in the notes), not recomputed: 61.0 underlined although it is the best
    assert "| A | - | - (paper 60.00) | - (paper <u>61.00</u>) |" in md
    assert "| B | - | - (paper **70.00**) | - (paper 50.00) |" in md
    assert "| A | - (paper 80.00) | - | - |" in render(last, "markdown")
    with pytest.raises(CilbenchError, match="row 'C' is not among the suite's rows"):
        parse_suite({"paper": "p", "table": "1", "rows": ["A"], "columns": [{"dataset": "mtil", "scenario": "order-I"}],
                     "blocks": [{"label": "x", "metric": "last", "rows": ["C"]}]}, Path("x.yaml"))
