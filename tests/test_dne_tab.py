"""DNE's task attention block (cilbench/models/dne.py): TA against loops written out by hand, the frozen old tasks,
the wiring of eqs. (17)-(18) across tasks, and the parameter count at full size. Tiny and CPU only."""

from __future__ import annotations

import math

import pytest
import torch

from cilbench.errors import CilbenchError
from cilbench.models.dne import DenseMLP, FirstTaskMLP, TaskAttention, TaskAttentionMLP


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial values everywhere (LN affine, biases, lambdas) so that every term shows in the comparison."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.7 + (1.0 if p.dim() == 1 else 0.0))


def _layer_norm(vec: list[float], weight: list[float], bias: list[float], eps: float) -> list[float]:
    mean = sum(vec) / len(vec)
    var = sum((v - mean) ** 2 for v in vec) / len(vec)
    return [(v - mean) / math.sqrt(var + eps) * w + b for v, w, b in zip(vec, weight, bias)]


def _matvec(mat: list[list[float]], vec: list[float]) -> list[float]:
    return [sum(mat[r][c] * vec[c] for c in range(len(vec))) for r in range(len(mat))]


def _ta_by_hand(ta: TaskAttention, x: torch.Tensor) -> torch.Tensor:
    """Eqs. (19)-(23) without the GELU, one patch, one query head and one key head at a time."""
    B, N, H, _ = x.shape
    Wq, Wk = ta.q.weight.tolist(), ta.k.weight.tolist()
    Wv, bv = ta.v_weight.tolist(), ta.v_bias.tolist()
    lam = ta.lam.tolist()
    out = torch.zeros(B, N, ta.new_heads, ta.d_out, dtype=torch.float64)
    for b in range(B):
        for n in range(N):
            feats = []
            for j in range(H):
                f = x[b, n, j].tolist()
                if ta.norms is not None:
                    ln = ta.norms[j]
                    f = _layer_norm(f, ln.weight.tolist(), ln.bias.tolist(), ln.eps)
                feats.append(f)
            keys = [_matvec(Wk, feats[j]) for j in range(H)]                    # all heads (20)
            values = [[v + bb for v, bb in zip(_matvec(Wv[j], feats[j]), bv[j])] for j in range(H)]  # (22)
            for i in range(ta.new_heads):
                q = _matvec(Wq, feats[ta.old_heads + i])                        # new task's heads only (19)
                scores = [sum(q[c] * keys[j][c] for c in range(len(q))) / math.sqrt(ta.d_q) for j in range(H)]
                top = max(scores)
                e = [math.exp(s - top) for s in scores]
                attn = [v / sum(e) for v in e]                                  # softmax over all H heads (21)
                li = lam[0] if ta.lambda_mode == "module" else lam[i]
                for o in range(ta.d_out):
                    out[b, n, i, o] = li * sum(attn[j] * values[j][o] for j in range(H))  # (23)
    return out


@pytest.mark.parametrize("lambda_mode", ["module", "head"])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("old_heads,new_heads,d_q", [(2, 1, None), (2, 2, 6)])
def test_task_attention_matches_hand_loop(lambda_mode, norm, old_heads, new_heads, d_q):
    torch.manual_seed(0)
    ta = TaskAttention(old_heads, new_heads, d_in=4, d_out=5, d_q=d_q, lambda_mode=lambda_mode, norm=norm).double()
    _randomise(ta, seed=1)
    assert ta.lam.shape == ((1,) if lambda_mode == "module" else (new_heads,))
    x = torch.randn(2, 3, old_heads + new_heads, 4, dtype=torch.float64)
    got = ta(x)
    assert got.shape == (2, 3, new_heads, 5)
    torch.testing.assert_close(got, _ta_by_hand(ta, x), rtol=1e-10, atol=1e-10)


def test_task_attention_pieces_and_defaults():
    ta = TaskAttention(12, 1, d_in=32, d_out=128)
    assert ta.lam.tolist() == [12.0]                      # official: one lambda, number of old heads
    assert ta.norms is None and ta.q.bias is None and ta.k.bias is None
    assert ta.scale == pytest.approx(32 ** -0.5)
    head = TaskAttention(2, 3, d_in=4, d_out=4, lambda_mode="head")
    assert head.lam.tolist() == [2.0, 2.0, 2.0]
    x = torch.randn(2, 5, 5, 4)
    attn = head.attention(x)
    assert attn.shape == (2, 5, 3, 5)
    torch.testing.assert_close(attn.sum(-1), torch.full((2, 5, 3), 2.0))   # softmax rows times lambda
    torch.testing.assert_close(head(x), attn @ head.values(x))
    with pytest.raises(CilbenchError):
        head(torch.randn(2, 5, 4, 4))
    with pytest.raises(CilbenchError):
        TaskAttention(2, 1, 4, 4, lambda_mode="task")


def test_second_linear_qk_is_hidden_width():
    mlp = TaskAttentionMLP(12, 1, head_dim=32, mlp_ratio=4)
    assert mlp.fc1.q.weight.shape == (32, 32) and mlp.fc1.scale == pytest.approx(32 ** -0.5)
    assert mlp.fc2.q.weight.shape == (128, 128) and mlp.fc2.k.weight.shape == (128, 128)
    assert mlp.fc2.scale == pytest.approx(128 ** -0.5)
    assert mlp.fc1.v_weight.shape == (13, 128, 32) and mlp.fc2.v_weight.shape == (13, 32, 128)
    other = TaskAttentionMLP(12, 1, head_dim=32, qk_dim2=32)
    assert other.fc2.q.weight.shape == (32, 128) and other.fc2.scale == pytest.approx(32 ** -0.5)


def _full_size_count(old: int, new: int, d: int, hidden: int, lambda_mode: str, norm: bool) -> int:
    heads = old + new
    n_lam = 1 if lambda_mode == "module" else new
    fc1 = 2 * d * d + heads * (d * hidden + hidden) + n_lam + (heads * 2 * d if norm else 0)
    fc2 = 2 * hidden * hidden + heads * (hidden * d + d) + n_lam + (heads * 2 * hidden if norm else 0)
    return fc1 + fc2


@pytest.mark.parametrize("lambda_mode,norm", [("module", False), ("head", False), ("module", True)])
def test_parameter_count_full_size(lambda_mode, norm):
    dense = DenseMLP(first_heads=12, head_dim=32, mlp_ratio=4, lambda_mode=lambda_mode, norm=norm)
    module = dense.expand(1)
    count = sum(p.numel() for p in module.parameters())
    assert count == _full_size_count(12, 1, 32, 128, lambda_mode, norm)
    if lambda_mode == "module" and not norm:
        # q,k 2*32*32 + 13 values (32*128 + 128) + 1 lambda; q,k 2*128*128 + 13 values (128*32 + 32) + 1 lambda
        assert count == (2048 + 13 * 4224 + 1) + (32768 + 13 * 4128 + 1) == 143394
    first = sum(p.numel() for p in dense.tasks[0].parameters())
    assert first == 384 * 1536 + 1536 + 1536 * 384 + 384   # the plain ViT MLP of the 12-head first task


def test_dense_mlp_wiring_matches_eqs_17_18():
    torch.manual_seed(0)
    dense = DenseMLP(first_heads=2, head_dim=4, mlp_ratio=4).double()
    t2 = dense.expand(1)
    t3 = dense.expand(2)
    assert dense.heads_per_task == [2, 1, 2] and dense.num_heads == 5
    _randomise(dense, seed=3)
    x = torch.randn(2, 3, 5 * 4, dtype=torch.float64)
    s = x.unflatten(-1, (5, 4))
    first = dense.tasks[0]
    o1 = first.hidden(s[..., :2, :])
    o2 = t2.hidden(s[..., :3, :])                          # (18): task 2 sees tasks 1-2's heads
    o3 = t3.hidden(s)
    r1 = first.out(o1)
    r2 = t2.out(torch.cat([o1, o2], dim=-2))               # (17): task 2 sees tasks 1-2's hidden heads
    r3 = t3.out(torch.cat([o1, o2, o3], dim=-2))
    want = torch.cat([r1, r2, r3], dim=-2).flatten(-2)
    torch.testing.assert_close(dense(x), want)
    assert o3.shape == (2, 3, 2, 16) and r3.shape == (2, 3, 2, 4)
    # the first task is the plain MLP of its own heads
    plain = first.fc2(torch.nn.functional.gelu(first.fc1(x[..., :8])))
    torch.testing.assert_close(dense(x)[..., :8], plain)


def test_old_tasks_frozen_and_unchanged_by_training_new_task():
    torch.manual_seed(0)
    dense = DenseMLP(first_heads=2, head_dim=4, mlp_ratio=4, lambda_mode="head", norm=True)
    dense.expand(1)
    dense.expand(1)                                        # tasks: 2 + 1 + 1 heads, train the third
    old_params = [p for m in dense.tasks[:-1] for p in m.parameters()]
    new_params = list(dense.tasks[-1].parameters())
    assert old_params and all(not p.requires_grad for p in old_params)
    assert all(p.requires_grad for p in new_params)
    assert [p for p in dense.parameters() if p.requires_grad] == new_params
    old_snapshot = [p.detach().clone() for p in old_params]
    new_snapshot = [p.detach().clone() for p in new_params]

    x = torch.randn(4, 3, 4 * 4)
    target = torch.randn(4, 3, 4 * 4)
    before = dense(x).detach()
    opt = torch.optim.Adam([p for p in dense.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        loss = (dense(x) - target).pow(2).mean()           # a loss on every output, old heads included
        loss.backward()
        opt.step()
    after = dense(x).detach()

    assert all(p.grad is None for p in old_params)
    assert all(torch.equal(p, q) for p, q in zip(old_params, old_snapshot))
    assert torch.equal(after[..., :12], before[..., :12])  # old heads' outputs (tasks 1 and 2) unchanged
    assert not torch.allclose(after[..., 12:], before[..., 12:])
    assert any(not torch.equal(p, q) for p, q in zip(new_params, new_snapshot))


def test_new_task_reads_old_heads_but_not_the_reverse():
    torch.manual_seed(0)
    dense = DenseMLP(first_heads=2, head_dim=4, mlp_ratio=4)
    dense.expand(1)
    x = torch.randn(2, 3, 12)
    base = dense(x)

    x_old = x.clone()
    x_old[..., 0:4] += 1.0                                 # change old head 0's input only
    moved = dense(x_old)
    assert not torch.allclose(moved[..., 8:], base[..., 8:])   # the new task's heads see it

    x_new = x.clone()
    x_new[..., 8:] += 1.0                                  # change the new head's input only
    moved = dense(x_new)
    assert torch.equal(moved[..., :8], base[..., :8])      # old heads never read the new one
    assert not torch.allclose(moved[..., 8:], base[..., 8:])

    # the gradient of the new task's output reaches old heads' inputs; old outputs carry no graph
    xg = x.clone().requires_grad_(True)
    dense(xg)[..., 8:].sum().backward()
    assert xg.grad[..., :8].abs().sum() > 0
    with torch.no_grad():
        assert not dense(x).requires_grad                  # a caller's no_grad is respected


def test_first_task_alone_and_shape_errors():
    dense = DenseMLP(first_heads=3, head_dim=4)
    assert isinstance(dense.tasks[0], FirstTaskMLP)
    assert dense(torch.randn(2, 12)).shape == (2, 12)
    with pytest.raises(CilbenchError):
        dense(torch.randn(2, 16))
    mlp = TaskAttentionMLP(2, 1, head_dim=4)
    with pytest.raises(CilbenchError):
        mlp(torch.randn(2, 3, 4))                          # old hidden heads missing
