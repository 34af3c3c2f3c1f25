"""The virtual-token family: `prompt` (prompt tuning), `ptuning` (P-tuning), `prefix` (prefix tuning) and
`ptuning_v2` (P-tuning v2): trained vectors the frozen model reads as extra tokens.

Files: prompt.py, ptuning.py, prefix.py, ptuning_v2.py (the registered methods); method_base.py (the Method side
they share: configs, applying, PEFT's files); virtual_token_layer.py (the adapter layer and forward hooks);
input_prompt_layer.py (tokens joined to the input embeddings); key_value_prefix_layer.py (tokens as per-layer keys
and values); encoders.py (what produces the tokens); model_layout.py (the embedding table and attention layout
they must fit). This package imports none of its modules.
"""
