"""The shared trainer's schedule and optimiser groups."""

import math

import pytest
import torch

from cilbench.engine.trainer import build_optimizer, lr_factor
from cilbench.methods.base import TrainConfig


def test_warmup_then_cosine():
    total, warmup = 100, 10
    assert lr_factor(0, total, warmup, "cosine", 0.0) == pytest.approx(0.1)
    assert lr_factor(9, total, warmup, "cosine", 0.0) == pytest.approx(1.0)
    assert lr_factor(10, total, warmup, "cosine", 0.0) == pytest.approx(1.0)
    mid = 10 + 45  # half way through the cosine part
    assert lr_factor(mid, total, warmup, "cosine", 0.0) == pytest.approx(0.5)
    assert lr_factor(100, total, warmup, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(30, total, 0, "cosine", 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.3)))
    assert lr_factor(50, total, 0, "constant", 0.0) == 1.0
    # step decay per epoch, as SLCA's MultiStepLR(milestones=[18], gamma=0.1) over 20 epochs of 5 steps
    assert lr_factor(89, 100, 0, "step", 0.0, 5, (18,), 0.1) == 1.0
    assert lr_factor(90, 100, 0, "step", 0.0, 5, (18,), 0.1) == pytest.approx(0.1)
    assert lr_factor(99, 100, 0, "step", 0.0, 5, (10, 18), 0.1) == pytest.approx(0.01)


def test_param_groups_keep_their_own_learning_rates():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    b.weight.requires_grad_(False)
    cfg = TrainConfig(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt = build_optimizer([dict(params=list(a.parameters()), lr=0.01), dict(params=list(b.parameters()))], cfg)
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.1]
    assert len(opt.param_groups[1]["params"]) == 1  # the frozen weight is left out
    assert isinstance(build_optimizer([dict(params=list(a.parameters()))], TrainConfig(optimizer="adamw")),
                      torch.optim.AdamW)


# ---- the schedule as the references step it: once per epoch (CosineAnnealingLR / MultiStepLR after each epoch) ----

from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402

from cilbench.engine.trainer import main_phase, run_phase  # noqa: E402
from cilbench.errors import CilbenchError  # noqa: E402
from cilbench.methods.base import Method  # noqa: E402


class _Recorder(Method):
    """One weight in two groups (base lr and 10x); records every group's lr at every optimiser step."""

    def __init__(self, cfg):
        super().__init__(cfg, torch.nn.Identity(), None)
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.v = torch.nn.Parameter(torch.zeros(1))

    def param_groups(self, task):
        return [dict(params=[self.w]), dict(params=[self.v], lr=self.cfg.lr * 10)]

    def training_step(self, batch):
        return (self.w - 1).pow(2).sum() + (self.v - 1).pow(2).sum()


def _fit(cfg: TrainConfig, n: int = 10, task_index: int = 0):
    """Fit the recorder on ``n`` blank images; returns every step's group lrs and the groups' weight decays."""
    from cilbench.engine import trainer
    from cilbench.engine.loader import TaskData

    method = _Recorder(cfg)
    lrs, decays = [], []
    real_step = trainer.train_step

    def spy(step, optimizer, *args):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        decays[:] = [g["weight_decay"] for g in optimizer.param_groups]
        return real_step(step, optimizer, *args)

    data = TaskData(np.zeros((n, 4, 4, 3), np.uint8), np.arange(n), np.zeros(n, dtype=np.int64))
    task = SimpleNamespace(index=task_index, name=f"task {task_index}")
    trainer.train_step = spy
    try:
        run_phase(method, main_phase(method, task, data), cfg, task, data, lambda x, train: x.float(),
                  torch.device("cpu"), seed=0)
    finally:
        trainer.train_step = real_step
    return lrs, decays


def test_cosine_is_annealed_once_per_epoch_like_cosine_annealing_lr():
    # 4 epochs of 3 steps (10 images, batch 4): CosineAnnealingLR(T_max=4) stepped after each epoch gives epoch e
    # the lr 0.1 * (1 + cos(pi * e / 4)) / 2 for all its steps; the second group keeps its 10x ratio
    lrs, _ = _fit(TrainConfig(epochs=4, batch_size=4, lr=0.1, schedule="cosine"))
    by_hand = [0.1, 0.1 * (1 + math.cos(math.pi / 4)) / 2, 0.05, 0.1 * (1 + math.cos(3 * math.pi / 4)) / 2]
    assert len(lrs) == 12
    for step, (lr, lr10) in enumerate(lrs):
        assert lr == pytest.approx(by_hand[step // 3])
        assert lr10 == pytest.approx(10 * by_hand[step // 3])
    # the same with torch's own scheduler, stepped per epoch
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
    torch_lrs = []
    for _ in range(4):
        torch_lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert [lrs[3 * e][0] for e in range(4)] == pytest.approx(torch_lrs)


def test_iteration_unit_anneals_every_step():
    lrs, _ = _fit(TrainConfig(epochs=4, batch_size=4, lr=0.1, schedule="cosine", schedule_unit="iteration"))
    assert [lr for lr, _ in lrs] == pytest.approx([0.1 * (1 + math.cos(math.pi * s / 12)) / 2 for s in range(12)])


def test_step_decay_and_warmup_per_epoch():
    lrs, _ = _fit(TrainConfig(epochs=4, batch_size=4, lr=0.1, schedule="step", lr_milestones=(2,)))
    assert [lr for lr, _ in lrs] == pytest.approx([0.1] * 6 + [0.01] * 6)
    lrs, _ = _fit(TrainConfig(epochs=4, batch_size=4, lr=0.1, schedule="constant", warmup_epochs=2))
    assert [lr for lr, _ in lrs] == pytest.approx([0.05] * 3 + [0.1] * 9)
    with pytest.raises(CilbenchError, match="whole number"):
        _fit(TrainConfig(epochs=4, batch_size=4, warmup_epochs=0.5))
    with pytest.raises(CilbenchError, match="schedule_unit=iteration"):
        _fit(TrainConfig(epochs=4, batch_size=4, warmup_iterations=3))


def test_first_weight_decay_applies_to_the_first_task_only():
    cfg = TrainConfig(epochs=1, batch_size=4, weight_decay=2e-4, first_weight_decay=5e-4)
    assert _fit(cfg, task_index=0)[1] == [5e-4, 5e-4]
    assert _fit(cfg, task_index=1)[1] == [2e-4, 2e-4]
    assert _fit(TrainConfig(epochs=1, batch_size=4, weight_decay=2e-4), task_index=0)[1] == [2e-4, 2e-4]


# ---- the NaN guard on the device (CUDA's default; forced here on CPU, whose fused optimisers take found_inf) ----

class _Spiky(Method):
    """A small regression whose loss is NaN on the steps listed in ``nan_at`` (counted from 0)."""

    def __init__(self, cfg, nan_at=()):
        super().__init__(cfg, torch.nn.Identity(), None)
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(3, 2)
        self.nan_at, self.calls, self.after = set(nan_at), 0, 0

    def param_groups(self, task):
        return [dict(params=list(self.lin.parameters()))]

    def training_step(self, batch):
        x = batch.images.reshape(len(batch.images), -1)[:, :3]
        loss = (self.lin(x) - 1).pow(2).mean()
        loss = loss * float("nan") if self.calls in self.nan_at else loss
        self.calls += 1
        return loss

    def after_step(self, step):
        self.after += 1


def _spiky_fit(monkeypatch, deferred: bool, optimizer: str, nan_at=(), epochs=3):
    monkeypatch.setenv("CILBENCH_DEFERRED_GUARD", "1" if deferred else "0")
    from cilbench.engine.loader import TaskData

    cfg = TrainConfig(epochs=epochs, batch_size=4, lr=0.05, optimizer=optimizer, schedule="constant")
    method = _Spiky(cfg, nan_at)
    rng = np.random.default_rng(0)
    data = TaskData(rng.integers(0, 255, (12, 2, 2, 3)).astype(np.uint8), np.arange(12), np.zeros(12, np.int64))
    task = SimpleNamespace(index=0, name="task 0")
    stats = run_phase(method, main_phase(method, task, data), cfg, task, data, lambda x, train: x.float() / 255,
                      torch.device("cpu"), seed=0)
    return method, stats


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_the_device_guard_skips_bad_steps_as_the_host_guard_does(monkeypatch, optimizer):
    # steps 0 and 4 are NaN: the first (an SGD momentum buffer not yet made) and one mid-epoch
    host, host_stats = _spiky_fit(monkeypatch, False, optimizer, nan_at=(0, 4))
    dev, dev_stats = _spiky_fit(monkeypatch, True, optimizer, nan_at=(0, 4))
    assert host_stats.skipped_steps == dev_stats.skipped_steps == 2
    assert host_stats.steps == dev_stats.steps == 9
    for a, b in zip(host.lin.parameters(), dev.lin.parameters()):  # fused vs foreach kernels: rounding apart
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for name in ("loss",):  # per-epoch means over the finite steps only
        assert dev_stats.epoch_terms[name] == pytest.approx(host_stats.epoch_terms[name], rel=1e-5)
    assert host.after == 7 and dev.after == 9  # the device guard cannot know: after_step runs after every step
    # with no bad step at all the two paths train the same weights
    clean_host, _ = _spiky_fit(monkeypatch, False, optimizer)
    clean_dev, _ = _spiky_fit(monkeypatch, True, optimizer)
    for a, b in zip(clean_host.lin.parameters(), clean_dev.lin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("deferred", [False, True])
def test_ten_bad_steps_in_a_row_or_a_bad_last_step_stop_the_phase(monkeypatch, deferred):
    # the host guard stops at the 10th; the device guard reads its count every 10 steps and at the end (13 here)
    last = "13" if deferred else "10"
    with pytest.raises(CilbenchError, match=f"training diverged on task 0: the loss was not finite for the last {last} "
                                            "steps"):
        _spiky_fit(monkeypatch, deferred, "sgd", nan_at=range(2, 30), epochs=5)
    with pytest.raises(CilbenchError, match="not finite for the last 1 steps"):
        _spiky_fit(monkeypatch, deferred, "sgd", nan_at=(8,))
