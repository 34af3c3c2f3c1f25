"""Selective methods, which train a part of the model's own weights and add no layer of their own, or only a sparse
delta: `full`, `freeze` (the last blocks and the head), `bitfit` (biases) and `sparse` (a fixed sparse subset of
weight entries, `sparse_layer.py` holding its delta layer). This package imports none of its modules.
"""
