"""Contract tests of the adapter API, generated from the method registry: every method checked for each promise its
class declares (`Method.named_adapters`, `mergeable`, `saves_adapter_files`), on tiny random models. Named adapters
switch exactly and `deltatune.disabled` runs the base; mergeable ones merge without changing the output and unmerge
back; the others refuse to merge; adapter files reload exactly and are refused by a differently shaped base. A new
method that declares a promise gets its tests without touching this file."""

import pytest
import torch

import deltatune
from deltatune.config.loader import config_to_dict
from deltatune.errors import UserError
from deltatune.methods import available_methods, get_method
from deltatune.models.families import family_of
from tests.helpers import (
    KINDS,
    assert_disabled_gives,
    assert_merge_round_trip,
    assert_switches,
    assert_unchanged,
    has_no_adapters,
    perturb_trainable,
    seeded,
    snapshot,
    tiny_case,
)
from tests.tiny_models import tiny_llama


def declaring(promise: str) -> list[str]:
    """The registered methods whose class declares `promise`."""
    return [name for name, method in available_methods().items() if getattr(method, promise)]


def add_adapter(name: str, model: torch.nn.Module, seed: int, adapter_name: str | None = None) -> set[str]:
    """Method `name` with its contract config applied (as adapter `adapter_name`, else under the method's default
    name), moved away from its neutral init as training would move it; returns the names of the parameters it
    trains."""
    method_class = get_method(name)
    named = {} if adapter_name is None else {"adapter_name": adapter_name}
    method_class(method_class.contract_config(), **named).apply(model, family_of(model))
    return perturb_trainable(model, seed)


def rewrites_base(name: str) -> bool:
    """Whether the method changes the frozen base itself (qlora quantises it): its base output is then the model's
    output right after applying it, when its adapters add nothing yet (as the contract at init promises)."""
    method = get_method(name)
    return not method.preserves_output_at_init and method.init_change_from == "base"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", declaring("named_adapters"))
def test_two_adapters_switch_exactly(name, kind):
    case = tiny_case(kind, name)
    first = add_adapter(name, case.model, seed=1, adapter_name="default")
    second = add_adapter(name, case.model, seed=2, adapter_name="second")
    assert second and not first & second, "applying a second adapter must leave the first one frozen"
    assert_switches(case.model, case.run)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", declaring("named_adapters"))
def test_disabled_gives_the_base_output(name, kind):
    case = tiny_case(kind, name)
    original = case.run()
    method_class = get_method(name)
    method_class(method_class.contract_config()).apply(case.model, family_of(case.model))
    base = case.run() if rewrites_base(name) else original  # its adapters add nothing yet
    perturb_trainable(case.model, seed=1)
    assert_disabled_gives(case.model, case.run, base)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", declaring("mergeable"))
def test_merge_keeps_the_output_and_unmerge_restores_the_base(name, kind):
    case = tiny_case(kind, name)
    add_adapter(name, case.model, seed=1)
    assert_merge_round_trip(case.model, case.run)


@pytest.mark.parametrize("name", sorted(set(declaring("named_adapters")) - set(declaring("mergeable"))))
def test_merge_is_refused_and_changes_nothing(name):
    case = tiny_case("llama", name)
    add_adapter(name, case.model, seed=1)
    expected, tensors = case.run(), snapshot(case.model)
    with pytest.raises(UserError, match="cannot be merged") as error:
        deltatune.merge(case.model)
    assert "\n" not in str(error.value)
    assert_unchanged(case.model, tensors)
    assert torch.equal(case.run(), expected)


@pytest.mark.parametrize("name", sorted(set(declaring("named_adapters")) & set(declaring("mergeable"))))
def test_a_new_adapter_on_a_merged_model_is_refused(name):
    """Activated on merged layers, a new adapter would either stay out of the graph (it never trains) or unmerge
    them (the merged adapter's effect gone), silently; it is refused, the model left as it was."""
    case = tiny_case("llama", name)
    add_adapter(name, case.model, seed=1)
    deltatune.merge(case.model)
    expected, tensors = case.run(), snapshot(case.model)
    trainable = {key: param.requires_grad for key, param in case.model.named_parameters()}
    with pytest.raises(UserError, match=r"merged into this model's weights.*deltatune.unmerge\(model\) first") as error:
        add_adapter(name, case.model, seed=2, adapter_name="second")
    assert "\n" not in str(error.value)
    assert_unchanged(case.model, tensors)
    assert {key: param.requires_grad for key, param in case.model.named_parameters()} == trainable
    assert torch.equal(case.run(), expected)


@pytest.mark.parametrize("name", declaring("named_adapters"))
def test_no_adapter_is_added_or_loaded_beside_a_merged_lora(name, tmp_path):
    """deltatune.apply and load_adapter refuse every named-adapter method on a model with merged layers (a bottleneck
    or a prompt would otherwise unmerge the LoRA silently on activation)."""
    case = tiny_case("llama", "lora")
    add_adapter("lora", case.model, seed=1)
    deltatune.save_adapter(case.model, tmp_path / "saved")
    deltatune.merge(case.model)
    config = config_to_dict(get_method(name).contract_config())
    with pytest.raises(UserError, match=r"merged into this model's weights"):
        deltatune.apply(case.model, {**config, "name": name})
    with pytest.raises(UserError, match=r"merged into this model's weights"):
        deltatune.load_adapter(case.model, tmp_path / "saved", name="again")


@pytest.mark.parametrize("name", declaring("named_adapters"))
def test_a_combined_adapter_is_frozen_like_a_loaded_one(name):
    """add_weighted_adapter makes a result to use: what trained before still trains, the combination does not."""
    case = tiny_case("llama", name)
    add_adapter(name, case.model, seed=1)
    trainable = {key for key, param in case.model.named_parameters() if param.requires_grad}
    try:
        deltatune.add_weighted_adapter(case.model, deltatune.adapters.adapter_names(case.model), [0.5], "mix")
    except UserError as error:  # adapters whose update is not linear in their weights (bottleneck, DoRA)
        pytest.skip(f"{name} adapters do not combine: {error}")
    combined = [key for key, _ in case.model.named_parameters() if ".mix." in key]
    assert combined and {key for key, param in case.model.named_parameters() if param.requires_grad} == trainable


@pytest.mark.parametrize("name", declaring("saves_adapter_files"))
def test_adapter_file_reloads_exactly_and_another_base_refuses_it(name, tmp_path):
    case = tiny_case("llama", name)
    add_adapter(name, case.model, seed=1)
    deltatune.save_adapter(case.model, tmp_path)

    # The same base with the method applied (so a base it rewrites is rewritten alike) takes the file as another
    # adapter, frozen, with the output of the model that saved it.
    fresh = tiny_case("llama", name)
    add_adapter(name, fresh.model, seed=3)
    deltatune.load_adapter(fresh.model, tmp_path, name="loaded")
    assert torch.allclose(fresh.run(), case.run(), rtol=0, atol=1e-5)
    loaded = [param for key, param in fresh.model.named_parameters() if ".loaded." in key]
    assert loaded and not any(param.requires_grad for param in loaded)

    other = seeded(tiny_llama, hidden_size=32, attention_bias=True, mlp_bias=True)
    tensors = snapshot(other)
    with pytest.raises(UserError, match=r"\(\d+(, \d+)*\).*\(\d+(, \d+)*\).*saved for a different base model"):
        deltatune.load_adapter(other, tmp_path)
    assert has_no_adapters(other)
    assert_unchanged(other, tensors)
