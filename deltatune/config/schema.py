"""The run configuration: nested dataclasses shared by YAML files, CLI overrides and the Python API.

Every field has a default so an empty YAML file is a valid run (MiniLM on Rotten Tomatoes, full fine-tuning).
The `method` and `objective` sections are polymorphic: their `name` picks a dataclass registered by a file in
`deltatune/methods/` or `deltatune/objectives/`, so adding a method or an objective never touches this file.

Numeric ranges and choices live in each field's metadata (`deltatune.config.constraints`); the strict parser checks
them, so a zero batch size or a misspelt schedule is refused before anything is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from deltatune.config.constraints import above, at_least, between, matching, one_of

SCHEDULES = ("linear", "cosine", "constant")
DTYPES = ("auto", "fp32", "bf16", "fp16")
SEED_RANGE = between(0, 2**32 - 1)  # what every seeded generator (torch, numpy) accepts


@dataclass
class MethodConfig:
    """Base of every method's options; each method subclasses it in its own file and registers it."""

    name: str = "full"


@dataclass
class ObjectiveConfig:
    """Base of every objective's options; each objective subclasses it in its own file and names it `config_class`.

    "auto" trains with the task's default objective and takes no other key (name the objective to set options).
    An objective that needs extra models declares them by role (`Objective.models`) and has one field per role,
    `<role>_model`, naming where that model comes from (see `deltatune.objectives.base.ModelRole`).
    """

    name: str = "auto"


@dataclass
class StudentConfig:
    """A smaller student cut from the model's own blocks (`deltatune.models.student`): `keep_layers` lists the
    block indices to keep (e.g. [0, 2, 4] of a 6-block encoder), `every_other` keeps blocks 0, 2, 4, ...; unset,
    the model is used whole."""

    keep_layers: list[int] | None = None
    every_other: bool = False


@dataclass
class ModelConfig:
    """Which network to fine-tune and for what task.

    `name` is an alias (`minilm-l6`, `smollm2-135m`, `efficientnet-lite0`), a local transformers directory, a
    `.gguf` file, `package.module:function` returning an `nn.Module`, or `dual-encoder` (an image and a text tower
    trained together, `image` and `text` naming them).
    """

    name: str = "minilm-l6"
    task: str = "auto"  # a registered task (`deltatune/tasks/`); "auto": the task the model was built for
    num_labels: int | None = field(default=None, metadata=at_least(1))  # None: counted from the training data
    family: str = "auto"  # architecture table entry; "auto" detects it from the model
    # Pickle-only weights (pytorch_model.bin) are refused unless this is true; they are then read weights-only.
    allow_pickle: bool = False
    student: StudentConfig = field(default_factory=StudentConfig)  # keep a subset of the blocks (distillation)
    # A finished run of the same model and method (a meta-learned start, an earlier stage): its trained weights
    # (adapters, head, whatever the method saved) replace the method's fresh initialisation before training.
    init_from: str | None = None
    # name: dual-encoder only (task image-text): the image and text towers (any image-classification and text model
    # name), each projected to `projection_dim` (null: no projections; the towers' feature sizes must then agree).
    image: str | None = None
    text: str | None = None
    projection_dim: int | None = field(default=256, metadata=at_least(1))


@dataclass
class SplitConfig:
    """Seeded train/validation/test fractions; the resulting row indices are saved with the run."""

    validation: float = field(default=0.1, metadata=between(0, 1, high_open=True))
    test: float = field(default=0.1, metadata=between(0, 1, high_open=True))
    seed: int = field(default=0, metadata=SEED_RANGE)
    # A column whose rows stay together in one split (a movie, a user, a prompt); None: rows are split one by one,
    # except for an alias that names its own (rotten-tomatoes-pairs splits by movie_name).
    group: str | None = None
    # Cross-fitting: the train split is dealt into `folds` seeded parts (whole groups when grouped) and part
    # `held_out_fold` is left out of training, so the run's model has never seen those rows. One such run per part
    # gives every training row a teacher that did not learn it (distillation's objective.teacher_folds).
    folds: int = field(default=5, metadata=at_least(2))
    held_out_fold: int | None = field(default=None, metadata=at_least(0))


@dataclass
class DataConfig:
    """Where examples come from and how they become tensors.

    `name` is an embedded alias (`rotten-tomatoes`, `chatterbot`, `mnist-5k`, `digits`) or a path to a
    .jsonl/.csv/.parquet file or an image folder (one subfolder per class). `columns` maps the task's data roles to
    the file's columns, e.g. `{text: review, label: sentiment}`; roles left out take the task's default column
    (each task in `deltatune/tasks/` lists its roles and defaults).
    """

    # Keys this section had before `columns`, and the key that replaced each one; the loader refuses them with a
    # one-line error that shows the new spelling.
    replaced_keys: ClassVar[dict[str, str]] = {
        "text_column": "data.columns.text", "text_pair_column": "data.columns.text_pair",
        "label_column": "data.columns.label", "prompt_column": "data.columns.prompt",
        "response_column": "data.columns.response", "image_column": "data.columns.image",
    }

    name: str = "rotten-tomatoes"
    columns: dict[str, str] = field(default_factory=dict)  # role -> column; unset roles take the task's default
    # Text files' encoding: "auto" reads UTF-8 (a byte-order mark is dropped) and names the fix when that fails;
    # anything else is a Python codec name such as latin-1 or cp1252.
    encoding: str = "auto"
    max_length: int = field(default=128, metadata=at_least(1))
    # keep the first N rows after shuffling (quick experiments)
    max_examples: int | None = field(default=None, metadata=at_least(1))
    packing: bool = False  # causal-LM SFT: pack several examples per sequence, attention kept within each
    # A data file's encoded examples go to an on-disk store ($DELTATUNE_CACHE/data), read per batch and reused by
    # later runs with the same file and settings, so datasets larger than memory train (deltatune.data.cached).
    cache: bool = True
    image_size: int | None = field(default=None, metadata=at_least(1))  # None: the model's own input size
    # Rows without labels for self-training or distillation (deltatune.data.unlabelled): a second source with the
    # same input columns, and, for experiments, the share of train-split labels to keep (the rest are hidden).
    unlabelled: str | None = None
    labelled_fraction: float | None = field(default=None, metadata=between(0, 1, low_open=True))
    split: SplitConfig = field(default_factory=SplitConfig)


@dataclass
class TrainConfig:
    """The one training loop's settings; what it optimises is the `objective` section."""

    # Keys this section had before, and the full key that replaced each one (refused with the new spelling).
    replaced_keys: ClassVar[dict[str, str]] = {"objective": "objective.name"}

    epochs: float = field(default=1.0, metadata=above(0))
    max_steps: int | None = field(default=None, metadata=at_least(1))  # optimizer steps; overrides epochs when set
    batch_size: int = field(default=32, metadata=at_least(1))
    eval_batch_size: int = field(default=64, metadata=at_least(1))
    group_by_length: bool = True  # batch similar-length texts together (less padding); order stays seeded
    gradient_accumulation: int = field(default=1, metadata=at_least(1))
    lr: float = field(default=5e-5, metadata=above(0))
    weight_decay: float = field(default=0.01, metadata=at_least(0))
    # Layer-wise learning-rate decay (Howard & Ruder 2018; ELECTRA, BEiT): block i of L trains at
    # lr · decay^(L − 1 − i), embeddings at lr · decay^L, the head and what follows the blocks at lr. None: off.
    layer_lr_decay: float | None = field(default=None, metadata=between(0, 1, low_open=True))
    # sgd: plain SGD (with `momentum`), e.g. the outer step of Reptile, whose size is the learning rate itself
    optimizer: str = field(default="adamw", metadata=one_of("adamw", "sgd"))
    momentum: float = field(default=0.0, metadata=between(0, 1, high_open=True))  # sgd only
    adam_betas: tuple[float, float] = field(default=(0.9, 0.999), metadata=between(0, 1, high_open=True))
    adam_eps: float = field(default=1e-8, metadata=above(0))
    schedule: str = field(default="linear", metadata=one_of(*SCHEDULES))
    warmup_ratio: float = field(default=0.06, metadata=between(0, 1))
    warmup_steps: int | None = field(default=None, metadata=at_least(0))  # overrides warmup_ratio when set
    # Run the warm-up and decay once per epoch instead of once per run (SGDR's warm restarts, Loshchilov & Hutter
    # 2017); with self-training an epoch is a round, so every round ends on a small learning rate.
    restart_schedule_each_epoch: bool = False
    max_grad_norm: float | None = field(default=1.0, metadata=above(0))  # None: no clipping
    eval_every: int | None = field(default=None, metadata=at_least(1))  # optimizer steps; None: once per epoch
    save_every: int | None = field(default=None, metadata=at_least(1))  # optimizer steps; None: at each evaluation
    log_every: int = field(default=10, metadata=at_least(1))
    metric: str = "auto"  # validation metric for the best checkpoint; "auto": the objective's main metric
    # evaluations without improvement before stopping
    early_stopping_patience: int | None = field(default=None, metadata=at_least(1))
    seed: int = field(default=0, metadata=SEED_RANGE)
    device: str = field(default="auto", metadata=matching(r"auto|cpu|mps|cuda(:\d+)?", "auto, cpu, cuda, cuda:N, mps"))
    # auto (fp32 on CPU, bf16 on GPUs that have it natively) | fp32 | bf16 | fp16 (with a loss scaler: GradScaler)
    dtype: str = field(default="auto", metadata=one_of(*DTYPES))
    # torch intra-op threads on CPU; None leaves torch's choice
    num_threads: int | None = field(default=None, metadata=at_least(1))
    progress: bool = True
    # Recompute each block's activations in backward instead of keeping them (transformers models): less memory for
    # about one more forward pass of time.
    gradient_checkpointing: bool = False
    # torch.compile the model's forward (dynamic shapes, so varying lengths do not recompile); compiled kernels are
    # cached on disk (TORCHINDUCTOR_CACHE_DIR, default ~/.cache/deltatune/inductor) and reused by later runs.
    compile: bool = False
    # With several ranks (`--nproc`, torchrun): ddp keeps a whole copy of the model on every rank and averages
    # gradients; fsdp (FSDP2) shards every parameter, gradient and AdamW moment over the ranks, for models whose
    # training state does not fit one device. One process ignores it.
    distributed: str = field(default="ddp", metadata=one_of("ddp", "fsdp"))
    # Linux: hand memory freed during a step (activations, qlora's dequantised weights) back to the OS instead of
    # keeping it in the heap: a lower peak RSS (SmolLM2 SFT: -0.4 to -0.56 GB) at 0.61x the speed (page faults on
    # every fresh mapping; docs/benchmarks.md), so off unless memory is the limit.
    return_freed_memory: bool = False


@dataclass
class RunConfig:
    """A whole run: what to train, on what data, with which method, and how."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str = "runs"
    run_name: str | None = None  # None: <model>-<method>-<timestamp>
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes saved with the run
