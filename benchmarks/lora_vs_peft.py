"""deltatune LoRA against HF peft LoRA (and deltatune QLoRA against bitsandbytes NF4 + peft LoRA), interleaved in
one invocation, on the models of shared/BASELINES.md.

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
import json
import resource
import subprocess
import sys
import time

import torch

BATCH, SEQUENCE, RANK, ALPHA = 8, 256, 8, 16
TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"],
           "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def build_model(kind: str) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_layer=6, n_embd=512, n_head=8, vocab_size=8192, n_positions=SEQUENCE))
    return LlamaForCausalLM(LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=6,
                                        num_attention_heads=8, num_key_value_heads=8, vocab_size=8192,
                                        max_position_embeddings=SEQUENCE))


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


def apply_lora(model: torch.nn.Module, impl: str, kind: str, dropout: float) -> torch.nn.Module:
    if impl == "frozen":
        # The floor any LoRA implementation stands on: nothing trains, but backward still runs through every block
        # (as LoRA's does, down to the first adapted layer), so the model's own activations are all kept.
        for param in model.parameters():
            param.requires_grad_(False)
        model.get_input_embeddings().register_forward_hook(lambda module, inputs, output: output.requires_grad_())
        return model
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


def worker(impl: str, kind: str, dropout: float, steps: int, warmup: int) -> dict:
    """One measurement: tokens/s over `steps` timed optimizer steps, and this process's peak RSS."""
    model = build_model(kind)
    parameters = sum(p.numel() for p in model.parameters())
    model = apply_lora(model, impl, kind, dropout)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 8192, (BATCH, SEQUENCE), generator=generator)
    for step in range(warmup + steps):
        if step == warmup:
            started = time.perf_counter()
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"tokens_per_s": steps * BATCH * SEQUENCE / seconds, "peak_rss_mib": peak_mib, "parameters": parameters}


def matmul_peak() -> float:
    """fp32 GFLOP/s of a 2048² matmul, best of 5 (the MFU denominator, measured in the same run)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(5))
    return 2 * 2048**3 / best / 1e9


def _timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def measure(impl: str, kind: str, dropout: float, steps: int, warmup: int) -> dict:
    command = [sys.executable, __file__, "--worker", impl, kind, str(dropout), str(steps), str(warmup)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["gpt2", "llama"], choices=list(TARGETS))
    parser.add_argument("--dropouts", nargs="+", type=float, default=[0.05, 0.0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-qlora", action="store_true", help="skip the QLoRA pair (llama only)")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        impl, kind, dropout, steps, warmup = args.worker
        print(json.dumps(worker(impl, kind, float(dropout), int(steps), int(warmup))))
        return
    pairs = [(kind, dropout, "peft", "deltatune") for kind in args.models for dropout in args.dropouts]
    if not args.no_qlora and "llama" in args.models:  # bitsandbytes' Linear4bit replaces nn.Linear, not Conv1D
        pairs += [("llama", dropout, "bnb+peft", "deltatune-qlora") for dropout in args.dropouts]
    print("| model | dropout | impl | tok/s | peak RSS MiB | MFU | tok/s ratio | RSS ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, dropout, reference, ours in pairs:
        peak = matmul_peak()
        results = {impl: measure(impl, kind, dropout, args.steps, args.warmup) for impl in (reference, ours)}
        for impl, result in results.items():
            mfu = 4 * result["parameters"] * result["tokens_per_s"] / (peak * 1e9)
            ratio = result["tokens_per_s"] / results[reference]["tokens_per_s"]
            rss = result["peak_rss_mib"] / results[reference]["peak_rss_mib"]
            print(f"| {kind} | {dropout} | {impl} | {result['tokens_per_s']:.0f} | {result['peak_rss_mib']:.0f} "
                  f"| {mfu:.0%} | {ratio:.2f}x | {rss:.2f}x |", flush=True)
    for kind in args.models:
        floor = measure("frozen", kind, 0.0, args.steps, args.warmup)
        print(f"| {kind} | - | frozen model, no adapters (floor) | {floor['tokens_per_s']:.0f} "
              f"| {floor['peak_rss_mib']:.0f} | - | - | - |", flush=True)
    print(f"MFU: 4N FLOPs/token over the fp32 matmul peak measured before each pair ({peak:.0f} GFLOP/s last).")


if __name__ == "__main__":
    main()
