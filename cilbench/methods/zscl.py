"""ZSCL (Zheng et al., ICCV 2023, "Preventing Zero-Shot Transfer Degradation in Continual Learning of
Vision-Language Models") and the baselines its repository runs on MTIL: Continual-FT, LwF, LwF-VR, WiSE-FT and
iCaRL, all full fine-tuning of CLIP ViT-B/16 (OpenAI weights). Facts checked against Thunderbeee/ZSCL b96e714 are in
PROTOCOLS-2 §3 (and its addendum); the shared recipe, learning-rate tables, prompts and evaluation are
``clip_base``'s.

The loop is written once (``ContinualCLIP``), as the official code runs every method through one ``finetune`` with
flags (LwF is ``--method ZSCL`` with other reference data and teacher, §3.5):

* Training (§3.4): both encoders, every parameter except ``logit_scale`` (frozen), AdamW wd 0, 100-iteration
  warmup then cosine, 1000 iterations, batch 64, CE with label smoothing 0.2 over the current dataset's
  first-template prompts, the per-dataset learning rates of ZSCL.sh (5e-5 Aircraft and MNIST, 1e-5 otherwise; the
  same table on ``mtil-fewshot``, whose baseline recipe nobody published: UNVERIFIED, as is its iteration count).
* Distillation (helpers.py ``distillation``): on a reference batch, logits = exp(logit_scale) x normalised image
  features @ normalised reference-text features^T for the student (image features with gradients) and the teacher;
  KD = CE(student / T, softmax(teacher / T)) x T^2, T = 2 (``models.losses.kd_soft_ce``, batchmean, tau_squared),
  image->text on the logits and text->image on their transpose. **The reference-text embeddings are the teacher's
  in both** (finetune.py: ``ref_embeddings = ref_model(None, ref_texts)`` under ``no_grad`` in both logits), so the
  student never encodes the reference texts; the teacher's are computed once per task (once per run for ZSCL,
  whose teacher and captions never change) instead of at every step. Similarities in float32 (no autocast).
* L2 (§3.4, addendum): sum over every parameter, ``logit_scale`` included, of (theta - theta_task_start)^2.
* Weight ensemble (§3.4, addendum; helpers.py ``merge_we``): theta_we starts as the task-start weights (n = 0);
  after the optimiser step of iteration i with ``i % we_every == 0``: n += 1, theta_we <- (theta_we n + theta) /
  (n + 1). The task ends with theta <- theta_we, so the checkpoint and the evaluation are of the averaged model. The
  official loop runs iterations 0..1000 (1001 steps) and averages 12 models (the start + steps 0, 100, ..., 1000,
  the addendum's count); ``clip_base`` runs the paper's 1000 steps, which averages 11 (the start + 0, ..., 900):
  ``--set iterations=1001`` gives the official loop and its 12.

Methods (§3.5):

* ``continual-ft``: CE only. ``independent=true`` restarts every task from the pre-trained weights: the diagonal of
  its accuracy matrix is the "Full Fine-tune" row of MoE-Adapters Tables 1-2.
* ``zscl``: teacher = the pre-trained CLIP (``ref_model`` unset); reference images = a prepared store read whole
  with the test transform (``ref_images``: ImageNet's training set in the paper), one batch of 64 per step;
  reference texts = a caption list (``ref_captions``: every Conceptual Captions validation caption, the CSV of
  ZSCL's ``gather_cc.py``); KD weights 1 and 1, l2 1, ensemble every 100 iterations. Class-incremental presets
  ``cifar100`` / ``tinyimagenet`` (§3.4 "CIL variant", cil/continual_clip/models.py): CC images and captions, KD
  weights 5 and 5, no L2, ensemble every 10 iterations, lr 7.1e-6, one epoch per task, 30-iteration warmup.
* ``lwf``: teacher = the model as the previous task left it (the pre-trained CLIP for task 1); reference images =
  the current task's training images with the test transform; reference texts = its class prompts; KD 1 and 1; no
  L2, no ensemble. The committed lwf.sh passes ``--fair``, which the pinned finetune.py never reads.
* ``lwf-vr``: as ``lwf`` with 1000 "virtual vocabulary" sentences as reference texts (helpers.py
  ``virtual_vocab``): SOT + 10 token ids drawn uniformly from [0, 49408) -- the whole vocabulary, SOT, EOT and 0
  included, as ``torch.randint(0, len(encoder))`` does -- + EOT, zero-padded to 77. Drawn once per run (the
  official from the global generator at start-up, addendum) from a generator seeded by the run seed and the name
  ``lwf-vr-vocabulary``, kept as a buffer (in the checkpoint). An id equal to EOT among the 10 moves CLIP's
  argmax pooling there, as in the official code.
* ``wise-ft``: plain fine-tuning, then theta <- alpha theta_ft + (1 - alpha) theta_task_start, alpha 0.8, over every
  parameter (``--wise_merge --wise_ft_model n``).
* ``icarl-clip`` (mtil/src/models/icarl.py, dynamic_dataset.py): an exemplar memory of ``memory_size`` (10000)
  images across datasets, drawn from the first ``candidates`` (30000) training images of each dataset in store
  order. Task 1 keeps its first ``memory_size`` candidates, no herding; after task t (t >= 2) every older dataset's
  set is cut to its first K // t and the new one is chosen by herding (picks leave the pool; the rule of
  ``memory.herding_pycil``) on normalised image features of the just-trained model, test
  transform. The official code gives the new set K - K // t, which overfills the memory from t = 3 (§3.5: looks
  like a bug); ``memory_rule="fixed"`` (default) follows the fixed budget (K // t for every dataset),
  ``"official"`` the code. Which produced the published numbers is UNVERIFIED (the committed icarl.sh is a debug
  command). Training: CE on the current data + KD (weights 1 and 1; icarl.sh passes neither ``--image_loss`` nor
  ``--text_loss``: UNVERIFIED) on a memory batch against the current dataset's prompts, teacher = the pre-trained
  CLIP, no KD on task 1 (the official runs plain fine-tuning there). Memory images take the test transform, as the
  official stores them (``test_preprocess``); the official walks the memory in order, we shuffle it (an aux stream).
  The memory rows are a buffer (in the checkpoint); the stores of earlier datasets are declared as references so a
  resumed run can read them.

Class-incremental presets (``cifar100``, ``tinyimagenet``; cil/configs/class/*.yaml, cil/continual_clip/models.py):
lr 7.1e-6, one epoch per task, 30-iteration warmup, ls 0.2, batch 64, the prompt "a bad photo of a {}."; the CIL
code weights every KD by 5 (ZSCL, LwF, LwF-VR, iCaRL alike) and its iCaRL keeps 5000 exemplars from the first 10000
images of a task. That iCaRL updates its memory at the *start* of each task (herding with the previous model, the
current task's exemplars included in its KD set); ours updates after the task, as on MTIL. No CIL config exists for
Continual-FT or WiSE-FT: they take the same recipe (UNVERIFIED).

A teacher (``models.teacher.Teacher``) is never in the state dict. The pre-trained CLIP (ZSCL, iCaRL, independent
Continual-FT) is snapshotted in ``__init__``: the runner builds the method from the pre-trained backbone before it
loads a checkpoint, so a resumed run has it too. LwF's teacher is snapshotted in ``before_fit``, after a resume's
checkpoint load, so it is the previous task's model either way.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from cilbench.data.memory import herding_pycil
from cilbench.errors import CilbenchError
from cilbench.methods.base import register_method
from cilbench.methods.clip_base import CLIP_TRAIN_QUICK, ZSCL_MTIL_LR, CLIPConfig, CLIPMethod
from cilbench.methods.contract import Reference, StepOutput, Stream
from cilbench.models.losses import kd_soft_ce
from cilbench.models.teacher import Teacher

# class-incremental recipe of the ZSCL repo's CIL code (cil/configs/class/*.yaml, cil/continual_clip/models.py)
_CIL = dict(iterations=None, epochs=1, warmup_iterations=30, lr=7.1e-6, lr_table="none")
_CIL_KD = dict(_CIL, image_kd=5.0, text_kd=5.0)
_CIL_DATASETS = ("cifar100", "tinyimagenet")
# Smoke profile. The tiny random CLIP starts with near-constant image features, so the CE's gradient is tiny for
# its first steps and Adam-normalised restoring terms (KD to the random teacher, L2) hold it at the start: the quick
# profile trains longer on larger batches than CLIP_TRAIN_QUICK and weakens those terms (all still run).
_QUICK = dict(CLIP_TRAIN_QUICK, iterations=48, batch_size=32, lr=1e-3, lr_table="none")
_QUICK_KD = dict(_QUICK, image_kd=0.1, text_kd=0.1)
# the methods anchored to a start point (WiSE-FT's merge, ZSCL's and iCaRL's pre-trained teacher) need twice the steps
# to clear 1.5 x chance on digits (measured: A_avg 30-34 at 48 iterations, 40-46 at 96)
_ANCHORED = dict(iterations=96)

_PAPER = "Zheng et al., ICCV 2023 (ZSCL)"
_META = dict(family="clip", backbone="clip-vit-b16", backbone_family="clip")


# ---------------------------------------------------------------------------------------------- the equations

def distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """ZSCL's ``distillation(t, s, T)``: ``CE(s / T, softmax(t / T)) * T**2``, averaged over rows."""
    return kd_soft_ce(student, teacher, tau=temperature, reduction="batchmean", tau_squared=True)


def reference_logits(image_features: torch.Tensor, text_embeddings: torch.Tensor,
                     scale: torch.Tensor | float) -> torch.Tensor:
    """``scale * normalise(image) @ normalise(text)^T`` in float32 whatever the autocast around it."""
    with torch.autocast(image_features.device.type, enabled=False):
        image = F.normalize(image_features.float(), dim=-1)
        text = F.normalize(text_embeddings.float(), dim=-1)
        return scale * image @ text.T


def zscl_kd(student_images: torch.Tensor, teacher_images: torch.Tensor, texts: torch.Tensor,
            scale: torch.Tensor | float, temperature: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(image->text, text->image) distillation on a reference batch: image features of the student and teacher,
    the teacher's reference-text embeddings ``texts`` for both (finetune.py)."""
    s = reference_logits(student_images, texts, scale)
    t = reference_logits(teacher_images, texts, scale)
    return distillation(s, t, temperature), distillation(s.T, t.T, temperature)


def l2_distance(params: Iterable[torch.Tensor], start: Iterable[torch.Tensor]) -> torch.Tensor:
    """helpers.py ``l2_loss``: the sum over every parameter of the squared differences to ``start``."""
    return sum(((p.float() - p0.float()) ** 2).sum() for p, p0 in zip(params, start))  # type: ignore[return-value]


class WeightAverage:
    """ZSCL's weight ensemble (helpers.py ``merge_we``): a running mean that starts from the weights given (n = 0)
    and takes ``add(params)``: n += 1, mean <- (mean n + theta) / (n + 1)."""

    def __init__(self, params: Iterable[torch.Tensor]):
        self.mean = [p.detach().clone() for p in params]
        self.n = 0

    @property
    def models(self) -> int:
        """How many weight sets the mean holds (the start included)."""
        return self.n + 1

    @torch.no_grad()
    def add(self, params: Iterable[torch.Tensor]) -> None:
        self.n += 1
        for w, p in zip(self.mean, params):
            w.copy_((w * self.n + p.detach()) / (1.0 + self.n))

    @torch.no_grad()
    def copy_to(self, params: Iterable[torch.Tensor]) -> None:
        for p, w in zip(params, self.mean):
            p.copy_(w)


@torch.no_grad()
def wise_merge(params: Iterable[torch.Tensor], start: Iterable[torch.Tensor], alpha: float) -> None:
    """WiSE-FT (finetune.py ``--wise_merge``): theta <- alpha theta + (1 - alpha) theta_start, in place."""
    for p, p0 in zip(params, start):
        p.copy_(p * alpha + p0 * (1 - alpha))


def named_seed(seed: int, purpose: str) -> int:
    digest = int(hashlib.sha256(purpose.encode()).hexdigest()[:8], 16)
    return (seed + digest) % (2**31 - 1)


def virtual_vocabulary(n: int, length: int, vocab: int, sot: int, eot: int, context: int,
                       generator: torch.Generator) -> torch.Tensor:
    """helpers.py ``virtual_vocab``: [n, context] int64, each row SOT + ``length`` ids uniform over [0, vocab) +
    EOT, zero-padded."""
    ids = torch.randint(0, vocab, (n, length), generator=generator)
    out = torch.zeros(n, context, dtype=torch.long)
    out[:, 0] = sot
    out[:, 1:length + 1] = ids
    out[:, length + 1] = eot
    return out


def memory_quotas(memory_size: int, t: int, rule: str) -> tuple[int, int]:
    """(exemplars kept per older dataset, exemplars of the new one) when the t-th dataset (1-based) joins.
    ``fixed``: K // t each; ``official``: old K // t, new K - K // t (dynamic_dataset.py); t = 1: (0, K)."""
    if t <= 1:
        return 0, memory_size
    old = memory_size // t
    return old, old if rule == "fixed" else memory_size - old


# ---------------------------------------------------------------------------------------------- the loop

@dataclass
class ContinualCLIPConfig(CLIPConfig):
    lr: float = 1e-5  # where no per-dataset table applies (the ZSCL scripts' rate for most datasets)


@dataclass
class DistilConfig(ContinualCLIPConfig):
    image_kd: float = 1.0  # weight of the image->text distillation (--image_loss)
    text_kd: float = 1.0  # weight of the text->image distillation (--text_loss)
    temperature: float = 2.0

    LIMITS = {**ContinualCLIPConfig.LIMITS, "temperature": (1e-3, None)}


class ContinualCLIP(CLIPMethod):
    """The ZSCL repository's training loop (module docstring). A method chooses its teacher (``make_teacher``), its
    reference images (``reference_images``) and reference texts (``reference_tokens``); its config's ``image_kd``,
    ``text_kd``, ``temperature``, ``l2`` and ``we_every`` switch the loop's terms (absent: off)."""

    Config = ContinualCLIPConfig
    lr_tables = {"mtil": ZSCL_MTIL_LR, "mtil-fewshot": ZSCL_MTIL_LR}
    presets = {d: dict(_CIL) for d in _CIL_DATASETS}
    quick = dict(_QUICK)

    def __init__(self, cfg, backbone, scenario):
        super().__init__(cfg, backbone, scenario)
        self.clip_scale().requires_grad_(False)  # the official excludes logit_scale from the optimiser
        self.teacher: Teacher | None = None
        self.ref_text: torch.Tensor | None = None  # the teacher's normalised reference-text embeddings [N, D]
        self.start: list[torch.Tensor] | None = None  # the task-start weights (L2, WiSE)
        self.average: WeightAverage | None = None

    # ---- what trains
    def clip_scale(self) -> torch.Tensor:
        return self.backbone.model.logit_scale

    def trained_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.backbone.named_parameters() if not name.endswith("logit_scale")]

    def param_groups(self, task):
        return [dict(params=self.trained_parameters(), lr=self.lr_for(task))]

    def _setting(self, name: str) -> float:
        return float(getattr(self.cfg, name, 0.0))

    @property
    def wise(self) -> bool:
        return hasattr(self.cfg, "alpha")

    # ---- distillation hooks (none by default)
    def make_teacher(self, task) -> Teacher | None:
        return None

    def reference_images(self, task, ctx) -> Any:
        return None

    def reference_tokens(self, task, ctx) -> torch.Tensor:
        raise NotImplementedError

    def reference_text(self, task, ctx) -> torch.Tensor:
        """The teacher's normalised embeddings of the reference texts."""
        assert self.teacher is not None
        tokens = self.reference_tokens(task, ctx).to(ctx.device)
        rows = [self.teacher.run(lambda m: m.encode_text(tokens[i:i + 256]), tokens).float()
                for i in range(0, tokens.shape[0], 256)]
        return F.normalize(torch.cat(rows), dim=-1)

    # ---- hooks
    def before_fit(self, task, ctx):
        super().before_fit(task, ctx)
        params = list(self.backbone.parameters())
        if self._setting("l2") > 0 or self.wise:
            self.start = [p.detach().clone() for p in params]
        if self._setting("we_every") > 0:
            self.average = WeightAverage(params)
        distils = self._setting("image_kd") > 0 or self._setting("text_kd") > 0
        self.teacher = self.make_teacher(task) if distils else None
        self.ref_text = self.reference_text(task, ctx) if self.teacher is not None else None

    def aux_streams(self, task, ctx):
        data = self.reference_images(task, ctx) if self.teacher is not None else None
        return {} if data is None else {"reference": Stream(data, augment=False)}

    def training_step(self, batch):
        ce = self.task_loss(batch)
        loss, terms = ce, {"ce": ce}
        ref = batch.aux.get("reference")
        if ref is not None and self.teacher is not None:
            teacher_images = self.teacher(ref.images)
            to_text, to_image = zscl_kd(self.encode_image(ref.images), teacher_images, self.ref_text,
                                        self.clip_scale().exp(), self.cfg.temperature)
            loss = loss + self.cfg.image_kd * to_text + self.cfg.text_kd * to_image
            terms.update(kd_image=to_text, kd_text=to_image)
        if self._setting("l2") > 0:
            l2 = l2_distance(self.backbone.parameters(), self.start)
            loss = loss + self.cfg.l2 * l2
            terms["l2"] = l2
        return StepOutput(loss, terms)

    def after_step(self, step):
        if self.average is not None and step % self.cfg.we_every == 0:
            self.average.add(self.backbone.parameters())

    def after_task(self, task, ctx):
        if self.average is not None:
            self.average.copy_to(self.backbone.parameters())
            ctx.log(we_models=self.average.models)
        if self.wise and self.start is not None:
            wise_merge(self.backbone.parameters(), self.start, self.cfg.alpha)
        self.teacher, self.ref_text, self.start, self.average = None, None, None, None
        super().after_task(task, ctx)


_FT = "full fine-tuning of both CLIP encoders, CE over the current dataset's prompts"


@register_method("continual-ft", paper=f"{_PAPER}: Continual-FT baseline", summary=_FT, **_META)
class ContinualFT(ContinualCLIP):
    @dataclass
    class Config(ContinualCLIPConfig):
        independent: bool = False  # every task from the pre-trained weights (the Full Fine-tune upper bound)

    def __init__(self, cfg, backbone, scenario):
        super().__init__(cfg, backbone, scenario)
        self.pretrained_state = {k: v.detach().clone() for k, v in backbone.state_dict().items()} \
            if cfg.independent else None

    def before_fit(self, task, ctx):
        if self.pretrained_state is not None:
            self.backbone.load_state_dict(self.pretrained_state)
        super().before_fit(task, ctx)


@register_method("wise-ft", paper=f"{_PAPER}: WiSE-FT baseline (Wortsman et al., CVPR 2022)",
                 summary=f"{_FT}, then each task's weights interpolated with the task-start weights", **_META)
class WiSEFT(ContinualCLIP):
    @dataclass
    class Config(ContinualCLIPConfig):
        alpha: float = 0.8  # theta <- alpha theta_ft + (1 - alpha) theta_task_start

        LIMITS = {**ContinualCLIPConfig.LIMITS, "alpha": (0, 1)}

    quick = dict(_QUICK, **_ANCHORED)


@register_method("lwf", paper=f"{_PAPER}: LwF baseline (Li & Hoiem, ECCV 2016)",
                 summary=f"{_FT}, distilled from the previous model on the current images and class prompts",
                 **_META)
class LwF(ContinualCLIP):
    Config = DistilConfig
    presets = {d: dict(_CIL_KD) for d in _CIL_DATASETS}
    quick = dict(_QUICK_KD)

    def make_teacher(self, task):
        return Teacher.snapshot(self.backbone)  # the model as the previous task left it (loaded on resume)

    def reference_images(self, task, ctx):
        return ctx.train

    def reference_tokens(self, task, ctx):
        return self.backbone.tokenize(self.train_sets[task.index].prompts())


@register_method("lwf-vr", paper=f"{_PAPER}: LwF-VR baseline (Ding et al., 2022)",
                 summary=f"{_FT}, distilled from the previous model on the current images and 1000 random "
                         f"token sentences", **_META)
class LwFVR(LwF):
    @dataclass
    class Config(DistilConfig):
        vocab_size: int = 1000  # virtual sentences
        vocab_length: int = 10  # random tokens per sentence

        LIMITS = {**DistilConfig.LIMITS, "vocab_size": (1, None), "vocab_length": (1, 75)}

    def __init__(self, cfg, backbone, scenario):
        super().__init__(cfg, backbone, scenario)
        empty = backbone.tokenize([""])[0]  # [SOT, EOT, 0, ...]
        vocab = backbone.model.token_embedding.num_embeddings
        if cfg.vocab_length + 2 > empty.shape[0]:
            raise CilbenchError(f"--set vocab_length={cfg.vocab_length}: at most {empty.shape[0] - 2} tokens fit "
                                f"between SOT and EOT")
        gen = torch.Generator().manual_seed(named_seed(scenario.seed, "lwf-vr-vocabulary"))
        self.register_buffer("vocabulary", virtual_vocabulary(cfg.vocab_size, cfg.vocab_length, vocab,
                                                              int(empty[0]), int(empty[1]), empty.shape[0], gen))

    def reference_tokens(self, task, ctx):
        return self.vocabulary


@register_method("zscl", paper=_PAPER, summary=f"{_FT}, distilled from the pre-trained CLIP on reference images and "
                 f"captions, L2 to the task start, weight ensemble", **_META)
class ZSCL(ContinualCLIP):
    @dataclass
    class Config(DistilConfig):
        ref_images: str = "imagenet"  # prepared store of reference images (ImageNet's training set in the paper)
        ref_captions: str = ""  # caption file (Conceptual Captions validation: ZSCL's gather_cc.py CSV); required

        FREE_TEXT = frozenset({"ref_images", "ref_captions"})
        l2: float = 1.0
        we_every: int = 100  # weight ensemble every that many iterations (0: off)

    presets = {d: dict(_CIL_KD, ref_images="conceptual-captions", l2=0.0, we_every=10) for d in _CIL_DATASETS}
    quick = dict(_QUICK_KD, **_ANCHORED, ref_images="synthetic", ref_captions="builtin:tiny", l2=0.01, we_every=4)

    def __init__(self, cfg, backbone, scenario):
        super().__init__(cfg, backbone, scenario)
        self.pretrained = Teacher.snapshot(backbone)  # before any training, and before a resume loads weights
        self.captions: torch.Tensor | None = None

    @classmethod
    def references(cls, cfg, scenario):
        if not cfg.ref_captions:
            raise CilbenchError("zscl needs reference captions: --set ref_captions=FILE (the Conceptual Captions "
                                "validation captions, ZSCL's gather_cc.py CSV, or one caption per line)")
        images = "ImageNet's training set in the paper" if scenario.kind == "mtil" else \
            "the Conceptual Captions images in the paper"
        return {"images": Reference(store=cfg.ref_images, split="train", setting="ref_images",
                                    purpose=f"zscl's reference images ({images})"),
                "captions": Reference(captions=cfg.ref_captions, purpose="zscl's reference captions",
                                      setting="ref_captions")}

    def make_teacher(self, task):
        return self.pretrained

    def reference_images(self, task, ctx):
        return ctx.reference("images")

    def reference_tokens(self, task, ctx):
        return self.backbone.tokenize(ctx.reference("captions"))

    def reference_text(self, task, ctx):
        if self.captions is None:  # the teacher and the captions never change: encoded once per run
            self.captions = super().reference_text(task, ctx)
        return self.captions


@register_method("icarl-clip", paper=f"{_PAPER}: iCaRL baseline (Rebuffi et al., CVPR 2017)",
                 summary=f"{_FT}, distilled from the pre-trained CLIP on a herded exemplar memory across datasets",
                 **_META)
class ICaRLCLIP(ContinualCLIP):
    @dataclass
    class Config(DistilConfig):
        memory_size: int = 10000  # exemplar images across all datasets (--memory_size)
        candidates: int = 30000  # only a dataset's first that many training images are considered
        memory_rule: str = "fixed"  # fixed: K // t per dataset | official: the new one gets K - K // t

        LIMITS = {**DistilConfig.LIMITS, "candidates": (1, None)}
        CHOICES = {**DistilConfig.CHOICES, "memory_rule": ("fixed", "official")}

    presets = {d: dict(_CIL_KD, memory_size=5000, candidates=10000) for d in _CIL_DATASETS}
    quick = dict(_QUICK_KD, **_ANCHORED, memory_size=40, candidates=100)

    def __init__(self, cfg, backbone, scenario):
        super().__init__(cfg, backbone, scenario)
        self.pretrained = Teacher.snapshot(backbone)
        # one row per exemplar, priority order within a task: (task index, store row, global label)
        self.register_buffer("exemplars", torch.zeros(0, 3, dtype=torch.long))

    @staticmethod
    def _store(task) -> str:
        return task.dataset.partition("/")[0]

    @classmethod
    def references(cls, cfg, scenario):
        stores = dict.fromkeys(cls._store(t) for t in scenario.tasks[:-1])
        return {f"memory:{s}": Reference(store=s, split="train",
                                         purpose=f"icarl-clip's exemplar memory ({s}'s training images)")
                for s in stores}

    def memory_data(self, ctx) -> Any:
        rows = self.exemplars.cpu().numpy()
        parts = []
        for t in np.unique(rows[:, 0]):
            mine = rows[rows[:, 0] == t]
            store = ctx.reference(f"memory:{self._store(self.scenario.tasks[int(t)])}")
            parts.append(type(ctx.train)(store.images, mine[:, 1], mine[:, 2]))
        return type(ctx.train).concat(parts)

    def make_teacher(self, task):
        return self.pretrained if len(self.exemplars) else None  # task 1: plain fine-tuning

    def reference_images(self, task, ctx):
        return self.memory_data(ctx)

    def reference_tokens(self, task, ctx):
        return self.backbone.tokenize(self.train_sets[task.index].prompts())

    def after_task(self, task, ctx):
        super().after_task(task, ctx)
        cfg = self.cfg
        candidates = ctx.train.subset(np.arange(len(ctx.train)) < cfg.candidates)
        old, new = memory_quotas(cfg.memory_size, task.index + 1, cfg.memory_rule)
        if task.index == 0:
            picked = torch.arange(min(new, len(candidates)))
        else:
            feats, _ = ctx.features(self.backbone, data=candidates)  # the just-trained model, test transform
            picked = herding_pycil(feats, new)
        rows = self.exemplars.cpu()
        kept = [rows[rows[:, 0] == t][:old] for t in rows[:, 0].unique().tolist()]
        fresh = torch.stack([torch.full((len(picked),), task.index, dtype=torch.long),
                             torch.as_tensor(candidates.indices[picked.numpy()], dtype=torch.long),
                             torch.as_tensor(candidates.labels[picked.numpy()], dtype=torch.long)], dim=1)
        self.exemplars = torch.cat([*kept, fresh]).to(self.exemplars.device)
        ctx.log(memory=len(self.exemplars), memory_per_dataset=[len(k) for k in kept] + [len(fresh)])

    def load_checkpoint_state(self, state):
        if "exemplars" in state:  # the memory grows: take the saved size before loading
            self.exemplars = torch.empty_like(state["exemplars"], device=self.exemplars.device)
        super().load_checkpoint_state(state)
