"""The method platform: every registered method on the one loop (end to end and resumed), the contract's pieces
computed by hand, and the numbers of records made before the platform existed."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cilbench.engine.loader import TaskData
from cilbench.engine.trainer import run_phase
from cilbench.methods import METHODS, load_method
from cilbench.methods.base import TrainConfig
from cilbench.methods.contract import Batch, Phase, StepOutput
from cilbench.plan import RunOptions

from _toy import toy_scenario

ROOT = Path(__file__).resolve().parents[1]
# the overrides the stored pre-platform records were made with (tests/data/pre_platform_quick.json, git 781abbc)
SMALL = {"epochs": "2", "first_epochs": "2"}
SMALL_CA = {**SMALL, "ca_epochs": "2"}


def _small_sets(name: str) -> dict[str, str]:
    cls = load_method(name)
    if "epochs" in cls.unused_settings:
        return {}
    if cls.Config().iterations is not None:  # counted in iterations (the continual-CLIP methods)
        return {"iterations": "6"}
    return SMALL_CA if "ca_epochs" in cls.Config.__dataclass_fields__ else SMALL


def _run(name: str, dataset: str, out: Path, sets: dict[str, str], resume: bool = False, scenario=None, seed=5):
    from cilbench.engine.runner import Runner

    opts = RunOptions(name, dataset, scenario=scenario, seed=seed, sets=sets, out=out, quick=True, resume=resume)
    return Runner(opts).run()[0]


# ------------------------------------------------------------------------------------------------ the registry


def test_every_lazy_name_is_registered_under_that_name():
    from cilbench.methods import _LAZY

    for name, target in _LAZY.items():
        cls = load_method(name)
        assert cls.name == name and f"{cls.__module__}:{cls.__qualname__}" == target


def test_no_method_file_imports_the_engine_or_writes_runner_state():
    for path in sorted((ROOT / "cilbench" / "methods").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("cilbench.engine"), f"{path.name} imports {node.module}"
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                assert node.attr not in ("seen_classes", "extra"), f"{path.name} writes {node.attr}"


def _family_dataset(name: str) -> str:
    return "synthetic"


@pytest.mark.parametrize("name", sorted(METHODS.names()))
def test_every_method_runs_quick_and_resumes_with_identical_numbers(name, tmp_path, monkeypatch):
    """One test over the registry: a method is covered the day it is registered."""
    sets = _small_sets(name)
    full = _run(name, _family_dataset(name), tmp_path / "full", sets, scenario="B0Inc10")
    assert full["status"] == "complete" and len(full["accuracy_matrix"]) == len(full["increments"])
    assert full["cost"]["flops_per_image"] > 0, full["cost"]  # the counter takes every method's final forward
    if load_method(name).merges_tasks:
        return  # one task: nothing to resume between tasks
    monkeypatch.setenv("CILBENCH_TEST_INTERRUPT_AFTER_TASK", "0")
    with pytest.raises(KeyboardInterrupt):
        _run(name, _family_dataset(name), tmp_path / "resumed", sets, scenario="B0Inc10")
    monkeypatch.delenv("CILBENCH_TEST_INTERRUPT_AFTER_TASK")
    resumed = _run(name, _family_dataset(name), tmp_path / "resumed", sets, resume=True, scenario="B0Inc10")
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"] and resumed["views"] == full["views"]
    assert [t["final_loss"] for t in resumed["timings"]["tasks"]] == [t["final_loss"] for t in full["timings"]["tasks"]]
    strip = [{**t, "phases": {k: {**v, "seconds": 0} for k, v in t["phases"].items()}} for t in full["log"]]
    assert [{**t, "phases": {k: {**v, "seconds": 0} for k, v in t["phases"].items()}} for t in resumed["log"]] == strip


def _clip_methods() -> list[str]:
    from cilbench.methods import load_all

    load_all()  # the lazy names carry their metadata once imported
    return sorted(n for n in METHODS.names() if METHODS.metadata(n).get("family") == "clip")


@pytest.mark.parametrize("name", _clip_methods())
def test_every_clip_method_runs_the_multi_domain_sequence_and_resumes_exactly(name, tmp_path, monkeypatch):
    """The MTIL-shaped synthetic sequence (4 domains as 4 datasets): the full matrix, Transfer included, and an
    interrupted run resumed to the same numbers."""
    sets = _small_sets(name)
    full = _run(name, "synthetic-mtil", tmp_path / "full", sets)
    assert full["kind"] == "mtil" and len(full["accuracy_matrix"]) == 4
    assert all(v is not None for row in full["accuracy_matrix"] for v in row)
    monkeypatch.setenv("CILBENCH_TEST_INTERRUPT_AFTER_TASK", "1")
    with pytest.raises(KeyboardInterrupt):
        _run(name, "synthetic-mtil", tmp_path / "resumed", sets)
    monkeypatch.delenv("CILBENCH_TEST_INTERRUPT_AFTER_TASK")
    resumed = _run(name, "synthetic-mtil", tmp_path / "resumed", sets, resume=True)
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"] and resumed["views"] == full["views"]
    assert resumed["data"] == full["data"]


# ------------------------------------------------------------------------------------------------ before / after


def test_records_made_before_the_platform_keep_their_numbers(tmp_path):
    """Records made at git 781abbc (before the platform) on synthetic --quick, seed 5, one thread: the same accuracy
    matrices, views and final losses to the last bit."""
    stored = json.loads((ROOT / "tests" / "data" / "pre_platform_quick.json").read_text())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the stored records were made with OMP_NUM_THREADS=1: float sums follow the threads
    try:
        _compare(stored, tmp_path)
    finally:
        torch.set_num_threads(threads)


def _compare(stored: dict, tmp_path: Path) -> None:
    for key, before in stored.items():
        name, dataset = key.split("@")
        sets = before.get("sets", {})
        record = _run(name, dataset, tmp_path / key.replace("@", "_"), sets)
        assert record["accuracy_matrix"] == before["accuracy_matrix"], key
        assert {k: v["accuracy_matrix"] for k, v in record["views"].items()} == before["views"], key
        assert [t["final_loss"] for t in record["timings"]["tasks"]] == before["final_loss"], key


# ------------------------------------------------------------------------------------------------ the trainer


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2))
        self.bn = torch.nn.BatchNorm1d(2)


def _data(n: int) -> TaskData:
    return TaskData(np.zeros((n, 2, 2, 3), np.uint8), np.arange(n), np.arange(n) % 2)


def test_named_terms_are_averaged_per_epoch_and_after_step_runs_after_each_step():
    toy, seen, steps = _Toy(), [], []
    values = iter(range(100))

    def step(batch: Batch):
        k = float(next(values))  # step k: loss k + w.sum() (w stays 0 with lr 0), terms a = k, b = 2k
        seen.append(batch.images.shape[0])
        return StepOutput(toy.w.sum() + k, {"a": torch.tensor(k), "b": 2 * k})

    phase = Phase("train", step, [dict(params=[toy.w], lr=0.0)], epochs=2, batch_size=4, optimizer="sgd",
                  after_step=steps.append, frozen=[toy.bn])
    stats = run_phase(toy, phase, TrainConfig(), SimpleNamespace(index=0, name="t"), _data(10),
                      lambda x, train: x.float(), torch.device("cpu"), seed=0)
    # 10 images in batches of 4: steps 0,1,2 in epoch 1 (4, 4, 2 images) and 3,4,5 in epoch 2
    assert seen == [4, 4, 2] * 2 and steps == [0, 1, 2, 3, 4, 5] and stats.steps == 6
    assert stats.epoch_terms == {"loss": [1.0, 4.0], "a": [1.0, 4.0], "b": [2.0, 8.0]}
    assert stats.final_loss == 5.0
    assert toy.training is False and toy.bn.training is False  # eval after the phase; bn kept frozen during it


def test_frozen_modules_stay_in_eval_mode_while_training():
    toy = _Toy()
    modes = []

    def step(batch):
        modes.append((toy.training, toy.bn.training))
        return toy.w.sum()

    run_phase(toy, Phase("train", step, [dict(params=[toy.w])], epochs=1, batch_size=5, frozen=[toy.bn]),
              TrainConfig(), SimpleNamespace(index=0, name="t"), _data(10), lambda x, train: x.float(),
              torch.device("cpu"), seed=0)
    assert modes == [(True, False), (True, False)]


def test_aux_streams_give_one_batch_of_each_per_step_cycling():
    toy, got = _Toy(), []

    def step(batch):
        got.append((len(batch.labels), sorted(batch.aux), len(batch.aux["ref"].labels)))
        return toy.w.sum()

    ref = TaskData(np.zeros((3, 2, 2, 3), np.uint8), np.arange(3), np.zeros(3, dtype=np.int64))
    run_phase(toy, Phase("train", step, [dict(params=[toy.w])], epochs=1, batch_size=2, aux={"ref": ref}),
              TrainConfig(), SimpleNamespace(index=0, name="t"), _data(8), lambda x, train: x.float(),
              torch.device("cpu"), seed=0)
    assert got == [(2, ["ref"], 2), (2, ["ref"], 1), (2, ["ref"], 2), (2, ["ref"], 1)]  # 3 reference images cycle


def test_batch_targets_are_positions_and_refuse_a_foreign_label():
    b = Batch(torch.zeros(3, 1), torch.tensor([7, 2, 9]), None)
    assert b.targets([2, 7, 9]).tolist() == [1, 0, 2]
    with pytest.raises(ValueError, match="not among"):
        b.targets([2, 7])


def test_named_sub_seeds_are_reproducible_and_distinct():
    from cilbench.engine.runner import RunTaskContext

    ctx = RunTaskContext.__new__(RunTaskContext)
    ctx.task_seed = 1234
    assert ctx.seed() == 1234 and ctx.seed("ridge-holdout") == 1235  # legacy purposes keep their offsets
    assert ctx.seed("memory") == ctx.seed("memory") != ctx.seed("herding")
    assert torch.equal(torch.rand(3, generator=ctx.rng("x")), torch.rand(3, generator=ctx.rng("x")))


# ------------------------------------------------------------------------------------------------ iCaRL


def _icarl(num_classes=4, per_task=2, memory=4):
    from cilbench.methods.icarl import ICaRL
    from cilbench.models.backbones import build_backbone

    scenario = toy_scenario(num_classes, per_task)
    torch.manual_seed(0)
    cfg = ICaRL.Config(memory_size=memory)
    return ICaRL(cfg, build_backbone("resnet-tiny", pretrained=False), scenario), scenario


def test_icarl_nme_is_the_nearest_normalised_exemplar_mean():
    method, scenario = _icarl()
    method.eval()
    for task in scenario.tasks:
        method.before_task(task)
    method.means[:4] = F.normalize(torch.tensor([[1.0, 0, 0] + [0.0] * 61, [0, 1.0, 0] + [0.0] * 61,
                                                 [0, 0, 1.0] + [0.0] * 61, [1.0, 1.0, 0] + [0.0] * 61]), dim=1)
    images = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        feats = F.normalize(method.backbone(images), dim=1)
        scores, views = method.score_views(images, torch.tensor([0, 1, 2, 3]))
    by_hand = torch.stack([-(feats - method.means[c]).norm(dim=1) for c in range(4)], 1)
    torch.testing.assert_close(scores, by_hand)
    assert set(views) == {"cnn"} and views["cnn"].shape == (5, 4)


def test_icarl_loss_is_sigmoid_bce_with_the_previous_networks_outputs_on_old_classes():
    method, scenario = _icarl()
    for task in scenario.tasks:
        method.before_task(task)
    from cilbench.models.teacher import Teacher

    method.teacher = Teacher.snapshot(torch.nn.ModuleList([method.backbone, method.head]))
    method._old = torch.tensor([0, 1])
    with torch.no_grad():
        method.head.weight.add_(0.05)  # the student now differs from its teacher
    images, labels = torch.rand(6, 3, 32, 32), torch.tensor([2, 3, 2, 0, 1, 3])
    method.eval()
    with torch.no_grad():
        out = method.training_step(Batch(images, labels, scenario.tasks[1]))
        logits = method.head(method.backbone(images), torch.arange(4))
        old = torch.sigmoid(method.teacher.module[1](method.teacher.module[0](images), torch.arange(2)))
    targets = F.one_hot(labels, 4).float()
    targets[:, :2] = old  # iCaRL's targets: the previous network's sigmoid outputs on old classes
    log_p, log_q = F.logsigmoid(logits), F.logsigmoid(-logits)  # log p and log(1 - p), p = sigmoid(logit)
    by_hand = -(targets * log_p + (1 - targets) * log_q).mean()
    kd_by_hand = -(old * log_p[:, :2] + (1 - old) * log_q[:, :2]).mean() * 2 / 4
    torch.testing.assert_close(out.loss, by_hand, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.terms["kd"], kd_by_hand, rtol=1e-5, atol=1e-6)
    assert math.isclose(float(out.terms["cls"] + out.terms["kd"]), float(out.loss), rel_tol=1e-6)


def test_icarl_memory_budget_and_cut_after_each_task(tmp_path):
    record = _run("icarl", "synthetic", tmp_path, {"epochs": "1", "memory_size": "20"}, scenario="B0Inc5")
    # 20 exemplars shared by the classes seen: 5 -> 10 -> 15 -> 20 classes gives 4, 2, 1, 1 per class
    assert [t["per_class"] for t in record["log"]] == [4, 2, 1, 1]
    assert [t["memory"] for t in record["log"]] == [20, 20, 15, 20]
    assert record["backbone"] == "resnet-tiny" and set(record["views"]) == {"cnn"}


def test_a_phase_that_states_its_epochs_is_not_lengthened_by_the_configs_iterations():
    toy = _Toy()
    cfg = TrainConfig(iterations=7, batch_size=5)  # the main phase counts iterations (MoE-Adapters: 1000)
    task = SimpleNamespace(index=0, name="t")
    run = lambda phase: run_phase(toy, phase, cfg, task, _data(10), lambda x, train: x.float(),  # noqa: E731
                                  torch.device("cpu"), seed=0)
    assert run(Phase("main", lambda b: toy.w.sum(), [dict(params=[toy.w])], iterations=cfg.iterations)).steps == 7
    assert run(Phase("align", lambda b: toy.w.sum(), [dict(params=[toy.w])], epochs=2)).steps == 4  # 2 x 10 / 5
    assert run(Phase("other", lambda b: toy.w.sum(), [dict(params=[toy.w])])).steps == 7  # unset: the config's
