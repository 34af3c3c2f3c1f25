"""FSDP (deltatune.training.sharding) on 2 gloo processes: gradient clipping over a mix of sharded and whole
parameters (PPO's value head beside an FSDP policy) equals torch's clipping of the same gradients unsharded, and
objectives and models with parts FSDP cannot shard (the SFT loss's output layer, self-training's restart weights, a
dual encoder's scalar logit scale) train under fsdp to the weights of the same ddp run."""

import json
import os
from pathlib import Path

import torch
from torch import nn

from tests.bad_input import write_jsonl
from tests.test_distributed import _deltatune, _free_port, _weights, _workspace


def _two_layers() -> tuple[nn.Linear, nn.Linear]:
    torch.manual_seed(0)
    return nn.Linear(6, 4), nn.Linear(6, 4)


def _backward(sharded: nn.Module, whole: nn.Module) -> None:
    inputs = torch.arange(12.0).view(2, 6) / 10
    ((sharded(inputs) * 3).pow(2).sum() + whole(inputs).pow(2).sum()).backward()


def _clipping_worker(index: int, port: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from deltatune import distributed
    from deltatune.training import sharding

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(index), LOCAL_RANK=str(index),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    distributed.start("cpu")
    reference, reference_whole = _two_layers()  # the same layers and gradients, not sharded: torch's own clipping
    _backward(reference, reference_whole)
    reference_parameters = [*reference.parameters(), *reference_whole.parameters()]
    expected = float(torch.nn.utils.clip_grad_norm_(reference_parameters, 1.0))
    layer, whole = _two_layers()
    fully_shard(layer, mesh=init_device_mesh("cpu", (2,)))
    _backward(layer, whole)
    parameters = [*layer.parameters(), *whole.parameters()]
    assert sum(sharding.is_sharded(param) for param in parameters) == 2  # a real mix
    norm = sharding.clip_gradient_norm(parameters, 1.0)
    clipped = [sharding.full(param.grad) for param in parameters]
    if distributed.is_main():
        (Path(out) / "clipping.json").write_text(json.dumps({
            "norm": norm, "expected": expected,
            "difference": max(float((mine - theirs.grad).abs().max())
                              for mine, theirs in zip(clipped, reference_parameters))}))
    distributed.stop()


def test_clipping_a_mix_of_sharded_and_whole_gradients_matches_torch(tmp_path):
    torch.multiprocessing.spawn(_clipping_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    result = json.loads((tmp_path / "clipping.json").read_text())
    assert result["expected"] > 1.0  # the gradients are clipped, not left alone
    assert abs(result["norm"] - result["expected"]) < 1e-4 * result["expected"], result
    assert result["difference"] < 1e-6, result


def ddp_and_fsdp_weights(root: Path, *arguments: str) -> tuple[dict, dict]:
    """The final weights of the same 2-rank run of root/config.yaml under ddp and under fsdp."""
    for name, extra in (("ddp", []), ("fsdp", ["train.distributed=fsdp"])):
        code, out, err = _deltatune(root, f"run_name={name}", *arguments, "--nproc", "2", *extra)
        assert code == 0, err
    return _weights(root / "runs" / "ddp"), _weights(root / "runs" / "fsdp")


def assert_same_weights(fsdp: dict, ddp: dict, names: list[str] | None = None) -> None:
    for name in ddp if names is None else names:
        torch.testing.assert_close(fsdp[name], ddp[name], atol=1e-5, rtol=0, msg=name)


def test_fsdp_sft_trains_as_ddp_does(tmp_path):
    """Under ddp the SFT loss goes through the output layer in chunks; under fsdp that layer's weight is a shard
    outside the forward, so the plain loss runs instead: the same value, so the same weights."""
    _workspace(tmp_path)
    write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"what is {a} plus {b}", "response": f"{a + b}"}
                                           for a in range(6) for b in range(6)])
    sft = ["model.name=tests.tiny_models:tiny_chat_llama", "model.task=causal-lm", "data.name=pairs.jsonl",
           "data.max_length=32", "train.max_steps=4"]
    ddp, fsdp = ddp_and_fsdp_weights(tmp_path, *sft)
    assert_same_weights(fsdp, ddp)
    code, out, err = _deltatune(tmp_path, "run_name=insisted", *sft, "--nproc", "2", "train.distributed=fsdp",
                                "objective.name=sft", "objective.chunked_loss=true")
    assert code != 0 and "train.distributed=fsdp holds only a shard of it; set objective.chunked_loss=false" in err


def test_fsdp_self_training_restarts_each_round_as_ddp_does(tmp_path):
    """With restart, every round begins from the starting weights, kept whole before the model was sharded: under
    fsdp they are cut into the model's shards on the way back."""
    _workspace(tmp_path)
    ddp, fsdp = ddp_and_fsdp_weights(
        tmp_path, "objective={name: self_training, rounds: 3, batches_per_round: 2, restart: true, confidence: 0.01}",
        "data.labelled_fraction=0.5", "train.max_steps=6")
    assert_same_weights(fsdp, ddp)


def test_fsdp_trains_a_dual_encoder_and_its_scalar_logit_scale_as_ddp_does(tmp_path):
    """FSDP2 cannot shard a 0-d parameter (the CLIP-style logit scale): it stays whole, averaged like the rest."""
    from tests.test_dual_encoder import labelled_rows, write_config

    write_config(tmp_path, write_jsonl(tmp_path / "bars.jsonl", labelled_rows(48)), method={"name": "full"})
    ddp, fsdp = ddp_and_fsdp_weights(tmp_path, "train.max_steps=4")
    assert any(tensor.dim() == 0 for tensor in ddp.values())  # the logit scale trained in both
    # The tiny CNN's conv biases feed a BatchNorm, so their true gradient is 0: AdamW turns the rounding noise, which
    # an all-reduce and a reduce-scatter leave differently, into steps of about lr. Every other tensor must agree.
    compared = [name for name in ddp if not (name.startswith("image.backbone.stages.") and name.endswith(".0.bias"))]
    assert len(compared) == len(ddp) - 3
    assert_same_weights(fsdp, ddp, compared)
