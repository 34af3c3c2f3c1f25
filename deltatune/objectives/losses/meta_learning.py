"""First-order meta-learning over any method's trainable parameters: the inner adaptation and the outer directions
of Reptile (Nichol, Achiam & Schulman 2018, "On First-Order Meta-Learning Algorithms") and first-order MAML
(Finn, Abbeel & Levine 2017, its first-order approximation).

For a task τ with a support set S and a query set Q, both start from the meta-parameters θ and adapt them by k
steps of plain SGD on S:

    φ_0 = θ,   φ_{i+1} = φ_i − α ∇L_S(φ_i)        (gradients not tracked through the steps: first order)

Reptile moves θ toward the adapted weights, θ ← θ + ε (φ_k − θ): an outer SGD step of size ε along the direction
θ − φ_k. First-order MAML moves θ along the query loss's gradient at the adapted weights, θ ← θ − β ∇L_Q(φ_k),
dropping MAML's second-order term (the Jacobian of φ_k with respect to θ). Both directions are averaged over the
tasks of a meta-batch.

`as_surrogate_loss` turns a direction into a loss whose gradient with respect to θ is exactly that direction, so
the one training loop's backward pass, gradient all-reduce across ranks, clipping and optimizer apply the outer
update like any other step (with SGD at lr ε and nothing else acting on the step, i.e. no clipping, weight decay,
momentum or schedule, Reptile's update exactly; with Adam, its adaptive variant, which the Reptile paper also uses).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

Parameters = dict[str, torch.Tensor]
# loss_of(parameters, batch): the loss of the model run with `parameters` in place of its own (torch.func)
LossOf = Callable[[Parameters, Any], torch.Tensor]


def adapt(start: Parameters, loss_of: LossOf, batches: Iterable[Any], inner_lr: float) -> Parameters:
    """φ after one plain SGD step of size `inner_lr` per batch, from `start`; first order, so every φ_i is a new
    leaf and `start` is left untouched."""
    adapted = {name: value.detach().clone().requires_grad_(True) for name, value in start.items()}
    for batch in batches:
        loss = loss_of(adapted, batch)
        gradients = torch.autograd.grad(loss, list(adapted.values()), allow_unused=True)
        adapted = {name: (value - inner_lr * gradient if gradient is not None else value).detach().requires_grad_(True)
                   for (name, value), gradient in zip(adapted.items(), gradients)}
    return adapted


def reptile_direction(start: Parameters, adapted: Parameters) -> Parameters:
    """θ − φ_k: an outer step of size ε along it gives θ + ε (φ_k − θ)."""
    return {name: (start[name] - adapted[name]).detach() for name in start}


def first_order_maml_direction(adapted: Parameters, loss_of: LossOf, query: Any) -> Parameters:
    """∇L_Q(φ_k): the query loss's gradient at the adapted parameters (zero for one the query does not reach)."""
    leaves = {name: value.detach().requires_grad_(True) for name, value in adapted.items()}
    gradients = torch.autograd.grad(loss_of(leaves, query), list(leaves.values()), allow_unused=True)
    return {name: gradient.detach() if gradient is not None else torch.zeros_like(leaves[name])
            for name, gradient in zip(leaves, gradients)}


def mean_direction(directions: list[Parameters]) -> Parameters:
    """The average over a meta-batch's tasks."""
    return {name: torch.stack([direction[name] for direction in directions]).mean(0) for name in directions[0]}


def as_surrogate_loss(parameters: Parameters, direction: Parameters) -> torch.Tensor:
    """Σ ⟨θ, d⟩ with d held constant: its gradient with respect to each θ is d, whatever θ's value."""
    return sum((parameters[name] * direction[name].detach()).sum() for name in direction)  # type: ignore[return-value]
