"""The measuring harness shared by the `*_vs_peft.py` benchmarks: the docs/benchmarks.md models and batch, one
measurement per process (so peak RSS is that run's alone), a matmul peak for MFU, and the ratio table.

A benchmark script supplies `apply(model, impl, kind, option) -> model` and calls `report(...)`; its subprocesses
re-enter the script with `--worker IMPL KIND OPTION STEPS WARMUP`. On a noisy machine (±15% between runs here) pass
`repeats` > 1: each pair is then measured that many times, alternating which goes first, and the median ratio is
printed with the range of the rounds' ratios.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

BATCH, SEQUENCE, VOCABULARY = 8, 256, 8192
POSITIONS = SEQUENCE + 64  # room for virtual tokens: GPT-2 has learned positions and prefix/prompt shift them
Apply = Callable[[torch.nn.Module, str, str, str], torch.nn.Module]


def build_model(kind: str) -> torch.nn.Module:
    """The random-init GPT-2 (23.4M) or Llama (27.4M) of docs/benchmarks.md, seeded."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_layer=6, n_embd=512, n_head=8, vocab_size=VOCABULARY,
                                          n_positions=POSITIONS))
    return LlamaForCausalLM(LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=6,
                                        num_attention_heads=8, num_key_value_heads=8, vocab_size=VOCABULARY,
                                        max_position_embeddings=POSITIONS))


def freeze_all(model: torch.nn.Module) -> torch.nn.Module:
    """The floor every parameter-efficient method stands on: nothing trains, but backward still runs through every
    block (input gradients only), so the model's own activations are all kept."""
    for param in model.parameters():
        param.requires_grad_(False)
    model.get_input_embeddings().register_forward_hook(lambda module, inputs, output: output.requires_grad_())
    return model


def worker(apply: Apply, impl: str, kind: str, option: str, steps: int, warmup: int) -> dict:
    """One measurement: tokens/s over `steps` timed optimizer steps, and this process's peak RSS. Tokens are the
    batch's real ones; logits of virtual tokens a method prepends are dropped before the loss."""
    model = build_model(kind)
    parameters = sum(p.numel() for p in model.parameters())
    model = apply(model, impl, kind, option)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
    ids = torch.randint(0, VOCABULARY, (BATCH, SEQUENCE), generator=torch.Generator().manual_seed(0))
    for step in range(warmup + steps):
        if step == warmup:
            started = time.perf_counter()
        logits = model(input_ids=ids).logits
        if logits.shape[1] > SEQUENCE:  # an implementation that returns the virtual positions too (peft's prompt)
            logits = logits[:, -SEQUENCE:]  # a slice, even a no-op one, adds a full gradient copy in backward
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"tokens_per_s": steps * BATCH * SEQUENCE / seconds, "peak_rss_mib": peak_mib, "parameters": parameters}


def run_worker(apply: Apply, argv: list[str]) -> None:
    """The `--worker IMPL KIND OPTION STEPS WARMUP` entry point: one measurement printed as a JSON line."""
    impl, kind, option, steps, warmup = argv
    print(json.dumps(worker(apply, impl, kind, option, int(steps), int(warmup))))


def matmul_peak() -> float:
    """fp32 GFLOP/s of a 2048² matmul, best of 5 (the MFU denominator, measured in the same run)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * 2048**3 / best / 1e9


def measure(script: str, impl: str, kind: str, option: str, steps: int, warmup: int) -> dict:
    command = [sys.executable, script, "--worker", impl, kind, option, str(steps), str(warmup)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def measure_pair(script: str, kind: str, option: str, impls: tuple[str, str], steps: int, warmup: int,
                 repeats: int) -> tuple[dict[str, dict], list[float]]:
    """`repeats` rounds of (reference, ours), the order flipped every other round so a drift of the machine's speed
    weighs on both alike. Returns each impl's median tok/s and peak RSS, and the per-round tok/s ratios."""
    rounds: dict[str, list[dict]] = {impl: [] for impl in impls}
    for round_index in range(repeats):
        for impl in impls if round_index % 2 == 0 else impls[::-1]:
            rounds[impl].append(measure(script, impl, kind, option, steps, warmup))
    reference, ours = impls
    ratios = [mine["tokens_per_s"] / theirs["tokens_per_s"] for mine, theirs in zip(rounds[ours], rounds[reference])]
    medians = {impl: {key: statistics.median(result[key] for result in results) for key in results[0]}
               for impl, results in rounds.items()}
    return medians, ratios


def run_pairs(script: str, pairs: list[tuple[str, str, str, str]], steps: int, warmup: int, repeats: int) -> float:
    """Measure each (kind, option, reference impl, our impl) back to back and print the ratio table; returns the
    last matmul peak. MFU counts 4N FLOPs per token (forward 2N + input-gradient backward 2N). With repeats > 1 the
    tok/s ratio is the median of the rounds' ratios, with their range beside it."""
    print("| model | option | impl | tok/s | peak RSS MiB | MFU | tok/s ratio | RSS ratio |")
    print("|---|---|---|---|---|---|---|---|")
    peak = 0.0
    for kind, option, reference, ours in pairs:
        peak = matmul_peak()
        results, ratios = measure_pair(script, kind, option, (reference, ours), steps, warmup, repeats)
        spread = f" ({min(ratios):.2f}–{max(ratios):.2f})" if len(ratios) > 1 else ""
        for impl, result in results.items():
            mfu = 4 * result["parameters"] * result["tokens_per_s"] / (peak * 1e9)
            ratio = f"{statistics.median(ratios):.2f}x{spread}" if impl == ours else "1.00x"
            rss = result["peak_rss_mib"] / results[reference]["peak_rss_mib"]
            print(f"| {kind} | {option} | {impl} | {result['tokens_per_s']:.0f} | {result['peak_rss_mib']:.0f} "
                  f"| {mfu:.0%} | {ratio} | {rss:.2f}x |", flush=True)
    return peak


def report(script: str, legend: str, pairs: list[tuple[str, str, str, str]], kinds: list[str], steps: int,
           warmup: int, repeats: int = 1) -> None:
    """The whole printed benchmark: the pairs' table, one floor row per model, and the MFU footnote."""
    print(legend)
    peak = run_pairs(script, pairs, steps, warmup, repeats)
    for kind in kinds:
        floor = measure(script, "frozen", kind, "-", steps, warmup)
        print(f"| {kind} | - | frozen model, nothing trains (floor) | {floor['tokens_per_s']:.0f} "
              f"| {floor['peak_rss_mib']:.0f} | - | - | - |", flush=True)
    print(f"MFU: 4N FLOPs/token over the fp32 matmul peak measured before each pair ({peak:.0f} GFLOP/s last).")
