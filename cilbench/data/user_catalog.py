"""Your own datasets: local ImageFolder trees registered with ``cilbench datasets add`` in a user catalog.

The user catalog is data, never code: one JSON file, ``<cache>/user-catalog.json``, beside the prepared stores of
the same cache folder (``--cache-dir``, else ``$CILBENCH_CACHE``, else ``~/.cache/cilbench``), so a catalog and its
stores always travel together. Each entry names a folder, either ``DIR/train/<class>/*`` + ``DIR/test/<class>/*``
(its own split) or ``DIR/<class>/*`` with a seeded stratified split rule (``test_fraction``, ``seed``), the class
count found when it was added and a default scenario. The file is validated whenever it is read; a damaged file or
entry is one line naming the file and how to fix or remove it.

Entries become ``DatasetSpec``s (``local_only`` = their folder) the first time a name the built-in catalog does not
hold is looked up (``cilbench.data.catalog.get_spec``), so ``datasets prepare / split / info``, ``run``, ``sweep``
and ``table`` treat them as catalog entries. A user dataset never takes a built-in name (method presets and the
paper reference store are keyed by those), has no presets and is never matched to a paper's number
(``cilbench.results.references.match_references``).

Which cache folder's catalog is read: the one the command was given (``use_cache``, called by every CLI command with
``--cache-dir``), else ``$CILBENCH_CACHE``, else the default. Code that builds runs through the API calls
``use_cache(cache_dir)`` first when its cache is not the environment's.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from cilbench.errors import CilbenchError

CATALOG_FILE = "user-catalog.json"
SCHEMA_VERSION = 1
LAYOUTS = ("train-test", "one-folder")
ENTRY_KEYS = {"source", "layout", "num_classes", "split", "description", "default_scenario", "image_size",
              "added_at"}
STORE_SIZE = 256  # the store's square side unless --image-size says otherwise (PILOT: Resize(256) + crop 224)
DEFAULT_SPLIT = {"test_fraction": 0.2, "seed": 1993}
# a store folder, a record file name field (records join fields with "__") and a shell word: nothing else
_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]|_(?!_)){0,63}")

_active: Path | None = None  # the cache folder of the running command; None: $CILBENCH_CACHE or the default
_synced: tuple | None = None  # (catalog path, stat signature) of what is registered now
_registered: set[str] = set()


# ---------------------------------------------------------------- where

def use_cache(cache: str | Path | None) -> None:
    """Read the user catalog of ``cache`` from now on (None: ``$CILBENCH_CACHE``, else the default folder)."""
    global _active
    _active = Path(cache).expanduser() if cache else None


def active_cache() -> Path:
    from cilbench.utils import cache_dir

    return cache_dir(_active)


def catalog_path(cache: str | Path | None = None) -> Path:
    from cilbench.utils import cache_dir

    return cache_dir(cache if cache else _active) / CATALOG_FILE


# ---------------------------------------------------------------- reading and validating

def _fix(path: Path, name: str) -> str:
    return f"fix the entry in {path} or remove it with `cilbench datasets remove {name}`"


def _read_raw(path: Path) -> dict[str, Any]:
    """The catalog document (``{"schema_version", "datasets"}``), or an empty one when there is no file."""
    if not path.exists():
        return {"schema_version": SCHEMA_VERSION, "datasets": {}}
    fix = f"fix it, or delete it (rm {path}) and add your datasets again with `cilbench datasets add`"
    try:
        doc = json.loads(path.read_bytes())
    except json.JSONDecodeError as err:
        raise CilbenchError(f"user catalog {path} is damaged (not JSON: {err.msg} at line {err.lineno}); {fix}") \
            from None
    except (OSError, ValueError, RecursionError) as err:
        raise CilbenchError(f"user catalog {path} cannot be read ({err}); {fix}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("datasets"), dict):
        raise CilbenchError(f"user catalog {path} is damaged (expected an object with \"datasets\": {{...}}); {fix}")
    version = doc.get("schema_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise CilbenchError(f"user catalog {path} is damaged (schema_version is {version!r}, not an integer); {fix}")
    if version > SCHEMA_VERSION:
        raise CilbenchError(f"user catalog {path} has schema {version}, newer than this cilbench ({SCHEMA_VERSION});"
                            f" upgrade cilbench")
    return doc


def _check_name(name: str) -> None:
    from cilbench.data.catalog import BUILTIN_DATASETS, DATASETS, SequenceSpec

    if not _NAME.fullmatch(name):
        raise CilbenchError(f"dataset name {name[:70]!r} is not allowed; use 1 to 64 ASCII letters, digits, '-' or "
                            f"'_' (never '__'), starting with a letter or digit")
    taken = {b.lower(): b for b in BUILTIN_DATASETS}
    if name.lower() in taken:
        builtin = taken[name.lower()]
        what = "sequence" if isinstance(DATASETS.get(builtin), SequenceSpec) else "dataset"
        raise CilbenchError(f"{name!r} is the name of the built-in {what} {builtin!r} (its presets and paper "
                            f"numbers belong to it); pick another name, e.g. my-{name.lower()}")


def _validate(name: str, entry: Any, path: Path) -> dict[str, Any]:
    """The entry as stored, checked field by field; raises one line naming the file, the entry and the fix."""
    from cilbench.data.scenario import increments, parse_scenario

    def bad(problem: str) -> CilbenchError:
        return CilbenchError(f"user catalog {path}: dataset {name!r}: {problem}; {_fix(path, name)}")

    try:
        _check_name(name)
    except CilbenchError as err:
        raise bad(str(err).split(";")[0]) from None
    if not isinstance(entry, dict):
        raise bad("the entry is not an object")
    if unknown := sorted(set(entry) - ENTRY_KEYS):
        raise bad(f"unknown field {unknown[0]!r}")
    source = entry.get("source")
    if not isinstance(source, str) or not source.strip():
        raise bad("'source' must be the path of a folder")
    if entry.get("layout") not in LAYOUTS:
        raise bad(f"'layout' must be one of {', '.join(LAYOUTS)}")
    n = entry.get("num_classes")
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise bad("'num_classes' must be an integer of at least 2")
    split = entry.get("split")
    if entry["layout"] == "train-test":
        if split is not None:
            raise bad("a train-test folder has its own split: 'split' must be null")
    else:
        if not isinstance(split, dict) or set(split) != {"test_fraction", "seed"}:
            raise bad("'split' must be {\"test_fraction\": 0.2, \"seed\": 1993}")
        _check_split(split, bad)
    if not isinstance(entry.get("description", ""), str):
        raise bad("'description' must be text")
    size = entry.get("image_size", STORE_SIZE)
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or not 8 <= size <= 1024):
        raise bad("'image_size' must be an integer from 8 to 1024, or null (the images' own size)")
    scenario = entry.get("default_scenario")
    if not isinstance(scenario, str):
        raise bad("'default_scenario' must be a scenario such as B0Inc2")
    try:
        increments(n, *parse_scenario(scenario))
    except CilbenchError as err:
        raise bad(f"'default_scenario': {err}") from None
    return entry


def _check_split(split: dict[str, Any], bad=CilbenchError) -> None:
    from cilbench.data.scenario import MAX_SEED, valid_seed  # the catalog imports this module: no cycle at import

    f, seed = split.get("test_fraction"), split.get("seed")
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f < 1:
        raise bad(f"test_fraction must be a number between 0 and 1 (exclusive), not {f!r}")
    if not valid_seed(seed):
        raise bad(f"seed must be an integer from 0 to {MAX_SEED}, not {seed!r}")


def read_catalog(cache: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """The validated entries of the user catalog of ``cache`` (default: the active cache), by name."""
    path = catalog_path(cache)
    doc = _read_raw(path)
    return {name: _validate(name, entry, path) for name, entry in doc["datasets"].items()}


def spec_of(name: str, entry: dict[str, Any]):
    """The ``DatasetSpec`` of a user catalog entry: no hub, no presets, no paper numbers."""
    from cilbench.data.catalog import DatasetSpec, SplitRule

    split = entry.get("split")
    layout = ("train/ and test/ class folders" if entry["layout"] == "train-test"
              else "one folder of class folders, split by rule")
    return DatasetSpec(
        name, entry["num_classes"], entry.get("description") or f"your ImageFolder {entry['source']}",
        local_only=f"your folder {entry['source']} (`cilbench datasets prepare {name}` reads it)",
        split_rule=SplitRule(float(split["test_fraction"]), int(split["seed"])) if split else None,
        default_scenario=entry["default_scenario"], store_size=entry.get("image_size", STORE_SIZE),
        notes=f"user dataset ({layout}), registered with `cilbench datasets add` in {catalog_path()}; no presets, "
              f"no paper numbers")


def _signature(path: Path) -> tuple:
    try:
        st = path.stat()
        return (str(path), st.st_mtime_ns, st.st_size, st.st_ino)
    except OSError:
        return (str(path), None)


def sync() -> None:
    """Make the registered user datasets those of the active cache's catalog (re-read only when the file changed)."""
    global _synced, _registered
    from cilbench.data.catalog import DATASETS

    path = catalog_path()
    sig = _signature(path)
    if sig == _synced and all(name in DATASETS for name in _registered):  # (a test may have reset the registry)
        return
    forget()  # entries of another cache's catalog, or of this file before it changed (or broke)
    entries = read_catalog()
    for name, entry in entries.items():
        DATASETS.register(name, spec_of(name, entry), kind="dataset", user=True)
    _registered, _synced = set(entries), sig


def forget() -> None:
    """Unregister every user dataset (the next lookup reads the catalog again)."""
    global _synced, _registered
    from cilbench.data.catalog import DATASETS

    for name in _registered:
        DATASETS.remove(name)
    _registered, _synced = set(), None


def is_user_dataset(name: str) -> bool:
    """Whether ``name`` is an entry of the active user catalog (built-in names never are; no file is read for
    them)."""
    from cilbench.data.catalog import BUILTIN_DATASETS

    if name in BUILTIN_DATASETS:
        return False
    sync()
    return name in _registered


def user_entry(name: str) -> dict[str, Any]:
    sync()
    if name not in _registered:
        raise CilbenchError(f"{name!r} is not in the user catalog {catalog_path()}; `cilbench datasets list` shows "
                            f"what is")
    return read_catalog()[name]


# ---------------------------------------------------------------- reading a folder

def _class_folders(folder: Path) -> list[str]:
    try:
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as err:
        raise CilbenchError(f"cannot read {folder} ({err.strerror or err})") from None


def _images(folder: Path) -> list[Path]:
    from cilbench.data.sources import _images_under  # symlink loops and broken links end in one line there

    return _images_under(folder)


def parse_split(text: str | None) -> dict[str, Any]:
    """``test_fraction=0.2,seed=1993`` (either part may be left out) -> ``{"test_fraction", "seed"}``."""
    split = dict(DEFAULT_SPLIT)
    for part in (text or "").split(","):
        if not part.strip():
            continue
        key, sep, value = (s.strip() for s in part.partition("="))
        if not sep or key not in split:
            raise CilbenchError(f"--split {text!r}: expected test_fraction=F,seed=S, e.g. test_fraction=0.2,seed=1993")
        try:
            split[key] = float(value) if key == "test_fraction" else int(value)
        except ValueError:
            wanted = "a number" if key == "test_fraction" else "an integer"
            raise CilbenchError(f"--split {key}={value}: expected {wanted}") from None
    _check_split(split, lambda problem: CilbenchError(f"--split: {problem}"))
    return split


def survey(folder: Path, split: dict[str, Any] | None) -> dict[str, Any]:
    """What ``datasets add`` finds in ``folder``: its layout, class names and image counts, checked so that
    ``prepare`` will succeed (every class has training images; one folder: every class keeps a test and a training
    image under the split rule). Raises one line otherwise."""
    if not folder.exists():
        raise CilbenchError(f"--source {folder} does not exist")
    if not folder.is_dir():
        raise CilbenchError(f"--source {folder} is not a folder")
    has = {s: (folder / s).is_dir() for s in ("train", "test")}
    if any(has.values()):
        if not all(has.values()):
            one, other = ("train", "test") if has["train"] else ("test", "train")
            raise CilbenchError(f"{folder} has {one}/ but no {other}/: give DIR/train/<class>/ and DIR/test/<class>/, "
                                f"or one folder of class folders with --split")
        if split is not None:
            raise CilbenchError(f"{folder} has train/ and test/: it brings its own split; drop --split")
        classes = _class_folders(folder / "train")
        if len(classes) < 2:
            raise CilbenchError(f"{folder / 'train'} holds {len(classes)} class folder(s); a class-incremental "
                                f"dataset needs at least 2 (DIR/train/<class>/*.png)")
        if extra := sorted(set(_class_folders(folder / "test")) - set(classes)):
            raise CilbenchError(f"{folder / 'test'} has class folders that train/ lacks: {', '.join(extra[:5])}")
        counts = {}
        for s in ("train", "test"):
            counts[s] = [len(_images(folder / s / c)) if (folder / s / c).is_dir() else 0 for c in classes]
        if empty := [c for c, k in zip(classes, counts["train"]) if k == 0]:
            raise CilbenchError(f"class {empty[0]!r} has no images in {folder / 'train' / empty[0]}")
        if not sum(counts["test"]):
            raise CilbenchError(f"{folder / 'test'} holds no images")
        return {"layout": "train-test", "classes": classes, "train": sum(counts["train"]),
                "test": sum(counts["test"]), "split": None}
    classes = _class_folders(folder)
    if len(classes) < 2:
        raise CilbenchError(f"{folder} holds {len(classes)} class folder(s); expected DIR/<class>/*.png (with a "
                            f"split rule) or DIR/train/<class>/ + DIR/test/<class>/, and at least 2 classes")
    split = split or dict(DEFAULT_SPLIT)
    train = test = 0
    for c in classes:
        n = len(_images(folder / c))
        k = int(round(split["test_fraction"] * n))  # as cilbench.data.prepare.stratified_split counts
        if k < 1 or n - k < 1:
            raise CilbenchError(f"class {c!r} has {n} image(s): with test_fraction={split['test_fraction']} it "
                                f"would get {k} test and {n - k} training images; every class needs at least one of "
                                f"each (add images or change --split)")
        train, test = train + n - k, test + k
    return {"layout": "one-folder", "classes": classes, "train": train, "test": test, "split": split}


def default_scenario(num_classes: int) -> str:
    """About ten tasks: ``B0Inc<round(N / 10)>`` (one class per task below 15 classes)."""
    return f"B0Inc{max(1, round(num_classes / 10))}"


# ---------------------------------------------------------------- changing the catalog

def parse_image_size(text: str | int | None) -> int | None:
    """``--image-size``: the store's square side in pixels, or ``native`` (None: every image keeps its size; they
    must all be square and of one size, as digits' 8 x 8)."""
    if text is None:
        return STORE_SIZE
    if str(text).strip().lower() == "native":
        return None
    try:
        size = int(str(text))
    except ValueError:
        size = 0
    if not 8 <= size <= 1024:
        raise CilbenchError(f"--image-size {text}: expected a side from 8 to 1024 pixels, or native")
    return size


def add_dataset(name: str, source: str | Path, split: str | None = None, description: str = "",
                scenario: str | None = None, force: bool = False, image_size: str | int | None = None
                ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Register the folder ``source`` as dataset ``name`` in the active cache's user catalog (atomic write).
    Returns the entry and what ``survey`` found."""
    from cilbench.data.scenario import increments, parse_scenario
    from cilbench.utils import atomic_write_json

    _check_name(name)
    size = parse_image_size(image_size)
    folder = Path(source).expanduser().resolve()
    found = survey(folder, parse_split(split) if split is not None else None)
    n = len(found["classes"])
    scenario = scenario or default_scenario(n)
    increments(n, *parse_scenario(scenario))  # one line when it does not fit
    path = catalog_path()
    doc = _read_raw(path)
    if name in doc["datasets"] and not force:
        old = doc["datasets"][name]
        where = old.get("source") if isinstance(old, dict) else "?"
        raise CilbenchError(f"{name!r} is already in the user catalog (source {where}); pass --force to replace it")
    entry = {"source": str(folder), "layout": found["layout"], "num_classes": n, "split": found["split"],
             "description": description or f"your ImageFolder {folder}", "default_scenario": scenario,
             "image_size": size, "added_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    _validate(name, entry, path)
    doc["datasets"] = {**doc["datasets"], name: entry}
    doc["schema_version"] = SCHEMA_VERSION
    atomic_write_json(path, doc)
    return entry, found


def remove_dataset(name: str, delete_store: bool = False) -> Path | None:
    """Remove ``name`` from the active cache's user catalog (the entry may be damaged; the file must be JSON).
    With ``delete_store`` its prepared store goes too; returns the store folder deleted, if any."""
    from cilbench.data.store import Store
    from cilbench.utils import atomic_write_json

    path = catalog_path()
    doc = _read_raw(path)
    if name not in doc["datasets"]:
        known = ", ".join(sorted(doc["datasets"])) or "none"
        raise CilbenchError(f"{name!r} is not in the user catalog {path} (its datasets: {known})")
    doc["datasets"] = {k: v for k, v in doc["datasets"].items() if k != name}
    atomic_write_json(path, doc)
    root = active_cache() / name
    if delete_store and _NAME.fullmatch(name) and Store.exists(root):  # only a folder that is a store is deleted
        shutil.rmtree(root)
        return root
    return None


# ---------------------------------------------------------------- preparing

def prepare(name: str, cache: Path, source: str | None = "hub", force: bool = False, progress: bool = True):
    """``cilbench.data.prepare.prepare`` for every dataset; a user dataset reads its own folder unless ``source``
    names another (train/ + test/, or one folder of class folders split by the entry's rule)."""
    from cilbench.data import prepare as prep
    from cilbench.data.sources import imagefolder_source, is_imagefolder
    from cilbench.data.store import Store

    use_cache(cache)
    if not is_user_dataset(name):
        return prep.prepare(name, cache, source="hub" if source in (None, "") else source, force=force,
                            progress=progress)
    entry = user_entry(name)
    spec = prep.dataset_spec(name)
    folder = Path(entry["source"] if source in (None, "", "hub") else source).expanduser()
    root = prep.store_path(name, cache)
    if Store.exists(root) and not force:
        store = Store.open(root)
        if prep._up_to_date(store, spec, folder) and store.num_classes == spec.num_classes:
            return store
        raise CilbenchError(f"{name} is already prepared from {prep._describe_source(store.manifest['source'])}; "
                            f"pass --force to prepare it again from {folder}")
    if not folder.is_dir():
        raise CilbenchError(f"the folder of {name}, {folder}, is not there; bring it back, or register the new place"
                            f" with `cilbench datasets add {name} --source DIR --force`")
    if is_imagefolder(folder):
        classes = _class_folders(folder / "train")
        src_of = lambda: imagefolder_source(spec, folder)  # noqa: E731
    elif spec.split_rule is not None:
        classes = _class_folders(folder)
        src_of = lambda: _one_folder_source(folder, classes)  # noqa: E731
    else:
        raise CilbenchError(f"{folder} has no train/ and test/ class folders, which {name} was added with; pass such "
                            f"a folder, or add it again with --force")
    if len(classes) != spec.num_classes:
        raise CilbenchError(f"{folder} now has {len(classes)} class folders, but {name} was added with "
                            f"{spec.num_classes}; run `cilbench datasets add {name} --source {folder} --force`")
    return prep._build(spec, root, src_of(), progress)


def _one_folder_source(folder: Path, classes: list[str]):
    """One "all" split of ``folder/<class>/*``: ``prepare`` splits it with the entry's rule."""
    from cilbench.data.sources import Rows, Source, folder_fingerprint

    paths: list[Path] = []
    labels: list[int] = []
    for i, c in enumerate(classes):
        found = _images(folder / c)
        paths += found
        labels += [i] * len(found)
    rows = [Rows("all/", "all", np.array(labels, np.int64), lambda a, b: paths[a:b])]
    info = {"kind": "imagefolder", "path": str(folder.resolve()), "fingerprint": folder_fingerprint(folder),
            "class_names_from": "folder names", "layout": "one folder of class folders, split by the user catalog's "
                                                          "rule"}
    return Source(rows, classes, info)
