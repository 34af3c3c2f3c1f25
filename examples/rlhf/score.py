"""Score the RLHF walk-through's policies side by side on held-out prompts.

    python examples/rlhf/score.py --reward runs/rlhf-reward --reference runs/rlhf-sft/merged \
        --policy sft=runs/rlhf-sft/merged --policy ppo=runs/rlhf-ppo --policy dpo=runs/rlhf-dpo

Held-out prompts: one per movie of rotten-tomatoes-pairs' test split (the default split, by movie: no movie there
was seen by the reward model, PPO or DPO). Each policy samples `--samples` reviews per prompt (temperature 1, the
same seed for every policy); the reward model scores them, and the KL to the reference (the SFT policy) is
estimated per review as Σ_t log π(y_t) − log π_ref(y_t) over its tokens (k1; an unbiased estimate of KL(π ‖ π_ref)
for samples of π). Prints a markdown table and writes the figures as JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from deltatune.config.schema import DataConfig, ModelConfig
from deltatune.data import load_rows, make_splits
from deltatune.data.sft import PromptCollator, encode_prompts
from deltatune.data.splits import group_keys
from deltatune.data.text import pad_token_id
from deltatune.models import load_model, load_processor
from deltatune.objectives.rollouts import generate_responses, kl_per_response
from deltatune.runs import load_run, load_scorer
from deltatune.tasks import get_task


def held_out_prompts(dataset: str) -> list[str]:
    """One prompt per movie of the test split (default data.split, grouped by movie as the runs were)."""
    config = DataConfig(name=dataset)
    rows = load_rows(config)
    test = make_splits(len(rows), config.split, None, group_keys(config, rows))["test"]
    return list(dict.fromkeys(rows[i]["prompt"] for i in test))


def load_policy(source: str) -> tuple[torch.nn.Module, object]:
    """A run directory (its method applied, trained weights loaded) or a transformers directory / alias."""
    if (Path(source) / "config.yaml").is_file():
        run = load_run(source)
        return run.model.eval(), run.processor
    task = get_task("causal-lm")()
    config = ModelConfig(name=source, task=task.name)
    return load_model(config, task, None).eval(), load_processor(config, task)


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], options, batch_size: int, seed: int) -> tuple[list, list[str]]:
    """(rollout inputs per batch, response texts) for every prompt, seeded."""
    torch.manual_seed(seed)
    collate, examples = PromptCollator(pad_token_id(tokenizer)), encode_prompts(tokenizer, prompts, 128)
    batches, texts = [], []
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size])
        rollout = generate_responses(model, batch, tokenizer, options)
        batches.append(rollout.inputs)
        texts.extend(rollout.texts)
    return batches, texts


@torch.no_grad()
def kl_to_reference(model, reference, batches: list[dict]) -> torch.Tensor:
    return torch.cat([kl_per_response(model, reference, inputs)[0] for inputs in batches])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reward", required=True, help="the reward model's run directory")
    parser.add_argument("--reference", required=True, help="the KL reference (the SFT policy)")
    parser.add_argument("--policy", action="append", required=True, help="NAME=SOURCE, repeated")
    parser.add_argument("--dataset", default="rotten-tomatoes-pairs")
    parser.add_argument("--samples", type=int, default=4, help="reviews sampled per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()
    prompts = [p for p in held_out_prompts(args.dataset) for _ in range(args.samples)]
    options = SimpleNamespace(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=args.max_new_tokens)
    scorer = load_scorer(args.reward, "--reward").eval()
    reference, _ = load_policy(args.reference)
    results, examples = {}, {}
    for name, source in (item.split("=", 1) for item in args.policy):
        started = time.perf_counter()
        model, tokenizer = load_policy(source)
        batches, texts = sample(model, tokenizer, prompts, options, args.batch_size, args.seed)
        rewards = scorer(prompts, texts).float()
        kl = kl_to_reference(model, reference, batches)
        results[name] = {"source": source, "responses": len(texts), "reward_mean": float(rewards.mean()),
                         "reward_std": float(rewards.std()), "kl_mean": float(kl.mean()),
                         "length_words": sum(len(t.split()) for t in texts) / len(texts),
                         "seconds": round(time.perf_counter() - started, 1)}
        examples[name] = texts[: 3 * args.samples : args.samples]
        del model
    base = next(iter(results.values()))
    print(f"{len(prompts) // args.samples} held-out prompts x {args.samples} samples; reward by {args.reward}, "
          f"KL to {args.reference}")
    print("| policy | mean reward | reward std | gain in SFT std | mean KL (nats) | words |")
    print("|---|---|---|---|---|---|")
    for name, row in results.items():
        gain = (row["reward_mean"] - base["reward_mean"]) / base["reward_std"]
        row["gain_in_first_policy_std"] = gain
        print(f"| {name} | {row['reward_mean']:.3f} | {row['reward_std']:.3f} | {gain:+.2f} | {row['kl_mean']:.2f} | "
              f"{row['length_words']:.1f} |")
    for name, texts in examples.items():
        print(f"\n{name}:", *(f"  - {text}" for text in texts), sep="\n")
    if args.out:
        Path(args.out).write_text(json.dumps({"prompts": prompts[:: args.samples], "results": results,
                                              "examples": examples}, indent=2))


if __name__ == "__main__":
    main()
