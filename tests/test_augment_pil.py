"""The device transforms against the reference pipelines: torchvision transforms on PIL images, on a real photo.

The references resample PIL images in uint8 and ToTensor divides by 255, so differences are counted in uint8 levels
(1 level = 1/255). cilbench reproduces PIL's fixed-point arithmetic, so the expected difference is 0; the tests allow
one level at a few pixels so that a BLAS with a different summation order cannot make them flaky.

Pass order: Pillow up to 12 always resamples horizontally, rounds to uint8, then vertically, and that is what the
references ran (2023-2024). Pillow 13 (python-pillow/Pillow#9549) runs the vertical pass first when the height shrinks
much more than the width, which moves a few near-ties by one level. ``pil_resize`` spells the horizontal-first order
out as two one-axis resizes (each a single pass in any Pillow), so exactness is checked against the references'
arithmetic; the installed Pillow's own ``resize`` is then checked to within two levels.
"""

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
import torchvision.transforms.v2.functional as TF2
from PIL import Image
from sklearn.datasets import load_sample_image

from cilbench.data.augment import PRESETS, resized_crops
from cilbench.data.prepare import decode_image

BICUBIC, BILINEAR = T.InterpolationMode.BICUBIC, T.InterpolationMode.BILINEAR


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.fromarray(load_sample_image("china.jpg"))  # 640 x 427 RGB


@pytest.fixture(scope="module")
def store256(photo) -> np.ndarray:
    return decode_image(photo, 256)  # as `prepare` stores a non-square source


@pytest.fixture(scope="module")
def store32(photo) -> np.ndarray:
    return decode_image(photo.resize((32, 32), Image.BICUBIC), None)  # a native 32 px source, as CIFAR


def levels(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """max and mean |difference| in uint8 levels between two [.., 3, H, W] images in [0, 1]."""
    d = ((ours.double() * 255).round() - (ref.double() * 255).round()).abs()
    return float(d.max()), float(d.mean())


def unnormalise(x: torch.Tensor, preset: str) -> torch.Tensor:
    t = PRESETS[preset]
    return x * torch.tensor(t.std).view(-1, 3, 1, 1) + torch.tensor(t.mean).view(-1, 3, 1, 1)


def pil_resize(img: Image.Image, size: tuple[int, int], resample: int) -> Image.Image:
    """``img.resize(size, resample)`` as Pillow <= 12 computes it: the horizontal pass, then the vertical one."""
    if img.size[0] != size[0]:
        img = img.resize((size[0], img.size[1]), resample)
    return img.resize(size, resample) if img.size[1] != size[1] else img


def assert_pil_exact(ours: torch.Tensor, ref: torch.Tensor) -> None:
    worst, mean = levels(ours, ref)
    assert worst <= 1 and mean < 1e-3, (worst, mean)


def test_pilot_eval_of_a_small_store_is_pils_bicubic_resize(store32):
    # PILOT (also for CIFAR, iCIFAR224): Resize(256, bicubic) + CenterCrop(224) + ToTensor on the 32 px PIL image
    ref = T.Compose([T.Resize(256, interpolation=BICUBIC), T.CenterCrop(224), T.ToTensor()])(Image.fromarray(store32))
    ours = PRESETS["pilot"](torch.from_numpy(store32.copy())[None], train=False)[0]
    assert_pil_exact(ours, ref)


@pytest.mark.parametrize("store", ["store32", "store256"])
def test_clip_eval_is_pils_bicubic_resize(store, request):
    # CLIP: Resize(224, bicubic) + CenterCrop(224): an upscale of a 32 px store, an antialiased downscale of 256
    img = request.getfixturevalue(store)
    ref = T.Compose([T.Resize(224, interpolation=BICUBIC), T.CenterCrop(224), T.ToTensor()])(Image.fromarray(img))
    ours = unnormalise(PRESETS["clip"](torch.from_numpy(img.copy())[None], train=False), "clip")[0]
    assert_pil_exact(ours, ref)


@pytest.mark.parametrize("preset,store", [("pilot", "store256"), ("pilot", "store32"), ("clip", "store256")])
def test_train_crops_are_pils_resized_crop_of_the_same_boxes(preset, store, request):
    """RandomResizedCrop + flip as torchvision applies them to a PIL image (PILOT: bilinear, CLIP: bicubic), for the
    boxes the transform drew; the batch holds downscaling and upscaling boxes."""
    img = request.getfixturevalue(store)
    t = PRESETS[preset]
    b, s = 24, img.shape[0]
    batch = torch.from_numpy(img.copy())[None].repeat(b, 1, 1, 1)
    ours = t(batch, train=True, generator=torch.Generator().manual_seed(3))
    if t.mean is not None:
        ours = unnormalise(ours, preset)
    top, left, height, width, flipped = t.crop_boxes(b, s, torch.Generator().manual_seed(3))
    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[t.interpolation]
    mode = {"bilinear": BILINEAR, "bicubic": BICUBIC}[t.interpolation]
    refs, installed = [], []
    for i in range(b):
        box = (int(top[i]), int(left[i]), int(height[i]), int(width[i]))
        crop = Image.fromarray(img).crop((box[1], box[0], box[1] + box[3], box[0] + box[2]))
        ref = pil_resize(crop, (224, 224), resample)
        tv = TF.resized_crop(Image.fromarray(img), *box, [224, 224], mode)  # torchvision's RandomResizedCrop step
        refs.append(TF.to_tensor(TF.hflip(ref) if flipped[i] else ref))
        installed.append(TF.to_tensor(TF.hflip(tv) if flipped[i] else tv))
    assert_pil_exact(ours, torch.stack(refs))
    worst, mean = levels(ours, torch.stack(installed))  # Pillow 13's order: near-ties move, by 2 levels at most
    assert worst <= 2 and mean < 0.05, (worst, mean)
    if store == "store256" and preset == "pilot":
        assert bool((width > 224).any()) and bool((width < 224).any()) and 0 < int(flipped.sum()) < b


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_fixed_boxes_downscale_and_upscale_match_pil_and_torchvision(store256, mode):
    boxes = [(3, 5, 250, 240), (40, 30, 100, 120), (0, 0, 256, 256), (200, 3, 56, 50)]  # top, left, height, width
    x = torch.from_numpy(store256.copy()).permute(2, 0, 1)
    top, left, height, width = (torch.tensor(v) for v in zip(*boxes))
    ours = resized_crops(x[None].float().repeat(len(boxes), 1, 1, 1), top, left, height, width, 224, mode) / 255
    pil = Image.fromarray(store256)
    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[mode]
    ref = torch.stack([TF.to_tensor(pil_resize(pil.crop((j, i, j + w, i + h)), (224, 224), resample))
                       for i, j, h, w in boxes])
    assert_pil_exact(ours, ref)
    interp = {"bilinear": BILINEAR, "bicubic": BICUBIC}[mode]
    # torchvision's antialiased uint8 tensor resize approximates PIL to within a couple of levels
    tv = torch.stack([TF2.resized_crop(x, *box, [224, 224], interp, antialias=True) for box in boxes]).float() / 255
    assert levels(ours, tv)[0] <= 2
