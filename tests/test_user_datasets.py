"""Your own datasets: `cilbench datasets add` registers a local ImageFolder in the user catalog of the cache folder,
and prepare / split / info / run / sweep / table then treat it as a catalog entry, with no presets and no paper
numbers. Every test writes a tiny ImageFolder of solid-colour PNGs and uses a cache folder of its own."""

from __future__ import annotations

import csv
import json
import re
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from _one_line import cli_error

from cilbench.data import user_catalog
from cilbench.data.catalog import DATASETS
from cilbench.errors import CilbenchError

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def _png(path: Path, rgb: tuple[int, int, int], rng: np.random.Generator, size: int = 16) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    noise = rng.integers(-20, 21, (size, size, 3))
    Image.fromarray(np.clip(np.array(rgb) + noise, 0, 255).astype(np.uint8)).save(path)


def train_test_tree(root: Path, classes=COLOURS, train: int = 6, test: int = 2) -> Path:
    """``root/{train,test}/<colour>/*.png``."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("test", test)):
        for name, rgb in classes.items():
            for i in range(n):
                _png(root / split / name / f"{i}.png", rgb, rng)
    return root


def one_folder_tree(root: Path, classes=COLOURS, per_class: int = 10) -> Path:
    """``root/<colour>/*.png``."""
    rng = np.random.default_rng(1)
    for name, rgb in classes.items():
        for i in range(per_class):
            _png(root / name / f"{i}.png", rgb, rng)
    return root


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A cache folder (and so a user catalog) of this test's own; the registry forgets user entries afterwards."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("CILBENCH_CACHE", str(folder))
    user_catalog.use_cache(None)
    yield folder
    user_catalog.use_cache(None)
    user_catalog.forget()


_one_line = partial(cli_error, code=2)


def _records(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


# ---------------------------------------------------------------- end to end

def test_add_list_info_prepare_split_run_table(cli, cache, tmp_path):
    tree = train_test_tree(tmp_path / "colours")
    r = cli("datasets", "add", "colours", "--source", tree, "--image-size", "native",
            "--description", "four noisy colours")
    assert r.code == 0, r.err
    assert "4 classes, 24 train / 8 test images" in r.out and "B0Inc1" in r.out
    entry = json.loads((cache / "user-catalog.json").read_text())["datasets"]["colours"]
    assert entry["source"] == str(tree.resolve()) and entry["layout"] == "train-test" and entry["split"] is None

    listing = cli("datasets", "list", "--cache-dir", cache)
    row = next(line for line in listing.out.splitlines() if re.search(r"\bcolours\b", line))
    assert "user" in row and "4" in row
    assert re.search(r"\bdigits\b.*built-in", listing.out)

    info = json.loads(cli("datasets", "info", "colours", "--json").out)
    assert info["num_classes"] == 4 and info["state"] == "not prepared"
    assert info["user_catalog"] == str(cache / "user-catalog.json") and str(tree.resolve()) in info["source"]

    r = cli("datasets", "prepare", "colours")  # no --source: the entry's folder
    assert r.code == 0, r.err
    assert "4 classes, train 24, test 8, 16px" in r.out
    assert json.loads((cache / "colours" / "manifest.json").read_text())["source"]["path"] == str(tree.resolve())

    split = json.loads(cli("datasets", "split", "colours", "--scenario", "B0Inc2", "--json").out)
    assert split["num_classes"] == 4 and len(split["tasks"]) == 2

    out = tmp_path / "results"
    r = cli("run", "simplecil", "--dataset", "colours", "--quick", "--out", out)
    assert r.code == 0, r.err
    (record,) = _records(out)
    assert record["dataset"] == "colours" and record["scenario"] == "B0Inc1" and record["increments"] == [1] * 4
    assert record["config_sources"]["preset"] == {}  # never another dataset's preset
    assert record["metrics"]["A_last"] > 50  # four solid colours: easy even for a random tiny ViT

    table = cli("table", "--results", out, "--format", "csv")
    assert table.code == 0, table.err
    assert "colours" in table.out and "simplecil" in table.out


def test_one_folder_with_a_split_rule(cli, cache, tmp_path):
    tree = one_folder_tree(tmp_path / "flat", per_class=10)
    r = cli("datasets", "add", "flat", "--source", tree, "--split", "test_fraction=0.3,seed=7", "--image-size", "32")
    assert r.code == 0, r.err
    assert "28 train / 12 test images" in r.out
    r = cli("datasets", "prepare", "flat")
    assert r.code == 0, r.err
    manifest = json.loads((cache / "flat" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["count"] == 28 and manifest["splits"]["test"]["count"] == 12
    assert manifest["split_recipe"]["seed"] == 7 and manifest["image_size"] == 32
    from cilbench.data.store import Store

    test_labels = Store.open(cache / "flat").split("test").labels
    assert np.bincount(np.asarray(test_labels)).tolist() == [3, 3, 3, 3]  # stratified: round(0.3 * 10) per class
    # the same rule gives the same split: a second cache prepares identical labels
    r = cli("datasets", "add", "flat", "--source", tree, "--split", "seed=7,test_fraction=0.3", "--image-size", "32",
            "--cache-dir", tmp_path / "other")
    assert r.code == 0, r.err
    assert cli("datasets", "prepare", "flat", "--cache-dir", tmp_path / "other").code == 0
    assert (np.asarray(Store.open(tmp_path / "other" / "flat").split("test").labels) == np.asarray(test_labels)).all()


def test_sweep_and_suite_table_with_a_user_dataset(cli, cache, tmp_path):
    tree = train_test_tree(tmp_path / "colours")
    assert cli("datasets", "add", "colours", "--source", tree, "--image-size", "native").code == 0
    assert cli("datasets", "prepare", "colours").code == 0
    suite = tmp_path / "mine.yaml"
    suite.write_text("title: my colours\npaper: mine\ntable: '1'\ncolumns:\n"
                     "  - {dataset: colours, scenario: B0Inc2, label: Colours}\n"
                     "rows:\n  - {label: SimpleCIL, method: simplecil}\n")
    out = tmp_path / "results"
    r = cli("sweep", suite, "--quick", "--results", out)
    assert r.code == 0, r.out + r.err
    assert "0 already done, 1 ran, 0 failed" in r.out
    (record,) = _records(out)
    assert record["dataset"] == "colours" and record["scenario"] == "B0Inc2"
    r = cli("table", "--benchmark", suite, "--quick", "--results", out, "--format", "csv")
    assert r.code == 0, r.err
    assert re.search(r"SimpleCIL \[quick\],\d", r.out), r.out  # our number in the cell


def test_the_catalog_follows_the_cache_folder_of_the_command(cli, cache, tmp_path):
    tree = train_test_tree(tmp_path / "colours")
    elsewhere = tmp_path / "elsewhere"
    assert cli("datasets", "add", "colours", "--source", tree, "--cache-dir", elsewhere).code == 0
    assert (elsewhere / "user-catalog.json").is_file() and not (cache / "user-catalog.json").exists()
    assert cli("datasets", "split", "colours", "--cache-dir", elsewhere, "--json").code == 0
    line = _one_line(cli("datasets", "split", "colours", "--json"))  # the environment's cache has no such entry
    assert "unknown dataset 'colours'" in line
    assert cli("datasets", "info", "colours", "--cache-dir", elsewhere).code == 0
    assert "unknown dataset" in _one_line(cli("datasets", "info", "colours"))


def test_remove_and_replace(cli, cache, tmp_path):
    tree = train_test_tree(tmp_path / "colours")
    assert cli("datasets", "add", "colours", "--source", tree, "--image-size", "native").code == 0
    line = _one_line(cli("datasets", "add", "colours", "--source", tree))
    assert "already in the user catalog" in line and "--force" in line
    assert cli("datasets", "add", "colours", "--source", tree, "--scenario", "B2Inc1", "--image-size", "native",
               "--force").code == 0
    assert json.loads(cli("datasets", "split", "colours", "--json").out)["scenario"] == "B2Inc1"
    assert cli("datasets", "prepare", "colours").code == 0
    r = cli("datasets", "remove", "colours", "--delete-store")
    assert r.code == 0, r.err
    assert not (cache / "colours").exists()
    assert json.loads((cache / "user-catalog.json").read_text())["datasets"] == {}
    assert "unknown dataset 'colours'" in _one_line(cli("datasets", "split", "colours"))
    assert "not in the user catalog" in _one_line(cli("datasets", "remove", "colours"))


# ---------------------------------------------------------------- refusals, one line each

@pytest.mark.parametrize("name, expected", [
    ("cifar100", "is the name of the built-in dataset 'cifar100'"),
    ("CIFAR100", "is the name of the built-in dataset 'cifar100'"),
    ("mtil", "is the name of the built-in sequence 'mtil'"),
    ("synthetic-mtil", "is the name of the built-in sequence"),
    ("digits", "is the name of the built-in dataset 'digits'"),
    ("my__data", "is not allowed"),
    ("my/data", "is not allowed"),
    ("_data", "is not allowed"),
    ("données", "is not allowed"),
])
def test_refused_names(cli, cache, tmp_path, name, expected):
    tree = train_test_tree(tmp_path / "colours", train=1, test=1)
    assert expected in _one_line(cli("datasets", "add", name, "--source", tree))
    assert not (cache / "user-catalog.json").exists()


@pytest.mark.parametrize("make, args, expected", [
    (lambda root: root, [], "does not exist"),
    (lambda root: (root / "train" / "a").mkdir(parents=True) or root, [], "has train/ but no test/"),
    (lambda root: train_test_tree(root), ["--split", "test_fraction=0.2"], "brings its own split; drop --split"),
    (lambda root: one_folder_tree(root, {"red": (255, 0, 0)}), [], "holds 1 class folder(s)"),
    (lambda root: one_folder_tree(root, per_class=2), [], "class 'blue' has 2 image(s): with test_fraction=0.2"),
    (lambda root: one_folder_tree(root), ["--split", "test_fraction=1.5"], "test_fraction must be a number between"),
    (lambda root: one_folder_tree(root), ["--split", "ratio=0.5"], "expected test_fraction=F,seed=S"),
    (lambda root: one_folder_tree(root), ["--scenario", "B9Inc1"], "does not fit a dataset of 4 classes"),
    (lambda root: one_folder_tree(root), ["--image-size", "big"], "--image-size big: expected a side"),
])
def test_add_refuses_a_folder_prepare_could_not_read(cli, cache, tmp_path, make, args, expected):
    root = make(tmp_path / "data")
    line = _one_line(cli("datasets", "add", "mine", "--source", root, *args))
    assert expected in line, line


def test_prepare_from_a_folder_that_changed_since_add(cli, cache, tmp_path):
    tree = train_test_tree(tmp_path / "colours")
    assert cli("datasets", "add", "colours", "--source", tree).code == 0
    train_test_tree(tree, {"purple": (150, 30, 150)})
    line = _one_line(cli("datasets", "prepare", "colours"))
    assert "now has 5 class folders, but colours was added with 4" in line and "--force" in line


# ---------------------------------------------------------------- a damaged catalog

def test_damaged_catalog_is_one_line_and_leaves_builtin_datasets_alone(cli, cache, tmp_path):
    cache.mkdir()
    path = cache / "user-catalog.json"
    path.write_text('{"schema_version": 1, "datasets": {"colours": ')
    line = _one_line(cli("datasets", "split", "colours"))
    assert line.startswith(f"error: user catalog {path} is damaged (not JSON") and f"rm {path}" in line
    assert cli("datasets", "split", "digits", "--json").code == 0  # built-in names never read the user catalog
    r = cli("datasets", "list")
    assert r.code == 0 and "digits" in r.out and "warning: user catalog" in r.err


@pytest.mark.parametrize("change, expected", [
    ({"num_classes": "four"}, "'num_classes' must be an integer of at least 2"),
    ({"layout": "zip"}, "'layout' must be one of train-test, one-folder"),
    ({"source": 3}, "'source' must be the path of a folder"),
    ({"split": {"test_fraction": 0.2, "seed": 1}}, "a train-test folder has its own split"),
    ({"default_scenario": "B0Inc9"}, "'default_scenario'"),
    ({"image_size": 4}, "'image_size' must be an integer from 8 to 1024"),
    ({"run": "import os"}, "unknown field 'run'"),
])
def test_damaged_entry_is_one_line_naming_it_and_can_be_removed(cli, cache, tmp_path, change, expected):
    tree = train_test_tree(tmp_path / "colours", train=1, test=1)
    assert cli("datasets", "add", "colours", "--source", tree).code == 0
    path = cache / "user-catalog.json"
    doc = json.loads(path.read_text())
    doc["datasets"]["colours"].update(change)
    path.write_text(json.dumps(doc))
    line = _one_line(cli("run", "simplecil", "--dataset", "colours", "--quick", "--out", tmp_path / "res"))
    assert line.startswith(f"error: user catalog {path}: dataset 'colours': {expected}") or expected in line, line
    assert "cilbench datasets remove colours" in line
    assert cli("datasets", "remove", "colours").code == 0
    assert json.loads(path.read_text())["datasets"] == {}


def test_an_entry_under_a_builtin_name_is_refused_on_load(cli, cache, tmp_path):
    """A hand-edited catalog cannot slip a user folder in under a built-in name either."""
    cache.mkdir()
    entry = {"source": str(tmp_path), "layout": "train-test", "num_classes": 100, "split": None,
             "default_scenario": "B0Inc10"}
    (cache / "user-catalog.json").write_text(json.dumps({"schema_version": 1, "datasets": {"cifar100": entry,
                                                                                         "mine": entry}}))
    line = _one_line(cli("datasets", "split", "mine"))
    assert "dataset 'cifar100'" in line and "built-in" in line
    assert DATASETS.get("cifar100").hub is not None  # the catalog's cifar100 is untouched


# ---------------------------------------------------------------- no presets, no paper numbers

def _references(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir()
    from cilbench.results.references import COLUMNS

    with open(folder / "mine.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in COLUMNS})
    return folder


def _as_full_profile(record: dict, dataset: str | None = None) -> dict:
    """A quick record relabelled as a full run (a real full run needs hub weights), optionally on another dataset."""
    return {**record, "profile": "full", "comparable": True, "note": "", "dataset": dataset or record["dataset"]}


def test_no_paper_number_for_a_user_dataset_even_when_the_store_names_it(cli, cache, tmp_path, monkeypatch):
    tree = train_test_tree(tmp_path / "colours")
    assert cli("datasets", "add", "colours", "--source", tree, "--image-size", "native").code == 0
    assert cli("datasets", "prepare", "colours").code == 0
    quick = tmp_path / "quick"
    assert cli("run", "simplecil", "--dataset", "colours", "--quick", "--out", quick).code == 0
    (record,) = _records(quick)
    out = tmp_path / "results"
    out.mkdir()
    (out / "user.json").write_text(json.dumps({**_as_full_profile(record), "run_id": "user"}))
    # the reference store has a row whose dataset is the user dataset's name (and one for a built-in, the control)
    refs = [{"paper": "mine", "table": "1", "method": "simplecil", "paper_label": "SimpleCIL", "dataset": d,
             "scenario": "B0Inc1", "metric": "A_avg", "value": "12.34"} for d in ("colours", "digits")]
    monkeypatch.setenv("CILBENCH_REFERENCES", str(_references(tmp_path / "refs", refs)))
    r = cli("table", "--results", out, "--format", "csv")
    assert r.code == 0, r.err
    assert "12.34" not in r.out and "colours" in r.out
    # control: the same record on a built-in dataset is matched, so the guard is what kept the number out
    (out / "user.json").write_text(json.dumps({**_as_full_profile(record, "digits"), "run_id": "user"}))
    assert "12.34" in cli("table", "--results", out, "--format", "csv").out

    from cilbench.results.references import load_references, match_references

    store = load_references()
    assert match_references(store, "simplecil", "colours", "B0Inc1", "A_avg", "vit-tiny").empty
    assert len(match_references(store, "simplecil", "digits", "B0Inc1", "A_avg", "vit-tiny")) == 1


def test_suite_table_shows_no_paper_number_in_a_user_dataset_column(cli, cache, tmp_path, monkeypatch):
    """A user suite that claims a paper's table: its column on a user dataset never shows that paper's number."""
    tree = train_test_tree(tmp_path / "colours", train=1, test=1)
    assert cli("datasets", "add", "colours", "--source", tree).code == 0
    refs = [{"paper": "mine", "table": "1", "paper_label": "SimpleCIL", "dataset": "colours", "scenario": "B0Inc1",
             "metric": m, "value": "12.34"} for m in ("A_avg", "A_last")]
    monkeypatch.setenv("CILBENCH_REFERENCES", str(_references(tmp_path / "refs", refs)))
    suite = tmp_path / "mine.yaml"
    suite.write_text("title: mine\npaper: mine\ntable: '1'\ncolumns:\n  - {dataset: colours, scenario: B0Inc1}\n"
                     "rows:\n  - {label: SimpleCIL, method: simplecil}\n")
    r = cli("table", "--benchmark", suite, "--results", tmp_path / "none", "--format", "csv")
    assert r.code == 0, r.err
    assert "12.34" not in r.out
    assert cli("datasets", "remove", "colours").code == 0  # control: not a user dataset any more -> shown
    assert "12.34" in cli("table", "--benchmark", suite, "--results", tmp_path / "none", "--format", "csv").out


def test_user_datasets_get_no_presets(cache, tmp_path):
    """Presets are keyed by dataset name and user names are never built-in names, so none can apply."""
    from cilbench.methods import load_all, load_method
    from cilbench.methods.base import resolve_config

    train_test_tree(tmp_path / "colours", train=1, test=1)
    user_catalog.add_dataset("colours", tmp_path / "colours")
    for name in load_all():
        assert resolve_config(load_method(name), "colours", False, {})[1]["preset"] == {}
    with pytest.raises(CilbenchError, match="built-in"):
        user_catalog.add_dataset("imagenet-r", tmp_path / "colours")
