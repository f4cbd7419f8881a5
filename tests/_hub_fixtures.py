"""Tiny local files shaped like the hub repositories and archives cilbench reads (no network needed).

Parquet repos are written the way ``push_to_hub`` lays them out (``data/<split>-00000-of-00001.parquet``, or a
config folder plus a README whose YAML names the config, as ``axiong/imagenet-r``), with the same columns and
features as the real repos, so ``datasets.load_dataset(<folder>)`` reads them exactly as it reads the hub. The
builders of the second part follow the real repositories' dataset cards and file trees (see each docstring): several
label columns with the right one not first, an integer label with a names column, WordNet-id names, a repo that
still holds a loading script, splits the catalog never reads, a split named ``valid``.
"""

from __future__ import annotations

import json
import uuid
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from cilbench.data.catalog import DatasetSpec, register
from cilbench.models.templates import CLASS_NAMES


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


# ---------------------------------------------------------------- the MTIL / PTM-CIL hub repos, as their cards are
#
# Each builder below writes a small copy shaped like the real repository at the revision the catalog reads (or, for
# the loading-script case, at the old pull-request pin): the same files (parquet shard names, README YAML with
# `dataset_info` and `configs`, stray files such as a loading script or zip archives), the same columns in the same
# order with the same feature types and ClassLabel names, and the same splits. Only the number of rows is small.

def _shards(ds: Any, folder: Path, split: str, n: int, suffix: str = "") -> None:
    """``<folder>/<split>-0000i-of-0000n<suffix>.parquet`` as ``push_to_hub`` writes them (fewer shards when there
    are fewer rows)."""
    folder.mkdir(parents=True, exist_ok=True)
    n = max(1, min(n, len(ds)))
    for i in range(n):
        ds.shard(n, i, contiguous=True).to_parquet(str(folder / f"{split}-{i:05d}-of-{n:05d}{suffix}.parquet"))


def _readme(root: Path, features: Any, splits: dict[str, int], data_files: dict[str, str] | None,
            config: str = "default", head: dict[str, Any] | None = None, body: str = "") -> None:
    """README.md whose YAML holds ``dataset_info`` (features, splits) and, when given, ``configs``."""
    info: dict[str, Any] = {"features": features._to_yaml_list(),
                            "splits": [{"name": s, "num_bytes": 1000 * n, "num_examples": n}
                                       for s, n in splits.items()],
                            "download_size": 1000, "dataset_size": 1000}
    if config != "default":
        info = {"config_name": config, **info}
    meta: dict[str, Any] = {**(head or {}), "dataset_info": info}
    if data_files is not None:
        meta["configs"] = [{"config_name": config, "data_files": [{"split": s, "path": p}
                                                                  for s, p in data_files.items()]}]
    (root / "README.md").write_text("---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n" + body)


def _images(labels: list[int], size: tuple[int, int] = (12, 10)) -> list[Image.Image]:
    return [solid(colour_of(c), *size) for c in labels]


# FGVC-Aircraft hierarchy (families.txt, manufacturers.txt of fgvc-aircraft-2013b)
AIRCRAFT_FAMILIES = (
    "A300", "A310", "A320", "A330", "A340", "A380", "ATR-42", "ATR-72", "An-12", "BAE 146", "BAE-125",
    "Beechcraft 1900", "Boeing 707", "Boeing 717", "Boeing 727", "Boeing 737", "Boeing 747", "Boeing 757", "Boeing 767",
    "Boeing 777", "C-130", "C-47", "CRJ-200", "CRJ-700", "Cessna 172", "Cessna 208", "Cessna Citation",
    "Challenger 600", "DC-10", "DC-3", "DC-6", "DC-8", "DC-9", "DH-82", "DHC-1", "DHC-6", "DR-400", "Dash 8",
    "Dornier 328", "EMB-120", "Embraer E-Jet", "Embraer ERJ 145", "Embraer Legacy 600", "Eurofighter Typhoon", "F-16",
    "F/A-18", "Falcon 2000", "Falcon 900", "Fokker 100", "Fokker 50", "Fokker 70", "Global Express", "Gulfstream",
    "Hawk T1", "Il-76", "King Air", "L-1011", "MD-11", "MD-80", "MD-90", "Metroliner", "PA-28", "SR-20", "Saab 2000",
    "Saab 340", "Spitfire", "Tornado", "Tu-134", "Tu-154", "Yak-42")
AIRCRAFT_MANUFACTURERS = (
    "ATR", "Airbus", "Antonov", "Beechcraft", "Boeing", "Bombardier Aerospace", "British Aerospace", "Canadair",
    "Cessna", "Cirrus Aircraft", "Dassault Aviation", "Dornier", "Douglas Aircraft Company", "Embraer", "Eurofighter",
    "Fairchild", "Fokker", "Gulfstream Aerospace", "Ilyushin", "Lockheed Corporation", "Lockheed Martin",
    "McDonnell Douglas", "Panavia", "Piper", "Robin", "Saab", "Supermarine", "Tupolev", "Yakovlev", "de Havilland")


def _placed(names: tuple[str, ...], known: dict[int, str]) -> list[str]:
    """A ClassLabel order that is not the official one: ``known`` positions as seen in the repo's viewer, the other
    names in their official order around them."""
    out: list[str | None] = [None] * len(names)
    for i, n in known.items():
        out[i] = n
    rest = iter(n for n in names if n not in known.values())
    return [n if n is not None else next(rest) for n in out]


def fgvc_aircraft_repo(root: Path, rows: dict[str, list[int]]) -> Path:
    """``Donghyun99/FGVC-Aircraft`` at 3237e2c: parquet ``data/{train,val,test}-0000i-of-00002.parquet``, columns
    ``image``, ``label`` = ClassLabel of the 70 FAMILIES (the first label column), ``variation`` = ClassLabel of the 100
    variants, ``manufacturer`` = ClassLabel(30); label orders are the repo's (first-seen), not the official ones.
    ``rows[split]`` = variant ids (in the ``variation`` ClassLabel) of the rows to write."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    variants = _placed(CLASS_NAMES["aircraft"], {0: "MD-80", 7: "MD-87", 15: "727-200", 18: "A321", 36: "737-200",
                                                 45: "Boeing 717", 50: "MD-11", 95: "707-320"})
    families = _placed(AIRCRAFT_FAMILIES, {0: "MD-11", 6: "MD-80", 11: "Boeing 727", 30: "Boeing 737",
                                           53: "Boeing 707", 63: "Boeing 717", 69: "A320"})
    makers = _placed(AIRCRAFT_MANUFACTURERS, {10: "Airbus", 14: "Boeing", 21: "McDonnell Douglas"})
    family_of = {"MD-80": "MD-80", "MD-87": "MD-80", "727-200": "Boeing 727", "A321": "A320", "737-200": "Boeing 737",
                 "Boeing 717": "Boeing 717", "MD-11": "MD-11", "707-320": "Boeing 707"}
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=families),
                         "variation": ClassLabel(names=variants), "manufacturer": ClassLabel(names=makers)})
    for split, ids in rows.items():
        fam = [families.index(family_of.get(variants[v], families[v % 70])) for v in ids]
        ds = Dataset.from_dict({"image": _images(ids), "label": fam, "variation": ids,
                                "manufacturer": [v % 30 for v in ids]}).cast(features)
        _shards(ds, root / "data", split, 2)
    _readme(root, features, {s: len(v) for s, v in rows.items()}, {s: f"data/{s}-*" for s in rows},
            head={"language": ["en"], "task_categories": ["image-classification"]})
    return root


DTD_README_BODY = "# Dataset Card for Describable Textures Dataset (DTD)\n"


def dtd_split_1_repo(root: Path, rows: dict[str, list[int]]) -> Path:
    """``mcimpoi/dtd_split_1`` (main): DTD partition 1 as ``train`` / ``validation`` / ``test`` (1,880 each in the
    real repo), files named by the old ``push_to_hub`` (``data/<split>-00000-of-00001-<16 hex>.parquet``), columns
    ``image`` and ``label`` = ClassLabel of the 47 texture names; the README holds ``dataset_info`` and no
    ``configs`` (splits come from the file names)."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    features = Features({"image": ImageFeature(), "label": ClassLabel(names=list(CLASS_NAMES["dtd"]))})
    for k, (split, ids) in enumerate(rows.items()):
        ds = Dataset.from_dict({"image": _images(ids), "label": ids}).cast(features)
        _shards(ds, root / "data", split, 1, suffix=f"-{uuid.UUID(int=k + 1).hex[:16]}")
    _readme(root, features, {s: len(v) for s, v in rows.items()}, None, head={"license": "cc-by-4.0"},
            body=DTD_README_BODY)
    return root


def tanganke_dtd_with_script(root: Path) -> Path:
    """``tanganke/dtd`` at cd52f56 (the first commit of its parquet-conversion pull request, the old catalog pin):
    the parquet conversion beside what it replaced, ``dtd.py`` (a loading script) and ``data/{train,test}.zip``;
    ``train`` there is train+val (3,760). ``root`` must be named ``dtd``, as a clone of the repo is."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    assert root.name == "dtd"
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=list(CLASS_NAMES["dtd"]))})
    for split, ids in {"train": [0, 1, 2, 3], "test": [0, 1]}.items():
        ds = Dataset.from_dict({"image": _images(ids), "label": ids}).cast(features)
        _shards(ds, root / "data", split, 1)
        with zipfile.ZipFile(root / "data" / f"{split}.zip", "w") as z:
            z.writestr(f"{split}/banded/banded_0002.jpg", b"not decoded here")
    _readme(root, features, {"train": 4, "test": 2}, {"train": "data/train-*", "test": "data/test-*"})
    (root / "dtd.py").write_text('"""A datasets loading script (an ImageFolder builder over data/*.zip)."""\n'
                                 "import datasets\n")
    return root


def cub_repo(root: Path, rows: dict[str, list[int]], base: int = 0, names: dict[int, str] | None = None) -> Path:
    """``dpdl-benchmark/caltech_birds2011`` at 0831146 (a TFDS export): ``image``, ``image/filename`` string,
    ``label`` plain int64 (TFDS's 0-based class id), ``label_name`` string (the class folder name without its number,
    lower-cased: ``black_footed_albatross``), ``bbox`` float32 sequence, ``segmentation_mask`` image; splits train /
    test in ``data/<split>-0000i-of-00002.parquet``; the README (588 bytes) holds ``dataset_info`` and ``configs``.
    ``rows[split]`` = class ids 0..199; ``base`` shifts the written labels (a 1-based copy); ``names`` overrides the
    name written for a class id."""
    from datasets import Dataset, Features, Sequence, Value
    from datasets import Image as ImageFeature

    features = Features({"image": ImageFeature(), "image/filename": Value("string"), "label": Value("int64"),
                         "label_name": Value("string"), "bbox": Sequence(Value("float32")),
                         "segmentation_mask": ImageFeature()})
    for split, ids in rows.items():
        label_names = [(names or {}).get(c, CUB_NAMES[c]) for c in ids]
        ds = Dataset.from_dict({
            "image": _images(ids), "image/filename": [f"{c + 1:03d}.{n}/{n}_{i:04d}.jpg"
                                                      for i, (c, n) in enumerate(zip(ids, label_names))],
            "label": [c + base for c in ids], "label_name": label_names,
            "bbox": [[0.1, 0.1, 0.9, 0.9]] * len(ids),
            "segmentation_mask": [Image.new("L", (12, 10)) for _ in ids]}).cast(features)
        _shards(ds, root / "data", split, 2)
    _readme(root, features, {s: len(v) for s, v in rows.items()}, {s: f"data/{s}-*" for s in rows})
    return root


# TFDS label_name values: the CUB class folder name after its number, lower-cased (200 species; only their form
# matters here)
CUB_NAMES = tuple(["black_footed_albatross", "laysan_albatross", "sooty_albatross", "groove_billed_ani",
                   "crested_auklet"] + [f"species_{i:03d}" for i in range(5, 200)])


def imagenet_a_repo(root: Path, rows: list[str], extra_wnids: tuple[str, ...] = ()) -> Path:
    """``barkermrl/imagenet-a`` (main): one split ``train`` (7,500 in the real repo) in
    ``data/train-0000i-of-00002-<16 hex>.parquet``, columns ``image`` and ``label`` = ClassLabel whose 200 names are
    WordNet ids, a README with ``dataset_info`` and the legacy ``dataset_infos.json``. ``rows`` = the WordNet id of
    each row; ``extra_wnids`` are added to the ClassLabel (a copy with other classes)."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    from cilbench.data.sources import names_map

    wnids = sorted(set(names_map("imagenet_a_classes.txt")) | set(extra_wnids))
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=wnids)})
    ids = [wnids.index(w) for w in rows]
    ds = Dataset.from_dict({"image": _images(ids), "label": ids}).cast(features)
    for i in range(2):
        folder = root / "data"
        folder.mkdir(parents=True, exist_ok=True)
        name = f"train-{i:05d}-of-00002-{uuid.UUID(int=i + 7).hex[:16]}.parquet"
        ds.shard(2, i, contiguous=True).to_parquet(str(folder / name))
    _readme(root, features, {"train": len(rows)}, None, head={"license": "mit"})
    (root / "dataset_infos.json").write_text(json.dumps({"barkermrl--imagenet-a": {
        "description": "", "features": features.to_dict(), "splits": {"train": {"name": "train",
                                                                                 "num_examples": len(rows)}}}}))
    return root


STANFORD_CARS_CORRUPTIONS = ("contrast", "gaussian_noise", "impulse_noise", "jpeg_compression", "motion_blur",
                             "pixelate", "spatter")


def stanford_cars_repo(root: Path, rows: dict[str, list[int]]) -> Path:
    """``tanganke/stanford_cars`` at 9abf6cf (main): ``image`` and ``label`` = ClassLabel of the 196 car names;
    splits train (8,144) / test (8,041) and seven corrupted copies of test (contrast, gaussian_noise,
    impulse_noise, jpeg_compression, motion_blur, pixelate, spatter), each in ``data/<split>-0000i-of-0000n.parquet``
    and named in the README's ``configs``. ``rows`` gives train / test; each corruption gets test's rows."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    features = Features({"image": ImageFeature(), "label": ClassLabel(names=list(CLASS_NAMES["cars"]))})
    splits = {**rows, **{c: rows["test"] for c in STANFORD_CARS_CORRUPTIONS}}
    for split, ids in splits.items():
        ds = Dataset.from_dict({"image": _images(ids), "label": ids}).cast(features)
        _shards(ds, root / "data", split, 1 if split == "pixelate" else 2)
    _readme(root, features, {s: len(v) for s, v in splits.items()}, {s: f"data/{s}-*" for s in splits},
            head={"language": ["en"], "size_categories": ["10K<n<100K"]})
    return root


def sun397_repo(root: Path, rows: dict[str, list[int]]) -> Path:
    """``tanganke/sun397`` at 9c4afd6 (main): SUN397 partition 01 only (19,850 / 19,850 in the real repo),
    ``image`` and ``label`` = ClassLabel of the 397 scene names (the loading script's spelling: no ``/x/`` prefix,
    underscores and slashes as spaces), ``data/<split>-000ii-of-000nn.parquet``."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    names = [n.replace("/", " ") for n in CLASS_NAMES["sun397"]]
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=names)})
    for split, ids in rows.items():
        ds = Dataset.from_dict({"image": _images(ids), "label": ids}).cast(features)
        _shards(ds, root / "data", split, 3)
    _readme(root, features, {s: len(v) for s, v in rows.items()}, {s: f"data/{s}-*" for s in rows},
            head={"task_categories": ["image-classification"], "language": ["en"]})
    return root


def tiny_imagenet_repo(root: Path, rows: dict[str, list[int]]) -> Path:
    """``zh-plus/tiny-imagenet``: ``image`` (64x64) and ``label`` = ClassLabel of 200 sorted WordNet ids; splits
    ``train`` and ``valid`` (a split named ``valid``, not ``validation``)."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    from cilbench.data.scenario import fixed_orders

    wnids = sorted(fixed_orders()["tinyimagenet-zscl"]["label_space"])
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=wnids)})
    for split, ids in rows.items():
        ds = Dataset.from_dict({"image": _images(ids, (64, 64)), "label": ids}).cast(features)
        _shards(ds, root / "data", split, 1, suffix=f"-{uuid.UUID(int=len(split)).hex[:16]}")
    _readme(root, features, {s: len(v) for s, v in rows.items()}, {s: f"data/{s}-*" for s in rows},
            head={"task_categories": ["image-classification"]})
    return root
