"""The opt-in train stages of the device transforms: torchvision's ColorJitter and timm's RandAugment, reproduced on
uint8 levels with PIL's arithmetic (the references run both on PIL images), and the presets that use them.

Each op is compared with the reference library on the same factors / magnitudes (torchvision's functional ops on PIL
images, timm's PIL ops); the expected difference is 0 levels. The presets are checked end to end against the PIL ops
applied with the draws the transform made, and the presets that existed before keep their exact output.
"""

import dataclasses
import hashlib
import random
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from sklearn.datasets import load_sample_image

from cilbench.data import augment as A
from cilbench.data.augment import PRESETS, ImageTransform
from cilbench.errors import CilbenchError

aa = pytest.importorskip("timm.data.auto_augment")

FILL = (124, 116, 104)  # timm's img_mean for the ImageNet mean, which DyTox / DNE leave as create_transform's default
PIL_FILTER = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Uniform noise, a photo, a low-contrast image, a gray one and one with few levels, 36 x 40 (non-square)."""
    rng = np.random.default_rng(0)
    photo = np.asarray(Image.fromarray(load_sample_image("china.jpg")).resize((40, 36), Image.BICUBIC))
    out = [rng.integers(0, 256, (36, 40, 3)), photo, rng.integers(60, 120, (36, 40, 3)),
           np.repeat(rng.integers(0, 256, (36, 40, 1)), 3, 2), rng.choice([0, 17, 255], (36, 40, 3))]
    return np.stack(out).astype(np.uint8)


def levels(batch: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(batch.copy()).permute(0, 3, 1, 2).float()


def from_pil(imgs: list[Image.Image]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() for im in imgs])


@contextmanager
def negation(on: bool):
    """timm draws the sign of signed ops with random.random() > 0.5; fix it."""
    saved = random.random
    random.random = (lambda: 1.0) if on else (lambda: 0.0)
    try:
        yield
    finally:
        random.random = saved


def timm_args(name: str, magnitude: float, negate: bool) -> tuple:
    fn = aa.LEVEL_TO_ARG[name]
    with negation(negate):
        return fn(magnitude, {"translate_const": 14, "img_mean": FILL}) if fn is not None else ()


def timm_op(name: str, img: Image.Image, args: tuple, interpolation: str = "bicubic") -> Image.Image:
    if name.startswith("Posterize") and args[0] == 0:  # Pillow 13 rejects 0 bits; Pillow <= 12 made it black
        return Image.new("RGB", img.size, 0)
    return aa.NAME_TO_OP[name](img, *args, fillcolor=FILL, resample=PIL_FILTER[interpolation])


# ----------------------------------------------------------------------------------------------------- colour jitter

JITTER_OPS = {"brightness": (A.adjust_brightness, TF.adjust_brightness),
              "contrast": (A.adjust_contrast, TF.adjust_contrast),
              "saturation": (A.adjust_saturation, TF.adjust_saturation),
              "hue": (A.adjust_hue, TF.adjust_hue)}


@pytest.mark.parametrize("op", list(JITTER_OPS))
def test_jitter_ops_are_torchvisions_on_pil_images(op, images):
    """Each ColorJitter op equals torchvision's functional op on the PIL image (what PyCIL's ColorJitter runs), at
    factors in and beyond [0, 1] (hue: the whole [-0.5, 0.5]); the factors are float32, as ColorJitter draws them.
    torchvision's uint8-tensor path rounds differently (its own grayscale weights and mean, float HSV): within 2
    levels for brightness / contrast / saturation."""
    ours_fn, tv = JITTER_OPS[op]
    factors = [-0.5, -0.31, -0.004, 0.0, 0.13, 0.5] if op == "hue" else [0.0, 0.3, 1 - 63 / 255, 1.0, 1.247, 1.9]
    x = levels(images)
    for f in factors:
        f = float(torch.tensor(f, dtype=torch.float32))
        ours = ours_fn(x.clone(), torch.full((len(images),), f, dtype=torch.float64))
        ref = from_pil([tv(Image.fromarray(im), f) for im in images])
        assert torch.equal(ours, ref), (op, f, float((ours - ref).abs().max()))
        if op != "hue":
            tensor_ref = torch.stack([tv(torch.from_numpy(im.copy()).permute(2, 0, 1), f) for im in images]).float()
            assert float((ours - tensor_ref).abs().max()) <= 2


def test_hue_covers_every_hsv_sector_exactly():
    # 4096 colours spread over the RGB cube (all six hue sectors, grays, saturated and dark colours)
    v = torch.arange(0, 256, 17)
    rgb = torch.stack(torch.meshgrid(v, v, v, indexing="ij"), -1).reshape(-1, 3)[:4096]
    img = rgb.reshape(1, 64, -1, 3).to(torch.uint8).numpy()
    for f in (-0.45, -0.1, 0.2, 0.37):
        f = float(torch.tensor(f, dtype=torch.float32))
        ours = A.adjust_hue(levels(img), torch.tensor([f], dtype=torch.float64))
        assert torch.equal(ours, from_pil([TF.adjust_hue(Image.fromarray(img[0]), f)]))


def test_color_jitter_draws_ranges_and_orders_per_image():
    n = 4000
    x = torch.full((n, 3, 2, 2), 100.0)
    out = A.color_jitter(x.clone(), (0.4, 0.0, 0.0, 0.0), torch.Generator().manual_seed(0))
    factor = out[:, 0, 0, 0] / 100  # brightness only: 100 * f truncated
    assert float(factor.min()) >= 0.59 and float(factor.max()) <= 1.4 and float(factor.std()) > 0.2
    # the draws: the per-image order, then each active factor, uniform in torchvision's ranges
    g = torch.Generator().manual_seed(1)
    order = torch.argsort(torch.rand(n, 4, generator=g), dim=1)
    assert all(int((order[:, 0] == k).sum()) > n / 4 - 150 for k in range(4))  # every op first about 1/4 of the time
    # with two active ops the result depends on the drawn order: brightness then contrast != contrast then brightness
    img = torch.randint(0, 256, (1, 3, 8, 8), generator=torch.Generator().manual_seed(2)).float()
    b, c = torch.tensor([1.3], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)
    bc = A.adjust_contrast(A.adjust_brightness(img, b), c)
    cb = A.adjust_brightness(A.adjust_contrast(img, c), b)
    outs = {tuple(A.color_jitter(img.clone(), (0.3, 0.5, 0.0, 0.0), torch.Generator().manual_seed(s)).flatten()[:8]
                  .tolist()) for s in range(20)}
    assert len(outs) == 20 and not torch.equal(bc, cb)


# ------------------------------------------------------------------------------------------------------- RandAugment

ALL_OPS = sorted(set(A.RAND_OPS) | set(A.RAND_INCREASING_OPS))


@pytest.mark.parametrize("name", ALL_OPS)
def test_rand_augment_levels_are_timms(name):
    mags = [0.0, 0.5, 3.0, 8.6, 9.0, 9.49, 10.0]
    for negate in (False, True):
        ours = A.rand_augment_args(name, torch.tensor(mags, dtype=torch.float64), torch.full((len(mags),), negate))
        for i, m in enumerate(mags):
            ref = timm_args(name, m, negate)
            if ours is None:
                assert ref == ()
            else:
                assert float(ours[i]) == ref[0], (name, m, negate, float(ours[i]), ref)


@pytest.mark.parametrize("name", ALL_OPS)
def test_rand_augment_ops_are_timms_pil_ops(name, images):
    """Every op at fixed magnitudes, both signs, against timm's PIL op on the same images: exact (0 levels),
    geometric ops included (PIL's affine bicubic, a = -1, with timm's fill)."""
    x = levels(images)
    for m in (2.0, 9.0, 9.6, 10.0):
        for negate in (False, True):
            n = len(images)
            arg = A.rand_augment_args(name, torch.full((n,), m, dtype=torch.float64), torch.full((n,), negate))
            ours = A.rand_augment_op(name, x.clone(), arg, FILL, "bicubic")
            args = timm_args(name, m, negate)
            ref = from_pil([timm_op(name, Image.fromarray(im), args) for im in images])
            assert torch.equal(ours, ref), (name, m, negate, float((ours - ref).abs().max()))


@pytest.mark.parametrize("name", ["Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"])
def test_geometric_ops_with_bilinear_match_pil(name, images):
    x = levels(images)
    n = len(images)
    arg = A.rand_augment_args(name, torch.full((n,), 7.3, dtype=torch.float64), torch.full((n,), True))
    ours = A.rand_augment_op(name, x.clone(), arg, FILL, "bilinear")
    ref = from_pil([timm_op(name, Image.fromarray(im), timm_args(name, 7.3, True), "bilinear") for im in images])
    assert torch.equal(ours, ref)


def test_posterize_at_magnitude_10_keeps_no_bits():
    # PosterizeIncreasing at m = 10 keeps 0 bits: black under the Pillow of the references (<= 12, no range check)
    x = torch.randint(0, 256, (2, 3, 5, 5)).float()
    arg = A.rand_augment_args("PosterizeIncreasing", torch.full((2,), 10.0, dtype=torch.float64), torch.zeros(2).bool())
    assert arg.tolist() == [0.0, 0.0]
    assert float(A.rand_augment_op("PosterizeIncreasing", x, arg).abs().max()) == 0


def test_parse_rand_augment():
    spec = A.parse_rand_augment("rand-m9-mstd0.5-inc1")
    assert spec == A.RandAugmentSpec(magnitude=9.0, num_layers=2, std=0.5, max=10.0, increasing=True, prob=0.5)
    assert spec.ops == A.RAND_INCREASING_OPS == tuple(aa._RAND_INCREASING_TRANSFORMS)
    assert A.parse_rand_augment("rand-m7-n3").ops == tuple(aa._RAND_TRANSFORMS)
    assert A.parse_rand_augment("rand-m5-mstd101-mmax20") == A.RandAugmentSpec(5.0, 2, float("inf"), 20.0)
    for bad in ("augmix-m3", "rand-m9-w0", "rand-q3"):
        with pytest.raises(CilbenchError):
            ImageTransform(rand_augment=bad)
    with pytest.raises(CilbenchError, match="jitter"):
        ImageTransform(jitter=(0.4, 0.4, 0.4, 0.6))
    with pytest.raises(CilbenchError, match="aug_interpolation"):
        ImageTransform(aug_interpolation="nearest")


def test_rand_augment_draws_follow_timm():
    """2 layers, op uniform over the 15, applied with probability 1/2, magnitude ~ N(9, 0.5) clipped to [0, 10]."""
    spec = A.parse_rand_augment("rand-m9-mstd0.5-inc1")
    n = 6000
    g = torch.Generator().manual_seed(0)
    choice = torch.randint(0, 15, (n, 2), generator=g)
    applied = torch.rand(n, 2, generator=g, dtype=torch.float64) <= 0.5
    mag = (9 + 0.5 * torch.randn(n, 2, generator=g, dtype=torch.float64)).clamp(0, 10)
    negate = torch.rand(n, 2, generator=g, dtype=torch.float64) > 0.5
    assert abs(float(applied.double().mean()) - 0.5) < 0.02 and abs(float(negate.double().mean()) - 0.5) < 0.02
    assert abs(float(mag.mean()) - 9) < 0.03 and float(mag.max()) == 10.0
    assert torch.bincount(choice.flatten(), minlength=15).min() > 2 * n / 15 * 0.85
    # the transform draws exactly these: Invert-only images show which images were touched
    x = torch.full((n, 3, 1, 1), 10.0)
    out = A.rand_augment(x, spec, torch.Generator().manual_seed(0), FILL)
    inverted = ((choice == 2) & applied).sum(1) % 2 == 1
    only_points = ~(((choice != 2) & applied).any(1))
    assert torch.equal(out[only_points, 0, 0, 0] == 245.0, inverted[only_points])


# -------------------------------------------------------------------------------------------- presets, end to end


def _replay_rand_augment(base: torch.Tensor, seed_draws: torch.Generator, spec, interpolation) -> torch.Tensor:
    """timm's RandAugment with the draws the transform made, op by op on PIL images."""
    n = base.shape[0]
    choice = torch.randint(0, len(spec.ops), (n, spec.num_layers), generator=seed_draws)
    applied = torch.rand(n, spec.num_layers, generator=seed_draws, dtype=torch.float64) <= spec.prob
    mag = (spec.magnitude + spec.std * torch.randn(n, spec.num_layers, generator=seed_draws,
                                                   dtype=torch.float64)).clamp(0, spec.max)
    negate = torch.rand(n, spec.num_layers, generator=seed_draws, dtype=torch.float64) > 0.5
    out = []
    for i in range(n):
        img = Image.fromarray(base[i].permute(1, 2, 0).to(torch.uint8).numpy())
        for layer in range(spec.num_layers):
            if applied[i, layer]:
                name = spec.ops[int(choice[i, layer])]
                img = timm_op(name, img, timm_args(name, float(mag[i, layer]), bool(negate[i, layer])), interpolation)
        out.append(img)
    return from_pil(out)


def _skip_crop_draws(g: torch.Generator, t: ImageTransform, n: int, s: int) -> None:
    if t.pad:
        torch.randint(0, 9, (n,), generator=g), torch.randint(0, 9, (n,), generator=g), torch.rand(n, generator=g)
    else:
        t.crop_boxes(n, s, g)


@pytest.mark.parametrize("preset,store", [("dne-cifar", 32), ("dne-imagenet", 80)])
def test_dne_presets_are_crop_then_timm_rand_augment(preset, store):
    """The DNE presets = their crop + flip (the same draws as without RandAugment), then timm's RandAugment on the
    PIL image with the transform's own draws: exact. dne-imagenet is checked at 48 px for speed."""
    t = PRESETS[preset] if preset == "dne-cifar" else PRESETS[preset].with_size(48)
    raw = dataclasses.replace(t, mean=None, std=None)
    n = 48
    img = torch.randint(0, 256, (n, store, store, 3), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    ours = torch.round(raw(img, True, torch.Generator().manual_seed(4)) * 255)
    base = torch.round(dataclasses.replace(raw, rand_augment=None)(img, True, torch.Generator().manual_seed(4)) * 255)
    g = torch.Generator().manual_seed(4)
    _skip_crop_draws(g, t, n, store)
    ref = _replay_rand_augment(base, g, A.parse_rand_augment(t.rand_augment), t.aug_interpolation)
    assert torch.equal(ours, ref)
    assert int((ours != base).flatten(1).any(1).sum()) > n // 2  # most images were changed
    # normalisation as the base preset: dne-cifar uses CIFAR-100's mean / std
    normed = t(img, True, torch.Generator().manual_seed(4))
    mean, std = torch.tensor(t.mean).view(1, 3, 1, 1), torch.tensor(t.std).view(1, 3, 1, 1)
    assert torch.allclose(normed, (ours / 255 - mean) / std, atol=1e-5)


def test_cifar_pycil_is_cifar_then_pil_brightness():
    """PyCIL's iCIFAR100: RandomCrop(32, 4) + flip + ColorJitter(brightness=63/255) on the PIL image."""
    t = PRESETS["cifar-pycil"]
    n = 32
    img = torch.randint(0, 256, (n, 32, 32, 3), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    raw = dataclasses.replace(t, mean=None, std=None)
    ours = torch.round(raw(img, True, torch.Generator().manual_seed(6)) * 255)
    base = torch.round(dataclasses.replace(raw, jitter=None)(img, True, torch.Generator().manual_seed(6)) * 255)
    g = torch.Generator().manual_seed(6)
    _skip_crop_draws(g, t, n, 32)
    torch.rand(n, 4, generator=g)  # the op order (one op here)
    factors = torch.empty(n).uniform_(1 - 63 / 255, 1 + 63 / 255, generator=g)
    ref = from_pil([TF.adjust_brightness(Image.fromarray(base[i].permute(1, 2, 0).to(torch.uint8).numpy()),
                                         float(factors[i])) for i in range(n)])
    assert torch.equal(ours, ref)
    assert float(factors.min()) >= 1 - 63 / 255 and float(factors.max()) <= 1 + 63 / 255


@pytest.mark.parametrize("preset", ["dne-cifar", "cifar-pycil", "dne-imagenet"])
def test_new_presets_are_reproducible_and_eval_is_unchanged(preset):
    t = PRESETS[preset]
    s = 32 if t.pad else 64
    t = t if t.pad else t.with_size(48)
    img = torch.randint(0, 256, (8, s, s, 3), generator=torch.Generator().manual_seed(8), dtype=torch.uint8)
    a = t(img, True, torch.Generator().manual_seed(1))
    b = t(img, True, torch.Generator().manual_seed(1))
    c = t(img, True, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    plain = dataclasses.replace(t, rand_augment=None, jitter=None)
    assert torch.equal(t(img, False), plain(img, False))  # the new stages are train-only
    # a resumed run redraws the same batch from the generator's saved state
    g = torch.Generator().manual_seed(9)
    t(img, True, g)
    state = g.get_state()
    first = t(img, True, g)
    g2 = torch.Generator()
    g2.set_state(state)
    assert torch.equal(first, t(img, True, g2))


def test_dne_preset_parameters():
    cifar, imnet = PRESETS["dne-cifar"], PRESETS["dne-imagenet"]
    assert dataclasses.replace(cifar, rand_augment=None) == PRESETS["cifar"]
    assert dataclasses.replace(PRESETS["cifar-pycil"], jitter=None) == PRESETS["cifar"]
    assert dataclasses.replace(PRESETS["imagenet-pycil"], jitter=None) == PRESETS["imagenet-scratch"]
    assert PRESETS["cifar-pycil"].jitter == PRESETS["imagenet-pycil"].jitter == (63 / 255, 0.0, 0.0, 0.0)
    assert imnet.eval_resize == 256 and imnet.interpolation == imnet.eval_interpolation == "bicubic"
    assert imnet.scale == (0.08, 1.0) and imnet.mean == (0.485, 0.456, 0.406)
    assert cifar.aug_fill == tuple(min(255, round(255 * v)) for v in (0.485, 0.456, 0.406))  # timm's img_mean
    assert all(p.rand_augment is None and p.jitter is None for k, p in PRESETS.items()
               if k not in ("dne-cifar", "dne-imagenet", "cifar-pycil", "imagenet-pycil"))


def test_grayscale_store_is_augmented_as_rgb():
    img = torch.randint(0, 256, (4, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    out = PRESETS["dne-cifar"](img, True, torch.Generator().manual_seed(0))
    assert out.shape == (4, 3, 32, 32) and torch.isfinite(out).all()


# Digests of every pre-existing preset's output levels on a fixed batch (train and eval): the uint8 levels the
# transform produced before normalisation, recovered from its output. They were checked equal to the code before the
# jitter / RandAugment fields existed (there, digests of the float output bytes matched too); levels rather than float
# bytes, so that a CPU with other vector instructions cannot change a digest by an ulp of the normalisation.
BEFORE = {
    ("pilot", True): "d6cd120481cd4756", ("pilot", False): "1561f992b61cbadf",
    ("clip", True): "d15fd98cb96db3d1", ("clip", False): "3cd192dc097cb44c",
    ("slca-imagenet", True): "dfd7d1f50165571f", ("slca-imagenet", False): "1561f992b61cbadf",
    ("slca-cifar", True): "dfd7d1f50165571f", ("slca-cifar", False): "1561f992b61cbadf",
    ("slca-cub", True): "7a59078350bc0f4f", ("slca-cub", False): "1561f992b61cbadf",
    ("cifar", True): "f572d62c8bb4f73b", ("cifar", False): "fb4f6328594c917f",
    ("imagenet-scratch", True): "9b03e83956de18e5", ("imagenet-scratch", False): "b439ba939dc4f986",
    ("quick", True): "d15fd98cb96db3d1", ("quick", False): "3cd192dc097cb44c",
}


@pytest.mark.parametrize("name,train", list(BEFORE))
def test_existing_presets_are_bit_identical(name, train):
    t = PRESETS[name]
    s = 32 if t.pad else 48
    t = t if t.pad else t.with_size(40)
    img = torch.randint(0, 256, (5, s, s, 3), generator=torch.Generator().manual_seed(11), dtype=torch.uint8)
    out = t(img, train, torch.Generator().manual_seed(7))
    mean = torch.tensor(t.mean or (0.0, 0.0, 0.0)).view(1, 3, 1, 1)
    std = torch.tensor(t.std or (1.0, 1.0, 1.0)).view(1, 3, 1, 1)
    levels = (out * std + mean) * 255
    assert (levels - levels.round()).abs().max() < 1e-3  # whole uint8 levels, as PIL's rounding leaves them
    digest = hashlib.sha256(levels.round().to(torch.uint8).contiguous().numpy().tobytes()).hexdigest()[:16]
    assert digest == BEFORE[(name, train)]
