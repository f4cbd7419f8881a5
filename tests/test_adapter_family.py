"""The adapter family's shared parts against hand computations, and CICAE end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from cilbench.models.adapter import AdaptedBlock, AdaptedViT
from cilbench.models.backbones import build_backbone
from cilbench.models.gaussian import ClassGaussians, semantic_drift
from cilbench.models.losses import cosine_ce, margin_cosine_ce, pairwise_kl


def _tiny(experts: int = 3) -> tuple[torch.nn.Module, AdaptedViT]:
    torch.manual_seed(0)
    backbone = build_backbone("vit-tiny", pretrained=False).eval()
    return backbone, AdaptedViT(backbone, experts)


def _perturb(vit: AdaptedViT) -> None:
    gen = torch.Generator().manual_seed(1)
    for blk in vit.blocks:
        for adapter in blk.adapters.experts:
            for p in adapter.parameters():
                p.data = torch.randn(p.shape, generator=gen)


# ---- adapters ----

def test_adapted_vit_equals_plain_vit_at_init():
    torch.manual_seed(0)
    backbone = build_backbone("vit-tiny", pretrained=False).eval()
    images = torch.rand(4, 3, 32, 32)
    plain = backbone(images)
    vit = AdaptedViT(backbone, 3)
    for blk in vit.blocks:
        for a in blk.adapters.experts:
            assert a.up.weight.abs().sum() == 0 and a.up.bias.abs().sum() == 0 and a.down.bias.abs().sum() == 0
            assert a.down.weight.abs().sum() > 0
    backbone.train()  # dropout on: a zero up-projection still adds exactly nothing
    assert torch.equal(vit(images), plain.expand(3, -1, -1))
    assert torch.equal(vit(images, batched=False), plain.expand(3, -1, -1))
    assert torch.equal(vit.plain(images), plain)


def test_adapter_sits_parallel_to_the_mlp_on_the_post_attention_stream():
    backbone, vit = _tiny(1)
    _perturb(vit)
    blk: AdaptedBlock = vit.blocks[0]
    blk.active = (0,)
    x = torch.randn(2, 5, 48)
    b, a = blk.block, blk.adapters.experts[0]
    x1 = x + b.attn(b.norm1(x))  # the residual stream after attention
    expected = x1 + b.mlp(b.norm2(x1)) + 0.1 * F.linear(torch.relu(F.linear(x1, a.down.weight, a.down.bias)),
                                                        a.up.weight, a.up.bias)
    torch.testing.assert_close(blk(x), expected)


def test_batched_experts_equal_sequential_passes():
    backbone, vit = _tiny(3)
    _perturb(vit)
    images = torch.rand(5, 3, 32, 32)
    batched, sequential = vit(images), vit(images, batched=False)
    torch.testing.assert_close(batched, sequential, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(batched[0], batched[1])  # the experts differ
    torch.testing.assert_close(vit(images, [2, 0]), batched[[2, 0]], rtol=1e-4, atol=1e-4)
    vit.max_images = 10  # two experts per pass: the third runs in a second pass
    torch.testing.assert_close(vit(images), batched, rtol=1e-4, atol=1e-4)


def test_expert_parameters_are_separate_and_counted():
    backbone, vit = _tiny(3)
    per_block = 2 * 48 * 64 + 64 + 48
    for k in range(3):
        assert sum(p.numel() for p in vit.expert_parameters(k)) == 2 * per_block  # 2 blocks
    ids = [{id(p) for p in vit.expert_parameters(k)} for k in range(3)]
    assert not ids[0] & ids[1]
    assert not any(p.requires_grad for n, p in backbone.named_parameters() if ".adapters." not in n)
    assert vit.add_expert() == 3 and vit.num_experts == 4


def test_cicae_has_about_3_6m_trainable_parameters_on_vit_b16():
    backbone = build_backbone("vit-b16-in21k", pretrained=False)
    vit = AdaptedViT(backbone, 3)
    n = sum(p.numel() for k in range(3) for p in vit.expert_parameters(k))
    assert n == 3 * 12 * (2 * 768 * 64 + 64 + 768) == 3_568_896  # the paper: "about 3.6 M"


# ---- losses ----

def test_margin_cosine_ce_by_hand():
    cos = torch.tensor([[0.5, 0.2, -0.1], [0.1, 0.7, 0.3]])
    y = torch.tensor([0, 1])
    s, m = 2.0, 0.3

    def one(c, t):
        num = s * (c[t] - m)
        den = math.exp(num) + sum(math.exp(s * v) for i, v in enumerate(c) if i != t)
        return -(num - math.log(den))

    expected = (one([0.5, 0.2, -0.1], 0) + one([0.1, 0.7, 0.3], 1)) / 2
    assert margin_cosine_ce(cos, y, s, m).item() == pytest.approx(expected, rel=1e-6)
    assert margin_cosine_ce(cos, y, s, 0.0).item() == pytest.approx(F.cross_entropy(s * cos, y).item(), rel=1e-6)
    assert cosine_ce(cos, y, 0.1).item() == pytest.approx(F.cross_entropy(cos / 0.1, y).item(), rel=1e-6)


def test_pairwise_kl_by_hand():
    p1, p2 = [0.5, 0.5], [0.8, 0.2]
    logits = torch.log(torch.tensor([[p1], [p2]]))  # [K=2, B=1, C=2]

    def kl(p, q):
        return sum(a * math.log(a / b) for a, b in zip(p, q))

    assert pairwise_kl(logits).item() == pytest.approx(kl(p1, p2) + kl(p2, p1), rel=1e-5)
    assert pairwise_kl(logits[:1]).item() == 0.0  # a single expert has no partner
    # K = 3, batch of 2: the sum over the six ordered pairs of batch-mean KLs
    torch.manual_seed(0)
    lg = torch.randn(3, 2, 4)
    p = lg.softmax(-1)
    want = sum((p[i] * (p[i].log() - p[j].log())).sum(-1).mean() for i in range(3) for j in range(3) if i != j)
    assert pairwise_kl(lg).item() == pytest.approx(want.item(), rel=1e-5)
    assert pairwise_kl(lg[[0, 0, 0]]).item() == pytest.approx(0.0, abs=1e-6)  # identical experts agree


# ---- Gaussian statistics ----

@pytest.mark.parametrize("n", [6, 40])  # fewer and more images than dimensions (factor vs Cholesky)
def test_class_gaussians_hold_the_sample_covariance_plus_ridge(n):
    torch.manual_seed(0)
    d = 8
    feats = torch.randn(2 * n, d) * torch.linspace(0.5, 2, d)
    labels = torch.arange(2 * n) % 2 + 3  # classes 3 and 4
    g = ClassGaussians(d, ridge=1e-3)
    g.add(feats, labels)
    for c in (3, 4):
        x = feats[labels == c].double()
        torch.testing.assert_close(g.covariance(c), torch.cov(x.T) + 1e-3 * torch.eye(d, dtype=torch.float64),
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g.means[int(g.position(torch.tensor([c])))], x.mean(0).float())


def test_class_gaussian_samples_follow_mean_and_covariance():
    torch.manual_seed(0)
    x = torch.randn(5, 3) @ torch.tensor([[2.0, 0.5, 0.0], [0.0, 1.0, 0.3], [0.0, 0.0, 0.5]]) + 4
    g = ClassGaussians(3, ridge=1e-2)
    g.add(x, torch.zeros(5, dtype=torch.long))
    s, labels = g.sample(torch.tensor([0]), 200_000, torch.Generator().manual_seed(3))
    assert s.shape == (200_000, 3) and labels.unique().tolist() == [0]
    torch.testing.assert_close(s.mean(0), x.mean(0), atol=0.02, rtol=0)
    torch.testing.assert_close(torch.cov(s.double().T), g.covariance(0), atol=0.03, rtol=0.02)


def test_class_gaussians_replace_shift_and_reload_with_new_shapes():
    g = ClassGaussians(4)
    g.add(torch.randn(6, 4), torch.tensor([0, 0, 0, 1, 1, 1]))
    g.add(torch.randn(4, 4) + 10, torch.tensor([1, 1, 2, 2]))  # class 1 seen again: replaced
    assert sorted(g.classes.tolist()) == [0, 1, 2]
    assert g.means[int(g.position(torch.tensor([1])))].mean() > 5
    g.shift(torch.tensor([0]), torch.ones(1, 4))
    fresh = ClassGaussians(4)
    fresh.load_state_dict(g.state_dict())
    for c in (0, 1, 2):
        torch.testing.assert_close(fresh.covariance(c), g.covariance(c))
    torch.testing.assert_close(fresh.means, g.means)


def test_semantic_drift_by_hand():
    before = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    after = torch.tensor([[1.0, 0.0], [3.0, 2.0]])  # drifts (1, 0) and (0, 2)
    mean = torch.tensor([[1.0, 0.0]])
    sigma = 1.0
    w = [math.exp(-1 / 2) + 1e-5, math.exp(-4 / 2) + 1e-5]
    expected = torch.tensor([[w[0] / sum(w), 2 * w[1] / sum(w)]])
    torch.testing.assert_close(semantic_drift(before, after, mean, sigma), expected)


def test_a_sampled_phase_fits_a_head_on_features_drawn_each_epoch():
    from types import SimpleNamespace

    from cilbench.engine.trainer import run_phase
    from cilbench.methods.base import TrainConfig
    from cilbench.methods.contract import Phase, Sampled

    torch.manual_seed(0)
    g = ClassGaussians(2, ridge=1e-2)
    g.add(torch.tensor([[3.0, 0.0], [3.1, 0.1], [-3.0, 0.0], [-3.1, -0.1]]), torch.tensor([0, 0, 1, 1]))
    w = torch.nn.Parameter(torch.tensor([[0.0, 1.0], [0.0, -1.0]]))  # starts wrong
    drawn = []

    def draw(epoch):
        drawn.append(epoch)
        return g.sample(torch.tensor([0, 1]), 64, torch.Generator().manual_seed(epoch))

    phase = Phase("align", lambda b: F.cross_entropy(b.images @ w.T, b.targets([0, 1])), [dict(params=[w])],
                  data=Sampled(draw), epochs=5, batch_size=32, optimizer="sgd", lr=0.1, weight_decay=0.0,
                  schedule="cosine", schedule_unit="epoch")
    stats = run_phase(torch.nn.Module(), phase, TrainConfig(), SimpleNamespace(index=0, name="t"), None, None,
                      torch.device("cpu"), seed=0)
    curve = stats.epoch_terms["loss"]
    assert drawn == [0, 1, 2, 3, 4] and stats.steps == 5 * 4  # a fresh draw per epoch, 128 samples / 32
    assert len(curve) == 5 and curve[-1] < curve[0]
    assert w[0, 0] > w[1, 0]  # class 0 now scores the positive side


# ---- CICAE end to end ----

def _run(cli, out, *sets):
    # four epochs a task keep these structural checks fast; tests/test_quick_learns.py runs the quick profile itself
    args = ["run", "cicae", "--dataset", "synthetic", "--quick", "--out", str(out), "--set", "epochs=4", "--set",
            "first_epochs=4"]
    for s in sets:
        args += ["--set", s]
    res = cli(*args)
    assert res.code == 0, res.err
    return json.loads(next(out.glob("*.json")).read_text())


def test_cicae_records_experts_collaboration_and_alignment(cli, tmp_path):
    rec = _run(cli, tmp_path / "collab")
    assert set(rec["views"]) == {"expert1", "expert2", "expert3"}
    for view in rec["views"].values():
        assert len(view["accuracy_matrix"]) == len(rec["accuracy_matrix"]) and "A_last" in view["metrics"]
    tasks = rec["log"]
    kl = tasks[0]["phases"]["train"]["epochs"]["cks_kl"]
    assert kl[0] > kl[-1] > 0  # the experts disagree and the CKS term pulls them together
    assert "align" not in tasks[0]["phases"]
    assert all(len(t["phases"]["align"]["epochs"]["loss"]) == rec["config"]["ca_epochs"] for t in tasks[1:])
    assert all(t["phases"]["align"]["epochs"]["cca_kl"] for t in tasks[1:])
    assert all(len(t["drift_norm"]) == 3 for t in tasks[1:])
    assert all(t["expert_kl"] > 0 for t in tasks)


def test_cks_gradient_reaches_every_expert_and_pulls_them_together():
    from cilbench.data.scenario import build_scenario
    from cilbench.methods.cicae import CICAE

    torch.manual_seed(0)
    backbone = build_backbone("vit-tiny", pretrained=False)
    method = CICAE(CICAE.Config(), backbone, build_scenario("synthetic", None, 1993, None, None))
    task = method.scenario.tasks[0]
    method.before_task(task)
    _perturb(method.vit)
    method.eval()  # no dropout: the same function before and after the step
    images, classes = torch.rand(8, 3, 32, 32), torch.tensor(task.classes)

    def kl():
        return pairwise_kl(method.expert_cosines(method.features(images), classes))

    before = kl()
    before.backward()
    for k in range(3):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.vit.expert_parameters(k))
        assert method.heads[k].weight.grad.abs().sum() > 0
    with torch.no_grad():
        for p in method.parameters():
            if p.grad is not None:
                p -= 1e-3 * p.grad
    assert kl().item() < before.item()


def test_cicae_single_expert_inference_and_ablation_switches(cli, tmp_path):
    rec = _run(cli, tmp_path, "infer_expert=2", "num_experts=2", "expert_lrs=0.001")
    assert rec["config"]["expert_lrs"] == [0.001]
    assert set(rec["views"]) == {"expert1", "expert2"}
    assert rec["metrics"]["A_last"] == rec["views"]["expert2"]["metrics"]["A_last"]
    assert rec["accuracy_matrix"] == rec["views"]["expert2"]["accuracy_matrix"]
    bad = cli("run", "cicae", "--dataset", "synthetic", "--quick", "--out", str(tmp_path), "--set",
              "expert_lrs=0.1,0.2")
    assert bad.code == 2 and "expert_lrs gives 2 rates for num_experts=3" in bad.err


@pytest.mark.parametrize("k,rates", [(1, (1e-2,)), (2, (1e-2, 2e-2)), (3, (1e-2, 2e-2, 1e-3))])
def test_cicae_num_experts_alone_takes_the_papers_first_rates(k, rates):
    from cilbench.data.scenario import build_scenario
    from cilbench.methods.base import resolve_config
    from cilbench.methods.cicae import CICAE

    cfg, _ = resolve_config(CICAE, "synthetic", True, {"num_experts": str(k)})
    assert cfg.expert_lrs == rates  # the record holds the rates the run used
    method = CICAE(cfg, build_backbone("vit-tiny", pretrained=False), build_scenario("synthetic", None, 1993))
    assert method.lrs == rates and method.vit.num_experts == k


def test_cicae_more_experts_than_the_paper_names_what_to_pass():
    from cilbench.data.scenario import build_scenario
    from cilbench.errors import CilbenchError
    from cilbench.methods.base import resolve_config
    from cilbench.methods.cicae import CICAE

    cfg, _ = resolve_config(CICAE, "synthetic", False, {"num_experts": "4"})
    with pytest.raises(CilbenchError, match=r"num_experts=4 pass one per expert \(--set expert_lrs="):
        CICAE(cfg, build_backbone("vit-tiny", pretrained=False), build_scenario("synthetic", None, 1993))
    cfg, _ = resolve_config(CICAE, "synthetic", False, {"num_experts": "4", "expert_lrs": "0.01,0.02,0.001,0.005"})
    assert CICAE(cfg, build_backbone("vit-tiny", pretrained=False),
                 build_scenario("synthetic", None, 1993)).lrs == (0.01, 0.02, 0.001, 0.005)


def test_cicae_info_shows_paper_defaults_and_presets(cli):
    res = cli("methods", "info", "cicae", "--json")
    assert res.code == 0, res.err
    info = json.loads(res.out)
    d = info["defaults"]
    assert d["num_experts"] == 3 and d["expert_lrs"] == [0.01, 0.02, 0.001]
    assert d["first_epochs"] == 20 and d["epochs"] == 10
    assert info["presets"]["imagenet-a"] == {"lambda1": 25.0, "lambda2": 400.0}
    assert info["presets"]["cub"] == {"lambda1": 100.0, "lambda2": 100.0}
