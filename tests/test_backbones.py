"""Backbones: every registered builder builds (randomly) and gives features of its declared size; the CIFAR ResNet18
has PyCIL's stem and ~11.2 M parameters; weights files and errors behave as before the registry became builders."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from cilbench.errors import CilbenchError
from cilbench.models.backbones import BACKBONES, Backbone, build_backbone, is_random, register_backbone

ALL = BACKBONES.names()
# a forward at the declared input size is cheap for these; the rest (ViT-B/16, CLIP ViT-B/16) build and check
# their declared feature size, and a resnet18 forward runs at 32 px (any size works after global pooling)
_FORWARD_AT = {"resnet18": 32}
_EXPECTED_DIM = {"vit-b16-in21k": 768, "vit-b16-in1k": 768, "clip-vit-b16": 512, "resnet18-cifar": 512,
                 "resnet18": 512, "vit-scratch-cifar": 384, "vit-scratch-224": 384, "vit-tiny": 48, "vit-mini": 192, "clip-tiny": 32,
                 "resnet-tiny": 64}


def test_the_registry_holds_every_backbone_and_the_test_covers_each():
    assert set(ALL) == set(_EXPECTED_DIM), "a new backbone needs its expected feature size here"


@pytest.mark.parametrize("name", ALL)
def test_every_registered_backbone_builds_randomly_with_its_declared_shape(name):
    spec = BACKBONES.get(name)
    for attr in ("name", "family", "source", "tiny", "preset", "input_size"):  # what runner.py and bench.py read
        assert hasattr(spec, attr)
    assert spec.name == name and spec.family in ("vit", "clip", "cnn")
    if spec.tiny is not None:  # --quick swaps in a random variant of the same family
        tiny = BACKBONES.get(spec.tiny)
        assert is_random(tiny.name) and tiny.family == spec.family and tiny.tiny is None
    torch.manual_seed(0)
    backbone = build_backbone(name, pretrained=False).eval()
    assert isinstance(backbone, Backbone) and backbone.spec is spec and backbone.family == spec.family
    assert backbone.feature_dim == _EXPECTED_DIM[name]
    size = _FORWARD_AT.get(name, spec.input_size)
    if size <= 64:
        with torch.no_grad():
            out = backbone(torch.randn(2, 3, size, size))
        assert out.shape == (2, backbone.feature_dim) and torch.isfinite(out).all()
    if spec.family == "clip":
        assert backbone.tokenize(["a photo"]).shape == (1, 77)


def test_resnet18_cifar_has_pycils_stem_and_no_maxpool():
    net = build_backbone("resnet18-cifar").model
    conv = net.conv1
    assert (conv.kernel_size, conv.stride, conv.padding, conv.bias) == ((3, 3), (1, 1), (1, 1), None)
    assert conv.in_channels == 3 and conv.out_channels == 64
    assert not any(isinstance(m, nn.MaxPool2d) for m in net.modules())
    maps = net.forward_intermediates(torch.randn(1, 3, 32, 32), intermediates_only=True)
    # 32 x 32 kept through layer1, halved by each later stage: 32, 16, 8, 4
    assert [tuple(m.shape[1:]) for m in maps[-4:]] == [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)]


def test_resnet18_is_the_standard_one():
    net = build_backbone("resnet18").model
    assert (net.conv1.kernel_size, net.conv1.stride) == ((7, 7), (2, 2))
    assert isinstance(net.maxpool, nn.MaxPool2d)
    maps = net.forward_intermediates(torch.randn(1, 3, 64, 64), intermediates_only=True)
    assert tuple(maps[-1].shape[1:]) == (512, 2, 2)  # stride 32


def test_resnet_parameter_counts():
    count = lambda name: sum(p.numel() for p in build_backbone(name).parameters())  # noqa: E731
    # torchvision resnet18 without its fc: 11,689,512 - 513,000 = 11,176,512; the CIFAR stem trades the 7x7x3x64
    # conv (9,408) for a 3x3x3x64 one (1,728)
    assert count("resnet18") == 11_176_512
    assert count("resnet18-cifar") == 11_176_512 - 9_408 + 1_728 == 11_168_832
    tiny = build_backbone("resnet-tiny").model
    assert [tiny.layer1[0].conv1.out_channels, tiny.layer4[0].conv1.out_channels] == [8, 64]
    assert tiny.conv1.kernel_size == (3, 3) and isinstance(tiny.maxpool, nn.Identity)


def test_resnets_are_initialised_as_pycil_and_torchvision():
    net = build_backbone("resnet18-cifar").model
    block = net.layer2[0]
    assert torch.equal(block.bn2.weight, torch.ones(128))  # no zero-init of the last BN (zero_init_residual=False)
    # Kaiming normal, fan_out, relu: std = sqrt(2 / (out_channels * 3 * 3)), the replaced CIFAR stem included
    assert block.conv1.weight.std().item() == pytest.approx((2 / (128 * 9)) ** 0.5, rel=0.05)
    assert net.conv1.weight.std().item() == pytest.approx((2 / (64 * 9)) ** 0.5, rel=0.15)


def test_vit_scratch_cifar_has_dnes_size():
    vit = build_backbone("vit-scratch-cifar").model
    assert vit.patch_embed.patch_size == (4, 4) and vit.patch_embed.num_patches == 64
    assert (vit.embed_dim, len(vit.blocks), vit.blocks[0].attn.num_heads) == (384, 6, 12)


def test_scratch_backbones_never_need_the_hub(monkeypatch):
    import cilbench.models.backbones as backbones

    def no_hub():
        raise AssertionError("a from-scratch backbone must not check the hub")

    monkeypatch.setattr(backbones, "ensure_hub_or_offline", no_hub)
    for name in ("resnet18-cifar", "resnet18", "vit-scratch-cifar", "resnet-tiny", "vit-tiny"):
        build_backbone(name, pretrained=True)


def test_a_torchvision_style_weights_file_loads_into_resnet18_cifar(tmp_path):
    torch.manual_seed(1)
    source = build_backbone("resnet18-cifar").model.state_dict()
    path = tmp_path / "r18.pth"
    torch.save({**source, "fc.weight": torch.zeros(10, 512), "fc.bias": torch.zeros(10)}, path)  # classifier dropped
    loaded = build_backbone("resnet18-cifar", weights=path).model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in source.items())
    wrong = tmp_path / "imagenet_stem.pth"
    torch.save(build_backbone("resnet18").model.state_dict(), wrong)  # 7x7 stem into the 3x3 one
    with pytest.raises(CilbenchError, match="does not fit backbone resnet18-cifar.*conv1.weight"):
        build_backbone("resnet18-cifar", weights=wrong)


def test_weights_for_a_random_backbone_and_unknown_names_are_one_line(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({}, path)
    with pytest.raises(CilbenchError, match="--weights cannot be used with resnet-tiny"):
        build_backbone("resnet-tiny", weights=path)
    with pytest.raises(CilbenchError, match="no weights file"):
        build_backbone("resnet18", weights=tmp_path / "missing.pth")
    with pytest.raises(CilbenchError, match="did you mean 'resnet18-cifar'"):
        build_backbone("resnet18-cifra")
    assert is_random("vit-tiny") and not is_random("resnet18") and not is_random("no-such-backbone")


def test_register_backbone_refuses_a_duplicate_name():
    with pytest.raises(ValueError, match="duplicate backbone name 'vit-tiny'"):
        register_backbone("vit-tiny", family="vit", source="x", description="x")(lambda spec, d, w: None)
