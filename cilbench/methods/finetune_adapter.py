"""Sequential adapter tuning ("Finetune Adapter"): the lower bound of the adapter family.

One AdaptFormer adapter (bottleneck 64, scale 0.1, dropout 0.1; PROTOCOLS.md "Adapter") on the frozen ViT and one
cosine head are tuned on every task in turn, with no memory and no regularisation: whatever the adapter learns for
task t may be overwritten by task t + 1. This is the "Finetune Adapter" row of the EASE (CVPR 2024) and MOS
(AAAI 2025) tables.

Choices (no paper defines this baseline beyond its name; every one is a config value):

* Head: a cosine classifier with a learnable scale ``sigma`` (init 1), ``logits = sigma * cos(w_c, z)``, as
  PILOT's ``CosineLinear`` in ``SimpleVitNet``, the head of every adapter-based learner there (aper_adapter,
  ranpac) and of RevisitingCIL's adapter fine-tuning baseline (``finetune_vit_adapter``, which builds a
  ``SimpleVitNet``). New class rows start uniform(-1/sqrt(D), 1/sqrt(D)) (``CosineHead.grow``); PILOT pads new
  rows with zeros, a point where cosine normalisation has no gradient direction.
* Loss: cross-entropy over the current task's classes (``loss_scope="task"``, as PILOT's ``finetune``);
  ``"seen"`` scores every seen class.
* Optimisation: the adapter settings of APER (RevisitingCIL ``exps/aper_adapter/*.json``, PILOT
  ``exps/aper_aperpter.json``): SGD momentum 0.9, lr 0.01, wd 5e-4, batch 48, cosine to 0 stepped per epoch, 20
  epochs on every task; ImageNet-R lr 0.05, wd 5e-3, batch 16, 10 epochs (PILOT ``exps/aper_aperpter_inr.json``).
  The head and its scale learn at the adapter's rate (PILOT optimises all trainable parameters in one group).

The helpers here (``AdapterTuning``) are the first-session tuning that APER and RanPAC share.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cilbench.errors import CilbenchError
from cilbench.methods.base import AdapterConfig, Method, register_method
from cilbench.models.heads import ScaledCosineHead


@dataclass
class AdapterTuningConfig(AdapterConfig):
    """The adapter's tuning (APER's adapter settings; RevisitingCIL / PILOT configs)."""

    epochs: int = 20
    batch_size: int = 48
    lr: float = 0.01
    weight_decay: float = 5e-4
    # PILOT models/aper_adapter.py and ranpac.py, RanPAC.py: CosineAnnealingLR(T_max=tuned_epoch) stepped per epoch
    schedule_unit: str = "epoch"


# per-dataset tuning settings of the adapter methods; ImageNet-R: PILOT exps/aper_aperpter_inr.json (RevisitingCIL's
# exps/aper_adapter/imagenetr_5_5 has 20 epochs and batch 24 with the same lr and wd); every other dataset keeps the
# defaults above (RevisitingCIL exps/aper_adapter/{cifar224,cub,imageneta,objectnet,omni,vtab}*.json: 20, 0.01,
# 48, 5e-4)
IMAGENET_R_TUNING = dict(epochs=10, lr=0.05, batch_size=16, weight_decay=5e-3)
# the smoke profile of the adapter methods (no reference): on a random tiny ViT the features of all images are nearly
# parallel (mean cosine ~0.99), so a cosine head moves only once the adapter reshapes them; Adam and 20 epochs make
# that visible within seconds, with the light "quick" crops (PILOT's crops down to 5% of an 8x8 digit leave nothing
# to learn from)
QUICK_ADAPTER = dict(optimizer="adam", lr=1e-2, epochs=20, batch_size=16, transform="quick")
ADAPTER_PRESETS = {name: {} for name in ("cifar100", "imagenet-a", "cub", "objectnet", "omnibenchmark", "vtab")}
ADAPTER_PRESETS["imagenet-r"] = dict(IMAGENET_R_TUNING)


class AdapterTuning(Method):
    """One adapter expert + a scaled cosine head, tuned with cross-entropy on the tasks ``tunes(task)`` says."""

    checkpoint_excludes = ("backbone.",)  # the frozen ViT never changes ...
    checkpoint_includes = (".adapters.",)  # ... except its adapters

    def __init__(self, cfg, backbone, scenario):
        super().__init__(cfg, backbone, scenario)
        self.vit = cfg.adapted_vit(backbone, 1)
        self.head = ScaledCosineHead(backbone.feature_dim)

    def tunes(self, task) -> bool:
        return True

    def loss_classes(self, task, device) -> torch.Tensor:
        return torch.tensor(task.classes, device=device)

    def adapted(self, images: torch.Tensor) -> torch.Tensor:
        return self.vit(images, experts=[0])[0]

    def before_task(self, task):
        if self.tunes(task):
            self.head.grow(len(task.classes))

    def param_groups(self, task):
        if not self.tunes(task):
            return []
        return [dict(params=self.vit.expert_parameters(0) + list(self.head.parameters()), lr=self.cfg.lr)]

    def training_step(self, batch):
        classes = self.loss_classes(batch.task, batch.labels.device)
        logits = self.head(self.adapted(batch.images), classes)
        return F.cross_entropy(logits, batch.targets(classes), label_smoothing=self.cfg.label_smoothing)


@register_method("finetune-adapter", paper="sequential adapter tuning baseline (EASE / MOS tables, PILOT conventions)",
                 family="ptm-cil", backbone="vit-b16-in21k", backbone_family="vit",
                 summary="one AdaptFormer adapter + cosine head tuned on each task in turn (adapter lower bound)")
class FinetuneAdapter(AdapterTuning):
    @dataclass
    class Config(AdapterTuningConfig):
        loss_scope: str = "task"  # task: CE over the current task's classes (PILOT); seen: over all seen classes

        CHOICES = {**AdapterTuningConfig.CHOICES, "loss_scope": ("task", "seen")}

    presets = {name: dict(values) for name, values in ADAPTER_PRESETS.items()}
    quick = dict(QUICK_ADAPTER)

    def __init__(self, cfg, backbone, scenario):
        if cfg.loss_scope not in ("task", "seen"):
            raise CilbenchError(f"finetune-adapter loss_scope must be task or seen, not {cfg.loss_scope!r}")
        super().__init__(cfg, backbone, scenario)

    def loss_classes(self, task, device):
        if self.cfg.loss_scope == "task":
            return torch.tensor(task.classes, device=device)
        return torch.tensor(sorted(self.scenario.seen_classes(task.index)), device=device)

    def logits(self, images, classes):
        return self.head(self.adapted(images), classes)
