"""Parameter-efficient fine-tuning inside timm ViT blocks and open_clip CLIP blocks: AdaptFormer adapters, LoRA, and
MoE-Adapters' mixture of adapter experts with per-task routers.

``insert(model, kind, blocks="all", encoders=None, freeze_base=True, **options) -> PeftHandle`` works on a timm
``VisionTransformer`` (``timm.models.vision_transformer.Block``), an open_clip ``CLIP`` (``ResidualAttentionBlock``
in ``visual.transformer.resblocks`` and ``transformer.resblocks``), a cilbench ``Backbone`` holding either, or any
module containing such blocks. Neither library's ``forward`` is copied or replaced:

* **Branch kinds** (``adaptformer``, ``moe``) run parallel to the block's MLP and read the residual stream after
  attention, i.e. the input of ``ln_2`` / ``norm2``. A forward pre-hook on that norm keeps its input; a forward hook
  on the block adds ``branch(stream)`` to the block's output, so the block computes
  ``x + mlp(ln_2(x)) + branch(x)`` with ``x`` the post-attention stream (outside LayerScale / DropPath, as PILOT's
  ``vit_adapter`` and MoE-Adapters' ``ResidualAttentionBlock.forward`` add it). The branch module is registered on
  the block as ``block.peft`` (state-dict keys ``...blocks.3.peft.*``); the hooks are bound methods of that module,
  so ``copy.deepcopy`` of the model (a teacher) carries working hooks bound to the copied branch.
* **LoRA** wraps linear layers: ``LoRALinear`` is an ``nn.Linear`` that holds the *same* frozen ``weight`` / ``bias``
  Parameters as the layer it replaces (the base state-dict keys do not change) and adds ``x A^T B^T * scale`` for
  each adapter it holds. open_clip's attention is ``nn.MultiheadAttention``, whose forward reads ``in_proj_weight``
  and ``out_proj.weight`` directly (it never calls ``out_proj``): there LoRA is a delta added to the weight at
  forward time, ``W + sum(scale * B @ A)``. The attention module's class is switched to ``LoRAMultiheadAttention``
  (a subclass whose ``in_proj_weight`` property returns the adapted weight; the Parameter stays in ``_parameters``
  under its own name) and ``out_proj`` becomes a ``LoRALinear`` in weight mode (``fold=True``). The weight form
  cannot apply dropout to the layer input, so LoRA dropout there is refused.

Facts and their sources are cited where they are used: PROTOCOLS-2 §2.1 (MoE-Adapters4CL ``mtil/clip/model.py``,
``mtil/clip/adapter.py``) for ``moe``; ``cilbench.models.adapter`` (PILOT's ``vit_adapter``) for ``adaptformer``;
LoRA (Hu et al., 2021) for ``lora`` (A kaiming-uniform a=sqrt 5, B zero, scaling alpha / r).

Not supported: DataParallel replicas (the branch hooks keep the stream on the branch module) and open_clip's
``CustomResidualAttentionBlock``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from cilbench.errors import CilbenchError
from cilbench.models.adapter import AdaptedBlock, Adapter

__all__ = ["insert", "PeftHandle", "PeftModule", "AdaptFormerBranch", "MoEBranch", "LoRAEntry", "LoRABank",
           "LoRALinear", "LoRAMultiheadAttention", "merge_lora", "lora_delta", "lora_layers", "top_k_gating",
           "cv_squared", "KINDS"]

KINDS = ("adaptformer", "lora", "moe")


# ----------------------------------------------------------------------------------------------------------------
# Blocks of the two libraries


def _block_types() -> tuple[type, type]:
    from open_clip.transformer import ResidualAttentionBlock
    from timm.models.vision_transformer import Block

    return Block, ResidualAttentionBlock


@dataclass(frozen=True)
class _BlockInfo:
    path: str  # qualified name inside the model given to insert()
    block: nn.Module
    encoder: str  # "image" or "text"
    library: str  # "timm" or "open_clip"

    @property
    def norm(self) -> nn.Module:
        """The norm in front of the MLP: its input is the residual stream after attention."""
        return self.block.norm2 if self.library == "timm" else self.block.ln_2

    @property
    def dim(self) -> int:
        return int(self.norm.normalized_shape[-1])

    @property
    def batch_first(self) -> bool:
        # timm blocks always see [B, N, D]; open_clip's follow the attention's layout ([N, B, D] in older builds)
        return True if self.library == "timm" else bool(self.block.attn.batch_first)


def _find_blocks(model: nn.Module) -> list[_BlockInfo]:
    timm_block, clip_block = _block_types()
    found = []
    for name, m in model.named_modules():
        if type(m) is clip_block:
            encoder = "image" if "visual" in name.split(".") else "text"
            found.append(_BlockInfo(name, m, encoder, "open_clip"))
        elif isinstance(m, timm_block):
            found.append(_BlockInfo(name, m, "image", "timm"))
    return found


def _select_blocks(model: nn.Module, blocks, encoders) -> list[_BlockInfo]:
    found = _find_blocks(model)
    if not found:
        raise CilbenchError(f"no timm ViT Block or open_clip ResidualAttentionBlock in {type(model).__name__}: "
                            f"PEFT modules go into those blocks only")
    if encoders is None or encoders == "both":
        wanted = ("image", "text")
    else:
        wanted = (encoders,) if isinstance(encoders, str) else tuple(encoders)
        bad = [e for e in wanted if e not in ("image", "text")]
        if bad:
            raise CilbenchError(f"unknown encoder {bad[0]!r}: use 'image', 'text' or 'both'")
    chosen: list[_BlockInfo] = []
    for enc in wanted:
        per = [b for b in found if b.encoder == enc]
        if not per:
            if encoders not in (None, "both"):
                raise CilbenchError(f"the model has no {enc} encoder blocks")
            continue
        if isinstance(blocks, str):
            if blocks != "all":
                raise CilbenchError(f"blocks must be 'all', an index or a list of indices, not {blocks!r}")
            idx = range(len(per))
        else:
            idx = [blocks] if isinstance(blocks, int) else list(blocks)
        for i in idx:
            if not -len(per) <= i < len(per):
                raise CilbenchError(f"block index {i} out of range: the {enc} encoder has {len(per)} blocks")
            chosen.append(per[i])
    return chosen


def _param_like(module: nn.Module) -> torch.Tensor:
    return next(module.parameters())


# ----------------------------------------------------------------------------------------------------------------
# Branches parallel to the MLP


class PeftModule(nn.Module):
    """Marker base of every module ``insert`` adds (``freeze_base`` keeps exactly these trainable)."""


class _Branch(PeftModule):
    """A branch parallel to a block's MLP, fed with the residual stream after attention (the input of ln_2)."""

    def __init__(self, batch_first: bool = True):
        super().__init__()
        self.batch_first = batch_first
        self.enabled = True
        self._stream: torch.Tensor | None = None
        self._hooks: list = []

    @property
    def active(self) -> bool:
        return self.enabled

    def attach(self, block: nn.Module, norm: nn.Module) -> None:
        block.add_module("peft", self)
        # bound methods, not closures: deepcopy of the model rebinds them to the copied branch
        self._hooks = [norm.register_forward_pre_hook(self._capture), block.register_forward_hook(self._add)]

    def detach_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._stream = None

    def _capture(self, module: nn.Module, args: tuple) -> None:
        if self.active:
            self._stream = args[0]

    def _add(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        x, self._stream = self._stream, None  # drop the reference: no activation kept past the block
        if not self.active:
            return None
        if x is None:
            raise RuntimeError(f"{type(module).__name__} ran without calling its pre-MLP norm: the PEFT branch "
                               f"cannot see the residual stream")
        if self.batch_first:
            return output + self.branch(x).to(output.dtype)
        return output + self.branch(x.transpose(0, 1)).transpose(0, 1).to(output.dtype)

    def branch(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, N, D]
        raise NotImplementedError


class AdaptFormerBranch(_Branch):
    """One AdaptFormer adapter (``cilbench.models.adapter.Adapter``: scale * up(dropout(relu(down(x)))), up zero at
    init) parallel to the MLP, the same math as ``AdaptedBlock``."""

    def __init__(self, dim: int, bottleneck: int = 64, scale: float = 0.1, dropout: float = 0.1,
                 batch_first: bool = True):
        super().__init__(batch_first)
        self.adapter = Adapter(dim, bottleneck, scale, dropout)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        w = self.adapter.down.weight
        return self.adapter(x.to(w.dtype))


def cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation, var / (mean^2 + 1e-10), 0 for one element (MoE-Adapters4CL model.py)."""
    if x.numel() == 1:
        return torch.zeros((), device=x.device)
    x = x.float()
    return x.var() / (x.mean() ** 2 + 1e-10)


def top_k_gating(x0: torch.Tensor, w_gate: torch.Tensor, w_noise: torch.Tensor | None, k: int,
                 noise_epsilon: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor]:
    """MoE-Adapters' noisy top-k gating (PROTOCOLS-2 §2.1; Shazeer et al. 2017).

    ``x0`` [B, D] (token 0 of each sample), ``w_gate`` / ``w_noise`` [D, E]. Clean logits ``x0 @ w_gate``; with
    ``w_noise`` given, noise std ``softplus(x0 @ w_noise) + noise_epsilon`` and logits ``clean + N(0, 1) * std``, drawn
    per sample and expert. Gates: softmax over the top-k logits, scattered into an E-wide vector (zero elsewhere).
    Returns ``(gates [B, E], load [E])``; load is the differentiable probability of being in the top k summed over
    the batch when noisy and k < E, else the count of non-zero gates (the official ``_prob_in_top_k`` /
    ``_gates_to_load``)."""
    with torch.autocast(x0.device.type, enabled=False):  # float32 even under autocast, as the official block
        x0 = x0.float()
        clean = x0 @ w_gate.float()
        num_experts = clean.shape[1]
        if w_noise is not None:
            std = F.softplus(x0 @ w_noise.float()) + noise_epsilon
            logits = clean + torch.randn_like(clean) * std
        else:
            logits = clean
    top_values, top_idx = logits.topk(min(k + 1, num_experts), dim=1)  # k + 1: the threshold the load needs
    gates = torch.zeros_like(logits).scatter(1, top_idx[:, :k], torch.softmax(top_values[:, :k], dim=1))
    if w_noise is not None and k < num_experts:
        # P(expert in top k under fresh noise): it must beat the k-th best of the others
        threshold_in = top_values[:, k:k + 1]  # (k+1)-th value: the bar for an expert that is in
        threshold_out = top_values[:, k - 1:k]  # k-th value: the bar for one that is out
        is_in = logits > threshold_in
        prob_in = torch.special.ndtr((clean - threshold_in) / std)
        prob_out = torch.special.ndtr((clean - threshold_out) / std)
        load = torch.where(is_in, prob_in, prob_out).sum(0)
    else:
        load = (gates > 0).sum(0).float()
    return gates, load


class MoEBranch(_Branch):
    """MoE-Adapters' mixture of adapter experts in one block (PROTOCOLS-2 §2.1, MoE-Adapters4CL mtil/clip/model.py).

    * ``experts``: E AdaptFormer-like adapters, Linear(d, 64) -> ReLU -> dropout 0.1 -> Linear(64, d), x 0.1, no
      LayerNorm; down kaiming-uniform (a = sqrt 5), down bias, up weight and up bias zero (``init_option='lora'``):
      exactly ``cilbench.models.adapter.Adapter(d, 64, 0.1, 0.1)``, so every expert outputs 0 at init.
    * ``routers[t]`` and ``noise[t]``: one [d, E] matrix each per task id (no bias), both zero at init.
    * The router reads token 0 of the post-attention stream (CLS for images, SOT for text), without a LayerNorm;
      top-k gating with a softmax over the top-k logits (``top_k_gating``); the whole token sequence of a sample goes
      to its k experts, ``y = sum_e gate_e * expert_e(x)``, accumulated in float32 (the official dispatcher's
      ``combine``).
    * ``router``: the active router, or None: no branch at all, the block is the plain ``x + mlp(ln_2(x))``
      (zero-shot / DDAS's "original CLIP" case).
    * ``noise_mode``: ``"train"`` (noise when the block is in training mode), True (always: the official CIL code,
      §2.6) or False. The official MTIL code switches noise by its ``--is_train`` flag, not by train/eval mode.
    * ``counts``: how often each expert was chosen, once per sample per chosen expert, in every forward (for
      activate-freeze, §2.2); not saved (a non-persistent buffer), ``reset_counts()`` zeroes it.
    * ``aux_loss``: with ``balance_loss=True`` the official ``(cv²(importance) + cv²(load)) * 1e-2`` of the last
      forward; the official code computes it and never adds it to the loss, so it is off by default.
    """

    def __init__(self, dim: int, num_experts: int = 22, num_routers: int = 11, top_k: int = 2,
                 bottleneck: int = 64, scale: float = 0.1, dropout: float = 0.1, noisy_gating: bool = True,
                 noise_epsilon: float = 1e-2, balance_loss: bool = False, batch_first: bool = True):
        super().__init__(batch_first)
        if num_experts < 1 or num_routers < 1 or not 1 <= top_k <= num_experts:
            raise CilbenchError(f"moe needs num_experts >= 1, num_routers >= 1 and 1 <= top_k <= num_experts "
                                f"(got {num_experts}, {num_routers}, {top_k})")
        self.num_experts, self.top_k, self.noise_epsilon = num_experts, top_k, noise_epsilon
        self.experts = nn.ModuleList(Adapter(dim, bottleneck, scale, dropout) for _ in range(num_experts))
        self.routers = nn.ParameterList(nn.Parameter(torch.zeros(dim, num_experts)) for _ in range(num_routers))
        self.noise = nn.ParameterList(nn.Parameter(torch.zeros(dim, num_experts)) for _ in range(num_routers)) \
            if noisy_gating else None
        self.router: int | None = 0
        self.noise_mode: bool | str = "train"
        self.balance_loss = balance_loss
        self.aux_loss: torch.Tensor | None = None
        self.last_gates: torch.Tensor | None = None  # detached [B, E] of the last forward
        self.register_buffer("counts", torch.zeros(num_experts, dtype=torch.long), persistent=False)

    @property
    def num_routers(self) -> int:
        return len(self.routers)

    @property
    def active(self) -> bool:
        return self.enabled and self.router is not None

    def noisy(self) -> bool:
        if self.noise is None:
            return False
        return bool(self.noise_mode is True or (self.noise_mode == "train" and self.training))

    def _capture(self, module: nn.Module, args: tuple) -> None:
        self.aux_loss = None  # never a stale value from an earlier forward
        super()._capture(module, args)

    def gates(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.router
        return top_k_gating(x0, self.routers[r], self.noise[r] if self.noisy() else None, self.top_k,
                            self.noise_epsilon)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        gates, load = self.gates(x[:, 0])
        chosen = gates != 0
        with torch.no_grad():
            self.counts += chosen.sum(0).to(self.counts.device)
        self.last_gates = gates.detach()
        if self.balance_loss:
            self.aux_loss = (cv_squared(gates.sum(0)) + cv_squared(load)) * 1e-2
        y = x.new_zeros(x.shape, dtype=torch.float32)
        dtype = self.experts[0].down.weight.dtype
        for e in chosen.any(0).nonzero().flatten().tolist():
            idx = chosen[:, e].nonzero().flatten()
            out = self.experts[e](x.index_select(0, idx).to(dtype)).float()
            y = y.index_add(0, idx, out * gates.index_select(0, idx)[:, e, None, None])
        return y

    def set_router(self, router: int | None) -> None:
        if router is not None and not 0 <= router < self.num_routers:
            raise CilbenchError(f"router {router} out of range: this MoE has {self.num_routers} routers "
                                f"(0..{self.num_routers - 1}, or None for the plain model)")
        self.router = router


# ----------------------------------------------------------------------------------------------------------------
# LoRA


class LoRAEntry(nn.Module):
    """One low-rank adapter ``dW = scale * gain * B @ A`` (A [r, in], B [out, r]). ``scale`` = alpha / r is a
    buffer (saved, so a resumed run rebuilds the same number); ``gain`` is a scalar Parameter, 1 and frozen unless
    ``train_gain`` (HAM trains an importance scalar per task adapter and per group, PROTOCOLS-2 §1)."""

    def __init__(self, in_features: int, out_features: int, r: int, scale: float, dropout: float = 0.0,
                 train_gain: bool = False, device=None, dtype=None):
        super().__init__()
        if r < 1:
            raise CilbenchError(f"LoRA rank must be >= 1, not {r}")
        self.dropout = dropout
        self.A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # LoRA's init: A random, B zero, so dW = 0 at start
        self.register_buffer("scale", torch.tensor(float(scale), device=device, dtype=dtype))
        self.gain = nn.Parameter(torch.ones((), device=device, dtype=dtype), requires_grad=train_gain)

    @classmethod
    def from_factors(cls, A: torch.Tensor, B: torch.Tensor, scale: float, trainable: bool = False) -> "LoRAEntry":
        """An entry holding given factors (a merged group adapter): dW = scale * B @ A."""
        entry = cls(A.shape[1], B.shape[0], A.shape[0], scale, device=A.device, dtype=A.dtype)
        with torch.no_grad():
            entry.A.copy_(A)
            entry.B.copy_(B)
        entry.A.requires_grad_(trainable)
        entry.B.requires_grad_(trainable)
        return entry

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self) -> torch.Tensor:
        return (self.scale * self.gain) * (self.B @ self.A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(x, self.dropout, self.training)
        return F.linear(F.linear(h, self.A.to(x.dtype)), self.B.to(x.dtype)) * (self.scale * self.gain).to(x.dtype)


class LoRABank(PeftModule):
    """The LoRA adapters of one weight: a list of entries, some frozen (HAM's group adapters) and some training."""

    def __init__(self, in_features: int, out_features: int, allow_dropout: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.allow_dropout = allow_dropout
        self.entries = nn.ModuleList()
        self.enabled = True

    def add(self, r: int, alpha: float, dropout: float = 0.0, train_gain: bool = False,
            like: torch.Tensor | None = None) -> int:
        if dropout and not self.allow_dropout:
            raise CilbenchError("LoRA dropout is not available on nn.MultiheadAttention's in_proj / out_proj (the "
                                "delta is added to the weight, there is no layer input to drop): use dropout=0")
        ref = like if like is not None else (self.entries[0].A if len(self.entries) else None)
        kw = dict(device=ref.device, dtype=ref.dtype) if ref is not None else {}
        self.entries.append(LoRAEntry(self.in_features, self.out_features, r, alpha / r, dropout, train_gain, **kw))
        return len(self.entries) - 1

    def add_entry(self, entry: LoRAEntry) -> int:
        if entry.A.shape[1] != self.in_features or entry.B.shape[0] != self.out_features:
            raise CilbenchError(f"LoRA factors of shape {tuple(entry.B.shape)} x {tuple(entry.A.shape)} do not fit "
                                f"a {self.out_features} x {self.in_features} weight")
        if entry.dropout and not self.allow_dropout:
            raise CilbenchError("LoRA dropout is not available on nn.MultiheadAttention's in_proj / out_proj")
        self.entries.append(entry)
        return len(self.entries) - 1

    def _chosen(self, entries) -> list[int]:
        n = len(self.entries)
        if entries is None:
            return list(range(n))
        chosen = [entries] if isinstance(entries, int) else list(entries)
        bad = [i for i in chosen if not -n <= i < n]
        if bad:
            raise CilbenchError(f"LoRA entry {bad[0]} out of range: this layer holds {n}")
        return sorted({i % n for i in chosen})

    def delta(self, entries=None) -> torch.Tensor | None:
        """sum of scale * gain * B @ A over the chosen entries (all by default); None when there are none."""
        out = None
        for i in self._chosen(entries):
            d = self.entries[i].delta()
            out = d if out is None else out + d
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        out = None
        for entry in self.entries:
            y = entry(x)
            out = y if out is None else out + y
        return out


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` holding the frozen base ``weight`` / ``bias`` Parameters of the layer it replaces (same
    objects, same state-dict keys) plus ``lora`` (a ``LoRABank``).

    ``fold=False`` (layers called through ``forward``: timm qkv / proj / fc1 / fc2, open_clip c_fc / c_proj): output
    ``x W^T + b + sum(x A^T B^T * scale)``; ``weight`` is the base Parameter. ``fold=True`` (open_clip's
    ``attn.out_proj``, whose weight ``nn.MultiheadAttention`` reads directly): ``weight`` is ``W + dW``."""

    def __init__(self, base: nn.Linear, fold: bool = False):
        nn.Module.__init__(self)  # no fresh weight: the base Parameters are shared, not copied
        self.in_features, self.out_features = base.in_features, base.out_features
        self._parameters["weight"] = base.weight
        self._parameters["bias"] = base.bias
        self.fold = fold
        self.lora = LoRABank(base.in_features, base.out_features, allow_dropout=not fold)
        self.__dict__["_base_module"] = base  # put back by merge / remove (not a submodule: no second copy)
        self.train(base.training)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        w = self._parameters["weight"]
        if self.fold and self.lora.enabled:
            d = self.lora.delta()
            if d is not None:
                return w + d.to(w.dtype)
        return w

    def effective_weight(self) -> torch.Tensor:
        w = self._parameters["weight"]
        d = self.lora.delta() if self.lora.enabled else None
        return w if d is None else w + d.to(w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if not self.fold and self.lora.enabled:
            y = self.lora(x)
            if y is not None:
                out = out + y
        return out


class LoRAMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose ``in_proj_weight`` is ``W + dW`` of its ``in_proj_lora`` bank. An existing
    attention module is switched to this class in place (its Parameter stays ``in_proj_weight`` in the state dict);
    ``torch.nn.MultiheadAttention.forward`` is used unchanged."""

    @property
    def in_proj_weight(self) -> torch.Tensor:  # type: ignore[override]
        w = self._parameters["in_proj_weight"]
        bank = self._modules.get("in_proj_lora")
        if bank is not None and bank.enabled:
            d = bank.delta()
            if d is not None:
                return w + d.to(w.dtype)
        return w


# target name -> (child of the block, attribute); aliases let one list serve both libraries
_TIMM_TARGETS = {"qkv": ("attn", "qkv"), "proj": ("attn", "proj"), "fc1": ("mlp", "fc1"), "fc2": ("mlp", "fc2")}
_CLIP_TARGETS = {"in_proj": ("attn", "in_proj_weight"), "out_proj": ("attn", "out_proj"), "c_fc": ("mlp", "c_fc"),
                 "c_proj": ("mlp", "c_proj")}
_ALIASES = {"in_proj": "qkv", "out_proj": "proj", "c_fc": "fc1", "c_proj": "fc2"}


def _resolve_target(info: _BlockInfo, name: str) -> tuple[str, tuple[str, str]]:
    if info.library == "timm":
        key = _ALIASES.get(name, name)
        table = _TIMM_TARGETS
    else:
        key = {v: k for k, v in _ALIASES.items()}.get(name, name)
        table = _CLIP_TARGETS
    if key not in table:
        raise CilbenchError(f"unknown LoRA target {name!r}: use qkv / in_proj, proj / out_proj, fc1 / c_fc, "
                            f"fc2 / c_proj")
    return key, table[key]


def _add_lora(info: _BlockInfo, target: str, r: int, alpha: float, dropout: float,
              train_gain: bool) -> tuple[str, LoRABank]:
    key, (child_name, attr) = _resolve_target(info, target)
    child = getattr(info.block, child_name)
    path = f"{info.path}.{child_name}.{key}" if info.path else f"{child_name}.{key}"
    if attr == "in_proj_weight":
        if type(child) not in (nn.MultiheadAttention, LoRAMultiheadAttention) or not child._qkv_same_embed_dim:
            raise CilbenchError(f"LoRA on in_proj needs a plain nn.MultiheadAttention with one packed in_proj "
                                f"weight ({path})")
        if "in_proj_lora" in child._modules:
            raise CilbenchError(f"{path} already carries LoRA adapters: use handle.add_lora for more")
        w = child._parameters["in_proj_weight"]
        child.__class__ = LoRAMultiheadAttention  # a property for the weight; forward stays torch's
        bank = LoRABank(w.shape[1], w.shape[0], allow_dropout=False)
        child.add_module("in_proj_lora", bank)
        bank.add(r, alpha, dropout, train_gain, like=w)
        return path, bank
    lin = getattr(child, attr)
    if isinstance(lin, LoRALinear):
        raise CilbenchError(f"{path} already carries LoRA adapters: use handle.add_lora for more")
    if not isinstance(lin, nn.Linear):
        raise CilbenchError(f"{path} is a {type(lin).__name__}, not an nn.Linear")
    fold = isinstance(child, nn.MultiheadAttention)  # MHA reads out_proj.weight, never calls out_proj
    wrapped = LoRALinear(lin, fold=fold)
    setattr(child, attr, wrapped)
    wrapped.lora.add(r, alpha, dropout, train_gain, like=lin.weight)
    return path, wrapped.lora


def lora_layers(module: nn.Module) -> dict[str, LoRABank]:
    """Every LoRA bank under ``module``, by the name of the weight it adapts (``...attn.qkv``, ``...attn.in_proj``,
    ``...attn.out_proj``, ``...mlp.c_fc``)."""
    out: dict[str, LoRABank] = {}
    for name, m in module.named_modules():
        if isinstance(m, LoRALinear):
            out[name] = m.lora
        elif isinstance(m, LoRAMultiheadAttention) and "in_proj_lora" in m._modules:
            out[f"{name}.in_proj" if name else "in_proj"] = m._modules["in_proj_lora"]
    return out


def lora_delta(module: nn.Module, entries: int | Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """The weight change dW = sum(scale * gain * B @ A) of each adapted layer under ``module`` (over the chosen
    entries, all by default), by layer name: what HAM compares by cosine similarity to group adapters."""
    out = {}
    for name, bank in lora_layers(module).items():
        d = bank.delta(entries)
        if d is not None:
            out[name] = d
    return out


def _unwrap_lora(module: nn.Module, bank: LoRABank) -> None:
    """Put back the plain layer that carried ``bank`` (its base Parameters are shared, so nothing is copied)."""
    for name, m in module.named_modules():
        if isinstance(m, LoRALinear) and m.lora is bank:
            parent = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
            base = m.__dict__["_base_module"]
            base.train(m.training)
            setattr(parent, name.rpartition(".")[2], base)
            return
        if isinstance(m, LoRAMultiheadAttention) and m._modules.get("in_proj_lora") is bank:
            del m._modules["in_proj_lora"]
            m.__class__ = nn.MultiheadAttention
            return


def merge_lora(module: nn.Module, entries: int | Sequence[int] | None = None) -> int:
    """Fold the chosen LoRA entries (all by default) of every LoRA layer under ``module`` into the base weights, in
    place, and drop them; a layer left with no entry becomes its plain layer again. Returns the number of layers
    changed."""
    return _merge_banks(module, list(lora_layers(module).values()), entries)


@torch.no_grad()
def _merge_banks(module: nn.Module, banks: list[LoRABank], entries) -> int:
    changed = 0
    for bank in banks:
        chosen = bank._chosen(entries)
        d = bank.delta(chosen)
        if d is None:
            continue
        base = _base_weight(module, bank)
        base.add_(d.to(base.dtype))
        keep = [e for i, e in enumerate(bank.entries) if i not in chosen]
        bank.entries = nn.ModuleList(keep)
        if not keep:
            _unwrap_lora(module, bank)
        changed += 1
    return changed


def _base_weight(module: nn.Module, bank: LoRABank) -> nn.Parameter:
    for m in module.modules():
        if isinstance(m, LoRALinear) and m.lora is bank:
            return m._parameters["weight"]
        if isinstance(m, LoRAMultiheadAttention) and m._modules.get("in_proj_lora") is bank:
            return m._parameters["in_proj_weight"]
    raise CilbenchError("this LoRA bank is not inside the given module")


# ----------------------------------------------------------------------------------------------------------------
# Insertion and the handle


@dataclass(eq=False)
class PeftHandle:
    """What ``insert`` put into a model: ``modules`` maps each inserted module's name (relative to the model given
    to ``insert``) to it: branches (``...blocks.3.peft``) or LoRA banks (``...blocks.3.attn.qkv``)."""

    model: nn.Module = field(repr=False)
    kind: str
    modules: dict[str, PeftModule] = field(default_factory=dict, repr=False)

    def named_parameters(self, trainable_only: bool = True) -> Iterator[tuple[str, nn.Parameter]]:
        for name, m in self.modules.items():
            for pname, p in m.named_parameters():
                if p.requires_grad or not trainable_only:
                    yield f"{name}.{pname}", p

    def parameters(self, trainable_only: bool = True) -> list[nn.Parameter]:
        """The inserted parameters that train (``requires_grad``); all of them with ``trainable_only=False``."""
        return [p for _, p in self.named_parameters(trainable_only)]

    def num_parameters(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for p in self.parameters(trainable_only))

    def set_enabled(self, enabled: bool) -> None:
        for m in self.modules.values():
            m.enabled = enabled

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """The base model's computation, adapters kept (a cheap pre-trained teacher, ZSCL / LwF style)."""
        before = {n: m.enabled for n, m in self.modules.items()}
        self.set_enabled(False)
        try:
            yield
        finally:
            for n, m in self.modules.items():
                m.enabled = before[n]

    # -- moe
    def _moe(self) -> list[MoEBranch]:
        if self.kind != "moe":
            raise CilbenchError(f"routers exist for kind 'moe' only, not {self.kind!r}")
        return list(self.modules.values())  # type: ignore[return-value]

    def set_router(self, router: int | None) -> None:
        """The task router every MoE block uses (image and text alike, as the official code), or None: the plain
        model (zero-shot)."""
        for m in self._moe():
            m.set_router(router)

    def set_noise(self, mode: bool | str) -> None:
        """``"train"`` (noise in training mode), True (always, the official CIL code) or False (never)."""
        if mode not in (True, False, "train"):
            raise CilbenchError(f"router noise must be True, False or 'train', not {mode!r}")
        for m in self._moe():
            m.noise_mode = mode

    def expert_counts(self) -> dict[str, torch.Tensor]:
        return {n: m.counts.clone() for n, m in zip(self.modules, self._moe())}

    def reset_counts(self) -> None:
        for m in self._moe():
            m.counts.zero_()

    def aux_loss(self) -> torch.Tensor:
        """Sum over blocks of the last forward's balance term (needs ``balance_loss=True``)."""
        terms = [m.aux_loss for m in self._moe() if m.aux_loss is not None]
        if not terms:
            raise CilbenchError("no balance loss recorded: insert with balance_loss=True and run a forward with a "
                                "router set")
        return torch.stack([t.reshape(()) for t in terms]).sum()

    # -- lora
    def _banks(self) -> dict[str, LoRABank]:
        if self.kind != "lora":
            raise CilbenchError(f"LoRA operations need kind 'lora', not {self.kind!r}")
        return self.modules  # type: ignore[return-value]

    def add_lora(self, r: int = 8, alpha: float = 16.0, dropout: float = 0.0, train_gain: bool = False,
                 freeze_others: bool = True) -> int:
        """A new zero-initialised adapter in every adapted layer (HAM: the next task's adapter); the others are
        frozen (A, B and gain) unless ``freeze_others=False``. Returns its entry index."""
        index = None
        for bank in self._banks().values():
            if freeze_others:
                bank.entries.requires_grad_(False)
            i = bank.add(r, alpha, dropout, train_gain)
            if index not in (None, i):
                raise CilbenchError("the LoRA layers of this handle hold different numbers of adapters")
            index = i
        return int(index)

    def lora_delta(self, entries: int | Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        out = {}
        for name, bank in self._banks().items():
            d = bank.delta(entries)
            if d is not None:
                out[name] = d
        return out

    def merge(self, entries: int | Sequence[int] | None = None) -> None:
        """Fold LoRA entries into the base weights (all by default); layers left without entries leave the handle."""
        _merge_banks(self.model, list(self._banks().values()), entries)
        live = set(map(id, lora_layers(self.model).values()))
        self.modules = {n: b for n, b in self.modules.items() if id(b) in live}

    # -- all kinds
    def remove(self) -> None:
        """Take every inserted module out (LoRA unfolded: its change is discarded); the model is the original."""
        for m in self.modules.values():
            if isinstance(m, _Branch):
                m.detach_hooks()
                for parent in self.model.modules():
                    if parent._modules.get("peft") is m:
                        del parent._modules["peft"]
            else:
                _unwrap_lora(self.model, m)  # type: ignore[arg-type]
        self.modules = {}


def insert(model: nn.Module, kind: str, blocks: str | int | Iterable[int] = "all",
           encoders: str | Sequence[str] | None = None, freeze_base: bool = True, **options) -> PeftHandle:
    """Insert PEFT modules into the timm / open_clip blocks of ``model``.

    ``blocks``: "all" or block indices (per encoder). ``encoders`` (CLIP): "image", "text" or "both" (default: every
    encoder found; MoE-Adapters puts adapters in both, ``AdapterDoubleEncoder``). ``freeze_base``: every parameter of
    ``model`` outside the PEFT modules stops requiring grad. Options per kind:

    * adaptformer: ``bottleneck=64, scale=0.1, dropout=0.1`` (PILOT / cilbench.models.adapter defaults).
    * lora: ``targets=("qkv", "proj")`` (open_clip names in_proj / out_proj accepted, and fc1 / c_fc, fc2 / c_proj),
      ``r=8, alpha=16, dropout=0.0, train_gain=False``.
    * moe: ``num_experts=22, num_routers=11, top_k=2, bottleneck=64, scale=0.1, dropout=0.1, noisy_gating=True,
      noise_epsilon=1e-2, balance_loss=False`` (PROTOCOLS-2 §2.1: the MTIL scripts' 22 experts, top-2, 11 routers).
    """
    if kind not in KINDS:
        raise CilbenchError(f"unknown PEFT kind {kind!r}: use one of {', '.join(KINDS)}")
    chosen = _select_blocks(model, blocks, encoders)
    handle = PeftHandle(model, kind)
    if kind == "lora":
        opts = dict(targets=("qkv", "proj"), r=8, alpha=16.0, dropout=0.0, train_gain=False)
        _check_options(kind, options, opts)
        opts.update(options)
        targets = (opts["targets"],) if isinstance(opts["targets"], str) else tuple(opts["targets"])
        for info in chosen:
            for t in targets:
                name, bank = _add_lora(info, t, opts["r"], opts["alpha"], opts["dropout"], opts["train_gain"])
                handle.modules[name] = bank
    else:
        if any(isinstance(m, AdaptedBlock) for m in model.modules()):
            raise CilbenchError("this ViT already carries models/adapter.py adapters (AdaptedViT): its blocks do not "
                                "run the timm Block forward")
        defaults = dict(bottleneck=64, scale=0.1, dropout=0.1)
        if kind == "moe":
            defaults.update(num_experts=22, num_routers=11, top_k=2, noisy_gating=True, noise_epsilon=1e-2,
                            balance_loss=False)
        _check_options(kind, options, defaults)
        defaults.update(options)
        for info in chosen:
            if "peft" in info.block._modules:
                raise CilbenchError(f"block {info.path} already carries a PEFT branch")
            cls = AdaptFormerBranch if kind == "adaptformer" else MoEBranch
            ref = _param_like(info.block)
            branch = cls(info.dim, batch_first=info.batch_first, **defaults).to(device=ref.device, dtype=ref.dtype)
            branch.train(info.block.training)
            branch.attach(info.block, info.norm)
            handle.modules[f"{info.path}.peft" if info.path else "peft"] = branch
    if freeze_base:
        own = {id(p) for m in model.modules() if isinstance(m, PeftModule) for p in m.parameters()}
        for p in model.parameters():
            if id(p) not in own:
                p.requires_grad_(False)
    return handle


def _check_options(kind: str, given: dict, known: dict) -> None:
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise CilbenchError(f"unknown {kind} option {unknown[0]!r}: known are {', '.join(sorted(known))}")
