"""The LoRA baselines HAM is measured against (the issue "HAM, the LoRA family"): one LoRA for every task, and one
LoRA per task kept apart. Both use HAM's LoRA shape and recipe (``methods/ham.py``'s ``LoRAConfig``: rank 8,
alpha 16 on ``qkv`` + ``proj`` of the frozen ViT, Adam 5e-4, batch 128, 20 epochs, cosine; UNVERIFIED as HAM's, the
usual LoRA PTM-CIL recipe) and its classifier, a growing linear head trained with cross-entropy over the current
task's classes (PILOT's ``finetune`` loss scope), so the three differ only in what happens to the adapters.

* ``lora-seq``: one LoRA trained on every task in turn (never reset, never frozen): the LoRA lower bound, as
  ``finetune-adapter`` is the AdaptFormer one. ``classifier="prototype"`` as HAM's.
* ``lora-per-task``: a fresh LoRA per task, trained with that task's head rows, then stored apart (memory grows
  with the task count: HAM's foil). Test time needs the task: it is chosen per image by the nearest class prototype
  (cosine) of the frozen pre-trained backbone's features (class means of the training images, test transform, as
  SimpleCIL), the chosen class's task giving the adapter; then that adapter's features are scored by the head rows
  of that task's classes (every other class gets -1e9). Chosen over "each adapter's own features" (run every
  adapter on every image and keep the most confident): the frozen-backbone rule costs two forwards per image
  whatever the task count, and its features do not drift; the per-adapter rule costs T forwards and compares
  confidences of heads never trained against each other. The prototypes are a choice of ours, as is the -1e9.

InfLoRA (interference-free LoRA, constant memory like HAM) is ``methods/inflora.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from cilbench.methods.base import Method, register_method
from cilbench.methods.ham import QUICK_LORA, LoRAConfig, PrototypeOption, check_targets
from cilbench.models.ham import TaskLoRAStore
from cilbench.models.heads import GrowingLinear, PrototypeHead, class_means
from cilbench.models.peft import insert

UNCHOSEN = -1e9  # the score of every class outside the chosen task (lora-per-task)


class _LoRAHead(Method):
    """A frozen ViT with one live LoRA entry per target weight and a growing linear head (CE over the task's
    classes)."""

    Config = LoRAConfig
    quick = dict(QUICK_LORA)
    checkpoint_excludes = ("backbone.",)
    checkpoint_includes = (".lora.",)

    def __init__(self, cfg, backbone, scenario):
        super().__init__(cfg, backbone, scenario)
        self.backbone.requires_grad_(False)
        self.handle = insert(backbone, "lora", targets=check_targets(cfg.targets), r=cfg.lora_rank,
                             alpha=cfg.lora_alpha)
        self.head = GrowingLinear(backbone.feature_dim)

    def live_entries(self):
        return [bank.entries[0] for bank in self.handle.modules.values()]

    def param_groups(self, task):
        params = [p for e in self.live_entries() for p in (e.A, e.B)] + list(self.head.parameters())
        return [dict(params=params, lr=self.cfg.lr)]

    def training_step(self, batch):
        classes = self.cfg.loss_classes(batch.task, batch.labels.device)
        logits = self.head(self.backbone(batch.images), classes)
        return F.cross_entropy(logits.float(), batch.targets(classes), label_smoothing=self.cfg.label_smoothing)


@register_method("lora-seq", paper="sequential LoRA baseline (one LoRA tuned on every task, HAM's recipe)",
                 family="ptm-cil", backbone="vit-b16-in21k", backbone_family="vit",
                 summary="one LoRA + growing linear head tuned on every task in turn (LoRA lower bound)")
class LoRASeq(PrototypeOption, _LoRAHead):
    def __init__(self, cfg, backbone, scenario):
        super().__init__(cfg, backbone, scenario)
        self._init_prototypes(backbone.feature_dim)

    def before_task(self, task):
        self.head.grow(len(task.classes))
        self._grow_prototypes(task)

    def after_task(self, task, ctx):
        self._set_prototypes(task, ctx)


@register_method("lora-per-task", paper="one LoRA per task, task chosen by frozen-backbone prototypes (HAM's foil)",
                 family="ptm-cil", backbone="vit-b16-in21k", backbone_family="vit",
                 summary="a LoRA per task kept apart; test-time task = that of the nearest frozen-PTM class "
                         "prototype, scored by that task's adapter and head rows")
class LoRAPerTask(_LoRAHead):
    unused_settings = ("classifier",)  # the task's own head rows score, after the prototype task choice

    def __init__(self, cfg, backbone, scenario):
        super().__init__(cfg, backbone, scenario)
        self.store = TaskLoRAStore(dict(self.handle.modules))
        self.prototypes = PrototypeHead(backbone.feature_dim)
        self.register_buffer("class_task", torch.zeros(0, dtype=torch.long))

    def before_task(self, task):
        self.head.grow(len(task.classes))
        self.prototypes.grow(len(task.classes))
        self.class_task = torch.cat([self.class_task, self.class_task.new_full((len(task.classes),), task.index)])
        self.store.grow()
        with torch.no_grad():  # a fresh adapter (LoRA's init) for this task
            for e in self.live_entries():
                nn.init.kaiming_uniform_(e.A, a=math.sqrt(5))
                e.B.zero_()

    def plain(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen pre-trained backbone's features (every LoRA off)."""
        with self.handle.disabled():
            return self.backbone(images)

    def after_task(self, task, ctx):
        self.store.save(task.index)
        feats, labels = ctx.features(self.plain)
        classes = torch.tensor(task.classes, device=feats.device)
        self.prototypes.set(classes, class_means(feats, labels, classes))

    def select(self, features: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """The task of each image: that of the candidate class whose frozen-backbone prototype is nearest (cosine)."""
        nearest = self.prototypes(features, classes).argmax(dim=1)
        return self.class_task[classes[nearest]]

    def logits(self, images, classes):
        tasks = self.select(self.plain(images), classes)
        own = self.class_task[classes]
        out = torch.full((images.shape[0], len(classes)), UNCHOSEN, device=images.device)
        for t in torch.unique(tasks).tolist():
            rows = (tasks == t).nonzero().squeeze(1)
            cols = (own == t).nonzero().squeeze(1)
            self.store.load(t)
            scores = self.head(self.backbone(images[rows]), classes[cols]).float()
            out[rows[:, None], cols[None, :]] = scores
        return out
