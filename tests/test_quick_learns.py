"""The --quick smoke profile learns, so a broken training path shows: for every registered method, the quick run on
digits (tiny random backbone, B0Inc2: 5 tasks of 2 classes) is compared with chance and with its own starting loss.

Margins (all on the fixed seed; the runs are deterministic):
* loss: the mean final training loss of the trained tasks is below 0.8 x ln(C) (C: the classes the loss covers),
  the loss of an untrained head; losses that are not a plain cross-entropy (CICAE sums K margin losses and a KL)
  are compared with their own first-epoch value instead, from the curve the method records;
* accuracy: A_avg is at least 1.5 x its chance value, mean_t 1 / (seen classes at t) (22.8% on digits B0Inc2);
  this holds for the lower bounds too, whose A_last is near chance by design (they forget);
* joint ends 20+ points above finetune, and aper-adapter's prototypes differ from simplecil's on the same images.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from cilbench.methods import METHODS, load_all, load_method
from cilbench.models.backbones import BACKBONES

LOSS_FRACTION = 0.8
CHANCE_FACTOR = 1.5
_RUNS: dict[str, dict] = {}


def _digits_methods() -> list[str]:
    """Every registered method whose default backbone has a tiny variant (what --quick runs on)."""
    names = []
    for name in load_all():
        backbone = METHODS.metadata(name).get("backbone")
        if backbone and BACKBONES.get(backbone).tiny:
            names.append(name)
    return names


def _trains(name: str) -> bool:
    """A method trains unless it declares every learning setting unused (``methods info`` hides them)."""
    return "lr" not in set(getattr(load_method(name), "unused_settings", ()))


def _quick(name: str, shared_cache: Path, tmp_path_factory) -> dict:
    if name not in _RUNS:
        from cilbench.engine.runner import Runner, RunOptions

        out = tmp_path_factory.mktemp(f"quick-{name}")
        record, _ = Runner(RunOptions(method=name, dataset="digits", quick=True, out=out, cache_dir=shared_cache,
                                      device="cpu")).run()
        _RUNS[name] = record
    return _RUNS[name]


def _chance_a_avg(record: dict) -> float:
    seen = np.cumsum([len(t) for t in _task_classes(record)])
    return 100 * float(np.mean(1 / seen))


def _task_classes(record: dict) -> list[list[int]]:
    inc = record["increments"]
    bounds = np.cumsum([0, *inc])
    order = record["class_order"]
    if record["run"]["merged_tasks"]:
        return [list(order)]
    return [list(order[bounds[i]:bounds[i + 1]]) for i in range(len(inc))]


def _loss_ratio(name: str, record: dict) -> float:
    """Mean final loss of the trained tasks over the loss an untrained model starts from."""
    own_reference = {"cicae": "ce", "podnet": "nca"}  # margin losses: their own first epoch is the reference
    if name in own_reference:  # CICAE: K margin-cosine CEs + lambda1 * KL; PODNet: NCA with a margin over all seen
        curves = [t["phases"]["train"]["epochs"][own_reference[name]] for t in record["log"]
                  if "train" in t["phases"]]
        return float(np.mean([c[-1] for c in curves]) / np.mean([c[0] for c in curves]))
    tasks = record["timings"]["tasks"]
    classes = _task_classes(record)
    if all("ce" in t["phases"].get("train", {}).get("epochs", {}) for t in record["log"]):
        # a CE plus distillation / L2 terms (the ZSCL family): the CE term is the one a plain ln(C) bounds
        pairs = [(t["phases"]["train"]["epochs"]["ce"][-1], math.log(len(classes[i])))
                 for i, t in enumerate(record["log"])]
        return float(np.mean([loss for loss, _ in pairs]) / np.mean([ref for _, ref in pairs]))
    pairs = [(t["final_loss"], math.log(len(classes[i]))) for i, t in enumerate(tasks) if t["final_loss"] is not None]
    return float(np.mean([loss for loss, _ in pairs]) / np.mean([ref for _, ref in pairs]))


@pytest.mark.parametrize("name", _digits_methods())
def test_quick_run_learns_or_trains_nothing(name, shared_cache, tmp_path_factory):
    record = _quick(name, shared_cache, tmp_path_factory)
    trained = [t["final_loss"] is not None for t in record["timings"]["tasks"]]
    # "methods info" hides the learning settings exactly when nothing trains
    assert any(trained) == _trains(name), f"{name}: unused_settings disagrees with what the run trained"
    if not any(trained):  # frozen random features score what they score (zero-shot CLIP: chance)
        return
    a_avg, chance = record["metrics"]["A_avg"], _chance_a_avg(record)
    assert a_avg >= CHANCE_FACTOR * chance, f"{name}: A_avg {a_avg:.1f} vs chance {chance:.1f}"
    ratio = _loss_ratio(name, record)
    assert ratio < LOSS_FRACTION, f"{name}: the training loss ends at {ratio:.2f} x its untrained value"


def test_joint_beats_finetune(shared_cache, tmp_path_factory):
    joint = _quick("joint", shared_cache, tmp_path_factory)["metrics"]["A_last"]
    finetune = _quick("finetune", shared_cache, tmp_path_factory)["metrics"]["A_last"]
    assert joint >= finetune + 20, (joint, finetune)


def test_aper_adapter_prototypes_differ_from_simplecil(shared_cache, tmp_path_factory):
    from cilbench.methods.aper import AperAdapter
    from cilbench.methods.simplecil import SimpleCIL

    assert AperAdapter.quick["transform"] == SimpleCIL.quick["transform"]  # the same images: a fair comparison
    aper = _quick("aper-adapter", shared_cache, tmp_path_factory)
    simple = _quick("simplecil", shared_cache, tmp_path_factory)
    # with an adapter that learned nothing, [phi || phi_A] = [phi || phi] scores exactly as phi alone
    assert aper["accuracy_matrix"] != simple["accuracy_matrix"]
