"""Exemplar memory for rehearsal (iCaRL, DER, FOSTER, PODNet, DNE, DyTox): rows of the prepared store, never pixels.

The memory holds, per class, the store rows of its exemplars in **priority order** (herding order, or a random
order): cutting a class to ``m`` exemplars keeps its first ``m`` (iCaRL's ReduceExemplarSet; PyCIL
``models/base.py`` ``_reduce_exemplar``; DNE ``continual/rehearsal.py`` ``Memory.reduce``). ``as_task_data`` turns
it into a ``TaskData`` of the same store, so replay is ``TaskData.concat([task_train, memory.as_task_data(...)])``.

Budgets (exactly one):
* ``total=K``: a fixed memory of K exemplars shared by the classes seen, ``K // classes_seen`` per class (iCaRL;
  PyCIL ``fixed_memory=False``; DNE ``fixed_memory: False`` with ``memory_size: 2000``). Old classes are cut
  before the new ones are added.
* ``per_class=m``: m per class whatever the number of classes (PyCIL ``fixed_memory=True``,
  ``memory_per_class=20``). DNE's own ``fixed=True`` form, ``K // total_classes_of_the_run``, is this with
  ``m = K // num_classes``.

Selection, per new class, on that class's rows only:
* ``herding`` (Rebuffi et al., iCaRL, CVPR 2017, Alg. 4) on L2-normalised features (``x / (|x| + 1e-8)``, as both
  codes below), in one of two forms:
  - ``herding_form="pycil"`` (G-U-N/PyCIL ``models/base.py`` ``_construct_exemplar``): for k = 1..m pick
    ``argmin_x |mu - (S + x) / k|`` over the samples **not yet picked** (each pick is removed from the pool), where
    ``mu`` is the mean of the normalised features (not re-normalised) and ``S`` the sum of those picked so far.
  - ``herding_form="icarl"`` (srebuffi/iCaRL ``main_cifar_100_theano.py``, copied into DyTox and DNE
    ``continual/rehearsal.py`` ``icarl_selection``): ``w = mu``; repeat ``i = argmax_x w . x`` over **all**
    samples, ``w += mu - x_i``, until m distinct samples have been picked or 1000 iterations have run. A sample
    may be picked again; a repeat adds no exemplar (deduplicated, as that code does: only a sample's first pick
    gives its rank) but still moves ``w``. If the 1000 iterations end with fewer than m distinct picks, the
    remainder is filled with unpicked samples in index order (the reference code takes them in numpy's unstable
    argsort order of a constant, i.e. unspecified).
  With unit-norm features both forms pick ``argmax (k mu - S) . x`` at step k, so they agree until the iCaRL form
  first re-picks a sample (PROTOCOLS-2, addendum: "DNE's herding ... picks different exemplars on most inputs").
  Ties go to the lowest index (numpy's and torch's argmin / argmax). Arithmetic in float64.
* ``random``: a uniformly random order of the class's rows (``torch.randperm`` with the given generator), without
  replacement. (DNE's ``rehearsal: random`` draws with replacement, ``np.random.choice``; not reproduced.)

A class with fewer samples than its quota keeps all of them. The memory is an ``nn.Module`` of three int64
buffers (``class_ids``, ``counts``, ``rows``) so a method that owns one checkpoints it with its ``state_dict``
(tensors only); loading resizes the buffers. They stay on the CPU whatever ``.to()`` the owner is moved with:
they index a memory-mapped store.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn as nn

if TYPE_CHECKING:  # data/ does not import engine/ at run time; the TaskData is built as type(train_data)(...)
    from cilbench.engine.loader import TaskData

Selection = Literal["herding", "random"]
HerdingForm = Literal["pycil", "icarl"]

ICARL_MAX_ITERATIONS = 1000  # iCaRL / DNE: ``iter_herding_eff < 1000``


def _normalise(features: torch.Tensor) -> torch.Tensor:
    x = features.detach().to("cpu", torch.float64)
    return x / (x.norm(dim=1, keepdim=True) + 1e-8)


def herding_pycil(features: torch.Tensor, m: int) -> torch.Tensor:
    """Indices of ``min(m, n)`` rows of ``features`` [n, d] in PyCIL's herding order (picked rows leave the pool):
    step k picks ``argmin_x |mu - (S + x) / k|^2`` (S: the sum of the rows picked so far), computed as
    ``argmin |x|^2 - 2 x.(k mu - S)`` (the same order: the dropped terms do not depend on x), one matrix-vector
    product per step instead of an [n, d] temporary."""
    x = _normalise(features)
    n = x.shape[0]
    mu = x.mean(0)
    sq = (x * x).sum(1)
    available = torch.ones(n, dtype=torch.bool)
    picked_sum = torch.zeros_like(mu)
    order: list[int] = []
    for k in range(1, min(m, n) + 1):
        dist = sq - 2 * (x @ (k * mu - picked_sum))
        dist[~available] = float("inf")
        i = int(torch.argmin(dist))
        order.append(i)
        available[i] = False
        picked_sum += x[i]
    return torch.tensor(order, dtype=torch.long)


def herding_icarl(features: torch.Tensor, m: int, max_iterations: int = ICARL_MAX_ITERATIONS) -> torch.Tensor:
    """Indices of ``min(m, n)`` rows of ``features`` [n, d] in the original iCaRL / DNE herding order (a row may be
    picked again; only its first pick counts; unpicked rows fill up in index order after ``max_iterations``)."""
    x = _normalise(features)
    n = x.shape[0]
    want = min(m, n)
    mu = x.mean(0)
    w = mu.clone()
    order: list[int] = []
    seen: set[int] = set()
    iterations = 0
    while len(order) < want and iterations < max_iterations:
        i = int(torch.argmax(x @ w))
        iterations += 1
        if i not in seen:
            seen.add(i)
            order.append(i)
        w = w + mu - x[i]
    order += [i for i in range(n) if i not in seen][:want - len(order)]
    return torch.tensor(order, dtype=torch.long)


def _as_long(values, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(values) if not isinstance(values, torch.Tensor) else values)
    if t.dim() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"{name} must be a 1-D integer array")
    return t.to("cpu", torch.long)


class ExemplarMemory(nn.Module):
    """Store rows of exemplars per class, in priority order, under a fixed total or per-class budget."""

    def __init__(self, total: int | None = None, per_class: int | None = None, selection: Selection = "herding",
                 herding_form: HerdingForm = "pycil"):
        super().__init__()
        if (total is None) == (per_class is None):
            raise ValueError("give exactly one budget: total=K or per_class=m")
        if (total if total is not None else per_class) < 0:  # type: ignore[operator]
            raise ValueError("the memory budget must be non-negative")
        if selection not in ("herding", "random"):
            raise ValueError(f"unknown exemplar selection {selection!r} (herding, random)")
        if herding_form not in ("pycil", "icarl"):
            raise ValueError(f"unknown herding form {herding_form!r} (pycil, icarl)")
        self.total, self.per_class, self.selection, self.herding_form = total, per_class, selection, herding_form
        self.register_buffer("class_ids", torch.zeros(0, dtype=torch.long))  # classes in the order they were added
        self.register_buffer("counts", torch.zeros(0, dtype=torch.long))  # exemplars of each class
        self.register_buffer("rows", torch.zeros(0, dtype=torch.long))  # store rows, class by class, priority order

    # ---- reading ----
    def __len__(self) -> int:
        return int(self.counts.sum())

    @property
    def classes(self) -> torch.Tensor:
        """The classes held, in the order they were added."""
        return self.class_ids.clone()

    @property
    def labels(self) -> torch.Tensor:
        """The global label of each entry of ``rows``."""
        return torch.repeat_interleave(self.class_ids, self.counts)

    @property
    def per_class_counts(self) -> dict[int, int]:
        return dict(zip(self.class_ids.tolist(), self.counts.tolist()))

    def rows_of(self, c: int) -> torch.Tensor:
        """The rows of class ``c`` in priority order."""
        hit = (self.class_ids == c).nonzero()
        if len(hit) == 0:
            raise KeyError(f"class {c} is not in the memory")
        start = int(self.counts[: int(hit[0])].sum())
        return self.rows[start:start + int(self.counts[int(hit[0])])].clone()

    def quota(self, num_classes: int) -> int:
        """Exemplars per class when ``num_classes`` classes are held."""
        if self.per_class is not None:
            return self.per_class
        return self.total // num_classes if num_classes else self.total  # type: ignore[operator]

    def as_task_data(self, train_data: TaskData) -> TaskData:
        """The memory as rows of ``train_data``'s store (to join with a task's data through ``TaskData.concat``)."""
        rows = self.rows.numpy().astype(np.int64)
        if len(rows) and int(rows.max()) >= len(train_data.images):
            raise ValueError(f"memory row {int(rows.max())} is outside the store ({len(train_data.images)} rows)")
        return type(train_data)(train_data.images, rows, self.labels.numpy().astype(np.int64))

    def joined_with(self, train_data: TaskData) -> TaskData:
        """Replay: ``train_data`` followed by the memory's rows of its store (``train_data`` itself while empty)."""
        if len(self) == 0:
            return train_data
        return type(train_data).concat([train_data, self.as_task_data(train_data)])

    # ---- writing ----
    def reduce(self, per_class: int) -> None:
        """Cut every class to its first ``per_class`` exemplars (herding order is priority)."""
        kept = [self.rows_of(c)[:per_class] for c in self.class_ids.tolist()]
        self.counts = torch.tensor([len(k) for k in kept], dtype=torch.long)
        self.rows = torch.cat(kept) if kept else torch.zeros(0, dtype=torch.long)

    def update(self, labels, rows, features: torch.Tensor | np.ndarray | None = None, classes=None,
               generator: torch.Generator | int | None = None) -> None:
        """Add the exemplars of the new ``classes`` (default: every label not held yet, ascending) chosen among
        ``rows`` (store rows, aligned with ``labels`` and with ``features`` [N, D]); with a total budget the old
        classes are first cut to the new quota. Rows of other classes are ignored, so the replay set itself may
        be passed. ``features`` are needed for herding; ``generator`` (or an int seed) for random selection."""
        labels, rows = _as_long(labels, "labels"), _as_long(rows, "rows")
        if len(labels) != len(rows):
            raise ValueError(f"{len(labels)} labels for {len(rows)} rows")
        held = set(self.class_ids.tolist())
        new = sorted(set(labels.tolist()) - held) if classes is None else _as_long(classes, "classes").tolist()
        if held & set(new) or len(set(new)) != len(new):
            raise ValueError(f"classes {sorted(held & set(new)) or new} are already in the memory or repeated")
        if self.selection == "herding":
            if features is None or len(features) != len(rows):
                raise ValueError("herding needs one feature vector per row")
        elif generator is None:
            raise ValueError("random selection needs a torch.Generator or an int seed")
        if isinstance(generator, int):
            generator = torch.Generator().manual_seed(generator)
        members = {c: (labels == c).nonzero().flatten() for c in new}
        empty = [c for c, where in members.items() if len(where) == 0]
        if empty:  # checked before anything changes
            raise ValueError(f"classes {empty} have no rows to choose exemplars from")
        feats = torch.as_tensor(features) if features is not None else None
        m = self.quota(len(held) + len(new))
        self.reduce(m)
        picked, counts = [self.rows], [self.counts]
        for c, where in members.items():
            if self.selection == "random":
                order = torch.randperm(len(where), generator=generator)[:m]
            elif self.herding_form == "pycil":
                order = herding_pycil(feats[where.to(feats.device)], m)
            else:
                order = herding_icarl(feats[where.to(feats.device)], m)
            picked.append(rows[where[order]])
            counts.append(torch.tensor([len(order)], dtype=torch.long))
        self.class_ids = torch.cat([self.class_ids, torch.tensor(new, dtype=torch.long)])
        self.counts = torch.cat(counts)
        self.rows = torch.cat(picked)

    def update_from(self, data: TaskData, features: torch.Tensor | np.ndarray | None = None, classes=None,
                    generator: torch.Generator | int | None = None) -> None:
        """``update`` on a ``TaskData`` (its store rows and labels) with ``features`` aligned to it."""
        self.update(data.labels, data.indices, features, classes, generator)

    # ---- nn.Module plumbing ----
    def _apply(self, fn, recurse=True):
        return self  # rows index a memory-mapped store: they stay on the CPU, in int64

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for name in ("class_ids", "counts", "rows"):
            value = state_dict.get(prefix + name)
            if isinstance(value, torch.Tensor):
                if value.dim() != 1 or value.dtype != torch.long:
                    error_msgs.append(f"{prefix}{name}: expected a 1-D int64 tensor, got {value.dtype} "
                                      f"{tuple(value.shape)}")
                    return
                setattr(self, name, torch.empty(value.shape, dtype=torch.long))  # resize, then the copy fits
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        ok = len(self.class_ids) == len(self.counts) and bool((self.counts >= 0).all()) \
            and int(self.counts.sum()) == len(self.rows) and len(set(self.class_ids.tolist())) == len(self.class_ids)
        if not ok:
            error_msgs.append(f"{prefix}: inconsistent exemplar memory ({len(self.class_ids)} classes, "
                              f"{len(self.counts)} counts summing to {int(self.counts.sum())}, {len(self.rows)} rows)")

    def extra_repr(self) -> str:
        budget = f"total={self.total}" if self.total is not None else f"per_class={self.per_class}"
        form = f", {self.herding_form}" if self.selection == "herding" else ""
        return f"{budget}, {self.selection}{form}, {len(self.class_ids)} classes, {len(self)} exemplars"
