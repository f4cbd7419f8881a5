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
* optional train-only stages after the crop and flip (off unless a preset sets them): timm's RandAugment
  (``rand_augment``) and torchvision's ColorJitter (``jitter``), per image with draws from the call's generator, in
  PIL's integer arithmetic (each op equals the PIL op the references ran; see the section above ``PRESETS``).

Presets carry the references' parameters (source of each in its comment); they are plain data, so a new reference
is a new entry.
"""

from __future__ import annotations

import math
import re
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
    # Opt-in train-only colour / RandAugment stages, applied after the crop and flip on uint8 levels, as the references
    # apply them to the cropped PIL image (off by default: every preset without them keeps its exact pixels).
    rand_augment: str | None = None  # timm RandAugment config string, e.g. "rand-m9-mstd0.5-inc1"
    aug_fill: tuple[int, int, int] = (124, 116, 104)  # geometric ops' fill: timm's img_mean (ImageNet mean x 255)
    aug_interpolation: str = "bicubic"  # geometric ops' PIL affine filter ("bicubic" or "bilinear")
    jitter: tuple[float, float, float, float] | None = None  # ColorJitter(brightness, contrast, saturation, hue)

    def __post_init__(self) -> None:
        for name in (self.interpolation, self.eval_interpolation):
            if name not in FILTERS:
                raise CilbenchError(f"unknown interpolation {name!r} ({', '.join(FILTERS)})")
        if not 0.0 < self.eval_crop <= 1.0:
            raise CilbenchError(f"eval_crop must be in (0, 1], got {self.eval_crop}")
        if self.rand_augment is not None:
            parse_rand_augment(self.rand_augment)
        if self.aug_interpolation not in ("bilinear", "bicubic"):
            raise CilbenchError(f"aug_interpolation must be 'bilinear' or 'bicubic', got {self.aug_interpolation!r}")
        if self.jitter is not None:
            if len(self.jitter) != 4 or min(self.jitter) < 0 or self.jitter[3] > 0.5:
                raise CilbenchError(f"jitter is (brightness, contrast, saturation, hue) with all >= 0 and hue <= 0.5, "
                                    f"got {self.jitter}")

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
        out = out.permute(0, 2, 1, 3).contiguous()  # [B, C, size, size], 0..255
        if train and (self.rand_augment is not None or self.jitter is not None):
            out = self._augment(out, generator)
        out = out.div_(255.0)
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

    def _augment(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """The optional train stages on [B, C, size, size] levels: RandAugment, then ColorJitter (timm's order when
        both are on; PyCIL's jitter follows the crop and flip). Grayscale images are treated as RGB; levels are
        rounded to uint8 first (a no-op with ``round_uint8``), as the references hold PIL images there."""
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        x = x.round().clamp_(0.0, 255.0).contiguous()
        if self.rand_augment is not None:
            x = rand_augment(x, parse_rand_augment(self.rand_augment), generator, self.aug_fill,
                             self.aug_interpolation)
        if self.jitter is not None:
            x = color_jitter(x, self.jitter, generator)
        return x

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


# ---------------------------------------------------------------------------------------------------------------------
# Colour jitter and RandAugment on uint8 levels. The references run these on PIL images (torchvision's ColorJitter on
# a PIL image calls PIL's ImageEnhance / HSV conversion; timm's RandAugment calls PIL's ImageOps, ImageEnhance and
# Image.transform), so each op below is PIL's arithmetic on float tensors of integer levels [N, 3, H, W], batched
# over images with per-image parameters: float32 blends truncated to uint8 (ImagingBlend), fixed-point grayscale,
# per-channel histogram LUTs, the 3x3 SMOOTH kernel in float32, and the affine resampler of Image.transform.
# ---------------------------------------------------------------------------------------------------------------------


def _div(a: torch.Tensor, b: float) -> torch.Tensor:
    """a / b correctly rounded on every device (CUDA turns a division by a Python scalar into a multiplication by
    its reciprocal, and ``b / tensor`` is one everywhere)."""
    return torch.div(a, torch.full((), b, dtype=a.dtype, device=a.device))


def _gray(x: torch.Tensor) -> torch.Tensor:
    """PIL's convert("L") of RGB levels [N, 3, H, W] -> [N, 1, H, W]: ITU-R 601-2 weights in 16-bit fixed point."""
    xi = x.to(torch.int32)
    g = (xi[:, 0] * 19595 + xi[:, 1] * 38470 + xi[:, 2] * 7471 + 0x8000) >> 16
    return g.unsqueeze(1).to(x.dtype)


def pil_blend(degenerate: torch.Tensor, image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Image.blend(degenerate, image, factor) per image (``factor``: [N]): PIL takes the factor as a C float, forms
    degenerate + factor * (image - degenerate) in float32 and truncates to 0..255."""
    f = factor.to(device=image.device, dtype=torch.float32).view(-1, 1, 1, 1)
    out = degenerate.float() + f * (image.float() - degenerate.float())
    return out.clamp_(0.0, 255.0).floor_()


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Brightness: a blend with black."""
    return pil_blend(torch.zeros_like(x), x, factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Color (torchvision's adjust_saturation on PIL): a blend with the grayscale image."""
    return pil_blend(_gray(x).expand_as(x), x, factor)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Contrast: a blend with the grayscale image's mean, rounded to a level."""
    g = _gray(x).double()
    mean = torch.floor(_div(g.sum((1, 2, 3)), float(g[0].numel())) + 0.5)
    return pil_blend(mean.to(x.dtype).view(-1, 1, 1, 1).expand_as(x), x, factor)


_K1 = torch.tensor(1.0, dtype=torch.float32) / 13.0  # ImageFilter.SMOOTH: (1 1 1, 1 5 1, 1 1 1) / 13, float32
_K5 = torch.tensor(5.0, dtype=torch.float32) / 13.0


def _smooth(x: torch.Tensor) -> torch.Tensor:
    """PIL's SMOOTH filter: the 3x3 kernel summed row by row in float32 (+ 0.5, truncated); the border pixels are
    copied unchanged, as ImagingFilter3x3 does."""
    if x.shape[-1] < 3 or x.shape[-2] < 3:
        return x.clone()
    k1, k5 = _K1.to(x.device), _K5.to(x.device)

    def row(r: torch.Tensor, mid: torch.Tensor) -> torch.Tensor:
        return r[..., :-2] * k1 + r[..., 1:-1] * mid + r[..., 2:] * k1

    ss = torch.full_like(x[..., 1:-1, 1:-1], 0.5)
    ss = ss + row(x[..., 2:, :], k1)
    ss = ss + row(x[..., 1:-1, :], k5)
    ss = ss + row(x[..., :-2, :], k1)
    out = x.clone()
    out[..., 1:-1, 1:-1] = ss.clamp_(0.0, 255.0).floor_()
    return out


def adjust_sharpness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Sharpness: a blend with the SMOOTH-filtered image."""
    return pil_blend(_smooth(x), x, factor)


def _round_half_up(v: torch.Tensor) -> torch.Tensor:  # C's round() on non-negative doubles
    r = torch.floor(v)
    return r + (v - r >= 0.5).to(v.dtype)


def adjust_hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_hue on a PIL image: convert("HSV") (PIL's rgb2hsv: float hue and saturation truncated
    to 0..255), the hue channel shifted by int(factor * 255) modulo 256, and PIL's hsv2rgb back (rounded)."""
    f32, f64 = torch.float32, torch.float64
    r, g, b = x[:, 0].float(), x[:, 1].float(), x[:, 2].float()
    maxc = torch.maximum(r, torch.maximum(g, b))
    minc = torch.minimum(r, torch.minimum(g, b))
    cr = maxc - minc
    grey = cr == 0
    crs = torch.where(grey, torch.ones_like(cr), cr)
    s = cr / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    rc, gc, bc = (maxc - r) / crs, (maxc - g) / crs, (maxc - b) / crs
    h = torch.where(r == maxc, bc - gc,
                    torch.where(g == maxc, (2.0 + rc.double() - bc.double()).to(f32),
                                (4.0 + gc.double() - rc.double()).to(f32)))
    h = torch.fmod(_div(h.double(), 6.0) + 1.0, 1.0).to(f32)
    uh = torch.where(grey, 0.0, torch.trunc(h.double() * 255.0).clamp(0, 255))
    us = torch.where(grey, 0.0, torch.trunc(s.double() * 255.0).clamp(0, 255))
    shift = torch.remainder(torch.trunc(factor.to(device=x.device, dtype=f64) * 255.0), 256.0).view(-1, 1, 1)
    hd = torch.remainder(uh + shift, 256.0)  # uint8 wrap-around
    v = maxc.double()
    i = torch.floor(_div(hd * 6.0, 255.0))
    fr = (_div(hd * 6.0, 255.0) - i).to(f32)
    fs = _div(us, 255.0).to(f32)
    p = _round_half_up(v * (1.0 - fs.double())).clamp(0, 255)
    q = _round_half_up(v * (1.0 - (fs * fr).double())).clamp(0, 255)
    t = _round_half_up(v * (1.0 - fs.double() * (1.0 - fr.double()))).clamp(0, 255)
    sector = torch.remainder(i, 6.0)
    chans = {0: (v, t, p), 1: (q, v, p), 2: (p, v, t), 3: (p, q, v), 4: (t, p, v), 5: (v, p, q)}
    out = []
    for c in range(3):
        val = v
        for k, trio in chans.items():
            val = torch.where(sector == k, trio[c], val)
        out.append(torch.where(us == 0, v, val))
    return torch.stack(out, 1).to(x.dtype)


def color_jitter(x: torch.Tensor, jitter: tuple[float, float, float, float],
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """torchvision's ColorJitter(brightness, contrast, saturation, hue) per image on levels [N, 3, H, W]: factors
    uniform in [max(0, 1 - v), 1 + v] (hue in [-h, h]), a factor of 0 turning its op off, the four ops applied in an
    order drawn per image (torchvision's randperm(4)). Draws: the orders, then each active factor, from
    ``generator`` on the CPU."""
    n = x.shape[0]
    order = torch.argsort(torch.rand(n, 4, generator=generator), dim=1)
    fns = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
    factors: list[torch.Tensor | None] = []
    for k, v in enumerate(jitter):
        if v == 0:
            factors.append(None)
            continue
        lo, hi = (-v, v) if k == 3 else (max(0.0, 1.0 - v), 1.0 + v)
        factors.append(torch.empty(n).uniform_(lo, hi, generator=generator))
    for step in range(4):
        for k in range(4):
            f = factors[k]
            if f is None:
                continue
            sel = (order[:, step] == k).nonzero().squeeze(1)
            if sel.numel():
                idx = sel.to(x.device)
                x[idx] = fns[k](x[idx], f[sel])
    return x


# RandAugment (timm auto_augment.py, also v0.5.4 which DyTox / DNE pin): the op lists, in timm's order
RAND_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
            "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
RAND_INCREASING_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                       "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                       "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


@dataclass(frozen=True)
class RandAugmentSpec:
    """timm's RandAugment settings: ``num_layers`` ops per image, each drawn uniformly (with replacement) and applied
    with probability ``prob``, at magnitude ~ N(magnitude, std) clipped to [0, max] (std inf: uniform in [0,
    magnitude]); levels are magnitude / 10 of each op's range."""

    magnitude: float = 10.0
    num_layers: int = 2
    std: float = 0.0
    max: float = 10.0
    increasing: bool = False
    prob: float = 0.5

    @property
    def ops(self) -> tuple[str, ...]:
        return RAND_INCREASING_OPS if self.increasing else RAND_OPS


def parse_rand_augment(config: str) -> RandAugmentSpec:
    """timm's ``rand_augment_transform`` config string: "rand" then dash-separated sections m (magnitude), n (ops per
    image), mstd (magnitude noise; > 100 means uniform), mmax (magnitude bound) and inc (the increasing op set; timm
    tests the section's text, so any "inc" section turns it on). Weighted op choice (w) is not supported."""
    parts = config.split("-")
    if parts[0] != "rand":
        raise CilbenchError(f"RandAugment config must start with 'rand', got {config!r}")
    kw: dict = {}
    for part in parts[1:]:
        m = re.match(r"([a-z]+)(\d.*)$", part)
        if m is None:
            continue  # timm skips sections without a value
        key, val = m.groups()
        try:
            if key == "m":
                kw["magnitude"] = float(int(val))
            elif key == "n":
                kw["num_layers"] = int(val)
            elif key == "mstd":
                kw["std"] = math.inf if float(val) > 100 else float(val)
            elif key == "mmax":
                kw["max"] = float(int(val))
            elif key == "inc":
                kw["increasing"] = bool(val)
            else:
                raise CilbenchError(f"unsupported RandAugment section {part!r} in {config!r}")
        except ValueError as e:
            raise CilbenchError(f"bad RandAugment section {part!r} in {config!r}") from e
    return RandAugmentSpec(**kw)


def rand_augment_args(name: str, magnitude: torch.Tensor, negate: torch.Tensor,
                      translate_pct: float = 0.45) -> torch.Tensor | None:
    """timm's level-to-argument map of op ``name`` at per-image ``magnitude`` ([N], float64, already clipped), signed
    ops negated where ``negate``; None for the ops without an argument."""
    m = magnitude.double().cpu()  # on the CPU: the divisions below are then correctly rounded, as Python's
    sign = torch.where(negate.cpu(), -1.0, 1.0).double()
    if name in ("AutoContrast", "Equalize", "Invert"):
        return None
    if name == "Rotate":
        return sign * (m / 10.0 * 30.0)
    if name in ("ShearX", "ShearY"):
        return sign * (m / 10.0 * 0.3)
    if name in ("TranslateXRel", "TranslateYRel"):
        return sign * (m / 10.0 * translate_pct)
    if name == "Posterize":
        return torch.trunc(m / 10.0 * 4)
    if name == "PosterizeIncreasing":
        return 4 - torch.trunc(m / 10.0 * 4)
    if name == "Solarize":
        return torch.trunc(m / 10.0 * 256).clamp(max=256)
    if name == "SolarizeIncreasing":
        return 256 - torch.trunc(m / 10.0 * 256).clamp(max=256)
    if name == "SolarizeAdd":
        return torch.trunc(m / 10.0 * 110).clamp(max=128)
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return m / 10.0 * 1.8 + 0.1
    if name in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"):
        return torch.clamp(1.0 + sign * (m / 10.0 * 0.9), min=0.1)
    raise CilbenchError(f"unknown RandAugment op {name!r}")


def _lut_autocontrast(x: torch.Tensor) -> torch.Tensor:
    """ImageOps.autocontrast (no cutoff): per channel, levels lo..hi stretched to 0..255 by int(v * scale + offset);
    a constant channel is left as is."""
    lo = x.amin((2, 3), keepdim=True).double()
    hi = x.amax((2, 3), keepdim=True).double()
    scale = torch.div(torch.full_like(hi, 255.0), torch.where(hi > lo, hi - lo, torch.ones_like(hi)))
    out = torch.trunc(x.double() * scale + (-lo) * scale).clamp_(0.0, 255.0)
    return torch.where(hi > lo, out, x.double()).to(x.dtype)


def _lut_equalize(x: torch.Tensor) -> torch.Tensor:
    """ImageOps.equalize: per channel, step = (pixels - count of the highest level present) // 255 and
    lut[i] = (step // 2 + pixels below level i) // step; identity with one level present or step 0."""
    n, c, h, w = x.shape
    v = x.long().view(n, c, h * w)
    hist = torch.zeros(n, c, 256, dtype=torch.long, device=x.device).scatter_add_(2, v, torch.ones_like(v))
    present = hist > 0
    last = 255 - present.flip(-1).long().argmax(-1, keepdim=True)
    step = (h * w - hist.gather(2, last)) // 255  # [N, C, 1]
    keep = (present.sum(-1, keepdim=True) <= 1) | (step == 0)
    below = hist.cumsum(-1) - hist
    lut = ((step // 2 + below) // step.clamp(min=1)).clamp_(max=255)
    out = torch.where(keep, v, lut.gather(2, v))
    return out.view(n, c, h, w).to(x.dtype)


def _cubic_pil(v1, v2, v3, v4, d):  # PIL's affine bicubic (a = -1), evaluated in its order, float64
    p2 = -v1 + v3
    p3 = 2 * (v1 - v2) + v3 - v4
    p4 = -v1 + v2 - v3 + v4
    return v2 + d * (p2 + d * (p3 + d * p4))


def pil_affine(x: torch.Tensor, matrices: torch.Tensor, fill: tuple[int, ...], interpolation: str = "bicubic"
               ) -> torch.Tensor:
    """Image.transform(size, AFFINE, data, resample, fillcolor=fill) per image: output pixel (x, y) reads the input
    at (a x' + b y' + c, d x' + e y' + f) with x' = x + 0.5, y' = y + 0.5 (``matrices`` [N, 6]); points outside
    the image get ``fill``; inside, PIL's bicubic (a = -1, 4 x 4 taps clamped at the edges, clipped, truncated) or
    bilinear filter, in float64 as PIL computes it."""
    n, c, h, w = x.shape
    dev = x.device
    a = matrices.to(device=dev, dtype=torch.float64).view(n, 6, 1, 1)
    xo = (torch.arange(w, device=dev, dtype=torch.float64) + 0.5).view(1, 1, w)
    yo = (torch.arange(h, device=dev, dtype=torch.float64) + 0.5).view(1, h, 1)
    xin = a[:, 0] * xo + a[:, 1] * yo + a[:, 2]  # [N, H, W]
    yin = a[:, 3] * xo + a[:, 4] * yo + a[:, 5]
    inside = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)
    xs, ys = xin - 0.5, yin - 0.5
    fx, fy = torch.floor(xs), torch.floor(ys)
    dx, dy = (xs - fx).unsqueeze(1), (ys - fy).unsqueeze(1)
    offsets = (-1, 0, 1, 2) if interpolation == "bicubic" else (0, 1)
    cols = [(fx + o).clamp(0, w - 1).long() for o in offsets]
    rows = [(fy + o).clamp(0, h - 1).long() for o in offsets]
    flat = x.double().reshape(n, c, h * w)

    def tap(r: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return flat.gather(2, (r * w + q).view(n, 1, h * w).expand(n, c, -1)).view(n, c, h, w)

    if interpolation == "bicubic":
        vals = [_cubic_pil(*(tap(r, q) for q in cols), dx) for r in rows]
        out = _cubic_pil(*vals, dy).clamp_(0.0, 255.0)
    else:
        vals = []
        for r in rows:
            v0, v1 = (tap(r, q) for q in cols)
            vals.append(v0 + (v1 - v0) * dx)
        out = vals[0] + (vals[1] - vals[0]) * dy
    out = out.floor_().to(x.dtype)
    fill_t = torch.tensor(fill, dtype=x.dtype, device=dev).view(1, -1, 1, 1)
    return torch.where(inside.unsqueeze(1), out, fill_t.expand(n, c, 1, 1))


def _rotate_matrix(degrees: float, w: int, h: int) -> list[float]:
    """Image.rotate's inverse matrix about the centre (w / 2, h / 2), counter-clockwise degrees, as Pillow builds
    it (angle modulo 360, entries rounded to 15 decimals)."""
    angle = -math.radians(degrees % 360.0)
    m = [round(math.cos(angle), 15), round(math.sin(angle), 15), 0.0,
         round(-math.sin(angle), 15), round(math.cos(angle), 15), 0.0]
    cx, cy = w / 2, h / 2
    m[2] = m[0] * -cx + m[1] * -cy + m[2] + cx
    m[5] = m[3] * -cx + m[4] * -cy + m[5] + cy
    return m


def rand_augment_op(name: str, x: torch.Tensor, arg: torch.Tensor | None, fill: tuple[int, ...] = (128, 128, 128),
                    interpolation: str = "bicubic") -> torch.Tensor:
    """timm's op ``name`` (PIL) on levels [N, 3, H, W] with per-image arguments ``arg`` ([N], as
    ``rand_augment_args`` gives them)."""
    n, _, h, w = x.shape
    if name == "AutoContrast":
        return _lut_autocontrast(x)
    if name == "Equalize":
        return _lut_equalize(x)
    if name == "Invert":
        return 255.0 - x
    assert arg is not None
    a = arg.to(device=x.device, dtype=torch.float64).view(-1, 1, 1, 1)
    if name.startswith("Posterize"):  # bits kept; 0 bits gives black (Pillow <= 12; Pillow 13 rejects it)
        mask = torch.bitwise_not(2 ** (8 - a.clamp(max=8).long()) - 1)
        return torch.where(a >= 8, x, (x.long() & mask).to(x.dtype))
    if name.startswith("Solarize") and name != "SolarizeAdd":
        return torch.where(x < a, x, 255.0 - x)
    if name == "SolarizeAdd":
        return torch.where(x < 128, (x + a).clamp(max=255.0), x.double()).to(x.dtype)
    for prefix, fn in (("Color", adjust_saturation), ("Contrast", adjust_contrast), ("Brightness", adjust_brightness),
                       ("Sharpness", adjust_sharpness)):
        if name.startswith(prefix):
            return fn(x, arg)
    v = arg.double().cpu()
    one, zero = torch.ones_like(v), torch.zeros_like(v)
    if name == "ShearX":
        mats = torch.stack([one, v, zero, zero, one, zero], 1)
    elif name == "ShearY":
        mats = torch.stack([one, zero, zero, v, one, zero], 1)
    elif name == "TranslateXRel":
        mats = torch.stack([one, zero, v * w, zero, one, zero], 1)
    elif name == "TranslateYRel":
        mats = torch.stack([one, zero, zero, zero, one, v * h], 1)
    elif name == "Rotate":
        mats = torch.tensor([_rotate_matrix(d, w, h) for d in v.tolist()], dtype=torch.float64)
    else:
        raise CilbenchError(f"unknown RandAugment op {name!r}")
    return pil_affine(x, mats, fill, interpolation)


def rand_augment(x: torch.Tensor, spec: RandAugmentSpec, generator: torch.Generator | None = None,
                 fill: tuple[int, ...] = (128, 128, 128), interpolation: str = "bicubic") -> torch.Tensor:
    """timm's RandAugment per image on levels [N, 3, H, W]. Draws from ``generator`` (CPU): the op of each layer,
    whether it applies, its magnitude and its sign, all [N, num_layers]; each layer then runs every op on the images
    that drew it."""
    n, layers = x.shape[0], spec.num_layers
    ops = spec.ops
    choice = torch.randint(0, len(ops), (n, layers), generator=generator)
    applied = torch.rand(n, layers, generator=generator, dtype=torch.float64) <= spec.prob
    if math.isinf(spec.std):
        mag = torch.rand(n, layers, generator=generator, dtype=torch.float64) * spec.magnitude
    else:
        mag = spec.magnitude + spec.std * torch.randn(n, layers, generator=generator, dtype=torch.float64)
    mag = mag.clamp(0.0, spec.max)
    negate = torch.rand(n, layers, generator=generator, dtype=torch.float64) > 0.5
    for layer in range(layers):
        for j, name in enumerate(ops):
            sel = (applied[:, layer] & (choice[:, layer] == j)).nonzero().squeeze(1)
            if sel.numel():
                idx = sel.to(x.device)
                arg = rand_augment_args(name, mag[sel, layer], negate[sel, layer])
                x[idx] = rand_augment_op(name, x[idx], arg, fill, interpolation)
    return x


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
    # ColorJitter(brightness=63/255): that is "cifar-pycil" below; this preset keeps it off.
    "cifar": ImageTransform(size=32, pad=4, flip=True, eval_crop=1.0, mean=(0.5071, 0.4867, 0.4408),
                            std=(0.2675, 0.2565, 0.2761)),
    # From-scratch ImageNet(-100) training of the ResNet baselines (PyCIL utils/data.py iImageNet100): train
    # RandomResizedCrop(224) (torchvision defaults: scale (0.08, 1), bilinear) + flip (+ ColorJitter(brightness=63/255),
    # off here: ``replace(..., jitter=(63 / 255, 0, 0, 0))`` adds it); test Resize(256) + CenterCrop(224) (bilinear);
    # ImageNet mean / std.
    "imagenet-scratch": ImageTransform(size=224, scale=(0.08, 1.0), eval_crop=224 / 256, interpolation="bilinear",
                                       eval_interpolation="bilinear", mean=(0.485, 0.456, 0.406),
                                       std=(0.229, 0.224, 0.225)),
    # PyCIL's iImageNet100 (G-U-N/PyCIL utils/data.py): "imagenet-scratch" + ColorJitter(brightness=63/255) after
    # the crop and flip.
    "imagenet-pycil": ImageTransform(size=224, scale=(0.08, 1.0), eval_crop=224 / 256, interpolation="bilinear",
                                     eval_interpolation="bilinear", mean=(0.485, 0.456, 0.406),
                                     std=(0.229, 0.224, 0.225), jitter=(63 / 255, 0.0, 0.0, 0.0)),
    # PyCIL's iCIFAR100 (G-U-N/PyCIL utils/data.py): "cifar" + ColorJitter(brightness=63/255) after the crop and
    # flip, on the PIL image (DummyDataset: Image.fromarray), i.e. a brightness factor uniform in [1 - 63/255,
    # 1 + 63/255] per image; ToTensor + CIFAR-100 mean / std.
    "cifar-pycil": ImageTransform(size=32, pad=4, flip=True, eval_crop=1.0, mean=(0.5071, 0.4867, 0.4408),
                                  std=(0.2675, 0.2565, 0.2761), jitter=(63 / 255, 0.0, 0.0, 0.0)),
    # DNE / DyTox on CIFAR (BinahHu/DNE and arthurdouillard/dytox continual/datasets.py build_transform, main.py
    # defaults --aa rand-m9-mstd0.5-inc1 --color-jitter 0.4, timm 0.5.4 pinned by DNE): timm create_transform(32,
    # bicubic) with its RandomResizedCrop replaced by RandomCrop(32, padding=4), then flip and RandAugment; timm
    # skips the colour jitter whenever auto_augment is set (transforms_imagenet_train: "elif color_jitter"), so
    # there is none. RandAugment's fill is timm's img_mean of create_transform's default ImageNet mean (124, 116,
    # 104; DyTox only swaps the final Normalize for CIFAR's), geometric ops bicubic. Test: ToTensor + CIFAR mean / std.
    "dne-cifar": ImageTransform(size=32, pad=4, flip=True, eval_crop=1.0, mean=(0.5071, 0.4867, 0.4408),
                                std=(0.2675, 0.2565, 0.2761), rand_augment="rand-m9-mstd0.5-inc1",
                                aug_fill=(124, 116, 104), aug_interpolation="bicubic"),
    # DNE / DyTox at 224 (ImageNet-100): timm RandomResizedCropAndInterpolation(224, scale (0.08, 1), ratio (3/4,
    # 4/3), bicubic: build_transform passes interpolation='bicubic'; --train-interpolation is not read there) +
    # flip + RandAugment rand-m9-mstd0.5-inc1 (no jitter, as above); test Resize(256, BICUBIC) + CenterCrop(224);
    # ImageNet mean / std.
    "dne-imagenet": ImageTransform(size=224, scale=(0.08, 1.0), eval_crop=224 / 256, interpolation="bicubic",
                                   eval_interpolation="bicubic", mean=(0.485, 0.456, 0.406),
                                   std=(0.229, 0.224, 0.225), rand_augment="rand-m9-mstd0.5-inc1",
                                   aug_fill=(124, 116, 104), aug_interpolation="bicubic"),
    # the --quick smoke profile (no reference): light crops, no flip, no normalisation, so a random tiny ViT can
    # learn 8x8 digits in a few epochs (crops down to 5% of the image, as PILOT's, leave almost nothing to learn from)
    "quick": ImageTransform(size=224, scale=(0.9, 1.0), flip=False, eval_crop=1.0, interpolation="bicubic",
                            eval_interpolation="bicubic"),
}
