import keras
import numpy as np
import pytest
from keras import layers

import keras_taylor as kt
from conftest import make


def test_fixed_channels_and_reasons():
    graph = kt.analyze(make("plain"))
    # Logits reach the output; input channels come from the input.
    assert (graph.groups_of_layer_output("out") < 0).all()
    reasons = " ".join(graph.fixed_reason.values())
    assert "model input" in reasons and "model output" in reasons
    assert graph.num_groups == 8 + 6 + 8 + 8


def test_sigmoid_after_gate_freezes_channels():
    inputs = keras.Input((8, 8, 2))
    x = layers.Conv2D(4, 3, name="c")(inputs)
    x = layers.BatchNormalization(name="bn")(x)
    x = layers.Activation("sigmoid", name="sig")(x)
    x = layers.Conv2D(3, 3, name="c2")(x)
    x = layers.ReLU()(x)
    x = layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, layers.Dense(2)(x))
    graph = kt.analyze(model)
    assert (graph.groups_of_layer_output("bn") < 0).all()
    assert (graph.groups_of_layer_output("c2") >= 0).all()
    assert any("sigmoid" in r for r in graph.fixed_reason.values())


def _with(layer):
    inputs = keras.Input((8, 8, 2))
    x = layers.Conv2D(4, 3, name="conv")(inputs)
    x = layer(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(2)(x), name="m")


@keras.saving.register_keras_serializable(package="test")
class Twice(layers.Layer):
    def call(self, x):
        return x * 2.0


def test_unknown_layer_on_pruned_path_is_a_clear_error_and_model_untouched():
    model = _with(Twice(name="twice"))
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(ValueError, match=r"Layer 'twice' of class Twice .*register_handler"):
        kt.add_gates(model)
    with pytest.raises(ValueError, match=r"'twice' of class Twice"):
        kt.apply_plan(model, kt.PruningPlan(removed={"conv": [0]}))
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    # Freezing keeps the channels that flow into it.
    graph = kt.analyze(model, on_unknown="freeze")
    assert graph.num_groups == 0


def test_lambda_layer_is_refused():
    model = _with(layers.Lambda(lambda t: t * 2.0, name="lam"))
    with pytest.raises(ValueError, match=r"'lam' of class Lambda"):
        kt.add_gates(model)


def test_subclassed_model_is_refused():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.c = layers.Conv2D(4, 3)

        def call(self, x):
            return self.c(x)

    net = Net()
    net(np.zeros((1, 8, 8, 2), "float32"))
    with pytest.raises(ValueError, match="subclassed model"):
        kt.add_gates(net)


def test_register_handler_makes_a_custom_layer_prunable():
    class TwiceHandler(kt.LayerHandler):
        pass  # weightless, channel-wise, zero-preserving: the defaults

    kt.register_handler(Twice, TwiceHandler())
    try:
        model = _with(Twice(name="twice"))
        gated = kt.add_gates(model)
        graph = kt.analyze(gated)
        assert graph.num_groups == 4
        pruned = kt.apply_plan(model, kt.PruningPlan(removed={"conv": [0, 3]}))
        assert pruned.get_layer("conv").filters == 2
        x = np.random.default_rng(0).normal(size=(2, 8, 8, 2)).astype("float32")
        gated.get_layer("conv").gate.assign(np.array([0, 1, 1, 0], "float32"))
        np.testing.assert_allclose(pruned(x), gated(x), rtol=1e-5, atol=1e-6)
    finally:
        from keras_taylor import handlers

        handlers._REGISTRY[:] = [(c, h) for c, h in handlers._REGISTRY if c is not Twice]
    with pytest.raises(TypeError, match="LayerHandler"):
        kt.register_handler(Twice, object())


def test_shared_layer_calls_are_tied():
    inputs = keras.Input((8, 8, 2))
    conv = layers.Conv2D(4, 3, padding="same", name="shared")
    a = conv(inputs)
    b = conv(layers.ReLU()(inputs))
    x = layers.Add()([a, b])
    x = layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, layers.Dense(2)(x))
    graph = kt.analyze(model)
    assert graph.num_groups == 4
    assert graph.gate_sites == ["shared"]
