"""Class-balanced finetuning on the exemplar memory: one shared helper for the methods that retrain (part of) their
model on a class-balanced set after each task (DER now, DNE later).

Sources:
* DER (Yan et al., CVPR 2021, the classifier-learning stage; official code Rhyssiyan/DER-ClassIL.pytorch
  ``_after_task``): after each task from the second, the classifier is re-initialised and retrained alone on a
  class-balanced set ("balanced finetuning", the ``decouple`` block of the configs: 30 epochs, lr 0.1 divided by
  10 after epoch 15, weight decay 5e-4, softmax temperature 5). The official loader undersamples the task's data
  joined with the memory to a balanced set (``mode="balanced_train"``); here the set is drawn from the updated
  memory, which holds the same number of exemplars per class as that undersampling keeps.
* DNE (Hu et al., CVPR 2023; BinahHu/DNE ``continual/engine.py``, ``options/model/cifar_dne.yaml``; PROTOCOLS-2
  §4.2): after each incremental task, once the memory is updated, 20 epochs on the memory itself at lr 5e-5 scaled
  by batch / 512 (``scaled_lr``).

Balancing rule. A memory under a ``total`` budget already holds ``total // classes`` per class. When classes hold
unequal counts (a class with fewer images than the quota) every class is cut to the smallest count (or to
``per_class`` when that is smaller), keeping each class's *first* rows in the data's order: in a memory that is
the herding priority order, as ``ExemplarMemory.reduce`` cuts. Deterministic, so a resumed run draws the same set.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from cilbench.methods.contract import Batch, Data, Phase, StepResult


def balanced_counts(labels) -> dict[int, int]:
    """Rows per class of ``labels``."""
    classes, counts = np.unique(np.asarray(labels), return_counts=True)
    return dict(zip(classes.tolist(), counts.tolist()))


def balanced_subset(data: Data, per_class: int | None = None) -> Data:
    """The rows of ``data`` (a ``TaskData``) with every class cut to the same count: the smallest class count, or
    ``per_class`` if smaller; each class keeps its first rows in ``data``'s order."""
    labels = np.asarray(data.labels)
    if len(labels) == 0:
        return data
    counts = balanced_counts(labels)
    keep = min(counts.values()) if per_class is None else min(per_class, *counts.values())
    if keep < 0:
        raise ValueError("per_class must be non-negative")
    mask = np.zeros(len(labels), dtype=bool)
    for c in counts:
        mask[np.flatnonzero(labels == c)[:keep]] = True
    return data.subset(mask)


def scaled_lr(lr: float, batch_size: int, reference: int = 512) -> float:
    """DNE / DyTox's linear scaling rule: ``lr * batch_size / reference`` (PROTOCOLS-2 §4.2)."""
    return lr * batch_size / reference


def balanced_phase(name: str, step: Callable[[Batch], StepResult], params: list[dict[str, Any]], memory_data: Data,
                   epochs: int, lr: float, batch_size: int | None = None, per_class: int | None = None,
                   **settings: Any) -> Phase:
    """A ``Phase`` that trains ``params`` with ``step`` on a class-balanced set drawn from ``memory_data``
    (``balanced_subset``) for ``epochs`` at ``lr``. Further ``Phase`` settings (``weight_decay``, ``schedule``,
    ``lr_milestones``, ``lr_gamma``, ``optimizer``, ``momentum``, ``frozen``, ``augment`` ...) pass through; those
    left out fall back to the method's config, as for every phase."""
    return Phase(name, step, params, data=balanced_subset(memory_data, per_class), epochs=epochs, lr=lr,
                 batch_size=batch_size, **settings)
