"""The package's shape, checked: deltatune's own imports form layers with no circles, method families stay
independent, files stay short, and no code outside `deltatune/methods/` branches on a method's name.

The import graph is read from the source with `ast`, imports inside functions included: a lazy import of one of
deltatune's own modules is still a dependency (lazy imports are for optional third-party packages). An edge goes
to the module named, or to `package.name` when `from package import name` names a submodule. Importing `a.b.c`
also runs the `__init__` of `a` and `a.b` first; those implicit edges are not counted.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

import deltatune
from deltatune.methods import available_methods

ROOT = Path(deltatune.__file__).parent
MAX_LINES = 400

# Lowest first. A module may import modules of its own layer or of lower ones, never of a higher one. An entry names
# a module or a package (then every module inside it, unless a longer entry claims it); "deltatune" is only the
# package's __init__ (the public API). `deltatune.tasks` and `deltatune.runs` are reserved for the task registry and
# the run loader (issue 11); move them if they land elsewhere.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("errors and the registry", ("deltatune.errors", "deltatune.registry")),
    ("config schema", ("deltatune.config", "deltatune.config.schema")),
    ("models and data", ("deltatune.models", "deltatune.data")),
    ("methods", ("deltatune.methods",)),
    ("objectives, tasks and training", ("deltatune.objectives", "deltatune.tasks", "deltatune.training",
                                         "deltatune.distributed")),
    ("config loader", ("deltatune.config.loader",)),
    ("adapter API", ("deltatune.adapters",)),
    ("runner", ("deltatune.resume", "deltatune.preparation", "deltatune.runner", "deltatune.runs")),
    ("commands", ("deltatune.export", "deltatune.generate", "deltatune.advise", "deltatune.tune", "deltatune.insight",
                  "deltatune.launch", "deltatune.meta_eval")),
    ("command line and public API", ("deltatune.cli", "deltatune.__main__", "deltatune")),
]
# Imports of a higher layer that are allowed, each with its reason.
ALLOWED_UPWARD = {
    # AdapterFusion reads the final weights of the `adapter` runs it fuses; run_dir.py is a plain reader of the run
    # layout whose own imports stay at or below the methods (test_run_dir_reader_stays_low_level).
    ("deltatune.methods.adapters.adapter_fusion", "deltatune.training.run_dir"),
}
RUN_DIR_READER = {"deltatune.training.run_dir", "deltatune.training.checkpoint"}
METHOD_FAMILIES = ("lora", "adapters", "virtual_tokens", "selective", "composite")
ENTRY_POINTS = {"deltatune.__main__"}  # importing it runs the command line


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def module_files() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def is_package(module: str) -> bool:
    return module_files()[module].name == "__init__.py"


def imported_modules(module: str) -> set[str]:
    """deltatune modules that `module` imports anywhere in its source (module level or inside functions)."""
    modules, found = module_files(), set()
    tree = ast.parse(module_files()[module].read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = module if is_package(module) else module.rpartition(".")[0]
                package = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{package}.{base}" if base else package
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:  # `import deltatune.x.y` of a name inside a module
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


@cache
def import_graph() -> dict[str, frozenset[str]]:
    return {module: frozenset(imported_modules(module)) for module in module_files()}


def layer_of(module: str) -> int:
    """The index in LAYERS of the longest entry naming `module` (or a package holding it)."""
    best, best_length = None, -1
    for index, (_, entries) in enumerate(LAYERS):
        for entry in entries:
            inside = entry != "deltatune" and module.startswith(f"{entry}.")
            if (module == entry or inside) and len(entry) > best_length:
                best, best_length = index, len(entry)
    if best is None:
        raise AssertionError(f"{module} belongs to no layer; add it (or its package) to LAYERS in {__file__}")
    return best


def reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in import_graph()[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


def find_cycle(graph: dict[str, frozenset[str]]) -> list[str] | None:
    """One circle in `graph` (module -> modules it imports) as [a, b, ..., a], or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def method_name_comparisons(tree: ast.AST, names: set[str]) -> list[tuple[int, str]]:
    """(line, name) of every comparison with a string in `names`: ==, !=, in a literal tuple/list/set, `case`."""

    def spelled(node: ast.AST) -> list[str]:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return [node.value] if node.value in names else []
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return [name for item in node.elts for name in spelled(item)]
        return []

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
        elif isinstance(node, ast.MatchValue):
            operands = [node.value]
        else:
            continue
        found += [(node.lineno, name) for operand in operands for name in spelled(operand)]
    return found


# ---- the tests ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("module", sorted(set(module_files()) - ENTRY_POINTS))
def test_every_module_imports(module):
    importlib.import_module(module)


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, f"import circle among deltatune's modules: {' -> '.join(cycle or [])}"


def test_imports_respect_the_layers():
    wrong = []
    for module, targets in sorted(import_graph().items()):
        for target in sorted(targets):
            if layer_of(target) > layer_of(module) and (module, target) not in ALLOWED_UPWARD:
                wrong.append(f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} "
                             f"({LAYERS[layer_of(target)][0]}, a higher layer)")
    order = " < ".join(name for name, _ in LAYERS)
    assert not wrong, (f"{len(wrong)} import(s) against the layer order {order}:\n  " + "\n  ".join(wrong)
                       + "\nmove the shared code down, or pass what is needed in as an argument")


def test_allowed_upward_imports_exist():
    """An exception that is no longer used should go, so the list stays the truth."""
    graph = import_graph()
    stale = [f"{source} -> {target}" for source, target in ALLOWED_UPWARD if target not in graph.get(source, ())]
    assert not stale, f"ALLOWED_UPWARD lists imports that no longer happen: {', '.join(stale)}"


def test_run_dir_reader_stays_low_level():
    """The run layout reader the methods may use must not pull the training loop (or anything above the methods)
    in with it."""
    methods = layer_of("deltatune.methods")
    above = sorted(module for module in reachable("deltatune.training.run_dir") | {"deltatune.training.run_dir"}
                   if layer_of(module) > methods and module not in RUN_DIR_READER)
    assert not above, f"deltatune.training.run_dir now imports {', '.join(above)}; keep it a plain reader"


def test_method_families_are_independent():
    """A family imports only itself, methods/shared, methods/base and the registry; shared and base import no
    family. What two families need goes to methods/shared."""
    wrong = []
    for module, targets in sorted(import_graph().items()):
        if not module.startswith("deltatune.methods."):
            continue
        family = module.split(".")[2]
        own = family if family in METHOD_FAMILIES else None
        for target in sorted(targets):
            parts = target.split(".")
            other = parts[2] if target.startswith("deltatune.methods.") and parts[2] in METHOD_FAMILIES else None
            if other is not None and other != own:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "method families import each other (move the shared part to deltatune/methods/shared):\n  " \
        + "\n  ".join(wrong)


def test_importing_deltatune_registers_no_method():
    """Discovery happens on the first lookup, not on import (a fresh interpreter: this one has looked up already)."""
    code = ("import sys, deltatune; from deltatune.methods import METHODS; assert not METHODS._entries; "
            "assert not [m for m in sys.modules if m.startswith('deltatune.methods.') and m.split('.')[2] in "
            f"{METHOD_FAMILIES!r}]")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT.parent)
    assert result.returncode == 0, result.stderr


def test_each_method_lives_in_its_family_file():
    """The method registered as X is in deltatune/methods/<family>/X.py, so its file is found by its name."""
    wrong = {name: cls.__module__ for name, cls in available_methods().items()
             if cls.__module__ not in {f"deltatune.methods.{family}.{name}" for family in METHOD_FAMILIES}}
    assert not wrong, f"methods outside deltatune/methods/<family>/<name>.py: {wrong}"
    families = {cls.__module__.split(".")[2] for cls in available_methods().values()}
    assert families == set(METHOD_FAMILIES), f"families without a registered method: {set(METHOD_FAMILIES) - families}"


def test_no_file_is_too_long():
    long = {module: n for module, path in module_files().items()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines (split them by what they hold): {long}"


def test_no_method_name_branches_outside_the_methods():
    """Code outside deltatune/methods/ must not compare a string with a method's name (`method == "lora"`,
    `name in ("prompt", "prefix")`, `case "sparse"`): what a method does belongs to its class. A string that merely
    spells a method's name (a data column called "prompt") should be compared through a named constant."""
    names, found = set(available_methods()), []
    for module, path in sorted(module_files().items()):
        if module == "deltatune.methods" or module.startswith("deltatune.methods."):
            continue
        for line, name in method_name_comparisons(ast.parse(path.read_text()), names):
            found.append(f"{path.relative_to(ROOT.parent)}:{line} compares with method name {name!r}")
    assert not found, "method names tested outside deltatune/methods/ (give the method class the behaviour):\n  " \
        + "\n  ".join(found)


def test_the_checks_can_fail():
    """The checks see real edges (function-level ones too) and would catch a circle and a name comparison, so the
    tests above cannot pass by seeing nothing."""
    assert "deltatune.runner" in import_graph()["deltatune.cli"]  # imported inside a function
    assert "deltatune.methods.shared.model_surgery" in import_graph()["deltatune.adapters"]
    assert layer_of("deltatune.config.loader") > layer_of("deltatune.methods") > layer_of("deltatune.config.schema")
    assert find_cycle({"a": frozenset({"b"}), "b": frozenset({"c"}), "c": frozenset({"a"})}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": frozenset({"b"}), "b": frozenset()}) is None
    source = 'if method == "lora": pass\nok = name in ("prompt", "other")\nmatch name:\n    case "sparse": pass\n'
    assert method_name_comparisons(ast.parse(source), {"lora", "prompt", "sparse"}) == \
        [(1, "lora"), (2, "prompt"), (4, "sparse")]
