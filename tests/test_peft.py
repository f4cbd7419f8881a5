"""models/peft.py against hand computations on vit-tiny / clip-tiny (and one ViT-B/16 CLIP parameter count)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cilbench.errors import CilbenchError
from cilbench.models import peft
from cilbench.models.adapter import AdaptedViT
from cilbench.models.backbones import build_backbone

KINDS = ("adaptformer", "lora", "moe")


@pytest.fixture(scope="module")
def bases():
    torch.manual_seed(0)
    out = {name: build_backbone(name, pretrained=False).eval() for name in ("vit-tiny", "clip-tiny")}
    for b in out.values():
        b.requires_grad_(False)  # the reference is frozen too: same kernels as the frozen adapted copies
    return out


def _fresh(bases, name):
    return copy.deepcopy(bases[name])


def _images(n: int = 3) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def _tokens(backbone) -> torch.Tensor:
    return backbone.tokenize(["a photo of a cat.", "a bad photo of a dog.", "a plane"])


def _outputs(model) -> list[torch.Tensor]:
    outs = [model(_images())]
    if model.family == "clip":
        outs.append(model.encode_text(_tokens(model)))
    return outs


def _randomise(handle, std: float = 0.05, seed: int = 1) -> None:
    """Non-zero values in every inserted parameter (up projections, LoRA B, routers) so each one matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in handle.parameters(trainable_only=False):
            if p.dim():
                p.copy_(torch.randn(p.shape, generator=gen) * std)


# ---- identity at init ----

@pytest.mark.parametrize("name", ["vit-tiny", "clip-tiny"])
@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_equals_the_original_model_at_init(bases, name, kind):
    reference = _outputs(bases[name])
    model = _fresh(bases, name)
    handle = peft.insert(model, kind)
    blocks = 2 if name == "vit-tiny" else 4  # clip-tiny: 2 image + 2 text blocks
    assert len(handle.modules) == blocks * (2 if kind == "lora" else 1)
    for mode in ("eval", "train"):  # train: adapter dropout and router noise on; zero adapters still add nothing
        getattr(model, mode)()
        with torch.no_grad():
            for got, want in zip(_outputs(model), reference):
                torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_adaptformer_branch_is_the_adapted_vit_math():
    torch.manual_seed(0)
    plain = build_backbone("vit-tiny", pretrained=False).eval()
    ours = copy.deepcopy(plain)
    handle = peft.insert(ours, "adaptformer")
    _randomise(handle, std=0.2)
    theirs = copy.deepcopy(plain)
    vit = AdaptedViT(theirs, 1)
    for blk, branch in zip(vit.blocks, handle.modules.values()):
        blk.adapters.experts[0].load_state_dict(branch.adapter.state_dict())
    with torch.no_grad():
        expected = vit(_images(), [0])[0]
        torch.testing.assert_close(ours(_images()), expected, atol=1e-6, rtol=0)
        assert (expected - plain(_images())).abs().max() > 1e-3  # the adapters do change the features


# ---- gradients ----

@pytest.mark.parametrize("name", ["vit-tiny", "clip-tiny"])
@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_only_the_inserted_parameters(bases, name, kind):
    model = _fresh(bases, name)
    handle = peft.insert(model, kind)
    model.train()
    sum(o.pow(2).sum() for o in _outputs(model)).backward()
    inserted = {id(p) for p in handle.parameters()}
    got = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
    assert got and all(id(p) in inserted for _, p in got), [n for n, p in got if id(p) not in inserted][:3]
    assert all(not p.requires_grad for n, p in model.named_parameters() if id(p) not in inserted)
    # the zero-initialised factor (up projection / LoRA B) gets a non-zero gradient at once
    zero_init = "B" if kind == "lora" else "up.weight"
    assert any(n.endswith(zero_init) and p.grad.abs().sum() > 0 for n, p in got)
    if kind == "moe":  # the active router trains through the gates, the others get nothing
        for m in handle.modules.values():
            assert m.routers[0].grad is not None and m.routers[1].grad is None


# ---- LoRA ----

@pytest.mark.parametrize("name", ["vit-tiny", "clip-tiny"])
def test_lora_merge_equals_unmerged_and_restores_plain_layers(bases, name):
    model = _fresh(bases, name)
    keys = list(bases[name].state_dict())
    handle = peft.insert(model, "lora", targets=("qkv", "proj", "fc1"), r=4, alpha=8)
    assert set(keys) <= set(model.state_dict())  # the base weights keep their names
    _randomise(handle, std=0.1)
    with torch.no_grad():
        unmerged = _outputs(model)
        changed = [(u - r).abs().max() for u, r in zip(unmerged, _outputs(bases[name]))]
        assert min(changed) > 1e-4
        handle.merge()
        merged = _outputs(model)
    for a, b in zip(merged, unmerged):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert handle.modules == {} and peft.lora_layers(model) == {}
    assert list(model.state_dict()) == keys
    for m in model.modules():
        assert type(m) not in (peft.LoRALinear, peft.LoRAMultiheadAttention)


def test_lora_delta_is_scale_times_b_at_a_on_one_layer(bases):
    model = _fresh(bases, "vit-tiny")
    handle = peft.insert(model, "lora", r=4, alpha=12)
    _randomise(handle)
    layer = model.model.blocks[1].attn.qkv
    entry = layer.lora.entries[0]
    expected = entry.B.detach() @ entry.A.detach() * (12 / 4)
    torch.testing.assert_close(peft.lora_delta(model)["model.blocks.1.attn.qkv"], expected)
    torch.testing.assert_close(handle.lora_delta()["model.blocks.1.attn.qkv"], expected)
    x = torch.randn(2, 5, 48)
    with torch.no_grad():  # x A^T B^T * scale equals the linear layer with W + dW
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight + expected, layer.bias), atol=1e-6, rtol=1e-5)


def test_lora_on_open_clip_multihead_attention_adds_the_delta_to_the_weights(bases):
    model = _fresh(bases, "clip-tiny")
    handle = peft.insert(model, "lora", encoders="text", r=2, alpha=2)
    assert set(handle.modules) == {f"model.transformer.resblocks.{i}.attn.{t}" for i in (0, 1)
                                   for t in ("in_proj", "out_proj")}
    _randomise(handle)
    attn = model.model.transformer.resblocks[0].attn
    assert type(attn) is peft.LoRAMultiheadAttention and isinstance(attn, nn.MultiheadAttention)
    deltas = handle.lora_delta()
    prefix = "model.transformer.resblocks.0.attn"
    d_in, d_out = deltas[f"{prefix}.in_proj"], deltas[f"{prefix}.out_proj"]
    base_in, base_out = attn._parameters["in_proj_weight"], attn.out_proj._parameters["weight"]
    torch.testing.assert_close(attn.in_proj_weight, base_in + d_in)
    torch.testing.assert_close(attn.out_proj.weight, base_out + d_out)
    x = torch.randn(2, 7, 32)
    plain = copy.deepcopy(bases["clip-tiny"].model.transformer.resblocks[0].attn)
    with torch.no_grad():
        plain.in_proj_weight.add_(d_in)
        plain.out_proj.weight.add_(d_out)
        torch.testing.assert_close(attn(x, x, x, need_weights=False)[0], plain(x, x, x, need_weights=False)[0],
                                   atol=1e-6, rtol=1e-5)
    with pytest.raises(CilbenchError, match="dropout"):
        peft.insert(_fresh(bases, "clip-tiny"), "lora", dropout=0.1)  # no layer input to drop in the weight form
    other = _fresh(bases, "clip-tiny")  # dropout is fine on layers called through forward
    peft.insert(other, "lora", targets=("c_fc", "fc2"), dropout=0.1)
    assert isinstance(other.model.transformer.resblocks[0].mlp.c_proj, peft.LoRALinear)


def test_lora_holds_several_adapters_one_training(bases):
    model = _fresh(bases, "vit-tiny")
    handle = peft.insert(model, "lora", r=2, alpha=4)
    _randomise(handle)
    first = {k: v.detach().clone() for k, v in handle.lora_delta(0).items()}
    second = handle.add_lora(r=3, alpha=3, train_gain=True)  # HAM: a task adapter beside frozen group adapters
    assert second == 1
    bank = handle.modules["model.blocks.0.attn.qkv"]
    assert not any(p.requires_grad for p in bank.entries[0].parameters())
    assert bank.entries[1].A.requires_grad and bank.entries[1].gain.requires_grad
    with torch.no_grad():
        bank.entries[1].B.normal_(0, 0.1)
    qkv = "model.blocks.0.attn.qkv"
    torch.testing.assert_close(handle.lora_delta()[qkv], first[qkv] + handle.lora_delta(1)[qkv])
    model.train()
    model(_images()).pow(2).sum().backward()
    assert bank.entries[0].B.grad is None and bank.entries[1].B.grad.abs().sum() > 0
    assert bank.entries[1].gain.grad is not None
    # fold the frozen adapter only: the trained one stays an adapter, outputs unchanged
    with torch.no_grad():
        before = model(_images())
        handle.merge(entries=0)
        torch.testing.assert_close(model(_images()), before, atol=1e-5, rtol=1e-5)
    assert len(bank.entries) == 1 and bank.entries[0].rank == 3


def test_lora_disabled_and_removed_give_the_base_model(bases):
    model = _fresh(bases, "clip-tiny")
    handle = peft.insert(model, "lora")
    _randomise(handle)
    reference = _outputs(bases["clip-tiny"])
    with torch.no_grad(), handle.disabled():
        for got, want in zip(_outputs(model), reference):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    handle.remove()
    assert list(model.state_dict()) == list(bases["clip-tiny"].state_dict())
    with torch.no_grad():
        for got, want in zip(_outputs(model), reference):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


# ---- MoE-Adapters ----

def _mid_stream(block, x):
    """The residual stream after attention of a timm block (ls / drop-path are identities in vit-tiny)."""
    return x + block.attn(block.norm1(x))


def test_top_k_gating_by_hand_for_one_token():
    x0 = torch.tensor([[1.0, -2.0, 0.5]])
    w = torch.tensor([[0.2, -0.1, 0.4, 0.0, 1.0],
                      [0.1, 0.3, -0.2, 0.5, 0.0],
                      [-0.4, 0.2, 0.6, 0.1, -1.0]])
    gates, load = peft.top_k_gating(x0, w, None, k=2)
    logits = [sum(x0[0, d].item() * w[d, e].item() for d in range(3)) for e in range(5)]
    # logits = [-0.2, -0.6, 1.1, -0.95, 0.5]: top-2 are experts 2 and 4, softmax over those two only
    top = sorted(range(5), key=lambda e: -logits[e])[:2]
    assert top == [2, 4]
    z = torch.tensor([logits[2], logits[4]]).exp()
    expected = torch.zeros(1, 5)
    expected[0, 2], expected[0, 4] = z[0] / z.sum(), z[1] / z.sum()
    torch.testing.assert_close(gates, expected)
    assert load.tolist() == [0.0, 0.0, 1.0, 0.0, 1.0]
    # noisy: logits + N(0, 1) * (softplus(x0 @ w_noise) + 1e-2), one draw per sample and expert
    w_noise = torch.full((3, 5), 0.3)
    torch.manual_seed(3)
    noisy_gates, _ = peft.top_k_gating(x0, w, w_noise, k=2)
    torch.manual_seed(3)
    noisy = torch.tensor(logits) + torch.randn(1, 5)[0] * (F.softplus(torch.tensor(-0.5 * 0.3)) + 1e-2)
    vals, idx = noisy.topk(2)
    expected = torch.zeros(5).scatter(0, idx, torch.softmax(vals, 0))
    torch.testing.assert_close(noisy_gates[0], expected)


def test_moe_block_is_the_gated_sum_of_experts_over_the_post_attention_stream(bases):
    model = _fresh(bases, "vit-tiny")
    handle = peft.insert(model, "moe", num_experts=4, num_routers=2, top_k=2)
    _randomise(handle, std=0.3)
    block = model.model.blocks[0]
    moe = block.peft
    x = torch.randn(2, 5, 48)
    with torch.no_grad():
        got = block(x)
        plain = bases["vit-tiny"].model.blocks[0](x)
        mid = _mid_stream(block, x)
        expected = plain.clone()
        for b in range(2):
            logits = mid[b, 0] @ moe.routers[0]  # token 0, no LayerNorm
            vals, idx = logits.topk(2)
            g = torch.softmax(vals, 0)
            for j in range(2):
                expected[b] += g[j] * moe.experts[int(idx[j])](mid[b])  # the whole sequence goes to the expert
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        assert moe.counts.sum().item() == 2 * 2 and moe.counts.max().item() <= 2  # once per sample and expert


def test_moe_router_selection_and_zero_shot(bases):
    model = _fresh(bases, "clip-tiny")
    handle = peft.insert(model, "moe", num_experts=4, num_routers=3, top_k=1)
    _randomise(handle, std=0.3)
    reference = _outputs(bases["clip-tiny"])
    with torch.no_grad():
        handle.set_router(0)
        out0 = _outputs(model)
        handle.set_router(1)
        out1 = _outputs(model)
        assert all((a - b).abs().max() > 1e-4 for a, b in zip(out0, out1))
        for m in handle.modules.values():  # router 1 changes; the outputs under router 0 do not
            m.routers[1].add_(torch.randn_like(m.routers[1]))
            m.noise[1].add_(1.0)
        handle.set_router(0)
        for a, b in zip(_outputs(model), out0):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
        handle.set_router(None)  # zero-shot: the plain block, experts untouched
        for a, b in zip(_outputs(model), reference):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    with pytest.raises(CilbenchError, match="out of range"):
        handle.set_router(3)


def test_moe_noise_follows_its_mode(bases):
    model = _fresh(bases, "vit-tiny")
    handle = peft.insert(model, "moe", num_experts=6, top_k=2, dropout=0.0)  # no dropout: noise is the only draw
    _randomise(handle, std=0.3)
    with torch.no_grad():
        model.eval()  # default "train": no noise in eval mode, deterministic gates
        a = model(_images())
        assert torch.equal(model(_images()), a)
        model.train()  # ... and noise in training mode
        assert (model(_images()) - a).abs().max() > 0
        handle.set_noise(False)
        assert torch.equal(model(_images()), a)
        model.eval()
        handle.set_noise(True)  # the official CIL code: noise at evaluation too
        assert (model(_images()) - a).abs().max() > 0
    with pytest.raises(CilbenchError):
        handle.set_noise("sometimes")


def test_moe_balance_term_matches_the_official_formula(bases):
    model = _fresh(bases, "vit-tiny")
    handle = peft.insert(model, "moe", num_experts=5, top_k=2, balance_loss=True)
    _randomise(handle, std=0.3)
    with torch.no_grad():
        model(_images(4))
    total = 0.0
    for m in handle.modules.values():
        g = m.last_gates
        importance, load = g.sum(0), (g > 0).sum(0).float()  # no noise in eval: load = chosen counts
        cv2 = lambda v: v.var() / (v.mean() ** 2 + 1e-10)  # noqa: E731
        total += (cv2(importance) + cv2(load)).item() * 1e-2
    assert handle.aux_loss().item() == pytest.approx(total, rel=1e-5)
    assert peft.cv_squared(torch.tensor([3.0])).item() == 0.0


def test_adapters_in_the_text_encoder_change_encode_text_only(bases):
    for kind in ("adaptformer", "moe", "lora"):
        model = _fresh(bases, "clip-tiny")
        handle = peft.insert(model, kind, encoders="text")
        assert all(".transformer.resblocks" in n and ".visual." not in n for n in handle.modules)
        _randomise(handle, std=0.2)
        with torch.no_grad():
            image, text = _outputs(model)
            ref_image, ref_text = _outputs(bases["clip-tiny"])
        torch.testing.assert_close(image, ref_image, atol=1e-6, rtol=0)
        assert (text - ref_text).abs().max() > 1e-3, kind


def test_deepcopy_carries_working_adapters(bases):
    model = _fresh(bases, "vit-tiny")
    handle = peft.insert(model, "adaptformer")
    _randomise(handle, std=0.2)
    teacher = copy.deepcopy(model)
    with torch.no_grad():
        before = teacher(_images())
        torch.testing.assert_close(before, model(_images()))
        for p in handle.parameters():
            p.add_(1.0)  # training the student leaves the teacher's copy alone
        torch.testing.assert_close(teacher(_images()), before)
        assert (model(_images()) - before).abs().max() > 1e-3
        teacher.model.blocks[0].peft.adapter.up.bias.add_(1.0)  # the copy's hooks use the copy's adapters
        assert (teacher(_images()) - before).abs().max() > 0.5


def test_blocks_selection_options_and_errors(bases):
    model = _fresh(bases, "clip-tiny")
    handle = peft.insert(model, "adaptformer", blocks=[-1], encoders="image", bottleneck=8, scale=0.5)
    assert list(handle.modules) == ["model.visual.transformer.resblocks.1.peft"]
    assert handle.modules["model.visual.transformer.resblocks.1.peft"].adapter.down.out_features == 8
    with pytest.raises(CilbenchError, match="already carries"):
        peft.insert(model, "moe", encoders="image")
    with pytest.raises(CilbenchError, match="unknown PEFT kind"):
        peft.insert(model, "prefix")
    with pytest.raises(CilbenchError, match="unknown moe option"):
        peft.insert(model, "moe", experts=3)
    with pytest.raises(CilbenchError, match="out of range"):
        peft.insert(model, "lora", blocks=[5])
    with pytest.raises(CilbenchError, match="unknown LoRA target"):
        peft.insert(model, "lora", targets=("q",))
    with pytest.raises(CilbenchError, match="no text encoder"):
        peft.insert(_fresh(bases, "vit-tiny"), "lora", encoders="text")
    with pytest.raises(CilbenchError, match="no timm ViT Block"):
        peft.insert(nn.Linear(3, 3), "lora")
    vit = _fresh(bases, "vit-tiny")
    AdaptedViT(vit, 1)
    with pytest.raises(CilbenchError, match="AdaptedViT"):
        peft.insert(vit, "adaptformer")


def test_moe_parameter_count_at_the_official_size():
    """PROTOCOLS-2 §2.1 derived check: 22 experts x 12 blocks x (99,136 image + 66,112 text) + 11 routers x 2
    matrices x 12 blocks x 22 x (768 + 512) = 51,059,712 ("51.1M", slide Table 5)."""
    import open_clip

    model = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None)
    handle = peft.insert(model, "moe")
    d_img, d_txt, e, r, blocks, bottleneck = 768, 512, 22, 11, 12, 64

    def expert(d):  # Linear(d, 64) + Linear(64, d), with biases
        return d * bottleneck + bottleneck + bottleneck * d + d

    assert expert(d_img) == 99_136 and expert(d_txt) == 66_112
    expected = e * blocks * (expert(d_img) + expert(d_txt)) + r * 2 * blocks * e * (d_img + d_txt)
    assert expected == 51_059_712
    assert len(handle.modules) == 24
    assert handle.num_parameters() == expected
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".peft." not in n)
