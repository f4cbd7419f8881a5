"""Batched image transforms on the device that reproduce the reference PIL pipelines.

The store holds uint8 squares; a transform maps a batch of them to float images of ``size`` for the backbone. The
references (PILOT, CLIP) run torchvision transforms on PIL images: every resize is PIL's separable, antialiased
resampling on uint8 (horizontal pass, round to uint8, vertical pass, round to uint8), then ToTensor divides by 255.
Here each resize is the same resampling written as two per-image weight matrices ``[B, out, in]`` (PIL's filter,
support widened by the downscale factor, weights renormalised at the crop's edges and rounded to PIL's fixed-point
precision) applied with two batched matmuls, each followed by PIL's rounding to uint8 levels:

* train: RandomResizedCrop(size, scale, ratio) with the preset's ``interpolation`` + horizontal flip. Boxes are
  integer pixel boxes on the stored square, drawn as torchvision draws them (10 tries of area and log-ratio, rounded
  to pixels, then a centre fallback); each image is cropped to its box and resized, as ``resized_crop`` does.
* eval: Resize(R) with ``eval_interpolation`` + CenterCrop(size), R = int(size / eval_crop) (PILOT: 256 for 224,
  CLIP: R = size). When the store already is R x R (256 stores under PILOT) this is an exact crop with no resampling.

Presets carry the references' parameters (source of each in its comment); they are plain data, so a new reference
is a new entry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from cilbench.errors import CilbenchError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# PIL's uint8 resampling keeps weights as fixed-point integers with 22 fractional bits (32 - 8 - 2); rounding ours the
# same way makes exact half-level ties (frequent when upscaling by integer factors) round as PIL rounds them.
_PIL_PRECISION = float(1 << 22)


def _triangle(x: torch.Tensor) -> torch.Tensor:
    return (1.0 - x.abs()).clamp_(min=0.0)


def _cubic(x: torch.Tensor) -> torch.Tensor:
    # PIL's bicubic is the Keys kernel with a = -0.5 (torch's non-antialiased bicubic uses -0.75)
    a = -0.5
    x = x.abs()
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


# name -> (support at scale 1, kernel), as PIL defines its BILINEAR and BICUBIC filters
FILTERS = {"bilinear": (1.0, _triangle), "bicubic": (2.0, _cubic)}


@dataclass(frozen=True)
class ImageTransform:
    """RandomResizedCrop + flip for training, Resize + CenterCrop for evaluation, on uint8 store squares."""

    size: int = 224
    scale: tuple[float, float] = (0.05, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    eval_crop: float = 224 / 256  # eval = Resize(int(size / eval_crop)) + CenterCrop(size)
    interpolation: str = "bilinear"  # the train crop's filter
    eval_interpolation: str = "bicubic"  # the eval resize's filter
    round_uint8: bool = True  # round each resampling pass to uint8 levels, as PIL does on uint8 images
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    pad: int = 0  # > 0: train with RandomCrop(size, padding=pad) + flip instead of RandomResizedCrop (from scratch)

    def __post_init__(self) -> None:
        for name in (self.interpolation, self.eval_interpolation):
            if name not in FILTERS:
                raise CilbenchError(f"unknown interpolation {name!r} ({', '.join(FILTERS)})")
        if not 0.0 < self.eval_crop <= 1.0:
            raise CilbenchError(f"eval_crop must be in (0, 1], got {self.eval_crop}")

    def with_size(self, size: int) -> "ImageTransform":
        return replace(self, size=size)

    @property
    def eval_resize(self) -> int:
        """R of the eval Resize(R): PILOT's int((256 / 224) * size); the small epsilon keeps exact ratios exact."""
        return int(self.size / self.eval_crop + 1e-6)

    def __call__(self, images: torch.Tensor, train: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        """``images``: uint8 [B, S, S, 3] (or [B, S, S]) on the target device -> float [B, 3, size, size]."""
        x = images if images.ndim == 4 else images.unsqueeze(-1)
        b, s = x.shape[0], x.shape[1]
        # [B, rows, C, cols] on the 0..255 scale (C is 1 for grayscale): both passes are then plain batched matmuls
        x = x.permute(0, 1, 3, 2).contiguous().float()
        if train and self.pad:
            out = self._pad_crop(x, generator)
        elif train:
            top, left, height, width, flipped = self.crop_boxes(b, s, generator)
            mx = _matrix(*_band(left, width, s, self.size, self.interpolation, flipped, x.device, self.round_uint8),
                         s, self.round_uint8)
            my = _matrix(*_band(top, height, s, self.size, self.interpolation, None, x.device, self.round_uint8),
                         s, self.round_uint8)
            out = _apply(x, my, mx, self.size, self.size, self.round_uint8)
        else:
            out = self._eval(x)
        out = out.permute(0, 2, 1, 3).contiguous().div_(255.0)  # [B, C, size, size]
        if out.shape[1] == 1:
            out = out.expand(-1, 3, -1, -1).contiguous()
        if self.mean is not None and self.std is not None:
            mean = torch.tensor(self.mean, device=out.device).view(1, 3, 1, 1)
            std = torch.tensor(self.std, device=out.device).view(1, 3, 1, 1)
            out = out.sub_(mean).div_(std)
        return out

    def crop_boxes(self, b: int, s: int, generator: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The train crops of a batch of ``b`` S x S images: integer top, left, height, width and the flip flags,
        drawn from ``generator`` (on the CPU, so a seed gives the same crops on every device)."""
        w, h, x0, y0 = sample_crops(b, self.scale, self.ratio, generator, size=s)
        flipped = torch.zeros(b, dtype=torch.bool)
        if self.flip:
            flipped = torch.rand(b, generator=generator) < 0.5
        pixels = [torch.round(v * s).long() for v in (y0, x0, h, w)]
        return pixels[0], pixels[1], pixels[2], pixels[3], flipped

    def _pad_crop(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """[B, S, C, S] -> [B, size, C, size]: torchvision's RandomCrop(size, padding=pad) (zero fill; offsets
        uniform in 0..S + 2 pad - size, rows first) + horizontal flip with probability 1/2, no resampling."""
        b, s = x.shape[0], x.shape[1]
        p, n = self.pad, self.size
        if s != n:  # RandomCrop(padding) never resizes: the store must hold images of the input size
            raise CilbenchError(f"the pad-and-crop transform takes {n} px images, the store holds {s} px ones; use a "
                                f"backbone of input {s} or another transform (--set transform=...)")
        top = torch.randint(0, s + 2 * p - n + 1, (b,), generator=generator)
        left = torch.randint(0, s + 2 * p - n + 1, (b,), generator=generator)
        flipped = torch.rand(b, generator=generator) < 0.5 if self.flip else torch.zeros(b, dtype=torch.bool)
        padded = torch.nn.functional.pad(x, (p, p, 0, 0, p, p))  # rows and columns; channels untouched
        steps = torch.arange(n)
        rows = (top[:, None] + steps).to(x.device)  # [B, n]
        cols = left[:, None] + torch.where(flipped[:, None], n - 1 - steps, steps)
        cols = cols.to(x.device)
        out = padded[torch.arange(b, device=x.device)[:, None], rows]  # [B, n, C, S + 2p]
        return out.gather(3, cols[:, None, None, :].expand(-1, n, out.shape[2], -1))

    def _eval(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S, C, S] -> [B, size, C, size]: Resize(R) + CenterCrop(size)."""
        s = x.shape[1]
        r = self.eval_resize
        off = int(round((r - self.size) / 2.0))  # torchvision's CenterCrop offset
        if r == s:  # the store already is Resize(R): an exact crop
            return x[:, off:off + self.size, :, off:off + self.size]
        # Resize(R) then CenterCrop(size) = the rows off..off+size of the S -> R resampling matrix, shared by the batch
        cols, w = _band(torch.zeros(1), torch.full((1,), float(s)), s, r, self.eval_interpolation, None, x.device,
                        self.round_uint8)
        m = _matrix(cols[:, off:off + self.size], w[:, off:off + self.size], s, self.round_uint8)
        return _apply(x, m, m, self.size, self.size, self.round_uint8)


def resample_weights(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int, interpolation: str,
                     flipped: torch.Tensor | None = None, device: torch.device | str | None = None,
                     quantize: bool = True) -> torch.Tensor:
    """PIL's resampling of the pixels ``[start, start + length)`` of an axis of ``in_size`` to ``out_size`` pixels,
    as dense float64 weights ``[B, out_size, in_size]`` (``start`` / ``length``: [B] integer-valued tensors).

    For output pixel o the centre is (o + 0.5) * length / out_size in the window; the filter support widens by the
    downscale factor (PIL's antialiasing); pixels outside the window get no weight and each row is renormalised, so
    the result equals resizing the cropped image. ``flipped`` rows are mirrored (a horizontal flip of the output).
    ``quantize`` rounds the weights to PIL's fixed-point grid (its uint8 path)."""
    cols, w = _band(start, length, in_size, out_size, interpolation, flipped, device, quantize)
    return torch.zeros(w.shape[0], out_size, in_size, dtype=torch.float64, device=w.device).scatter_add_(2, cols, w)


def _band(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int, interpolation: str,
          flipped: torch.Tensor | None, device: torch.device | str | None, quantize: bool
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The non-zero taps of ``resample_weights``: input columns and float64 weights, both [B, out_size, taps]."""
    support, kernel = FILTERS[interpolation]
    start = start.to(device=device, dtype=torch.float64)
    length = length.to(device=device, dtype=torch.float64)
    scale = (length / out_size).unsqueeze(1)  # [B, 1]
    widen = scale.clamp(min=1.0)
    reach = support * widen  # PIL's support in input pixels
    # taps per output pixel, bounded without reading the boxes back from the device
    taps = 2 * math.ceil(support * max(in_size / out_size, 1.0)) + 1
    centre = (torch.arange(out_size, device=device, dtype=torch.float64) + 0.5) * scale  # [B, out], in the window
    if flipped is not None:
        centre = torch.where(flipped.to(device).unsqueeze(1), centre.flip(1), centre)
    first = torch.floor(centre - reach + 0.5).clamp(min=0.0)  # PIL's xmin
    idx = first.unsqueeze(2) + torch.arange(taps, device=device, dtype=torch.float64)  # [B, out, taps]
    w = kernel((idx + 0.5 - centre.unsqueeze(2)) * (1.0 / widen).unsqueeze(2))  # zero beyond the support
    w = w * (idx < length.view(-1, 1, 1))
    w = w / w.sum(2, keepdim=True)
    if quantize:  # PIL rounds half away from zero
        w = torch.sign(w) * torch.floor(w.abs() * _PIL_PRECISION + 0.5) / _PIL_PRECISION
    cols = (idx + start.view(-1, 1, 1)).clamp(max=in_size - 1).long()  # clamped taps carry no weight
    return cols, w


def _matrix(cols: torch.Tensor, w: torch.Tensor, in_size: int, round_uint8: bool) -> torch.Tensor:
    """Band taps -> the float32 matrix of one pass: [B, out, in], or with rounding [B, 2 out, in] (see ``_SPLIT``)."""
    if round_uint8:
        k = torch.round(w * _PIL_PRECISION)
        hi = torch.floor(k / _SPLIT)
        w = torch.cat([hi * (_SPLIT / _PIL_PRECISION), (k - hi * _SPLIT) / _PIL_PRECISION], dim=1)
        cols = torch.cat([cols, cols], dim=1)
    return torch.zeros(w.shape[0], w.shape[1], in_size, device=w.device).scatter_add_(2, cols, w.float())


def resized_crops(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, height: torch.Tensor, width: torch.Tensor,
                  size: int, interpolation: str, flipped: torch.Tensor | None = None,
                  round_uint8: bool = True) -> torch.Tensor:
    """Per-image ``resized_crop`` of float [B, C, S, S] (0..255 scale) to [B, C, size, size]: crop box b of image b,
    PIL's antialiased ``interpolation``, the output mirrored where ``flipped``; fully batched."""
    s = x.shape[-1]
    mx = _matrix(*_band(left, width, s, size, interpolation, flipped, x.device, round_uint8), s, round_uint8)
    my = _matrix(*_band(top, height, s, size, interpolation, None, x.device, round_uint8), s, round_uint8)
    out = _apply(x.permute(0, 2, 1, 3).contiguous(), my, mx, size, size, round_uint8)
    return out.permute(0, 2, 1, 3).contiguous()


def _apply(x: torch.Tensor, my: torch.Tensor, mx: torch.Tensor, oh: int, ow: int, round_uint8: bool) -> torch.Tensor:
    """Separable resampling of float [B, H, C, W] to [B, oh, C, ow] with the ``_matrix`` outputs ``my`` / ``mx``
    ([B or 1, ..., H or W]): the horizontal pass, then the vertical one. That is Pillow's order up to version 12,
    which the references ran (Pillow 13 goes vertical first when the height shrinks much more than the width); the
    order matters through the uint8 rounding between the passes."""
    b, h, c, w = x.shape
    if mx.shape[0] == 1:
        t = x.reshape(b * h * c, w) @ mx[0].T
    else:
        t = torch.bmm(x.reshape(b, h * c, w), mx.transpose(1, 2))
    t = t.view(b, h, c, -1)
    t = _finish(t[..., :ow], t[..., ow:], round_uint8).reshape(b, h, c * ow)
    out = torch.bmm(my.expand(b, -1, -1), t).view(b, -1, c, ow)  # [B, (2 x) oh, C, ow]
    return _finish(out[:, :oh], out[:, oh:], round_uint8)


# Exact fixed-point sums in float32: PIL adds integer pixels times 22-bit integer weights k and rounds. A float32
# matmul with k / 2^22 rounds the sum and flips near-ties by one level, so k is split as hi * 2^11 + lo (0 <= lo <
# 2^11): every partial sum of pixels times hi * 2^-11, and of pixels times lo * 2^-22, is then exactly representable
# (below 2^24 units while fewer than ~30 taps are non-zero), whatever the summation order of the device's GEMM.
# This needs true float32 GEMMs: with TF32 matmuls enabled on CUDA (torch's default is off) near-ties may move a level.
_SPLIT = 2048.0


def _finish(hi: torch.Tensor, lo: torch.Tensor, round_uint8: bool) -> torch.Tensor:
    """PIL's uint8 result floor(sum + 0.5) clipped to 0..255, from the exact high and low partial sums; without
    rounding (``lo`` empty) only the clip applies."""
    if not round_uint8:
        return hi.clamp(0.0, 255.0)
    a = hi + 0.5
    whole = torch.floor(a)
    return a.sub_(whole).add_(lo).floor_().add_(whole).clamp_(0.0, 255.0)


def sample_crops(b: int, scale: tuple[float, float], ratio: tuple[float, float],
                 generator: torch.Generator | None = None, tries: int = 10, size: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """RandomResizedCrop boxes on a square, vectorised over the batch: width, height, left, top (fractions).

    As torchvision: up to ``tries`` draws of area ~ U(scale) and log-ratio ~ U(log ratio); the first draw that fits
    wins; images with none fall back to the largest centre crop whose aspect ratio is within ``ratio``. With ``size``
    the square has ``size`` pixels and, as torchvision, sides are rounded to whole pixels before the fit test and the
    offset is a uniform integer, so every returned fraction is a multiple of 1 / size.
    """
    area = torch.empty(b, tries).uniform_(*scale, generator=generator).double()
    log_r = torch.empty(b, tries).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator).double()
    r = torch.exp(log_r)
    w_all, h_all = torch.sqrt(area * r), torch.sqrt(area / r)
    if size is not None:
        w_all, h_all = torch.round(w_all * size) / size, torch.round(h_all * size) / size
    fits = (w_all > 0) & (w_all <= 1.0) & (h_all > 0) & (h_all <= 1.0)
    found = fits.any(1)
    idx = fits.double().argmax(1, keepdim=True)
    # torchvision's fallback on a square image: whole when 1 is in the ratio range, else the nearest allowed ratio
    fb_w, fb_h = 1.0, 1.0
    if min(ratio) > 1.0:
        fb_h = 1.0 / min(ratio)
    elif max(ratio) < 1.0:
        fb_w = max(ratio)
    if size is not None:
        fb_w, fb_h = round(fb_w * size) / size, round(fb_h * size) / size
    w = torch.where(found, w_all.gather(1, idx).squeeze(1), torch.full((b,), fb_w, dtype=torch.float64))
    h = torch.where(found, h_all.gather(1, idx).squeeze(1), torch.full((b,), fb_h, dtype=torch.float64))
    ux = torch.rand(b, generator=generator).double()
    uy = torch.rand(b, generator=generator).double()
    if size is None:
        x0 = torch.where(found, ux * (1 - w), (1 - w) / 2)
        y0 = torch.where(found, uy * (1 - h), (1 - h) / 2)
    else:  # torchvision: randint(0, S - w + 1); the fallback is centred with floor division
        wp, hp = torch.round(w * size), torch.round(h * size)
        x0 = torch.where(found, torch.minimum(torch.floor(ux * (size - wp + 1)), size - wp),
                         torch.div(size - wp, 2, rounding_mode="floor")) / size
        y0 = torch.where(found, torch.minimum(torch.floor(uy * (size - hp + 1)), size - hp),
                         torch.div(size - hp, 2, rounding_mode="floor")) / size
    return w.float(), h.float(), x0.float(), y0.float()


PRESETS: dict[str, ImageTransform] = {
    # PILOT (EASE / MOS / SLCA / CICAE), LAMDA-PILOT utils/data.py build_transform (also CVPR24-Ease): train
    # RandomResizedCrop(224, scale=(0.05, 1), ratio=(3/4, 4/3)) with torchvision's default BILINEAR (PIL, antialiased)
    # + flip; test Resize(256, interpolation=3 = BICUBIC) + CenterCrop(224), for CIFAR (iCIFAR224) too; PIL images
    # (DummyDataset: Image.fromarray / pil_loader), ToTensor only: no normalisation.
    "pilot": ImageTransform(size=224, scale=(0.05, 1.0), eval_crop=224 / 256, interpolation="bilinear",
                            eval_interpolation="bicubic"),
    # CLIP (ZSCL / MoE-Adapters), MoE-Adapters4CL mtil/clip/clip.py _transform (OpenAI CLIP's preprocessing): train
    # RandomResizedCrop(224, scale=(0.9, 1), BICUBIC), no flip; eval Resize(224, BICUBIC) + CenterCrop(224); PIL
    # images; CLIP mean / std.
    "clip": ImageTransform(size=224, scale=(0.9, 1.0), flip=False, eval_crop=1.0, interpolation="bicubic",
                           eval_interpolation="bicubic", mean=CLIP_MEAN, std=CLIP_STD),
    # SLCA's official code (GengDavid/SLCA utils/data.py): train RandomResizedCrop(224, interpolation=3 = BICUBIC,
    # torchvision's default scale (0.08, 1)) + flip; test Resize(256, BICUBIC) + CenterCrop(224); ImageNet mean / std
    # (iImageNetR; used for the datasets SLCA did not run). iCIFAR100_224 adds ColorJitter(brightness=63/255), which
    # ImageTransform does not do yet, and CIFAR-100's mean / std. iCUB200_224 / iCARS196_224: Resize((300, 300),
    # BICUBIC) + RandomCrop(224) + flip, i.e. a square box of (224/300)^2 of the image at a uniform position.
    "slca-imagenet": ImageTransform(size=224, scale=(0.08, 1.0), interpolation="bicubic",
                                    mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    "slca-cifar": ImageTransform(size=224, scale=(0.08, 1.0), interpolation="bicubic",
                                 mean=(0.5071, 0.4867, 0.4408), std=(0.2675, 0.2565, 0.2761)),
    "slca-cub": ImageTransform(size=224, scale=((224 / 300) ** 2, (224 / 300) ** 2), ratio=(1.0, 1.0),
                               interpolation="bicubic", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    # From-scratch CIFAR training (PyCIL / PODNet / DER / iCaRL family, e.g. PyCIL utils/data.py iCIFAR100):
    # RandomCrop(32, padding=4) + RandomHorizontalFlip, test = the image as is, CIFAR-100 mean / std. PyCIL also adds
    # ColorJitter(brightness=63/255), which ImageTransform does not do (noted in the README).
    "cifar": ImageTransform(size=32, pad=4, flip=True, eval_crop=1.0, mean=(0.5071, 0.4867, 0.4408),
                            std=(0.2675, 0.2565, 0.2761)),
    # From-scratch ImageNet(-100) training of the ResNet baselines (PyCIL utils/data.py iImageNet100): train
    # RandomResizedCrop(224) (torchvision defaults: scale (0.08, 1), bilinear) + flip (+ ColorJitter(brightness=63/255),
    # not done here); test Resize(256) + CenterCrop(224) (bilinear); ImageNet mean / std.
    "imagenet-scratch": ImageTransform(size=224, scale=(0.08, 1.0), eval_crop=224 / 256, interpolation="bilinear",
                                       eval_interpolation="bilinear", mean=(0.485, 0.456, 0.406),
                                       std=(0.229, 0.224, 0.225)),
    # the --quick smoke profile (no reference): light crops, no flip, no normalisation, so a random tiny ViT can
    # learn 8x8 digits in a few epochs (crops down to 5% of the image, as PILOT's, leave almost nothing to learn from)
    "quick": ImageTransform(size=224, scale=(0.9, 1.0), flip=False, eval_crop=1.0, interpolation="bicubic",
                            eval_interpolation="bicubic"),
}
