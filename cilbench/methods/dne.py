"""DNE: dense network expansion (Hu, Tang, Miller, Sinha, Lin, Vasconcelos; CVPR 2023), from scratch on a 6-block ViT.

Sources: the paper (``../shared/papers/dne.txt``) and the facts about the official code (BinahHu/DNE, built on
DyTox) checked in ``../shared/PROTOCOLS-2.md`` §4.1-4.2, "Disagreements" 9-11 and the DNE bullets of its Addendum.
The task attention block (TAB) is ``cilbench.models.dne.DenseMLP`` (tested against a hand loop there). Our own code.

Network (``DNEViT``, built here from the registered backbone's shape; the timm backbone itself is not used)
--------------------------------------------------------------------------------------------------------
* Task t's expert has ``H_t`` heads of ``head_dim`` (32): ``first_heads`` (12) on the first task, ``heads`` (1, 2 or
  4: DNE-1head / 2heads / 4heads) on every later one. The embedding is a list of per-task slices of width
  ``H_k * head_dim``; the width grows by ``32 * heads`` per task.
* Per task: its own patch embedding (Conv2d patch x patch -> its slice), positional embedding, LayerNorms (one per
  slice, normalising that slice only) and spatial attention (qkv / proj on its own slice: a task's heads attend only
  over their own task's features, the paper's "spatial attention within each task", the code's ``simple_proj``).
* Every block's MLP is the TAB (``DenseMLP``): a new task's heads read every task's heads (eqs. 16-23).
* ``depth`` blocks in all: ``depth - 1`` self-attention blocks, then one DyTox class-attention block (the official
  ``local_up_to_layer: 5`` + 1 "tab"): each task token (query) attends over itself and the patch tokens, per task
  slice as above, then the TAB MLP on the token. Task token j is stored in per-slice parts; the parts a new task t
  creates (token t on every slice, the old tokens on slice t) train with task t.
* Classifier: one head per task over its own token's whole embedding (DyTox ``ind_clf 1-1``): per-slice LayerNorm +
  linear, i.e. ``b_j + sum_i W_ji LN_ji(z_j[slice i])``. Old heads are widened with new columns (nn.Linear's default
  init, as the code) when the width grows, and stay frozen in the main phase (``freeze_task: old_heads``).
* Divergence head (|Y_t| + 1 outputs, every old class folded into output 0), on the new task token, tasks > 0.
* Old parts (every module / parameter part of tasks < t) are frozen (``requires_grad=False``) in ``before_task``
  (replayed on resume). Old experts read only old slices, so the old slices of every token, hence the previous
  model's outputs, cannot move while task t trains. Drop-path is applied to the trainable slice only (old slices
  behave as in eval mode).

Loss (official, ``bce_loss: true``; PROTOCOLS-2 Disagreement 9)
---------------------------------------------------------------
``loss = (1 - lam) * BCE(logits, one_hot) + lam * tau^2 * KL(teacher || student) + div_weight * BCE_div``, with
``lam = |old classes| / |seen classes|`` (0 on the first task), the KL between the softmaxes (temperature ``tau``
= 1) of the previous model's and the student's old-class logits, ``div_weight`` = 0.1 on the divergence head's
|Y_t|+1-way BCE (not scaled by lam, as the code). The record splits it into ``cls``, ``kd`` and ``div``.
The previous model ("teacher") is the current network restricted to the experts, token parts and head columns of
tasks < t. Those are frozen and untouched since task t-1 ended (its balanced finetuning included), so this is
exactly the network task t-1 left, as a ``Teacher`` snapshot would be, without a copy (and identical on resume).

Memory and balanced finetuning
------------------------------
``ExemplarMemory(total=memory_size)`` (2,000), iCaRL herding in the original update (``herding_form="icarl"``, as
DNE's ``rehearsal: icarl_all``) on the newest task token's embedding (test transform), joined to each task's data.
After each task from the second, once the memory is updated, ``ft_epochs`` (20) epochs on a class-balanced set of
the memory (``methods.balanced``) at ``ft_lr``, with the classification loss only (no teacher, no divergence), the
self-attention blocks and the patch / positional embeddings frozen (``freeze_ft: [sab]``). What trains: every
classifier head, the newest expert's part of the class-attention block and its task-token parts. The official
freeze would also let the old parts of the class-attention block and the old tokens train (DyTox's ``freeze``
unfreezes everything not named): UNVERIFIED, and left frozen here so old experts never change.

Defaults (official ``options/model/cifar_dne.yaml`` + ``main.py``)
---------------------------------------------------------------
AdamW, weight decay 1e-6, 500 epochs per task (first included), warmup 5 epochs, cosine per epoch to min lr 1e-5,
drop-path 0.1 (linearly increasing over the blocks, as timm / DyTox), batch **128** on one device; the lr is the
official 5e-4 scaled by batch / 512 (DyTox's rule), so ``lr`` = 1.25e-4 at batch 128 (the shipped 4 x 64 = 256 runs
had 2.5e-4: ``--set batch_size=256 lr=2.5e-4``). ``lr`` and ``ft_lr`` are the already-scaled values; change them
with the batch. Balanced finetuning: 20 epochs at 5e-5 x 128 / 512 = 1.25e-5, constant lr (the finetuning schedule
is UNVERIFIED). Warmup here is linear from 0 (the trainer's), the code's starts at 1e-6. Augmentation (presets
``cifar100`` / ``imagenet100``): the code's timm pipeline, ``dne-cifar`` (pad-4 crop + flip + RandAugment
``rand-m9-mstd0.5-inc1``) and ``dne-imagenet`` (bicubic random-resized crop + flip + the same RandAugment); the
code's ``--color-jitter 0.4`` never applies (timm skips it when RandAugment is on). Other datasets: the backbone's
protocol (``--set transform=dne-cifar`` for another 32-px dataset).

Where the paper and the code disagree (the project's rule: the paper's reading by default, the code's a setting)
------------------------------------------------------------------------------------------------------------
* ``lambda_mode="head"`` (paper eq. 23, one lambda per query head) | ``"module"`` (code: one per TA module).
* ``ta_norm=True`` (paper eqs. 19-22: a LayerNorm per input head in the TA) | ``False`` (code: none).
* ``second_qk="head"`` (paper: the second TA has q/k of head size D) | ``"hidden"`` (code: D' = 4D, 128x128).
* ``kd_reduction="batchmean"`` (the KL per sample, averaged over the batch: the paper's KL divergence) |
  ``"mean"`` (code: ``F.kl_div(reduction='mean')``, divided by batch x old classes).
* ``cls_loss="bce"`` (the official loss, as the issue asks; the paper writes "cross entropy", which the code
  implements as BCE on one-hot targets) | ``"ce"`` (softmax cross-entropy, also for the divergence head).
* Spatial attention: plain multi-head self-attention (the paper: a "6-layer Vision Transformer"); the code's ConViT
  gated positional self-attention is not reproduced.
* Old classifier heads, when widened: the code does not copy the old bias (it is re-drawn at random); we copy it.
  The heads' LayerNorm is split per slice here (the code's normalises the whole, grown embedding), so the network
  task t-1 left stays exactly computable (the "teacher" above).
* Weight decay (1e-6) applies to every trained parameter; timm's optimiser factory in the code skips biases,
  norms, positional embeddings and task tokens (negligible at 1e-6).
* Patch size: 4 at 32 px (CIFAR); ImageNet100 is ``--set patch_size=16`` (the paper; the stale official yaml says
  32, PROTOCOLS-2 Disagreement 10) with a 224-px backbone / ``img_size=224``.
* Not reproduced: the unused plain Linear the code's ``split_Linear.expand`` creates (parameter counts are smaller).

Inference: the argmax over every seen class of the concatenated task heads.

FLOPs (``torch.utils.flop_counter``, one 32-px image, 2 x multiply-adds, measured on this implementation): 1.23 G
for the first-task model; after 6 tasks (CIFAR B50, N_s = 10) 2.25 / 2.50 / 3.17 G with 1 / 2 / 4 heads per task at
the paper's defaults, 2.89 / 3.31 / 4.32 G with the code's TA settings (``lambda_mode=module ta_norm=false
second_qk=hidden``: 128-wide q/k in the second TA); the paper's F column has 2.68 / 3.10 / 4.02 G. After 11 tasks
(N_s = 5): 3.53 / 4.33 / 6.41 G (code settings 5.05 / 6.40 / 9.58; paper 5.71 / 7.39 / 10.75). How the paper counted
is UNVERIFIED (PROTOCOLS-2 §4.2).

``--quick`` (smoke profile, no reference): 2 blocks (1 self-attention + the class-attention block), 2 first-task
heads of 8, patch 8, 1 head per task, Adam lr 2e-3 constant, 16 epochs, memory 40, 3 finetuning epochs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from cilbench.data.memory import ExemplarMemory
from cilbench.errors import CilbenchError
from cilbench.methods.balanced import balanced_phase
from cilbench.methods.base import Method, TrainConfig, register_method
from cilbench.methods.contract import Batch, StepOutput
from cilbench.methods.der import aux_targets
from cilbench.models.dne import DenseMLP


@dataclass
class DyToxRecipe(TrainConfig):
    """The training recipe DNE shares with DyTox, whose code it is built on (official ``options/model/cifar_*.yaml``
    + ``main.py`` of both; PROTOCOLS-2 §4.2): AdamW, 500 epochs per task, lr 5e-4 x batch / 512 (``lr`` and ``ft_lr``
    are the scaled values), weight decay 1e-6, warmup 5 epochs then cosine to 1e-5, drop-path 0.1, BCE on one-hot
    targets, auto-weighted KD at tau 1, divergence head 0.1, 2,000 exemplars by iCaRL herding, 20 epochs of balanced
    finetuning. The shape fields left None come from the registered backbone. Both methods' Configs extend it."""

    epochs: int = 500
    batch_size: int = 128
    optimizer: str = "adamw"
    lr: float = 5e-4 * 128 / 512  # the official 5e-4 x batch / 512
    weight_decay: float = 1e-6
    schedule: str = "cosine"
    warmup_epochs: float = 5.0
    min_lr: float = 1e-5
    depth: int | None = None  # None: the backbone's (6 = 5 self-attention + 1 class-attention block)
    patch_size: int | None = None  # None: the backbone's (4 at 32 px; ImageNet100: 16, the paper)
    img_size: int | None = None  # None: the backbone's input size
    mlp_ratio: int = 4
    drop_path: float = 0.1
    cls_loss: str = "bce"  # bce (official) | ce
    kd_reduction: str = "batchmean"  # batchmean (the KL per sample) | mean (code)
    kd_tau: float = 1.0
    div_weight: float = 0.1
    memory_size: int = 2000
    herding_form: str = "icarl"  # icarl (the codes' icarl_all) | pycil
    ft_epochs: int = 20  # balanced finetuning after each task from the second (0: off)
    ft_lr: float = 5e-5 * 128 / 512

    LIMITS = {**TrainConfig.LIMITS, "depth": (2, None), "patch_size": (1, None), "img_size": (1, None),
              "mlp_ratio": (1, None), "drop_path": (0, 1), "kd_tau": (1e-6, None)}
    CHOICES = {**TrainConfig.CHOICES, "cls_loss": ("bce", "ce"), "kd_reduction": ("batchmean", "mean"),
               "herding_form": ("icarl", "pycil")}


# the smoke profile of both (no reference): Adam, few epochs, small memory, no drop-path, short finetuning
QUICK_DYTOX = dict(optimizer="adam", lr=2e-3, epochs=16, batch_size=32, schedule="constant", warmup_epochs=0.0,
                   min_lr=0.0, weight_decay=0.0, transform="quick", memory_size=40, drop_path=0.0, ft_epochs=3,
                   ft_lr=1e-3)


class DyToxLoss:
    """The loss DNE shares with DyTox's code (``bce_loss``, ``auto_kd``, ``head_div``; PROTOCOLS-2 §4.2), for a
    method with ``cfg`` (a ``DyToxRecipe``) and ``_task_classes`` (each task's classes, ascending, in task order):
    ``(1 - lam) * cls + lam * tau^2 KL(teacher || student) + div_weight * cls_div`` with ``lam`` = old / seen
    classes."""

    cfg: DyToxRecipe
    _task_classes: list[list[int]]

    def _class_pos(self, classes: torch.Tensor) -> torch.Tensor:
        """Columns of global class ids in the concatenated logits (task order, each task's classes ascending)."""
        order = torch.tensor([c for cs in self._task_classes for c in cs], device=classes.device)
        table = torch.full((int(order.max()) + 1,), -1, dtype=torch.long, device=classes.device)
        table[order] = torch.arange(len(order), device=classes.device)
        return table[classes]  # on the device, no host sync per step (-1 / out of range: not a seen class)

    def _cls(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.cfg.cls_loss == "ce":
            return F.cross_entropy(logits, targets)
        return F.binary_cross_entropy_with_logits(logits, F.one_hot(targets, logits.shape[1]).to(logits.dtype))

    def kd(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """``tau^2 KL(softmax(teacher / tau) || softmax(student / tau))``, per sample then the batch mean, or the
        code's mean over batch x classes (``kd_reduction="mean"``)."""
        tau = self.cfg.kd_tau
        kl = F.kl_div(F.log_softmax(student / tau, dim=1), F.log_softmax(teacher / tau, dim=1),
                      reduction="batchmean", log_target=True)
        if self.cfg.kd_reduction == "mean":  # torch's 'mean': over batch x classes
            kl = kl / student.shape[1]
        return kl * tau ** 2

    def losses(self, logits: torch.Tensor, labels: torch.Tensor, task_index: int, teacher: torch.Tensor | None = None,
               div_logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The terms on the logits of every seen class (task order): ``cls``; with a teacher (its old-class logits)
        ``(1 - lam) cls`` and ``lam kd``; with the divergence head's logits ``div`` (every old class folded into
        output 0, DER's auxiliary targets)."""
        cls = self._cls(logits, self._class_pos(labels))
        out = {"cls": cls}
        if teacher is not None:
            n_old = teacher.shape[1]
            lam = n_old / logits.shape[1]
            out = {"cls": (1 - lam) * cls, "kd": lam * self.kd(logits[:, :n_old], teacher.float())}
        if div_logits is not None:
            div_targets = aux_targets(labels, self._task_classes[task_index])
            out["div"] = self.cfg.div_weight * self._cls(div_logits.float(), div_targets)
        return out


def memory_finetune(method, ctx, trainable: list[nn.Parameter], frozen_params=(), frozen_modules=()) -> None:
    """DyTox's / DNE's balanced finetuning on the exemplar memory (``ft_epochs`` at ``ft_lr``, constant, no
    warmup; ``method._finetune_step``): only ``trainable`` learns, ``frozen_params`` are held, ``frozen_modules``
    stay in eval mode; every ``requires_grad`` flag is restored afterwards."""
    touched = (*frozen_params, *trainable)
    saved = {id(p): p.requires_grad for p in touched}
    for p in frozen_params:
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    try:
        ctx.fit(balanced_phase(
            "balanced", method._finetune_step, [dict(params=trainable)], method.memory.as_task_data(ctx.train),
            epochs=method.cfg.ft_epochs, lr=method.cfg.ft_lr, schedule="constant", warmup_epochs=0,
            frozen=tuple(frozen_modules)))
    finally:
        for p in touched:
            p.requires_grad_(saved[id(p)])


def _trunc(t: torch.Tensor) -> torch.Tensor:
    nn.init.trunc_normal_(t, std=0.02)
    return t


def _linear(i: int, o: int, bias: bool = True) -> nn.Linear:
    lin = nn.Linear(i, o, bias=bias)
    _trunc(lin.weight)
    if bias:
        nn.init.zeros_(lin.bias)
    return lin


def _frozen(module: nn.Module | nn.Parameter) -> bool:
    if isinstance(module, nn.Parameter):
        return not module.requires_grad
    return not any(p.requires_grad for p in module.parameters())


def _drop_path(x: torch.Tensor, rate: float, active: bool) -> torch.Tensor:
    if not active or rate <= 0:
        return x
    keep = 1 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep


def _dense(mlp: DenseMLP, x: torch.Tensor, n: int) -> torch.Tensor:
    """``DenseMLP.forward`` over its first ``n`` tasks only (``x``: those tasks' heads): the same operations."""
    s = x.unflatten(-1, (x.shape[-1] // mlp.head_dim, mlp.head_dim))
    hiddens, outs, start = [], [], 0
    for m in list(mlp.tasks)[:n]:
        end = start + m.new_heads
        with torch.set_grad_enabled(torch.is_grad_enabled() and not _frozen(m)):
            hiddens.append(m.hidden(s[..., :end, :]))
            outs.append(m.out(torch.cat(hiddens, dim=-2)))
        start = end
    return torch.cat(outs, dim=-2).flatten(-2)


class SliceAttention(nn.Module):
    """Multi-head attention of one task on its own slice: self-attention, or class attention (query: the first
    token only, DyTox's ``ClassAttention``)."""

    def __init__(self, width: int, heads: int, class_attn: bool):
        super().__init__()
        self.heads, self.head_dim, self.class_attn = heads, width // heads, class_attn
        self.scale = self.head_dim ** -0.5
        self.qkv = _linear(width, 3 * width)
        self.proj = _linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.class_attn:
            q = q[:, :, :1]
        attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(B, q.shape[2], C)
        return self.proj(out)


class SplitBlock(nn.Module):
    """A transformer block on per-task slices: per-slice LayerNorm and attention, the TAB MLP across slices."""

    def __init__(self, first_heads: int, head_dim: int, mlp_ratio: int, class_attn: bool, drop_path: float,
                 lambda_mode: str, ta_norm: bool, qk_dim2: int | None):
        super().__init__()
        self.head_dim, self.class_attn, self.drop_path = head_dim, class_attn, drop_path
        self.norm1, self.attn, self.norm2 = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        self.mlp = DenseMLP(first_heads, head_dim, mlp_ratio, lambda_mode=lambda_mode, norm=ta_norm,
                            qk_dim2=qk_dim2)
        self._add(first_heads)

    def _add(self, heads: int) -> None:
        w = heads * self.head_dim
        self.norm1.append(nn.LayerNorm(w))
        self.attn.append(SliceAttention(w, heads, self.class_attn))
        self.norm2.append(nn.LayerNorm(w))

    def expand(self, heads: int) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        ref = self.norm1[0].weight
        self._add(heads)
        for m in (self.norm1[-1], self.attn[-1], self.norm2[-1]):
            m.to(device=ref.device, dtype=ref.dtype)
        self.mlp.expand(heads)

    def forward(self, xs: list[torch.Tensor], ctx: list[torch.Tensor] | None = None,
                train_drop: bool = False) -> list[torch.Tensor]:
        """``xs``: one tensor per task slice (the first ``len(xs)`` tasks). Class attention: ``xs`` are the task
        token's slices ``[B, 1, w]`` and ``ctx`` the patch tokens' slices."""
        n = len(xs)
        ys = []
        for k, x in enumerate(xs):
            drop = train_drop and k == n - 1 and not _frozen(self.attn[k])
            inp = torch.cat([x, ctx[k]], dim=1) if self.class_attn else x
            ys.append(x + _drop_path(self.attn[k](self.norm1[k](inp)), self.drop_path, drop))
        h = torch.cat([self.norm2[k](y) for k, y in enumerate(ys)], dim=-1)
        m = _dense(self.mlp, h, n).split([y.shape[-1] for y in ys], dim=-1)
        out = []
        for k, (y, mk) in enumerate(zip(ys, m)):
            drop = train_drop and k == n - 1 and not _frozen(self.mlp.tasks[k])
            out.append(y + _drop_path(mk, self.drop_path, drop))
        return out


class SplitHead(nn.Module):
    """``b + sum_i W_i LN_i(z[slice i])``: a LayerNorm + linear classifier over the whole embedding whose LayerNorm
    and columns are split per task slice (old ones copied when it widens)."""

    def __init__(self, widths: list[int], classes: int):
        super().__init__()
        self.classes = classes
        self.norms = nn.ModuleList()
        self.weights = nn.ParameterList()
        self.bias = nn.Parameter(torch.zeros(classes))
        bound = 1 / math.sqrt(sum(widths))
        nn.init.uniform_(self.bias, -bound, bound)  # nn.Linear's default init
        for w in widths:
            self.widen(w, fan_in=sum(widths))

    def widen(self, width: int, fan_in: int | None = None) -> None:
        ref = self.bias
        fan_in = fan_in or sum(p.shape[1] for p in self.weights) + width
        bound = 1 / math.sqrt(fan_in)
        self.norms.append(nn.LayerNorm(width).to(device=ref.device, dtype=ref.dtype))
        self.weights.append(nn.Parameter(torch.empty(self.classes, width, device=ref.device,
                                                     dtype=ref.dtype).uniform_(-bound, bound)))

    def forward(self, zs: list[torch.Tensor]) -> torch.Tensor:
        out = self.bias
        for k, z in enumerate(zs):
            out = out + F.linear(self.norms[k](z), self.weights[k])
        return out


class DNEViT(nn.Module):
    """The DNE network: per-task patch / positional embeddings, ``depth - 1`` split self-attention blocks, one split
    class-attention block, per-slice task tokens. ``forward(images, n)`` runs the first ``n`` experts (default all)
    and returns the embeddings of task tokens ``0..n-1``, each a list of its ``n`` slices ``[B, w_k]``."""

    def __init__(self, img_size: int, patch_size: int, first_heads: int, head_dim: int, depth: int,
                 mlp_ratio: int = 4, drop_path: float = 0.1, lambda_mode: str = "head", ta_norm: bool = True,
                 qk_dim2: int | None = None):
        super().__init__()
        if depth < 2:
            raise CilbenchError("dne: depth must be at least 2 (self-attention blocks + the class-attention block)")
        if img_size % patch_size:
            raise CilbenchError(f"dne: img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.patch_size, self.head_dim = patch_size, head_dim
        self.num_patches = (img_size // patch_size) ** 2
        rates = torch.linspace(0, drop_path, depth).tolist()
        kw = dict(head_dim=head_dim, mlp_ratio=mlp_ratio, lambda_mode=lambda_mode, ta_norm=ta_norm, qk_dim2=qk_dim2)
        self.blocks = nn.ModuleList([SplitBlock(first_heads, class_attn=False, drop_path=r, **kw)
                                     for r in rates[:-1]])
        self.cab = SplitBlock(first_heads, class_attn=True, drop_path=rates[-1], **kw)
        self.patch = nn.ModuleList()
        self.pos = nn.ParameterList()
        self.tokens = nn.ParameterDict()  # "j_i": task token j's part on slice i
        self.widths: list[int] = []
        self._add_embedding(first_heads)
        self.tokens["0_0"] = nn.Parameter(_trunc(torch.zeros(1, 1, self.widths[0])))

    @property
    def num_tasks(self) -> int:
        return len(self.widths)

    def _add_embedding(self, heads: int) -> None:
        w = heads * self.head_dim
        conv = nn.Conv2d(3, w, self.patch_size, self.patch_size)
        pos = nn.Parameter(_trunc(torch.zeros(1, self.num_patches, w)))
        if self.widths:
            ref = self.pos[0]
            conv.to(device=ref.device, dtype=ref.dtype)
            pos = nn.Parameter(pos.data.to(device=ref.device, dtype=ref.dtype))
        self.patch.append(conv)
        self.pos.append(pos)
        self.widths.append(w)

    def expand(self, heads: int) -> None:
        """Freeze everything, then add a task expert of ``heads`` heads (structure only: replayed on resume)."""
        for p in self.parameters():
            p.requires_grad_(False)
        for b in self.blocks:
            b.expand(heads)
        self.cab.expand(heads)
        self._add_embedding(heads)
        t, ref = self.num_tasks - 1, self.pos[0]
        for j in range(t + 1):  # the old tokens' parts on the new slice, the new token's parts on every slice
            for i in range(t + 1):
                if f"{j}_{i}" not in self.tokens:
                    part = _trunc(torch.zeros(1, 1, self.widths[i], device=ref.device, dtype=ref.dtype))
                    self.tokens[f"{j}_{i}"] = nn.Parameter(part)

    def patches(self, images: torch.Tensor, n: int) -> list[torch.Tensor]:
        xs = []
        for k in range(n):
            xs.append(self.patch[k](images).flatten(2).transpose(1, 2) + self.pos[k])
        return xs

    def forward(self, images: torch.Tensor, n: int | None = None) -> list[list[torch.Tensor]]:
        n = self.num_tasks if n is None else n
        full = n == self.num_tasks  # the previous model (n < all) runs as in eval mode
        xs = self.patches(images, n)
        for blk in self.blocks:
            xs = blk(xs, train_drop=full and blk.training)
        B = images.shape[0]
        out = []
        for j in range(n):
            tok = [self.tokens[f"{j}_{i}"].expand(B, -1, -1) for i in range(n)]
            out.append([z[:, 0] for z in self.cab(tok, ctx=xs, train_drop=full and self.cab.training)])
        return out


def _shape_of(backbone) -> dict:
    """Patch size, depth, heads and head width of a registered timm ViT backbone (None where not a timm ViT)."""
    model = getattr(backbone, "model", None)
    try:
        patch = model.patch_embed.patch_size
        heads = model.blocks[0].attn.num_heads
        return dict(patch_size=int(patch[0] if isinstance(patch, (tuple, list)) else patch),
                    depth=len(model.blocks), first_heads=int(heads), head_dim=int(model.embed_dim // heads))
    except AttributeError:
        return {}


@register_method("dne", paper="Hu et al., CVPR 2023 (DNE)", family="cil-scratch", backbone="vit-scratch-cifar",
                 backbone_family="vit", summary="dense network expansion: a small ViT expert per task whose task "
                                                "attention block reads every old expert, task tokens and heads, "
                                                "divergence head, distillation, memory + balanced finetuning")
class DNE(DyToxLoss, Method):
    @dataclass
    class Config(DyToxRecipe):
        heads: int = 1  # new 32-wide heads per task after the first (DNE-1head / 2heads / 4heads)
        first_heads: int | None = None  # None: the backbone's (12)
        head_dim: int | None = None  # None: the backbone's (384 / 12 = 32)
        lambda_mode: str = "head"  # head (paper) | module (code)
        ta_norm: bool = True  # paper; False: the code
        second_qk: str = "head"  # head (paper: D) | hidden (code: D')

        LIMITS = {**DyToxRecipe.LIMITS, "heads": (1, None), "first_heads": (1, None), "head_dim": (1, None)}
        CHOICES = {**DyToxRecipe.CHOICES, "lambda_mode": ("head", "module"), "second_qk": ("head", "hidden")}

    # smoke profile (no reference): 2 blocks, 2 first-task heads of 8, Adam, few epochs, small memory
    quick = dict(QUICK_DYTOX, first_heads=2, head_dim=8, depth=2, patch_size=8)
    unused_settings = ("label_smoothing",)
    # the official augmentation (timm create_transform with RandAugment rand-m9-mstd0.5-inc1; timm skips the colour
    # jitter when RandAugment is on): data.augment's "dne-cifar" / "dne-imagenet"
    presets = {"cifar100": dict(transform="dne-cifar"), "imagenet100": dict(transform="dne-imagenet")}
    dataset_backbones = {"imagenet100": "vit-scratch-224"}  # patch 16 at 224 px on ImageNet100 (DNE §4)

    def __init__(self, cfg, backbone, scenario):
        super().__init__(cfg, backbone, scenario)
        shape = _shape_of(backbone)
        pick = {k: getattr(cfg, k) if getattr(cfg, k) is not None else shape.get(k)
                for k in ("first_heads", "head_dim", "depth", "patch_size")}
        missing = [k for k, v in pick.items() if v is None]
        if missing:
            raise CilbenchError(f"dne: backbone {getattr(backbone, 'spec', None) and backbone.spec.name} is not a "
                                f"timm ViT; set {', '.join(missing)} (--set key=value)")
        img_size = cfg.img_size or getattr(backbone, "input_size", 32)
        head_dim = pick["head_dim"]
        self.backbone = DNEViT(img_size, pick["patch_size"], pick["first_heads"], head_dim, pick["depth"],
                               cfg.mlp_ratio, cfg.drop_path, cfg.lambda_mode, cfg.ta_norm,
                               qk_dim2=head_dim if cfg.second_qk == "head" else None)
        self.heads = nn.ModuleList()
        self.div: SplitHead | None = None
        self.memory = ExemplarMemory(total=cfg.memory_size, herding_form=cfg.herding_form)
        self._task_classes: list[list[int]] = []

    @property
    def net(self) -> DNEViT:
        return self.backbone

    # ---- structure ----
    def before_task(self, task):
        if task.index > 0:
            self.net.expand(self.cfg.heads)
            for h in self.heads:  # old heads: widened (new columns at random), then frozen for the main phase
                h.widen(self.net.widths[-1])
                h.requires_grad_(False)
            self.div = SplitHead(self.net.widths, len(task.classes) + 1).to(self.net.pos[0].device)
        self.heads.append(SplitHead(self.net.widths, len(task.classes)).to(self.net.pos[0].device))
        self._task_classes.append(sorted(task.classes))

    # ---- forward ----
    def head_logits(self, tokens: list[list[torch.Tensor]], n: int | None = None) -> torch.Tensor:
        """Logits over the classes of tasks ``0..len(tokens)-1`` (task order = ascending global ids)."""
        return torch.cat([self.heads[j](tok) for j, tok in enumerate(tokens)], dim=1)

    def logits(self, images, classes):
        return self.head_logits(self.net(images))[:, self._class_pos(classes)]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.net(images)[-1], dim=-1).float()

    # ---- training ----
    def train_data(self, task, ctx):
        return self.memory.joined_with(ctx.train)

    def param_groups(self, task):
        return [dict(params=[p for p in self.parameters() if p.requires_grad])]

    def tab_losses(self, tokens, labels: torch.Tensor, task_index: int, teacher: torch.Tensor | None,
                   div_logits: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """``losses`` on the heads' logits of the task tokens."""
        return self.losses(self.head_logits(tokens).float(), labels, task_index, teacher, div_logits)

    def previous_logits(self, images: torch.Tensor, n: int) -> torch.Tensor:
        """The network task ``n - 1`` left: experts, token parts and head columns of tasks < n (all frozen)."""
        with torch.no_grad():
            tokens = self.net(images, n)
            return torch.cat([self.heads[j](tok) for j, tok in enumerate(tokens)], dim=1)

    def training_step(self, batch: Batch):
        t = batch.task.index
        tokens = self.net(batch.images)
        teacher = self.previous_logits(batch.images, t) if t > 0 else None
        div = self.div(tokens[-1]) if t > 0 and self.cfg.div_weight > 0 else None
        terms = self.tab_losses(tokens, batch.labels, t, teacher, div)
        return StepOutput(sum(terms.values()), terms)

    def _finetune_step(self, batch: Batch):
        terms = self.tab_losses(self.net(batch.images), batch.labels, batch.task.index, None, None)
        return StepOutput(terms["cls"], terms)

    def after_task(self, task, ctx):
        feats, _ = ctx.features(self.embed)  # herding on the newest task token's embedding, test transform
        self.memory.update_from(ctx.train, feats, classes=ctx.new.tolist())
        ctx.log(memory=len(self.memory), per_class=self.memory.quota(len(ctx.seen)), widths=list(self.net.widths),
                parameters=sum(p.numel() for p in self.parameters()))
        if task.index == 0 or self.cfg.ft_epochs <= 0 or len(self.memory) == 0:
            return
        net, t = self.net, self.net.num_tasks - 1
        params = list(self.heads.parameters())
        params += [p for m in (net.cab.norm1[t], net.cab.attn[t], net.cab.norm2[t], net.cab.mlp.tasks[t])
                   for p in m.parameters()]
        params += [p for key, p in net.tokens.items() if str(t) in key.split("_")]
        memory_finetune(self, ctx, params, frozen_modules=(net.patch, net.blocks))
