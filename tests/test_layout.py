"""The package's import graph, read from the source with `ast` (nothing is imported): no cycle among its modules,
training imports no evaluation or study code, the package imports nothing from the checkout's other folders, no
script imports another, no test module imports another, and no module imports another module's private names.

Imports inside functions and under `TYPE_CHECKING` count: they are dependencies all the same."""

import ast
from pathlib import Path

import pytest

from .testing_utils import REPO_ROOT


PACKAGE = "otpo_trl"
# Training: what `scripts/train.py` and `from otpo_trl import OTPOTrainer` run.
TRAINING = (
    "otpo_trl.ot",
    "otpo_trl.ot.costs",
    "otpo_trl.ot.geometry",
    "otpo_trl.ot.sinkhorn",
    "otpo_trl.ot.solve",
    "otpo_trl.ot.weights",
    "otpo_trl.ot.pot_reference",
    "otpo_trl.ot.settings",
    "otpo_trl.ot.stats",
    "otpo_trl.otpo_config",
    "otpo_trl.otpo_trainer",
    "otpo_trl.callbacks",
    "otpo_trl.forward",
    "otpo_trl.tokenization",
    "otpo_trl.cli.train",
    "otpo_trl.runs",
    "otpo_trl.runs.plan",
    "otpo_trl.runs.resume",
    "otpo_trl.runs.outputs",
    "otpo_trl.runs.start",
    "otpo_trl.runs.callback",
)
# Evaluation and studies: what training must not import, directly or through another module.
EVALUATION = (
    "otpo_trl.inspection",
    "otpo_trl.evaluation",
    "otpo_trl.plotting.fonts",
    "otpo_trl.plotting.pair_figure",
    "otpo_trl.cli.evaluate",
    "otpo_trl.cli.plot_weights",
)
# Top-level folders of the checkout that are not the package (the package imports nothing from them).
OUTSIDE = ("scripts", "studies", "tests", "bench")

# Known violations, each to be removed by the step that fixes it (a fixed one left here fails `test_allow_lists`).
# Cycles, as the sorted modules of each strongly connected component:
ALLOWED_CYCLES: set = set()
# (importer, imported module, private name):
ALLOWED_PRIVATE: set = set()


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def read_imports(root: Path, package: str = PACKAGE) -> dict[str, list[tuple[str, tuple[str, ...]]]]:
    """For each module of `package` under `root`: the (absolute module, imported names) of its import statements.

    `from . import train` records `(pkg.cli.train, ())` when `train` is a submodule, and `(pkg.cli, ("train",))`
    otherwise; `import a.b` records `("a.b", ())`."""
    files = sorted((root / package).rglob("*.py"))
    modules = {module_name(path, root): path for path in files}
    imports = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        here = name.split(".") if is_package else name.split(".")[:-1]
        found = []
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found += [(alias.name, ()) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(here[: len(here) - node.level + 1] if node.level else [])
                target = ".".join(part for part in (base, node.module or "") if part)
                names = tuple(alias.name for alias in node.names)
                submodules = [n for n in names if f"{target}.{n}" in modules]
                found += [(f"{target}.{n}", ()) for n in submodules]
                rest = tuple(n for n in names if n not in submodules)
                if rest or not submodules:
                    found.append((target, rest))
        imports[name] = found
    return imports


def internal_graph(imports, package: str = PACKAGE) -> dict[str, set[str]]:
    """module -> the modules of the package it imports (a package's `__init__` counted as the package)."""
    return {
        name: {target for target, _ in found if target in imports and target != name and target != package}
        for name, found in imports.items()
    }


def cycles(graph: dict[str, set[str]]) -> set[tuple[str, ...]]:
    """The strongly connected components with more than one module (Tarjan), each as a sorted tuple."""
    index, low, stack, on_stack, result = {}, {}, [], set(), set()

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                result.add(tuple(sorted(component)))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return result


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for other in graph.get(todo.pop(), ()):
            if other not in seen:
                seen.add(other)
                todo.append(other)
    return seen


def private_imports(imports) -> set[tuple[str, str, str]]:
    """(importer, module, name) of each `from <package module> import _name` between two different modules."""
    return {
        (name, target, imported)
        for name, found in imports.items()
        for target, names in found
        if target in imports and target != name
        for imported in names
        if imported.startswith("_") and not imported.startswith("__")
    }


IMPORTS = read_imports(REPO_ROOT)
GRAPH = internal_graph(IMPORTS)
STUDY_IMPORTS = read_imports(REPO_ROOT, "studies")
STUDY_GRAPH = internal_graph(STUDY_IMPORTS, "studies")


def test_the_graph_is_read():
    assert {"otpo_trl.otpo_trainer", "otpo_trl.cli.train", "otpo_trl.forward"} <= set(GRAPH)
    assert "otpo_trl.forward" in GRAPH["otpo_trl.otpo_trainer"]
    assert "otpo_trl.tokenization" in GRAPH["otpo_trl.cli.train"]
    assert "otpo_trl.cli.arguments" in GRAPH["otpo_trl.cli.launch"]  # `from .arguments import ...` in a function
    assert "studies.common" in STUDY_GRAPH["studies.length_study"]  # `from .common import ...`


def test_no_import_cycle():
    assert cycles(GRAPH) - ALLOWED_CYCLES == set()


@pytest.mark.parametrize("module", TRAINING)
def test_training_imports_no_evaluation_code(module):
    assert module in GRAPH
    assert sorted(reachable(GRAPH, module) & set(EVALUATION)) == []


def test_the_pictures_import_nothing_of_the_package_but_the_weight_statistics():
    """`otpo_trl.plotting` draws what it is given: it loads no model and reads no argument; of the package it uses
    only `otpo_trl.ot.stats` (`token_weight_stats`, the statistic the trainer and the spread tool use too)."""
    drawing = [name for name in GRAPH if name.startswith("otpo_trl.plotting")]
    assert "otpo_trl.plotting.pair_figure" in drawing
    allowed = {*drawing, "otpo_trl.ot.stats"}
    assert {name: sorted(GRAPH[name] - allowed) for name in drawing} == {name: [] for name in drawing}
    assert "otpo_trl.ot.stats" in GRAPH["otpo_trl.plotting.pair_figure"]


def ot_package_imports_outside_it(graph) -> set[tuple[str, str]]:
    """(module of `otpo_trl.ot`, module of `otpo_trl` outside it) for each import that leaves the OT package."""
    inside = lambda name: name == "otpo_trl.ot" or name.startswith("otpo_trl.ot.")  # noqa: E731
    return {
        (name, target) for name, targets in graph.items() if inside(name) for target in targets if not inside(target)
    }


def test_the_ot_package_imports_neither_the_trainer_nor_the_config():
    """The OT math is pure: it imports nothing else of the package (so neither the trainer nor the config, which
    build on it), directly or through another module."""
    ot_modules = [name for name in GRAPH if name.startswith("otpo_trl.ot.")]
    assert {"otpo_trl.ot.weights", "otpo_trl.ot.sinkhorn", "otpo_trl.ot.costs"} <= set(ot_modules)
    assert ot_package_imports_outside_it(GRAPH) == set()
    for name in ot_modules:
        assert {"otpo_trl.otpo_trainer", "otpo_trl.otpo_config"} & reachable(GRAPH, name) == set(), name


def test_the_package_imports_nothing_from_the_checkout_outside_it():
    outside = {
        (name, target) for name, found in IMPORTS.items() for target, _ in found if target.split(".")[0] in OUTSIDE
    }
    assert outside == set()


def test_studies_import_the_package_never_a_script_and_form_no_cycle():
    """`studies/` (outside the wheel) builds on `otpo_trl`; the package never imports a study (checked above)."""
    assert {"studies.common", "studies.length_study", "studies.dpo_vs_otpo"} <= set(STUDY_GRAPH)
    targets = {target.split(".")[0] for found in STUDY_IMPORTS.values() for target, _ in found}
    assert PACKAGE in targets and "scripts" not in targets and "tests" not in targets
    assert cycles(STUDY_GRAPH) == set()


def test_no_script_imports_another():
    scripts = {path.stem for path in (REPO_ROOT / "scripts").glob("*.py")}
    found = set()
    for path in (REPO_ROOT / "scripts").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                targets = [node.module or ""] + [alias.name for alias in node.names if node.level]
            else:
                continue
            found |= {(path.stem, t) for t in targets if t.split(".")[0] in scripts or t.startswith("scripts")}
    assert found == set()


def imports_of_test_modules(tests: Path) -> set[tuple[str, str]]:
    """(file name, imported module) for each import in a module of `tests`, the module's last part kept for a relative
    import (`from .conftest import X` -> `conftest`; `from . import test_x` -> `test_x`)."""
    found = set()
    for path in tests.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                targets = [node.module or ""] + [alias.name for alias in node.names if node.level and not node.module]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            found |= {(path.name, t) for t in targets}
    return found


TEST_IMPORTS = imports_of_test_modules(REPO_ROOT / "tests")


def test_no_test_module_imports_another():
    """Shared helpers live in `tests/testing_utils.py` (fixtures in `conftest.py`), not in a test module."""
    assert {(name, t) for name, t in TEST_IMPORTS if t.split(".")[-1].startswith("test_")} == set()


def test_helpers_come_from_testing_utils_never_from_conftest():
    """`conftest.py` holds pytest's hooks and fixtures only; a helper that a test module imports is in
    `testing_utils.py` (which the fixtures use too)."""
    assert ("test_layout.py", "testing_utils") in TEST_IMPORTS  # the relative import is read
    assert {(name, t) for name, t in TEST_IMPORTS if t.split(".")[-1] == "conftest"} == set()


# The package's own entry point (`python -m otpo_trl`) is the one module outside `cli/` that may import it.
CLI_ENTRY_POINTS = ("otpo_trl.__main__",)
# The training command line: only these CLI modules may import it (the launcher `otpo-trl train` starts it; `preflight`
# holds the command's checks before writing).
TRAINING_COMMAND = ("otpo_trl.cli.train", "otpo_trl.cli.arguments", "otpo_trl.cli.preflight")
TRAINING_COMMAND_USERS = (
    "otpo_trl.cli.train",
    "otpo_trl.cli.arguments",
    "otpo_trl.cli.preflight",
    "otpo_trl.cli.launch",
)


def cli_importers(imports, package: str = PACKAGE) -> set[tuple[str, str]]:
    """(importer, imported) for each import of `<package>.cli` (or a module of it) by a module outside `cli/`."""
    cli = f"{package}.cli"
    return {
        (name, target)
        for name, found in imports.items()
        if name != cli and not name.startswith(f"{cli}.")
        for target, _ in found
        if target == cli or target.startswith(f"{cli}.")
    }


def training_command_importers(imports, package: str = PACKAGE) -> set[tuple[str, str]]:
    """(importer, imported) for each import of the training command line by a CLI tool other than its own modules."""
    command = {module.replace(PACKAGE, package, 1) for module in TRAINING_COMMAND}
    users = {module.replace(PACKAGE, package, 1) for module in TRAINING_COMMAND_USERS}
    return {
        (name, target)
        for name, found in imports.items()
        if name.startswith(f"{package}.cli.") and name not in users
        for target, _ in found
        if target in command
    }


def test_only_the_command_line_imports_it():
    """The library (training, the run directory, evaluation) never imports `otpo_trl.cli`: tools share what they need
    through library modules (`otpo_trl.runs` for the run directory). `studies/` may use the command line (it trains
    through it); scripts/ are its thin wrappers; bench/ imports the library only."""
    assert cli_importers(IMPORTS) - {(m, "otpo_trl.cli.main") for m in CLI_ENTRY_POINTS} == set()
    bench = read_imports(REPO_ROOT, "bench")
    assert {(name, t) for name, found in bench.items() for t, _ in found if t.startswith("otpo_trl.cli")} == set()


def test_no_tool_imports_the_training_command_line():
    """`evaluate`, `plot_weights`, `ot_spread`, `prepare_model`, `options`, `upstream`, `main`: none imports
    `cli.train` or `cli.arguments` (what they read of a training run is in `otpo_trl.runs`)."""
    assert training_command_importers(IMPORTS) == set()


def test_no_module_imports_private_names_of_another():
    assert private_imports(IMPORTS) - ALLOWED_PRIVATE == set()


def test_allow_lists_hold_only_violations_that_still_exist():
    assert ALLOWED_CYCLES - cycles(GRAPH) == set(), "fixed: remove from ALLOWED_CYCLES"
    assert ALLOWED_PRIVATE - private_imports(IMPORTS) == set(), "fixed: remove from ALLOWED_PRIVATE"


def test_the_checks_find_what_they_look_for(tmp_path):
    """On a made-up package: a cycle (through a relative and a TYPE_CHECKING import), an evaluation module reached
    through another module, a private name, and a package-level `from . import submodule`."""
    files = {
        "pkg/__init__.py": "from .a import A\n",
        "pkg/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .sub.b import B\nA = 1\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/b.py": "from .. import a\nfrom ..c import _hidden\n",
        "pkg/c.py": "def f():\n    import pkg.evaluation\n_hidden = 1\n",
        "pkg/evaluation.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    imports = read_imports(tmp_path, "pkg")
    graph = internal_graph(imports, "pkg")
    assert cycles(graph) == {("pkg.a", "pkg.sub.b")}
    assert "pkg.evaluation" in reachable(graph, "pkg.a")
    assert "pkg.evaluation" not in reachable(graph, "pkg.evaluation")
    assert private_imports(imports) == {("pkg.sub.b", "pkg.c", "_hidden")}


def test_the_cli_rules_find_what_they_look_for(tmp_path):
    """On a made-up package: a library module importing the CLI, and a CLI tool importing the training command."""
    files = {
        "pkg/__init__.py": "",
        "pkg/__main__.py": "from .cli.main import main\n",
        "pkg/runs.py": "def f():\n    from .cli import options\n",
        "pkg/cli/__init__.py": "",
        "pkg/cli/main.py": "",
        "pkg/cli/options.py": "",
        "pkg/cli/arguments.py": "",
        "pkg/cli/train.py": "from .arguments import parse_args\nfrom ..runs import f\n",
        "pkg/cli/launch.py": "from .arguments import parse_args\n",
        "pkg/cli/evaluate.py": "from . import train\nfrom .options import x\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    imports = read_imports(tmp_path, "pkg")
    assert cli_importers(imports, "pkg") == {("pkg.runs", "pkg.cli.options"), ("pkg.__main__", "pkg.cli.main")}
    assert training_command_importers(imports, "pkg") == {("pkg.cli.evaluate", "pkg.cli.train")}
