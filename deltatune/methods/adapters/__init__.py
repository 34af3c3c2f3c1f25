"""The bottleneck-adapter family: `adapter` (Houlsby / Pfeiffer placement) and `adapter_fusion` (AdapterFusion).

Files: adapter.py, adapter_fusion.py (the registered methods); bottleneck_layers.py (the residual bottleneck
layers and their compositions). Not to be confused with `deltatune.adapters`, the public API that switches, merges,
saves and loads adapters of every method. This package imports none of its modules.
"""
