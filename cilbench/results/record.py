"""The run record: one versioned JSON file per run.

Schema (version 1)::

    schema_version, run_id, status ("complete"), kind ("cil" | "mtil"),
    method, dataset, scenario, class_order, class_order_name, increments, task_names, seed, backbone,
    profile ("full" | "quick"), comparable (false for --quick), config (the method's full config),
    run (device, batch sizes, cache dir and other runner settings),
    accuracy_matrix [T x T] percent (row = after task i, column = task j; null where not evaluated),
    test_counts [T], accuracy_per_task [A_1..A_T], metrics {A_avg, A_last, forgetting} or
    {transfer, average, last, *_per_dataset}, extra {method-specific curves},
    timings {tasks: [{train_s, eval_s, train_images, eval_images, train_images_per_s, eval_images_per_s,
             data_wait_fraction}], total_s},
    device, versions, git, started_at, finished_at

Loading upgrades older schema versions in ``upgrade`` so old records stay readable.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from cilbench.errors import CilbenchError

SCHEMA_VERSION = 1


def upgrade(record: dict[str, Any]) -> dict[str, Any]:
    version = record.get("schema_version")
    if version is None:
        raise ValueError("not a cilbench run record (no schema_version)")
    if version > SCHEMA_VERSION:
        raise ValueError(f"record schema {version} is newer than this cilbench ({SCHEMA_VERSION}); upgrade cilbench")
    return record


def load_record(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        return upgrade(json.loads(path.read_text()))
    except FileNotFoundError:
        raise CilbenchError(f"no such file: {path}")
    except (json.JSONDecodeError, ValueError, UnicodeDecodeError) as err:
        raise CilbenchError(f"{path} is not a readable run record: {err}")


def iter_records(folder: str | Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every complete run record under ``folder`` (recursively), skipping checkpoints and foreign JSON."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CilbenchError(f"no results folder {folder}")
    for path in sorted(folder.rglob("*.json")):
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        try:
            record = upgrade(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError, ValueError, UnicodeDecodeError):
            continue
        if record.get("status") == "complete":
            yield path, record


def record_filename(method: str, dataset: str, scenario: str, seed: int, backbone: str, tag: str = "") -> str:
    parts = [method, dataset, scenario, backbone, f"seed{seed}"] + ([tag] if tag else [])
    return "__".join(p.replace("/", "-") for p in parts) + ".json"
