"""Feature extraction (``extract_features``), and the frozen-feature cache: each image is encoded once per
(encoder weights, code, transform, precision, data).

A method whose scores are a light head over frozen feature functions (SimpleCIL's backbone; APER's and RanPAC's
adapted backbone after their first task; zero-shot CLIP's image tower; EASE's subspaces, each the frozen ViT with
one adapter that no later task changes) declares them as ``Encoder``s (``Method.feature_encoder``). The evaluator
and ``ctx.features`` then ask this cache for the features of a ``TaskData`` instead of running the encoder:
rows encoded before under the same key are reused, only the others run. Without it, every evaluation re-encodes the
test images of every seen task, T(T+1)/2 passes over a task's test set in a T-task run (as LAMDA-PILOT does);
with it, T.

The key is a sha256 of everything the features depend on: the encoder's name, the bytes of every weight and
buffer of its modules (or of its narrower ``state``: EASE's subspace k reads adapter k only), the source files of
its modules' classes and of its function, the package versions, the transform, the arithmetic (float32 or bf16
autocast) and device type, and the store's content hash and split. The weights are hashed at every lookup (a
feature pass, an evaluation row), so even a write torch does not count (through ``.data``) makes a new key. Any
change is a new key: nothing is invalidated in place, no stale feature is read.

On disk (``<cache>/.features/<key>/``) each computation adds one ``.npz`` chunk (rows, float32 features), written
atomically; concurrent runs only ever add chunks. Chunks are read with ``allow_pickle=False`` and checked (shapes,
dtype, rows inside the store); a malformed chunk is skipped with a warning, and every chunk a run reads is named with
its sha256 in the run record (``feature_cache``), so features from a folder never enter a number without a word.
The folder is kept under ``$CILBENCH_FEATURE_CACHE_GB`` (default 20 GB) by removing the keys unused longest.

Features of reused rows are bit-identical to the ones first computed; compared with no cache, an image may be
encoded in another batch composition, which moves float32 features by rounding only.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import io
import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from cilbench.data.augment import ImageTransform
from cilbench.engine.loader import BatchStream, TaskData
from cilbench.engine.trainer import autocast
from cilbench.methods.contract import Encoder
from cilbench.utils import atomic_write_text, package_versions

DEFAULT_LIMIT_GB = 20.0


def default_limit() -> int:
    """The folder's size bound: ``$CILBENCH_FEATURE_CACHE_GB`` gigabytes (default 20)."""
    text = os.environ.get("CILBENCH_FEATURE_CACHE_GB", "")
    try:
        gb = float(text) if text else DEFAULT_LIMIT_GB
    except ValueError:
        gb = DEFAULT_LIMIT_GB
    return int(max(gb, 0.0) * 1e9)


@functools.lru_cache(maxsize=1)
def _versions() -> dict[str, str | None]:
    return package_versions(("cilbench", "torch", "timm", "open_clip_torch"))


_file_digests: dict[str, str] = {}


def _file_digest(path: str | None) -> str:
    if path is None:
        return "-"
    if path not in _file_digests:
        try:
            _file_digests[path] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        except OSError:
            _file_digests[path] = "unreadable"
    return _file_digests[path]


def _source(obj: Any) -> str | None:
    try:
        return inspect.getsourcefile(obj)
    except TypeError:
        return None


def code_digest(enc: Encoder) -> str:
    """The source files of every module class the encoder runs and of its function (a fix to a forward pass is a
    new key)."""
    files = {_source(type(m)) for module in enc.modules for m in module.modules()}
    files.add(_source(getattr(enc.fn, "__func__", enc.fn)))
    return hashlib.sha256(json.dumps(sorted((str(f), _file_digest(f)) for f in files)).encode()).hexdigest()


def weights_digest(tensors: dict[str, torch.Tensor], memo: dict | None = None) -> str:
    """sha256 over the name, dtype, shape and bytes of ``tensors`` (``Encoder.tensors()``), hashed afresh at every
    call: no version counter can be trusted to have seen a write (torch does not count writes through ``.data``).
    Tensors are hashed on a thread pool (hashlib releases the GIL): ~0.3 s of one core per ViT-B/16. ``memo``: per
    tensor storage, for encoders sharing frozen weights hashed together while nothing trains (``pinned``)."""
    memo = {} if memo is None else memo

    def one(item: tuple[str, torch.Tensor]) -> str:
        name, v = item
        v = v.detach()
        ident = (v.data_ptr(), v.dtype, tuple(v.shape), v.stride(), v.device)
        if ident not in memo:
            flat = v.reshape(-1).contiguous()
            data = flat.view(torch.uint8).cpu().numpy().tobytes() if flat.numel() else b""
            memo[ident] = hashlib.sha256(f"{v.dtype}|{tuple(v.shape)}|".encode() + data).hexdigest()
        return f"{name}:{memo[ident]}"

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return hashlib.sha256("|".join(pool.map(one, tensors.items())).encode()).hexdigest()


@dataclass
class _Entry:
    """The features of one key held in memory: ``pos[row]`` is the row's position in ``feats`` (-1: not encoded)."""

    key: str
    pos: np.ndarray
    feats: torch.Tensor | None = None


@dataclass
class CacheStats:
    encoded: int = 0  # images run through an encoder
    reused: int = 0  # features served from the cache (memory or disk)
    chunks_read: list[dict[str, Any]] = field(default_factory=list)  # disk chunks read: file, sha256, rows
    skipped: list[str] = field(default_factory=list)  # malformed chunks, with why

    def snapshot(self) -> tuple[int, int]:
        return self.encoded, self.reused


@torch.no_grad()
def extract_features(encode, data: TaskData, transform: ImageTransform, device: torch.device, batch_size: int,
                     train_transform: bool = False, low_precision: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of every image of ``data`` in order (eval transform unless ``train_transform``), float32;
    computed in float32 unless ``low_precision`` (then bf16 autocast on CUDA)."""
    feats, labels = [], []
    for raw in BatchStream(data, batch_size, device):
        with autocast(device) if low_precision else contextlib.nullcontext():
            f = encode(transform(raw.images, train=train_transform))
        feats.append(f.float())
        labels.append(raw.labels)
    if not feats:
        return torch.zeros(0, 0, device=device), torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat(feats), torch.cat(labels)


class FeatureCache:
    """Features of registered stores' rows by key; ``folder=None`` keeps them for this process only."""

    def __init__(self, folder: Path | None, device: torch.device, warn: Callable[[str], None] = lambda s: None,
                 limit_bytes: int | None = None):
        self.folder, self.device, self.warn = folder, device, warn
        self.limit_bytes = limit_bytes if limit_bytes is not None else default_limit()
        self._sources: dict[int, tuple[Any, str]] = {}
        self._entries: dict[str, _Entry] = {}
        self.stats = CacheStats()
        self._pinned: dict[int, str] = {}
        self.keys: dict[str, dict[str, Any]] = {}  # key -> what it covers, for the run record

    def register(self, images: Any, source: str) -> None:
        """Name a store split's image array (``source``: the store's content hash and split), so its rows can be
        cached; rows of arrays never registered (an exemplar memory across stores) are encoded every time."""
        self._sources[id(images)] = (images, source)

    @contextlib.contextmanager
    def pinned(self, encs: Encoder | list[Encoder]):
        """A block in which the encoders' weights do not change (one evaluation row over many datasets, one feature
        pass of several encoders): each is hashed once for the block, and tensors they share once in all."""
        encs = encs if isinstance(encs, list) else [encs]
        memo: dict = {}
        new = [enc for enc in encs if id(enc) not in self._pinned]  # an enclosing block hashed the others
        for enc in new:
            self._pinned[id(enc)] = weights_digest(enc.tensors(), memo)
        try:
            yield encs
        finally:
            for enc in new:
                self._pinned.pop(id(enc), None)

    def key(self, enc: Encoder, source: str, transform: Any, precision: str) -> str:
        weights = self._pinned.get(id(enc)) or weights_digest(enc.tensors())
        parts = dict(encoder=enc.name, weights=weights, code=code_digest(enc), versions=_versions(),
                     transform=repr(transform), precision=precision, device=self.device.type, source=source)
        key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
        self.keys.setdefault(key, {k: parts[k] for k in ("encoder", "source", "precision", "device")})
        return key

    def features(self, enc: Encoder | list[Encoder], data: TaskData, transform: Any, batch_size: int,
                 low_precision: bool = False) -> torch.Tensor:
        """float32 features [len(data), D] of ``data``'s rows under the eval transform, encoding only rows not
        cached under this key (bf16 autocast on CUDA when ``low_precision``); [len(data), S, D] for a list of S
        encoders (EASE's subspaces), each cached on its own."""
        if isinstance(enc, list):
            with self.pinned(enc):
                return torch.stack([self.features(e, data, transform, batch_size, low_precision) for e in enc], 1)
        def encode(rows: np.ndarray) -> torch.Tensor:
            self.stats.encoded += len(rows)
            return extract_features(enc, TaskData(data.images, rows, np.zeros(len(rows), dtype=np.int64)), transform,
                                    self.device, batch_size, low_precision=low_precision)[0]

        known = self._sources.get(id(data.images))  # holds the array: its id is never another's
        if known is None:
            return encode(data.indices)
        precision = "bf16-autocast" if low_precision and self.device.type == "cuda" else "float32"
        key = self.key(enc, known[1], transform, precision)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry(key, np.full(len(data.images), -1, dtype=np.int64))
            self._load(entry)
        if len(data) == 0:
            return torch.zeros(0, 0, device=self.device)
        missing = np.unique(data.indices[entry.pos[data.indices] < 0])
        if len(missing):
            new = encode(missing)
            self._add(entry, missing, new)
            self._save(entry, missing, new)
        self.stats.reused += len(data) - len(missing)
        return entry.feats[torch.from_numpy(entry.pos[data.indices]).to(entry.feats.device)]

    def _add(self, entry: _Entry, rows: np.ndarray, feats: torch.Tensor) -> None:
        start = 0 if entry.feats is None else entry.feats.shape[0]
        entry.feats = feats if entry.feats is None else torch.cat([entry.feats, feats.to(entry.feats)])
        entry.pos[rows] = np.arange(start, start + len(rows))

    def _dir(self, key: str) -> Path | None:
        return None if self.folder is None else self.folder / key[:2] / key

    def _load(self, entry: _Entry) -> None:
        folder = self._dir(entry.key)
        if folder is None or not folder.is_dir():
            return
        with contextlib.suppress(OSError):
            os.utime(folder)  # last used: eviction removes the keys unused longest
        for path in sorted(folder.glob("chunk-*.npz")):
            try:
                blob = path.read_bytes()  # parsed from these bytes: the sha256 recorded is of what was used
                with np.load(io.BytesIO(blob), allow_pickle=False) as z:
                    rows, feats = z["rows"], z["feats"]
                dim = entry.feats.shape[1] if entry.feats is not None else None
                bad = (rows.ndim != 1 or rows.dtype != np.int64 or feats.ndim != 2 or feats.dtype != np.float32
                       or len(rows) != len(feats) or len(rows) == 0 or rows.min() < 0 or rows.max() >= len(entry.pos)
                       or len(np.unique(rows)) != len(rows) or (dim is not None and feats.shape[1] != dim)
                       or not np.isfinite(feats).all())
            except (OSError, ValueError, KeyError) as err:
                bad, rows, feats = f"{type(err).__name__}", None, None
            if bad:
                self.stats.skipped.append(f"{path} ({bad if isinstance(bad, str) else 'not a feature chunk'})")
                self.warn(f"skipping {path}: not a readable feature chunk of this key; it will be recomputed")
                continue
            new = entry.pos[rows] < 0
            if new.any():
                self._add(entry, rows[new], torch.from_numpy(feats[new]).to(self.device))
            self.stats.chunks_read.append({"file": str(path), "sha256": hashlib.sha256(blob).hexdigest(),
                                           "rows": int(new.sum())})

    def _save(self, entry: _Entry, rows: np.ndarray, feats: torch.Tensor) -> None:
        folder = self._dir(entry.key)
        if folder is None:
            return
        tmp = None
        try:
            folder.mkdir(parents=True, exist_ok=True)
            described = folder / "key.json"
            if not described.exists():
                atomic_write_text(described, json.dumps(self.keys.get(entry.key, {}), indent=1, sort_keys=True))
            arrays = dict(rows=rows.astype(np.int64), feats=feats.detach().float().cpu().numpy())
            digest = hashlib.sha256(arrays["rows"].tobytes() + arrays["feats"].tobytes()).hexdigest()[:16]
            fd, tmp = tempfile.mkstemp(prefix=".chunk-", suffix=".npz.tmp", dir=folder)
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, folder / f"chunk-{digest}.npz")
            tmp = None
            os.utime(folder)
            self._evict()
        except OSError as err:  # a read-only or full cache only costs the reuse, never the run
            self.warn(f"could not write the feature cache in {folder}: {err.strerror or err}")
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)

    def _evict(self) -> None:
        """Keep the folder under ``limit_bytes``: remove whole keys, least recently used first, never one this
        run uses (a trained encoder makes a new key per run, so without a bound the folder only grows)."""
        try:
            keys = [d for d in self.folder.glob("??/*") if d.is_dir()]
            sizes = {d: sum(f.stat().st_size for f in d.iterdir() if f.is_file()) for d in keys}
            used = {d: d.stat().st_mtime for d in keys}
        except OSError:  # another run evicting at the same time: leave it to that one
            return
        total = sum(sizes.values())
        for d in sorted(keys, key=used.__getitem__):
            if total <= self.limit_bytes:
                break
            if d.name in self._entries:
                continue
            shutil.rmtree(d, ignore_errors=True)
            total -= sizes[d]

    def record(self) -> dict[str, Any]:
        """What the run record keeps: the folder, each key used, counts, and every chunk read with its sha256."""
        return {"folder": None if self.folder is None else str(self.folder), "keys": self.keys,
                "encoded_images": self.stats.encoded, "reused_images": self.stats.reused,
                "chunks_read": self.stats.chunks_read, "skipped_chunks": self.stats.skipped}
