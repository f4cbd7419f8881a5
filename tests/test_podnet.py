"""PODNet's pieces against hand computations: POD-spatial (sums over width and height, normalisation, distance),
POD-flat, the local-similarity classifier (softmax-weighted proxies), the NCA margin, and the classifier's growth."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from cilbench.methods.podnet import LSC, PODNet, kmeans, lsc_logits, nca, pod_flat, pod_spatial, stage_maps


def _pod_by_hand(old: torch.Tensor, new: torch.Tensor) -> float:
    """One stage, written out with loops: per image the squared map summed over W (one value per channel and row)
    and over H (per channel and column), normalised to unit length, then the distance; mean over images."""
    b_, c_, h_, w_ = old.shape
    dists = []
    for b in range(b_):
        vecs = []
        for m in (old, new):
            v = [sum(float(m[b, c, h, w]) ** 2 for w in range(w_)) for c in range(c_) for h in range(h_)]
            v += [sum(float(m[b, c, h, w]) ** 2 for h in range(h_)) for c in range(c_) for w in range(w_)]
            n = math.sqrt(sum(x * x for x in v))
            vecs.append([x / n for x in v])
        dists.append(math.sqrt(sum((x - y) ** 2 for x, y in zip(*vecs))))
    return sum(dists) / len(dists)


def test_pod_spatial_matches_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    old = [torch.randn(2, 2, 2, 3, generator=g, dtype=torch.float64),
           torch.randn(2, 3, 1, 2, generator=g, dtype=torch.float64)]
    new = [torch.randn(2, 2, 2, 3, generator=g, dtype=torch.float64),
           torch.randn(2, 3, 1, 2, generator=g, dtype=torch.float64)]
    expected = (_pod_by_hand(old[0], new[0]) + _pod_by_hand(old[1], new[1])) / 2  # mean over the stages
    assert math.isclose(float(pod_spatial(old, new)), expected, rel_tol=1e-9)
    assert float(pod_spatial(old, old)) == 0.0
    # a sign flip leaves the squared maps, hence the loss, unchanged; a scale of the whole map too (normalised)
    assert float(pod_spatial(old, [-3 * m for m in old])) < 1e-7


def test_pod_spatial_by_hand_on_a_tiny_map():
    old = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])  # B=C=1, 2x2: only the top-left cell is active
    new = torch.tensor([[[[0.0, 0.0], [0.0, 2.0]]]])  # only the bottom-right
    # sums over W (per row) then over H (per column), squared: old [1, 0, 1, 0] / sqrt 2, new [0, 4, 0, 4] / (4 sqrt 2)
    expected = math.sqrt(4 * 0.5)
    assert math.isclose(float(pod_spatial([old], [new])), expected, rel_tol=1e-6)


def test_pod_flat_is_one_minus_cosine():
    old = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    new = torch.tensor([[0.0, 2.0], [2.0, 2.0]])
    assert math.isclose(float(pod_flat(old, new)), ((1 - 0) + (1 - 1)) / 2, abs_tol=1e-6)


def test_lsc_weights_each_class_proxies_by_their_softmax():
    feats = torch.tensor([[2.0, 0.0]])  # direction [1, 0]
    proxies = torch.tensor([[[1.0, 0.0], [0.0, 3.0]],  # class 0: cos 1 and 0
                            [[-1.0, 0.0], [1.0, 1.0]]])  # class 1: cos -1 and 1/sqrt 2
    def reduce(cos):
        z = sum(math.exp(c) for c in cos)
        return sum(math.exp(c) / z * c for c in cos)
    expected = [reduce([1.0, 0.0]), reduce([-1.0, 1 / math.sqrt(2)])]
    out = lsc_logits(feats, proxies, scale=2.0)
    assert out.shape == (1, 2)
    assert torch.allclose(out[0], 2.0 * torch.tensor(expected), atol=1e-6)


def test_nca_margin_on_a_hand_example():
    logits = torch.tensor([[2.0, 1.0, 0.5], [2.0, 1.0, 0.5]])
    targets = torch.tensor([0, 1])
    # target 0: s = [1.4, 1.0, 0.5], the max is the target: log(1 + e^-0.4 + e^-0.9)
    first = math.log(1 + math.exp(-0.4) + math.exp(-0.9))
    # target 1: s = [2.0, 0.4, 0.5], M = 2.0: (M - s_y) + log(1 + e^0 + e^-1.5) (the target's slot holds e^0)
    second = 1.6 + math.log(1 + 1 + math.exp(-1.5))
    assert math.isclose(float(nca(logits, targets, margin=0.6)), (first + second) / 2, rel_tol=1e-6)
    # the margin makes the loss larger; without it and with the target on top it is the plain cross-entropy
    assert float(nca(logits, targets, margin=0.0)) < float(nca(logits, targets, margin=0.6))
    ce = torch.nn.functional.cross_entropy(logits[:1], targets[:1])
    assert math.isclose(float(nca(logits[:1], targets[:1], margin=0.0)), float(ce), rel_tol=1e-6)


def test_lsc_grows_per_task_and_keeps_old_proxies():
    head = LSC(in_dim=4, nb_proxy=3)
    head.grow(2)
    first = head.weights().detach().clone()
    head.grow(3)
    assert head.num_classes == 5 and head.weights().shape == (5, 3, 4) and len(head.proxies) == 2
    assert torch.equal(head.weights()[:2], first)
    out = head(torch.randn(6, 4), torch.tensor([0, 3, 4]))
    assert out.shape == (6, 3)


def test_podnet_trains_only_the_new_proxies_after_the_first_task_and_stage_maps_pool_to_the_features():
    from cilbench.models.backbones import build_backbone

    backbone = build_backbone("resnet-tiny", pretrained=False).eval()
    method = PODNet(PODNet.Config(nb_proxy=2), backbone, scenario=None)
    method.before_task(SimpleNamespace(index=0, classes=[0, 1]))
    method.before_task(SimpleNamespace(index=1, classes=[2, 3, 4]))
    assert method.head.weights().shape == (5, 2, backbone.feature_dim)
    ids = {id(p) for g in method.param_groups(SimpleNamespace(index=1)) for p in g["params"]}
    assert id(method.head.proxies[1]) in ids and id(method.head.proxies[0]) not in ids
    assert id(method.head.scale) in ids
    images = torch.randn(2, 3, 16, 16)
    maps, pooled = stage_maps(backbone, images)
    assert len(maps) == 4 and torch.allclose(pooled, backbone(images))
    assert method.logits(images, torch.tensor([0, 4])).shape == (2, 2)


def test_kmeans_is_deterministic_for_a_seed():
    x = torch.randn(30, 5, generator=torch.Generator().manual_seed(1))
    a = kmeans(x, 4, torch.Generator().manual_seed(7))
    b = kmeans(x, 4, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.shape == (4, 5)
    assert kmeans(x[:2], 4, torch.Generator().manual_seed(7)).shape == (4, 5)  # fewer rows than centres
