"""The dne method (cilbench/methods/dne.py): split attention per task, old parts frozen by training a new task, FLOPs
growing with heads and tasks, and the loss weighting on a hand example. Tiny and CPU only."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from cilbench.methods.contract import Batch
from cilbench.methods.dne import DNE, DNEViT, SplitBlock
from cilbench.models.backbones import build_backbone

from _toy import HAND_DIV, HAND_LABELS, HAND_LOGITS, HAND_TEACHER, dytox_terms_by_hand, randomise, toy_scenario


def _dne(num_classes=6, per_task=2, **cfg):
    scenario = toy_scenario(num_classes, per_task)
    torch.manual_seed(0)
    config = DNE.Config(**{**dict(first_heads=2, head_dim=8, depth=2, patch_size=8, memory_size=4), **cfg})
    return DNE(config, build_backbone("vit-tiny", pretrained=False), scenario), scenario


def test_shape_comes_from_the_backbone_and_the_paper_defaults():
    method = DNE(DNE.Config(), build_backbone("vit-scratch-cifar", pretrained=False),
                 _dne()[1])
    net = method.net
    assert net.widths == [384] and net.patch_size == 4 and net.num_patches == 64
    assert len(net.blocks) == 5 and net.cab.class_attn  # 5 self-attention blocks + 1 class-attention block
    assert net.blocks[0].attn[0].heads == 12 and net.blocks[0].attn[0].head_dim == 32
    cfg = method.cfg
    assert (cfg.optimizer, cfg.weight_decay, cfg.epochs, cfg.warmup_epochs, cfg.min_lr) == ("adamw", 1e-6, 500, 5, 1e-5)
    assert math.isclose(cfg.lr, 5e-4 * cfg.batch_size / 512) and math.isclose(cfg.ft_lr, 5e-5 * cfg.batch_size / 512)
    net.expand(2)
    mlp = net.blocks[0].mlp.tasks[1]
    assert mlp.fc1.lam.shape == (2,) and mlp.fc1.norms is not None  # the paper: lambda per head, LN in the TA
    assert mlp.fc2.d_q == 32  # the paper: head size D in the second TA
    assert net.widths == [384, 64]


def test_a_new_tasks_attention_sees_only_its_own_slice():
    """Spatial attention is per task; tasks meet only in the TAB, which is per patch. With the old task's attention
    silenced, perturbing the old slice at one patch moves the new slice's block output at that patch only (a joint
    attention across tasks would spread it to every patch), while perturbing the new slice at one patch moves it
    everywhere (its own spatial attention), and the old slice never sees the new one."""
    torch.manual_seed(0)
    blk = SplitBlock(2, 8, 4, class_attn=False, drop_path=0.0, lambda_mode="head", ta_norm=True, qk_dim2=8)
    blk.expand(1)
    randomise(blk, 1)
    with torch.no_grad():  # the old task's attention adds nothing, so its slice stays local to each patch:
        blk.attn[0].proj.weight.zero_()  # any spreading across patches would then come from the new attention
        blk.attn[0].proj.bias.zero_()
    blk.eval()
    x0, x1 = torch.randn(2, 5, 16), torch.randn(2, 5, 8)
    base = blk([x0, x1])
    bump = torch.zeros(2, 5, 16)
    bump[:, 2] = torch.randn(2, 16)  # not a constant: LayerNorm would remove a shift
    old_moved = blk([x0 + bump, x1])
    changed = (old_moved[1] - base[1]).abs().amax(dim=(0, 2))
    assert changed[2] > 1e-4 and torch.all(changed[[0, 1, 3, 4]] == 0)
    bump = torch.zeros(2, 5, 8)
    bump[:, 2] = torch.randn(2, 8)
    new_moved = blk([x0, x1 + bump])
    assert torch.equal(new_moved[0], base[0])  # the old slice does not read the new one
    assert torch.all((new_moved[1] - base[1]).abs().amax(dim=(0, 2)) > 1e-4)
    # the class-attention block: a token's new slice reads the patches' new slice only
    cab = SplitBlock(2, 8, 4, class_attn=True, drop_path=0.0, lambda_mode="head", ta_norm=True, qk_dim2=8)
    cab.expand(1)
    randomise(cab, 2)
    cab.eval()
    tok = [torch.randn(2, 1, 16), torch.randn(2, 1, 8)]
    out = cab(tok, ctx=[x0, x1])
    moved = cab(tok, ctx=[x0, x1 + bump])
    assert torch.equal(moved[0], out[0]) and not torch.equal(moved[1], out[1])


def test_old_parts_are_unchanged_after_training_a_new_task():
    method, scenario = _dne(drop_path=0.1)
    method.before_task(scenario.tasks[0])
    randomise(method, 3)
    images = torch.rand(6, 3, 32, 32)
    method.eval()
    with torch.no_grad():
        before_tokens = method.net(images)
        before_logits = method.head_logits(before_tokens)
    method.before_task(scenario.tasks[1])
    frozen = {k: v.detach().clone() for k, v in method.named_parameters() if not v.requires_grad}
    assert frozen and any(v.requires_grad for v in method.parameters())
    groups = method.param_groups(scenario.tasks[1])
    assert all(p.requires_grad for g in groups for p in g["params"])
    opt = torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1)
    labels = torch.tensor([0, 1, 2, 3, 2, 3])
    method.train()
    for _ in range(3):
        out = method.training_step(Batch(images, labels, scenario.tasks[1]))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert set(out.terms) == {"cls", "kd", "div"}
    for k, v in method.named_parameters():
        if k in frozen:
            assert torch.equal(v, frozen[k]), k
    method.eval()
    with torch.no_grad():
        after = method.net(images)
        assert torch.equal(after[0][0], before_tokens[0][0])  # the old slice of the old token
        # the previous model is exactly the network task 0 left
        assert torch.equal(method.previous_logits(images, 1), before_logits)
        assert not torch.equal(method.head_logits(after)[:, :2], before_logits)  # new columns of the old head


def _flops(net: DNEViT) -> int:
    net.eval().requires_grad_(False)  # (the counter's module tracker cannot run under no_grad here)
    with FlopCounterMode(display=False) as counter:
        net(torch.rand(1, 3, 32, 32))
    return counter.get_total_flops()


def test_flops_grow_with_heads_and_tasks():
    def grown(heads: int, tasks: int) -> DNEViT:
        torch.manual_seed(0)
        net = DNEViT(32, 8, 2, 8, 2)
        for _ in range(tasks - 1):
            net.expand(heads)
        return net

    f = {(h, t): _flops(grown(h, t)) for h in (1, 2, 4) for t in (1, 2, 3, 4)}
    assert f[(1, 1)] == f[(2, 1)] == f[(4, 1)]
    for t in (2, 3):
        assert f[(1, t)] < f[(2, t)] < f[(4, t)]
    for h in (1, 2, 4):
        assert f[(h, 1)] < f[(h, 2)] < f[(h, 3)]
        # super-linear in the tasks, as the paper's O(T H P D^2 (P + T H)): each increment exceeds the one before
        # (wider task attention over the patches; the T task tokens through the class-attention block add a small
        # cubic term, one query each against the P patches' quadratic one)
        d1 = [f[(h, t + 1)] - f[(h, t)] for t in (1, 2, 3)]
        assert d1[0] < d1[1] < d1[2]


@pytest.mark.parametrize("reduction", ["batchmean", "mean"])
def test_loss_weighting_on_a_hand_example(reduction):
    method, scenario = _dne(kd_reduction=reduction)
    for task in scenario.tasks[:2]:
        method.before_task(task)
    method.head_logits = lambda tokens: HAND_LOGITS  # the loss alone, on given logits
    terms = method.tab_losses([[torch.zeros(3, 1)]], HAND_LABELS, 1, HAND_TEACHER, HAND_DIV)
    want = dytox_terms_by_hand(reduction)
    for name in ("cls", "kd", "div"):
        torch.testing.assert_close(terms[name], want[name])
    first = method.tab_losses([[torch.zeros(3, 1)]], torch.tensor([0, 1, 0]), 0, None, None)
    assert set(first) == {"cls"}  # no teacher on the first task: the classification loss alone, unweighted
