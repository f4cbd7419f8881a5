"""L2P: Learning to Prompt (Wang et al., CVPR 2022, arXiv 2112.08654), as LAMDA-PILOT runs it.

1. A frozen pre-trained ViT; the query of an image is its un-prompted CLS feature (``PromptedViT.query``).
2. A pool of ``pool_size`` prompts of ``prompt_length`` tokens, each with a learnable key. The ``top_k`` keys
   closest to the query (cosine) pick the prompts; with ``batchwise`` (PILOT and the official configs: true) the
   batch's ``top_k`` most frequent picks are used for every image, in training **and at test**
   (``cilbench.models.prompt.select_prompts``).
3. Prompt tuning: the ``top_k x prompt_length`` prompt tokens enter after CLS at the input, each with CLS's position
   embedding (PILOT; ``prompt_position="none"``: no position embedding, the official JAX model).
4. The classifier reads the mean of the prompt tokens' outputs (``head_type="prompt"``), a linear head that grows
   per task; cross-entropy over the current task's classes (PILOT sets the other logits to -inf), minus
   ``pull_coeff x sum cos(query, chosen keys) / B`` (the surrogate loss pulling the chosen keys to the queries).
   What trains: prompts, keys and head; the backbone, its position embeddings and CLS stay frozen.

Defaults: PILOT ``exps/l2p.json`` (CIFAR, ``cifar224`` 10-10) read by ``models/l2p.py`` and
``backbone/vit_l2p.py`` (PROTOCOLS-2 §5.1): pool 10, length 5, top-5 (25 prompt tokens), batch-wise selection,
``U(-1, 1)`` prompts and keys, pull 0.1, Adam lr 0.001875 (= 0.03 x 16 / 256), weight decay 0, constant lr, 5
epochs, batch 16, a new optimiser every task (the trainer builds one per task). ``imagenet-r`` preset
(``exps/l2p_inr.json``): 10 epochs, batch 32. PILOT ships no other dataset's config: the others take the CIFAR one.
The head rows start as PILOT's timm head: ``trunc_normal(std 0.02)``, bias 0. PILOT's test loader uses the training
batch size, which matters with batch-wise selection at test, so ``eval_batch_size`` equals ``batch_size``.

PILOT's test batches hold the images class by class (``DataManager.get_dataset`` concatenates the classes in
order, ``shuffle=False``), so a batch-wise choice at test is nearly a per-class choice: the prompt methods ask the
evaluator for the same order (``eval_order = "class"``). ``--set batchwise_test=false`` selects per image at test.

Not as PILOT:
* PILOT's backbone weights are augreg IN21k fine-tuned on IN1k (``vit_base_patch16_224``); cilbench's default is the
  IN21k ViT the EASE / MOS tables name. ``--backbone vit-b16-in1k`` gives PILOT's weights.

The official JAX code (google-research/l2p ``configs/cifar100_l2p.py``, PROTOCOLS-2 §5.2): length 10, top-4, pull
1.0, Adam lr 0.03 x 128 / 256 = 0.015 (a global batch of 8 x 16), 5 epochs, constant lr, prompts without position
embedding in front of CLS, ``U(0, 0.01)`` init, the plain IN21k ``ViT-B_16.npz`` (the default backbone):
``--recipe official`` (``recipes["official"]``).

It also clips the gradient norm at 1.0 (the trainer has no clipping) and takes the batch-wise majority per device
(16 images), neither of which a setting reproduces.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from cilbench.methods.base import Method, TrainConfig, register_method
from cilbench.methods.contract import StepOutput
from cilbench.models.heads import GrowingLinear
from cilbench.models.prompt import INITS, POSITIONS, PromptedViT, PromptPool


@dataclass
class PromptConfig(TrainConfig):
    """What the three prompt methods share: PILOT's Adam without weight decay at a constant lr."""

    optimizer: str = "adam"
    weight_decay: float = 0.0
    schedule: str = "constant"
    prompt_init: str = "pilot"  # pilot: U(-1, 1); jax: U(0, 0.01) (official L2P / DualPrompt)
    prompt_lr: float | None = None  # lr of prompts and keys; None: lr (PILOT: one Adam over prompts, keys, head)

    CHOICES = {**TrainConfig.CHOICES, "prompt_init": INITS, "prompt_position": POSITIONS}
    LIMITS = {**TrainConfig.LIMITS, "pool_size": (1, None), "prompt_length": (1, None), "top_k": (1, None)}


class PromptMethod(Method):
    """A frozen ViT, prompts, and a linear head that grows per task, trained with cross-entropy over the current
    task's classes. Subclasses give ``features(images, task, train) -> (features [B, D], {term: value})``; the
    terms are added to the loss and logged."""

    checkpoint_excludes = ("backbone.",)  # frozen
    eval_order = "class"  # test images sorted by class, as PILOT's test loader (batch-wise choice at test)

    def __init__(self, cfg, backbone, scenario, prompt_position: str = "cls"):
        super().__init__(cfg, backbone, scenario)
        self.backbone.requires_grad_(False)
        self.vit = PromptedViT(backbone, prompt_position)
        self.head = GrowingLinear(self.vit.dim)

    def before_task(self, task):
        n = self.head.num_classes
        self.head.grow(len(task.classes))
        self.init_head_rows(n)

    @torch.no_grad()
    def init_head_rows(self, start: int) -> None:
        """PILOT's heads are timm's ``nn.Linear`` init: ``trunc_normal(std 0.02)``, zero bias (L2P, DualPrompt)."""
        nn.init.trunc_normal_(self.head.weight[start:], std=0.02)
        self.head.bias[start:].zero_()

    def frozen_modules(self):
        return [self.backbone]

    def param_groups(self, task):
        prompts = [p for n, p in self.named_parameters() if not n.startswith(("backbone.", "head."))]
        lr = self.cfg.lr if self.cfg.prompt_lr is None else self.cfg.prompt_lr
        return [dict(params=list(self.head.parameters()), lr=self.cfg.lr), dict(params=prompts, lr=lr)]

    def features(self, images, task, train: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def training_step(self, batch):
        classes = torch.tensor(batch.task.classes, device=batch.labels.device)
        feats, terms = self.features(batch.images, batch.task, train=True)
        ce = F.cross_entropy(self.head(feats, classes).float(), batch.targets(classes),
                             label_smoothing=self.cfg.label_smoothing)
        return StepOutput(ce + sum(terms.values()), {"ce": ce, **terms})

    def logits(self, images, classes):
        return self.head(self.features(images, None, train=False)[0], classes)


@register_method("l2p", paper="Wang et al., CVPR 2022 (L2P), as LAMDA-PILOT", family="ptm-cil",
                 backbone="vit-b16-in21k", backbone_family="vit",
                 summary="prompt pool with learnable keys, top-k prompts by the frozen CLS query prepended at the "
                         "input (batch-wise), head on the prompt tokens")
class L2P(PromptMethod):
    @dataclass
    class Config(PromptConfig):
        epochs: int = 5
        batch_size: int = 16
        eval_batch_size: int = 16  # PILOT's test loader takes the training batch size
        lr: float = 0.001875
        pool_size: int = 10
        prompt_length: int = 5
        top_k: int = 5
        pull_coeff: float = 0.1
        batchwise: bool = True  # the batch's most frequent prompts for every image, in training
        batchwise_test: bool = True  # ... and at test (PILOT, official)
        prompt_position: str = "cls"  # cls: each prompt slot takes CLS's position embedding (PILOT); none (JAX)

    presets = {"cifar100": dict(epochs=5, batch_size=16, eval_batch_size=16),  # exps/l2p.json (the defaults)
               "imagenet-r": dict(epochs=10, batch_size=32, eval_batch_size=32)}  # exps/l2p_inr.json
    # smoke profile (no reference). On the random vit-tiny a prompt token's output is almost only the prompt itself
    # (its attention and MLP updates are small): small U(0, 0.01) prompts that move slowly keep the image in the
    # feature, and the head learns at 0.03 (measured on digits)
    recipes = {"official": dict(prompt_length=10, top_k=4, pull_coeff=1.0, lr=0.015, batch_size=128,
                                eval_batch_size=128, prompt_position="none", prompt_init="jax")}
    quick = dict(optimizer="adam", lr=0.03, prompt_lr=1e-3, prompt_init="jax", epochs=10, batch_size=16,
                 eval_batch_size=16, transform="quick", prompt_length=2, top_k=2)

    def __init__(self, cfg, backbone, scenario):
        super().__init__(cfg, backbone, scenario, cfg.prompt_position)
        self.pool = PromptPool(cfg.pool_size, cfg.prompt_length, self.vit.dim, cfg.top_k, init=cfg.prompt_init)

    def features(self, images, task, train):
        query = self.vit.query(images)
        ids = self.pool.select(query, self.cfg.batchwise if train else self.cfg.batchwise_test)
        prompts = self.pool.tokens(ids)
        out = self.vit.tokens(images, prompts=prompts)
        feats = out[:, 1:1 + prompts.shape[1]].mean(dim=1)  # head_type "prompt"
        terms = {"pull": -self.cfg.pull_coeff * self.pool.pull(query, ids)} if train else {}
        return feats, terms
