"""AdaptFormer adapters on a frozen timm ViT, as PILOT's ``vit_adapter`` places them, with K experts per block.

One adapter per block, parallel to the MLP. Its input is the residual stream after attention (not LN2) and the block
output is ``x + mlp(ln2(x)) + a`` with ``a = scale * up(dropout(relu(down(x))))``; bottleneck 64, scale 0.1,
dropout 0.1. ``down`` is kaiming-uniform (a = sqrt 5, nn.Linear's default), ``up`` and both biases are zero, so
the adapted ViT computes exactly the plain ViT until it is trained.

``AdaptedViT`` holds K experts (CICAE: K collaborating experts; EASE: one per task; APER, RanPAC, finetune-adapter:
one). ``forward(images, experts)`` returns the features of each asked-for expert, ``[E, B, D]``:

* ``batched=True`` (default) runs the frozen backbone once on the batch repeated E times; in every block each
  expert's adapter is applied to its own slice with one batched matmul (``torch.baddbmm``) over stacked weights.
* ``batched=False`` runs E sequential passes, one expert each. Same numbers; ``cilbench bench`` times both.
  A batched pass is capped at ``max_images`` images; beyond it the experts are split over several passes.

Every expert keeps its own ``nn.Parameter`` objects (so it can have its own learning rate and weight decay); the
batched path stacks them per forward, a copy of about 0.1 M numbers per block.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from cilbench.errors import CilbenchError


class Adapter(nn.Module):
    """One AdaptFormer bottleneck: ``scale * up(dropout(relu(down(x))))``, zero at initialisation."""

    def __init__(self, dim: int, bottleneck: int = 64, scale: float = 0.1, dropout: float = 0.1):
        super().__init__()
        self.scale, self.dropout = scale, dropout
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Down kaiming-uniform (a = sqrt 5), down bias, up weight and up bias zero: the adapter outputs 0. With a
        (CPU) ``generator`` the down weight is drawn from it on the CPU, so a seed gives the same start anywhere."""
        if generator is None:
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        else:
            w = torch.empty(self.down.weight.shape, dtype=self.down.weight.dtype)
            self.down.weight.copy_(nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=generator))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(F.relu(self.down(x)), self.dropout, self.training)
        return self.scale * self.up(h)


class AdapterBank(nn.Module):
    """The experts' adapters of one block. ``forward(x, active)``: x holds len(active) slices along the batch."""

    def __init__(self, dim: int, num_experts: int, bottleneck: int, scale: float, dropout: float):
        super().__init__()
        self.args = (dim, bottleneck, scale, dropout)
        self.experts = nn.ModuleList(Adapter(*self.args) for _ in range(num_experts))

    def add(self) -> None:
        ref = self.experts[0].down.weight if len(self.experts) else None
        new = Adapter(*self.args)
        if ref is not None:
            new = new.to(ref.device)
        self.experts.append(new)

    def forward(self, x: torch.Tensor, active: Sequence[int]) -> torch.Tensor:
        if len(active) == 1:
            return self.experts[active[0]](x)
        e = len(active)
        shape = x.shape
        xs = x.reshape(e, -1, shape[-1])  # [E, B*N, D]: expert i owns the i-th slice of the batch
        ad = [self.experts[k] for k in active]
        dt = xs.dtype
        w_down = torch.stack([a.down.weight for a in ad]).to(dt).transpose(1, 2)  # [E, D, r]
        b_down = torch.stack([a.down.bias for a in ad]).to(dt).unsqueeze(1)  # [E, 1, r]
        w_up = torch.stack([a.up.weight for a in ad]).to(dt).transpose(1, 2)  # [E, r, D]
        b_up = torch.stack([a.up.bias for a in ad]).to(dt).unsqueeze(1)
        h = F.dropout(F.relu(torch.baddbmm(b_down, xs, w_down)), ad[0].dropout, self.training)
        out = torch.baddbmm(b_up, h, w_up) * ad[0].scale
        return out.reshape(shape)


class AdaptedBlock(nn.Module):
    """A timm ViT block with an adapter bank parallel to its MLP; ``active`` experts are set by ``AdaptedViT``."""

    def __init__(self, block: nn.Module, bank: AdapterBank):
        super().__init__()
        self.block = block
        self.adapters = bank
        self.active: tuple[int, ...] = ()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        b = self.block
        x = x + b.drop_path1(b.ls1(b.attn(b.norm1(x), *args, **kwargs)))
        out = x + b.drop_path2(b.ls2(b.mlp(b.norm2(x))))
        if self.active:
            out = out + self.adapters(x, self.active)  # input: the residual stream after attention
        return out


class AdaptedViT(nn.Module):
    """K adapter experts installed in every block of a frozen timm ViT ``Backbone`` (the backbone is not owned:
    its parameters stay registered under the method's ``backbone``, the adapters under ``...adapters``).
    A batched pass holds at most ``max_images`` images (batch x experts); more experts (EASE after many tasks)
    run in several passes."""

    max_images = 4096

    def __init__(self, backbone: nn.Module, num_experts: int = 1, bottleneck: int = 64, scale: float = 0.1,
                 dropout: float = 0.1):
        super().__init__()
        if getattr(backbone, "family", None) != "vit":
            raise CilbenchError(f"adapters need a timm ViT backbone, not {getattr(backbone, 'spec', backbone)}")
        vit = backbone.model
        self.__dict__["backbone"] = backbone  # a reference, not a submodule: no second copy in the state dict
        self.feature_dim = backbone.feature_dim
        dim = vit.embed_dim
        blocks = []
        for blk in vit.blocks:
            if isinstance(blk, AdaptedBlock):
                raise CilbenchError("this backbone already carries adapters")
            blocks.append(AdaptedBlock(blk, AdapterBank(dim, num_experts, bottleneck, scale, dropout)))
        vit.blocks = nn.Sequential(*blocks)
        vit.blocks.train(backbone.training)  # new adapters follow the backbone's train/eval mode
        backbone.requires_grad_(False)
        for blk in blocks:
            blk.adapters.requires_grad_(True)

    @property
    def blocks(self) -> list[AdaptedBlock]:
        return list(self.backbone.model.blocks)

    @property
    def num_experts(self) -> int:
        return len(self.blocks[0].adapters.experts)

    def add_expert(self) -> int:
        """A new zero-initialised expert in every block; returns its index."""
        for blk in self.blocks:
            blk.adapters.add()
            blk.adapters.train(blk.training)
        return self.num_experts - 1

    def expert_parameters(self, k: int) -> list[nn.Parameter]:
        return [p for blk in self.blocks for p in blk.adapters.experts[k].parameters()]

    def expert_modules(self, k: int) -> list[nn.Module]:
        return [blk.adapters.experts[k] for blk in self.blocks]

    @contextlib.contextmanager
    def use(self, experts: Sequence[int]) -> Iterator[None]:
        blocks = self.blocks
        before = blocks[0].active
        for blk in blocks:
            blk.active = tuple(experts)
        try:
            yield
        finally:
            for blk in blocks:
                blk.active = before

    def forward(self, images: torch.Tensor, experts: Sequence[int] | None = None,
                batched: bool = True) -> torch.Tensor:
        """Features ``[E, B, D]`` of the given experts (all by default)."""
        experts = list(range(self.num_experts)) if experts is None else list(experts)
        if not experts:
            return self.plain(images).unsqueeze(0)
        if not batched or len(experts) == 1:
            outs = []
            for k in experts:
                with self.use([k]):
                    outs.append(self.backbone(images))
            return torch.stack(outs)
        per = max(1, self.max_images // max(1, images.shape[0]))  # experts per pass: bounded activation memory
        outs = []
        for i in range(0, len(experts), per):
            chunk = experts[i:i + per]
            with self.use(chunk):
                feats = self.backbone(images.repeat(len(chunk), 1, 1, 1))
            outs.append(feats.view(len(chunk), images.shape[0], -1))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def plain(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen pre-trained features, no adapter."""
        with self.use(()):
            return self.backbone(images)


def count_parameters(params) -> int:
    return sum(p.numel() for p in params)
