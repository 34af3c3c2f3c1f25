"""Image–text contrastive learning as pure tensor functions (issue 16): CLIP's symmetric InfoNCE, retrieval recall@k,
and zero-shot classification by caption similarity.

CLIP (Radford et al. 2021): for a batch of N matched pairs with unit embeddings u_i (images) and v_j (texts) and a
learnt scale τ⁻¹ = exp(s), the logits are z_ij = exp(s)·<u_i, v_j> and the loss is the mean of the two directions'
cross-entropies with the diagonal as the target:

    L = ½ · [ −1/N Σ_i log softmax_j(z_ij)[i]  −  1/N Σ_j log softmax_i(z_ij)[j] ]

This equals transformers' CLIPModel loss (`modeling_clip.image_text_contrastive_loss`, formerly `clip_loss`) on the
same logits (tests check both).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def contrastive_loss(logits: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of an (N, N) image-by-text logit matrix whose diagonal holds the matched pairs."""
    if logits.ndim != 2 or logits.shape[0] != logits.shape[1]:
        raise ValueError(f"contrastive_loss needs a square (N, N) logit matrix, got {tuple(logits.shape)}")
    targets = torch.arange(logits.shape[0], device=logits.device)
    logits = logits.float()
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def retrieval_recall(similarity: torch.Tensor, query_groups: torch.Tensor, candidate_groups: torch.Tensor,
                     k: int, chunk: int = 1024) -> float:
    """Recall@k: the share of queries (rows of `similarity`, (Q, C)) whose k most similar candidates include one of
    the query's own group. A group is "the same caption": with distinct captions it is each pair's own index
    (ordinary recall@k); captions made from class templates repeat, and retrieving any image with the very same
    caption is then as right as retrieving the one it came with. Rows are scored `chunk` at a time."""
    if similarity.numel() == 0:
        return float("nan")
    k = min(k, similarity.shape[1])
    hits = 0
    for start in range(0, similarity.shape[0], chunk):
        top = similarity[start:start + chunk].topk(k, dim=1).indices  # (q, k)
        hits += int((candidate_groups[top] == query_groups[start:start + chunk, None]).any(dim=1).sum())
    return hits / similarity.shape[0]


def class_embeddings(prompt_embeddings: torch.Tensor) -> torch.Tensor:
    """(C, T, D) unit embeddings of T prompt templates per class -> (C, D) class embeddings: the templates' mean,
    renormalised (CLIP's prompt ensembling)."""
    return F.normalize(prompt_embeddings.mean(dim=1), dim=-1)


def zero_shot_predictions(image_embeddings: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """The class whose embedding is most similar to each image: argmax_c <u_i, w_c>."""
    return (image_embeddings @ classes.T).argmax(dim=-1)


def caption_groups(captions: list[tuple[int, ...]]) -> torch.Tensor:
    """One integer per caption, equal for equal captions (token sequences), for `retrieval_recall`."""
    seen: dict[tuple[int, ...], int] = {}
    return torch.tensor([seen.setdefault(caption, len(seen)) for caption in captions], dtype=torch.long)
