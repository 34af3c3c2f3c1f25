"""Cross-entropy through the output layer, chunk by chunk, without ever holding the (tokens × vocabulary) logits.

For a causal LM with a 49k vocabulary the logits of a 1,024-token batch are 200 MB in fp32, and autograd keeps them
(and their softmax) for the backward pass. Here the loss of rows h_i (the final hidden states at the positions that
have a target) is computed in chunks of `chunk_size` rows:

    forward   z = h_c Wᵀ + b,  ℓ_i = logsumexp(z_i) − z_i[y_i]           (only ℓ and the row's logsumexp are kept)
    backward  recompute z, p = softmax(z) = exp(z − lse);  ∂ℓ/∂z = p − onehot(y)
              ∂h_c = (p − onehot(y)) W,   ∂W += (p − onehot(y))ᵀ h_c,   ∂b += Σ_rows (p − onehot(y))

so peak memory is one chunk's logits, in forward and backward alike, at the price of computing them twice (the
idea of Liger-Kernel's fused linear cross-entropy and of Wijmans et al. 2024, "Cut Your Losses", in plain PyTorch).
When the output layer is frozen (W and b need no gradient) ∂h is computed in the forward pass from the chunk's
logits while they exist, and backward only scales its rows: the logits are computed once, not twice.
Rows whose target is `ignore_index` are dropped before the output layer, so prompt tokens cost nothing there.
"""

from __future__ import annotations

import torch


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                chunk_size: int) -> torch.Tensor:
        # A frozen output layer (LoRA and every method that leaves lm_head alone) lets the backward pass be done
        # here: ∂ℓ_i/∂h_i = (p_i − onehot(y_i)) W needs nothing from later layers, and the upstream gradient of a
        # per-row loss only scales row i, so backward is a row scaling of this N × d tensor instead of a second
        # pass through the 49k-wide output layer (one of three vocabulary-sized matmuls saved).
        early = ctx.needs_input_grad[0] and not any(ctx.needs_input_grad[1:3])
        losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        log_normalisers = torch.empty_like(losses)
        grad_hidden = torch.empty_like(hidden) if early else None
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            logits = _logits(hidden[rows], weight, bias)
            log_normalisers[rows] = torch.logsumexp(logits, dim=-1)
            losses[rows] = log_normalisers[rows] - logits.gather(1, targets[rows, None]).squeeze(1)
            if early:
                grad_hidden[rows] = (_grad_logits(logits, log_normalisers[rows], targets[rows]) @ weight.float()
                                     ).to(hidden.dtype)
        if early:
            ctx.save_for_backward(grad_hidden)
        else:
            ctx.save_for_backward(hidden, weight, bias, targets, log_normalisers)
        ctx.chunk_size, ctx.early = chunk_size, early
        return losses

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        if ctx.early:
            (grad_hidden,) = ctx.saved_tensors
            return grad_hidden * grad_losses[:, None].to(grad_hidden.dtype), None, None, None, None
        hidden, weight, bias, targets, log_normalisers = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and ctx.needs_input_grad[2] \
            else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            logits = _logits(hidden[rows], weight, bias)
            grad_logits = _grad_logits(logits, log_normalisers[rows], targets[rows])
            grad_logits *= grad_losses[rows, None].float()
            if grad_hidden is not None:
                grad_hidden[rows] = (grad_logits @ weight.float()).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += grad_logits.T @ hidden[rows].float()
            if grad_bias is not None:
                grad_bias += grad_logits.sum(dim=0)
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None, None)


def _grad_logits(logits: torch.Tensor, log_normalisers: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """∂ℓ/∂z = softmax(z) − onehot(y), computed in place of the logits (which are not needed afterwards)."""
    grad_logits = logits.sub_(log_normalisers[:, None]).exp_()
    grad_logits[torch.arange(len(grad_logits), device=logits.device), targets] -= 1.0
    return grad_logits


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    logits = hidden.float() @ weight.float().T
    return logits + bias.float() if bias is not None else logits


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, ignore_index: int = -100, chunk_size: int = 1024,
                         reduction: str = "mean") -> torch.Tensor:
    """CE(h Wᵀ + b, y) over the rows of `hidden` (…, d) whose target is not `ignore_index`; "mean" over those rows
    or "sum". Equal to F.cross_entropy(F.linear(hidden, weight, bias), targets) in value and gradients."""
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    keep = targets != ignore_index
    losses = _ChunkedLinearCrossEntropy.apply(hidden[keep], weight, bias, targets[keep], chunk_size)
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / keep.sum().clamp(min=1)
