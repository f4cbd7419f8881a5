"""The one training loop: optimiser from the method's param groups, warmup + cosine, bf16 autocast on CUDA,
NaN guard, progress and timings. Methods own losses and parameters; the trainer owns everything else.

Schedules move once per epoch by default (``schedule_unit="epoch"``): the lr of every group is set at the start of
epoch ``e`` from ``e`` alone, which is what the official PTM-CIL codes get from a torch scheduler stepped after each
epoch (``CosineAnnealingLR(T_max=epochs)``, ``MultiStepLR``). ``schedule_unit="iteration"`` (and every run counted in
``iterations``) moves it at every optimiser step."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from cilbench.data.augment import ImageTransform
from cilbench.engine.loader import BatchStream, TaskData
from cilbench.errors import CilbenchError
from cilbench.methods.base import Batch, Method, TrainConfig

MAX_BAD_STEPS = 10


@dataclass
class TrainStats:
    steps: int = 0
    images: int = 0
    seconds: float = 0.0
    data_wait_s: float = 0.0
    skipped_steps: int = 0
    final_loss: float | None = None

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# the TrainConfig fields only gradient training reads: a method that never trains lists them as unused
# (``unused_settings``), so ``cilbench methods info`` does not show them
TRAINING_SETTINGS: tuple[str, ...] = (
    "epochs", "first_epochs", "iterations", "batch_size", "optimizer", "lr", "momentum", "weight_decay",
    "first_weight_decay", "schedule", "schedule_unit", "lr_milestones", "lr_gamma", "warmup_epochs",
    "warmup_iterations", "min_lr", "label_smoothing")


def build_optimizer(groups: list[dict[str, Any]], cfg: TrainConfig,
                    weight_decay: float | None = None) -> torch.optim.Optimizer:
    """The optimiser over the trainable parameters of ``groups``; a group without ``lr`` takes ``cfg.lr``, one
    without ``weight_decay`` takes ``weight_decay`` (default ``cfg.weight_decay``)."""
    weight_decay = cfg.weight_decay if weight_decay is None else weight_decay
    groups = [dict(g, params=[p for p in g["params"] if p.requires_grad]) for g in groups]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("param_groups returned no trainable parameters")
    for g in groups:
        g.setdefault("lr", cfg.lr)
    name = cfg.optimizer.lower()
    if name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=weight_decay)
    raise CilbenchError(f"unknown optimizer {cfg.optimizer!r} (sgd, adamw, adam)")


SCHEDULES = ("cosine", "constant", "step")
SCHEDULE_UNITS = ("epoch", "iteration")


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float, steps_per_epoch: int = 1,
              milestones: tuple[int, ...] = (), gamma: float = 0.1) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from 1 to ``min_ratio``, constant, or step decay
    (``gamma`` per milestone epoch passed, as torch's MultiStepLR stepped per epoch)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        epoch = step // max(1, steps_per_epoch)
        return gamma ** sum(epoch >= m for m in milestones)
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_step(method: Method, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor, task,
               device: torch.device) -> torch.Tensor | None:
    """One optimiser step on a transformed batch; the detached loss, or None (no step) when it is not finite."""
    with autocast(device):
        loss = method.training_step(Batch(images, labels, task))
    optimizer.zero_grad(set_to_none=True)
    if not torch.isfinite(loss):
        return None
    loss.backward()
    optimizer.step()
    return loss.detach()


def weight_decay_for(cfg: TrainConfig, task) -> float:
    """``first_weight_decay`` on the first task when set (PILOT's finetune: ``init_weight_decay``), else
    ``weight_decay``."""
    if task.index == 0 and cfg.first_weight_decay is not None:
        return cfg.first_weight_decay
    return cfg.weight_decay


def epoch_schedule(cfg: TrainConfig, epochs: int) -> tuple[int, int]:
    """(total, warmup) of a schedule stepped once per epoch; warmup must be whole epochs."""
    if cfg.warmup_iterations:
        raise CilbenchError("warmup_iterations counts optimiser steps: use it with --set schedule_unit=iteration, "
                            "or warm up in whole epochs (warmup_epochs)")
    if cfg.warmup_epochs != int(cfg.warmup_epochs):
        raise CilbenchError(f"warmup_epochs={cfg.warmup_epochs:g} is not a whole number of epochs, which a schedule "
                            f"stepped per epoch needs; use --set schedule_unit=iteration")
    return epochs, int(cfg.warmup_epochs)


def _diverged(task, bad: int) -> CilbenchError:
    return CilbenchError(f"training diverged on {task.name}: the loss was not finite for the last {bad} steps; "
                         f"lower the learning rate (--set lr=...)")


def fit(method: Method, task, data: TaskData, transform: ImageTransform, device: torch.device, seed: int,
        progress: Callable[[str, int], Callable[[int, float], None]] | None = None) -> TrainStats:
    """Train ``method`` on one task's data. ``progress(description, total_steps)`` returns an ``update(n, loss)``."""
    stats = TrainStats()
    cfg: TrainConfig = method.cfg
    if cfg.schedule not in SCHEDULES:
        raise CilbenchError(f"unknown schedule {cfg.schedule!r} ({', '.join(SCHEDULES)})")
    if cfg.schedule_unit not in SCHEDULE_UNITS:
        raise CilbenchError(f"unknown schedule_unit {cfg.schedule_unit!r} ({', '.join(SCHEDULE_UNITS)})")
    groups = method.param_groups(task)
    if not groups or len(data) == 0:
        return stats
    optimizer = build_optimizer(groups, cfg, weight_decay_for(cfg, task))
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    steps_per_epoch = max(1, -(-len(data) // cfg.batch_size))
    total = cfg.iterations or method.epochs_for(task) * steps_per_epoch
    per_epoch = cfg.schedule_unit == "epoch" and not cfg.iterations
    if per_epoch:  # the schedule counts epochs: one lr per epoch
        sched_total, warmup = epoch_schedule(cfg, method.epochs_for(task))
        sched_steps_per_epoch = 1
    else:
        sched_total, sched_steps_per_epoch = total, steps_per_epoch
        warmup = cfg.warmup_iterations or int(round(cfg.warmup_epochs * steps_per_epoch))
    min_ratio = cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0
    update = progress(f"train {task.name}", total) if progress else (lambda n, loss: None)
    method.train()
    bad = 0
    start = time.perf_counter()
    epoch = 0
    while stats.steps < total:
        stream = BatchStream(data, cfg.batch_size, device, shuffle=True, seed=(seed, task.index, epoch))
        for raw in stream:
            if stats.steps >= total:
                break
            factor = lr_factor(epoch if per_epoch else stats.steps, sched_total, warmup, cfg.schedule, min_ratio,
                               sched_steps_per_epoch, tuple(cfg.lr_milestones), cfg.lr_gamma)
            for g, base in zip(optimizer.param_groups, base_lrs):
                g["lr"] = base * factor
            loss = train_step(method, optimizer, transform(raw.images, train=True), raw.labels, task, device)
            if loss is None:
                bad += 1
                stats.skipped_steps += 1
                if bad >= MAX_BAD_STEPS:
                    raise _diverged(task, bad)
            else:
                bad = 0
                stats.final_loss = float(loss)
            stats.steps += 1
            stats.images += len(raw.labels)
            update(1, stats.final_loss if stats.final_loss is not None else float("nan"))
        stats.data_wait_s += stream.wait_s
        epoch += 1
    if bad:  # the task ended on non-finite losses: the weights are broken, not a transient spike
        raise _diverged(task, bad)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    stats.seconds = time.perf_counter() - start
    method.eval()
    return stats
