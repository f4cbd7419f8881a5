"""ExemplarMemory: herding picks worked on paper, budgets and cuts over three tasks, random selection, TaskData
hand-over and the state round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from cilbench.data.memory import ExemplarMemory, herding_icarl, herding_pycil
from cilbench.engine.loader import TaskData

# Four 2-D points; normalised they are x0 = (1, 0), x1 = (0, 1), x2 = (0.6, 0.8), x3 = (-0.6, 0.8) (the first two
# are given at other lengths to check the normalisation). Their mean is mu = (1, 2.6) / 4 = (0.25, 0.65).
TOY = torch.tensor([[2.0, 0.0], [0.0, 0.5], [3.0, 4.0], [-3.0, 4.0]])

# With unit vectors, |mu - (S + x)/k|^2 is smallest where (k mu - S) . x is largest, so both forms score
# s_k(x) = (k mu - S) . x at step k; they differ in S and in the pool.
#
# PyCIL (picked points leave the pool; S = sum of the picks):
#   k=1: mu             = (0.25, 0.65):  x0 .25, x1 .65, x2 .15+.52 = .67, x3 -.15+.52 = .37   -> x2
#   k=2: 2mu - x2       = (-0.1, 0.5):   x0 -.1, x1 .5,  x3 .06+.40 = .46                       -> x1
#   k=3: 3mu - x2 - x1  = (0.15, 0.15):  x0 .15, x3 -.09+.12 = .03                              -> x0
#   k=4: only x3 is left                                                                        -> x3
# iCaRL / DNE (w starts at mu, w += mu - x_picked; every point stays a candidate):
#   1: w = (0.25, 0.65):  best x2 (.67)                                      -> x2, rank 1
#   2: w = (-0.1, 0.5):   x0 -.1, x1 .5, x2 -.06+.40 = .34, x3 .46           -> x1, rank 2
#   3: w = (0.15, 0.15):  x0 .15, x1 .15, x2 .09+.12 = .21, x3 .03           -> x2 again: no new exemplar
#   4: w = (-0.2, 0.0):   x0 -.2, x1 0, x2 -.12, x3 .12                      -> x3, rank 3
#   5: w = (0.65, -0.15): x0 .65, x1 -.15, x2 .27, x3 -.51                   -> x0, rank 4
PYCIL_ORDER = [2, 1, 0, 3]
ICARL_ORDER = [2, 1, 3, 0]


def test_pycil_herding_by_hand():
    for m in range(1, 5):
        assert herding_pycil(TOY, m).tolist() == PYCIL_ORDER[:m]
    assert herding_pycil(TOY, 9).tolist() == PYCIL_ORDER  # never more than the class has


def test_icarl_herding_by_hand_differs_after_a_repeat_pick():
    for m in range(1, 5):
        assert herding_icarl(TOY, m).tolist() == ICARL_ORDER[:m]
    assert herding_pycil(TOY, 3).tolist() != herding_icarl(TOY, 3).tolist()


def test_icarl_herding_fills_up_after_its_iteration_cap():
    # identical points: w stays mu, the first point wins every time (ties go to the lowest index), so after
    # 1000 iterations one exemplar is picked and the others follow in index order
    same = torch.ones(3, 2)
    assert herding_icarl(same, 3).tolist() == [0, 1, 2]
    assert herding_icarl(same, 3, max_iterations=1).tolist() == [0, 1, 2]
    assert herding_pycil(same, 3).tolist() == [0, 1, 2]


def test_update_herds_per_class_and_maps_to_store_rows():
    mem = ExemplarMemory(per_class=3, herding_form="icarl")
    # class 7 is the toy set at store rows 100..103; class 9 is two other rows; a row of class 5 is ignored
    labels = torch.tensor([7, 9, 7, 7, 9, 7, 5])
    rows = torch.tensor([100, 200, 101, 102, 201, 103, 300])
    feats = torch.cat([TOY[:1], torch.tensor([[1.0, 0.0]]), TOY[1:3], torch.tensor([[0.0, 1.0]]), TOY[3:],
                       torch.zeros(1, 2)])
    mem.update(labels, rows, feats, classes=[7, 9])
    assert mem.rows_of(7).tolist() == [100 + i for i in ICARL_ORDER[:3]] == [102, 101, 103]
    assert sorted(mem.rows_of(9).tolist()) == [200, 201]  # fewer samples than the quota: all of them
    assert mem.per_class_counts == {7: 3, 9: 2} and len(mem) == 5 and mem.classes.tolist() == [7, 9]
    assert mem.labels.tolist() == [7, 7, 7, 9, 9]
    with pytest.raises(ValueError, match="already in the memory"):
        mem.update(labels, rows, feats, classes=[9])
    with pytest.raises(ValueError, match=r"classes \[8\] have no rows"):
        mem.update(labels, rows, feats, classes=[5, 8])
    assert mem.per_class_counts == {7: 3, 9: 2}  # a refused update changes nothing
    mem.update_from(TaskData(np.zeros((400, 1, 1, 3), np.uint8), rows.numpy(), labels.numpy()), feats.numpy())
    assert mem.per_class_counts == {7: 3, 9: 2, 5: 1} and mem.rows_of(5).tolist() == [300]


def _task(first_class: int, n_per_class: int, gen: torch.Generator):
    """Two classes of random features at consecutive store rows."""
    labels = torch.arange(first_class, first_class + 2).repeat_interleave(n_per_class)
    rows = torch.arange(len(labels)) + 1000 * first_class
    return labels, rows, torch.randn(len(labels), 8, generator=gen)


@pytest.mark.parametrize("form", ["pycil", "icarl"])
def test_total_budget_over_three_tasks_cuts_to_the_first_m(form):
    gen = torch.Generator().manual_seed(0)
    mem = ExemplarMemory(total=20, herding_form=form)
    herd = herding_pycil if form == "pycil" else herding_icarl
    history: dict[int, list[int]] = {}
    for first, per_class in ((0, 10), (2, 5), (4, 3)):  # 2 -> 4 -> 6 classes: 20 // classes per class
        labels, rows, feats = _task(first, 12, gen)
        before = {c: mem.rows_of(c).tolist() for c in mem.classes.tolist()}
        mem.update(labels, rows, feats)
        assert mem.quota(len(mem.classes)) == per_class
        assert mem.per_class_counts == {c: per_class for c in range(first + 2)}
        assert len(mem) <= 20
        for c, old in before.items():  # old classes keep their first exemplars, in order
            assert mem.rows_of(c).tolist() == old[:per_class] == history[c][:per_class]
        for c in (first, first + 1):  # new classes: the herding order of their own features
            where = (labels == c).nonzero().flatten()
            history[c] = rows[where[herd(feats[where], 10)]].tolist()
            assert mem.rows_of(c).tolist() == history[c][:per_class]


def test_per_class_budget_never_cuts():
    gen = torch.Generator().manual_seed(1)
    mem = ExemplarMemory(per_class=4)
    for first in (0, 2, 4):
        mem.update(*_task(first, 6, gen))
    assert mem.per_class_counts == {c: 4 for c in range(6)} and len(mem) == 24


def test_random_selection_is_reproducible_with_a_seed():
    labels, rows, _ = _task(0, 50, torch.Generator().manual_seed(2))

    def pick(seed):
        mem = ExemplarMemory(per_class=5, selection="random")
        mem.update(labels, rows, generator=seed)
        return mem.rows.tolist()

    first = pick(3)
    assert first == pick(3) == pick(torch.Generator().manual_seed(3))
    assert first != pick(4)
    assert len(set(first)) == 10 and set(first[:5]) <= set(range(50)) and set(first[5:]) <= set(range(50, 100))
    with pytest.raises(ValueError, match="Generator or an int seed"):
        ExemplarMemory(per_class=5, selection="random").update(labels, rows)


def test_as_task_data_joins_a_tasks_data():
    store = np.zeros((10, 4, 4, 3), dtype=np.uint8)
    mem = ExemplarMemory(per_class=2, selection="random")
    mem.update(np.array([0, 0, 0, 1, 1]), np.array([1, 2, 3, 4, 5]), generator=0)
    task = TaskData(store, np.array([7, 8]), np.array([2, 2]))
    replay = TaskData.concat([task, mem.as_task_data(task)])
    assert replay.images is store and len(replay) == 6
    assert replay.labels.tolist() == [2, 2, 0, 0, 1, 1] and replay.indices.dtype == np.int64
    assert set(replay.indices[2:4]) <= {1, 2, 3} and set(replay.indices[4:]) == {4, 5}
    with pytest.raises(ValueError, match="outside the store"):
        mem.as_task_data(TaskData(store[:3], np.array([0]), np.array([0])))


class _Owner(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(2, 2)
        self.memory = ExemplarMemory(total=20)


def test_state_round_trip_through_an_owner_and_a_tensor_file(tmp_path):
    gen = torch.Generator().manual_seed(5)
    owner = _Owner()
    for first in (0, 2):
        owner.memory.update(*_task(first, 12, gen))
    state = owner.state_dict()
    assert {k for k in state if k.startswith("memory.")} == {"memory.class_ids", "memory.counts", "memory.rows"}
    torch.save(state, tmp_path / "ck.pt")
    fresh = _Owner()
    fresh.load_state_dict(torch.load(tmp_path / "ck.pt", weights_only=True))  # tensors only, no pickled objects
    assert fresh.memory.per_class_counts == owner.memory.per_class_counts == {0: 5, 1: 5, 2: 5, 3: 5}
    assert torch.equal(fresh.memory.rows, owner.memory.rows)
    fresh.memory.update(*_task(4, 12, gen))  # and it goes on: 6 classes -> 3 each, the first 3 kept
    assert fresh.memory.rows_of(0).tolist() == owner.memory.rows_of(0).tolist()[:3]
    fresh.to(torch.float64)  # the owner's casts and moves leave the rows alone
    assert fresh.memory.rows.dtype == torch.long and fresh.memory.rows.device.type == "cpu"


def test_an_inconsistent_state_is_refused():
    mem = ExemplarMemory(per_class=2)
    bad = {"class_ids": torch.tensor([0, 1]), "counts": torch.tensor([2, 2]), "rows": torch.tensor([1, 2, 3])}
    with pytest.raises(RuntimeError, match="inconsistent exemplar memory"):
        mem.load_state_dict(bad)
    with pytest.raises(RuntimeError, match="1-D int64"):
        mem.load_state_dict({**bad, "rows": torch.zeros(4)})


def test_budget_arguments_are_checked():
    with pytest.raises(ValueError, match="exactly one budget"):
        ExemplarMemory()
    with pytest.raises(ValueError, match="exactly one budget"):
        ExemplarMemory(total=10, per_class=2)
    with pytest.raises(ValueError, match="selection"):
        ExemplarMemory(total=10, selection="closest")  # type: ignore[arg-type]
