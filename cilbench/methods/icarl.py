"""iCaRL: incremental classifier and representation learning (Rebuffi et al., CVPR 2017), as the DNE paper's
ResNet18 baseline (DNE §4: a CIFAR-modified ResNet18 trained from scratch, 2,000 exemplars).

Per task (the paper's Alg. 2-5):
* Training data: the task's images joined with the exemplar memory (``train_data``).
* Loss (Alg. 3, "UpdateRepresentation"): one sigmoid binary cross-entropy over every seen class's output, whose
  targets are the one-hot labels on the new classes and the previous network's sigmoid outputs on the old ones
  (classification + distillation); averaged over batch x classes as the official code (``.mean()``). The record
  splits it into its ``cls`` and ``kd`` shares (``kd`` = ``models.losses.kd_bce`` on the old columns).
* The previous network is a ``Teacher`` snapshot taken at the start of the task (so a resumed run has the same one).
* Memory (Alg. 4, 5): a fixed total of ``memory_size`` exemplars, ``memory_size // classes seen`` per class; old sets
  cut to their first exemplars, new ones chosen by herding on L2-normalised features (test transform).
* Inference (Alg. 1): nearest mean of exemplars, ``argmin_y |phi(x)/|phi(x)| - mu_y|`` with ``mu_y`` the normalised
  mean of the normalised exemplar features; the record's main score. The trained classifier's own argmax is the
  view ``cnn``.

Defaults (the paper §4 / srebuffi/iCaRL ``main_cifar_100_theano.py`` and PyCIL's early ``models/icarl.py`` port):
SGD momentum 0.9, lr 2.0 divided by 5 after epochs 49 and 63 of 70, weight decay 1e-5, batch 128 (the paper; PyCIL's
port uses 64), memory 2,000. Herding: the original iCaRL update (``herding_form="icarl"``, as DNE's code);
``--set herding_form=pycil`` gives PyCIL's. Class means are taken over the exemplars alone (the paper's Alg. 1; the
Theano code also averages horizontally flipped exemplars). Backbone ``resnet18-cifar`` with the ``cifar`` transform
(pad-4 random crop + flip, CIFAR mean / std); ``--backbone resnet18`` for ImageNet100. DNE's supplementary, which
holds its baselines' settings, is not available: these are iCaRL's own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from cilbench.data.memory import ExemplarMemory
from cilbench.methods.base import Method, TrainConfig, register_method
from cilbench.methods.contract import StepOutput
from cilbench.models.heads import GrowingLinear
from cilbench.models.losses import kd_bce
from cilbench.models.teacher import Teacher


@register_method("icarl", paper="Rebuffi et al., CVPR 2017 (iCaRL)", family="cil-scratch", backbone="resnet18-cifar",
                 backbone_family="cnn", summary="exemplar memory by herding, sigmoid classification + distillation "
                                                "from the previous network, nearest-mean-of-exemplars inference")
class ICaRL(Method):
    @dataclass
    class Config(TrainConfig):
        epochs: int = 70
        batch_size: int = 128
        lr: float = 2.0
        momentum: float = 0.9
        weight_decay: float = 1e-5
        schedule: str = "step"
        lr_milestones: tuple[int, ...] = (49, 63)
        lr_gamma: float = 0.2
        memory_size: int = 2000
        herding_form: str = "icarl"  # icarl (the original update, DNE's code) | pycil

        CHOICES = {**TrainConfig.CHOICES, "herding_form": ("icarl", "pycil")}

    # smoke profile (no reference): a narrow random ResNet, Adam, the light "quick" crops (any store size), few epochs
    quick = dict(optimizer="adam", lr=1e-3, epochs=8, batch_size=32, schedule="constant", lr_milestones=(),
                 transform="quick", memory_size=40)
    unused_settings = ("label_smoothing", "first_weight_decay")
    # PyCIL's pipelines (pad-4 crop / random-resized crop + flip + ColorJitter(brightness=63/255)): data.augment's
    # "cifar-pycil" / "imagenet-pycil"
    presets = {"cifar100": dict(transform="cifar-pycil"), "imagenet100": dict(transform="imagenet-pycil")}
    dataset_backbones = {"imagenet100": "resnet18"}  # the standard ResNet18 on ImageNet100 (DNE §4)

    def __init__(self, cfg, backbone, scenario):
        super().__init__(cfg, backbone, scenario)
        dim = backbone.feature_dim
        self.head = GrowingLinear(dim)
        self.memory = ExemplarMemory(total=cfg.memory_size, herding_form=cfg.herding_form)
        num_classes = sum(len(t.classes) for t in scenario.tasks)
        self.register_buffer("means", torch.zeros(num_classes, dim))  # mu_y of every class seen (Alg. 1)
        self.teacher: Teacher | None = None  # the network as the previous task left it (not in the state dict)

    def before_task(self, task):
        self.head.grow(len(task.classes))

    def before_fit(self, task, ctx):
        self.teacher = Teacher.snapshot(nn.ModuleList([self.backbone, self.head])) if task.index > 0 else None
        self._old = ctx.old

    def train_data(self, task, ctx):
        return self.memory.joined_with(ctx.train)

    def param_groups(self, task):
        return [dict(params=list(self.backbone.parameters()) + list(self.head.parameters()))]

    def training_step(self, batch):
        seen = torch.tensor(self.scenario.seen_classes(batch.task.index), device=batch.labels.device)
        logits = self.head(self.backbone(batch.images), seen).float()
        targets = F.one_hot(batch.targets(seen), len(seen)).float()
        n_old = len(self._old)
        new = F.binary_cross_entropy_with_logits(logits[:, n_old:], targets[:, n_old:])
        if n_old == 0:
            return StepOutput(new, {"cls": new})
        old = seen[:n_old]  # classes of earlier tasks come first among the seen (global ids in task order)
        with torch.no_grad():
            previous = self.teacher.run(lambda m: m[1](m[0](batch.images), old), batch.images).float()
        kd = kd_bce(logits[:, :n_old], previous)
        share = n_old / len(seen)  # one mean over batch x classes = the two means weighted by their columns
        cls, distil = (1 - share) * new, share * kd
        return StepOutput(cls + distil, {"cls": cls, "kd": distil})

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.backbone(images).float(), dim=1, eps=1e-8)

    def after_task(self, task, ctx):
        self.teacher = None
        feats, _ = ctx.features(self.backbone)  # herding on this task's images, test transform
        self.memory.update_from(ctx.train, feats, classes=ctx.new.tolist())
        exemplars = self.memory.as_task_data(ctx.train)
        feats, labels = ctx.features(self.embed, data=exemplars)  # mu_y from the (cut) exemplar sets
        for c in labels.unique().tolist():
            self.means[c] = F.normalize(feats[labels == c].mean(0), dim=0)
        ctx.log(memory=len(self.memory), per_class=self.memory.quota(len(ctx.seen)))

    def score_views(self, images, classes):
        feats = self.backbone(images)
        nme = -torch.cdist(F.normalize(feats.float(), dim=1, eps=1e-8), self.means[classes])
        return nme, {"cnn": self.head(feats, classes)}

    def logits(self, images, classes):
        return self.score_views(images, classes)[0]
