"""The package's import graph, read from the source with `ast` (nothing is imported): no cycle among its modules,
training imports no evaluation or study code, the package imports nothing from the checkout's other folders, no
script imports another, no test module imports another, and no module imports another module's private names.

Imports inside functions and under `TYPE_CHECKING` count: they are dependencies all the same."""

import ast
from pathlib import Path

import pytest

from .conftest import REPO_ROOT


PACKAGE = "otpo_trl"
# Training: what `scripts/train.py` and `from otpo_trl import OTPOTrainer` run.
TRAINING = (
    "otpo_trl.ot",
    "otpo_trl.ot.costs",
    "otpo_trl.ot.sinkhorn",
    "otpo_trl.ot.weights",
    "otpo_trl.ot.pot_reference",
    "otpo_trl.ot.stats",
    "otpo_trl.otpo_config",
    "otpo_trl.otpo_trainer",
    "otpo_trl.callbacks",
    "otpo_trl.forward",
    "otpo_trl.tokenization",
    "otpo_trl.cli.train",
    "otpo_trl.cli.run_dir",
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


def test_no_test_module_imports_another():
    """Shared helpers live in `tests/testing_utils.py` (fixtures in `conftest.py`), not in a test module."""
    found = set()
    for path in (REPO_ROOT / "tests").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                targets = [node.module or ""] + [alias.name for alias in node.names if node.level and not node.module]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            found |= {(path.name, t) for t in targets if t.split(".")[-1].startswith("test_")}
    assert found == set()


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
