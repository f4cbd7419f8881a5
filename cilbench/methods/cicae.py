"""CICAE: class-incremental collaborative adapter experts (Qiang et al., IEEE Signal Processing Letters 2025).

K AdaptFormer adapter experts on one frozen ViT-B/16 IN21k, each with its own cosine head and learning rate.

* Phase 1, every task (eq. 7): ``L1 = sum_k CE_margin_k + lambda1 * L_CKS``. ``CE_margin`` is eq. (2), the CosFace
  loss over the current task's classes; ``L_CKS`` is eq. (4), the sum over ordered expert pairs of
  KL(p_k1 || p_k2) with ``p_k = softmax(l_k)`` over the expert's logits of all seen classes.
* After tuning, per expert: the old class means move by the semantic drift estimated on the new task's features
  (SDC, as SSIAT which CICAE builds on), and the new classes' Gaussians (mean, covariance + ridge) are stored.
* Phase 2, from the second task on (eq. 7): only the heads train, on features sampled from every seen class's
  Gaussian of each expert: ``L2 = sum_k CE(cos / tau)_k + lambda2 * L_CCA`` (eq. 5, 6).
* Inference sums the experts' logits (cosines); each single expert's accuracy curve is recorded as a view.

The K experts share the frozen backbone and run as one batched forward (``batched_experts``; the batch is seen K
times and each expert's adapter acts on its slice), which ``cilbench bench cicae`` compares with K passes.

Where the paper is silent (every choice is a config value):
* ``s = 20, m = 0.3``: the CosFace scale and margin of SSIAT's ImageNet-A config (CICAE's code base; SSIAT is
  built on PILOT). ``tau = 0.05 = 1/s``: SSIAT's alignment logits are ``s * cos``.
* The KL terms use ``softmax(cos / kl_tau)`` with ``kl_tau = 1``: eqs. (4) and (6) apply softmax to the raw cosine
  logits, which is also why lambda1, lambda2 are as large as 25..400. ``kl_scope = "seen"``: eq. (4)'s softmax runs
  over all logit entries, i.e. every seen class (``"task"``: the current task's classes only).
* Each expert's head learns at its adapter's rate (``head_lr`` overrides). SGD, momentum 0.9, wd 5e-4, batch 48,
  cosine to 0 stepped per epoch (SSIAT ``exps_jsons/adapter_*.json``, ``models/SSITA_adapter.py``).
  ``lambda1, lambda2`` default to 50 / 200, the log-midpoint of the two published settings (ImageNet-A 25 / 400,
  CUB 100 / 100, both presets), for datasets the paper gives none for.
* Alignment: 5 epochs, 256 samples per class and expert per epoch, batch 256, SGD lr 0.01 momentum 0.9 wd 5e-4
  cosine per epoch, covariance ridge 1e-3 (SSIAT); none on the first task (SSIAT, SLCA). Samples of expert k
  are drawn from expert k's own Gaussians; the i-th samples of each expert share a class and are paired in the KL.
* Semantic drift: SDC with sigma = 4 on the features of the task's training images under the test transform, in
  one fixed order before and after tuning (SSIAT reads them through a shuffled, augmented loader twice, which
  pairs different images; we pair each image with itself). Only means move; covariances are kept. SSIAT also
  scales sampled means by 0.9 + 0.1 (t + 1) / T per task; the paper does not, and neither do we.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from cilbench.errors import CilbenchError
from cilbench.methods.base import AdapterConfig, Method, register_method
from cilbench.methods.contract import Phase, Sampled, StepOutput
from cilbench.models.gaussian import ClassGaussians, semantic_drift
from cilbench.models.heads import CosineHead
from cilbench.models.losses import cosine_ce, margin_cosine_ce, pairwise_kl

PAPER_EXPERT_LRS = (1e-2, 2e-2, 1e-3)  # the learning rates of CICAE's three experts (cicae.txt)


@register_method("cicae", paper="Qiang et al., IEEE SPL 2025 (collaborative adapter experts)", family="ptm-cil",
                 backbone="vit-b16-in21k", backbone_family="vit",
                 summary="K adapter experts with different learning rates, KL collaboration, collaborative "
                         "classifier alignment on sampled features")
class CICAE(Method):
    @dataclass
    class Config(AdapterConfig):
        num_experts: int = 3
        # one per expert, or one shared by all; None: the paper's rates, the first num_experts of them
        expert_lrs: tuple[float, ...] | None = None
        head_lr: float | None = None  # None: each head learns at its expert's rate
        lambda1: float = 50.0  # L_CKS weight (phase 1); 0 switches collaboration off
        lambda2: float = 200.0  # L_CCA weight (phase 2)
        s: float = 20.0  # margin-cosine scale, eq. (2)
        m: float = 0.3  # margin, eq. (2)
        tau: float = 0.05  # alignment temperature, eq. (5)
        kl_tau: float = 1.0  # softmax temperature inside the KL terms (eq. 4, 6 use raw cosines)
        kl_scope: str = "seen"  # seen | task: the classes the CKS softmax runs over
        ca_epochs: int = 5  # phase-2 epochs; 0 switches alignment off
        ca_samples_per_class: int = 256  # sampled features per class and expert per epoch
        ca_batch_size: int = 256
        ca_lr: float = 0.01
        cov_ridge: float = 1e-3
        semantic_shift: bool = True
        drift_sigma: float = 4.0
        infer_expert: int = 0  # 0: sum of all experts' logits; k: expert k alone (1-based)
        batched_experts: bool = True  # one batched forward for all experts (False: K passes)
        epochs: int = 10
        first_epochs: int | None = 20
        batch_size: int = 48
        lr: float = 0.01
        schedule_unit: str = "epoch"  # SSIAT models/SSITA_adapter.py: CosineAnnealingLR(T_max=epochs) per epoch

        def __post_init__(self) -> None:
            if self.expert_lrs is None and 1 <= self.num_experts <= len(PAPER_EXPERT_LRS):
                self.expert_lrs = PAPER_EXPERT_LRS[: self.num_experts]  # num_experts=2 alone runs 1e-2, 2e-2

        CHOICES = {**AdapterConfig.CHOICES, "kl_scope": ("seen", "task")}

    presets = {
        "imagenet-a": dict(lambda1=25.0, lambda2=400.0),
        "cub": dict(lambda1=100.0, lambda2=100.0),
    }
    # smoke profile (no reference): Adam at the paper's expert rates, 20 epochs, the light "quick" crops
    quick = dict(optimizer="adam", epochs=20, first_epochs=20, batch_size=16, transform="quick", ca_epochs=5,
                 ca_samples_per_class=64, ca_batch_size=64)
    unused_settings = ("label_smoothing",)  # eq. (2) and (5) have none
    checkpoint_excludes = ("backbone.",)
    checkpoint_includes = (".adapters.",)

    def __init__(self, cfg, backbone, scenario):
        super().__init__(cfg, backbone, scenario)
        k = cfg.num_experts
        if k < 1:
            raise CilbenchError(f"cicae: num_experts must be at least 1, not {k}")
        if cfg.expert_lrs is None:
            raise CilbenchError(f"cicae: the paper gives learning rates for {len(PAPER_EXPERT_LRS)} experts; for "
                                f"num_experts={k} pass one per expert (--set expert_lrs=0.01,0.02,0.001,...) or one "
                                f"for all (--set expert_lrs=0.01)")
        lrs = tuple(cfg.expert_lrs)
        if len(lrs) == 1:
            lrs = lrs * k
        if len(lrs) != k:
            raise CilbenchError(f"cicae: expert_lrs gives {len(lrs)} rates for num_experts={k}; pass {k} rates "
                                f"(--set expert_lrs=a,b,...) or one for all")
        if cfg.kl_scope not in ("seen", "task"):
            raise CilbenchError(f"cicae: kl_scope must be seen or task, not {cfg.kl_scope!r}")
        if not 0 <= cfg.infer_expert <= k:
            raise CilbenchError(f"cicae: infer_expert must be 0 (all) or 1..{k}, not {cfg.infer_expert}")
        self.lrs = lrs
        self.vit = cfg.adapted_vit(backbone, k)
        dim = backbone.feature_dim
        self.heads = nn.ModuleList(CosineHead(dim) for _ in range(k))
        self.stats = nn.ModuleList(ClassGaussians(dim, cfg.cov_ridge) for _ in range(k))
        self._before: torch.Tensor | None = None

    # ---- structure and phase 1 ----
    def before_task(self, task):
        for head in self.heads:
            head.grow(len(task.classes))

    def param_groups(self, task):
        groups = []
        for k, lr in enumerate(self.lrs):
            groups.append(dict(params=self.vit.expert_parameters(k), lr=lr))
            groups.append(dict(params=list(self.heads[k].parameters()), lr=self.cfg.head_lr or lr))
        return groups

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.vit(images, batched=self.cfg.batched_experts)  # [K, B, D]

    def expert_cosines(self, feats: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        return torch.stack([head(f, classes) for head, f in zip(self.heads, feats)])  # [K, B, C]

    def training_step(self, batch):
        cfg, task = self.cfg, batch.task
        dev = batch.labels.device
        task_classes = torch.tensor(task.classes, device=dev)
        scope = task_classes if cfg.kl_scope == "task" else torch.tensor(
            sorted(self.scenario.seen_classes(task.index)), device=dev)
        cos = self.expert_cosines(self.features(batch.images), scope)  # [K, B, C]
        cols = torch.searchsorted(scope, task_classes) if cfg.kl_scope == "seen" else slice(None)
        targets = batch.targets(task_classes)
        ce = sum(margin_cosine_ce(c[:, cols], targets, cfg.s, cfg.m) for c in cos)
        kl = pairwise_kl(cos / cfg.kl_tau)
        return StepOutput(ce + cfg.lambda1 * kl, {"ce": ce, "cks_kl": kl})

    # ---- statistics, drift and phase 2 ----
    def _encode_all(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images).transpose(0, 1).flatten(1)  # [B, K*D]

    def _expert_features(self, ctx) -> tuple[torch.Tensor, torch.Tensor]:
        feats, labels = ctx.features(self._encode_all)
        return feats.view(len(labels), self.cfg.num_experts, -1).transpose(0, 1), labels  # [K, N, D]

    def before_fit(self, task, ctx):
        self._before = self._expert_features(ctx)[0] if task.index > 0 and self.cfg.semantic_shift else None

    def after_task(self, task, ctx):
        cfg = self.cfg
        after, labels = self._expert_features(ctx)
        old = ctx.old.to(labels.device)
        drift = []
        for k, stats in enumerate(self.stats):
            if self._before is not None and len(old):
                delta = semantic_drift(self._before[k], after[k], stats.means[stats.position(old)], cfg.drift_sigma)
                stats.shift(old, delta)
                drift.append(float(delta.norm(dim=1).mean()))
            stats.add(after[k], labels)
        self._before = None
        if task.index > 0 and cfg.ca_epochs > 0:  # no alignment on the first task (SSIAT, SLCA)
            ctx.fit(self.alignment(ctx.seen.to(labels.device), ctx.seed("align")))
        with torch.no_grad():  # how far apart the experts end: CKS on the task's images, eval mode, seen classes
            agreement = float(pairwise_kl(self.expert_cosines(after, ctx.seen.to(labels.device)) / cfg.kl_tau))
        ctx.log(expert_kl=round(agreement, 6), drift_norm=[round(d, 6) for d in drift],
                trainable_parameters=sum(p.numel() for k in range(cfg.num_experts)
                                         for p in self.vit.expert_parameters(k))
                + sum(p.numel() for h in self.heads for p in h.parameters()))

    def alignment(self, seen: torch.Tensor, seed: int) -> Phase:
        """Phase 2 (eq. 5-7): the heads on features sampled from each expert's own Gaussians, the i-th samples of
        the experts paired by class; SGD with the method's momentum and weight decay, cosine per epoch."""
        cfg = self.cfg

        def draw(epoch: int):  # a fresh sample set per epoch, reproducible from the phase's seed and the epoch
            gen = torch.Generator(device=seen.device).manual_seed(seed + 7919 * (epoch + 1))
            samples = [stats.sample(seen, cfg.ca_samples_per_class, gen) for stats in self.stats]
            return torch.stack([f for f, _ in samples]), samples[0][1]  # [K, M, D], [M]

        def step(batch):
            cos = self.expert_cosines(batch.images, seen)
            targets = batch.targets(seen)
            kl = pairwise_kl(cos / cfg.kl_tau)
            return StepOutput(sum(cosine_ce(c, targets, cfg.tau) for c in cos) + cfg.lambda2 * kl, {"cca_kl": kl})

        params = [p for head in self.heads for p in head.parameters()]
        return Phase("align", step, [dict(params=params, lr=cfg.ca_lr)], data=Sampled(draw, batch_dim=-2),
                     epochs=cfg.ca_epochs, batch_size=cfg.ca_batch_size, optimizer="sgd", lr=cfg.ca_lr,
                     schedule="cosine", schedule_unit="epoch", warmup_epochs=0, min_lr=0.0, seed=seed,
                     divergence_hint="lower ca_lr (--set ca_lr=...)")

    # ---- inference ----
    def score_views(self, images, classes):
        cos = self.expert_cosines(self.features(images), classes)
        views = {f"expert{k + 1}": c for k, c in enumerate(cos)} if self.cfg.num_experts > 1 else {}
        main = cos.sum(0) if self.cfg.infer_expert == 0 else cos[self.cfg.infer_expert - 1]
        return main, views

    def logits(self, images, classes):
        return self.score_views(images, classes)[0]
