"""Insight into a fine-tuning run: what changed in the weights (insight.weights), how the representations moved
(insight.similarity, CKA)."""
