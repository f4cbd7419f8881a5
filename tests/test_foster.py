"""FOSTER (cilbench.methods.foster): two extractors while boosting, one after compression (bounded, unlike DER), the
old extractor frozen and unchanged, the effective-number logits alignment and balanced distillation by hand, and the
structure a resumed run rebuilds."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cilbench.engine.loader import TaskData
from cilbench.errors import CilbenchError
from cilbench.methods.contract import Batch, StepOutput

from _toy import toy_scenario

STORE = np.zeros((64, 4, 4, 3), np.uint8)  # one store for every task, so memory rows stay valid
PER_CLASS = 6


def _foster(num_classes=6, per_task=2, **cfg):
    from cilbench.methods.foster import FOSTER
    from cilbench.models.backbones import build_backbone

    scenario = toy_scenario(num_classes, per_task)
    torch.manual_seed(0)
    cfg = {"memory_size": 8, "compression_epochs": 1, **cfg}
    return FOSTER(FOSTER.Config(**cfg), build_backbone("resnet-tiny", pretrained=False), scenario), scenario


def _numel(params) -> int:
    return sum(p.numel() for p in params)


def _state(module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same(module, state) -> bool:
    return all(torch.equal(v, state[k]) for k, v in module.state_dict().items())


def _steps(method, step, params, frozen, labels_from, task, steps=3):
    """A few optimiser steps the way the trainer runs a phase: train mode, frozen modules in eval mode."""
    opt = torch.optim.SGD([p for g in params for p in g["params"]], lr=0.1)
    method.train()
    for m in frozen:
        m.eval()
    g = torch.Generator().manual_seed(1)
    labels_from = torch.as_tensor(np.asarray(labels_from))
    for _ in range(steps):
        labels = labels_from[torch.randint(0, len(labels_from), (8,), generator=g)]
        out = step(Batch(torch.randn(8, 3, 16, 16, generator=g), labels, task))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    method.eval()


class _Ctx:
    """What after_task uses of a TaskContext: the task's data, features (random images), fit (a few SGD steps), log."""

    def __init__(self, method, task):
        self.method, self.task = method, task
        labels = np.repeat(np.asarray(task.classes), PER_CLASS)
        start = task.index * len(labels)
        self.train = TaskData(STORE, np.arange(start, start + len(labels)), labels)
        self.seen = torch.tensor(method.scenario.seen_classes(task.index))
        self.new = torch.tensor(task.classes)
        self.old = self.seen[:len(self.seen) - len(self.new)]
        self.logged: dict = {}
        self.phases: dict = {}

    def features(self, encode, data=None, augment=False, low_precision=False):
        data = self.train if data is None else data
        images = torch.randn(len(data), 3, 16, 16, generator=torch.Generator().manual_seed(len(data)))
        with torch.no_grad():
            return encode(images).float(), torch.as_tensor(data.labels)

    def fit(self, phase):
        self.phases[phase.name] = phase
        _steps(self.method, phase.step, phase.params, phase.frozen, phase.data.labels, self.task)

    def rng(self, purpose="", device=None):
        return torch.Generator().manual_seed(0)

    def log(self, **values):
        self.logged.update(values)


def _task(method, task, steps=3):
    """One task as the runner runs it: before_task, before_fit, main phase, after_task (compression)."""
    method.before_task(task)
    ctx = _Ctx(method, task)
    method.before_fit(task, ctx)
    _steps(method, method.training_step, method.param_groups(task), method.frozen_modules(),
           method.train_data(task, ctx).labels, task, steps)
    method.after_task(task, ctx)
    return ctx


# ------------------------------------------------------------------------------------------ parameter growth


def test_two_extractors_while_boosting_one_after_compression_old_frozen_and_unchanged():
    method, scenario = _foster()
    dim = method.backbone.feature_dim
    one = _numel(method.backbone.parameters())
    _task(method, scenario.tasks[0])
    assert method.new is None and _numel(method.parameters()) == one + 2 * (dim + 1)
    after_compression = []
    for t, task in enumerate(scenario.tasks[1:], start=1):
        student = _state(method.backbone)
        old_rows = method.fc.weight.detach().clone()
        method.before_task(task)
        seen = 2 * (t + 1)
        # boosting: phi_old + phi_new (started as phi_old, PyCIL FOSTERNet.update_fc), W_b on both, W_fe on phi_new
        assert _same(method.new, student)
        assert method.boost_fc.weight.shape == (seen, 2 * dim) and method.fe_fc.weight.shape == (seen, dim)
        assert torch.equal(method.boost_fc.weight[:seen - 2, :dim], old_rows)  # the old classifier's block
        heads = _numel(method.boost_fc.parameters()) + _numel(method.fe_fc.parameters()) \
            + _numel(method.fc.parameters())
        assert _numel(method.parameters()) == 2 * one + heads
        trainable = [p for g in method.param_groups(task) for p in g["params"]]
        assert _numel(trainable) == one + _numel(method.boost_fc.parameters()) + _numel(method.fe_fc.parameters())
        assert all(not p.requires_grad for p in method.backbone.parameters())
        assert method.frozen_modules() == [method.backbone]
        ctx = _Ctx(method, task)
        method.before_fit(task, ctx)
        new_before = _state(method.new)
        _steps(method, method.training_step, method.param_groups(task), method.frozen_modules(),
               method.train_data(task, ctx).labels, task)
        assert _same(method.backbone, student)  # weights and BatchNorm statistics of phi_old
        assert torch.equal(method.fc.weight[:seen - 2], old_rows)  # the old model's classifier
        assert not _same(method.new, new_before)
        method.after_task(task, ctx)
        # compression: one extractor (the student, trained) and W over the seen classes; the teacher is gone
        assert method.new is None and method.boost_fc is None and method.fe_fc is None
        assert not _same(method.backbone, student) and "compression" in ctx.phases
        assert all(p.requires_grad for p in method.backbone.parameters())
        assert _numel(method.parameters()) == one + seen * (dim + 1)
        assert ctx.logged["extractors"] == 1 and ctx.logged["params"] == _numel(method.parameters())
        assert ctx.logged["boosted_params"] == 2 * one + seen * (2 * dim + 1)
        assert {k.split(".")[0] for k in method.state_dict()} == {"backbone", "fc", "memory"}
        after_compression.append(_numel(method.parameters()) - _numel(method.fc.parameters()))
    assert after_compression == [one, one]  # bounded: DER would hold 2, then 3 extractors


def test_compression_distils_the_boosted_teacher_with_balanced_kd():
    method, scenario = _foster()
    _task(method, scenario.tasks[0])
    task = scenario.tasks[1]
    method.before_task(task)
    ctx = _Ctx(method, task)
    method.before_fit(task, ctx)
    boost = [method.backbone, method.new]
    method.after_task(task, ctx)
    phase = ctx.phases["compression"]
    assert phase.epochs == 1 and phase.lr == 0.1 and phase.weight_decay == 0.0  # PyCIL: the student's SGD has no wd
    assert {id(p) for g in phase.params for p in g["params"]} \
        == {id(p) for p in [*method.backbone.parameters(), *method.fc.parameters()]}
    from cilbench.methods.foster import boosted_logits, distillation, effective_number_weights

    # the teacher is the boosted model as the boosting left it; the step's loss is BKD at beta2 against it
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 3, 2, 1])
    seen = torch.arange(4)
    assert torch.allclose(torch.tensor(ctx.logged["class_weights_compression"]),
                          effective_number_weights([4, 4, PER_CLASS, PER_CLASS], 0.97), atol=1e-5)  # beta2
    method._weights = torch.tensor([1.5, 1.5, 0.5, 0.5])
    method.eval()
    out = method._compression_step(Batch(images, labels, task))
    with torch.no_grad():
        teacher = method.boosted.run(lambda m: boosted_logits(m[0], m[1], m[2], images, seen), images)
        expected = distillation(method.fc(method.backbone(images), seen), teacher, 2.0, method._weights)
    assert set(out.terms) == {"bkd"} and torch.allclose(out.loss, expected, atol=1e-6)
    assert method.boosted.module[0] is not boost[0] and method.boosted.module[1] is not boost[1]
    # the score views: the student (main) and the boosted teacher
    main, views = method.score_views(images, seen)
    assert torch.allclose(main, method.logits(images, seen)) and torch.allclose(views["boosted"], teacher, atol=1e-6)


# ------------------------------------------------------------------------------------------ losses by hand


def test_effective_number_weights_and_balanced_distillation_by_hand():
    from cilbench.methods.foster import distillation, effective_number_weights

    # counts 2 and 8 at beta 0.5: (1 - b) / (1 - b^n) = 2/3 and 128/255, rescaled to sum to 2 classes
    w = effective_number_weights([2, 8], 0.5)
    assert torch.allclose(w, torch.tensor([340 / 298, 2 - 340 / 298]), atol=1e-6)
    assert torch.allclose(effective_number_weights([5, 5, 5], 0.97), torch.ones(3))  # equal counts: no change
    assert torch.allclose(effective_number_weights([3, 40], 0.0), torch.ones(2))  # beta 0: plain
    assert torch.isfinite(effective_number_weights([0, 40], 0.9)).all()  # an empty class counts as 1
    # BKD: teacher uniform, weights 3 : 1 -> target (0.75, 0.25); student softmax (0.75, 0.25) at T = 2
    student, teacher = torch.tensor([[2 * math.log(3), 0.0]]), torch.zeros(1, 2)
    bkd = distillation(student, teacher, 2.0, torch.tensor([1.5, 0.5]))
    assert bkd.item() == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)), abs=1e-6)
    plain = distillation(student, teacher, 2.0)  # the boosting stage's KD: uniform target
    assert plain.item() == pytest.approx(-(0.5 * math.log(0.75) + 0.5 * math.log(0.25)), abs=1e-6)
    # mean over the batch of the per-row sums (PyCIL: sum / batch)
    two = distillation(torch.cat([student, torch.zeros(1, 2)]), torch.zeros(2, 2), 2.0)
    assert two.item() == pytest.approx((plain.item() + math.log(2)) / 2, abs=1e-6)


def test_boosting_loss_is_aligned_ce_plus_fe_ce_plus_kd_on_a_hand_example():
    method, scenario = _foster(lambda_okd=0.5, temperature=3.0)
    for task in scenario.tasks[:2]:
        method.before_task(task)
    task = scenario.tasks[1]
    method._weights = torch.tensor([2.0, 2.0, 0.5, 0.5])
    method.eval()
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 3, 2, 1])
    out = method.training_step(Batch(images, labels, task))
    assert isinstance(out, StepOutput) and set(out.terms) == {"ce", "fe", "kd"}
    with torch.no_grad():
        f_old, f_new = method.backbone(images), method.new(images)
        logits = torch.cat([f_old, f_new], 1) @ method.boost_fc.weight.T + method.boost_fc.bias
        ce = F.cross_entropy(logits / torch.tensor([2.0, 2.0, 0.5, 0.5]), labels)  # logits alignment
        fe = F.cross_entropy(f_new @ method.fe_fc.weight.T + method.fe_fc.bias, labels)
        old = f_old @ method.fc.weight[:2].T + method.fc.bias[:2]  # the old model: phi_old and W's old rows
        kd = 0.5 * -(F.softmax(old / 3, 1) * F.log_softmax(logits[:, :2] / 3, 1)).sum(1).mean()
    for name, value in {"ce": ce, "fe": fe, "kd": kd}.items():
        assert torch.allclose(out.terms[name], value, atol=1e-5), name
    assert torch.allclose(out.loss, ce + fe + kd, atol=1e-5)


def test_class_weights_come_from_the_replay_sets_counts():
    method, scenario = _foster(beta1=0.9, beta1_schedule=(0.5, 0.7))
    _task(method, scenario.tasks[0])  # memory: 8 in all, 4 per class
    task = scenario.tasks[1]
    method.before_task(task)
    ctx = _Ctx(method, task)
    method.before_fit(task, ctx)
    from cilbench.methods.foster import effective_number_weights

    assert ctx.logged["beta1"] == 0.5  # beta1_schedule[t - 1] (official B0Inc10 config) over beta1
    expected = effective_number_weights([4, 4, PER_CLASS, PER_CLASS], 0.5)
    assert torch.allclose(method._weights, expected) and method._weights[0] > method._weights[2]


def test_oofc_az_keeps_the_new_classes_old_features_block_at_zero():
    method, scenario = _foster(oofc="az")
    _task(method, scenario.tasks[0])
    task = scenario.tasks[1]
    method.before_task(task)
    dim = method.backbone.feature_dim
    assert torch.count_nonzero(method.boost_fc.weight[2:, :dim]) == 0
    ctx = _Ctx(method, task)
    method.before_fit(task, ctx)
    before = method.boost_fc.weight.detach().clone()
    _steps(method, method.training_step, method.param_groups(task), method.frozen_modules(),
           method.train_data(task, ctx).labels, task)
    w = method.boost_fc.weight.detach()
    assert torch.count_nonzero(w[2:, :dim]) == 0 and not torch.equal(w[2:, dim:], before[2:, dim:])


def test_weight_align_scales_the_new_rows_to_the_old_norm():
    from cilbench.methods.der import ExpandingLinear
    from cilbench.methods.foster import weight_align

    head = ExpandingLinear()
    head.grow(3, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, 5.0], [1.0, 0.0]]))  # old norms 5, 5; new norm 1
    assert weight_align(head, 1) == pytest.approx(5.0)
    assert torch.allclose(head.weight[2], torch.tensor([5.0, 0.0]))
    assert weight_align(head, 1, value=0.5) == pytest.approx(0.25)  # value^(old / new) = 0.5^2


def test_short_beta1_schedule_is_refused_before_the_run():
    from cilbench.methods.foster import FOSTER

    method, scenario = _foster()
    with pytest.raises(CilbenchError, match="beta1_schedule"):
        FOSTER.check_plan(FOSTER.Config(beta1_schedule=(0.9,)), scenario)
    FOSTER.check_plan(FOSTER.Config(beta1_schedule=(0.9, 0.8)), scenario)


# ------------------------------------------------------------------------------------------ resume


def test_resume_rebuilds_the_compressed_model_and_boosts_from_it():
    method, scenario = _foster()
    for task in scenario.tasks[:2]:
        _task(method, task)
    saved = {k: v.clone() for k, v in method.checkpoint_state().items()}
    assert not any(k.startswith(("new.", "boost_fc.", "fe_fc.")) for k in saved)
    # a resumed run: a fresh method, before_task of the finished tasks replayed (the last one builds its boosting
    # structure), then the checkpoint loaded: the compressed model again, the same scores
    fresh, _ = _foster()
    for task in scenario.tasks[:2]:
        fresh.before_task(task)
    assert fresh.new is not None
    fresh.load_checkpoint_state(saved)
    assert fresh.new is None and fresh.boost_fc is None
    assert {k: v for k, v in fresh.state_dict().items()}.keys() == method.state_dict().keys()
    method.eval()
    fresh.eval()
    images, seen = torch.randn(3, 3, 16, 16), torch.arange(4)
    assert torch.equal(fresh.logits(images, seen), method.logits(images, seen))
    assert fresh.memory.per_class_counts == method.memory.per_class_counts
    # the next task boosts from the loaded student in both, identically
    task = scenario.tasks[2]
    torch.manual_seed(7)
    method.before_task(task)
    torch.manual_seed(7)
    fresh.before_task(task)
    assert _same(fresh.new, _state(method.backbone)) and _same(fresh.backbone, _state(method.backbone))
    assert torch.equal(fresh.boost_fc.weight, method.boost_fc.weight)
    assert torch.equal(fresh.boost_fc.weight[:4, :fresh.backbone.feature_dim], fresh.fc.weight[:4])


def test_foster_quick_cli_run_on_digits(cli, tmp_path):
    out = tmp_path / "res"
    r = cli("run", "foster", "--dataset", "digits", "--quick", "--set", "epochs=2", "--out", out)
    assert r.code == 0, r.err + r.out
    rec = json.loads(next(p for p in out.glob("*.json")).read_text())
    assert rec["status"] == "complete" and rec["increments"] == [2] * 5
    assert [t["extractors"] for t in rec["log"]] == [1] * 5
    assert "compression" not in rec["log"][0]["phases"]
    assert all(set(t["phases"]["train"]["epochs"]) >= {"ce", "fe", "kd"} and "compression" in t["phases"]
               for t in rec["log"][1:])
    assert all(t["boosted_params"] > 1.9 * t["params"] for t in rec["log"][1:])  # two extractors, then one
    assert rec["views"]["boosted"]["accuracy_matrix"][0] == rec["accuracy_matrix"][0]  # task 1: the same model
