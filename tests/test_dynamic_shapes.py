"""Models whose input leaves height/width unknown (`keras.Input((None, None, 3))`,
KerasHub's default): they gate, score, prune and report FLOPs at a given or
observed input size, and fail with a clear ValueError when none is known."""

import keras
import numpy as np
import pytest
from keras import layers

import keras_taylor as kt
from tests.conftest import randomize_bn


def dynamic_cnn(shape=(None, None, 3)):
    inputs = keras.Input(shape, name="img")
    x = layers.Conv2D(8, 3, padding="same", name="c1")(inputs)
    x = layers.BatchNormalization(name="b1")(x)
    x = layers.ReLU(name="r1")(x)
    y = layers.Conv2D(8, 3, strides=2, padding="same", name="c2")(x)
    y = layers.BatchNormalization(name="b2")(y)
    y = layers.ReLU(name="r2")(y)
    y = layers.DepthwiseConv2D(3, padding="same", name="dw")(y)
    y = layers.Conv2D(6, 1, name="c3")(y)
    y = layers.GlobalAveragePooling2D(name="gap")(y)
    outputs = layers.Dense(4, name="out")(y)
    return randomize_bn(keras.Model(inputs, outputs, name="dyn"))


def test_profile_without_size_is_a_clear_value_error():
    model = dynamic_cnn()
    with pytest.raises(ValueError, match=r"'c1'.*spatial size.*input_shape="):
        kt.profile(model)


@pytest.mark.parametrize("size", [(16, 16), (12, 20)])
def test_profile_at_a_size_equals_the_static_model(size):
    dyn = dynamic_cnn()
    static = dynamic_cnn((*size, 3))
    p_dyn = kt.profile(dyn, input_shape=(*size, 3))
    p_static = kt.profile(static)
    assert p_dyn.flops == p_static.flops > 0
    assert p_dyn.params == p_static.params == dyn.count_params()
    assert p_dyn.input_shapes == [(*size, 3)]
    assert f"(input ({size[0]}, {size[1]}, 3))" in p_dyn.table()


@pytest.mark.parametrize("bad", [(16, 16), (16, 16, 4), (0, 16, 3), (16.0, 16, 3), [(16, 16, 3), (16, 16, 3)], "16"])
def test_profile_refuses_a_size_that_does_not_fit(bad):
    with pytest.raises(ValueError, match="input_shape"):
        kt.profile(dynamic_cnn(), input_shape=bad)


def test_gates_and_surgery_at_any_size_then_flops_at_a_size():
    model = dynamic_cnn()
    gated = kt.add_gates(model)
    graph = kt.analyze(gated)
    removed = list(range(0, graph.num_groups, 3))
    # Zero the removed groups' gates, prune, compare at two sizes.
    for layer in kt.gates.gate_layers(gated):
        g = graph.groups_of_layer_output(layer.name)
        layer.gate.assign(np.where(np.isin(g, removed) & (g >= 0), 0.0, 1.0).astype("float32"))
    pruned = kt.prune(gated)
    for size in ((16, 16), (9, 13)):
        x = np.random.default_rng(0).normal(size=(2, *size, 3)).astype("float32")
        np.testing.assert_allclose(pruned.predict(x, verbose=0), gated.predict(x, verbose=0), rtol=1e-5, atol=1e-5)
        before = kt.profile(model, input_shape=(*size, 3)).flops
        assert kt.profile(pruned, input_shape=(*size, 3)).flops < before
        assert kt.profile(gated, input_shape=(*size, 3)).flops == kt.profile(pruned, input_shape=(*size, 3)).flops


def _data(n=32, size=(16, 16)):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, *size, 3)).astype("float32"), rng.integers(0, 4, n)


def _fit(gated, cb, x, y):
    gated.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    gated.fit(x, y, batch_size=8, epochs=1, callbacks=[cb], verbose=0)


@pytest.mark.parametrize("metric", ["flops", "params", "channels"])
def test_taylor_pruning_takes_the_size_of_the_first_batch(metric):
    gated = kt.add_gates(dynamic_cnn())
    x, y = _data(size=(12, 12))
    cb = kt.TaylorPruning(target=0.7, metric=metric, prune_every=1, channels_per_step=2)
    _fit(gated, cb, x, y)
    assert cb.input_shapes == [(12, 12, 3)]
    assert cb.history, "no pruning step ran"
    want = kt.profile(gated, input_shape=(12, 12, 3)).flops / kt.profile(dynamic_cnn(), input_shape=(12, 12, 3)).flops
    assert cb.history[-1]["flops_fraction"] == pytest.approx(want)


def test_taylor_pruning_input_shape_argument_wins():
    gated = kt.add_gates(dynamic_cnn())
    x, y = _data(size=(12, 12))
    cb = kt.TaylorPruning(target=0.7, prune_every=1, channels_per_step=2, input_shape=(32, 32, 3))
    _fit(gated, cb, x, y)
    assert cb.input_shapes == [(32, 32, 3)]
    want = kt.profile(gated, input_shape=(32, 32, 3)).flops / kt.profile(dynamic_cnn(), input_shape=(32, 32, 3)).flops
    assert cb.history[-1]["flops_fraction"] == pytest.approx(want)


def test_taylor_pruning_with_data_of_unknown_size_is_a_clear_error():
    import tensorflow as tf

    gated = kt.add_gates(dynamic_cnn())
    x, y = _data(size=(12, 12))
    ds = tf.data.Dataset.from_generator(
        lambda: iter([(x[:8], y[:8])] * 4),
        output_signature=(tf.TensorSpec((None, None, None, 3), tf.float32), tf.TensorSpec((None,), tf.int64)),
    )
    gated.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    cb = kt.TaylorPruning(target=0.7, prune_every=1)
    with pytest.raises(ValueError, match=r"input size.*input_shape=\(H, W, C\)"):
        gated.fit(ds, epochs=1, callbacks=[cb], verbose=0)


def test_taylor_pruning_refuses_a_malformed_input_shape():
    with pytest.raises(ValueError, match="input_shape"):
        kt.TaylorPruning(input_shape=16)
    gated = kt.add_gates(dynamic_cnn())
    x, y = _data()
    cb = kt.TaylorPruning(input_shape=(16, 16, 5))
    gated.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    weights = [w.copy() for w in gated.get_weights()]
    with pytest.raises(ValueError, match="input_shape"):
        gated.fit(x, y, batch_size=8, epochs=1, callbacks=[cb], verbose=0)
    for a, b in zip(weights, gated.get_weights()):
        np.testing.assert_array_equal(a, b)  # refused before any training step
