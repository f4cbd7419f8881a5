"""HAM: Hierarchical Adapters Merging (Coleman, Quarantiello, Mukherjee, Hurtado, Lomonaco; arXiv 2509.13211).

A faithful, documented reading: no code is public and only the abstract and secondary descriptions could be read
(PROTOCOLS-2 §1: the AI summaries of moonlight.io, four OpenReview reviews). Every choice below is a setting; each
names its source. **Every default is UNVERIFIED for HAM**; the paper's table numbers are UNVERIFIED too.

1. Per task, a LoRA adapter ``dW_i = B_i A_i`` (rank ``lora_rank``) on the attention projections (``targets``) of
   the frozen ViT-B/16, with a learned importance scalar ``alpha_i`` (summaries). While task ``i`` trains, the group
   adapters are frozen and their scales ``alpha_Gj`` learn: ``h = W0 x + sum_j alpha_Gj dW_Gj x + alpha_i dW_i x``
   (summaries). ``importance_scope="adapter"`` (ours, reading the summaries' scalars): one ``alpha_i`` per task and
   one ``alpha_Gj`` per group, shared by every layer; ``"layer"``: one per adapted layer.
2. After the task, the adapter joins the most similar of the ``M`` groups, by cosine similarity of the adapter
   weights (summaries, Reviewer 1), or opens a new one while ``M < max_groups`` (summaries). ``sim_threshold``
   (UNVERIFIED, ours): a similarity at or above it joins the best group even while there is room; below it a new
   group opens while there is room (when full, the best group is joined anyway). ``similarity="concat"`` (ours):
   the cosine of the whole adapter as one flattened vector (every layer's ``alpha B A``, concatenated), "the
   cosine similarity of adapter weights"; ``"mean"`` averages the per-layer cosines.
3. Inside a group, adapters are pruned, scaled by importance and merged (abstract). Pruning (UNVERIFIED; the
   paper's rule is unknown): magnitude pruning of the delta ``B A``, TIES-Merging's trim step, keeping the
   ``keep_ratio`` largest-magnitude entries (0.2: TIES' default k = 20%), per weight matrix (``prune_scope="layer"``,
   ours) or over the whole adapter (``"adapter"``, as TIES trims a task vector). Merge: the group's delta is the
   importance-scaled sum of its members' pruned deltas (ours; TIES' sign election would need every member kept).
   ``fold_scales=True`` (ours) first folds each group's trained scale into its delta, so the merged model computes
   what the trained one did, up to pruning; ``False`` keeps ``alpha_Gj`` apart and the new member joins under it.
4. Group storage (``group_store``, ours): ``"dense"`` (default) keeps a dense delta per layer per group, exact and
   bounded by ``max_groups`` (ViT-B/16, qkv + proj: 28.3M numbers = 113 MB fp32 per group). Reviewer 3 reads the
   merge as concatenated pruned low-rank factors, whose rank grows with every member (unbounded); ``"lowrank"`` is
   its bounded form: after each merge the group is re-factorised by truncated SVD to ``group_rank`` (default 64:
   3.5M numbers per group at ViT-B/16), exact only while the sum's rank fits.
5. Inference is task-agnostic, through the merged groups only (Reviewer 1: all grouped adapters are merged into one
   module, no task id); the live task adapter is zeroed once merged. Parameters and buffers stop growing at
   ``max_groups`` groups (plus the classifier's rows). ``max_groups`` = 5: UNVERIFIED, ours.
6. Classifier (UNVERIFIED; ours): a growing linear head trained with cross-entropy over the current task's classes
   only (``loss_scope="task"``), as PILOT's ``finetune`` and the LoRA-based PTM-CIL methods (InfLoRA, SD-LoRA);
   old rows get no gradient and, with Adam and no weight decay, do not move. It is trained under the adapters it is
   scored with. ``classifier="prototype"`` scores by cosine to class means computed after each task under the
   merged groups (the new classes only: a rehearsal-free method cannot recompute old classes' means, so they age
   as the groups change); the linear head then only trains the adapter. With one class per task (B0Inc1) a
   task-scope CE is 0 and nothing trains: ``--set loss_scope=seen`` there.

LoRA shape and training (UNVERIFIED for HAM): rank 8 (also the first author's earlier LoRA-merging prototypes,
``NiiColeman/lora-merge`` / ``cl-ood``, which are not HAM), alpha 16 (scale alpha / r = 2, the usual 2r), LoRA's
init (A kaiming-uniform, B zero, ``models/peft.py``), no LoRA dropout, on ``qkv`` and ``proj`` (``peft.insert``'s
default; the author's ``lora-merge`` used ``qkv`` only: ``--set targets=qkv``). Optimiser Adam, lr 5e-4, batch 128,
20 epochs per task, cosine per epoch, no weight decay: a LoRA PTM-CIL recipe on the same backbone, InfLoRA's as
LibContinual runs it (``RL-VIG/LibContinual`` ``config/InfLoRA_opt-vit-cifar100-b10-10-10.yaml``, commit 35108fa:
ViT-B/16 IN21k, Adam 5e-4, weight decay 0, batch 128, 20 epochs, cosine), not HAM's. ``scale_lr`` (None: ``lr``)
sets the rate of the importance and group scales. InfLoRA, the third LoRA baseline, is ``methods/inflora.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cilbench.errors import CilbenchError
from cilbench.methods.base import Method, TrainConfig, register_method
from cilbench.models.heads import GrowingLinear, PrototypeHead, class_means
from cilbench.models.ham import SCOPES, SIMILARITIES, STORES, HAMLoRA

LORA_TARGETS = ("qkv", "proj", "fc1", "fc2")


@dataclass
class LoRAConfig(TrainConfig):
    """TrainConfig plus the LoRA shape and the LoRA-family training recipe (UNVERIFIED for HAM; see methods/ham.py)."""

    lora_rank: int = 8
    lora_alpha: float = 16.0
    targets: tuple[str, ...] = ("qkv", "proj")
    epochs: int = 20
    batch_size: int = 128
    optimizer: str = "adam"
    lr: float = 5e-4
    weight_decay: float = 0.0
    schedule: str = "cosine"
    schedule_unit: str = "epoch"
    # task: CE over the current task's classes (PILOT finetune, InfLoRA); seen: over every seen class. With one
    # class per task (B0Inc1) "task" has nothing to learn (a one-class CE is 0): use seen there
    loss_scope: str = "task"
    # linear: the trained growing head scores; prototype: cosine to class means computed after each task under the
    # adapted model (the new classes only; old ones kept as computed), the linear head only trains the adapter
    classifier: str = "linear"

    LIMITS = {**TrainConfig.LIMITS, "lora_rank": (1, None), "lora_alpha": (0, None)}
    CHOICES = {**TrainConfig.CHOICES, "loss_scope": ("task", "seen"), "classifier": ("linear", "prototype")}

    def loss_classes(self, task, device) -> torch.Tensor:
        """The classes the cross-entropy covers (``loss_scope``), ascending."""
        if self.loss_scope == "task":
            return torch.tensor(task.classes, device=device)
        return torch.arange(max(task.classes) + 1, device=device)


class PrototypeOption:
    """``classifier="prototype"`` for a LoRA method with a ``head`` and a ``backbone``: class means of each task's
    training images (test transform) under the adapted model after the task, scored by cosine."""

    def _init_prototypes(self, dim: int) -> None:
        self.prototypes = PrototypeHead(dim) if self.cfg.classifier == "prototype" else None

    def _grow_prototypes(self, task) -> None:
        if self.prototypes is not None:
            self.prototypes.grow(len(task.classes))

    def _set_prototypes(self, task, ctx) -> None:
        if self.prototypes is not None:
            feats, labels = ctx.features(self.backbone)
            classes = torch.tensor(task.classes, device=feats.device)
            self.prototypes.set(classes, class_means(feats, labels, classes))

    def logits(self, images, classes):
        feats = self.backbone(images)
        return self.head(feats, classes) if self.prototypes is None else self.prototypes(feats, classes)


def check_targets(targets) -> tuple[str, ...]:
    targets = tuple(targets)
    bad = [t for t in targets if t not in LORA_TARGETS]
    if not targets or bad:
        raise CilbenchError(f"setting targets={','.join(targets)}: each must be one of {', '.join(LORA_TARGETS)}")
    return targets


# the quick profile of the LoRA family (no reference): Adam at a rate the random tiny ViT's LoRA and head learn at
# (1e-2 at batch 32 left digits' first task at chance), the light "quick" crops, 6 epochs of batch 8, so a whole
# quick run on digits takes a few seconds on a 2-core CPU and its loss falls well under ln 2 (measured, B0Inc2)
QUICK_LORA = dict(optimizer="adam", lr=3e-3, epochs=6, batch_size=8, transform="quick")


@register_method("ham", paper="Coleman et al., arXiv 2509.13211 (HAM), a documented reading (no code public)",
                 family="ptm-cil", backbone="vit-b16-in21k", backbone_family="vit",
                 summary="a LoRA + importance scalar per task, joined to at most G_max groups by cosine similarity, "
                         "pruned, scaled and merged; task-agnostic inference through the groups")
class HAM(PrototypeOption, Method):
    @dataclass
    class Config(LoRAConfig):
        max_groups: int = 5  # G_max (UNVERIFIED, ours)
        sim_threshold: float = 0.5  # join the best group at or above this even while there is room (ours)
        similarity: str = "concat"  # concat | mean (ours)
        keep_ratio: float = 0.2  # magnitude pruning, TIES' trim at k = 20% (UNVERIFIED)
        prune_scope: str = "layer"  # layer | adapter (ours)
        fold_scales: bool = True  # fold the group scales into the group deltas after each task (ours)
        group_store: str = "dense"  # dense | lowrank (ours)
        group_rank: int = 64  # lowrank store: rank of each group after truncated SVD (ours)
        importance_scope: str = "adapter"  # adapter | layer (ours)
        scale_lr: float | None = None  # lr of alpha_i and alpha_Gj (None: lr)

        LIMITS = {**LoRAConfig.LIMITS, "max_groups": (1, None), "sim_threshold": (-1, 1), "keep_ratio": (1e-6, 1),
                  "group_rank": (1, None)}
        CHOICES = {**LoRAConfig.CHOICES, "similarity": SIMILARITIES, "prune_scope": SCOPES, "group_store": STORES,
                   "importance_scope": SCOPES}

    quick = dict(QUICK_LORA)
    checkpoint_excludes = ("backbone.",)
    checkpoint_includes = (".lora.",)

    def __init__(self, cfg, backbone, scenario):
        super().__init__(cfg, backbone, scenario)
        self.backbone.requires_grad_(False)
        self.ham = HAMLoRA(backbone, check_targets(cfg.targets), cfg.lora_rank, cfg.lora_alpha, cfg.max_groups,
                           cfg.group_store, cfg.group_rank, cfg.importance_scope)
        self.head = GrowingLinear(backbone.feature_dim)
        self._init_prototypes(backbone.feature_dim)

    def before_task(self, task):
        self.head.grow(len(task.classes))
        self._grow_prototypes(task)
        self.ham.new_task()

    def param_groups(self, task):
        ham = self.ham.trainable()
        scales = {id(p) for p in [self.ham.task_alpha, self.ham.group_alpha]}
        scales |= {id(e.gain) for e in self.ham.task_entries()}
        adapters = [p for p in ham if id(p) not in scales] + list(self.head.parameters())
        groups = [dict(params=adapters, lr=self.cfg.lr)]
        scale_params = [p for p in ham if id(p) in scales]
        if scale_params:
            groups.append(dict(params=scale_params, lr=self.cfg.scale_lr if self.cfg.scale_lr is not None
                               else self.cfg.lr))
        return groups

    def training_step(self, batch):
        classes = self.cfg.loss_classes(batch.task, batch.labels.device)
        logits = self.head(self.backbone(batch.images), classes)
        return F.cross_entropy(logits.float(), batch.targets(classes), label_smoothing=self.cfg.label_smoothing)

    def after_task(self, task, ctx):
        info = self.ham.consolidate(self.cfg.keep_ratio, self.cfg.sim_threshold, self.cfg.similarity,
                                    self.cfg.prune_scope, self.cfg.fold_scales)
        ctx.log(**{f"ham_{k}": v for k, v in info.items()})
        self._set_prototypes(task, ctx)  # under the merged groups: what inference sees

    def load_checkpoint_state(self, state):
        groups = state.get("ham.group_alpha")
        if groups is not None:
            self.ham.ensure_groups(int(groups.shape[0]))
        super().load_checkpoint_state(state)
