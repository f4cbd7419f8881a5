"""Loss functions shared by the methods, each the equation it names: the adapter family's cosine losses, and the
knowledge-distillation losses of the rehearsal and CLIP families (``kd_*``, at the end).

``cos`` arguments are cosine similarities in [-1, 1] (``CosineHead`` output); targets index their columns.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def margin_cosine_ce(cos: torch.Tensor, targets: torch.Tensor, s: float, m: float) -> torch.Tensor:
    """CICAE eq. (2), the CosFace loss: ``-log e^{s(cos_y - m)} / (e^{s(cos_y - m)} + sum_{c != y} e^{s cos_c})``,
    batch mean. ``m = 0`` is the plain scaled-cosine cross-entropy."""
    margin = F.one_hot(targets, cos.shape[-1]).to(cos.dtype) * m
    return F.cross_entropy(s * (cos.float() - margin), targets)


def cosine_ce(cos: torch.Tensor, targets: torch.Tensor, tau: float) -> torch.Tensor:
    """CICAE eq. (5): cross-entropy of ``cos / tau``, batch mean."""
    return F.cross_entropy(cos.float() / tau, targets)


def pairwise_kl(logits: torch.Tensor) -> torch.Tensor:
    """CICAE eq. (4) and (6): ``sum over ordered pairs k1 != k2 of KL(p_k1 || p_k2)``, with ``p_k = softmax(l_k)``,
    each KL summed over classes and averaged over the batch. ``logits`` is ``[K, B, C]``; gradients reach every
    expert (no side is detached; the sum over ordered pairs makes the term symmetric). Zero when K = 1."""
    logp = F.log_softmax(logits.float(), dim=-1)  # [K, B, C]
    p = logp.exp()
    # KL(p_i || p_j) = sum_c p_i (log p_i - log p_j); the i == j terms are exactly zero
    cross = torch.einsum("ibc,jbc->ijb", p, logp)  # sum_c p_i log p_j
    self_term = (p * logp).sum(-1)  # [K, B]: sum_c p_i log p_i
    kl = (self_term.unsqueeze(1) - cross).mean(-1)  # [K, K]: batch-mean KL(p_i || p_j)
    off = ~torch.eye(kl.shape[0], dtype=torch.bool, device=kl.device)
    return kl[off].sum()


# ---- knowledge distillation (LwF, iCaRL, DyTox / DNE, ZSCL) ----
# The teacher's logits are detached; pass the old classes' columns of both (``student[:, :n_old]``) where the
# reference distils on old classes only. Softmax / sigmoid are taken in float32.

_REDUCTIONS = ("batchmean", "mean", "sum", "none")


def _reduce(per_element: torch.Tensor, reduction: str) -> torch.Tensor:
    """``batchmean``: sum over classes, mean over the batch; ``mean``: mean over every element (``F.kl_div``'s and
    Lasagne's ``mean``); ``sum``; ``none``: one value per sample (summed over classes)."""
    if reduction == "batchmean":
        return per_element.sum() / per_element.shape[0]
    if reduction == "mean":
        return per_element.mean()
    if reduction == "sum":
        return per_element.sum()
    if reduction == "none":
        return per_element.sum(-1)
    raise ValueError(f"unknown reduction {reduction!r} ({', '.join(_REDUCTIONS)})")


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 1.0,
          reduction: str = "batchmean", tau_squared: bool = False) -> torch.Tensor:
    """``KL(p_teacher || p_student)`` with ``p = softmax(logits / tau)`` over the last dimension, times ``tau**2``
    when ``tau_squared`` (Hinton et al. 2015, to keep gradient magnitudes independent of ``tau``).

    References: DyTox / DNE (``continual/engine.py``, ``auto_kd``): ``F.kl_div(log_softmax(s/tau),
    log_softmax(t/tau), reduction='mean', log_target=True) * tau**2`` with ``tau = 1`` -- i.e.
    ``reduction="mean", tau_squared=True`` (the mean over batch x old classes, not per sample; PROTOCOLS-2
    addendum). LwF and ZSCL distil with the soft-target cross-entropy instead: see ``kd_soft_ce``."""
    t = F.log_softmax(teacher_logits.detach().float() / tau, dim=-1)
    s = F.log_softmax(student_logits.float() / tau, dim=-1)
    loss = _reduce(t.exp() * (t - s), reduction)
    return loss * tau ** 2 if tau_squared else loss


def kd_soft_ce(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 1.0,
               reduction: str = "batchmean", tau_squared: bool = False) -> torch.Tensor:
    """``-sum_c p_teacher,c log p_student,c`` with ``p = softmax(logits / tau)``: ``kd_kl`` plus the teacher's
    entropy, a constant in the student (same gradients, a different logged value).

    References:
    * LwF (Li & Hoiem, ECCV 2016 / TPAMI 2018): the "modified cross-entropy" on old-task outputs, T = 2, no
      ``T**2``;
    * PyCIL ``models/lwf.py`` ``_KD_loss``: sum over classes / batch, T = 2, weight 3, no ``T**2`` --
      ``reduction="batchmean"``;
    * ZSCL ``distillation``: ``F.cross_entropy(s/T, softmax(t/T), reduction="mean") * T**2``, T = 2, for ZSCL and
      its LwF / LwF-VR baselines (PROTOCOLS-2 §3.4) -- ``reduction="batchmean", tau_squared=True``."""
    t = F.softmax(teacher_logits.detach().float() / tau, dim=-1)
    s = F.log_softmax(student_logits.float() / tau, dim=-1)
    loss = _reduce(-t * s, reduction)
    return loss * tau ** 2 if tau_squared else loss


def kd_bce(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 1.0,
           reduction: str = "mean") -> torch.Tensor:
    """Binary cross-entropy of ``sigmoid(student / tau)`` against the targets ``sigmoid(teacher / tau)``, class by
    class: ``-(q log p + (1 - q) log(1 - p))``.

    Reference: iCaRL (Rebuffi et al., CVPR 2017, Alg. 3; srebuffi/iCaRL ``main_cifar_100_theano.py``): one sigmoid
    BCE over all output units, averaged over batch x units (Lasagne ``.mean()``), whose targets are the old
    network's sigmoid outputs on old classes and one-hot labels on the others; ``tau = 1``. That loss is this
    function over the old columns and plain BCE over the rest, weighted by their share of the columns. (PyCIL's
    ``icarl.py`` distils with the softmax ``_KD_loss`` of ``kd_soft_ce`` instead.)"""
    q = torch.sigmoid(teacher_logits.detach().float() / tau)
    per_element = F.binary_cross_entropy_with_logits(student_logits.float() / tau, q, reduction="none")
    return _reduce(per_element, reduction)
