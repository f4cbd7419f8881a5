"""DER (cilbench.methods.der) and the shared balanced-finetuning helper (cilbench.methods.balanced)."""

from __future__ import annotations

import json

import numpy as np
import torch
import torch.nn.functional as F

from cilbench.data.memory import ExemplarMemory
from cilbench.engine.loader import TaskData
from cilbench.methods.balanced import balanced_counts, balanced_phase, balanced_subset, scaled_lr
from cilbench.methods.contract import Batch, StepOutput

from _toy import toy_scenario


def _der(num_classes=6, per_task=2, **cfg):
    from cilbench.methods.der import DER
    from cilbench.models.backbones import build_backbone

    scenario = toy_scenario(num_classes, per_task)
    torch.manual_seed(0)
    return DER(DER.Config(memory_size=8, **cfg), build_backbone("resnet-tiny", pretrained=False), scenario), scenario


def _numel(params) -> int:
    return sum(p.numel() for p in params)


def _train(method, task, steps=3):
    """A few optimiser steps the way the trainer runs them: train mode, frozen modules in eval mode."""
    params = [p for g in method.param_groups(task) for p in g["params"]]
    opt = torch.optim.SGD(params, lr=0.1)
    method.train()
    for m in method.frozen_modules():
        m.eval()
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        labels = torch.tensor(method.scenario.seen_classes(task.index))[torch.randint(0, 2 * (task.index + 1), (8,),
                                                                                      generator=g)]
        out = method.training_step(Batch(torch.randn(8, 3, 32, 32, generator=g), labels, task))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    method.eval()


def test_one_new_extractor_per_task_old_ones_frozen_and_unchanged():
    method, scenario = _der()
    dim = method.backbone.feature_dim
    one = _numel(method.backbone.parameters())
    for t, task in enumerate(scenario.tasks):
        old_states = [{k: v.clone() for k, v in e.state_dict().items()} for e in method.extractors]
        old_fc = method.fc.weight.detach().clone()
        method.before_task(task)
        assert len(method.extractors) == t + 1
        assert method.fc.weight.shape == (2 * (t + 1), dim * (t + 1))
        assert torch.equal(method.fc.weight[:old_fc.shape[0], :old_fc.shape[1]], old_fc)  # old block copied
        trainable = [p for g in method.param_groups(task) for p in g["params"]]
        heads = method.fc.weight.numel() + method.fc.bias.numel()
        if t > 0:
            assert method.aux.weight.shape == (len(task.classes) + 1, dim)  # |new| + 1 outputs, new features only
            heads += _numel(method.aux.parameters())
            # PyCIL: the new extractor starts as the previous one
            assert all(torch.equal(a, b) for a, b in zip(method.extractors[-1].state_dict().values(),
                                                         old_states[-1].values()))
        assert _numel(trainable) == one + heads
        assert all(p.requires_grad for p in trainable)
        assert all(not p.requires_grad for e in method.extractors[:-1] for p in e.parameters())
        assert method.frozen_modules() == method.extractors[:-1]
        newest = {k: v.clone() for k, v in method.extractors[-1].state_dict().items()}
        _train(method, task)
        for e, before in zip(method.extractors[:-1], old_states):  # weights and BatchNorm statistics
            assert all(torch.equal(v, before[k]) for k, v in e.state_dict().items())
        assert any(not torch.equal(v, newest[k]) for k, v in method.extractors[-1].state_dict().items())
    assert _numel(method.parameters()) == 3 * one + _numel(method.fc.parameters()) + _numel(method.aux.parameters())


def test_random_new_init_is_fresh():
    method, scenario = _der(new_init="random")
    method.before_task(scenario.tasks[0])
    method.before_task(scenario.tasks[1])
    a, b = method.extractors[0].state_dict(), method.extractors[1].state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())


def test_aux_targets_fold_old_classes_into_zero():
    from cilbench.methods.der import aux_targets

    labels = torch.tensor([0, 5, 4, 3, 5, 1])
    assert aux_targets(labels, torch.tensor([4, 5])).tolist() == [0, 2, 1, 0, 2, 0]
    assert aux_targets(torch.tensor([2, 3, 7]), torch.tensor([2, 3])).tolist() == [1, 2, 0]


def test_loss_is_ce_plus_aux_ce_on_a_hand_example():
    method, scenario = _der()
    for task in scenario.tasks[:2]:
        method.before_task(task)
    method.eval()
    task = scenario.tasks[1]
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 2, 1])
    out = method.training_step(Batch(images, labels, task))
    assert isinstance(out, StepOutput) and set(out.terms) == {"ce", "aux"}
    with torch.no_grad():
        f0, f1 = method.backbone(images), method.extractors[1](images)
        logits = torch.cat([f0, f1], 1) @ method.fc.weight.T + method.fc.bias  # classes 0..3 in order
        ce = F.cross_entropy(logits, labels)
        aux = F.cross_entropy(f1 @ method.aux.weight.T + method.aux.bias, torch.tensor([0, 2, 1, 0]))
    assert torch.allclose(out.terms["ce"], ce, atol=1e-5) and torch.allclose(out.terms["aux"], aux, atol=1e-5)
    assert torch.allclose(out.loss, ce + aux, atol=1e-5)


def _data(labels) -> TaskData:
    labels = np.asarray(labels, dtype=np.int64)
    return TaskData(np.zeros((len(labels), 4, 4, 3), np.uint8), np.arange(len(labels), dtype=np.int64), labels)


def test_balanced_phase_draws_every_class_equally():
    data = _data([0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2])  # unequal counts: cut to the smallest (3)
    phase = balanced_phase("balanced", lambda b: b, [], data, epochs=2, lr=0.1, batch_size=4, weight_decay=0.0)
    assert balanced_counts(phase.data.labels) == {0: 3, 1: 3, 2: 3}
    assert phase.data.indices.tolist() == [0, 1, 2, 3, 4, 5, 8, 9, 10]  # each class's first rows (priority order)
    assert (phase.epochs, phase.lr, phase.batch_size, phase.weight_decay) == (2, 0.1, 4, 0.0)
    assert balanced_counts(balanced_subset(data, per_class=2).labels) == {0: 2, 1: 2, 2: 2}
    assert len(balanced_subset(_data([]))) == 0
    # a memory under a total budget: equal counts per class, also with a class holding fewer than its quota
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], [10, 2, 10])
    memory = ExemplarMemory(total=12, selection="random")
    memory.update(labels, np.arange(len(labels)), generator=0)
    assert memory.per_class_counts == {0: 4, 1: 2, 2: 4}
    data = memory.as_task_data(_data(rng.integers(0, 3, len(labels))))
    assert balanced_counts(balanced_phase("b", lambda b: b, [], data, epochs=1, lr=1.0).data.labels) \
        == {0: 2, 1: 2, 2: 2}
    assert scaled_lr(5e-5, 128) == 5e-5 / 4


def test_der_quick_cli_run_on_digits(cli, tmp_path):
    out = tmp_path / "res"
    r = cli("run", "der", "--dataset", "digits", "--quick", "--out", out)
    assert r.code == 0, r.err + r.out
    rec = json.loads(next(p for p in out.glob("*.json")).read_text())
    assert rec["status"] == "complete" and rec["increments"] == [2] * 5
    assert [t["extractors"] for t in rec["log"]] == [1, 2, 3, 4, 5]
    assert "balanced" not in rec["log"][0]["phases"]
    assert all("balanced" in t["phases"] and set(t["phases"]["train"]["epochs"]) >= {"ce", "aux"}
               for t in rec["log"][1:])
    assert rec["metrics"]["A_avg"] > 50  # chance: 22.8
