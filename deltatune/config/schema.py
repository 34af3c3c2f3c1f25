"""The run configuration: nested dataclasses shared by YAML files, CLI overrides and the Python API.

Every field has a default so an empty YAML file is a valid run (MiniLM on Rotten Tomatoes, full fine-tuning).
The `method` section is polymorphic: its `name` picks a dataclass registered by a file in `deltatune/methods/`,
so adding a method never touches this file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class MethodConfig:
    """Base of every method's options; each method subclasses it in its own file and registers it."""

    name: str = "full"


@dataclass
class ModelConfig:
    """Which network to fine-tune and for what task.

    `name` is an alias (`minilm-l6`, `smollm2-135m`, `efficientnet-lite0`), a local transformers directory, a
    `.gguf` file, or `package.module:function` returning an `nn.Module`.
    """

    name: str = "minilm-l6"
    task: str = "auto"  # classification | causal-lm | image-classification; "auto" takes the alias's task
    num_labels: int | None = None  # None: counted from the training data
    family: str = "auto"  # architecture table entry; "auto" detects it from the model
    # Pickle-only weights (pytorch_model.bin) are refused unless this is true; they are then read weights-only.
    allow_pickle: bool = False


@dataclass
class SplitConfig:
    """Seeded train/validation/test fractions; the resulting row indices are saved with the run."""

    validation: float = 0.1
    test: float = 0.1
    seed: int = 0


@dataclass
class DataConfig:
    """Where examples come from and how they become tensors.

    `name` is an embedded alias (`rotten-tomatoes`, `chatterbot`, `mnist-5k`, `digits`) or a path to a
    .jsonl/.csv/.parquet file or an image folder (one subfolder per class). Column fields map file columns to roles.
    """

    name: str = "rotten-tomatoes"
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    prompt_column: str = "prompt"
    response_column: str = "response"
    image_column: str = "image"
    # Text files' encoding: "auto" reads UTF-8 (a byte-order mark is dropped) and names the fix when that fails;
    # anything else is a Python codec name such as latin-1 or cp1252.
    encoding: str = "auto"
    max_length: int = 128
    max_examples: int | None = None  # keep the first N rows after shuffling (quick experiments)
    packing: bool = False  # causal-LM SFT: pack several examples per sequence, attention kept within each
    image_size: int | None = None  # None: the model's own input size
    split: SplitConfig = field(default_factory=SplitConfig)


@dataclass
class TrainConfig:
    """The one training loop's settings; objectives plug in by name."""

    objective: str = "auto"  # "auto": the task's default objective
    epochs: float = 1.0
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    batch_size: int = 32
    eval_batch_size: int = 64
    group_by_length: bool = True  # batch similar-length texts together (less padding); order stays seeded
    gradient_accumulation: int = 1
    lr: float = 5e-5
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    schedule: str = "linear"  # linear | cosine | constant
    warmup_ratio: float = 0.06
    warmup_steps: int | None = None  # overrides warmup_ratio when set
    max_grad_norm: float | None = 1.0
    eval_every: int | None = None  # optimizer steps; None: once per epoch
    save_every: int | None = None  # optimizer steps; None: at each evaluation
    log_every: int = 10
    metric: str = "auto"  # validation metric for the best checkpoint; "auto": the objective's main metric
    early_stopping_patience: int | None = None  # evaluations without improvement before stopping
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (fp32 on CPU, bf16 on CUDA if supported) | fp32 | bf16 | fp16
    num_threads: int | None = None  # torch intra-op threads on CPU; None leaves torch's choice
    progress: bool = True


@dataclass
class RunConfig:
    """A whole run: what to train, on what data, with which method, and how."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str = "runs"
    run_name: str | None = None  # None: <model>-<method>-<timestamp>
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes saved with the run
