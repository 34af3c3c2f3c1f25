"""What fine-tuning did to a weight matrix: how far it moved, in how many directions, and whether it brought in
directions the pretrained matrix did not have.

- relative change ‖ΔW‖_F / ‖W‖_F, ΔW = W_tuned − W_base;
- effective rank of ΔW (Roy & Vetterli 2007): exp of the entropy of its normalised singular values,
  erank = exp(−Σ p_i log p_i), p_i = σ_i / Σ σ_j; 1 for a rank-one update, r for r equal directions;
- intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence"): among the
  top-k left singular vectors of the tuned matrix, those whose largest |cosine| with every left singular vector of
  the base matrix is below a threshold (0.5): new directions, which that paper links to forgetting.

Pure tensor functions in float64; weights of convolutions are flattened to (out, in · kernel).
"""

from __future__ import annotations

import torch


def as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """A weight as an (out, rest) float64 matrix; a vector (bias, norm) as one row."""
    weight = weight.detach().double()
    return weight.reshape(1, -1) if weight.dim() < 2 else weight.reshape(weight.shape[0], -1)


def relative_change(base: torch.Tensor, tuned: torch.Tensor) -> float:
    """‖W_tuned − W_base‖_F / ‖W_base‖_F (the absolute change when the base is all zeros)."""
    base, tuned = as_matrix(base), as_matrix(tuned)
    _check_same_shape(base, tuned)
    change = torch.linalg.norm(tuned - base)
    scale = torch.linalg.norm(base)
    return float(change / scale) if float(scale) > 0 else float(change)


def effective_rank(matrix: torch.Tensor) -> float:
    """exp(entropy of the normalised singular values); 0 for the zero matrix."""
    singular = torch.linalg.svdvals(as_matrix(matrix))
    total = singular.sum()
    if float(total) <= 0:
        return 0.0
    p = singular / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def intruder_dimensions(base: torch.Tensor, tuned: torch.Tensor, top_k: int = 10, threshold: float = 0.5) -> int:
    """How many of the tuned matrix's top-`top_k` left singular vectors have |cos| < `threshold` with every left
    singular vector of the base matrix."""
    base, tuned = as_matrix(base), as_matrix(tuned)
    _check_same_shape(base, tuned)
    base_vectors = torch.linalg.svd(base, full_matrices=False).U  # (out, min(out, in))
    tuned_vectors = torch.linalg.svd(tuned, full_matrices=False).U[:, :top_k]
    best_match = (tuned_vectors.T @ base_vectors).abs().max(dim=1).values  # unit vectors: dot = cosine
    return int((best_match < threshold).sum())


def _check_same_shape(base: torch.Tensor, tuned: torch.Tensor) -> None:
    if base.shape != tuned.shape:
        raise ValueError(f"base and tuned weights differ in shape: {tuple(base.shape)} vs {tuple(tuned.shape)}")
