"""Sequential fine-tuning (the lower bound) and joint training (the upper bound).

``finetune`` trains on each task in turn with a growing linear head, as PILOT's ``finetune``: the cross-entropy
covers the current task's classes only (``loss_scope="task"``; ``"seen"`` scores all seen classes), no memory, no
regularisation. ``mode="linear"`` freezes the backbone and trains only the head. ``joint`` trains once on every
class of the scenario (the record holds one row).
Defaults follow PILOT's finetune config for ViT-B/16: SGD, momentum 0.9, lr 0.01 (backbone lr the same), wd 5e-4,
batch 48, 20 epochs on the first task and 10 after (cosine, no warmup).
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
        backbone_lr: float | None = None  # None: same as lr
        epochs: int = 10
        first_epochs: int | None = 20
        batch_size: int = 48
        lr: float = 0.01

    quick = dict(epochs=2, first_epochs=2, batch_size=32)

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
        targets = torch.searchsorted(classes, batch.labels)  # classes are sorted global ids
        logits = self.head(self.backbone(batch.images), classes)
        return F.cross_entropy(logits.float(), targets, label_smoothing=self.cfg.label_smoothing)

    def logits(self, images, classes):
        return self.head(self.backbone(images), classes)


@register_method("joint", paper="joint training upper bound", family="baseline", backbone="vit-b16-in21k",
                 backbone_family="vit", summary="fine-tune on all classes at once (upper bound)")
class Joint(Finetune):
    merges_tasks = True

    @dataclass
    class Config(Finetune.Config):
        loss_scope: str = "seen"
        epochs: int = 20
        first_epochs: int | None = None
