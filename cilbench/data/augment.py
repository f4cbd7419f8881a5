"""Batched image transforms on the device: one affine grid + grid-sample call per batch.

The store holds uint8 squares; a transform maps them to float images of ``size`` for the backbone:

* train: RandomResizedCrop(size, scale, ratio) + horizontal flip, the crop sampled per image exactly as
  torchvision does (10 tries of area and log-ratio, then a centre fallback), applied for the whole batch as one
  ``affine_grid`` + ``grid_sample``;
* eval: the centre crop that Resize(R) + CenterCrop(size) takes, as a fraction ``eval_crop = size / R`` of the
  stored square (PILOT: 224 / 256; CLIP: Resize(224) + CenterCrop(224) = the whole square).

Presets carry the protocols' parameters: ``pilot`` (scale (0.05, 1), pixels in [0, 1] with no normalisation) and
``clip`` (scale (0.9, 1), bicubic, CLIP mean / std).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImageTransform:
    size: int = 224
    scale: tuple[float, float] = (0.05, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    eval_crop: float = 224 / 256
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    def with_size(self, size: int) -> "ImageTransform":
        return replace(self, size=size)

    def __call__(self, images: torch.Tensor, train: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        """``images``: uint8 [B, S, S, 3] (or [B, S, S]) on the target device -> float [B, 3, size, size]."""
        x = images
        if x.ndim == 3:
            x = x.unsqueeze(-1)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        b = x.shape[0]
        theta = (self._train_theta(b, x.device, generator) if train else self._eval_theta(b, x.device))
        if theta is None:  # the identity at the same size: nothing to resample
            out = x
        else:
            grid = F.affine_grid(theta, [b, 3, self.size, self.size], align_corners=False)
            mode = self.interpolation if self.interpolation in ("bilinear", "bicubic", "nearest") else "bilinear"
            out = F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=False)
            if mode == "bicubic":
                out = out.clamp_(0.0, 1.0)
        if self.mean is not None and self.std is not None:
            mean = torch.tensor(self.mean, device=out.device).view(1, 3, 1, 1)
            std = torch.tensor(self.std, device=out.device).view(1, 3, 1, 1)
            out = (out - mean) / std
        return out.contiguous()

    def _eval_theta(self, b: int, device: torch.device) -> torch.Tensor | None:
        c = float(self.eval_crop)
        theta = torch.zeros(b, 2, 3, device=device)
        theta[:, 0, 0] = c
        theta[:, 1, 1] = c
        return theta

    def _train_theta(self, b: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
        w, h, x0, y0 = sample_crops(b, self.scale, self.ratio, generator)
        sign = torch.ones(b)
        if self.flip:
            sign = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0] = w * sign
        theta[:, 1, 1] = h
        theta[:, 0, 2] = 2 * (x0 + w / 2) - 1
        theta[:, 1, 2] = 2 * (y0 + h / 2) - 1
        return theta.to(device)


def sample_crops(b: int, scale: tuple[float, float], ratio: tuple[float, float],
                 generator: torch.Generator | None = None, tries: int = 10
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """RandomResizedCrop boxes on a unit square, vectorised over the batch: width, height, left, top (fractions).

    As torchvision: up to ``tries`` draws of area ~ U(scale) and log-ratio ~ U(log ratio); the first draw that fits
    wins; images with none fall back to the largest centre crop whose aspect ratio is within ``ratio``.
    """
    area = torch.empty(b, tries).uniform_(*scale, generator=generator)
    log_r = torch.empty(b, tries).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    r = torch.exp(log_r)
    w_all, h_all = torch.sqrt(area * r), torch.sqrt(area / r)
    fits = (w_all <= 1.0) & (h_all <= 1.0)
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.full((b,), -1))
    idx = first.clamp(min=0).unsqueeze(1)
    w = torch.where(first >= 0, w_all.gather(1, idx).squeeze(1), torch.ones(b))
    h = torch.where(first >= 0, h_all.gather(1, idx).squeeze(1), torch.ones(b))
    # the fallback on a square input is the whole image when 1 lies in the ratio range
    if not (ratio[0] <= 1.0 <= ratio[1]):
        fb_w = torch.full((b,), min(1.0, ratio[1])) if ratio[1] < 1 else torch.ones(b)
        fb_h = torch.ones(b) if ratio[1] < 1 else torch.full((b,), 1.0 / ratio[0])
        w = torch.where(first >= 0, w, fb_w)
        h = torch.where(first >= 0, h, fb_h.clamp(max=1.0))
    x0 = torch.rand(b, generator=generator) * (1 - w)
    y0 = torch.rand(b, generator=generator) * (1 - h)
    x0 = torch.where(first >= 0, x0, (1 - w) / 2)
    y0 = torch.where(first >= 0, y0, (1 - h) / 2)
    return w, h, x0, y0


PRESETS: dict[str, ImageTransform] = {
    # PILOT (EASE / MOS / SLCA / CICAE): RRC(224, scale=(0.05, 1)), flip; Resize(256) + CenterCrop(224); no norm
    "pilot": ImageTransform(size=224, scale=(0.05, 1.0), eval_crop=224 / 256, interpolation="bicubic"),
    # CLIP (ZSCL / MoE-Adapters): RRC(224, scale=(0.9, 1), bicubic), no flip; Resize(224) + CenterCrop(224); CLIP norm
    "clip": ImageTransform(size=224, scale=(0.9, 1.0), flip=False, eval_crop=1.0, interpolation="bicubic",
                           mean=CLIP_MEAN, std=CLIP_STD),
}
