"""HAM's LoRA grouping, pruning and merging (Coleman et al., arXiv 2509.13211), and a per-task LoRA store for the
LoRA baselines; built on ``cilbench.models.peft`` (``insert(model, "lora", ...)``, ``LoRABank``, ``LoRAEntry``).

What HAM is, as far as it can be read (PROTOCOLS-2 §1; no code is public, the method section could not be read;
the facts come from the abstract, the AI summaries and four OpenReview reviews): per task a LoRA adapter
``dW_i = B_i A_i`` with an importance scalar ``alpha_i``; at most ``G_max`` groups, group ``j`` holding a merged
adapter ``dW_Gj`` with a scale ``alpha_Gj``; while task ``i`` trains, ``W0`` and every ``dW_Gj`` are frozen and
``dW_i``, ``alpha_i`` and every ``alpha_Gj`` train, each adapted layer computing

    h = W0 x + sum_j alpha_Gj dW_Gj x + alpha_i dW_i x;

after the task its adapter joins the most similar group (cosine similarity of the adapter weights) or opens a new
group while there are fewer than ``G_max``; inside a group, adapters are pruned, scaled by importance and merged.

How this module makes it concrete (every choice a setting of ``methods/ham.py``, which says where it comes from):

* ``HAMLoRA`` puts one ``LoRABank`` on each target weight of the ViT (``insert(..., "lora")``). Its entry 0 is the
  live task adapter (re-initialised for every task, LoRA's init, so the model starts each task as it ended the
  last); its entry 1 holds a ``GroupDeltas`` (this module), that layer's group adapters. A bank sums its entries,
  so the layer computes exactly the equation above; timm's linear layers are switched to ``HAMLinear``, which
  computes the same numbers with the groups added to the weight once per call (no per-token cost). After
  consolidation entry 0's ``B`` is zero: inference goes through the groups only (no task id).
* Importance scalars: ``scope="adapter"`` (default) gives one ``alpha_i`` per task shared by every layer (the same
  0-dim Parameter is every entry's ``gain``) and one ``alpha_Gj`` per group (``HAMLoRA.group_alpha`` [M, 1]);
  ``scope="layer"`` gives each layer its own (``gain`` of each entry, ``group_alpha`` [M, layers]).
* ``prune``: magnitude pruning, the "trim" step of TIES-Merging: the ``keep`` fraction of largest-magnitude entries
  of each adapter delta stays, the rest is zero (``scope="layer"``: per weight matrix; ``"adapter"``: one
  threshold over the whole adapter, as TIES trims a whole task vector). TIES' sign election and disjoint mean need
  every member's delta kept, which would make memory grow with the task count: left out, the merge is a sum.
* ``merge``: a group's delta is the importance-scaled sum of its members' pruned deltas,
  ``dW_Gj = sum_{i in j} alpha_i prune(dW_i)``, accumulated as adapters join (no member is stored). With
  ``fold=True`` (default) every group's trained scale is first folded into its delta and reset to 1
  (``dW_Gj <- alpha_Gj dW_Gj``): the consolidated model then computes what the model computed at the end of
  training, up to pruning (exactly, with ``keep=1``). ``fold=False`` keeps ``alpha_Gj`` apart and adds the new
  member under it.
* Storage (``store``): ``"dense"`` keeps one dense ``[out, in]`` delta per layer per group: exact, bounded by
  ``G_max`` (at ViT-B/16 with qkv + proj, 28.3M numbers per group). ``"lowrank"`` keeps each group as factors of
  rank ``rank`` (zero-padded): after a merge the dense sum is re-factorised by truncated SVD (the best rank-``rank``
  approximation, Eckart-Young; exact when the sum's rank is at most ``rank``). Reviewer 3 reads HAM's merge as
  concatenating pruned low-rank factors, whose rank grows with every member: unbounded, so not offered as such;
  ``lowrank`` is its bounded form.
* ``choose_group``: join the most similar group when its similarity reaches ``threshold``; else open a new group
  while ``M < G_max``; else join the most similar group anyway. Similarity: cosine of the flattened deltas, over
  the concatenation of every layer (``similarity="concat"``) or averaged over layers (``"mean"``), between the new
  adapter's effective delta ``alpha_i dW_i`` (before pruning) and each group's ``alpha_Gj dW_Gj``.

Parameters and buffers are bounded by ``G_max``: the task entry is reused, group tensors stop growing at ``G_max``
groups, and no per-task tensor is kept (the group of each task goes into the run record's log, not the state).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from cilbench.errors import CilbenchError
from cilbench.models.peft import LoRABank, LoRALinear, insert

STORES = ("dense", "lowrank")
SCOPES = ("adapter", "layer")
SIMILARITIES = ("concat", "mean")


# ----------------------------------------------------------------------------------------------------------------
# the math, on plain tensors


def magnitude_mask(values: Sequence[torch.Tensor], keep: float) -> list[torch.Tensor]:
    """Boolean masks keeping the ``keep`` fraction (rounded to the nearest count, at least one) of the
    largest-magnitude entries over all of ``values`` together (one threshold for the lot)."""
    if not 0 < keep <= 1:
        raise CilbenchError(f"the kept fraction must be in (0, 1], not {keep}")
    flat = torch.cat([v.detach().abs().reshape(-1) for v in values])
    if keep >= 1:
        return [torch.ones_like(v, dtype=torch.bool) for v in values]
    k = max(1, int(round(keep * flat.numel())))
    idx = torch.topk(flat, k, sorted=False).indices
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    mask[idx] = True
    out, start = [], 0
    for v in values:
        out.append(mask[start:start + v.numel()].reshape(v.shape))
        start += v.numel()
    return out


def prune(deltas: dict[str, torch.Tensor], keep: float, scope: str = "layer") -> dict[str, torch.Tensor]:
    """Magnitude pruning (TIES' trim): per weight matrix (``scope="layer"``) or over the whole adapter
    (``"adapter"``); pruned entries are zero."""
    names = list(deltas)
    if scope == "layer":
        return {n: deltas[n] * magnitude_mask([deltas[n]], keep)[0] for n in names}
    if scope == "adapter":
        masks = magnitude_mask([deltas[n] for n in names], keep)
        return {n: deltas[n] * m for n, m in zip(names, masks)}
    raise CilbenchError(f"prune scope must be one of {', '.join(SCOPES)}, not {scope!r}")


def similarity(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], mode: str = "concat") -> float:
    """Cosine similarity of two adapters' flattened deltas (same layer names): over the concatenation of every
    layer (``concat``) or the mean of the per-layer cosines (``mean``). A zero delta has similarity 0."""
    names = list(a)
    if mode == "concat":
        x = torch.cat([a[n].double().reshape(-1) for n in names])
        y = torch.cat([b[n].double().reshape(-1) for n in names])
        return float(F.cosine_similarity(x, y, dim=0, eps=1e-30)) if x.norm() > 0 and y.norm() > 0 else 0.0
    if mode == "mean":
        cos = [float(F.cosine_similarity(a[n].double().reshape(-1), b[n].double().reshape(-1), dim=0, eps=1e-30))
               if a[n].norm() > 0 and b[n].norm() > 0 else 0.0 for n in names]
        return sum(cos) / len(cos)
    raise CilbenchError(f"similarity must be one of {', '.join(SIMILARITIES)}, not {mode!r}")


def choose_group(sims: Sequence[float], max_groups: int, threshold: float) -> tuple[int, bool]:
    """(group index, whether it is a new group) for a new adapter with similarities ``sims`` to the ``len(sims)``
    existing groups: the most similar group when its similarity reaches ``threshold``; else a new group while there
    is room (fewer than ``max_groups``); else the most similar group. Ties go to the lower index."""
    m = len(sims)
    if m == 0:
        return 0, True
    best = max(range(m), key=lambda j: (sims[j], -j))
    if sims[best] >= threshold or m >= max_groups:
        return best, False
    return m, True


def truncated_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B [out, rank], A [rank, in])`` with ``B @ A`` the best rank-``rank`` approximation of ``delta`` (truncated
    SVD, computed in float64; zero columns / rows pad a rank beyond ``min(out, in)``)."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    k = min(rank, s.numel())
    B = delta.new_zeros(delta.shape[0], rank)
    A = delta.new_zeros(rank, delta.shape[1])
    B[:, :k] = (u[:, :k] * s[:k]).to(delta.dtype)
    A[:k] = vh[:k].to(delta.dtype)
    return B, A


# ----------------------------------------------------------------------------------------------------------------
# group adapters inside a LoRA bank


class GroupDeltas(nn.Module):
    """The group adapters of one adapted weight, an entry of its ``LoRABank`` (after the live task adapter): the
    bank then adds ``sum_j alpha_Gj dW_Gj x`` to the layer's output. ``dense``: buffer ``delta`` [M, out, in];
    ``lowrank``: buffers ``B`` [M, out, R] and ``A`` [M, R, in]. The scales live in the owning ``HAMLoRA``
    (``group_alpha[:, column]``), shared by every layer with ``scope="adapter"``."""

    def __init__(self, in_features: int, out_features: int, store: str, rank: int, column: int, owner: "HAMLoRA",
                 like: torch.Tensor):
        super().__init__()
        self.in_features, self.out_features, self.store, self.rank, self.column = (
            in_features, out_features, store, rank, column)
        self.__dict__["_owner"] = owner  # not a submodule (no cycle in the module tree)
        kw = dict(device=like.device, dtype=like.dtype)
        if store == "dense":
            self.register_buffer("delta", torch.zeros(0, out_features, in_features, **kw))
        else:
            self.register_buffer("B", torch.zeros(0, out_features, rank, **kw))
            self.register_buffer("A", torch.zeros(0, rank, in_features, **kw))

    @property
    def num_groups(self) -> int:
        return (self.delta if self.store == "dense" else self.A).shape[0]

    def resize(self, groups: int) -> None:
        """Hold ``groups`` groups (new ones zero)."""
        names = ("delta",) if self.store == "dense" else ("B", "A")
        for name in names:
            old = getattr(self, name)
            new = old.new_zeros(groups, *old.shape[1:])
            n = min(groups, old.shape[0])
            new[:n] = old[:n]
            setattr(self, name, new)

    def scales(self) -> torch.Tensor:
        return self._owner.group_alpha[:, self.column]

    def raw(self, j: int) -> torch.Tensor:
        """Group ``j``'s stored delta (without its scale), dense [out, in]."""
        return self.delta[j] if self.store == "dense" else self.B[j] @ self.A[j]

    @torch.no_grad()
    def scale_group(self, j: int, factor: torch.Tensor) -> None:
        """``dW_Gj <- factor * dW_Gj`` (exact in both stores: the lowrank one scales ``B``)."""
        (self.delta if self.store == "dense" else self.B)[j] *= factor.to(self.scales().dtype)

    @torch.no_grad()
    def set_raw(self, j: int, dense: torch.Tensor) -> None:
        if self.store == "dense":
            self.delta[j] = dense.to(self.delta)
        else:
            B, A = truncated_factors(dense.to(self.A), self.rank)
            self.B[j], self.A[j] = B, A

    def delta_sum(self) -> torch.Tensor | None:
        """``sum_j alpha_Gj dW_Gj`` (dense [out, in]); None without groups."""
        if self.num_groups == 0:
            return None
        a = self.scales()
        if self.store == "dense":
            return torch.einsum("g,goi->oi", a.to(self.delta.dtype), self.delta)
        return torch.einsum("gor,gri->oi", self.B * a.to(self.B.dtype)[:, None, None], self.A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.num_groups
        if m == 0:
            return x.new_zeros(*x.shape[:-1], self.out_features)
        a = self.scales().to(x.dtype)
        if self.store == "dense":
            w = torch.einsum("g,goi->oi", a, self.delta.to(x.dtype))
            return F.linear(x, w)
        A = self.A.to(x.dtype).reshape(m * self.rank, self.in_features)  # [M R, in]
        B = (self.B.to(x.dtype) * a[:, None, None]).permute(1, 0, 2).reshape(self.out_features, m * self.rank)
        return F.linear(F.linear(x, A), B)


# the bank asks every entry for .delta(); for GroupDeltas that name is a buffer in the dense store, so the bank's
# call goes through this small shim entry instead
class _GroupEntry(nn.Module):
    """Entry 1 of a HAM bank: forwards to its ``GroupDeltas`` (``groups``) for ``bank(x)`` and ``bank.delta()``."""

    dropout = 0.0

    def __init__(self, groups: GroupDeltas):
        super().__init__()
        self.groups = groups

    def delta(self) -> torch.Tensor:
        d = self.groups.delta_sum()
        return d if d is not None else self.groups._owner._zero(self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.groups(x)


class HAMLinear(LoRALinear):
    """A HAM layer (a ``LoRALinear`` switched to this class in place, as ``peft`` switches attention modules): the
    group adapters are added to the weight once per forward, ``F.linear(x, W0 + sum_j alpha_Gj dW_Gj, b)``, so they
    cost one [out, in] sum per call instead of a matmul per token, and the live task adapter runs as LoRA. The same
    numbers as the bank's ``x W0^T + b + bank(x)``; with the bank disabled, the plain layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self._parameters["weight"]
        if not self.lora.enabled:
            return F.linear(x, w, self.bias)
        g = self.lora.entries[1].groups.delta_sum()
        out = F.linear(x, w if g is None else w + g.to(w.dtype), self.bias)
        return out + self.lora.entries[0](x)


class HAMLoRA(nn.Module):
    """HAM's adapters on a timm ViT (or any module ``peft.insert`` adapts): a live task LoRA and the group adapters
    in every target weight, the importance scalars, and ``consolidate`` (group choice, pruning, merging).

    ``new_task()`` re-initialises the task adapter (A kaiming-uniform, B zero, importance 1) and makes it and the
    group scales trainable (``trainable()``); ``consolidate(...)`` merges it into a group and zeroes it. State:
    the banks live in ``model`` (keys ``...attn.qkv.lora.entries.{0,1}.*``), the scales here (``group_alpha``
    [M, S], ``task_alpha``); ``ensure_groups(M)`` rebuilds the shapes of M groups before a checkpoint is loaded."""

    def __init__(self, model: nn.Module, targets: Sequence[str] = ("qkv", "proj"), r: int = 8, alpha: float = 16.0,
                 max_groups: int = 5, store: str = "dense", rank: int = 64, scope: str = "adapter"):
        super().__init__()
        if store not in STORES:
            raise CilbenchError(f"group store must be one of {', '.join(STORES)}, not {store!r}")
        if scope not in SCOPES:
            raise CilbenchError(f"importance scope must be one of {', '.join(SCOPES)}, not {scope!r}")
        if max_groups < 1:
            raise CilbenchError(f"max_groups must be at least 1, not {max_groups}")
        self.max_groups, self.store, self.scope, self.rank = max_groups, store, scope, rank
        handle = insert(model, "lora", targets=tuple(targets), r=r, alpha=alpha, train_gain=True)
        self.__dict__["handle"] = handle
        banks: dict[str, LoRABank] = dict(handle.modules)  # type: ignore[arg-type]
        self.__dict__["banks"] = banks
        like = next(iter(banks.values())).entries[0].A
        columns = 1 if scope == "adapter" else len(banks)
        self.task_alpha = nn.Parameter(torch.ones((), device=like.device, dtype=like.dtype))
        self.group_alpha = nn.Parameter(torch.ones(0, columns, device=like.device, dtype=like.dtype))
        self.register_buffer("group_sizes", torch.zeros(0, dtype=torch.long, device=like.device))
        self.__dict__["groups"] = {}
        for col, (name, bank) in enumerate(banks.items()):
            gd = GroupDeltas(bank.in_features, bank.out_features, store, rank, col if scope == "layer" else 0,
                             self, like)
            bank.entries.append(_GroupEntry(gd))
            self.groups[name] = gd
            layer = model.get_submodule(name) if name else model
            if type(layer) is LoRALinear and not layer.fold:
                layer.__class__ = HAMLinear
            if scope == "adapter":
                bank.entries[0].gain = self.task_alpha  # one importance scalar for the whole task adapter

    def _zero(self, gd: GroupDeltas) -> torch.Tensor:
        return self.task_alpha.new_zeros(gd.out_features, gd.in_features)

    @property
    def num_groups(self) -> int:
        return self.group_alpha.shape[0]

    def task_entries(self):
        return [bank.entries[0] for bank in self.banks.values()]

    @torch.no_grad()
    def new_task(self) -> None:
        for e in self.task_entries():
            nn.init.kaiming_uniform_(e.A, a=math.sqrt(5))
            e.B.zero_()
            e.gain.fill_(1.0)
            e.A.requires_grad_(True)
            e.B.requires_grad_(True)
            e.gain.requires_grad_(True)
        self.group_alpha.requires_grad_(True)

    def trainable(self) -> list[nn.Parameter]:
        """The task adapter (A, B), its importance scalar(s) and the group scales; the group deltas are buffers."""
        params: list[nn.Parameter] = []
        for e in self.task_entries():
            params += [e.A, e.B]
        params += [self.task_alpha] if self.scope == "adapter" else [e.gain for e in self.task_entries()]
        if self.num_groups:
            params.append(self.group_alpha)
        return params

    def task_alphas(self) -> dict[str, torch.Tensor]:
        return {n: b.entries[0].gain.detach() for n, b in self.banks.items()}

    def task_delta(self, effective: bool = True) -> dict[str, torch.Tensor]:
        """The live task adapter's delta per layer: ``alpha_i * scale * B A`` (``effective``) or ``scale * B A``."""
        out = {}
        for n, bank in self.banks.items():
            e = bank.entries[0]
            d = e.scale * (e.B @ e.A)
            out[n] = (d * e.gain if effective else d).detach()
        return out

    def group_delta(self, j: int, effective: bool = True) -> dict[str, torch.Tensor]:
        """Group ``j``'s delta per layer: ``alpha_Gj dW_Gj`` (``effective``) or ``dW_Gj``."""
        out = {}
        for n, gd in self.groups.items():
            d = gd.raw(j)
            out[n] = (d * gd.scales()[j] if effective else d).detach().clone()
        return out

    def ensure_groups(self, groups: int) -> None:
        """Shapes for ``groups`` groups (a resumed run: before its checkpoint is loaded)."""
        if groups == self.num_groups:
            return
        if groups > self.max_groups:
            raise CilbenchError(f"{groups} groups exceed max_groups={self.max_groups}")
        for gd in self.groups.values():
            gd.resize(groups)
        old = self.group_alpha.data
        new = old.new_ones(groups, old.shape[1])
        new[:min(groups, old.shape[0])] = old[:groups]
        self.group_alpha = nn.Parameter(new, requires_grad=self.group_alpha.requires_grad)
        sizes = self.group_sizes.new_zeros(groups)
        sizes[:min(groups, len(self.group_sizes))] = self.group_sizes[:groups]
        self.group_sizes = sizes

    @torch.no_grad()
    def consolidate(self, keep: float = 0.2, threshold: float = 0.5, mode: str = "concat",
                    prune_scope: str = "layer", fold: bool = True) -> dict:
        """Merge the live task adapter into a group (chosen by ``choose_group``) and zero it. Returns what happened
        (for the record): ``group``, ``new_group``, ``similarities``, ``groups``, ``importance``."""
        eff = self.task_delta(effective=True)
        sims = [similarity(eff, self.group_delta(j, effective=True), mode) for j in range(self.num_groups)]
        j, opened = choose_group(sims, self.max_groups, threshold)
        pruned = prune(self.task_delta(effective=False), keep, prune_scope)
        alphas = self.task_alphas()
        if opened:
            self.ensure_groups(self.num_groups + 1)
        if fold:  # alpha_Gj folded into dW_Gj, then 1
            for gd in self.groups.values():
                for g in range(self.num_groups):
                    gd.scale_group(g, gd.scales()[g].detach().clone())
            self.group_alpha.fill_(1.0)
        for n, gd in self.groups.items():
            gd.set_raw(j, gd.raw(j) + alphas[n] * pruned[n])
        self.group_sizes[j] += 1
        importance = float(self.task_alpha) if self.scope == "adapter" else [float(a) for a in alphas.values()]
        for e in self.task_entries():  # the task adapter now lives in its group only
            e.B.zero_()
            e.A.requires_grad_(False)
            e.B.requires_grad_(False)
            e.gain.requires_grad_(False)
        return dict(group=j, new_group=opened, similarities=[round(s, 6) for s in sims], groups=self.num_groups,
                    group_sizes=self.group_sizes.tolist(), importance=importance)


# ----------------------------------------------------------------------------------------------------------------
# one LoRA per task, kept apart (the lora-per-task baseline)


class TaskLoRAStore(nn.Module):
    """The factors of one LoRA per task for every bank of a ``peft`` LoRA handle (entry 0 is the live one):
    buffers ``A{k}`` [T, r, in], ``B{k}`` [T, out, r] and ``gain{k}`` [T] for bank ``k``. ``grow()`` adds a zero slot
    (structure, replayed on resume), ``save(t)`` copies the live entry in, ``load(t)`` copies slot ``t`` out."""

    def __init__(self, banks: dict[str, LoRABank]):
        super().__init__()
        self.__dict__["banks"] = banks
        for k, bank in enumerate(banks.values()):
            e = bank.entries[0]
            self.register_buffer(f"A{k}", e.A.new_zeros(0, *e.A.shape))
            self.register_buffer(f"B{k}", e.B.new_zeros(0, *e.B.shape))
            self.register_buffer(f"gain{k}", e.A.new_zeros(0))

    def __len__(self) -> int:
        return self.A0.shape[0]

    def grow(self) -> None:
        for k in range(len(self.banks)):
            for name in (f"A{k}", f"B{k}", f"gain{k}"):
                old = getattr(self, name)
                setattr(self, name, torch.cat([old, old.new_zeros(1, *old.shape[1:])]))

    @torch.no_grad()
    def save(self, t: int) -> None:
        for k, bank in enumerate(self.banks.values()):
            e = bank.entries[0]
            getattr(self, f"A{k}")[t] = e.A
            getattr(self, f"B{k}")[t] = e.B
            getattr(self, f"gain{k}")[t] = e.gain

    @torch.no_grad()
    def load(self, t: int) -> None:
        for k, bank in enumerate(self.banks.values()):
            e = bank.entries[0]
            e.A.copy_(getattr(self, f"A{k}")[t])
            e.B.copy_(getattr(self, f"B{k}")[t])
            e.gain.copy_(getattr(self, f"gain{k}")[t])
