"""SimpleCIL (Zhou et al., "Revisiting class-incremental learning with pre-trained models", IJCV 2024).

The pre-trained backbone is frozen; after each task the class-mean feature of every new class (training images,
test transform, as PILOT) becomes its prototype; inference is the cosine similarity to all seen prototypes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cilbench.methods.base import TRAINING_SETTINGS, Encoder, Method, TrainConfig, register_method
from cilbench.models.heads import PrototypeHead, class_means


@register_method("simplecil", paper="Zhou et al., IJCV 2024 (RevisitingCIL / APER)", family="ptm-cil",
                 backbone="vit-b16-in21k", backbone_family="vit",
                 summary="frozen pre-trained ViT + class-mean cosine prototypes (no training)")
class SimpleCIL(Method):
    @dataclass
    class Config(TrainConfig):
        epochs: int = 0  # no gradient training
        # PILOT models/simplecil.py: the module constant batch_size = 128 for its prototype and test loaders
        # (exps/simplecil.json's 256 is never read)
        eval_batch_size: int = 128

    quick = dict(transform="quick")  # the smoke profile's images, as every trained ViT method's quick profile
    checkpoint_excludes = ("backbone.",)  # never trained
    unused_settings = TRAINING_SETTINGS  # nothing trains: only the eval batch and transform matter

    def __init__(self, cfg, backbone, scenario):
        super().__init__(cfg, backbone, scenario)
        self.backbone.requires_grad_(False)
        self.head = PrototypeHead(backbone.feature_dim)

    def before_task(self, task):
        self.head.grow(len(task.classes))

    def feature_encoder(self):  # frozen for good: each image is encoded once
        return Encoder("backbone", self.backbone, (self.backbone,))

    def after_task(self, task, ctx):
        feats, labels = ctx.features(self.feature_encoder())
        classes = torch.tensor(task.classes, device=feats.device)
        self.head.set(classes, class_means(feats, labels, classes))

    def feature_logits(self, feats, classes):
        return self.head(feats, classes)
