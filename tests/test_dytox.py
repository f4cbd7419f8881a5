"""The dytox method (cilbench/methods/dytox.py): the task attention against a hand computation, old task tokens and
heads unchanged by training a new task, one shared encoder and decoder (a token and a head per task), FLOPs growing
by one decoder pass per task, and the loss on a hand example. Tiny and CPU only."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from cilbench.data.scenario import Scenario, Task
from cilbench.methods.contract import Batch
from cilbench.methods.dytox import Block, DyTox, DyToxNet, TaskAttention
from cilbench.models.backbones import build_backbone

from _toy import HAND_DIV, HAND_LABELS, HAND_LOGITS, HAND_TEACHER, dytox_terms_by_hand, randomise, toy_scenario


def _dytox(num_classes=6, per_task=2, **cfg):
    scenario = toy_scenario(num_classes, per_task)
    torch.manual_seed(0)
    config = DyTox.Config(**{**dict(memory_size=4), **cfg})
    return DyTox(config, build_backbone("vit-tiny", pretrained=False), scenario), scenario


def test_shape_comes_from_the_backbone_and_the_defaults():
    method = DyTox(DyTox.Config(), build_backbone("vit-scratch-cifar", pretrained=False), toy_scenario())
    net = method.net
    assert net.width == 384 and net.patch_size == 4 and net.num_patches == 64
    assert len(net.sabs) == 5 and net.tab.task_attn and not net.sabs[0].task_attn  # 5 SABs + 1 TAB
    assert net.sabs[0].attn.heads == 12 and net.tab.attn.heads == 12 and net.tab.attn.head_dim == 32
    assert net.sabs[0].attn.qkv.bias is None and net.tab.attn.q.bias is None  # ConViT: qkv_bias=False
    assert net.tab.drop_path == pytest.approx(0.1) and net.sabs[0].drop_path == 0
    cfg = method.cfg
    assert (cfg.optimizer, cfg.weight_decay, cfg.epochs, cfg.warmup_epochs, cfg.min_lr) == ("adamw", 1e-6, 500, 5, 1e-5)
    assert math.isclose(cfg.lr, 5e-4 * cfg.batch_size / 512) and math.isclose(cfg.ft_lr, 5e-5 * cfg.batch_size / 512)
    assert (cfg.memory_size, cfg.ft_epochs, cfg.div_weight, cfg.cls_loss) == (2000, 20, 0.1, "bce")


def test_task_attention_matches_a_hand_computation():
    """Query from the task token only; keys and values from [task token, patches]; per head softmax(q.k / sqrt(d))
    weighting the values, then the output projection."""
    torch.manual_seed(0)
    C, H = 4, 2
    d = C // H
    attn = TaskAttention(C, H, qkv_bias=False)
    randomise(attn, 1)
    x = torch.randn(1, 1 + 3, C)  # the task token, then 3 patch tokens
    Wq, Wk, Wv = attn.q.weight, attn.kv.weight[:C], attn.kv.weight[C:]
    heads = []
    for h in range(H):
        s = slice(h * d, (h + 1) * d)
        q = Wq[s] @ x[0, 0]
        scores = torch.stack([q @ (Wk[s] @ x[0, j]) for j in range(4)]) / math.sqrt(d)
        weights = scores.softmax(0)
        heads.append(sum(weights[j] * (Wv[s] @ x[0, j]) for j in range(4)))
    expected = attn.proj.weight @ torch.cat(heads) + attn.proj.bias
    out = attn(x)
    assert out.shape == (1, 1, C)
    torch.testing.assert_close(out[0, 0], expected)
    # only the token queries: the patches are an unordered set of keys / values
    torch.testing.assert_close(attn(x[:, [0, 3, 1, 2]]), out)
    # the block: LayerNorm over [token, patches], residual and MLP on the token only
    blk = Block(C, H, 2, 0.0, task_attn=True, qkv_bias=False).eval()
    randomise(blk, 2)
    token, patches = x[:, :1], x[:, 1:]
    y = token + blk.attn(blk.norm1(torch.cat([token, patches], dim=1)))
    torch.testing.assert_close(blk(patches, token=token), y + blk.mlp(blk.norm2(y)))


def test_old_task_tokens_and_heads_are_unchanged_after_training_a_new_task():
    method, scenario = _dytox(drop_path=0.1)
    method.before_task(scenario.tasks[0])
    randomise(method, 3)
    images = torch.rand(6, 3, 32, 32)
    method.eval()
    with torch.no_grad():
        before = method.net.classify(method.net(images))
    method.before_task(scenario.tasks[1])
    method.before_fit(scenario.tasks[1], None)
    net = method.net
    old = {"token": net.tokens[0].detach().clone(),
           **{k: v.detach().clone() for k, v in net.heads[0].state_dict().items()}}
    shared = {k: v.detach().clone() for k, v in net.named_parameters() if k.startswith(("sabs", "tab", "patch", "pos"))}
    new_token = net.tokens[1].detach().clone()
    trainable = {id(p) for g in method.param_groups(scenario.tasks[1]) for p in g["params"]}
    assert id(net.tokens[0]) not in trainable and not any(id(p) in trainable for p in net.heads[0].parameters())
    assert id(net.tokens[1]) in trainable and all(id(p) in trainable for p in net.sabs.parameters())
    opt = torch.optim.AdamW(method.param_groups(scenario.tasks[1]), lr=1e-2, weight_decay=0.1)
    labels = torch.tensor([0, 1, 2, 3, 2, 3])
    method.train()
    for _ in range(3):
        out = method.training_step(Batch(images, labels, scenario.tasks[1]))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert set(out.terms) == {"cls", "kd", "div"}
    assert torch.equal(net.tokens[0], old["token"])
    for k, v in net.heads[0].state_dict().items():
        assert torch.equal(v, old[k]), k
    assert not torch.equal(net.tokens[1], new_token)
    assert all(not torch.equal(v, shared[k]) for k, v in net.named_parameters() if k in shared and v.dim() > 1)
    # the teacher is the model task 0 left, whatever the student became
    teacher = method.teacher.run(lambda m: m.classify(m(images, 1)), images)
    torch.testing.assert_close(teacher, before)


def test_encoder_and_decoder_are_shared_by_the_tasks():
    """One encoder pass and one decoder per forward, run once per task token; a task adds one token and one head."""
    method, scenario = _dytox()
    net = method.net
    D, sizes, ids = net.width, [], None
    for task in scenario.tasks:
        method.before_task(task)
        sizes.append(sum(p.numel() for p in net.parameters()))
        now = [id(m) for m in (net.patch, *net.sabs, net.tab)]
        assert ids in (None, now)
        ids = now
    n = len(scenario.tasks[1].classes)
    assert [b - a for a, b in zip(sizes, sizes[1:])] == [D + 2 * D + D * n + n] * 2  # token + LayerNorm + Linear
    calls = {"sab": 0, "tab": 0}
    hooks = [net.sabs[0].register_forward_hook(lambda *a: calls.__setitem__("sab", calls["sab"] + 1)),
             net.tab.register_forward_hook(lambda *a: calls.__setitem__("tab", calls["tab"] + 1))]
    randomise(method, 4)
    method.eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        embeddings = net(images)
        assert calls == {"sab": 1, "tab": 3}
        patches = net.encode(images)
        for j, e in enumerate(embeddings):  # embedding j: the one decoder with token j
            torch.testing.assert_close(e, net.tab(patches, token=net.tokens[j])[:, 0])
    for h in hooks:
        h.remove()
    assert len({tuple(e[0].tolist()) for e in embeddings}) == 3  # the tokens specialise the same decoder


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def test_flops_grow_by_one_decoder_pass_per_task():
    torch.manual_seed(0)
    net = DyToxNet(32, 8, 16, 2, 3).eval()  # trainable parameters, counted under no_grad as the runner does
    x = torch.rand(1, 3, 32, 32)
    flops = []
    for _ in range(3):
        net.add_task(4)
        flops.append(_flops(lambda: net.classify(net(x))))
    assert flops[0] < flops[1] < flops[2] and flops[2] - flops[1] == flops[1] - flops[0]
    patches = net.encode(x)
    one_pass = _flops(lambda: net.heads[0](net.tab(patches, token=net.tokens[0])[:, 0]))
    assert flops[1] - flops[0] == one_pass > 0


@pytest.mark.parametrize("reduction", ["batchmean", "mean"])
def test_loss_on_a_hand_example(reduction):
    method, scenario = _dytox(kd_reduction=reduction)
    for task in scenario.tasks[:2]:
        method.before_task(task)
    terms = method.losses(HAND_LOGITS, HAND_LABELS, 1, HAND_TEACHER, HAND_DIV)
    want = dytox_terms_by_hand(reduction)
    for name in ("cls", "kd", "div"):
        torch.testing.assert_close(terms[name], want[name])
    first = method.losses(HAND_LOGITS[:, :2], torch.tensor([0, 1, 0]), 0)
    assert set(first) == {"cls"}  # the first task: the BCE alone, unweighted


def test_one_task_over_every_class_is_the_joint_model():
    """``--joint`` merges the classes into one task: one token, one head over every class, no teacher, BCE alone."""
    scenario = Scenario("cil", "toy", "B6Inc6", 6, [Task(0, "all", "toy", tuple(range(6)), tuple(range(6)))])
    torch.manual_seed(0)
    method = DyTox(DyTox.Config(), build_backbone("vit-tiny", pretrained=False), scenario)
    method.before_task(scenario.tasks[0])
    method.before_fit(scenario.tasks[0], None)
    assert method.teacher is None and method.div is None and method.net.num_tasks == 1
    images, labels = torch.rand(4, 3, 32, 32), torch.tensor([0, 5, 3, 1])
    method.train()
    out = method.training_step(Batch(images, labels, scenario.tasks[0]))
    assert set(out.terms) == {"cls"} and out.loss.requires_grad
    method.eval()
    assert method.logits(images, torch.arange(6)).shape == (4, 6)
