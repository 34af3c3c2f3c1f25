"""P-tuning (Liu et al., 2021, "GPT Understands, Too").

Like prompt tuning, n virtual tokens are prepended to the frozen model's input embeddings, but they are not trained
directly: a small trainable encoder produces them from n trainable seeds e ∈ R^{n×d}, which couples the tokens and
makes optimisation easier than for free vectors:

    MLP  (default):  P = W₃·ReLU(W₂·ReLU(W₁·e + b₁) + b₂) + b₃                    (d → h → h → d)
    LSTM:            P = W₂·ReLU(W₁·BiLSTM(e) + b₁) + b₂                           (d → 2h → 2h → d)

with h = `encoder_hidden_size` (default: d) and `encoder_num_layers` LSTM layers: the structure of PEFT's
PromptEncoder. Input side as in `prompt.py`: h⁰ = [P ; E(x)], mask and positions extended by n, the virtual
positions dropped from the outputs. Adapter files are PEFT's P_TUNING files, which keep the resolved P only
(the encoder is a training-time reparameterisation); loading one gives a plain table of P.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from deltatune.config.schema import MethodConfig
from deltatune.errors import UserError
from deltatune.methods import register_method
from deltatune.methods.virtual_tokens.encoders import VirtualTokenEncoder
from deltatune.methods.virtual_tokens.method_base import InputPromptConfig, InputPromptMethod, check_positive_int
from deltatune.methods.virtual_tokens.model_layout import input_embeddings

ENCODER_TYPES = ("MLP", "LSTM")


@dataclass
class PTuningConfig(InputPromptConfig):
    name: str = "ptuning"
    encoder_reparameterization_type: str = "MLP"  # MLP | LSTM (a bidirectional LSTM, then a 2-layer MLP)
    encoder_hidden_size: int | None = None  # None: the model's embedding width
    encoder_num_layers: int = 2  # LSTM layers (the MLP always has PEFT's three Linear layers)
    encoder_dropout: float = 0.0  # between LSTM layers


class PromptEncoder(VirtualTokenEncoder):
    """Seeds `embedding` (n×d) through `lstm_head` (LSTM only) and `mlp_head` to the n virtual tokens."""

    def __init__(self, count: int, width: int, hidden: int, kind: str, lstm_layers: int, dropout: float) -> None:
        super().__init__()
        self.kind = kind
        self.embedding = nn.Embedding(count, width)
        if kind == "LSTM":
            self.lstm_head = nn.LSTM(width, hidden, num_layers=lstm_layers, dropout=dropout if lstm_layers > 1 else 0,
                                     bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, width))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, width))
        self.peft_fields = {"encoder_reparameterization_type": kind, "encoder_hidden_size": hidden,
                            "encoder_num_layers": lstm_layers, "encoder_dropout": dropout}

    @property
    def num_virtual_tokens(self) -> int:
        return self.embedding.num_embeddings

    def forward(self) -> Tensor:
        seeds = self.embedding.weight.unsqueeze(0)  # one sequence of n seeds for the LSTM
        if self.kind == "LSTM":
            seeds = self.lstm_head(seeds)[0]
        return self.mlp_head(seeds)[0]


@register_method("ptuning")
class PTuning(InputPromptMethod):
    description = "virtual input tokens produced by a trained MLP or LSTM prompt encoder (P-tuning)"
    config_class: ClassVar[type[MethodConfig]] = PTuningConfig
    file_type: ClassVar[str] = "P_TUNING"
    peft_type: ClassVar[str | None] = "P_TUNING"
    peft_field_names: ClassVar[tuple[str, ...]] = ("encoder_reparameterization_type", "encoder_hidden_size",
                                                   "encoder_num_layers", "encoder_dropout")

    @classmethod
    def contract_bad_options(cls) -> list[tuple[str, Any]]:
        return [*super().contract_bad_options(), ("encoder_reparameterization_type", "GRU"),
                ("encoder_hidden_size", 0), ("encoder_num_layers", 0), ("encoder_dropout", 1.0)]

    def build_encoder(self, model: nn.Module) -> PromptEncoder:
        config: PTuningConfig = self.config  # type: ignore[assignment]
        kind = str(config.encoder_reparameterization_type).upper()
        if kind not in ENCODER_TYPES:
            raise UserError(f"method.encoder_reparameterization_type must be MLP or LSTM, got "
                            f"{config.encoder_reparameterization_type!r}")
        if config.encoder_hidden_size is not None:
            check_positive_int("method.encoder_hidden_size", config.encoder_hidden_size, "128")
        check_positive_int("method.encoder_num_layers", config.encoder_num_layers, "2")
        if not 0.0 <= config.encoder_dropout < 1.0:
            raise UserError(f"method.encoder_dropout must be in [0, 1), got {config.encoder_dropout}")
        width = input_embeddings(model, self.name).embedding_dim
        return PromptEncoder(config.num_virtual_tokens, width, config.encoder_hidden_size or width, kind,
                             config.encoder_num_layers, config.encoder_dropout)
