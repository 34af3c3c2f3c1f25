"""Architecture facts, one small table entry per model family.

Methods select modules through these facts ("the last 2 blocks", "the attention projections", "the head")
instead of hard-coding names, so a method written once works on BERT, Llama and EfficientNet alike. Patterns are
regular expressions searched in full parameter/module names, so a wrapper prefix (e.g. `backbone.`) is harmless.

Adding a family is one `Family(...)` entry below; nothing else changes.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from deltatune.errors import UserError


@dataclass(frozen=True)
class Family:
    """Where things are in one architecture.

    block: regex whose first group captures the index of the repeated block (transformer layer, CNN stage block).
    attention / mlp: regexes for the linear layers inside a block's attention and feed-forward parts.
    head: regexes for a task head the loader creates new (a classifier, a replaced last layer); it trains under
        every selective method. A pretrained LM head is not one: it stays frozen unless chosen explicitly.
    after_blocks: regexes for what sits between the last block and the head (a final norm, a CNN's conv head);
        it trains together with the last blocks.
    attention_output / mlp_output: regexes for the module whose output is the attention / feed-forward sublayer's
        result just before its residual add (where bottleneck adapters go); empty where there is none.
    mlp_output_norm: regexes for the norm a post-norm block applies to its feed-forward result plus residual (BERT's
        `output.LayerNorm`; Pfeiffer adapters read its output); empty in pre-norm blocks (Llama), which have none.
    detect: model_type values (transformers) or class names that identify the family.
    """

    name: str
    block: str
    attention: tuple[str, ...]
    mlp: tuple[str, ...]
    head: tuple[str, ...]
    after_blocks: tuple[str, ...] = ()
    attention_output: tuple[str, ...] = ()
    mlp_output: tuple[str, ...] = ()
    mlp_output_norm: tuple[str, ...] = ()
    detect: tuple[str, ...] = ()
    # The blocks a method may adapt (`method.layers`); None: all. The attention / MLP / sublayer-output tests
    # below answer False outside them, so a method choosing its modules through them stays inside these blocks.
    selected_blocks: frozenset[int] | None = None

    def block_index(self, name: str) -> int | None:
        """The block number a parameter/module name belongs to, or None outside the blocks."""
        match = re.search(self.block, name)
        return int(match.group(1)) if match else None

    def restricted_to(self, blocks: Iterable[int]) -> "Family":
        """This family with only `blocks` open to a method."""
        return dataclasses.replace(self, selected_blocks=frozenset(blocks))

    def in_selected_block(self, name: str) -> bool:
        """Inside a block, and inside one of the selected blocks when there is a selection."""
        index = self.block_index(name)
        return index is not None and (self.selected_blocks is None or index in self.selected_blocks)

    def num_blocks(self, model: nn.Module) -> int:
        """How many repeated blocks the model has (1 + the largest index seen)."""
        indices = [self.block_index(name) for name, _ in model.named_parameters()]
        found = [i for i in indices if i is not None]
        return max(found) + 1 if found else 0

    def is_head(self, name: str) -> bool:
        return any(re.search(pattern, name) for pattern in self.head)

    def is_after_blocks(self, name: str) -> bool:
        # Blocks reuse names like `_bn1`, so anything inside a block is never "after" the blocks.
        if self.block_index(name) is not None:
            return False
        return any(re.search(pattern, name) for pattern in self.after_blocks)

    def is_attention(self, name: str) -> bool:
        return self.in_selected_block(name) and any(re.search(p, name) for p in self.attention)

    def is_mlp(self, name: str) -> bool:
        return self.in_selected_block(name) and any(re.search(p, name) for p in self.mlp)

    def is_attention_output(self, name: str) -> bool:
        return self.in_selected_block(name) and any(re.search(p, name) for p in self.attention_output)

    def is_mlp_output(self, name: str) -> bool:
        return self.in_selected_block(name) and any(re.search(p, name) for p in self.mlp_output)

    def is_mlp_output_norm(self, name: str) -> bool:
        return self.in_selected_block(name) and any(re.search(p, name) for p in self.mlp_output_norm)


def check_block_indices(indices: list[int], total: int, key: str) -> None:
    """A UserError naming `key` when an index is not a block of a model with `total` blocks."""
    outside = [index for index in indices if not 0 <= index < total]
    if outside:
        raise UserError(f"{key} has {outside}, outside this model's {total} blocks; use indices 0 to {total - 1}")


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family(
            name="bert",
            block=r"(?:^|\.)encoder\.layer\.(\d+)\.",
            attention=(r"attention\.self\.(query|key|value)$", r"attention\.output\.dense$"),
            mlp=(r"intermediate\.dense$", r"\d+\.output\.dense$"),
            # The pooler feeds only the classification head, so it is head-side, not backbone.
            head=(r"(?:^|\.)classifier\.", r"(?:^|\.)pooler\."),
            attention_output=(r"attention\.output\.dense$",),
            mlp_output=(r"\d+\.output\.dense$",),  # layer.N.output.dense, not attention.output.dense
            mlp_output_norm=(r"\d+\.output\.LayerNorm$",),
            detect=("bert",),
        ),
        Family(
            name="llama",
            block=r"(?:^|\.)layers\.(\d+)\.",
            attention=(r"self_attn\.(q_proj|k_proj|v_proj|o_proj)$",),
            mlp=(r"mlp\.(gate_proj|up_proj|down_proj)$",),
            # Only a *new* head counts: SmolLM2's lm_head is pretrained and tied to the input embedding.
            head=(r"(?:^|\.)score\.",),
            after_blocks=(r"(?:^|\.)model\.norm\.",),
            attention_output=(r"self_attn\.o_proj$",),
            mlp_output=(r"mlp\.down_proj$",),
            detect=("llama", "mistral", "qwen2"),
        ),
        Family(
            name="efficientnet",
            block=r"(?:^|\.)_blocks\.(\d+)\.",
            attention=(r"_se_(reduce|expand)$",),  # squeeze-and-excitation is the CNN's channel attention
            mlp=(r"_(expand|depthwise|project)_conv$",),
            head=(r"(?:^|\.)_fc\.",),
            after_blocks=(r"(?:^|\.)_conv_head\.", r"(?:^|\.)_bn1\."),
            # No attention_output/mlp_output: an MBConv block has no transformer sublayers to put adapters after.
            detect=("EfficientNet",),
        ),
        Family(
            # Fallback for unknown models: blocks found by the common container names, the head by common names.
            name="generic",
            block=r"(?:^|\.)(?:layers|layer|h|blocks|block|stages)\.(\d+)\.",
            attention=(r"(q_proj|k_proj|v_proj|o_proj|query|key|value|c_attn|qkv)$",),
            mlp=(r"(fc1|fc2|up_proj|down_proj|gate_proj|c_fc|c_proj|dense)$",),
            head=(r"(?:^|\.)(classifier|head|score|fc)\.",),
            # The final norm of pre-norm decoders (GPT-2/Falcon ln_f, OPT/NeoX final_layer_norm, Phi final_layernorm):
            # it normalises what the last blocks produce, so it trains with them (freeze.last_n_blocks).
            after_blocks=(r"(?:^|\.)(?:ln_f|final_layer_norm|final_layernorm|norm_f)\.",),
            # BERT-likes (attention.output.dense), Llama/OPT/BART (o_proj/out_proj), GPT-2 (attn.c_proj / mlp.c_proj).
            attention_output=(r"(?:attn|attention)\.(?:o_proj|out_proj|c_proj|proj|dense)$",
                              r"attention\.output\.dense$"),
            mlp_output=(r"(?:mlp|ffn|feed_forward)\.(?:down_proj|fc2|c_proj|w2|dense_4h_to_h|out_proj)$",
                        r"\d+\.output\.dense$", r"\d+\.fc2$"),
            mlp_output_norm=(r"\d+\.output\.LayerNorm$",),  # BERT-likes; pre-norm models have none
        ),
    )
}


def family_of(model: nn.Module, name: str = "auto") -> Family:
    """The family entry for `model`: by explicit name, else by transformers' model_type or the class names inside."""
    if name != "auto":
        if name not in FAMILIES:
            raise UserError(f"unknown model.family {name!r}; valid: auto, {', '.join(FAMILIES)}")
        return FAMILIES[name]
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    class_names = {type(module).__name__ for module in model.modules()}
    for family in FAMILIES.values():
        if model_type in family.detect or class_names & set(family.detect):
            return family
    return FAMILIES["generic"]
