"""EASE: Expandable Subspace Ensemble (Zhou et al., CVPR 2024, arXiv 2403.12030).

1. Expandable subspaces: every task adds one AdaptFormer adapter to the frozen ViT (``AdaptedViT.add_expert``);
   older adapters are frozen. The new adapter is trained with a temporary cosine classifier over the new classes
   only (``ScaledCosineHead``: ``sigma * cos``, sigma learnable from 1, as PILOT's ``CosineLinear``), cross-entropy,
   then the temporary classifier is dropped. Adapter ``i`` spans subspace ``i``; the representation is the
   concatenation of every adapter's feature, computed in one batched pass (``vit(images, experts=all)``).
2. Prototypes: class ``c`` of task ``i`` has one prototype per subspace. In subspaces ``0..i`` (and in the frozen
   PTM's, with ``use_init_ptm``) it is the class mean of its training images (test transform).
3. Semantic-guided prototype complement: in a later subspace ``j > i`` the old class has no data, so its prototype
   is synthesised (``complement``): with ``A`` the prototypes of the anchor classes in the old class's own subspace
   ``i`` and ``B`` theirs in ``j``, ``p_{c,j} = softmax_n(cos(p_{c,i}, A_n)) @ B`` (softmax over the anchors,
   temperature 1). The paper states it for the new subspace with the current task's classes as anchors; the
   official code (``recalc_sim: true`` in every config) recomputes every ``j`` in ``(i, T]`` after each task with
   the anchors = all classes of tasks ``j..T`` (all have real prototypes in ``i`` and ``j``). Followed here
   (``recalc_sim=True``); ``recalc_sim=False`` synthesises each subspace once, from its own task's classes.
4. Inference with subspace reweighting (``reweighted_logits``): the logit of class ``c`` of task ``i`` is
   ``cos(f_i(x), p_{c,i}) + alpha / (T - 1) * sum_{j != i} cos(f_j(x), p_{c,j})`` (+ ``beta * cos`` in the PTM
   subspace when ``use_init_ptm``), T the number of adapters. The division by ``T - 1`` is in both official
   implementations (``EaseCosineLinear.forward_reweight``), so alpha weighs the other subspaces together.

Defaults and presets (official sun-hailong/CVPR24-Ease ``exps/ease_*_in21k.json``, the ViT-B/16 IN21k runs; the
CIFAR one equals PILOT's ``exps/ease.json``): 20 epochs, SGD momentum 0.9, cosine to 0 stepped per epoch
(``models/ease.py``), adapter bottleneck 64, alpha 0.1, no PTM subspace. Per dataset (lr / batch / wd / alpha / epochs):
cifar100 0.025 / 48 / 5e-4 / 0.1 / 20; cub 0.008 / 32 / 5e-4 / 0.05 / 20; imagenet-r 0.05 / 16 / 5e-3 / 0.1 / 20;
imagenet-a 0.05 / 32 / 5e-3 / 0.1 / 20; objectnet 0.05 / 48 / 5e-3 / 0.2 / 25; vtab 0.03 / 16 / 5e-3 / 0.1 / 45
with bottleneck 16; omnibenchmark 0.01 / 16 / 5e-4. The official OmniBenchmark config switches EASE into an
APER-like mode (``moni_adam``: one adapter trained on task 1 only, PTM + adapter prototypes, alpha = beta = 1);
that is a different method (``aper``), so the preset keeps EASE and takes only that config's lr, batch and wd.
The IN1k-backbone configs differ (e.g. CUB uses the PTM subspace with beta 1, alpha 0.005): pass them with --set.

Choices where paper and code are silent: the temporary head is initialised uniform(-1/sqrt(D), 1/sqrt(D)) as
PILOT's; weight decay covers the adapter, the temporary head and its scale (PILOT passes every trainable
parameter to SGD).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from cilbench.methods.base import AdapterConfig, Encoder, Method, register_method
from cilbench.methods.finetune_adapter import QUICK_ADAPTER
from cilbench.models.heads import ScaledCosineHead, class_means


def complement(own_old: torch.Tensor, own_anchor: torch.Tensor, new_anchor: torch.Tensor) -> torch.Tensor:
    """Prototypes of old classes in a subspace where they have no data: ``softmax(cos(own_old, own_anchor)) @
    new_anchor``, the softmax over the anchors; ``own_*`` are in the old classes' subspace, ``new_anchor`` in the
    target one."""
    sim = F.normalize(own_old.double(), dim=-1) @ F.normalize(own_anchor.double(), dim=-1).T
    return (sim.softmax(dim=1) @ new_anchor.double()).to(new_anchor.dtype)


def reweighted_logits(feats: torch.Tensor, prototypes: torch.Tensor, own: torch.Tensor, alpha: float,
                      beta: float | None = None) -> torch.Tensor:
    """EASE's inference. ``feats`` [S, B, D] per subspace, ``prototypes`` [C, S, D], ``own`` [C] the subspace of
    each class's task. Weight 1 on the own subspace, ``alpha / (adapters - 1)`` on every other adapter subspace,
    ``beta`` on subspace 0 when it is the PTM's (``beta`` not None)."""
    s = feats.shape[0]
    adapters = s - (beta is not None)
    cos = torch.einsum("sbd,csd->bcs", F.normalize(feats.float(), dim=-1), F.normalize(prototypes.float(), dim=-1))
    w = torch.full((prototypes.shape[0], s), alpha / max(1, adapters - 1), device=cos.device)
    if beta is not None:
        w[:, 0] = beta
    w[torch.arange(len(own), device=cos.device), own.to(cos.device)] = 1.0
    return torch.einsum("bcs,cs->bc", cos, w)


@register_method("ease", paper="Zhou et al., CVPR 2024 (EASE)", family="ptm-cil", backbone="vit-b16-in21k",
                 backbone_family="vit",
                 summary="one adapter per task (subspace), prototype complement for old classes, reweighted cosine")
class EASE(Method):
    @dataclass
    class Config(AdapterConfig):
        epochs: int = 20
        batch_size: int = 48
        lr: float = 0.025
        momentum: float = 0.9
        weight_decay: float = 5e-4
        schedule: str = "cosine"
        schedule_unit: str = "epoch"  # models/ease.py: CosineAnnealingLR(T_max=epochs) stepped per epoch
        alpha: float = 0.1
        use_init_ptm: bool = False  # add the frozen PTM's features as subspace 0
        beta: float = 0.0  # weight of the PTM subspace at inference (use_init_ptm only)
        recalc_sim: bool = True

    presets = {
        "cifar100": dict(lr=0.025, batch_size=48, weight_decay=5e-4),
        "cub": dict(lr=0.008, batch_size=32, weight_decay=5e-4, alpha=0.05),
        "imagenet-r": dict(lr=0.05, batch_size=16, weight_decay=5e-3),
        "imagenet-a": dict(lr=0.05, batch_size=32, weight_decay=5e-3),
        "objectnet": dict(lr=0.05, batch_size=48, weight_decay=5e-3, alpha=0.2, epochs=25),
        "vtab": dict(lr=0.03, batch_size=16, weight_decay=5e-3, epochs=45, bottleneck=16),
        "omnibenchmark": dict(lr=0.01, batch_size=16, weight_decay=5e-4),
    }
    quick = dict(QUICK_ADAPTER, lr=2e-2, epochs=25)  # each new adapter starts from zero: a little more (measured)
    unused_settings = ("label_smoothing",)  # plain cross-entropy (official code)
    checkpoint_excludes = ("backbone.",)
    checkpoint_includes = (".adapters.",)

    def __init__(self, cfg, backbone, scenario):
        super().__init__(cfg, backbone, scenario)
        self.vit = cfg.adapted_vit(backbone, 0)  # one expert added per task
        dim = backbone.feature_dim
        self.register_buffer("prototypes", torch.zeros(0, 0, dim))  # [classes, subspaces, D]
        self.register_buffer("class_task", torch.zeros(0, dtype=torch.long))  # the task of each class
        self.proxy: ScaledCosineHead | None = None  # the temporary head of the task being trained

    @property
    def offset(self) -> int:  # subspace index of adapter 0
        return 1 if self.cfg.use_init_ptm else 0

    def before_task(self, task):
        for k in range(self.vit.num_experts):  # older subspaces are frozen
            for p in self.vit.expert_parameters(k):
                p.requires_grad_(False)
        self.vit.add_expert()
        c, s, d = self.prototypes.shape
        grown = self.prototypes.new_zeros(c + len(task.classes), self.offset + self.vit.num_experts, d)
        grown[:c, :s] = self.prototypes
        self.prototypes = grown
        self.class_task = torch.cat([self.class_task, self.class_task.new_full((len(task.classes),), task.index)])

    def before_fit(self, task, ctx):
        k = self.vit.num_experts - 1
        device = self.vit.expert_parameters(k)[0].device
        self.proxy = ScaledCosineHead(self.backbone.feature_dim).to(device)
        self.proxy.grow(len(task.classes))

    def param_groups(self, task):
        k = self.vit.num_experts - 1
        return [dict(params=self.vit.expert_parameters(k) + list(self.proxy.parameters()), lr=self.cfg.lr)]

    def training_step(self, batch):
        classes = torch.tensor(batch.task.classes, device=batch.labels.device)
        feats = self.vit(batch.images, experts=[self.vit.num_experts - 1])[0]  # only the new adapter
        return F.cross_entropy(self.proxy(feats), batch.targets(classes))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """[S, B, D]: the PTM's (with use_init_ptm) and every adapter's features, adapters in one batched pass."""
        feats = self.vit(images, experts=list(range(self.vit.num_experts)))
        if self.cfg.use_init_ptm:
            feats = torch.cat([self.vit.plain(images).unsqueeze(0), feats])
        return feats

    def after_task(self, task, ctx):
        self.proxy = None
        feats, labels = ctx.features(self.feature_encoder())  # [N, S, D], test transform
        classes = torch.tensor(task.classes, device=feats.device)
        for s in range(feats.shape[1]):  # the new classes' own and older subspaces: real class means
            self.prototypes[classes, s] = class_means(feats[:, s], labels, classes).to(self.prototypes)
        self.complement_old(task.index)

    @torch.no_grad()
    def complement_old(self, t: int) -> None:
        """Synthesise the prototypes of the classes of tasks < t in the adapter subspaces they have no data in."""
        tasks, o = self.scenario.tasks, self.offset
        for i in range(t):
            old = torch.tensor(tasks[i].classes, device=self.prototypes.device)
            for j in range(i + 1, t + 1) if self.cfg.recalc_sim else [t]:
                anchors = torch.tensor([c for task in tasks[j:t + 1] for c in task.classes], device=old.device)
                p = self.prototypes
                p[old, o + j] = complement(p[old, o + i], p[anchors, o + i], p[anchors, o + j])

    def feature_encoder(self):
        """One encoder per subspace (the PTM's with use_init_ptm, then each adapter's), each depending on the frozen
        ViT and its own adapter only: a test image is encoded in a subspace once, not after every later task."""
        def frozen() -> dict[str, torch.Tensor]:
            return {k: v for k, v in self.backbone.state_dict().items() if ".adapters." not in k}

        def adapter(k: int) -> Encoder:
            own = nn.ModuleList(self.vit.expert_modules(k))
            return Encoder("ease adapter", lambda x: self.vit(x, experts=[k])[0], (self.backbone, self.vit),
                           state=lambda: {**frozen(), **{f"adapter.{n}": v for n, v in own.state_dict().items()}})

        plain = [Encoder("ease plain", self.vit.plain, (self.backbone, self.vit), state=frozen)]
        return (plain if self.cfg.use_init_ptm else []) + [adapter(k) for k in range(self.vit.num_experts)]

    def feature_logits(self, feats, classes):  # feats [B, S, D]
        own = self.class_task[classes] + self.offset
        beta = self.cfg.beta if self.cfg.use_init_ptm else None
        return reweighted_logits(feats.transpose(0, 1), self.prototypes[classes], own, self.cfg.alpha, beta)

    def logits(self, images, classes):  # all adapters in one batched pass
        return self.feature_logits(self.features(images).transpose(0, 1), classes)
