"""The dataset catalog: one declaration per dataset of PROTOCOLS.md, all logic lives elsewhere.

A ``DatasetSpec`` says where the images come from (a hub repository with a pinned revision where one is known, a
local ImageFolder tree, or a builder that needs no network), how many classes there are, how the train/test split is
made when the source has none, at what size the store keeps images, and which CLIP templates name its classes.
A ``SequenceSpec`` is an ordered list of datasets (the MTIL sequence), each a task with its own label space.

Each hub source below was checked against the repository's dataset card (YAML ``dataset_info``: configs, features,
ClassLabel names, splits) and file tree; a pinned ``revision`` is a commit on the repository's main history (not a
pull-request branch), and where the full hash of a merged revision could not be established the revision is left
unpinned and the one resolved at download time is written into the store manifest (the comment says which). What
``prepare`` cannot know before reading the data (class count, the base of integer labels, class names) is checked
against these declarations and fails in one line when they disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cilbench.registry import Registry


@dataclass(frozen=True)
class HubSource:
    """A dataset on the Hugging Face hub, read with ``datasets.load_dataset``.

    ``splits`` maps our split names to the hub's; a single hub split (``{"all": "train"}``) means the split is built
    by ``SplitRule``. Only the hub splits named here are downloaded (a repo's other splits, e.g. the corrupted-image
    splits of tanganke/stanford_cars, are never fetched). Image and label columns are detected from the features
    (first ``Image``, first ``ClassLabel``) unless named here: name the label column whenever a repo has several
    (FGVC-Aircraft's first ClassLabel is the 70 families, not the 100 variants). ``revision`` is a pinned commit on
    the repo's main history where one is known; otherwise the revision resolved at download time is written into the
    store manifest.
    """

    repo: str
    revision: str | None = None
    config: str | None = None
    splits: tuple[tuple[str, str], ...] = (("train", "train"), ("test", "test"))
    image_column: str | None = None
    label_column: str | None = None
    label_names_column: str | None = None  # a string column naming each class, when labels are not ClassLabel
    label_base: int = 0  # integer (non-ClassLabel) labels run label_base .. label_base + K - 1; prepare checks it
    names_map: str | None = None  # resources file mapping the source's class names (WordNet ids) to readable ones
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
    # resources file of the class folder names a local folder must hold, in label order (``<label> <name>`` lines):
    # the protocol's class list (ImageNet100's 100 WordNet ids); other class folders are left out (a whole
    # ImageNet-1k tree works), a missing one is refused
    class_list: str | None = None
    split_rule: SplitRule | None = None  # None: the source's official train/test splits
    store_size: int | None = 256  # None: keep the source's native size (all images the same size)
    class_names: tuple[str, ...] | None = None  # when the catalog can hold them; else read from the source
    templates: str = "default"  # key into cilbench.models.templates
    paper_counts: tuple[int, int] | None = None  # train / test images of the papers' archives
    notes: str = ""
    default_scenario: str = "B0Inc10"  # the papers' usual split for this dataset
    builder_options: dict[str, Any] = field(default_factory=dict)
    # whether our train / test split equals the one the papers' tables used (None: no published split to compare),
    # and in words how it differs and how to bring the papers' own (``cilbench datasets info`` prints both)
    published_split: bool | None = None
    split_vs_papers: str = ""
    # the class order a CIL scenario uses unless --class-order names another: None = the seeded permutation
    # (PILOT), "identity" = 0..N-1 (VTAB: every official config sets shuffle false, so task t is domain t)
    default_class_order: str | None = None

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
    shots: int | None = None  # few-shot: training images per class drawn once (``--shots`` overrides)

    def datasets(self, order: str | None = None) -> tuple[str, ...]:
        return self.orders[order or self.default_order]


DATASETS: Registry[DatasetSpec | SequenceSpec] = Registry("dataset")


def register(spec: DatasetSpec | SequenceSpec) -> None:
    DATASETS.register(spec.name, spec, kind="sequence" if isinstance(spec, SequenceSpec) else "dataset")


def get_spec(name: str) -> DatasetSpec | SequenceSpec:
    if name not in DATASETS or DATASETS.metadata(name).get("user"):
        # datasets added with `cilbench datasets add`: read from the user catalog (JSON under the cache folder,
        # never code) only for names the built-in catalog does not hold
        from cilbench.data.user_catalog import sync

        sync()
    return DATASETS.get(name)


_ONE_SPLIT_80_20 = SplitRule(test_fraction=0.2, seed=1993)
_SEED42_80_20 = SplitRule(test_fraction=0.2, seed=42)
_IMAGEFOLDER = "<dir>/{train,test}/<class>/*.jpg"
_ARCHIVE = ("download the RevisitingCIL {what} archive (links in the 'Dataset' section of github.com/zhoudw-zdw/"
            "RevisitingCIL's README; it unpacks to {folder}/{{train,test}}/<class>/) and run `cilbench datasets "
            "prepare {name} --source <dir>/{folder}` (add --force over a prepared store)")
_MTIL_RANDOM_SPLIT = ("the official MTIL code splits {what} 80/20 with torch.utils.data.random_split("
                      "generator=torch.Generator().manual_seed(42)) over torchvision's sample order; here a "
                      "stratified seeded 80/20 split of the same images: same sizes, other images, so numbers "
                      "compare only approximately")

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
                store_size=None, templates="cifar100", paper_counts=(50000, 10000), published_split=True,
                split_vs_papers="the official 50,000 / 10,000 split, the one PILOT, EASE, MOS and ZSCL use"),
    DatasetSpec("tinyimagenet", 200, "TinyImageNet-200 (validation set used as test)",
                default_scenario="B100Inc20",
                hub=HubSource("zh-plus/tiny-imagenet", revision="b427d143d5e9bf39d5132c552063f3c5ba3facd6",
                              splits=(("train", "train"), ("test", "valid")), image_column="image",
                              label_column="label"),
                store_size=None, templates="tinyimagenet", paper_counts=(100000, 10000), published_split=True,
                split_vs_papers="train 100,000 / the official validation set (the hub's split 'valid', 10,000) as "
                                "test, as continuum's TinyImageNet200 used by ZSCL / MoE-Adapters",
                notes="labels are sorted WordNet ids; the tinyimagenet-zscl order is published in continuum's "
                      "wnids.txt label space and is mapped to these labels"),
    DatasetSpec("imagenet-r", 200, "ImageNet-R (renditions of 200 ImageNet classes)",
                default_scenario="B0Inc20",
                hub=HubSource("axiong/imagenet-r", splits=(("all", "test"),), image_column="image",
                              label_column="wnid", label_names_column="class_name"),
                split_rule=_ONE_SPLIT_80_20, templates="imagenet", paper_counts=(24000, 6000), published_split=False,
                split_vs_papers="NOT the papers' split: the tables used the RevisitingCIL archive's 24,000 / 6,000 "
                                "split, which is not public as a list; ours is a seeded stratified 80/20 split of the "
                                "hub copy's 30,000 images (the same sizes, other images). For the papers' split, "
                                + _ARCHIVE.format(what="ImageNet-R", folder="imagenet-r", name="imagenet-r"),
                notes="the PILOT archive's 24k/6k split is not public as a list: the seeded 80/20 split here is "
                      "built and frozen; pass the archive as a local folder for the papers' exact split"),
    DatasetSpec("imagenet-a", 200, "ImageNet-A (natural adversarial examples, 200 classes)",
                default_scenario="B0Inc20",
                # labels are a ClassLabel whose names are WordNet ids: mapped to the readable ImageNet names
                hub=HubSource("barkermrl/imagenet-a", splits=(("all", "train"),), image_column="image",
                              label_column="label", names_map="imagenet_a_classes.txt"),
                split_rule=_ONE_SPLIT_80_20, templates="imagenet", paper_counts=(5981, 1519), published_split=False,
                split_vs_papers="NOT the papers' split: the tables used the RevisitingCIL archive's 5,981 / 1,519 "
                                "split; ours is a seeded stratified 80/20 split of the hub copy's 7,500 images "
                                "(other sizes, other images). For the papers' split, "
                                + _ARCHIVE.format(what="ImageNet-A", folder="imagenet-a", name="imagenet-a"),
                notes="PTM-CIL archive split is about 5,981 / 1,519; ours is a seeded 80/20 split per class; class "
                      "names are the readable ImageNet names of the WordNet ids (resources/imagenet_a_classes.txt)"),
    DatasetSpec("cub", 200, "CUB-200-2011 birds",
                # pinned to main (dpdl-benchmark/caltech_birds2011, "Upload dataset", 2024-05-08): a TFDS export,
                # `label` is a plain int64 (0..199) and the names are in the string column `label_name`
                hub=HubSource("dpdl-benchmark/caltech_birds2011", revision="0831146ca15b498dba4012b37db3ae7879f5eaa7",
                              image_column="image", label_column="label", label_names_column="label_name",
                              label_base=0),
                templates="cub", paper_counts=(9430, 2358), published_split=False,
                split_vs_papers="NOT the papers' split: the hub copy holds the official CUB-200-2011 split (5,994 / "
                                "5,794); the tables used the RevisitingCIL archive's 9,430 / 2,358 split of the same "
                                "11,788 images. For the papers' split, "
                                + _ARCHIVE.format(what="CUB200", folder="cub", name="cub"),
                notes="hub copy carries the official 5,994 / 5,794 split; the PTM-CIL archives use 9,430 / 2,358"),
    DatasetSpec("objectnet", 200, "ObjectNet (200-class subset of RevisitingCIL)",
                local_only=f"the RevisitingCIL archive (licence forbids redistribution) as {_IMAGEFOLDER}",
                templates="imagenet", paper_counts=(26509, 6628), published_split=True,
                split_vs_papers="the RevisitingCIL archive's own split (26,509 / 6,628), the papers' one"),
    DatasetSpec("omnibenchmark", 300, "OmniBenchmark (300-class subset of RevisitingCIL)",
                default_scenario="B0Inc30",
                local_only=f"the RevisitingCIL archive as {_IMAGEFOLDER}", paper_counts=(89697, 5983),
                published_split=True,
                split_vs_papers="the RevisitingCIL archive's own split (89,697 / 5,983), the papers' one"),
    DatasetSpec("vtab", 50, "VTAB-CIL: 5 domains x 10 classes (resisc45, dtd, pets, eurosat, flowers)",
                parts=(HubSource("timm/resisc45", first_classes=10),
                       # tanganke/dtd main, "Convert dataset to Parquet (#1)" (the merged PR: no loading script)
                       HubSource("tanganke/dtd", revision="d2afa97d9f335b1a6b3b09c637aef667f98f966e",
                                 first_classes=10),
                       HubSource("timm/oxford-iiit-pet", first_classes=10),
                       HubSource("timm/eurosat-rgb", first_classes=10),
                       HubSource("dpdl-benchmark/oxford_flowers102", first_classes=10)),
                paper_counts=(1796, 8619), default_class_order="identity", published_split=False,
                split_vs_papers="NOT the papers' split: rebuilt from the first 10 classes of each hub dataset with "
                                "their official splits; the tables used the RevisitingCIL VTAB archive (1,796 / "
                                "8,619). For the papers' split, "
                                + _ARCHIVE.format(what="VTAB", folder="vtab", name="vtab"),
                notes="approximation: rebuilt from the first 10 classes of each hub dataset with their official "
                      "splits; the papers' archive (1,796 / 8,619) differs: pass it as a local folder to match. "
                      "Classes keep their order (task t = domain t): every official VTAB config (RevisitingCIL, "
                      "EASE) sets shuffle false"),
    DatasetSpec("imagenet100", 100, "ImageNet-100 (DNE / DyTox / PODNet class list)",
                default_scenario="B50Inc10",
                class_list="imagenet100_classes.txt",
                local_only=f"ImageNet-1k (or its subset of the 100 WordNet ids of imagenet100_classes.txt) as "
                           f"{_IMAGEFOLDER} (ImageNet-1k is gated on the hub)",
                paper_counts=(126689, 5000), templates="imagenet", published_split=True,
                split_vs_papers="the folder's split: DNE uses the ImageNet-1k train / val images of these 100 "
                                "classes (126,689 / 5,000)"),
    # ---- the eleven MTIL datasets (ZSCL / MoE-Adapters) ----
    DatasetSpec("aircraft", 100, "FGVC-Aircraft (variants)",
                # HuggingFaceM4/FGVC-Aircraft's main still holds only its loading script (the parquet conversion
                # sits on the unmerged refs/pr/1); Donghyun99/FGVC-Aircraft main ("Upload dataset", 2024-12-05)
                # holds parquet train / val / test with three ClassLabels: `label` = the 70 families (first!),
                # `variation` = the 100 variants MTIL classifies, `manufacturer` = 30
                hub=HubSource("Donghyun99/FGVC-Aircraft", revision="3237e2c15db36fa9016794561b7aae6b49eef9a2",
                              splits=(("train", "train"), ("test", "test")), image_column="image",
                              label_column="variation"),
                templates="aircraft", paper_counts=(3334, 3333), published_split=True,
                split_vs_papers="MTIL's split: the official train (3,334) / test (3,333) at the variant level, as "
                                "ZSCL's torchvision FGVCAircraft(split='train' / 'test'); the val split is not used"),
    DatasetSpec("caltech101", 101, "Caltech-101",
                hub=HubSource("Donghyun99/Caltech-101", revision="c2f8dad4e400a0963c1efc91a6e539b847be9162",
                              splits=(("all", "train+test"),), drop_classes=("BACKGROUND_Google",)),
                split_rule=_SEED42_80_20, templates="caltech101", published_split=False,
                split_vs_papers=_MTIL_RANDOM_SPLIT.format(what="torchvision's Caltech101"),
                notes="no official split: 80/20 with seed 42 as the official MTIL code (a stratified split here)"),
    DatasetSpec("dtd", 47, "Describable Textures",
                # MTIL trains on DTD partition 1's train (1,880) and tests on its test (1,880); tanganke/dtd's
                # train is train+val (3,760) and the old pin (cd52f56, refs/pr/1) still held dtd.py, which
                # datasets >= 4 refuses. mcimpoi/dtd_split_1 holds partition 1 as train / validation / test (1,880
                # each, parquet, no script). Its main head is 86b625a ("Update README.md"); its full hash could
                # not be established from what was available, so it is not pinned: the revision resolved at
                # download time is written into the store manifest.
                hub=HubSource("mcimpoi/dtd_split_1", splits=(("train", "train"), ("test", "test")),
                              image_column="image", label_column="label"),
                templates="dtd", paper_counts=(1880, 1880), published_split=True,
                split_vs_papers="MTIL's split: DTD partition 1, train 1,880 / test 1,880, as ZSCL's torchvision "
                                "DTD(split='train' / 'test', partition=1); its validation split is not used"),
    DatasetSpec("eurosat", 10, "EuroSAT RGB",
                hub=HubSource("timm/eurosat-rgb", splits=(("all", "train+validation+test"),)),
                split_rule=_SEED42_80_20, store_size=None, templates="eurosat", published_split=False,
                split_vs_papers=_MTIL_RANDOM_SPLIT.format(what="all 27,000 EuroSAT images"),
                notes="no official split: the official MTIL code splits all 27,000 images 80/20 with seed 42 "
                      "(torch random_split); here a stratified seeded 80/20 split of the same images"),
    DatasetSpec("flowers", 102, "Oxford Flowers-102", hub=HubSource("dpdl-benchmark/oxford_flowers102"),
                templates="flowers", published_split=True,
                split_vs_papers="MTIL's split: the official train (1,020) / test (6,149)"),
    DatasetSpec("food", 101, "Food-101", hub=HubSource("ethz/food101", splits=(("train", "train"),
                                                                                 ("test", "validation"))),
                templates="food", published_split=True,
                split_vs_papers="MTIL's split: the official train (75,750) / test (25,250, the hub's 'validation')"),
    DatasetSpec("mnist", 10, "MNIST", hub=HubSource("ylecun/mnist"), store_size=None, templates="mnist",
                class_names=tuple("0123456789"), published_split=True,
                split_vs_papers="MTIL's split: the official 60,000 / 10,000"),
    DatasetSpec("pets", 37, "Oxford-IIIT Pet",
                hub=HubSource("timm/oxford-iiit-pet", revision="10b688881011725fa2fa3d856a47536c9a7e6968"),
                templates="pets", published_split=True,
                split_vs_papers="MTIL's split: the official trainval (3,680) / test (3,669)"),
    DatasetSpec("cars", 196, "Stanford Cars",
                # main, "Convert dataset to Parquet (#1)" (the merged PR; the old pin 6875eacf was one of the PR's
                # own commits). The repo also holds seven corrupted-image splits (contrast, gaussian_noise,
                # impulse_noise, jpeg_compression, motion_blur, pixelate, spatter): only train / test are fetched
                hub=HubSource("tanganke/stanford_cars", revision="9abf6cf7d6dfa7b95152a0d6e791ea9435b47a40"),
                templates="cars", paper_counts=(8144, 8041), published_split=True,
                split_vs_papers="MTIL's split: the official train (8,144) / test (8,041)"),
    DatasetSpec("sun397", 397, "SUN397",
                # main, "Convert dataset to Parquet (#1)" (the merged PR; the old pin 0b48c5b9 was a PR commit).
                # It holds only SUN397 partition 01 (Training_01 / Testing_01: 19,850 / 19,850 of 108,754 images)
                hub=HubSource("tanganke/sun397", revision="9c4afd6174afa3974f209a0ef099dbbe244dfd27"),
                templates="sun397", paper_counts=(87003, 21751), published_split=False,
                split_vs_papers="NOT MTIL's split, numbers will not compare: the hub copy holds only partition 01 "
                                "(19,850 train / 19,850 test images, 50 + 50 per class) while the official MTIL "
                                "code splits all 108,754 SUN397 images 80/20 (87,003 / 21,751) with torch "
                                "random_split(generator=torch.Generator().manual_seed(42)) over torchvision's "
                                "SUN397 order. To match it, write that split as <dir>/{train,test}/<class>/ and run "
                                "`cilbench datasets prepare sun397 --source <dir>`"),
]:
    register(_spec)

_ORDER_I = ("aircraft", "caltech101", "cifar100", "dtd", "eurosat", "flowers", "food", "mnist", "pets", "cars",
            "sun397")
_ORDER_II = ("cars", "food", "mnist", "pets", "flowers", "sun397", "aircraft", "caltech101", "dtd", "eurosat",
             "cifar100")
register(SequenceSpec("mtil", "MTIL: 11 datasets, task-incremental across domains (ZSCL / MoE-Adapters)",
                      orders={"I": _ORDER_I, "II": _ORDER_II}))
register(SequenceSpec("mtil-fewshot", "few-shot MTIL: the 11 MTIL datasets, 5 training images per class drawn once "
                      "(MoE-Adapters Table 2)", orders={"I": _ORDER_I, "II": _ORDER_II}, shots=5))
register(SequenceSpec("synthetic-mtil", "offline MTIL-shaped sequence: the 4 domains of `synthetic`, 5 classes each",
                      orders={"I": ("synthetic/0", "synthetic/1", "synthetic/2", "synthetic/3"),
                              "II": ("synthetic/3", "synthetic/2", "synthetic/1", "synthetic/0")},
                      domains_of="synthetic"))

# the catalog's own names: a user dataset never takes one, and only these are ever matched to paper numbers
BUILTIN_DATASETS = frozenset(DATASETS.names())
