"""DualPrompt (Wang et al., ECCV 2022, arXiv 2204.04799), as LAMDA-PILOT runs it.

1. G-prompt: one prefix shared by all tasks, ``g_length`` key and ``g_length`` value vectors at each of
   ``g_layers`` (prefix tuning, ``cilbench.models.prompt.SharedPrefix``).
2. E-prompts: a pool of ``pool_size`` prefixes (``e_length`` key and value vectors at each of ``e_layers``), one
   learnable key each. In training task ``t`` uses its own prompt ``t`` (``prompt_mask``; once ``t`` passes the pool,
   the key choice as at test); at test the key closest to the frozen CLS query picks it, top-``top_k`` with the
   batch-wise majority (``batchwise``). Before task ``t`` trains, prompt ``t - 1`` is copied into prompt ``t``
   (``shared_pool``; skipped past the pool, as PILOT).
3. The classifier reads the CLS output (``head_type="token"``), a linear head that grows per task; cross-entropy over
   the current task's classes minus ``pull_coeff x sum cos(query, chosen key) / B`` (the record logs ``ce`` and
   ``pull``, the term added). Prompts, keys and head train; the backbone is frozen.

Defaults: PILOT ``exps/dualprompt.json`` (CIFAR 10-10) read by ``models/dualprompt.py`` and
``backbone/vit_dualprompt.py`` (PROTOCOLS-2 §5.1): G length 5 at layers 0-1, E pool 10, length 5, top-1 at layers
2-4, separate key and value prefixes (``same_key_value`` false), ``U(-1, 1)`` init, prompt mask, shared pool,
batch-wise selection, pull 0.1, Adam lr 0.001, weight decay 0, constant lr, batch 24, 5 epochs, a new optimiser per
task. ``imagenet-r`` preset (``dualprompt_inr.json``): 10 epochs. Other datasets take the CIFAR config. Head rows
start as timm's head: ``trunc_normal(std 0.02)``, bias 0. ``eval_batch_size`` equals the training batch, as PILOT's
test loader, since the batch-wise choice at test depends on the batch; the test images come class by class, as
PILOT's (``l2p``'s docstring; ``--set batchwise_test=false`` chooses per image).
PILOT's weights are IN21k fine-tuned on IN1k (``--backbone vit-b16-in1k``); the default is the IN21k ViT.

**PILOT's E-prefix tensor** (``--set e_prefix_layout=pilot``; the EASE / MOS tables ran that code):
PILOT's ``EPrompt.forward`` reshapes the selected prompts from ``[layers, 2, B, ...]`` to ``[layers, B, 2, ...]``
without permuting, so with one prompt for the batch an image in the first half of the batch gets the prompt's key
half as both key and value prefix, an image in the second half the value half as both (the middle image of an odd
batch the true pair); which half an image falls in depends on its place in the batch, also at test. The official
code and the paper pair each prompt's keys and values, and so does the default, ``e_prefix_layout="paired"``: where
the code departs from the paper, cilbench follows the paper and keeps the code's behaviour as a setting
(``cilbench.models.prompt``).

The official JAX configs (google-research/l2p, PROTOCOLS-2 §5.2). CIFAR-100 (``cifar100_dualprompt.py``): the same
prompts, pull 1.0, Adam lr 0.03 x 192 / 256 = 0.0225 (a global batch of 8 x 24), 5 epochs, ``U(0, 0.01)`` init:
``--recipe official``. ImageNet-R (``imr_dualprompt.py``): E length 20, no batch-wise selection, lr 0.005 x 192 /
256 = 0.00375, 50 epochs: ``--recipe official-imagenet-r`` (``recipes``).

Not reproduced by a setting: their gradient clipping at norm 1.0 and the per-device (24-image) batch-wise majority.
"""

from __future__ import annotations

from dataclasses import dataclass

from cilbench.errors import CilbenchError
from cilbench.methods.base import register_method
from cilbench.methods.l2p import PromptConfig, PromptMethod
from cilbench.models.prompt import LAYOUTS, PromptPool, SharedPrefix


@register_method("dualprompt", paper="Wang et al., ECCV 2022 (DualPrompt), as LAMDA-PILOT", family="ptm-cil",
                 backbone="vit-b16-in21k", backbone_family="vit",
                 summary="shared G-prefix at layers 0-1, task E-prefixes at layers 2-4 chosen by the frozen CLS "
                         "query (own prompt in training), head on CLS")
class DualPrompt(PromptMethod):
    @dataclass
    class Config(PromptConfig):
        epochs: int = 5
        batch_size: int = 24
        eval_batch_size: int = 24  # PILOT's test loader takes the training batch size
        lr: float = 0.001
        g_length: int = 5
        g_layers: tuple[int, ...] = (0, 1)
        pool_size: int = 10
        e_length: int = 5
        e_layers: tuple[int, ...] = (2, 3, 4)
        top_k: int = 1
        pull_coeff: float = 0.1
        prompt_mask: bool = True  # in training, task t uses E-prompt t
        shared_pool: bool = True  # E-prompt t starts as a copy of E-prompt t - 1
        batchwise: bool = True  # training without the mask: the batch's most frequent prompt for every image
        batchwise_test: bool = True
        # pilot: PILOT's E-prefix tensor (first half of a batch: key half as keys and values, second half: value
        # half as both); paired: each image its prompt's keys and values (official JAX, the paper)
        e_prefix_layout: str = "paired"  # the paper / official code; "pilot": PILOT's reshape (the tables' code)

        LIMITS = {**PromptConfig.LIMITS, "g_length": (0, None), "e_length": (1, None)}
        CHOICES = {**PromptConfig.CHOICES, "e_prefix_layout": LAYOUTS}

    presets = {"cifar100": dict(epochs=5), "imagenet-r": dict(epochs=10)}  # exps/dualprompt{,_inr}.json
    # smoke profile (no reference), as l2p's: small slow prompts, the head at 0.03 (measured on digits); vit-tiny
    # has 2 blocks: G at block 0, E at block 1
    recipes = {
        "official": dict(pull_coeff=1.0, lr=0.0225, batch_size=192, eval_batch_size=192, prompt_init="jax"),
        "official-imagenet-r": dict(e_length=20, batchwise=False, batchwise_test=False, pull_coeff=1.0, lr=0.00375,
                                    epochs=50, batch_size=192, eval_batch_size=192, prompt_init="jax"),
    }
    quick = dict(optimizer="adam", lr=0.03, prompt_lr=1e-3, prompt_init="jax", epochs=10, batch_size=16,
                 eval_batch_size=16, transform="quick", g_layers=(0,), e_layers=(1,))

    def __init__(self, cfg, backbone, scenario):
        super().__init__(cfg, backbone, scenario)
        if not cfg.e_layers:
            raise CilbenchError("dualprompt needs at least one E-prompt layer (--set e_layers=2,3,4)")
        self.vit.check_layers(cfg.g_layers, "G-prompt", "g_layers")
        self.vit.check_layers(cfg.e_layers, "E-prompt", "e_layers")
        dim = self.vit.dim
        self.g_prompt = SharedPrefix(len(cfg.g_layers), cfg.g_length, dim, cfg.prompt_init) \
            if cfg.g_length and cfg.g_layers else None
        self.e_prompt = PromptPool(cfg.pool_size, cfg.e_length, dim, cfg.top_k, layers=len(cfg.e_layers),
                                   init=cfg.prompt_init)

    def own_slots(self, t: int) -> slice | None:
        """Task ``t``'s E-prompts ``[t k, (t + 1) k)``, None once past the pool."""
        k = self.cfg.top_k
        return slice(t * k, (t + 1) * k) if (t + 1) * k <= self.cfg.pool_size else None

    def before_fit(self, task, ctx):
        t = task.index
        if self.cfg.shared_pool and t > 0 and self.own_slots(t - 1) and self.own_slots(t):
            self.e_prompt.copy_slots(self.own_slots(t - 1), self.own_slots(t))

    def features(self, images, task, train):
        query = self.vit.query(images)
        own = self.own_slots(task.index) if train and self.cfg.prompt_mask else None
        batchwise = self.cfg.batchwise if train else self.cfg.batchwise_test
        ids = self.e_prompt.select(query, batchwise, range(own.start, own.stop) if own else None)
        e_prefixes = self.e_prompt.prefixes(ids, self.cfg.e_prefix_layout)
        prefixes = {layer: [p] for layer, p in zip(self.cfg.e_layers, e_prefixes)}
        if self.g_prompt is not None:
            for layer, p in zip(self.cfg.g_layers, self.g_prompt.prefixes()):
                prefixes.setdefault(layer, []).insert(0, p)  # a layer with both: [G, E] (the official order)
        feats = self.vit.tokens(images, prefixes=prefixes)[:, 0]  # head_type "token"
        terms = {"pull": -self.cfg.pull_coeff * self.e_prompt.pull(query, ids)} if train else {}
        return feats, terms
