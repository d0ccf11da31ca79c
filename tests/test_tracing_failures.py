"""Failure cases for composite layers that cannot be traced: a clear message
naming the layer, and the user's model untouched."""

import keras
import numpy as np
import pytest

import keras_taylor as kt
from tests.test_tracing import OwnScale, ValueBranch, _model, _x


@pytest.mark.parametrize("block, cls", [(ValueBranch, "ValueBranch"), (OwnScale, "OwnScale")])
def test_add_gates_names_the_untraceable_layer_and_leaves_the_model_alone(block, cls):
    model = _model(block(name="blk"), filters=4)
    before = [w.copy() for w in model.get_weights()]
    nodes = [len(l._inbound_nodes) for l in model.layers]
    with warnings_ok():
        with pytest.raises(ValueError, match=rf"'blk' of class {cls}.*register_handler"):
            kt.add_gates(model)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert [len(l._inbound_nodes) for l in model.layers] == nodes


def test_freeze_keeps_the_untraceable_layer_as_a_unit_and_prunes_the_rest():
    def block_then_conv(x):  # something prunable after the fixed unit
        x = ValueBranch(name="blk")(x)
        return keras.layers.ReLU(name="mid_relu")(keras.layers.Conv2D(6, 3, padding="same", name="mid")(x))

    model = _model(block_then_conv, filters=4)
    with pytest.warns(UserWarning, match="Cannot trace layer 'blk'"):
        gated = kt.add_gates(model, on_unknown="freeze")
    graph = kt.analyze(gated, on_unknown="freeze")
    assert "blk" in graph.unknown_layers
    assert graph.first_node("blk").handler is None
    assert graph.num_groups > 0 and "mid" in graph.gate_sites  # the rest prunes
    np.testing.assert_allclose(gated(_x()), model(_x()), rtol=1e-5, atol=1e-6)


def test_profile_of_a_dynamic_model_with_an_untraceable_layer_needs_a_size():
    model = _model(ValueBranch(name="blk"), filters=4)
    with warnings_ok():
        with pytest.raises(ValueError, match=r"'stem'.*input_shape="):
            kt.profile(model)
        assert kt.profile(model, input_shape=(12, 12, 3)).flops > 0


class warnings_ok:
    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def test_a_model_left_with_no_gate_is_said_so():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="c")(inputs)
    x = keras.layers.LayerNormalization(name="ln")(x)
    model = keras.Model(inputs, keras.layers.Conv2D(2, 1, name="head")(x))
    with pytest.raises(ValueError, match=r"nothing can be pruned.*'ln' \(LayerNormalization\) mixes channels"):
        kt.add_gates(model)
