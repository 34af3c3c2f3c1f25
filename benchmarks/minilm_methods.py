"""Every method on MiniLM-L6 / Rotten Tomatoes, as one README table: test accuracy, trainable parameters, training
tok/s and peak memory.

    python benchmarks/minilm_methods.py train [KEY ...]   # the runs (runs/table-KEY), skipping finished ones
    python benchmarks/minilm_methods.py speed [KEY ...]   # tok/s + peak RSS per method, each in its own process
    python benchmarks/minilm_methods.py table             # the markdown table from the two above
    python benchmarks/minilm_methods.py sweep houlsby     # the adapter recipe, chosen on validation (runs/sweep-*)

All runs share examples/minilm_rotten_tomatoes.yaml (model, data, split), so the test accuracies compare like for
like; only the method and its learning rate / epochs differ (the values each method's paper or peft's examples use
for small encoders). AdapterFusion fuses the Rotten Tomatoes Pfeiffer adapter with one trained on another task:
topic classification of chatterbot prompts (21 categories).

Accuracy comes from the full runs. Speed is measured separately, alone on the machine and with the same batches for
every method (the first STEPS batches of epoch 0 after WARMUP untimed ones), timed by the training loop's own
step (forward, backward, clipping, optimizer and schedule; no evaluation): tokens are real (non-padding) input
tokens, so methods that add virtual tokens pay for them here. Peak memory is the measuring process's peak RSS.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys

from _runs import RUNS, read_json, run_training

BASE = "examples/minilm_rotten_tomatoes.yaml"
STEPS, WARMUP = 60, 3
# Fusion reads only the bottleneck weights of its adapters, so the RT adapter it fuses is the Pfeiffer variant
# without trained layer norms.
RT_ADAPTER, TOPIC_ADAPTER = "runs/sweep-pfeiffer-lr3e-3", "runs/table-topic-adapter"

HEAD_ONLY, LAYER_NORMS = "method.modules_to_save=null", "method.modules_to_save=[classifier,pooler,LayerNorm]"
# Pfeiffer adapters wrap the feed-forward output norms, so only the others can train in full beside them.
OTHER_NORMS = "method.modules_to_save=[classifier,pooler,attention.output.LayerNorm,embeddings.LayerNorm]"

# key -> (table label, overrides). One epoch at the method's usual learning rate, except full fine-tuning and the
# bottleneck adapters (recipes chosen on validation by `sweep`, 3 epochs) and LoRA (the README's 3-epoch run).
METHODS: dict[str, tuple[str, list[str]]] = {
    "full": ("full fine-tuning", ["method.name=full", "train.epochs=3", "train.lr=1e-4"]),
    "freeze": ("freeze: last 2 of 6 blocks + head", ["method.name=freeze", "method.last_n_blocks=2",
                                                      "train.epochs=1", "train.lr=2e-4"]),
    "bitfit": ("BitFit (biases + head)", ["method.name=bitfit", "train.epochs=1", "train.lr=2e-3"]),
    "lora": ("LoRA r=8, all attention + MLP linears", ["method.name=lora", "method.r=8", "method.lora_alpha=16",
                                                       "train.epochs=3", "train.lr=1e-3"]),
    "houlsby": ("adapter, Houlsby (reduction 16)", ["method.name=adapter", "method.placement=houlsby",
                                                   "train.epochs=3", "train.lr=3e-3"]),
    "pfeiffer": ("adapter, Pfeiffer (reduction 16), other layer norms train", [
        "method.name=adapter", "method.placement=pfeiffer", "train.epochs=3", "train.lr=3e-3", OTHER_NORMS]),
    "fusion": ("AdapterFusion (RT + topic adapters)", ["method.name=adapter_fusion",
                                                       f"method.adapters=[{RT_ADAPTER},{TOPIC_ADAPTER}]",
                                                       "train.epochs=1", "train.lr=5e-4"]),
    "prefix": ("prefix tuning, 20 tokens, MLP reparam.", ["method.name=prefix", "train.epochs=1", "train.lr=1e-3"]),
    "prompt": ("prompt tuning, 20 tokens", ["method.name=prompt", "train.epochs=1", "train.lr=1e-2"]),
    "ptuning": ("P-tuning, 20 tokens, MLP encoder", ["method.name=ptuning", "train.epochs=1", "train.lr=3e-3"]),
    "ptuning_v2": ("P-tuning v2, 20 deep tokens", ["method.name=ptuning_v2", "train.epochs=1", "train.lr=1e-2"]),
    "sparse": ("sparse, 2% of block weights by Fisher", ["method.name=sparse", "method.density=0.02",
                                                         "method.selection=fisher", "train.epochs=1",
                                                         "train.lr=5e-4"]),
}
# The bottleneck adapters' recipe (`sweep houlsby|pfeiffer`): learning rate, whether the layer norms train too (as
# in Houlsby et al.), bottleneck width; 3 epochs each, chosen on validation accuracy only.
ADAPTER_VARIANTS = {
    "lr1e-3": ["train.epochs=3", "train.lr=1e-3", HEAD_ONLY, "method.reduction_factor=16"],
    "ln": ["train.epochs=3", "train.lr=1e-3", LAYER_NORMS, "method.reduction_factor=16"],
    "lr3e-3": ["train.epochs=3", "train.lr=3e-3", HEAD_ONLY, "method.reduction_factor=16"],
    "lr3e-3-ln": ["train.epochs=3", "train.lr=3e-3", LAYER_NORMS, "method.reduction_factor=16"],
}
# Full fine-tuning under the same rule: does it also gain from the adapters' 3 epochs?
SWEEPS: dict[str, dict[str, list[str]]] = {
    "houlsby": ADAPTER_VARIANTS,
    "pfeiffer": {"lr3e-3": ADAPTER_VARIANTS["lr3e-3"],
                 "lr3e-3-ln": ["train.epochs=3", "train.lr=3e-3", OTHER_NORMS, "method.reduction_factor=16"]},
    "full": {"1ep": ["train.epochs=1"], "3ep": ["train.epochs=3"]},
}
# Stage 1 of AdapterFusion on a second task; not a table row.
TOPIC = ["method.name=adapter", "method.placement=pfeiffer", "data.name=chatterbot", "data.columns.text=prompt",
         "data.columns.label=category", "train.epochs=3", "train.lr=1e-3", "train.eval_every=null"]


def with_settings(overrides: list[str], changes: list[str]) -> list[str]:
    """`overrides` with the keys that `changes` sets replaced by `changes`."""
    changed = {change.split("=")[0] for change in changes}
    return [o for o in overrides if o.split("=")[0] not in changed] + changes


def sweep(key: str, extra: list[str]) -> None:
    """Each variant of SWEEPS[key] on top of the method's row (runs/sweep-KEY-VARIANT), then their validation and
    test accuracy; the recipe is the best on validation, the test column only reports."""
    results = {}
    for variant, changes in SWEEPS[key].items():
        run_training(BASE, f"sweep-{key}-{variant}", [*with_settings(METHODS[key][1], changes), *extra])
        results[variant] = read_json(RUNS / f"sweep-{key}-{variant}" / "summary.json")["after"]
    best = max(results, key=lambda variant: results[variant]["validation"]["accuracy"])
    print(f"| {key} variant | settings | validation accuracy | test accuracy |\n|---|---|---|---|")
    for variant, after in results.items():
        mark = " (chosen)" if variant == best else ""
        print(f"| {variant}{mark} | {' '.join(SWEEPS[key][variant])} | {after['validation']['accuracy']:.4f} | "
              f"{after['test']['accuracy']:.4f} |")


def measure_speed(key: str) -> dict[str, float]:
    """Tok/s over STEPS optimizer steps of the training loop itself (after WARMUP) and this process's peak RSS; run
    in a fresh process."""
    import tempfile

    import torch

    from deltatune import load_config
    from deltatune.runner import calibrate, count_parameters, prepare
    from deltatune.training.loop import Batches, TrainingLoop, set_train_mode
    from deltatune.training.run_dir import RunDir

    overrides = TOPIC if key == "topic-adapter" else METHODS[key][1]
    if key == "fusion":  # the speed of the fusion layers does not depend on what the adapters learned
        overrides = [o for o in overrides if not o.startswith("method.adapters")] + ["method.num_new_adapters=2"]
    prepared = prepare(load_config(BASE, overrides))
    calibrate(prepared)
    data = prepared.data
    training = Batches(data.train, data.collate, prepared.config.train.group_by_length)
    with tempfile.TemporaryDirectory() as scratch:  # the loop is built with a run directory; one step writes nothing
        loop = TrainingLoop(prepared.model, prepared.method, prepared.objective, training, None,
                            prepared.config.train, RunDir(scratch), prepared.device)
    set_train_mode(prepared.model)
    for step, group in enumerate(loop.epoch_groups()[: WARMUP + STEPS]):
        if step == WARMUP:
            tokens, seconds = loop.state.tokens, loop.state.seconds
        loop.optimizer_step(group)
    trainable, total = count_parameters(prepared.model)
    return {"tokens_per_second": (loop.state.tokens - tokens) / (loop.state.seconds - seconds),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "trainable_parameters": trainable, "total_parameters": total, "threads": torch.get_num_threads()}


def speed(keys: list[str]) -> None:
    results = read_json(RUNS / "table-speed.json")
    for key in keys:
        output = subprocess.run([sys.executable, __file__, "_measure", key], check=True, capture_output=True,
                                text=True).stdout
        results[key] = json.loads(output.strip().splitlines()[-1])
        print(key, results[key], flush=True)
        (RUNS / "table-speed.json").write_text(json.dumps(results, indent=1))


def table() -> None:
    speeds = read_json(RUNS / "table-speed.json")
    full = read_json(RUNS / "table-full" / "summary.json")
    print("| method | test accuracy | vs full | trainable parameters | epochs, lr | train tok/s | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    for key, (label, overrides) in METHODS.items():
        summary = read_json(RUNS / f"table-{key}" / "summary.json")
        if not summary:
            continue
        accuracy = summary["after"]["test"]["accuracy"]
        versus = f"{100 * (accuracy - full['after']['test']['accuracy']):+.1f}" if full else "n/a"
        settings = {o.split("=")[0]: o.split("=", 1)[1] for o in overrides}
        measured = speeds.get(key, {})
        print(f"| {label} | {accuracy:.4f} | {versus} | {summary['trainable_parameters']:,} | "
              f"{settings.get('train.epochs')}, {settings.get('train.lr')} | "
              f"{measured.get('tokens_per_second', float('nan')):.0f} | {measured.get('peak_rss_mib', float('nan')):.0f} |")


def main(argv: list[str]) -> None:
    action, rest = (argv[0], argv[1:]) if argv else ("table", [])
    keys = [k for k in rest if "=" not in k] or list(SWEEPS if action == "sweep" else METHODS)
    extra = [k for k in rest if "=" in k]  # overrides for every run, e.g. train.num_threads=1
    known = SWEEPS if action == "sweep" else {**METHODS, "topic-adapter": None}
    unknown = [k for k in keys if k not in known]
    if action in ("train", "sweep", "speed") and unknown:
        sys.exit(f"minilm_methods.py {action}: unknown key {unknown[0]!r}; use one of {', '.join(known)}")
    if action == "train":
        for key in keys:
            if key == "fusion":
                run_training(BASE, "table-topic-adapter", [*TOPIC, *extra])
            run_training(BASE, f"table-{key}", [*(METHODS[key][1] if key in METHODS else TOPIC), *extra])
    elif action == "sweep":
        for key in keys:
            sweep(key, extra)
    elif action == "speed":
        speed(keys)
    elif action == "_measure":
        print(json.dumps(measure_speed(keys[0])))
    else:
        table()


if __name__ == "__main__":
    main(sys.argv[1:])
