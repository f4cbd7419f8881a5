"""The one evaluator (feature extraction and the frozen-feature cache are ``engine.features``).

Class-incremental rows score every seen class (argmax over the seen classes); MTIL rows score each dataset among
its own classes and are filled for every dataset, unseen ones included (Transfer needs them).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from cilbench.data.augment import ImageTransform
from cilbench.engine.features import FeatureCache
from cilbench.engine.loader import BatchStream, TaskData
from cilbench.engine.trainer import autocast
from cilbench.methods.contract import Encoder


EVAL_CROP_SEED = 7_919_000


@dataclass
class EvalRow:
    correct: list[int | None]
    total: list[int]
    seconds: float
    images: int
    view_correct: dict[str, list[int | None]] = field(default_factory=dict)  # the method's extra score views

    @property
    def accuracy(self) -> list[float | None]:
        return _percent(self.correct, self.total)

    def view_accuracy(self) -> dict[str, list[float | None]]:
        return {name: _percent(c, self.total) for name, c in self.view_correct.items()}


def _percent(correct: list[int | None], total: list[int]) -> list[float | None]:
    return [None if c is None else (100.0 * c / t if t else 0.0) for c, t in zip(correct, total)]


@torch.no_grad()
def evaluate_row(method, scenario, row: int, test: list[TaskData], transform: ImageTransform,
                 device: torch.device, batch_size: int, features: FeatureCache | None = None) -> EvalRow:
    """Accuracy of every evaluated column after training task ``row``. With ``features``, a method that scores
    through a ``feature_encoder`` is scored on cached features: only test images not yet encoded under the
    encoder's current weights run through it."""
    method.eval()
    start = time.perf_counter()
    n_tasks = len(scenario.tasks)
    # a method may evaluate under its training transform (the official MoE-Adapters CIL code does, as a setting);
    # its random crops are then drawn from a generator of their own, so a resumed run scores the same crops
    augment = bool(getattr(method, "eval_augment", False))
    gen = torch.Generator().manual_seed(EVAL_CROP_SEED + row) if augment else None
    enc = cached_encoder(method) if features is not None and not augment else None
    correct: dict[str, list[int | None]] = {}  # "" is the method's answer, other keys its extra views
    images = 0

    def predictions(data: TaskData, classes: torch.Tensor):
        """(rows of ``data``, labels, predicted class ids by view) per batch."""
        if enc is not None:
            feats = features.features(enc, data, transform, batch_size, low_precision=True)
            labels = torch.from_numpy(data.labels).to(device)
            for i in range(0, len(data), batch_size):
                with autocast(device):
                    scores = method.feature_logits(feats[i:i + batch_size], classes)
                yield np.arange(i, min(i + batch_size, len(data))), labels[i:i + batch_size], \
                    {"": classes[scores.float().argmax(1)]}
            return
        for raw in BatchStream(data, batch_size, device):
            yield raw.rows, raw.labels, _predict(method, transform(raw.images, train=augment, generator=gen),
                                                 classes, device)

    def count(name: str, j: int, value: int) -> None:
        correct.setdefault(name, [None] * n_tasks)
        correct[name][j] = (correct[name][j] or 0) + value

    # no training within a row: a cached encoder's weights are hashed once for all its lookups
    with features.pinned(enc) if enc is not None else contextlib.nullcontext():
        if scenario.kind == "cil":
            # one pass over the test images of all seen tasks, argmax over all seen classes
            seen = torch.tensor(scenario.seen_classes(row), device=device)
            data = TaskData.concat(test[: row + 1])
            which_task = np.concatenate([np.full(len(t), j) for j, t in enumerate(test[: row + 1])])
            if getattr(method, "eval_order", "store") == "class":
                # test images sorted by class (PILOT's test sets are built class by class): a method that chooses its
                # prompts per batch (L2P, DualPrompt) then sees batches of one or two classes, as there
                order = np.argsort(data.labels, kind="stable")
                data = TaskData(data.images, data.indices[order], data.labels[order])
                which_task = which_task[order]
            hits: dict[str, np.ndarray] = {}
            for rows, labels, preds in predictions(data, seen):
                for name, pred in preds.items():
                    hits.setdefault(name, np.zeros(len(data), dtype=bool))[rows] = (pred == labels).cpu().numpy()
                images += len(rows)
            for name, h in hits.items():
                for j in range(row + 1):
                    count(name, j, int(h[which_task == j].sum()))
        else:
            for j, task in enumerate(scenario.tasks):
                classes = torch.tensor(task.classes, device=device)
                for rows, labels, preds in predictions(test[j], classes):
                    for name, pred in preds.items():
                        count(name, j, int((pred == labels).sum()))
                    images += len(rows)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    main = correct.pop("", [None] * n_tasks)
    return EvalRow(main, [len(t) for t in test], time.perf_counter() - start, images, correct)


def cached_encoder(method) -> Encoder | None:
    """The method's ``feature_encoder`` when its evaluation is exactly ``feature_logits`` of it (no extra score
    views of its own), else None."""
    from cilbench.methods.base import Method

    enc = method.feature_encoder() if hasattr(method, "feature_encoder") else None
    if enc is None or type(method).score_views is not Method.score_views:
        return None
    return enc


def _predict(method, images: torch.Tensor, classes: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    with autocast(device):
        scores, views = method.score_views(images, classes)
    preds = {"": classes[scores.float().argmax(1)]}
    preds.update({name: classes[v.float().argmax(1)] for name, v in views.items()})
    return preds


def count_flops(fn, inference_of: torch.nn.Module | None = None) -> float:
    """Floating-point operations of one call of ``fn`` as torch's flop counter counts them (2 per multiply-add of
    matmuls, convolutions and attention; element-wise work such as norms and softmax is not counted).

    ``inference_of``: the module ``fn`` runs without gradients. Torch's module tracker (inside the counter) cannot
    hook a parameter that requires grad under ``no_grad`` (DNE passes its task tokens to modules), so the module's
    ``requires_grad`` flags are turned off for the count and restored exactly after."""
    from torch.utils.flop_counter import FlopCounterMode

    trainable = [p for p in inference_of.parameters() if p.requires_grad] if inference_of is not None else []
    try:
        for p in trainable:
            p.requires_grad_(False)
        counter = FlopCounterMode(display=False)
        with counter:
            fn()
    finally:
        for p in trainable:
            p.requires_grad_(True)
    return float(counter.get_total_flops())


@torch.no_grad()
def inference_cost(method, scenario, test: list[TaskData], transform: ImageTransform,
                   device: torch.device) -> dict:
    """What one forward of the final model costs per image: the FLOPs of ``method.logits`` on one test image (the
    first of the last task, test transform, float32, batch 1) over the candidate classes of the last row (every
    seen class; in MTIL the last dataset's), and the model's parameter count (trainable or not, the frozen
    backbone included). The DNE paper's F column; the score views of a method (oracle, single experts) are extra
    and not counted. ``flops_per_image`` is None when the counter cannot run the method (the error is kept)."""
    method.eval()
    last = len(scenario.tasks) - 1
    classes = scenario.seen_classes(last) if scenario.kind == "cil" else scenario.tasks[last].classes
    out = {"params": int(sum(p.numel() for p in method.parameters())), "flops_per_image": None,
           "counted": "torch.utils.flop_counter, method.logits, one test image, float32"}
    raw = next(iter(BatchStream(test[last], 1, device, prefetch=0)), None)
    if raw is None:
        out["error"] = "no test image"
        return out
    image = transform(raw.images, train=False)
    try:
        out["flops_per_image"] = count_flops(lambda: method.logits(image, torch.tensor(classes, device=device)),
                                             inference_of=method)
    except Exception as err:  # noqa: BLE001 - a cost the counter cannot take never costs the run its record
        out["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    return out
