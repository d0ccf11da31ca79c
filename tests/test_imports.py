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


# ---- keras_taylor without TensorFlow --------------------------------------------

def _third_party_module_level(path) -> set:
    """Top-level names of the modules `path` imports at module level."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, ast.Import):
                names.update(a.name.split(".")[0] for a in child.names)
            elif isinstance(child, ast.ImportFrom) and not child.level and child.module:
                names.add(child.module.split(".")[0])
            visit(child)

    visit(tree)
    return names


def test_import_keras_taylor_does_not_import_tensorflow_modules():
    # Every module `import keras_taylor` loads (its module-level closure)
    # imports TensorFlow only inside functions (or through
    # `_compat.import_tensorflow`, which says what needs it).
    modules = _modules()
    module_level, _ = import_graph()
    closure, todo = set(), [PACKAGE]
    while todo:
        m = todo.pop()
        if m not in closure:
            closure.add(m)
            todo.extend(module_level[m])
    assert {"keras_taylor.gates", "keras_taylor.surgery", "keras_taylor.plotting"} <= closure
    for lazy in ("keras_taylor.scoring", "keras_taylor.callbacks", "keras_taylor.oracle", "keras_taylor.export"):
        assert lazy not in closure
    offenders = {m for m in closure if "tensorflow" in _third_party_module_level(modules[m])}
    assert not offenders, f"modules loaded by `import keras_taylor` import TensorFlow: {sorted(offenders)}"


def test_missing_tensorflow_message(monkeypatch):
    import keras_taylor as kt

    # `import tensorflow` now raises ImportError; drop the loaded modules that
    # need it so that they are imported again (monkeypatch restores them).
    for name in ("TaylorPruning", "callbacks", "scoring", "oracle"):
        monkeypatch.delattr(kt, name, raising=False)  # (hasattr loads it first)
    for name in ("keras_taylor.callbacks", "keras_taylor.scoring", "keras_taylor.oracle"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    with pytest.raises(ImportError, match=r"keras_taylor\.TaylorPruning .*needs TensorFlow.*keras_taylor\[tf\]"):
        kt.TaylorPruning
    with pytest.raises(ImportError, match=r"keras_taylor\.oracle .*needs TensorFlow"):
        kt.oracle
    assert kt.profile is not None  # the rest of the package is unaffected


_BLOCK_TENSORFLOW = """
import sys

class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            raise ImportError(f"No module named {name!r} (blocked by the test)")
        return None

sys.meta_path.insert(0, _Block())
"""


def _other_backend():
    """A Keras backend other than TensorFlow that imports here, or None."""
    for backend in ("jax", "torch", "numpy"):
        result = _run(_BLOCK_TENSORFLOW + "import keras\n", {"KERAS_BACKEND": backend})
        if result.returncode == 0:
            return backend
    return None


def test_import_without_tensorflow_on_another_backend():
    backend = _other_backend()
    if backend is None:
        # Keras 3.15's numpy backend imports jax (for fft), so without jax or
        # torch no backend but TensorFlow loads; the static test above and
        # test_missing_tensorflow_message still cover the package.
        pytest.skip("no Keras backend other than TensorFlow can be imported here (numpy needs jax)")
    result = _run(
        _BLOCK_TENSORFLOW
        + textwrap.dedent(
            """
            import keras
            import keras_taylor as kt
            assert "tensorflow" not in sys.modules
            inputs = keras.Input((8, 8, 3))
            x = keras.layers.Conv2D(4, 3)(inputs)
            x = keras.layers.BatchNormalization()(x)
            x = keras.layers.ReLU()(x)
            x = keras.layers.GlobalAveragePooling2D()(x)
            model = keras.Model(inputs, keras.layers.Dense(2)(x))
            assert kt.analyze(model).num_groups == 4
            assert kt.profile(model).params == model.count_params()
            try:
                kt.TaylorPruning
            except ImportError as err:
                assert "needs TensorFlow" in str(err), err
            else:
                raise AssertionError("TaylorPruning loaded without TensorFlow")
            print("ok")
            """
        ),
        {"KERAS_BACKEND": backend},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


# ---- benchmarks/_harness.py ---------------------------------------------------------

def test_benchmark_harness_needs_only_numpy():
    # The side environments (tfmot, PyTorch) import the harness without Keras
    # 3 or keras_taylor: block them and time two sleeps with the one loop.
    result = _run(
        """
        import sys

        class _Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("keras", "tensorflow", "keras_taylor", "tf_keras"):
                    raise ImportError(f"No module named {name!r} (blocked by the test)")
                return None

        sys.meta_path.insert(0, _Block())
        sys.path.insert(0, "benchmarks")
        import time
        import _harness

        out = _harness.measure({"a": lambda: time.sleep(0.001), "b": lambda: time.sleep(0.02)}, rounds=3, calls=2)
        assert out["calls_per_round"] == 2 and out["rounds"] == 3
        assert len(out["b"]["per_round_ms"]) == 3
        assert out["a"]["ratio_median"] == 1.0 and out["b"]["ratio_median"] > 2.0, out  # sleeps overshoot under load
        assert out["b"]["ratio_min"] <= out["b"]["ratio_median"] <= out["b"]["ratio_max"]
        seen = _harness.in_rounds(["x", "y"], 2, lambda n: n.upper())
        assert seen == {"x": ["X", "X"], "y": ["Y", "Y"]}
        facts = _harness.machine()
        assert "cpu" in facts and "keras" not in facts
        try:
            _harness.StepTimer
        except ImportError:
            pass
        else:
            raise AssertionError("StepTimer without Keras")
        assert not any(m.split(".")[0] in ("keras", "tensorflow", "keras_taylor") for m in sys.modules)
        print("ok")
        """,
        {},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_benchmarks_hold_one_timing_loop():
    # The interleaved loop (`for ... in rng.permutation(...)` timing calls with
    # perf_counter) is keras_taylor/latency.py's `interleaved`, used through
    # benchmarks/_harness.py; no script writes its own.
    bench = ROOT.parent / "benchmarks"
    offenders = []
    for path in sorted(bench.glob("*.py")):
        if path.name == "_harness.py":
            continue
        text = path.read_text()
        for i, line in enumerate(text.splitlines()):
            if "permutation(" in line and line.lstrip().startswith("for "):
                window = "\n".join(text.splitlines()[i : i + 8])
                if "perf_counter" in window:
                    offenders.append(f"{path.name}:{i + 1}")
    assert not offenders, f"interleaved timing loops outside the harness: {offenders}"
    assert "def interleaved(" in (ROOT / "latency.py").read_text()
