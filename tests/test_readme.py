"""The Python snippets of README.md, docs/DESIGN.md and the public docstrings
run as written.

Each snippet is taken from the file or docstring at test time and executed
unchanged in a fresh namespace, in a temporary directory, at tiny size: the
names a snippet leaves to the reader (`model`, `train_ds`, `x`, `gated`,
`pruner`, ...) are provided by `reader_namespace`, never by editing the
snippet.
"""

import inspect
import os
import re
import sys
import textwrap
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

import keras_taylor
from keras_taylor import align, callbacks, gates, handlers, monitor, oracle

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FENCE = re.compile(r"^([ \t]*)```python[ \t]*\n(.*?)^\1```", re.S | re.M)


def blocks(text: str) -> list:
    return [textwrap.dedent(m.group(2)) for m in FENCE.finditer(text)]


def file_blocks(relpath: str) -> list:
    with open(os.path.join(REPO, relpath)) as f:
        return blocks(f.read())


def typical_use(module) -> str:
    """The indented block after `Typical use::` in a module docstring."""
    doc = module.__doc__
    body = doc.split("Typical use::", 1)[1].split("\n\n", 2)[1]
    return textwrap.dedent(body)


# Docstring examples, by where they are written. Every public docstring with an
# `Example:` is listed here or in SKIPPED with the reason.
DOCSTRINGS = {
    "keras_taylor (Typical use)": lambda: [typical_use(keras_taylor)],
    "TaylorPruning": lambda: blocks(callbacks.TaylorPruning.__doc__),
    "ChannelGate": lambda: blocks(gates.ChannelGate.__doc__),
    "register_handler": lambda: blocks(handlers.register_handler.__doc__),
    "keras_taylor.monitor": lambda: blocks(monitor.__doc__),
    "align_removed": lambda: blocks(align.align_removed.__doc__),
    "oracle_deltas": lambda: blocks(oracle.oracle_deltas.__doc__),
    "fit_prune": lambda: blocks(keras_taylor.fit_prune.__doc__),
    "PerFlop": lambda: blocks(keras_taylor.attention.PerFlop.__doc__),
    "export_saved_model": lambda: blocks(keras_taylor.export.export_saved_model.__doc__),
    "export_tflite": lambda: blocks(keras_taylor.export.export_tflite.__doc__),
    "export_onnx": lambda: blocks(keras_taylor.export.export_onnx.__doc__),
}
SKIPPED = {
    # Measures a TFLite latency table of the reader's model (tens of seconds
    # on 2 cores); tests/test_latency_table.py and tests/test_selection.py run
    # the same calls on tiny models.
    "knapsack_plan",
}


def snippets():
    out = []
    for path in ("README.md", "docs/DESIGN.md"):
        for i, code in enumerate(file_blocks(path)):
            out.append(pytest.param(code, id=f"{path}[{i}]"))
    for name, get in DOCSTRINGS.items():
        for i, code in enumerate(get()):
            out.append(pytest.param(code, id=f"{name}[{i}]"))
    return out


def classifier():
    """A tiny CNN with softmax outputs (the snippets use probabilities)."""
    inputs = keras.Input((16, 16, 3), name="input_layer")
    x = layers.Conv2D(8, 3, padding="same", name="c1")(inputs)
    x = layers.BatchNormalization(name="b1")(x)
    x = layers.ReLU()(x)
    x = layers.Conv2D(12, 3, strides=2, padding="same", name="c2")(x)
    x = layers.BatchNormalization(name="b2")(x)
    x = layers.ReLU()(x)
    x = layers.Conv2D(16, 3, padding="same", name="c3")(x)
    x = layers.BatchNormalization(name="b3")(x)
    x = layers.ReLU()(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(5, activation="softmax", name="out")(x), name="tiny")


def reader_namespace() -> dict:
    """What a snippet's reader is assumed to have: a model, data, a gated and
    pruned run. Everything tiny: 16x16 images, 200 examples, batch 8."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (200, 16, 16, 3)).astype("float32")
    y = rng.integers(0, 5, 200)
    train_ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    model = classifier()
    gated = keras_taylor.add_gates(model)
    gated.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    pruner = keras_taylor.TaylorPruning(target=0.7, prune_every=5, channels_per_step=4)
    gated.fit(train_ds.take(10), epochs=1, verbose=0, callbacks=[pruner])
    return {
        "keras": keras, "keras_taylor": keras_taylor, "kt": keras_taylor, "np": np, "tf": tf,
        "model": model, "gated": gated, "pruner": pruner, "small": keras_taylor.prune(gated),
        "x": x[:8], "y": y[:8], "x_train": x, "y_train": y, "x_val": x[:64], "y_val": y[:64],
        "train_ds": train_ds, "ds": train_ds, "data": train_ds,
    }


@pytest.mark.parametrize("code", snippets())
def test_snippet_runs_as_written(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = reader_namespace()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a short tiny fit may end above its target
        exec(compile(code, "<snippet>", "exec"), namespace)


def test_every_docstring_example_is_run_or_skipped_with_a_reason():
    found = set()
    for module_name in [m for m in sys.modules if m.startswith("keras_taylor")]:
        module = sys.modules[module_name]
        for name, obj in vars(module).items():
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and getattr(obj, "__module__", "") == module_name:
                if obj.__doc__ and "```python" in obj.__doc__:
                    found.add(name)
    covered = {"TaylorPruning", "ChannelGate", "register_handler", "align_removed", "oracle_deltas", "fit_prune", "PerFlop",
               "export_saved_model", "export_tflite", "export_onnx"}
    assert found - covered - SKIPPED == set(), "add these docstring examples to DOCSTRINGS"


def test_readme_python_snippets_exist():
    readme = file_blocks("README.md")
    assert any("kt.export.export_saved_model" in code for code in readme)
    assert file_blocks("docs/DESIGN.md")


def test_readme_failure_case_counts_match_the_test_file():
    """README quotes the number of bad-input cases; it must be the table's."""
    from test_failures import CASES

    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    counts = [int(n) for n in re.findall(r"test_failures\.py`[^.]*?\b(\d+) (?:cases|kinds)", readme)]
    assert counts, "README no longer quotes the count"
    assert set(counts) == {len(CASES)}, (counts, len(CASES))
