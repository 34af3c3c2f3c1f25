"""The bad-input catalogue, part C: preference learning and RLHF (issue 12). Preference rows with a missing or empty
column or with chosen == rejected everywhere, a reward that is not a reward model, a reward function that does not
import, a reference asked of a method that cannot switch itself off, and PPO with a tokenizer that has neither a pad
nor an eos token. Each: exit code 2, one `error:` line naming the fix, no traceback, earlier files unchanged."""

import pytest

from tests.bad_input import assert_refused, config_file, make_workspace, write_jsonl

TINY_LLAMA = "model: {name: 'tests.tiny_models:tiny_llama'}\noutput_dir: runs\n"
RUN = TINY_LLAMA + "data: {name: pairs.jsonl}\ntrain: {max_steps: 2, batch_size: 4, progress: false, num_threads: 1}\n"

# A tokenizer with neither a pad nor an eos token, for PPO to refuse before generating anything.
NO_PAD_MODELS = '''
from tests.tiny_models import tiny_llama, tiny_llama_processor


def policy():
    return tiny_llama()


def policy_processor():
    tokenizer = tiny_llama_processor()
    tokenizer.pad_token = None
    tokenizer.eos_token = None
    return tokenizer
'''


def pairs(n: int = 12, **override: str) -> list[dict]:
    return [{"prompt": f"Review film {i}.", "chosen": "a fine film", "rejected": "a dull film", **override}
            for i in range(n)]


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_workspace(tmp_path)
    write_jsonl(tmp_path / "pairs.jsonl", pairs())
    write_jsonl(tmp_path / "no_rejected.jsonl", [{"prompt": "p", "chosen": "c"}] * 12)
    write_jsonl(tmp_path / "empty_rejected.jsonl", pairs(6) + [{"prompt": "p", "chosen": "c", "rejected": " "}] * 6)
    write_jsonl(tmp_path / "same.jsonl", pairs(12, rejected="a fine film"))
    (tmp_path / "no_pad_models.py").write_text(NO_PAD_MODELS)
    from tests.tiny_models import tiny_llama

    tiny_llama().save_pretrained(tmp_path / "language_model")  # a transformers directory that is no reward model
    config_file(tmp_path, RUN)
    return tmp_path


CASES = {
    "missing column": (["objective.name=dpo", "data.name=no_rejected.jsonl"], r"rejected"),
    "empty cell": (["objective.name=dpo", "data.name=empty_rejected.jsonl"],
                   r"row \d+ of .* has an empty 'rejected' \(rejected\); fill it in or drop that row"),
    "chosen equals rejected everywhere": (["objective.name=dpo", "data.name=same.jsonl"],
                                          r"chosen text .* equals the rejected text .*point data\.columns\.chosen"),
    "reward model that is no sequence classifier": (
        ["objective.name=ppo", "objective.reward_model=language_model"],
        r"objective\.reward_model=language_model is not a trained reward model"),
    "pretrained encoder without a reward head": (
        ["objective.name=ppo", "objective.reward_model=minilm-l6"],
        r"objective\.reward_model=minilm-l6 is not a trained reward model"),
    "reward function that does not import": (
        ["objective.name=ppo", "objective.reward_model=no_such_module:score"],
        r"cannot import module 'no_such_module' from objective\.reward_model"),
    "reward function that is not there": (
        ["objective.name=ppo", "objective.reward_model=no_pad_models:score"],
        r"module 'no_pad_models' has no 'score'.*name a function \(prompts, responses\)"),
    "reference from a method that cannot switch itself off": (
        ["objective.name=dpo", "method.name=full", "objective.reference_model=policy-disabled"],
        r"needs a method that can switch itself off"),
    "PPO with a tokenizer without pad or eos": (
        ["objective.name=ppo", "model.name=no_pad_models:policy", "objective.reward_model=no_pad_models:policy"],
        r"neither a pad nor an eos token"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_preference_and_rlhf_mistakes(case, workspace, capsys) -> None:
    overrides, message = CASES[case]
    assert_refused(["train", "config.yaml", *overrides], message, capsys, workspace)
