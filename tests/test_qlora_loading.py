"""QLoRA quantising while loading (`deltatune.models.streaming`): the same model as loading fp32 then quantising,
built one Linear at a time, and the fallbacks when the checkpoint does not fit the streaming path."""

import json

import pytest
import torch
from torch import nn

from deltatune.config.schema import ModelConfig
from deltatune.errors import UserError
from deltatune.methods.lora.qlora import QLoRA, QLoRAConfig
from deltatune.methods.lora.qlora_layers import NF4Linear
from deltatune.models import load_model, streaming
from deltatune.models.families import family_of
from deltatune.tasks import get_task
from tests.tiny_models import tiny_bert, tiny_llama


def _saved(tmp_path, build=tiny_llama, **kwargs) -> ModelConfig:
    torch.manual_seed(0)
    build(**kwargs).save_pretrained(tmp_path / "model")
    return ModelConfig(name=str(tmp_path / "model"))


def _build(config: ModelConfig, method: QLoRA, task_name: str = "causal-lm", num_labels=None, stream: bool = True):
    task = get_task(task_name)()

    def converting(skeleton):
        return method.convert_while_loading(skeleton, family_of(skeleton))

    torch.manual_seed(5)
    model = load_model(config, task, num_labels, converting if stream else None)
    method.apply(model, family_of(model))
    return model


def test_quantised_while_loading_equals_quantised_after_loading(tmp_path):
    config = _saved(tmp_path)
    streamed = _build(config, QLoRA(QLoRAConfig(r=4, lora_dropout=0.0)))
    loaded = _build(config, QLoRA(QLoRAConfig(r=4, lora_dropout=0.0)), stream=False)
    assert sum(isinstance(m, NF4Linear) for m in streamed.modules()) == 14  # 7 linears x 2 blocks
    assert streamed.state_dict().keys() == loaded.state_dict().keys()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(streamed.state_dict()[name], tensor), name
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    streamed.eval(), loaded.eval()
    assert torch.equal(streamed(input_ids=ids).logits, loaded(input_ids=ids).logits)
    # Tied embeddings stay tied: the output layer is the loaded embedding, not the skeleton's empty one.
    assert streamed.lm_head.weight is streamed.model.embed_tokens.weight


def test_each_linear_is_quantised_before_the_next_is_read(tmp_path):
    config = _saved(tmp_path)
    method = QLoRA(QLoRAConfig(r=4))
    original, seen = {}, []

    def converting(skeleton):
        chosen = method.convert_while_loading(skeleton, family_of(skeleton))
        original.update({name: skeleton.get_submodule(name).weight.data_ptr() for name in chosen})

        def watch(name, convert):
            def converted(module):
                # The modules converted before are 4-bit; those still to come hold their unwritten skeleton storage.
                assert all(isinstance(model_ref[0].get_submodule(done), NF4Linear) for done in seen)
                waiting = [other for other in chosen if other not in seen and other != name]
                assert all(model_ref[0].get_submodule(other).weight.data_ptr() == original[other] for other in waiting)
                seen.append(name)
                return convert(module)
            return converted

        model_ref.append(skeleton)
        return {name: watch(name, convert) for name, convert in chosen.items()}

    model_ref: list[nn.Module] = []
    model = streaming.load_converting(tmp_path / "model", "AutoModelForCausalLM", None, converting)
    assert model is not None and len(seen) == 14
    assert all(isinstance(model.get_submodule(name), NF4Linear) for name in seen)


def test_a_checkpoint_without_the_new_head_loads_the_usual_way(tmp_path):
    # A classifier's fresh head is not in the checkpoint: the streaming path steps aside, the result is the same.
    config = _saved(tmp_path, tiny_bert)
    assert streaming.load_converting(tmp_path / "model", "AutoModelForSequenceClassification", 3,
                                     lambda skeleton: {"bert.encoder.layer.0.attention.self.query": lambda m: m}) is None
    model = _build(config, QLoRA(QLoRAConfig(r=4)), "classification", num_labels=3)
    assert any(isinstance(m, NF4Linear) for m in model.modules())


def test_layer_selection_quantises_after_loading(tmp_path):
    _saved(tmp_path)
    skeleton = tiny_llama()
    assert QLoRA(QLoRAConfig(layers=[1])).convert_while_loading(skeleton, family_of(skeleton)) == {}


def _quantised(model: nn.Module) -> set[str]:
    return {name for name, module in model.named_modules() if isinstance(module, NF4Linear)}


def test_a_tied_lm_head_chosen_as_a_target_stays_tied_and_unquantised_on_both_paths(tmp_path):
    # The skeleton is built without init_weights (which ties the head): untied, lm_head would look like any
    # other frozen Linear and be quantised on this path only.
    config = _saved(tmp_path)
    targets = ["q_proj", "v_proj", "lm_head"]
    streamed = _build(config, QLoRA(QLoRAConfig(r=4, target_modules=targets)))
    loaded = _build(config, QLoRA(QLoRAConfig(r=4, target_modules=targets)), stream=False)
    assert _quantised(streamed) == _quantised(loaded) and len(_quantised(streamed)) == 14
    assert "lm_head" not in _quantised(streamed)
    assert streamed.lm_head.base_layer.weight is streamed.model.embed_tokens.weight


def test_a_config_tying_a_head_the_checkpoint_stores_apart_loads_as_from_pretrained(tmp_path):
    # from_pretrained keeps a stored head that differs from the embeddings; tying it would replace the loaded head.
    config = _saved(tmp_path, tie_word_embeddings=False)
    settings = json.loads((tmp_path / "model" / "config.json").read_text())
    (tmp_path / "model" / "config.json").write_text(json.dumps({**settings, "tie_word_embeddings": True}))
    streamed = _build(config, QLoRA(QLoRAConfig(r=4, lora_dropout=0.0)))
    loaded = _build(config, QLoRA(QLoRAConfig(r=4, lora_dropout=0.0)), stream=False)
    assert streamed.lm_head.weight is not streamed.model.embed_tokens.weight
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    streamed.eval(), loaded.eval()
    assert torch.equal(streamed(input_ids=ids).logits, loaded(input_ids=ids).logits)


def test_the_streaming_path_refuses_an_adapter_inside_the_model_directory(tmp_path):
    config = _saved(tmp_path)
    (tmp_path / "model" / "adapter_config.json").write_text("{}")
    with pytest.raises(UserError, match="also holds adapter_config.json"):
        _build(config, QLoRA(QLoRAConfig(r=4)))


@pytest.mark.parametrize("index, message", [
    ("{not json", "cannot read"),
    (json.dumps({"metadata": {}}), "has no weight_map"),
    (json.dumps({"weight_map": {"lm_head.weight": "../model.safetensors"}}), "outside its folder"),
])
def test_the_streaming_path_refuses_a_bad_shard_index(tmp_path, index, message):
    config = _saved(tmp_path)
    (tmp_path / "model" / "model.safetensors").rename(tmp_path / "model" / "model-00001-of-00001.safetensors")
    (tmp_path / "model" / "model.safetensors.index.json").write_text(index)
    with pytest.raises(UserError, match=message):
        _build(config, QLoRA(QLoRAConfig(r=4)))
