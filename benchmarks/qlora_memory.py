"""QLoRA's memory in the process, phase by phase (issue 15): SmolLM2-135M-Instruct, the chatterbot LoRA SFT example
(`examples/smollm2_chatterbot_lora.yaml`: r 16 on every attention and MLP linear, packed batch of 4 rows ≤ 256
tokens), the same first batches for every arm, each arm in its own process, alternating over rounds.

    python benchmarks/qlora_memory.py [--rounds 2] [--steps 3] [--return-freed-memory]

Arms: deltatune `lora` (fp32 base), deltatune `qlora` (NF4 base, quantised tensor by tensor while loading), and
bitsandbytes 4-bit loading (`BitsAndBytesConfig(load_in_4bit, nf4, double quant, fp32 compute)`) + peft LoRA with the
same settings, trained by a plain loop on the same batches. Phases: after loading (model and method ready), after
the first optimizer step, after the last (steady state); each shows the process's peak RSS so far (ru_maxrss) and
its RSS at that moment. "Loading never holds the fp32 model whole" is read off the qlora row's load phase: its peak
stays below the fp32 weights' size (538 MB) above the process's baseline (the `before load` column).
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import torch

EXAMPLE = "examples/smollm2_chatterbot_lora.yaml"
ARMS = ("lora", "qlora", "bitsandbytes")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rss_now_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def phase(phases: dict, name: str) -> None:
    phases[name] = {"peak_mib": round(peak_mib(), 1), "rss_mib": round(rss_now_mib(), 1)}


def batches(steps: int) -> list[list[dict]]:
    """The example's first `steps` optimizer steps of packed micro-batches (deltatune's collation), as tensors."""
    from deltatune.config.loader import load_config
    from deltatune.models import load_processor
    from deltatune.preparation import run_task
    from deltatune.tasks import build_datasets
    from deltatune.training.batches import Batches

    config = load_config(EXAMPLE, [])
    task = run_task(config)
    data = build_datasets(config.data, task, load_processor(config.model, task), None, None, False)
    order = Batches(data.train, data.collate, config.train.group_by_length).epoch(config.train.batch_size,
                                                                                   config.train.seed, 0)
    return [[data.collate([data.train[i] for i in indices])] for indices in order[:steps]]


def run_deltatune(method: str, steps: int, phases: dict) -> None:
    import tempfile

    from deltatune.config.loader import load_config
    from deltatune.runner import _training_loop, prepare
    from deltatune.training.loop import set_train_mode
    from deltatune.training.run_dir import RunDir

    groups = batches(steps)
    phase(phases, "before load")
    prepared = prepare(load_config(EXAMPLE, [f"method.name={method}"]))
    phase(phases, "loaded")
    with tempfile.TemporaryDirectory() as scratch:
        loop = _training_loop(prepared, RunDir(scratch))
    set_train_mode(prepared.model)
    for index, group in enumerate(groups):
        loop.optimizer_step(group)
        if index == 0:
            phase(phases, "first step")
    phase(phases, "steady")


def run_bitsandbytes(steps: int, phases: dict) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from deltatune.config.loader import load_config
    from deltatune.models import gguf_cache, sources

    groups = batches(steps)
    phase(phases, "before load")
    directory = gguf_cache.ensure_model(sources.parse_source(load_config(EXAMPLE, []).model.name).path)
    quantisation = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(directory, quantization_config=quantisation, device_map="cpu",
                                                 dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    phase(phases, "loaded")
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for index, group in enumerate(groups):
        for batch in group:
            model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if index == 0:
            phase(phases, "first step")
    phase(phases, "steady")


def worker(arm: str, steps: int, return_freed: bool) -> dict:
    torch.manual_seed(0)
    if return_freed:  # the same allocator policy for every arm (train.return_freed_memory)
        from deltatune.training.device import return_freed_memory_to_os

        return_freed_memory_to_os()
    phases: dict = {}
    if arm == "bitsandbytes":
        run_bitsandbytes(steps, phases)
    else:
        run_deltatune(arm, steps, phases)
    return phases


def measure(arm: str, steps: int, return_freed: bool) -> dict:
    command = [sys.executable, __file__, "--worker", arm, str(steps), str(int(return_freed))]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{arm} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> None:
    if argv[:1] == ["--worker"]:
        print(json.dumps(worker(argv[1], int(argv[2]), argv[3:] == ["1"])))
        return
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--return-freed-memory", action="store_true",
                        help="every arm returns freed memory to the OS (train.return_freed_memory)")
    args = parser.parse_args(argv)
    results: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for index in range(args.rounds):
        for arm in ARMS if index % 2 == 0 else ARMS[::-1]:
            results[arm].append(measure(arm, args.steps, args.return_freed_memory))
            print(f"round {index + 1} {arm}: {json.dumps(results[arm][-1])}", flush=True)
    names = ["before load", "loaded", "first step", "steady"]
    print("\npeak RSS MiB so far (RSS at that moment), median of rounds")
    print("| arm | " + " | ".join(names) + " | steady peak vs lora |")
    print("|---|" + "---|" * (len(names) + 1))
    lora_peak = statistics.median(run["steady"]["peak_mib"] for run in results["lora"])
    for arm, runs in results.items():
        cells = [f"{statistics.median(r[name]['peak_mib'] for r in runs):.0f} "
                 f"({statistics.median(r[name]['rss_mib'] for r in runs):.0f})" for name in names]
        steady = statistics.median(run["steady"]["peak_mib"] for run in runs)
        print(f"| {arm} | " + " | ".join(cells) + f" | {steady - lora_peak:+.0f} MiB |")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main(sys.argv[1:])
