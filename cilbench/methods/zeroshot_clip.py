"""Zero-shot CLIP (Radford et al., ICML 2021): no training; each class is scored by the cosine between the image
embedding and its text embedding.

Templates: on the MTIL sequence every dataset uses its own ensemble (ZSCL / MoE-Adapters evaluation); in
class-incremental scenarios the continual-CLIP prompt "a bad photo of a {}." (``templates="auto"``).
On MTIL its record holds the full matrix: with no training every row is the same, Transfer = Average = Last
up to the first column.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cilbench.methods.base import TRAINING_SETTINGS, Encoder, Method, TrainConfig, register_method
from cilbench.models.clip_text import scenario_text_classifier


@register_method("zeroshot-clip", paper="Radford et al., ICML 2021 (CLIP); MTIL protocol of ZSCL", family="clip",
                 backbone="clip-vit-b16", backbone_family="clip",
                 summary="CLIP text classifier with per-dataset prompt ensembles (no training)")
class ZeroShotCLIP(Method):
    @dataclass
    class Config(TrainConfig):
        epochs: int = 0
        templates: str = "auto"  # auto | ensemble | first | cil
        logit_scale: float = 100.0
        eval_batch_size: int = 256

        CHOICES = {**TrainConfig.CHOICES, "templates": ("auto", "ensemble", "first", "cil")}

    checkpoint_excludes = ("backbone.",)
    unused_settings = TRAINING_SETTINGS  # nothing trains
    zero_shot = True

    def __init__(self, cfg, backbone, scenario):
        super().__init__(cfg, backbone, scenario)
        self.backbone.requires_grad_(False)
        self._text: torch.Tensor | None = None

    def text(self, device) -> torch.Tensor:
        if self._text is None:
            mode = self.cfg.templates
            if mode == "auto":
                mode = "ensemble" if self.scenario.kind == "mtil" else "cil"
            self._text = scenario_text_classifier(self.backbone, self.scenario, device, mode)
        return self._text

    def feature_encoder(self):  # the frozen image tower: each test image is encoded once, not once per row
        return Encoder("clip image", self.backbone, (self.backbone,))

    def feature_logits(self, feats, classes):
        image = F.normalize(feats.float(), dim=-1)
        return self.cfg.logit_scale * image @ self.text(feats.device)[classes].T
