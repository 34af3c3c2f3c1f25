"""The LoRA family: `lora` (with rsLoRA and DoRA options), `dora` and `qlora` (LoRA on a 4-bit NF4 base).

Files: lora.py, dora.py, qlora.py (the registered methods); lora_layer.py (the low-rank maths every LoRA layer
shares), layers_per_type.py (Linear/Conv1D, Conv2d, Embedding), fused_linear.py (one autograd function for a
LoRA linear), peft_format.py (PEFT's LoRA files), nf4.py (4-bit NormalFloat storage), qlora_layers.py (NF4Linear
and the LoRA layer around it). Import what you need from those modules; this package imports none of them.
"""
