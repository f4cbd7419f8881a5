"""InfLoRA: Interference-Free Low-Rank Adaptation for Continual Learning (Liang & Li, CVPR 2024), a baseline of the
HAM comparison (the LoRA family: ``methods/ham.py``, ``methods/lora_cl.py``).

Sources: the official code ``liangyanshuo/InfLoRA`` at commit e08b00e (``methods/inflora.py``,
``models/vit_inflora.py`` ``Attention_LoRA``, ``models/sinet_inflora.py``, ``configs/*_inflora.json``,
``utils/schedulers.py``) for every number and detail below; the paper's full text could not be read here (only its
abstract and summaries: arXiv 2404.00228), so a detail attributed to "the paper" beyond the method's outline (one
low-rank branch per task, a frozen dimensionality-reduction matrix designed from the current task's input
representations projected off the old tasks' gradient subspace kept by DualGPM, the other factor trained) is
UNVERIFIED against the paper. Naming: the paper writes the branch ``B_t A_t`` with ``B_t`` the designed
reduction matrix and ``A_t`` trained; the code, LoRA and cilbench (``models/peft.py``) write ``B A`` with ``A``
[r, d_in] the reduction and ``B`` [d_out, r] trained. Below, ``A`` is the designed (paper's ``B_t``) and ``B`` the
trained factor (paper's ``A_t``). Our own code, reading like the paper.

1. The model: a frozen pre-trained ViT-B/16 (IN21k). Each adapted weight ``W`` (``targets``) gets, per task ``t``,
   ``W + B_t A_t`` with ``A_t`` [r, d_in] and ``B_t`` [d_out, r]; no ``alpha / r`` scaling (code: ``lora_B @
   lora_A``, summed over tasks ``0..t``). Where: the key and value projections of every block's attention (code:
   ``lora_A_k / lora_B_k / lora_A_v / lora_B_v``, added to ``k`` and ``v``; ``q`` is not adapted). Here: LoRA on the
   timm ``qkv`` linear (``targets=("qkv",)``) whose query rows of ``B`` are reset to 0 after every step (Adam is
   elementwise and there is no clipping, so the k / v rows train as if q had no gradient: ``qkv_rows="kv"``;
   ``"qkv"`` adapts the query too). One ``A`` serves ``k`` and ``v`` (code: both get the same designed matrix), so
   ``B_k A`` and ``B_v A`` are the two row blocks of one ``B A``. Other targets (``proj``, ``fc1``, ``fc2``) are
   accepted; each adapted linear then has its own input representations and DualGPM basis.
2. Rank: ``lora_rank=10`` (code: ``configs/cifar100_inflora.json`` and the ImageNet-R configs ``rank: 10``;
   DomainNet ``rank: 30``). ``lora_alpha`` is not read (no scaling: ``unused_settings``).
3. Design of ``A_t`` (paper: the "dimensionality reduction" matrix, before task ``t`` trains): the input
   representations of the current task at each adapted layer (the layer's input tokens, i.e. the block's ``norm1``
   output, every token of every training image) under the model as it stands (old tasks' adapters included), as the
   uncentred covariance ``C = R R^T / n`` (code: ``cur_matrix``, a running mean of ``x^T x`` over tokens). They are
   projected away from the old tasks' gradient subspace ``M`` (DualGPM basis, item 5): ``C_hat = (I - M M^T) C``,
   and ``A_t`` = the top-``r`` left singular vectors of ``C_hat``, as rows, times ``a_scale`` (code:
   ``U[:, :r].T / sqrt(3)``; the paper gives no scale: ``a_scale = 1/sqrt(3)``, the code's, which is also the row
   norm of LoRA's kaiming-uniform init, ours). Then every row of ``A_t`` is orthogonal to ``M``: for an old task's
   input ``x`` in ``span(M)``, ``B_t A_t x = 0`` whatever ``B_t`` learns (interference-free).
   The representations are taken on the training images with the test transform (``rep_augment=False``, ours; the
   code runs its training loader, i.e. with augmentation: ``rep_augment=True``).
4. Training: ``A_t`` frozen, ``B_t`` (zero at the start) and the task's classifier rows trained (code:
   ``requires_grad`` only on ``lora_B_k.t``, ``lora_B_v.t`` and ``classifier_pool.t``). Loss: cross-entropy over the
   current task's classes (code masks the batch to the new classes and uses that task's head only:
   ``loss_scope="task"``). Optimiser Adam (betas 0.9, 0.999), lr 5e-4, weight decay 0, batch 128, 20 epochs
   (CIFAR-100), the code's ``CosineSchedule`` stepped per epoch (``quarter-cosine``: ``lr x cos(99 pi e / (200
   (E-1)))``). ImageNet-R configs: 50 epochs, ``lamb`` 0.98 (preset ``imagenet-r``); DomainNet: lr 5e-3, 5 epochs,
   rank 30 (no cilbench dataset; ``--set``).
5. After the task: ``B_t A_t`` is merged into one accumulated delta per layer (code keeps every task's factors and
   sums them at each forward: the same function, but memory and compute grow with the task count; here they do
   not), ``B`` returns to 0. Then the current task's representations are taken again, under the merged model (code:
   after training, ``task = t``: every adapter summed), and DualGPM (Liang & Li 2023; GPM, Saha et al. 2021) adds to
   ``M`` the fewest new directions of the projected representations that bring the share of their energy captured
   by ``M`` to at least ``epsilon_t``: ``epsilon_t = lamb + (lame - lamb) t / T`` (code: ``update_DualGPM``,
   ``lamb`` 0.95 (CIFAR-100) / 0.98 (ImageNet-R), ``lame`` 1.0, ``t`` the 0-based index of the task just learnt,
   ``T`` the task count). ``M`` is kept as a padded [d_in, d_in] buffer (unused columns 0, so ``M M^T`` is the
   projector whatever the rank) and its rank; the code stores the complement instead once the basis passes half
   the width ("retain" / "remove", DualGPM's memory trick): the same subspace, not reproduced.
   ``gpm_energy="paper"``: energies are the squared singular values of the representation matrix ``R`` (the
   eigenvalues of ``C`` up to ``1/n``; the criterion ``||R_k||_F^2 >= eps ||R||_F^2`` of the GPM and DualGPM
   papers, which InfLoRA cites for its memory), the new directions are eigenvectors of
   ``(I - P) C (I - P)``, and after the first task the basis is the smallest one reaching ``epsilon``.
   ``gpm_energy="code"``: the code's arithmetic, SVD of the covariance ``C`` itself (energies = squared singular
   values of ``C``, i.e. ``sigma^4``), new directions from the SVD of ``(I - P) C``, and after the first task
   ``max(1, #{k: cumulative share < epsilon})`` directions (one fewer than the paper's rule). Directions with no
   energy are never added (a numerical guard, ours).
6. Classifier: one linear head per task (code: ``classifier_pool``, ``nn.Linear`` with bias), at test time every
   seen task's head on the features under all adapters, logits concatenated (``SiNet.interface``): a growing
   linear head over the seen classes, task-agnostic. The code also fits 5 k-means keys per task
   (``clustering``) that its InfLoRA evaluation never reads; not reproduced. ``classifier="prototype"`` as HAM's.

``--recipe official-code`` sets the code's two departures (``gpm_energy=code``, ``rep_augment=true``).
The paper's numbers (ViT-B/16 IN21k, CIFAR-100 10 tasks, ImageNet-R 5/10/20 tasks, DomainNet) are not checked here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cilbench.errors import CilbenchError
from cilbench.methods.base import Method, register_method
from cilbench.methods.ham import QUICK_LORA, LoRAConfig, PrototypeOption, check_targets
from cilbench.models.heads import GrowingLinear
from cilbench.models.peft import LoRABank, insert

ENERGIES = ("paper", "code")
QKV_ROWS = ("kv", "qkv")


def threshold(lamb: float, lame: float, task_index: int, num_tasks: int) -> float:
    """DualGPM's energy threshold after task ``task_index`` (0-based) of ``num_tasks`` (code: ``update_DualGPM``)."""
    return (lame - lamb) * task_index / num_tasks + lamb


def design_A(cov: torch.Tensor, basis: torch.Tensor, rank: int, scale: float) -> torch.Tensor:
    """``A`` [rank, d]: the top-``rank`` left singular vectors of ``(I - M M^T) C`` as rows, times ``scale``
    (``basis`` = M, [d, k], zero columns allowed)."""
    cov = cov.double()
    m = basis.double()
    projected = cov - m @ (m.T @ cov)
    U, _, _ = torch.linalg.svd(projected)
    return (U[:, :rank].T * scale).to(basis.dtype)


def grow_basis(cov: torch.Tensor, basis: torch.Tensor, k: int, eps: float, energy: str = "paper") -> int:
    """DualGPM's update of the basis ``M`` (``basis[:, :k]``; the rest 0) with the current task's representations,
    given as their covariance ``C``: adds the fewest new orthonormal directions, in place, so that the share of the
    energy captured reaches ``eps``. Returns the new rank."""
    d = cov.shape[0]
    c = cov.double()
    m = basis[:, :k].double()
    residual = c - m @ (m.T @ c)
    if energy == "paper":  # energy of R: eigenvalues of C; new directions: eigenvectors of (I-P) C (I-P)
        total = torch.trace(c)
        hat = residual - (residual @ m) @ m.T
        hat = (hat + hat.T) / 2
        values, vectors = torch.linalg.eigh(hat)
        order = values.argsort(descending=True)
        values, vectors = values[order].clamp_min(0), vectors[:, order]
        energies = values
    else:  # the code: SVD of the covariance; energies = its squared singular values
        total = (torch.linalg.svdvals(c) ** 2).sum()
        vectors, s, _ = torch.linalg.svd(residual)
        energies = s ** 2
    if total <= 0:
        return k
    ratio = energies / total
    live = int((ratio > 1e-12).sum())  # never add a direction with no energy (ours)
    if k == 0 and energy == "code":
        r = max(int((torch.cumsum(ratio, 0) < eps).sum()), 1)
    else:
        captured = 1 - ratio.sum()  # share already captured by M (the code's (total - hat) / total)
        r = 0
        while r < len(ratio) and captured < eps:
            captured = captured + ratio[r]
            r += 1
    r = min(r, live, d - k)
    if r > 0:
        basis[:, k:k + r] = vectors[:, :r].to(basis.dtype)
    return k + r


@register_method("inflora", paper="Liang & Li, CVPR 2024 (InfLoRA)", family="ptm-cil", backbone="vit-b16-in21k",
                 backbone_family="vit",
                 summary="per task a LoRA on k/v whose frozen A spans the task's input representations projected "
                         "off the old tasks' DualGPM subspace; B trained, then merged; growing linear head")
class InfLoRA(PrototypeOption, Method):
    @dataclass
    class Config(LoRAConfig):
        lora_rank: int = 10  # configs/{cifar100,mimg*}_inflora.json (DomainNet: 30)
        targets: tuple[str, ...] = ("qkv",)  # k and v of the attention (Attention_LoRA)
        qkv_rows: str = "kv"  # kv: the query rows of B stay 0 (the code); qkv: adapt q too
        schedule: str = "quarter-cosine"  # the code's CosineSchedule, per epoch
        lamb: float = 0.95  # DualGPM threshold at the first task (cifar100_inflora.json; ImageNet-R 0.98)
        lame: float = 1.0  # ... rising linearly towards this (all configs)
        a_scale: float = 1 / math.sqrt(3)  # A = top singular vectors / sqrt(3) (the code; the paper gives none)
        gpm_energy: str = "paper"  # paper: energy of R (GPM); code: squared singular values of the covariance
        rep_augment: bool = False  # representations with the train transform (the code) or the test one (ours)

        LIMITS = {**LoRAConfig.LIMITS, "lamb": (0, 1), "lame": (0, 1), "a_scale": (1e-12, None)}
        CHOICES = {**LoRAConfig.CHOICES, "qkv_rows": QKV_ROWS, "gpm_energy": ENERGIES}

    recipes = {"official-code": dict(gpm_energy="code", rep_augment=True)}  # liangyanshuo/InfLoRA's arithmetic
    presets = {"cifar100": dict(epochs=20, lamb=0.95), "imagenet-r": dict(epochs=50, lamb=0.98)}
    quick = dict(QUICK_LORA)
    unused_settings = ("lora_alpha",)  # dW = B A, no alpha / r (the code)
    checkpoint_excludes = ("backbone.",)
    checkpoint_includes = (".lora.",)

    def __init__(self, cfg, backbone, scenario):
        super().__init__(cfg, backbone, scenario)
        self.backbone.requires_grad_(False)
        targets = check_targets(cfg.targets)
        self.handle = insert(backbone, "lora", targets=targets, r=cfg.lora_rank, alpha=float(cfg.lora_rank))
        self.num_tasks = len(scenario.tasks) if scenario is not None and hasattr(scenario, "tasks") else 1
        for name, bank in self.banks().items():
            if cfg.lora_rank > bank.in_features:
                raise CilbenchError(f"setting lora_rank={cfg.lora_rank}: {name} has only {bank.in_features} inputs")
            entry = bank.entries[0]
            entry.A.requires_grad_(False)  # designed, then frozen
            base = self._base(name)
            bank.register_buffer("merged", torch.zeros_like(base))  # sum of the past tasks' B A
            bank.register_buffer("basis", torch.zeros(bank.in_features, bank.in_features, dtype=base.dtype,
                                                      device=base.device))  # DualGPM's M, padded with zero columns
            bank.register_buffer("basis_rank", torch.zeros((), dtype=torch.long))
            bank.register_buffer("pretrained", base.detach().clone(), persistent=False)
            if name.endswith("qkv") and cfg.qkv_rows == "kv":
                mask = torch.ones(bank.out_features, 1, dtype=base.dtype, device=base.device)
                mask[: bank.out_features // 3] = 0
                bank.register_buffer("row_mask", mask, persistent=False)
        self.head = GrowingLinear(backbone.feature_dim)
        self._init_prototypes(backbone.feature_dim)

    # ---- structure ----
    def banks(self) -> dict[str, LoRABank]:
        return dict(self.handle.modules)

    def _base(self, name: str) -> torch.nn.Parameter:
        return self.backbone.get_submodule(name)._parameters["weight"]

    @torch.no_grad()
    def _fold(self) -> None:
        """Base weight = pre-trained + merged past deltas, computed afresh (a resumed run gets the same bits)."""
        for name, bank in self.banks().items():
            self._base(name).copy_(bank.pretrained + bank.merged)

    def before_task(self, task):
        self.head.grow(len(task.classes))
        self._grow_prototypes(task)

    # ---- representations ----
    @torch.no_grad()
    def representations(self, ctx) -> dict[str, torch.Tensor]:
        """Per adapted layer, the uncentred covariance of its input tokens over the task's training images."""
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        hooks = []
        for name, bank in self.banks().items():
            layer = self.backbone.get_submodule(name)

            def grab(module, args, name=name):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                sums[name] = sums.get(name, 0) + x.T @ x
                counts[name] = counts.get(name, 0) + x.shape[0]

            hooks.append(layer.register_forward_pre_hook(grab))
        try:
            ctx.features(self.backbone, augment=self.cfg.rep_augment)
        finally:
            for h in hooks:
                h.remove()
        return {name: sums[name] / counts[name] for name in sums}

    @torch.no_grad()
    def design(self, covs: dict[str, torch.Tensor]) -> None:
        for name, bank in self.banks().items():
            entry = bank.entries[0]
            entry.A.copy_(design_A(covs[name], bank.basis, self.cfg.lora_rank, self.cfg.a_scale))
            entry.B.zero_()

    def before_fit(self, task, ctx):
        self.design(self.representations(ctx))

    # ---- training ----
    def param_groups(self, task):
        params = [bank.entries[0].B for bank in self.banks().values()] + list(self.head.parameters())
        return [dict(params=params, lr=self.cfg.lr)]

    @torch.no_grad()
    def after_step(self, step):
        # the query rows of B back to 0 after each step (qkv_rows="kv"): Adam is elementwise, so the k / v rows move
        # exactly as if the query rows had no gradient
        for bank in self.banks().values():
            if hasattr(bank, "row_mask"):
                bank.entries[0].B.mul_(bank.row_mask)

    def training_step(self, batch):
        classes = self.cfg.loss_classes(batch.task, batch.labels.device)
        logits = self.head(self.backbone(batch.images), classes)
        return F.cross_entropy(logits.float(), batch.targets(classes), label_smoothing=self.cfg.label_smoothing)

    # ---- after the task ----
    @torch.no_grad()
    def merge(self) -> None:
        for bank in self.banks().values():
            entry = bank.entries[0]
            bank.merged += entry.delta().to(bank.merged.dtype)
            entry.B.zero_()
        self._fold()

    @torch.no_grad()
    def update_bases(self, covs: dict[str, torch.Tensor], task_index: int) -> None:
        eps = threshold(self.cfg.lamb, self.cfg.lame, task_index, self.num_tasks)
        for name, bank in self.banks().items():
            k = grow_basis(covs[name], bank.basis, int(bank.basis_rank), eps, self.cfg.gpm_energy)
            bank.basis_rank.fill_(k)

    def after_task(self, task, ctx):
        self.merge()
        self.update_bases(self.representations(ctx), task.index)
        ranks = [int(b.basis_rank) for b in self.banks().values()]
        ctx.log(inflora_basis_rank_mean=sum(ranks) / len(ranks), inflora_basis_rank_max=max(ranks))
        self._set_prototypes(task, ctx)

    def load_checkpoint_state(self, state):
        super().load_checkpoint_state(state)
        self._fold()
