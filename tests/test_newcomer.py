"""What a first-time user tripped over (issue 12): each test failed before the fix."""

import logging
import math
import warnings

import keras
import numpy as np
import pytest
from keras import layers

import keras_taylor as kt
from conftest import images, make
from test_failures import _first_difference, lambda_model, snapshot

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def data(n=48, seed=0, classes=5):
    rng = np.random.default_rng(seed)
    return images(n, seed), rng.integers(0, classes, n)


def compiled_gates(name="plain", **compile_kwargs):
    gated = kt.add_gates(make(name))
    gated.compile(optimizer=keras.optimizers.SGD(0.01), loss=LOSS, **compile_kwargs)
    return gated


# ---- 1. quantized models are refused before any training ---------------------------------------

def quantized_model():
    inputs = keras.Input((16, 16, 3))
    x = layers.Conv2D(4, 3, name="conv")(inputs)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dense(8, activation="relu", name="d1")(x)
    model = keras.Model(inputs, layers.Dense(2, name="d2")(x), name="q")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "InputLayer does not have a quantize method"
        model.quantize("int8")
    return model


@pytest.mark.parametrize("call", ["add_gates", "analyze", "apply_plan", "profile"])
def test_quantized_model_is_refused_with_prune_first_quantize_after(call):
    q = quantized_model()
    assert any(getattr(l, "quantization_mode", None) == "int8" for l in q.layers)
    before = snapshot(q)
    fn = {
        "add_gates": lambda: kt.add_gates(q),
        "analyze": lambda: kt.analyze(q),
        "apply_plan": lambda: kt.apply_plan(q, kt.PruningPlan({"d1": [0]})),
        "profile": lambda: kt.profile(q),
    }[call]
    with pytest.raises(ValueError) as info:
        fn()
    message = str(info.value)
    assert "model='q'" in message and "'d1'" in message and "quantization_mode='int8'" in message
    assert "prune the float model first, then quantize" in message
    assert _first_difference(before, snapshot(q)) is None


# ---- 2. falling short of the target is said, at fit end and at prune ----------------------------

def test_fit_that_ends_above_the_target_warns_and_prune_warns_too(tmp_path):
    gated = compiled_gates()
    x, y = data(32)
    pruner = kt.TaylorPruning(target=0.5, prune_every=2, start_step=1000)
    with pytest.warns(UserWarning, match=r"above the target 0\.5 \(start_step=1000 is past the 4 minibatches"):
        gated.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[pruner])
    assert not pruner.done
    with pytest.warns(UserWarning, match=r"at 1\.0000 of its flops, above the target 0\.5"):
        kt.prune(gated)
    # The target lives in the gates: a saved and reloaded model still says it.
    path = str(tmp_path / "gated.keras")
    gated.save(path)
    with pytest.warns(UserWarning, match=r"above the target 0\.5 of the pruning run recorded"):
        kt.prune(keras.saving.load_model(path))


def test_too_few_steps_warns_and_a_finished_run_does_not():
    x, y = data(32)
    gated = compiled_gates()
    pruner = kt.TaylorPruning(target=0.3, prune_every=2, channels_per_step=1)
    with pytest.warns(UserWarning, match=r"pruning step\(s\) of up to 1 groups every 2 minibatches did not suffice"):
        gated.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[pruner])
    gated = compiled_gates()
    pruner = kt.TaylorPruning(target=0.7, prune_every=2, channels_per_step=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        gated.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[pruner])
        assert pruner.done
        small = kt.prune(gated)
    assert kt.profile(small).flops <= 0.7 * kt.profile(make("plain")).flops


def test_model_checkpoint_save_best_only_keeping_an_early_epoch_is_caught(tmp_path):
    """The epoch `save_best_only` keeps can precede the target; `prune` says so."""
    x, y = data(48)
    gated = compiled_gates()
    pruner = kt.TaylorPruning(target=0.5, prune_every=2, channels_per_step=2)
    path = str(tmp_path / "best.keras")
    # kt_flops only falls: "best" by max is the first epoch, before the target.
    ckpt = keras.callbacks.ModelCheckpoint(path, monitor="kt_flops", mode="max", save_best_only=True)
    gated.fit(x, y, batch_size=8, epochs=4, verbose=0, callbacks=[pruner, ckpt])
    assert pruner.done
    best = keras.saving.load_model(path)
    with pytest.warns(UserWarning, match=r"ModelCheckpoint\(save_best_only=True\)"):
        kt.prune(best)


def test_default_channels_per_step_reaches_the_target_by_about_half_of_fit(caplog):
    """224 groups, 2 epochs, 157 minibatches each once ended at 0.96 of the
    FLOPs: the default step is now sized from the fit Keras announces."""
    gated = compiled_gates("residual")
    x, y = data(160)
    pruner = kt.TaylorPruning(target=0.5, prune_every=2)  # 20 steps per epoch, 2 epochs
    with caplog.at_level(logging.INFO, logger="keras_taylor"):
        gated.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[pruner])
    assert pruner.done
    reached = next(h["step"] for h in pruner.history if h["flops_fraction"] <= 0.5)
    assert reached <= 0.6 * 40, pruner.history
    chosen = pruner.state()["channels_per_step"]
    paper = max(1, round(100 * kt.analyze(gated).num_groups / 52_672))
    assert chosen > paper
    assert any(f"channels_per_step={chosen}" in r.getMessage() for r in caplog.records)


# ---- 3. kt.export is reachable as an attribute ----------------------------------------------------

def test_export_is_an_attribute_of_the_package():
    assert callable(kt.export.export_saved_model) and callable(kt.export.export_tflite)


# ---- 4. on_unknown="freeze" with a Lambda layer --------------------------------------------------

def test_freeze_with_a_lambda_layer_gates_copies_and_leaves_the_model_untouched():
    """Keras refuses to rebuild a Lambda from its config in safe mode; copying
    a layer the user holds in memory loads nothing, so it is allowed."""
    model = lambda_model()
    with pytest.raises(ValueError, match=r"'lam'.*on_unknown='freeze'"):
        kt.add_gates(model)
    # Freezing leaves nothing prunable in this model: the error says why
    # (not Keras's "deserialization of a Lambda layer ... safe_mode=False").
    with pytest.raises(ValueError, match=r"'conv': flows into 'lam' \(Lambda\), which has no handler"):
        kt.add_gates(model, on_unknown="freeze")
    x = np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 2)).astype("float32")
    before = snapshot(model)
    copy = kt.apply_plan(model, kt.PruningPlan(), on_unknown="freeze")
    np.testing.assert_allclose(copy(x), model(x), rtol=1e-6, atol=1e-6)
    assert _first_difference(before, snapshot(model)) is None


def test_freeze_with_a_lambda_layer_prunes_the_channels_it_does_not_touch():
    inputs = keras.Input((8, 8, 2))
    x = layers.Conv2D(6, 3, name="c1")(inputs)
    x = layers.Conv2D(4, 3, name="c2")(x)
    x = layers.Lambda(lambda t: t * 2.0, name="lam")(x)
    x = layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, layers.Dense(2)(x))
    before = snapshot(model)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 2)).astype("float32")
    gated = kt.add_gates(model, on_unknown="freeze")
    np.testing.assert_allclose(gated(x), model(x), rtol=1e-6, atol=1e-6)
    gated.get_layer("c1").gate.assign(np.array([1, 0, 1, 1, 0, 1], "float32"))
    small = kt.prune(gated, on_unknown="freeze")
    assert small.get_layer("c1").filters == 4 and small.get_layer("c2").filters == 4
    np.testing.assert_allclose(small(x), gated(x), rtol=1e-5, atol=1e-5)
    assert _first_difference(before, snapshot(model)) is None


# ---- 5. two TaylorPruning callbacks in one fit ---------------------------------------------------

def test_two_pruners_in_one_fit_are_refused_before_training():
    gated = compiled_gates()
    x, y = data(16)
    gates = {k: v.copy() for k, v in kt.gate_values(gated).items()}
    first, second = kt.TaylorPruning(target=0.5), kt.TaylorPruning(target=0.4)
    with pytest.raises(ValueError, match=r"Expected one TaylorPruning callback per fit.*model 'plain'"):
        gated.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[first, second])
    assert all(np.array_equal(v, gates[k]) for k, v in kt.gate_values(gated).items())
    assert gated.get_layer("b1").counters.numpy().sum() == 0  # no minibatch ran
    # Each alone still works afterwards, with the model's own train step back.
    gated.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[second])
    assert second._scorer.counters()["batches"] == 2


# ---- 6. nothing prunable -------------------------------------------------------------------------

def test_add_gates_on_a_model_with_nothing_prunable_says_why():
    inputs = keras.Input((8,))
    model = keras.Model(inputs, layers.Dense(2, name="only")(inputs), name="linear")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"Expected a model with prunable channels.*model='linear'.*'only': reaches model output"):
        kt.add_gates(model)
    assert _first_difference(before, snapshot(model)) is None
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, layers.GlobalAveragePooling2D()(layers.ReLU()(inputs)), name="nolayers")
    with pytest.raises(ValueError, match=r"no layer that makes channels"):
        kt.add_gates(model)


# ---- 8. quieter surprises ------------------------------------------------------------------------

def test_steps_per_execution_not_dividing_prune_every_warns_with_the_real_schedule():
    gated = compiled_gates(steps_per_execution=4)
    x, y = data(96)
    pruner = kt.TaylorPruning(target=0.1, prune_every=3, channels_per_step=1)
    with pytest.warns(UserWarning, match=r"steps_per_execution=4 does not divide prune_every=3.*every 4 minibatches \(at 4, 8, 12"):
        gated.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[pruner])
    assert [h["step"] for h in pruner.history] == [4, 8, 12]
    gated = compiled_gates(steps_per_execution=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        gated.fit(x[:24], y[:24], batch_size=8, epochs=1, verbose=0,
                  callbacks=[kt.TaylorPruning(target=0.9, prune_every=3, channels_per_step=8)])


def test_channel_multiple_takes_any_positive_integer():
    gated = compiled_gates("residual")
    x, y = data(64)
    pruner = kt.TaylorPruning(target=0.6, prune_every=2, channels_per_step=2, channel_multiple=3)
    gated.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[pruner])
    assert pruner.done and pruner.history[-1]["aligned_to"] == 3
    graph = kt.analyze(gated)
    full = {n: len(m) for n, m in graph.creating_layers().items()}
    counts = graph.layer_channel_counts(pruner.removed)
    assert any(c < full[n] for n, c in counts.items())
    assert all(c % 3 == 0 or c == full[n] for n, c in counts.items()), counts
    for bad in (0, -8, 2.5, True):
        with pytest.raises(ValueError, match="channel_multiple"):
            kt.TaylorPruning(channel_multiple=bad)


def test_a_plan_may_name_the_conv_instead_of_its_batchnorm():
    model = make("plain")
    graph = kt.analyze(model)
    assert "b1" in graph.gate_sites and "c1" not in graph.gate_sites
    by_bn = kt.apply_plan(model, kt.PruningPlan({"b1": [1, 5]}))
    by_conv = kt.apply_plan(model, kt.PruningPlan({"c1": [1, 5]}))
    assert by_conv.get_layer("c1").filters == 6
    x = images(2)
    np.testing.assert_allclose(by_conv(x), by_bn(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"layer 'out'"):
        kt.apply_plan(model, kt.PruningPlan({"out": [0]}))


def test_history_restarts_when_the_callback_moves_to_another_model():
    x, y = data(32)
    pruner = kt.TaylorPruning(target=0.7, prune_every=2, channels_per_step=4)
    first = compiled_gates()
    first.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[pruner])
    steps_first = [h["step"] for h in pruner.history]
    assert steps_first and pruner.done
    second = compiled_gates()
    second.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[pruner])
    assert [h["step"] for h in pruner.history] == steps_first  # not steps_first * 2
    assert pruner.history[-1]["removed_total"] == len(pruner.removed)


def test_logs_hold_fractions_not_a_count_formatted_as_a_float():
    gated = compiled_gates()
    x, y = data(32)
    seen = []

    class Spy(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(dict(logs))

    gated.fit(x, y, batch_size=8, epochs=1, verbose=0,
              callbacks=[kt.TaylorPruning(target=0.7, prune_every=2, channels_per_step=4), Spy()])
    assert "kt_pruned" not in seen[-1]
    assert 0.0 < seen[-1]["kt_flops"] < 1.0 and 0.0 < seen[-1]["kt_params"] < 1.0
    assert math.isclose(seen[0]["kt_flops"], 1.0)


# ---- 10. the notebooks' install cell --------------------------------------------------------------

REPO = __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__)))


def _install_cell(name):
    import json
    import os

    with open(os.path.join(REPO, "colab", name)) as f:
        cells = json.load(f)["cells"]
    cells = ["".join(c["source"]) for c in cells if c["cell_type"] == "code" and "# Install" in "".join(c["source"])]
    assert len(cells) == 1
    return cells[0]


def _run_install_cell(code, cwd, env_repo, git_url=""):
    """Runs the cell as a fresh kernel would where keras_taylor is not
    installed; records the commands it would run instead of running them."""
    import json
    import os
    import subprocess
    import sys

    prelude = (
        "import importlib.util as _u, subprocess as _s, json, sys\n"
        "_find = _u.find_spec\n"
        "_u.find_spec = lambda n, *a: None if n == 'keras_taylor' else _find(n, *a)\n"
        "CALLS = []\n"
        "_s.run = lambda cmd, **kw: CALLS.append(cmd)\n"
        "sys.modules['keras_taylor'] = type(sys)('keras_taylor'); sys.modules['keras_taylor'].__version__ = 'x'\n"
    )
    epilogue = "\nprint('CALLS=' + json.dumps(CALLS))\n"
    env = dict(os.environ, KERAS_TAYLOR_REPO=env_repo, KERAS_TAYLOR_GIT=git_url)
    proc = subprocess.run([sys.executable, "-c", prelude + code + epilogue], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)
    calls = None
    for line in proc.stdout.splitlines():
        if line.startswith("CALLS="):
            calls = json.loads(line[len("CALLS="):])
    return proc, calls


@pytest.mark.parametrize("name", ["quickstart.ipynb", "transfer_learning.ipynb"])
def test_notebook_install_cell_clones_installs_or_says_what_to_do(name, tmp_path):
    import os
    import sys

    code = _install_cell(name)
    absent = str(tmp_path / "keras_taylor")
    # Colab, nothing uploaded, no URL: a clear error, not a later ImportError.
    proc, _ = _run_install_cell(code, tmp_path, absent)
    assert proc.returncode != 0 and "set GIT_URL" in proc.stderr, proc.stderr[-1000:]
    # Colab with the URL: clone, then pip install the clone.
    proc, calls = _run_install_cell(code, tmp_path, absent, git_url="file:///src/keras_taylor.git")
    assert proc.returncode == 0, proc.stderr[-1000:]
    assert calls[0] == ["git", "clone", "--depth", "1", "file:///src/keras_taylor.git", absent]
    assert calls[1] == [sys.executable, "-m", "pip", "install", "-q", "-e", absent]
    # Opened in colab/ of a clone: installs that clone, clones nothing.
    proc, calls = _run_install_cell(code, os.path.join(REPO, "colab"), absent)
    assert proc.returncode == 0, proc.stderr[-1000:]
    assert calls == [[sys.executable, "-m", "pip", "install", "-q", "-e", REPO]]
