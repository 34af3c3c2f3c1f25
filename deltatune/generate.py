"""Text generation from a causal-LM run: what the fine-tuned model says, optionally beside the base model.

    deltatune generate RUN_DIR --prompt "How are you?" --compare
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from deltatune.config.loader import parse_config, read_yaml
from deltatune.errors import UserError
from deltatune.runner import build_model
from deltatune.training.checkpoint import read_checkpoint_dir
from deltatune.training.run_dir import RunDir
from deltatune.training.state import load_weights


@torch.no_grad()
def generate_text(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 48) -> str:
    """Greedy continuation of `prompt`, formatted with the tokenizer's chat template when it has one."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt + "\n", return_tensors="pt")["input_ids"]
    model.eval()
    device = next(model.parameters()).device
    output = model.generate(ids.to(device), attention_mask=torch.ones_like(ids).to(device), do_sample=False,
                            max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True).strip()


def generate_from_run(run_path: str | Path, prompts: list[str], compare: bool = False,
                      max_new_tokens: int = 48, echo=print) -> list[dict[str, str]]:
    """Generate with a finished causal-LM run's model (and, with `compare`, with the base model first)."""
    from deltatune.models import load_processor, resolve_task

    run_dir = RunDir(run_path)
    if not (run_dir.weights / "state.json").exists():
        raise UserError(f"{run_dir.path} has no final weights; pass a finished run directory")
    config = parse_config(read_yaml(run_dir.path / "config.yaml"))
    task = resolve_task(config.model)
    if task != "causal-lm":
        raise UserError(f"{run_dir.path} is a {task} run; generation needs a causal-lm run")
    tokenizer = load_processor(config.model)
    model, method = build_model(config, task, None)
    results = [{"prompt": prompt} for prompt in prompts]
    if compare:
        for result in results:
            result["base"] = generate_text(model, tokenizer, result["prompt"], max_new_tokens)
    load_weights(model, method, dict(read_checkpoint_dir(run_dir.weights)[0]["model"]))
    for result in results:
        result["tuned"] = generate_text(model, tokenizer, result["prompt"], max_new_tokens)
        echo(f"prompt: {result['prompt']}")
        if compare:
            echo(f"  base:  {result['base']}")
        echo(f"  tuned: {result['tuned']}")
    return results
