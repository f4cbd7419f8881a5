"""Backbones: pre-trained ViTs through timm, CLIP through open_clip, and tiny random variants of each.

Every backbone is a ``Backbone``: ``forward(images) -> features [B, D]`` (the CLS token after the final norm for
ViTs, the projected image embedding for CLIP), ``feature_dim``, ``input_size`` and the transform ``preset`` of its
protocol. CLIP backbones also give ``encode_text`` and ``tokenize``. The tiny variants are built through the same
code paths (``timm.create_model`` on the same architecture, open_clip's ``CLIP`` class with the same config shrunk),
randomly initialised: they are what tests and ``--quick`` run on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from cilbench.errors import CilbenchError, HubUnreachable
from cilbench.hub import ensure_hub_or_offline, network_reason
from cilbench.registry import Registry


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    family: str  # "vit" or "clip"
    source: str  # timm model name or open_clip "model/pretrained"
    description: str
    tiny: str | None = None  # the tiny random variant used by --quick
    preset: str = "pilot"
    input_size: int = 224


BACKBONES: Registry[BackboneSpec] = Registry("backbone")
for _b in [
    BackboneSpec("vit-b16-in21k", "vit", "vit_base_patch16_224.augreg_in21k",
                 "ViT-B/16 pre-trained on ImageNet-21k (PILOT's vit_base_patch16_224_in21k)", tiny="vit-tiny"),
    BackboneSpec("vit-b16-in1k", "vit", "vit_base_patch16_224.augreg_in21k_ft_in1k",
                 "ViT-B/16 IN21k fine-tuned on ImageNet-1k", tiny="vit-tiny"),
    BackboneSpec("clip-vit-b16", "clip", "ViT-B-16-quickgelu/openai", "OpenAI CLIP ViT-B/16 (quick GELU)",
                 tiny="clip-tiny", preset="clip"),
    BackboneSpec("vit-tiny", "vit", "vit_base_patch16_224", "random tiny ViT (tests, --quick): 32 px, patch 8, "
                 "2 blocks of width 48", input_size=32),
    BackboneSpec("vit-mini", "vit", "vit_base_patch16_224", "random small ViT (cilbench bench on CPU): 64 px, "
                 "patch 8, 4 blocks of width 192", input_size=64),
    BackboneSpec("clip-tiny", "clip", "ViT-B-16-quickgelu", "random tiny CLIP (tests, --quick): 32 px, patch 8, "
                 "2 + 2 blocks", preset="clip", input_size=32),
]:
    BACKBONES.register(_b.name, _b, family=_b.family, description=_b.description)

_TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)
_RANDOM_VIT = {"vit-tiny": _TINY_VIT, "vit-mini": dict(img_size=64, patch_size=8, embed_dim=192, depth=4, num_heads=3)}
_TINY_CLIP = dict(embed_dim=32, vision_cfg=dict(image_size=32, layers=2, width=48, patch_size=8, head_width=16),
                  text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2))


def is_random(name: str) -> bool:
    """The tiny / mini backbones are built randomly initialised: no weights file applies to them."""
    return name in _RANDOM_VIT or name == "clip-tiny"


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
        return self.model(images)  # timm with num_classes=0 and token pooling: CLS after the final norm

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        if self._tokenizer is None:
            raise TypeError(f"{self.spec.name} has no text encoder")
        return self._tokenizer(texts)


def _offline_hint(spec: BackboneSpec) -> HubUnreachable:
    return HubUnreachable(
        f"cannot reach the model hub to download weights for {spec.name} ({spec.source}) and they are not in the "
        f"local cache; put them in the Hugging Face cache (HF_HOME) or pass --weights FILE, "
        f"or use --backbone {spec.tiny or 'vit-tiny'}"
        f" for a random tiny model")


def _load_timm_weights(model: nn.Module, path: Path, spec: BackboneSpec) -> None:
    """Load a local weights file into a timm model, refusing one that does not fit it.

    timm's own file loading skips missing keys silently when the classifier is removed (``num_classes=0``), so a
    wrong file would leave random weights without a word: here every backbone parameter must come from the file
    (only classifier ``head.*`` entries may be left over). Tensors are read without unpickling code
    (``weights_only=True``, or safetensors); ``.npz`` files (big_vision) go through timm's ViT loader."""
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
    unexpected = [k for k in result.unexpected_keys if not k.startswith("head")]
    if result.missing_keys or unexpected:
        raise ValueError(f"{len(result.missing_keys)} backbone tensors missing (e.g. "
                         f"{(result.missing_keys or ['-'])[0]}), {len(unexpected)} unexpected (e.g. "
                         f"{(unexpected or ['-'])[0]})")


def build_backbone(name: str, pretrained: bool = True, weights: str | Path | None = None) -> Backbone:
    """Build a backbone by registry name. ``pretrained=False`` gives random weights of the real shape."""
    spec = BACKBONES.get(name)
    if weights is not None and not Path(weights).is_file():
        raise CilbenchError(f"no weights file {weights}")
    is_tiny = is_random(name)
    if weights is not None and is_tiny:
        raise CilbenchError(f"--weights cannot be used with {name}: it is a randomly initialised backbone")
    if pretrained and not is_tiny and weights is None:
        ensure_hub_or_offline()  # cached weights still load offline; missing ones fail at once
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)  # open_clip logs download failures on the root logger
    try:
        if spec.family == "vit":
            import timm

            kwargs = dict(_RANDOM_VIT[name]) if is_tiny else {}
            load = pretrained and not is_tiny and weights is None
            model = timm.create_model(spec.source, pretrained=load, num_classes=0, **kwargs)
            if weights is not None:
                _load_timm_weights(model, Path(weights), spec)
            return Backbone(spec, model, model.num_features)
        import open_clip

        model_name, _, tag = spec.source.partition("/")
        tokenizer = open_clip.get_tokenizer(model_name)
        if is_tiny:
            from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

            cfg = _TINY_CLIP
            model = CLIP(cfg["embed_dim"], CLIPVisionCfg(**cfg["vision_cfg"]), CLIPTextCfg(**cfg["text_cfg"]),
                         quick_gelu=True)
            return Backbone(spec, model, cfg["embed_dim"], tokenizer)
        source = str(weights) if weights else (tag if pretrained else None)
        model = open_clip.create_model(model_name, pretrained=source)
        return Backbone(spec, model, model.visual.output_dim, tokenizer)
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
