"""The package's structure: its modules import each other without a cycle.

The import graph is read from the source with ``ast``: every ``import`` and
``from ... import`` of a module of the package, at module level or inside a
function, except those under ``if TYPE_CHECKING:`` (never run).
"""

from __future__ import annotations

import ast
import pathlib
import textwrap
import warnings

import pytest

import optax_gradflow

PACKAGE_DIR = pathlib.Path(optax_gradflow.__file__).resolve().parent


def module_names(root: pathlib.Path, package: str) -> dict[str, pathlib.Path]:
    """Dotted module name -> its file, for every ``.py`` file under ``root``."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(node: ast.AST):
    """Every Import / ImportFrom under ``node``, skipping ``if TYPE_CHECKING:`` bodies."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for other in child.orelse:
                yield from _import_nodes(other)
            continue
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        yield from _import_nodes(child)


def import_graph(root: pathlib.Path, package: str) -> dict[str, set[str]]:
    """Module -> the modules of the package it imports (from the source, see above)."""
    modules = module_names(root, package)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        targets = set()
        for node in _import_nodes(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
                continue
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                targets.add(submodule if submodule in modules else base)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None when it has none."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(node: str) -> list[str] | None:
        path.append(node)
        on_path.add(node)
        for target in sorted(graph.get(node, ())):
            if target in on_path:
                return [*path[path.index(target) :], target]
            if target not in done:
                cycle = visit(target)
                if cycle:
                    return cycle
        on_path.discard(path.pop())
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def test_the_package_imports_without_a_cycle():
    graph = import_graph(PACKAGE_DIR, "optax_gradflow")
    assert "optax_gradflow.state" in graph["optax_gradflow.events"]  # the graph is read
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _write_package(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    return root / "pkg"


def test_a_cycle_through_a_function_level_import_is_found(tmp_path):
    root = _write_package(
        tmp_path,
        {
            "__init__.py": "",
            "a.py": "from pkg import b\n",
            "b.py": "from pkg.sub import c\n",
            "sub/__init__.py": "",
            "sub/c.py": "def f():\n    from .. import a\n    return a\n",
        },
    )
    cycle = find_cycle(import_graph(root, "pkg"))
    assert cycle == ["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]


def test_type_checking_imports_make_no_cycle(tmp_path):
    root = _write_package(
        tmp_path,
        {
            "__init__.py": "",
            "a.py": "import pkg.b\n",
            "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\n",
        },
    )
    graph = import_graph(root, "pkg")
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == set()
    assert find_cycle(graph) is None


# --- Where the state types and the event flags live -----------------------------


def test_state_types_live_in_state_and_stay_importable_where_they_were():
    from optax_gradflow import state, transform

    assert optax_gradflow.StabilizedState is state.StabilizedState
    assert transform.StabilizedState is state.StabilizedState
    assert state.StabilizedState.__module__ == "optax_gradflow.state"
    assert optax_gradflow.Ring is state.Ring
    assert optax_gradflow.GradientFlowState is state.GradientFlowState


@pytest.mark.parametrize(
    "module", ["optax_gradflow.config", "optax_gradflow.state", "optax_gradflow.torch.state"]
)
def test_former_flag_names_warn_and_read_the_event_flags(module):
    import importlib

    from optax_gradflow.constants import Event

    if module.startswith("optax_gradflow.torch"):
        pytest.importorskip("torch")
    mod = importlib.import_module(module)
    with pytest.warns(DeprecationWarning, match=r"constants\.Event\.WARNING"):
        value = mod.FLAG_WARNING
    assert value == 64 and type(value) is int
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert {name: getattr(mod, f"FLAG_{name}") for name in Event.__members__} == {
            name: int(flag) for name, flag in Event.__members__.items()
        }
    with pytest.raises(AttributeError, match="FLAG_NOTHING"):
        _ = mod.FLAG_NOTHING
