"""The front door stays a front door: the README is short and has the sections a newcomer looks for, every relative
link in it and in docs/ leads to a file (and heading) of this repository, its methods table names every registered
method, and every config it shows (examples/*.yaml, YAML blocks, `deltatune train` commands) parses strictly."""

import dataclasses
import re
import shlex
from pathlib import Path

import pytest
import yaml

from deltatune import DataConfig, load_config, parse_config
from deltatune.methods import available_methods

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
MAX_README_LINES = 310  # front-door sections: RLHF (issue 12), distillation/self-training (13), few-shot and image-text (16)

# The sections a newcomer looks for, and what each must tell them.
REQUIRED = {
    "## Install": ["pip install -e .", "torch==2.13.0", "pip install --no-deps -r requirements-assets.txt",
                   "make demo", "make test", "make test-fast"],
    "## Commands": ["deltatune train CONFIG [key.sub=value ...]", "deltatune eval RUN_DIR", "deltatune generate",
                    "deltatune export", "deltatune methods"],
    "## Quickstart": ["columns:", ".csv", ".jsonl", "folder"],
    "## Python API": ["deltatune.load_config", "deltatune.train", "deltatune.apply", "deltatune.save_adapter",
                      "deltatune.load_adapter", "deltatune.disabled", "deltatune.merge"],
    "## Methods": ["docs/extending.md"],
    "## Results": ["docs/benchmarks.md"],
    "## RLHF in four commands": ["examples/rlhf", "objective.name=reward", "objective.name=dpo", "objective.name=ppo"],
    "## Smaller models, fewer labels": ["objective.name=distill", "model.student", "objective.name=self_training",
                                        "data.labelled_fraction", "data.unlabelled"],
    "## Contributing": ["make test", "slow", "ratio", "timing", "test_method_contracts.py"],
}

# `data.columns` replaces the per-role column keys (data.text_column, ...) in issue 11; until that lands, configs
# that use it are expected to fail, and strictly so: once it exists they must pass.
COLUMNS_PENDING = pytest.mark.xfail(
    "columns" not in {field.name for field in dataclasses.fields(DataConfig)},
    reason="data.columns is not in DataConfig yet", strict=True)


def sections(text: str) -> dict[str, str]:
    """Level-2 sections of a markdown page by heading line (the text up to the next level-2 heading)."""
    parts = re.split(r"(?m)^(## .*)$", text)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def outside_code(text: str) -> str:
    """The page without its fenced code blocks, where link-like text is code, not links."""
    return re.sub(r"(?ms)^```.*?^```", "", text)


def heading_slugs(text: str) -> set[str]:
    """GitHub's anchors for a page's headings: lowercase, punctuation dropped, spaces to hyphens."""
    slugs = set()
    for heading in re.findall(r"(?m)^#+ (.*)$", outside_code(text)):
        slugs.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return slugs


def relative_links(page: Path) -> list[str]:
    targets = re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", outside_code(page.read_text(encoding="utf-8")))
    return [target for target in targets if not re.match(r"[a-z]+:", target)]


def code_blocks(page: Path, language: str) -> list[str]:
    return re.findall(rf"(?ms)^```{language}\n(.*?)^```", page.read_text(encoding="utf-8"))


def train_commands() -> list[str]:
    """Every `deltatune train` command of the README and the benchmarks page, in bash blocks or inline code."""
    commands = []
    for page in (README, ROOT / "docs" / "benchmarks.md"):
        text = page.read_text(encoding="utf-8")
        lines = [line for block in code_blocks(page, "bash") for line in block.replace("\\\n", " ").splitlines()]
        lines += [span.replace("\n", " ") for span in re.findall(r"`(deltatune train [^`]*)`", outside_code(text))]
        for line in lines:
            line = line.split(" #")[0].strip()
            if line.startswith("deltatune train ") and "CONFIG" not in line:  # not the synopsis
                commands.append(line)
    return commands


def test_readme_is_short_and_has_the_sections_a_newcomer_needs():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_README_LINES
    found = sections(text)
    for heading, needed in REQUIRED.items():
        section = next((body for title, body in found.items() if title.startswith(heading)), None)
        assert section is not None, f"README has no section {heading!r}"
        for phrase in needed:
            assert phrase in section, f"README section {heading!r} does not mention {phrase!r}"


def test_readme_results_are_one_table():
    results = next(body for title, body in sections(README.read_text(encoding="utf-8")).items()
                   if title.startswith("## Results"))
    separator_rows = re.findall(r"(?m)^\|(?:\s*-+\s*\|)+\s*$", results)
    assert len(separator_rows) == 1


def test_readme_methods_table_names_every_registered_method():
    methods = next(body for title, body in sections(README.read_text(encoding="utf-8")).items()
                   if title.startswith("## Methods"))
    listed = set(re.findall(r"(?m)^\| `([a-z0-9_]+)` \|", methods))
    assert listed == set(available_methods())


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_relative_link_leads_into_this_repository(page):
    assert DOCS, "docs/ has no pages"
    for target in relative_links(page):
        path_part, _, anchor = target.partition("#")
        destination = (page.parent / path_part).resolve() if path_part else page
        assert destination.is_relative_to(ROOT), f"{page.name}: {target} leaves the repository"
        assert destination.exists(), f"{page.name}: {target} does not exist"
        if anchor and destination.suffix == ".md":
            assert anchor in heading_slugs(destination.read_text(encoding="utf-8")), \
                f"{page.name}: {target} names no heading of {destination.name}"


SEARCH_SPACES = ROOT / "examples" / "search_spaces"  # `deltatune tune --space` files, not configs


@pytest.mark.parametrize("example", sorted(path for path in (ROOT / "examples").rglob("*.yaml")
                                           if SEARCH_SPACES not in path.parents), ids=lambda path: path.name)
def test_every_example_config_parses(example):
    config = load_config(example)
    assert config.method.name in available_methods()


@pytest.mark.parametrize("space", sorted(SEARCH_SPACES.glob("*.yaml")), ids=lambda path: path.name)
def test_every_example_search_space_parses_against_the_lora_recipe(space):
    from deltatune.tune import search_space

    assert search_space(str(ROOT / "examples" / "minilm_rotten_tomatoes_lora.yaml"), [], str(space))


YAML_BLOCKS = [pytest.param(block, marks=COLUMNS_PENDING if "columns" in block else (), id=f"{page.name}-{index}")
               for page in PAGES for index, block in enumerate(code_blocks(page, "yaml"))]


@pytest.mark.parametrize("block", YAML_BLOCKS)
def test_every_yaml_config_in_the_docs_parses(block):
    parse_config(yaml.safe_load(block))


# The README's quickstart has the reader write its YAML block to my_run.yaml first.
READER_CONFIG = "my_run.yaml"
COMMANDS = [pytest.param(command, id=f"command-{index}",
                         marks=COLUMNS_PENDING if "columns" in command or READER_CONFIG in command else ())
            for index, command in enumerate(train_commands())]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_train_command_in_the_docs_parses(command, monkeypatch, tmp_path):
    arguments = shlex.split(command)[2:]
    config_file = arguments[0]
    if config_file == READER_CONFIG:
        (tmp_path / READER_CONFIG).write_text(code_blocks(README, "yaml")[0])
        config_file = str(tmp_path / READER_CONFIG)
    assert config_file.endswith(".yaml"), f"{command}: the first argument is not a config file"
    monkeypatch.chdir(ROOT)
    load_config(config_file, [argument for argument in arguments[1:] if not argument.startswith("--")])
