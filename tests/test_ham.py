"""HAM's grouping / pruning / merging (models/ham.py) and the LoRA baselines' task choice (methods/lora_cl.py), against
hand computations on tiny matrices and on vit-tiny (2 blocks of width 48)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from cilbench.errors import CilbenchError
from cilbench.models import ham as H
from cilbench.models.backbones import build_backbone


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    b = build_backbone("vit-tiny", pretrained=False).eval()
    b.requires_grad_(False)
    return b


def _images(n: int = 4) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def _train_like(ham: H.HAMLoRA, seed: int, alpha: float = 1.0) -> None:
    """Stand-in for a task's training: random B (A keeps LoRA's init) and the importance scalar set to ``alpha``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for e in ham.task_entries():
            e.B.copy_(torch.randn(e.B.shape, generator=gen) * 0.1)
        ham.task_alpha.fill_(alpha)


def _by_hand_prune(d: torch.Tensor, keep: float) -> torch.Tensor:
    """Zero all but the round(keep * n) largest |entries| (sorting, not topk)."""
    k = max(1, round(keep * d.numel()))
    order = d.abs().reshape(-1).argsort(descending=True)
    mask = torch.zeros(d.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return d * mask.reshape(d.shape)


def _count(*modules) -> int:
    seen, total = set(), 0
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel()
    return total


# ---- pruning and merging on tiny matrices ----

def test_magnitude_pruning_keeps_the_largest_magnitudes_per_layer_or_per_adapter():
    a = torch.tensor([[1.0, -5.0], [3.0, 0.5]])
    b = torch.tensor([[-0.2, 4.0], [0.1, -0.3]])
    per_layer = H.prune({"a": a, "b": b}, keep=0.5, scope="layer")
    assert torch.equal(per_layer["a"], torch.tensor([[0.0, -5.0], [3.0, 0.0]]))
    assert torch.equal(per_layer["b"], torch.tensor([[0.0, 4.0], [0.0, -0.3]]))
    # one threshold over both: the 4 largest of |1 5 3 .5 .2 4 .1 .3| are 5, 4, 3, 1
    whole = H.prune({"a": a, "b": b}, keep=0.5, scope="adapter")
    assert torch.equal(whole["a"], torch.tensor([[1.0, -5.0], [3.0, 0.0]]))
    assert torch.equal(whole["b"], torch.tensor([[0.0, 4.0], [0.0, 0.0]]))
    assert torch.equal(H.prune({"a": a}, keep=1.0)["a"], a)
    assert torch.equal(H.prune({"a": a}, keep=0.01)["a"], torch.tensor([[0.0, -5.0], [0.0, 0.0]]))  # at least one
    with pytest.raises(CilbenchError):
        H.prune({"a": a}, keep=0.0)


def test_a_group_delta_is_the_importance_scaled_sum_of_pruned_member_deltas(base):
    """Two adapters into one group (threshold -1: always join), by hand: D = a_G * (a_1 p(dW_1)) + a_2 p(dW_2) with
    the first group's trained scale a_G folded in (fold_scales) and reset to 1."""
    model = copy.deepcopy(base)
    ham = H.HAMLoRA(model, targets=("qkv", "proj"), r=4, alpha=8.0, max_groups=3)
    ham.new_task()
    _train_like(ham, seed=1, alpha=0.7)
    first = {n: _by_hand_prune(d, 0.25) * 0.7 for n, d in ham.task_delta(effective=False).items()}
    scale = ham.task_entries()[0].scale
    e = ham.task_entries()[0]
    assert torch.allclose(ham.task_delta(effective=False)["model.blocks.0.attn.qkv"], scale * e.B @ e.A)
    info = ham.consolidate(keep=0.25, threshold=-1.0)
    assert info["group"] == 0 and info["new_group"] and info["groups"] == 1
    for n, d in ham.group_delta(0, effective=False).items():
        assert torch.allclose(d, first[n], atol=1e-7)
    assert all(float(en.B.detach().abs().sum()) == 0 for en in ham.task_entries())  # inference through the group only
    with torch.no_grad():
        ham.group_alpha.fill_(0.5)  # as trained during the next task
    ham.new_task()
    _train_like(ham, seed=2, alpha=1.3)
    second = {n: _by_hand_prune(d, 0.25) * 1.3 for n, d in ham.task_delta(effective=False).items()}
    info = ham.consolidate(keep=0.25, threshold=-1.0)
    assert info["group"] == 0 and not info["new_group"] and info["group_sizes"] == [2]
    assert torch.equal(ham.group_alpha.detach(), torch.ones(1, 1))
    for n, d in ham.group_delta(0, effective=False).items():
        assert torch.allclose(d, 0.5 * first[n] + second[n], atol=1e-6)
    # the bank's delta is what the layer adds: W0 + sum_j a_Gj dW_Gj (+ the zeroed task adapter)
    layer = model.get_submodule("model.blocks.1.attn.proj")
    x = torch.randn(3, 48)
    dense = ham.group_delta(0)["model.blocks.1.attn.proj"]
    assert torch.allclose(layer(x), F.linear(x, layer._parameters["weight"] + dense, layer.bias), atol=1e-5)


def test_without_folding_the_new_member_joins_under_the_group_scale(base):
    ham = H.HAMLoRA(copy.deepcopy(base), targets=("qkv",), r=2, max_groups=2)
    ham.new_task()
    _train_like(ham, seed=3)
    ham.consolidate(keep=1.0, threshold=-1.0, fold=False)
    g0 = ham.group_delta(0, effective=False)
    with torch.no_grad():
        ham.group_alpha.fill_(0.5)
    ham.new_task()
    _train_like(ham, seed=4, alpha=2.0)
    new = ham.task_delta(effective=True)
    ham.consolidate(keep=1.0, threshold=-1.0, fold=False)
    assert float(ham.group_alpha.detach()) == 0.5
    for n, d in ham.group_delta(0, effective=False).items():
        assert torch.allclose(d, g0[n] + new[n], atol=1e-6)


def test_lowrank_store_is_the_truncated_svd_of_the_merged_delta(base):
    d = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.5]])
    B, A = H.truncated_factors(d, 2)
    assert torch.allclose(B @ A, torch.diag(torch.tensor([3.0, 2.0, 0.0])), atol=1e-6)
    B, A = H.truncated_factors(d, 5)  # padded beyond min(out, in): exact
    assert B.shape == (3, 5) and torch.allclose(B @ A, d, atol=1e-6)
    # a single rank-2 LoRA, unpruned, fits rank 2 exactly
    ham = H.HAMLoRA(copy.deepcopy(base), targets=("qkv",), r=2, max_groups=2, store="lowrank", rank=2)
    ham.new_task()
    _train_like(ham, seed=5)
    eff = ham.task_delta()
    ham.consolidate(keep=1.0)
    for n, g in ham.group_delta(0).items():
        assert torch.allclose(g, eff[n], atol=1e-5)


def test_consolidating_unpruned_into_a_new_group_keeps_the_trained_function(base):
    """keep = 1 and a new group: the merged model computes what the model computed at the end of training."""
    for store in H.STORES:
        model = copy.deepcopy(base)
        ham = H.HAMLoRA(model, r=4, max_groups=4, store=store, rank=8)
        for t in range(3):
            ham.new_task()
            _train_like(ham, seed=10 + t, alpha=0.5 + t)
            with torch.no_grad():
                ham.group_alpha.fill_(0.8)
            before = model(_images())
            ham.consolidate(keep=1.0, threshold=2.0)  # threshold above any cosine: a new group while room
            assert torch.allclose(model(_images()), before, atol=1e-5), store


# ---- grouping ----

def test_group_choice_most_similar_new_while_room_and_threshold():
    assert H.choose_group([], max_groups=3, threshold=0.5) == (0, True)
    assert H.choose_group([0.9, 0.2], max_groups=3, threshold=0.5) == (0, False)  # similar enough: join
    assert H.choose_group([0.1, 0.3], max_groups=3, threshold=0.5) == (2, True)  # below threshold, room: new
    assert H.choose_group([0.1, 0.3], max_groups=2, threshold=0.5) == (1, False)  # full: the most similar
    assert H.choose_group([0.4, 0.4], max_groups=2, threshold=0.5) == (0, False)  # ties: the lower index
    assert H.choose_group([-0.2], max_groups=1, threshold=0.9) == (0, False)


def test_similarity_of_flattened_deltas_concatenated_or_averaged_per_layer():
    a = {"l1": torch.tensor([[1.0, 0.0]]), "l2": torch.tensor([[0.0, 2.0]])}
    b = {"l1": torch.tensor([[1.0, 0.0]]), "l2": torch.tensor([[0.0, -1.0]])}
    # concat: (1 - 2) / (sqrt 5 * sqrt 2); mean: (1 + -1) / 2
    assert H.similarity(a, b, "concat") == pytest.approx(-1 / 10 ** 0.5)
    assert H.similarity(a, b, "mean") == pytest.approx(0.0)
    assert H.similarity(a, {k: 0 * v for k, v in b.items()}) == 0.0


def test_hand_made_adapters_join_the_most_similar_group(base):
    """Three groups from orthogonal-ish adapters; an adapter equal to group 1's delta (times 3) joins group 1; with
    room and a low similarity a new group opens; when full, the most similar group is joined."""
    ham = H.HAMLoRA(copy.deepcopy(base), targets=("qkv",), r=2, max_groups=4)
    for t in range(3):
        ham.new_task()
        _train_like(ham, seed=20 + t)
        assert ham.consolidate(keep=1.0, threshold=0.99)["group"] == t
    ham.new_task()
    target = ham.group_delta(1, effective=False)
    with torch.no_grad():  # dW = scale * B A = 3 * group 1's delta (rank 2: its SVD factors)
        for n, bank in ham.banks.items():
            e = bank.entries[0]
            u, sv, vh = torch.linalg.svd(target[n])
            e.A.copy_(vh[:2])
            e.B.copy_(3 * u[:, :2] * sv[:2] / e.scale)
    info = ham.consolidate(keep=1.0, threshold=0.99)
    assert info["group"] == 1 and not info["new_group"] and info["similarities"][1] == pytest.approx(1.0, abs=1e-4)
    ham.new_task()
    _train_like(ham, seed=30)
    info = ham.consolidate(keep=1.0, threshold=0.99)
    assert info["new_group"] and info["group"] == 3 and max(info["similarities"]) < 0.99
    ham.new_task()
    _train_like(ham, seed=31)
    info = ham.consolidate(keep=1.0, threshold=0.99)
    best = max(range(4), key=lambda j: info["similarities"][j])
    assert not info["new_group"] and info["group"] == best and info["group_sizes"][best] >= 2


# ---- bounded memory ----

@pytest.mark.parametrize("store", H.STORES)
def test_fifty_tasks_keep_parameters_and_buffers_constant_once_the_groups_exist(base, store):
    model = copy.deepcopy(base)
    ham = H.HAMLoRA(model, r=2, max_groups=3, store=store, rank=4)
    counts = []
    for t in range(50):
        ham.new_task()
        _train_like(ham, seed=100 + t)
        ham.consolidate(keep=0.2, threshold=0.5)
        counts.append(_count(model, ham))
    assert ham.num_groups == 3 and int(ham.group_sizes.sum()) == 50
    assert len(set(counts[2:])) == 1 and counts[0] < counts[1] < counts[2]
    per_group = counts[2] - counts[1]
    layers = len(ham.banks)  # qkv + proj in 2 blocks
    assert layers == 4
    if store == "dense":  # a dense delta per layer (+ the group's scale and member count)
        assert per_group == 2 * (144 * 48 + 48 * 48) + 1 + 1
    else:  # B [out, 4] and A [4, in] per layer
        assert per_group == 2 * (144 * 4 + 4 * 48 + 48 * 4 + 4 * 48) + 1 + 1


# ---- what trains ----

def test_group_scales_train_while_group_deltas_stay_frozen(base):
    model = copy.deepcopy(base)
    ham = H.HAMLoRA(model, r=2, max_groups=2)
    ham.new_task()
    _train_like(ham, seed=40)
    ham.consolidate(keep=0.5)
    ham.new_task()
    frozen = {n: g.delta.clone() for n, g in ham.groups.items()}
    params = ham.trainable()
    ids = {id(p) for p in params}
    assert id(ham.group_alpha) in ids and id(ham.task_alpha) in ids
    assert not any(id(g.delta) in ids for g in ham.groups.values()) and not any(g.delta.requires_grad
                                                                             for g in ham.groups.values())
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".lora." not in n)
    opt = torch.optim.Adam(params, lr=0.05)
    alpha0 = ham.group_alpha.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        model(_images()).pow(2).mean().backward()
        opt.step()
    assert not torch.equal(ham.group_alpha.detach(), alpha0)
    assert all(torch.equal(g.delta, frozen[n]) for n, g in ham.groups.items())
    assert float(ham.task_entries()[0].B.detach().abs().sum()) > 0  # the task adapter trains


def test_the_layer_computes_w0_plus_scaled_groups_plus_scaled_task_adapter(base):
    model = copy.deepcopy(base)
    ham = H.HAMLoRA(model, targets=("qkv",), r=2, max_groups=2, scope="layer")
    for t in range(2):
        ham.new_task()
        _train_like(ham, seed=50 + t)
        ham.consolidate(keep=0.5, threshold=2.0)
    ham.new_task()
    _train_like(ham, seed=60)
    with torch.no_grad():
        ham.group_alpha.copy_(torch.tensor([[0.3, -0.2], [1.5, 0.4]]))  # per group, per layer
        ham.task_entries()[1].gain.fill_(0.25)
    name = "model.blocks.1.attn.qkv"
    layer = model.get_submodule(name)
    e = ham.banks[name].entries[0]
    d0, d1 = (ham.groups[name].raw(j) for j in range(2))
    x = torch.randn(5, 48)
    expected = (x @ layer._parameters["weight"].T + layer.bias + 0.4 * x @ d1.T - 0.2 * x @ d0.T
                + 0.25 * e.scale * x @ (e.B @ e.A).T)
    assert torch.allclose(layer(x), expected, atol=1e-5)
    assert type(layer) is H.HAMLinear  # the groups folded into the weight per call: the bank's numbers
    assert torch.allclose(layer(x), F.linear(x, layer._parameters["weight"], layer.bias) + ham.banks[name](x),
                          atol=1e-5)
    with ham.handle.disabled():
        assert torch.equal(layer(x), F.linear(x, layer._parameters["weight"], layer.bias))


def test_a_resumed_ham_rebuilds_its_groups_from_the_checkpoint(base):
    from cilbench.methods.ham import HAM

    cfg = HAM.Config(max_groups=3)
    tasks = [SimpleNamespace(index=i, classes=[2 * i, 2 * i + 1]) for i in range(2)]
    a = HAM(cfg, copy.deepcopy(base), SimpleNamespace(tasks=tasks))
    for t in tasks:
        a.before_task(t)
        _train_like(a.ham, seed=70 + t.index)
        a.ham.consolidate(keep=0.3, threshold=2.0)
    b = HAM(cfg, copy.deepcopy(base), SimpleNamespace(tasks=tasks))
    for t in tasks:
        b.before_task(t)  # structure replayed; the groups come from the state
    b.load_checkpoint_state(a.checkpoint_state())
    assert b.ham.num_groups == 2
    a.eval(), b.eval()
    classes = torch.arange(4)
    assert torch.equal(a.logits(_images(), classes), b.logits(_images(), classes))


# ---- lora-per-task ----

def test_lora_per_task_chooses_the_task_of_the_nearest_frozen_prototype_and_scores_with_its_adapter(base):
    from cilbench.methods.lora_cl import UNCHOSEN, LoRAPerTask

    tasks = [SimpleNamespace(index=i, classes=[2 * i, 2 * i + 1]) for i in range(2)]
    m = LoRAPerTask(LoRAPerTask.Config(lora_rank=2), copy.deepcopy(base), SimpleNamespace(tasks=tasks)).eval()
    for t in tasks:
        m.before_task(t)
        with torch.no_grad():
            for k, e in enumerate(m.live_entries()):
                e.B.copy_(torch.randn(e.B.shape, generator=torch.Generator().manual_seed(t.index * 10 + k)) * 0.2)
        m.store.save(t.index)
    # hand-made prototypes in the frozen feature space: class 0, 1 (task 0) along e0, e1; class 2, 3 (task 1) e2, e3
    protos = torch.eye(48)[:4]
    m.prototypes.set(torch.arange(4), protos)
    feats = torch.zeros(3, 48)
    feats[0, 1], feats[0, 2] = 1.0, 0.5  # nearest: class 1 -> task 0
    feats[1, 3], feats[1, 0] = 2.0, 1.0  # nearest: class 3 -> task 1
    feats[2, 2] = 1.0  # class 2 -> task 1
    assert m.select(feats, torch.arange(4)).tolist() == [0, 1, 1]
    assert m.select(feats, torch.tensor([0, 1])).tolist() == [0, 0, 0]  # only task 0's classes are candidates

    images = _images(3)
    with m.handle.disabled():
        plain = m.backbone(images)
    tasks_of = m.select(plain, torch.arange(4))
    out = m.logits(images, torch.arange(4))
    for i, t in enumerate(tasks_of.tolist()):
        m.store.load(t)
        own = m.head(m.backbone(images[i:i + 1]), torch.tensor([2 * t, 2 * t + 1]))[0]
        assert torch.allclose(out[i, 2 * t:2 * t + 2], own, atol=1e-5)
        other = [c for c in range(4) if c // 2 != t]
        assert (out[i, other] == UNCHOSEN).all()


def test_ham_with_lowrank_groups_per_layer_scales_and_prototypes_resumes_with_identical_numbers(tmp_path, monkeypatch):
    """The registry test runs the defaults; this runs the other structure (lowrank groups, per-layer scales, the
    prototype classifier) through the runner, interrupted after task 0 and resumed."""
    from cilbench.engine.runner import Runner
    from cilbench.plan import RunOptions

    sets = {"epochs": "1", "group_store": "lowrank", "group_rank": "4", "importance_scope": "layer",
            "classifier": "prototype", "max_groups": "2"}

    def run(out, resume=False):
        opts = RunOptions("ham", "synthetic", scenario="B0Inc5", seed=5, sets=sets, out=out, quick=True,
                          resume=resume)
        return Runner(opts).run()[0]

    full = run(tmp_path / "full")
    assert [t["ham_groups"] for t in full["log"]] == [1, 2, 2, 2]
    monkeypatch.setenv("CILBENCH_TEST_INTERRUPT_AFTER_TASK", "1")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed")
    monkeypatch.delenv("CILBENCH_TEST_INTERRUPT_AFTER_TASK")
    resumed = run(tmp_path / "resumed", resume=True)
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    assert [t["final_loss"] for t in resumed["timings"]["tasks"]] == [t["final_loss"] for t in full["timings"]["tasks"]]
