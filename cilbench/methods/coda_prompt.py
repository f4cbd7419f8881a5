"""CODA-Prompt (Smith et al., CVPR 2023, arXiv 2211.13218), as LAMDA-PILOT runs it.

1. Prompt components: at each of ``layers`` (prefix tuning) ``pool_size`` components ``P_m`` of ``prompt_length``
   full-width vectors, each with a key ``K_m`` and an attention vector ``A_m``.
2. Attention-based assembly: with ``q`` the frozen CLS query, ``alpha_m = cos(q * A_m, K_m)`` and the
   prompt is ``sum_m alpha_m P_m``: end to end differentiable, no top-k. Its first ``prompt_length / 2`` vectors
   prefix the keys, the rest the values (``cilbench.models.prompt.CodaComponents``).
3. Expansion per task: task ``t`` owns ``pool_size // T`` components (T = number of tasks), initialised just before
   the task, orthonormal to all earlier components (Gram-Schmidt); the earlier ones take part in training but are
   detached; at test every component up to the current task's is used. Optional orthogonality penalty
   ``ortho_mu x ((X X^T - I)^2).mean()`` on K, A and P (PILOT's ``ortho_penalty``; its default weight is 0).
4. A linear head on the CLS output that grows per task; cross-entropy over the current task's classes (PILOT sets
   the other logits to -inf). Components and head train; the backbone is frozen.

Defaults: PILOT ``exps/coda_prompt.json`` (CIFAR 10-10) read by ``models/coda_prompt.py`` and
``backbone/prompt.py`` (PROTOCOLS-2 §5.1): ``prompt_param [100, 8, 0.0]`` (100 components, length 8, no penalty),
layers 0-4, Adam lr 0.001, weight decay 0, their ``CosineSchedule`` stepped per epoch (the trainer's
``quarter-cosine``: ``lr x cos(99 pi e / (200 (E - 1)))`` at epoch ``e = 0..E-1``), batch 128, 20 epochs; ``imagenet-r``
preset (``coda_prompt_inr.json``): 50 epochs. The head is PyTorch's ``nn.Linear`` init (CODA's ``self.fc``). The
official code (GT-RIPL/CODA-Prompt ``configs/cifar-100_prompt.yaml``, ``imnet-r_prompt.yaml``,
``experiments/cifar-100.sh``) uses the same values, so there is no second recipe.

**Class order.** PILOT's CODA-Prompt configs set ``shuffle: false, seed: [0]``: classes in their natural order
0..N-1, not the seed-1993 permutation its L2P and DualPrompt use (PROTOCOLS-2, disagreement 13). cilbench keeps the
scenario the same for every method; to rerun PILOT's CODA-Prompt exactly::

    cilbench run coda-prompt --dataset cifar100 --scenario B0Inc10 --class-order identity --seed 0

Not as PILOT / official:
* Their training loader drops the last incomplete batch (``drop_last=True``); the trainer keeps it.
* Gram-Schmidt against the span of the earlier components rather than against each separately (the same while the
  earlier components are orthogonal; ``cilbench.models.prompt``).
* PILOT's weights are IN21k fine-tuned on IN1k (``--backbone vit-b16-in1k``); the default is the IN21k ViT.
"""

from __future__ import annotations

from dataclasses import dataclass

from cilbench.errors import CilbenchError
from cilbench.methods.base import register_method
from cilbench.methods.l2p import PromptConfig, PromptMethod
from cilbench.models.prompt import CodaComponents


@register_method("coda-prompt", paper="Smith et al., CVPR 2023 (CODA-Prompt), as LAMDA-PILOT", family="ptm-cil",
                 backbone="vit-b16-in21k", backbone_family="vit",
                 summary="prompt components weighted by cos(query * A, K) as prefixes at layers 0-4, new "
                         "orthogonal components per task, linear head on CLS")
class CodaPrompt(PromptMethod):
    @dataclass
    class Config(PromptConfig):
        epochs: int = 20
        batch_size: int = 128
        eval_batch_size: int = 128
        lr: float = 0.001
        schedule: str = "quarter-cosine"  # PILOT / CODA's CosineSchedule
        schedule_unit: str = "epoch"
        pool_size: int = 100  # components over all tasks
        prompt_length: int = 8  # first half key prefix, second half value prefix
        ortho_mu: float = 0.0
        layers: tuple[int, ...] = (0, 1, 2, 3, 4)

    presets = {"cifar100": dict(epochs=20), "imagenet-r": dict(epochs=50)}  # exps/coda_prompt{,_inr}.json
    # smoke profile (no reference): vit-tiny (2 blocks of width 48), both blocks, 10 components (2 per task on
    # digits' 5 tasks), lr 0.04 (measured on digits)
    quick = dict(optimizer="adam", lr=0.04, epochs=12, batch_size=16, eval_batch_size=16, transform="quick",
                 pool_size=10, prompt_length=4, layers=(0, 1))
    unused_settings = ("prompt_init",)  # components are drawn by Gram-Schmidt

    @classmethod
    def check_plan(cls, cfg, scenario):
        if cfg.pool_size // len(scenario.tasks) < 1:
            raise CilbenchError(f"coda-prompt needs at least one component per task: pool_size {cfg.pool_size} for "
                                f"{len(scenario.tasks)} tasks (--set pool_size=...)")

    def __init__(self, cfg, backbone, scenario):
        super().__init__(cfg, backbone, scenario)
        if not cfg.layers:
            raise CilbenchError("coda-prompt needs at least one prefixed layer (--set layers=0,1,2,3,4)")
        self.vit.check_layers(cfg.layers, "CODA-Prompt", "layers")
        dim = self.vit.dim
        self.components = CodaComponents(cfg.pool_size, cfg.prompt_length, dim, dim, len(cfg.layers),
                                         len(scenario.tasks))

    def init_head_rows(self, start):  # CODA's head is a plain nn.Linear (GrowingLinear's own init)
        pass

    def before_task(self, task):
        super().before_task(task)
        self.components.task = task.index  # the components used at test: up to this task's

    def before_fit(self, task, ctx):
        self.components.begin_task(task.index, ctx.rng("coda-components"))

    def features(self, images, task, train):
        query = self.vit.query(images)
        prefixes, penalty = self.components.prefixes(query, train, self.cfg.ortho_mu)
        feats = self.vit.tokens(images, prefixes={layer: [p] for layer, p in zip(self.cfg.layers, prefixes)})[:, 0]
        return feats, ({"ortho": penalty} if train and self.cfg.ortho_mu > 0 else {})
