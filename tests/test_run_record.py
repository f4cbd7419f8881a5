"""The typed run record: ``RunRecord.from_json`` validates, upgrades and defaults once; derived helpers by hand."""

from __future__ import annotations

import json

import pytest

from cilbench import metrics
from cilbench.errors import CilbenchError
from cilbench.results import matrix_io
from cilbench.results.record import SCHEMA_VERSION, RecordError, RunRecord, load_record, upgrade

# A schema-1 record with only what v1 required: every optional field is left to the defaults.
V1 = {"schema_version": 1, "status": "complete", "method": "simplecil", "dataset": "cifar100",
      "scenario": "B0Inc10", "seed": 1993, "comparable": False,
      "accuracy_matrix": [[80.0, None], [70.0, 60.0]], "test_counts": [100, 100]}


def test_v1_and_v2_give_the_same_typed_values_with_defaults():
    old = RunRecord.from_json(V1)
    new = RunRecord.from_json({**V1, "schema_version": SCHEMA_VERSION, "config_key": "", "overrides": {},
                               "data": {}})
    for rec in (old, new):
        assert rec.schema_version == SCHEMA_VERSION and rec.raw["schema_version"] == SCHEMA_VERSION
        assert (rec.method, rec.dataset, rec.scenario, rec.seed) == ("simplecil", "cifar100", "B0Inc10", 1993)
        assert rec.status == "complete" and rec.run_id == "" and rec.kind == "cil"
        assert rec.profile == "quick" and rec.comparable is False  # no profile: from comparable
        assert rec.backbone == "" and rec.config_key == "" and rec.config_label == "" and rec.overrides == {}
        assert rec.class_order_option == "" and rec.scenario_label == "B0Inc10"
        assert rec.increments == [] and rec.task_names == [] and rec.accuracy_per_task == []
        assert rec.metrics == {} and rec.views == {} and rec.method_origin == {} and rec.finished_at == ""
        assert rec.accuracy_matrix == [[80.0, None], [70.0, 60.0]] and rec.test_counts == [100, 100]
        assert rec.path is None
    assert {f: getattr(old, f) for f in old.__dataclass_fields__ if f != "raw"} == \
        {f: getattr(new, f) for f in new.__dataclass_fields__ if f != "raw"}
    assert RunRecord.upgrade is upgrade


def test_v1_overrides_get_a_key_and_label_of_their_own():
    rec = RunRecord.from_json({**V1, "config_sources": {"set": {"lambda1": 0.0}}, "run": {"weights": "/w/b.pt"}})
    assert rec.config_key.startswith("v1-") and rec.overrides == {"lambda1": 0.0}
    assert rec.config_label == "lambda1=0, weights=b.pt"


@pytest.mark.parametrize("change, reason", [
    ({"seed": "1993"}, "'seed' is the string '1993', not an integer"),
    ({"backbone": 3}, "'backbone' is an integer, not a string"),
    ({"status": ["complete"]}, "'status' is a list, not a string"),
    ({"views": []}, "'views' is a list, not a mapping"),
    ({"kind": "dil"}, "'kind' is the string 'dil', not cil or mtil"),
    ({"test_counts": [100, None]}, "'test_counts'[1] is null, not a number"),
    ({"metrics": {"A_last": "high"}}, "metric 'A_last' is the string 'high', not a number"),
    ({"schema_version": 99}, "newer than this cilbench"),
])
def test_a_wrong_field_type_is_a_one_line_record_error(change, reason):
    with pytest.raises(RecordError) as err:
        RunRecord.from_json({**V1, **change})
    assert reason in err.value.reason and "\n" not in err.value.reason and err.value.damaged


def test_foreign_json_is_an_undamaged_record_error():
    with pytest.raises(RecordError) as err:
        RunRecord.from_json({"comment": "notes"})
    assert not err.value.damaged and err.value.reason == "not a cilbench run record (no schema_version)"


def test_scenario_label_names_a_fixed_class_order():
    assert RunRecord.from_json({**V1, "class_order_option": "icarl"}).scenario_label == "B0Inc10-icarl"
    assert RunRecord.from_json({**V1, "class_order_option": None}).scenario_label == "B0Inc10"


def test_scores_are_the_records_metrics_else_the_matrix():
    stored = {"A_avg": 1.0, "A_last": 2.0, "forgetting": 3.0}
    assert RunRecord.from_json({**V1, "metrics": stored}).scores() == stored
    # no metrics: A_1 = 80, A_2 = (70*100 + 60*100) / 200 = 65; forgetting on task 1: 80 - 70 = 10
    scores = RunRecord.from_json(V1).scores()
    assert scores["A_last"] == pytest.approx(65.0) and scores["A_avg"] == pytest.approx(72.5)
    assert scores["forgetting"] == pytest.approx(10.0)
    assert scores == metrics.summary("cil", V1["accuracy_matrix"], V1["test_counts"])
    assert RunRecord.from_json({**V1, "accuracy_matrix": None}).scores() == {}
    mtil = {**V1, "kind": "mtil", "test_counts": None, "task_names": ["mtil/aircraft", "mtil/cars"]}
    with pytest.raises(ValueError, match="MTIL matrix needs every entry"):  # collect skips such a record
        RunRecord.from_json(mtil).scores()
    full = RunRecord.from_json({**mtil, "accuracy_matrix": [[80.0, 40.0], [70.0, 60.0]]})
    assert full.short_task_names == ["aircraft", "cars"]
    assert full.scores()["last"] == pytest.approx(65.0) and full.scores()["transfer"] == pytest.approx(40.0)


def test_load_record_and_score_read_a_run_record(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({**V1, "kind": "cil"}))
    rec = load_record(path)
    assert isinstance(rec, RunRecord) and rec.path == path
    assert matrix_io.score_matrix(path)["A_last"] == pytest.approx(65.0)
    path.write_text(json.dumps({**V1, "seed": None}))
    with pytest.raises(CilbenchError, match="not a readable run record: 'seed' is null, not an integer"):
        matrix_io.score_matrix(path)
