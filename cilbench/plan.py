"""One way to build a run: ``RunPlan.build(RunOptions)`` decides, once, everything a run is before it touches data.

The method and its effective config (defaults -> dataset preset -> quick -> ``--set``), the backbone (the method's
default, swapped for its tiny random variant by ``--quick``), the weights file's sha256, the scenario (merged into
one task for the joint bound), the transform preset, the configuration's identity (``cilbench.identity``) and the
record's file name. ``run``, ``bench``, ``sweep`` and the suites' tables all build their runs through it, so they
can never disagree on what a run is.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cilbench.errors import CilbenchError

_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}", re.ASCII)


@dataclass
class RunOptions:
    """What a user asks for (the ``cilbench run`` options)."""

    method: str
    dataset: str
    scenario: str | None = None
    order: str | None = None  # MTIL order I | II
    class_order: str | None = None  # a fixed published order instead of the seeded permutation
    seed: int = 1993
    backbone: str | None = None
    weights: str | None = None
    sets: dict[str, str] = field(default_factory=dict)
    out: Path = Path("results")
    device: str = "auto"
    resume: bool = False
    quick: bool = False
    cache_dir: Path | None = None
    tag: str = ""
    shots: int | None = None  # few-shot: training images per class, drawn once (None: the dataset's own)
    joint: bool = False  # the method's own recipe on one task holding every class (its joint upper bound)
    recipe: str | None = None  # a named bundle of --set values the method declares (``Method.recipes``)
    feature_cache: bool = True  # frozen encoders' features computed once per image (``engine.features``)


@dataclass
class RunPlan:
    """Everything a run is, decided before any data or model is loaded."""

    opts: RunOptions
    method_cls: type
    method_origin: dict[str, Any]  # built-in, entry point (package, version) or plugin file (path, sha256)
    cfg: Any  # the method's Config instance
    config_sources: dict[str, Any]
    overrides: dict[str, Any]
    config_key: str
    backbone: str
    backbone_spec: Any
    weights_sha256: str | None
    scenario: Any  # data.scenario.Scenario
    transform_preset: str
    scenario_label: str
    tag: str

    @property
    def kind(self) -> str:
        return self.scenario.kind

    @property
    def record_name(self) -> str:
        from cilbench.results.record import record_filename

        o = self.opts
        return record_filename(o.method, o.dataset, self.scenario_label, o.seed, self.backbone, self.tag,
                               self.config_key)

    def config_label(self) -> str:
        from cilbench.identity import describe

        return describe(self.overrides, self.weights_sha256)

    @classmethod
    def build(cls, opts: RunOptions, hash_weights: bool = True) -> "RunPlan":
        """The plan of ``opts``; every user error (names, settings, scenario, backbone, weights) is one line."""
        from cilbench.data.augment import PRESETS
        from cilbench.data.scenario import build_scenario, check_seed
        from cilbench.identity import config_key, overrides
        from cilbench.methods import load_method
        from cilbench.methods.base import METHODS, default_backbone, resolve_config
        from cilbench.models.backbones import BACKBONES

        from cilbench.data.user_catalog import use_cache
        from cilbench.plugins import method_origin

        check_seed(opts.seed)
        use_cache(opts.cache_dir)  # user datasets live in the catalog of the cache this run reads
        if opts.tag and not _TAG.fullmatch(opts.tag):
            raise CilbenchError(f"--tag {opts.tag[:40]!r}: use 1 to 64 ASCII letters, digits, '.', '_', '+' or '-', "
                                f"starting with a letter or digit")
        method_cls = load_method(opts.method)
        meta = METHODS.metadata(opts.method)
        sets = with_recipe(method_cls, opts.method, opts.recipe, opts.sets)
        cfg, sources = resolve_config(method_cls, opts.dataset, opts.quick, sets)
        if opts.recipe:
            sources["recipe"] = opts.recipe
        backbone = opts.backbone or default_backbone(method_cls, opts.dataset)
        spec = BACKBONES.get(backbone)
        if meta.get("backbone_family") and spec.family != meta["backbone_family"]:
            raise CilbenchError(f"{opts.method} needs a {meta['backbone_family']} backbone, not {backbone}")
        if opts.quick and spec.tiny:
            backbone, spec = spec.tiny, BACKBONES.get(spec.tiny)
        weights_sha256 = _weights_sha256(opts, spec) if hash_weights else None
        scenario = build_scenario(opts.dataset, opts.scenario, opts.seed, opts.class_order, opts.order, opts.shots)
        if opts.joint:
            if method_cls.merges_tasks:
                raise CilbenchError(f"{opts.method} already trains on every class at once; drop --joint")
            if scenario.kind == "mtil":
                raise CilbenchError("--joint merges the tasks of a class-incremental scenario; the MTIL sequence "
                                    "scores each dataset apart (MoE-Adapters' upper bounds: --set independent=true)")
        if method_cls.merges_tasks or opts.joint:
            scenario = _merge_tasks(scenario, suffix="-joint" if opts.joint else "")
        if scenario.kind == "mtil" and not method_cls.zero_shot:
            raise CilbenchError(f"{opts.method} cannot score datasets it has not trained on, which the MTIL matrix "
                                f"needs for Transfer; run a CLIP method on {opts.dataset}")
        method_cls.check_plan(cfg, scenario)
        preset = cfg.transform or spec.preset
        if preset not in PRESETS:
            raise CilbenchError(f"unknown transform preset {preset!r} ({', '.join(PRESETS)})")
        found = overrides(method_cls, opts.dataset, opts.quick, sets, cfg)
        label = scenario.name + (f"-{opts.class_order}" if opts.class_order else "")
        return cls(opts, method_cls, method_origin(opts.method), cfg, sources, found,
                   config_key(found, weights_sha256), backbone, spec,
                   weights_sha256, scenario, preset, label, opts.tag or ("quick" if opts.quick else ""))


def with_recipe(method_cls, method: str, recipe: str | None, sets: dict[str, str]) -> dict[str, str]:
    """``sets`` on top of the method's named recipe (as ``--set`` text); one line for a recipe it does not have."""
    if recipe is None:
        return dict(sets)
    recipes = getattr(method_cls, "recipes", {})
    if recipe not in recipes:
        known = f"its recipes: {', '.join(recipes)}" if recipes else "it has none"
        raise CilbenchError(f"{method} has no recipe {recipe!r} ({known}; cilbench methods info {method})")
    from cilbench.identity import set_text

    return {**{k: set_text(v) for k, v in recipes[recipe].items()}, **sets}


def _weights_sha256(opts: RunOptions, spec) -> str | None:
    from cilbench.data.store import sha256_file
    from cilbench.models.backbones import is_random

    if opts.weights is None:
        return None
    if is_random(spec.name):
        why = "--quick runs a random tiny backbone" if opts.quick else f"{spec.name} is a random backbone"
        raise CilbenchError(f"--weights {opts.weights} cannot be used here: {why}; drop --weights or --quick")
    path = Path(opts.weights).expanduser()
    if not path.is_file():
        raise CilbenchError(f"no weights file {opts.weights}")
    return sha256_file(path)


def _merge_tasks(scenario, suffix: str = ""):
    """The joint upper bound: one task with every class of the scenario. ``--joint`` runs are named
    ``<scenario>-joint`` (``B50Inc10-joint``) so they never group with the method's incremental runs; the ``joint``
    method keeps the scenario's own name (it has no incremental runs)."""
    from cilbench.data.scenario import Task

    tasks = scenario.tasks
    merged = Task(0, "all classes", tasks[0].dataset, tuple(c for t in tasks for c in t.classes),
                  tuple(c for t in tasks for c in t.source_labels), tuple(n for t in tasks for n in t.class_names))
    return dataclasses.replace(scenario, tasks=[merged], name=scenario.name + suffix)
