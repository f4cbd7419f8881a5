"""A run's identity: what makes two run records the same experiment.

Two runs are the same experiment when method, dataset, scenario (with a fixed class order, if any), backbone, seed,
profile and the *effective configuration* agree. The effective configuration is summarised by ``config_key``: empty
for the method's own settings on that dataset (the paper's defaults, the dataset preset and, for ``--quick``, the
quick profile), else a short hash of the settings that differ from them (``overrides``) and of the weights file's
sha256. Record file names, the sweep's "already done" test, table groups and ``check`` all use it, so an ablation
never overwrites, skips or averages with the default run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

KEY_LENGTH = 8


def overrides(method_cls: type, dataset: str, quick: bool, sets: dict[str, str], cfg: Any = None) -> dict[str, Any]:
    """The settings of the effective config (``cfg``, resolved here when not given) that differ from the method's
    own for ``dataset`` and the profile (``--set`` values equal to the default drop out, so ``--set lr=0.01`` on a
    default of 0.01 is the default run)."""
    from cilbench.methods.base import resolve_config

    base = dataclasses.asdict(resolve_config(method_cls, dataset, quick, {})[0])
    effective = dataclasses.asdict(cfg if cfg is not None else resolve_config(method_cls, dataset, quick, sets)[0])
    return {k: v for k, v in effective.items() if base.get(k) != v}


def set_text(value: Any) -> str:
    """A setting's value as ``--set`` text, as suites and recipes pass them: lists comma-separated."""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def config_key(overrides: dict[str, Any], weights_sha256: str | None = None) -> str:
    """``""`` for the default configuration with hub weights, else 8 hex digits naming overrides + weights."""
    if not overrides and not weights_sha256:
        return ""
    blob = json.dumps({"overrides": _plain(overrides), "weights_sha256": weights_sha256}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:KEY_LENGTH]


def expected_config_key(method: str, dataset: str, quick: bool, sets: dict[str, str],
                        weights_sha256: str | None = None) -> str:
    """The ``config_key`` a run of ``method`` on ``dataset`` with ``--set`` ``sets`` will record (suites' tables):
    the run's own plan (``RunPlan.build``) decides it, so a table can never disagree with the run."""
    from cilbench.plan import RunOptions, RunPlan

    plan = RunPlan.build(RunOptions(method, dataset, sets=dict(sets), quick=quick), hash_weights=False)
    return config_key(plan.overrides, weights_sha256)


def describe(overrides: dict[str, Any], weights_sha256: str | None = None) -> str:
    """A readable label of a configuration: ``lambda1=0, lambda2=0`` (``weights=ab12cd34`` for a local file)."""
    parts = [f"{k}={_short(v)}" for k, v in sorted(overrides.items())]
    if weights_sha256:
        parts.append(f"weights={weights_sha256[:KEY_LENGTH]}")
    return ", ".join(parts)


def _short(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(_short(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _plain(value: Any) -> Any:
    """JSON-stable form: tuples as lists (a config's tuple and a record's list hash alike)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
