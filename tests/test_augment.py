"""Batched device transforms: crops inside the image with the protocol's area range, exact eval crops, flips.
(Pixel-level agreement with the PIL reference pipelines is in test_augment_pil.py.)"""

import numpy as np
import pytest
import torch
import torchvision.transforms as T

from cilbench.data.augment import PRESETS, ImageTransform, resample_weights, resized_crops, sample_crops
from cilbench.errors import CilbenchError


def test_crop_boxes_fit_and_follow_scale_and_ratio():
    g = torch.Generator().manual_seed(0)
    w, h, x0, y0 = sample_crops(4096, (0.05, 1.0), (3 / 4, 4 / 3), g)
    assert (w <= 1).all() and (h <= 1).all() and (x0 >= 0).all() and (y0 >= 0).all()
    assert (x0 + w <= 1 + 1e-6).all() and (y0 + h <= 1 + 1e-6).all()
    area = w * h
    assert area.min() >= 0.05 - 1e-6
    ratio = w / h
    fitted = area < 1 - 1e-6  # the fallback is the whole square
    assert (ratio[fitted] >= 3 / 4 - 1e-5).all() and (ratio[fitted] <= 4 / 3 + 1e-5).all()
    # CLIP's scale (0.9, 1) keeps nearly the whole image
    w, h, _, _ = sample_crops(1024, (0.9, 1.0), (3 / 4, 4 / 3), g)
    assert (w * h >= 0.9 - 1e-6).all()


def test_eval_transform_is_the_exact_centre_crop():
    # Resize(256) + CenterCrop(224) on a stored 256 square = pixels 16..239
    img = torch.randint(0, 256, (2, 256, 256, 3), dtype=torch.uint8)
    out = PRESETS["pilot"](img, train=False)
    assert out.shape == (2, 3, 224, 224)
    expected = img[:, 16:240, 16:240].permute(0, 3, 1, 2).float() / 255
    assert torch.allclose(out, expected, atol=1e-5)


def test_clip_eval_normalises_and_keeps_the_whole_square():
    img = torch.full((1, 224, 224, 3), 128, dtype=torch.uint8)
    out = PRESETS["clip"](img, train=False)
    mean = torch.tensor(PRESETS["clip"].mean).view(1, 3, 1, 1)
    std = torch.tensor(PRESETS["clip"].std).view(1, 3, 1, 1)
    assert torch.allclose(out, (128 / 255 - mean) / std, atol=1e-5)


def test_train_flip_and_full_crop():
    # with the crop forced to the whole image, the output is the image or its mirror
    t = ImageTransform(size=8, scale=(1.0, 1.0), ratio=(1.0, 1.0), eval_crop=1.0, interpolation="bilinear")
    img = torch.arange(8 * 8 * 3, dtype=torch.uint8).view(1, 8, 8, 3).repeat(64, 1, 1, 1)
    out = t(img, train=True, generator=torch.Generator().manual_seed(1))
    plain = img.permute(0, 3, 1, 2).float() / 255
    same = torch.isclose(out, plain, atol=1e-5).flatten(1).all(1)
    mirrored = torch.isclose(out, plain.flip(-1), atol=1e-5).flatten(1).all(1)
    assert (same | mirrored).all()
    assert 10 < int(mirrored.sum()) < 54  # about half flipped


def test_grayscale_and_upsampling():
    img = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)  # [B, S, S]
    out = ImageTransform(size=32, eval_crop=1.0)(img, train=False)
    assert out.shape == (3, 3, 32, 32) and torch.equal(out[:, 0], out[:, 1])
    assert 0 <= float(out.min()) and float(out.max()) <= 1
    assert np.isfinite(out.numpy()).all()


def test_pixel_boxes_are_whole_pixels_inside_the_square():
    t = PRESETS["pilot"]
    top, left, height, width, flipped = t.crop_boxes(2048, 256, torch.Generator().manual_seed(0))
    assert top.dtype == torch.long and flipped.dtype == torch.bool
    assert (top >= 0).all() and (left >= 0).all() and (height >= 1).all() and (width >= 1).all()
    assert (top + height <= 256).all() and (left + width <= 256).all()
    # sides are whole pixels, rounded as torchvision rounds them (at most half a pixel each below the drawn area)
    area = (height * width).double() / 256 ** 2
    assert float(area.min()) >= 0.05 - 1 / 256 and float(area.max()) <= 1
    w, h, x0, y0 = sample_crops(512, (0.05, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(1), size=32)
    for v in (w, h, x0, y0):
        assert torch.equal(v * 32, torch.round(v * 32))


def _torchvision_boxes(n: int, size: int, scale, ratio) -> np.ndarray:
    img = torch.zeros(1, size, size)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return np.array([T.RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(n)])


@pytest.mark.parametrize("scale,ratio", [((0.05, 1.0), (3 / 4, 4 / 3)), ((0.9, 1.0), (0.2, 5.0))])
def test_pixel_boxes_follow_torchvisions_distribution(scale, ratio):
    # the same sampler as torchvision's RandomResizedCrop.get_params on the stored square (the second case falls
    # back to the whole square about half the time); compared through means over 3000 draws each
    n, size = 3000, 64
    ref = _torchvision_boxes(n, size, scale, ratio)  # i, j, h, w
    w, h, x0, y0 = sample_crops(n, scale, ratio, torch.Generator().manual_seed(0), size=size)
    ours = np.stack([(y0 * size).numpy(), (x0 * size).numpy(), (h * size).numpy(), (w * size).numpy()], 1)
    for col in range(4):
        assert abs(ours[:, col].mean() - ref[:, col].mean()) < 0.06 * size, col
    whole = lambda b: float(((b[:, 2] == size) & (b[:, 3] == size)).mean())
    assert abs(whole(ours) - whole(ref)) < 0.04


def test_train_transform_is_deterministic_and_batched_per_image():
    img = torch.randint(0, 256, (6, 48, 48, 3), dtype=torch.uint8)
    t = PRESETS["pilot"].with_size(40)
    a = t(img, train=True, generator=torch.Generator().manual_seed(5))
    b = t(img, train=True, generator=torch.Generator().manual_seed(5))
    c = t(img, train=True, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the batched resampler equals resizing each image alone with its own box
    top, left, height, width, flipped = t.crop_boxes(6, 48, torch.Generator().manual_seed(5))
    x = img.permute(0, 3, 1, 2).float()
    for i in range(6):
        one = resized_crops(x[i:i + 1], top[i:i + 1], left[i:i + 1], height[i:i + 1], width[i:i + 1], 40,
                            "bilinear", flipped[i:i + 1])
        assert torch.equal(one[0] / 255, a[i])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gives_the_cpu_pixels():
    store = torch.randint(0, 256, (8, 256, 256, 3), dtype=torch.uint8)
    for name in PRESETS:
        img = store[:, :32, :32].contiguous() if PRESETS[name].pad else store  # pad-crop presets take native 32 px
        for train in (True, False):
            cpu = PRESETS[name](img, train, torch.Generator().manual_seed(2))
            gpu = PRESETS[name](img.cuda(), train, torch.Generator().manual_seed(2)).cpu()
            assert torch.allclose(cpu, gpu, atol=1e-5), (name, train)


def test_unknown_interpolation_is_one_clear_error():
    with pytest.raises(CilbenchError, match="interpolation"):
        ImageTransform(interpolation="lanczos")


def test_resampling_weights_stay_in_the_box_and_widen_when_downscaling():
    start, length = torch.tensor([10, 0]), torch.tensor([100, 256])
    w = resample_weights(start, length, 256, 50, "bilinear", quantize=False)  # 2x and ~5x downscales
    assert torch.allclose(w.sum(2), torch.ones(2, 50, dtype=torch.float64))
    assert float(w[0, :, :10].abs().sum()) == 0 and float(w[0, :, 110:].abs().sum()) == 0
    # antialiasing: a bilinear tap reaches scale pixels each side (2 and 5.12 here), not 1
    taps = (w != 0).sum(2)
    assert int(taps[0].max()) == 4 and int(taps[1].max()) >= 10
    up = resample_weights(torch.tensor([0]), torch.tensor([32]), 32, 224, "bicubic", quantize=False)
    assert int((up != 0).sum(2).max()) == 4 and float(up.min()) < 0  # plain bicubic taps with negative lobes
    flipped = resample_weights(start, length, 256, 50, "bilinear", torch.tensor([True, False]), quantize=False)
    assert torch.equal(flipped[0], w[0].flip(0)) and torch.equal(flipped[1], w[1])


def test_cifar_preset_pads_crops_and_flips_like_random_crop():
    # RandomCrop(32, padding=4) + flip: each output is a 32 x 32 window of the zero-padded 40 x 40 image, mirrored
    # for the flipped ones; evaluation is the image as is; CIFAR-100 mean / std
    t = PRESETS["cifar"]
    img = torch.randint(0, 256, (16, 32, 32, 3), dtype=torch.uint8)
    out = t(img, train=True, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    top, left = torch.randint(0, 9, (16,), generator=g), torch.randint(0, 9, (16,), generator=g)
    flipped = torch.rand(16, generator=g) < 0.5
    mean, std = torch.tensor(t.mean).view(3, 1, 1), torch.tensor(t.std).view(3, 1, 1)
    padded = torch.nn.functional.pad(img.permute(0, 3, 1, 2).float(), (4, 4, 4, 4))
    for i in range(16):
        window = padded[i, :, top[i]:top[i] + 32, left[i]:left[i] + 32]
        window = window.flip(-1) if flipped[i] else window
        assert torch.allclose(out[i], (window / 255 - mean) / std, atol=1e-5)
    assert flipped.any() and (~flipped).any() and (top != top[0]).any()
    assert torch.allclose(t(img, train=False), (img.permute(0, 3, 1, 2).float() / 255 - mean) / std, atol=1e-6)
