"""The command-line modules in layers: `train` over `arguments`, `upstream` below every other CLI module, the run
directory (`otpo_trl.runs`) a library below them all, no import circle, no private name imported from another module.
Read from the source with `ast`, and once from a fresh interpreter."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import otpo_trl.cli


CLI = Path(otpo_trl.cli.__file__).parent
MODULES = sorted(p.stem for p in CLI.glob("*.py") if p.stem != "__init__")


def imports(module: str) -> list[tuple[str, str]]:
    """`(imported module, name)` for every `from X import name` and `import X` of `otpo_trl/cli/<module>.py`, with
    relative modules resolved (`.arguments` -> `otpo_trl.cli.arguments`; `from . import train` -> `otpo_trl.cli.train`);
    the name is "" for `import X`."""
    found = []
    for node in ast.walk(ast.parse((CLI / f"{module}.py").read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ["otpo_trl", "cli"][: max(0, 3 - node.level)] if node.level else []
            source = ".".join([*base, *([node.module] if node.module else [])])
            for alias in node.names:
                if node.module is None:  # `from . import train`: the name is a module
                    found.append((f"{source}.{alias.name}", ""))
                else:
                    found.append((source, alias.name))
    return found


def cli_imports(module: str) -> set[str]:
    """The CLI modules that `otpo_trl/cli/<module>.py` imports, by short name."""
    prefix = "otpo_trl.cli."
    return {source[len(prefix) :].split(".")[0] for source, _ in imports(module) if source.startswith(prefix)}


def test_the_modules_are_found():
    assert {"arguments", "train", "upstream"} <= set(MODULES) and "run_dir" not in MODULES
    assert cli_imports("train") >= {"arguments", "upstream"}
    assert ("otpo_trl.runs", "RunDirectoryCallback") in imports("train")  # the run directory, from the library


def test_upstream_imports_no_cli_module():
    assert cli_imports("upstream") == set()


def test_arguments_import_only_the_upstream_workarounds():
    assert cli_imports("arguments") <= {"upstream"}


def test_no_import_circle_between_cli_modules():
    graph = {module: cli_imports(module) & set(MODULES) for module in MODULES}
    done, path = set(), []

    def visit(module):
        if module in path:
            raise AssertionError(f"import circle: {' -> '.join(path[path.index(module) :] + [module])}")
        if module in done:
            return
        path.append(module)
        for imported in sorted(graph[module]):
            visit(imported)
        path.pop()
        done.add(module)

    for module in MODULES:
        visit(module)


@pytest.mark.parametrize("module", MODULES)
def test_no_private_name_is_imported_from_another_module(module):
    private = [
        f"{source}.{name}"
        for source, name in imports(module)
        if source.startswith("otpo_trl") and name.startswith("_") and not name.startswith("__")
    ]
    assert private == [], f"otpo_trl/cli/{module}.py imports private names: {private}"


def test_the_run_directory_loads_without_the_command_line():
    code = "import sys, otpo_trl.runs; print(sorted(m for m in sys.modules if m.startswith('otpo_trl.cli')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_every_trainer_choice_has_a_trainer():
    from otpo_trl.cli import arguments, train

    assert tuple(train.TRAINERS) == arguments.TRAINER_NAMES
