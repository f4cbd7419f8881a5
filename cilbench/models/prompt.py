"""Prompts on a frozen timm ViT: query-key prompt pools (L2P, DualPrompt's E-prompt), shared prefixes (DualPrompt's
G-prompt), attention-weighted prompt components (CODA-Prompt), and one forward over timm ``VisionTransformer``
blocks that applies them.

Facts (PROTOCOLS-2 §5; LAMDA-PILOT 2647455 ``backbone/prompt.py``, ``backbone/vit_l2p.py``,
``backbone/vit_dualprompt.py``, ``backbone/vit_coda_promtpt.py``, ``utils/inc_net.py``; google-research/l2p dd8836e
``models/prompt.py``, ``models/vit.py``; GT-RIPL/CODA-Prompt 6417d4f ``models/zoo.py``):

* **Query.** ``query(images)``: the frozen backbone's ``pre_logits`` on the un-prompted image, i.e. the CLS token
  after the final LayerNorm (PILOT ``PromptVitNet.forward``: a frozen copy of the pre-trained ViT, ``pre_logits``;
  ``CodaPromptVitNet.forward``: ``backbone(x)[:, 0]`` after ``norm``). Computed without gradients. The backbone is
  frozen here, so the un-prompted pass of the same weights *is* the frozen copy.
* **Key matching** (``select_prompts``): cosine between the query and each learnable key (L2P's ``l2_normalize``:
  ``x / sqrt(max(sum x^2, 1e-12))``), the ``top_k`` most similar keys per image. With ``batchwise`` the ``top_k``
  ids chosen most often over the whole batch replace every image's choice (``batch_majority``). Ties are broken
  towards the lower prompt id, in the per-image ranking and in the majority: the official JAX code's rule
  (``jnp.unique`` ascending, then ``jax.lax.top_k``, which puts the lower index first among equals); PILOT's
  ``torch.topk`` leaves ties to the kernel.
* **Pull constraint** (``pull_term``): ``sum_{b,j} cos(q_b, key_{id_bj}) / B`` over the used ids; the methods
  subtract ``coefficient x`` this from the loss (PILOT ``reduce_sim``; official ``pull_constraint``).
* **Prompt tuning** (L2P): the selected prompts (``top_k x length`` tokens) enter after CLS at the input, token order
  ``[CLS, prompts, patches]``; every prompt slot gets a copy of the CLS position embedding (PILOT's
  ``resize_pos_embed`` with the patch grid: the prefix part of the widened, frozen ``pos_embed`` is the CLS entry
  repeated), ``prompt_position="cls"``. The official JAX model prepends the prompts after the position embeddings
  are added, with none of their own: ``prompt_position="none"``. All prompt slots share one position embedding,
  so the order of the selected prompts does not change any output (attention is permutation-equivariant).
* **Prefix tuning** (DualPrompt, CODA): a prefix is a (key, value) pair of ``L`` full-width vectors ``[B, L, D]``,
  split into heads like the block's own keys (``[B, L, H, D / H]``) and concatenated in front of the block's keys
  and values after the qkv projection (PILOT ``PreT_Attention``; CODA's ``Attention``): queries are the block's
  tokens only, so the sequence length does not change. ``prefix_block`` reuses the block's own modules (norm1,
  attn.qkv, q_norm / k_norm, attn.norm, gate, attn.proj, ls1, drop_path1, norm2, mlp, ls2, drop_path2); the prefix
  keys are not passed through ``k_norm`` (the ViT-B models have none).
* **E-prompt pool with prefixes**: ``[layers, 2, pool, length, D]`` (key half, value half; PILOT / official
  ``same_key_value=False``). **G-prompt**: ``[layers, 2, length, D]``, the same for every image.
  ``layout="paired"``: image ``b`` gets its prompt's key half as keys and value half as values (the official JAX
  code, the paper). PILOT's ``EPrompt.forward`` indexes the pool to ``[layers, 2, B, ...]`` and then *reshapes* it
  to ``[layers, B, 2, ...]`` (a reinterpretation, not a permute), which ``PreT_Attention`` reads as (key, value) per
  image: with the same prompt for the whole batch (prompt mask, batch-wise choice) an image in the first half of the
  batch gets the key half as both keys and values, one in the second half the value half as both (for odd B the
  middle image gets the true pair); ``layout="pilot"`` reproduces that (checked by running those tensor operations
  on a tiny pool, tests/test_prompt.py).
* **Init**: prompts, keys and G-prompts ``U(-1, 1)`` (PILOT ``nn.init.uniform_(p, -1, 1)``, ``init="pilot"``); the
  official JAX code ``nn.initializers.uniform()`` = ``U(0, 0.01)`` (``init="jax"``).
* **CODA-Prompt components** (``CodaComponents``): per prefixed layer, ``M`` components ``P_m`` (``[length, D]``),
  keys ``K_m`` and attention vectors ``A_m`` (``[D_key]``). Weights ``alpha_m = cos(q * A_m, K_m)`` (elementwise
  product, then cosine), prompt ``sum_m alpha_m P_m``; its first half of positions is the key prefix, the second
  half the value prefix. Task ``t`` owns components ``[t * M // T, (t + 1) * M // T)`` (``int(M / T)`` per task;
  T = number of tasks); in training the earlier components are used but detached, at test every component up to
  the current task's. A task's slice of K, A and P (P flattened to ``length x D``) is initialised before the task
  as standard-normal vectors made orthonormal to every earlier component (``gram_schmidt_extend``). PILOT (and the
  official code) subtracts the projection on each earlier component separately, which is orthogonal to their span
  only while they are still orthogonal to each other; trained components are not (no penalty by default), so here
  the projection is onto an orthonormal basis of their span (QR), re-orthogonalised once: the new slice is
  orthogonal to every earlier component to rounding, whatever training did to them. The optional penalty
  ``mu * ((X X^T - I)^2).mean()`` for X = the used K, A and flattened P of each layer (PILOT ``ortho_penalty``).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from cilbench.errors import CilbenchError

__all__ = ["l2_normalize", "cosine_scores", "ranked_ids", "batch_majority", "select_prompts", "pull_term",
           "init_prompt_", "PromptPool", "SharedPrefix", "CodaComponents", "component_weights",
           "gram_schmidt_extend", "orthogonality_penalty", "prefix_attention", "prefix_block", "PromptedViT",
           "INITS", "POSITIONS", "LAYOUTS"]

INITS = ("pilot", "jax")
POSITIONS = ("cls", "none")
LAYOUTS = ("pilot", "paired")
Prefix = tuple[torch.Tensor, torch.Tensor]  # (keys, values), each [B or 1, L, D]


# ----------------------------------------------------------------------------------------------------------------
# Query-key selection


def l2_normalize(x: torch.Tensor, dim: int = -1, eps: float = 1e-12) -> torch.Tensor:
    """``x / sqrt(max(sum x^2, eps))`` along ``dim`` (L2P's normalisation)."""
    return x * torch.rsqrt((x * x).sum(dim, keepdim=True).clamp_min(eps))


def cosine_scores(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``[B, P]`` cosine of each query ``[B, D]`` with each key ``[P, D]``, in float32."""
    return l2_normalize(query.float()) @ l2_normalize(keys.float()).T


def ranked_ids(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` highest-scoring ids of each row ``[B, k]``, best first, ties to the lower id."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]


def batch_majority(ids: torch.Tensor, k: int, pool_size: int) -> torch.Tensor:
    """The ``k`` ids chosen most often in ``ids`` ``[B, k]``, most frequent first, ties to the lower id."""
    counts = torch.bincount(ids.flatten(), minlength=pool_size)
    return torch.sort(counts, descending=True, stable=True).indices[:k]


def select_prompts(query: torch.Tensor, keys: torch.Tensor, k: int, batchwise: bool) -> torch.Tensor:
    """Prompt ids ``[B, k]`` for each image: its top-``k`` keys by cosine, or with ``batchwise`` the batch's ``k``
    most frequent ids for every image."""
    ids = ranked_ids(cosine_scores(query, keys), k)
    if batchwise:
        ids = batch_majority(ids, k, keys.shape[0]).expand(query.shape[0], -1)
    return ids


def pull_term(query: torch.Tensor, keys: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``sum_{b,j} cos(query_b, keys[ids_bj]) / B``: what the pull constraint maximises (gradient to the keys)."""
    q = l2_normalize(query.float().detach())
    chosen = l2_normalize(keys.float())[ids]  # [B, k, D]
    return (chosen * q.unsqueeze(1)).sum() / query.shape[0]


@torch.no_grad()
def init_prompt_(t: torch.Tensor, init: str) -> torch.Tensor:
    """``U(-1, 1)`` (PILOT) or ``U(0, 0.01)`` (flax's ``nn.initializers.uniform()``, the official JAX code)."""
    if init == "pilot":
        return t.uniform_(-1.0, 1.0)
    if init == "jax":
        return t.uniform_(0.0, 0.01)
    raise CilbenchError(f"prompt init must be one of {', '.join(INITS)}, not {init!r}")


class PromptPool(nn.Module):
    """``size`` prompts of ``length`` tokens with one learnable key each. ``layers == 0``: prompt tuning, prompts
    ``[size, length, D]``; ``layers > 0``: prefix tuning at that many layers, ``[layers, 2, size, length, D]``."""

    def __init__(self, size: int, length: int, dim: int, top_k: int, layers: int = 0, init: str = "pilot"):
        super().__init__()
        if not 1 <= top_k <= size:
            raise CilbenchError(f"top_k must be between 1 and the pool size {size}, not {top_k}")
        self.size, self.length, self.top_k, self.layers = size, length, top_k, layers
        shape = (size, length, dim) if layers == 0 else (layers, 2, size, length, dim)
        self.prompts = nn.Parameter(init_prompt_(torch.empty(shape), init))
        self.keys = nn.Parameter(init_prompt_(torch.empty(size, dim), init))

    def select(self, query: torch.Tensor, batchwise: bool, fixed: Sequence[int] | None = None) -> torch.Tensor:
        """Ids ``[B, top_k]``: ``fixed`` for every image when given (DualPrompt's prompt mask), else by key."""
        if fixed is not None:
            return torch.as_tensor(list(fixed), device=query.device).expand(query.shape[0], -1)
        return select_prompts(query, self.keys, self.top_k, batchwise)

    def pull(self, query: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return pull_term(query, self.keys, ids)

    def tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Prompt tuning: the selected prompts as ``[B, top_k * length, D]`` tokens, in the order of ``ids``."""
        p = self.prompts[ids]  # [B, k, length, D]
        return p.reshape(p.shape[0], -1, p.shape[-1])

    def prefixes(self, ids: torch.Tensor, layout: str = "paired") -> list[Prefix]:
        """Prefix tuning: per layer, the selected prompts' (keys, values), each ``[B, top_k * length, D]``.
        ``layout="pilot"`` reproduces PILOT's E-prompt tensor (module docstring, ``LAYOUTS``)."""
        out = []
        b = ids.shape[0]
        for layer in range(self.layers):
            kv = self.prompts[layer][:, ids]  # [2, B, k, length, D]
            if layout == "pilot":  # [2, B, ...] read as [B, 2, ...]
                kv = kv.reshape(b, 2, -1, kv.shape[-1]).transpose(0, 1)
            else:
                kv = kv.reshape(2, b, -1, kv.shape[-1])
            out.append((kv[0], kv[1]))
        return out

    @torch.no_grad()
    def copy_slots(self, src: slice, dst: slice) -> None:
        """Copy prompts ``src`` into ``dst`` (DualPrompt's ``shared_prompt_pool``); keys are left alone."""
        if self.layers == 0:
            self.prompts[dst] = self.prompts[src]
        else:
            self.prompts[:, :, dst] = self.prompts[:, :, src]


class SharedPrefix(nn.Module):
    """One prefix per layer, the same for every image (DualPrompt's G-prompt): ``[layers, 2, length, D]``."""

    def __init__(self, layers: int, length: int, dim: int, init: str = "pilot"):
        super().__init__()
        self.prefix = nn.Parameter(init_prompt_(torch.empty(layers, 2, length, dim), init))

    def prefixes(self) -> list[Prefix]:
        return [(p[0].unsqueeze(0), p[1].unsqueeze(0)) for p in self.prefix]


# ----------------------------------------------------------------------------------------------------------------
# CODA-Prompt


def component_weights(query: torch.Tensor, keys: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """``alpha [B, M]`` with ``alpha_bm = cos(query_b * attention_m, keys_m)``."""
    attended = query.unsqueeze(1) * attention.unsqueeze(0)  # [B, M, D]
    return (l2_normalize(attended) * l2_normalize(keys).unsqueeze(0)).sum(-1)


@torch.no_grad()
def gram_schmidt_extend(earlier: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` standard-normal vectors made orthonormal to each other and to the span of the rows of ``earlier``
    ``[s, d]`` (computed in float64; returned in ``earlier``'s dtype and device)."""
    s, d = earlier.shape
    if s + n > d:
        raise CilbenchError(f"cannot make {s + n} components orthogonal in {d} dimensions: use fewer components "
                            f"(--set pool_size=...) or a wider backbone")
    draws = torch.randn(n, d, generator=generator, dtype=torch.float32).double()
    basis = torch.linalg.qr(earlier.detach().double().cpu().T).Q if s else torch.zeros(d, 0, dtype=torch.float64)
    new = []
    for v in draws:
        for _ in range(2):  # re-orthogonalise once: "twice is enough" for classical Gram-Schmidt
            v = v - basis @ (basis.T @ v)
        v = v / v.norm()
        new.append(v)
        basis = torch.cat([basis, v.unsqueeze(1)], dim=1)
    return torch.stack(new).to(dtype=earlier.dtype, device=earlier.device)


def orthogonality_penalty(x: torch.Tensor) -> torch.Tensor:
    """``((X X^T - I)^2).mean()`` of the rows of ``x`` ``[n, d]``."""
    eye = torch.eye(x.shape[0], device=x.device, dtype=x.dtype)
    return ((x @ x.T - eye) ** 2).mean()


class CodaComponents(nn.Module):
    """CODA-Prompt's components at ``layers`` prefixed layers: ``P [layers, M, length, D]``, ``K`` and ``A``
    ``[layers, M, D_key]``; ``M // tasks`` per task (module docstring). ``task`` is the task being learned (or
    the last learned, at test); ``begin_task(t, generator)`` initialises task ``t``'s slice."""

    def __init__(self, size: int, length: int, dim: int, key_dim: int, layers: int, tasks: int):
        super().__init__()
        if length % 2:
            raise CilbenchError(f"CODA-Prompt's prompt length must be even (key and value halves), not {length}")
        self.per_task = size // tasks
        if self.per_task < 1:
            raise CilbenchError(f"CODA-Prompt needs at least one component per task: {size} components for {tasks} "
                                f"tasks (--set pool_size=...)")
        self.length = length
        # only slices initialised by begin_task are ever used; the rest stays zero (as PILOT's after its first
        # Gram-Schmidt)
        self.P = nn.Parameter(torch.zeros(layers, size, length, dim))
        self.K = nn.Parameter(torch.zeros(layers, size, key_dim))
        self.A = nn.Parameter(torch.zeros(layers, size, key_dim))
        self.task = 0

    def span(self, task: int) -> tuple[int, int]:
        return task * self.per_task, (task + 1) * self.per_task

    @torch.no_grad()
    def begin_task(self, task: int, generator: torch.Generator | None = None) -> None:
        self.task = task
        s, f = self.span(task)
        for layer in range(self.P.shape[0]):
            for param in (self.K, self.A, self.P):
                flat = param[layer].view(param.shape[1], -1)  # P: each component's length x D flattened
                flat[s:f] = gram_schmidt_extend(flat[:s], f - s, generator)

    def prefixes(self, query: torch.Tensor, train: bool, penalty: float = 0.0) -> tuple[list[Prefix], torch.Tensor]:
        """Per layer the (keys, values) prefix ``[B, length / 2, D]`` each, and ``penalty`` x the orthogonality
        penalty (0 when ``penalty`` is 0)."""
        s, f = self.span(self.task)
        q = query.float()
        out, loss = [], q.new_zeros(())
        half = self.length // 2
        for layer in range(self.P.shape[0]):
            k, a, p = self.K[layer], self.A[layer], self.P[layer]
            if train:  # earlier tasks' components take part but do not learn
                k, a, p = (torch.cat([x[:s].detach(), x[s:f]]) for x in (k, a, p))
            else:
                k, a, p = k[:f], a[:f], p[:f]
            alpha = component_weights(q, k, a)
            prompt = torch.einsum("bm,mld->bld", alpha, p)
            out.append((prompt[:, :half], prompt[:, half:]))
            if train and penalty > 0:
                loss = loss + penalty * (orthogonality_penalty(k) + orthogonality_penalty(a)
                                         + orthogonality_penalty(p.reshape(p.shape[0], -1)))
        return out, loss


# ----------------------------------------------------------------------------------------------------------------
# The forward over timm blocks


def prefix_attention(attn: nn.Module, x: torch.Tensor, prefix: Prefix | None) -> torch.Tensor:
    """timm ``Attention`` on ``x`` ``[B, N, D]`` with ``prefix`` (keys, values ``[B or 1, L, D]``) in front of its
    keys and values; the block's own modules, ``F.scaled_dot_product_attention``."""
    b, n, _ = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = attn.qkv(x).reshape(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if prefix is not None:
        pk, pv = (t.to(k.dtype).expand(b, -1, -1).reshape(b, -1, heads, head_dim).transpose(1, 2) for t in prefix)
        k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    out = out.transpose(1, 2).reshape(b, n, heads * head_dim)
    out = getattr(attn, "norm", nn.Identity())(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


def prefix_block(block: nn.Module, x: torch.Tensor, prefix: Prefix | None) -> torch.Tensor:
    """A timm ViT ``Block`` on ``x`` with a (keys, values) prefix in its attention."""
    x = x + block.drop_path1(block.ls1(prefix_attention(block.attn, block.norm1(x), prefix)))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def _join(parts: list[Prefix]) -> Prefix:
    if len(parts) == 1:
        return parts[0]
    b = max(p[0].shape[0] for p in parts)
    return (torch.cat([p[0].expand(b, -1, -1) for p in parts], 1),
            torch.cat([p[1].expand(b, -1, -1) for p in parts], 1))


class PromptedViT:
    """A frozen timm ``VisionTransformer`` (a cilbench ``Backbone``, not owned: it stays registered where it is)
    run with prompts: ``query(images)`` and ``tokens(images, prompts, prefixes)``."""

    def __init__(self, backbone: nn.Module, prompt_position: str = "cls"):
        from timm.models.vision_transformer import Block, VisionTransformer

        vit = getattr(backbone, "model", None)
        if getattr(backbone, "family", None) != "vit" or not isinstance(vit, VisionTransformer):
            raise CilbenchError(f"prompt methods need a timm ViT backbone, not "
                                f"{getattr(getattr(backbone, 'spec', None), 'name', type(backbone).__name__)}")
        if vit.cls_token is None or vit.no_embed_class or vit.reg_token is not None or vit.dynamic_img_size \
                or not isinstance(vit.patch_drop, nn.Identity) or vit.global_pool != "token":
            raise CilbenchError("prompt methods need a ViT with a class token read as the feature, position "
                                "embeddings that include it, no register tokens and no patch dropout")
        if not all(type(b) is Block for b in vit.blocks):
            raise CilbenchError("prompt methods need plain timm ViT blocks (this backbone carries other modules)")
        if prompt_position not in POSITIONS:
            raise CilbenchError(f"prompt_position must be one of {', '.join(POSITIONS)}, not {prompt_position!r}")
        self.backbone, self.vit, self.prompt_position = backbone, vit, prompt_position
        self.depth, self.dim = len(vit.blocks), vit.embed_dim

    def check_layers(self, layers: Sequence[int], what: str, setting: str) -> None:
        bad = [i for i in layers if not 0 <= i < self.depth]
        if bad:
            raise CilbenchError(f"{what} layer {bad[0]} is out of range: the backbone has {self.depth} blocks "
                                f"(0..{self.depth - 1}); choose others with --set {setting}=...")

    @torch.no_grad()
    def query(self, images: torch.Tensor) -> torch.Tensor:
        """The un-prompted CLS after the final norm, ``[B, D]`` (the backbone's own forward)."""
        return self.backbone(images)

    def embed(self, images: torch.Tensor, prompts: torch.Tensor | None = None) -> torch.Tensor:
        """``[CLS, prompts, patches]`` + position embeddings: CLS's for each prompt slot (``"cls"``) or none."""
        vit = self.vit
        patches = vit.patch_embed(images)
        pos = vit.pos_embed
        parts = [vit.cls_token.expand(patches.shape[0], -1, -1) + pos[:, :1]]
        if prompts is not None:
            parts.append(prompts.to(patches.dtype) + pos[:, :1] if self.prompt_position == "cls"
                         else prompts.to(patches.dtype))
        parts.append(patches + pos[:, 1:])
        return vit.norm_pre(vit.patch_drop(vit.pos_drop(torch.cat(parts, dim=1))))

    def tokens(self, images: torch.Tensor, prompts: torch.Tensor | None = None,
               prefixes: dict[int, list[Prefix]] | None = None) -> torch.Tensor:
        """Every token after the final norm ``[B, 1 + P + N, D]``: ``prompts`` ``[B, P, D]`` at the input,
        ``prefixes[layer]`` (one or more (keys, values) pairs, joined) in that block's attention."""
        x = self.embed(images, prompts)
        prefixes = prefixes or {}
        for i, block in enumerate(self.vit.blocks):
            x = prefix_block(block, x, _join(prefixes[i])) if prefixes.get(i) else block(x)
        return self.vit.norm(x)
