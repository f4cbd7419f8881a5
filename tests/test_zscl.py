"""ZSCL and the ZSCL-repo baselines (cilbench.methods.zscl) against hand computations: the two distillation
directions, the weight ensemble (its snapshots and the final weights), the WiSE merge, the L2 term, LwF-VR's
vocabulary, iCaRL's memory budget and herding, the pre-trained teacher across a resume, and ZSCL's one-line errors.
Tiny random CLIP (``clip-tiny``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cilbench.data.memory import herding_pycil
from cilbench.data.scenario import build_scenario
from cilbench.engine.loader import TaskData
from cilbench.errors import CilbenchError
from cilbench.methods import load_method
from cilbench.methods.base import resolve_config
from cilbench.methods.contract import Batch
from cilbench.methods.zscl import (distillation, l2_distance, memory_quotas, wise_merge, WeightAverage,
                                   zscl_kd)
from cilbench.models.backbones import build_backbone
from tests._one_line import cli_error, raised


def _method(name: str, dataset: str = "synthetic-mtil", seed: int = 1993, **sets: str):
    cls = load_method(name)
    cfg, _ = resolve_config(cls, dataset, True, {k: str(v) for k, v in sets.items()})
    torch.manual_seed(0)  # the same "pre-trained" tiny CLIP every time
    return cls(cfg, build_backbone("clip-tiny"), build_scenario(dataset, seed=seed))


class _Ctx:
    """The parts of a TaskContext the hooks under test read."""

    def __init__(self, train=None, captions=("a cat", "a dog", "a red car")):
        self.device = torch.device("cpu")
        self.train = train
        self.logged: dict = {}
        self._refs = {"captions": list(captions)}

    def reference(self, name):
        return self._refs[name]

    def log(self, **values):
        self.logged.update(values)

    def features(self, encode, data=None, augment=False, low_precision=False):
        g = torch.Generator().manual_seed(len(data))  # stand-in features of the just-trained model
        return torch.randn(len(data), 8, generator=g), torch.as_tensor(data.labels)


def _bump(module: torch.nn.Module, amount: float) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(amount)


# ---------------------------------------------------------------------------------------------- distillation

def test_both_distillation_directions_by_hand():
    g = torch.Generator().manual_seed(0)
    student, teacher, texts = (torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g),
                               torch.randn(4, 3, generator=g))
    scale, T = 3.0, 2.0

    def unit(v):
        return [[c / math.sqrt(sum(c * c for c in x)) for c in x] for x in v.tolist()]

    def logits(images):
        return [[scale * sum(a * b for a, b in zip(i, t)) for t in unit(texts)] for i in unit(images)]

    def soft_ce(s_rows, t_rows):  # mean over rows of -sum_c softmax(t/T)_c log softmax(s/T)_c, times T^2
        total = 0.0
        for s, t in zip(s_rows, t_rows):
            zt = sum(math.exp(v / T) for v in t)
            zs = sum(math.exp(v / T) for v in s)
            total += -sum(math.exp(tv / T) / zt * (sv / T - math.log(zs)) for sv, tv in zip(s, t))
        return total / len(s_rows) * T * T

    s, t = logits(student), logits(teacher)
    image_to_text = soft_ce(s, t)
    text_to_image = soft_ce([list(c) for c in zip(*s)], [list(c) for c in zip(*t)])
    got = zscl_kd(student, teacher, texts, scale, T)
    assert got[0].item() == pytest.approx(image_to_text, rel=1e-5)
    assert got[1].item() == pytest.approx(text_to_image, rel=1e-5)
    # the official helper, literally: F.cross_entropy(s / T, softmax(t / T), reduction="mean") * T**2
    st, tt = torch.tensor(s), torch.tensor(t)
    official = F.cross_entropy(st / T, F.softmax(tt / T, dim=1), reduction="mean") * T ** 2
    torch.testing.assert_close(distillation(st, tt, T), official)


def test_distillation_uses_the_teachers_texts_and_gradients_reach_student_images_only():
    m = _method("zscl")
    m.before_fit(m.scenario.tasks[0], _Ctx())
    assert m.ref_text.shape == (3, 32) and not m.ref_text.requires_grad  # the teacher's caption embeddings
    torch.testing.assert_close(m.ref_text.norm(dim=-1), torch.ones(3))
    images = torch.randn(4, 3, 32, 32)
    task = m.scenario.tasks[0]
    batch = Batch(images, torch.tensor([0, 1, 2, 3]), task, {"reference": Batch(images, torch.zeros(4), task)})
    out = m.training_step(batch)
    assert set(out.terms) == {"ce", "kd_image", "kd_text", "l2"}
    # a student equal to its teacher distils to the teacher's entropy (the soft CE's floor)
    scale = m.clip_scale().exp()
    t = scale * F.normalize(m.pretrained(images).float(), dim=-1) @ m.ref_text.T
    entropy = -(F.softmax(t / 2, 1) * F.log_softmax(t / 2, 1)).sum(1).mean() * 4
    torch.testing.assert_close(out.terms["kd_image"], entropy, rtol=1e-4, atol=1e-4)
    out.loss.backward()
    assert m.clip_scale().grad is None  # logit_scale does not train
    assert m.backbone.model.visual.conv1.weight.grad is not None


# ---------------------------------------------------------------------------------------------- weight ensemble

def test_weight_ensemble_by_hand_and_the_task_ends_on_the_average():
    m = _method("zscl", we_every=5)
    start = [p.detach().clone() for p in m.backbone.parameters()]
    ctx = _Ctx()
    m.before_fit(m.scenario.tasks[0], ctx)
    for step in range(10):  # 10 steps, each adding 1 to every weight: theta after step k = start + k + 1
        _bump(m.backbone, 1.0)
        m.after_step(step)
    # snapshots: the start, after step 0 (+1), after step 5 (+6) -> the mean is start + 7/3
    m.after_task(m.scenario.tasks[0], ctx)
    assert ctx.logged["we_models"] == 3
    for p, p0 in zip(m.backbone.parameters(), start):
        torch.testing.assert_close(p.detach(), p0 + 7 / 3)


def test_weight_ensemble_counts_twelve_models_over_the_official_1001_steps():
    avg = WeightAverage([torch.zeros(1)])
    theta = torch.zeros(1)
    for step in range(1001):  # the official loop: iterations 0..1000, averaged when iteration % 100 == 0
        theta += 1
        if step % 100 == 0:
            avg.add([theta])
    assert avg.models == 12  # the addendum's count: the start + iterations 0, 100, ..., 1000
    assert avg.mean[0].item() == pytest.approx(sum([0] + [s + 1 for s in range(0, 1001, 100)]) / 12)
    m = _method("zscl", we_every=100)
    ctx = _Ctx()
    m.before_fit(m.scenario.tasks[0], ctx)
    for step in range(1000):  # cilbench's default 1000 steps: the start + 0, 100, ..., 900
        m.after_step(step)
    m.after_task(m.scenario.tasks[0], ctx)
    assert ctx.logged["we_models"] == 11


# ---------------------------------------------------------------------------------------------- WiSE, L2

def test_wise_merge_by_hand():
    p, p0 = [torch.tensor([10.0, -5.0])], [torch.tensor([0.0, 5.0])]
    wise_merge(p, p0, 0.8)
    torch.testing.assert_close(p[0], torch.tensor([8.0, -3.0]))  # 0.8 * 10 + 0.2 * 0, 0.8 * -5 + 0.2 * 5
    m = _method("wise-ft")
    start = [q.detach().clone() for q in m.backbone.parameters()]
    ctx = _Ctx()
    m.before_fit(m.scenario.tasks[0], ctx)
    _bump(m.backbone, 1.0)  # "fine-tuned": start + 1
    m.after_task(m.scenario.tasks[0], ctx)
    for q, q0 in zip(m.backbone.parameters(), start):
        torch.testing.assert_close(q.detach(), q0 + 0.8)


def test_l2_is_the_sum_of_squared_differences_to_the_task_start_logit_scale_included():
    m = _method("zscl", l2=1)
    task = m.scenario.tasks[0]
    m.before_fit(task, _Ctx())
    with torch.no_grad():
        m.clip_scale().add_(0.5)
        m.backbone.model.visual.conv1.weight.add_(0.1)
    n = m.backbone.model.visual.conv1.weight.numel()
    expected = 0.5 ** 2 + n * 0.1 ** 2
    assert l2_distance(m.backbone.parameters(), m.start).item() == pytest.approx(expected, rel=1e-4)
    out = m.training_step(Batch(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]), task))  # no reference batch
    assert out.terms["l2"].item() == pytest.approx(expected, rel=1e-4)
    assert out.loss.item() == pytest.approx((out.terms["ce"] + out.terms["l2"]).item(), rel=1e-5)


def test_trained_parameters_are_all_but_logit_scale():
    m = _method("continual-ft")
    names = {n for n, p in m.backbone.named_parameters()}
    trained = {id(p) for p in m.param_groups(m.scenario.tasks[0])[0]["params"]}
    assert {n for n, p in m.backbone.named_parameters() if id(p) not in trained} == {"model.logit_scale"}
    assert len(trained) == len(names) - 1


# ---------------------------------------------------------------------------------------------- LwF-VR

def test_lwf_vr_vocabulary():
    a, b = _method("lwf-vr"), _method("lwf-vr")
    v = a.vocabulary
    assert v.shape == (1000, 77) and v.dtype == torch.long
    assert (v[:, 0] == 49406).all() and (v[:, 11] == 49407).all() and (v[:, 12:] == 0).all()
    assert int(v[:, 1:11].min()) >= 0 and int(v[:, 1:11].max()) < 49408
    assert len(v[:, 1:11].unique()) > 5000  # drawn over the whole vocabulary
    torch.testing.assert_close(v, b.vocabulary)  # the same run seed: the same sentences
    assert not torch.equal(v, _method("lwf-vr", seed=7).vocabulary)
    assert "vocabulary" in a.checkpoint_state()


# ---------------------------------------------------------------------------------------------- iCaRL

def test_icarl_memory_budget_rules():
    assert memory_quotas(10000, 1, "fixed") == memory_quotas(10000, 1, "official") == (0, 10000)
    assert memory_quotas(10000, 2, "fixed") == memory_quotas(10000, 2, "official") == (5000, 5000)
    assert memory_quotas(10000, 3, "fixed") == (3333, 3333)  # 9999 in all
    assert memory_quotas(10000, 3, "official") == (3333, 6667)  # 2 x 3333 + 6667 = 13333 > K


def _herding_by_definition(feats: torch.Tensor, m: int) -> list[int]:
    """argmin over unpicked rows of |mu - (S + x) / k|^2, written out as the rule reads."""
    x = feats.double() / (feats.double().norm(dim=1, keepdim=True) + 1e-8)
    mu, picked, order = x.mean(0), torch.zeros(x.shape[1], dtype=torch.float64), []
    for k in range(1, min(m, len(x)) + 1):
        dist = ((mu - (x + picked) / k) ** 2).sum(1)
        dist[order] = float("inf")
        order.append(int(torch.argmin(dist)))
        picked += x[order[-1]]
    return order


def test_herding_matches_the_reference_rule():
    feats = torch.randn(60, 8, generator=torch.Generator().manual_seed(3))
    assert herding_pycil(feats, 25).tolist() == _herding_by_definition(feats, 25)
    assert herding_pycil(feats, 100).tolist() == _herding_by_definition(feats, 100)  # all of them, in order


@pytest.mark.parametrize("rule, sizes", [("fixed", [3, 3, 3]), ("official", [3, 3, 7])])
def test_icarl_memory_updates(rule, sizes):
    m = _method("icarl-clip", memory_size=10, candidates=12, memory_rule=rule)
    images = np.zeros((100, 32, 32, 3), dtype=np.uint8)
    per_task = []
    for task in m.scenario.tasks[:3]:
        rows = np.arange(20) + 20 * task.index
        data = TaskData(images, rows, np.repeat(np.array(task.classes), 4))
        ctx = _Ctx(train=data)
        m.after_task(task, ctx)
        per_task.append(ctx.logged["memory_per_dataset"])
    assert per_task[0] == [10]  # the first 10 candidates, no herding
    assert per_task[1] == [5, 5]
    assert per_task[2] == sizes
    rows = m.exemplars
    first = rows[rows[:, 0] == 0]
    assert first[:, 1].tolist() == [0, 1, 2]  # task 1's set, cut to its first (priority) rows
    second = rows[rows[:, 0] == 1]
    feats = _Ctx().features(None, TaskData(images, np.arange(12), np.zeros(12)))[0]
    assert second[:, 1].tolist() == (20 + herding_pycil(feats, 5)[:3]).tolist()  # herded among 12 candidates
    t = rows[:, 0]
    assert (rows[:, 2] == 5 * t + (rows[:, 1] - 20 * t) // 4).all()  # each row keeps its own label
    state = m.checkpoint_state()
    fresh = _method("icarl-clip", memory_size=10, candidates=12, memory_rule=rule)
    fresh.load_checkpoint_state(state)  # the memory grows: loading resizes it
    torch.testing.assert_close(fresh.exemplars, m.exemplars)


# ---------------------------------------------------------------------------------------------- resume, teachers

def test_the_pretrained_teacher_survives_a_resume_and_stays_out_of_the_checkpoint():
    trained = _method("zscl")
    original = [p.detach().clone() for p in trained.backbone.parameters()]
    _bump(trained.backbone, 0.25)  # as if tasks had been trained
    state = trained.checkpoint_state()
    assert not any("pretrained" in k or "teacher" in k for k in state)
    resumed = _method("zscl")  # built from the pre-trained weights, then the checkpoint loads (runner.py order)
    resumed.load_checkpoint_state(state)
    for p, q, p0 in zip(resumed.backbone.parameters(), resumed.pretrained.module.parameters(), original):
        torch.testing.assert_close(p.detach(), p0 + 0.25)
        torch.testing.assert_close(q, p0)
    lwf = _method("lwf")
    lwf.load_checkpoint_state(state)
    lwf.before_fit(lwf.scenario.tasks[1], _Ctx())  # LwF's teacher: the loaded (previous task's) model
    for p, q in zip(lwf.backbone.parameters(), lwf.teacher.module.parameters()):
        torch.testing.assert_close(p.detach(), q)


def test_independent_finetune_restarts_each_task_from_the_pretrained_weights():
    m = _method("continual-ft", independent="true")
    original = [p.detach().clone() for p in m.backbone.parameters()]
    _bump(m.backbone, 1.0)
    m.before_fit(m.scenario.tasks[1], _Ctx())
    for p, p0 in zip(m.backbone.parameters(), original):
        torch.testing.assert_close(p.detach(), p0)


# ---------------------------------------------------------------------------------------------- errors, CLI

def test_zscl_without_captions_is_one_line():
    cls = load_method("zscl")
    cfg, _ = resolve_config(cls, "synthetic-mtil", False, {})
    with pytest.raises(CilbenchError) as err:
        cls.references(cfg, build_scenario("synthetic-mtil"))
    assert "--set ref_captions=FILE" in raised(err)


def test_zscl_without_its_reference_store_is_one_line(cli, tmp_path):
    r = cli("run", "zscl", "--dataset", "synthetic-mtil", "--quick", "--set", "ref_images=imagenet", "--out",
            tmp_path, "--device", "cpu")
    line = cli_error(r)
    assert "zscl's reference images" in line and "'imagenet'" in line and "--set ref_images=NAME" in line


def test_zscl_quick_run_through_the_cli(cli, tmp_path):
    import json

    r = cli("run", "zscl", "--dataset", "synthetic-mtil", "--quick", "--out", tmp_path, "--device", "cpu",
            "--set", "iterations=8", "--set", "batch_size=16", "--set", "we_every=3")
    assert r.code == 0, r.err
    record = json.loads(next(tmp_path.glob("zscl__*.json")).read_text())
    steps = record["config"]["iterations"]
    every = record["config"]["we_every"]
    assert 1 + len(range(0, steps, every)) == 4  # the start + steps 0, 3, 6
    for task in record["log"]:
        assert task["we_models"] == 4
        assert set(task["phases"]["train"]["epochs"]) == {"loss", "ce", "kd_image", "kd_text", "l2"}
    assert record["data"]["reference:captions"]["captions"] == "builtin:tiny"
