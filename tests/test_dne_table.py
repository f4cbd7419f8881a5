"""The DNE tables' columns beyond accuracy: D (a row's joint LA minus its LA, the joint part of the suite) and F (the
FLOPs of one forward of the final model, counted by the runner into the record), the ``--joint`` run option behind
the joint rows, the per-dataset backbones of the from-scratch methods (ImageNet100) and DER's first-task milestones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cilbench.errors import CilbenchError
from cilbench.plan import RunOptions, RunPlan
from cilbench.results.references import load_references
from cilbench.results.tables import render, suite_table
from cilbench.suites import load_suite, parse_suite
from tests.test_results import cil, make_record

SUITE = """title: "DNE Table 1 (part)"
paper: dne
table: "1"
metrics: [A_last, D, flops_g]
columns:
  - {dataset: cifar100, scenario: B50Inc10, class_order: cifar100-icarl, label: CIFAR100 Ns=10}
rows:
  - {label: Joint (Transf.), joint_row: Joint (Transf.)}
  - {label: Joint (ResNet18), method: der, joint: true, joint_row: Joint (ResNet18)}
  - {label: DER, method: der, joint_row: Joint (ResNet18)}
  - {label: Dytox, joint_row: Joint (Transf.)}
"""


def _record(scenario: str, a_last: float, flops: float) -> dict:
    rec = make_record("der", "cifar100", scenario, 1993, cil(70.0, a_last), backbone="resnet18-cifar")
    return {**rec, "class_order_option": "cifar100-icarl", "cost": {"flops_per_image": flops, "params": 11_200_000}}


def test_d_is_the_joint_rows_last_accuracy_minus_the_rows_and_f_comes_from_the_record(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "joint.json").write_text(json.dumps(_record("B50Inc10-joint", 80.25, 1.1108e9)))
    (results / "der.json").write_text(json.dumps(_record("B50Inc10", 63.5, 6.68e9)))
    path = tmp_path / "dne.yaml"
    path.write_text(SUITE)
    [table] = suite_table(load_suite(str(path)), results, load_references())
    cells = {row.label: line[0] for row, line in zip(table.rows, table.cells)}
    # the joint run is found under its own scenario name (B50Inc10-joint), never mixed with the incremental one
    assert cells["Joint (ResNet18)"]["A_last"].mean == pytest.approx(80.25)
    assert cells["DER"]["A_last"].mean == pytest.approx(63.5)
    assert cells["Joint (ResNet18)"]["D"].mean == pytest.approx(0.0)
    assert cells["DER"]["D"].mean == pytest.approx(80.25 - 63.5)
    assert cells["DER"]["flops_g"].mean == pytest.approx(6.68)
    assert cells["Joint (ResNet18)"]["flops_g"].mean == pytest.approx(1.1108)
    # the paper's D and F beside ours; rows without runs keep the paper's numbers and an empty D
    assert cells["DER"]["D"].paper == pytest.approx(16.63) and cells["DER"]["flops_g"].paper == pytest.approx(6.68)
    assert cells["Dytox"]["D"].mean is None and cells["Dytox"]["D"].paper == pytest.approx(12.06)
    text = render(table, "markdown")
    assert "| DER | 63.50 (paper 63.78, -0.28) | 16.75 (paper 16.63, +0.12) | 6.68 (paper 6.68, +0.00) |" in text
    assert "D = A_last of Joint (ResNet18) - A_last, same column: DER" in text
    assert "D = A_last of Joint (Transf.) - A_last, same column: Dytox" in text


@pytest.mark.parametrize("row, message", [
    ({"label": "A", "joint_row": "B"}, "joint_row 'B' is not among the suite's rows"),
    ({"label": "A", "joint": True}, "joint: true needs a method"),
    ({"label": "A", "method": "der", "joint": "yes"}, "joint must be true or false"),
])
def test_joint_rows_of_a_suite_are_checked_in_one_line(row, message):
    doc = {"paper": "dne", "table": "1", "columns": [{"dataset": "cifar100", "scenario": "B50Inc10"}], "rows": [row]}
    with pytest.raises(CilbenchError, match=message):
        parse_suite(doc, Path("x.yaml"))


def test_shipped_dne_suites_compare_each_row_with_the_joint_of_its_backbone_family():
    for name in ("dne-table1", "dne-table2"):
        suite = load_suite(name)
        joint = {r.label: r.joint_row for r in suite.rows}
        resnet, transformer = [r.label for r in suite.rows if r.label.startswith("Joint")][::-1]
        assert "ResNet18" in resnet and "Transf." in transformer
        for label in ("iCaRL", "PODNet", "DER", "FOSTER", resnet):
            assert joint[label] == resnet
        for label in ("Dytox", "DNE-1head", "DNE-2heads", "DNE-4heads", transformer):
            assert joint[label] == transformer


def test_joint_option_merges_the_tasks_under_a_scenario_of_its_own():
    plan = RunPlan.build(RunOptions(method="der", dataset="synthetic", scenario="B0Inc5", quick=True, joint=True))
    assert len(plan.scenario.tasks) == 1 and len(plan.scenario.tasks[0].classes) == 20
    assert plan.scenario.name == "B0Inc5-joint" and "B0Inc5-joint" in plan.record_name
    incremental = RunPlan.build(RunOptions(method="der", dataset="synthetic", scenario="B0Inc5", quick=True))
    assert len(incremental.scenario.tasks) == 4 and incremental.record_name != plan.record_name
    with pytest.raises(CilbenchError, match="already trains on every class at once; drop --joint"):
        RunPlan.build(RunOptions(method="joint", dataset="synthetic", quick=True, joint=True))
    with pytest.raises(CilbenchError, match="--joint merges the tasks of a class-incremental scenario"):
        RunPlan.build(RunOptions(method="zscl", dataset="mtil", quick=True, joint=True))


def test_a_joint_run_records_its_cost_one_forward_of_the_final_model(cli, tmp_path):
    from cilbench.engine.evaluator import count_flops
    from cilbench.models.backbones import build_backbone

    out = tmp_path / "r"
    result = cli("run", "der", "--dataset", "synthetic", "--scenario", "B0Inc5", "--quick", "--joint",
                 "--out", str(out))
    assert result.code == 0, result.output
    [path] = out.glob("*.json")
    record = json.loads(path.read_text())
    assert record["run"]["joint"] and record["run"]["merged_tasks"] and len(record["accuracy_matrix"]) == 1
    # the final DER of one task: its ResNet's forward plus the classifier over the 20 classes (2 per multiply-add)
    backbone = build_backbone("resnet-tiny", pretrained=False).eval()
    expected = count_flops(lambda: backbone(torch.zeros(1, 3, 16, 16))) + 2 * backbone.feature_dim * 20
    assert record["cost"]["flops_per_image"] == expected
    assert record["cost"]["params"] > sum(p.numel() for p in backbone.parameters())


def test_resnet18_cifar_and_the_scratch_vit_count_the_papers_f():
    """Torch's counter (2 x multiply-adds) gives the DNE paper's F of its single-network rows at 32 px: ResNet18
    1.12G (iCaRL, PODNet, FOSTER, Joint (ResNet18)), the 6-block ViT 1.38G (Joint (Transf.))."""
    from cilbench.engine.evaluator import count_flops
    from cilbench.models.backbones import build_backbone

    for name, paper in (("resnet18-cifar", 1.12), ("vit-scratch-cifar", 1.38)):
        backbone = build_backbone(name, pretrained=False).eval()
        with torch.no_grad():
            flops = count_flops(lambda: backbone(torch.zeros(1, 3, 32, 32)))
        assert flops / 1e9 == pytest.approx(paper, abs=0.015), name


@pytest.mark.parametrize("method, backbone", [("der", "resnet18"), ("icarl", "resnet18"), ("podnet", "resnet18"),
                                              ("dne", "vit-scratch-224")])
def test_from_scratch_methods_take_the_papers_imagenet100_backbone(method, backbone):
    plan = RunPlan.build(RunOptions(method=method, dataset="imagenet100"))
    assert plan.backbone == backbone
    assert RunPlan.build(RunOptions(method=method, dataset="cifar100")).backbone != backbone
    assert RunPlan.build(RunOptions(method=method, dataset="imagenet100", backbone="resnet18-cifar"
                                    if backbone == "resnet18" else "vit-scratch-cifar")).backbone != backbone


def test_der_first_task_decays_at_its_own_milestones():
    from cilbench.engine.trainer import main_phase
    from tests.test_der import _der

    method, scenario = _der(first_lr_milestones=(60, 120, 170))
    method.before_task(scenario.tasks[0])
    assert main_phase(method, scenario.tasks[0], None).lr_milestones == (60, 120, 170)
    method.before_task(scenario.tasks[1])
    assert main_phase(method, scenario.tasks[1], None).lr_milestones is None  # the config's (80, 120, 150)


@pytest.mark.parametrize("method, cifar, imagenet", [
    ("dne", "dne-cifar", "dne-imagenet"), ("dytox", "dne-cifar", "dne-imagenet"),
    ("der", "cifar-pycil", "imagenet-pycil"), ("foster", "cifar-pycil", "imagenet-pycil"),
    ("icarl", "cifar-pycil", "imagenet-pycil"), ("podnet", "cifar-pycil", "imagenet-pycil")])
def test_each_family_trains_with_its_own_pipeline(method, cifar, imagenet):
    """DNE / DyTox: timm's RandAugment pipeline; the ResNet baselines: PyCIL's, with its brightness jitter."""
    assert RunPlan.build(RunOptions(method=method, dataset="cifar100")).transform_preset == cifar
    assert RunPlan.build(RunOptions(method=method, dataset="imagenet100")).transform_preset == imagenet
    assert RunPlan.build(RunOptions(method=method, dataset="cifar100", quick=True)).transform_preset == "quick"


def test_a_tiny_cost_keeps_three_significant_digits_in_the_table():
    from cilbench.results.tables import Cell

    assert Cell(0.0075504, None, 1).text() == "0.00755"  # a smoke model's GFLOPs, not 0.01
    assert Cell(1.1108, None, 1).text() == "1.11" and Cell(0.0, None, 1).text() == "0.00"
    assert Cell(-0.012, 0.5, 2).text() == "-0.012 ± 0.50"


def _imagenet100_folder(root: Path, wnids: list[str]) -> Path:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from _hub_fixtures import image_folder

    return image_folder(root, {"train": {w: 1 for w in wnids}, "test": {w: 1 for w in wnids}}, size=(8, 8))


def test_imagenet100_from_a_folder_takes_the_class_list_in_its_order(cli, tmp_path):
    """A folder with the 100 ids and others (ImageNet-1k) keeps the 100, labelled in the list's order; a folder
    lacking one of them is refused in one line."""
    from cilbench.data.sources import class_list
    from cilbench.data.store import Store

    wnids = class_list("imagenet100_classes.txt")
    assert len(wnids) == 100 and wnids[0] == "n01440764" and wnids == sorted(wnids)  # label order = sorted ids
    good = _imagenet100_folder(tmp_path / "in1k", wnids + ["n00000001", "n99999999"])
    res = cli("datasets", "prepare", "imagenet100", "--source", str(good), "--cache-dir", str(tmp_path / "c"))
    assert res.code == 0, res.err
    store = Store.open(tmp_path / "c" / "imagenet100")
    assert list(store.class_names) == wnids
    other = _imagenet100_folder(tmp_path / "other", wnids[:99] + ["n99999999"])
    res = cli("datasets", "prepare", "imagenet100", "--source", str(other), "--cache-dir", str(tmp_path / "c2"))
    assert res.code == 2 and len(res.err.strip().splitlines()) == 1
    assert "lacks 1 of the 100 classes of resources/imagenet100_classes.txt (e.g. n01855672)" in res.err


def test_a_memory_too_small_for_the_classes_seen_is_said(cli, tmp_path):
    res = cli("run", "der", "--dataset", "synthetic", "--scenario", "B0Inc10", "--quick", "--set", "memory_size=8",
              "--set", "epochs=1", "--set", "ft_epochs=1", "--out", str(tmp_path / "r"))
    assert res.code == 0, res.err
    assert "the exemplar memory keeps 0 images per class of the 10 classes seen" in " ".join(res.out.split())
