"""DNE's task attention block (TAB): cross-task attention that replaces the ViT MLP (Hu et al., CVPR 2023).

This module holds only the dense MLP machinery the ``dne`` method will be built on. Notation follows the paper
(``../shared/papers/dne.txt``, section "Dense Network Expansion"); checked facts about the official code
(BinahHu/DNE, ``continual/split_blocks.py``: ``split_Linear``, ``Task_Attn``, ``Proj_wAttn``) come from
``../shared/PROTOCOLS-2.md`` section 4.1, "Disagreements" items 9-11 and the DNE bullets of its Addendum. Our own
code; nothing is copied from the official repository.

Equations
---------
Task t's expert has H_t heads of width D (32 at full size). For patch p:

* (16) the TA input of task t is the concatenation of its heads, ``s_p^t = s_p^{t,1} (+) ... (+) s_p^{t,H_t}``.
  Here a tensor ``[..., H, D]`` holds the heads of all tasks so far, old tasks first.
* (18) ``o_p^t = GELU(TA(LN(s_p^1, ..., s_p^t)))``: the first TA maps every D-wide head to a D'-wide one
  (D' = gamma D, gamma = ``mlp_ratio`` = 4, so 128 at full size). ``TaskAttentionMLP.hidden``.
* (17) ``r_p^t = s_p^t + TA(LN(o_p^1, ..., o_p^t))``: the second TA maps the D'-wide hidden heads of all tasks back
  to D-wide heads of task t. The residual add and the outer LN are the transformer block's (its ``norm2``), not
  here: ``TaskAttentionMLP.out`` returns only the TA term.
* (19) queries from task t's heads only, ``Q_p^{t,i} = W_q LN(s_p^{t,i})``, W_q shared by the heads, no bias.
* (20) keys from all H = sum_k H_k heads, ``K_p^{i,j} = W_k LN(s_p^{i,j})``, W_k shared, no bias.
* (21) ``A_p^i = SoftMax(C_p^i / sqrt(d_q))`` with ``C_p = Q_p^T K_p`` in R^{H_t x H}: softmax over all heads.
* (22) ``V_p^{i,j} = W_v^{i,j} LN(s_p^{i,j})``: a separate Linear (with bias) per input head, D_in -> D_out.
* (23) ``o_p^{t,i} = GELU(lambda_i sum_j A_p^{i,j} V_p^j)``: the GELU is applied by ``TaskAttentionMLP`` between
  the two TAs (the MLP's own activation, as in the code); ``TaskAttention`` returns ``lambda_i sum_j A V``.

Where the paper and the official code differ (each one is a constructor setting; the constructor defaults are the
official code's, which produced the published numbers; the ``dne`` method's config is where the run's defaults are
chosen, and the project's rule is the paper's reading there, with the code's as a setting)
-----------------------------------------------------------------------------------------------------------------
* lambda: ``lambda_mode="module"`` (default, code): one learned scalar per TA module, initialised to the number of
  old heads (12 at task 2 with a 12-head first task), multiplied onto the softmaxed attention. Because the values
  carry their bias, lambda scales the value biases too (identical to scaling ``sum_j A V``). ``lambda_mode="head"``
  (paper, eq. 23): one lambda_i per query head of the new task; the paper gives no initial value, so we use the
  same one. ``lambda_init`` overrides both (a task with no old heads gets 1.0 instead of 0).
* LayerNorm: ``norm=False`` (default, code): no LN inside the TA; the block's LN (norm2) comes before the MLP.
  ``norm=True`` (paper, eqs. 19-22): one LayerNorm per input head, shared by its query/key/value (the same
  ``LN(s_p^{i,j})`` appears in all three). These LNs belong to the new task's module, so they train with it even
  on old heads' inputs.
* q/k size in the second linear (eq. 17): the paper says the procedure is (19)-(23) "with head size D"; the code
  builds its second TA with the hidden head width, so W_q, W_k are D' x D' (128 x 128) and the scale is D'^-0.5
  (Addendum). We follow the code: ``TaskAttention(d_q=None)`` means d_q = d_in; ``TaskAttentionMLP(qk_dim2=...)``
  can set another size (e.g. D) for the second TA.
* Not reproduced: the plain ``nn.Linear`` the code's ``split_Linear.expand`` creates for every new task is never
  used by the forward pass (only the attention-weighted projection is) but counts as parameters there; it does
  not exist here, so our parameter counts are smaller than the code's by that Linear.
* Init: weights ~ trunc_normal(std 0.02), biases 0, as the code's ``_init_weights`` / timm ViTs.
* The first task is a plain ViT MLP over its own heads (eqs. 13-15; the code's ``linear_list[0]``). Its D'-wide
  hidden output, cut into H_1 heads of D', is what later tasks' second TA reads as the old hidden heads.

Old tasks
---------
``DenseMLP`` keeps one module per task. Old tasks are frozen (``requires_grad=False``) when ``expand`` adds a new
one, and their outputs (hidden and final) are recomputed under ``torch.no_grad`` from their own heads' inputs
only, so training a new task can never change them. A new task reads old heads as inputs (keys and values).

NOT here yet
------------
The split spatial self-attention whose new heads see only their own task's features, the split patch/positional
embeddings and LayerNorms, the task tokens and per-task classifiers, the divergence head, the loss, memory and
balanced finetuning: the ``dne`` method itself.
"""

from __future__ import annotations

import contextlib
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from cilbench.errors import CilbenchError

LambdaMode = Literal["module", "head"]


def _init_linear_weight(w: torch.Tensor) -> None:
    nn.init.trunc_normal_(w, std=0.02)


class TaskAttention(nn.Module):
    """One TA layer for a new task's heads (eqs. 19-23, without the GELU).

    Input ``x`` of shape ``[..., H_all, d_in]``: the per-head features of all heads so far, old heads first and
    this task's ``new_heads`` heads last. Output ``[..., new_heads, d_out]``::

        q_i = W_q LN_i(x_i)           for the new heads i             (19)
        k_j = W_k LN_j(x_j)           for all heads j                 (20)
        A_i = softmax_j(q_i . k_j * d_q ** -0.5)                      (21)
        v_j = W_v^j LN_j(x_j) + b_v^j                                 (22)
        out_i = lambda_i * sum_j A_ij v_j                             (23)

    ``LN`` is the identity unless ``norm=True``. ``lambda_mode="module"``: one lambda shared by all i.
    """

    def __init__(self, old_heads: int, new_heads: int, d_in: int, d_out: int, d_q: Optional[int] = None,
                 lambda_mode: LambdaMode = "module", norm: bool = False, lambda_init: Optional[float] = None):
        super().__init__()
        if old_heads < 0 or new_heads < 1 or d_in < 1 or d_out < 1:
            raise CilbenchError(f"TaskAttention: bad sizes old_heads={old_heads} new_heads={new_heads} "
                                f"d_in={d_in} d_out={d_out}")
        if lambda_mode not in ("module", "head"):
            raise CilbenchError(f"TaskAttention: lambda_mode must be 'module' or 'head', not {lambda_mode!r}")
        self.old_heads, self.new_heads = old_heads, new_heads
        self.all_heads = old_heads + new_heads
        self.d_in, self.d_out = d_in, d_out
        self.d_q = d_q or d_in
        self.scale = self.d_q ** -0.5
        self.lambda_mode, self.use_norm = lambda_mode, norm
        self.q = nn.Linear(d_in, self.d_q, bias=False)
        self.k = nn.Linear(d_in, self.d_q, bias=False)
        # W_v^{j}: one (d_out x d_in) matrix and bias per input head, stored stacked for one einsum.
        self.v_weight = nn.Parameter(torch.empty(self.all_heads, d_out, d_in))
        self.v_bias = nn.Parameter(torch.zeros(self.all_heads, d_out))
        init = float(lambda_init if lambda_init is not None else (old_heads if old_heads > 0 else 1.0))
        n_lambda = 1 if lambda_mode == "module" else new_heads
        self.lam = nn.Parameter(torch.full((n_lambda,), init))
        self.norms = nn.ModuleList([nn.LayerNorm(d_in) for _ in range(self.all_heads)]) if norm else None
        _init_linear_weight(self.q.weight)
        _init_linear_weight(self.k.weight)
        _init_linear_weight(self.v_weight)

    def normed(self, x: torch.Tensor) -> torch.Tensor:
        if self.norms is None:
            return x
        return torch.stack([ln(x[..., j, :]) for j, ln in enumerate(self.norms)], dim=-2)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """``lambda_i * A_ij`` of shape ``[..., new_heads, H_all]`` (eqs. 19-21 and the lambda of 23)."""
        return self._attention(self.normed(self._check(x)))

    def values(self, x: torch.Tensor) -> torch.Tensor:
        """``V^j`` of shape ``[..., H_all, d_out]`` (eq. 22)."""
        return self._values(self.normed(self._check(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xn = self.normed(self._check(x))
        return self._attention(xn) @ self._values(xn)              # [..., H_t, d_out]

    def _attention(self, xn: torch.Tensor) -> torch.Tensor:
        q = self.q(xn[..., self.old_heads:, :])                     # [..., H_t, d_q]
        k = self.k(xn)                                              # [..., H, d_q]
        attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
        return attn * self.lam[:, None]

    def _values(self, xn: torch.Tensor) -> torch.Tensor:
        return torch.einsum("...hi,hoi->...ho", xn, self.v_weight) + self.v_bias

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[-2] != self.all_heads or x.shape[-1] != self.d_in:
            raise CilbenchError(f"TaskAttention expects [..., {self.all_heads}, {self.d_in}], got "
                                f"{list(x.shape)}")
        return x


class TaskAttentionMLP(nn.Module):
    """The TAB MLP of one new task: TA(D -> D' per head) -> GELU -> TA(D' -> D) (eqs. 17-18).

    ``hidden(s)``: ``s`` ``[..., H_all, D]`` (all heads' block inputs) -> ``o^t`` ``[..., H_t, D']`` after GELU.
    ``out(o)``: ``o`` ``[..., H_all, D']`` (old tasks' hidden heads, then ``o^t``) -> ``[..., H_t, D]``.
    The second TA's q/k are ``qk_dim2`` wide (default D', the code; see the module docstring).
    """

    def __init__(self, old_heads: int, new_heads: int, head_dim: int = 32, mlp_ratio: int = 4,
                 lambda_mode: LambdaMode = "module", norm: bool = False, qk_dim2: Optional[int] = None):
        super().__init__()
        self.old_heads, self.new_heads, self.head_dim = old_heads, new_heads, head_dim
        self.hidden_dim = head_dim * mlp_ratio
        self.fc1 = TaskAttention(old_heads, new_heads, head_dim, self.hidden_dim, d_q=head_dim,
                                 lambda_mode=lambda_mode, norm=norm)
        self.fc2 = TaskAttention(old_heads, new_heads, self.hidden_dim, head_dim, d_q=qk_dim2 or self.hidden_dim,
                                 lambda_mode=lambda_mode, norm=norm)

    def hidden(self, s: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.fc1(s))

    def out(self, o: torch.Tensor) -> torch.Tensor:
        return self.fc2(o)

    def forward(self, s: torch.Tensor, old_hidden: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``s`` ``[..., H_all, D]``; ``old_hidden`` ``[..., old_heads, D']`` (needed when old_heads > 0)."""
        o = self.hidden(s)
        if self.old_heads:
            if old_hidden is None:
                raise CilbenchError("TaskAttentionMLP.forward needs the old tasks' hidden heads")
            o = torch.cat([old_hidden, o], dim=-2)
        return self.out(o)


class FirstTaskMLP(nn.Module):
    """The first task's plain ViT MLP over its own H_1 heads (eqs. 13-15): Linear -> GELU -> Linear.

    ``hidden`` returns the D'-wide hidden output cut into H_1 heads, ``[..., H_1, D']``.
    """

    def __init__(self, heads: int, head_dim: int = 32, mlp_ratio: int = 4):
        super().__init__()
        self.old_heads, self.new_heads, self.head_dim = 0, heads, head_dim
        self.hidden_dim = head_dim * mlp_ratio
        self.fc1 = nn.Linear(heads * head_dim, heads * self.hidden_dim)
        self.fc2 = nn.Linear(heads * self.hidden_dim, heads * head_dim)
        for fc in (self.fc1, self.fc2):
            _init_linear_weight(fc.weight)
            nn.init.zeros_(fc.bias)

    def hidden(self, s: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc1(s.flatten(-2)))
        return h.unflatten(-1, (self.new_heads, self.hidden_dim))

    def out(self, o: torch.Tensor) -> torch.Tensor:
        return self.fc2(o.flatten(-2)).unflatten(-1, (self.new_heads, self.head_dim))


class DenseMLP(nn.Module):
    """The dense-expanded MLP of one transformer block: a ``FirstTaskMLP`` then one ``TaskAttentionMLP`` per task.

    ``forward(x)``: ``x`` ``[..., H_all * D]`` (the block's LN output, heads of all tasks concatenated, old first)
    -> ``[..., H_all * D]``, each task's heads computed by its own module and concatenated in task order. Task k
    reads the heads of tasks 1..k only. Old tasks run under ``torch.no_grad`` with their frozen modules.
    ``expand(new_heads)`` freezes every existing module and appends a new ``TaskAttentionMLP``.
    """

    def __init__(self, first_heads: int = 12, head_dim: int = 32, mlp_ratio: int = 4,
                 lambda_mode: LambdaMode = "module", norm: bool = False, qk_dim2: Optional[int] = None):
        super().__init__()
        self.head_dim, self.mlp_ratio = head_dim, mlp_ratio
        self.lambda_mode, self.norm, self.qk_dim2 = lambda_mode, norm, qk_dim2
        self.tasks = nn.ModuleList([FirstTaskMLP(first_heads, head_dim, mlp_ratio)])

    @property
    def heads_per_task(self) -> list[int]:
        return [m.new_heads for m in self.tasks]

    @property
    def num_heads(self) -> int:
        return sum(self.heads_per_task)

    def expand(self, new_heads: int) -> TaskAttentionMLP:
        for p in self.tasks.parameters():
            p.requires_grad_(False)
        module = TaskAttentionMLP(self.num_heads, new_heads, self.head_dim, self.mlp_ratio,
                                  lambda_mode=self.lambda_mode, norm=self.norm, qk_dim2=self.qk_dim2)
        ref = next(self.tasks[0].parameters())
        module.to(device=ref.device, dtype=ref.dtype)
        self.tasks.append(module)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.num_heads * self.head_dim:
            raise CilbenchError(f"DenseMLP expects [..., {self.num_heads * self.head_dim}], got {list(x.shape)}")
        s = x.unflatten(-1, (self.num_heads, self.head_dim))
        hiddens, outs, start = [], [], 0
        last = len(self.tasks) - 1
        for k, m in enumerate(self.tasks):
            end = start + m.new_heads
            frozen = k < last
            with torch.no_grad() if frozen else contextlib.nullcontext():
                hiddens.append(m.hidden(s[..., :end, :]))
                outs.append(m.out(torch.cat(hiddens, dim=-2)))
            start = end
        return torch.cat(outs, dim=-2).flatten(-2)
