"""deltatune LoRA against HF peft LoRA (and deltatune QLoRA against bitsandbytes NF4 + peft LoRA), interleaved in
one invocation, on the models of docs/benchmarks.md.

    python benchmarks/lora_vs_peft.py                 # both models, dropout 0.05 and 0, 3 warm-up + 20 timed steps
    python benchmarks/lora_vs_peft.py --steps 10 --models llama --no-qlora

Each measurement runs in its own process (so peak RSS is that run's alone) in the order peft, deltatune, for each
(model, dropout); a 2048x2048 fp32 matmul peak is measured right before each pair, and MFU counts 4N FLOPs per
token (forward 2N + input-gradient backward 2N; LoRA skips the frozen weights' gradient). The machine is noisy, so
only the ratios printed for a pair measured back to back are meant to be compared. A last row per model measures
the floor: the same model with nothing trainable, backward still running through every block (input gradients
only), i.e. the model's own activations and compute that every LoRA implementation pays in this loop.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _versus_peft import freeze_all, report, run_worker  # noqa: E402

RANK, ALPHA = 8, 16
TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"],
           "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def bitsandbytes_nf4(model: torch.nn.Module) -> torch.nn.Module:
    """The same model with every block Linear in bitsandbytes' NF4 (double quantisation, fp32 compute), loaded the
    way transformers users do it (BitsAndBytesConfig), through a temporary directory."""
    import tempfile

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantisation = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32)
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        del model
        return AutoModelForCausalLM.from_pretrained(directory, quantization_config=quantisation, device_map="cpu",
                                                    dtype=torch.float32)


def apply_lora(model: torch.nn.Module, impl: str, kind: str, option: str) -> torch.nn.Module:
    """`option` is the LoRA dropout."""
    dropout = float(option) if option != "-" else 0.0
    if impl == "frozen":
        return freeze_all(model)
    if impl == "bnb+peft":
        model = bitsandbytes_nf4(model)
        impl = "peft"
    if impl == "peft":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=TARGETS[kind],
                            fan_in_fan_out=kind == "gpt2")
        return get_peft_model(model, config)
    import deltatune

    method = "qlora" if impl == "deltatune-qlora" else "lora"
    deltatune.apply(model, {"name": method, "r": RANK, "lora_alpha": ALPHA, "lora_dropout": dropout,
                            "target_modules": TARGETS[kind], "modules_to_save": []})
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["gpt2", "llama"], choices=list(TARGETS))
    parser.add_argument("--dropouts", nargs="+", default=["0.05", "0.0"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1, help="rounds per pair; the median ratio is printed")
    parser.add_argument("--no-qlora", action="store_true", help="skip the QLoRA pair (llama only)")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return run_worker(apply_lora, args.worker)
    pairs = [(kind, dropout, "peft", "deltatune") for kind in args.models for dropout in args.dropouts]
    if not args.no_qlora and "llama" in args.models:  # bitsandbytes' Linear4bit replaces nn.Linear, not Conv1D
        pairs += [("llama", dropout, "bnb+peft", "deltatune-qlora") for dropout in args.dropouts]
    report(__file__, "option = LoRA dropout", pairs, args.models, args.steps, args.warmup, args.repeats)


if __name__ == "__main__":
    main()
