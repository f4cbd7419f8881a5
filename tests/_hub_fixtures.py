"""Tiny local files shaped like the hub repositories and archives cilbench reads (no network needed).

Parquet repos are written the way ``push_to_hub`` lays them out (``data/<split>-00000-of-00001.parquet``, or a
config folder plus a README whose YAML names the config, as ``axiong/imagenet-r``), with the same columns and
features as the real repos, so ``datasets.load_dataset(<folder>)`` reads them exactly as it reads the hub.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cilbench.data.catalog import DatasetSpec, register


def solid(rgb: tuple[int, int, int], width: int, height: int) -> Image.Image:
    return Image.fromarray(np.full((height, width, 3), rgb, np.uint8))


def colour_of(label: int) -> tuple[int, int, int]:
    """A distinct solid colour per label, far from its neighbours."""
    return ((37 * label + 20) % 256, (91 * label + 60) % 256, (151 * label + 100) % 256)


def unique_spec(**fields: Any) -> DatasetSpec:
    """Register a throw-away catalog entry with a unique name (the registry refuses duplicates)."""
    spec = DatasetSpec(name=f"test-{uuid.uuid4().hex[:10]}", description="test fixture", **fields)
    register(spec)
    return spec


def _write(ds: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(path))


def cifar100_repo(root: Path, per_class: dict[str, dict[int, int]], num_names: int = 100) -> Path:
    """``uoft-cs/cifar100``-shaped repo: ``img`` Image (32x32), ``fine_label`` ClassLabel, ``coarse_label``
    ClassLabel(20); ``per_class[split][label]`` images of the label's solid colour."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    features = Features({"img": ImageFeature(), "fine_label": ClassLabel(names=[f"fine{i:03d}" for i in
                                                                                 range(num_names)]),
                         "coarse_label": ClassLabel(names=[f"coarse{i}" for i in range(20)])})
    for split, counts in per_class.items():
        labels = [c for c, n in counts.items() for _ in range(n)]
        ds = Dataset.from_dict({"img": [solid(colour_of(c), 32, 32) for c in labels], "fine_label": labels,
                                "coarse_label": [c % 20 for c in labels]}).cast(features)
        _write(ds, root / "data" / f"{split}-00000-of-00001.parquet")
    return root


IMAGENET_R_README = """---
license: mit
dataset_info:
  config_name: test
  features:
  - name: image
    dtype: image
  - name: wnid
    dtype: string
  - name: class_name
    dtype: string
configs:
- config_name: test
  data_files:
  - split: test
    path: test/test-*
  default: true
---
# ImageNet-R (test fixture)
"""


def imagenet_r_repo(root: Path, classes: list[tuple[str, str, int]], sizes: list[tuple[int, int]]) -> Path:
    """``axiong/imagenet-r``-shaped repo: one split ``test`` in config ``test``, columns ``image`` (varied sizes),
    ``wnid`` string and ``class_name`` string; ``classes`` = (wnid, name, count), rows interleaved."""
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    rows = [(k, wnid, name) for k, (wnid, name, n) in enumerate(classes) for _ in range(n)]
    order = np.random.default_rng(0).permutation(len(rows))  # interleave classes like a real source
    rows = [rows[i] for i in order]
    images = [solid(colour_of(k), *sizes[i % len(sizes)]) for i, (k, _, _) in enumerate(rows)]
    ds = Dataset.from_dict({"image": images, "wnid": [r[1] for r in rows], "class_name": [r[2] for r in rows]}).cast(
        Features({"image": ImageFeature(), "wnid": Value("string"), "class_name": Value("string")}))
    _write(ds, root / "test" / "test-00000-of-00001.parquet")
    (root / "README.md").write_text(IMAGENET_R_README)
    return root


def labelled_repo(root: Path, num_names: int, per_class: dict[str, dict[int, int]], size: int = 24) -> Path:
    """A generic ``image`` + ``label`` ClassLabel repo (the shape of timm/*, tanganke/dtd, ...)."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    features = Features({"image": ImageFeature(), "label": ClassLabel(names=[f"{root.name}-{i}" for i in
                                                                            range(num_names)])})
    for split, counts in per_class.items():
        labels = [c for c, n in counts.items() for _ in range(n)]
        ds = Dataset.from_dict({"image": [solid(colour_of(c), size, size) for c in labels],
                                "label": labels}).cast(features)
        _write(ds, root / "data" / f"{split}-00000-of-00001.parquet")
    return root


def image_folder(root: Path, per_class: dict[str, dict[str, int]], size: tuple[int, int] = (20, 28)) -> Path:
    """``<root>/{train,test}/<class>/<i>.png|jpg``: PNG for even i, JPEG for odd i, class k in colour_of(k)."""
    classes = sorted({c for counts in per_class.values() for c in counts})
    for split, counts in per_class.items():
        for cls, n in counts.items():
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = solid(colour_of(classes.index(cls)), *size)
                img.save(folder / (f"{i:03d}.png" if i % 2 == 0 else f"{i:03d}.jpg"), quality=95)
    return root
