"""DDAS, the Distribution Discriminative Auto-Selector of MoE-Adapters (Yu et al., CVPR 2024): per test batch (or per
image), which task's router a CLIP model uses, or whether it falls back to the original zero-shot CLIP.

Facts (shared/PROTOCOLS-2.md §2.4, §2.5, "Disagreements" 5-7 and the addendum; official code
JiazuoYu/MoE-Adapters4CL @4572d97, mtil/src/models/AutoEncoder.py, few_shot_AutoEncoder.py, evaluation.py):

* Features: torchvision's ImageNet AlexNet ``features[:-2]`` (up to conv5's output, before its ReLU and the last
  max-pool), flattened, then sigmoid: 256x13x13 = 43,264 at 224 px. Its input is the **CLIP-preprocessed** image
  (CLIP mean / std; the CLIP train transform while training), not ImageNet-normalised: ``AlexNetFeatures`` takes
  the very tensor the CLIP model sees.
* One autoencoder per set: Linear(D, 100) + ReLU -> Linear(100, D) + Sigmoid, 8,696,164 parameters at D = 43,264
  (the slides' "8.7M"), trained with the MSE against the sigmoid features. All of them live in one ModuleList:
  index 0 the reference set (the official: TinyImageNet), 1..T one per task, all created up front.
* Training: Adam, weight decay 1e-4, batch 64; 1000 iterations on the reference set, 300 per task.
  Full-shot lr: the optimiser is built at 0.003 but every step resets it to 0.01 x 0.1^(epoch // 10), epoch =
  iteration // len(train loader): 0.01 in effect on large sets. Few-shot lr: 0.003 under the same decay; the data
  are the first 5 images per class of one pass of the shuffled, augmented loader, kept fixed (no re-augmentation).
* Inference: the MSE of every autoencoder averaged over the test batch (128 in the official eval), one decision per
  batch; the lowest error wins (a tie goes to the lower index); the reference autoencoder winning, or the lowest
  error strictly above the threshold, means the original CLIP (no adapters in either encoder); an error exactly at
  the threshold keeps its autoencoder. Otherwise task ``winner - 1``'s router is used, in the image and text encoder.
* All task autoencoders compete, also those of tasks not trained yet, with their random initial weights (§7 of the
  disagreements: evaluation.py loops over 1..11 whatever the task).
* Thresholds: 0.0655 in the full-shot scripts (``655e-4``), 0.06 in the few-shot test script (``600e-4``); the
  few-shot train script's eval loop uses 0.0585 (``585e-4``); the slides say 0.065 (full-shot) and 0.06 (few-shot).

Choices made here (each a setting where it can matter):

* ``compete="all"`` (official) or ``"trained"``: the reference autoencoder and those marked trained (``mark_trained``;
  a buffer in the state dict) only.
* ``per_image=False`` (official, one decision per batch) or ``True`` (the same rule per image). With per-batch
  decisions the result depends on how test batches are formed: the official's are 128 images of one dataset.
* Learning rate: constant by default (``lr_decay_every_epochs=None``): the official step decay is NOT reproduced
  unless the caller asks for it with ``lr_decay_every_epochs=10``, which reproduces it exactly through the
  trainer's ``step`` schedule counted in passes over the phase's data (ceil(N / 64) steps per pass). It does fire
  within 300 iterations on small sets: a loader of fewer than 30 batches (< ~1,900 images, e.g. Flowers' 1,020, and
  every few-shot set) is decayed to 0.1x after 10 passes.
* The extractor and the autoencoders compute in float32 (autocast off): errors are compared with a threshold at the
  fourth decimal, and bf16 would blur that. The extractor is frozen, always in eval mode, run under ``no_grad``.
* The extractor is no part of the state dict (it is fixed ImageNet weights, rebuilt on load): ``DDAS`` keeps it out
  of its registered submodules, so ``state_dict``, ``parameters`` and ``load_state_dict`` (also when DDAS is nested
  in a method) see only the autoencoders and the ``trained`` buffer, while ``.to()`` / ``.cuda()`` still move it.
* Weights: ``pretrained=True`` loads torchvision's ``AlexNet_Weights.IMAGENET1K_V1`` file through the torch hub
  cache (``<torch.hub.get_dir()>/checkpoints/alexnet-owt-7be5be79.pth``), with a 10 s socket timeout; a network
  failure is one line naming the offline options. ``weights=PATH`` loads a local file (``weights_only=True``); every
  ``features.*`` tensor up to conv5 must be there, ``classifier.*`` entries are ignored. ``pretrained=False`` is the
  same torchvision class randomly initialised (tests, --quick).
"""

from __future__ import annotations

import contextlib
import io
import socket
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from cilbench.errors import CilbenchError, HubUnreachable
from cilbench.hub import HUB_TIMEOUT_S, network_reason
from cilbench.methods.contract import Batch, Phase

# PROTOCOLS-2 §2.4 (full-shot: mtil/scripts/train/train_full_shot_*.sh, AutoEncoder.py) and §2.5 (few-shot:
# train_few_shot_*.sh, few_shot_AutoEncoder.py). lr_decay_every_epochs: the official 0.1x every 10 passes over the
# train loader (not applied unless passed to ``DDAS.phase``; see the module docstring).
FULL_SHOT: dict[str, Any] = dict(lr=0.01, reference_iterations=1000, task_iterations=300, threshold=0.0655,
                                 lr_decay_every_epochs=10)
FEW_SHOT: dict[str, Any] = dict(lr=0.003, reference_iterations=1000, task_iterations=300, threshold=0.06,
                                lr_decay_every_epochs=10, shots=5)
# other thresholds of the official material: the few-shot train script's eval loop and the slides' full-shot value
FEW_SHOT_TRAIN_EVAL_THRESHOLD = 0.0585
SLIDES_FULL_SHOT_THRESHOLD = 0.065
BATCH_SIZE = 64
WEIGHT_DECAY = 1e-4
HIDDEN = 100

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
COMPETE = ("all", "trained")


def _fp32(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off (the trainer runs steps under bf16 autocast on CUDA)."""
    return torch.autocast(device_type=device.type, enabled=False) if device.type in ("cuda", "cpu") \
        else contextlib.nullcontext()


class AlexNetFeatures(nn.Module):
    """sigmoid(flatten(AlexNet.features[:-2](images))), frozen. ``images``: the CLIP-preprocessed batch."""

    def __init__(self, pretrained: bool = True, weights: str | Path | None = None, input_size: int = 224):
        super().__init__()
        from torchvision.models import alexnet

        net = alexnet(weights=None)  # random init (global RNG); replaced below when weights are asked for
        if weights is not None:
            _load_features(net, _read_file(Path(weights)), f"weights file {weights}")
        elif pretrained:
            _load_features(net, _download(), f"the torch hub file {ALEXNET_FILE}")
        self.body = net.features[:-2]  # keeps the Sequential's indices: keys "0.weight", "3.weight", ... "10.bias"
        del net  # the classifier (58.6 M parameters) is not needed
        self.body.requires_grad_(False)
        self.input_size = input_size
        self.eval()
        with torch.no_grad():
            self.feature_dim = int(self.body(torch.zeros(1, 3, input_size, input_size)).flatten(1).shape[1])

    def train(self, mode: bool = True) -> "AlexNetFeatures":
        return super().train(False)  # always in eval mode

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        weight = self.body[0].weight
        with _fp32(images.device):
            return torch.sigmoid(self.body(images.to(weight.dtype)).flatten(1))


def _download() -> dict[str, torch.Tensor]:
    """torchvision's ImageNet AlexNet weights from the torch hub cache, downloaded when missing (10 s timeout)."""
    from torchvision.models import AlexNet_Weights

    url = AlexNet_Weights.IMAGENET1K_V1.url
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(HUB_TIMEOUT_S)  # torch.hub's urlopen takes no timeout of its own
    said = io.StringIO()  # torch.hub writes "Downloading: ..." to stdout: sent to stderr on success, else dropped
    try:
        with contextlib.redirect_stdout(said):
            state = torch.hub.load_state_dict_from_url(url, model_dir=str(folder), map_location="cpu",
                                                       progress=False, check_hash=True, file_name=ALEXNET_FILE,
                                                       weights_only=True)
        sys.stderr.write(said.getvalue())
        return state
    except Exception as err:
        reason = network_reason(err)
        if reason is None:
            if (folder / ALEXNET_FILE).is_file():
                first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
                raise CilbenchError(f"the AlexNet weights file {folder / ALEXNET_FILE} (DDAS's feature extractor) "
                                    f"cannot be read ({first}); delete it to download it again") from None
            raise
        raise HubUnreachable(
            f"could not download the AlexNet weights (DDAS's feature extractor) from {url} ({reason}); offline: "
            f"place {ALEXNET_FILE} in {folder}/ or pass a local file with weights=PATH") from None
    finally:
        socket.setdefaulttimeout(old)


def _read_file(path: Path) -> Mapping[str, Any]:
    if not path.is_file():
        raise CilbenchError(f"no AlexNet weights file {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise CilbenchError(f"the AlexNet weights file {path} cannot be read as a state dict: {first}") from None
    if not isinstance(state, Mapping):
        raise CilbenchError(f"the AlexNet weights file {path} holds a {type(state).__name__}, not a state dict")
    return state


def _load_features(net: nn.Module, state: Mapping[str, Any], what: str) -> None:
    """Load the ``features.*`` tensors up to conv5 into ``net``; ``classifier.*`` entries are ignored."""
    keep = [f"features.{k}" for k in net.features[:-2].state_dict()]  # in layer order
    missing = [k for k in keep if k not in state]
    unexpected = sorted(k for k in state if k not in keep and not k.startswith("classifier."))
    if missing or unexpected:
        def names(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
        parts = ([f"missing {names(missing)}"] if missing else []) + \
                ([f"unexpected {names(unexpected)}"] if unexpected else [])
        raise CilbenchError(f"{what} does not fit torchvision's AlexNet (DDAS's feature extractor): "
                            f"{'; '.join(parts)}")
    try:
        net.load_state_dict({k: state[k] for k in keep}, strict=False)
    except RuntimeError as err:  # a shape mismatch
        first = (str(err).strip().splitlines() or ["shape mismatch"])[-1].strip()[:300]
        raise CilbenchError(f"{what} does not fit torchvision's AlexNet (DDAS's feature extractor): {first}") \
            from None


class AutoEncoder(nn.Module):
    """Linear(D, hidden) + ReLU -> Linear(hidden, D) + Sigmoid."""

    def __init__(self, dim: int, hidden: int = HIDDEN):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU())
        self.decoder = nn.Sequential(nn.Linear(hidden, dim), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class DDAS(nn.Module):
    """The reference autoencoder (index 0) and one per task (index t + 1 for task t) over frozen AlexNet features.

    ``select`` returns a task id per image (-1: the original CLIP). Autoencoder indices (``phase``, ``mark_trained``,
    rows of ``reconstruction_errors``) count the reference set as 0.
    """

    def __init__(self, num_tasks: int, extractor: AlexNetFeatures, hidden: int = HIDDEN,
                 threshold: float = FULL_SHOT["threshold"], per_image: bool = False, compete: str = "all"):
        super().__init__()
        if compete not in COMPETE:
            raise CilbenchError(f"unknown DDAS compete={compete!r} ({', '.join(COMPETE)})")
        if num_tasks < 1:
            raise ValueError("DDAS needs at least one task")
        object.__setattr__(self, "_extractor", extractor)  # not a registered submodule: no state dict, no params
        self.num_tasks, self.threshold, self.per_image, self.compete = num_tasks, threshold, per_image, compete
        self.autoencoders = nn.ModuleList(AutoEncoder(extractor.feature_dim, hidden) for _ in range(num_tasks + 1))
        self.register_buffer("trained", torch.zeros(num_tasks + 1, dtype=torch.bool))

    @property
    def extractor(self) -> AlexNetFeatures:
        return self._extractor

    def _apply(self, fn: Callable, recurse: bool = True) -> "DDAS":  # .to(), .cuda(), .float() move the extractor
        super()._apply(fn, recurse)
        if recurse:
            self._extractor._apply(fn)
        return self

    def autoencoder_parameters(self) -> int:
        """Parameters of one autoencoder (the official "8.7M")."""
        return sum(p.numel() for p in self.autoencoders[0].parameters())

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self._extractor(images)

    @torch.no_grad()
    def reconstruction_errors(self, images: torch.Tensor) -> torch.Tensor:
        """[num_autoencoders, B]: each autoencoder's MSE per image (mean over the feature dims)."""
        feats = self.features(images)
        with _fp32(feats.device):
            return torch.stack([(ae(feats.to(_dtype(ae))) - feats).pow(2).mean(1).float()
                                for ae in self.autoencoders])

    @torch.no_grad()
    def select(self, images: torch.Tensor, per_image: bool | None = None,
               threshold: float | None = None) -> torch.Tensor:
        """int64 [B]: the chosen task id of each image, -1 for the original CLIP (defaults: the constructor's)."""
        return self.decide(self.reconstruction_errors(images), per_image, threshold)

    def decide(self, errors: torch.Tensor, per_image: bool | None = None,
               threshold: float | None = None) -> torch.Tensor:
        """The rule of ``select`` on given errors [num_autoencoders, B] (a NaN error counts as +inf)."""
        per_image = self.per_image if per_image is None else per_image
        threshold = self.threshold if threshold is None else threshold
        n, b = errors.shape
        errors = errors.float().nan_to_num(nan=float("inf"))
        if self.compete == "trained":  # the reference always competes; untrained task autoencoders do not
            keep = self.trained.to(errors.device).clone()
            keep[0] = True
            errors = errors.masked_fill(~keep[:, None], float("inf"))
        if not per_image:
            errors = errors.mean(1, keepdim=True)  # one decision for the whole batch
        best = errors.min(0).values
        index = torch.arange(n, device=errors.device)[:, None].expand_as(errors)
        winner = torch.where(errors == best, index, n).min(0).values  # the lowest index among the minima
        choice = torch.where((winner == 0) | (best > threshold) | ~torch.isfinite(best), -1, winner - 1)
        return choice.repeat(b) if not per_image else choice

    def mark_trained(self, index: int) -> None:
        """Autoencoder ``index`` (0: reference, t + 1: task t) has been trained."""
        self.trained[index] = True

    def phase(self, index: int, data: Any, iterations: int, lr: float, name: str, augment: bool = True,
              lr_decay_every_epochs: int | None = None) -> Phase:
        """The trainer phase that fits autoencoder ``index`` on ``data`` (None: the task's training data).

        Adam (weight decay 1e-4), batch 64, ``iterations`` steps, constant ``lr`` without warmup; with
        ``lr_decay_every_epochs=k`` the lr is multiplied by 0.1 every k passes over the data (the official k = 10).
        ``augment``: the CLIP train transform (official); False for data kept fixed (the few-shot sets).
        """
        ae = self.autoencoders[index]

        def step(batch: Batch) -> torch.Tensor:
            feats = self.features(batch.images)
            with _fp32(feats.device):
                return F.mse_loss(ae(feats.to(_dtype(ae))), feats.to(_dtype(ae)))

        decay: dict[str, Any] = dict(schedule="constant")
        if lr_decay_every_epochs:
            k = lr_decay_every_epochs
            decay = dict(schedule="step", lr_gamma=0.1, lr_milestones=tuple(range(k, iterations + 1, k)) or (k,))
        return Phase(name, step, [dict(params=list(ae.parameters()))], data=data, iterations=iterations,
                     batch_size=BATCH_SIZE, optimizer="adam", lr=lr, weight_decay=WEIGHT_DECAY,
                     schedule_unit="iteration", warmup_epochs=0, augment=augment, frozen=(self._extractor,), **decay)

    def extra_repr(self) -> str:
        return (f"num_tasks={self.num_tasks}, feature_dim={self._extractor.feature_dim}, threshold={self.threshold}, "
                f"per_image={self.per_image}, compete={self.compete!r}")


def _dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype
