"""Benchmark suites: one YAML file per paper table (``benchmarks/suites/NAME.yaml``), and the sweep that runs them.

A suite names the paper table it rebuilds and lays it out in the paper's order::

    title: "MOS (AAAI 2025) Table 1: exemplar-free CIL, ViT-B/16 IN21k"
    paper: mos                  # the reference store's paper key
    table: "1"                  # and table: paper numbers are looked up by (paper, table, row label, column)
    backbone: vit-b16-in21k     # runs use it (default: each method's own)
    seeds: [1993]
    metrics: [A_avg, A_last]    # default for every column (default: the kind's headline metrics)
    columns:                    # the paper's column order
      - {dataset: cifar100, scenario: B0Inc5, label: CIFAR}
    rows:                       # the paper's row order; label = the row label as printed
      - {label: L2P}                                   # paper number only
      - {label: SimpleCIL, method: simplecil}          # also our runs, which sweep makes
      - {label: CICAE, method: cicae, sets: {lambda1: 25}, datasets: [imagenet-a]}

``datasets`` limits a row's runs to some columns, ``sweep: false`` shows a method's runs without making them.
``joint: true`` runs the row's method as its joint upper bound (``cilbench run --joint``: its own recipe on one task
holding every class). ``joint_row: LABEL`` names the row whose last accuracy the metric ``D`` is measured from (the
DNE paper's D = joint LA - LA, each row against the joint of its own backbone family).
``cilbench sweep NAME`` runs every (row with a method) x column x seed whose record is missing, one after another
(the local executor), and ``cilbench table --benchmark NAME`` lays the table out with the paper's numbers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml
from rich.markup import escape

from cilbench.errors import CilbenchError
from cilbench.identity import set_text

SUITE_KEYS = {"title", "paper", "table", "backbone", "seeds", "metrics", "columns", "rows", "notes", "blocks"}
ROW_KEYS = {"label", "method", "sets", "datasets", "sweep", "backbone", "joint", "joint_row"}
COLUMN_KEYS = {"dataset", "scenario", "label", "metrics", "order", "key", "class_order"}
BLOCK_KEYS = {"label", "metric", "rows"}


@dataclass(frozen=True)
class SuiteColumn:
    dataset: str
    scenario: str
    label: str
    metrics: tuple[str, ...] | None = None
    order: str | None = None  # MTIL order (I | II) for runs
    key: str | None = None  # in a suite with blocks: the block's metric is "<metric>_<key>" ("<metric>" if None)
    class_order: str | None = None  # a fixed published class order (cifar100-icarl, ...) instead of the seeded one


@dataclass(frozen=True)
class SuiteBlock:
    """A block of rows under one metric, as MTIL tables print Transfer, Average and Last one under another."""

    label: str
    metric: str
    rows: tuple[str, ...]  # row labels, in the block's order

    def metric_for(self, column: SuiteColumn) -> str:
        return f"{self.metric}_{column.key}" if column.key else self.metric


@dataclass(frozen=True)
class SuiteRow:
    label: str
    method: str | None = None
    sets: dict[str, Any] = field(default_factory=dict)
    datasets: tuple[str, ...] | None = None
    sweep: bool = True
    backbone: str | None = None
    joint: bool = False  # run the method as its joint upper bound (one task with every class)
    joint_row: str | None = None  # the row D is measured from (D = its A_last - this row's)


@dataclass
class Suite:
    name: str
    path: Path
    title: str
    paper: str
    table: str
    columns: list[SuiteColumn]
    rows: list[SuiteRow]
    seeds: tuple[int, ...] = (1993,)
    backbone: str | None = None
    metrics: tuple[str, ...] | None = None
    notes: str = ""
    blocks: list[SuiteBlock] = field(default_factory=list)

    def runs(self) -> list[tuple[SuiteRow, SuiteColumn, int]]:
        """Every (row, column, seed) our runs fill, in table order; columns of one (dataset, scenario) share runs."""
        out, seen = [], set()
        for row in self.rows:
            if not row.method or not row.sweep:
                continue
            for col in self.columns:
                if row.datasets is None or col.dataset in row.datasets:
                    for seed in self.seeds:
                        key = (row.label, col.dataset, col.scenario, seed)
                        if key not in seen:
                            seen.add(key)
                            out.append((row, col, seed))
        return out


def suites_folder() -> Path:
    """``$CILBENCH_SUITES`` if set, else ``benchmarks/suites`` of the checkout holding this package."""
    env = os.environ.get("CILBENCH_SUITES")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[1] / "benchmarks" / "suites"


def list_suites(folder: Path | None = None) -> list[str]:
    folder = folder or suites_folder()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def load_suite(name: str, folder: Path | None = None) -> Suite:
    """A suite by name (``benchmarks/suites/NAME.yaml``) or by path; every schema error is one line."""
    path = Path(name).expanduser()
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = (folder or suites_folder()) / f"{name}.yaml"
        if not path.is_file():
            import difflib

            known = list_suites(folder)
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else (f" (known: {', '.join(known)})" if known else "")
            raise CilbenchError(f"no benchmark suite {name!r}{hint}")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise CilbenchError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    return parse_suite(doc, path)


def _need(doc: dict, key: str, where: str) -> Any:
    if doc.get(key) in (None, "", []):
        raise CilbenchError(f"{where}: missing {key!r}")
    return doc[key]


def _unknown(doc: dict, allowed: set[str], where: str) -> None:
    extra = sorted(set(doc) - allowed)
    if extra:
        raise CilbenchError(f"{where}: unknown key {extra[0]!r} (allowed: {', '.join(sorted(allowed))})")


def _metrics(value: Any, where: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise CilbenchError(f"{where}: metrics must be a list of names")
    return tuple(value)


def parse_suite(doc: Any, path: Path) -> Suite:
    where = str(path)
    if not isinstance(doc, dict):
        raise CilbenchError(f"{where}: a suite is a mapping with title, paper, table, columns and rows")
    _unknown(doc, SUITE_KEYS, where)
    columns = []
    for i, col in enumerate(_need(doc, "columns", where)):
        w = f"{where}: columns[{i}]"
        if not isinstance(col, dict):
            raise CilbenchError(f"{w}: expected a mapping with dataset and scenario")
        _unknown(col, COLUMN_KEYS, w)
        dataset, scenario = str(_need(col, "dataset", w)), str(_need(col, "scenario", w))
        order = col.get("order") or (scenario.removeprefix("order-") if scenario.startswith("order-") else None)
        columns.append(SuiteColumn(dataset, scenario, str(col.get("label") or f"{dataset} {scenario}"),
                                   _metrics(col.get("metrics"), w), order, col.get("key"), col.get("class_order")))
    rows = []
    labels = set()
    for i, row in enumerate(_need(doc, "rows", where)):
        w = f"{where}: rows[{i}]"
        if isinstance(row, str):
            row = {"label": row}
        if not isinstance(row, dict):
            raise CilbenchError(f"{w}: expected a label or a mapping")
        _unknown(row, ROW_KEYS, w)
        label = str(_need(row, "label", w))
        if label in labels:
            raise CilbenchError(f"{w}: row label {label!r} appears twice")
        labels.add(label)
        sets = row.get("sets") or {}
        if not isinstance(sets, dict):
            raise CilbenchError(f"{w}: sets must be a mapping of setting: value")
        for key, value in sets.items():
            items = value if isinstance(value, list) else [value]
            if not all(isinstance(v, (str, int, float, bool)) for v in items):
                raise CilbenchError(f"{w}: sets.{key} must be a number, a string, true/false or a list of them")
        method = row.get("method")
        if method is not None and not isinstance(method, str):
            raise CilbenchError(f"{w}: method must be a method name (a string), not {method!r}")
        datasets = row.get("datasets")
        if datasets is not None and (not isinstance(datasets, list) or not all(isinstance(d, str)
                                                                               for d in datasets)):
            raise CilbenchError(f"{w}: datasets must be a list of dataset names, e.g. [imagenet-a]")
        if not isinstance(row.get("sweep", True), bool):
            raise CilbenchError(f"{w}: sweep must be true or false")
        if row.get("backbone") is not None and not isinstance(row["backbone"], str):
            raise CilbenchError(f"{w}: backbone must be a backbone name (a string)")
        if not isinstance(row.get("joint", False), bool):
            raise CilbenchError(f"{w}: joint must be true or false")
        if row.get("joint") and not method:
            raise CilbenchError(f"{w}: joint: true needs a method to run jointly")
        if row.get("joint_row") is not None and not isinstance(row["joint_row"], str):
            raise CilbenchError(f"{w}: joint_row must be a row label (a string)")
        rows.append(SuiteRow(label, method, {str(k): v for k, v in sets.items()},
                             tuple(datasets) if datasets is not None else None, row.get("sweep", True),
                             row.get("backbone"), bool(row.get("joint", False)), row.get("joint_row")))
    for i, row in enumerate(rows):
        if row.joint_row is not None and row.joint_row not in labels:
            raise CilbenchError(f"{where}: rows[{i}]: joint_row {row.joint_row!r} is not among the suite's rows")
    blocks = []
    for i, block in enumerate(doc.get("blocks") or []):
        w = f"{where}: blocks[{i}]"
        if not isinstance(block, dict):
            raise CilbenchError(f"{w}: expected a mapping with label, metric and rows")
        _unknown(block, BLOCK_KEYS, w)
        names = tuple(str(r) for r in _need(block, "rows", w))
        missing = [n for n in names if n not in labels]
        if missing:
            raise CilbenchError(f"{w}: row {missing[0]!r} is not among the suite's rows")
        blocks.append(SuiteBlock(str(_need(block, "label", w)), str(_need(block, "metric", w)), names))
    from cilbench.data.scenario import MAX_SEED, valid_seed

    seeds = doc.get("seeds", [1993])
    if not isinstance(seeds, list) or not seeds or not all(valid_seed(s) for s in seeds):
        raise CilbenchError(f"{where}: seeds must be a list of integers from 0 to {MAX_SEED}")
    if doc.get("backbone") is not None and not isinstance(doc["backbone"], str):
        raise CilbenchError(f"{where}: backbone must be a backbone name (a string)")
    return Suite(path.stem, path, str(doc.get("title") or path.stem), str(_need(doc, "paper", where)),
                 str(_need(doc, "table", where)), columns, rows, tuple(seeds), doc.get("backbone"),
                 _metrics(doc.get("metrics"), where), str(doc.get("notes") or ""), blocks)


def run_options(suite: Suite, row: SuiteRow, col: SuiteColumn, seed: int, out: Path, quick: bool = False,
                device: str = "auto", cache_dir: Path | None = None):
    from cilbench.engine.runner import RunOptions

    mtil = col.scenario.startswith("order-")
    return RunOptions(method=row.method, dataset=col.dataset, scenario=None if mtil else col.scenario,
                      order=col.order if mtil else None, class_order=col.class_order, seed=seed,
                      backbone=row.backbone or suite.backbone,
                      sets={k: set_text(v) for k, v in row.sets.items()}, out=out, device=device, quick=quick,
                      cache_dir=cache_dir, joint=row.joint)


@dataclass
class SweepItem:
    row: str
    method: str
    dataset: str
    scenario: str
    seed: int
    record: Path
    status: str  # done (record existed) | ran | failed | planned
    message: str = ""


def sweep(suite: Suite, out: Path, quick: bool = False, device: str = "auto", cache_dir: Path | None = None,
          dry_run: bool = False, progress_factory: Callable | None = None,
          say: Callable[[str], None] = lambda text: None, restart: bool = False) -> list[SweepItem]:
    """Run every missing run of ``suite`` in order. A run is done when its record exists *and* was made with the
    row's configuration (the record name carries the configuration's key, and the record's config is compared).
    An unfinished run resumes from its checkpoint, or starts over with ``restart``. A failing run, whatever the
    error, is reported in one line and the sweep goes on (the caller exits non-zero when any failed)."""
    from cilbench.engine.runner import Runner

    items: list[SweepItem] = []
    plan = suite.runs()
    for i, (row, col, seed) in enumerate(plan, 1):
        opts = run_options(suite, row, col, seed, out, quick, device, cache_dir)
        label = " " + escape(f"[{_sets_label(row.sets)}]") if row.sets else ""
        label += " (joint)" if row.joint else ""
        where = f"[{i}/{len(plan)}] {row.method}{label} on {col.dataset} {col.scenario} seed {seed}"
        try:
            runner = Runner(opts, restart_hint="run the sweep again with --restart")
        except CilbenchError as err:
            items.append(SweepItem(row.label, row.method, col.dataset, col.scenario, seed, Path(), "failed", str(err)))
            say(f"{where}: [red]cannot run[/]: {err}")
            continue
        item = SweepItem(row.label, row.method, col.dataset, col.scenario, seed, runner.record_path, "planned")
        items.append(item)
        if runner.existing_record_is_ours():
            item.status = "done"
            say(f"{where}: done ({runner.record_path.name})")
            continue
        if dry_run:
            say(f"{where}: would run -> {runner.record_path.name}")
            continue
        say(f"{where}: {'starting over' if restart else 'running'}")
        try:
            # a killed sweep continues its unfinished run from the last task, unless told to start over
            runner.opts.resume = not restart and runner.checkpoint.exists()
            runner.run(progress_factory=progress_factory)
            item.status = "ran"
        except KeyboardInterrupt:
            raise
        except Exception as err:  # noqa: BLE001 - one failed run never stops the sweep
            text = str(err) if isinstance(err, CilbenchError) else f"{type(err).__name__}: {err}"
            item.status, item.message = "failed", " ".join(text.split())[:300]
            say(f"{where}: [red]failed[/]: {item.message}")
    return items


def _sets_label(sets: dict[str, Any]) -> str:
    return ", ".join(f"{k}={set_text(v)}" for k, v in sorted(sets.items()))
