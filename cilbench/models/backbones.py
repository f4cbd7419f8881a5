"""Backbones as registered builders: pre-trained ViTs through timm, CLIP through open_clip, networks trained from
scratch (CIFAR / ImageNet ResNet18, a small CIFAR ViT), and tiny random variants of each.

Every backbone is a ``Backbone``: ``forward(images) -> features [B, D]`` (the CLS token after the final norm for
ViTs, the projected image embedding for CLIP, the globally average-pooled last stage for ResNets), ``feature_dim``,
``input_size`` and the transform ``preset`` of its protocol. CLIP backbones also give ``encode_text`` and
``tokenize``.

Each name is one function under ``@register_backbone`` (timm's ``_registry.py`` pattern): the decorator records a
``BackboneSpec`` (what ``BACKBONES.get(name)`` returns: ``.name .family .source .tiny .preset .input_size`` and the
builder) and ``build_backbone`` does the checks and error handling every builder shares. Variants are a few lines
over one helper (``_timm_vit``, ``_timm_resnet``, ``_open_clip``). The tiny variants go through the same code paths
(the same timm / open_clip classes, shrunk), randomly initialised: they are what tests and ``--quick`` run on.

Kinds of weights, per spec:
* ``hub=True``: ``pretrained=True`` downloads (or reads cached) weights from the model hub;
* ``hub=False, random=False``: trained from scratch, randomly initialised; a ``--weights`` file may still be loaded;
* ``random=True``: the tiny test models; no weights file applies (``is_random``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from cilbench.errors import CilbenchError, HubUnreachable
from cilbench.hub import ensure_hub_or_offline, network_reason
from cilbench.registry import Registry

# builder(spec, download, weights): download is True when hub weights are wanted (pretrained, a hub backbone and no
# weights file); weights is a checked local file or None
Builder = Callable[["BackboneSpec", bool, "Path | None"], "Backbone"]


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    family: str  # "vit", "clip" or "cnn"
    source: str  # timm model name or open_clip "model/pretrained" the builder starts from
    description: str
    tiny: str | None = None  # the tiny random variant used by --quick
    preset: str = "pilot"  # transform preset (cilbench.data.augment.PRESETS)
    input_size: int = 224
    hub: bool = False  # pretrained weights come from a model hub
    random: bool = False  # always randomly initialised; refuses a weights file
    builder: Builder | None = field(default=None, repr=False, compare=False)


BACKBONES: Registry[BackboneSpec] = Registry("backbone")


def register_backbone(name: str, *, family: str, source: str, description: str, preset: str = "pilot",
                      input_size: int = 224, tiny: str | None = None, hub: bool = False,
                      random: bool = False) -> Callable[[Builder], Builder]:
    """Decorator: register ``fn(spec, download, weights) -> Backbone`` under ``name`` with its metadata."""

    def wrap(fn: Builder) -> Builder:
        spec = BackboneSpec(name, family, source, description, tiny, preset, input_size, hub, random, fn)
        BACKBONES.register(name, spec, family=family, description=description)
        return fn

    return wrap


def is_random(name: str) -> bool:
    """The tiny / mini backbones are built randomly initialised: no weights file applies to them."""
    return name in BACKBONES and BACKBONES.get(name).random


class Backbone(nn.Module):
    def __init__(self, spec: BackboneSpec, model: nn.Module, feature_dim: int, tokenizer: Callable | None = None):
        super().__init__()
        self.spec = spec
        self.model = model
        self.feature_dim = feature_dim
        self._tokenizer = tokenizer

    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def input_size(self) -> int:
        return self.spec.input_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.family == "clip":
            return self.model.encode_image(images)
        # timm with num_classes=0: ViT -> CLS token after the final norm; ResNet -> global average pool
        return self.model(images)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        if self._tokenizer is None:
            raise TypeError(f"{self.spec.name} has no text encoder")
        return self._tokenizer(texts)


# ------------------------------------------------------------------------------------------------ shared helpers

def _offline_hint(spec: BackboneSpec) -> HubUnreachable:
    return HubUnreachable(
        f"cannot reach the model hub to download weights for {spec.name} ({spec.source}) and they are not in the "
        f"local cache; put them in the Hugging Face cache (HF_HOME) or pass --weights FILE, "
        f"or use --backbone {spec.tiny or 'vit-tiny'}"
        f" for a random tiny model")


def _load_timm_weights(model: nn.Module, path: Path, spec: BackboneSpec,
                       classifier: tuple[str, ...] = ("head",)) -> None:
    """Load a local weights file into a timm model, refusing one that does not fit it.

    timm's own file loading skips missing keys silently when the classifier is removed (``num_classes=0``), so a
    wrong file would leave random weights without a word: here every backbone parameter must come from the file
    (only classifier entries, keys starting with one of ``classifier``, may be left over: ``head`` for ViTs, ``fc.``
    for ResNets). Tensors are read without unpickling code (``weights_only=True``, or safetensors); ``.npz`` files
    (big_vision) go through timm's ViT loader."""
    import sys

    if path.suffix == ".npz":
        model.load_pretrained(str(path))
        return
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated, foreign or code-carrying pickles alike
        raise ValueError(f"not a readable tensor file ({type(err).__name__}; pickled code is never run)") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError("the file does not hold a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:  # timm's own key / shape adaptation (e.g. position embeddings)
        state = filter_fn(state, model)
    own = model.state_dict()
    reshaped = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if reshaped:
        k = reshaped[0]
        raise ValueError(f"{len(reshaped)} tensors of another shape (e.g. {k}: {tuple(state[k].shape)} in the file, "
                         f"{tuple(own[k].shape)} in the model)")
    result = model.load_state_dict(state, strict=False)
    unexpected = [k for k in result.unexpected_keys if not k.startswith(classifier)]
    if result.missing_keys or unexpected:
        raise ValueError(f"{len(result.missing_keys)} backbone tensors missing (e.g. "
                         f"{(result.missing_keys or ['-'])[0]}), {len(unexpected)} unexpected (e.g. "
                         f"{(unexpected or ['-'])[0]})")


def _timm_vit(spec: BackboneSpec, download: bool, weights: Path | None, **shape) -> Backbone:
    """A timm VisionTransformer without classifier; ``shape`` overrides the architecture (tiny / scratch ViTs)."""
    import timm

    model = timm.create_model(spec.source, pretrained=download, num_classes=0, **shape)
    if weights is not None:
        _load_timm_weights(model, weights, spec)
    return Backbone(spec, model, model.num_features)


def _timm_resnet(spec: BackboneSpec, weights: Path | None, stem: str,
                 channels: tuple[int, ...] = (64, 128, 256, 512)) -> Backbone:
    """timm's ResNet18 (BasicBlock, layers 2-2-2-2, global average pool, no classifier), trained from scratch.

    ``stem="imagenet"``: the standard 7x7 stride-2 conv + 3x3 stride-2 max-pool (torchvision / timm ``resnet18``).
    ``stem="cifar"``: the 3x3 stride-1 conv (padding 1, no bias) + BN + ReLU and **no max-pool** that PyCIL builds
    for CIFAR (G-U-N/PyCIL ``convs/resnet.py``, ``ResNet.__init__``: ``'cifar' in args["dataset"]`` branch), so a
    32 px image keeps 32 x 32 in ``layer1`` and ends 4 x 4 in ``layer4``. Initialisation as torchvision and PyCIL:
    Kaiming-normal (fan_out, relu) convolutions, BatchNorm weight 1 / bias 0, and no zero-init of the last BN of
    each block (PyCIL's ``zero_init_residual=False``; timm's default would zero it). Parameter names are timm's,
    which are torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1`` ...), so a torchvision / timm ResNet18 state
    dict loads into ``resnet18`` as ``--weights``; PyCIL's own checkpoints name the stem ``conv1.0`` / ``conv1.1``
    and would need renaming."""
    import timm

    model = timm.create_model("resnet18", pretrained=False, num_classes=0, channels=channels, zero_init_last=False)
    if stem == "cifar":  # as wide as timm's plain stem, which is 64 whatever the stage widths
        model.conv1 = nn.Conv2d(3, model.bn1.num_features, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
    if weights is not None:
        _load_timm_weights(model, weights, spec, classifier=("fc.",))
    return Backbone(spec, model, model.num_features)


def _open_clip(spec: BackboneSpec, download: bool, weights: Path | None) -> Backbone:
    import open_clip

    model_name, _, tag = spec.source.partition("/")
    source = str(weights) if weights else (tag if download else None)
    model = open_clip.create_model(model_name, pretrained=source)
    return Backbone(spec, model, model.visual.output_dim, open_clip.get_tokenizer(model_name))


# ------------------------------------------------------------------------------------------------ pre-trained

@register_backbone("vit-b16-in21k", family="vit", source="vit_base_patch16_224.augreg_in21k", tiny="vit-tiny",
                   hub=True, description="ViT-B/16 pre-trained on ImageNet-21k (PILOT's vit_base_patch16_224_in21k)")
def vit_b16_in21k(spec: BackboneSpec, download: bool, weights: Path | None) -> Backbone:
    return _timm_vit(spec, download, weights)


@register_backbone("vit-b16-in1k", family="vit", source="vit_base_patch16_224.augreg_in21k_ft_in1k", tiny="vit-tiny",
                   hub=True, description="ViT-B/16 IN21k fine-tuned on ImageNet-1k")
def vit_b16_in1k(spec: BackboneSpec, download: bool, weights: Path | None) -> Backbone:
    return _timm_vit(spec, download, weights)


@register_backbone("clip-vit-b16", family="clip", source="ViT-B-16-quickgelu/openai", tiny="clip-tiny", preset="clip",
                   hub=True, description="OpenAI CLIP ViT-B/16 (quick GELU)")
def clip_vit_b16(spec: BackboneSpec, download: bool, weights: Path | None) -> Backbone:
    return _open_clip(spec, download, weights)


# ------------------------------------------------------------------------------------------------ from scratch

@register_backbone("resnet18-cifar", family="cnn", source="resnet18", preset="cifar", input_size=32,
                   tiny="resnet-tiny", description="ResNet18 for 32 px CIFAR, from scratch: 3x3 stride-1 stem, no "
                   "max-pool, 512-d pooled features (PyCIL convs/resnet.py; DER, FOSTER, PODNet, iCaRL in DNE §4)")
def resnet18_cifar(spec: BackboneSpec, download: bool, weights: Path | None) -> Backbone:
    return _timm_resnet(spec, weights, stem="cifar")


@register_backbone("resnet18", family="cnn", source="resnet18", preset="imagenet-scratch", tiny="resnet-tiny",
                   description="standard ResNet18 (7x7 stem + max-pool), from scratch (ImageNet100 baselines); "
                   "--weights takes a torchvision / timm resnet18 state dict")
def resnet18(spec: BackboneSpec, download: bool, weights: Path | None) -> Backbone:
    return _timm_resnet(spec, weights, stem="imagenet")


@register_backbone("vit-scratch-cifar", family="vit", source="vit_base_patch16_224", preset="cifar", input_size=32,
                   tiny="vit-tiny", description="plain ViT for 32 px CIFAR, from scratch: patch 4, width 384, depth 6, "
                   "12 heads (DyTox / DNE's size, PROTOCOLS-2 §4.1)")
def vit_scratch_cifar(spec: BackboneSpec, download: bool, weights: Path | None) -> Backbone:
    # DNE's ConViT / split blocks come with the DNE method; this is the plain timm ViT of the same size
    return _timm_vit(spec, False, weights, img_size=32, patch_size=4, embed_dim=384, depth=6, num_heads=12)


@register_backbone("vit-scratch-224", family="vit", source="vit_base_patch16_224", preset="imagenet-scratch",
                   tiny="vit-tiny", description="plain ViT for 224 px ImageNet100, from scratch: patch 16, width 384, "
                   "depth 6, 12 heads (DNE §4: patch 16 on ImageNet100)")
def vit_scratch_224(spec: BackboneSpec, download: bool, weights: Path | None) -> Backbone:
    return _timm_vit(spec, False, weights, img_size=224, patch_size=16, embed_dim=384, depth=6, num_heads=12)


# ------------------------------------------------------------------------------------------------ tiny / random

@register_backbone("vit-tiny", family="vit", source="vit_base_patch16_224", input_size=32, random=True,
                   description="random tiny ViT (tests, --quick): 32 px, patch 8, 2 blocks of width 48")
def vit_tiny(spec: BackboneSpec, download: bool, weights: Path | None) -> Backbone:
    return _timm_vit(spec, False, None, img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)


@register_backbone("vit-mini", family="vit", source="vit_base_patch16_224", input_size=64, random=True,
                   description="random small ViT (cilbench bench on CPU): 64 px, patch 8, 4 blocks of width 192")
def vit_mini(spec: BackboneSpec, download: bool, weights: Path | None) -> Backbone:
    return _timm_vit(spec, False, None, img_size=64, patch_size=8, embed_dim=192, depth=4, num_heads=3)


@register_backbone("clip-tiny", family="clip", source="ViT-B-16-quickgelu", preset="clip", input_size=32, random=True,
                   description="random tiny CLIP (tests, --quick): 32 px, patch 8, 2 + 2 blocks")
def clip_tiny(spec: BackboneSpec, download: bool, weights: Path | None) -> Backbone:
    import open_clip
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    embed_dim = 32
    vision = CLIPVisionCfg(image_size=32, layers=2, width=48, patch_size=8, head_width=16)
    text = CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=2)
    model = CLIP(embed_dim, vision, text, quick_gelu=True)
    return Backbone(spec, model, embed_dim, open_clip.get_tokenizer(spec.source))


@register_backbone("resnet-tiny", family="cnn", source="resnet18", preset="cifar", input_size=16, random=True,
                   description="random narrow ResNet18 (tests, --quick): 16 px, CIFAR stem, stage widths 8/16/32/64")
def resnet_tiny(spec: BackboneSpec, download: bool, weights: Path | None) -> Backbone:
    return _timm_resnet(spec, None, stem="cifar", channels=(8, 16, 32, 64))


# ------------------------------------------------------------------------------------------------ entry point

def build_backbone(name: str, pretrained: bool = True, weights: str | Path | None = None) -> Backbone:
    """Build a backbone by registry name. ``pretrained=False`` gives random weights of the real shape; backbones
    trained from scratch are random either way."""
    spec = BACKBONES.get(name)
    if weights is not None and not Path(weights).is_file():
        raise CilbenchError(f"no weights file {weights}")
    if weights is not None and spec.random:
        raise CilbenchError(f"--weights cannot be used with {name}: it is a randomly initialised backbone")
    download = pretrained and spec.hub and weights is None
    if download:
        ensure_hub_or_offline()  # cached weights still load offline; missing ones fail at once
    assert spec.builder is not None, f"backbone {name} has no builder"
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)  # open_clip logs download failures on the root logger
    try:
        return spec.builder(spec, download, Path(weights) if weights is not None else None)
    except CilbenchError:
        raise
    except Exception as err:  # the hub libraries raise many types; sort network failures from real bugs
        if weights is not None:  # a local file: wrong architecture, keys or format
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
            raise CilbenchError(f"weights file {weights} does not fit backbone {name} ({spec.source}): {first}") \
                from None
        # open_clip re-raises download failures as a plain RuntimeError whose text is all that is left
        if network_reason(err) or "offline" in str(err).lower() or "failed to download" in str(err).lower():
            raise _offline_hint(spec) from None
        raise
    finally:
        root.setLevel(level)
