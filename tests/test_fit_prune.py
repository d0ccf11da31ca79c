"""fit_prune: prune during fit, then fine-tune the pruned model with the
optimizer state sliced along."""

import keras
import numpy as np
import pytest
from conftest import images, make

import keras_taylor as kt
from keras_taylor import finetune as fp

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def data(n=32, seed=0):
    return images(n, seed), np.random.default_rng(seed + 1).integers(0, 5, n)


def gated_model(optimizer, seed=0, name="residual"):
    gated = kt.add_gates(make(name, seed))
    gated.compile(optimizer=optimizer, loss=LOSS, metrics=["accuracy"])
    return gated


def prune_some(gated, fraction=0.4, seed=0):
    """Sets the gates of a random subset of groups (never a whole layer) to 0."""
    graph = kt.analyze(gated)
    rng = np.random.default_rng(seed)
    removed = set(rng.choice(graph.num_groups, int(fraction * graph.num_groups), replace=False).tolist())
    for name, count in graph.layer_channel_counts(removed).items():
        assert count > 0, name
    for layer in kt.gates.gate_layers(gated):
        groups = graph.groups_of_layer_output(layer.name)
        layer.gate.assign(np.where(np.isin(groups, list(removed)), 0.0, layer.gate.numpy()).astype("float32"))
    return graph, removed


def slots_by_weight(model):
    """{(layer name, weight index): [slot variables]} in creation order."""
    refs = fp._slot_references(model.optimizer, model.trainable_variables)
    owners = fp._owners(model)
    out = {}
    for ref, j in refs:
        name, _, i = owners[id(ref)]
        out.setdefault((name, i), []).append(model.optimizer.variables[j])
    return out


@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adam"])
def test_slots_are_sliced_like_their_weights(optimizer):
    """Each slot is filled with a function of its weight; after slicing, the
    pruned slot must be the same function of the pruned weight (any other
    index choice would break it: the weights are random and distinct)."""
    opt = keras.optimizers.SGD(0.1, momentum=0.9) if optimizer == "sgd_momentum" else keras.optimizers.Adam(1e-3)
    gated = gated_model(opt)
    x, y = data()
    gated.fit(x, y, batch_size=8, epochs=1, verbose=0)
    old = slots_by_weight(gated)
    owners = fp._owners(gated)
    weight_of = {key: owners_inner.weights[key[1]] for v, (n, owners_inner, i) in owners.items() for key in [(n, i)]}
    for key, slots in old.items():
        w = weight_of[key].numpy()
        for k, slot in enumerate(slots):
            slot.assign(w * (3.0 + k) + 1.0)
    gated.optimizer.iterations.assign(17)
    graph, removed = prune_some(gated)
    pruned = kt.prune(gated)
    pruned.compile_from_config(gated.get_compile_config())
    fp.slice_optimizer_state(gated, pruned, graph, removed)
    new = slots_by_weight(pruned)
    assert len(new) == len(old) and sum(map(len, new.values())) == sum(map(len, old.values()))
    new_owners = fp._owners(pruned)
    shrunk = 0
    for v, (name, inner, i) in new_owners.items():
        if (name, i) not in new:
            continue
        w = inner.weights[i].numpy()
        shrunk += w.size < weight_of[(name, i)].numpy().size
        for k, slot in enumerate(new[(name, i)]):
            np.testing.assert_allclose(slot.numpy(), w * (3.0 + k) + 1.0, rtol=1e-6, err_msg=f"{name}[{i}] slot {k}")
    assert shrunk > 0
    assert int(pruned.optimizer.iterations.numpy()) == 17


def test_momentum_equals_original_at_kept_indices():
    gated = gated_model(keras.optimizers.SGD(0.1, momentum=0.9))
    x, y = data()
    gated.fit(x, y, batch_size=8, epochs=1, verbose=0)
    graph, removed = prune_some(gated, seed=1)
    pruned = kt.prune(gated)
    pruned.compile_from_config(gated.get_compile_config())
    fp.slice_optimizer_state(gated, pruned, graph, removed)
    old_slots, new_slots = slots_by_weight(gated), slots_by_weight(pruned)
    checked = 0
    for conv in pruned.layers:  # convs that lost output channels but no input channel
        if not isinstance(conv, keras.layers.Conv2D):
            continue
        old_kernel = gated.get_layer(conv.name).kernel
        if old_kernel.shape[2] != conv.kernel.shape[2] or old_kernel.shape[3] == conv.kernel.shape[3]:
            continue
        keep = np.flatnonzero(~np.isin(graph.groups_of_layer_output(conv.name), list(removed)))
        assert len(keep) == conv.kernel.shape[3]
        np.testing.assert_array_equal(new_slots[(conv.name, 0)][0].numpy(), old_slots[(conv.name, 0)][0].numpy()[..., keep])
        assert np.any(old_slots[(conv.name, 0)][0].numpy() != 0)  # a real, trained momentum
        checked += 1
    assert checked >= 1


def test_fit_prune_switches_to_the_small_model():
    gated = gated_model(keras.optimizers.SGD(0.05, momentum=0.9))
    full_params = gated.count_params()
    x, y = data(48)
    seen = []

    class Record(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            seen.append((epoch, id(self.model), sum(int(np.prod(v.shape)) for v in self.model.trainable_variables)))

    pruning = kt.TaylorPruning(target=0.5, prune_every=2, channels_per_step=4)
    small, history = kt.fit_prune(gated, x, y, batch_size=8, epochs=4, pruning=pruning, callbacks=[Record()], verbose=0)
    assert pruning.done
    assert len(history.history["loss"]) == 4 and history.epoch == [0, 1, 2, 3]
    assert [e for e, _, _ in seen] == [0, 1, 2, 3]
    switched = [e for e, m, _ in seen if m == id(small)]
    assert switched and switched == list(range(switched[0], 4)) and switched[0] >= 1
    big = [p for _, m, p in seen if m != id(small)][0]
    assert all(p < big for _, m, p in seen if m == id(small))  # the continuation trains fewer weights
    assert not kt.is_gated(small) and small.count_params() < full_params
    assert history.history["kt_flops"][-1] <= 0.5 + 1e-9  # carried into the pruned phase
    steps_per_epoch = 6
    assert int(small.optimizer.iterations.numpy()) == 4 * steps_per_epoch  # every minibatch trained once
    # the continuation trained: the pruned model no longer equals the gated one at the switch
    assert np.isfinite(history.history["loss"]).all()


@keras.saving.register_keras_serializable(package="test_fit_prune")
class Examples(keras.metrics.Metric):
    """Counts the examples seen since the last reset (an exact check of which
    minibatches an epoch's metrics cover)."""

    def __init__(self, name="examples", **kwargs):
        super().__init__(name=name, **kwargs)
        self.count = self.add_variable(shape=(), initializer="zeros", name="count")

    def update_state(self, y_true, y_pred, sample_weight=None):
        self.count.assign_add(keras.ops.cast(keras.ops.shape(y_pred)[0], "float32"))

    def result(self):
        return self.count * 1.0  # a value, not the variable (read after validation runs)


class BatchLog(keras.callbacks.Callback):
    """(epoch, batch, id of the model the callback holds, trainable size, logs) per minibatch."""

    def __init__(self):
        super().__init__()
        self.rows, self.begins, self.epoch = [], 0, 0

    def on_train_begin(self, logs=None):
        self.begins += 1

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        size = sum(int(np.prod(v.shape)) for v in self.model.trainable_variables)
        self.rows.append((self.epoch, batch, id(self.model), size, {k: float(v) for k, v in logs.items()}))


def test_switch_step_continues_the_same_epoch_on_the_pruned_model():
    """The target is reached at minibatch 2 of epoch 0: minibatches 3-6 of that
    epoch train the pruned model (same fit, same data order), every minibatch
    is trained once, and the epoch's metrics cover all 48 examples."""
    gated = kt.add_gates(make("residual", 0))
    gated.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss=LOSS, metrics=["accuracy", Examples()])
    x, y = data(48)
    pruning = kt.TaylorPruning(target=0.7, prune_every=2, channels_per_step=50)
    log = BatchLog()
    small, history = kt.fit_prune(gated, x, y, batch_size=8, epochs=3, pruning=pruning, callbacks=[log],
                                  validation_data=(x[:16], y[:16]), verbose=0)
    assert pruning.done and pruning.history[0]["step"] == 2
    assert history.switched_at == (0, 2)
    assert log.begins == 1 and history.epoch == [0, 1, 2]  # one fit
    assert int(small.optimizer.iterations.numpy()) == 3 * 6  # every minibatch trained once
    models = [m for _, _, m, _, _ in log.rows]
    assert models[:2] == [id(gated)] * 2 and models[2:] == [id(small)] * 16
    big, pruned_size = log.rows[0][3], log.rows[2][3]
    assert pruned_size < big
    # Running metrics continue across the switch: minibatch 3 of epoch 0 has seen 24 examples.
    assert [r[4]["examples"] for r in log.rows[:6]] == [8, 16, 24, 32, 40, 48]
    assert history.history["examples"] == [48.0, 48.0, 48.0]
    assert history.history["val_examples"] == [16.0, 16.0, 16.0]
    # Validation after the switch evaluates the pruned model.
    final = small.evaluate(x[:16], y[:16], batch_size=8, verbose=0, return_dict=True)
    np.testing.assert_allclose(history.history["val_loss"][-1], final["loss"], rtol=1e-5)
    assert history.history["kt_flops"][-1] <= 0.7 + 1e-9
    # The gated model gets its own functions back.
    assert gated.train_function is not small.train_function and gated.test_function is not small.test_function


def test_switch_epoch_finishes_the_epoch_on_the_gated_model():
    gated = gated_model(keras.optimizers.SGD(0.05, momentum=0.9))
    x, y = data(48)
    pruning = kt.TaylorPruning(target=0.7, prune_every=2, channels_per_step=50)
    log = BatchLog()
    small, history = kt.fit_prune(gated, x, y, batch_size=8, epochs=3, pruning=pruning, callbacks=[log],
                                  switch="epoch", verbose=0)
    assert history.switched_at == (0, 6) and log.begins == 1
    models = [m for _, _, m, _, _ in log.rows]
    assert models[:6] == [id(gated)] * 6 and models[6:] == [id(small)] * 12
    assert int(small.optimizer.iterations.numpy()) == 18


class Batches(keras.utils.PyDataset):
    """Training data fit_prune cannot peek at (no example to build metrics on)."""

    def __init__(self, x, y, batch_size):
        super().__init__()
        self.x, self.y, self.batch_size = x, y, batch_size

    def __len__(self):
        return len(self.x) // self.batch_size

    def __getitem__(self, i):
        s = slice(i * self.batch_size, (i + 1) * self.batch_size)
        return self.x[s], self.y[s]


def test_switch_epoch_metrics_without_an_example_and_early_stopping():
    """With a PyDataset the pruned model's metrics are built by its first
    minibatch: the epoch's states are then added to them (epoch figures still
    cover all 48 examples). EarlyStopping(restore_best_weights) holding the
    gated model's weights does not break the pruned model."""
    gated = kt.add_gates(make("residual", 0))
    gated.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss=LOSS, metrics=[Examples()])
    x, y = data(48)
    pruning = kt.TaylorPruning(target=0.7, prune_every=8, channels_per_step=50)
    stop = keras.callbacks.EarlyStopping(monitor="loss", patience=0, min_delta=10.0, restore_best_weights=True)
    small, history = kt.fit_prune(gated, Batches(x, y, 8), epochs=3, pruning=pruning, callbacks=[stop], verbose=0)
    assert history.switched_at == (1, 2)  # after EarlyStopping kept the gated model's weights of epoch 0
    assert history.history["examples"] == [48.0, 48.0]
    assert history.epoch == [0, 1]  # patience 0 with an unreachable min_delta: stopped after epoch 1, not restarted
    assert small.count_params() < gated.count_params()


def test_a_callback_stopping_the_pruned_model_stops_fit():
    class StopAfter(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                self.model.stop_training = True

    gated = gated_model(keras.optimizers.SGD(0.05, momentum=0.9))
    x, y = data(48)
    pruning = kt.TaylorPruning(target=0.7, prune_every=2, channels_per_step=50)
    small, history = kt.fit_prune(gated, x, y, batch_size=8, epochs=5, pruning=pruning, callbacks=[StopAfter()], verbose=0)
    assert history.epoch == [0, 1]
    assert int(small.optimizer.iterations.numpy()) == 12


def test_scoring_step_is_traced_once(monkeypatch):
    """The optimizer and the compiled metrics are built before the first step:
    variables created inside it would make TensorFlow trace the step twice."""
    from keras_taylor import scoring

    traced = []
    original = scoring.TaylorScorer.train_step

    def counting(self, data):
        traced.append(1)  # Python runs only while TensorFlow traces
        return original(self, data)

    monkeypatch.setattr(scoring.TaylorScorer, "train_step", counting)
    gated = gated_model(keras.optimizers.SGD(0.05, momentum=0.9))  # "accuracy": built lazily by Keras
    x, y = data(48)
    pruning = kt.TaylorPruning(target=0.7, prune_every=2, channels_per_step=50)
    kt.fit_prune(gated, x, y, batch_size=8, epochs=2, pruning=pruning, verbose=0)
    assert len(traced) == 1


def test_bad_arguments_raise_before_training():
    x, y = data()
    gated = gated_model(keras.optimizers.SGD(0.1))
    before = [v.numpy().copy() for v in gated.variables]
    pruning = kt.TaylorPruning(target=0.5)
    with pytest.raises(ValueError, match="gated model"):
        kt.fit_prune(make("residual", 0), x, y, pruning=pruning)
    with pytest.raises(ValueError, match="TaylorPruning"):
        kt.fit_prune(gated, x, y, pruning="taylor")
    with pytest.raises(ValueError, match="epochs"):
        kt.fit_prune(gated, x, y, pruning=pruning, epochs=0)
    with pytest.raises(ValueError, match="switch"):
        kt.fit_prune(gated, x, y, pruning=pruning, switch="batch")
    with pytest.raises(ValueError, match="initial_epoch"):
        kt.fit_prune(gated, x, y, pruning=pruning, initial_epoch=1)
    with pytest.raises(ValueError, match="pruning="):
        kt.fit_prune(gated, x, y, pruning=pruning, callbacks=[pruning])
    uncompiled = kt.add_gates(make("residual", 0))
    with pytest.raises(ValueError, match="compiled"):
        kt.fit_prune(uncompiled, x, y, pruning=pruning)
    for a, b in zip(before, gated.variables):
        np.testing.assert_array_equal(a, b.numpy())
