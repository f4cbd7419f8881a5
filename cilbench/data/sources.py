"""Reading a dataset's source into rows to decode: the Hugging Face hub, a local copy of a hub repository, or a
local ImageFolder tree ``<dir>/{train,test}/<class>/*``.

The hub and a local copy of a hub repository go through the same code (``datasets.load_dataset``). Every failure a
user can cause (no network, offline mode, a missing or malformed folder, a wrong number of classes) ends in one
``CilbenchError`` line that says what to do.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

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

def load_hub_splits(where: str, hub: HubSource, name: str, revision: str | None, cache_dir: Path | None,
                    progress: bool) -> Any:
    """``datasets.load_dataset`` of a hub repo (``where`` = repo id) or of a local copy (``where`` = a folder):
    the same call for both. Returns the DatasetDict of all splits."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    if not progress:
        datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(where, name=hub.config, revision=revision,
                                     cache_dir=str(cache_dir) if cache_dir else None)
    except Exception as err:  # noqa: BLE001 - classified below
        local = Path(where).is_dir()
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
                      "first_classes": hub.first_classes, "splits": dict(hub.splits)})
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


def _label_space(dd: Any, hub: HubSource, spec: DatasetSpec, label_col: str, where: str, is_part: bool
                 ) -> tuple[list[str], Callable[[Any], np.ndarray], str]:
    """Class names and a function mapping a split's label column to ids 0..K-1 (-1 = dropped by ``first_classes``
    or ``drop_classes``)."""
    import datasets

    feature = dd[next(iter(dd))].features[label_col]
    expected = hub.first_classes if is_part and hub.first_classes else spec.num_classes
    if isinstance(feature, datasets.ClassLabel):
        names, names_from = list(feature.names), f"ClassLabel of {label_col!r}"
        ids = lambda ds: _arrow_column(ds, label_col).to_numpy(zero_copy_only=False).astype(np.int64)  # noqa: E731
    elif isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        # string labels (e.g. WordNet ids): ids index the sorted distinct strings of all used splits
        values: dict[str, str | None] = {}
        for _, theirs in hub.splits:
            if (part := _split(dd, theirs)) is None:
                continue
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
        elif spec.class_names and len(spec.class_names) == len(keys):
            names, names_from = list(spec.class_names), "catalog"
        else:
            names, names_from = keys, f"values of {label_col!r}"
        index = {k: i for i, k in enumerate(keys)}
        ids = lambda ds: np.array([index[v] for v in _arrow_column(ds, label_col).to_pylist()],  # noqa: E731
                                  dtype=np.int64)
    else:  # plain integer labels: names from the catalog
        ids = lambda ds: _arrow_column(ds, label_col).to_numpy(zero_copy_only=False).astype(np.int64)  # noqa: E731
        n = int(max(int(ids(p).max(initial=-1)) for _, t in hub.splits if (p := _split(dd, t)) is not None)) + 1
        if spec.class_names and not is_part:
            names, names_from = list(spec.class_names), "catalog"
        else:
            names, names_from = [str(i) for i in range(n)], f"values of {label_col!r}"
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
    n_names = len(names)

    def checked(ds: Any) -> np.ndarray:
        labels = ids(ds)
        bad = labels[(labels >= n_names) | (labels < -1)]
        if bad.size or (not remapped and (labels < 0).any()):
            raise CilbenchError(f"{where} has labels outside 0..{n_names - 1} in {label_col!r} (e.g. "
                                f"{int(labels[(labels < 0) | (labels >= n_names)][0])}): unlabelled rows?")
        return labels

    return names, checked, names_from


# ---------------------------------------------------------------- ImageFolder trees

def is_imagefolder(path: Path) -> bool:
    """``<dir>/train/`` and ``<dir>/test/`` both holding class folders."""
    return all((path / s).is_dir() and any(p.is_dir() for p in (path / s).iterdir()) for s in ("train", "test"))


def _images_under(folder: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [Path(dirpath) / f for f in sorted(filenames)
                if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return out


def imagefolder_source(spec: DatasetSpec, root: Path) -> Source:
    """Rows of ``<root>/{train,test}/<class>/*``: class names are the sorted folder names of ``train/``."""
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir() and not p.name.startswith("."))
    test_classes = sorted(p.name for p in (root / "test").iterdir() if p.is_dir() and not p.name.startswith("."))
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
    info = {"kind": "imagefolder", "path": str(root.resolve()), "fingerprint": folder_fingerprint(root),
            "class_names_from": "folder names of train/"}
    return Source(rows, classes, info)


def folder_fingerprint(root: Path) -> str:
    """sha256 over the sorted relative paths and sizes of every file under ``root`` (hidden entries skipped)."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if f.startswith("."):
                continue
            p = Path(dirpath) / f
            h.update(f"{p.relative_to(root).as_posix()}\t{p.stat().st_size}\n".encode())
    return "sha256:" + h.hexdigest()
