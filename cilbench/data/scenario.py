"""Scenarios: class orders, increments, and the task sequence a run walks through.

Class-incremental ("B{b}Inc{i}", the PILOT convention): classes are permuted by ``np.random.seed(seed);
np.random.permutation(N)`` (or a fixed published order), labels are remapped to their position in that order, the
first task has ``b`` classes (``i`` when ``b == 0``), then ``i`` per task, the last task takes the remainder. A
dataset whose official configs do not shuffle says so in the catalog (``default_class_order``): VTAB keeps the order
0..49, so task t is domain t; ``--class-order seed`` still asks for the seeded permutation.

Multi-domain task-incremental (MTIL): each task is one dataset of a sequence with its own label space; the scenario
concatenates the label spaces so every class has one global id, and evaluation scores each dataset among its own
classes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

import numpy as np
import yaml

from cilbench.data.catalog import DatasetSpec, SequenceSpec, get_spec
from cilbench.errors import CilbenchError

MAX_SEED = 2**32 - 1  # numpy's legacy seeding (the PILOT class permutation) takes 0 .. 2**32 - 1


def valid_seed(seed: object) -> bool:
    return isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed <= MAX_SEED


def check_seed(seed: object, what: str = "--seed") -> int:
    """A seed numpy's legacy seeding takes, else one line."""
    if not valid_seed(seed):
        raise CilbenchError(f"{what} must be an integer from 0 to {MAX_SEED}, not {seed!r}")
    return seed  # type: ignore[return-value]


_SCENARIO = re.compile(r"B([0-9]+)Inc([0-9]+)")  # ASCII digits only, matched whole (no trailing newline)


@lru_cache(maxsize=1)
def fixed_orders() -> dict[str, dict]:
    text = resources.files("cilbench.data").joinpath("resources/class_orders.yaml").read_text()
    return yaml.safe_load(text)


def parse_scenario(scenario: str) -> tuple[int, int]:
    m = _SCENARIO.fullmatch(scenario)
    if not m:
        raise CilbenchError(f"malformed scenario {scenario!r}: expected B<base>Inc<step>, e.g. B0Inc10 or B50Inc10")
    base, inc = int(m.group(1)), int(m.group(2))
    if inc <= 0:
        raise CilbenchError(f"scenario {scenario!r}: the increment must be at least 1")
    return base, inc


def increments(num_classes: int, base: int, inc: int) -> list[int]:
    """PILOT's rule: [first]; while sum + inc < N: append inc; append the remainder if any."""
    first = base if base > 0 else inc
    if first > num_classes:
        raise CilbenchError(f"scenario B{base}Inc{inc} does not fit a dataset of {num_classes} classes: "
                            f"the first task alone needs {first}")
    if base >= num_classes and base != num_classes:
        raise CilbenchError(f"scenario B{base}Inc{inc}: base larger than the {num_classes} classes")
    out = [first]
    while sum(out) + inc < num_classes:
        out.append(inc)
    if (rest := num_classes - sum(out)) > 0:
        out.append(rest)
    return out


def seeded_order(num_classes: int, seed: int) -> list[int]:
    """The PILOT / DyTox class order: ``np.random.seed(seed); np.random.permutation(N)`` (legacy global RNG)."""
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        return np.random.permutation(num_classes).tolist()
    finally:
        np.random.set_state(state)


def default_class_order(dataset: str) -> str | None:
    """The order a dataset uses when none is asked for: the catalog's ``default_class_order`` (VTAB: "identity",
    as every official VTAB config sets shuffle false), else None (the seeded permutation)."""
    spec = get_spec(dataset)
    return spec.default_class_order if isinstance(spec, DatasetSpec) else None


def class_order(dataset: str, num_classes: int, seed: int, name: str | None = None) -> tuple[list[int], str]:
    """The class order and its description: a fixed published order by name, else the dataset's default order
    (``default_class_order``), else the seeded permutation."""
    if name in (None, ""):
        name = default_class_order(dataset)
    if name in (None, "", "seed"):
        return seeded_order(num_classes, seed), f"np.random.seed({seed}) permutation"
    if name == "identity":
        return list(range(num_classes)), "identity"
    orders = fixed_orders()
    if name not in orders:
        import difflib

        close = difflib.get_close_matches(name, list(orders) + ["seed", "identity"], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise CilbenchError(f"unknown class order {name!r}{hint} (known: {', '.join(orders)}, seed, identity)")
    entry = orders[name]
    if entry["dataset"] != dataset:
        raise CilbenchError(f"class order {name!r} is for {entry['dataset']}, not {dataset}")
    order = list(entry["order"])
    assert sorted(order) == list(range(num_classes)), f"{name} is not a permutation of {num_classes} classes"
    return order, name


def to_store_labels(order: list[int], name: str | None) -> list[int]:
    """A published order in its own label space -> the store's labels. TinyImageNet's official code (continuum)
    numbers classes in ``wnids.txt`` order; the hub copy and ImageFolder trees number them by sorted WordNet id."""
    entry = fixed_orders().get(name or "", {})
    space = entry.get("label_space")
    if not space:
        return order
    assert entry.get("store_label_space") == "sorted"
    rank = {wnid: i for i, wnid in enumerate(sorted(space))}
    return [rank[space[c]] for c in order]


@dataclass(frozen=True)
class Task:
    """One step of a scenario. ``classes`` are global ids (positions in the class order for CIL, offsets into the
    concatenated label spaces for MTIL). ``source_labels`` are the same classes in the source dataset's labels."""

    index: int
    name: str
    dataset: str  # the store to read ("synthetic/2" = domain 2 of store "synthetic")
    classes: tuple[int, ...]
    source_labels: tuple[int, ...]
    class_names: tuple[str, ...] = ()


@dataclass
class Scenario:
    kind: str  # "cil" or "mtil"
    dataset: str
    name: str  # "B0Inc10", or "order-I" for a sequence
    num_classes: int
    tasks: list[Task]
    class_order: list[int] = field(default_factory=list)
    class_order_name: str = ""
    seed: int = 1993
    shots: int | None = None  # training images per class (few-shot), drawn once per run seed; None: all

    @property
    def increments(self) -> list[int]:
        return [len(t.classes) for t in self.tasks]

    def seen_classes(self, task_index: int) -> list[int]:
        return [c for t in self.tasks[: task_index + 1] for c in t.classes]

    def describe(self) -> dict:
        out = {"dataset": self.dataset, "kind": self.kind, "scenario": self.name, "num_classes": self.num_classes,
               "seed": self.seed, "shots": self.shots}
        if self.kind == "cil":
            starts = np.cumsum([0] + self.increments)
            out.update(class_order=self.class_order, class_order_name=self.class_order_name,
                       increments=self.increments,
                       tasks=[self.class_order[a:b] for a, b in zip(starts[:-1], starts[1:])])
            store = [list(t.source_labels) for t in self.tasks]
            if store != out["tasks"]:  # the published order lives in another label space than the store
                out["store_tasks"] = store
        else:
            out.update(order=self.name.removeprefix("order-"), datasets=[t.dataset for t in self.tasks],
                       increments=self.increments)
        return out


def cil_scenario(dataset: str, scenario: str, seed: int = 1993, order_name: str | None = None,
                 class_names: list[str] | None = None) -> Scenario:
    spec = get_spec(dataset)
    if isinstance(spec, SequenceSpec):
        raise CilbenchError(f"{dataset} is a dataset sequence: use --order I|II, not a B<base>Inc<step> scenario")
    base, inc = parse_scenario(scenario)
    n = spec.num_classes
    incs = increments(n, base, inc)
    order, order_desc = class_order(dataset, n, seed, order_name)
    store_order = to_store_labels(order, order_name)
    tasks, start = [], 0
    for t, size in enumerate(incs):
        src = tuple(store_order[start:start + size])
        names = tuple(class_names[c] for c in src) if class_names else ()
        tasks.append(Task(t, f"task {t + 1}", dataset, tuple(range(start, start + size)), src, names))
        start += size
    return Scenario("cil", dataset, scenario, n, tasks, order, order_desc, seed)


def sequence_scenario(dataset: str, order: str | None = None, seed: int = 1993,
                      class_names: dict[str, list[str]] | None = None) -> Scenario:
    spec = get_spec(dataset)
    if not isinstance(spec, SequenceSpec):
        raise CilbenchError(f"{dataset} is not a dataset sequence; use --scenario B<base>Inc<step>")
    order = order or spec.default_order
    if order not in spec.orders:
        raise CilbenchError(f"unknown order {order!r} for {dataset} (known: {', '.join(spec.orders)})")
    tasks, start = [], 0
    for t, member in enumerate(spec.datasets(order)):
        n = member_num_classes(spec, member)
        names = tuple(class_names[member]) if class_names and member in class_names else ()
        tasks.append(Task(t, member, member, tuple(range(start, start + n)), tuple(range(n)), names))
        start += n
    return Scenario("mtil", dataset, f"order-{order}", start, tasks, seed=seed)


def member_num_classes(seq: SequenceSpec, member: str) -> int:
    base, _, domain = member.partition("/")
    spec = get_spec(base)
    assert isinstance(spec, DatasetSpec)
    if domain:
        return spec.num_classes // spec.builder_options.get("num_domains", 1)
    return spec.num_classes


def build_scenario(dataset: str, scenario: str | None = None, seed: int = 1993, order_name: str | None = None,
                   mtil_order: str | None = None, shots: int | None = None) -> Scenario:
    """The scenario from the catalog alone (no images needed). ``shots``: train on that many images per class
    (drawn once); a number other than the dataset's own (``mtil-fewshot``: 5) names the scenario ``...-{n}shot``, so
    its records never mix with the full-data ones."""
    check_seed(seed)
    if shots is not None and (isinstance(shots, bool) or not isinstance(shots, int) or shots < 1):
        raise CilbenchError(f"--shots must be a whole number of images per class, at least 1, not {shots!r}")
    spec = get_spec(dataset)
    scenario = (scenario or "").removesuffix(f"-{shots}shot") if shots else scenario
    if isinstance(spec, SequenceSpec):
        if scenario and not scenario.startswith("order-"):
            raise CilbenchError(f"{dataset} is a dataset sequence: use --order I|II, not --scenario {scenario}")
        out = sequence_scenario(dataset, mtil_order or (scenario or "").removeprefix("order-") or None, seed)
    else:
        if mtil_order:
            raise CilbenchError(f"--order {mtil_order} is for dataset sequences (mtil); {dataset} is "
                                f"class-incremental: use --scenario B<base>Inc<step>")
        out = cil_scenario(dataset, scenario or spec.default_scenario, seed, order_name)
    own = getattr(spec, "shots", None)
    out.shots = shots if shots is not None else own
    if shots is not None and shots != own:
        out.name = f"{out.name}-{shots}shot"
    return out
