"""Matrix files, the paper reference store, results tables and the regression check, on small fixtures."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest

from cilbench.errors import CilbenchError
from cilbench.results import check as check_mod
from cilbench.results import matrix_io, references, tables

BACKBONE = "vit-b16-in21k"
HEADER = "paper,table,method,paper_label,dataset,scenario,metric,value,backbone,notes\n"


# --------------------------------------------------------------------------------------------- fixtures


def make_record(method: str, dataset: str, scenario: str, seed: int, scores: dict, *, kind: str = "cil",
                profile: str = "full", backbone: str = BACKBONE, finished_at: str = "2025-01-01T00:00:00") -> dict:
    """A run record of schema version 1 (see cilbench/results/record.py)."""
    size = 1 if kind == "cil" else 2
    return {
        "schema_version": 1, "run_id": f"{method}-{dataset}-{seed}", "status": "complete", "kind": kind,
        "method": method, "dataset": dataset, "scenario": scenario, "class_order": [], "increments": [],
        "seed": seed, "backbone": backbone, "profile": profile, "comparable": profile == "full",
        "config": {}, "run": {}, "accuracy_matrix": [[50.0] * size for _ in range(size)], "test_counts": [10] * size,
        "accuracy_per_task": [50.0] * size, "metrics": scores, "extra": {}, "timings": {},
        "started_at": "2025-01-01T00:00:00", "finished_at": finished_at,
    }


def cil(a_avg: float, a_last: float, forgetting: float = 1.0) -> dict:
    return {"A_avg": a_avg, "A_last": a_last, "forgetting": forgetting}


# 2 methods x 2 seeds x 2 datasets, plus one quick run and one MTIL run
RUNS = [
    ("simplecil", "cifar100", "B0Inc10", 1993, cil(87.0, 81.0)),
    ("simplecil", "cifar100", "B0Inc10", 1994, cil(88.0, 82.0)),
    ("simplecil", "imagenet-a", "B0Inc20", 1993, cil(60.0, 49.5)),
    ("simplecil", "imagenet-a", "B0Inc20", 1994, cil(61.0, 48.5)),
    ("ease", "cifar100", "B0Inc10", 1993, cil(91.0, 86.0)),
    ("ease", "cifar100", "B0Inc10", 1994, cil(93.0, 86.0)),
    ("ease", "imagenet-a", "B0Inc20", 1993, cil(65.0, 55.25)),
    ("ease", "imagenet-a", "B0Inc20", 1994, cil(66.0, 54.75)),
]


def write_results(folder: Path, shift: float = 0.0, extra: bool = True) -> Path:
    """The fixture runs as record files; ``shift`` adds to every accuracy (for a second results folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    records = [make_record(m, d, s, seed, {k: v + shift for k, v in sc.items()}) for m, d, s, seed, sc in RUNS]
    if extra:
        records.append(make_record("simplecil", "cifar100", "B0Inc10", 1993, cil(70.0, 60.0), profile="quick"))
        records.append(make_record("zscl", "mtil", "order-I", 1993, {"transfer": 68.5, "average": 75.25, "last": 83.0},
                                   kind="mtil", backbone="clip-vit-b16"))
    for i, record in enumerate(records):
        (folder / f"run{i:02d}.json").write_text(json.dumps(record))
    (folder / "notes.json").write_text('{"not": "a record"}')  # foreign JSON is skipped
    return folder


REFS = HEADER + """\
ease,2,ease,EASE,cifar100,B0Inc10,A_avg,92.35,vit-b16-in21k,fixture
ease,2,ease,EASE,cifar100,B0Inc10,A_last,87.76,vit-b16-in21k,
ease,1,ease,EASE,imagenet-a,B0Inc20,A_avg,65.34,vit-b16-in1k,other backbone: never matched
mos,1,simplecil,SimpleCIL,imagenet-a,B0Inc20,A_last,48.91,,no backbone: matches any
mos,1,simplecil,SimpleCIL,cifar100,B0Inc10,A_avg,87.57,vit-b16-in21k,
zscl,1,zscl,ZSCL,mtil,order-I,transfer,68.1,,
zscl,1,,Zero-shot,mtil,order-I,transfer,69.4,,no method: never matched
"""


@pytest.fixture
def results(tmp_path: Path) -> Path:
    return write_results(tmp_path / "results")


@pytest.fixture
def refs(tmp_path: Path):
    folder = tmp_path / "refs"
    folder.mkdir()
    (folder / "fixture.csv").write_text(REFS)
    return references.load_references(folder)


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


# --------------------------------------------------------------------------------------------- matrix files


def test_matrix_json_list_with_missing_upper_triangle(tmp_path):
    path = tmp_path / "m.json"
    path.write_text("[[80, null, NaN], [85, 70, null], [60, 65, 50]]")
    matrix, counts, kind = matrix_io.load_matrix(path)
    assert matrix.shape == (3, 3) and np.isnan(matrix[0, 1:]).all() and np.isnan(matrix[1, 2])
    assert matrix[2].tolist() == [60, 65, 50] and counts is None and kind is None
    scores = matrix_io.score_matrix(path)
    assert scores["kind"] == "cil" and scores["A_last"] == pytest.approx(175 / 3)
    assert scores["forgetting"] == pytest.approx(15.0) and "note" not in scores


def test_matrix_json_object_ragged_rows_counts_kind(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"matrix": [[80], [85, 70]], "counts": [100, 200], "kind": "cil"}))
    matrix, counts, kind = matrix_io.load_matrix(path)
    assert np.isnan(matrix[0, 1]) and counts == [100, 200] and kind == "cil"
    assert matrix_io.score_matrix(path)["A_last"] == pytest.approx((85 * 100 + 70 * 200) / 300)


def test_matrix_csv_with_and_without_header(tmp_path):
    plain = tmp_path / "plain.csv"
    plain.write_text("80,,\n85,70,nan\n60,65,50\n")
    labelled = tmp_path / "labelled.csv"
    labelled.write_text("# kind: cil\n# counts: 100, 200, 300\n,t1,t2,t3\nafter t1,80,,\nafter t2,85,70,\n"
                        "after t3,60,65,50\n")
    a, counts_a, _ = matrix_io.load_matrix(plain)
    b, counts_b, kind_b = matrix_io.load_matrix(labelled)
    np.testing.assert_array_equal(a, b)
    assert np.isnan(a[0, 1]) and a[2, 2] == 50 and counts_a is None
    assert counts_b == [100, 200, 300] and kind_b == "cil"
    tabbed = tmp_path / "tabbed.tsv"
    tabbed.write_text("80\t\t\n85\t70\t\n60\t65\t50\n")
    np.testing.assert_array_equal(matrix_io.load_matrix(tabbed)[0], a)
    # pandas' to_csv: task numbers as header, with and without the index column
    indexed = tmp_path / "indexed.csv"
    indexed.write_text(",0,1,2\n0,80.0,,\n1,85.0,70.0,\n2,60.0,65.0,50.0\n")
    np.testing.assert_array_equal(matrix_io.load_matrix(indexed)[0], a)
    numbered = tmp_path / "numbered.csv"
    numbered.write_text("1,2,3\n80.0,,\n85.0,70.0,\n60.0,65.0,50.0\n")
    np.testing.assert_array_equal(matrix_io.load_matrix(numbered)[0], a)


def test_matrix_from_run_record(tmp_path):
    record = make_record("zscl", "mtil", "order-I", 1993, {}, kind="mtil")
    record["accuracy_matrix"] = [[0.5, 0.4], [0.3, 0.9]]  # a record says percent: no fraction guessing
    path = tmp_path / "run.json"
    path.write_text(json.dumps(record))
    found = matrix_io.read_matrix(path)
    assert found.kind == "mtil" and found.counts == [10, 10] and found.source_format == "record"
    assert not found.converted_from_fractions and found.matrix[1, 1] == 0.9
    scores = matrix_io.score_matrix(path)
    assert scores["kind"] == "mtil" and scores["transfer"] == pytest.approx(0.4)
    assert matrix_io.score_matrix(path, kind="cil")["kind"] == "cil"  # the argument wins


def test_matrix_fractions_become_percent_unless_the_file_says(tmp_path):
    path = tmp_path / "frac.json"
    path.write_text("[[0.8, null], [0.75, 0.5]]")
    found = matrix_io.read_matrix(path)
    assert found.converted_from_fractions
    np.testing.assert_allclose(found.matrix[1], [75.0, 50.0])
    scores = matrix_io.score_matrix(path)
    assert scores["A_last"] == pytest.approx(62.5) and "fractions" in scores["note"]
    said = tmp_path / "said.json"
    said.write_text(json.dumps({"matrix": [[0.8, None], [0.75, 0.5]], "unit": "percent"}))
    assert matrix_io.load_matrix(said)[0][1, 1] == 0.5
    csv_said = tmp_path / "said.csv"
    csv_said.write_text("# unit: percent\n0.8,\n0.75,0.5\n")
    assert matrix_io.load_matrix(csv_said)[0][1, 1] == 0.5
    assert matrix_io.load_matrix(path, unit="percent")[0][1, 1] == 0.5
    mixed = tmp_path / "mixed.csv"
    mixed.write_text("1.0,\n0.5,80\n")  # one value above 1: percent
    assert matrix_io.load_matrix(mixed)[0][1, 1] == 80


@pytest.mark.parametrize("name, text, message", [
    ("bad.json", "[[80, 70", "not valid JSON"),
    ("word.csv", "80,,\n85,seventy\n", "'seventy' is not an accuracy"),
    ("big.json", "[[80, null], [85, 170]]", "outside 0..100"),
    ("frac.json", '{"matrix": [[0.8]], "unit": "fraction", "counts": [1, 2]}', "2 test counts for a matrix of 1"),
    ("empty.csv", "\n\n", "no accuracy matrix"),
    ("blank.json", "[[null, null]]", "no values"),
    ("obj.json", '{"rows": [[1]]}', "has no 'matrix'"),
    ("kind.json", '{"matrix": [[80]], "kind": "dil"}', "unknown kind 'dil'"),
    ("newer.json", '{"schema_version": 99, "accuracy_matrix": [[80]]}', "newer than this cilbench"),
    ("unit.csv", "# unit: permille\n80\n", "unknown unit 'permille'"),
    ("over.json", '{"matrix": [[80]], "unit": "fraction"}', "value 80 lies outside 0..1 (fraction)"),
])
def test_matrix_bad_files(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(CilbenchError) as err:
        matrix_io.score_matrix(path)
    assert message in one_line(err)


def test_score_matrix_reports_metric_errors_as_one_line(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("80,70\n60\n")  # row 1 lacks task 1
    with pytest.raises(CilbenchError) as err:
        matrix_io.score_matrix(path)
    assert "row 1 lacks an accuracy" in one_line(err)
    with pytest.raises(CilbenchError, match="no such file"):
        matrix_io.load_matrix(tmp_path / "absent.json")


# --------------------------------------------------------------------------------------------- references


def test_seeded_store_loads_and_holds_the_cicae_numbers():
    refs = references.load_references()
    cicae = refs[(refs["method"] == "cicae") & (refs["dataset"] == "imagenet-a")]
    assert dict(zip(cicae["metric"], cicae["value"])) == {"A_last": 65.57, "A_avg": 72.43}
    best = refs[refs["paper_label"] == "previous best"]
    assert sorted(best["value"]) == [63.08, 70.99] and (best["method"] == "").all()
    vtab = refs[refs["dataset"] == "vtab"].set_index("paper_label")["value"]
    assert vtab["CICAE"] == 95.02 and vtab["CICAE (single expert)"] == 94.76
    assert (refs["notes"] != "").all()


def test_references_folder_from_environment(tmp_path, monkeypatch):
    (tmp_path / "x.csv").write_text(REFS)
    monkeypatch.setenv("CILBENCH_REFERENCES", str(tmp_path))
    refs = references.load_references()
    assert len(refs) == 7 and refs["value"].dtype == float and refs["source"].iloc[0] == "x.csv:2"


@pytest.mark.parametrize("files, message", [
    ({"a.csv": HEADER.replace(",metric", "") + "p,1,m,M,d,B0Inc10,1.0,b,\n"}, "a.csv: missing column 'metric'"),
    ({"a.csv": HEADER + "p,1,m,M,d,B0Inc10,A_avg,about 70,b,\n"}, "a.csv:2: value 'about 70' is not a number"),
    ({"a.csv": HEADER + "p,1,m,M,d,B0Inc10,a_avg,70,b,\n"}, "did you mean 'A_avg'"),
    ({"a.csv": HEADER + "p,1,m,,d,B0Inc10,A_avg,70,b,\n"}, "a.csv:2: empty 'paper_label'"),
    ({"a.csv": HEADER.strip() + ",extra\n" + "p,1,m,M,d,B0Inc10,A_avg,70,b,,x\n"}, "unknown column 'extra'"),
    ({"a.csv": HEADER + "p,1,m,M,d,B0Inc10,A_avg,70,b,\n",
      "b.csv": HEADER + "q,1,m,M,d,B0Inc10,A_avg,71,b,\np,1,,M,d,B0Inc10,A_avg,72,b,other method\n"},
     "duplicate paper reference"),
])
def test_references_validation(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(CilbenchError) as err:
        references.load_references(tmp_path)
    assert message in one_line(err)
    if "duplicate" in message:
        assert "a.csv:2 and b.csv:3" in str(err.value)


def test_references_missing_folder(tmp_path):
    with pytest.raises(CilbenchError, match="no paper reference folder"):
        references.load_references(tmp_path / "absent")


# --------------------------------------------------------------------------------------------- tables


def test_collect_and_aggregate(results):
    runs = tables.collect(results)
    assert len(runs) == 10 and set(runs["profile"]) == {"full", "quick"}
    groups = tables.aggregate(runs).set_index(["method", "dataset", "profile"])
    ease = groups.loc[("ease", "cifar100", "full")]
    assert ease["n"] == 2 and ease["seeds"] == (1993, 1994) and ease["kind"] == "cil"
    assert ease["A_avg_mean"] == 92.0 and ease["A_avg_std"] == pytest.approx(math.sqrt(2))
    quick = groups.loc[("simplecil", "cifar100", "quick")]
    assert quick["n"] == 1 and quick["A_avg_std"] == 0.0
    zscl = groups.loc[("zscl", "mtil", "full")]
    assert zscl["kind"] == "mtil" and zscl["transfer_mean"] == 68.5 and math.isnan(zscl["A_avg_mean"])


def test_aggregate_counts_the_latest_record_of_a_seed_once(tmp_path):
    folder = tmp_path / "r"
    folder.mkdir()
    old = make_record("ease", "cifar100", "B0Inc10", 1, cil(10.0, 10.0), finished_at="2025-01-01T00:00:00")
    new = make_record("ease", "cifar100", "B0Inc10", 1, cil(90.0, 80.0), finished_at="2025-02-01T00:00:00")
    (folder / "b.json").write_text(json.dumps(old))
    (folder / "a.json").write_text(json.dumps(new))
    group = tables.aggregate(tables.collect(folder)).iloc[0]
    assert group["n"] == 1 and group["A_avg_mean"] == 90.0


def test_collect_computes_missing_metrics_from_the_matrix(tmp_path):
    record = make_record("ease", "cifar100", "B0Inc10", 1, {})
    record["accuracy_matrix"], record["test_counts"] = [[80.0, None], [85.0, 70.0]], [100, 200]
    (tmp_path / "r.json").write_text(json.dumps(record))
    run = tables.collect(tmp_path).iloc[0]
    assert run["A_avg"] == pytest.approx((80 + 75) / 2) and run["A_last"] == pytest.approx(75.0)


MARKDOWN = """\
| method | cifar100 B0Inc10 A_avg | cifar100 B0Inc10 A_last | imagenet-a B0Inc20 A_avg | imagenet-a B0Inc20 A_last \
| mtil order-I Transfer | mtil order-I Average | mtil order-I Last |
|:--|--:|--:|--:|--:|--:|--:|--:|
| ease | 92.00 ± 1.41 | 86.00 ± 0.00 | 65.50 ± 0.71 | 55.00 ± 0.35 | - | - | - |
| simplecil | 87.50 ± 0.71 | 81.50 ± 0.71 | 60.50 ± 0.71 | 49.00 ± 0.71 | - | - | - |
| simplecil [quick] | 70.00 | 60.00 | - | - | - | - | - |
| zscl | - | - | - | - | 68.50 | 75.25 | 83.00 |

- [quick]: quick-profile smoke runs, never compared with paper numbers
"""

MARKDOWN_WITH_PAPER = """\
| method | cifar100 B0Inc10 A_avg | cifar100 B0Inc10 A_last | imagenet-a B0Inc20 A_avg | imagenet-a B0Inc20 A_last \
| mtil order-I Transfer | mtil order-I Average | mtil order-I Last |
|:--|--:|--:|--:|--:|--:|--:|--:|
| ease | 92.00 ± 1.41 (paper 92.35, -0.35) | 86.00 ± 0.00 (paper 87.76, -1.76) | 65.50 ± 0.71 | 55.00 ± 0.35 \
| - | - | - |
| simplecil | 87.50 ± 0.71 (paper 87.57, -0.07) | 81.50 ± 0.71 | 60.50 ± 0.71 | 49.00 ± 0.71 (paper 48.91, +0.09) \
| - | - | - |
| simplecil [quick] | 70.00 | 60.00 | - | - | - | - | - |
| zscl | - | - | - | - | 68.50 (paper 68.10, +0.40) | 75.25 | 83.00 |

- [quick]: quick-profile smoke runs, never compared with paper numbers
"""

CSV = """\
method,cifar100 B0Inc10 A_avg,cifar100 B0Inc10 A_last,imagenet-a B0Inc20 A_avg,imagenet-a B0Inc20 A_last,\
mtil order-I Transfer,mtil order-I Average,mtil order-I Last
ease,92.00 ± 1.41,86.00 ± 0.00,65.50 ± 0.71,55.00 ± 0.35,-,-,-
simplecil,87.50 ± 0.71,81.50 ± 0.71,60.50 ± 0.71,49.00 ± 0.71,-,-,-
simplecil [quick],70.00,60.00,-,-,-,-,-
zscl,-,-,-,-,68.50,75.25,83.00
"""


def test_table_markdown_and_csv_snapshots(results):
    table = tables.build_table(results)
    assert tables.render(table, "markdown") == MARKDOWN
    assert tables.render(table, "csv") == CSV


def test_table_with_paper_numbers(results, refs):
    table = tables.build_table(results, refs)
    assert tables.render(table, "markdown") == MARKDOWN_WITH_PAPER
    lines = tables.render(table, "csv").splitlines()
    assert lines[0].startswith("method,cifar100 B0Inc10 A_avg,cifar100 B0Inc10 A_avg paper,"
                               "cifar100 B0Inc10 A_avg delta,cifar100 B0Inc10 A_last,")
    assert lines[1] == "ease,92.00 ± 1.41,92.35,-0.35,86.00 ± 0.00,87.76,-1.76,65.50 ± 0.71,,,55.00 ± 0.35,,," \
                       "-,,,-,,,-,,"
    assert lines[3] == "simplecil [quick],70.00,,,60.00,,,-,,,-,,,-,,,-,,,-,,"  # quick: never matched
    # the in1k reference is not matched to the in21k runs; the method-less row is never matched
    row = {r.label: i for i, r in enumerate(table.rows)}
    assert table.cells[row["ease"]][1]["A_avg"].paper is None
    assert table.cells[row["zscl"]][2]["transfer"].paper == 68.1


def test_table_latex(results, refs):
    latex = tables.render(tables.build_table(results, refs), "latex")
    assert latex.startswith("\\begin{tabular}{l rr rr rrr}\n\\toprule\n")
    assert "Method & \\multicolumn{2}{c}{cifar100 B0Inc10} & \\multicolumn{2}{c}{imagenet-a B0Inc20} & " \
           "\\multicolumn{3}{c}{mtil order-I} \\\\" in latex
    assert " & A\\_avg & A\\_last & A\\_avg & A\\_last & Transfer & Average & Last \\\\" in latex
    assert "ease & 92.00 $\\pm$ 1.41 (paper 92.35, -0.35) & 86.00 $\\pm$ 0.00 (paper 87.76, -1.76) & " \
           "65.50 $\\pm$ 0.71 & 55.00 $\\pm$ 0.35 & - & - & - \\\\" in latex
    assert "simplecil [quick] & 70.00 & 60.00 & - & - & - & - & - \\\\" in latex
    assert latex.endswith("\\bottomrule\n\\end{tabular}\n")


def test_table_rich_and_unknown_format(results):
    from rich.console import Console
    from rich.table import Table

    rendered = tables.render(tables.build_table(results), "rich")
    assert isinstance(rendered, Table)
    console = Console(width=250, record=True, file=io.StringIO())
    console.print(rendered)
    text = console.export_text()
    assert "simplecil [quick]" in text and "92.00 ± 1.41" in text and "[quick]: quick-profile" in text
    with pytest.raises(CilbenchError, match="unknown table format 'html'"):
        tables.render(tables.build_table(results), "html")


def test_table_explicit_rows_and_columns(results, refs):
    table = tables.build_table(results, refs, rows=["simplecil", tables.RowSpec("l2p", backbone=BACKBONE), "ease"],
                               columns=[tables.ColumnSpec("imagenet-a", "B0Inc20", metrics=("A_last",), label="IN-A"),
                                        tables.ColumnSpec("cifar100", "B0Inc10", label="CIFAR")])
    assert tables.render(table, "csv") == (
        "method,IN-A A_last,IN-A A_last paper,IN-A A_last delta,CIFAR A_avg,CIFAR A_avg paper,CIFAR A_avg delta,"
        "CIFAR A_last,CIFAR A_last paper,CIFAR A_last delta\n"
        "simplecil,49.00 ± 0.71,48.91,+0.09,87.50 ± 0.71,87.57,-0.07,81.50 ± 0.71,,\n"
        "simplecil [quick],-,,,70.00,,,60.00,,\n"
        "l2p,-,,,-,,,-,,\n"
        "ease,55.00 ± 0.35,,,92.00 ± 1.41,92.35,-0.35,86.00 ± 0.00,87.76,-1.76\n")
    full_only = tables.build_table(results, rows=[tables.RowSpec("simplecil", profile="full", label="SimpleCIL")])
    assert [r.label for r in full_only.rows] == ["SimpleCIL"]


def test_table_names_backbones_only_where_a_method_has_several(tmp_path):
    folder = tmp_path / "r"
    folder.mkdir()
    for i, backbone in enumerate(("vit-b16-in21k", "vit-b16-in1k")):
        (folder / f"{i}.json").write_text(json.dumps(make_record("ease", "cub", "B0Inc10", 1, cil(90, 80),
                                                                 backbone=backbone)))
    (folder / "2.json").write_text(json.dumps(make_record("simplecil", "cub", "B0Inc10", 1, cil(90, 80))))
    labels = [r.label for r in tables.build_table(folder).rows]
    assert labels == ["ease (vit-b16-in1k)", "ease (vit-b16-in21k)", "simplecil"]


def test_table_notes_differing_paper_numbers(results, tmp_path):
    folder = tmp_path / "two-papers"
    folder.mkdir()
    (folder / "a.csv").write_text(HEADER + "ease,1,ease,EASE,cifar100,B0Inc10,A_avg,91.0,,\n")
    (folder / "b.csv").write_text(HEADER + "mos,1,ease,EASE,cifar100,B0Inc10,A_avg,91.5,,\n")
    table = tables.build_table(results, references.load_references(folder))
    assert table.cells[0][0]["A_avg"].paper == 91.0
    assert "ease cifar100 B0Inc10 A_avg: paper numbers differ (a.csv:2 91.00, b.csv:2 91.50); showing a.csv:2" \
        in table.notes


def test_table_without_runs(tmp_path):
    with pytest.raises(CilbenchError, match="no complete run records"):
        tables.build_table(tmp_path)
    with pytest.raises(CilbenchError, match="no results folder"):
        tables.build_table(tmp_path / "absent")


# --------------------------------------------------------------------------------------------- check


def test_check_against_results_folder(results, tmp_path):
    baseline = write_results(tmp_path / "baseline", shift=1.0)  # the baseline is 1 point better everywhere
    strict = check_mod.check(results, baseline, tolerance=0.5)
    assert strict.regressed and strict.compared == 8 + 2 + 3  # 4 cil groups x 2, quick x 2, mtil x 3
    ease = next(r for r in strict.rows if r.group == "ease cifar100 B0Inc10 vit-b16-in21k" and r.metric == "A_avg")
    assert (ease.ours, ease.reference, ease.delta, ease.status) == (92.0, 93.0, -1.0, "regressed")
    assert {r.status for r in strict.rows if r.group.startswith("zscl")} == {"ok"}  # the shift spares extra runs
    loose = check_mod.check(results, baseline, tolerance=1.0)  # exactly at the tolerance: not a regression
    assert not loose.regressed and loose.compared == 13
    assert check_mod.check(results, str(baseline), tolerance=1.0).compared == 13  # a string path works too
    assert "13 compared" in loose.summary() and "0 regressed" in loose.summary()


def test_check_lists_groups_missing_on_either_side(results, tmp_path):
    baseline = write_results(tmp_path / "baseline", extra=False)
    (baseline / "x.json").write_text(json.dumps(make_record("l2p", "cub", "B0Inc10", 1, cil(70.0, 60.0))))
    result = check_mod.check(results, baseline, tolerance=0.0)
    statuses = {(r.group, r.metric): r.status for r in result.rows}
    assert statuses[("zscl mtil order-I clip-vit-b16", "transfer")] == "missing-reference"
    assert statuses[("simplecil cifar100 B0Inc10 vit-b16-in21k [quick]", "A_avg")] == "missing-reference"
    assert statuses[("l2p cub B0Inc10 vit-b16-in21k", "A_last")] == "missing-run"
    assert not result.regressed and result.compared == 8


def test_check_against_paper(results, refs):
    result = check_mod.check(results, "paper", tolerance=1.0, references=refs)
    rows = {(r.group, r.metric): r for r in result.rows}
    last = rows[("ease cifar100 B0Inc10 vit-b16-in21k", "A_last")]
    assert last.status == "regressed" and last.reference == 87.76 and last.delta == pytest.approx(-1.76)
    assert rows[("ease cifar100 B0Inc10 vit-b16-in21k", "A_avg")].status == "ok"  # -0.35
    assert rows[("ease imagenet-a B0Inc20 vit-b16-in21k", "A_avg")].status == "missing-reference"  # in1k ref
    quick = rows[("simplecil cifar100 B0Inc10 vit-b16-in21k [quick]", "A_avg")]
    assert quick.status == "missing-reference" and "quick" in quick.note
    assert result.regressed and result.compared == 5
    assert not check_mod.check(results, "paper", tolerance=2.0, references=refs).regressed


def test_check_against_the_paper_store_and_nothing_compared(results, tmp_path, monkeypatch):
    monkeypatch.setenv("CILBENCH_REFERENCES", str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    result = check_mod.check(results, "paper", tolerance=0.5)
    assert result.compared == 0 and not result.regressed and result.rows
    assert result.summary().startswith("nothing compared against paper")
    with pytest.raises(CilbenchError, match="tolerance"):
        check_mod.check(results, "paper", tolerance=-1.0)


def test_check_render(results, refs):
    from rich.table import Table

    assert isinstance(check_mod.render_check(check_mod.check(results, "paper", 1.0, references=refs)), Table)
