"""deltatune prefix tuning and prompt tuning against HF peft's, interleaved in one invocation, on the models of
docs/benchmarks.md (batch 8 x 256, 20 virtual tokens, fp32, AdamW).

    python benchmarks/prompt_vs_peft.py                     # both models, prefix and prompt, 3 warm-up + 20 steps
    python benchmarks/prompt_vs_peft.py --steps 10 --models llama --methods prefix

Same harness as lora_vs_peft.py (one process per measurement, peft first, ratios per back-to-back pair). Prefix
tuning runs as peft's default does, on the prefix table itself (`prefix_projection` false); the extra row
`prefix+mlp` is deltatune's default, training through the MLP reparameterisation (peft's `prefix_projection`
true), measured against peft with the same setting. tok/s counts the 256 real tokens per row, not the virtual ones.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _versus_peft import freeze_all, report, run_worker  # noqa: E402

VIRTUAL_TOKENS = 20


def apply_prompt_method(model: torch.nn.Module, impl: str, kind: str, option: str) -> torch.nn.Module:
    """`option`: prompt | prefix | prefix+mlp."""
    if impl == "frozen":
        return freeze_all(model)
    projection = option == "prefix+mlp"
    if impl == "peft":
        from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

        if option == "prompt":
            config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL_TOKENS)
        else:
            config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL_TOKENS,
                                        prefix_projection=projection, encoder_hidden_size=512)
        return get_peft_model(model, config)
    import deltatune

    settings: dict = {"name": "prompt" if option == "prompt" else "prefix", "num_virtual_tokens": VIRTUAL_TOKENS,
                      "modules_to_save": []}
    if option != "prompt":
        settings |= {"prefix_projection": projection, "encoder_hidden_size": 512}
    deltatune.apply(model, settings)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["gpt2", "llama"], choices=["gpt2", "llama"])
    parser.add_argument("--methods", nargs="+", default=["prefix", "prompt", "prefix+mlp"],
                        choices=["prefix", "prompt", "prefix+mlp"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1, help="rounds per pair; the median ratio is printed")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return run_worker(apply_prompt_method, args.worker)
    pairs = [(kind, method, "peft", "deltatune") for kind in args.models for method in args.methods]
    report(__file__, "option = method", pairs, args.models, args.steps, args.warmup, args.repeats)


if __name__ == "__main__":
    main()
