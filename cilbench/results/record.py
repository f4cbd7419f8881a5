"""The run record: one versioned JSON file per run.

Schema (version 2)::

    schema_version, run_id, status ("complete"), kind ("cil" | "mtil"),
    method, dataset, scenario, class_order, class_order_name, increments, task_names, seed, backbone,
    profile ("full" | "quick"), comparable (false for --quick), config (the method's full config),
    config_key ("" for the method's own settings, else 8 hex digits: ``cilbench.identity``),
    overrides (the settings that differ from the method's own), config_sources,
    run (device, cache dir, weights file and its sha256, image sizes),
    data {store name: source, resolved revision, split recipe, manifest sha256} (what the run was made on),
    accuracy_matrix [T x T] percent (row = after task i, column = task j; null where not evaluated),
    test_counts [T], accuracy_per_task [A_1..A_T], metrics {A_avg, A_last, forgetting} or
    {transfer, average, last, *_per_dataset}, extra {method-specific curves},
    cost {flops_per_image (one forward of the final model, torch's flop counter; null if it could not count),
          params} (records before it have none),
    timings {tasks: [{train_s, eval_s, train_images, eval_images, train_images_per_s, eval_images_per_s,
             data_wait_fraction}], total_s},
    device, versions, git, started_at, finished_at

Loading upgrades older schema versions in ``upgrade`` so old records stay readable. Version 1 had no
``config_key`` / ``overrides`` / ``data``: a v1 record with ``--set`` overrides or a weights file gets a key of its
own (prefixed ``v1-``), so it is never grouped with a default run.

Readers get a ``RunRecord`` (``RunRecord.from_json``, ``load_record``, ``iter_records``): the upgraded, type-checked
record with every field a reader uses typed and defaulted here, once, plus ``raw`` (the whole upgraded JSON).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from cilbench.errors import CilbenchError

SCHEMA_VERSION = 2


def upgrade(record: dict[str, Any]) -> dict[str, Any]:
    """The record in the current schema; ``ValueError`` (one line) for what is no run record this cilbench reads."""
    version = record.get("schema_version")
    if version is None:
        raise ValueError("not a cilbench run record (no schema_version)")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"schema_version {version!r} is not a version this cilbench knows")
    if version > SCHEMA_VERSION:
        raise ValueError(f"record schema {version} is newer than this cilbench ({SCHEMA_VERSION}); upgrade cilbench")
    if version == 1:
        from cilbench.identity import config_key

        sources, run = record.get("config_sources"), record.get("run")
        sets = sources.get("set") if isinstance(sources, dict) else None
        sets = dict(sets) if isinstance(sets, dict) else {}
        weights = run.get("weights") if isinstance(run, dict) else None
        key = config_key(sets, weights if isinstance(weights, str) else None)
        record = {**record, "schema_version": 2, "config_key": f"v1-{key}" if key else "", "overrides": sets,
                  "data": record.get("data") if isinstance(record.get("data"), dict) else {}}
    return record


@dataclass(frozen=True)
class Skipped:
    """A ``.json`` file under a results folder that was not read as a run record, and why (one line)."""

    path: Path
    reason: str
    damaged: bool = True  # False: a JSON file that is no run record at all (notes, configs): a warning only

    def __str__(self) -> str:
        return f"skipped {self.path}: {self.reason}"


class RecordError(ValueError):
    """Why some JSON is not a readable run record (one line); ``damaged`` False for JSON that is no record at all."""

    def __init__(self, reason: str, damaged: bool = True):
        super().__init__(reason)
        self.reason, self.damaged = reason, damaged


# Fields whose presence says "this JSON object was meant to be a run record" (a damaged one, not a foreign file).
_RECORD_FIELDS = ("run_id", "method", "metrics", "accuracy_matrix", "status")
_METRIC_NAMES = ("A_avg", "A_last", "forgetting", "transfer", "average", "last")


def _what(value: Any) -> str:
    """``a list``, ``the string '12'``, ``null``: how a wrong value is named in a one-line reason."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, str):
        return f"the string {value[:20]!r}"
    names = {dict: "a mapping", list: "a list", int: "an integer", float: "a number"}
    return names.get(type(value), f"a {type(value).__name__}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _numbers(value: Any, name: str, nullable: bool = True) -> str | None:
    if not isinstance(value, list):
        return f"{name!r} is {_what(value)}, not a list"
    for i, v in enumerate(value):
        if not (_is_number(v) or (nullable and v is None)):
            return f"{name!r}[{i}] is {_what(v)}, not a number"
    return None


def record_problem(record: dict[str, Any]) -> str | None:
    """Why an (upgraded) record cannot be read as a run, in a few words; None when its fields have the types the
    readers rely on. Unknown fields are not checked: newer runners may add some."""
    for key in ("method", "dataset", "scenario"):
        if not isinstance(record.get(key), str) or not record[key]:
            return f"{key!r} is {_what(record.get(key))}, not a name"
    seed = record.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool):
        return f"'seed' is {_what(seed)}, not an integer"
    if record.get("kind") not in (None, "cil", "mtil"):
        return f"'kind' is {_what(record['kind'])}, not cil or mtil"
    for key in ("run_id", "status", "backbone", "profile", "config_key", "finished_at", "class_order_option"):
        if record.get(key) is not None and not isinstance(record[key], str):
            return f"{key!r} is {_what(record[key])}, not a string"
    for key in ("metrics", "overrides", "run", "config_sources", "views", "method_origin", "cost"):
        if record.get(key) is not None and not isinstance(record[key], dict):
            return f"{key!r} is {_what(record[key])}, not a mapping"
    weights = (record.get("run") or {}).get("weights_sha256")
    if weights is not None and not isinstance(weights, str):
        return f"'run.weights_sha256' is {_what(weights)}, not a string"
    for key, value in (record.get("metrics") or {}).items():
        if key in _METRIC_NAMES and value is not None and not _is_number(value):
            return f"metric {key!r} is {_what(value)}, not a number"
        if key.endswith("_per_dataset") and value is not None and (problem := _numbers(value, f"metrics.{key}")):
            return problem
    for key in ("flops_per_image", "params"):
        value = (record.get("cost") or {}).get(key)
        if value is not None and not _is_number(value):
            return f"'cost.{key}' is {_what(value)}, not a number"
    matrix = record.get("accuracy_matrix")
    if matrix is not None:
        if not isinstance(matrix, list) or not all(isinstance(row, list) for row in matrix):
            return "'accuracy_matrix' is not a list of rows"
        for i, row in enumerate(matrix):
            if problem := _numbers(row, f"accuracy_matrix[{i}]"):
                return problem
            if len(row) != len(matrix[0]):
                return f"'accuracy_matrix' is ragged (row {i + 1} has {len(row)} values, row 1 has {len(matrix[0])})"
    for key, nullable in (("accuracy_per_task", True), ("test_counts", False), ("increments", False)):
        if record.get(key) is not None and (problem := _numbers(record[key], key, nullable)):
            return problem
    if record.get("task_names") is not None and not isinstance(record["task_names"], list):
        return f"'task_names' is {_what(record['task_names'])}, not a list"
    return None


def _json_problem(err: json.JSONDecodeError) -> str:
    if not err.doc.strip():
        return "empty file"
    text = err.doc.strip()
    if err.pos >= len(text) or err.msg.startswith("Unterminated string") or (
            text[:1] in "{[" and text[-1:] not in "}]"):  # the text stops where more JSON was expected
        return f"truncated JSON (it stops at line {err.lineno})"
    return f"not valid JSON ({err.msg} at line {err.lineno} column {err.colno})"


def _read(path: Path) -> RunRecord:
    """The upgraded, type-checked record in ``path``, else ``RecordError`` with a one-line reason."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise RecordError(_json_problem(err))
    except UnicodeDecodeError:
        raise RecordError("not UTF-8 text")
    except OSError as err:
        raise RecordError(f"cannot read it ({err.strerror or err})")
    except RecursionError:
        raise RecordError("JSON nested too deeply")
    return RunRecord.from_json(data, path)


def _checked(data: Any) -> dict[str, Any]:
    """Parsed JSON as an upgraded, type-checked record dict, else ``RecordError`` with a one-line reason."""
    if not isinstance(data, dict):
        kinds = {list: "a JSON list", str: "a JSON string", bool: "a JSON boolean", type(None): "JSON null"}
        raise RecordError(f"{kinds.get(type(data), 'a JSON number')}, not a run record")
    version = data.get("schema_version")
    if version is None:
        if any(key in data for key in _RECORD_FIELDS):
            raise RecordError("a run record without schema_version")
        raise RecordError("not a cilbench run record (no schema_version)", damaged=False)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise RecordError(f"schema_version is {_what(version)}, not a version number")
    try:
        record = upgrade(data)
    except ValueError as err:
        raise RecordError(str(err))
    except (TypeError, AttributeError, KeyError) as err:  # an old record too damaged to upgrade
        raise RecordError(f"cannot upgrade schema {version} ({type(err).__name__}: {err})")
    problem = record_problem(record)
    if problem:
        raise RecordError(problem)
    return record


def _config_label(config_key: str, overrides: dict[str, Any], run: dict[str, Any]) -> str:
    """The readable name of a configuration: ``""`` for the method's own, else its overrides (``lambda1=0,
    lambda2=0``) and weights file; ``cfg-KEY`` when the record does not say more."""
    if not config_key:
        return ""
    from cilbench.identity import describe

    label = describe(overrides, run.get("weights_sha256"))
    if not run.get("weights_sha256") and isinstance(run.get("weights"), str):  # schema 1: a path, no hash
        label = ", ".join(p for p in (label, f"weights={Path(run['weights']).name}") if p)
    return label or f"cfg-{config_key}"


@dataclass(frozen=True)
class RunRecord:
    """One run record in the current schema, typed: what readers use, each field defaulted here for older records
    (see the module docstring for the schema); ``raw`` is the whole upgraded JSON for anything else."""

    schema_version: int
    method: str
    dataset: str
    scenario: str
    seed: int
    run_id: str = ""
    status: str | None = None  # "complete" for a finished run
    kind: str = "cil"  # "cil" | "mtil"
    backbone: str = ""
    profile: str = "full"  # "full" | "quick" (old records: from ``comparable``)
    comparable: bool = True
    config_key: str = ""  # "" for the method's own settings
    config_label: str = ""  # the readable name of config_key; "" for the method's own settings
    overrides: dict[str, Any] = field(default_factory=dict)
    class_order_option: str = ""  # a fixed published class order (--class-order); "" when seeded
    increments: list[int] = field(default_factory=list)
    task_names: list[str] = field(default_factory=list)
    accuracy_matrix: list[list[float | None]] = field(default_factory=list)  # [] when the record has none
    test_counts: list[int] | None = None
    accuracy_per_task: list[float | None] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    views: dict[str, Any] = field(default_factory=dict)
    cost: dict[str, Any] = field(default_factory=dict)  # {flops_per_image, params}; {} in older records
    finished_at: str = ""
    method_origin: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    path: Path | None = None  # the file it was read from, when it was

    upgrade = staticmethod(upgrade)

    @classmethod
    def from_json(cls, data: Any, path: str | Path | None = None) -> RunRecord:
        """Parsed JSON as a typed run record: validated, upgraded to the current schema and defaulted; else
        ``RecordError`` with a one-line reason (``damaged`` False for JSON that is no run record at all)."""
        record = _checked(data)
        run = record.get("run") or {}
        comparable = bool(record.get("comparable", True))
        return cls(
            schema_version=record["schema_version"], method=record["method"], dataset=record["dataset"],
            scenario=record["scenario"], seed=record["seed"], run_id=record.get("run_id") or "",
            status=record.get("status"), kind=record.get("kind") or "cil", backbone=record.get("backbone") or "",
            profile=record.get("profile") or ("full" if comparable else "quick"), comparable=comparable,
            config_key=record.get("config_key") or "",
            config_label=_config_label(record.get("config_key") or "", record.get("overrides") or {}, run),
            overrides=dict(record.get("overrides") or {}),
            class_order_option=record.get("class_order_option") or "",
            increments=list(record.get("increments") or []),
            task_names=[str(n) for n in record.get("task_names") or []],
            accuracy_matrix=[list(row) for row in record.get("accuracy_matrix") or []],
            test_counts=list(record["test_counts"]) if record.get("test_counts") is not None else None,
            accuracy_per_task=list(record.get("accuracy_per_task") or []),
            metrics=dict(record.get("metrics") or {}), views=dict(record.get("views") or {}),
            cost=dict(record.get("cost") or {}),
            finished_at=record.get("finished_at") or "", method_origin=dict(record.get("method_origin") or {}),
            raw=record, path=Path(path) if path is not None else None)

    @property
    def scenario_label(self) -> str:
        """The scenario as tables group it: a fixed published class order is another scenario than the seeded one
        (``B0Inc10-icarl``)."""
        return f"{self.scenario}-{self.class_order_option}" if self.class_order_option else self.scenario

    @property
    def short_task_names(self) -> list[str]:
        """Task names without their store prefix (``mtil/aircraft`` -> ``aircraft``)."""
        return [n.split("/")[-1] for n in self.task_names]

    def scores(self) -> dict[str, Any]:
        """The record's metrics; when it has none, the metrics of its accuracy matrix (``{}`` without one).
        ``ValueError`` / ``TypeError`` when the matrix cannot be scored."""
        if self.metrics or not self.accuracy_matrix:
            return dict(self.metrics)
        from cilbench import metrics as metric_fns

        return metric_fns.summary(self.kind, self.accuracy_matrix, self.test_counts)


def as_record(data: Any) -> RunRecord:
    """Parsed JSON as an upgraded, type-checked run record, else ``RecordError`` (``RunRecord.from_json``)."""
    return RunRecord.from_json(data)


def load_record(path: str | Path) -> RunRecord:
    """One run record, upgraded to the current schema; a missing, damaged or foreign file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise CilbenchError(f"no such file: {path}" if not path.exists() else f"{path} is not a file")
    try:
        return _read(path)
    except RecordError as err:
        raise CilbenchError(f"{path} is not a readable run record: {err.reason}")


def iter_records(folder: str | Path,
                 on_skip: Callable[[Skipped], None] | None = None) -> Iterator[tuple[Path, RunRecord]]:
    """Every complete run record under ``folder`` (recursively). Hidden files and folders (checkpoints, temporary
    files) are passed over; every other ``.json`` file that is not a complete, well-typed record is reported to
    ``on_skip`` (the CLI prints it as one warning line) and skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CilbenchError(f"no results folder {folder}")
    for path in sorted(folder.rglob("*.json")):
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        if path.is_dir():
            continue
        try:
            record = _read(path)
        except RecordError as err:
            if on_skip:
                on_skip(Skipped(path, err.reason, err.damaged))
            continue
        if record.status != "complete":
            if on_skip:
                on_skip(Skipped(path, f"not a complete run (status {record.status!r})"))
            continue
        yield path, record


def record_filename(method: str, dataset: str, scenario: str, seed: int, backbone: str, tag: str = "",
                    config_key: str = "") -> str:
    """``method__dataset__scenario__backbone__seedN[__cfg-KEY][__tag].json``: readable, one file per identity."""
    parts = [method, dataset, scenario, backbone, f"seed{seed}"] + ([f"cfg-{config_key}"] if config_key else []) \
        + ([tag] if tag else [])
    return "__".join(p.replace("/", "-") for p in parts) + ".json"
