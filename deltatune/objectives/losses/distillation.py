"""Knowledge-distillation losses: soft labels with a temperature (Hinton et al. 2015), token-level divergences of
causal LMs (forward KL, reverse KL and GKD's generalised Jensen–Shannon divergence, Agarwal et al. 2024), and
DistilBERT's cosine alignment of hidden states (Sanh et al. 2019).

Pure tensor functions: none reads a model, a batch layout or a config. Rows or positions to skip are given as
masks (a classification row without a label, a prompt token of a causal LM) and never enter a mean.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def classification_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                                     labels: torch.Tensor, temperature: float, alpha: float,
                                     divergence: str = "forward_kl", beta: float = 0.5) -> torch.Tensor:
    """The scalar of soft-label distillation for a classifier (Hinton et al. 2015, "Distilling the Knowledge in a
    Neural Network"; DistilBERT's recipe), logits (B, K):

        L = α · T² · mean_i KL(softmax(z_t,i / T) ‖ softmax(z_s,i / T))  +  (1 − α) · mean_{i labelled} CE(y_i, z_s,i)

    The T² keeps the soft term's gradients the same size whatever T is (they shrink as 1/T²). `divergence` may
    swap the forward KL for the reverse KL or the generalised JSD (`token_divergence`). Rows whose label is negative
    (unlabelled, -100) add to the soft term only; with no labelled row the hard term is 0. α = 1 is pure
    distillation, α = 0 plain fine-tuning on the labels."""
    every_row = torch.ones(student_logits.shape[0], dtype=torch.bool, device=student_logits.device)
    soft = temperature ** 2 * token_divergence(student_logits, teacher_logits, every_row, divergence, beta,
                                               temperature)
    labelled = labels >= 0
    if alpha == 1.0 or not bool(labelled.any()):
        return alpha * soft
    hard = F.cross_entropy(student_logits[labelled].float(), labels[labelled])
    return alpha * soft + (1.0 - alpha) * hard


def token_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                     divergence: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """Mean over the positions where `mask` is true of a divergence between the teacher's and the student's
    next-token distributions at temperature T, p = softmax(z_t / T) and q = softmax(z_s / T) (logits (..., V)):

        forward_kl   KL(p ‖ q) = Σ p (log p − log q)          (mode covering: the student spreads over the teacher)
        reverse_kl   KL(q ‖ p) = Σ q (log q − log p)          (mode seeking: the student picks the teacher's modes)
        jsd          β · KL(p ‖ m) + (1 − β) · KL(q ‖ m),  m = β p + (1 − β) q

    `jsd` is the generalised Jensen–Shannon divergence of GKD (Agarwal et al. 2024, eq. 1), which interpolates
    between the two KLs; as in TRL's GKD trainer, β = 0 gives forward KL and β = 1 reverse KL exactly (the formula's
    own limits at 0 and 1 vanish). No T² factor: the caller scales if it wants Hinton's."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if divergence == "jsd" and beta == 0.0:
        divergence = "forward_kl"
    if divergence == "jsd" and beta == 1.0:
        divergence = "reverse_kl"
    if divergence == "forward_kl":
        per_position = (teacher.exp() * (teacher - student)).sum(-1)
    elif divergence == "reverse_kl":
        per_position = (student.exp() * (student - teacher)).sum(-1)
    elif divergence == "jsd":
        mixture = torch.logsumexp(torch.stack([teacher + math.log(beta), student + math.log1p(-beta)]), dim=0)
        per_position = (beta * (teacher.exp() * (teacher - mixture)).sum(-1)
                        + (1 - beta) * (student.exp() * (student - mixture)).sum(-1))
    else:
        raise ValueError(f"unknown divergence {divergence!r}; valid: {', '.join(DIVERGENCES)}")
    mask = mask.bool()
    return per_position[mask].sum() / mask.sum().clamp(min=1)


def hidden_cosine_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """DistilBERT's alignment term (Sanh et al. 2019): mean over real tokens of 1 − cos(h_s, h_t), pulling the
    direction of each student hidden state towards the teacher's at the mapped layer. States (B, L, H), mask (B, L)."""
    cosine = F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1)
    mask = mask.bool()
    return (1.0 - cosine)[mask].sum() / mask.sum().clamp(min=1)
