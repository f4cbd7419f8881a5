"""CLIP text classifiers: class names x prompt templates -> one normalised text embedding per class.

The ensemble rule (CLIP; ZSCL / MoE-Adapters evaluation, ``mtil/src/models/evaluation.py``): each prompt's text
embedding is normalised, the embeddings of a class's templates are averaged, and the mean is normalised again.
Logits are ``logit_scale * cos(image, text)`` (CLIP). ``TextClassifier`` has two modes:

* frozen: the class embeddings are computed once per prompt set (and per ``key``, e.g. a MoE router: MoE-Adapters
  pre-computes one text classifier per router, PROTOCOLS-2 §2.4) under ``torch.no_grad`` and cached;
* trainable: the text encoder runs in every call, so gradients reach text-side adapters / LoRA (MoE-Adapters and
  ZSCL train with the text encoder in the step, PROTOCOLS-2 §2.3 / §3.4). Tokens are still cached.

``text_classifier`` and ``scenario_text_classifier`` (used by ``zeroshot-clip``) compute the frozen case through the
same ``encode_prompts``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from cilbench.errors import CilbenchError
from cilbench.models.templates import clip_class_names, templates_for


@dataclass(frozen=True)
class PromptSet:
    """Class names that share one template ensemble (an MTIL task: its dataset's templates)."""

    names: tuple[str, ...]
    templates: tuple[str, ...]

    @classmethod
    def of(cls, names: Sequence[str], templates: str | Sequence[str]) -> "PromptSet":
        templates = (templates,) if isinstance(templates, str) else tuple(templates)
        if not names or not templates:
            raise CilbenchError("a prompt set needs at least one class name and one template")
        return cls(tuple(str(n) for n in names), templates)

    def prompts(self) -> list[str]:
        """Class-major: the templates of class 0, then those of class 1, ..."""
        return [t.format(n) for n in self.names for t in self.templates]

    def __len__(self) -> int:
        return len(self.names)


def _as_sets(prompts: PromptSet | Sequence[PromptSet]) -> tuple[PromptSet, ...]:
    sets = (prompts,) if isinstance(prompts, PromptSet) else tuple(prompts)
    if not sets or not all(isinstance(s, PromptSet) for s in sets):
        raise CilbenchError("prompts must be a PromptSet or a non-empty list of them")
    return sets


def encode_prompts(encode_text: Callable[[torch.Tensor], torch.Tensor], tokens: torch.Tensor, num_classes: int,
                   batch_size: int = 256) -> torch.Tensor:
    """[C, D] class embeddings from class-major prompt tokens [C * T, L]: normalise each prompt embedding, average
    the T templates of a class, normalise again. Differentiable (the caller chooses ``no_grad``)."""
    embs = [F.normalize(encode_text(tokens[i:i + batch_size]).float(), dim=-1)
            for i in range(0, tokens.shape[0], batch_size)]
    per_prompt = torch.cat(embs).view(num_classes, tokens.shape[0] // num_classes, -1)
    return F.normalize(per_prompt.mean(1), dim=-1)


@torch.no_grad()
def text_classifier(backbone, class_names: list[str], templates: tuple[str, ...], device: torch.device,
                    batch_size: int = 256) -> torch.Tensor:
    """[C, D]: for each class the mean of its normalised template embeddings, normalised again (CLIP's ensemble)."""
    ps = PromptSet.of(class_names, templates)
    tokens = backbone.tokenize(ps.prompts()).to(device)
    return encode_prompts(backbone.encode_text, tokens, len(ps), batch_size)


def scenario_prompt_sets(scenario, mode: str) -> list[PromptSet]:
    """One prompt set per task: its class names (the official lists) with its own dataset's templates."""
    from cilbench.data.catalog import get_spec

    sets = []
    for task in scenario.tasks:
        key = get_spec(task.dataset.partition("/")[0]).templates
        names = clip_class_names(key, list(task.class_names)) if task.class_names else [str(c) for c in task.classes]
        sets.append(PromptSet.of(names, templates_for(key, mode)))
    return sets


def scenario_text_classifier(backbone, scenario, device: torch.device, mode: str) -> torch.Tensor:
    """Text embeddings of every global class of the scenario, each task named with its own dataset's templates."""
    return torch.cat([text_classifier(backbone, list(s.names), s.templates, device)
                      for s in scenario_prompt_sets(scenario, mode)])


_ALL = object()


class TextClassifier:
    """Class-name prompts through CLIP's text encoder, as a classifier over image features.

    ``backbone``: a cilbench CLIP ``Backbone`` (``encode_text``, ``tokenize``, ``model.logit_scale``) or an
    open_clip ``CLIP`` with ``tokenizer=`` given. ``trainable``: run the text encoder with gradients in every call
    (else: computed once per prompt set and ``key`` under ``no_grad``, cached; call ``clear()`` after the text side
    changed). The frozen embeddings are computed in whatever train / eval mode the model is in: compute them in
    eval mode (no dropout, no router noise). ``logit_scale``: "model" = ``exp(model.logit_scale)`` (CLIP's learned
    temperature, kept differentiable if it trains; no clamp here), or a fixed number (zero-shot and MoE-Adapters
    evaluation use 100). The backbone is referenced, not owned (no parameters of its own)."""

    def __init__(self, backbone, trainable: bool = False, logit_scale: float | str = "model",
                 tokenizer: Callable | None = None, batch_size: int = 256):
        if not hasattr(backbone, "encode_text"):
            raise CilbenchError(f"{type(backbone).__name__} has no text encoder: a CLIP backbone is needed")
        self.backbone = backbone
        self.trainable = trainable
        self.batch_size = batch_size
        self._tokenize = tokenizer or getattr(backbone, "tokenize", None)
        if self._tokenize is None:
            raise CilbenchError("no tokenizer: pass tokenizer= for a bare open_clip model")
        if logit_scale != "model" and not isinstance(logit_scale, (int, float)):
            raise CilbenchError(f"logit_scale must be 'model' or a number, not {logit_scale!r}")
        self._logit_scale = logit_scale
        self._tokens: dict[PromptSet, torch.Tensor] = {}
        self._cache: dict[tuple, torch.Tensor] = {}

    def _device(self) -> torch.device:
        return next(p for p in self.backbone.parameters()).device

    def _model_scale(self) -> torch.Tensor:
        model = self.backbone.model if isinstance(getattr(self.backbone, "model", None), nn.Module) else self.backbone
        scale = getattr(model, "logit_scale", None)
        if scale is None:
            raise CilbenchError("the model has no logit_scale: pass a number as logit_scale")
        return scale

    def logit_scale(self) -> torch.Tensor | float:
        if self._logit_scale == "model":
            return self._model_scale().exp()
        return float(self._logit_scale)

    def tokens(self, prompt_set: PromptSet) -> torch.Tensor:
        device = self._device()
        tok = self._tokens.get(prompt_set)
        if tok is None or tok.device != device:
            tok = self._tokenize(prompt_set.prompts()).to(device)
            self._tokens[prompt_set] = tok
        return tok

    def _encode(self, sets: tuple[PromptSet, ...]) -> torch.Tensor:
        return torch.cat([encode_prompts(self.backbone.encode_text, self.tokens(s), len(s), self.batch_size)
                          for s in sets])

    def embeddings(self, prompts: PromptSet | Sequence[PromptSet], key=None) -> torch.Tensor:
        """[C, D] normalised class embeddings, the sets' classes in order. Frozen: cached per (prompts, key)."""
        sets = _as_sets(prompts)
        if self.trainable:
            return self._encode(sets)
        cache_key = (sets, key)
        emb = self._cache.get(cache_key)
        if emb is None or emb.device != self._device():
            with torch.no_grad():
                emb = self._encode(sets)
            self._cache[cache_key] = emb
        return emb

    def logits(self, image_features: torch.Tensor, prompts: PromptSet | Sequence[PromptSet],
               key=None) -> torch.Tensor:
        """[B, C] = logit_scale * cos(image feature, class embedding), as CLIP."""
        text = self.embeddings(prompts, key)
        image = F.normalize(image_features.float(), dim=-1)
        return self.logit_scale() * image @ text.T

    __call__ = logits

    def clear(self, key=_ALL) -> None:
        """Forget cached frozen embeddings (all, or those of one ``key``)."""
        if key is _ALL:
            self._cache.clear()
        else:
            self._cache = {k: v for k, v in self._cache.items() if k[1] != key}
