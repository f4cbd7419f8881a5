"""``cilbench plot scaling``: a suite's A_last against the number of tasks, one line per row, one panel per dataset,
read through the suite's table (the runs the sweep makes for each row)."""

from __future__ import annotations

import json

import pytest

from cilbench.errors import CilbenchError
from cilbench.results.plots import scaling_series
from cilbench.suites import load_suite
from tests.test_results import cil, make_record

SUITE = """title: "Scaling demo"
paper: demo
table: "S"
metrics: [A_last]
columns:
  - {dataset: cifar100, scenario: B0Inc10, label: CIFAR 10 tasks}
  - {dataset: cifar100, scenario: B0Inc5, label: CIFAR 20 tasks}
  - {dataset: cifar100, scenario: B0Inc2, label: CIFAR 50 tasks}
  - {dataset: cub, scenario: B0Inc20, label: CUB 10 tasks}
  - {dataset: cub, scenario: B0Inc4, label: CUB 50 tasks}
rows:
  - {label: SimpleCIL, method: simplecil}
  - {label: EASE, method: ease}
  - {label: L2P}
"""

RUNS = [("simplecil", "cifar100", "B0Inc10", 1993, 80.0), ("simplecil", "cifar100", "B0Inc10", 1994, 82.0),
        ("simplecil", "cifar100", "B0Inc5", 1993, 78.0), ("simplecil", "cifar100", "B0Inc2", 1993, 75.5),
        ("ease", "cifar100", "B0Inc10", 1993, 86.0), ("ease", "cifar100", "B0Inc2", 1993, 84.0),
        ("simplecil", "cub", "B0Inc4", 1993, 60.0)]


@pytest.fixture
def scaling(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    for i, (method, dataset, scenario, seed, a_last) in enumerate(RUNS):
        rec = make_record(method, dataset, scenario, seed, cil(a_last + 5, a_last))
        (results / f"r{i}.json").write_text(json.dumps(rec))
    path = tmp_path / "scaling.yaml"
    path.write_text(SUITE)
    return load_suite(str(path)), results


def test_each_row_is_a_line_of_a_last_against_the_number_of_tasks(scaling):
    suite, results = scaling
    panels = scaling_series(suite, results)
    assert list(panels) == ["cifar100", "cub"]
    assert panels["cifar100"][0] == [10, 20, 50] and panels["cub"][0] == [10, 50]  # every column's task count
    cifar = {s.label: s for s in panels["cifar100"][1]}
    assert set(cifar) == {"SimpleCIL", "EASE"}  # L2P has no method, so no runs: no line
    assert cifar["SimpleCIL"].tasks.tolist() == [10, 20, 50]
    assert cifar["SimpleCIL"].mean.tolist() == [81.0, 78.0, 75.5]  # the mean over the seeds of B0Inc10
    assert cifar["SimpleCIL"].std is None and cifar["SimpleCIL"].seeds == 1  # one seed where the line has one
    assert cifar["EASE"].tasks.tolist() == [10, 50] and cifar["EASE"].mean.tolist() == [86.0, 84.0]
    [cub] = panels["cub"][1]
    assert (cub.label, cub.tasks.tolist(), cub.mean.tolist()) == ("SimpleCIL", [50], [60.0])  # 200 classes / 4


def test_plot_scaling_writes_a_png_and_fails_in_one_line(cli, scaling, tmp_path):
    suite, results = scaling
    out = tmp_path / "s.png"
    res = cli("plot", "scaling", "--benchmark", str(suite.path), "--results", str(results), "-o", str(out))
    assert res.code == 0, res.err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = cli("plot", "scaling", "--results", str(results), "-o", str(out))
    assert res.code == 2 and res.err.strip() == "error: plot scaling needs --benchmark SUITE (e.g. ham-scaling)"
    res = cli("plot", "scaling", "--benchmark", str(suite.path), "--results", str(results), "--quick", "-o",
              str(out))
    assert res.code == 2 and "no quick runs of scaling" in res.err and len(res.err.strip().splitlines()) == 1
    with pytest.raises(CilbenchError, match="MTIL column"):
        mtil = load_suite("zscl-orderI")
        scaling_series(mtil, results)
