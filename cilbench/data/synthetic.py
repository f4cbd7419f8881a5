"""Procedural images with real class structure, for tests and smoke runs (no download).

A class is a combination of a shape (7 kinds), an object colour (10 hues) and a texture frequency (3 kinds): class
``c`` has shape ``c % 7``, colour ``c % 10`` and frequency ``c % 3``, so every class below 210 is a distinct
combination and any 5 consecutive classes differ in shape and colour. Each image places the object at a random
position, scale and rotation over a background; pixel noise is added. Class ``c`` belongs to domain
``c // (num_classes // num_domains)``, and the domain sets the rendering style: background colour, background pattern
(flat, stripes, checkerboard, gradient), noise level and object contrast. Everything is vectorised numpy and
deterministic for a seed; the train and test splits draw from independent streams.
"""

from __future__ import annotations

import numpy as np

GENERATOR_VERSION = 1  # bump when the rendering changes, so stores built by an older generator are rebuilt

_NUM_SHAPES = 7
_NUM_COLOURS = 10
_FREQUENCIES = np.array([0.0, 1.0, 2.2], np.float32)  # texture cycles per object radius (0 = solid)
# per domain style (index d % 4): noise std, object contrast against the background, pattern amplitude
_NOISE = np.array([0.03, 0.05, 0.04, 0.08], np.float32)
_CONTRAST = np.array([1.0, 0.8, 0.9, 0.65], np.float32)
_PATTERN_AMP = np.array([0.0, 0.12, 0.10, 0.25], np.float32)


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB for arrays of equal shape, all in [0, 1]; returns [..., 3]."""
    i = np.floor(h * 6.0).astype(np.int64) % 6
    f = h * 6.0 - np.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    table = np.stack([np.stack(c, -1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))])
    return np.take_along_axis(table, i[None, ..., None], 0)[0]


def _shape_masks(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """All shapes in object coordinates (unit radius): [7, N, S, S] bool."""
    au, av, r = np.abs(u), np.abs(v), np.hypot(u, v)
    return np.stack([
        r <= 1.0,                                                   # disk
        np.maximum(au, av) <= 0.8,                                  # square
        au + av <= 1.0,                                             # diamond
        (r <= 1.0) & (r >= 0.55),                                   # ring
        ((au <= 0.3) & (av <= 1.0)) | ((av <= 0.3) & (au <= 1.0)),  # cross
        (v >= -0.8) & (v <= 0.8) & (au <= 0.6 * (0.8 - v) + 1e-6),  # triangle
        (au <= 1.0) & (av <= 0.35),                                 # bar
    ])


def _render(classes: np.ndarray, domains: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    n = len(classes)
    grid = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    ys, xs = np.meshgrid(grid, grid, indexing="ij")

    # object: random placement, scale and rotation
    cx, cy = rng.uniform(-0.3, 0.3, (2, n)).astype(np.float32)
    scale = rng.uniform(0.45, 0.7, n).astype(np.float32)
    theta = rng.uniform(0, 2 * np.pi, n).astype(np.float32)
    cos, sin = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    dx, dy = xs[None] - cx[:, None, None], ys[None] - cy[:, None, None]
    u = (dx * cos + dy * sin) / scale[:, None, None]
    v = (-dx * sin + dy * cos) / scale[:, None, None]
    mask = _shape_masks(u, v)[classes % _NUM_SHAPES, np.arange(n)]
    hue = (classes % _NUM_COLOURS) / _NUM_COLOURS + rng.uniform(-0.015, 0.015, n)
    colour = _hsv_to_rgb((hue % 1.0).astype(np.float32), np.full(n, 0.85, np.float32),
                         rng.uniform(0.85, 1.0, n).astype(np.float32))
    freq = _FREQUENCIES[classes % len(_FREQUENCIES)][:, None, None]
    texture = 0.65 + 0.35 * np.cos(2 * np.pi * freq * u)
    obj = colour[:, None, None, :] * texture[..., None]

    # background: the domain's colour and pattern
    style = domains % 4
    bg_hue = ((0.08 + 0.29 * domains) % 1.0).astype(np.float32)
    bg_val = np.where(domains % 2 == 0, 0.25, 0.75).astype(np.float32) + rng.uniform(-0.05, 0.05, n).astype(np.float32)
    base = _hsv_to_rgb(bg_hue, np.full(n, 0.35, np.float32), bg_val)
    phase = rng.uniform(0, 2 * np.pi, n).astype(np.float32)[:, None, None]
    direction = rng.uniform(0, 2 * np.pi, n).astype(np.float32)[:, None, None]
    patterns = np.stack([
        np.zeros((n, size, size), np.float32),
        np.cos(2 * np.pi * 3 * ys[None] + phase),                                        # stripes
        np.sign(np.sin(4 * np.pi * xs[None] + phase) * np.sin(4 * np.pi * ys[None] + phase)),  # checkerboard
        xs[None] * np.cos(direction) + ys[None] * np.sin(direction),                     # gradient
    ])[style, np.arange(n)]
    bg = base[:, None, None, :] + (_PATTERN_AMP[style][:, None, None] * patterns)[..., None]

    contrast = _CONTRAST[style][:, None, None, None]
    img = np.where(mask[..., None], bg + contrast * (obj - bg), bg)
    img = img + rng.standard_normal(img.shape, dtype=np.float32) * _NOISE[style][:, None, None, None]
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def make_synthetic(num_classes: int = 20, num_domains: int = 4, train_per_class: int = 24, test_per_class: int = 8,
                   size: int = 32, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``{"train": (images uint8 [N,S,S,3], labels int64 [N], domains int64 [N]), "test": ...}``, class-major order."""
    if num_domains < 1 or num_classes % num_domains:
        raise ValueError(f"num_classes ({num_classes}) must be a multiple of num_domains ({num_domains})")
    if num_classes > _NUM_SHAPES * _NUM_COLOURS * len(_FREQUENCIES):
        raise ValueError(f"at most {_NUM_SHAPES * _NUM_COLOURS * len(_FREQUENCIES)} distinct synthetic classes")
    per_domain = num_classes // num_domains
    out = {}
    for stream, (split, per_class) in enumerate((("train", train_per_class), ("test", test_per_class))):
        rng = np.random.default_rng([seed, stream])
        labels = np.repeat(np.arange(num_classes, dtype=np.int64), per_class)
        domains = labels // per_domain
        out[split] = (_render(labels, domains, size, rng), labels, domains)
    return out
