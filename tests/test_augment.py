"""Batched device transforms: crops inside the image with the protocol's area range, exact eval crops, flips."""

import numpy as np
import torch

from cilbench.data.augment import PRESETS, ImageTransform, sample_crops


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
