"""Prompt machinery (cilbench.models.prompt) and the L2P / DualPrompt / CODA-Prompt methods: selection, the token
layout, prefix attention and CODA's components by hand on tiny tensors; what trains and what stays frozen."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from cilbench.data.scenario import Task
from cilbench.engine.trainer import build_optimizer
from cilbench.errors import CilbenchError
from cilbench.methods import load_method
from cilbench.methods.base import resolve_config
from cilbench.methods.contract import Batch
from cilbench.models.backbones import build_backbone
from cilbench.models.prompt import (CodaComponents, PromptedViT, PromptPool, SharedPrefix, batch_majority,
                                    component_weights, cosine_scores, gram_schmidt_extend, orthogonality_penalty,
                                    prefix_attention, prefix_block, pull_term, ranked_ids, select_prompts)


def _scenario(n_tasks: int, per_task: int) -> SimpleNamespace:
    tasks = [Task(t, f"task {t + 1}", "x", tuple(range(t * per_task, (t + 1) * per_task)),
                  tuple(range(t * per_task, (t + 1) * per_task))) for t in range(n_tasks)]
    return SimpleNamespace(tasks=tasks)


def _vit():
    torch.manual_seed(0)
    return build_backbone("vit-tiny", pretrained=False).eval()


def _method(name: str, n_tasks: int = 2, **sets):
    cls = load_method(name)
    cfg, _ = resolve_config(cls, "digits", True, {k: str(v) for k, v in sets.items()})
    torch.manual_seed(0)
    return cls(cfg, build_backbone("vit-tiny", pretrained=False), _scenario(n_tasks, 2))


# ---- query-key selection ----

def test_cosine_top_k_by_hand_and_ties_go_to_the_lower_id():
    query = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    keys = torch.tensor([[0.0, 1.0], [1.0, 1.0], [3.0, 0.0], [-1.0, 0.0]])
    r = 1 / math.sqrt(2)
    assert torch.allclose(cosine_scores(query, keys), torch.tensor([[0.0, r, 1.0, -1.0], [1.0, r, 0.0, 0.0]]))
    assert ranked_ids(cosine_scores(query, keys), 2).tolist() == [[2, 1], [0, 1]]
    # image 2 scores keys 2 and 3 equally (0): the lower id wins the third place
    assert ranked_ids(cosine_scores(query, keys), 3).tolist() == [[2, 1, 0], [0, 1, 2]]
    same = torch.tensor([[1.0, 0.0], [2.0, 0.0], [5.0, 0.0]])  # three equal keys
    assert ranked_ids(cosine_scores(query, same), 2).tolist() == [[0, 1], [0, 1]]


def test_batch_majority_by_hand_with_ties():
    ids = torch.tensor([[0, 1], [1, 2], [2, 3]])  # counts 0:1 1:2 2:2 3:1
    assert batch_majority(ids, 2, 5).tolist() == [1, 2]
    assert batch_majority(ids, 3, 5).tolist() == [1, 2, 0]  # 0 and 3 tie at one vote: the lower id
    assert batch_majority(torch.tensor([[3, 0], [1, 2]]), 2, 4).tolist() == [0, 1]  # all tie
    assert batch_majority(torch.tensor([[4], [4], [1]]), 1, 5).tolist() == [4]
    # select_prompts: each image's top-2, then the batch's two most frequent for every image
    query = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]])
    keys = torch.tensor([[1.0, 0.0], [0.9, 0.2], [0.0, 1.0], [-1.0, 0.0]])
    assert select_prompts(query, keys, 2, batchwise=False).tolist() == [[0, 1], [0, 1], [2, 1]]
    assert select_prompts(query, keys, 2, batchwise=True).tolist() == [[1, 0]] * 3  # 1: three votes, 0: two


def test_pull_term_by_hand():
    query = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    keys = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, -3.0]])
    ids = torch.tensor([[0, 1], [1, 2]])
    r = 1 / math.sqrt(2)
    assert pull_term(query, keys, ids).item() == pytest.approx((1 + r + r - 1) / 2)
    keys = keys.clone().requires_grad_(True)
    pull_term(query, keys, ids).backward()
    assert keys.grad[0].abs().sum() == 0 and keys.grad[1].abs().sum() > 0  # key 0: already along its query


# ---- prompt tuning: token layout and position embeddings ----

def test_unprompted_forward_is_timms_and_the_query_is_the_backbone_feature():
    backbone = _vit()
    vit, images = PromptedViT(backbone), torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(vit.tokens(images), backbone.model.forward_features(images), atol=1e-6)
        assert torch.equal(vit.query(images), backbone(images))
        assert torch.allclose(vit.query(images), vit.tokens(images)[:, 0], atol=1e-6)  # CLS after the norm


@pytest.mark.parametrize("position", ["cls", "none"])
def test_prompt_tokens_enter_after_cls_with_cls_position_embedding(position):
    backbone = _vit()
    vit, model = PromptedViT(backbone, position), backbone.model
    images, prompts = torch.rand(2, 3, 32, 32), torch.randn(2, 5, 48)
    with torch.no_grad():
        x = vit.embed(images, prompts)
        patches, pos = model.patch_embed(images), model.pos_embed
    assert x.shape == (2, 1 + 5 + patches.shape[1], 48)
    assert torch.equal(x[:, 0], (model.cls_token[0, 0] + pos[0, 0]).expand(2, -1))
    assert torch.equal(x[:, 1:6], prompts + pos[:, :1] if position == "cls" else prompts)
    assert torch.equal(x[:, 6:], patches + pos[:, 1:])


def test_the_order_of_the_chosen_prompts_changes_no_output():
    vit = PromptedViT(_vit())
    images, prompts = torch.rand(2, 3, 32, 32), torch.randn(2, 4, 48)
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        a, b = vit.tokens(images, prompts), vit.tokens(images, prompts[:, perm])
    assert torch.allclose(a[:, 0], b[:, 0], atol=1e-5)  # CLS
    assert torch.allclose(a[:, 1:5][:, perm], b[:, 1:5], atol=1e-5)  # the prompt outputs move with their tokens
    assert torch.allclose(a[:, 1:5].mean(1), b[:, 1:5].mean(1), atol=1e-5)  # L2P's head input


def test_prompt_pool_tokens_and_prefix_shapes():
    torch.manual_seed(0)
    pool = PromptPool(size=6, length=3, dim=4, top_k=2)
    ids = torch.tensor([[4, 1], [0, 5]])
    tokens = pool.tokens(ids)
    assert tokens.shape == (2, 6, 4)
    assert torch.equal(tokens[0], torch.cat([pool.prompts[4], pool.prompts[1]]))
    assert -1 <= pool.prompts.min() and pool.prompts.max() <= 1 and -1 <= pool.keys.min()  # U(-1, 1): PILOT
    prefix = PromptPool(size=6, length=3, dim=4, top_k=2, layers=3, init="jax")
    assert prefix.prompts.shape == (3, 2, 6, 3, 4) and 0 <= prefix.prompts.min() and prefix.prompts.max() <= 0.01
    out = prefix.prefixes(ids)
    assert len(out) == 3 and all(k.shape == v.shape == (2, 6, 4) for k, v in out)
    assert torch.equal(out[2][1][1], torch.cat([prefix.prompts[2, 1, 0], prefix.prompts[2, 1, 5]]))  # values
    assert torch.equal(out[0][0][0, :3], prefix.prompts[0, 0, 4])  # keys
    prefix.copy_slots(slice(0, 2), slice(2, 4))
    assert torch.equal(prefix.prompts[:, :, 2:4], prefix.prompts[:, :, 0:2])
    g = SharedPrefix(layers=2, length=3, dim=4).prefixes()  # G-prompt: one (keys, values) per layer
    assert len(g) == 2 and g[1][0].shape == (1, 3, 4)


@pytest.mark.parametrize("batch", [4, 5])
def test_pilot_e_prefix_layout_by_hand(batch):
    # PILOT reads the [2, B, ...] selection as [B, 2, ...]: with one prompt for the batch the first half of the images
    # get the key half as keys and values, the second half the value half; the middle image of an odd batch the pair
    pool = PromptPool(size=3, length=1, dim=2, top_k=1, layers=1)
    with torch.no_grad():
        pool.prompts[0, 0] = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]).unsqueeze(1)  # keys: the id
        pool.prompts[0, 1] = pool.prompts[0, 0] + 100  # values: 100 + the id
    ids = torch.full((batch, 1), 2)
    (keys, values), = pool.prefixes(ids, "paired")
    assert keys[:, 0, 0].tolist() == [2.0] * batch and values[:, 0, 0].tolist() == [102.0] * batch
    (keys, values), = pool.prefixes(ids, "pilot")
    half = [2.0] * (batch // 2) + ([] if batch % 2 == 0 else [None]) + [102.0] * (batch // 2)
    assert [k if h is not None else None for k, h in zip(keys[:, 0, 0].tolist(), half)] == half
    assert [v if h is not None else None for v, h in zip(values[:, 0, 0].tolist(), half)] == half
    if batch % 2:
        assert (keys[batch // 2, 0, 0].item(), values[batch // 2, 0, 0].item()) == (2.0, 102.0)
    # different prompts per image: image b reads the flat [2 x B] entries 2b and 2b + 1
    ids = torch.tensor([[0], [1], [2], [1]])
    (keys, values), = pool.prefixes(ids, "pilot")
    flat = [0.0, 1.0, 2.0, 1.0, 100.0, 101.0, 102.0, 101.0]
    assert keys[:, 0, 0].tolist() == flat[0::2] and values[:, 0, 0].tolist() == flat[1::2]


# ---- prefix tuning: attention with a prefix, by hand ----

def _attention():
    from timm.models.vision_transformer import Attention

    torch.manual_seed(0)
    return Attention(8, num_heads=2, qkv_bias=True).eval()


def _by_hand(attn, x, pk=None, pv=None):
    b, n, d = x.shape
    h, hd = 2, 4
    q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).split(d, dim=-1)
    if pk is not None:
        k, v = torch.cat([pk, k], 1), torch.cat([pv, v], 1)
    heads = [torch.softmax(q[..., i * hd:(i + 1) * hd] @ k[..., i * hd:(i + 1) * hd].transpose(1, 2) / hd ** 0.5,
                           dim=-1) @ v[..., i * hd:(i + 1) * hd] for i in range(h)]
    return torch.cat(heads, -1) @ attn.proj.weight.T + attn.proj.bias


def test_a_prefix_is_keys_and_values_concatenated_in_front_by_hand():
    attn = _attention()
    x, pk, pv = torch.randn(2, 5, 8), torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    with torch.no_grad():
        assert torch.allclose(prefix_attention(attn, x, None), attn(x), atol=1e-6)
        assert torch.allclose(prefix_attention(attn, x, None), _by_hand(attn, x), atol=1e-6)
        assert torch.allclose(prefix_attention(attn, x, (pk, pv)), _by_hand(attn, x, pk, pv), atol=1e-5)
        # one prefix for the whole batch broadcasts like a copy per image
        shared = prefix_attention(attn, x, (pk[:1], pv[:1]))
        assert torch.allclose(shared, prefix_attention(attn, x, (pk[:1].expand(2, -1, -1), pv[:1].expand(2, -1, -1))))


def test_an_all_zero_prefix_only_dilutes_the_attention():
    # keys 0 give each prefix slot the logit 0 and values 0 add nothing: every head's output before the projection
    # is scaled by Z / (Z + L), Z = sum_j exp(s_j) over the block's own keys
    attn = _attention()
    x, zeros = torch.randn(1, 5, 8), torch.zeros(1, 3, 8)
    with torch.no_grad():
        q, k, _ = (x @ attn.qkv.weight.T + attn.qkv.bias).split(8, dim=-1)
        pre = (prefix_attention(attn, x, (zeros, zeros)) - attn.proj.bias) @ torch.linalg.pinv(attn.proj.weight.T)
        plain = (attn(x) - attn.proj.bias) @ torch.linalg.pinv(attn.proj.weight.T)
        for i in range(2):
            s = q[..., 4 * i:4 * i + 4] @ k[..., 4 * i:4 * i + 4].transpose(1, 2) / 2
            z = s.exp().sum(-1, keepdim=True)
            assert torch.allclose(pre[..., 4 * i:4 * i + 4], plain[..., 4 * i:4 * i + 4] * z / (z + 3), atol=1e-5)


def test_prefix_block_is_the_timm_block_and_a_prefix_at_one_layer_changes_only_from_there():
    backbone = _vit()
    vit, block = PromptedViT(backbone), backbone.model.blocks[0]
    x = torch.randn(2, 17, 48)
    with torch.no_grad():
        assert torch.allclose(prefix_block(block, x, None), block(x), atol=1e-6)
        images = torch.rand(2, 3, 32, 32)
        pk, pv = torch.randn(1, 2, 48), torch.randn(1, 2, 48)
        plain, prefixed = vit.tokens(images), vit.tokens(images, prefixes={1: [(pk, pv)]})
        assert not torch.allclose(plain, prefixed)
        x0 = backbone.model.blocks[0](vit.embed(images))  # block 0 untouched, block 1 with the prefix
        assert torch.allclose(prefixed, backbone.model.norm(prefix_block(backbone.model.blocks[1], x0, (pk, pv))),
                              atol=1e-6)
        # two prefixes at one layer are one prefix of both
        two = vit.tokens(images, prefixes={1: [(pk[:, :1], pv[:, :1]), (pk[:, 1:], pv[:, 1:])]})
        assert torch.allclose(two, prefixed, atol=1e-6)


# ---- CODA-Prompt ----

def test_coda_component_weights_and_prompt_by_hand():
    query = torch.tensor([[1.0, 2.0]])
    keys = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    attention = torch.tensor([[0.0, 1.0], [3.0, 1.0]])
    # q * A = (0, 2) and (3, 2): cosines with K 0 and 5 / (sqrt(13) sqrt(2))
    expected = torch.tensor([[0.0, 5 / (math.sqrt(13) * math.sqrt(2))]])
    assert torch.allclose(component_weights(query, keys, attention), expected)
    coda = CodaComponents(size=4, length=2, dim=2, key_dim=2, layers=1, tasks=2)
    with torch.no_grad():
        coda.K[0, :2], coda.A[0, :2] = keys, attention
        coda.P[0, :2] = torch.tensor([[[1.0, 1.0], [2.0, 0.0]], [[0.0, 4.0], [1.0, -1.0]]])
        (prefix,), _ = coda.prefixes(query, train=False)
    a = expected[0, 1]
    assert torch.allclose(prefix[0], torch.tensor([[0.0, 4 * a]]))  # key half: position 0 of sum_m alpha_m P_m
    assert torch.allclose(prefix[1], torch.tensor([[a, -a]]))  # value half: position 1


def test_gram_schmidt_slice_is_orthonormal_to_earlier_components_even_after_training():
    gen = torch.Generator().manual_seed(0)
    earlier = torch.randn(3, 6, generator=gen)  # not orthogonal to each other (trained components)
    new = gram_schmidt_extend(earlier, 2, gen)
    assert torch.allclose(new @ new.T, torch.eye(2), atol=1e-6)
    assert (new @ earlier.T).abs().max() < 1e-6
    with pytest.raises(CilbenchError, match="orthogonal"):
        gram_schmidt_extend(earlier, 4)
    coda = CodaComponents(size=6, length=2, dim=3, key_dim=5, layers=2, tasks=3)
    coda.begin_task(0, torch.Generator().manual_seed(1))
    for p in (coda.K, coda.A, coda.P):
        flat = p.detach().view(2, 6, -1)
        assert torch.allclose(flat[:, :2] @ flat[:, :2].transpose(1, 2), torch.eye(2).expand(2, 2, 2), atol=1e-6)
        assert flat[:, 2:].abs().sum() == 0  # later slices wait for their task
    with torch.no_grad():  # "training" moves task 0's components off orthonormality
        for p in (coda.K, coda.A, coda.P):
            p.add_(0.3 * torch.randn_like(p))
    before = [p.detach().clone() for p in (coda.K, coda.A, coda.P)]
    coda.begin_task(1, torch.Generator().manual_seed(2))
    for p, old in zip((coda.K, coda.A, coda.P), before):
        flat, old_flat = p.detach().view(2, 6, -1), old.view(2, 6, -1)
        assert torch.equal(flat[:, :2], old_flat[:, :2])  # earlier slice kept
        assert (flat[:, 2:4] @ flat[:, :2].transpose(1, 2)).abs().max() < 1e-5  # orthogonal to it
        assert torch.allclose(flat[:, 2:4] @ flat[:, 2:4].transpose(1, 2), torch.eye(2).expand(2, 2, 2), atol=1e-6)
    assert coda.task == 1 and coda.span(1) == (2, 4)


def test_coda_trains_only_the_current_slice_and_tests_with_all_up_to_it():
    coda = CodaComponents(size=6, length=2, dim=4, key_dim=4, layers=1, tasks=3)
    coda.begin_task(0, torch.Generator().manual_seed(0))
    coda.begin_task(1, torch.Generator().manual_seed(1))
    query = torch.randn(3, 4)
    (prefix,), penalty = coda.prefixes(query, train=True)
    (prefix[0].sum() + prefix[1].sum()).backward()
    for p in (coda.K, coda.A, coda.P):
        assert p.grad[0, :2].abs().sum() == 0 and p.grad[0, 2:4].abs().sum() > 0 and p.grad[0, 4:].abs().sum() == 0
    assert penalty.item() == 0
    with torch.no_grad():
        test_prefix = coda.prefixes(query, train=False)[0][0]
        a = component_weights(query, coda.K[0, :4], coda.A[0, :4])
        assert torch.allclose(test_prefix[0], torch.einsum("bm,mld->bld", a, coda.P[0, :4])[:, :1], atol=1e-6)
    # the optional penalty: mu x ((X X^T - I)^2).mean() over K, A and the flattened P of each layer
    _, penalty = coda.prefixes(query, train=True, penalty=0.5)
    k, a, p = coda.K[0, :4], coda.A[0, :4], coda.P[0, :4].reshape(4, -1)
    expected = 0.5 * sum(orthogonality_penalty(t) for t in (k, a, p))
    assert penalty.item() == pytest.approx(expected.item(), abs=1e-6)


def test_orthogonality_penalty_by_hand():
    assert orthogonality_penalty(torch.eye(3)[:2]).item() == 0
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # X X^T - I = diag(3, 0)
    assert orthogonality_penalty(x).item() == pytest.approx(9 / 4)


# ---- the methods ----

@pytest.mark.parametrize("name", ["l2p", "dualprompt", "coda-prompt"])
def test_backbone_stays_frozen_only_prompts_keys_and_head_train(name):
    method = _method(name)
    scenario = method.scenario
    for task in scenario.tasks:
        method.before_task(task)
    task = scenario.tasks[1]
    if name == "coda-prompt":
        method.components.begin_task(1, torch.Generator().manual_seed(0))
    groups = method.param_groups(task)
    trained = {id(p) for g in groups for p in g["params"]}
    assert not trained & {id(p) for p in method.backbone.parameters()}
    assert all(not p.requires_grad for p in method.backbone.parameters())
    backbone = {k: v.clone() for k, v in method.backbone.state_dict().items()}
    others = {n: p.detach().clone() for n, p in method.named_parameters() if not n.startswith("backbone.")}
    optimizer = build_optimizer(groups, method.cfg)
    method.train()
    out = method.training_step(Batch(torch.rand(4, 3, 32, 32), torch.tensor([2, 3, 3, 2]), task))
    out.loss.backward()
    assert method.head.weight.grad[:2].abs().sum() == 0  # CE over the current task's classes only
    optimizer.step()
    assert all(torch.equal(v, method.backbone.state_dict()[k]) for k, v in backbone.items())
    moved = {n for n, p in method.named_parameters() if n in others and not torch.equal(p, others[n])}
    expected = {"l2p": {"head.weight", "head.bias", "pool.prompts", "pool.keys"},
                "dualprompt": {"head.weight", "head.bias", "g_prompt.prefix", "e_prompt.prompts", "e_prompt.keys"},
                "coda-prompt": {"head.weight", "head.bias", "components.P", "components.K", "components.A"}}[name]
    assert moved == expected
    assert set(out.terms) == ({"ce"} if name == "coda-prompt" else {"ce", "pull"})
    assert not any(k.startswith("backbone.") for k in method.checkpoint_state())


def test_l2p_pull_enters_the_loss_and_batchwise_test_choice_depends_on_the_batch():
    method = _method("l2p")
    task = method.scenario.tasks[0]
    method.before_task(task)
    images = torch.rand(6, 3, 32, 32)
    out = method.training_step(Batch(images, torch.tensor([0, 1, 0, 1, 0, 1]), task))
    query = method.vit.query(images)
    ids = method.pool.select(query, batchwise=True)
    assert len(set(map(tuple, ids.tolist()))) == 1  # one choice for the batch
    assert out.terms["pull"].item() == pytest.approx(-method.cfg.pull_coeff * pull_term(query, method.pool.keys,
                                                                                       ids).item(), rel=1e-5)
    assert out.loss.item() == pytest.approx((out.terms["ce"] + out.terms["pull"]).item(), rel=1e-5)
    method.eval()
    classes = torch.tensor(task.classes)
    with torch.no_grad():
        method.cfg.batchwise_test = False  # per image: an image scores the same in any batch
        assert torch.allclose(method.logits(images[:2], classes), method.logits(images, classes)[:2], atol=1e-5)
        method.cfg.batchwise_test = True
        # designed queries and keys: image 0 alone picks prompts {0, 1}, the five others {2, 3}
        e = torch.eye(48)
        queries = torch.stack([e[0]] + [e[1]] * 5)
        method.vit.query = lambda x: queries[:len(x)]
        method.pool.keys.copy_(-(e[0] + e[1]).expand(10, -1))
        method.pool.keys[:4] = torch.stack([e[0], e[0] + 0.1 * e[2], e[1], e[1] + 0.1 * e[2]])
        assert method.pool.select(queries[:1], batchwise=True).tolist() == [[0, 1]]
        assert method.pool.select(queries, batchwise=True)[0].tolist() == [2, 3]

        def scored_with(ids):
            prompts = method.pool.tokens(ids)
            return method.head(method.vit.tokens(images[:1], prompts=prompts)[:, 1:1 + prompts.shape[1]].mean(1),
                               classes)

        assert torch.allclose(method.logits(images[:1], classes), scored_with(torch.tensor([[0, 1]])), atol=1e-5)
        assert torch.allclose(method.logits(images, classes)[:1], scored_with(torch.tensor([[2, 3]])), atol=1e-5)
        assert not torch.allclose(scored_with(torch.tensor([[0, 1]])), scored_with(torch.tensor([[2, 3]])))


def test_dualprompt_uses_its_own_prompt_in_training_and_shares_the_previous_one():
    method = _method("dualprompt", n_tasks=3, pool_size=2, top_k=1)
    tasks = method.scenario.tasks
    for task in tasks[:2]:
        method.before_task(task)
    assert method.own_slots(0) == slice(0, 1) and method.own_slots(1) == slice(1, 2) and method.own_slots(2) is None
    method.before_fit(tasks[1], None)  # shared pool: prompt 0 copied into prompt 1
    assert torch.equal(method.e_prompt.prompts[:, :, 1], method.e_prompt.prompts[:, :, 0])
    images = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        method.e_prompt.prompts[:, :, 1].add_(1.0)
        query = method.vit.query(images)
        feats, terms = method.features(images, tasks[1], train=True)
        own = torch.ones(4, 1, dtype=torch.long)  # the mask: prompt 1 for every image
        assert method.cfg.e_prefix_layout == "paired"  # the paper's; PILOT's reshape is a setting
        prefixes = {0: [method.g_prompt.prefixes()[0]], 1: [method.e_prompt.prefixes(own, "paired")[0]]}
        assert torch.allclose(feats, method.vit.tokens(images, prefixes=prefixes)[:, 0], atol=1e-6)
        assert terms["pull"].item() == pytest.approx(-0.1 * pull_term(query, method.e_prompt.keys, own).item(),
                                                     rel=1e-5)
        # past the pool (task 3 of a pool of 2): no copy, the keys choose as at test
        method.before_task(tasks[2])
        prompts = method.e_prompt.prompts.clone()
        method.before_fit(tasks[2], None)
        assert torch.equal(method.e_prompt.prompts, prompts)
        chosen = method.e_prompt.select(query, batchwise=True)
        prefixes[1] = [method.e_prompt.prefixes(chosen, "paired")[0]]
        assert torch.allclose(method.features(images, tasks[2], train=True)[0],
                              method.vit.tokens(images, prefixes=prefixes)[:, 0], atol=1e-6)


def test_defaults_are_pilots_configs():
    l2p, dual, coda = (load_method(n).Config() for n in ("l2p", "dualprompt", "coda-prompt"))
    # exps/l2p.json
    assert (l2p.pool_size, l2p.prompt_length, l2p.top_k, l2p.pull_coeff) == (10, 5, 5, 0.1)
    assert (l2p.lr, l2p.batch_size, l2p.epochs, l2p.optimizer, l2p.schedule, l2p.weight_decay) == \
        (0.001875, 16, 5, "adam", "constant", 0.0)
    assert l2p.batchwise and l2p.batchwise_test and l2p.prompt_position == "cls" and l2p.prompt_init == "pilot"
    # exps/dualprompt.json
    assert (dual.g_length, dual.g_layers, dual.pool_size, dual.e_length, dual.e_layers, dual.top_k) == \
        (5, (0, 1), 10, 5, (2, 3, 4), 1)
    assert (dual.lr, dual.batch_size, dual.epochs, dual.pull_coeff) == (0.001, 24, 5, 0.1)
    assert dual.prompt_mask and dual.shared_pool and dual.batchwise
    # exps/coda_prompt.json: prompt_param [100, 8, 0.0]
    assert (coda.pool_size, coda.prompt_length, coda.ortho_mu, coda.layers) == (100, 8, 0.0, (0, 1, 2, 3, 4))
    assert (coda.lr, coda.batch_size, coda.epochs, coda.schedule, coda.optimizer) == (0.001, 128, 20, "quarter-cosine", "adam")
    # the *_inr.json configs
    for name, epochs in (("l2p", 10), ("dualprompt", 10), ("coda-prompt", 50)):
        cfg, _ = resolve_config(load_method(name), "imagenet-r", False, {})
        assert cfg.epochs == epochs and cfg.eval_batch_size == cfg.batch_size
    assert resolve_config(load_method("l2p"), "imagenet-r", False, {})[0].batch_size == 32


def test_settings_that_do_not_fit_are_one_line():
    with pytest.raises(CilbenchError, match="out of range"):
        _method("coda-prompt", layers="0,4")
    with pytest.raises(CilbenchError, match="E-prompt layer 2"):
        _method("dualprompt", e_layers="2")
    with pytest.raises(CilbenchError, match="at least one E-prompt layer"):
        _method("dualprompt", e_layers="")
    with pytest.raises(CilbenchError, match="at least one component per task"):
        load_method("coda-prompt").check_plan(load_method("coda-prompt").Config(pool_size=3), _scenario(4, 2))
    with pytest.raises(CilbenchError, match="even"):
        CodaComponents(size=4, length=3, dim=4, key_dim=4, layers=1, tasks=2)
    with pytest.raises(CilbenchError, match="top_k"):
        PromptPool(size=3, length=1, dim=4, top_k=4)
    with pytest.raises(CilbenchError, match="timm ViT"):
        PromptedViT(build_backbone("resnet-tiny", pretrained=False))


def test_quarter_cosine_is_codas_schedule_and_the_prompt_methods_evaluate_class_by_class():
    import math

    from cilbench.engine.trainer import lr_factor
    from cilbench.methods.coda_prompt import CodaPrompt
    from cilbench.methods.l2p import L2P

    epochs = 20
    factors = [lr_factor(e, epochs, 0, "quarter-cosine", 0.0) for e in range(epochs)]
    assert factors[0] == 1.0 and factors[10] == pytest.approx(math.cos(99 * math.pi * 10 / (200 * 19)))
    assert factors[10] == pytest.approx(0.6833, abs=1e-4) and factors[-1] == pytest.approx(0.0157, abs=1e-4)
    assert CodaPrompt.Config().schedule == "quarter-cosine"
    assert L2P.eval_order == "class"


def test_class_ordered_evaluation_scores_the_same_images():
    """Sorting the test images by class changes the batches a method sees, never which image counts for which task."""
    import numpy as np

    from cilbench.data.scenario import Scenario, Task
    from cilbench.engine.evaluator import evaluate_row
    from cilbench.engine.loader import TaskData
    from cilbench.data.augment import PRESETS

    class Seen(torch.nn.Module):  # predicts class 0 for the first image of every batch, else the true label
        def __init__(self, order):
            super().__init__()
            self.eval_order, self.batches = order, []

        def score_views(self, images, classes):
            labels = images[:, 0, 0, 0].round().long()  # the label is written in the pixels
            self.batches.append(labels.tolist())
            scores = torch.nn.functional.one_hot(labels, 4).float()
            scores[0] = torch.nn.functional.one_hot(torch.tensor(0), 4).float()
            return scores, {}

    tasks = [Task(0, "t0", "toy", (0, 1), (0, 1)), Task(1, "t1", "toy", (2, 3), (2, 3))]
    scenario = Scenario("cil", "toy", "B0Inc2", 4, tasks)
    labels = np.array([1, 0, 1, 0, 3, 2, 3, 2])
    images = np.repeat(labels[:, None, None, None], 4 * 4 * 3, axis=1).reshape(8, 4, 4, 3).astype(np.uint8)
    test = [TaskData(images, np.arange(4), labels[:4]), TaskData(images, np.arange(4, 8), labels[4:])]
    transform = PRESETS["quick"].with_size(4)
    identity = lambda x, train=False, generator=None: x.permute(0, 3, 1, 2).float()  # noqa: E731
    rows = {}
    for order in ("store", "class"):
        method = Seen(order)
        method.eval = lambda: None
        rows[order] = (evaluate_row(method, scenario, 1, test, identity, torch.device("cpu"), 4), method.batches)
    assert rows["store"][1] == [[1, 0, 1, 0], [3, 2, 3, 2]] and rows["class"][1] == [[0, 0, 1, 1], [2, 2, 3, 3]]
    # store: the first image of each batch (a 1 and a 3) is wrong; class: the first (a 0: right) and a 2 (wrong)
    assert rows["store"][0].correct == [3, 3] and rows["class"][0].correct == [4, 3]
    del transform


def test_official_recipes_are_named_bundles_of_settings_under_the_users_own():
    from cilbench.errors import CilbenchError
    from cilbench.plan import RunOptions, RunPlan

    plan = RunPlan.build(RunOptions("l2p", "cifar100", recipe="official", sets={"lr": "0.02"}))
    cfg = plan.cfg
    assert (cfg.prompt_length, cfg.top_k, cfg.pull_coeff, cfg.batch_size, cfg.prompt_position) == \
        (10, 4, 1.0, 128, "none")
    assert cfg.lr == 0.02  # the user's --set wins over the recipe
    assert plan.overrides["top_k"] == 4 and plan.config_key  # a configuration of its own, never the default's
    assert plan.config_sources["recipe"] == "official"
    dual = RunPlan.build(RunOptions("dualprompt", "imagenet-r", recipe="official-imagenet-r")).cfg
    assert (dual.e_length, dual.batchwise, dual.epochs, dual.lr) == (20, False, 50, 0.00375)
    with pytest.raises(CilbenchError, match="coda-prompt has no recipe 'official' \\(it has none"):
        RunPlan.build(RunOptions("coda-prompt", "cifar100", recipe="official"))
    with pytest.raises(CilbenchError, match="its recipes: official, official-imagenet-r"):
        RunPlan.build(RunOptions("dualprompt", "cifar100", recipe="jax"))
