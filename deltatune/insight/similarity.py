"""How alike two sets of representations are: linear centred kernel alignment (CKA, Kornblith et al. 2019,
"Similarity of Neural Network Representations Revisited") with the unbiased HSIC estimator (Song et al. 2012), as
Nguyen et al. (2021) use it to compare the layers of two networks.

For features X (n × p) and Y (n × q) of the same n inputs, with Gram matrices K = XXᵀ and L = YYᵀ whose diagonals
are set to 0 (K̃, L̃):

    HSIC_u(K, L) = [ tr(K̃L̃) + (1ᵀK̃1)(1ᵀL̃1) / ((n−1)(n−2)) − 2/(n−2) · 1ᵀK̃L̃1 ] / (n(n−3))
    CKA(X, Y)    = HSIC_u(K, L) / sqrt(HSIC_u(K, K) · HSIC_u(L, L))

CKA is invariant to orthogonal transforms and isotropic scaling of either side (a layer whose output is rotated is
the same representation), not to arbitrary invertible linear maps. The unbiased estimator keeps CKA of unrelated
features near 0 even when n is not much larger than p, where the biased one is pulled up. Pure tensor functions.
"""

from __future__ import annotations

import torch


def unbiased_hsic(gram_x: torch.Tensor, gram_y: torch.Tensor) -> torch.Tensor:
    """HSIC_u of two n × n Gram matrices (n ≥ 4), in float64."""
    n = gram_x.shape[0]
    if n < 4 or gram_x.shape != (n, n) or gram_y.shape != (n, n):
        raise ValueError(f"unbiased HSIC needs two n × n Gram matrices with n ≥ 4, got {tuple(gram_x.shape)} and "
                         f"{tuple(gram_y.shape)}")
    k = gram_x.double().clone().fill_diagonal_(0)
    l = gram_y.double().clone().fill_diagonal_(0)
    ones_k, ones_l = k.sum(dim=0), l.sum(dim=0)  # 1ᵀK̃ and 1ᵀL̃ (symmetric)
    trace = (k * l).sum()  # tr(K̃L̃) for symmetric matrices
    both_totals = ones_k.sum() * ones_l.sum() / ((n - 1) * (n - 2))
    cross = 2.0 / (n - 2) * (ones_k @ ones_l)  # 1ᵀK̃L̃1
    return (trace + both_totals - cross) / (n * (n - 3))


def linear_cka(features_x: torch.Tensor, features_y: torch.Tensor) -> float:
    """Linear CKA of two feature matrices whose rows are the same inputs (n × p and n × q; more dimensions are
    flattened into the features). 1 for the same representation up to rotation and scale, ~0 for unrelated ones."""
    x = features_x.reshape(features_x.shape[0], -1).double()
    y = features_y.reshape(features_y.shape[0], -1).double()
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA compares features of the same inputs; got {x.shape[0]} and {y.shape[0]} rows")
    x, y = x - x.mean(dim=0), y - y.mean(dim=0)
    gram_x, gram_y = x @ x.T, y @ y.T
    denominator = torch.sqrt(unbiased_hsic(gram_x, gram_x) * unbiased_hsic(gram_y, gram_y))
    if float(denominator) <= 0:
        return 0.0  # a constant representation carries nothing to align
    return float(unbiased_hsic(gram_x, gram_y) / denominator)


def cka_matrix(layers_x: list[torch.Tensor], layers_y: list[torch.Tensor]) -> torch.Tensor:
    """CKA of every layer of one model (rows) with every layer of the other (columns): the heat map whose diagonal
    is the layer-by-layer curve."""
    grams_x = [_centred_gram(x) for x in layers_x]
    grams_y = [_centred_gram(y) for y in layers_y]
    self_x = [unbiased_hsic(g, g) for g in grams_x]
    self_y = [unbiased_hsic(g, g) for g in grams_y]
    result = torch.zeros(len(grams_x), len(grams_y), dtype=torch.float64)
    for i, (gram_x, norm_x) in enumerate(zip(grams_x, self_x)):
        for j, (gram_y, norm_y) in enumerate(zip(grams_y, self_y)):
            denominator = torch.sqrt(norm_x * norm_y)
            result[i, j] = unbiased_hsic(gram_x, gram_y) / denominator if float(denominator) > 0 else 0.0
    return result


def _centred_gram(features: torch.Tensor) -> torch.Tensor:
    x = features.reshape(features.shape[0], -1).double()
    x = x - x.mean(dim=0)
    return x @ x.T
