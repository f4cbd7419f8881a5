"""CLIP text classifiers: class names x prompt templates -> one normalised text embedding per class."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cilbench.models.templates import clip_class_names, templates_for


@torch.no_grad()
def text_classifier(backbone, class_names: list[str], templates: tuple[str, ...], device: torch.device,
                    batch_size: int = 256) -> torch.Tensor:
    """[C, D]: for each class the mean of its normalised template embeddings, normalised again (CLIP's ensemble)."""
    prompts = [t.format(name) for name in class_names for t in templates]
    embs = []
    for i in range(0, len(prompts), batch_size):
        tokens = backbone.tokenize(prompts[i:i + batch_size]).to(device)
        embs.append(F.normalize(backbone.encode_text(tokens).float(), dim=-1))
    per_prompt = torch.cat(embs).view(len(class_names), len(templates), -1)
    return F.normalize(per_prompt.mean(1), dim=-1)


def scenario_text_classifier(backbone, scenario, device: torch.device, mode: str) -> torch.Tensor:
    """Text embeddings of every global class of the scenario, each task named with its own dataset's templates."""
    from cilbench.data.catalog import get_spec

    parts = []
    for task in scenario.tasks:
        key = get_spec(task.dataset.partition("/")[0]).templates
        names = clip_class_names(key, list(task.class_names)) if task.class_names else [str(c) for c in task.classes]
        parts.append(text_classifier(backbone, names, templates_for(key, mode), device))
    return torch.cat(parts)
