"""The prepared store: every image decoded once into a memory-mapped uint8 array.

Layout of ``<cache>/<dataset>/``::

    manifest.json            counts, checksums, class names, source and its revision, split recipe
    <split>.images.u8        uint8 [N, S, S, 3], raw C order (np.memmap)
    <split>.labels.npy       int64 [N] labels in the dataset's own label space
    <split>.domains.npy      int64 [N] optional domain ids (multi-domain sources)

Images are stored square at ``S`` pixels: sources with one fixed size keep it (CIFAR 32, TinyImageNet 64); others are
resized so the shorter side is ``S`` (bicubic) and centre-cropped to ``S x S``. With S = 256 the PILOT test transform
Resize(256) + CenterCrop(224) is reproduced exactly from the store; train crops are drawn inside the centre square.
The manifest is written last, so a store without one is incomplete and is never read.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cilbench.errors import CilbenchError
from cilbench.utils import atomic_write_json

STORE_SCHEMA = 1
MANIFEST = "manifest.json"


def _rebuild(root: Path, source_path: str | None = None) -> str:
    source = f" --source {source_path}" if source_path else ""
    return f"run `cilbench datasets prepare {root.name}{source} --force` to rebuild it"


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class Split:
    """One split of a prepared dataset: memory-mapped images and in-memory labels."""

    images: np.ndarray  # uint8 [N, S, S, 3], memory-mapped
    labels: np.ndarray  # int64 [N]
    domains: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)


class Store:
    """A prepared dataset on disk. ``Store.open`` verifies it; corruption ends in one clear line."""

    def __init__(self, root: Path, manifest: dict[str, Any]):
        self.root = root
        self.manifest = manifest
        self._splits: dict[str, Split] = {}

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
    def open(cls, root: str | Path, verify: bool = True) -> "Store":
        root = Path(root)
        path = root / MANIFEST
        if not path.is_file():
            raise CilbenchError(f"no prepared dataset at {root}; run `cilbench datasets prepare` first")
        try:
            manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise CilbenchError(f"corrupted store manifest {path} ({err}); {_rebuild(root)}")
        if not isinstance(manifest, dict):
            raise CilbenchError(f"corrupted store manifest {path}; {_rebuild(root)}")
        if manifest.get("schema") != STORE_SCHEMA:
            raise CilbenchError(f"store {root} has schema {manifest.get('schema')}, this cilbench reads "
                                f"{STORE_SCHEMA}; {_rebuild(root)}")
        store = cls(root, manifest)
        try:
            for meta in store.manifest["splits"].values():  # the fields every reader relies on
                int(meta["count"]), meta["files"]["images"]["file"], meta["files"]["labels"]["file"]
            store.name, store.image_size, store.class_names
            if verify:
                store.verify()
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise CilbenchError(f"corrupted store manifest {path} (bad or missing field {err}); "
                                f"{_rebuild(root)}") from None
        return store

    def _files(self, split: str) -> dict[str, Path]:
        return {kind: self.root / meta["file"] for kind, meta in self.manifest["splits"][split]["files"].items()}

    def verify(self, full: bool = False) -> None:
        """Check sizes of every file and checksums of the label files; image files are hashed with ``full`` or when
        they changed since their checksum was last confirmed (a stamp of size and mtime, written by StoreWriter)."""
        stamp_path = self.root / ".verified.json"
        try:
            stamp = json.loads(stamp_path.read_text())
        except (OSError, json.JSONDecodeError):
            stamp = {}
        new_stamp: dict[str, list[int]] = {}
        for split, meta in self.manifest["splits"].items():
            for kind, fmeta in meta["files"].items():
                f = self.root / fmeta["file"]
                hint = _rebuild(self.root, (self.manifest.get("source") or {}).get("path"))
                if not f.is_file():
                    raise CilbenchError(f"corrupted store: {f} is missing; {hint}")
                st = f.stat()
                if st.st_size != fmeta["bytes"]:
                    raise CilbenchError(f"corrupted store: {f} has {st.st_size} bytes, expected {fmeta['bytes']}; "
                                        f"{hint}")
                key = [st.st_size, st.st_mtime_ns]
                if full or kind != "images" or stamp.get(fmeta["file"]) != key:
                    if sha256_file(f) != fmeta["sha256"]:
                        raise CilbenchError(f"corrupted store: checksum of {f} does not match the manifest; {hint}")
                new_stamp[fmeta["file"]] = key
        if new_stamp != stamp:
            try:
                atomic_write_json(stamp_path, new_stamp)
            except OSError:  # a read-only cache is fine, we just verify again next time
                pass

    def split(self, name: str) -> Split:
        if name not in self._splits:
            if name not in self.manifest["splits"]:
                raise CilbenchError(f"dataset {self.name} has no split {name!r} (has {', '.join(self.split_names)})")
            meta = self.manifest["splits"][name]
            files = self._files(name)
            n, s = meta["count"], self.image_size
            if n == 0:  # an empty file cannot be memory-mapped
                images = np.zeros((0, s, s, 3), np.uint8)
            else:
                images = np.memmap(files["images"], dtype=np.uint8, mode="r", shape=(n, s, s, 3))
            labels = np.load(files["labels"])
            domains = np.load(files["domains"]) if "domains" in files else None
            self._splits[name] = Split(images, labels.astype(np.int64), domains)
        return self._splits[name]


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
        atomic_write_json(self.tmp / ".verified.json", {
            fmeta["file"]: [(st := (self.tmp / fmeta["file"]).stat()).st_size, st.st_mtime_ns]
            for meta in self.splits.values() for fmeta in meta["files"].values()})
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
