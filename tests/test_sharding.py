"""FSDP helpers (deltatune.training.sharding) on 2 gloo processes: gradient clipping over a mix of sharded and whole
parameters (PPO's value head beside an FSDP policy) equals torch's clipping of the same gradients unsharded."""

import json
import os
from pathlib import Path

import torch
from torch import nn

from tests.test_distributed import _free_port


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


def test_fsdp_self_training_restarts_each_round_as_ddp_does(tmp_path):
    """With restart, every round begins from the starting weights, kept whole before the model was sharded: under
    fsdp they are cut into the model's shards on the way back."""
    from tests.test_distributed import _deltatune, _weights, _workspace

    _workspace(tmp_path)
    recipe = ["objective={name: self_training, rounds: 3, batches_per_round: 2, restart: true, confidence: 0.01}",
              "data.labelled_fraction=0.5", "train.max_steps=6", "--nproc", "2"]
    for name, extra in (("ddp", []), ("fsdp", ["train.distributed=fsdp"])):
        code, out, err = _deltatune(tmp_path, f"run_name={name}", *recipe, *extra)
        assert code == 0, err
    ddp, fsdp = _weights(tmp_path / "runs" / "ddp"), _weights(tmp_path / "runs" / "fsdp")
    for name in ddp:
        torch.testing.assert_close(fsdp[name], ddp[name], atol=1e-5, rtol=0, msg=name)


def test_fsdp_trains_a_dual_encoder_and_its_scalar_logit_scale_as_ddp_does(tmp_path):
    """FSDP2 cannot shard a 0-d parameter (the CLIP-style logit scale): it stays whole, averaged like the rest."""
    from tests.bad_input import write_jsonl
    from tests.test_distributed import _deltatune, _weights
    from tests.test_dual_encoder import labelled_rows, write_config

    write_config(tmp_path, write_jsonl(tmp_path / "bars.jsonl", labelled_rows(48)), method={"name": "full"})
    for name, extra in (("ddp", []), ("fsdp", ["train.distributed=fsdp"])):
        code, out, err = _deltatune(tmp_path, f"run_name={name}", "train.max_steps=4", "--nproc", "2", *extra)
        assert code == 0, err
    ddp, fsdp = _weights(tmp_path / "runs" / "ddp"), _weights(tmp_path / "runs" / "fsdp")
    assert any(tensor.dim() == 0 for tensor in ddp.values())  # the logit scale trained in both
    # The tiny CNN's conv biases feed a BatchNorm, so their true gradient is 0: AdamW turns the rounding noise, which
    # an all-reduce and a reduce-scatter leave differently, into steps of about lr. Every other tensor must agree.
    compared = [name for name in ddp if not (name.startswith("image.backbone.stages.") and name.endswith(".0.bias"))]
    assert len(compared) == len(ddp) - 3
    for name in compared:
        torch.testing.assert_close(fsdp[name], ddp[name], atol=1e-5, rtol=0, msg=name)
