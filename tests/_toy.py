"""Toy fixtures the method tests share: a class-incremental scenario of consecutive classes, and random weights."""

from __future__ import annotations

import torch

from cilbench.data.scenario import Scenario, Task


def toy_scenario(num_classes: int = 6, per_task: int = 2) -> Scenario:
    """B0Inc``per_task`` over classes 0..num_classes-1 in order (source labels = global ids), dataset "toy"."""
    tasks = [Task(t, f"task {t}", "toy", tuple(range(t * per_task, (t + 1) * per_task)),
                  tuple(range(t * per_task, (t + 1) * per_task))) for t in range(num_classes // per_task)]
    return Scenario("cil", "toy", f"B0Inc{per_task}", num_classes, tasks)


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Add N(0, 0.3^2) noise to every parameter (a reproducible non-trivial state)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


# DyTox's loss (shared by DyTox and DNE) on a hand example: 4 seen classes, 2 of them old, the divergence head over
# the old classes folded into 0 plus the 2 new ones, default BCE and div_weight 0.1
HAND_LOGITS = torch.tensor([[2.0, -1.0, 0.5, 0.0], [0.0, 1.0, -2.0, 1.5], [1.0, 1.0, 1.0, -1.0]])
HAND_TEACHER = torch.tensor([[1.0, 0.0], [-1.0, 2.0], [0.5, 0.5]])
HAND_DIV = torch.tensor([[0.3, -0.2, 0.1], [1.0, 0.0, -1.0], [0.0, 0.5, 0.5]])
HAND_LABELS = torch.tensor([2, 1, 3])


def dytox_terms_by_hand(reduction: str) -> dict[str, torch.Tensor]:
    """The terms of the hand example written out: ``(1 - lam) BCE``, ``lam tau^2 KL`` (tau 1; per sample then the
    batch mean, or torch's mean over batch x classes) and ``0.1 BCE`` of the divergence head, lam = 2 / 4."""
    import torch.nn.functional as F

    logits, teacher, div, labels = HAND_LOGITS, HAND_TEACHER, HAND_DIV, HAND_LABELS
    lam = 2 / 4  # old classes / seen classes
    onehot = F.one_hot(labels, 4).float()
    bce = -(onehot * F.logsigmoid(logits) + (1 - onehot) * F.logsigmoid(-logits)).mean()
    p = teacher.softmax(1)
    kl_rows = (p * (p.log() - logits[:, :2].log_softmax(1))).sum(1)
    kl = kl_rows.mean() if reduction == "batchmean" else kl_rows.sum() / (3 * 2)
    div_targets = F.one_hot(torch.tensor([1, 0, 2]), 3).float()  # old classes -> 0, new class k -> k + 1
    div_bce = -(div_targets * F.logsigmoid(div) + (1 - div_targets) * F.logsigmoid(-div)).mean()
    return {"cls": (1 - lam) * bce, "kd": lam * kl, "div": 0.1 * div_bce}
