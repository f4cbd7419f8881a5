"""The method base: named hooks on one shared loop, a typed config with the paper's defaults and presets.

A method says only what is particular to it: which parameters train (``param_groups``), its loss
(``training_step``), what happens around a task (``before_task`` grows structure, ``after_task`` computes
statistics), and how it scores candidate classes (``logits``). The trainer, evaluator, feature extraction,
checkpoints and records are shared (``cilbench.engine``).

Config resolution, later wins: the Config dataclass defaults (the paper's) -> ``presets[dataset]`` ->
``quick`` (the smoke profile) -> the user's ``--set key=value``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn

from cilbench.errors import CilbenchError
from cilbench.methods.contract import Batch, Data, Encoder, StepResult, TaskContext, encode_with  # noqa: F401
from cilbench.registry import Registry


@dataclass
class TrainConfig:
    """Fields every method has; the trainer reads them. Methods subclass this with their paper's defaults."""

    epochs: int = 10  # epochs per task (ignored when ``iterations`` is set)
    first_epochs: int | None = None  # epochs of the first task when it differs (CICAE: 20 then 10)
    iterations: int | None = None  # optimiser steps per task instead of epochs (MoE-Adapters: 1000)
    batch_size: int = 64
    eval_batch_size: int = 256
    optimizer: str = "sgd"  # sgd | adamw | adam
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    first_weight_decay: float | None = None  # weight decay of the first task when it differs (PILOT finetune)
    schedule: str = "cosine"  # cosine | constant | step
    # when the lr moves: once per epoch from the epoch index (torch schedulers stepped per epoch, as PILOT and the
    # official PTM-CIL codes) or every iteration; runs counted in ``iterations`` always anneal per iteration
    schedule_unit: str = "epoch"  # epoch | iteration
    lr_milestones: tuple[int, ...] = ()  # schedule="step": epochs after which the lr is multiplied by lr_gamma
    lr_gamma: float = 0.1
    warmup_epochs: float = 0.0
    warmup_iterations: int = 0
    min_lr: float = 0.0
    label_smoothing: float = 0.0
    transform: str | None = None  # augmentation preset (pilot | clip); None: the backbone's protocol

    # What values a setting may take, checked for every run (``validate_config``). Subclasses extend these with
    # ``LIMITS = {**Parent.LIMITS, ...}``. Numbers must be finite and >= 0 unless named in SIGNED or LIMITS.
    LIMITS: ClassVar[dict[str, tuple[float | None, float | None]]] = {
        "batch_size": (1, None), "eval_batch_size": (1, None), "iterations": (1, None), "first_epochs": (0, None),
        "momentum": (0, 1), "lr_gamma": (0, None), "label_smoothing": (0, 1)}
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "optimizer": ("sgd", "adamw", "adam"), "schedule": ("cosine", "constant", "step", "quarter-cosine"),
        "schedule_unit": ("epoch", "iteration")}
    SIGNED: ClassVar[frozenset[str]] = frozenset()
    # string settings that name something outside the method (a prepared store, a file): no fixed choices; each is
    # checked where it is used (a missing store or file is one line before training)
    FREE_TEXT: ClassVar[frozenset[str]] = frozenset()


# the TrainConfig fields only gradient training reads: a method that never trains lists them as unused
# (``Method.unused_settings``), so ``cilbench methods info`` hides them and ``--set`` refuses them
TRAINING_SETTINGS: tuple[str, ...] = (
    "epochs", "first_epochs", "iterations", "batch_size", "optimizer", "lr", "momentum", "weight_decay",
    "first_weight_decay", "schedule", "schedule_unit", "lr_milestones", "lr_gamma", "warmup_epochs",
    "warmup_iterations", "min_lr", "label_smoothing")


@dataclass
class AdapterConfig(TrainConfig):
    """TrainConfig plus the shape of the AdaptFormer adapters (``cilbench.models.adapter``), for adapter methods."""

    bottleneck: int = 64
    adapter_scale: float = 0.1
    adapter_dropout: float = 0.1

    def adapted_vit(self, backbone, num_experts: int):
        """K adapter experts of this shape installed in ``backbone``."""
        from cilbench.models.adapter import AdaptedViT

        return AdaptedViT(backbone, num_experts, self.bottleneck, self.adapter_scale, self.adapter_dropout)


class Method(nn.Module):
    Config: ClassVar[type] = TrainConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    # named bundles of settings (an official repository's recipe where the default is another code's): ``--recipe
    # NAME`` passes them as ``--set`` values (the user's own ``--set`` win), so they show in the run's overrides
    recipes: ClassVar[dict[str, dict[str, Any]]] = {}
    # the backbone of a dataset whose protocol names another than the method's registered one (the DNE paper's
    # from-scratch baselines: ResNet18 / a 224-px ViT on ImageNet100); ``--backbone`` still wins
    dataset_backbones: ClassVar[dict[str, str]] = {}
    quick: ClassVar[dict[str, Any]] = {}
    unused_settings: ClassVar[tuple[str, ...]] = ()  # TrainConfig fields this method never reads
    merges_tasks: ClassVar[bool] = False  # train on all classes as one task (the joint upper bound)
    zero_shot: ClassVar[bool] = False  # can score classes it was never trained on (needed by MTIL Transfer)
    checkpoint_excludes: ClassVar[tuple[str, ...]] = ()  # state-dict prefixes that never change (frozen backbone)
    checkpoint_includes: ClassVar[tuple[str, ...]] = ()  # substrings kept even under an excluded prefix (adapters)

    def __init__(self, cfg: TrainConfig, backbone: nn.Module, scenario: Any):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.scenario = scenario

    @classmethod
    def check_plan(cls, cfg: TrainConfig, scenario: Any) -> None:
        """Refuse, in one line, a configuration that does not fit the scenario, before any data or model loads."""

    @classmethod
    def references(cls, cfg: TrainConfig, scenario: Any) -> dict[str, Any]:
        """Data the method reads beside the scenario's, as ``methods.contract.Reference``s by name (ZSCL's
        reference images and captions); the runner opens them before any training and ``ctx.reference(name)``
        gives them."""
        return {}

    # ---- hooks, in the order the runner calls them (methods.contract has the whole list) ----
    def before_task(self, task) -> None:
        """Grow structure for ``task`` (heads, adapters). Structural only: it is replayed on resume."""

    def before_fit(self, task, ctx: TaskContext) -> None:
        """Just before training on ``task``: e.g. features before tuning for semantic-drift estimation. Not
        replayed on resume (a checkpoint falls between tasks)."""

    def train_data(self, task, ctx: TaskContext) -> Data:
        """The data of the main phase: the task's own by default; replay joins it with the memory's."""
        return ctx.train

    def aux_streams(self, task, ctx: TaskContext) -> dict[str, Data]:
        """Further data streams, one batch of each per step in ``Batch.aux`` (ZSCL's reference images)."""
        return {}

    def param_groups(self, task) -> list[dict[str, Any]]:
        """Optimiser parameter groups for this task, each ``dict(params=..., lr=...)``; [] means no training."""
        return []

    def frozen_modules(self) -> list[nn.Module]:
        """Modules the trainer keeps in eval mode while training (frozen batch norm, a teacher)."""
        return []

    def training_step(self, batch: Batch) -> StepResult:
        """The loss of one batch, or ``StepOutput(loss, terms)`` with named terms for the record."""
        raise NotImplementedError(f"{type(self).__name__} trains but has no training_step")

    def after_step(self, step: int) -> None:
        """After each optimiser step of the main phase (weight averaging)."""

    def after_task(self, task, ctx: TaskContext) -> None:
        """After training on ``task``: statistics, prototypes, memory, second phases (``ctx.fit``)."""

    def logits(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Scores [B, len(classes)] of the candidate global class ids ``classes``; by default ``feature_logits`` of
        the ``feature_encoder``'s features."""
        enc = self.feature_encoder()
        if enc is None:
            raise NotImplementedError(f"{type(self).__name__} has neither logits nor a feature_encoder")
        return self.feature_logits(encode_with(enc, images), classes)

    def feature_encoder(self) -> Encoder | list[Encoder] | None:
        """The frozen feature function the scores are a head over (``contract.Encoder``; a list of S of them gives
        features [B, S, D]), when there is one now: the evaluator then scores ``feature_logits`` of cached features
        (each test image encoded once per state of the encoder's weights) and ``ctx.features(encoder)`` reuses
        them. None: every evaluation runs ``logits``."""
        return None

    def feature_logits(self, feats: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Scores of the candidate classes from ``feature_encoder`` features (float32)."""
        raise NotImplementedError

    def score_views(self, images: torch.Tensor, classes: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The scores the run is judged on, plus named extra views evaluated alongside (e.g. each single expert of
        CICAE); the record holds an accuracy matrix per view."""
        return self.logits(images, classes), {}

    # ---- helpers ----
    def epochs_for(self, task) -> int:
        if task.index == 0 and self.cfg.first_epochs is not None:
            return self.cfg.first_epochs
        return self.cfg.epochs

    def _excluded(self, key: str) -> bool:
        return key.startswith(self.checkpoint_excludes) and not any(s in key for s in self.checkpoint_includes)

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        state = self.state_dict()
        return {k: v for k, v in state.items() if not self._excluded(k)}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not self._excluded(k)]
        if missing or unexpected:
            raise CilbenchError(f"checkpoint does not fit {type(self).__name__}: missing {missing[:3]}, "
                                f"unexpected {unexpected[:3]}; run again without --resume")


METHODS: Registry[type[Method]] = Registry("method")


def register_method(name: str, **metadata: Any):
    """Decorator: ``@register_method("simplecil", paper=..., family=..., backbone=...)``."""

    def wrap(cls: type[Method]) -> type[Method]:
        cls.name = name  # type: ignore[attr-defined]
        METHODS.register(name, cls, **metadata)
        return cls

    return wrap


# ---- config resolution ----

def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(key: str, text: str, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, text, inner[0])
    try:
        if tp is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
        if origin in (tuple, list):
            item = args[0] if args else str
            vals = [_coerce(key, t.strip(), item) for t in text.strip("()[]").split(",") if t.strip()]
            return tuple(vals) if origin is tuple else vals
        return text
    except ValueError:
        raise CilbenchError(f"--set {key}={text}: expected {getattr(tp, '__name__', tp)}") from None


def parse_sets(pairs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise CilbenchError(f"--set expects key=value, got {pair!r}")
        out[key.strip()] = value.strip()
    return out


def default_backbone(cls: type[Method], dataset: str) -> str:
    """The backbone a run of ``cls`` on ``dataset`` uses without ``--backbone``: the dataset's own
    (``dataset_backbones``), else the method's registered one."""
    return cls.dataset_backbones.get(dataset) or METHODS.metadata(cls.name).get("backbone", "vit-b16-in21k")


def resolve_config(cls: type[Method], dataset: str, quick: bool, sets: dict[str, str]) -> tuple[TrainConfig, dict]:
    """The method's config for this run and a description of where each override came from."""
    types_ = _field_types(cls.Config)
    values: dict[str, Any] = {}
    preset = dict(cls.presets.get(dataset, {}))
    values.update(preset)
    if quick:
        values.update(cls.quick)
    for key, text in sets.items():
        if key not in types_:
            close = difflib.get_close_matches(key, list(types_), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise CilbenchError(f"method {cls.name} has no setting {key!r}{hint}")
        if key in cls.unused_settings:
            raise CilbenchError(f"--set {key}: {cls.name} does not use {key!r} (cilbench methods info {cls.name} "
                                f"lists its settings)")
        values[key] = _coerce(key, text, types_[key])
    cfg = cls.Config(**values)
    validate_config(cfg, set(sets))
    return cfg, {"preset": preset, "quick": dict(cls.quick) if quick else {}, "set": dict(sets)}


def validate_config(cfg: TrainConfig, from_user: set[str] = frozenset()) -> None:
    """Refuse, in one line, a setting outside what it may take: numbers finite and within ``LIMITS`` (>= 0 unless
    ``SIGNED``), strings among ``CHOICES``. Settings the user passed are named as ``--set key=value``."""
    limits, choices, signed = type(cfg).LIMITS, type(cfg).CHOICES, type(cfg).SIGNED
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        where = f"--set {f.name}={_show(value)}" if f.name in from_user else f"setting {f.name}={_show(value)}"
        if f.name in choices and value is not None and value not in choices[f.name]:
            raise CilbenchError(f"{where}: must be one of {', '.join(choices[f.name])}")
        items = value if isinstance(value, (tuple, list)) else (value,)
        for v in items:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if not math.isfinite(v):
                raise CilbenchError(f"{where}: must be a finite number")
            low, high = limits.get(f.name, (None, None) if f.name in signed else (0, None))
            if low is not None and v < low:
                raise CilbenchError(f"{where}: must be at least {low:g}")
            if high is not None and v > high:
                raise CilbenchError(f"{where}: must be at most {high:g}")


def _show(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return str(value)


def config_defaults(cls: type[Method]) -> dict[str, Any]:
    return dataclasses.asdict(cls.Config())
