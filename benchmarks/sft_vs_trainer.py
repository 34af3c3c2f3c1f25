"""The real SFT workload against the peers users would otherwise run (issue 15): SmolLM2-135M-Instruct, LoRA r 16 /
alpha 32 / dropout 0.05 on every attention and MLP linear, chatterbot chat-template rows with the prompt masked,
lr 1e-3 constant, ~1k real tokens per optimizer step, each run in its own process, rounds alternating the order.

    python benchmarks/sft_vs_trainer.py                 # 3 rounds of deltatune / Trainer / Trainer grouped / TRL packed / floor
    python benchmarks/sft_vs_trainer.py --rounds 1 --tokens 4096
    python benchmarks/sft_vs_trainer.py options         # deltatune with each fast-path choice on and off

Arms (every one trains on the same tokenised rows, made by deltatune's chatterbot SFT encoding):
- deltatune: `examples/smollm2_chatterbot_lora.yaml` (packing into rows of ≤ 256 tokens that never attend to each
  other, batch 4, fused LoRA, the chunked SFT loss), timed through `TrainingLoop.optimizer_step`;
- trainer: peft + transformers `Trainer`, `DataCollatorForSeq2Seq` dynamic padding, batch 19 (≈ 19 × 54 real
  tokens), its default random order; trainer-grouped: the same with `train_sampling_strategy="group_by_length"`;
- trl-packed: TRL `SFTTrainer(packing=True)` (its default "bfd" padding-free packing), batch 4 × 256,
  `completion_only_loss`; whether its packed examples attend to each other on this machine is measured (the logits
  of an example packed behind another against the example alone) and printed;
- floor: deltatune's arm with LoRA replaced by nothing (only the final norm trains) and backward still through every
  block: the same packed rows, chunked loss and optimizer step. No LoRA implementation in this loop can beat it, so
  its ratio to the reference arm is the most any LoRA here could reach.

Each arm takes 2 warm-up steps, then steps until `--tokens` real (unpadded) tokens were trained on; tokens/s counts
those steps' real tokens over their wall time (data, forward, backward, optimizer). Afterwards each arm's model
scores the same 128 validation rows (mean cross-entropy of the response tokens): the check that speed did not buy
a different training. Peak RSS is the worker process's until the end of training (the model load included, the validation pass
not). MFU counts 4N FLOPs per real
token (N = 134.5M: forward plus the input-gradient backward of the frozen base) over the fp32 matmul peak measured
in the same run. The deltatune worker then profiles 3 more steps: the share of its step spent in matrix products
gives the matmul-only bound (its tok/s with every other operator removed), printed against the reference arm — the
ceiling any elementwise or attention work could lift it to.
"""

from __future__ import annotations

import json
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

EXAMPLE = "examples/smollm2_chatterbot_lora.yaml"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WARMUP, VALIDATION_ROWS, LR = 2, 128, 1e-3
TRAINER_BATCH, PACKED_BATCH, PACK_LENGTH = 19, 4, 256
ARMS = ("deltatune", "trainer", "trainer-grouped", "trl-packed", "floor")
# The floor under any LoRA in deltatune's loop: the same packed rows, loss and optimizer step, with LoRA replaced by
# nothing (only the final norm's 576 weights train) and backward still through every block (input gradients).
FLOOR = ['method={name: freeze, train_head: false, patterns: ["^model[.]norm[.]weight$"]}']
# deltatune's fast-path choices, each measured on and off (`options`); the chunked loss is the objective's default.
NO_CHUNKED = "objective={name: sft, chunked_loss: false}"
OPTIONS = {
    "default": [],
    "no-chunked-loss": [NO_CHUNKED],
    "no-packing": ["data.packing=false", f"train.batch_size={TRAINER_BATCH}"],
    "gradient-checkpointing": ["train.gradient_checkpointing=true"],
    "compile": ["train.compile=true"],
}


def rows(packing: bool = False) -> tuple[list[dict], list[dict], object]:
    """deltatune's tokenised chatterbot SFT rows (train, validation) and the tokenizer."""
    from deltatune.config.loader import load_config
    from deltatune.models import load_processor
    from deltatune.preparation import run_task
    from deltatune.tasks import build_datasets

    config = load_config(EXAMPLE, [f"data.packing={str(packing).lower()}"])
    task = run_task(config)
    tokenizer = load_processor(config.model, task)
    data = build_datasets(config.data, task, tokenizer, None, None, False)
    return data.train, data.validation, tokenizer


def base_model() -> torch.nn.Module:
    """SmolLM2-135M-Instruct in fp32 as every arm gets it (deltatune's loader and fp32 cache; a plain
    LlamaForCausalLM)."""
    from deltatune.config.loader import load_config
    from deltatune.models import load_model
    from deltatune.preparation import run_task

    config = load_config(EXAMPLE, [])
    return load_model(config.model, run_task(config), None)


def validation_loss(model: torch.nn.Module, validation: list[dict]) -> float:
    """Mean cross-entropy of the response tokens of the first VALIDATION_ROWS rows, padded batches of 4."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, min(VALIDATION_ROWS, len(validation)), 4):
            batch = validation[start : start + 4]
            longest = max(len(row["input_ids"]) for row in batch)
            ids = torch.tensor([row["input_ids"] + [0] * (longest - len(row["input_ids"])) for row in batch])
            labels = torch.tensor([row["labels"] + [-100] * (longest - len(row["labels"])) for row in batch])
            mask = torch.tensor([[1] * len(row["input_ids"]) + [0] * (longest - len(row["input_ids"])) for row in batch])
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target = labels[:, 1:]
            total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                             ignore_index=-100, reduction="sum"))
            count += int((target != -100).sum())
    return total / count


def peak_mib() -> float:
    """This process's peak RSS so far (taken right after training, before the validation pass)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(step_ends: list[float], step_tokens: list[int], budget: int) -> tuple[int, float, int]:
    """(real tokens, seconds, steps) of the timed steps: those after WARMUP, up to the first reaching `budget`."""
    tokens, steps = 0, 0
    for index in range(WARMUP, len(step_ends)):
        tokens += step_tokens[index]
        steps += 1
        if tokens >= budget:
            break
    return tokens, step_ends[WARMUP + steps - 1] - step_ends[WARMUP - 1], steps


def run_deltatune(budget: int, overrides: list[str], floor: bool = False) -> dict:
    from deltatune.config.loader import load_config
    from deltatune.runner import _training_loop, prepare
    from deltatune.runs import setup_objective
    from deltatune.training.loop import set_train_mode
    from deltatune.training.run_dir import RunDir

    settings = ["train.schedule=constant", "train.warmup_steps=0", f"train.lr={LR}", *overrides]
    prepared = prepare(load_config(EXAMPLE, settings))
    setup_objective(prepared.config, prepared.objective, prepared.model, prepared.method, prepared.device,
                    prepared.num_labels, prepared.processor)
    if floor:  # nothing in the blocks trains, so backward would stop at the norm: make it run through them all
        prepared.model.get_input_embeddings().register_forward_hook(lambda module, inputs, output:
                                                                     output.requires_grad_())
    loaded_rss = peak_mib()
    with tempfile.TemporaryDirectory() as scratch:
        loop = _training_loop(prepared, RunDir(scratch))
    set_train_mode(prepared.model)
    examples = loop.train_data.examples
    ends, tokens = [time.perf_counter()], [0]
    for group in loop.epoch_groups():
        loop.optimizer_step(group)
        ends.append(time.perf_counter())
        tokens.append(sum(len(examples[i]["input_ids"]) for indices in group for i in indices))
        if sum(tokens[WARMUP + 1 :]) >= budget:
            break
    real, seconds, steps = timed(ends[1:], tokens[1:], budget)
    trained_peak = peak_mib()
    matmul_share = matmul_time_share(loop, 3)
    _, validation, _ = rows()
    return {"tokens": real, "seconds": seconds, "steps": steps, "loaded_rss_mib": loaded_rss,
            "peak_rss_mib": trained_peak, "validation_loss": validation_loss(prepared.model, validation),
            "matmul_share": matmul_share}


MATMULS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm")


def matmul_time_share(loop, steps: int) -> float:
    """The share of `steps` further training steps' operator time spent in matrix products (torch.profiler, self
    time). A step can go no faster than its matmuls: tok/s ÷ this share bounds what removing every other operator
    (attention, norms, activations, dropout, optimizer) could reach. The profiler's per-operator overhead inflates
    the many small operators, so the bound errs high."""
    from torch.profiler import ProfilerActivity, profile

    groups = iter(loop.epoch_groups())
    with profile(activities=[ProfilerActivity.CPU]) as profiled:
        for _, group in zip(range(steps), groups):
            loop.optimizer_step(group)
    events = profiled.key_averages()
    total = sum(event.self_cpu_time_total for event in events)
    return sum(event.self_cpu_time_total for event in events if event.key in MATMULS) / total


def peft_model() -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM")
    return get_peft_model(base_model(), config)


def _recording(trainer_class: type) -> type:
    """`trainer_class` counting each optimizer step's real tokens and when it ended."""
    from transformers import TrainerCallback

    class Recording(trainer_class):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.step_tokens, self.step_ends, self.pending = [], [], 0
            recorder = self

            class StepEnds(TrainerCallback):
                def on_step_end(self, args, state, control, **_):
                    recorder.step_ends.append(time.perf_counter())
                    recorder.step_tokens.append(recorder.pending)
                    recorder.pending = 0

            self.add_callback(StepEnds())

        def training_step(self, model, inputs, *args, **kwargs):
            mask = inputs.get("attention_mask")
            self.pending += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
            return super().training_step(model, inputs, *args, **kwargs)

    return Recording


def _common_arguments(output_dir: str, steps: int) -> dict:
    return dict(output_dir=output_dir, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
                max_steps=steps, logging_strategy="no", save_strategy="no", report_to="none", use_cpu=True,
                dataloader_num_workers=0, seed=0, disable_tqdm=True, weight_decay=0.0)


def run_trainer(budget: int, grouped: bool) -> dict:
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    train, validation, tokenizer = rows()
    model = peft_model()
    loaded_rss = peak_mib()
    dataset = Dataset.from_list([{"input_ids": r["input_ids"], "attention_mask": [1] * len(r["input_ids"]),
                                  "labels": r["labels"]} for r in train])
    mean_tokens = statistics.mean(len(r["input_ids"]) for r in train)
    steps = WARMUP + math.ceil(1.3 * budget / (TRAINER_BATCH * mean_tokens)) + 2
    with tempfile.TemporaryDirectory() as scratch:
        arguments = TrainingArguments(**_common_arguments(scratch, steps), per_device_train_batch_size=TRAINER_BATCH,
                                      train_sampling_strategy="group_by_length" if grouped else "random",
                                      remove_unused_columns=False)
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
        trainer = _recording(Trainer)(model=model, args=arguments, train_dataset=dataset, data_collator=collator)
        trainer.train()
    trained_peak = peak_mib()
    real, seconds, steps_timed = timed(trainer.step_ends, trainer.step_tokens, budget)
    return {"tokens": real, "seconds": seconds, "steps": steps_timed, "loaded_rss_mib": loaded_rss,
            "peak_rss_mib": trained_peak, "validation_loss": validation_loss(model, validation)}


def run_trl(budget: int) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    train, validation, tokenizer = rows()
    model = peft_model()
    loaded_rss = peak_mib()
    dataset = Dataset.from_list([{"input_ids": r["input_ids"],
                                  "completion_mask": [int(label != -100) for label in r["labels"]]} for r in train])
    steps = WARMUP + math.ceil(1.3 * budget / (PACKED_BATCH * PACK_LENGTH)) + 2
    with tempfile.TemporaryDirectory() as scratch:
        arguments = SFTConfig(**_common_arguments(scratch, steps), per_device_train_batch_size=PACKED_BATCH,
                              packing=True, max_length=PACK_LENGTH, completion_only_loss=True, bf16=False)
        trainer = _recording(SFTTrainer)(model=model, args=arguments, train_dataset=dataset,
                                         processing_class=tokenizer)
        strategy = arguments.packing_strategy
        trainer.train()
        trained_peak = peak_mib()
        apart = examples_kept_apart(model, trainer.data_collator, trainer.train_dataset)
    real, seconds, steps_timed = timed(trainer.step_ends, trainer.step_tokens, budget)
    return {"tokens": real, "seconds": seconds, "steps": steps_timed, "loaded_rss_mib": loaded_rss,
            "peak_rss_mib": trained_peak,
            "validation_loss": validation_loss(model, validation), "packing_strategy": strategy,
            "examples_kept_apart": apart}


def examples_kept_apart(model: torch.nn.Module, collator, packed_dataset) -> bool:
    """Whether the second example of a packed row computes the logits it computes alone (no attention to the
    example packed before it), for the collator's own batch of the first packed row holding several examples."""
    model.eval()
    for index in range(min(200, len(packed_dataset))):
        batch = collator([packed_dataset[index]])
        positions = batch["position_ids"][0]
        starts = [i for i in range(len(positions)) if positions[i] == 0]
        if len(starts) >= 2:
            break
    else:
        raise RuntimeError("no packed row of the first 200 holds two examples; cannot test cross-example attention")
    first, second = starts[1], (starts[2] if len(starts) > 2 else len(positions))
    inputs = {key: value for key, value in batch.items() if key not in ("labels", "completion_mask")}
    with torch.no_grad():
        packed = model(**inputs).logits[0, first:second]
        alone = model(input_ids=batch["input_ids"][:, first:second]).logits[0]
    return bool(torch.allclose(packed, alone, atol=1e-4))


def worker(arm: str, budget: int, option: str) -> dict:
    torch.manual_seed(0)
    if arm == "deltatune":
        result = run_deltatune(budget, OPTIONS[option])
    elif arm == "floor":
        result = run_deltatune(budget, FLOOR, floor=True)
    elif arm in ("trainer", "trainer-grouped"):
        result = run_trainer(budget, grouped=arm == "trainer-grouped")
    else:
        result = run_trl(budget)
    result["tokens_per_s"] = result["tokens"] / result["seconds"]
    return result


def measure(arm: str, budget: int, option: str = "default") -> dict:
    command = [sys.executable, __file__, "--worker", arm, str(budget), option]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{arm} ({option}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def matmul_peak() -> float:
    """fp32 GFLOP/s of a 2048² matmul, best of 5."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = min(_timed_matmul(a, b) for _ in range(5))
    return 2 * 2048**3 / best / 1e9


def _timed_matmul(a: torch.Tensor, b: torch.Tensor) -> float:
    started = time.perf_counter()
    a @ b
    return time.perf_counter() - started


PARAMETERS = 134_515_008  # SmolLM2-135M, tied embeddings counted once


def table(results: dict[str, list[dict]], peaks: list[float], reference: str) -> None:
    peak = statistics.median(peaks)
    print(f"\nfp32 matmul peak (median of {len(peaks)} rounds): {peak:.0f} GFLOP/s")
    print("| run | real tokens/s (median, rounds) | MFU | peak RSS MiB | validation loss | tok/s vs "
          f"{reference} | RSS vs {reference} |")
    print("|---|---|---|---|---|---|---|")
    base = results[reference]
    for arm, runs in results.items():
        speeds = [run["tokens_per_s"] for run in runs]
        ratios = [mine["tokens_per_s"] / theirs["tokens_per_s"] for mine, theirs in zip(runs, base)]
        rss = statistics.median(run["peak_rss_mib"] for run in runs)
        loss = statistics.median(run["validation_loss"] for run in runs)
        mfu = 4 * PARAMETERS * statistics.median(speeds) / (peak * 1e9)
        spread = f" ({min(ratios):.2f}–{max(ratios):.2f})" if len(ratios) > 1 else ""
        print(f"| {arm} | {statistics.median(speeds):.0f} ({', '.join(f'{s:.0f}' for s in speeds)}) | {mfu:.0%} | "
              f"{rss:.0f} | {loss:.4f} | {statistics.median(ratios):.2f}x{spread} | "
              f"{rss / statistics.median(r['peak_rss_mib'] for r in base):.2f}x |")
    shares = [run["matmul_share"] for run in results.get("deltatune", [])]
    if shares and reference in results:
        bound = statistics.median(run["tokens_per_s"] / run["matmul_share"] for run in results["deltatune"])
        print(f"\ndeltatune's matmul-only bound: {statistics.median(shares):.0%} of its step time is matrix products; "
              f"with every other operator removed it would run {bound:.0f} tok/s = "
              f"{bound / statistics.median(r['tokens_per_s'] for r in base):.2f}x {reference}")
    for run in results.get("trl-packed", [])[:1]:
        print(f"\nTRL packing strategy: {run['packing_strategy']}; packed examples kept apart on this machine: "
              f"{run['examples_kept_apart']}")


def compare(rounds: int, budget: int, arms: list[str]) -> None:
    results: dict[str, list[dict]] = {arm: [] for arm in arms}
    peaks = []
    for index in range(rounds):
        peaks.append(matmul_peak())
        for arm in arms if index % 2 == 0 else arms[::-1]:
            results[arm].append(measure(arm, budget))
            print(f"round {index + 1} {arm}: {json.dumps(results[arm][-1])}", flush=True)
    reference = "trainer-grouped" if "trainer-grouped" in arms else arms[-1]
    table(results, peaks, reference)


def options(budget: int) -> None:
    results, peaks = {}, [matmul_peak()]
    for option in OPTIONS:
        results[option] = [measure("deltatune", budget, option)]
        print(f"{option}: {json.dumps(results[option][-1])}", flush=True)
    table(results, peaks, "default")


def main(argv: list[str]) -> None:
    if argv[:1] == ["--worker"]:
        arm, budget, option = argv[1], int(argv[2]), argv[3]
        print(json.dumps(worker(arm, budget, option)))
        return
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", nargs="?", default="compare", choices=["compare", "options"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=8192, help="real tokens per arm after warm-up")
    parser.add_argument("--arms", default=",".join(ARMS))
    args = parser.parse_args(argv)
    if args.action == "options":
        options(args.tokens)
    else:
        compare(args.rounds, args.tokens, args.arms.split(","))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main(sys.argv[1:])
