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
