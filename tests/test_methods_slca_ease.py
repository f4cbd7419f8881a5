"""SLCA and EASE: their equations by hand on tiny tensors, what trains and what stays frozen, and end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cilbench.data.scenario import Task
from cilbench.engine.trainer import build_optimizer
from cilbench.methods.base import Batch
from cilbench.methods.ease import EASE, complement, reweighted_logits
from cilbench.methods.slca import SLCA, normalised_logits
from cilbench.models.backbones import build_backbone


def _scenario(n_tasks: int, per_task: int) -> SimpleNamespace:
    tasks = [Task(t, f"task {t + 1}", "x", tuple(range(t * per_task, (t + 1) * per_task)),
                  tuple(range(t * per_task, (t + 1) * per_task))) for t in range(n_tasks)]
    return SimpleNamespace(tasks=tasks)


# ---- SLCA ----

def test_slca_logit_normalisation_by_hand():
    logits = torch.tensor([[3.0, 4.0, 6.0, 8.0, 0.0], [1.0, 0.0, 0.0, 0.0, 2.0]])
    out = normalised_logits(logits, [2, 3], tau=0.1)
    # row 0: task norms 5 and 10, mean 7.5; row 1: task norms 1 and 2, mean 1.5 (each + 1e-7)
    n0 = ((5 + 1e-7) + (10 + 1e-7)) / 2
    n1 = ((1 + 1e-7) + (2 + 1e-7)) / 2
    expected = torch.stack([logits[0] / n0 / 0.1, logits[1] / n1 / 0.1])
    assert torch.allclose(out, expected)
    assert out[0, 3].item() == pytest.approx(8 / 7.5 / 0.1)
    # scale invariant: multiplying the logits leaves them unchanged
    assert torch.allclose(normalised_logits(7 * logits, [2, 3], 0.1), out, atol=1e-5)


def test_slca_alignment_trains_the_head_only_and_separates_the_classes():
    torch.manual_seed(0)
    scenario = _scenario(3, 2)
    cfg = SLCA.Config(ca_epochs=5, ca_samples_per_class=64, ca_batch_size=64)
    method = SLCA(cfg, build_backbone("vit-tiny", pretrained=False), scenario)
    dim = method.backbone.feature_dim
    centres = 2 * torch.randn(6, dim)
    for task in scenario.tasks:
        method.before_task(task)
        feats = torch.cat([centres[c] + 0.5 * torch.randn(40, dim) for c in task.classes])
        method.stats.add(feats, torch.tensor(task.classes).repeat_interleave(40))
        method.stage1_head.heads[-1].load_state_dict(method.head.heads[-1].state_dict())
    assert all(p.requires_grad for p in method.backbone.parameters())  # full fine-tuning: the backbone could move
    backbone_before = {k: v.clone() for k, v in method.backbone.state_dict().items()}
    head_before = {k: v.clone() for k, v in method.head.state_dict().items()}
    seen = torch.arange(6)
    probe, labels = method.stats.sample(seen, 100, generator=torch.Generator().manual_seed(1))
    acc_before = (method.head(probe, seen).argmax(1) == labels).float().mean()

    curve = _align(method, scenario.tasks[-1], seed=3)

    assert len(curve) == 5 and curve[-1] < curve[0]
    assert all(torch.equal(v, method.backbone.state_dict()[k]) for k, v in backbone_before.items())
    assert all(not torch.equal(v, method.head.state_dict()[k]) for k, v in head_before.items())  # every task head
    acc_after = (method.head(probe, seen).argmax(1) == labels).float().mean()
    assert acc_after > 0.95 and acc_after > acc_before
    # every alignment starts again from the stage-1 heads (ca_from_stage1): the same seed gives the same heads
    aligned = {k: v.clone() for k, v in method.head.state_dict().items()}
    _align(method, scenario.tasks[-1], seed=3)
    assert all(torch.equal(v, method.head.state_dict()[k]) for k, v in aligned.items())


def _align(method, task, seed: int) -> list[float]:
    """SLCA's alignment phase run by the one trainer; its per-epoch mean loss."""
    from cilbench.engine.trainer import run_phase

    method.eval()
    stats = run_phase(method, method.alignment(seed), method.cfg, task, None, None, torch.device("cpu"), seed)
    return stats.epoch_terms["loss"]


def test_slca_stage1_trains_backbone_slowly_and_only_the_new_head():
    torch.manual_seed(0)
    scenario = _scenario(2, 2)
    method = SLCA(SLCA.Config(), build_backbone("vit-tiny", pretrained=False), scenario)
    for task in scenario.tasks:
        method.before_task(task)
    groups = method.param_groups(scenario.tasks[1])
    assert groups[0]["lr"] == pytest.approx(1e-4) and groups[1]["lr"] == pytest.approx(1e-2)
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in method.head.heads[1].parameters()}
    images = torch.rand(4, 3, 32, 32)
    loss = method.training_step(Batch(images, torch.tensor([2, 3, 3, 2]), scenario.tasks[1]))
    loss.backward()
    assert method.head.heads[0].weight.grad is None  # CE over the current task's classes only
    assert method.head.heads[1].weight.grad.abs().sum() > 0


# ---- EASE ----

def test_ease_complement_by_hand():
    own_old = torch.tensor([[1.0, 0.0]])
    own_anchor = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # cosines 1 and 0 with the old prototype
    new_anchor = torch.tensor([[2.0, 0.0], [0.0, 4.0]])
    e = math.e
    expected = torch.tensor([[2 * e / (e + 1), 4 / (e + 1)]])
    assert torch.allclose(complement(own_old, own_anchor, new_anchor), expected)


def test_ease_method_synthesises_old_prototypes_in_later_subspaces():
    torch.manual_seed(0)
    scenario = _scenario(3, 2)
    method = EASE(EASE.Config(), build_backbone("vit-tiny", pretrained=False), scenario)
    for task in scenario.tasks:
        method.before_task(task)
    p = method.prototypes
    assert p.shape == (6, 3, method.backbone.feature_dim)
    real = torch.randn_like(p)
    for c in range(6):  # the real prototypes: class c of task t in subspaces 0..t
        t = c // 2
        p[c, : t + 1] = real[c, : t + 1]
    method.complement_old(2)

    def by_hand(c: int, j: int) -> torch.Tensor:
        i = c // 2
        anchors = list(range(2 * j, 6))  # every class of tasks j..2 (recalc_sim, as the official code)
        cos = torch.tensor([torch.cosine_similarity(real[c, i], real[a, i], dim=0) for a in anchors])
        w = torch.exp(cos) / torch.exp(cos).sum()
        return sum(w[n] * real[a, j] for n, a in enumerate(anchors))

    for c, j in [(0, 1), (0, 2), (1, 2), (2, 2), (3, 2)]:
        assert torch.allclose(method.prototypes[c, j], by_hand(c, j), atol=1e-5), (c, j)
    assert torch.equal(method.prototypes[4:], real[4:])  # the newest task's classes keep their own means


def test_ease_reweighted_logits_by_hand():
    feats = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 1.0]]])  # [S=3, B=1, D=2]
    protos = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]],  # class 0, own subspace 0
                           [[0.0, 1.0], [0.0, 2.0], [1.0, 1.0]]])  # class 1, own subspace 2
    out = reweighted_logits(feats, protos, torch.tensor([0, 2]), alpha=0.1)
    r = 1 / math.sqrt(2)
    w = 0.1 / 2  # alpha over the T - 1 = 2 other subspaces
    expected = torch.tensor([[1.0 + w * 0.0 + w * r, 1.0 + w * 0.0 + w * 1.0]])
    assert torch.allclose(out, expected)
    # with the PTM as subspace 0: beta on it, alpha / (adapters - 1) on the other adapter
    out = reweighted_logits(feats, protos, torch.tensor([1, 2]), alpha=0.1, beta=0.5)
    expected = torch.tensor([[0.5 * 1.0 + 0.0 + 0.1 * r, 0.5 * 0.0 + 0.1 * 1.0 + 1.0]])  # own: 1 and 2
    assert torch.allclose(out, expected)


def _train_steps(method, task, steps: int = 3) -> None:
    method.before_fit(task, None)
    opt = build_optimizer(method.param_groups(task), method.cfg)
    method.train()
    for s in range(steps):
        gen = torch.Generator().manual_seed(s)
        images = torch.rand(8, 3, 32, 32, generator=gen)
        labels = torch.tensor(task.classes).repeat(4)
        loss = method.training_step(Batch(images, labels, task))
        opt.zero_grad()
        loss.backward()
        opt.step()
    method.eval()


def test_ease_trains_only_the_new_adapter_and_freezes_old_ones():
    torch.manual_seed(0)
    scenario = _scenario(2, 2)
    method = EASE(EASE.Config(lr=0.5), build_backbone("vit-tiny", pretrained=False), scenario)
    backbone = {k: v.clone() for k, v in method.backbone.state_dict().items() if ".adapters." not in k}
    method.before_task(scenario.tasks[0])
    _train_steps(method, scenario.tasks[0])
    first = [p.detach().clone() for p in method.vit.expert_parameters(0)]
    assert any(f.abs().sum() > 0 for f in first[1::2])  # the zero-initialised up-projection has moved
    method.before_task(scenario.tasks[1])
    assert not any(p.requires_grad for p in method.vit.expert_parameters(0))
    new_before = [p.detach().clone() for p in method.vit.expert_parameters(1)]
    _train_steps(method, scenario.tasks[1])
    assert all(torch.equal(a, b) for a, b in zip(first, method.vit.expert_parameters(0)))
    assert any(not torch.equal(a, b) for a, b in zip(new_before, method.vit.expert_parameters(1)))
    state = method.backbone.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in backbone.items())  # the pre-trained ViT never moves
    # the checkpoint holds adapters and prototypes, no backbone weight (the temporary head goes after the task)
    method.proxy = None
    keys = method.checkpoint_state().keys()
    assert "prototypes" in keys and any(".adapters.experts.1." in k for k in keys)
    assert all(k in ("prototypes", "class_task") or ".adapters." in k for k in keys)


def test_ease_features_run_every_adapter_in_one_batched_pass():
    torch.manual_seed(0)
    scenario = _scenario(3, 2)
    method = EASE(EASE.Config(), build_backbone("vit-tiny", pretrained=False), scenario).eval()
    for task in scenario.tasks:
        method.before_task(task)
    for k in range(3):
        for p in method.vit.expert_parameters(k):
            torch.nn.init.normal_(p, std=0.05)
    images = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        batched = method.features(images)
        one_by_one = method.vit(images, experts=[0, 1, 2], batched=False)
    assert batched.shape == (3, 5, method.backbone.feature_dim)
    assert torch.allclose(batched, one_by_one, atol=1e-5)
    assert not torch.allclose(batched[0], batched[1])


# ---- end to end ----

def _record(out: Path) -> dict:
    files = list(out.glob("*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


@pytest.mark.parametrize("method", ["slca", "ease"])
def test_run_on_synthetic(cli, tmp_path, method):
    out = tmp_path / "res"
    r = cli("run", method, "--dataset", "synthetic", "--quick", "--set", "epochs=3", "--out", out)
    assert r.code == 0, r.err + r.out
    rec = _record(out)
    assert rec["method"] == method and rec["status"] == "complete" and rec["increments"] == [5, 5, 5, 5]
    m = np.array([[np.nan if v is None else v for v in row] for row in rec["accuracy_matrix"]])
    assert m.shape == (4, 4) and not np.isnan(m[np.tril_indices(4)]).any()
    if method == "slca":
        # alignment from the second task on
        assert ["align" in t["phases"] for t in rec["log"]] == [False, True, True, True]
        assert rec["config"]["ca_epochs"] == SLCA.quick["ca_epochs"] and rec["config"]["epochs"] == 3
    else:
        assert rec["metrics"]["A_last"] > 30  # prototypes over adapter subspaces: far above chance (5%)
    assert not list((out / ".checkpoints").glob("*.pt"))


def test_slca_transforms_follow_the_official_pipelines():
    from cilbench.data.augment import PRESETS

    cifar, imagenet, cub = PRESETS["slca-cifar"], PRESETS["slca-imagenet"], PRESETS["slca-cub"]
    assert cifar.mean == (0.5071, 0.4867, 0.4408) and cifar.std == (0.2675, 0.2565, 0.2761)
    assert imagenet.mean == cub.mean == (0.485, 0.456, 0.406) and imagenet.std == (0.229, 0.224, 0.225)
    assert cifar.scale == imagenet.scale == (0.08, 1.0) and cifar.interpolation == "bicubic" and cifar.flip
    assert cub.scale == pytest.approx(((224 / 300) ** 2,) * 2) and cub.ratio == (1.0, 1.0)  # Resize(300) + crop 224
    assert cifar.eval_crop == imagenet.eval_crop == cub.eval_crop == 224 / 256
    images = torch.zeros(2, 8, 8, 3, dtype=torch.uint8)  # black images come out at -mean / std
    out = imagenet.with_size(16)(images, train=False)
    assert out[:, 0].flatten().tolist() == pytest.approx([-0.485 / 0.229] * 512)


def test_slca_replaces_the_final_layernorm_with_a_fresh_one():
    backbone = build_backbone("vit-tiny", pretrained=False)
    with torch.no_grad():
        backbone.model.norm.weight.fill_(3.0)  # stands for the pre-trained values
    old = backbone.model.norm
    scenario = _scenario(2, 2)
    method = SLCA(SLCA.Config(), backbone, scenario)
    method.before_task(scenario.tasks[0])
    norm = method.backbone.model.norm
    assert norm is not old and isinstance(norm, torch.nn.LayerNorm) and norm.eps == 1e-5  # nn.LayerNorm(768)
    assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0) and norm.weight.requires_grad
    assert any(p is norm.weight for p in method.param_groups(None)[0]["params"])  # trained with the backbone
    kept = SLCA(SLCA.Config(fresh_norm=False), build_backbone("vit-tiny", pretrained=False), _scenario(2, 2))
    assert kept.backbone.model.norm.eps == 1e-6  # timm's pre-trained norm, untouched


def test_presets_resolve():
    from cilbench.methods.base import resolve_config

    cfg, _ = resolve_config(SLCA, "imagenet-r", False, {})
    assert cfg.epochs == 50 and cfg.ca_epochs == 5 and cfg.batch_size == 128
    # the official code's images, normalisation and mean shrink (GengDavid/SLCA utils/data.py, models/slca.py)
    assert (cfg.transform, cfg.ca_mean_shrink, cfg.fresh_norm) == ("slca-imagenet", 0.1, True)
    assert resolve_config(SLCA, "cifar100", False, {})[0].transform == "slca-cifar"
    assert resolve_config(SLCA, "cub", False, {})[0].transform == "slca-cub"
    cfg, _ = resolve_config(EASE, "vtab", False, {})
    assert cfg.epochs == 45 and cfg.bottleneck == 16 and cfg.lr == 0.03
    cfg, _ = resolve_config(EASE, "cub", False, {"alpha": "0.2"})
    assert cfg.alpha == 0.2 and cfg.lr == 0.008


def _cli(method: str, out: Path, *extra: str, kill_after: int | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if kill_after is not None:
        env["CILBENCH_TEST_KILL_AFTER_TASK"] = str(kill_after)
    # two epochs a task: resuming is about identical numbers, not about how far the quick profile learns
    return subprocess.run([sys.executable, "-m", "cilbench", "run", method, "--dataset", "synthetic", "--quick",
                           "--seed", "7", "--set", "epochs=2", "--out", str(out), *extra], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("method", [pytest.param("slca", marks=pytest.mark.slow), "ease"])
def test_resume_after_sigkill_gives_identical_numbers(tmp_path, method):
    full = _cli(method, tmp_path / "full")
    assert full.returncode == 0, full.stderr
    killed = _cli(method, tmp_path / "resumed", kill_after=1)
    assert killed.returncode == -9
    resumed = _cli(method, tmp_path / "resumed", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after task 2" in resumed.stdout
    a, b = _record(tmp_path / "full"), _record(tmp_path / "resumed")
    assert a["accuracy_matrix"] == b["accuracy_matrix"] and a["metrics"] == b["metrics"]
    assert _without_seconds(a["log"]) == _without_seconds(b["log"])
    assert [t["final_loss"] for t in a["timings"]["tasks"]] == [t["final_loss"] for t in b["timings"]["tasks"]]


def _without_seconds(log: list[dict]) -> list[dict]:
    return [dict(t, phases={k: {**v, "seconds": 0} for k, v in t["phases"].items()}) for t in log]


def test_ease_subspace_encoders_match_the_batched_pass_and_depend_on_their_own_adapter_only():
    """EASE's feature encoders (cached per subspace): the same features as its one batched pass, and subspace k's
    key moves with adapter k (and the frozen ViT), never with another adapter: a test image is encoded in an old
    subspace once, not after every later task."""
    from cilbench.engine.features import weights_digest

    torch.manual_seed(0)
    scenario = _scenario(3, 2)
    method = EASE(EASE.Config(use_init_ptm=True), build_backbone("vit-tiny", pretrained=False), scenario).eval()
    for task in scenario.tasks:
        method.before_task(task)
    for k in range(3):  # trained adapters are not zero
        for p in method.vit.expert_parameters(k):
            torch.nn.init.normal_(p, std=0.05)
    images = torch.rand(4, 3, 32, 32)
    encoders = method.feature_encoder()
    assert [e.name for e in encoders] == ["ease plain"] + ["ease adapter"] * 3  # the PTM's subspace first
    with torch.no_grad():
        separate = torch.stack([e(images) for e in encoders], 1)
        torch.testing.assert_close(separate, method.features(images).transpose(0, 1), rtol=1e-4, atol=1e-5)
        classes = torch.arange(6)
        method.prototypes.normal_()
        torch.testing.assert_close(method.feature_logits(separate, classes), method.logits(images, classes),
                                   rtol=1e-4, atol=1e-5)
    digests = [weights_digest(e.tensors()) for e in encoders]
    with torch.no_grad():
        method.vit.expert_parameters(2)[0].add_(1.0)  # the newest adapter moves: only its subspace's key
    assert [weights_digest(e.tensors()) for e in encoders] == digests[:3] + [weights_digest(encoders[3].tensors())]
    assert weights_digest(encoders[3].tensors()) != digests[3]
