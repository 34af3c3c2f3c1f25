"""Causal-LM supervised fine-tuning data: chat-template rendering, prompt masking, packing and collation.

Only response tokens are trained: labels are -100 on the system/user/template tokens and hold the real ids on the
assistant's reply including the end-of-turn token after it (so the model learns to stop). Labels are *unshifted*
(labels[t] == input_ids[t] where supervised); the model or the objective shifts them by one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch

from deltatune.data.text import pad_token_id
from deltatune.errors import UserError

IGNORE_INDEX = -100
Example = dict[str, list[int]]


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer can render conversations itself."""
    return bool(getattr(tokenizer, "chat_template", None)) and hasattr(tokenizer, "apply_chat_template")


def _ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids without the tokenizer's own special tokens (the template already wrote them as text)."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _split_templated(tokenizer: Any, prompts: list[str], responses: list[str]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) per pair, using the chat template.

    The prompt part is the prompt-only conversation rendered with ``add_generation_prompt=True``: exactly what the
    model sees at inference before it starts answering. When the full conversation's tokens start with those ids we
    cut there. If tokenisation merges tokens across the boundary but the *text* still starts with the prompt part,
    the remainder is tokenised on its own (which is what generation would produce after the prompt). Templates that
    render the prompt differently once a reply follows fall back to the longest common token prefix.
    """
    user = [[{"role": "user", "content": prompt}] for prompt in prompts]
    prefixes = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in user]
    fulls = [
        tokenizer.apply_chat_template(m + [{"role": "assistant", "content": response}], tokenize=False)
        for m, response in zip(user, responses)
    ]
    prefix_ids, full_ids = _ids(tokenizer, prefixes), _ids(tokenizer, fulls)
    pairs: list[tuple[list[int], list[int]]] = []
    for prefix_text, full_text, prefix, full in zip(prefixes, fulls, prefix_ids, full_ids):
        if full[: len(prefix)] == prefix:
            pairs.append((prefix, full[len(prefix):]))
        elif full_text.startswith(prefix_text):
            pairs.append((prefix, _ids(tokenizer, [full_text[len(prefix_text):]])[0]))
        else:
            common = 0
            while common < min(len(prefix), len(full)) and prefix[common] == full[common]:
                common += 1
            pairs.append((full[:common], full[common:]))
    return pairs


def _split_plain(tokenizer: Any, prompts: list[str], responses: list[str]) -> list[tuple[list[int], list[int]]]:
    """Fallback without a chat template: "prompt\\n" then the response and an end token (eos, else sep)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    end = getattr(tokenizer, "eos_token_id", None)
    end = end if end is not None else getattr(tokenizer, "sep_token_id", None)
    head = [bos] if bos is not None else []
    tail = [end] if end is not None else []
    prefix_ids = _ids(tokenizer, [prompt + "\n" for prompt in prompts])
    response_ids = _ids(tokenizer, responses)
    return [(head + prefix, response + tail) for prefix, response in zip(prefix_ids, response_ids)]


def _truncate(prefix: list[int], response: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Fit prompt + response into max_length while keeping some supervised tokens.

    Plain right-truncation is used whenever the prompt leaves room for at least one response token. A prompt too long
    for that would leave an example with nothing to learn, so it is cut from the *left* (keeping the text next to the
    reply) to leave half of max_length for the response.
    """
    room = max_length - len(prefix) if len(prefix) < max_length else max_length // 2
    keep_response = min(len(response), room)
    keep_prefix = min(len(prefix), max_length - keep_response)
    return prefix[len(prefix) - keep_prefix:], response[:keep_response]


def encode_sft(tokenizer: Any, prompts: list[str], responses: list[str], max_length: int) -> list[Example]:
    """Examples {"input_ids", "labels"} with -100 on every prompt/template token."""
    split = _splitter(tokenizer, max_length)
    return [_example(*_truncate(prefix, response, max_length)) for prefix, response in split(tokenizer, prompts,
                                                                                              responses)]


def encode_sft_pairs(tokenizer: Any, prompts: list[str], chosen: list[str], rejected: list[str],
                     max_length: int) -> tuple[list[Example], list[Example]]:
    """`encode_sft` of both halves of preference pairs, each pair's prompt cut once for both (by the longer
    response): DPO compares log π(chosen | x) with log π(rejected | x), which needs the same x on both sides."""
    split = _splitter(tokenizer, max_length)
    halves: tuple[list[Example], list[Example]] = ([], [])
    for (prefix, good), (other_prefix, bad) in zip(split(tokenizer, prompts, chosen), split(tokenizer, prompts,
                                                                                            rejected)):
        if prefix != other_prefix:  # a template that renders the prompt differently per reply: cut each alone
            halves[0].append(_example(*_truncate(prefix, good, max_length)))
            halves[1].append(_example(*_truncate(other_prefix, bad, max_length)))
            continue
        kept, _ = _truncate(prefix, max(good, bad, key=len), max_length)
        for half, response in zip(halves, (good, bad)):
            half.append(_example(kept, response[: max_length - len(kept)]))
    return halves


def _splitter(tokenizer: Any, max_length: int) -> Any:
    """How prompt and response ids are cut apart for this tokenizer (its chat template, else plain text), once
    max_length is checked."""
    if max_length < 2:
        raise UserError(f"data.max_length is {max_length}; use at least 2 (typical: 512 for chat data)")
    return _split_templated if has_chat_template(tokenizer) else _split_plain


def _example(prefix: list[int], response: list[int]) -> Example:
    return {"input_ids": prefix + response, "labels": [IGNORE_INDEX] * len(prefix) + response}


def encode_prompts(tokenizer: Any, prompts: list[str], max_length: int) -> list[Example]:
    """Prompt-only examples for generation: {"input_ids": what the model sees before it answers, "prompt": the text}.

    The ids are exactly the prefix `encode_sft` puts before a response (the chat template's generation prompt, or
    bos + "prompt\n" without a template), so a policy generates from where SFT taught it to answer. A prompt longer
    than max_length keeps its last max_length tokens (the text next to the reply).
    """
    if max_length < 2:
        raise UserError(f"data.max_length is {max_length}; use at least 2 (typical: 256 for prompts)")
    if has_chat_template(tokenizer):
        user = [[{"role": "user", "content": prompt}] for prompt in prompts]
        prefixes = _ids(tokenizer, [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
                                    for m in user])
    else:
        prefixes = [prefix for prefix, _ in _split_plain(tokenizer, prompts, [""] * len(prompts))]
    return [{"input_ids": prefix[-max_length:], "prompt": prompt} for prefix, prompt in zip(prefixes, prompts)]


@dataclass
class PromptCollator:
    """Left-pads prompt batches for generation: {"input_ids", "attention_mask", "prompt": list of texts}. Left, so
    every row's last position is its last prompt token and generated tokens line up in one column per step."""

    pad_id: int

    def __call__(self, batch: list[Example]) -> dict[str, Any]:
        longest = max(len(example["input_ids"]) for example in batch)
        ids = [[self.pad_id] * (longest - len(e["input_ids"])) + list(e["input_ids"]) for e in batch]
        mask = [[0] * (longest - len(e["input_ids"])) + [1] * len(e["input_ids"]) for e in batch]
        return {"input_ids": torch.tensor(ids, dtype=torch.long), "attention_mask": torch.tensor(mask, dtype=torch.long),
                "prompt": [example["prompt"] for example in batch]}


def pack_examples(examples: list[Example], max_length: int) -> list[Example]:
    """`iter_packed` as a list."""
    return list(iter_packed(examples, max_length))


def iter_packed(examples: Iterable[Example], max_length: int) -> Iterator[Example]:
    """Greedily concatenate examples, in order, into sequences of at most max_length tokens.

    Each packed example gets position_ids restarting at 0 for every original example: transformers (>= 5, see
    ``find_packed_sequence_indices`` in masking_utils) turns restarting positions into a block-diagonal causal mask
    when no attention_mask is passed, so examples never attend to each other. The first token of every packed
    sub-example gets label -100: after the model's one-token shift, that label would be predicted from the previous
    example's last token, a cross-boundary loss the unpacked example never has.
    """
    current: Example = {"input_ids": [], "labels": [], "position_ids": []}
    for example in examples:
        length = len(example["input_ids"])
        if current["input_ids"] and len(current["input_ids"]) + length > max_length:
            yield current
            current = {"input_ids": [], "labels": [], "position_ids": []}
        current["input_ids"] += example["input_ids"]
        current["labels"] += [IGNORE_INDEX] + example["labels"][1:]
        current["position_ids"] += list(range(length))
    if current["input_ids"]:
        yield current


@dataclass
class CausalLMCollator:
    """Right-pads SFT batches; packed batches (with position_ids) get no attention_mask.

    Unpacked: input_ids padded with the pad id (eos when there is none), labels with -100, plus attention_mask.
    Packed: input_ids, labels, position_ids only. Padding is appended as one more "example" whose positions
    restart at 0, so the block-diagonal mask keeps real tokens from ever seeing it. The model must be called with
    ``use_cache=False`` for packed batches: transformers skips packed-sequence detection when a KV cache is present.
    """

    pad_id: int

    def __call__(self, batch: list[Example]) -> dict[str, torch.Tensor]:
        longest = max(len(example["input_ids"]) for example in batch)
        input_ids, labels, extra = [], [], []
        packed = "position_ids" in batch[0]
        for example in batch:
            pad = longest - len(example["input_ids"])
            input_ids.append(list(example["input_ids"]) + [self.pad_id] * pad)
            labels.append(list(example["labels"]) + [IGNORE_INDEX] * pad)
            if packed:
                extra.append(list(example["position_ids"]) + list(range(pad)))
            else:
                extra.append([1] * len(example["input_ids"]) + [0] * pad)
        out = {"input_ids": torch.tensor(input_ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long)}
        out["position_ids" if packed else "attention_mask"] = torch.tensor(extra, dtype=torch.long)
        return out


def sft_collator(tokenizer: Any) -> CausalLMCollator:
    """The collate function for SFT batches from this tokenizer."""
    return CausalLMCollator(pad_token_id(tokenizer))


def check_packing_keeps_examples_apart(model: Any) -> None:
    """A UserError unless `model` keeps packed examples apart. Packed rows carry no attention mask: transformers
    derives a block-diagonal one from the restarting position_ids, which only some architectures read (Llama,
    GPT-2, NeoX do; OPT and BLOOM do not, nor flash attention on batches of several rows). Probed once on two rows
    of one shape, each holding two examples: the second examples' logits must have exactly zero gradient with
    respect to the first examples' input embeddings. Exactly zero, not small: a masked attention weight is exactly
    0 in any dtype, while comparing the logits themselves would have to tell rounding from a leak (two packings of
    SmolLM2's second example differ by 1e-4 in logits of ±20; a tiny OPT leaks 0.06 in logits of ±0.2)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is None or not _second_examples_blind_to_first(model, embeddings):
        raise UserError(f"{type(model).__name__} lets packed examples attend to each other (its attention does not "
                        "restart at each example's position_ids); set data.packing=false")


def _second_examples_blind_to_first(model: Any, embeddings: torch.nn.Module) -> bool:
    vocabulary = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 10)
    device = next(model.parameters()).device
    rows = torch.tensor([[1, 2, 3, 4, 5], [7, 8, 9, 4, 5]], device=device) % vocabulary
    positions = torch.tensor([[0, 1, 2, 0, 1]] * 2, device=device)
    captured: list[torch.Tensor] = []

    def capture(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
        captured.append(output if output.requires_grad else output.requires_grad_())

    handle = embeddings.register_forward_hook(capture)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            logits = model(input_ids=rows, position_ids=positions, use_cache=False).logits
            # autograd.grad, not backward: the trained parameters' .grad stay untouched.
            (gradient,) = torch.autograd.grad(logits[:, -2:].float().sum(), captured[-1], allow_unused=True)
    except TypeError:  # a forward without position_ids
        return False
    finally:
        handle.remove()
        model.train(was_training)
    # Methods may put virtual tokens in front: the first examples are the 3 positions before the last 2.
    return gradient is not None and bool(gradient[:, -2:].any()) and not bool(gradient[:, -5:-2].any())
