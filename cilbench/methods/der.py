"""DER: dynamically expandable representation (Yan, Xie, He; CVPR 2021), as the DNE paper's ResNet18 baseline
(DNE §4: a CIFAR-modified ResNet18 trained from scratch, 2,000 exemplars).

Per task t:
* Structure (``before_task``, replayed on resume): a new feature extractor of the backbone's registered shape
  (``build_backbone(spec.name, pretrained=False)``). PyCIL's ``DERNet.update_fc`` starts it from the previous
  extractor's weights (``new_init="previous"``, the default; deterministic, so a resumed run rebuilds the same
  start); ``new_init="random"`` gives a fresh random init, drawn after the runner's per-task ``seed_everything``, so
  a resumed run draws it again identically. The old extractors are frozen (``requires_grad`` off, eval mode through
  ``frozen_modules``: their BatchNorm statistics do not move).
* Features: the extractors' pooled features concatenated, ``[phi_1(x), ..., phi_t(x)]``.
* Classifier: one linear layer over every seen class on the concatenated features, grown each task; the old block
  (old classes x old features) is copied, the rest initialised afresh (PyCIL ``update_fc``).
* Auxiliary classifier: a new linear layer on the new extractor's features with |new classes| + 1 outputs, every
  old class folded into output 0 and the k-th new class at output k + 1 (the paper's auxiliary loss; PyCIL
  ``aux_targets``).
* Loss: CE over the seen classes + ``aux_weight`` x the auxiliary CE (weight 1 as PyCIL's ``der.py``); on the first
  task the CE alone. The record splits it into ``ce`` and ``aux``.
* Memory: ``memory_size`` exemplars in all (2,000 as DNE sets it), herding on the concatenated features (PyCIL
  ``build_rehearsal_memory`` on ``extract_vector``), joined to each task's data.
* Balanced finetuning (the paper's classifier-learning stage; the official code's ``decouple`` block), after each task
  from the second, once the memory is updated: the classifier is re-initialised (``ft_reset``, as the official
  ``classifier.reset_parameters()``) and retrained alone, extractors frozen in eval mode, on a class-balanced set
  from the memory (``methods.balanced``), with the logits divided by ``ft_temperature``. PyCIL's DER replaces this
  stage with weight aligning; ``ft_epochs=0`` turns it off.
* Inference: argmax of the classifier over the candidate classes.

Left out: the channel-level masks and the sparsity loss used for pruning (the paper's dynamic expansion / pruning;
PyCIL's port and the official ``der_womask`` configs leave them out too), and the official code's 10-epoch warmup.

Defaults. Main phase from PyCIL ``models/der.py`` (``exps/der.json`` only names the scenario, memory 2000 with
``fixed_memory`` False): SGD momentum 0.9, lr 0.1, batch 128; first task 200 epochs with weight decay 5e-4, lr
divided by 10 after epochs 60, 120 and 170 (``first_lr_milestones``); later tasks 170 epochs with weight decay 2e-4,
divided by 10 after epochs 80, 120 and 150. ``cilbench run der --joint`` (the suites' "Joint (ResNet18)") is the
first task's recipe on every class at once: one ResNet18 and its classifier under cross-entropy. Balanced finetuning from the
official ``exps/der_womask/cifar100/b0/10steps/configs/1.yaml`` ``decouple``: 30 epochs, lr 0.1 divided by 10 after
epoch 15, weight decay 5e-4, temperature 5.0, batch 128 (the config's batch size). UNVERIFIED: the finetuning
optimiser (SGD with the main momentum assumed), the classifier's bias (PyCIL has one, the official config
``use_bias: False``; kept), and the herding form (PyCIL's, ``herding_form="pycil"``). DNE's supplementary, which
holds its baselines' settings, is not available. Backbone ``resnet18-cifar`` (``--backbone resnet18`` for
ImageNet100).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from cilbench.data.memory import ExemplarMemory
from cilbench.methods.balanced import balanced_phase
from cilbench.methods.base import Method, TrainConfig, register_method
from cilbench.methods.contract import Batch, StepOutput
from cilbench.models.backbones import build_backbone


def _linear_init(out_dim: int, in_dim: int, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """nn.Linear's default initialisation (kaiming-uniform a=sqrt(5) = uniform(+-1/sqrt(in)) for the weight)."""
    bound = 1 / math.sqrt(in_dim) if in_dim else 0.0
    w = (torch.rand(out_dim, in_dim, generator=generator) * 2 - 1) * bound
    b = (torch.rand(out_dim, generator=generator) * 2 - 1) * bound
    return w.to(device), b.to(device)


class ExpandingLinear(nn.Module):
    """A linear classifier whose rows (classes) and columns (features) grow: ``grow(new_classes, new_features)``
    keeps the old block and initialises the new rows and columns (PyCIL ``DERNet.update_fc``)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(0, 0))
        self.bias = nn.Parameter(torch.empty(0))

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    @property
    def in_dim(self) -> int:
        return self.weight.shape[1]

    def grow(self, new_classes: int, new_features: int) -> None:
        rows, cols = self.num_classes + new_classes, self.in_dim + new_features
        w, b = _linear_init(rows, cols, device=self.weight.device)
        w[:self.num_classes, :self.in_dim] = self.weight.data
        b[:self.num_classes] = self.bias.data
        self.weight = nn.Parameter(w)
        self.bias = nn.Parameter(b)

    def reset(self, generator: torch.Generator | None = None) -> None:
        """Re-initialise every weight (the official DER's ``classifier.reset_parameters()`` before finetuning)."""
        w, b = _linear_init(self.num_classes, self.in_dim, generator, self.weight.device)
        with torch.no_grad():
            self.weight.copy_(w)
            self.bias.copy_(b)

    def forward(self, features: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        w, b = (self.weight, self.bias) if classes is None else (self.weight[classes], self.bias[classes])
        return F.linear(features, w.to(features.dtype), b.to(features.dtype))


def aux_targets(labels: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Targets of the auxiliary classifier: 0 for every old class, k + 1 for the k-th of the (ascending) new ones."""
    new = torch.as_tensor(new, device=labels.device)
    pos = torch.searchsorted(new, labels).clamp(max=len(new) - 1)
    return torch.where(new[pos] == labels, pos + 1, torch.zeros_like(labels))


@register_method("der", paper="Yan et al., CVPR 2021 (DER)", family="cil-scratch", backbone="resnet18-cifar",
                 backbone_family="cnn", summary="a new feature extractor per task (old ones frozen), one classifier "
                                                "on the concatenated features, auxiliary new-vs-old classifier, "
                                                "exemplar memory, class-balanced classifier finetuning")
class DER(Method):
    @dataclass
    class Config(TrainConfig):
        epochs: int = 170
        first_epochs: int | None = 200
        batch_size: int = 128
        lr: float = 0.1
        momentum: float = 0.9
        weight_decay: float = 2e-4
        first_weight_decay: float | None = 5e-4
        schedule: str = "step"
        lr_milestones: tuple[int, ...] = (80, 120, 150)
        first_lr_milestones: tuple[int, ...] | None = (60, 120, 170)  # None: lr_milestones on the first task too
        lr_gamma: float = 0.1
        memory_size: int = 2000
        herding_form: str = "pycil"  # pycil | icarl
        new_init: str = "previous"  # previous (PyCIL: the new extractor starts as the last one) | random
        aux_weight: float = 1.0
        ft_epochs: int = 30  # balanced finetuning of the classifier (0: off)
        ft_lr: float = 0.1
        ft_milestones: tuple[int, ...] = (15,)
        ft_gamma: float = 0.1
        ft_weight_decay: float = 5e-4
        ft_temperature: float = 5.0
        ft_reset: bool = True

        LIMITS = {**TrainConfig.LIMITS, "ft_temperature": (1e-6, None), "ft_gamma": (0, None)}
        CHOICES = {**TrainConfig.CHOICES, "herding_form": ("icarl", "pycil"), "new_init": ("previous", "random")}

    # smoke profile (no reference): a narrow random ResNet, Adam, the light "quick" crops, few epochs, small memory
    quick = dict(optimizer="adam", lr=1e-3, epochs=6, first_epochs=None, batch_size=32, schedule="constant",
                 lr_milestones=(), first_lr_milestones=None, weight_decay=0.0, first_weight_decay=None,
                 transform="quick", memory_size=40,
                 ft_epochs=15, ft_lr=1e-2, ft_milestones=(), ft_weight_decay=0.0, ft_temperature=1.0)
    unused_settings = ("label_smoothing",)
    # PyCIL's pipelines (pad-4 crop / random-resized crop + flip + ColorJitter(brightness=63/255)): data.augment's
    # "cifar-pycil" / "imagenet-pycil"
    presets = {"cifar100": dict(transform="cifar-pycil"), "imagenet100": dict(transform="imagenet-pycil")}
    dataset_backbones = {"imagenet100": "resnet18"}  # the standard ResNet18 on ImageNet100 (DNE §4)

    def __init__(self, cfg, backbone, scenario):
        super().__init__(cfg, backbone, scenario)
        self.expansions = nn.ModuleList()  # the extractors of tasks 1..t (task 0's is ``self.backbone``)
        self.fc = ExpandingLinear()
        self.aux: nn.Linear | None = None
        self.memory = ExemplarMemory(total=cfg.memory_size, herding_form=cfg.herding_form)

    @property
    def extractors(self) -> list[nn.Module]:
        return [self.backbone, *self.expansions]

    # ---- structure ----
    def before_task(self, task):
        dim = self.backbone.feature_dim
        if task.index > 0:
            device = next(self.backbone.parameters()).device
            new = build_backbone(self.backbone.spec.name, pretrained=False).to(device)
            if self.cfg.new_init == "previous":
                new.load_state_dict(self.extractors[-1].state_dict())
            for old in self.extractors:
                old.requires_grad_(False)
            self.expansions.append(new)
            self.aux = nn.Linear(dim, len(task.classes) + 1).to(device)
        self.fc.grow(len(task.classes), dim)

    def frozen_modules(self):
        return self.extractors[:-1]

    # ---- training ----
    def train_data(self, task, ctx):
        return self.memory.joined_with(ctx.train)

    def param_groups(self, task):
        params = list(self.extractors[-1].parameters()) + list(self.fc.parameters())
        if task.index > 0:
            params += list(self.aux.parameters())
        return [dict(params=params)]

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The concatenated features of every extractor, and the newest extractor's own."""
        feats = [e(images) for e in self.extractors]
        return torch.cat(feats, dim=1), feats[-1]

    def training_step(self, batch: Batch):
        seen = torch.tensor(self.scenario.seen_classes(batch.task.index), device=batch.labels.device)
        joined, newest = self.features(batch.images)
        ce = F.cross_entropy(self.fc(joined, seen).float(), batch.targets(seen))
        if batch.task.index == 0:
            return StepOutput(ce, {"ce": ce})
        new = torch.tensor(sorted(batch.task.classes), device=batch.labels.device)
        aux = self.cfg.aux_weight * F.cross_entropy(self.aux(newest).float(), aux_targets(batch.labels, new))
        return StepOutput(ce + aux, {"ce": ce, "aux": aux})

    def _finetune_step(self, batch: Batch):
        seen = torch.tensor(self.scenario.seen_classes(batch.task.index), device=batch.labels.device)
        with torch.no_grad():
            joined, _ = self.features(batch.images)
        logits = self.fc(joined, seen).float() / self.cfg.ft_temperature
        ce = F.cross_entropy(logits, batch.targets(seen))
        return StepOutput(ce, {"ce": ce})

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)[0]

    def after_task(self, task, ctx):
        feats, _ = ctx.features(self.embed)  # herding on the concatenated features, test transform
        self.memory.update_from(ctx.train, feats, classes=ctx.new.tolist())
        ctx.log(memory=len(self.memory), per_class=self.memory.quota(len(ctx.seen)),
                extractors=len(self.extractors))
        if task.index == 0 or self.cfg.ft_epochs <= 0 or len(self.memory) == 0:
            return
        if self.cfg.ft_reset:
            self.fc.reset(ctx.rng("der-classifier-reset"))
        ctx.fit(balanced_phase(
            "balanced", self._finetune_step, [dict(params=list(self.fc.parameters()))],
            self.memory.as_task_data(ctx.train), epochs=self.cfg.ft_epochs, lr=self.cfg.ft_lr,
            weight_decay=self.cfg.ft_weight_decay, schedule="step", lr_milestones=tuple(self.cfg.ft_milestones),
            lr_gamma=self.cfg.ft_gamma, frozen=tuple(self.extractors)))

    # ---- evaluation ----
    def logits(self, images, classes):
        return self.fc(self.embed(images), classes)
