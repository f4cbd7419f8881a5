"""The one training loop, for every gradient phase: a method's main phase and any second phase (classifier
alignment on sampled features, balanced finetuning on a memory, ...) are ``Phase``s (``methods.contract``) run by
``run_phase``. It owns the optimiser (built from the phase's parameter groups), warmup and schedules, bf16 autocast
on CUDA, frozen modules kept in eval mode, aux streams, the NaN guard, progress, timings, and the per-epoch means of
the loss and of every named term a step returns (``StepOutput``). Methods own losses and parameters.

Nothing in the loop waits for the GPU: losses and terms are summed on the device and read once per epoch, and on
CUDA the NaN guard stays on the device too (``deferred_guard``: torch's fused optimiser skips a non-finite step
itself, the host reads the count of bad steps every ``MAX_BAD_STEPS`` steps).

Schedules move once per epoch by default (``schedule_unit="epoch"``): the lr of every group is set at the start of
epoch ``e`` from ``e`` alone, which is what the official PTM-CIL codes get from a torch scheduler stepped after each
epoch (``CosineAnnealingLR(T_max=epochs)``, ``MultiStepLR``). ``schedule_unit="iteration"`` (and every phase counted
in ``iterations``) moves it at every optimiser step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from cilbench.data.augment import ImageTransform
from cilbench.engine.loader import BatchStream, TaskData
from cilbench.errors import CilbenchError
from cilbench.methods.base import TrainConfig
from cilbench.methods.contract import Batch, Phase, PhaseStats, Sampled, StepOutput, Stream

MAX_BAD_STEPS = 10


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass(frozen=True)
class Settings:
    """A phase's effective settings: the phase's own where it sets them, else the method config's."""

    epochs: int
    iterations: int | None
    batch_size: int
    optimizer: str
    lr: float
    momentum: float
    weight_decay: float
    schedule: str
    schedule_unit: str
    warmup_epochs: float
    warmup_iterations: int
    min_lr: float
    lr_milestones: tuple[int, ...]
    lr_gamma: float

    @classmethod
    def of(cls, phase: Phase, cfg: TrainConfig) -> "Settings":
        own = {f.name: getattr(phase, f.name) for f in dataclasses.fields(cls) if hasattr(phase, f.name)}
        values = {name: own[name] if own.get(name) is not None else getattr(cfg, name)
                  for name in (f.name for f in dataclasses.fields(cls))}
        if phase.epochs is not None or phase.iterations is not None:
            values["iterations"] = phase.iterations  # a phase that states its length is not lengthened by the config
        if phase.warmup_epochs is not None:
            values["warmup_iterations"] = 0
        values["lr_milestones"] = tuple(values["lr_milestones"])
        s = cls(**values)
        if s.schedule not in SCHEDULES:
            raise CilbenchError(f"unknown schedule {s.schedule!r} ({', '.join(SCHEDULES)})")
        if s.schedule_unit not in SCHEDULE_UNITS:
            raise CilbenchError(f"unknown schedule_unit {s.schedule_unit!r} ({', '.join(SCHEDULE_UNITS)})")
        return s


def build_optimizer(groups: list[dict[str, Any]], s: Settings | TrainConfig,
                    weight_decay: float | None = None, fused: bool = False) -> torch.optim.Optimizer:
    """The optimiser over the trainable parameters of ``groups``; a group without ``lr`` takes ``s.lr``, one
    without ``weight_decay`` takes ``weight_decay`` (default ``s.weight_decay``). ``fused``: torch's fused kernels,
    which can skip a step on the device (``train_step(deferred=True)``); SGD's momentum buffers then start at zero,
    which with no dampening is exactly torch's first step (buffer = gradient) and keeps a skipped first step from
    leaving the fused kernel's uninitialised buffer behind."""
    weight_decay = s.weight_decay if weight_decay is None else weight_decay
    groups = [dict(g, params=[p for p in g["params"] if p.requires_grad]) for g in groups]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("param_groups returned no trainable parameters")
    for g in groups:
        g.setdefault("lr", s.lr)
    name = s.optimizer.lower()
    extra = dict(fused=True) if fused else {}
    if name == "sgd":
        opt = torch.optim.SGD(groups, lr=s.lr, momentum=s.momentum, weight_decay=weight_decay, **extra)
        if fused and s.momentum > 0:
            for p in (p for g in opt.param_groups for p in g["params"]):
                opt.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return opt
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=s.lr, weight_decay=weight_decay, **extra)
    if name == "adam":
        return torch.optim.Adam(groups, lr=s.lr, weight_decay=weight_decay, **extra)
    raise CilbenchError(f"unknown optimizer {s.optimizer!r} (sgd, adamw, adam)")


def deferred_guard(device: torch.device) -> bool:
    """Whether the NaN guard runs on the device (CUDA; ``CILBENCH_DEFERRED_GUARD=0/1`` forces it off / on): a
    non-finite step is then skipped by the fused optimiser itself (its ``found_inf``) and the host reads the count
    of bad steps every ``MAX_BAD_STEPS`` steps and once per epoch, instead of waiting for the GPU at every step."""
    forced = os.environ.get("CILBENCH_DEFERRED_GUARD")
    return device.type == "cuda" if forced is None else forced == "1"


SCHEDULES = ("cosine", "constant", "step", "quarter-cosine")
SCHEDULE_UNITS = ("epoch", "iteration")


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float, steps_per_epoch: int = 1,
              milestones: tuple[int, ...] = (), gamma: float = 0.1) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from 1 to ``min_ratio``, constant, step decay (``gamma`` per
    milestone epoch passed, as torch's MultiStepLR stepped per epoch), or CODA-Prompt's quarter cosine
    ``cos(99 pi s / (200 (S - 1)))`` over the ``S`` steps after warmup (its ``CosineSchedule``: 1 at the first step,
    about 0.016 at the last)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        epoch = step // max(1, steps_per_epoch)
        return gamma ** sum(epoch >= m for m in milestones)
    if schedule == "quarter-cosine":
        span = max(1, total - warmup - 1)
        return math.cos(99 * math.pi * min(step - warmup, span) / (200 * span))
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_step(step: Callable[[Batch], Any], optimizer: torch.optim.Optimizer, batch: Batch, device: torch.device,
               low_precision: bool = True, deferred: bool = False
               ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """One optimiser step: the detached loss and the step's named terms. A non-finite loss is never stepped on:
    the loss is then None (the host checks it), or with ``deferred`` (a fused optimiser) it is returned as it is
    and the optimiser skips the update on the device, without the host waiting for the GPU."""
    with autocast(device) if low_precision else contextlib.nullcontext():
        out = step(batch)
    loss, terms = (out.loss, out.terms) if isinstance(out, StepOutput) else (out, {})
    optimizer.zero_grad(set_to_none=True)
    if deferred:
        optimizer.found_inf, optimizer.grad_scale = (~torch.isfinite(loss.detach())).float(), None
        try:
            loss.backward()
            optimizer.step()
        finally:
            del optimizer.found_inf, optimizer.grad_scale
    elif not torch.isfinite(loss):
        return None, {}
    else:
        loss.backward()
        optimizer.step()
    return loss.detach(), {k: v.detach() if isinstance(v, torch.Tensor) else torch.tensor(float(v))
                           for k, v in terms.items()}


def weight_decay_for(cfg: TrainConfig, task) -> float:
    """``first_weight_decay`` on the first task when set (PILOT's finetune: ``init_weight_decay``), else
    ``weight_decay``."""
    if task.index == 0 and cfg.first_weight_decay is not None:
        return cfg.first_weight_decay
    return cfg.weight_decay


def epoch_schedule(s: Settings) -> tuple[int, int]:
    """(total, warmup) of a schedule stepped once per epoch; warmup must be whole epochs."""
    if s.warmup_iterations:
        raise CilbenchError("warmup_iterations counts optimiser steps: use it with --set schedule_unit=iteration, "
                            "or warm up in whole epochs (warmup_epochs)")
    if s.warmup_epochs != int(s.warmup_epochs):
        raise CilbenchError(f"warmup_epochs={s.warmup_epochs:g} is not a whole number of epochs, which a schedule "
                            f"stepped per epoch needs; use --set schedule_unit=iteration")
    return s.epochs, int(s.warmup_epochs)


def _diverged(task, phase: Phase, bad: int) -> CilbenchError:
    what = "training" if phase.name == "train" else f"the {phase.name} phase"
    return CilbenchError(f"{what} diverged on {task.name}: the loss was not finite for the last {bad} steps; "
                         f"{phase.divergence_hint}")


class _NanGuard:
    """Consecutive non-finite steps: a phase stops after ``MAX_BAD_STEPS`` of them in a row, or when it ends on
    one (the weights are broken, not a transient spike). Counted on the host, or on the device when ``deferred``
    and read every ``MAX_BAD_STEPS`` steps (the optimiser skipped each bad step itself)."""

    def __init__(self, device: torch.device, deferred: bool):
        self.deferred = deferred
        zero = torch.zeros((), dtype=torch.long, device=device) if deferred else 0
        self.run = self.worst = self.skipped = zero

    def step(self, bad: bool | torch.Tensor) -> None:
        if self.deferred:
            bad = bad.long()
            self.run = (self.run + 1) * bad
            self.worst = torch.maximum(self.worst, self.run)
        else:
            self.run = (self.run + 1) * int(bad)
            self.worst = max(self.worst, self.run)
        self.skipped = self.skipped + bad

    def check(self, task, phase: Phase, steps: int, final: bool = False) -> None:
        if self.deferred and not final and steps % MAX_BAD_STEPS:
            return
        run, worst = int(self.run), int(self.worst)
        if worst >= MAX_BAD_STEPS:
            raise _diverged(task, phase, worst)
        if final and run:
            raise _diverged(task, phase, run)


class _Epochs:
    """Per-epoch batches of a phase's data: store images (shuffled, transformed on the device) or ``Sampled``
    inputs drawn afresh each epoch (shuffled with one generator for the phase, used as they are)."""

    def __init__(self, data: Any, batch_size: int, transform: ImageTransform, augment: bool, device: torch.device,
                 seed: int, task_index: int):
        self.data, self.bs, self.transform, self.augment = data, batch_size, transform, augment
        self.device, self.seed, self.task_index = device, seed, task_index
        self.sampled = isinstance(data, Sampled)
        self.gen = torch.Generator().manual_seed(seed) if self.sampled else None
        self.wait_s = 0.0
        self._first: tuple[torch.Tensor, torch.Tensor] | None = None

    def steps_per_epoch(self) -> int:
        if self.sampled:
            self._first = self.data.draw(0)
            return max(1, -(-self._first[1].shape[0] // self.bs))
        return max(1, -(-len(self.data) // self.bs))

    @property
    def empty(self) -> bool:
        return not self.sampled and len(self.data) == 0

    def batches(self, epoch: int):
        """(inputs, labels) of each step of ``epoch``; inputs are images transformed for training or sampled."""
        if self.sampled:
            inputs, labels = self._first if (epoch == 0 and self._first is not None) else self.data.draw(epoch)
            self._first = None
            n = labels.shape[0]
            order = torch.randperm(n, generator=self.gen).to(labels.device)
            dim = self.data.batch_dim % inputs.dim()
            for i in range(-(-n // self.bs)):
                idx = order[i * self.bs:(i + 1) * self.bs]
                yield inputs.index_select(dim, idx), labels[idx]
            return
        stream = BatchStream(self.data, self.bs, self.device, shuffle=True, seed=(self.seed, self.task_index, epoch))
        try:
            for raw in stream:
                yield self.transform(raw.images, train=self.augment), raw.labels
        finally:
            self.wait_s += stream.wait_s


class _Aux:
    """One batch of each aux stream per step, cycling through each stream's shuffled epochs."""

    def __init__(self, streams: dict[str, Any], batch_size: int, transform: ImageTransform, device: torch.device,
                 seed: int, task_index: int):
        streams = {name: s if isinstance(s, Stream) else Stream(s) for name, s in streams.items()}
        self.augment = {name: s.augment for name, s in streams.items()}
        self.streams = {name: (s.data, iter(())) for name, s in streams.items()}
        self.epochs = {name: 0 for name in streams}
        self.bs, self.transform, self.device, self.seed, self.task_index = batch_size, transform, device, seed, \
            task_index

    def next(self, task) -> dict[str, Batch]:
        out = {}
        for k, (name, (data, it)) in enumerate(self.streams.items()):
            raw = next(it, None)
            if raw is None:
                it = iter(BatchStream(data, self.bs, self.device, shuffle=True,
                                      seed=(self.seed, self.task_index, 1000 + k, self.epochs[name])))
                self.epochs[name] += 1
                self.streams[name] = (data, it)
                raw = next(it)
            out[name] = Batch(self.transform(raw.images, train=self.augment[name]), raw.labels, task)
        return out


def main_phase(method, task, data: Any, aux: dict[str, Any] | None = None) -> Phase:
    """The main phase of a task, from the method's hooks: its data, parameter groups, step, epochs (``first_epochs``
    on the first task), weight decay (``first_weight_decay`` on the first task), lr milestones (a method config's
    ``first_lr_milestones`` on the first task, where it has one: DER), aux streams, ``after_step`` and frozen
    modules."""
    first_milestones = getattr(method.cfg, "first_lr_milestones", None)
    milestones = tuple(first_milestones) if task.index == 0 and first_milestones is not None else None
    return Phase("train", method.training_step, method.param_groups(task), data=data, epochs=method.epochs_for(task),
                 iterations=method.cfg.iterations, weight_decay=weight_decay_for(method.cfg, task), aux=aux or {},
                 after_step=method.after_step, frozen=tuple(method.frozen_modules()), lr_milestones=milestones)


def run_phase(method: torch.nn.Module, phase: Phase, cfg: TrainConfig, task, train_data: TaskData,
              transform: ImageTransform, device: torch.device, seed: int,
              progress: Callable[[str, int], Callable[[int, float | None], None]] | None = None) -> PhaseStats:
    """Run one gradient phase. ``train_data`` is the data of a phase that names none; ``seed`` the task's seed
    (image phases shuffle with (seed, task, epoch); sampled phases with one generator seeded by ``phase.seed``)."""
    stats = PhaseStats()
    s = Settings.of(phase, cfg)
    data = train_data if phase.data is None else phase.data
    seed = seed if phase.seed is None else phase.seed
    epochs = _Epochs(data, s.batch_size, transform, phase.augment, device, seed, task.index)
    if not phase.params or epochs.empty:
        return stats
    deferred = stats.fused_optimizer = deferred_guard(device)
    optimizer = build_optimizer(phase.params, s, fused=deferred)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    steps_per_epoch = epochs.steps_per_epoch()
    total = s.iterations or s.epochs * steps_per_epoch
    if total <= 0:
        return stats
    per_epoch = s.schedule_unit == "epoch" and not s.iterations
    if per_epoch:  # the schedule counts epochs: one lr per epoch
        sched_total, warmup = epoch_schedule(s)
        sched_steps_per_epoch = 1
    else:
        sched_total, sched_steps_per_epoch = total, steps_per_epoch
        warmup = s.warmup_iterations or int(round(s.warmup_epochs * steps_per_epoch))
    min_ratio = s.min_lr / s.lr if s.lr > 0 else 0.0
    update = progress(f"{phase.name} {task.name}", total) if progress else (lambda n, loss: None)
    low_precision = not epochs.sampled  # sampled features are float32 statistics: no bf16 there
    if not epochs.sampled:  # an image phase trains the model; a sampled phase leaves modes as the method set them
        method.train()
    for module in phase.frozen:
        module.eval()
    aux = _Aux(dict(phase.aux), s.batch_size, transform, device, seed, task.index) if phase.aux else None
    guard = _NanGuard(device, deferred)
    start = time.perf_counter()
    epoch = 0
    last: torch.Tensor | None = None
    while stats.steps < total:
        sums: dict[str, torch.Tensor] = {}
        counted: torch.Tensor | int = 0
        for inputs, labels in epochs.batches(epoch):
            if stats.steps >= total:
                break
            factor = lr_factor(epoch if per_epoch else stats.steps, sched_total, warmup, s.schedule, min_ratio,
                               sched_steps_per_epoch, s.lr_milestones, s.lr_gamma)
            for g, base in zip(optimizer.param_groups, base_lrs):
                g["lr"] = base * factor
            batch = Batch(inputs, labels, task, aux.next(task) if aux else {})
            loss, terms = train_step(phase.step, optimizer, batch, device, low_precision, deferred)
            if loss is None:  # the host guard saw a non-finite loss: no step was taken
                guard.step(True)
            else:  # with the device guard a non-finite step was skipped by the optimiser: masked on the device
                good = torch.isfinite(loss) if deferred else None
                guard.step(~good if deferred else False)
                counted = counted + (good.long() if deferred else 1)
                for name, value in (("loss", loss), *terms.items()):
                    value = torch.where(good, value.float(), 0.0) if deferred else value.float()
                    sums[name] = sums[name] + value if name in sums else value
                last = torch.where(good, loss, last) if deferred and last is not None else loss
                if phase.after_step is not None:
                    phase.after_step(stats.steps)
            stats.steps += 1
            stats.images += int(labels.shape[0])
            guard.check(task, phase, stats.steps)
            update(1, None)
        counted = int(counted)
        if counted:  # losses and terms reach the host once per epoch
            for name, total_value in sums.items():
                stats.epoch_terms.setdefault(name, []).append(round(float(total_value) / counted, 6))
            stats.final_loss = float(last)
            update(0, stats.final_loss)
        epoch += 1
    guard.check(task, phase, stats.steps, final=True)
    stats.skipped_steps = int(guard.skipped)
    stats.data_wait_s = epochs.wait_s
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    stats.seconds = time.perf_counter() - start
    method.eval()
    return stats
