"""The contract between a method and the engine: what a method may use, typed, importing nothing from ``engine/``.

A method sees the run through a ``TaskContext`` (one per task, built by the runner): the task's class ids
(``seen`` / ``old`` / ``new``), its training data, ``features`` (float32 features of any data of the run, test
transform unless ``augment``), ``fit(Phase)`` (the one training loop, for every gradient phase), ``rng`` /
``seed`` (named, reproducible sub-seeds) and ``log`` (values for the run record). Hooks return what they decide;
they never mutate the runner or the trainer.

The runner calls a method's hooks in this order, for every task::

    before_task(task)            structure only (heads, adapters); replayed on resume
    before_fit(task, ctx)        e.g. features before tuning (drift)
    train_data(task, ctx)        the data of the main phase (replay: the task's data joined with the memory's)
    aux_streams(task, ctx)       further data streams, one batch of each per step (``Batch.aux``; ``Stream``)
    param_groups(task)           what trains, at which learning rate ([]: nothing trains)
    ctx.fit(main phase)          training_step(batch) each step, after_step(step) after each optimiser step
    after_task(task, ctx)        statistics, memory updates, second phases (``ctx.fit(Phase(...))``)
    score_views / logits         evaluation (a method with a ``feature_encoder``: ``feature_logits`` of cached
                                 features, each image encoded once per state of the encoder's weights)

``training_step`` returns the loss, or a ``StepOutput(loss, terms)`` whose named terms the trainer averages per epoch
into the record's log. ``frozen_modules()`` lists modules the trainer keeps in eval mode while training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence, Union, runtime_checkable

import numpy as np
import torch
import torch.nn as nn


@dataclass(frozen=True, eq=False)
class Encoder:
    """A feature function whose output depends only on the input image and the weights and buffers of ``modules``
    (or the narrower ``state``; no other state: no task index, no mode switch kept outside the state dict). A method
    that scores through one or several (``Method.feature_encoder``) has each image encoded once per state of those
    weights (``engine.features``)."""

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    modules: tuple[nn.Module, ...]
    # the tensors the output depends on when fewer than the modules' whole state (one adapter of several: EASE)
    state: Callable[[], dict[str, torch.Tensor]] | None = None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.fn(images)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the features depend on, by name."""
        if self.state is not None:
            return self.state()
        return {f"{i}.{k}": v for i, m in enumerate(self.modules) for k, v in m.state_dict().items()}


def encode_with(encoders: Encoder | list[Encoder], images: torch.Tensor) -> torch.Tensor:
    """The features of one encoder [B, D], or of a list of S encoders stacked [B, S, D] (EASE's subspaces)."""
    if isinstance(encoders, list):
        return torch.stack([e(images) for e in encoders], 1)
    return encoders(images)


@runtime_checkable
class Data(Protocol):
    """Images of a run: rows of a prepared store and their global labels (``engine.loader.TaskData``)."""

    labels: np.ndarray

    def __len__(self) -> int: ...


@dataclass(frozen=True)
class Batch:
    """One training batch: images transformed on the device, global labels, the task, and one batch per aux stream."""

    images: torch.Tensor  # float [B, 3, H, W] (or sampled features [..., B, D] in a feature phase)
    labels: torch.Tensor  # int64 [B] global class ids
    task: Any  # the Task being trained
    aux: Mapping[str, "Batch"] = field(default_factory=dict)

    def targets(self, classes: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Positions of the labels among ``classes`` (sorted ascending): the column of each label in logits over
        ``classes``. A label outside ``classes`` is an internal error, not a silent wrong target."""
        classes = torch.as_tensor(classes, device=self.labels.device)
        pos = torch.searchsorted(classes, self.labels)
        if bool((pos >= len(classes)).any()) or not bool((classes[pos.clamp(max=len(classes) - 1)]
                                                          == self.labels).all()):
            raise ValueError("a label of the batch is not among the classes asked for")
        return pos


@dataclass
class StepOutput:
    """A step's loss and its named terms (e.g. ``{"ce": ..., "kd": ...}``), averaged per epoch into the record."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor | float] = field(default_factory=dict)


StepResult = Union[torch.Tensor, StepOutput]


@dataclass(frozen=True)
class Stream:
    """An aux stream whose images take the test transform (``augment=False``: ZSCL's reference images) or the
    training one; a plain ``Data`` in ``aux_streams`` is a ``Stream(data)`` with the training transform."""

    data: Any
    augment: bool = True


@dataclass(frozen=True)
class Reference:
    """Data a method reads beside the scenario's, declared before the run starts (``Method.references``) so a
    missing one is one line before any training, and its identity goes into the record and the resume fingerprint:
    a prepared ``store`` (read whole, its ``split``: ZSCL's ImageNet images, DDAS's TinyImageNet) or a ``captions``
    file (one caption per line, or a CSV / TSV with a ``caption`` or ``title`` column; ``builtin:tiny`` is a small
    list shipped with cilbench for tests and ``--quick``). ``ctx.reference(name)`` gives the ``Data`` or the list of
    captions. ``purpose`` and ``setting`` (the config field naming it) make the error say what to provide."""

    store: str | None = None
    split: str = "train"
    captions: str | None = None
    purpose: str = ""
    setting: str = ""


@dataclass
class Sampled:
    """Data drawn afresh every epoch (features sampled from class Gaussians): ``draw(epoch) -> (inputs, labels)``
    on the device. ``batch_dim`` is the inputs' sample dimension (e.g. -2 for one set per expert ``[K, M, D]``).
    Sampled inputs are used as they are: no image transform."""

    draw: Callable[[int], tuple[torch.Tensor, torch.Tensor]]
    batch_dim: int = 0


@dataclass
class Phase:
    """One gradient phase run by the trainer. Settings left ``None`` come from the method's config (``TrainConfig``:
    epochs / iterations, batch size, optimiser, schedule, warmup ...), so the main phase is ``Phase("train", ...)``
    with the hooks' results and a second phase names only what differs (SLCA's alignment: its own epochs, lr and
    batch size on ``Sampled`` features, a cosine per epoch)."""

    name: str
    step: Callable[[Batch], StepResult]
    params: list[dict[str, Any]]
    data: Any = None  # Data, Sampled, or None: the task's training data
    epochs: int | None = None
    iterations: int | None = None
    batch_size: int | None = None
    optimizer: str | None = None
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    schedule: str | None = None  # cosine | constant | step
    schedule_unit: str | None = None  # epoch | iteration
    warmup_epochs: float | None = None
    min_lr: float | None = None
    lr_milestones: tuple[int, ...] | None = None
    lr_gamma: float | None = None
    augment: bool = True  # the training transform on images (False: the test transform)
    aux: Mapping[str, Any] = field(default_factory=dict)  # name -> Data: one batch of each per step
    after_step: Callable[[int], None] | None = None  # called with the step index after each optimiser step
    frozen: Sequence[torch.nn.Module] = ()  # kept in eval mode while training (frozen BN, a teacher)
    seed: int | None = None  # the shuffle seed (None: the task's)
    divergence_hint: str = "lower the learning rate (--set lr=...)"


@dataclass
class PhaseStats:
    steps: int = 0
    images: int = 0
    seconds: float = 0.0
    data_wait_s: float = 0.0
    skipped_steps: int = 0
    fused_optimizer: bool = False  # the NaN guard ran on the device, through torch's fused optimiser
    final_loss: float | None = None
    epoch_terms: dict[str, list[float]] = field(default_factory=dict)  # "loss" and each named term, per epoch

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


class TaskContext(Protocol):
    """What a method may use during a task (the runner's ``RunTaskContext`` implements it)."""

    task: Any
    seen: torch.Tensor  # int64 global ids of every class seen so far, this task's included, ascending
    old: torch.Tensor  # classes of earlier tasks
    new: torch.Tensor  # this task's classes
    train: Data  # this task's training data
    device: torch.device

    def features(self, encode: Callable[[torch.Tensor], torch.Tensor] | Encoder, data: Data | None = None,
                 augment: bool = False, low_precision: bool = False) -> tuple[torch.Tensor, torch.Tensor]: ...

    def fit(self, phase: Phase) -> PhaseStats: ...

    def seed(self, purpose: str = "") -> int: ...

    def rng(self, purpose: str = "", device: torch.device | str | None = None) -> torch.Generator: ...

    def log(self, **values: Any) -> None: ...

    def reference(self, name: str) -> Any: ...


def check_log_value(key: str, value: Any) -> Any:
    """Logged values go into a JSON record: numbers, strings, booleans, None, and lists / dicts of them."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().tolist()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [check_log_value(key, v) for v in value]
    if isinstance(value, dict):
        return {str(k): check_log_value(key, v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"ctx.log({key}=...): {type(value).__name__} cannot go into a run record")
