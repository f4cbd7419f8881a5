"""Batches straight from the memory-mapped store to the device, with a prefetch thread.

No image is decoded here: a batch is a gather of uint8 rows from the store (indices sorted for locality), pinned
and copied asynchronously; the transform then runs on the device. The time the consumer waits for a batch is
measured, so run records can say what fraction of training was spent waiting for data.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch


class ConcatImages:
    """Several stores' image arrays seen as one (rows numbered store after store), for data that spans stores: an
    exemplar memory over the datasets of an MTIL sequence. The stores must share one image size."""

    def __init__(self, parts: list[np.ndarray]):
        flat: list[np.ndarray] = []
        for p in parts:
            flat.extend(p.parts if isinstance(p, ConcatImages) else [p])
        if len({p.shape[1:] for p in flat}) > 1:
            raise ValueError("cannot join stores of different image sizes "
                             f"({', '.join(sorted({str(p.shape[1]) for p in flat}))} px) into one stream")
        self.parts = flat
        self.offsets = np.cumsum([0] + [len(p) for p in flat])
        self.shape = (int(self.offsets[-1]),) + tuple(flat[0].shape[1:])
        self.dtype = flat[0].dtype

    def __len__(self) -> int:
        return self.shape[0]

    def offset_of(self, part: np.ndarray) -> int:
        return int(self.offsets[next(i for i, p in enumerate(self.parts) if p is part)])

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows)
        which = np.searchsorted(self.offsets, rows, side="right") - 1
        out = np.empty((len(rows),) + self.shape[1:], dtype=self.dtype)
        for k in np.unique(which):
            mask = which == k
            out[mask] = self.parts[k][rows[mask] - self.offsets[k]]
        return out


@dataclass
class TaskData:
    """The images of one task and split: rows of a store plus their labels in the scenario's global ids."""

    images: np.ndarray  # uint8 [N_store, S, S, 3] (memory-mapped)
    indices: np.ndarray  # int64 rows of ``images`` in this subset
    labels: np.ndarray  # int64 global class ids, aligned with ``indices``

    def __len__(self) -> int:
        return len(self.indices)

    def subset(self, mask: np.ndarray) -> "TaskData":
        return TaskData(self.images, self.indices[mask], self.labels[mask])

    @staticmethod
    def concat(parts: list["TaskData"]) -> "TaskData":
        """One ``TaskData`` of the rows of ``parts`` in order; parts of different stores (of one image size) are
        joined through ``ConcatImages``."""
        if all(p.images is parts[0].images for p in parts):
            return TaskData(parts[0].images, np.concatenate([p.indices for p in parts]),
                            np.concatenate([p.labels for p in parts]))
        stores: list[np.ndarray] = []
        for p in parts:
            for arr in (p.images.parts if isinstance(p.images, ConcatImages) else [p.images]):
                if not any(arr is s for s in stores):
                    stores.append(arr)
        joined = ConcatImages(stores)

        def rows(p: "TaskData") -> np.ndarray:
            if isinstance(p.images, ConcatImages):  # re-number each of its rows into the joined numbering
                which = np.searchsorted(p.images.offsets, p.indices, side="right") - 1
                base = np.array([joined.offset_of(a) - int(o) for a, o in zip(p.images.parts, p.images.offsets)])
                return p.indices + base[which]
            return p.indices + joined.offset_of(p.images)

        return TaskData(joined, np.concatenate([rows(p) for p in parts]), np.concatenate([p.labels for p in parts]))


def gather(images: np.ndarray, rows: np.ndarray) -> torch.Tensor:
    """uint8 ``[B, S, S, 3]`` of store ``rows``, read in store order (sequential reads), returned in the order asked."""
    sort = np.argsort(rows, kind="stable")
    out = np.empty((len(rows),) + tuple(images.shape[1:]), dtype=np.uint8)
    out[sort] = images[rows[sort]]
    return torch.from_numpy(out)


@dataclass
class RawBatch:
    images: torch.Tensor  # uint8 [B, S, S, 3] on the device
    labels: torch.Tensor  # int64 [B] on the device
    rows: np.ndarray  # positions of this batch within the TaskData (for feature caching)


class BatchStream:
    """Iterates a ``TaskData`` in batches; ``shuffle`` uses a generator seeded by the caller (resumable)."""

    def __init__(self, data: TaskData, batch_size: int, device: torch.device, shuffle: bool = False,
                 seed: int | tuple[int, ...] = 0, drop_last: bool = False, prefetch: int = 3):
        self.data, self.batch_size, self.device = data, batch_size, device
        self.shuffle, self.seed, self.drop_last, self.prefetch = shuffle, seed, drop_last, prefetch
        self.wait_s = 0.0
        self.images_seen = 0

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _order(self) -> np.ndarray:
        n = len(self.data)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng(self.seed).permutation(n)

    def _load(self, rows: np.ndarray) -> RawBatch:
        images = gather(self.data.images, self.data.indices[rows])
        labels = torch.from_numpy(self.data.labels[rows])
        if self.device.type == "cuda":
            images, labels = images.pin_memory(), labels.pin_memory()
        return RawBatch(images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True), rows)

    def __iter__(self) -> Iterator[RawBatch]:
        order = self._order()
        chunks = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.drop_last and chunks and len(chunks[-1]) < self.batch_size:
            chunks = chunks[:-1]
        if self.prefetch <= 0 or len(chunks) <= 1:
            for rows in chunks:
                t0 = time.perf_counter()
                batch = self._load(rows)
                self.wait_s += time.perf_counter() - t0
                self.images_seen += len(rows)
                yield batch
            return
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def worker() -> None:
            try:
                for rows in chunks:
                    if stop.is_set():
                        return
                    q.put(self._load(rows))
                q.put(None)
            except BaseException as err:  # surfaced in the consumer
                q.put(err)

        thread = threading.Thread(target=worker, daemon=True)
        thread.start()
        try:
            while True:
                t0 = time.perf_counter()
                item = q.get()
                self.wait_s += time.perf_counter() - t0
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                self.images_seen += len(item.labels)
                yield item
        finally:
            stop.set()
            while thread.is_alive():
                try:
                    q.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.05)
