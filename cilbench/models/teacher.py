"""A frozen teacher for distillation (LwF, iCaRL, DNE / DyTox, PODNet, ZSCL): a copy of a module, kept out of its
owner's parameters, state dict and ``.to()``.

``Teacher.snapshot(module)`` deep-copies the module, turns off its gradients and puts it in eval mode (BatchNorm
uses its running statistics and never updates them; dropout is off). The owner stores it as a plain attribute
(``self.teacher = Teacher.snapshot(self.backbone)``): a ``Teacher`` is not an ``nn.Module``, so ``nn.Module`` does
not register it and it never appears in ``parameters()`` (the optimiser), ``state_dict()`` (the checkpoint),
``train()`` / ``eval()`` switches or ``.to()``. Calling it runs under ``torch.no_grad()`` and first moves it to the
device of its first tensor argument if it is elsewhere, so the owner need not move it (``teacher.to(device)``
does so explicitly).

Resume contract. A teacher is the model as it was at the end of the previous task (PyCIL ``after_task``:
``self._old_network = self._network.copy().freeze()``; DNE / DyTox: a frozen copy of the model after task t-1;
ZSCL's LwF: the previous task's checkpoint). The runner checkpoints the model after each task, so a run resumed
after task t-1 loads exactly that model. A method therefore takes the snapshot **at the start of task t, from its
own (possibly just loaded) weights** -- in ``before_fit``, which runs once per task and is not replayed on resume
-- never in ``after_task`` of t-1, which a resumed run does not repeat. The teacher is then the same tensors in the
resumed and the uninterrupted run, and nothing about it needs saving. A teacher that is the *original* pre-trained
model (ZSCL, iCaRL-in-MTIL) is snapshotted at the start of the first task, or rebuilt from the backbone's weights.

Deep-copying a ``Teacher`` gives an empty one: a snapshot of an owner that holds a teacher never drags the previous
teacher (and through it every older one) along.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, TypeVar

import torch
import torch.nn as nn

T = TypeVar("T")


class Teacher:
    """A frozen, unregistered copy of a module; call it like the module (no gradients)."""

    def __init__(self, module: nn.Module | None = None):
        self._module = module

    @classmethod
    def snapshot(cls, module: nn.Module) -> "Teacher":
        """A frozen deep copy of ``module`` as it is now (eval mode, ``requires_grad`` False)."""
        frozen = copy.deepcopy(module)
        frozen.requires_grad_(False)
        frozen.eval()
        return cls(frozen)

    @property
    def module(self) -> nn.Module:
        if self._module is None:
            raise RuntimeError("this teacher is empty (a deep copy of a teacher holds nothing); take a new snapshot")
        return self._module

    def __bool__(self) -> bool:
        return self._module is not None

    def to(self, device: torch.device | str) -> "Teacher":
        self.module.to(device)
        return self

    def _follow(self, args: tuple, kwargs: dict) -> None:
        tensor = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        current = next((t.device for t in (*self.module.parameters(), *self.module.buffers())), None)
        if tensor is not None and current is not None and tensor.device != current:
            self.module.to(tensor.device)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._follow(args, kwargs)
        with torch.no_grad():
            return self.module(*args, **kwargs)

    def run(self, fn: Callable[[nn.Module], T], *like: torch.Tensor) -> T:
        """``fn(module)`` under ``torch.no_grad()``, for entry points other than ``forward`` (e.g.
        ``teacher.run(lambda m: m.encode_text(tokens), tokens)``); ``like`` tensors say which device to be on."""
        self._follow(like, {})
        with torch.no_grad():
            return fn(self.module)

    def __deepcopy__(self, memo: dict) -> "Teacher":
        return Teacher(None)

    def __repr__(self) -> str:
        return f"Teacher({type(self._module).__name__ if self._module is not None else 'empty'})"
