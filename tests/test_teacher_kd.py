"""Teacher (a frozen copy kept out of its owner) and the distillation losses, each against a hand computation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cilbench.models.losses import kd_bce, kd_kl, kd_soft_ce
from cilbench.models.teacher import Teacher


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, 3))

    def forward(self, x):
        return self.body(x)


class _Owner(nn.Module):
    """A method-like owner: the student and, as a plain attribute, its teacher."""

    def __init__(self):
        super().__init__()
        self.net = _Net()
        self.teacher: Teacher | None = None

    def start_task(self) -> None:  # what a method does in before_fit
        self.teacher = Teacher.snapshot(self.net)


def _train(net: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net.train()
    for _ in range(3):
        x = torch.randn(8, 4, generator=gen)
        loss = net(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_a_snapshot_is_frozen_and_does_not_follow_the_student():
    torch.manual_seed(0)
    owner = _Owner()
    _train(owner.net, 1)
    owner.start_task()
    x = torch.randn(5, 4)
    before = owner.teacher(x)
    teacher_state = {k: v.clone() for k, v in owner.teacher.module.state_dict().items()}
    _train(owner.net, 2)  # the student moves on (weights and BatchNorm statistics)
    assert not torch.allclose(owner.net.eval()(x), before)
    after = owner.teacher(x)
    assert torch.equal(after, before) and not after.requires_grad
    assert all(torch.equal(v, teacher_state[k]) for k, v in owner.teacher.module.state_dict().items())
    assert not owner.teacher.module.training  # BatchNorm uses running statistics, dropout is off
    assert not any(p.requires_grad for p in owner.teacher.module.parameters())


def test_the_teacher_stays_out_of_the_owner():
    owner = _Owner()
    owner.start_task()
    assert all(k.startswith("net.") for k in owner.state_dict())
    assert len(list(owner.parameters())) == len(list(owner.net.parameters()))
    owner.train()
    assert not owner.teacher.module.training  # the owner's train() does not reach it
    owner.to(torch.float64)
    assert next(owner.teacher.module.parameters()).dtype == torch.float32  # nor its .to()


def test_the_teacher_follows_its_inputs_device():
    teacher = Teacher.snapshot(_Net())
    out = teacher(torch.zeros(2, 4, device="meta"))  # the meta device stands in for a GPU here
    assert out.device.type == "meta" and next(teacher.module.parameters()).device.type == "meta"
    other = Teacher.snapshot(_Net())
    assert other.to("meta") is other and next(other.module.parameters()).device.type == "meta"


def test_a_snapshot_of_a_snapshotting_owner_does_not_nest_teachers():
    owner = _Owner()
    owner.start_task()
    copied = copy.deepcopy(owner)
    assert not copied.teacher  # empty: deep copies never drag the previous teacher along
    with pytest.raises(RuntimeError, match="empty"):
        copied.teacher(torch.zeros(1, 4))
    second = Teacher.snapshot(owner)
    assert not second.module.teacher


def test_resume_contract_a_snapshot_of_the_loaded_model_equals_the_uninterrupted_one():
    torch.manual_seed(3)
    run = _Owner()
    _train(run.net, 1)  # task 1
    saved = {k: v.clone() for k, v in run.state_dict().items()}  # the checkpoint after task 1
    run.start_task()  # task 2 of the uninterrupted run

    torch.manual_seed(99)  # a resumed process: other random init, then the checkpoint is loaded
    resumed = _Owner()
    resumed.load_state_dict(saved)
    resumed.start_task()

    x = torch.randn(6, 4)
    assert torch.equal(run.teacher(x), resumed.teacher(x))
    a, b = run.teacher.module.state_dict(), resumed.teacher.module.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_run_gives_other_entry_points_without_gradients():
    teacher = Teacher.snapshot(_Net())
    out = teacher.run(lambda m: m.body[0](torch.ones(2, 4)))
    assert out.shape == (2, 6) and not out.requires_grad


# ---------------------------------------------------------------------------------------------------- losses
# Logits are logs of small integers, so the softmax is a ratio worked on paper:
#   teacher row 1: log(1, 2, 1) -> p = (1/4, 1/2, 1/4);   student row 1: log(1, 1, 2) -> q = (1/4, 1/4, 1/2)
#   teacher row 2: log(1, 1, 1) -> p = (1/3, 1/3, 1/3);   student row 2: log(1, 1, 4) -> q = (1/6, 1/6, 2/3)
TEACHER = torch.log(torch.tensor([[1.0, 2.0, 1.0], [1.0, 1.0, 1.0]]))
STUDENT = torch.log(torch.tensor([[1.0, 1.0, 2.0], [1.0, 1.0, 4.0]]))
LN2, LN3 = math.log(2), math.log(3)
# KL(p || q), row 1: 1/4 ln 1 + 1/2 ln 2 + 1/4 ln(1/2) = 1/4 ln 2
#             row 2: 1/3 (ln 2 + ln 2 + ln(1/2))      = 1/3 ln 2
KL_ROWS = [LN2 / 4, LN2 / 3]
# H(p): row 1: 1/4 ln 4 + 1/2 ln 2 + 1/4 ln 4 = 3/2 ln 2;  row 2: ln 3.  Cross-entropy = KL + H(p).
CE_ROWS = [LN2 / 4 + 1.5 * LN2, LN2 / 3 + LN3]


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides:UserWarning")  # F.kl_div's own, below
def test_kd_kl_by_hand():
    assert kd_kl(STUDENT, TEACHER).item() == pytest.approx(sum(KL_ROWS) / 2, rel=1e-6)  # batchmean
    assert kd_kl(STUDENT, TEACHER, reduction="mean").item() == pytest.approx(sum(KL_ROWS) / 6, rel=1e-6)  # DNE
    assert kd_kl(STUDENT, TEACHER, reduction="sum").item() == pytest.approx(sum(KL_ROWS), rel=1e-6)
    assert kd_kl(STUDENT, TEACHER, reduction="none").tolist() == pytest.approx(KL_ROWS, rel=1e-6)
    # tau = 2 on doubled logits is the same distributions; tau**2 = 4 when asked
    assert kd_kl(2 * STUDENT, 2 * TEACHER, tau=2).item() == pytest.approx(sum(KL_ROWS) / 2, rel=1e-6)
    assert kd_kl(2 * STUDENT, 2 * TEACHER, tau=2, tau_squared=True).item() == pytest.approx(2 * sum(KL_ROWS), rel=1e-6)
    assert kd_kl(TEACHER, TEACHER).item() == pytest.approx(0.0, abs=1e-7)
    # DyTox / DNE's own expression
    dytox = F.kl_div(F.log_softmax(STUDENT, 1), F.log_softmax(TEACHER, 1), reduction="mean", log_target=True)
    assert kd_kl(STUDENT, TEACHER, reduction="mean", tau_squared=True).item() == pytest.approx(dytox.item(), rel=1e-6)


def test_kd_soft_ce_by_hand():
    assert kd_soft_ce(STUDENT, TEACHER).item() == pytest.approx(sum(CE_ROWS) / 2, rel=1e-6)
    assert kd_soft_ce(2 * STUDENT, 2 * TEACHER, tau=2, tau_squared=True).item() == \
        pytest.approx(4 * sum(CE_ROWS) / 2, rel=1e-6)  # ZSCL: CE(s/T, softmax(t/T)) * T**2, T = 2
    assert kd_soft_ce(STUDENT, TEACHER, reduction="none").tolist() == pytest.approx(CE_ROWS, rel=1e-6)


def test_kd_bce_by_hand():
    # sigmoid(0) = 1/2, sigmoid(ln 3) = 3/4, sigmoid(-ln 3) = 1/4
    teacher = torch.tensor([[LN3, 0.0, 0.0], [0.0, 0.0, -LN3]])
    student = torch.tensor([[0.0, -LN3, 0.0], [0.0, LN3, -LN3]])

    def bce(p, q):  # -(q ln p + (1 - q) ln(1 - p))
        return -(q * math.log(p) + (1 - q) * math.log(1 - p))

    rows = [[bce(.5, .75), bce(.25, .5), bce(.5, .5)], [bce(.5, .5), bce(.75, .5), bce(.25, .25)]]
    # e.g. bce(.5, .75) = ln 2 and bce(.25, .5) = 2 ln 2 - 1/2 ln 3
    assert rows[0][0] == pytest.approx(LN2) and rows[0][1] == pytest.approx(2 * LN2 - LN3 / 2)
    flat = [v for r in rows for v in r]
    assert kd_bce(student, teacher).item() == pytest.approx(sum(flat) / 6, rel=1e-6)  # iCaRL: mean over units
    assert kd_bce(student, teacher, reduction="batchmean").item() == pytest.approx(sum(flat) / 2, rel=1e-6)
    assert kd_bce(2 * student, 2 * teacher, tau=2).item() == pytest.approx(sum(flat) / 6, rel=1e-6)


def test_kd_gradients_reach_the_student_only():
    student = STUDENT.clone().requires_grad_(True)
    teacher = TEACHER.clone().requires_grad_(True)
    (kd_kl(student, teacher) + kd_soft_ce(student, teacher) + kd_bce(student, teacher)).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0 and teacher.grad is None
    # KL and CE differ by the teacher's entropy only: same gradient
    s1 = STUDENT.clone().requires_grad_(True)
    s2 = STUDENT.clone().requires_grad_(True)
    kd_kl(s1, TEACHER).backward()
    kd_soft_ce(s2, TEACHER).backward()
    assert torch.allclose(s1.grad, s2.grad)
    with pytest.raises(ValueError, match="unknown reduction"):
        kd_kl(STUDENT, TEACHER, reduction="avg")
