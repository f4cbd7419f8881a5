"""Reading a dataset's source into rows to decode: the Hugging Face hub, a local copy of a hub repository, or a
local ImageFolder tree ``<dir>/{train,test}/<class>/*``.

The hub and a local copy of a hub repository go through the same code (``datasets.load_dataset``). Every failure a
user can cause (no network, offline mode, a missing or malformed folder, a wrong number of classes) ends in one
``CilbenchError`` line that says what to do.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from cilbench.data.catalog import DatasetSpec, HubSource
from cilbench.errors import CilbenchError, HubUnreachable
from cilbench.hub import HUB_TIMEOUT_S, network_reason, offline_reason

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
@dataclass
class Rows:
    """One split of a source before decoding: encoded images fetched in contiguous chunks, and labels already in the
    store's label space (-1 = row not kept). ``target`` is a store split, or "all" for a split built by SplitRule."""

    name: str
    target: str
    labels: np.ndarray
    fetch: Callable[[int, int], list[Any]]  # rows [start, stop) -> bytes | path | {"bytes", "path"} | PIL image
    domain: int | None = None


@dataclass
class Source:
    """Everything read from a source: its rows, the class names, and what the manifest records about it."""

    rows: list[Rows]
    class_names: list[str]
    info: dict[str, Any] = field(default_factory=dict)
    domain_names: list[str] | None = None


def local_instructions(name: str, hub_copy: bool = True) -> str:
    what = "a copy of the hub repo, or an ImageFolder" if hub_copy else "an ImageFolder"
    return f"prepare from a local copy with `cilbench datasets prepare {name} --source PATH` ({what} " \
           f"<dir>/{{train,test}}/<class>/)"


def _instructions(name: str) -> str:
    from cilbench.data.catalog import get_spec

    # a dataset rebuilt from several repositories (VTAB) takes an ImageFolder only
    return local_instructions(name, hub_copy=not getattr(get_spec(name), "parts", ()))


def _unreachable(repo: str, name: str, reason: str) -> HubUnreachable:
    return HubUnreachable(f"cannot reach the Hugging Face hub to download {repo} ({reason}); " + _instructions(name))


def resolve_revision(repo: str, revision: str | None, name: str) -> str | None:
    """The commit the hub serves for ``repo@revision``; fails fast (one request, short timeout) when unreachable."""
    if reason := offline_reason():
        raise _unreachable(repo, name, reason)
    from huggingface_hub import HfApi
    from huggingface_hub import errors as hf_errors

    try:
        return HfApi().dataset_info(repo, revision=revision, timeout=HUB_TIMEOUT_S).sha
    except hf_errors.GatedRepoError:
        raise CilbenchError(f"{repo} is gated on the hub: accept its terms on huggingface.co and log in with "
                            f"`hf auth login`, or " + _instructions(name)) from None
    except hf_errors.RevisionNotFoundError:
        raise CilbenchError(f"revision {revision!r} of {repo} does not exist on the hub") from None
    except hf_errors.RepositoryNotFoundError:
        raise CilbenchError(f"dataset repository {repo} not found on the hub (or it is private: log in with "
                            f"`hf auth login`); " + _instructions(name)) from None
    except Exception as err:  # noqa: BLE001 - classified below, re-raised when not a network failure
        if reason := network_reason(err):
            raise _unreachable(repo, name, reason) from None
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status is not None and status >= 500:
            raise _unreachable(repo, name, f"HTTP {status}") from None
        raise


# ---------------------------------------------------------------- hub and local copies of hub repositories

def hub_split_names(hub: HubSource) -> list[str]:
    """The hub splits a source reads, in catalog order (``"train+test"`` names two)."""
    out: list[str] = []
    for _, theirs in hub.splits:
        out += [n for n in theirs.split("+") if n not in out]
    return out


_SCRIPT_REFUSAL = re.compile(r"(Dataset scripts are no longer supported|trust_remote_code|loading script)", re.I)


def _script_refusal(err: BaseException, where: str, hub: HubSource, revision: str | None, local: bool) -> str | None:
    """One line for ``datasets`` refusing a repo that still holds a loading script (remote code), else None."""
    text = " ".join(str(err).split())
    if not _SCRIPT_REFUSAL.search(text):
        return None
    import datasets

    script = m.group(1) if (m := re.search(r"found (\S+\.py)", text)) else "a .py loading script"
    refusal = f"holds a dataset loading script ({script}) that datasets {datasets.__version__} refuses to run"
    if local:
        return (f"{where} {refusal}: copy a revision of {hub.repo} without it (its parquet conversion), or pass an "
                f"ImageFolder <dir>/{{train,test}}/<class>/")
    rev = f"@{revision[:12]}" if revision else ""
    return (f"the hub repository {hub.repo}{rev} {refusal}: pin a revision of it without the script (a merged parquet "
            f"conversion) in the catalog, or pass a local copy or ImageFolder with --source")


def load_hub_splits(where: str, hub: HubSource, name: str, revision: str | None, cache_dir: Path | None,
                    progress: bool) -> Any:
    """``datasets.load_dataset`` of a hub repo (``where`` = repo id) or of a local copy (``where`` = a folder):
    the same calls for both. Returns the DatasetDict of the splits the catalog reads (``hub.splits``): the repo's
    data files are resolved first and only those of these splits are downloaded and prepared."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    if not progress:
        datasets.disable_progress_bars()
    local = Path(where).is_dir()
    try:
        kwargs: dict[str, Any] = dict(name=hub.config, revision=revision,
                                      cache_dir=str(cache_dir) if cache_dir else None)
        builder = datasets.load_dataset_builder(where, **kwargs)
        files = getattr(builder.config, "data_files", None) or {}
        wanted = hub_split_names(hub)
        data_files = None
        if set(wanted) <= set(files) and set(files) - set(wanted):  # the repo has splits we never read
            data_files = {s: list(files[s]) for s in wanted}
        return datasets.load_dataset(where, data_files=data_files, **kwargs)
    except Exception as err:  # noqa: BLE001 - classified below
        if line := _script_refusal(err, where, hub, revision, local):
            raise CilbenchError(line) from None
        if not local and (reason := network_reason(err)):
            raise _unreachable(hub.repo, name, reason) from None
        if local and isinstance(err, (FileNotFoundError, ValueError, datasets.exceptions.DatasetsError)):
            raise CilbenchError(f"cannot read {where} as a copy of the hub repository {hub.repo} "
                                f"({' '.join(str(err).split())[:200]}); pass a folder with the repo's files, or an "
                                f"ImageFolder <dir>/{{train,test}}/<class>/") from None
        raise
    finally:
        if was_enabled and not progress:
            datasets.enable_progress_bars()


def _columns(features: dict[str, Any], hub: HubSource, where: str) -> tuple[str, str]:
    import datasets

    image = hub.image_column or next((k for k, f in features.items() if isinstance(f, datasets.Image)), None)
    label = hub.label_column or next((k for k, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
    for what, col in (("image", image), ("label", label), ("class-name", hub.label_names_column or label)):
        if col is None or col not in features:
            raise CilbenchError(f"{where} has no {what} column{f' {col!r}' if col else ''} (columns: "
                                f"{', '.join(features)}); is it a copy of {hub.repo}?")
    return image, label  # type: ignore[return-value]


def _split(dd: Any, theirs: str) -> Any | None:
    """A split of the DatasetDict by name; ``"train+test"`` joins several (sources with no official split)."""
    import datasets

    names = theirs.split("+")
    if not all(n in dd for n in names):
        return None
    return dd[names[0]] if len(names) == 1 else datasets.concatenate_datasets([dd[n] for n in names])


def _arrow_column(ds: Any, column: str) -> Any:
    """One column as a pyarrow array without decoding (or even reading) the image column."""
    return ds.select_columns([column]).with_format("arrow")[:].column(0)


def _image_fetcher(ds: Any, column: str) -> Callable[[int, int], list[Any]]:
    arrow = ds.select_columns([column]).with_format("arrow")
    return lambda start, stop: arrow[start:stop].column(0).to_pylist()


def hub_source(spec: DatasetSpec, where: str | None, hub_cache: Path | None, local_cache: Path | None,
               progress: bool) -> Source:
    """Rows of a hub dataset (``where`` None) or of a local copy of its repository (``where`` = folder).
    A dataset with ``parts`` (VTAB) concatenates each part's first ``first_classes`` classes, one domain per part."""
    parts = spec.parts or ((spec.hub,) if spec.hub else ())
    if not parts:
        raise CilbenchError(f"{spec.name} has no hub source: it needs a local folder, {spec.local_only}; "
                            f"run `cilbench datasets prepare {spec.name} --source PATH`")
    if where is not None and len(parts) > 1:
        raise CilbenchError(f"{spec.name} is rebuilt from {len(parts)} hub repositories; a local --source for it "
                            f"must be an ImageFolder <dir>/{{train,test}}/<class>/ (e.g. the papers' archive)")
    rows: list[Rows] = []
    names: list[str] = []
    infos: list[dict[str, Any]] = []
    for d, hub in enumerate(parts):
        assert hub is not None
        revision = resolve_revision(hub.repo, hub.revision, spec.name) if where is None else None
        dd = load_hub_splits(where or hub.repo, hub, spec.name, revision, local_cache if where else hub_cache,
                             progress)
        label_where = where or hub.repo
        first = dd[next(iter(dd))]
        image_col, label_col = _columns(first.features, hub, label_where)
        part_names, to_id, names_from = _label_space(dd, hub, spec, label_col, label_where, len(parts) > 1)
        offset = len(names)
        names += part_names
        for ours, theirs in hub.splits:
            ds = _split(dd, theirs)
            if ds is None:
                raise CilbenchError(f"{label_where} has no split {theirs!r} (has {', '.join(dd)}); is it a copy "
                                    f"of {hub.repo}?")
            labels = to_id(ds)
            labels = np.where(labels >= 0, labels + offset, -1)
            rows.append(Rows(f"{hub.repo}:{theirs}", ours, labels, _image_fetcher(ds, image_col),
                             d if len(parts) > 1 else None))
        resolved = revision or (local_revision(Path(where)) if where else _datasets_revision(first))
        infos.append({"repo": hub.repo, "config": hub.config, "revision": hub.revision, "resolved_revision": resolved,
                      "image_column": image_col, "label_column": label_col, "class_names_from": names_from,
                      "first_classes": hub.first_classes, "splits": dict(hub.splits),
                      "hub_splits_read": [s for s in dd]})
    if where is None:
        info: dict[str, Any] = {"kind": "hub"}
    else:
        info = {"kind": "hub-copy", "path": str(Path(where).resolve()), "fingerprint": folder_fingerprint(Path(where))}
    info.update(infos[0] if len(infos) == 1 else {"parts": infos})
    domain_names = [p.repo.split("/")[-1] for p in parts] if len(parts) > 1 else None
    return Source(rows, names, info, domain_names)


def _is_sha(text: str) -> bool:
    return len(text) == 40 and all(c in "0123456789abcdef" for c in text)


def local_revision(folder: Path) -> str | None:
    """The commit of a local copy, when it tells: an HF cache snapshot folder is named by its commit, and a git
    clone records its HEAD."""
    folder = folder.resolve()
    if _is_sha(folder.name):
        return folder.name
    git = folder / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if head.startswith("ref: "):
            ref = head[5:]
            if (git / ref).is_file():
                return (git / ref).read_text().strip()
            for line in (git / "packed-refs").read_text().splitlines():
                if line.endswith(" " + ref):
                    return line.split()[0]
            return None
        return head if _is_sha(head) else None
    except OSError:
        return None


def _datasets_revision(ds: Any) -> str | None:
    """The commit ``datasets`` recorded in its cache path (``.../<version>/<sha>/...``), when it is one."""
    for f in getattr(ds, "cache_files", None) or []:
        for part in Path(f["filename"]).parts:
            if _is_sha(part):
                return part
    return None


@lru_cache(maxsize=None)
def names_map(file: str) -> dict[str, str]:
    """A ``resources/<file>`` map from a source's class names to readable ones: ``<name>\\t<readable>`` per line,
    ``#`` comments."""
    text = resources.files("cilbench.data").joinpath("resources", file).read_text()
    pairs = [line.split("\t", 1) for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return {k.strip(): v.strip() for k, v in pairs}


@lru_cache(maxsize=None)
def class_list(file: str) -> list[str]:
    """A ``resources/<file>`` class list: ``<label> <name>`` per line (``#`` comments), returned in label order;
    the labels must run 0 .. K-1."""
    text = resources.files("cilbench.data").joinpath("resources", file).read_text()
    pairs = [line.split(None, 1) for line in text.splitlines() if line.strip() and not line.startswith("#")]
    table = {int(k): v.strip() for k, v in pairs}
    if sorted(table) != list(range(len(table))):
        raise CilbenchError(f"resources/{file}: labels must run 0 .. {len(table) - 1}")
    return [table[i] for i in range(len(table))]


def map_names(names: list[str], file: str, where: str, what: str) -> list[str]:
    """``names`` through ``names_map(file)``; a name the map lacks ends in one line (``what``: what ``where`` should
    be, for the message)."""
    table = names_map(file)
    if missing := [n for n in names if n not in table]:
        raise CilbenchError(f"{where} has classes that resources/{file} does not know (e.g. "
                            f"{', '.join(map(repr, missing[:3]))}; {len(missing)} of {len(names)}); is it {what}?")
    return [table[n] for n in names]


def _norm_name(name: str) -> str:
    return " ".join(re.sub(r"[_\s]+", " ", str(name)).lower().split())


def _used_splits(dd: Any, hub: HubSource) -> list[Any]:
    return [part for _, theirs in hub.splits if (part := _split(dd, theirs)) is not None]


def _label_space(dd: Any, hub: HubSource, spec: DatasetSpec, label_col: str, where: str, is_part: bool
                 ) -> tuple[list[str], Callable[[Any], np.ndarray], str]:
    """Class names and a function mapping a split's label column to ids 0..K-1 (-1 = dropped by ``first_classes``
    or ``drop_classes``).

    What the catalog cannot know before the data is read is checked against it here, each in one line: the number of
    classes, the base of integer labels (``label_base``: 0..K-1 or 1..K), that each integer label has exactly one
    name in the names column (and each name one label), that names mapped by ``names_map`` are known, that the names
    agree with the catalog's ``class_names`` where it holds them, and that integer labels get real names (never "0",
    "1", ... in a prompt) unless the catalog's own names are those numbers."""
    import datasets

    feature = dd[next(iter(dd))].features[label_col]
    expected = hub.first_classes if is_part and hub.first_classes else spec.num_classes
    catalog_names = list(spec.class_names) if spec.class_names and not is_part else None
    if isinstance(feature, datasets.ClassLabel):
        names, names_from = list(feature.names), f"ClassLabel of {label_col!r}"
        ids = lambda ds: _arrow_column(ds, label_col).to_numpy(zero_copy_only=False).astype(np.int64)  # noqa: E731
    elif isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        # string labels (e.g. WordNet ids): ids index the sorted distinct strings of all used splits
        values: dict[str, str | None] = {}
        for part in _used_splits(dd, hub):
            labs = _arrow_column(part, label_col).to_pylist()
            nams = _arrow_column(part, hub.label_names_column).to_pylist() if hub.label_names_column \
                else [None] * len(labs)
            for lab, nam in zip(labs, nams):
                if values.setdefault(lab, nam) != nam:
                    raise CilbenchError(f"{where}: label {lab!r} has two names ({values[lab]!r}, {nam!r}) in "
                                        f"column {hub.label_names_column!r}")
        if None in values:
            raise CilbenchError(f"{where} has rows without a label in {label_col!r}")
        keys = sorted(values)  # type: ignore[type-var]
        if hub.label_names_column:
            names, names_from = [str(values[k]) for k in keys], f"column {hub.label_names_column!r}"
        elif catalog_names and len(catalog_names) == len(keys):
            names, names_from = list(catalog_names), "catalog"
        else:
            names, names_from = keys, f"values of {label_col!r}"
        index = {k: i for i, k in enumerate(keys)}
        ids = lambda ds: np.array([index[v] for v in _arrow_column(ds, label_col).to_pylist()],  # noqa: E731
                                  dtype=np.int64)
    elif isinstance(feature, datasets.Value) and ("int" in feature.dtype):
        names, names_from, ids = _integer_labels(dd, hub, spec, label_col, where, is_part, catalog_names)
    else:
        raise CilbenchError(f"{where}: the label column {label_col!r} holds {feature}, not class labels; is it a copy "
                            f"of {hub.repo}?")
    if hub.names_map:
        names = map_names(names, hub.names_map, where, f"a copy of {hub.repo}")
        names_from += f", mapped to readable names by resources/{hub.names_map}"
    remapped = bool(hub.first_classes or hub.drop_classes)
    if remapped:  # keep a subset of the classes, renumbered 0..K-1 in source order; the rest become -1
        kept = [i for i, n in enumerate(names) if n not in hub.drop_classes][: hub.first_classes or None]
        remap = np.full(len(names) + 1, -1, dtype=np.int64)  # the extra slot maps -1 to -1
        remap[kept] = np.arange(len(kept))
        names, all_ids = [names[i] for i in kept], ids
        ids = lambda ds: remap[all_ids(ds)]  # noqa: E731
    if len(names) != expected:
        raise CilbenchError(f"{where} has {len(names)} classes in {label_col!r}, the catalog's {spec.name} has "
                            f"{expected}; is it a copy of {hub.repo}?")
    if catalog_names and names_from != "catalog" and \
            sorted(map(_norm_name, names)) != sorted(map(_norm_name, catalog_names)):
        raise CilbenchError(f"the class names of {where} ({', '.join(map(repr, names[:3]))}, ...) are not the "
                            f"catalog's {spec.name} classes ({', '.join(map(repr, catalog_names[:3]))}, ...); is it "
                            f"a copy of {hub.repo}?")
    n_names = len(names)

    def checked(ds: Any) -> np.ndarray:
        labels = ids(ds)
        bad = labels[(labels >= n_names) | (labels < -1)]
        if bad.size or (not remapped and (labels < 0).any()):
            raise CilbenchError(f"{where} has labels outside 0..{n_names - 1} in {label_col!r} (e.g. "
                                f"{int(labels[(labels < 0) | (labels >= n_names)][0])}): unlabelled rows?")
        return labels

    return names, checked, names_from


def _integer_labels(dd: Any, hub: HubSource, spec: DatasetSpec, label_col: str, where: str, is_part: bool,
                    catalog_names: list[str] | None) -> tuple[list[str], str, Callable[[Any], np.ndarray]]:
    """Plain integer labels (no ClassLabel): ids = label - ``label_base``; names from the names column, else from
    the catalog. The base and the names are checked, since nothing in the features declares them."""
    base = hub.label_base
    raw = lambda ds: _arrow_column(ds, label_col).to_numpy(zero_copy_only=False).astype(np.int64)  # noqa: E731
    parts = _used_splits(dd, hub)
    seen = np.unique(np.concatenate([raw(p) for p in parts])) if parts else np.zeros(0, np.int64)
    if not seen.size:
        raise CilbenchError(f"{where} has no labelled rows in {label_col!r}")
    lo, hi = int(seen[0]), int(seen[-1])
    k = None if is_part else spec.num_classes + len(hub.drop_classes)  # how many labels the source should have
    if lo < base or (k is not None and hi > base + k - 1):
        looks = f"; they look {lo}-based" if k is not None and hi - lo + 1 == k else ""
        raise CilbenchError(f"{where}: the integer labels in {label_col!r} run {lo}..{hi}, but the catalog's "
                            f"{spec.name} says they run {base}..{base + (k or 0) - 1} (label base {base}"
                            f"{f', {k} classes' if k else ''}){looks}; is it a copy of {hub.repo}?")
    n = k if k is not None else hi - base + 1
    ids = lambda ds: raw(ds) - base  # noqa: E731
    if hub.label_names_column:
        col = hub.label_names_column
        by_label: dict[int, str] = {}
        by_name: dict[str, int] = {}
        for part in parts:
            for lab, nam in zip(raw(part).tolist(), _arrow_column(part, col).to_pylist()):
                if nam is None or by_label.setdefault(lab, nam) != nam:
                    raise CilbenchError(f"{where}: label {lab} has {'no name' if nam is None else 'two names'} "
                                        f"({by_label.get(lab)!r}, {nam!r}) in column {col!r}")
                if by_name.setdefault(nam, lab) != lab:
                    raise CilbenchError(f"{where}: labels {by_name[nam]} and {lab} are both named {nam!r} in "
                                        f"column {col!r}")
        if missing := [base + i for i in range(n) if base + i not in by_label]:
            raise CilbenchError(f"{where}: no row has label {missing[0]} ({len(missing)} of {n} labels unseen), so "
                                f"its name in {col!r} is unknown; is it a complete copy of {hub.repo}?")
        return [str(by_label[base + i]) for i in range(n)], f"column {col!r}", ids
    if catalog_names and len(catalog_names) == n:
        return list(catalog_names), "catalog", ids
    raise CilbenchError(f"{where}: the labels in {label_col!r} are bare integers and the catalog's {spec.name} "
                        f"names no class-name column (label_names_column) nor class names, so a CLIP prompt would "
                        f"read 'a photo of a 0'; name the column that holds the class names")


# ---------------------------------------------------------------- ImageFolder trees

def is_imagefolder(path: Path) -> bool:
    """``<dir>/train/`` and ``<dir>/test/`` both holding class folders."""
    return all((path / s).is_dir() and any(p.is_dir() for p in (path / s).iterdir()) for s in ("train", "test"))


def _walk(root: Path) -> Iterator[tuple[Path, list[str]]]:
    """``(folder, sorted file names)`` for ``root`` and every folder under it, sorted, symbolic links followed,
    hidden entries skipped. A link that leads back to a folder above it (a symlink loop) ends in one line instead of
    an endless walk or a traceback."""

    def visit(folder: Path, chain: dict[tuple[int, int], Path]) -> Iterator[tuple[Path, list[str]]]:
        try:
            st = folder.stat()
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as err:
            raise CilbenchError(f"cannot read {folder} ({err.strerror or err}): a symlink loop or a broken link? "
                                f"fix or remove it") from None
        key = (st.st_dev, st.st_ino)
        if key in chain:
            raise CilbenchError(f"symlink loop under {root}: {folder} leads back to {chain[key]}; remove or repoint "
                                f"that link") from None
        chain = {**chain, key: folder}
        files, dirs = [], []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir()  # follows links
            except OSError as err:  # a link to itself (ELOOP) and the like
                raise CilbenchError(f"cannot read {folder / entry.name} ({err.strerror or err}): a symlink loop or "
                                    f"a broken link? fix or remove it") from None
            (dirs if is_dir else files).append(entry.name)
        yield folder, files
        for d in dirs:
            yield from visit(folder / d, chain)

    yield from visit(root, {})


def _images_under(folder: Path) -> list[Path]:
    return [f / name for f, files in _walk(folder) for name in files
            if Path(name).suffix.lower() in IMAGE_SUFFIXES]


def imagefolder_source(spec: DatasetSpec, root: Path) -> Source:
    """Rows of ``<root>/{train,test}/<class>/*``: class names are the sorted folder names of ``train/`` (through the
    catalog's ``names_map`` when every folder name is in it: the RevisitingCIL ImageNet-A archive names its folders by
    WordNet id)."""
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir() and not p.name.startswith("."))
    test_classes = sorted(p.name for p in (root / "test").iterdir() if p.is_dir() and not p.name.startswith("."))
    ignored = 0
    if spec.class_list:  # the protocol's classes, in its label order; other class folders (ImageNet-1k) are left out
        expected = class_list(spec.class_list)
        if missing := sorted(set(expected) - set(classes)):
            raise CilbenchError(f"{root / 'train'} lacks {len(missing)} of the {len(expected)} classes of resources/"
                                f"{spec.class_list} (e.g. {', '.join(missing[:3])}); {spec.name} needs "
                                f"{spec.local_only}")
        ignored = len(set(classes) - set(expected))
        classes, test_classes = expected, [c for c in test_classes if c in set(expected)]
    if len(classes) != spec.num_classes:
        raise CilbenchError(f"{root / 'train'} has {len(classes)} class folders, the catalog's {spec.name} has "
                            f"{spec.num_classes}; is it the {spec.name} archive?")
    if extra := sorted(set(test_classes) - set(classes)):
        raise CilbenchError(f"{root / 'test'} has class folders that train/ lacks: {', '.join(extra[:5])}")
    index = {c: i for i, c in enumerate(classes)}
    rows = []
    for split in ("train", "test"):
        paths: list[Path] = []
        labels: list[int] = []
        for c in classes:
            found = _images_under(root / split / c) if (root / split / c).is_dir() else []
            paths += found
            labels += [index[c]] * len(found)
        if not paths:
            raise CilbenchError(f"{root / split} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        rows.append(Rows(f"{split}/", split, np.array(labels, np.int64), lambda a, b, p=paths: p[a:b]))
    names, names_from = classes, "folder names of train/"
    mapping = spec.hub.names_map if spec.hub else None
    if mapping and all(c in names_map(mapping) for c in classes):
        names, names_from = map_names(classes, mapping, str(root), f"the {spec.name} archive"), \
            f"folder names of train/, mapped to readable names by resources/{mapping}"
    info = {"kind": "imagefolder", "path": str(root.resolve()), "fingerprint": folder_fingerprint(root),
            "class_names_from": names_from}
    if spec.class_list:
        info.update(class_list=f"resources/{spec.class_list}", other_class_folders_left_out=ignored)
    return Source(rows, names, info)


def folder_fingerprint(root: Path) -> str:
    """sha256 over the sorted relative paths and sizes of every file under ``root`` (hidden entries skipped)."""
    h = hashlib.sha256()
    for folder, files in _walk(root):
        for f in files:
            p = folder / f
            try:
                size = p.stat().st_size
            except OSError as err:
                raise CilbenchError(f"cannot read {p} ({err.strerror or err}): a broken link? fix or remove it") \
                    from None
            h.update(f"{p.relative_to(root).as_posix()}\t{size}\n".encode())
    return "sha256:" + h.hexdigest()
