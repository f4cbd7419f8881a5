"""Sequential fine-tuning (the lower bound) and joint training (the upper bound).

``finetune`` trains on each task in turn with a growing linear head, as PILOT's ``finetune``: the cross-entropy
covers the current task's classes only (``loss_scope="task"``; ``"seen"`` scores all seen classes), no memory, no
regularisation. ``mode="linear"`` freezes the backbone and trains only the head. ``joint`` trains once on every
class of the scenario (the record has one row).

Defaults: PILOT ``exps/finetune.json`` (the same in ``exps/finetune_inr.json``) read by ``models/finetune.py``: SGD
momentum 0.9 over all parameters at one lr, ``init_lr`` = ``lrate`` = 1e-3, batch 128, ``init_epoch`` = ``epochs``
= 20 on every task, weight decay ``init_weight_decay`` 5e-4 on the first task (``first_weight_decay``) and
``weight_decay`` 2e-4 after; ``MultiStepLR`` stepped per epoch with milestones [40, 70] (first task [60, 120, 170]),
gamma 0.1, none of which falls inside 20 epochs: the lr stays at 1e-3 (``schedule="step"``, ``lr_milestones``
(40, 70)). PILOT's config names ``vit_base_patch16_224``, which timm resolves to the IN21k model fine-tuned on
IN1k (``--backbone vit-b16-in1k``); the EASE / MOS tables report Finetune on ViT-B/16 IN21k, cilbench's default.
``joint`` (no PILOT config) keeps these settings on one task, so it uses 5e-4.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cilbench.errors import CilbenchError
from cilbench.methods.base import Method, TrainConfig, register_method
from cilbench.models.heads import GrowingLinear


@register_method("finetune", paper="sequential fine-tuning baseline (PILOT finetune)", family="baseline",
                 backbone="vit-b16-in21k", backbone_family="vit",
                 summary="fine-tune backbone (full) or head only (linear) on each task in turn")
class Finetune(Method):
    @dataclass
    class Config(TrainConfig):
        mode: str = "full"  # full | linear
        loss_scope: str = "task"  # task: CE over the current task's classes (PILOT); seen: over all seen classes
        backbone_lr: float | None = None  # None: same as lr (PILOT: one group)
        epochs: int = 20
        first_epochs: int | None = None
        batch_size: int = 128
        lr: float = 1e-3
        weight_decay: float = 2e-4
        first_weight_decay: float | None = 5e-4
        schedule: str = "step"
        lr_milestones: tuple[int, ...] = (40, 70)
        schedule_unit: str = "epoch"

        CHOICES = {**TrainConfig.CHOICES, "mode": ("full", "linear"), "loss_scope": ("task", "seen")}

    # smoke profile (no reference): Adam and the light "quick" crops, so the tiny random ViT visibly learns digits
    quick = dict(optimizer="adam", lr=3e-3, epochs=10, batch_size=16, transform="quick")

    def __init__(self, cfg, backbone, scenario):
        super().__init__(cfg, backbone, scenario)
        if cfg.mode not in ("full", "linear"):
            raise CilbenchError(f"finetune mode must be full or linear, not {cfg.mode!r}")
        if cfg.loss_scope not in ("task", "seen"):
            raise CilbenchError(f"finetune loss_scope must be task or seen, not {cfg.loss_scope!r}")
        self.backbone.requires_grad_(cfg.mode == "full")
        self.head = GrowingLinear(backbone.feature_dim)
        self._task_classes: torch.Tensor | None = None

    @property
    def checkpoint_excludes(self):  # type: ignore[override]
        return ("backbone.",) if self.cfg.mode == "linear" else ()

    def before_task(self, task):
        self.head.grow(len(task.classes))

    def param_groups(self, task):
        groups = [dict(params=list(self.head.parameters()), lr=self.cfg.lr)]
        if self.cfg.mode == "full":
            groups.append(dict(params=list(self.backbone.parameters()), lr=self.cfg.backbone_lr or self.cfg.lr))
        return groups

    def training_step(self, batch):
        task = batch.task
        if self.cfg.loss_scope == "task":
            classes = torch.tensor(task.classes, device=batch.labels.device)
        else:
            classes = torch.arange(task.classes[-1] + 1, device=batch.labels.device)
        logits = self.head(self.backbone(batch.images), classes)
        targets = batch.targets(classes)
        return F.cross_entropy(logits.float(), targets, label_smoothing=self.cfg.label_smoothing)

    def logits(self, images, classes):
        return self.head(self.backbone(images), classes)


@register_method("joint", paper="joint training upper bound", family="baseline", backbone="vit-b16-in21k",
                 backbone_family="vit", summary="fine-tune on all classes at once (upper bound)")
class Joint(Finetune):
    merges_tasks = True

    quick = dict(Finetune.quick, lr=1e-3)  # one 10-class task learns best at a lower rate (measured)

    @dataclass
    class Config(Finetune.Config):
        loss_scope: str = "seen"
