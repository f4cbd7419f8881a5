"""Data: offline builders, the prepared store, and preparing from hub-shaped local files (no network)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from _one_line import raised as _one_line

from _hub_fixtures import (cifar100_repo, colour_of, image_folder, imagenet_r_repo, labelled_repo, solid,
                           unique_spec)
from cilbench.data import prepare as prep
from cilbench.data import sources
from cilbench.data.catalog import DATASETS, HubSource, SplitRule
from cilbench.data.prepare import class_names, decode_image, open_store, prepare, store_path, stratified_split
from cilbench.data.store import Store
from cilbench.data.synthetic import make_synthetic
from cilbench.errors import CilbenchError, HubUnreachable


@pytest.fixture
def temp_spec(monkeypatch):
    """Register throw-away catalog entries for one test; the catalog is restored afterwards."""
    monkeypatch.setattr(DATASETS, "_entries", dict(DATASETS._entries))
    return unique_spec


def _leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


# ---------------------------------------------------------------- synthetic and digits

def test_synthetic_shapes_domains_and_determinism():
    data = make_synthetic()
    images, labels, domains = data["train"]
    assert images.shape == (20 * 24, 32, 32, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and np.bincount(labels).tolist() == [24] * 20
    assert data["test"][0].shape == (20 * 8, 32, 32, 3)
    assert np.array_equal(domains, labels // 5)
    again = make_synthetic()
    assert all(np.array_equal(a, b) for s in ("train", "test") for a, b in zip(data[s], again[s]))
    assert not np.array_equal(make_synthetic(seed=1)["train"][0], images)
    small = make_synthetic(num_classes=6, num_domains=2, train_per_class=3, test_per_class=2, size=16)
    assert small["train"][0].shape == (18, 16, 16, 3) and small["test"][2].max() == 1
    with pytest.raises(ValueError):
        make_synthetic(num_classes=10, num_domains=4)


def test_synthetic_has_learnable_class_structure():
    data = make_synthetic()
    x, y, _ = data["train"]
    xt, yt, dt = data["test"]
    feats = x.reshape(len(x), -1).astype(np.float32) / 255
    test = xt.reshape(len(xt), -1).astype(np.float32) / 255
    means = np.stack([feats[y == c].mean(0) for c in range(20)])
    pred = ((test[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    assert (pred == yt).mean() > 0.4  # chance is 0.05
    # within one domain (an MTIL task of synthetic-mtil) classes are told apart too: chance 0.2
    within = [((test[dt == d][:, None] - means[5 * d:5 * d + 5][None]) ** 2).sum(-1).argmin(1) + 5 * d
              for d in range(4)]
    assert np.mean(np.concatenate(within) == yt[np.argsort(dt, kind="stable")]) > 0.5


def test_offline_stores_are_built_on_first_open(tmp_path):
    store = open_store("synthetic", tmp_path)
    assert store_path("synthetic", tmp_path) == tmp_path / "synthetic"
    train = store.split("train")
    assert train.images.shape == (480, 32, 32, 3) and store.image_size == 32 and store.num_classes == 20
    assert np.array_equal(train.domains, train.labels // 5)
    assert store.manifest["source"]["builder"] == "synthetic" and len(store.manifest["domain_names"]) == 4
    assert np.array_equal(np.asarray(train.images), make_synthetic()["train"][0])
    assert open_store("synthetic", tmp_path).manifest["prepared_at"] == store.manifest["prepared_at"]
    # a store from another generator version is rebuilt, not reused
    manifest = json.loads((tmp_path / "synthetic" / "manifest.json").read_text())
    manifest["source"]["generator_version"] = -1
    (tmp_path / "synthetic" / "manifest.json").write_text(json.dumps(manifest))
    assert open_store("synthetic", tmp_path).manifest["source"]["generator_version"] >= 0
    assert _leftovers(tmp_path) == ["synthetic"]
    with pytest.raises(CilbenchError, match="without --source"):
        prepare("synthetic", tmp_path, source=str(tmp_path))


def test_digits_store_matches_scikit_learn(tmp_path):
    store = prepare("digits", tmp_path, progress=False)
    train, test = store.split("train"), store.split("test")
    assert store.image_size == 8 and store.class_names == list("0123456789")
    assert (len(train), len(test)) == (1438, 359)
    counts = np.bincount(np.concatenate([train.labels, test.labels]))
    assert np.bincount(test.labels).tolist() == [round(0.2 * n) for n in counts]
    assert store.manifest["split_recipe"]["counts"] == {"train": 1438, "test": 359}
    images = np.concatenate([train.images, test.images])
    assert images.max() == 255 and np.array_equal(images[..., 0], images[..., 2])
    from sklearn.datasets import load_digits  # the bundled CSV read directly equals load_digits

    digits = load_digits()
    pixels, labels = prep.load_digits_arrays()
    assert np.array_equal(pixels, digits.images) and np.array_equal(labels, digits.target)


def test_stratified_split_is_seeded_and_per_class():
    labels = np.repeat(np.arange(4), [10, 11, 5, 1])
    labels = labels[np.random.default_rng(3).permutation(len(labels))]
    test = stratified_split(labels, SplitRule(0.2, 1993))
    assert [int(test[labels == c].sum()) for c in range(4)] == [2, 2, 1, 0]
    assert np.array_equal(test, stratified_split(labels, SplitRule(0.2, 1993)))
    assert not np.array_equal(test, stratified_split(labels, SplitRule(0.2, 7)))


# ---------------------------------------------------------------- the store

def test_corrupted_store_ends_in_one_line(tmp_path):
    root = open_store("synthetic", tmp_path).root
    images = root / "train.images.u8"
    size = images.stat().st_size
    with open(images, "r+b") as f:
        f.truncate(size - 10)
    with pytest.raises(CilbenchError, match="corrupted store") as err:
        Store.open(root)
    assert "prepare synthetic" in _one_line(err)
    # open_store of an offline dataset does not silently rebuild a corrupted store: the user is told
    with pytest.raises(CilbenchError):
        open_store("synthetic", tmp_path)
    prepare("synthetic", tmp_path, force=True, progress=False)
    labels = root / "test.labels.npy"
    raw = bytearray(labels.read_bytes())
    raw[-3] ^= 0xFF
    labels.write_bytes(bytes(raw))
    with pytest.raises(CilbenchError, match="checksum") as err:
        Store.open(root)
    _one_line(err)
    prepare("synthetic", tmp_path, force=True, progress=False)
    # a flipped image byte (same size) is caught because the file changed since its checksum was confirmed
    with open(images, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    st = images.stat()
    os.utime(images, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    with pytest.raises(CilbenchError, match="checksum"):
        Store.open(root)
    (root / "manifest.json").write_text('{"schema": 1, "splits": {"train": {}}}')
    with pytest.raises(CilbenchError, match="corrupted store manifest") as err:
        Store.open(root)
    _one_line(err)


def test_interrupted_prepare_leaves_nothing(tmp_path, monkeypatch, temp_spec):
    spec = temp_spec(num_classes=3, store_size=16)
    src = image_folder(tmp_path / "src", {"train": {"a": 4, "b": 4, "c": 4}, "test": {"a": 1, "b": 1, "c": 1}})
    cache = tmp_path / "cache"
    stale = cache / f".{spec.name}.999999999-deadbeef.partial"  # left by a killed process: removed on the next run
    stale.mkdir(parents=True)
    calls = []

    def flaky(item, size):
        calls.append(item)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real(item, size)

    real = prep.decode_image
    monkeypatch.setattr(prep, "decode_image", flaky)
    with pytest.raises(KeyboardInterrupt):
        prepare(spec.name, cache, source=str(src), progress=False)
    assert _leftovers(cache) == []
    monkeypatch.setattr(prep, "decode_image", real)
    assert len(prepare(spec.name, cache, source=str(src), progress=False).split("train")) == 12
    assert _leftovers(cache) == [spec.name]


# ---------------------------------------------------------------- hub-shaped local copies

def test_cifar100_from_a_local_copy_of_the_hub_repo(tmp_path):
    repo = cifar100_repo(tmp_path / "cifar100", {"train": {0: 3, 7: 2, 99: 1}, "test": {7: 1, 42: 2}})
    cache = tmp_path / "cache"
    store = prepare("cifar100", cache, source=str(repo), progress=False)
    train, test = store.split("train"), store.split("test")
    assert (len(train), len(test)) == (6, 3)
    assert train.labels.tolist() == [0, 0, 0, 7, 7, 99] and test.labels.tolist() == [7, 42, 42]
    assert store.class_names == [f"fine{i:03d}" for i in range(100)]
    assert store.image_size == 32  # native size kept (PILOT upsamples 32 -> 224 on the fly)
    for split in (train, test):
        for img, label in zip(split.images, split.labels):
            assert (img == np.array(colour_of(int(label)), np.uint8)).all()
    src = store.manifest["source"]
    assert src["kind"] == "hub-copy" and src["repo"] == "uoft-cs/cifar100" and src["path"] == str(repo.resolve())
    assert (src["image_column"], src["label_column"]) == ("img", "fine_label")
    assert src["fingerprint"].startswith("sha256:") and "split_recipe" not in store.manifest
    assert store.manifest["splits"]["test"]["class_counts"][42] == 2
    assert class_names("cifar100", cache)[:2] == ["fine000", "fine001"]
    # prepared already: returned as is; another source needs --force
    assert prepare("cifar100", cache, progress=False).manifest["prepared_at"] == store.manifest["prepared_at"]
    with pytest.raises(CilbenchError, match="--force"):
        prepare("cifar100", cache, source=str(tmp_path), progress=False)
    assert _leftovers(cache) == ["cifar100"]  # the temporary Arrow copy is gone


def test_wrong_number_of_classes_is_one_clear_error(tmp_path):
    repo = cifar100_repo(tmp_path / "c10", {"train": {0: 1}, "test": {1: 1}}, num_names=10)
    with pytest.raises(CilbenchError, match="has 10 classes") as err:
        prepare("cifar100", tmp_path / "cache", source=str(repo), progress=False)
    _one_line(err)
    assert not store_path("cifar100", tmp_path / "cache").exists()


def test_single_split_source_gets_a_frozen_stratified_split(tmp_path, temp_spec):
    spec = temp_spec(num_classes=4, store_size=16, split_rule=SplitRule(0.2, 1993),
                       hub=HubSource("axiong/imagenet-r", splits=(("all", "test"),), image_column="image",
                                     label_column="wnid", label_names_column="class_name"))
    classes = [("n0300", "toucan", 10), ("n0100", "goldfish", 15), ("n0200", "hammerhead", 11), ("n0050", "eel", 6)]
    sha = "0123456789abcdef" * 2 + "01234567"  # a folder of the HF cache: snapshots/<commit>/
    repo = imagenet_r_repo(tmp_path / "snapshots" / sha, classes, sizes=[(24, 20), (20, 30), (16, 16), (41, 17)])
    cache = tmp_path / "cache"
    store = prepare(spec.name, cache, source=str(repo), progress=False)
    # ids index the sorted WordNet ids; names come from the class_name column
    assert store.class_names == ["eel", "goldfish", "hammerhead", "toucan"]
    by_wnid = {"n0050": 0, "n0100": 1, "n0200": 2, "n0300": 3}
    totals = {by_wnid[w]: n for w, _, n in classes}
    train, test = store.split("train"), store.split("test")
    assert np.bincount(test.labels).tolist() == [round(0.2 * totals[c]) for c in range(4)]
    assert np.bincount(train.labels).tolist() == [totals[c] - round(0.2 * totals[c]) for c in range(4)]
    recipe = store.manifest["split_recipe"]
    assert recipe["seed"] == 1993 and recipe["counts"] == {"train": len(train), "test": len(test)}
    assert "axiong/imagenet-r:test" in recipe["source_split"]
    # pixels survive decoding, resizing (shorter side 16, bicubic) and the centre crop
    for img, label in zip(test.images, test.labels):
        wnid = next(w for w, c in by_wnid.items() if c == label)
        k = [c[0] for c in classes].index(wnid)
        assert (img == np.array(colour_of(k), np.uint8)).all()
    first = (train.labels.copy(), np.array(train.images), test.labels.copy(), np.array(test.images))
    again = prepare(spec.name, cache, source=str(repo), force=True, progress=False)
    second = (again.split("train").labels, np.asarray(again.split("train").images), again.split("test").labels,
              np.asarray(again.split("test").images))
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    assert again.manifest["source"]["fingerprint"] == store.manifest["source"]["fingerprint"]
    assert store.manifest["source"]["resolved_revision"] == sha


def test_parts_are_concatenated_as_domains(tmp_path, monkeypatch, temp_spec):
    """A VTAB-like dataset: the first k classes of each hub dataset, in order, one domain each (hub mocked)."""
    spec = temp_spec(num_classes=4, store_size=8, parts=(HubSource("org/alpha", first_classes=2),
                                                           HubSource("org/beta", first_classes=2)))
    repos = {"org/alpha": labelled_repo(tmp_path / "alpha", 5, {"train": {0: 2, 1: 1, 4: 3}, "test": {1: 2, 3: 1}}),
             "org/beta": labelled_repo(tmp_path / "beta", 3, {"train": {0: 1, 1: 2, 2: 2}, "test": {0: 1}})}
    hf_cache = tmp_path / "hf-cache"
    real_load = sources.load_hub_splits
    monkeypatch.setattr(sources, "resolve_revision", lambda repo, rev, name: "f" * 40)
    monkeypatch.setattr(sources, "load_hub_splits", lambda where, hub, name, rev, cache, progress:
                        real_load(str(repos[where]), hub, name, None, hf_cache, progress))
    store = prepare(spec.name, tmp_path / "cache", progress=False)
    train, test = store.split("train"), store.split("test")
    assert train.labels.tolist() == [0, 0, 1, 2, 3, 3] and train.domains.tolist() == [0, 0, 0, 1, 1, 1]
    assert test.labels.tolist() == [1, 1, 2] and test.domains.tolist() == [0, 0, 1]
    assert store.class_names == ["alpha-0", "alpha-1", "beta-0", "beta-1"]
    assert store.manifest["domain_names"] == ["alpha", "beta"]
    parts = store.manifest["source"]["parts"]
    assert [p["repo"] for p in parts] == ["org/alpha", "org/beta"] and parts[0]["resolved_revision"] == "f" * 40


# ---------------------------------------------------------------- ImageFolder trees

def test_image_folder_source(tmp_path, temp_spec):
    spec = temp_spec(num_classes=3, store_size=16)
    src = image_folder(tmp_path / "archive", {"train": {"n02": 3, "n01": 4, "n03": 2}, "test": {"n01": 1, "n03": 2}})
    (src / "train" / "n01" / "notes.txt").write_text("not an image")
    store = prepare(spec.name, tmp_path / "cache", source=str(src), progress=False)
    assert store.class_names == ["n01", "n02", "n03"]
    train, test = store.split("train"), store.split("test")
    assert train.labels.tolist() == [0] * 4 + [1] * 3 + [2] * 2 and test.labels.tolist() == [0, 2, 2]
    assert store.manifest["source"]["kind"] == "imagefolder"
    for img, label in zip(train.images, train.labels):  # PNG exact, JPEG close
        assert np.abs(img.astype(int) - np.array(colour_of(int(label)))).max() <= 8
    assert (train.images[0] == np.array(colour_of(0), np.uint8)).all()


def test_image_folder_with_the_wrong_number_of_classes(tmp_path, temp_spec):
    spec = temp_spec(num_classes=3, store_size=16)
    src = image_folder(tmp_path / "archive", {"train": {"a": 1, "b": 1}, "test": {"a": 1, "b": 1}})
    with pytest.raises(CilbenchError, match="2 class folders") as err:
        prepare(spec.name, tmp_path / "cache", source=str(src), progress=False)
    _one_line(err)
    assert _leftovers(tmp_path / "cache") == []


def test_missing_or_unreadable_local_source(tmp_path):
    with pytest.raises(CilbenchError, match="does not exist") as err:
        prepare("cifar100", tmp_path / "cache", source=str(tmp_path / "nowhere"), progress=False)
    _one_line(err)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CilbenchError, match="cannot read") as err:
        prepare("cifar100", tmp_path / "cache", source=str(tmp_path / "empty"), progress=False)
    _one_line(err)
    assert not store_path("cifar100", tmp_path / "cache").exists()


def test_native_size_sources_must_share_one_size(tmp_path, temp_spec):
    spec = temp_spec(num_classes=2, store_size=None)
    src = image_folder(tmp_path / "a", {"train": {"x": 2, "y": 1}, "test": {"x": 1}}, size=(12, 12))
    solid((1, 2, 3), 10, 10).save(src / "train" / "y" / "odd.png")
    with pytest.raises(CilbenchError, match="differ in size"):
        prepare(spec.name, tmp_path / "cache", source=str(src), progress=False)
    assert _leftovers(tmp_path / "cache") == []


# ---------------------------------------------------------------- no network, no source

def test_offline_mode_fails_fast_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("datasets.load_dataset", lambda *a, **k: pytest.fail("must not try to download"))
    with pytest.raises(HubUnreachable) as err:
        prepare("cifar100", tmp_path / "cache", progress=False)
    text = _one_line(err)
    assert "uoft-cs/cifar100" in text and "HF_HUB_OFFLINE" in text and "--source PATH" in text
    assert _leftovers(tmp_path / "cache") == []


def test_unreachable_hub_fails_fast_with_one_line(tmp_path, monkeypatch):
    import huggingface_hub

    class ConnectError(Exception):  # what httpx raises on a DNS failure
        pass

    def no_dns(self, repo, **kwargs):
        raise ConnectError("[Errno -2] Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", no_dns)
    with pytest.raises(HubUnreachable, match="Name or service not known") as err:
        prepare("cifar100", tmp_path / "cache", progress=False)
    assert err.value.exit_code == 3 and "cilbench datasets prepare cifar100 --source PATH" in _one_line(err)
    assert _leftovers(tmp_path / "cache") == []


def test_datasets_without_a_hub_copy_and_unprepared_stores(tmp_path):
    with pytest.raises(CilbenchError, match="--source PATH") as err:
        prepare("objectnet", tmp_path, progress=False)
    assert "RevisitingCIL" in _one_line(err)
    with pytest.raises(CilbenchError, match="cilbench datasets prepare cifar100") as err:
        open_store("cifar100", tmp_path)
    _one_line(err)
    with pytest.raises(CilbenchError, match="sequence"):
        prepare("mtil", tmp_path)
    with pytest.raises(CilbenchError, match="open 'synthetic'"):
        open_store("synthetic/2", tmp_path)


# ---------------------------------------------------------------- decoding

def test_decode_matches_torchvision_resize_and_centre_crop():
    tv = pytest.importorskip("torchvision.transforms")
    from PIL import Image

    rng = np.random.default_rng(0)
    for w, h in [(37, 23), (23, 37), (50, 50), (301, 200)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ours = decode_image(img, 16)
        theirs = np.asarray(tv.CenterCrop(16)(tv.Resize(16, interpolation=tv.InterpolationMode.BICUBIC)(img)))
        assert np.array_equal(ours, theirs), (w, h)
    gray = Image.fromarray(rng.integers(0, 256, (9, 9), dtype=np.uint8))
    assert decode_image(gray, None).shape == (9, 9, 3)


def test_joined_splits_and_dropped_classes(tmp_path, temp_spec):
    """Caltech-101 shape: a TF-style train/test split joined ("train+test") and re-split, BACKGROUND dropped."""
    repo = labelled_repo(tmp_path / "caltech", 4, {"train": {0: 5, 1: 5, 2: 5, 3: 5}, "test": {0: 5, 1: 5, 2: 5,
                                                                                                 3: 5}}, size=16)
    spec = temp_spec(num_classes=3, store_size=16, split_rule=SplitRule(0.2, 42),
                     hub=HubSource("Donghyun99/Caltech-101", splits=(("all", "train+test"),),
                                   drop_classes=("caltech-0",)))
    store = prepare(spec.name, tmp_path / "cache", source=str(repo), progress=False)
    assert store.class_names == ["caltech-1", "caltech-2", "caltech-3"]
    train, test = store.split("train"), store.split("test")
    assert np.bincount(test.labels).tolist() == [2, 2, 2] and np.bincount(train.labels).tolist() == [8, 8, 8]
    for img, label in zip(test.images, test.labels):  # class k+1 of the source is class k of the store
        assert (img == np.array(colour_of(int(label) + 1), np.uint8)).all()
