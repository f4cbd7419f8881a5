"""DyTox: transformers for continual learning with dynamic token expansion (Douillard, Ramé, Couairon, Cord; CVPR
2022), from scratch on a 6-block ViT, as the DNE paper's "Dytox" row (Tables 1 / 2) and, run with ``--joint``, its
"Joint (Transf.)" upper bound (one task token and one head over every class).

Sources: the official code arthurdouillard/dytox at 4da25c1 (``continual/dytox.py``, ``continual/convit.py``,
``continual/engine.py``, ``continual/losses.py``, ``continual/rehearsal.py``, ``continual/factory.py``, ``main.py``,
``options/model/cifar_dytox.yaml``, ``options/model/imagenet_dytox.yaml``, ``options/data/cifar100_*.yaml``,
``erratum_distributed.md``) and ``../shared/PROTOCOLS-2.md`` §4 (DNE is built on DyTox's code; the settings DNE shares
with it were checked there). Of the paper (arXiv 2111.11326) only the abstract and the caption of its figure 2 were
available here (ar5iv and a review page): "5 successive Self-Attention Blocks", one Task-Attention Block run once per
task token, independent classifiers, "All |C1:T| logits are activated with a sigmoid". Everything else below is the
code's; where a setting is said to follow "the paper" without a quote, that reading is UNVERIFIED. Our own code; the
building blocks ``SliceAttention``, ``_drop_path``, ``_linear``, ``_trunc`` and ``_shape_of`` are DNE's
(``cilbench.methods.dne``).

Network (``DyToxNet``, built here from the registered backbone's shape; the timm model itself is not used)
---------------------------------------------------------------------------------------------------------
Own modules of the backbone's width, heads, depth and patch size (``_shape_of``, as DNE) rather than the timm
ViT's: that model's positional embedding has a class-token slot, its attention has q / k / v biases, it has a final
LayerNorm and a head, and its last block would sit unused beside a new task-attention block; none of that is DyTox.

* Encoder, shared by every task: a patch embedding (Conv2d patch x patch, PyTorch's default init as the code's
  ``PatchEmbed``), a learned positional embedding (no class token, trunc-normal 0.02) and ``depth - 1`` (5)
  self-attention blocks ("SAB": pre-norm, multi-head self-attention, MLP ratio 4, GELU). The official blocks are
  ConViT gated positional self-attention (``model: convit``, ``local_up_to_layer: 5``; its README: "I've used ConVit
  blocks because they trained well from scratch"); here they are plain multi-head self-attention, as in our DNE and
  in the paper's figure 2 ("Self-Attention Blocks").
* Decoder, shared by every task: one task-attention block ("TAB", the code's ``ClassAttention`` block): the task
  token is the only query; keys and values come from ``[task token, patch tokens]`` (one LayerNorm over all of
  them, ``norm1``); the attention output is added to the token, then a LayerNorm + MLP on the token alone. Its
  output, the task embedding ``e_j`` (no final LayerNorm: the code's ``forward_features`` never applies the ConViT
  ``norm``), is what the task's head reads.
* One learned task token per task (width ``embed_dim``, trunc-normal 0.02; the code deep-copies the last token and
  re-draws it, i.e. a fresh draw). The decoder runs once per task token (``for task_token in self.task_tokens``), so
  the FLOPs grow by one TAB pass (+ one head) per task and the parameters by one token + one head.
* Independent classifiers (``ind_clf: 1-1``): head j is LayerNorm + Linear(embed_dim -> |Y_j|) on e_j alone
  (``ContinualClassifier``: nn.Linear's default init). The logits are the concatenation of every head's, over
  every seen class; inference is their argmax (all logits go through a sigmoid in training, figure 2).
* Divergence head (``head_div: 0.1``, ``head_div_mode: tr``): LayerNorm + Linear(embed_dim -> |Y_t| + 1) on the
  newest embedding e_t, created afresh for every task after the first, every old class folded into output 0; used
  in the main phase only (not in finetuning, not at test time).
* Attention: q / k / v without bias (ConViT's ``qkv_bias=False``; ``qkv_bias`` setting), projection with bias;
  weights trunc-normal 0.02, biases 0 (the code's ``_init_weights``); drop-path 0.1 rising linearly over the 6
  blocks (``torch.linspace(0, drop_path, depth)``: 0.1 on the TAB), dropout 0.

Training (per task t; the runner's hooks)
-----------------------------------------
* ``before_task`` (structure, replayed on resume): from the second task, a new task token, a new head and a fresh
  divergence head; then ``freeze_task: [old_task_tokens, old_heads]``: the old tokens and old heads are frozen,
  everything else trains, the shared encoder and decoder included (DyTox's ``freeze`` unfreezes all, then freezes
  what is named).
* ``before_fit``: the teacher is a frozen copy of the model task t-1 left (``Teacher.snapshot``; the code deep-copies
  the model before ``add_model``). It scores the old classes with the old tokens and heads.
* Loss (``bce_loss: true``, ``auto_kd: true``; ``engine.forward``):
  ``(1 - lam) * BCE(logits, one_hot) + lam * tau^2 * KL(teacher || student) + div_weight * BCE_div`` with
  ``lam = |old classes| / |seen classes|`` (0 on the first task: BCE alone), the KL between the softmaxes
  (temperature ``tau`` = 1) of the teacher's and the student's old-class logits, and ``div_weight`` = 0.1 on the
  divergence head's |Y_t|+1-way BCE (not scaled by lam). The record splits it into ``cls``, ``kd`` and ``div``.
* Memory (``memory_size`` 2,000, ``fixed_memory`` False: 2000 // seen classes per class, old classes cut to their
  first exemplars; ``rehearsal: icarl_all``): iCaRL herding in the original update (``herding_form="icarl"``, the
  code's ``icarl_selection``) on the concatenation of every task embedding (``icarl_all``: ``ensemble_handling=
  'all'``), on the task's own images; the memory is joined to each task's training data.
* Balanced finetuning (``finetuning: balanced``, ``finetuning_epochs: 20``, ``freeze_ft: [sab]``): after each task
  from the second, once the memory is updated, ``ft_epochs`` (20) epochs on the memory itself at ``ft_lr``
  (5e-5 x batch / 512), constant (the code builds a new optimiser and steps no scheduler in this loop), BCE alone
  (no teacher, no divergence head: ``head_div_mode: tr``), the patch / positional embeddings and the SABs frozen;
  the TAB, every task token and every head train. The code also finetunes a run whose first task holds every class
  (``task_id > 0 or nb_classes == initial_increment``), i.e. a joint run: ``joint_ft`` (default True, the code).
* Optimiser (``main.py`` defaults + yaml): AdamW, weight decay 1e-6, 500 epochs per task (``--epochs`` and
  ``--base-epochs``), warmup 5 epochs, cosine per epoch to min lr 1e-5, batch 128, lr 5e-4 x batch / 512 (the
  code's linear scaling rule, ``lr`` and ``incremental_lr`` both 5e-4): ``lr`` = 1.25e-4 at batch 128 on one device.
  ``lr`` and ``ft_lr`` are the already-scaled values; change them with the batch. The published CIFAR runs used 2
  GPUs x 128 (README / erratum), i.e. an effective batch 256 and lr 2.5e-4: ``--set batch_size=256 lr=2.5e-4
  ft_lr=2.5e-5``. Warmup here is linear from 0 (the trainer's), the code's from 1e-6.
* Augmentation (presets ``cifar100`` / ``imagenet100``): the code's timm pipeline, ``dne-cifar`` (pad-4 crop +
  flip + RandAugment ``rand-m9-mstd0.5-inc1``) and ``dne-imagenet``; the code's colour jitter 0.4 never applies
  (timm skips it when RandAugment is on). Mixup / CutMix / erasing are off in the yaml. Other datasets: the
  backbone's protocol.

Where the paper and the code disagree, or the code does what a baseline should not (the paper's reading or the
usual protocol by default, the code's as a setting)
----------------------------------------------------------------------------------------------------------------
* ``kd_reduction="batchmean"`` (the KL divergence per sample, averaged over the batch: the mathematical KL the method
  names, and our DNE's default for the same DyTox-derived loss; the paper's exact formula is UNVERIFIED) |
  ``"mean"`` (code: ``F.kl_div(reduction='mean')``, divided by batch x old classes, i.e. ``batchmean`` / |old classes|).
* ``cls_loss="bce"`` (the code, ``bce_loss: true``, and figure 2: "All logits are activated with a sigmoid") |
  ``"ce"`` (softmax cross-entropy, also for the divergence head).
* Herding features: the code extracts them in train mode (drop-path on) with the training augmentation
  (``rehearsal_test_trsf`` False), and each GPU draws its own memory (``erratum_distributed.md``: "Distributed
  Memory", up to N x the budget); here: eval mode, test transform, one global memory of 2,000 (the erratum's
  "Global Memory", as the other baselines).
* Finetuning: the code's loader does not shuffle the memory (``ft_no_sampling``: no sampler) and leaves the frozen
  SABs in train mode (drop-path on; ``train_one_epoch`` calls ``model.train()`` after ``freeze``); here the
  trainer shuffles and the frozen encoder is in eval mode.
* Weight decay (1e-6) applies to every trained parameter; timm's optimiser factory in the code skips biases and
  LayerNorm weights (negligible at 1e-6).
* Spatial attention: plain multi-head self-attention (above); the ConViT GPSA (its positional gating and
  ``pos_proj``) is not reproduced, so parameter counts and FLOPs are slightly smaller than the code's.

UNVERIFIED: how the DNE authors ran DyTox for their Tables 1 / 2 (B50 splits, which DyTox's own repository has no
yaml for: ``cifar100_10-10``, ``5-5``, ``2-2``, ``joint`` only); their supplementary, with the baselines' settings,
is not available. The "Joint (Transf.)" row is read as DyTox trained on every class as one task (its F equals
Dytox's 1.38G).

Patch size: 4 at 32 px (CIFAR; ``options/model/cifar_dytox.yaml``); on ImageNet100 the backbone is
``vit-scratch-224`` (``dataset_backbones``: patch 16 at 224 px, as ``options/model/imagenet_dytox.yaml``, whose
training settings are the CIFAR file's, mixed precision aside).

FLOPs (``torch.utils.flop_counter``, one 32-px image, 2 x multiply-adds, measured on this implementation at the full
size, ``vit-scratch-cifar``): 1.208 G for the first-task model (also the joint model, 100 classes), +0.0414 G per
task (one TAB pass of one token over 65 keys, and a head), 1.415 G after 6 tasks (CIFAR B50Inc10; the paper's F:
1.38G) and 1.622 G after 11 tasks (B50Inc5; the paper prints 1.38G there too, and for Joint (Transf.)).
Parameters: 10.70 M (the divergence head aside), + 5,002 per task of 10 classes (a 384-wide token, the head's
LayerNorm and 384 x 10 + 10 Linear). How the paper counted is UNVERIFIED (PROTOCOLS-2 §4.2).

``--quick`` (smoke profile, no reference): the tiny backbone's shape (2 blocks: 1 SAB + the TAB, width 48, 3 heads,
patch 8), Adam lr 2e-3 constant, 16 epochs, no drop-path, memory 40, 3 finetuning epochs at 1e-3.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from cilbench.data.memory import ExemplarMemory
from cilbench.errors import CilbenchError
from cilbench.methods.base import Method, register_method
from cilbench.methods.contract import StepOutput
from cilbench.methods.dne import (QUICK_DYTOX, DyToxLoss, DyToxRecipe, SliceAttention, _drop_path, _linear,
                                  _shape_of, _trunc, memory_finetune)
from cilbench.models.teacher import Teacher


class TaskAttention(nn.Module):
    """Class attention of the TAB: the first token (the task token) is the only query; keys and values come from
    every token (the task token and the patch tokens). ``forward(x)``: ``x`` [B, 1 + N, C] -> [B, 1, C]."""

    def __init__(self, width: int, heads: int, qkv_bias: bool = False):
        super().__init__()
        if width % heads:
            raise CilbenchError(f"dytox: width {width} is not a multiple of {heads} heads")
        self.heads, self.head_dim = heads, width // heads
        self.scale = self.head_dim ** -0.5
        self.q = _linear(width, width, bias=qkv_bias)
        self.kv = _linear(width, 2 * width, bias=qkv_bias)
        self.proj = _linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q = self.q(x[:, :1]).reshape(B, 1, self.heads, self.head_dim).transpose(1, 2)       # [B, h, 1, d]
        k, v = self.kv(x).reshape(B, N, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [B, h, N, d] each
        attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, 1, C))


class Block(nn.Module):
    """A pre-norm transformer block. Self-attention (SAB): ``x`` [B, N, C] -> [B, N, C]. Task attention (TAB):
    ``x`` the patch tokens [B, N, C], ``token`` a task token [1, 1, C] -> that token's output [B, 1, C]; LayerNorm 1
    is over ``[token, patches]``, the residuals and the MLP on the token only (the code's ``Block`` with
    ``ClassAttention``). The token is a keyword argument and expanded here: torch's FLOP counter cannot take a view
    of a trainable leaf as a module's positional input under ``no_grad``."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, drop_path: float, task_attn: bool, qkv_bias: bool):
        super().__init__()
        self.task_attn, self.drop_path = task_attn, drop_path
        self.norm1 = nn.LayerNorm(width)
        if task_attn:
            self.attn: nn.Module = TaskAttention(width, heads, qkv_bias)
        else:
            self.attn = SliceAttention(width, heads, class_attn=False)
            self.attn.qkv = _linear(width, 3 * width, bias=qkv_bias)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(_linear(width, width * mlp_ratio), nn.GELU(), _linear(width * mlp_ratio, width))

    def forward(self, x: torch.Tensor, token: torch.Tensor | None = None) -> torch.Tensor:
        inp = x
        if self.task_attn:
            x = token.expand(x.shape[0], -1, -1)
            inp = torch.cat([x, inp], dim=1)
        x = x + _drop_path(self.attn(self.norm1(inp)), self.drop_path, self.training)
        return x + _drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


def _head(width: int, classes: int) -> nn.Sequential:
    """LayerNorm + Linear (nn.Linear's default init, as the code's ``ContinualClassifier``)."""
    return nn.Sequential(nn.LayerNorm(width), nn.Linear(width, classes))


class DyToxNet(nn.Module):
    """Shared encoder (patch / positional embedding + ``depth - 1`` SABs) and decoder (one TAB), one task token and
    one head per task. ``forward(images, n)`` returns the embeddings of task tokens ``0..n-1`` (default all), each
    [B, width]; ``classify`` turns them into the concatenated logits of their heads."""

    def __init__(self, img_size: int, patch_size: int, width: int, heads: int, depth: int, mlp_ratio: int = 4,
                 drop_path: float = 0.1, qkv_bias: bool = False):
        super().__init__()
        if depth < 2:
            raise CilbenchError("dytox: depth must be at least 2 (self-attention blocks + the task-attention block)")
        if img_size % patch_size:
            raise CilbenchError(f"dytox: img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.width, self.patch_size = width, patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.patch = nn.Conv2d(3, width, patch_size, patch_size)
        self.pos = nn.Parameter(_trunc(torch.zeros(1, self.num_patches, width)))
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.sabs = nn.ModuleList([Block(width, heads, mlp_ratio, r, False, qkv_bias) for r in rates[:-1]])
        self.tab = Block(width, heads, mlp_ratio, rates[-1], True, qkv_bias)
        self.tokens = nn.ParameterList()
        self.heads = nn.ModuleList()

    @property
    def num_tasks(self) -> int:
        return len(self.tokens)

    def add_task(self, classes: int) -> None:
        """A new task token and head (structure only: replayed on resume)."""
        ref = self.pos
        self.tokens.append(nn.Parameter(_trunc(torch.zeros(1, 1, self.width, device=ref.device, dtype=ref.dtype))))
        self.heads.append(_head(self.width, classes).to(device=ref.device, dtype=ref.dtype))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """The patch tokens after the SABs, [B, N, width]: computed once, whatever the number of tasks."""
        x = self.patch(images).flatten(2).transpose(1, 2) + self.pos
        for blk in self.sabs:
            x = blk(x)
        return x

    def decode(self, x: torch.Tensor, n: int | None = None) -> list[torch.Tensor]:
        """One TAB pass per task token ``0..n-1`` over the patch tokens ``x``."""
        n = self.num_tasks if n is None else n
        return [self.tab(x, token=self.tokens[j])[:, 0] for j in range(n)]

    def forward(self, images: torch.Tensor, n: int | None = None) -> list[torch.Tensor]:
        return self.decode(self.encode(images), n)

    def classify(self, embeddings: list[torch.Tensor]) -> torch.Tensor:
        """Head j on embedding j, concatenated (task order)."""
        return torch.cat([self.heads[j](e) for j, e in enumerate(embeddings)], dim=1)


@register_method("dytox", paper="Douillard et al., CVPR 2022 (DyTox)", family="cil-scratch",
                 backbone="vit-scratch-cifar", backbone_family="vit",
                 summary="shared ViT encoder and task-attention decoder, one task token and head per task, "
                         "divergence head, auto-weighted distillation, memory + balanced finetuning")
class DyTox(DyToxLoss, Method):
    @dataclass
    class Config(DyToxRecipe):
        embed_dim: int | None = None  # None: the backbone's (384)
        num_heads: int | None = None  # None: the backbone's (12)
        qkv_bias: bool = False  # ConViT's default in the code
        joint_ft: bool = True  # also finetune a one-task (joint) run, as main.py does

        LIMITS = {**DyToxRecipe.LIMITS, "embed_dim": (1, None), "num_heads": (1, None)}

    # smoke profile (no reference): the tiny backbone's shape, Adam, few epochs, small memory
    quick = dict(QUICK_DYTOX)
    unused_settings = ("label_smoothing",)
    # the official augmentation (timm create_transform with RandAugment rand-m9-mstd0.5-inc1; timm skips the colour
    # jitter when RandAugment is on): data.augment's "dne-cifar" / "dne-imagenet"
    presets = {"cifar100": dict(transform="dne-cifar"), "imagenet100": dict(transform="dne-imagenet")}
    dataset_backbones = {"imagenet100": "vit-scratch-224"}  # patch 16 at 224 px (imagenet_dytox.yaml)

    def __init__(self, cfg, backbone, scenario):
        super().__init__(cfg, backbone, scenario)
        shape = _shape_of(backbone)
        if shape:
            shape = dict(shape, embed_dim=shape["first_heads"] * shape["head_dim"], num_heads=shape["first_heads"])
        pick = {k: getattr(cfg, k) if getattr(cfg, k) is not None else shape.get(k)
                for k in ("embed_dim", "num_heads", "depth", "patch_size")}
        missing = [k for k, v in pick.items() if v is None]
        if missing:
            raise CilbenchError(f"dytox: backbone {getattr(backbone, 'spec', None) and backbone.spec.name} is not a "
                                f"timm ViT; set {', '.join(missing)} (--set key=value)")
        if pick["embed_dim"] % pick["num_heads"]:
            raise CilbenchError(f"dytox: embed_dim {pick['embed_dim']} is not a multiple of num_heads "
                                f"{pick['num_heads']}")
        img_size = cfg.img_size or getattr(backbone, "input_size", 32)
        self.backbone = DyToxNet(img_size, pick["patch_size"], pick["embed_dim"], pick["num_heads"], pick["depth"],
                                 cfg.mlp_ratio, cfg.drop_path, cfg.qkv_bias)
        self.div: nn.Module | None = None
        self.memory = ExemplarMemory(total=cfg.memory_size, herding_form=cfg.herding_form)
        self.teacher: Teacher | None = None
        self._task_classes: list[list[int]] = []

    @property
    def net(self) -> DyToxNet:
        return self.backbone

    # ---- structure ----
    def before_task(self, task):
        net = self.net
        net.add_task(len(task.classes))
        self._task_classes.append(sorted(task.classes))
        net.requires_grad_(True)  # freeze_task: [old_task_tokens, old_heads]; everything else trains
        for j in range(net.num_tasks - 1):
            net.tokens[j].requires_grad_(False)
            net.heads[j].requires_grad_(False)
        if task.index > 0 and self.cfg.div_weight > 0:
            self.div = _head(net.width, len(task.classes) + 1).to(device=net.pos.device, dtype=net.pos.dtype)

    def before_fit(self, task, ctx):
        # the model task t-1 left (a resumed run has just loaded it): not replayed on resume
        self.teacher = Teacher.snapshot(self.net) if task.index > 0 else None

    # ---- forward ----
    def logits(self, images, classes):
        return self.net.classify(self.net(images))[:, self._class_pos(classes)]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Every task embedding, concatenated (``rehearsal: icarl_all``)."""
        return torch.cat(self.net(images), dim=1).float()

    # ---- training ----
    def train_data(self, task, ctx):
        return self.memory.joined_with(ctx.train)

    def param_groups(self, task):
        return [dict(params=[p for p in self.parameters() if p.requires_grad])]

    def training_step(self, batch):
        t = batch.task.index
        embeddings = self.net(batch.images)
        logits = self.net.classify(embeddings).float()
        teacher = None
        if t > 0 and self.teacher:
            teacher = self.teacher.run(lambda m: m.classify(m(batch.images, t)), batch.images)
        div = self.div(embeddings[-1]) if t > 0 and self.div is not None else None
        terms = self.losses(logits, batch.labels, t, teacher, div)
        return StepOutput(sum(terms.values()), terms)

    def _finetune_step(self, batch):
        logits = self.net.classify(self.net(batch.images)).float()
        terms = self.losses(logits, batch.labels, batch.task.index)
        return StepOutput(terms["cls"], terms)

    def after_task(self, task, ctx):
        self.teacher = None
        feats, _ = ctx.features(self.embed)  # herding on every task embedding, test transform
        self.memory.update_from(ctx.train, feats, classes=ctx.new.tolist())
        ctx.log(memory=len(self.memory), per_class=self.memory.quota(len(ctx.seen)), tokens=self.net.num_tasks,
                parameters=sum(p.numel() for p in self.net.parameters()))
        joint = task.index == 0 and len(self.scenario.tasks) == 1 and self.cfg.joint_ft
        if (task.index == 0 and not joint) or self.cfg.ft_epochs <= 0 or len(self.memory) == 0:
            return
        net = self.net
        encoder = [net.patch, *net.sabs]  # freeze_ft: [sab] (patch + positional embeddings and the SABs)
        frozen = [*net.patch.parameters(), net.pos, *net.sabs.parameters()]
        params = [*net.tab.parameters(), *net.tokens.parameters(), *net.heads.parameters()]
        memory_finetune(self, ctx, params, frozen, encoder)
