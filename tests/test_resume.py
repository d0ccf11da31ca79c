"""Resume mid-pruning: the pruning state travels with the model's checkpoints.

An uninterrupted run is compared with runs that are killed mid-pruning and
resumed in a fresh model object: through `keras.callbacks.BackupAndRestore`
and through a `.keras` file. Plans and weights must match.
"""

import keras
import numpy as np
import pytest

import keras_taylor as kt
from conftest import make

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
EPOCHS, STOP_AFTER = 4, 2  # the interrupted runs die at the end of epoch 2


def data():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (32, 16, 16, 3)).astype("float32")
    y = rng.integers(0, 5, 32)
    return x, y


def fresh_gated():
    """The same model every time (seeded), as a new process would build it."""
    gated = kt.add_gates(make("residual"))
    gated.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss=LOSS)
    return gated


def pruner():
    # 4 minibatches per epoch, a pruning step every 3: score windows straddle
    # epoch ends, and pruning is still going on when the run is killed.
    return kt.TaylorPruning(target=0.3, prune_every=3, channels_per_step=2, momentum=0.9)


class Interrupt(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == STOP_AFTER:
            raise RuntimeError("killed")


def fit(model, callbacks, epochs=EPOCHS, initial_epoch=0):
    x, y = data()
    model.fit(x, y, batch_size=8, epochs=epochs, initial_epoch=initial_epoch, shuffle=False, verbose=0, callbacks=callbacks)


def state_of(model):
    gates = {l.name: np.asarray(l.gate.numpy()) for l in model.layers if isinstance(l, kt.ChannelGate)}
    return gates, [np.asarray(w) for w in model.get_weights()]


def assert_same(a, b):
    gates_a, weights_a = a
    gates_b, weights_b = b
    assert gates_a.keys() == gates_b.keys()
    for name in gates_a:
        np.testing.assert_array_equal(gates_a[name], gates_b[name], err_msg=name)
    assert len(weights_a) == len(weights_b)
    for wa, wb in zip(weights_a, weights_b):
        np.testing.assert_allclose(wa, wb, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def uninterrupted():
    model = fresh_gated()
    p = pruner()
    fit(model, [p])
    assert 0 < len(p.removed) and len(p.history) >= 2
    # Pruning was still under way when the interrupted runs stop.
    assert any(h["step"] > STOP_AFTER * 4 for h in p.history)
    assert any(h["step"] <= STOP_AFTER * 4 for h in p.history)
    return state_of(model), p


def test_backup_and_restore_resumes_mid_pruning(uninterrupted, tmp_path):
    expected, full = uninterrupted
    backup = str(tmp_path / "backup")
    model = fresh_gated()
    with pytest.raises(RuntimeError, match="killed"):
        fit(model, [keras.callbacks.BackupAndRestore(backup), pruner(), Interrupt()])
    partial = pruner()
    # A new model object and a new callback, as after a restart; the callback
    # comes first, before BackupAndRestore has restored anything.
    resumed = fresh_gated()
    fit(resumed, [partial, keras.callbacks.BackupAndRestore(backup)])
    assert_same(state_of(resumed), expected)
    assert set(partial.removed) == set(full.removed)
    assert partial.done == full.done


def test_keras_file_round_trip_mid_pruning_continues(uninterrupted, tmp_path):
    expected, full = uninterrupted
    model = fresh_gated()
    first = pruner()
    fit(model, [first], epochs=STOP_AFTER)
    assert 0 < len(first.removed) < len(full.removed)
    path = str(tmp_path / "gated.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)  # no custom_objects needed
    assert kt.is_gated(reloaded)
    second = pruner()
    fit(reloaded, [second], initial_epoch=STOP_AFTER)
    assert_same(state_of(reloaded), expected)
    assert set(second.removed) == set(full.removed)
    # The finished model prunes, and the pruned model loads with no custom objects.
    small = kt.prune(reloaded)
    small.save(str(tmp_path / "small.keras"))
    again = keras.saving.load_model(str(tmp_path / "small.keras"))
    assert not kt.is_gated(again)
    x = data()[0][:4]
    np.testing.assert_allclose(again(x), reloaded(x), rtol=1e-4, atol=1e-5)


def test_state_lives_in_the_gates(uninterrupted):
    """What makes both resumes work: the counters and EMA are model variables."""
    _, full = uninterrupted
    counters = full.scorer.counters()
    assert counters["events"] == len(full.history)
    assert counters["last_event"] == full.history[-1]["step"]
    np.testing.assert_allclose(full.scorer.read_ema(), full.ema, rtol=1e-6)
