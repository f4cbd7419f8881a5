"""Result readers that can be trusted: configurations are never averaged together or matched to the wrong numbers,
and every file that is not a readable run record is one warning line (and fails ``check`` unless allowed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cilbench.identity import config_key, expected_config_key
from cilbench.results import check as check_mod
from cilbench.results import references, tables
from cilbench.results.record import SCHEMA_VERSION, iter_records, load_record
from cilbench.suites import load_suite
from tests.test_results import HEADER, cil, make_record

ABLATION = {"lambda1": 0.0, "lambda2": 0.0}


def v2(method: str, dataset: str, scenario: str, seed: int, scores: dict, overrides: dict | None = None,
       weights_sha256: str | None = None, **kw) -> dict:
    """A schema-2 record as the runner writes it: config_key names the overrides and the weights file."""
    record = make_record(method, dataset, scenario, seed, scores, **kw)
    record.update(schema_version=SCHEMA_VERSION, overrides=overrides or {},
                  config_key=config_key(overrides or {}, weights_sha256), data={})
    record["run"] = {"weights_sha256": weights_sha256}
    return record


def write(folder: Path, records: dict[str, dict | str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, record in records.items():
        (folder / name).write_text(record if isinstance(record, str) else json.dumps(record))
    return folder


@pytest.fixture
def refs(tmp_path: Path):
    folder = write(tmp_path / "refs", {})
    (folder / "p.csv").write_text(HEADER + "p,1,cicae,CICAE,imagenet-a,B0Inc20,A_avg,72.43,vit-b16-in21k,\n"
                                           "p,1,cicae,CICAE,imagenet-a,B0Inc20,A_last,65.57,vit-b16-in21k,\n")
    return references.load_references(folder)


# --------------------------------------------------------------------------------------------- configurations


def test_two_configurations_of_one_seed_are_two_rows_never_averaged(tmp_path, refs):
    folder = write(tmp_path / "r", {
        "default.json": v2("cicae", "imagenet-a", "B0Inc20", 1993, cil(72.0, 65.0)),
        "ablation.json": v2("cicae", "imagenet-a", "B0Inc20", 1993, cil(60.0, 50.0), ABLATION,
                            finished_at="2025-03-01T00:00:00"),  # later: it must not replace the default run
    })
    table = tables.build_table(folder, refs)
    rows = {r.label: i for i, r in enumerate(table.rows)}
    assert list(rows) == ["cicae", "cicae [lambda1=0, lambda2=0]"]
    default, ablation = table.cells[rows["cicae"]][0], table.cells[rows["cicae [lambda1=0, lambda2=0]"]][0]
    assert (default["A_avg"].mean, default["A_avg"].n, default["A_avg"].paper) == (72.0, 1, 72.43)
    assert (ablation["A_avg"].mean, ablation["A_avg"].n) == (60.0, 1)
    assert ablation["A_avg"].paper is None and ablation["A_last"].paper is None  # not the paper's settings
    markdown = tables.render(table, "markdown")
    assert "| cicae [lambda1=0, lambda2=0] | 60.00 | 50.00 |" in markdown and "±" not in markdown
    assert "never averaged with others nor compared with paper numbers" in markdown


def test_a_weights_file_and_a_schema_1_override_are_configurations_of_their_own(tmp_path):
    old = make_record("ease", "cub", "B0Inc10", 1, cil(50.0, 40.0))  # schema 1: --set in config_sources
    old["config_sources"] = {"set": {"lr": "0.5"}}
    folder = write(tmp_path / "r", {
        "a.json": v2("ease", "cub", "B0Inc10", 1, cil(90.0, 80.0)),
        "b.json": v2("ease", "cub", "B0Inc10", 1, cil(70.0, 60.0), weights_sha256="ab12cd34" + "0" * 56),
        "c.json": old,
    })
    groups = tables.aggregate(tables.collect(folder))
    assert len(groups) == 3 and (groups["n"] == 1).all()
    labels = [r.label for r in tables.build_table(folder).rows]
    assert labels == ["ease", "ease [lr=0.5]", "ease [weights=ab12cd34]"]


def test_suite_rows_hold_exactly_their_configurations_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("CILBENCH_REFERENCES", str(tmp_path / "refs"))
    write(tmp_path / "refs", {"cicae.csv": HEADER + (
        "cicae,IV,cicae,baseline,imagenet-a,B0Inc20,A_last,60.0,vit-b16-in21k,\n"
        "cicae,IV,cicae,full model,imagenet-a,B0Inc20,A_last,65.57,vit-b16-in21k,\n")})
    suite_file = tmp_path / "ablation.yaml"
    suite_file.write_text("""title: ablation
paper: cicae
table: IV
backbone: vit-b16-in21k
columns:
  - {dataset: imagenet-a, scenario: B0Inc20, label: IN-A, metrics: [A_last]}
rows:
  - {label: baseline, method: cicae, sets: {lambda1: 0, lambda2: 0}}
  - {label: full model, method: cicae}
""")
    suite = load_suite(str(suite_file))
    key = expected_config_key("cicae", "imagenet-a", False, {"lambda1": "0", "lambda2": "0"})
    assert key and key == config_key(ABLATION)  # the key the runner writes for these --set values
    results = write(tmp_path / "results", {
        "default.json": v2("cicae", "imagenet-a", "B0Inc20", 1993, cil(72.0, 65.0)),
        "baseline.json": v2("cicae", "imagenet-a", "B0Inc20", 1993, cil(66.0, 59.0), ABLATION),
        "other.json": v2("cicae", "imagenet-a", "B0Inc20", 1993, cil(10.0, 10.0), {"lambda1": 5.0}),
    })
    [table] = tables.suite_table(suite, results, references.load_references())
    cells = {r.label: table.cells[i][0]["A_last"] for i, r in enumerate(table.rows)}
    assert (cells["baseline"].mean, cells["baseline"].paper) == (59.0, 60.0)
    assert (cells["full model"].mean, cells["full model"].paper) == (65.0, 65.57)
    assert "baseline: our runs of cicae with lambda1=0, lambda2=0" in table.notes


def test_suite_row_with_unknown_setting_shows_no_runs_and_says_why(tmp_path):
    suite_file = tmp_path / "bad.yaml"
    suite_file.write_text("""title: bad
paper: cicae
table: IV
columns:
  - {dataset: imagenet-a, scenario: B0Inc20}
rows:
  - {label: typo, method: cicae, sets: {lamda1: 0}}
""")
    results = write(tmp_path / "r", {"a.json": v2("cicae", "imagenet-a", "B0Inc20", 1993, cil(72.0, 65.0),
                                                  backbone="vit-b16-in21k")})
    [table] = tables.suite_table(load_suite(str(suite_file)), results, None)
    assert table.cells[0][0]["A_avg"].mean is None
    assert any(n.startswith("typo: no runs shown") and "lamda1" in n for n in table.notes)


def test_check_compares_a_configuration_only_with_itself(tmp_path, refs):
    ours = write(tmp_path / "ours", {
        "d.json": v2("cicae", "imagenet-a", "B0Inc20", 1993, cil(72.0, 65.0)),
        "a.json": v2("cicae", "imagenet-a", "B0Inc20", 1993, cil(40.0, 30.0), ABLATION),
    })
    theirs = write(tmp_path / "theirs", {"d.json": v2("cicae", "imagenet-a", "B0Inc20", 1993, cil(72.0, 65.0))})
    result = check_mod.check(ours, theirs, tolerance=0.5)
    status = {(r.group, r.metric): r.status for r in result.rows}
    assert status[("cicae imagenet-a B0Inc20 vit-b16-in21k", "A_avg")] == "ok"
    assert status[("cicae imagenet-a B0Inc20 vit-b16-in21k [lambda1=0, lambda2=0]", "A_avg")] == "missing-reference"
    assert not result.failed
    paper = check_mod.check(ours, "paper", tolerance=1.0, references=refs)
    ablation = [r for r in paper.rows if "lambda1=0" in r.group]
    assert ablation and all(r.status == "missing-reference" and r.reference is None for r in ablation)
    assert not paper.regressed  # 40 against the paper's 72.43 would be a regression if it were compared


# --------------------------------------------------------------------------------------------- damaged files

GOOD = v2("ease", "cub", "B0Inc10", 1, cil(90.0, 80.0))
DAMAGED = {
    "truncated.json": (json.dumps(GOOD)[:57], "truncated JSON"),
    "list.json": ("[1, 2, 3]", "a JSON list, not a run record"),
    "seed.json": (json.dumps({**GOOD, "seed": "1"}), "'seed' is the string '1', not an integer"),
    "metrics.json": (json.dumps({**GOOD, "metrics": [90.0]}), "'metrics' is a list, not a mapping"),
    "ragged.json": (json.dumps({**GOOD, "accuracy_matrix": [[1.0, 2.0], [3.0]]}), "'accuracy_matrix' is ragged"),
    "newer.json": (json.dumps({**GOOD, "schema_version": SCHEMA_VERSION + 1}), "is newer than this cilbench"),
    "version.json": (json.dumps({**GOOD, "schema_version": "2"}), "schema_version is the string '2'"),
    "metric.json": (json.dumps({**GOOD, "metrics": {"A_avg": "high"}}), "metric 'A_avg' is the string 'high'"),
    "empty.json": ("", "empty file"),
}


@pytest.mark.parametrize("name", sorted(DAMAGED))
def test_damaged_records_are_one_warning_line_and_fail_check_unless_allowed(cli, tmp_path, name):
    text, reason = DAMAGED[name]
    results = write(tmp_path / "results", {"good.json": GOOD, name: text})
    reference = write(tmp_path / "reference", {"good.json": GOOD})
    table = cli("table", "--results", results, "--format", "csv", "--no-paper")
    assert table.code == 0 and "Traceback" not in table.err
    warnings = table.err.strip().splitlines()
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: skipped {results / name}: ")
    assert reason in warnings[0]
    assert "ease,90.00,80.00" in table.out  # the good record is still read
    check = cli("check", "--results", results, "--against", reference)
    assert check.code == 1 and "Traceback" not in check.err
    assert f"warning: skipped {results / name}" in check.err
    assert "check failed: 1 damaged run record(s)" in check.err and "--allow-damaged" in check.err
    allowed = cli("check", "--results", results, "--against", reference, "--allow-damaged")
    assert allowed.code == 0 and f"warning: skipped {results / name}" in allowed.err
    assert "1 damaged record(s) skipped" in allowed.out


def test_a_damaged_reference_record_fails_check_too(cli, tmp_path):
    results = write(tmp_path / "results", {"good.json": GOOD})
    reference = write(tmp_path / "reference", {"good.json": GOOD, "cut.json": json.dumps(GOOD)[:-2]})
    r = cli("check", "--results", results, "--against", reference)
    assert r.code == 1 and f"skipped {reference / 'cut.json'}: truncated JSON" in r.err


def test_foreign_json_is_a_warning_but_does_not_fail_check(cli, tmp_path):
    results = write(tmp_path / "results", {"good.json": GOOD, "notes.json": {"comment": "not a run"}})
    r = cli("check", "--results", results, "--against", write(tmp_path / "ref", {"good.json": GOOD}))
    assert r.code == 0
    assert f"warning: skipped {results / 'notes.json'}: not a cilbench run record (no schema_version)" in r.err


def test_iter_records_reports_each_skip_and_load_record_is_one_line(tmp_path):
    folder = write(tmp_path / "r", {"good.json": GOOD, **{n: t for n, (t, _) in DAMAGED.items()},
                                    "running.json": {**GOOD, "status": "running"}})
    (folder / ".checkpoints").mkdir()
    (folder / ".checkpoints" / "x.json").write_text("[")  # hidden: passed over silently
    skipped = []
    assert [p.name for p, _ in iter_records(folder, skipped.append)] == ["good.json"]
    assert sorted(s.path.name for s in skipped) == sorted([*DAMAGED, "running.json"])
    assert all(s.damaged and "\n" not in str(s) for s in skipped)
    from cilbench.errors import CilbenchError

    with pytest.raises(CilbenchError, match="not a readable run record: 'accuracy_matrix' is ragged"):
        load_record(folder / "ragged.json")


# --------------------------------------------------------------------------------------------- missing runs


def test_a_reference_run_missing_from_our_results_fails_check_unless_allowed(cli, tmp_path):
    results = write(tmp_path / "results", {"good.json": GOOD})
    reference = write(tmp_path / "reference", {
        "good.json": GOOD, "seed2.json": {**GOOD, "seed": 2},  # a seed we lack
        "l2p.json": v2("l2p", "cub", "B0Inc10", 1, cil(70.0, 60.0)),  # a group we lack
    })
    r = cli("check", "--results", results, "--against", reference)
    assert r.code == 1 and "check failed: 2 group(s) of the reference lack runs in our results" in r.err
    assert "--allow-missing" in r.err
    result = check_mod.check(results, reference, 1.0)
    missing = {(x.group, x.metric): x.note for x in result.rows if x.status == "missing-run"}
    assert missing[("ease cub B0Inc10 vit-b16-in21k", "seeds")] == "seed(s) 2 in the reference, not in our results"
    assert ("l2p cub B0Inc10 vit-b16-in21k", "A_avg") in missing
    assert cli("check", "--results", results, "--against", reference, "--allow-missing").code == 0


def test_check_of_a_folder_against_a_copy_of_itself_passes(cli, tmp_path):
    results = write(tmp_path / "results", {"good.json": GOOD, "a.json": v2("cicae", "imagenet-a", "B0Inc20", 1,
                                                                           cil(60.0, 50.0), ABLATION)})
    copy = tmp_path / "copy"
    shutil.copytree(results, copy)
    r = cli("check", "--results", results, "--against", copy)
    assert r.code == 0 and r.err == "" and "4 compared" in r.out
