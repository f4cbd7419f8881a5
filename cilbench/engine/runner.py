"""The task loop: scenario -> for each task (before, fit, after, evaluate, checkpoint) -> run record.

Determinism and resume: every task starts from a seed derived from (run seed, task index), shuffles use generators
seeded by (seed, task, epoch), and a checkpoint (``engine.checkpoint``: JSON + verified tensors) is written after
every task. ``resume`` rebuilds the method, replays the structural ``before_task`` hooks of the finished tasks, loads
the checkpoint and continues, so a run killed at any point and resumed ends with the same record numbers as an
uninterrupted one.

Identity (``cilbench.identity``): the record's file name carries the configuration's key, a record made with another
configuration is never overwritten, and the resume fingerprint covers the configuration, the weights file's sha256
and the prepared data (source, revision, split recipe, file checksums).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from cilbench import metrics
from cilbench.data.augment import PRESETS
from cilbench.data.scenario import Scenario, Task, build_scenario
from cilbench.data.store import sha256_file
from cilbench.engine.checkpoint import Checkpoint
from cilbench.engine.evaluator import evaluate_row, extract_features
from cilbench.engine.loader import TaskData
from cilbench.engine.trainer import fit
from cilbench.errors import CilbenchError
from cilbench.identity import config_key, describe, overrides
from cilbench.methods import load_method
from cilbench.methods.base import Method, resolve_config
from cilbench.models.backbones import BACKBONES, build_backbone, is_random
from cilbench.results.record import SCHEMA_VERSION, record_filename
from cilbench.utils import atomic_write_json, cache_dir, check_writable, git_hash, package_versions, seed_everything

QUICK_TRAIN_PER_CLASS = 40
QUICK_TEST_PER_CLASS = 20
MAX_SEED = 2**32 - 1  # numpy's legacy seeding (the PILOT class permutation) takes 0 .. 2**32 - 1
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}", re.ASCII)


@dataclass
class RunOptions:
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


def pick_device(name: str) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``; anything else, or a CUDA device torch does not see, is one line."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    index = name.removeprefix("cuda:") if name.startswith("cuda:") else ("" if name == "cuda" else None)
    if index is None or (index and not (index.isascii() and index.isdigit())):
        raise CilbenchError(f"unknown device {name!r} (auto, cpu, cuda or cuda:N)")
    if not torch.cuda.is_available():
        raise CilbenchError(f"--device {name} asked for, but torch sees no CUDA device; use --device cpu or auto")
    if index and int(index) >= torch.cuda.device_count():
        raise CilbenchError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA device(s), "
                            f"numbered from 0")
    return torch.device(name)


def check_seed(seed: int, what: str = "--seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise CilbenchError(f"{what} must be an integer from 0 to {MAX_SEED}, not {seed!r}")
    return seed


def task_seed(seed: int, task_index: int) -> int:
    return (seed * 1_000_003 + task_index * 7919) % (2**31 - 1)


@dataclass
class TaskContext:
    """What ``after_task`` may use: the task's training data and shared feature extraction."""

    task: Task
    train: TaskData
    device: torch.device
    transform: Any
    batch_size: int
    seed: int = 0  # the task's seed, for method-side sampling (classifier alignment)
    progress: Callable | None = None  # progress(description, total) -> update(n, loss), as the trainer's

    def features(self, encode: Callable[[torch.Tensor], torch.Tensor], data: TaskData | None = None,
                 train_transform: bool = False, low_precision: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Features of the task's training images (eval transform), in float32 arithmetic as the official codes
        compute prototypes, covariances and Gram matrices; ``low_precision`` allows bf16 autocast on CUDA."""
        return extract_features(encode, self.train if data is None else data, self.transform, self.device,
                                self.batch_size, train_transform, low_precision)


class ScenarioData:
    """Train and test ``TaskData`` of every task, read from the prepared stores."""

    def __init__(self, scenario: Scenario, cache: Path, quick: bool, seed: int):
        from cilbench.data.prepare import open_store

        self.train: list[TaskData] = []
        self.test: list[TaskData] = []
        self.image_sizes: set[int] = set()
        stores: dict[str, Any] = {}
        for task in scenario.tasks:
            base, _, domain = task.dataset.partition("/")
            if base not in stores:
                stores[base] = open_store(base, cache)
            store = stores[base]
            self.image_sizes.add(store.image_size)
            for split_name, out, cap in (("train", self.train, QUICK_TRAIN_PER_CLASS),
                                         ("test", self.test, QUICK_TEST_PER_CLASS)):
                split = store.split(split_name)
                labels = split.labels
                if domain:
                    # a domain of a multi-domain store: its classes, relabelled 0..k-1
                    mask = split.domains == int(domain)
                    local = np.full(int(labels.max()) + 1, -1)
                    own = np.unique(labels[mask])
                    local[own] = np.arange(len(own))
                    labels = np.where(mask, local[labels], -1)
                lut = np.full(max(int(labels.max()) + 1, max(task.source_labels) + 1), -1, dtype=np.int64)
                lut[list(task.source_labels)] = task.classes
                glob = np.where(labels >= 0, lut[np.clip(labels, 0, None)], -1)
                rows = np.nonzero(glob >= 0)[0]
                if quick:
                    rows = _cap_per_class(rows, glob[rows], cap, seed)
                out.append(TaskData(split.images, rows, glob[rows]))
        self.stores = stores
        self.manifest_sha256 = {name: sha256_file(store.root / "manifest.json") for name, store in stores.items()}
        for t, task in enumerate(scenario.tasks):
            if len(self.train[t]) == 0 or len(self.test[t]) == 0:
                raise CilbenchError(f"{task.name} of {scenario.dataset} has no training or test images; "
                                    f"the prepared store does not hold its classes")

    def identity(self) -> dict[str, dict[str, Any]]:
        """What the run was made on, per store: its source and resolved revision, the split recipe, the manifest's
        sha256, and ``content_sha256`` over what decides the numbers (source, split, class names, image size and
        every file's checksum), which the resume fingerprint uses: preparing the same data again keeps it."""
        out = {}
        for name, store in self.stores.items():
            m = store.manifest
            source = m.get("source") or {}
            content = dict(source=source, split_recipe=m.get("split_recipe"), class_names=m.get("class_names"),
                           image_size=m.get("image_size"),
                           files={split: {kind: f.get("sha256") for kind, f in meta["files"].items()}
                                  for split, meta in m["splits"].items()})
            out[name] = {"source": source.get("kind"), "repo": source.get("repo"), "path": source.get("path"),
                         "revision": source.get("revision"), "resolved_revision": source.get("resolved_revision"),
                         "split_recipe": m.get("split_recipe"), "counts": {k: v.get("count")
                                                                           for k, v in m["splits"].items()},
                         "manifest_sha256": self.manifest_sha256[name],
                         "content_sha256": hashlib.sha256(json.dumps(content, sort_keys=True, default=str)
                                                          .encode()).hexdigest()}
        return out

    def class_names(self, task: Task) -> tuple[str, ...]:
        base, _, domain = task.dataset.partition("/")
        names = self.stores[base].class_names
        if domain:
            k = len(task.classes)
            names = names[int(domain) * k:(int(domain) + 1) * k]
            return tuple(names)
        return tuple(names[c] for c in task.source_labels)


def _cap_per_class(rows: np.ndarray, labels: np.ndarray, cap: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        idx = rows[labels == c]
        keep.append(np.sort(rng.permutation(idx)[:cap]))
    return np.sort(np.concatenate(keep)) if keep else rows


def _merge_tasks(scenario: Scenario) -> Scenario:
    """The joint upper bound: one task with every class of the scenario."""
    tasks = scenario.tasks
    merged = Task(0, "all classes", tasks[0].dataset, tuple(c for t in tasks for c in t.classes),
                  tuple(c for t in tasks for c in t.source_labels), tuple(n for t in tasks for n in t.class_names))
    return dataclasses.replace(scenario, tasks=[merged], name=scenario.name)


class Runner:
    """One run: built (and every user error found) in ``__init__`` before any data or model is loaded, then
    ``run``. ``restart_hint`` says how to start over when a checkpoint cannot be resumed (``sweep --restart``)."""

    def __init__(self, opts: RunOptions, console=None, restart_hint: str = "run the same command without --resume"):
        self.opts = opts
        self.console = console
        check_seed(opts.seed)
        if opts.tag and not _TAG.fullmatch(opts.tag):
            raise CilbenchError(f"--tag {opts.tag[:40]!r}: use 1 to 64 ASCII letters, digits, '.', '_', '+' or '-', "
                                f"starting with a letter or digit")
        self.method_cls: type[Method] = load_method(opts.method)
        meta = _method_meta(opts.method)
        self.cfg, self.config_sources = resolve_config(self.method_cls, opts.dataset, opts.quick, opts.sets)
        backbone = opts.backbone or meta.get("backbone", "vit-b16-in21k")
        bspec = BACKBONES.get(backbone)
        if meta.get("backbone_family") and bspec.family != meta["backbone_family"]:
            raise CilbenchError(f"{opts.method} needs a {meta['backbone_family']} backbone, not {backbone}")
        if opts.quick and bspec.tiny:
            backbone = bspec.tiny
        self.backbone_name = backbone
        self.weights_sha256 = self._weights_sha256(BACKBONES.get(backbone))
        self.scenario = build_scenario(opts.dataset, opts.scenario, opts.seed, opts.class_order, opts.order)
        if self.method_cls.merges_tasks:
            self.scenario = _merge_tasks(self.scenario)
        self.kind = self.scenario.kind
        if self.kind == "mtil" and not self.method_cls.zero_shot:
            raise CilbenchError(f"{opts.method} cannot score datasets it has not trained on, which the MTIL matrix "
                                f"needs for Transfer; run a CLIP method on {opts.dataset}")
        self.device = pick_device(opts.device)
        self.cache = cache_dir(opts.cache_dir)
        self.overrides = overrides(self.method_cls, opts.dataset, opts.quick, opts.sets)
        self.config_key = config_key(self.overrides, self.weights_sha256)
        scenario_label = self.scenario.name + (f"-{opts.class_order}" if opts.class_order else "")
        tag = opts.tag or ("quick" if opts.quick else "")
        self.record_path = check_writable(Path(opts.out) / record_filename(
            opts.method, opts.dataset, scenario_label, opts.seed, backbone, tag, self.config_key), "run record")
        self.checkpoint = Checkpoint(self.record_path.parent / ".checkpoints", self.record_path.stem, restart_hint)
        check_writable(self.checkpoint.meta_path, "checkpoint")
        self._refuse_other_config()
        self.data_identity: dict[str, Any] = {}
        self.saved_tasks = 0  # tasks covered by the checkpoint on disk (for the interrupt message)

    def _weights_sha256(self, spec) -> str | None:
        weights = self.opts.weights
        if weights is None:
            return None
        if is_random(spec.name):
            why = "--quick runs a random tiny backbone" if self.opts.quick else f"{spec.name} is a random backbone"
            raise CilbenchError(f"--weights {weights} cannot be used here: {why}; drop --weights or --quick")
        path = Path(weights).expanduser()
        if not path.is_file():
            raise CilbenchError(f"no weights file {weights}")
        return sha256_file(path)

    def _refuse_other_config(self) -> None:
        """A record at our path made with another configuration is never overwritten."""
        path = self.record_path
        if not path.exists():
            return
        try:
            old = json.loads(path.read_text())
            same = isinstance(old, dict) and old.get("config_key", "") == self.config_key and \
                json.loads(json.dumps(old.get("config"), default=str)) == \
                json.loads(json.dumps(dataclasses.asdict(self.cfg), default=str)) and \
                old.get("class_order") == list(self.scenario.class_order)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            same = False
        if not same:
            raise CilbenchError(f"{path} exists and was made with another configuration or class order (or is not "
                                f"a readable record); keep both with --tag TEXT or --out DIR, or move it away")

    def existing_record_is_ours(self) -> bool:
        """True when the record at ``record_path`` exists and was made with this run's configuration."""
        try:
            self._refuse_other_config()
        except CilbenchError:
            return False
        return self.record_path.is_file()

    def fingerprint(self) -> str:
        """What must match for --resume to continue a checkpoint: the command, the effective configuration, the
        weights file and the prepared data the run reads."""
        o = self.opts
        key = dict(method=o.method, dataset=o.dataset, scenario=self.scenario.name, order=o.class_order, seed=o.seed,
                   backbone=self.backbone_name, quick=o.quick, config=dataclasses.asdict(self.cfg),
                   weights_sha256=self.weights_sha256, data={k: v["content_sha256"]
                                                             for k, v in self.data_identity.items()})
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def run(self, progress_factory: Callable | None = None) -> tuple[dict[str, Any], Path]:
        opts, scenario, device = self.opts, self.scenario, self.device
        started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        wall = time.perf_counter()
        seed_everything(opts.seed)
        data = ScenarioData(scenario, self.cache, opts.quick, opts.seed)
        self.data_identity = data.identity()
        scenario.tasks = [dataclasses.replace(t, class_names=data.class_names(t)) for t in scenario.tasks]
        n = len(scenario.tasks)
        resumed = None
        if opts.resume:
            if self.checkpoint.exists():
                resumed = self.checkpoint.load(self.fingerprint(), n, device)
            else:
                self._say(f"no checkpoint of this run in {self.checkpoint.folder}: starting from the first task")
        elif self.checkpoint.exists():
            done = _tasks_in(self.checkpoint)
            self._say(f"[yellow]starting over[/]: the checkpoint {self.checkpoint.meta_path} ({done}) will be "
                      f"replaced; pass --resume to continue it instead")
        backbone = build_backbone(self.backbone_name, pretrained=True, weights=opts.weights)
        preset = self.cfg.transform or backbone.spec.preset
        if preset not in PRESETS:
            raise CilbenchError(f"unknown transform preset {preset!r} ({', '.join(PRESETS)})")
        transform = PRESETS[preset].with_size(backbone.input_size)
        method = self.method_cls(self.cfg, backbone, scenario).to(device)
        matrix: list[list[float | None]] = []
        views: dict[str, list[list[float | None]]] = {}  # accuracy matrix of each extra score view
        timings: list[dict[str, Any]] = []
        first = 0
        if resumed is not None:
            first = resumed.next_task
            for task in scenario.tasks[:first]:
                method.before_task(task)
                method.seen_classes.extend(task.classes)
            method.to(device)
            method.load_checkpoint_state(resumed.tensors)
            method.extra = resumed.meta["logged"]
            matrix, timings, views = resumed.meta["matrix"], resumed.meta["timings"], resumed.meta["views"]
            started = resumed.meta["started_at"]
            self.saved_tasks = first
            self._say(f"resuming after task {first} of {n} from {self.checkpoint.meta_path}")
        else:
            self.checkpoint.remove()
            if self.checkpoint.legacy_path().exists():  # format 1 (pickled): never loaded, never kept
                self.checkpoint.legacy_path().unlink()
        for t in range(first, n):
            task = scenario.tasks[t]
            seed_everything(task_seed(opts.seed, t))
            method.before_task(task)
            method.to(device)
            ctx = TaskContext(task, data.train[t], device, transform, self.cfg.eval_batch_size,
                              task_seed(opts.seed, t), progress_factory)
            t0 = time.perf_counter()
            method.eval()  # statistics hooks run without dropout, also on a resumed run's first task
            method.before_fit(task, ctx)
            before_s = time.perf_counter() - t0
            stats = fit(method, task, data.train[t], transform, device, task_seed(opts.seed, t),
                        progress_factory)
            method.seen_classes.extend(task.classes)
            t0 = time.perf_counter()
            method.eval()
            method.after_task(task, ctx)
            after_s = time.perf_counter() - t0
            row = evaluate_row(method, scenario, t, data.test, transform, device, self.cfg.eval_batch_size)
            matrix.append(row.accuracy)
            for name, acc in row.view_accuracy().items():
                views.setdefault(name, [[None] * n for _ in range(t)]).append(acc)
            timings.append(dict(task=t, before_fit_s=round(before_s, 4), train_s=round(stats.seconds, 4),
                                after_task_s=round(after_s, 4),
                                eval_s=round(row.seconds, 4), train_steps=stats.steps, train_images=stats.images,
                                train_images_per_s=round(stats.images_per_s, 2),
                                eval_images=row.images, eval_images_per_s=round(row.images / row.seconds, 2)
                                if row.seconds > 0 else 0.0,
                                data_wait_fraction=round(stats.data_wait_s / stats.seconds, 4)
                                if stats.seconds > 0 else 0.0,
                                skipped_steps=stats.skipped_steps, final_loss=stats.final_loss))
            self._report_task(task, row, matrix, data)
            self.checkpoint.save(dict(fingerprint=self.fingerprint(), next_task=t + 1, matrix=matrix,
                                      timings=timings, views=views, logged=method.extra, started_at=started),
                                 method.checkpoint_state())
            self.saved_tasks = t + 1
            if os.environ.get("CILBENCH_TEST_KILL_AFTER_TASK") == str(t):  # test hook: a hard kill mid-run
                os.kill(os.getpid(), signal.SIGKILL)
            if os.environ.get("CILBENCH_TEST_INTERRUPT_AFTER_TASK") == str(t):  # test hook: Ctrl-C mid-run
                raise KeyboardInterrupt
        counts = [len(d) for d in data.test]
        record = self._record(method, matrix, counts, timings, started, wall, data, views)
        atomic_write_json(self.record_path, record)
        self.checkpoint.remove()
        return record, self.record_path

    def config_label(self) -> str:
        """The run's non-default settings, readable (``lambda1=0, lambda2=0``); empty for the method's own."""
        return describe(self.overrides, self.weights_sha256)

    def interrupted_message(self, command: str) -> str:
        """What a Ctrl-C tells the user: where the last checkpoint is and the command that continues it."""
        n = len(self.scenario.tasks)
        if self.saved_tasks and self.checkpoint.exists():
            return (f"interrupted; tasks 1-{self.saved_tasks} of {n} are saved in {self.checkpoint.meta_path}; "
                    f"continue with: {command}")
        return f"interrupted before the first task finished; nothing was saved; run again with: {command}"

    def _say(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text)

    def _report_task(self, task: Task, row, matrix, data) -> None:
        if self.console is None:
            return
        acc = [a for a in row.accuracy if a is not None]
        if self.kind == "cil":
            counts = [len(d) for d in data.test]
            a_t = metrics.accuracy_per_step(matrix, counts)[-1]
            self.console.print(f"[bold]{task.name}[/] ({len(task.classes)} classes): A_t = {a_t:.2f}")
        else:
            self.console.print(f"[bold]{task.name}[/]: mean over datasets {np.mean(acc):.2f}, "
                               f"on {task.name} {row.accuracy[task.index]:.2f}")

    def _record(self, method: Method, matrix, counts, timings, started, wall, data, views) -> dict[str, Any]:
        opts, scenario = self.opts, self.scenario
        summary = metrics.summary(self.kind, matrix, counts if self.kind == "cil" else None)
        view_records = {name: {"accuracy_matrix": m,
                               "metrics": metrics.summary(self.kind, m, counts if self.kind == "cil" else None)}
                        for name, m in views.items()}
        per_task = summary.pop("A_t", None) if self.kind == "cil" else [float(np.nanmean(
            [v for v in r if v is not None])) for r in matrix]
        device = {"type": self.device.type, "name": torch.cuda.get_device_name(self.device)
                  if self.device.type == "cuda" else _cpu_name(), "torch_threads": torch.get_num_threads()}
        return {
            "schema_version": SCHEMA_VERSION,
            "run_id": self.record_path.stem,
            "status": "complete",
            "kind": self.kind,
            "method": opts.method,
            "dataset": opts.dataset,
            "scenario": scenario.name,
            "class_order": scenario.class_order,
            "class_order_name": scenario.class_order_name,
            "class_order_option": opts.class_order,  # a fixed published order (--class-order), None if seeded
            "increments": scenario.increments,
            "task_names": [t.name for t in scenario.tasks],
            "seed": opts.seed,
            "backbone": self.backbone_name,
            "profile": "quick" if opts.quick else "full",
            "comparable": not opts.quick,
            "note": "quick smoke profile: tiny random backbone, few epochs, data subset; not comparable to papers"
                    if opts.quick else "",
            "config_key": self.config_key,
            "config_label": self.config_label(),
            "overrides": self.overrides,
            "config": dataclasses.asdict(self.cfg),
            # the full effective config, hashed: tells apart two "default" runs made before and after a default moved
            "config_sha256": hashlib.sha256(json.dumps(dataclasses.asdict(self.cfg), sort_keys=True,
                                                       default=str).encode()).hexdigest(),
            "config_sources": self.config_sources,
            "run": {"device": opts.device, "cache_dir": str(self.cache), "weights": opts.weights,
                    "weights_sha256": self.weights_sha256, "image_sizes": sorted(data.image_sizes),
                    "merged_tasks": self.method_cls.merges_tasks, "tag": opts.tag},
            "data": self.data_identity,
            "accuracy_matrix": matrix,
            "test_counts": counts,
            "accuracy_per_task": per_task,
            "metrics": summary,
            "views": view_records,
            "extra": method.extra,
            "timings": {"tasks": timings, "total_s": round(time.perf_counter() - wall, 3)},
            "device": device,
            "versions": package_versions(),
            "git": git_hash(),
            "started_at": started,
            "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }


def _tasks_in(checkpoint: Checkpoint) -> str:
    try:
        return f"{checkpoint.read_meta()['next_task']} task(s) done"
    except CilbenchError:
        return "unreadable"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "cpu"


def _method_meta(name: str) -> dict[str, Any]:
    from cilbench.methods.base import METHODS

    return METHODS.metadata(name)
