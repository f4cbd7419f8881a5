"""Prepare a dataset once: read its source, decode every image, write the memory-mapped store.

``prepare(name, cache_dir, source)`` reads the hub (``source="hub"``), a local copy of the hub repository, or a local
ImageFolder tree ``<dir>/{train,test}/<class>/*``; offline datasets (``synthetic``, ``digits``) are built here.
Images are decoded with PIL (converted to RGB) in a thread pool and stored square: at their native size when the
catalog says ``store_size=None`` (all images must share it), else resized so the shorter side is S (bicubic,
torchvision's size rounding) and centre-cropped to S x S (torchvision's crop rounding), so Resize(S) + CenterCrop
from the store equals the same transforms on the original image. Sources with one split get a seeded stratified
split (``stratified_split``), frozen in the store and described in its manifest.

The manifest records ``source``: ``kind`` ("hub", "hub-copy", "imagefolder" or "offline"), for the hub the repo,
config, requested ``revision`` and ``resolved_revision`` (the commit actually downloaded: the download is pinned to
it), the image / label columns and where the class names came from (``parts`` holds one such record per repo for
VTAB); for a local folder its ``path`` and a ``fingerprint`` (sha256 over relative paths and sizes); for offline
builders the recipe (builder, options, generator version). Beside it: ``split_recipe`` (rule, seed, resulting
counts) when the split was built, ``preprocess``, ``domain_names`` for multi-domain stores, the per-split counts,
class counts and file checksums (written by ``StoreWriter``).
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from cilbench.data.catalog import DatasetSpec, SequenceSpec, SplitRule, get_spec
from cilbench.data.sources import Source, hub_source, imagefolder_source, is_imagefolder
from cilbench.data.store import Store, StoreWriter, remove_dead_temp_dirs
from cilbench.errors import CilbenchError

CHUNK = 256  # rows decoded per batch: bounds memory (256 x 256 x 256 x 3 bytes = 50 MB) while keeping threads busy
# continuum's TinyImageNet200 indexes the sorted WordNet ids; the tinyimagenet-zscl class order depends on it
_SORTED_CLASS_NAMES = {"tinyimagenet"}


# ---------------------------------------------------------------- public API

def store_path(name: str, cache_dir: Path) -> Path:
    """Where the prepared store of dataset ``name`` lives."""
    return Path(cache_dir).expanduser() / dataset_spec(name).name


def dataset_spec(name: str) -> DatasetSpec:
    """The catalog entry of a dataset that has a store of its own (not a sequence, not a sequence member)."""
    base, slash, member = name.partition("/")
    if slash and base in _catalog_names():
        raise CilbenchError(f"{name!r} is domain {member} of the dataset {base!r}: prepare or open {base!r}")
    spec = get_spec(name)
    if isinstance(spec, SequenceSpec):
        members = sorted({m.partition("/")[0] for order in spec.orders.values() for m in order})
        raise CilbenchError(f"{name} is a dataset sequence; prepare its datasets: {', '.join(members)}")
    return spec


def prepare(name: str, cache_dir: Path, source: str = "hub", force: bool = False, progress: bool = True) -> Store:
    """Build the store of ``name`` from ``source`` ("hub" or a local PATH) and return it opened.

    An existing store is returned as is unless ``force`` (an offline store built by another generator version is
    rebuilt). A PATH holding ``train/`` and ``test/`` class folders is an ImageFolder tree; any other PATH is read
    as a local copy of the dataset's hub repository, with the same ``datasets.load_dataset`` call as the hub."""
    spec = dataset_spec(name)
    cache_dir = Path(cache_dir).expanduser()
    root = store_path(name, cache_dir)
    local = None if source in (None, "", "hub") else Path(source).expanduser()
    if spec.builder and local is not None:
        raise CilbenchError(f"{name} is built by cilbench without a download; run it without --source")
    if Store.exists(root) and not force:
        store = Store.open(root)
        if _up_to_date(store, spec, local):
            return store
        if not spec.builder:
            raise CilbenchError(f"{name} is already prepared from {_describe_source(store.manifest['source'])}; "
                                f"pass --force to prepare it again from {local}")
    if spec.builder:
        return _build_offline(spec, root)
    if local is None:
        if not spec.hub and not spec.parts:
            raise CilbenchError(f"{name} has no hub source: it needs {spec.local_only}; run "
                                f"`cilbench datasets prepare {name} --source PATH`")
        return _build(spec, root, hub_source(spec, None, None, None, progress), progress)
    if not local.exists():
        raise CilbenchError(f"--source {local} does not exist; pass a copy of the hub repo or an ImageFolder "
                            f"<dir>/{{train,test}}/<class>/")
    if not local.is_dir():
        raise CilbenchError(f"--source {local} is not a folder; pass a copy of the hub repo or an ImageFolder "
                            f"<dir>/{{train,test}}/<class>/")
    if is_imagefolder(local):
        return _build(spec, root, imagefolder_source(spec, local), progress)
    cache_dir.mkdir(parents=True, exist_ok=True)
    # the Arrow copy `datasets` makes of a local folder is only needed while decoding: keep it out of the HF cache
    remove_dead_temp_dirs(cache_dir, ".hf-")
    with tempfile.TemporaryDirectory(prefix=f".hf-{os.getpid()}-", dir=cache_dir) as tmp:
        return _build(spec, root, hub_source(spec, str(local), None, Path(tmp), progress), progress)


def open_store(name: str, cache_dir: Path, prepare_offline: bool = True) -> Store:
    """Open the prepared store of ``name``; offline datasets are prepared on first use."""
    spec = dataset_spec(name)
    root = store_path(name, cache_dir)
    if Store.exists(root):
        store = Store.open(root)
        if store.name != spec.name or store.num_classes != spec.num_classes:  # copied into the wrong folder
            raise CilbenchError(f"store {root} holds {store.name} with {store.num_classes} classes, but the catalog's "
                                f"{spec.name} has {spec.num_classes}; run `cilbench datasets prepare {name} --force`")
        if not spec.builder or _up_to_date(store, spec, None) or not prepare_offline:
            return store
    if spec.builder and prepare_offline:
        return prepare(name, cache_dir, force=True, progress=False)
    if spec.builder:
        raise CilbenchError(f"dataset {name} is not prepared in {cache_dir}; run `cilbench datasets prepare {name}`")
    if not spec.hub and not spec.parts:
        raise CilbenchError(f"dataset {name} is not prepared in {cache_dir}; it needs {spec.local_only}: run "
                            f"`cilbench datasets prepare {name} --source PATH`")
    raise CilbenchError(f"dataset {name} is not prepared in {cache_dir}; run `cilbench datasets prepare {name}` "
                        f"(downloads {spec.source_line()}) or `cilbench datasets prepare {name} --source PATH`")


def class_names(name: str, cache_dir: Path) -> list[str]:
    """The class names of a prepared dataset, in label order."""
    return open_store(name, cache_dir).class_names


def stratified_split(labels: np.ndarray, rule: SplitRule) -> np.ndarray:
    """A boolean test mask: ``round(test_fraction * n_c)`` rows of each class c (labels < 0 are skipped), chosen
    by one ``np.random.default_rng(seed)`` drawing a permutation per class, classes in ascending order, each
    permutation over that class's rows in source order."""
    rng = np.random.default_rng(rule.seed)
    test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels[labels >= 0]):
        rows = np.flatnonzero(labels == c)
        k = int(round(rule.test_fraction * len(rows)))
        test[rows[rng.permutation(len(rows))[:k]]] = True
    return test


def decode_image(item: Any, size: int | None) -> np.ndarray:
    """One encoded image (bytes, a path, a ``{"bytes", "path"}`` dict or a PIL image) -> uint8 [S, S, 3].

    ``size`` None keeps the native size (the image must be square); else the shorter side becomes ``size``
    (bicubic) and the centre ``size x size`` is cut, with torchvision's Resize / CenterCrop rounding."""
    from PIL import Image

    if isinstance(item, dict):
        item = item.get("bytes") or item.get("path")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # palette transparency and EXIF chatter are harmless here
        im = item if isinstance(item, Image.Image) else Image.open(BytesIO(item) if isinstance(item, bytes) else item)
        im = im.convert("RGB")
    w, h = im.size
    if size is not None:
        if (w, h) != (size, size):
            if w <= h:
                new_w, new_h = size, int(size * h / w)
            else:
                new_w, new_h = int(size * w / h), size
            if (new_w, new_h) != (w, h):
                im = im.resize((new_w, new_h), Image.BICUBIC)
            left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
            im = im.crop((left, top, left + size, top + size))
    elif w != h:
        raise CilbenchError(f"an image is {w}x{h}, not square, but the catalog keeps native sizes for this dataset")
    return np.asarray(im, dtype=np.uint8)


# ---------------------------------------------------------------- building

def _catalog_names() -> list[str]:
    from cilbench.data.catalog import DATASETS

    return DATASETS.names()


def _describe_source(src: dict[str, Any]) -> str:
    if src.get("kind") == "hub":
        return "the hub (" + ", ".join(p["repo"] for p in src.get("parts", [src])) + ")"
    return f"{src.get('kind')} {src.get('path', src.get('builder', ''))}"


def _up_to_date(store: Store, spec: DatasetSpec, local: Path | None) -> bool:
    src = store.manifest.get("source", {})
    if spec.builder:
        return src == _offline_recipe(spec)
    return local is None or src.get("path") == str(local.resolve())


def _offline_recipe(spec: DatasetSpec) -> dict[str, Any]:
    if spec.builder == "synthetic":
        from cilbench.data.synthetic import GENERATOR_VERSION

        return {"kind": "offline", "builder": "synthetic", "options": dict(spec.builder_options),
                "generator_version": GENERATOR_VERSION}
    if spec.builder == "digits":
        return {"kind": "offline", "builder": "digits", "loader": "sklearn.datasets.load_digits (bundled, UCI)"}
    raise ValueError(f"unknown builder {spec.builder!r} for {spec.name}")


def _split_recipe(rule: SplitRule, source_split: str, counts: dict[str, int]) -> dict[str, Any]:
    return {"rule": rule.describe(), "test_fraction": rule.test_fraction, "seed": rule.seed,
            "source_split": source_split, "function": "cilbench.data.prepare.stratified_split", "counts": counts}


def _common_extra(spec: DatasetSpec, t0: float, src: Source | None = None) -> dict[str, Any]:
    extra = {"description": spec.description, "notes": spec.notes, "paper_counts": spec.paper_counts,
             "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "prepare_seconds": round(time.time() - t0, 2)}
    if spec.published_split is not None and not (src and src.info.get("kind") == "imagefolder"):
        # an ImageFolder is the user's own split (often the papers' archive): the catalog's words are about ours
        extra.update(published_split=spec.published_split, split_vs_papers=spec.split_vs_papers)
    return extra


def _class_counts(labels: np.ndarray, num_classes: int) -> list[int]:
    return np.bincount(labels, minlength=num_classes).tolist()


def _build_offline(spec: DatasetSpec, root: Path) -> Store:
    t0 = time.time()
    recipe = _offline_recipe(spec)
    names = list(spec.class_names or [])
    extra: dict[str, Any] = {}
    if spec.builder == "synthetic":
        from cilbench.data.synthetic import make_synthetic

        splits = make_synthetic(**spec.builder_options)
        num_domains = spec.builder_options.get("num_domains", 1)
        names = names or [f"class {c}" for c in range(spec.num_classes)]
        extra["domain_names"] = [f"domain {d}" for d in range(num_domains)]
    else:
        pixels, labels = load_digits_arrays()
        gray = np.rint(pixels * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
        images = np.repeat(gray[..., None], 3, axis=-1)
        assert spec.split_rule is not None
        test = stratified_split(labels, spec.split_rule)
        splits = {"train": (images[~test], labels[~test], None), "test": (images[test], labels[test], None)}
        extra["split_recipe"] = _split_recipe(spec.split_rule, "load_digits()", {"train": int((~test).sum()),
                                                                                 "test": int(test.sum())})
    size = splits["train"][0].shape[1]
    writer = StoreWriter(root, spec.name, size)
    try:
        for split, (images, labels, domains) in splits.items():
            writer.close_split(split, images, labels, domains, class_counts=_class_counts(labels, len(names)))
        extra["preprocess"] = {"store_size": size, "resize": "generated at this size"}
        return writer.finish(names, recipe, **extra, **_common_extra(spec, t0))
    except BaseException:
        writer.abort()
        raise


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits (float 0..16 [1797, 8, 8], int64 labels), as ``load_digits`` returns them.
    Reads the bundled CSV directly: importing scikit-learn costs seconds, finding its folder costs nothing."""
    spec = importlib.util.find_spec("sklearn")
    csv = Path(next(iter(spec.submodule_search_locations or []), "")) / "datasets" / "data" / "digits.csv.gz" \
        if spec else None
    if csv is None or not csv.is_file():  # a layout we do not know: take the slow road
        from sklearn.datasets import load_digits

        digits = load_digits()
        return digits.images, digits.target.astype(np.int64)
    data = np.loadtxt(csv, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)


def _assign(spec: DatasetSpec, src: Source) -> tuple[list[str], list[np.ndarray], dict[str, Any] | None]:
    """Split names, and per Rows the store split id of every row (-1 = dropped); builds the split of a source
    that has only one (target "all") with the catalog's SplitRule."""
    split_names = ["train", "test"] + sorted({r.target for r in src.rows} - {"train", "test", "all"})
    dest = []
    for r in src.rows:
        d = np.full(len(r.labels), -1, np.int64)
        if r.target != "all":
            d[r.labels >= 0] = split_names.index(r.target)
        dest.append(d)
    singles = [i for i, r in enumerate(src.rows) if r.target == "all"]
    recipe = None
    if singles:
        if spec.split_rule is None:
            raise CilbenchError(f"the source of {spec.name} has a single split and the catalog gives no split rule "
                                f"for it; pass an ImageFolder <dir>/{{train,test}}/<class>/ with --source")
        labels = np.concatenate([src.rows[i].labels for i in singles])
        test = stratified_split(labels, spec.split_rule)
        start = 0
        for i in singles:
            n = len(src.rows[i].labels)
            keep = src.rows[i].labels >= 0
            dest[i][keep] = np.where(test[start:start + n][keep], 1, 0)
            start += n
        counts = {s: int(sum((d == k).sum() for d in dest)) for k, s in enumerate(split_names)}
        recipe = _split_recipe(spec.split_rule, ", ".join(src.rows[i].name for i in singles), counts)
    return split_names, dest, recipe


@contextmanager
def _progress(enabled: bool, total: int, label: str) -> Iterator[Callable[[int], None]]:
    if not enabled:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def _build(spec: DatasetSpec, root: Path, src: Source, progress: bool) -> Store:
    t0 = time.time()
    if spec.name in _SORTED_CLASS_NAMES and src.class_names != sorted(src.class_names):
        raise CilbenchError(f"the class names of {spec.name} are not the sorted WordNet ids its published class "
                            f"orders assume; is the source a copy of {spec.hub.repo if spec.hub else spec.name}?")
    split_names, dest, recipe = _assign(spec, src)
    # where every kept row goes: position in its split, in source order
    counts = np.zeros(len(split_names), np.int64)
    positions = []
    for d in dest:
        p = np.full(len(d), -1, np.int64)
        for k in range(len(split_names)):
            m = d == k
            p[m] = counts[k] + np.arange(int(m.sum()))
            counts[k] += int(m.sum())
        positions.append(p)
    if counts.sum() == 0:
        raise CilbenchError(f"the source of {spec.name} holds no images")
    labels = {s: np.empty(int(counts[k]), np.int64) for k, s in enumerate(split_names)}
    has_domains = any(r.domain is not None for r in src.rows)
    domains = {s: np.zeros(int(counts[k]), np.int64) for k, s in enumerate(split_names)} if has_domains else None
    for r, d, p in zip(src.rows, dest, positions):
        for k, s in enumerate(split_names):
            m = d == k
            labels[s][p[m]] = r.labels[m]
            if domains is not None:
                domains[s][p[m]] = r.domain or 0

    size = spec.store_size
    if size is None:  # native size: the first kept image sets it, every other must match
        r, d = next((r, d) for r, d in zip(src.rows, dest) if (d >= 0).any())
        first = int(np.flatnonzero(d >= 0)[0])
        size = _decode_row(r.fetch(first, first + 1)[0], None, r.name, first).shape[0]

    writer = StoreWriter(root, spec.name, size)
    try:
        arrays = {s: writer.images_array(s, int(counts[k])) for k, s in enumerate(split_names)}
        target = None if spec.store_size is None else size

        def put(item: Any, where: str, i: int, split: str, pos: int) -> None:
            # decode and write in the worker: PIL and numpy's copy release the GIL, so both run in parallel
            img = _decode_row(item, target, where, i)
            if img.shape != (size, size, 3):
                raise CilbenchError(f"images of {spec.name} differ in size ({img.shape[1]}x{img.shape[0]} and "
                                    f"{size}x{size}), but the catalog keeps their native size")
            arrays[split][pos] = img

        pool = ThreadPoolExecutor(max_workers=min(32, os.cpu_count() or 2))
        try:
            with _progress(progress, int(counts.sum()), f"preparing {spec.name}") as advance:
                pending: list[Any] = []  # one chunk in flight while the next is fetched: the pool never idles
                for r, d, p in zip(src.rows, dest, positions):
                    for start in range(0, len(d), CHUNK):
                        sel = start + np.flatnonzero(d[start:start + CHUNK] >= 0)
                        if not sel.size:
                            continue
                        items = r.fetch(start, min(start + CHUNK, len(d)))
                        submitted = [pool.submit(put, items[i - start], r.name, int(i), split_names[d[i]], int(p[i]))
                                     for i in sel]
                        for f in pending:
                            f.result()
                        advance(len(pending))
                        pending = submitted
                for f in pending:
                    f.result()
                advance(len(pending))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        n_cls = len(src.class_names)
        for s in split_names:
            writer.close_split(s, arrays[s], labels[s], domains[s] if domains else None,
                               class_counts=_class_counts(labels[s], n_cls))
        extra: dict[str, Any] = {
            "preprocess": {"store_size": spec.store_size, "image_size": size, "convert": "PIL RGB",
                           "resize": "native size kept" if target is None else
                           f"shorter side to {size} (PIL bicubic, torchvision size rounding), centre crop "
                           f"{size}x{size} (torchvision rounding)"}}
        if recipe:
            extra["split_recipe"] = recipe
        if src.domain_names:
            extra["domain_names"] = src.domain_names
        return writer.finish(src.class_names, src.info, **extra, **_common_extra(spec, t0, src))
    except BaseException:
        writer.abort()
        raise


def _decode_row(item: Any, size: int | None, where: str, index: int) -> np.ndarray:
    try:
        return decode_image(item, size)
    except CilbenchError:
        raise
    except (OSError, ValueError, SyntaxError) as err:  # PIL's UnidentifiedImageError is an OSError
        what = item if isinstance(item, (str, Path)) else f"{where} row {index}"
        raise CilbenchError(f"cannot decode image {what} ({err}); the source is damaged: fetch it again") from None
