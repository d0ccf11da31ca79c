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


def test_fit_prune_switch_step_stops_mid_epoch():
    gated = gated_model(keras.optimizers.SGD(0.05, momentum=0.9))
    x, y = data(48)
    pruning = kt.TaylorPruning(target=0.7, prune_every=2, channels_per_step=50)
    small, history = kt.fit_prune(gated, x, y, batch_size=8, epochs=3, pruning=pruning, switch="step", verbose=0)
    assert pruning.done and len(history.history["loss"]) == 3
    # the target was reached at the first pruning step (minibatch 2): 2 of epoch 0's 6, then 2 epochs of 6
    assert pruning.history[0]["step"] == 2
    assert int(small.optimizer.iterations.numpy()) == 2 + 2 * 6


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
