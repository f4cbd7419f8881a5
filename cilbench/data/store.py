"""The prepared store: every image decoded once into a memory-mapped uint8 array.

Layout of ``<cache>/<dataset>/``::

    manifest.json            counts, checksums, class names, source and its revision, split recipe
    <split>.images.u8        uint8 [N, S, S, 3], raw C order (np.memmap)
    <split>.labels.npy       int64 [N] labels in the dataset's own label space
    <split>.domains.npy      int64 [N] optional domain ids (multi-domain sources)
    .verified.json           the stamp: which image files were last hashed in full, as what (see ``Store.verify``)

Images are stored square at ``S`` pixels: sources with one fixed size keep it (CIFAR 32, TinyImageNet 64); others are
resized so the shorter side is ``S`` (bicubic) and centre-cropped to ``S x S``. With S = 256 the PILOT test transform
Resize(256) + CenterCrop(224) is reproduced exactly from the store; train crops are drawn inside the centre square.
The manifest is written last, so a store without one is incomplete and is never read.

Opening checks, in this order, and ends in one ``StoreCorrupted`` line at the first disagreement: every manifest field
a reader relies on (types, ``num_classes`` = len(``class_names``), file names inside the store, each file named once),
then every file against it without reading its data (present; size = ``count x S x S x 3`` for images, the manifest's
byte count; ``.npy`` header shape = ``(count,)``), then (``verify``) checksums and label ranges. Label files are hashed
on every open (8 bytes per image). Image files (tens of GB) are hashed in full only when their stamp does not match:
the stamp keeps size, mtime, ctime and inode from the last full hash, and ctime cannot be set back by ``cp -p``,
``rsync -a`` or ``touch``, so a file replaced or rewritten since is hashed again; a fixed sample of blocks (1 MiB per
file) is compared on every open as well, which catches damage that leaves the metadata alone. ``verify(full=True)``
(``cilbench datasets verify``) hashes every byte.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Callable, Iterator

import numpy as np

from cilbench.errors import CilbenchError
from cilbench.utils import atomic_write_json

STORE_SCHEMA = 1
MANIFEST = "manifest.json"
STAMP = ".verified.json"
STAMP_VERSION = 2
SAMPLE_BLOCK = 1 << 16  # bytes per sampled block of an image file
SAMPLE_BLOCKS = 16  # blocks per image file compared on every open (1 MiB): first, last and 14 fixed pseudo-random
PROGRESS_MIN_BYTES = 1 << 28  # below 256 MiB a hash is over before a progress bar is worth drawing
_HASH_CHUNK = 1 << 24


class StoreCorrupted(CilbenchError):
    """A prepared store whose manifest or files disagree. ``state`` is "incomplete" (a file is missing),
    "corrupted" or "outdated" (another store schema); ``detail`` is the short reason ``datasets info`` shows and
    ``fix`` the command that rebuilds the store."""

    def __init__(self, message: str, state: str = "corrupted", detail: str = "", fix: str = ""):
        super().__init__(message)
        self.state = state
        self.detail = " ".join((detail or message).split())
        self.fix = fix


@dataclass
class StoreState:
    """What ``Store.inspect`` found: ``state`` ("not prepared", "prepared", "incomplete", "corrupted",
    "outdated"), the reason, the opened store when prepared, and the rebuild command when broken."""

    state: str
    detail: str = ""
    store: "Store | None" = None
    fix: str = ""

    def line(self) -> str:
        return f"{self.state}: {self.detail}" if self.detail else self.state


def _rebuild_command(root: Path, source_path: str | None = None) -> str:
    source = f" --source {source_path}" if source_path else ""
    return f"cilbench datasets prepare {root.name}{source} --force"


def _rebuild(root: Path, source_path: str | None = None) -> str:
    return f"run `{_rebuild_command(root, source_path)}` to rebuild it"


def sha256_file(path: Path, chunk: int = _HASH_CHUNK, advance: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            if advance is not None:
                advance(len(block))
    return h.hexdigest()


def _sample_offsets(size: int) -> list[int]:
    """Offsets of the blocks compared on every open: all of a small file; else the first, the last and
    ``SAMPLE_BLOCKS - 2`` drawn from a hash of the size (fixed, so the stamped digest stays valid)."""
    blocks = -(-size // SAMPLE_BLOCK)
    if blocks <= SAMPLE_BLOCKS:
        return [i * SAMPLE_BLOCK for i in range(blocks)]
    inner = {1 + int.from_bytes(hashlib.sha256(f"{size}:{i}".encode()).digest()[:8], "little") % (blocks - 2)
             for i in range(SAMPLE_BLOCKS - 2)}
    return [i * SAMPLE_BLOCK for i in (0, *sorted(inner), blocks - 1)]


def _sample_digest(path: Path, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for offset in _sample_offsets(size):
            f.seek(offset)
            h.update(f.read(SAMPLE_BLOCK))
    return h.hexdigest()


def _stat_key(st: os.stat_result) -> dict[str, int]:
    # ctime is set by the kernel on every write, utime, chmod or rename: copy tools cannot carry it over
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino}


def _stamp_entry(path: Path, sha256: str, st: os.stat_result | None = None) -> dict[str, Any]:
    """What the stamp keeps of an image file whose full checksum ``sha256`` was just confirmed."""
    st = st or path.stat()
    return {"sha256": sha256, "stat": _stat_key(st), "sample": _sample_digest(path, st.st_size)}


def _stamp_params() -> dict[str, int]:
    return {"version": STAMP_VERSION, "sample_block": SAMPLE_BLOCK, "sample_blocks": SAMPLE_BLOCKS}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and data offset of a ``.npy`` file, from its header alone."""
    fmt = np.lib.format
    with open(path, "rb") as f:
        version = fmt.read_magic(f)
        if version in ((1, 0), (2, 0)):  # what np.save writes
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _, dtype = read(f)
            return tuple(shape), dtype, f.tell()
    arr = np.load(path, allow_pickle=False)  # a rarer header version: read it whole (label files are small)
    return arr.shape, arr.dtype, path.stat().st_size - arr.nbytes


def _format_bytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


@dataclass
class Split:
    """One split of a prepared dataset: memory-mapped images and in-memory labels."""

    images: np.ndarray  # uint8 [N, S, S, 3], memory-mapped
    labels: np.ndarray  # int64 [N]
    domains: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class VerifySummary:
    """What ``Store.verify`` checked: files and bytes in the store, and bytes it hashed in full."""

    files: int
    bytes: int
    hashed_bytes: int

    def line(self, name: str) -> str:
        return f"verified {name}: {self.files} files, {_format_bytes(self.bytes)}, checksums match"


class Store:
    """A prepared dataset on disk. ``Store.open`` checks it; corruption ends in one clear line."""

    def __init__(self, root: Path, manifest: dict[str, Any]):
        self.root = root
        self.manifest = manifest
        self._splits: dict[str, Split] = {}
        self._arrays: dict[tuple[str, str], np.ndarray] = {}  # label / domain arrays read while verifying

    @property
    def name(self) -> str:
        return self.manifest["dataset"]

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["class_names"])

    @property
    def num_classes(self) -> int:
        return len(self.manifest["class_names"])

    @property
    def image_size(self) -> int:
        return int(self.manifest["image_size"])

    @property
    def split_names(self) -> list[str]:
        return list(self.manifest["splits"])

    @classmethod
    def exists(cls, root: Path) -> bool:
        return (Path(root) / MANIFEST).is_file()

    @classmethod
    def open(cls, root: str | Path, verify: bool = True, progress: bool | None = None) -> "Store":
        """Read and check the manifest and the files' sizes; with ``verify`` also checksums and label ranges
        (``Store.verify``). ``progress``: draw a bar while hashing a big store (None: when stderr is a terminal)."""
        root = Path(root)
        path = root / MANIFEST
        if not path.is_file():
            raise CilbenchError(f"no prepared dataset at {root}; run `cilbench datasets prepare` first")
        try:
            manifest = json.loads(path.read_bytes())
        except (OSError, ValueError, RecursionError) as err:  # ValueError: bad JSON or not UTF-8
            raise StoreCorrupted(f"corrupted store manifest {path} ({err}); {_rebuild(root)}",
                                 detail=f"manifest is not readable JSON ({err})", fix=_rebuild_command(root)) from None
        store = cls(root, manifest)
        store.check()
        if verify:
            store.verify(progress=progress)
        return store

    @classmethod
    def inspect(cls, root: str | Path) -> StoreState:
        """The state of the store at ``root`` without hashing: reads the manifest, stats the files and reads the
        ``.npy`` headers, so it stays fast for any store size."""
        root = Path(root)
        if not cls.exists(root):
            return StoreState("not prepared")
        try:
            return StoreState("prepared", store=cls.open(root, verify=False))
        except StoreCorrupted as err:
            return StoreState(err.state, err.detail, fix=err.fix)

    # ---------------------------------------------------------------- checks

    def _source_path(self) -> str | None:
        # a store read from a local folder is rebuilt from it: the hint repeats --source PATH
        source = self.manifest.get("source") if isinstance(self.manifest, dict) else None
        path = source.get("path") if isinstance(source, dict) else None
        return path if isinstance(path, str) and path else None

    def _error(self, message: str, state: str, detail: str) -> StoreCorrupted:
        return StoreCorrupted(f"{message}; {_rebuild(self.root, self._source_path())}", state=state, detail=detail,
                              fix=_rebuild_command(self.root, self._source_path()))

    def _bad_field(self, field: str, problem: str) -> StoreCorrupted:
        return self._error(f"corrupted store manifest {self.root / MANIFEST}: {field} {problem}", "corrupted",
                           f"manifest field {field} {problem}")

    def _bad_file(self, path: Path, problem: str, state: str = "corrupted") -> StoreCorrupted:
        return self._error(f"corrupted store: {path} {problem}", state, f"{path.name} {problem}")

    def check(self) -> None:
        """Every manifest field a reader relies on, then every file against it, without reading image data."""
        self._check_manifest()
        for split, meta in self.manifest["splits"].items():
            n, s = meta["count"], self.image_size
            for kind, fmeta in meta["files"].items():
                f = self.root / fmeta["file"]
                field = f"splits.{split}.files.{kind}"
                try:
                    st = f.stat()
                except FileNotFoundError:
                    raise self._bad_file(f, "is missing", state="incomplete") from None
                except OSError as err:
                    raise self._bad_file(f, f"cannot be read ({err.strerror or err})") from None
                if not f.is_file():
                    raise self._bad_file(f, "is not a regular file")
                if st.st_size != fmeta["bytes"]:
                    raise self._bad_file(f, f"has {st.st_size} bytes, the manifest ({field}.bytes) says "
                                            f"{fmeta['bytes']}")
                if kind == "images":
                    if st.st_size != n * s * s * 3:
                        raise self._bad_field(f"splits.{split}.count / image_size",
                                              f"({n} images of {s}x{s}x3 = {n * s * s * 3} bytes) disagree with "
                                              f"{fmeta['file']} ({st.st_size} bytes)")
                elif f.suffix == ".npy":
                    self._check_npy_header(split, kind, f, n, st.st_size)

    def _check_manifest(self) -> None:
        m = self.manifest
        if not isinstance(m, dict):
            raise self._error(f"corrupted store manifest {self.root / MANIFEST}: not a JSON object but "
                              f"{type(m).__name__}", "corrupted", "manifest is not a JSON object")
        if m.get("schema") != STORE_SCHEMA:
            raise self._error(f"store {self.root} has schema {m.get('schema')}, this cilbench reads {STORE_SCHEMA}",
                              "outdated", f"schema {m.get('schema')}, this cilbench reads {STORE_SCHEMA}")
        if not isinstance(m.get("dataset"), str) or not m["dataset"]:
            raise self._bad_field("dataset", "is missing or not a name")
        if not isinstance(m.get("source"), dict):
            raise self._bad_field("source", "is missing or not an object")
        size = m.get("image_size")
        if not _is_int(size) or size <= 0:
            raise self._bad_field("image_size", f"is {size!r}, not a positive integer")
        names = m.get("class_names")
        if not isinstance(names, list) or not all(isinstance(c, str) for c in names):
            raise self._bad_field("class_names", "is missing or not a list of strings")
        if not _is_int(m.get("num_classes")) or m["num_classes"] != len(names):
            raise self._bad_field("num_classes", f"is {m.get('num_classes')!r} but class_names has {len(names)}")
        domain_names = m.get("domain_names")
        if domain_names is not None and (not isinstance(domain_names, list)
                                         or not all(isinstance(d, str) for d in domain_names)):
            raise self._bad_field("domain_names", "is not a list of strings")
        splits = m.get("splits")
        if not isinstance(splits, dict) or not splits:
            raise self._bad_field("splits", "is missing, empty or not an object")
        root = self.root.resolve()
        used: dict[str, str] = {}
        for split, meta in splits.items():
            if not isinstance(meta, dict):
                raise self._bad_field(f"splits.{split}", "is not an object")
            if not _is_int(meta.get("count")) or meta["count"] < 0:
                raise self._bad_field(f"splits.{split}.count", f"is {meta.get('count')!r}, not a count")
            files = meta.get("files")
            if not isinstance(files, dict):
                raise self._bad_field(f"splits.{split}.files", "is missing or not an object")
            for kind in ("images", "labels"):
                if kind not in files:
                    raise self._bad_field(f"splits.{split}.files.{kind}", "is missing")
            for kind, fmeta in files.items():
                field = f"splits.{split}.files.{kind}"
                if not isinstance(fmeta, dict):
                    raise self._bad_field(field, "is not an object")
                name = fmeta.get("file")
                if not isinstance(name, str) or not name.strip() or "\0" in name:
                    raise self._bad_field(f"{field}.file", "is missing" if name is None else
                                          f"is {name!r}, not a file name")
                if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute():
                    raise self._bad_field(f"{field}.file", f"{name!r} is an absolute path")
                if ".." in PurePosixPath(name).parts or ".." in PureWindowsPath(name).parts:
                    raise self._bad_field(f"{field}.file", f"{name!r} leads out of the store")
                try:  # a symlink may lead out even when the name does not
                    target = (root / name).resolve()
                except (OSError, RuntimeError) as err:  # RuntimeError: a symlink loop before Python 3.13
                    raise self._bad_field(f"{field}.file", f"{name!r} cannot be resolved ({err})") from None
                if target == root or not target.is_relative_to(root):
                    raise self._bad_field(f"{field}.file", f"{name!r} resolves outside the store {root}")
                if name in used:
                    raise self._bad_field(f"{field}.file", f"{name!r} is also {used[name]}")
                used[name] = field
                if not _is_int(fmeta.get("bytes")) or fmeta["bytes"] < 0:
                    raise self._bad_field(f"{field}.bytes", f"is {fmeta.get('bytes')!r}, not a size")
                if not _is_sha256(fmeta.get("sha256")):
                    raise self._bad_field(f"{field}.sha256", "is not a sha256 hex digest")

    def _check_npy_header(self, split: str, kind: str, f: Path, count: int, size: int) -> None:
        try:
            shape, dtype, offset = _npy_header(f)
        except (OSError, ValueError, SyntaxError) as err:  # a damaged header: bad magic, unparsable dict
            raise self._bad_file(f, f"is not a readable .npy array ({err})") from None
        if dtype.kind not in "iu" or dtype.hasobject:
            raise self._bad_file(f, f"holds {dtype}, not integer {kind}")
        if len(shape) != 1 or shape[0] != count:
            raise self._bad_field(f"splits.{split}.count", f"is {count} but {f.name} holds {kind} of shape "
                                                           f"{list(shape)}")
        if size != offset + count * dtype.itemsize:
            raise self._bad_file(f, f"has {size} bytes, its header says {offset + count * dtype.itemsize}")

    def _check_values(self, split: str, kind: str, arr: np.ndarray) -> np.ndarray:
        """Labels in [0, num_classes), domain ids in [0, len(domain_names)); returns them as int64."""
        f = self.root / self.manifest["splits"][split]["files"][kind]["file"]
        count = self.manifest["splits"][split]["count"]
        if arr.dtype.kind not in "iu" or arr.shape != (count,):
            raise self._bad_file(f, f"holds {arr.dtype} {list(arr.shape)}, not {count} integer {kind}")
        upper, what = {"labels": (self.num_classes, "num_classes"),
                       "domains": (len(self.manifest.get("domain_names") or []) or None, "domain_names")}.get(
                           kind, (None, ""))
        if arr.size and kind in ("labels", "domains"):
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0:
                raise self._bad_file(f, f"holds {kind[:-1]} {lo}, a negative id")
            if upper is not None and hi >= upper:
                raise self._bad_file(f, f"holds {kind[:-1]} {hi}, outside [0, {upper}) of the manifest's {what}")
        return arr.astype(np.int64, copy=False)

    # ---------------------------------------------------------------- checksums

    def _entries(self) -> Iterator[tuple[str, str, dict[str, Any], Path]]:
        for split, meta in self.manifest["splits"].items():
            for kind, fmeta in meta["files"].items():
                yield split, kind, fmeta, self.root / fmeta["file"]

    def _read_stamp(self) -> dict[str, Any]:
        try:
            stamp = json.loads((self.root / STAMP).read_bytes())
        except (OSError, ValueError, RecursionError):
            return {}
        if not isinstance(stamp, dict) or not isinstance(stamp.get("files"), dict) \
                or any(stamp.get(k) != v for k, v in _stamp_params().items()):
            return {}  # another format, or other sample parameters: every image file is hashed again once
        return stamp["files"]

    def verify(self, full: bool = False, progress: bool | None = None) -> VerifySummary:
        """Checksums of every file and the range of every label and domain id. Label files are hashed every time;
        an image file in full only with ``full`` or when its stamp (size, mtime, ctime, inode and the checksum it
        confirmed) no longer matches the file or the sample of its blocks differs from the stamped one. Files hashed
        in full are stamped again. Expects ``check()`` to have passed (``Store.open`` runs it)."""
        stamp = self._read_stamp()
        new_stamp: dict[str, Any] = {}
        to_hash: list[tuple[str, str, dict[str, Any], Path]] = []
        total = 0
        for split, kind, fmeta, f in self._entries():
            total += fmeta["bytes"]
            if f.suffix == ".npy":  # labels, domains: 8 bytes per image, hashed and read on every open
                to_hash.append((split, kind, fmeta, f))
                continue
            entry = stamp.get(fmeta["file"])
            try:
                if not full and isinstance(entry, dict) and entry.get("sha256") == fmeta["sha256"] \
                        and entry.get("stat") == _stat_key(f.stat()) \
                        and entry.get("sample") == _sample_digest(f, fmeta["bytes"]):
                    new_stamp[fmeta["file"]] = entry
                    continue
            except OSError as err:
                raise self._bad_file(f, f"cannot be read ({err.strerror or err})") from None
            to_hash.append((split, kind, fmeta, f))
        hashed = sum(fmeta["bytes"] for _, _, fmeta, f in to_hash if f.suffix != ".npy")
        with _HashProgress(progress, hashed, f"verifying {self.root.name}") as advance:
            for split, kind, fmeta, f in to_hash:
                try:
                    before = f.stat()
                    if f.suffix == ".npy":  # small: hash and parse the same bytes
                        data = f.read_bytes()
                        digest = hashlib.sha256(data).hexdigest()
                    else:
                        digest = sha256_file(f, advance=advance)
                    after = f.stat()
                except OSError as err:
                    raise self._bad_file(f, f"cannot be read ({err.strerror or err})") from None
                if digest != fmeta["sha256"]:
                    raise self._bad_file(f, "does not match the checksum in the manifest")
                if f.suffix != ".npy":
                    if _stat_key(before) == _stat_key(after):  # not changed while it was hashed
                        new_stamp[fmeta["file"]] = _stamp_entry(f, digest, after)
                else:
                    try:
                        arr = np.load(io.BytesIO(data), allow_pickle=False)
                    except (ValueError, OSError, EOFError) as err:
                        raise self._bad_file(f, f"is not a readable .npy array ({err})") from None
                    self._arrays[(split, kind)] = self._check_values(split, kind, arr)
        if new_stamp != stamp:
            try:
                atomic_write_json(self.root / STAMP, {**_stamp_params(), "files": new_stamp})
            except OSError:  # a read-only cache is fine, we just hash again next time
                pass
        return VerifySummary(files=sum(1 for _ in self._entries()), bytes=total, hashed_bytes=hashed)

    # ---------------------------------------------------------------- reading

    def _array(self, split: str, kind: str) -> np.ndarray:
        if (split, kind) not in self._arrays:
            f = self.root / self.manifest["splits"][split]["files"][kind]["file"]
            try:
                arr = np.load(f, allow_pickle=False)
            except (ValueError, OSError, EOFError) as err:
                raise self._bad_file(f, f"is not a readable .npy array ({err})") from None
            self._arrays[(split, kind)] = self._check_values(split, kind, arr)
        return self._arrays[(split, kind)]

    def split(self, name: str) -> Split:
        if name not in self._splits:
            if name not in self.manifest["splits"]:
                raise CilbenchError(f"dataset {self.name} has no split {name!r} (has {', '.join(self.split_names)})")
            meta = self.manifest["splits"][name]
            n, s = meta["count"], self.image_size
            if n == 0:  # an empty file cannot be memory-mapped
                images = np.zeros((0, s, s, 3), np.uint8)
            else:
                images = np.memmap(self.root / meta["files"]["images"]["file"], dtype=np.uint8, mode="r",
                                   shape=(n, s, s, 3))
            domains = self._array(name, "domains") if "domains" in meta["files"] else None
            self._splits[name] = Split(images, self._array(name, "labels"), domains)
        return self._splits[name]


class _HashProgress:
    """A rich progress bar over bytes on stderr while hashing, for big hashes only (``progress`` None: only when
    stderr is a terminal). Entering it gives the function that advances it."""

    def __init__(self, progress: bool | None, total: int, label: str):
        if progress is None:
            progress = sys.stderr.isatty()
        self.enabled = bool(progress) and total >= PROGRESS_MIN_BYTES
        self.total, self.label = total, label
        self.bar: Any = None

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled:
            return lambda n: None
        from rich.console import Console
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                            TimeRemainingColumn(), console=Console(stderr=True), transient=True)
        self.bar.__enter__()
        task = self.bar.add_task(self.label, total=self.total)
        return lambda n: self.bar.advance(task, n)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)


class StoreWriter:
    """Writes a store into a temporary folder and moves it into place only when every split and the manifest are
    complete, so an interrupted prepare leaves nothing behind.

    The temporary folder ``.<name>.<pid>-<token>.partial`` is private to one writer (two processes preparing the
    same dataset do not collide); folders left by killed processes are removed by the next writer."""

    def __init__(self, root: str | Path, dataset: str, image_size: int):
        self.root = Path(root)
        self.dataset = dataset
        self.image_size = image_size
        self.root.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_temp_dirs(self.root.parent, f".{self.root.name}.")
        self.tmp = self.root.parent / f".{self.root.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial"
        self.tmp.mkdir()
        self.splits: dict[str, dict[str, Any]] = {}

    def images_array(self, split: str, count: int) -> np.ndarray:
        s = self.image_size
        path = self.tmp / f"{split}.images.u8"
        return np.memmap(path, dtype=np.uint8, mode="w+", shape=(max(count, 1), s, s, 3))[:count]

    def close_split(self, split: str, images: np.ndarray, labels: np.ndarray, domains: np.ndarray | None = None,
                    **extra: Any) -> None:
        if isinstance(images, np.memmap):
            images.flush()
        path = self.tmp / f"{split}.images.u8"
        if not path.exists() or path.stat().st_size != images.nbytes:
            np.ascontiguousarray(images, dtype=np.uint8).tofile(path)
        files = {"images": self._file_meta(path)}
        for kind, arr in (("labels", labels), ("domains", domains)):
            if arr is None:
                continue
            p = self.tmp / f"{split}.{kind}.npy"
            np.save(p, np.asarray(arr, dtype=np.int64))
            files[kind] = self._file_meta(p)
        self.splits[split] = {"count": int(len(labels)), "files": files, **extra}

    def _file_meta(self, path: Path) -> dict[str, Any]:
        return {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path)}

    def finish(self, class_names: list[str], source: dict[str, Any], **extra: Any) -> Store:
        from cilbench import __version__

        manifest = {
            "schema": STORE_SCHEMA,
            "dataset": self.dataset,
            "image_size": self.image_size,
            "class_names": list(class_names),
            "num_classes": len(class_names),
            "source": source,
            "splits": self.splits,
            "cilbench_version": __version__,
            **extra,
        }
        atomic_write_json(self.tmp / MANIFEST, manifest)
        # the checksums were just computed: stamp them so the first open does not hash the images again
        big = [fmeta for meta in self.splits.values() for fmeta in meta["files"].values()
               if Path(fmeta["file"]).suffix != ".npy"]
        atomic_write_json(self.tmp / STAMP, {**_stamp_params(), "files": {
            fmeta["file"]: _stamp_entry(self.tmp / fmeta["file"], fmeta["sha256"]) for fmeta in big}})
        old = None
        if self.root.exists():  # move the old store aside first: a directory cannot be replaced in one rename
            old = self.root.parent / f".{self.root.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.old"
            self.root.rename(old)
        try:
            self.tmp.rename(self.root)
        except OSError:
            if not Store.exists(self.root):  # not "another writer finished first"
                raise
            shutil.rmtree(self.tmp, ignore_errors=True)
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        return Store.open(self.root)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def remove_dead_temp_dirs(parent: Path, prefix: str) -> None:
    """Remove folders ``<prefix><pid>-<token>...`` in ``parent`` whose process is gone (left by a killed run)."""
    for p in Path(parent).glob(f"{glob.escape(prefix)}*-*"):
        pid = p.name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit() or not p.is_dir():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except OSError:  # alive but not ours (EPERM): leave it
            pass
