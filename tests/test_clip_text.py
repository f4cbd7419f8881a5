"""models/clip_text.py on clip-tiny: the frozen ensemble by hand, caching, CLIP logits, and gradients in the
trainable mode."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from cilbench.errors import CilbenchError
from cilbench.models import peft
from cilbench.models.backbones import build_backbone
from cilbench.models.clip_text import PromptSet, TextClassifier, text_classifier

NAMES = ("cat", "dog", "airplane")
TEMPLATES = ("a photo of a {}.", "a blurry photo of the {}.", "art of a {}.")


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    b = build_backbone("clip-tiny", pretrained=False).eval()
    b.requires_grad_(False)
    return b


class _Counting:
    """The backbone with its text-encoder calls counted."""

    def __init__(self, backbone):
        self.backbone, self.calls = backbone, 0

    def __getattr__(self, name):
        return getattr(self.backbone, name)

    def encode_text(self, tokens):
        self.calls += 1
        return self.backbone.encode_text(tokens)


def _by_hand(backbone, names, templates) -> torch.Tensor:
    rows = []
    with torch.no_grad():
        for n in names:
            embs = [F.normalize(backbone.encode_text(backbone.tokenize([t.format(n)]))[0], dim=-1) for t in templates]
            rows.append(F.normalize(torch.stack(embs).mean(0), dim=-1))
    return torch.stack(rows)


def test_frozen_embeddings_are_the_template_averaged_normalised_text_embeddings(base):
    counted = _Counting(base)
    tc = TextClassifier(counted)
    ps = PromptSet.of(NAMES, TEMPLATES)
    emb = tc.embeddings(ps)
    expected = _by_hand(base, NAMES, TEMPLATES)
    torch.testing.assert_close(emb, expected, atol=1e-5, rtol=1e-5)
    # the function zeroshot-clip uses gives the same numbers
    torch.testing.assert_close(text_classifier(base, list(NAMES), TEMPLATES, torch.device("cpu")), emb)
    assert not emb.requires_grad and emb.shape == (3, 32)
    calls = counted.calls
    assert tc.embeddings(PromptSet.of(list(NAMES), list(TEMPLATES))) is emb  # cached per class set
    assert counted.calls == calls
    other = tc.embeddings(PromptSet.of(NAMES[:2], TEMPLATES[0]))
    assert other.shape == (2, 32) and counted.calls > calls


def test_several_prompt_sets_keep_their_own_templates(base):
    tc = TextClassifier(base)
    a, b = PromptSet.of(NAMES[:2], TEMPLATES), PromptSet.of(NAMES[2:], "a photo of the number: \"{}\".")
    emb = tc.embeddings([a, b])
    torch.testing.assert_close(emb[:2], _by_hand(base, NAMES[:2], TEMPLATES), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(emb[2:], _by_hand(base, NAMES[2:], b.templates), atol=1e-5, rtol=1e-5)


def test_logits_are_scale_times_cosine(base):
    image = torch.randn(4, 32)
    ps = PromptSet.of(NAMES, TEMPLATES)
    text = _by_hand(base, NAMES, TEMPLATES)
    cos = F.normalize(image, dim=-1) @ text.T
    torch.testing.assert_close(TextClassifier(base, logit_scale=100.0).logits(image, ps), 100.0 * cos,
                               atol=1e-4, rtol=1e-5)
    learned = base.model.logit_scale.exp()  # CLIP's temperature: exp of the stored log-scale (1 / 0.07 at init)
    assert learned.item() == pytest.approx(1 / 0.07, rel=1e-5)
    torch.testing.assert_close(TextClassifier(base)(image, ps), learned * cos, atol=1e-4, rtol=1e-5)
    with pytest.raises(CilbenchError):
        TextClassifier(base, logit_scale="learned")


def test_trainable_mode_sends_gradients_into_text_side_adapters(base):
    model = copy.deepcopy(base)
    handle = peft.insert(model, "adaptformer", encoders="text")
    model.train()
    ps = PromptSet.of(NAMES, TEMPLATES[:1])
    image = torch.randn(4, 32)
    labels = torch.tensor([0, 1, 2, 0])

    frozen = TextClassifier(model)
    assert not frozen.logits(image, ps).requires_grad  # frozen: no graph into the text encoder

    tc = TextClassifier(model, trainable=True)
    F.cross_entropy(tc.logits(image, ps), labels).backward()
    ups = [m.adapter.up.weight for m in handle.modules.values()]
    assert all(u.grad is not None and u.grad.abs().sum() > 0 for u in ups)
    assert all(p.grad is None for n, p in model.named_parameters() if ".peft." not in n)
    # a step on the text adapters changes the trainable embeddings; the frozen cache keeps the old ones until cleared
    before = frozen.embeddings(ps).clone()
    with torch.no_grad():
        for u in ups:
            u.add_(0.5 * torch.randn_like(u))
    model.eval()
    assert (tc.embeddings(ps) - before).abs().max() > 1e-3
    assert torch.equal(frozen.embeddings(ps), before)
    frozen.clear()
    torch.testing.assert_close(frozen.embeddings(ps), tc.embeddings(ps).detach())


def test_frozen_cache_per_key_holds_one_classifier_per_router(base):
    model = copy.deepcopy(base)
    handle = peft.insert(model, "moe", encoders="text", num_experts=4, num_routers=2, top_k=2)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in handle.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    tc = TextClassifier(model)
    ps = PromptSet.of(NAMES, TEMPLATES)
    per_router = {}
    # MoE-Adapters pre-computes one text classifier per router (-1 = zero-shot). The text encoder is causal, so
    # token 0 (SOT) routes every prompt alike: top-2 makes the routers differ through their gate weights at least
    for router in (None, 0, 1):
        handle.set_router(router)
        per_router[router] = tc.embeddings(ps, key=router)
    torch.testing.assert_close(per_router[None], _by_hand(base, NAMES, TEMPLATES), atol=1e-5, rtol=1e-5)
    assert (per_router[0] - per_router[1]).abs().max() > 1e-4
    handle.set_router(1)
    assert tc.embeddings(ps, key=0) is per_router[0]  # served from the cache, whatever router is set now
    tc.clear(key=0)
    torch.testing.assert_close(tc.embeddings(ps, key=0), per_router[1])  # recomputed under router 1


def test_bad_inputs_are_one_line_errors(base):
    with pytest.raises(CilbenchError):
        PromptSet.of([], TEMPLATES)
    with pytest.raises(CilbenchError):
        TextClassifier(base).embeddings([])
    with pytest.raises(CilbenchError, match="text encoder"):
        TextClassifier(torch.nn.Linear(2, 2))
