"""InfLoRA (methods/inflora.py) against hand computations: the design of A, DualGPM's energy threshold on tiny
matrices, interference-freeness of a trained B on the old tasks' subspace, frozen A / trained B, the merge, and an
exact reload, on vit-tiny (2 blocks of width 48)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from cilbench.methods.inflora import InfLoRA, design_A, grow_basis, threshold
from cilbench.models.backbones import build_backbone


def _orthogonal(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def _padded(columns: torch.Tensor, d: int) -> torch.Tensor:
    basis = torch.zeros(d, d, dtype=columns.dtype)
    basis[:, : columns.shape[1]] = columns
    return basis


# ---- the threshold, the design of A and DualGPM on tiny matrices ----

def test_threshold_rises_linearly_from_lamb_to_lame():
    assert threshold(0.95, 1.0, 0, 10) == pytest.approx(0.95)
    assert threshold(0.95, 1.0, 5, 10) == pytest.approx(0.975)
    assert threshold(0.98, 1.0, 9, 10) == pytest.approx(0.998)


def test_design_of_A_is_orthogonal_to_the_old_subspace_and_spans_the_top_projected_directions():
    d = 6
    q = _orthogonal(d, 0)
    # the current task's covariance: its strongest directions q0, q1 lie in the old subspace M = span(q0, q1)
    cov = q @ torch.diag(torch.tensor([10.0, 9.0, 5.0, 3.0, 1.0, 0.5], dtype=torch.float64)) @ q.T
    basis = _padded(q[:, :2], d)
    scale = 0.5
    A = design_A(cov, basis, 2, scale)
    assert A.shape == (2, d)
    assert torch.allclose(A @ q[:, :2], torch.zeros(2, 2, dtype=A.dtype), atol=1e-12)  # rows orthogonal to M
    # the rows are the next two directions (q2, q3), orthonormal up to the scale
    assert torch.allclose(A @ A.T, scale**2 * torch.eye(2, dtype=A.dtype), atol=1e-12)
    assert torch.allclose(A.T @ A / scale**2, q[:, 2:4] @ q[:, 2:4].T, atol=1e-10)
    # no old subspace yet: the top directions of C itself
    A0 = design_A(cov, torch.zeros(d, d, dtype=torch.float64), 2, 1.0)
    assert torch.allclose(A0.T @ A0, q[:, :2] @ q[:, :2].T, atol=1e-10)


def test_dualgpm_first_task_keeps_the_fewest_directions_reaching_the_threshold():
    cov = torch.diag(torch.tensor([6.0, 3.0, 1.0], dtype=torch.float64))  # energy shares 0.6, 0.3, 0.1
    for eps, rank in [(0.55, 1), (0.85, 2), (0.95, 3)]:
        basis = torch.zeros(3, 3, dtype=torch.float64)
        assert grow_basis(cov, basis, 0, eps, "paper") == rank
        assert torch.allclose(basis[:, :rank].abs(), torch.eye(3, dtype=torch.float64)[:, :rank])
        assert (basis[:, rank:] == 0).all()
    # the code's arithmetic: shares of the squared singular values of C (36, 9, 1 of 46: 0.783, 0.978, 1) and
    # the count of cumulative shares strictly below epsilon (at least 1): 1 direction at 0.95, 2 at 0.99
    basis = torch.zeros(3, 3, dtype=torch.float64)
    assert grow_basis(cov, basis, 0, 0.95, "code") == 1
    assert grow_basis(cov, torch.zeros(3, 3, dtype=torch.float64), 0, 0.99, "code") == 2


def test_dualgpm_later_task_adds_projected_directions_until_the_captured_share_reaches_the_threshold():
    e = torch.eye(3, dtype=torch.float64)
    cov = torch.diag(torch.tensor([1.0, 0.0, 4.0], dtype=torch.float64))  # new task: energy 1 in M, 4 outside
    # M = span(e0) captures 1/5 of the energy (paper): below 0.95, so e2 joins; e1 carries no energy, never added
    basis = _padded(e[:, :1], 3)
    assert grow_basis(cov, basis, 1, 0.95, "paper") == 2
    assert torch.allclose(basis[:, 1].abs(), e[:, 2]) and (basis[:, 2] == 0).all()
    assert torch.allclose(basis[:, :2].T @ basis[:, :2], torch.eye(2, dtype=torch.float64))
    # a threshold already met (0.2 >= 0.1): nothing added
    basis = _padded(e[:, :1], 3)
    assert grow_basis(cov, basis, 1, 0.1, "paper") == 1 and (basis[:, 1:] == 0).all()
    # the code's shares: 1 / 17 captured (||C||_F^2 = 1 + 16), then e2's 16 / 17: e2 joins
    basis = _padded(e[:, :1], 3)
    assert grow_basis(cov, basis, 1, 0.95, "code") == 2
    assert torch.allclose(basis[:, 1].abs(), e[:, 2])


def test_dualgpm_basis_stays_orthonormal_and_never_exceeds_the_width():
    d = 5
    basis = torch.zeros(d, d, dtype=torch.float64)
    k = 0
    for seed in range(4):
        r = torch.randn(d, 50, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        k = grow_basis(r @ r.T / 50, basis, k, 0.99, "paper")
        assert k <= d
        assert torch.allclose(basis[:, :k].T @ basis[:, :k], torch.eye(k, dtype=torch.float64), atol=1e-10)


# ---- the method on vit-tiny ----

WIDTH = 48


class _Ctx:
    """The part of the task context InfLoRA reads: features over fixed images, and a log."""

    def __init__(self, images: torch.Tensor):
        self.images = images
        self.logged = {}

    def features(self, encode, data=None, augment=False, low_precision=False):
        with torch.no_grad():
            return encode(self.images).float(), torch.zeros(len(self.images), dtype=torch.long)

    def log(self, **values):
        self.logged.update(values)


def _method(**sets) -> InfLoRA:
    torch.manual_seed(0)
    backbone = build_backbone("vit-tiny", pretrained=False).eval()
    cfg = InfLoRA.Config(lora_rank=4, **sets)
    scenario = SimpleNamespace(tasks=[None] * 4)
    return InfLoRA(cfg, backbone, scenario).eval()


def _images(seed: int, n: int = 6) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _task(index: int) -> SimpleNamespace:
    return SimpleNamespace(index=index, classes=(2 * index, 2 * index + 1))


def _train(method: InfLoRA, task, images: torch.Tensor, steps: int = 5, lr: float = 1e-2) -> None:
    """A few Adam steps on the method's own parameter groups (CE over the task's classes)."""
    opt = torch.optim.Adam([p for g in method.param_groups(task) for p in g["params"]], lr=lr)
    classes = torch.tensor(task.classes)
    labels = torch.arange(len(images)) % 2
    for step in range(steps):
        loss = F.cross_entropy(method.head(method.backbone(images), classes), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.after_step(step)


def test_A_is_frozen_and_only_B_and_the_head_train_and_query_rows_stay_zero():
    m = _method()
    task = _task(0)
    m.before_task(task)
    m.before_fit(task, _Ctx(_images(1)))
    banks = m.banks()
    assert list(banks) == ["model.blocks.0.attn.qkv", "model.blocks.1.attn.qkv"]
    trained = {id(p) for g in m.param_groups(task) for p in g["params"]}
    for bank in banks.values():
        e = bank.entries[0]
        assert not e.A.requires_grad and id(e.A) not in trained and id(e.B) in trained
    assert {id(p) for p in m.head.parameters()} <= trained
    assert not any(p.requires_grad for n, p in m.backbone.named_parameters() if ".lora." not in n)
    before = {n: b.entries[0].A.clone() for n, b in banks.items()}
    _train(m, task, _images(1))
    for n, bank in banks.items():
        e = bank.entries[0]
        assert torch.equal(e.A, before[n])  # A never moves
        assert e.B[WIDTH:].abs().sum() > 0  # k / v rows learnt
        assert (e.B[:WIDTH] == 0).all()  # the query is not adapted (qkv_rows="kv")


def test_designed_A_on_vit_tiny_has_orthonormal_scaled_rows_on_the_top_directions():
    m = _method()
    images = _images(1)
    m.before_task(_task(0))
    ctx = _Ctx(images)
    covs = m.representations(ctx)
    # block 0's qkv input is norm1(patch tokens + positions): the covariance by hand
    blocks = m.backbone.get_submodule("model.blocks")
    seen = {}
    h = blocks[0].attn.qkv.register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0].detach()))
    with torch.no_grad():
        m.backbone(images)
    h.remove()
    x = seen["x"].reshape(-1, WIDTH).double()
    assert torch.allclose(covs["model.blocks.0.attn.qkv"], x.T @ x / len(x), atol=1e-10)
    m.design(covs)
    A = m.banks()["model.blocks.0.attn.qkv"].entries[0].A.double()
    scale = m.cfg.a_scale
    assert torch.allclose(A @ A.T, scale**2 * torch.eye(4, dtype=torch.float64), atol=1e-6)
    values, vectors = torch.linalg.eigh(covs["model.blocks.0.attn.qkv"])
    top = vectors[:, -4:]
    assert torch.allclose(A.T @ A / scale**2, top @ top.T, atol=1e-4)


def test_training_B_leaves_the_outputs_on_the_old_subspace_unchanged():
    m = _method()
    task = _task(1)
    m.before_task(_task(0))
    m.before_task(task)
    layer = m.backbone.get_submodule("model.blocks.0.attn.qkv")
    q = _orthogonal(WIDTH, 3).float()
    old = q[:, :30]  # the old tasks' subspace
    for bank in m.banks().values():
        bank.basis.copy_(_padded(old, WIDTH))
        bank.basis_rank.fill_(30)
    m.before_fit(task, _Ctx(_images(2)))
    x_old = torch.randn(7, 30, generator=torch.Generator().manual_seed(4)) @ old.T  # inputs in span(M)
    x_new = torch.randn(7, WIDTH, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        y_old, y_new = layer(x_old), layer(x_new)
    _train(m, task, _images(2), steps=8, lr=5e-2)
    with torch.no_grad():
        assert (layer(x_new) - y_new).abs().max() > 1e-3  # B learnt something
        assert torch.allclose(layer(x_old), y_old, atol=1e-5)  # ... and nothing on the old subspace
        for bank in m.banks().values():
            assert bank.entries[0].delta().abs().max() > 0
            assert (bank.entries[0].delta() @ old).abs().max() < 1e-5


def _run_task(m: InfLoRA, index: int, images: torch.Tensor) -> _Ctx:
    task, ctx = _task(index), _Ctx(images)
    m.before_task(task)
    m.before_fit(task, ctx)
    _train(m, task, images)
    m.after_task(task, ctx)
    return ctx


def test_after_task_merges_B_A_into_the_weights_keeps_the_outputs_and_grows_the_basis():
    m = _method()
    images = _images(1)
    task, ctx = _task(0), _Ctx(images)
    m.before_task(task)
    m.before_fit(task, ctx)
    _train(m, task, images)
    deltas = {n: b.entries[0].delta().detach().clone() for n, b in m.banks().items()}
    with torch.no_grad():
        before = m.backbone(images)
    m.after_task(task, ctx)
    with torch.no_grad():
        assert torch.allclose(m.backbone(images), before, atol=1e-5)  # merging changes nothing
    for n, bank in m.banks().items():
        assert torch.equal(bank.merged, deltas[n])
        assert (bank.entries[0].B == 0).all()
        assert torch.equal(m._base(n), bank.pretrained + bank.merged)
        k = int(bank.basis_rank)
        assert 1 <= k <= WIDTH
        M = bank.basis[:, :k]
        assert torch.allclose(M.T @ M, torch.eye(k), atol=1e-5)
    assert ctx.logged["inflora_basis_rank_max"] >= 1
    # the next task's A is orthogonal to the basis of every layer
    m.before_task(_task(1))
    m.before_fit(_task(1), _Ctx(_images(2)))
    for bank in m.banks().values():
        assert (bank.entries[0].A @ bank.basis).abs().max() < 1e-5


def test_state_stays_constant_with_tasks_and_a_reload_gives_identical_outputs():
    m = _method()
    sizes = []
    for t in range(3):
        _run_task(m, t, _images(10 + t))
        sizes.append(sum(v.numel() for v in m.checkpoint_state().values()) - m.head.weight.numel()
                     - m.head.bias.numel())
    assert sizes[0] == sizes[1] == sizes[2]  # only the head grows
    state = {k: v.clone() for k, v in m.checkpoint_state().items()}
    fresh = _method()
    for t in range(3):
        fresh.before_task(_task(t))  # structure replayed, as on resume
    fresh.load_checkpoint_state(state)
    images, classes = _images(20), torch.arange(6)
    with torch.no_grad():
        assert torch.equal(fresh.logits(images, classes), m.logits(images, classes))
