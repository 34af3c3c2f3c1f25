"""Text generation from a finished run whose task generates text: what the fine-tuned model says, optionally beside
the base model.

    deltatune generate RUN_DIR --prompt "How are you?" --compare

"base" is the pretrained model without the method (not the method's untrained start: an untrained soft prompt or
prefix already changes what a model says).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from deltatune.errors import UserError
from deltatune.runs import open_run


@torch.no_grad()
def generate_text(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 48) -> str:
    """Greedy continuation of `prompt`, given to the model exactly as SFT put a prompt before its response (the chat
    template's generation prompt, or bos + "prompt\n" without a template): the context the run was trained on."""
    from deltatune.data.sft import encode_prompts

    # No cut here: a prompt longer than the model's positions fails in the model, as it would in transformers.
    (example,) = encode_prompts(tokenizer, [prompt], max_length=1 << 30)
    ids = torch.tensor([example["input_ids"]], dtype=torch.long)
    model.eval()
    device = next(model.parameters()).device
    output = model.generate(ids.to(device), attention_mask=torch.ones_like(ids).to(device), do_sample=False,
                            max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True).strip()


def generate_from_run(run_path: str | Path, prompts: list[str], compare: bool = False,
                      max_new_tokens: int = 48, echo=print) -> list[dict[str, str]]:
    """Generate with a finished run's model (and, with `compare`, with the base model first)."""
    from deltatune.models import load_processor
    from deltatune.tasks import available_tasks

    saved = open_run(run_path)
    if not saved.task.can_generate:
        generating = [name for name, task in available_tasks().items() if task.can_generate]
        raise UserError(f"{saved.run_dir.path} is a {saved.task.name} run; generation needs a run whose task "
                        f"generates text ({', '.join(generating)})")
    results = [{"prompt": prompt} for prompt in prompts]
    if compare:  # the base model first and alone, so the two models never share memory
        base, tokenizer = saved.load_base_model(), load_processor(saved.config.model, saved.task)
        for result in results:
            result["base"] = generate_text(base, tokenizer, result["prompt"], max_new_tokens)
        del base
    run = saved.load()
    for result in results:
        result["tuned"] = generate_text(run.model, run.processor, result["prompt"], max_new_tokens)
        echo(f"prompt: {result['prompt']}")
        if compare:
            echo(f"  base:  {result['base']}")
        echo(f"  tuned: {result['tuned']}")
    return results
