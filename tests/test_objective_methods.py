"""Every method works under the preference objectives where it makes sense (issue 12): a short DPO and PPO run on a
tiny Llama with each kind of method (adapters, LoRA variants, 4-bit QLoRA, prompt methods, freeze, full
fine-tuning) trains, saves and reports finite metrics; where the method cannot switch itself off the reference is
a frozen copy. Methods that choose their weights from training gradients (sparse with selection gradient) are refused for PPO with a
one-line error, since PPO's batches only exist after generating."""

from __future__ import annotations

import math

import pytest

from deltatune.config.loader import load_config
from deltatune.errors import UserError
from deltatune.runner import train
from tests.bad_input import write_jsonl

METHODS = ["lora", "dora", "qlora", "adapter", "prompt", "prefix", "ptuning", "ptuning_v2", "freeze", "full"]
OBJECTIVE_DATA = {
    "dpo": [{"prompt": f"Review film {i % 5}.", "chosen": "great film", "rejected": "dull dull film"} for i in range(20)],
    "ppo": [{"prompt": f"Tell me about film {i}."} for i in range(20)],
}


def longer_responses(prompts: list[str], responses: list[str]) -> list[float]:
    return [len(response) / 50 for response in responses]


METHOD_OPTIONS = {"freeze": ["method.last_n_blocks=1"], "sparse": ["method.selection=gradient"]}


def run(tmp_path, objective: str, method: str):
    data = write_jsonl(tmp_path / f"{objective}.jsonl", OBJECTIVE_DATA[objective])
    extra = [f"objective.reward_model={__name__}:longer_responses", "objective.rollout_size=8",
             "objective.ppo_epochs=1", "objective.max_new_tokens=4"] if objective == "ppo" else []
    config = load_config(None, ["model.name=tests.tiny_models:tiny_llama", f"objective.name={objective}",
                                f"method.name={method}", f"data.name={data}", "train.max_steps=2",
                                "train.batch_size=4", "train.progress=false", "train.num_threads=1",
                                f"output_dir={tmp_path / 'runs'}", "run_name=run", *extra,
                                *METHOD_OPTIONS.get(method, [])])
    return train(config, echo=lambda *_: None)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("objective", sorted(OBJECTIVE_DATA))
def test_method_trains_under_objective(tmp_path, objective, method) -> None:
    summary = run(tmp_path, objective, method)
    assert summary["steps"] == 2
    assert all(math.isfinite(value) for value in summary["after"]["validation"].values())


def test_a_method_choosing_weights_from_gradients_is_refused_for_ppo(tmp_path) -> None:
    with pytest.raises(UserError, match=r"method 'sparse' chooses what to train from the gradients"):
        run(tmp_path, "ppo", "sparse")
