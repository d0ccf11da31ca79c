"""Tests for the per-layer channel rules of `keras_taylor.handlers`.

Each handler is checked on one tiny built layer: how it maps channel ids
(`propagate`), how it slices config and weights (`slice`, against the layer
Keras builds from the sliced config), and what it costs (`params` against
`count_params()`, `macs` against the textbook count). Then the
`register_handler` contract.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

import keras_taylor as kt
from keras_taylor import handlers
from keras_taylor.handlers import Cost, LayerHandler, get_handler, register_handler


class RecordingContext(handlers.AnalysisContext):
    """An `AnalysisContext` that hands out fresh ids and records ties."""

    def __init__(self, start: int = 1000):
        self.next = start
        self.ties = []
        self.fixed = []

    def new_ids(self, n):
        ids = np.arange(self.next, self.next + n)
        self.next += n
        return ids

    def tie(self, a, b):
        self.ties.append((np.asarray(a).copy(), np.asarray(b).copy()))

    def fix(self, ids, reason):
        self.fixed.append((np.asarray(ids).copy(), reason))


def _built(layer, in_shape):
    y = layer(keras.Input(in_shape))
    return layer, (None, *in_shape), tuple(y.shape)


def _rebuild(layer, config, weights, in_shape):
    """The layer Keras makes from a sliced config, loaded with the sliced weights."""
    clone = type(layer).from_config(config)
    clone(keras.Input(in_shape))
    clone.set_weights(weights)
    return clone


def _slice(layer, kept_in, kept_out):
    handler = get_handler(layer)
    return handler.slice(
        layer, layer.get_config(), [np.asarray(w) for w in layer.get_weights()],
        [np.asarray(kept_in)], [np.asarray(kept_out)],
    )


def test_conv_rules():
    keras.utils.set_random_seed(0)
    layer, in_shape, out_shape = _built(keras.layers.Conv2D(6, 3, name="conv"), (9, 9, 4))
    handler = get_handler(layer)
    assert isinstance(handler, handlers.ConvHandler) and handler.creates_channels
    ctx = RecordingContext()
    (out_map,) = handler.propagate(layer, [np.arange(4)], [in_shape], [out_shape], ctx)
    assert out_map.tolist() == list(range(1000, 1006)) and not ctx.ties  # new channels
    assert handler.mixes_inputs(layer, [in_shape]) and handler.gate_needed(layer)

    kept_in, kept_out = [0, 2, 3], [1, 4]
    config, weights = _slice(layer, kept_in, kept_out)
    assert config["filters"] == 2
    np.testing.assert_array_equal(weights[0], layer.kernel.numpy()[:, :, kept_in][..., kept_out])
    np.testing.assert_array_equal(weights[1], layer.bias.numpy()[kept_out])
    small = _rebuild(layer, config, weights, (9, 9, 3))
    x = np.random.default_rng(0).normal(size=(2, 9, 9, 4)).astype("float32")
    x[..., 1] = 0.0  # a removed input channel is zero in the gated model
    np.testing.assert_allclose(small(x[..., kept_in]), layer(x).numpy()[..., kept_out], rtol=1e-5, atol=1e-5)

    # 7x7 outputs x 3x3 kernel MACs per (input, output) channel pair; params = 9*cin*cout + cout.
    assert handler.macs(layer, [in_shape], [out_shape]).total(4, 6) == 7 * 7 * 9 * 4 * 6
    assert handler.params(layer, [in_shape], [out_shape]).total(4, 6) == layer.count_params()
    assert handler.params(layer, [in_shape], [out_shape]).total(3, 2) == small.count_params()


def test_grouped_conv_ties_channel_j_of_every_group():
    layer, in_shape, out_shape = _built(keras.layers.Conv2D(4, 1, groups=2), (5, 5, 6))
    handler = get_handler(layer)
    ctx = RecordingContext()
    (out_map,) = handler.propagate(layer, [np.arange(6)], [in_shape], [out_shape], ctx)
    # Inputs: channel j of group 0 tied to channel j of group 1.
    assert [(a.tolist(), b.tolist()) for a, b in ctx.ties] == [([0, 1, 2], [3, 4, 5])]
    # Outputs: 2 fresh ids, repeated per group (output j of every group is one group).
    assert out_map.tolist() == [1000, 1001, 1000, 1001]
    config, weights = _slice(layer, [0, 2, 3, 5], [1, 3])
    assert config["filters"] == 2 and config["groups"] == 2
    assert weights[0].shape == (1, 1, 2, 2)
    assert handler.params(layer, [in_shape], [out_shape]).total(6, 4) == layer.count_params()


def test_dense_rules():
    layer, in_shape, out_shape = _built(keras.layers.Dense(5, activation="sigmoid"), (7,))
    handler = get_handler(layer)
    assert isinstance(handler, handlers.DenseHandler)
    assert "sigmoid" in handler.lifts_zero(layer, [in_shape])  # f(0) != 0
    config, weights = _slice(layer, [1, 6], [0, 4])
    assert config["units"] == 2
    np.testing.assert_array_equal(weights[0], layer.kernel.numpy()[[1, 6]][:, [0, 4]])
    assert handler.params(layer, [in_shape], [out_shape]).total(7, 5) == layer.count_params()
    assert handler.macs(layer, [in_shape], [out_shape]).total(7, 5) == 35
    relu = _built(keras.layers.Dense(5, activation="relu"), (7,))[0]
    assert handler.lifts_zero(relu, [in_shape]) is None


def test_depthwise_rules():
    layer, in_shape, out_shape = _built(keras.layers.DepthwiseConv2D(3, depth_multiplier=2), (6, 6, 3))
    handler = get_handler(layer)
    assert not handler.creates_channels
    (out_map,) = handler.propagate(layer, [np.array([7, 8, 9])], [in_shape], [out_shape], RecordingContext())
    assert out_map.tolist() == [7, 7, 8, 8, 9, 9]  # output c*dm + k comes from input c
    config, weights = _slice(layer, [0, 2], [0, 1, 4, 5])
    assert weights[0].shape == (3, 3, 2, 2)
    np.testing.assert_array_equal(weights[1], layer.bias.numpy()[[0, 1, 4, 5]])
    assert config["depth_multiplier"] == 2
    assert handler.params(layer, [in_shape], [out_shape]).total(3, 6) == layer.count_params()


def test_separable_and_transpose_params_match_keras():
    for layer, shape in (
        (keras.layers.SeparableConv2D(5, 3, depth_multiplier=2), (8, 8, 3)),
        (keras.layers.Conv2DTranspose(5, 3), (8, 8, 3)),
    ):
        layer, in_shape, out_shape = _built(layer, shape)
        handler = get_handler(layer)
        assert handler.creates_channels
        assert handler.params(layer, [in_shape], [out_shape]).total(3, 5) == layer.count_params()
        config, weights = _slice(layer, [0, 2], [1, 3, 4])
        small = _rebuild(layer, config, weights, shape[:-1] + (2,))
        assert handler.params(layer, [in_shape], [out_shape]).total(2, 3) == small.count_params()


def test_batchnorm_rules():
    layer, in_shape, out_shape = _built(keras.layers.BatchNormalization(), (4, 4, 5))
    handler = get_handler(layer)
    assert handler.needs_gate and handler.gate_needed(layer)
    assert [v.name for v in handler.gate_variables(layer)] == ["gamma", "beta"]
    config, weights = _slice(layer, [0, 1, 2, 3, 4], [0, 3])
    assert [w.shape for w in weights] == [(2,)] * 4
    assert handler.params(layer, [in_shape], [out_shape]).total(5, 5) == layer.count_params() == 20
    no_scale, _, _ = _built(keras.layers.BatchNormalization(scale=False), (4, 4, 5))
    assert handler.gate_variables(no_scale) == []  # the gate must multiply the output


def test_weightless_layers_pass_channels_through():
    for layer in (keras.layers.ReLU(), keras.layers.MaxPooling2D(), keras.layers.Dropout(0.1)):
        layer, in_shape, out_shape = _built(layer, (4, 4, 3))
        handler = get_handler(layer)
        ids = np.array([5, 6, 7])
        (out_map,) = handler.propagate(layer, [ids], [in_shape], [out_shape], RecordingContext())
        assert out_map is ids
        assert handler.params(layer, [in_shape], [out_shape]) == Cost()
        assert not handler.creates_channels and not handler.gate_needed(layer)


def test_add_ties_its_inputs():
    inputs = [keras.Input((4, 4, 3)), keras.Input((4, 4, 3))]
    layer = keras.layers.Add()
    layer(inputs)
    handler = get_handler(layer)
    ctx = RecordingContext()
    a, b = np.array([1, 2, 3]), np.array([4, 5, 6])
    handler.propagate(layer, [a, b], [(None, 4, 4, 3)] * 2, [(None, 4, 4, 3)], ctx)
    tied = {tuple(zip(x.tolist(), y.tolist())) for x, y in ctx.ties}
    assert tied == {((1, 4), (2, 5), (3, 6))}


# ---- register_handler -----------------------------------------------------------

class ScaleChannels(keras.layers.Layer):
    """y = x * w, one weight per channel (the docstring's example)."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1],), initializer="ones")

    def call(self, x):
        return x * self.w


class ScaleHandler(LayerHandler):
    def slice(self, layer, config, weights, kept_in, kept_out):
        return config, [weights[0][kept_out[0]]]

    def params(self, layer, in_shapes, out_shapes):
        return Cost(b=1.0)


@pytest.fixture
def registry(monkeypatch):
    """A copy of the registry, restored after the test."""
    monkeypatch.setattr(handlers, "_REGISTRY", list(handlers._REGISTRY))


def _model_with_scale():
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = ScaleChannels(name="scale")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(2)(x))


def test_register_handler_contract(registry):
    with pytest.raises(TypeError, match="layer_class"):
        register_handler("Conv2D", ScaleHandler())
    with pytest.raises(TypeError, match="layer_class"):
        register_handler(int, ScaleHandler())
    with pytest.raises(TypeError, match="LayerHandler instance"):
        register_handler(ScaleChannels, ScaleHandler)  # the class, not an instance

    model = _model_with_scale()
    assert get_handler(model.get_layer("scale")) is None
    with pytest.raises(ValueError, match="scale"):
        kt.analyze(model)  # an unknown layer on a prunable path is refused, by name

    handler = ScaleHandler()
    register_handler(ScaleChannels, handler)
    assert get_handler(model.get_layer("scale")) is handler
    graph = kt.analyze(model)
    assert graph.num_groups == 4
    assert kt.profile(model).params == model.count_params()


def test_newest_registration_wins_for_subclasses(registry):
    class MyDense(keras.layers.Dense):
        pass

    layer = _built(MyDense(3), (4,))[0]
    assert isinstance(get_handler(layer), handlers.DenseHandler)  # the base class's rule applies
    special = handlers.DenseHandler()
    register_handler(MyDense, special)
    assert get_handler(layer) is special
    assert get_handler(_built(keras.layers.Dense(3), (4,))[0]) is not special


def test_conv_subclass_needs_its_own_registration(registry):
    # Conv rules apply to the exact Conv1D/2D/3D classes only (transposed,
    # depthwise and separable convs subclass them with other kernel layouts);
    # a user's Conv2D subclass gets them once registered for its own class.
    class MyConv(keras.layers.Conv2D):
        pass

    layer = _built(MyConv(3, 1), (4, 4, 2))[0]
    assert get_handler(layer) is None
    special = handlers.ConvHandler()
    register_handler(MyConv, special)
    assert get_handler(layer) is special
    assert get_handler(_built(keras.layers.Conv2D(3, 1), (4, 4, 2))[0]) is not special


def test_activation_name():
    assert handlers.activation_name(None) == "linear"
    assert handlers.activation_name("relu") == "relu"
    assert handlers.activation_name(keras.activations.gelu) == "gelu"
    assert "relu" in handlers.ZERO_PRESERVING_ACTIVATIONS
    assert "sigmoid" not in handlers.ZERO_PRESERVING_ACTIVATIONS
    assert math.isclose(Cost(a=2, b=3, c=5, d=7).total(11, 13), 2 * 11 * 13 + 3 * 13 + 5 * 11 + 7)
