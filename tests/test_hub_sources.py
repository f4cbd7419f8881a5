"""The hub sources as the real repos are (issue 8, section 7): each catalog entry read from a local copy shaped like
its repository's dataset card and file tree (``_hub_fixtures``), through the same ``datasets.load_dataset`` path as
the hub; what the catalog cannot know in advance is checked and fails in one line."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
from _one_line import raised as _one_line

from _hub_fixtures import (AIRCRAFT_FAMILIES, CUB_NAMES, STANFORD_CARS_CORRUPTIONS, colour_of, cub_repo,
                           dtd_split_1_repo, fgvc_aircraft_repo, image_folder, imagenet_a_repo, labelled_repo,
                           stanford_cars_repo, sun397_repo, tanganke_dtd_with_script, tiny_imagenet_repo)
from cilbench.data import sources
from cilbench.data.catalog import DATASETS, HubSource, get_spec, register
from cilbench.data.prepare import prepare
from cilbench.errors import CilbenchError
from cilbench.models.templates import CLASS_NAMES


@pytest.fixture
def catalog(monkeypatch):
    """Register test entries for one test; the catalog is restored afterwards."""
    monkeypatch.setattr(DATASETS, "_entries", dict(DATASETS._entries))

    def like(name: str, **changes):
        """A copy of catalog entry ``name`` (same hub source, label columns and checks) under a unique name; small
        stores by default."""
        import uuid

        spec = dataclasses.replace(get_spec(name), name=f"{name}-{uuid.uuid4().hex[:8]}",
                                   **{"store_size": 16, **changes})
        register(spec)
        return spec

    return like


def _counts(store) -> dict[str, int]:
    return {s: len(store.split(s)) for s in store.split_names}


# ---------------------------------------------------------------- aircraft: name the label column

def test_aircraft_reads_the_100_variants_not_the_first_label_column(tmp_path):
    """Donghyun99/FGVC-Aircraft's first ClassLabel is `label` = the 70 families; MTIL classifies the 100 variants
    (`variation`). The old catalog took the first ClassLabel and `prepare aircraft` failed (70 classes)."""
    repo = fgvc_aircraft_repo(tmp_path / "FGVC-Aircraft", {"train": [0, 7, 50, 99], "val": [1, 2], "test": [7, 95]})
    store = prepare("aircraft", tmp_path / "cache", source=str(repo), progress=False)
    assert store.num_classes == 100 and sorted(store.class_names) == sorted(CLASS_NAMES["aircraft"])
    assert store.class_names[:2] == ["MD-80", "737-300"]  # the repo's own label order, names from `variation`
    assert _counts(store) == {"train": 4, "test": 2}  # val is MTIL's held-out split: never read
    assert store.split("train").labels.tolist() == [0, 7, 50, 99]
    src = store.manifest["source"]
    assert src["label_column"] == "variation" and src["hub_splits_read"] == ["train", "test"]
    assert src["repo"] == "Donghyun99/FGVC-Aircraft" and len(AIRCRAFT_FAMILIES) == 70


def test_the_family_column_is_refused_in_one_line(tmp_path, catalog):
    spec = catalog("aircraft", hub=dataclasses.replace(get_spec("aircraft").hub, label_column="label"))
    repo = fgvc_aircraft_repo(tmp_path / "FGVC-Aircraft", {"train": [0], "val": [1], "test": [2]})
    with pytest.raises(CilbenchError, match="has 70 classes in 'label'") as err:
        prepare(spec.name, tmp_path / "cache", source=str(repo), progress=False)
    _one_line(err)


# ---------------------------------------------------------------- dtd: partition 1, no loading script

def test_dtd_is_partition_1_train_and_test(tmp_path):
    """MTIL trains on DTD partition 1's train (1,880) and tests on its test; the validation split is not read."""
    repo = dtd_split_1_repo(tmp_path / "dtd_split_1", {"train": [0, 1, 46], "validation": [2, 3], "test": [4, 5]})
    store = prepare("dtd", tmp_path / "cache", source=str(repo), progress=False)
    assert _counts(store) == {"train": 3, "test": 2} and store.class_names == list(CLASS_NAMES["dtd"])
    src = store.manifest["source"]
    assert src["repo"] == "mcimpoi/dtd_split_1" and src["hub_splits_read"] == ["train", "test"]
    assert store.manifest["published_split"] is True and "partition 1" in store.manifest["split_vs_papers"]
    assert get_spec("dtd").paper_counts == (1880, 1880)


def test_a_repo_holding_a_loading_script_is_one_line(tmp_path):
    """tanganke/dtd at the old pin cd52f56 still holds dtd.py: datasets 5.x refuses it with a RuntimeError."""
    repo = tanganke_dtd_with_script(tmp_path / "copy" / "dtd")
    with pytest.raises(CilbenchError, match=r"loading script \(dtd\.py\)") as err:
        prepare("dtd", tmp_path / "cache", source=str(repo), progress=False)
    assert "ImageFolder" in _one_line(err)
    assert not (tmp_path / "cache" / "dtd").exists()


def test_a_hub_repo_holding_a_loading_script_is_one_line(monkeypatch):
    import datasets

    def refuse(path, **kwargs):
        raise RuntimeError("Dataset scripts are no longer supported, but found dtd.py")

    monkeypatch.setattr(datasets, "load_dataset_builder", refuse)
    hub = HubSource("tanganke/dtd", revision="cd52f56b97bb45a25246b6b3fd24531e3b0d4405")
    with pytest.raises(CilbenchError, match=r"tanganke/dtd@cd52f56b97bb holds a dataset loading script") as err:
        sources.load_hub_splits("tanganke/dtd", hub, "dtd", hub.revision, None, False)
    assert "pin a revision" in _one_line(err)


# ---------------------------------------------------------------- cub: integer labels, names in their own column

def _cub_rows() -> dict[str, list[int]]:
    return {"train": list(range(200)) + [0, 5], "test": list(range(199, -1, -1))}


def test_cub_names_come_from_the_label_name_column(tmp_path, catalog):
    """dpdl-benchmark/caltech_birds2011 is a TFDS export: `label` is a plain int64 and the names are in `label_name`.
    The old code named the classes "0".."199" ("a photo of a 0")."""
    spec = catalog("cub")
    store = prepare(spec.name, tmp_path / "cache", source=str(cub_repo(tmp_path / "cub", _cub_rows())),
                    progress=False)
    assert store.class_names == list(CUB_NAMES) and store.class_names[0] == "black_footed_albatross"
    assert _counts(store) == {"train": 202, "test": 200}
    assert store.split("test").labels.tolist() == list(range(199, -1, -1))
    assert store.manifest["source"]["class_names_from"] == "column 'label_name'"
    for img, label in zip(store.split("train").images[:3], store.split("train").labels[:3]):
        assert (img == np.array(colour_of(int(label)), np.uint8)).all()


def test_cub_label_base_is_checked_in_one_line(tmp_path, catalog):
    spec = catalog("cub")
    repo = cub_repo(tmp_path / "cub", _cub_rows(), base=1)  # a copy numbering classes 1..200
    with pytest.raises(CilbenchError, match=r"run 1\.\.200.*label base 0.*1-based") as err:
        prepare(spec.name, tmp_path / "cache", source=str(repo), progress=False)
    _one_line(err)
    assert not (tmp_path / "cache" / spec.name).exists()


@pytest.mark.parametrize("names,message", [
    ({3: "laysan_albatross"}, "labels 1 and 3 are both named 'laysan_albatross'"),
])
def test_cub_names_must_be_one_per_label(tmp_path, catalog, names, message):
    spec = catalog("cub")
    with pytest.raises(CilbenchError, match=message) as err:
        prepare(spec.name, tmp_path / "cache", source=str(cub_repo(tmp_path / "cub", _cub_rows(), names=names)),
                progress=False)
    _one_line(err)


def test_cub_label_with_two_names_and_unseen_labels(tmp_path, catalog):
    spec = catalog("cub")
    rows = _cub_rows()
    repo = cub_repo(tmp_path / "a", rows)
    # the test split names class 4 differently from train: one label, two names
    cub_repo(tmp_path / "b", {"test": rows["test"]}, names={4: "crested_auklet_2"})
    for f in (tmp_path / "b" / "data").glob("test-*"):
        os.replace(f, repo / "data" / f.name)
    with pytest.raises(CilbenchError, match="label 4 has two names") as err:
        prepare(spec.name, tmp_path / "cache", source=str(repo), progress=False)
    _one_line(err)
    partial = cub_repo(tmp_path / "c", {"train": list(range(150)), "test": list(range(150))})
    with pytest.raises(CilbenchError, match=r"no row has label 150 \(50 of 200 labels unseen\)") as err:
        prepare(spec.name, tmp_path / "cache", source=str(partial), progress=False)
    _one_line(err)


def test_integer_labels_without_names_are_refused(tmp_path, catalog):
    spec = catalog("cub", hub=dataclasses.replace(get_spec("cub").hub, label_names_column=None))
    with pytest.raises(CilbenchError, match="bare integers.*a photo of a 0") as err:
        prepare(spec.name, tmp_path / "cache", source=str(cub_repo(tmp_path / "cub", _cub_rows())), progress=False)
    _one_line(err)


# ---------------------------------------------------------------- imagenet-a: WordNet ids -> readable names

def rows_index(wnid: str) -> int:
    from cilbench.data.sources import names_map

    return sorted(names_map("imagenet_a_classes.txt")).index(wnid)


def test_imagenet_a_wordnet_ids_become_imagenet_names(tmp_path):
    rows = ["n01498041"] * 10 + ["n12267677"] * 5 + ["n02099601"] * 5
    store = prepare("imagenet-a", tmp_path / "cache", source=str(imagenet_a_repo(tmp_path / "imagenet-a", rows)),
                    progress=False)
    names = store.class_names
    assert len(names) == 200 and names[0] == "stingray" and names[-1] == "acorn"
    assert names[rows_index("n02099601")] == "Golden Retriever" and not any(n.startswith("n0") for n in names)
    assert _counts(store) == {"train": 16, "test": 4}  # built 80/20 per class from the one split
    assert "imagenet_a_classes.txt" in store.manifest["source"]["class_names_from"]


def test_an_unknown_wordnet_id_is_one_line(tmp_path, catalog):
    spec = catalog("imagenet-a", num_classes=201)
    repo = imagenet_a_repo(tmp_path / "imagenet-a", ["n01498041"] * 5, extra_wnids=("n01440764",))
    with pytest.raises(CilbenchError, match="imagenet_a_classes.txt does not know.*'n01440764'") as err:
        prepare(spec.name, tmp_path / "cache", source=str(repo), progress=False)
    _one_line(err)


def test_the_imagenet_a_archive_folders_are_mapped_too(tmp_path, catalog):
    """The RevisitingCIL ImageNet-A archive names its class folders by WordNet id."""
    from cilbench.data.sources import names_map

    spec = catalog("imagenet-a")
    wnids = sorted(names_map("imagenet_a_classes.txt"))
    root = image_folder(tmp_path / "imagenet-a", {"train": {w: 1 for w in wnids}, "test": {wnids[0]: 1}},
                        size=(8, 8))
    store = prepare(spec.name, tmp_path / "cache", source=str(root), progress=False)
    assert store.class_names[:2] == ["stingray", "goldfinch"]
    assert "published_split" not in store.manifest  # an archive is the user's own split


# ---------------------------------------------------------------- cars: only the splits the rule needs

def test_cars_reads_train_and_test_only(tmp_path):
    """tanganke/stanford_cars also holds seven corrupted-image splits: they are neither downloaded nor prepared."""
    repo = stanford_cars_repo(tmp_path / "stanford_cars", {"train": [0, 1, 195], "test": [2, 3]})
    dd = sources.load_hub_splits(str(repo), get_spec("cars").hub, "cars", None, tmp_path / "hf", False)
    assert sorted(dd) == ["test", "train"] and len(STANFORD_CARS_CORRUPTIONS) == 7
    prepared = {p.name for p in (tmp_path / "hf").rglob("*.arrow")}
    assert prepared and not any(c in n for n in prepared for c in STANFORD_CARS_CORRUPTIONS)
    store = prepare("cars", tmp_path / "cache", source=str(repo), progress=False)
    assert _counts(store) == {"train": 3, "test": 2} and store.class_names == list(CLASS_NAMES["cars"])
    assert store.manifest["source"]["hub_splits_read"] == ["train", "test"]


def test_joined_splits_are_all_read(tmp_path):
    """A rule that joins splits ("train+validation+test") still reads each of them."""
    repo = labelled_repo(tmp_path / "eurosat", 3, {"train": {0: 2}, "validation": {1: 2}, "test": {2: 2},
                                                   "extra": {0: 1}}, size=8)
    hub = HubSource("org/eurosat", splits=(("all", "train+validation+test"),))
    assert sources.hub_split_names(hub) == ["train", "validation", "test"]
    dd = sources.load_hub_splits(str(repo), hub, "eurosat", None, tmp_path / "hf", False)
    assert sorted(dd) == ["test", "train", "validation"]


# ---------------------------------------------------------------- sun397: partition 01, said plainly

def test_sun397_reads_partition_01_and_says_numbers_will_not_compare(tmp_path, cli):
    repo = sun397_repo(tmp_path / "sun397", {"train": [0, 1, 396], "test": [2, 3, 4]})
    store = prepare("sun397", tmp_path / "cache", source=str(repo), progress=False)
    assert store.num_classes == 397 and _counts(store) == {"train": 3, "test": 3}
    assert store.manifest["published_split"] is False
    info = json.loads(cli("datasets", "info", "sun397", "--json").out)
    assert info["published_split"] is False
    text = info["split_vs_papers"]
    assert "will not compare" in text and "19,850" in text and "108,754" in text and "seed(42)" in text


# ---------------------------------------------------------------- a split named `valid`

def test_tinyimagenet_valid_split_is_the_test_split(tmp_path):
    repo = tiny_imagenet_repo(tmp_path / "tiny-imagenet", {"train": [0, 1, 199], "valid": [2, 3]})
    store = prepare("tinyimagenet", tmp_path / "cache", source=str(repo), progress=False)
    assert _counts(store) == {"train": 3, "test": 2} and store.class_names == sorted(store.class_names)
    assert store.manifest["source"]["hub_splits_read"] == ["train", "valid"]


# ---------------------------------------------------------------- catalog facts: pins, splits vs the papers'

# Pins on the repos' main history, as the hub pages show them (commit history of main / the merged pull request).
# The old pins were commits of unmerged or pull-request branches: e18a7c9 (HuggingFaceM4/FGVC-Aircraft refs/pr/1),
# cd52f56 (tanganke/dtd refs/pr/1), 6875eacf (tanganke/stanford_cars refs/pr/1), 0b48c5b9 (tanganke/sun397
# refs/pr/1).
MERGED_PINS = {
    "aircraft": ("Donghyun99/FGVC-Aircraft", "3237e2c15db36fa9016794561b7aae6b49eef9a2"),
    "cars": ("tanganke/stanford_cars", "9abf6cf7d6dfa7b95152a0d6e791ea9435b47a40"),
    "sun397": ("tanganke/sun397", "9c4afd6174afa3974f209a0ef099dbbe244dfd27"),
    "cub": ("dpdl-benchmark/caltech_birds2011", "0831146ca15b498dba4012b37db3ae7879f5eaa7"),
}
PR_BRANCH_COMMITS = {"e18a7c97147c90dc7f4a60d74a7f4258e9264e97", "cd52f56b97bb45a25246b6b3fd24531e3b0d4405",
                     "6875eacf7f3231c41c4093f12c0e0c98dcadab5b", "0b48c5b9fae94ac9427dd76a9c193748360671b1"}


def test_pins_are_merged_revisions():
    for name, (repo, revision) in MERGED_PINS.items():
        hub = get_spec(name).hub
        assert (hub.repo, hub.revision) == (repo, revision), name
    specs = [s for s in map(DATASETS.get, DATASETS.names()) if hasattr(s, "parts")]
    pins = {h.revision for s in specs for h in ((s.hub,) if s.hub else ()) + s.parts if h.revision}
    assert not pins & PR_BRANCH_COMMITS
    assert get_spec("vtab").parts[1] == HubSource("tanganke/dtd", revision="d2afa97d9f335b1a6b3b09c637aef667f98f966e",
                                                  first_classes=10)
    # dtd's source (mcimpoi/dtd_split_1) is left unpinned: its merged head's full hash is not known here
    assert get_spec("dtd").hub.revision is None


@pytest.mark.parametrize("name,published", [("cub", False), ("imagenet-r", False), ("imagenet-a", False),
                                            ("vtab", False), ("sun397", False), ("dtd", True), ("aircraft", True),
                                            ("cars", True), ("cifar100", True)])
def test_datasets_info_says_whether_the_split_is_the_papers(cli, name, published):
    r = cli("datasets", "info", name, "--json")
    assert r.code == 0, r.err
    info = json.loads(r.out)
    assert info["published_split"] is published and info["split_vs_papers"]
    if name in ("cub", "imagenet-r", "imagenet-a", "vtab"):
        text = info["split_vs_papers"]
        assert text.startswith("NOT the papers' split") and "RevisitingCIL" in text
        assert f"cilbench datasets prepare {name} --source" in text
    r = cli("datasets", "info", name)
    assert "split_vs_papers" in r.out and "published_split" in r.out


# ---------------------------------------------------------------- ImageFolder trees: symlink loops

def test_a_symlink_loop_in_an_image_folder_is_one_line(tmp_path, catalog):
    spec = catalog("cub", num_classes=2, hub=None)
    root = image_folder(tmp_path / "archive", {"train": {"a": 2, "b": 1}, "test": {"a": 1, "b": 1}}, size=(8, 8))
    (root / "train" / "a" / "again").symlink_to(root / "train")  # train/a/again -> train/: a loop
    with pytest.raises(CilbenchError, match="symlink loop") as err:
        prepare(spec.name, tmp_path / "cache", source=str(root), progress=False)
    assert "again" in _one_line(err)
    (root / "train" / "a" / "again").unlink()
    (root / "test" / "b" / "self").symlink_to(root / "test" / "b" / "self")  # a link to itself
    with pytest.raises(CilbenchError, match="symlink loop or a broken link") as err:
        prepare(spec.name, tmp_path / "cache", source=str(root), progress=False)
    _one_line(err)
    (root / "test" / "b" / "self").unlink()
    (root / "test" / "b" / "gone.png").symlink_to(root / "nowhere.png")  # a broken link
    with pytest.raises(CilbenchError, match="broken link") as err:
        prepare(spec.name, tmp_path / "cache", source=str(root), progress=False)
    _one_line(err)
    (root / "test" / "b" / "gone.png").unlink()
    elsewhere = image_folder(tmp_path / "elsewhere", {"x": {"c": 2}}, size=(8, 8)) / "x" / "c"
    (root / "train" / "b" / "linked").symlink_to(elsewhere)  # a link that is no loop is followed
    store = prepare(spec.name, tmp_path / "cache", source=str(root), progress=False)
    assert _counts(store) == {"train": 5, "test": 2}


# ---------------------------------------------------------------- names against the catalog

def test_names_that_disagree_with_the_catalog_are_one_line(tmp_path, catalog):
    """mnist's catalog holds its class names: a copy whose ClassLabel names other classes is refused."""
    spec = catalog("mnist")
    repo = labelled_repo(tmp_path / "mnist", 10, {"train": {0: 1}, "test": {1: 1}}, size=8)
    with pytest.raises(CilbenchError, match="are not the catalog's") as err:
        prepare(spec.name, tmp_path / "cache", source=str(repo), progress=False)
    _one_line(err)


def test_prepared_hub_stores_record_the_split_comparison(tmp_path):
    repo = stanford_cars_repo(tmp_path / "stanford_cars", {"train": [0], "test": [1]})
    store = prepare("cars", tmp_path / "cache", source=str(repo), progress=False)
    assert store.manifest["published_split"] is True and "8,144" in store.manifest["split_vs_papers"]
    assert Path(store.root).name == "cars"


def test_a_name_lookup_that_hangs_counts_as_an_unreachable_hub(monkeypatch):
    """The connect timeout does not bound the DNS lookup: a resolver that never answers must not hold the run."""
    import socket
    import threading

    from cilbench import hub

    release = threading.Event()

    def hanging(*args, **kwargs):
        release.wait(30)
        raise OSError("resolver gave up")

    monkeypatch.setattr(socket, "getaddrinfo", hanging)
    monkeypatch.setattr(hub, "PROBE_TIMEOUT_S", 0.2)
    hub.hub_reachable.cache_clear()
    try:
        assert hub.hub_reachable("https://hub.invalid") is False
        assert any(t.name == "cilbench-hub-dns" and t.is_alive() for t in threading.enumerate())  # not waited for
    finally:
        release.set()
        hub.hub_reachable.cache_clear()


def test_offline_set_after_the_hub_library_was_imported_still_reaches_it(monkeypatch):
    """huggingface_hub reads HF_HUB_OFFLINE once, at import: a process that sets the variable later (a notebook, or
    this suite, whose fixture sets it after timm was imported at collection) must not try the network and wait for
    its timeouts (47 s in this suite before the fix)."""
    import huggingface_hub.constants as c

    from cilbench import hub

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.ensure_hub_or_offline() is False
    assert c.HF_HUB_OFFLINE is True
