"""APER with an adapter (Zhou et al., "Revisiting class-incremental learning with pre-trained models:
generalizability and adaptivity are all you need", IJCV 2024; the arXiv version calls it ADAM).

1. Adapt once: on the first task only, one AdaptFormer adapter and a cosine head are tuned with cross-entropy
   (``AdapterTuning``, as ``finetune-adapter``); then the adapted model is frozen for good.
2. Merge: every image is embedded by the frozen pre-trained model ``phi`` and the adapted model ``phi_A`` and the
   two are concatenated, ``z = [phi(x) || phi_A(x)]`` (1536-d for ViT-B/16).
3. Prototypes: after every task, the prototype of each new class is the mean ``z`` over its training images
   (test transform); old prototypes never change, so nothing is forgotten after the first task.
4. Inference: the cosine similarity of ``z`` to every seen class's prototype.

Defaults (RevisitingCIL ``exps/aper_adapter/*.json``, PILOT ``exps/aper_aperpter.json``): SGD momentum 0.9, lr 0.01,
wd 5e-4, batch 48, 20 epochs, cosine to 0 stepped per epoch (PILOT ``models/aper_adapter.py``:
``CosineAnnealingLR(T_max=tuned_epoch)``), bottleneck 64. ImageNet-R: 10 epochs, lr 0.05, batch 16, wd 5e-3 (PILOT
``exps/aper_aperpter_inr.json``; RevisitingCIL's ImageNet-R file has 20 epochs and batch 24).

Where the paper is silent (as the official code): the first-task head is PILOT's ``CosineLinear`` with a learnable
scale (init 1), trained with the adapter in one parameter group; it is discarded after the first task. The
order of the concatenation is [pre-trained || adapted] and the prototype classifier has no scale (a scale does not
change the argmax).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cilbench.methods.base import Encoder, register_method
from cilbench.methods.finetune_adapter import ADAPTER_PRESETS, QUICK_ADAPTER, AdapterTuning, AdapterTuningConfig
from cilbench.models.heads import PrototypeHead, class_means


@register_method("aper-adapter", paper="Zhou et al., IJCV 2024 (RevisitingCIL: APER / ADAM with adapter)",
                 family="ptm-cil", backbone="vit-b16-in21k", backbone_family="vit",
                 summary="adapter tuned on the first task only; cosine prototypes of [pre-trained || adapted] "
                         "features")
class AperAdapter(AdapterTuning):
    @dataclass
    class Config(AdapterTuningConfig):
        pass

    presets = {name: dict(values) for name, values in ADAPTER_PRESETS.items()}
    quick = dict(QUICK_ADAPTER, epochs=40)  # only the first task trains: 40 epochs cost what 8 tasks of 5 would

    def __init__(self, cfg, backbone, scenario):
        super().__init__(cfg, backbone, scenario)
        self.prototypes = PrototypeHead(2 * backbone.feature_dim)

    def tunes(self, task) -> bool:  # 1. adapt on the first task only
        return task.index == 0

    def before_task(self, task):
        super().before_task(task)
        self.prototypes.grow(len(task.classes))

    def embed(self, images: torch.Tensor) -> torch.Tensor:  # 2. z = [phi(x) || phi_A(x)]
        return torch.cat([self.vit.plain(images), self.adapted(images)], dim=-1)

    def after_task(self, task, ctx):
        if self.tunes(task):
            for p in self.vit.expert_parameters(0) + list(self.head.parameters()):
                p.requires_grad_(False)
        feats, labels = ctx.features(self.feature_encoder())  # 3. class means, test transform
        classes = torch.tensor(task.classes, device=feats.device)
        self.prototypes.set(classes, class_means(feats, labels, classes))

    def feature_encoder(self):  # frozen after the first task: each image is encoded once from then on
        return Encoder("[plain || adapted]", self.embed, (self.backbone, self.vit))

    def feature_logits(self, feats, classes):  # 4. cosine to the prototypes
        return self.prototypes(feats, classes)
