"""The import graph of keras_taylor/ (read with `ast`, nothing imported).

Module-level imports (run when a module is imported, including those in
class bodies and top-level `if`/`try`) and function-level imports (run when a
function is called) are listed separately. Neither may form a cycle: a
module-level cycle breaks `import` depending on which module comes first, and
a function-level one means two modules each reach into the other, which is
what the layering (analysis -> plan -> surgery; the callback on top) forbids.
"""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

PACKAGE = "keras_taylor"
ROOT = pathlib.Path(__file__).resolve().parent.parent / PACKAGE


def _modules() -> dict:
    """`{dotted module name: path}` of every .py file of the package."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict) -> str | None:
    """The package module `name` refers to (its longest existing prefix)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _imported_names(node, module: str, is_package: bool) -> list:
    """Dotted names an Import/ImportFrom node imports (`from a import b` gives
    `a.b`, which resolves to module `a.b` when there is one, else to `a`)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:  # relative import
        base = module.split(".")
        if not is_package:
            base = base[:-1]
        base = base[: len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    return [f"{prefix}.{alias.name}" for alias in node.names] or [prefix]


def import_graph() -> tuple:
    """`(module_level, function_level)`: `{module: set of package modules}`."""
    modules = _modules()
    module_level = {m: set() for m in modules}
    function_level = {m: set() for m in modules}

    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"

        def visit(node, in_function: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    for name in _imported_names(child, module, is_package):
                        target = _resolve(name, modules)
                        if target is not None and target != module:
                            (function_level if in_function else module_level)[module].add(target)
                nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                visit(child, nested)

        visit(tree, False)
    return module_level, function_level


def find_cycle(graph: dict) -> list | None:
    """A cycle `[a, b, ..., a]` of `graph`, or `None`."""
    state = {}  # 1: on the stack, 2: done
    stack = []

    def dfs(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = dfs(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = dfs(node)
            if found:
                return found
    return None


def test_graph_is_read():
    module_level, function_level = import_graph()
    # Spot checks that the reader sees what is there (so "no cycle" means something).
    assert "keras_taylor.graph" in module_level["keras_taylor.gates"]
    assert "keras_taylor.handlers" in module_level["keras_taylor.graph"]
    assert "keras_taylor.export._common" in module_level["keras_taylor.export.saved_model"]
    assert "keras_taylor.gates" in function_level["keras_taylor.flops"]
    assert "keras_taylor.gates" not in module_level["keras_taylor.flops"]


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_module_level_cycle():
    module_level, _ = import_graph()
    cycle = find_cycle(module_level)
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle)


def test_no_cycle_with_function_level_imports():
    # The package __init__ imports (nearly) everything; a function that does
    # `import keras_taylor as kt` (cli, testing) is a user of the package, not
    # part of its layering, so edges into the package root are left out.
    module_level, function_level = import_graph()
    both = {
        m: (module_level[m] | function_level[m]) - {PACKAGE}
        for m in module_level
    }
    cycle = find_cycle(both)
    assert cycle is None, "import cycle (module- and function-level): " + " -> ".join(cycle)


def _run(code: str, env_extra: dict) -> subprocess.CompletedProcess:
    env = dict(os.environ, **env_extra)
    env["PYTHONPATH"] = str(ROOT.parent) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=300, env=env,
    )


def test_export_is_an_attribute_of_the_package():
    result = _run(
        """
        import sys
        import keras_taylor as kt
        assert "keras_taylor.export" not in sys.modules  # loaded on first use
        from keras_taylor.export import export_saved_model
        assert kt.export.export_saved_model is export_saved_model
        assert "export" in dir(kt)
        print("ok")
        """,
        {"TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
