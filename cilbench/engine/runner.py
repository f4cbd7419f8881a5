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
import functools
import datetime as dt
import glob
import hashlib
import json
import os
import signal
import time

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from cilbench import metrics
from cilbench.data.augment import PRESETS
from cilbench.data.scenario import Scenario, Task
from cilbench.data.store import sha256_file
from cilbench.engine.checkpoint import Checkpoint
from cilbench.engine.evaluator import evaluate_row, inference_cost
from cilbench.engine.features import FeatureCache, extract_features
from cilbench.engine.loader import TaskData
from cilbench.engine.trainer import main_phase, run_phase
from cilbench.errors import CilbenchError
from cilbench.methods.base import Method
from cilbench.methods.contract import Encoder, Phase, PhaseStats, check_log_value, encode_with
from cilbench.models.backbones import build_backbone
from cilbench.plan import RunOptions, RunPlan  # noqa: F401 - RunOptions is re-exported
from cilbench.results.record import SCHEMA_VERSION
from cilbench.utils import atomic_write_json, cache_dir, check_writable, git_hash, package_versions, seed_everything

QUICK_TRAIN_PER_CLASS = 40
QUICK_TEST_PER_CLASS = 20
SHOTS_SEED_OFFSET = 5  # the few-shot draw's seed is the run seed + 5, apart from the quick profile's subset


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


def task_seed(seed: int, task_index: int) -> int:
    return (seed * 1_000_003 + task_index * 7919) % (2**31 - 1)


# Sub-seeds named before ``ctx.seed(purpose)`` existed keep their historic offsets from the task's seed, so records
# made earlier reproduce exactly; any other purpose gets a stable hash of its name.
LEGACY_SUB_SEEDS = {"": 0, "align": 0, "ridge-projection": 0, "ridge-holdout": 1}


class RunTaskContext:
    """The runner's ``methods.contract.TaskContext``: what a method may use during one task."""

    def __init__(self, runner: "Runner", method: Method, task: Task, train: TaskData, seen: list[int],
                 transform: Any, device: torch.device, seed: int, progress: Callable | None):
        self._runner, self._method, self.task, self.train = runner, method, task, train
        self.new = torch.tensor(sorted(task.classes), dtype=torch.long)
        self.seen = torch.tensor(sorted(seen), dtype=torch.long)
        self.old = self.seen[~torch.isin(self.seen, self.new)]
        self.transform, self.device, self.task_seed, self.progress = transform, device, seed, progress
        self.batch_size = runner.cfg.eval_batch_size
        self.logged: dict[str, Any] = {}
        self.phases: dict[str, dict[str, Any]] = {}
        self.main: PhaseStats | None = None

    def features(self, encode: Callable[[torch.Tensor], torch.Tensor], data: TaskData | None = None,
                 augment: bool = False, low_precision: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Features of ``data`` (default: the task's training images) in order, test transform unless
        ``augment``, in float32 arithmetic as the official codes compute prototypes, covariances and Gram matrices;
        ``low_precision`` allows bf16 autocast on CUDA. ``encode`` a ``contract.Encoder`` or a list of them (the
        method's ``feature_encoder``): through the run's feature cache, each image encoded once per state of its
        weights ([N, S, D] for S encoders)."""
        data = self.train if data is None else data
        cache = self._runner.features
        encoders = encode if isinstance(encode, list) else [encode]
        if all(isinstance(e, Encoder) for e in encoders) and cache is not None and not augment:  # encoded once
            feats = cache.features(encode, data, self.transform, self.batch_size, low_precision)
            return feats, torch.from_numpy(data.labels).to(self.device)
        if isinstance(encode, list):  # several encoders, no cache: [N, S, D] all the same
            encode = functools.partial(encode_with, encode)
        return extract_features(encode, data, self.transform, self.device, self.batch_size, augment, low_precision)

    def fit(self, phase: Phase) -> PhaseStats:
        """Run a gradient phase on the one trainer; its per-epoch loss and terms go into the task's log."""
        if phase.name in self.phases:
            raise ValueError(f"phase {phase.name!r} ran twice in {self.task.name}; give each phase its own name")
        stats = run_phase(self._method, phase, self._runner.cfg, self.task, self.train, self.transform,
                          self.device, self.task_seed if phase.seed is None else phase.seed, self.progress)
        self.phases[phase.name] = {"steps": stats.steps, "epochs": stats.epoch_terms,
                                   "seconds": round(stats.seconds, 4), "skipped_steps": stats.skipped_steps,
                                   "fused_optimizer": stats.fused_optimizer}
        return stats

    def seed(self, purpose: str = "") -> int:
        """A reproducible seed for ``purpose`` in this task (same run seed, task and purpose: same seed)."""
        if purpose in LEGACY_SUB_SEEDS:
            return self.task_seed + LEGACY_SUB_SEEDS[purpose]
        digest = int(hashlib.sha256(purpose.encode()).hexdigest()[:8], 16)
        return (self.task_seed + digest) % (2**31 - 1)

    def rng(self, purpose: str = "", device: torch.device | str | None = None) -> torch.Generator:
        return torch.Generator(device=device or "cpu").manual_seed(self.seed(purpose))

    def log(self, **values: Any) -> None:
        """Values for the run record's log of this task (numbers, strings, lists and dicts of them)."""
        for key, value in values.items():
            self.logged[key] = check_log_value(key, value)

    def reference(self, name: str) -> Any:
        """The reference data the method declared under ``name`` (``Method.references``): a ``TaskData`` of a
        store, or a list of captions."""
        return self._runner.references.get(name)

    def record(self) -> dict[str, Any]:
        return {"task": self.task.index, **self.logged, "phases": self.phases}


def content_sha256(manifest: dict[str, Any], splits: list[str] | None = None) -> str:
    """A store's content hash over what decides the numbers: source, split recipe, class names, image size and the
    checksum of every file of ``splits`` (all by default). Preparing the same data again keeps it."""
    content = dict(source=manifest.get("source") or {}, split_recipe=manifest.get("split_recipe"),
                   class_names=manifest.get("class_names"), image_size=manifest.get("image_size"),
                   files={split: {kind: f.get("sha256") for kind, f in meta["files"].items()}
                          for split, meta in manifest["splits"].items() if splits is None or split in splits})
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


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
                if split_name == "train" and scenario.shots:  # few-shot: drawn once per run seed, before training
                    rows = _cap_per_class(rows, glob[rows], scenario.shots, seed + SHOTS_SEED_OFFSET)
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
            out[name] = {"source": source.get("kind"), "repo": source.get("repo"), "path": source.get("path"),
                         "revision": source.get("revision"), "resolved_revision": source.get("resolved_revision"),
                         "split_recipe": m.get("split_recipe"), "counts": {k: v.get("count")
                                                                           for k, v in m["splits"].items()},
                         "manifest_sha256": self.manifest_sha256[name],
                         "content_sha256": content_sha256(m)}
        return out

    def class_names(self, task: Task) -> tuple[str, ...]:
        base, _, domain = task.dataset.partition("/")
        names = self.stores[base].class_names
        if domain:
            k = len(task.classes)
            names = names[int(domain) * k:(int(domain) + 1) * k]
            return tuple(names)
        return tuple(names[c] for c in task.source_labels)


class ReferenceData:
    """The data a method reads beside the scenario's (``Method.references``): prepared stores read whole and
    caption files, opened before any training so a missing one is one line, with their identity for the record."""

    def __init__(self, refs: dict[str, Any], cache: Path, quick: bool, seed: int):
        from cilbench.data.prepare import open_store

        self.items: dict[str, Any] = {}
        self.identity: dict[str, dict[str, Any]] = {}
        for name, ref in refs.items():
            if ref.store:
                from cilbench.data.catalog import get_spec

                try:
                    get_spec(ref.store)
                except CilbenchError:
                    raise CilbenchError(f"{ref.purpose or name}: no dataset {ref.store!r} in the catalog; register "
                                        f"an image folder with `cilbench datasets add {ref.store} --source DIR` and "
                                        f"prepare it, or name another with --set {ref.setting or name}=NAME") from None
                try:
                    store = open_store(ref.store, cache)
                except CilbenchError as err:
                    raise CilbenchError(f"{ref.purpose or name} (--set {ref.setting or name}={ref.store}): "
                                        f"{err}") from None
                if ref.split not in store.split_names:
                    raise CilbenchError(f"{ref.purpose or name}: store {ref.store} has no {ref.split!r} split "
                                        f"({', '.join(store.split_names)})")
                split = store.split(ref.split)
                rows = np.arange(len(split.labels))
                if quick:
                    rows = _cap_per_class(rows, split.labels, QUICK_TRAIN_PER_CLASS, seed)
                self.items[name] = TaskData(split.images, rows, np.asarray(split.labels, dtype=np.int64)[rows])
                m = store.manifest
                self.identity[f"reference:{name}"] = {
                    "store": ref.store, "split": ref.split, "count": int(len(rows)),
                    "source": (m.get("source") or {}).get("kind"), "path": (m.get("source") or {}).get("path"),
                    "content_sha256": content_sha256(m, [ref.split])}
            elif ref.captions:
                from cilbench.data.captions import read_captions

                captions, sha = read_captions(ref.captions, what=f"{ref.purpose or name} (--set "
                                                                 f"{ref.setting or name}=FILE)")
                self.items[name] = captions
                self.identity[f"reference:{name}"] = {"captions": ref.captions, "count": len(captions),
                                                      "content_sha256": sha}
            else:
                raise CilbenchError(f"{ref.purpose or name}: --set {ref.setting or name}= names no store or file")

    def get(self, name: str) -> Any:
        if name not in self.items:
            raise KeyError(f"no reference data named {name!r}: declare it in the method's references()")
        return self.items[name]


def _cap_per_class(rows: np.ndarray, labels: np.ndarray, cap: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        idx = rows[labels == c]
        keep.append(np.sort(rng.permutation(idx)[:cap]))
    return np.sort(np.concatenate(keep)) if keep else rows


class Runner:
    """One run: built (and every user error found) in ``__init__`` before any data or model is loaded, then
    ``run``. ``restart_hint`` says how to start over when a checkpoint cannot be resumed (``sweep --restart``)."""

    def __init__(self, opts: RunOptions, console=None, restart_hint: str = "run the same command without --resume"):
        self.opts = opts
        self.console = console
        self.plan = plan = RunPlan.build(opts)
        self.method_cls: type[Method] = plan.method_cls
        self.cfg, self.config_sources = plan.cfg, plan.config_sources
        self.backbone_name, self.weights_sha256 = plan.backbone, plan.weights_sha256
        self.scenario, self.kind = plan.scenario, plan.kind
        self.overrides, self.config_key = plan.overrides, plan.config_key
        self.device = pick_device(opts.device)
        self.cache = cache_dir(opts.cache_dir)
        self.record_path = check_writable(Path(opts.out) / plan.record_name, "run record")
        self.checkpoint = Checkpoint(self.record_path.parent / ".checkpoints", self.record_path.stem, restart_hint)
        check_writable(self.checkpoint.meta_path, "checkpoint")
        self._refuse_other_config()
        self.data_identity: dict[str, Any] = {}
        self.references: ReferenceData | None = None
        self.saved_tasks = 0  # tasks covered by the checkpoint on disk (for the interrupt message)
        self.features: FeatureCache | None = None
        self._said_reuse = False

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
                old.get("class_order") == list(self.scenario.class_order) and \
                (old.get("method_origin") or {}).get("sha256") == self.plan.method_origin.get("sha256")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            same = False
        if not same:
            raise CilbenchError(f"{path} exists and was made with another configuration, class order or plugin "
                                f"version (or is not a readable record); keep both with --tag TEXT or --out DIR, or "
                                f"move it away")

    def existing_record_is_ours(self) -> bool:
        """True when the record at ``record_path`` exists: it was made with this run's configuration, since
        ``__init__`` refused any other (``_refuse_other_config``)."""
        return self.record_path.is_file()

    def fingerprint(self) -> str:
        """What must match for --resume to continue a checkpoint: the command, the effective configuration, the
        weights file and the prepared data the run reads."""
        o = self.opts
        key = dict(method=o.method, dataset=o.dataset, scenario=self.scenario.name, order=o.class_order, seed=o.seed,
                   backbone=self.backbone_name, quick=o.quick, config=dataclasses.asdict(self.cfg),
                   weights_sha256=self.weights_sha256, code=self.plan.method_origin.get("sha256"),
                   data={k: v["content_sha256"]
                                                             for k, v in self.data_identity.items()})
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def run(self, progress_factory: Callable | None = None) -> tuple[dict[str, Any], Path]:
        opts, scenario, device = self.opts, self.scenario, self.device
        started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        wall = time.perf_counter()
        seed_everything(opts.seed)
        for stale in self.record_path.parent.glob(f".{glob.escape(self.record_path.name)}.*.tmp"):
            stale.unlink(missing_ok=True)  # left by a write this run's process was killed in
        data = ScenarioData(scenario, self.cache, opts.quick, opts.seed)
        self.references = ReferenceData(self.method_cls.references(self.cfg, scenario), self.cache, opts.quick,
                                        opts.seed)
        self.data_identity = {**data.identity(), **self.references.identity}
        scenario.tasks = [dataclasses.replace(t, class_names=data.class_names(t)) for t in scenario.tasks]
        self.features = self._feature_cache(data, device)
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
        transform = PRESETS[self.plan.transform_preset].with_size(backbone.input_size)
        method = self.method_cls(self.cfg, backbone, scenario).to(device)
        matrix: list[list[float | None]] = []
        views: dict[str, list[list[float | None]]] = {}  # accuracy matrix of each extra score view
        timings: list[dict[str, Any]] = []
        log: list[dict[str, Any]] = []  # per task: what the method logged and each phase's per-epoch terms
        first = 0
        if resumed is not None:
            first = resumed.next_task
            for task in scenario.tasks[:first]:
                method.before_task(task)
            method.to(device)
            method.load_checkpoint_state(resumed.tensors)
            log = resumed.meta["logged"]["tasks"]
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
            seed = task_seed(opts.seed, t)
            seed_everything(seed)
            method.before_task(task)
            method.to(device)
            seen = [c for done in scenario.tasks[:t + 1] for c in done.classes]
            ctx = RunTaskContext(self, method, task, data.train[t], seen, transform, device, seed, progress_factory)
            encoded, reused = self.features.stats.snapshot() if self.features else (None, None)
            t0 = time.perf_counter()
            method.eval()  # statistics hooks run without dropout, also on a resumed run's first task
            method.before_fit(task, ctx)
            train_data = method.train_data(task, ctx)
            aux = method.aux_streams(task, ctx)
            before_s = time.perf_counter() - t0
            stats = ctx.fit(main_phase(method, task, train_data, aux))
            t0 = time.perf_counter()
            method.eval()
            method.after_task(task, ctx)
            after_s = time.perf_counter() - t0
            row = evaluate_row(method, scenario, t, data.test, transform, device, self.cfg.eval_batch_size,
                               self.features)
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
                                skipped_steps=stats.skipped_steps, final_loss=stats.final_loss,
                                **self._cache_counts(encoded, reused)))
            log.append(ctx.record())
            if ctx.logged.get("per_class") == 0 and t < n - 1:  # a memory too small for the classes seen so far
                self._say(f"[yellow]warning[/]: after {task.name} the exemplar memory keeps 0 images per class of "
                          f"the {len(seen)} classes seen, so old classes get no exemplars; give it more room "
                          f"(--set memory_size=...)")
            self._report_task(task, row, matrix, data)
            self.checkpoint.save(dict(fingerprint=self.fingerprint(), next_task=t + 1, matrix=matrix,
                                      timings=timings, views=views, logged={"tasks": log}, started_at=started),
                                 method.checkpoint_state())
            self.saved_tasks = t + 1
            if os.environ.get("CILBENCH_TEST_KILL_AFTER_TASK") == str(t):  # test hook: a hard kill mid-run
                os.kill(os.getpid(), signal.SIGKILL)
            if os.environ.get("CILBENCH_TEST_INTERRUPT_AFTER_TASK") == str(t):  # test hook: Ctrl-C mid-run
                raise KeyboardInterrupt
        counts = [len(d) for d in data.test]
        cost = inference_cost(method, scenario, data.test, transform, device)
        record = self._record(log, matrix, counts, timings, started, wall, data, views, cost)
        atomic_write_json(self.record_path, record)
        self.checkpoint.remove()
        return record, self.record_path

    def _feature_cache(self, data: ScenarioData, device: torch.device) -> FeatureCache | None:
        """The run's frozen-feature cache over every split of its stores, kept in ``<cache>/.features`` (no dataset
        name starts with a dot, so no store can be in its way)."""
        if not self.opts.feature_cache:
            return None
        warn = lambda text: self._say(f"[yellow]warning[/]: {text}")  # noqa: E731
        cache = FeatureCache(self.cache / ".features", device, warn)
        for name, store in data.stores.items():
            for split in store.split_names:
                cache.register(store.split(split).images, f"{name}:{self.data_identity[name]['content_sha256']}:"
                                                          f"{split}")
        return cache

    def _cache_counts(self, encoded: int | None, reused: int | None) -> dict[str, Any]:
        """Feature-cache counts of one task (images encoded, features reused), said once when a run first reads
        features an earlier run computed."""
        if self.features is None:
            return {}
        stats = self.features.stats
        if stats.chunks_read and not self._said_reuse:
            self._said_reuse = True
            self._say(f"reusing features an earlier run cached in {self.features.folder} (same encoder weights, "
                      f"code, transform and data); --no-feature-cache recomputes them")
        return dict(features_encoded=stats.encoded - encoded, features_reused=stats.reused - reused)

    def config_label(self) -> str:
        """The run's non-default settings, readable (``lambda1=0, lambda2=0``); empty for the method's own."""
        return self.plan.config_label()

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

    def _record(self, log, matrix, counts, timings, started, wall, data, views, cost) -> dict[str, Any]:
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
            "method_origin": self.plan.method_origin,
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
                    "merged_tasks": self.method_cls.merges_tasks or opts.joint, "joint": opts.joint,
                    "recipe": opts.recipe, "feature_cache": opts.feature_cache,
                    "tag": opts.tag,
                    "shots": scenario.shots},
            "data": self.data_identity,
            "accuracy_matrix": matrix,
            "test_counts": counts,
            "accuracy_per_task": per_task,
            "metrics": summary,
            "views": view_records,
            "cost": cost,
            "feature_cache": self.features.record() if self.features is not None else None,
            "log": log,
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
