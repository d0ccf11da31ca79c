import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_taylor as kt
from conftest import images, make, rel_err


def test_add_gates_is_a_copy_with_same_function(factory):
    model = make(factory)
    before = [w.copy() for w in model.get_weights()]
    gated = kt.add_gates(model)
    assert gated is not model and not kt.is_gated(model) and kt.is_gated(gated)
    x = images(4)
    assert rel_err(gated(x), model(x)) <= 1e-6
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    # Training-mode forward too (BN batch statistics through the gate); dropout
    # draws differ between copies, so only for models without it.
    if not any(isinstance(l, keras.layers.Dropout) for l in model.layers):
        assert rel_err(gated(x, training=True), model(x, training=True)) <= 1e-5
    # Gated model's weights are copies, not shared variables.
    ids = {id(v) for v in model.weights}
    assert not any(id(v) in ids for v in gated.weights)


def test_gate_sites_follow_cvpr19_placement():
    model = make("plain")
    gated = kt.add_gates(model)
    sites = {l.name: l.mode for l in gated.layers if isinstance(l, kt.ChannelGate)}
    # c1 -> b1: gate after BN; c2 has no BN: gate on the conv; out: logits, never gated.
    assert sites == {"b1": "params", "c2": "params", "b3": "params", "fc": "params"}


def test_zero_gate_zeros_the_channel_in_training_and_inference():
    model = make("plain")
    gated = kt.add_gates(model)
    b1 = gated.get_layer("b1")
    b1.gate.assign(np.array([1, 0, 1, 1, 1, 1, 0, 1], "float32"))
    probe = keras.Model(gated.inputs, b1.output)
    x = images(4)
    for training in (False, True):
        y = probe(x, training=training).numpy()
        assert np.all(y[..., 1] == 0) and np.all(y[..., 6] == 0)
        assert np.any(y[..., 0] != 0)


def test_moving_statistics_update_through_the_gate():
    model = make("plain")
    gated = kt.add_gates(model)
    bn = gated.get_layer("b1").layer
    before = bn.moving_mean.numpy().copy()
    gated(images(8), training=True)
    assert not np.allclose(before, bn.moving_mean.numpy())


def test_gate_adds_no_activation_sized_op():
    """The gate scales parameters: the traced graph has no extra op on activations."""
    model = make("plain")
    gated = kt.add_gates(model)

    def activation_muls(m):
        fn = tf.function(lambda x: m(x, training=True))
        graph = fn.get_concrete_function(tf.TensorSpec((8, 16, 16, 3))).graph
        count = 0
        for op in graph.get_operations():
            shape = op.outputs[0].shape if op.outputs else None
            # Activation-sized: carries the batch dimension (8); kernels do not.
            if op.type == "Mul" and shape is not None and shape.rank == 4 and shape[0] == 8:
                count += 1
        return count

    assert activation_muls(gated) == activation_muls(model)


def test_output_mode_gate_for_bn_without_scale():
    inputs = keras.Input((8, 8, 2))
    x = keras.layers.Conv2D(4, 3, name="c")(inputs)
    x = keras.layers.BatchNormalization(scale=False, name="bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(2, name="o")(x))
    gated = kt.add_gates(model)
    assert gated.get_layer("bn").mode == "output"
    gated.get_layer("bn").gate.assign(np.array([1, 0, 1, 1], "float32"))
    with pytest.raises(ValueError, match="multiplies the layer's output"):
        kt.strip_gates(gated)
    pruned = kt.prune(gated)
    x = images(3, shape=(8, 8, 2))
    assert rel_err(pruned(x), gated(x)) <= 1e-5


def test_strip_gates_folds_gates():
    model = make("residual")
    gated = kt.add_gates(model)
    for layer in gated.layers:
        if isinstance(layer, kt.ChannelGate):
            g = np.ones(layer.channels, "float32")
            g[0] = 0.0
            layer.gate.assign(g)
    stripped = kt.strip_gates(gated)
    assert not kt.is_gated(stripped)
    x = images(4)
    assert rel_err(stripped(x), gated(x)) <= 1e-6


def test_channel_gate_config_round_trip():
    layer = kt.ChannelGate(keras.layers.BatchNormalization(name="bn"), name="bn")
    layer.build((None, 4, 4, 3))
    config = layer.get_config()
    again = kt.ChannelGate.from_config(config)
    assert again.name == "bn" and again.layer.name == "bn" and again.mode == "params"
    assert isinstance(again.layer, keras.layers.BatchNormalization)
    with pytest.raises(ValueError, match="Received: layer='d' of class Dropout"):
        kt.ChannelGate(keras.layers.Dropout(0.1, name="d"))


def test_gated_model_keras_round_trip_keeps_zero_gates(tmp_path):
    gated = kt.add_gates(make("residual"))
    layer = next(l for l in gated.layers if isinstance(l, kt.ChannelGate))
    g = np.ones(layer.channels, "float32")
    g[1] = 0
    layer.gate.assign(g)
    path = str(tmp_path / "gated.keras")
    gated.save(path)
    again = keras.models.load_model(path)
    np.testing.assert_array_equal(kt.gate_values(again)[layer.name], g)
    x = images(3)
    np.testing.assert_allclose(again(x), gated(x), rtol=1e-6, atol=1e-6)


def test_add_gates_refuses_gated_model():
    gated = kt.add_gates(make("plain"))
    with pytest.raises(ValueError, match="already holds ChannelGate"):
        kt.add_gates(gated)


def test_setting_trainable_on_a_gate_reaches_the_wrapped_layer():
    model = make("plain")
    for layer in model.layers:
        layer.trainable = False
    gated = kt.add_gates(model)
    gates = [l for l in gated.layers if isinstance(l, kt.ChannelGate)]
    assert not any(g.trainable for g in gates)
    for g in gates:
        g.trainable = True
    assert all(g.layer.trainable for g in gates)
    # BN gamma/beta and conv kernels train again; gates and pruning state never do.
    names = {v.path for v in gated.trainable_weights}
    assert names and not any(v.path.endswith(("/gate", "/score", "/ema", "/counters")) for v in gated.trainable_weights)
