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


# ---- zero-state dataflow: squeeze-excite channels stay prunable ------------

def _se(gate_branch, merge="multiply", inline_sigmoid=True):
    """conv-BN-swish, then x ∘ sigmoid(excite(GAP(x))), then a conv."""
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(6, 3, padding="same", use_bias=False, name="expand")(inputs)
    x = layers.BatchNormalization(name="expand_bn")(x)
    x = layers.Activation("swish", name="expand_act")(x)
    s = layers.GlobalAveragePooling2D(keepdims=True, name="squeeze")(x)
    s = layers.Conv2D(2, 1, activation="relu", name="reduce")(s)
    if inline_sigmoid:
        s = layers.Conv2D(6, 1, activation="sigmoid", name="excite")(s)
    else:
        s = layers.Conv2D(6, 1, name="excite")(s)
        s = layers.Activation("sigmoid", name="excite_sig")(s)
    if gate_branch:
        s = layers.UpSampling2D(8)(s)
    x = {"multiply": layers.Multiply, "add": layers.Add, "maximum": layers.Maximum}[merge](name="se")([x, s])
    x = layers.Conv2D(4, 3, name="project")(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(2, name="out")(x), name="se")


@pytest.mark.parametrize("inline_sigmoid", [True, False])
@pytest.mark.parametrize("upsample", [False, True])
def test_squeeze_excite_channels_are_prunable_and_pruning_them_is_exact(inline_sigmoid, upsample):
    from conftest import randomize_bn, rel_err

    model = randomize_bn(_se(upsample, inline_sigmoid=inline_sigmoid))
    gated = kt.add_gates(model)
    graph = kt.analyze(gated)
    expanded = graph.groups_of_layer_output("expand_bn")
    assert (expanded >= 0).all()
    # The excite conv and the BN carry the same groups (tied by the Multiply).
    np.testing.assert_array_equal(graph.groups_of_layer_output("excite"), expanded)
    assert {"expand_bn", "excite"} <= set(graph.gate_sites)
    removed = {int(expanded[1]), int(expanded[4])}
    for layer in gated.layers:
        if isinstance(layer, kt.ChannelGate):
            of = graph.groups_of_layer_output(layer.name)
            layer.gate.assign(np.where(np.isin(of, list(removed)), 0.0, 1.0).astype("float32"))
    pruned = kt.prune(gated)
    assert pruned.get_layer("expand").filters == 4 and pruned.get_layer("excite").filters == 4
    x = np.random.default_rng(0).normal(size=(3, 8, 8, 3)).astype("float32")
    assert rel_err(pruned(x), gated(x)) <= 1e-5
    assert rel_err(model(x), gated(x)) > 1e-3  # the check is not vacuous


@pytest.mark.parametrize("merge", ["add", "maximum"])
def test_sigmoid_channels_added_to_the_trunk_are_fixed(merge):
    # x + sigmoid(s): a removed channel would be 0.5 where `project` reads it.
    graph = kt.analyze(_se(True, merge=merge))
    assert (graph.groups_of_layer_output("expand_bn") < 0).all()
    reason = graph.fixed_reason[graph.comp_of[graph.first_node("expand_bn").out_maps[0][0]]]
    assert "'project'" in reason and "sigmoid" in reason


def test_division_and_spatial_concat_keep_non_zero_channels():
    inputs = keras.Input((8, 8, 3))
    a = layers.Conv2D(4, 3, padding="same", name="a")(inputs)
    b = layers.Conv2D(4, 3, padding="same", activation="sigmoid", name="b")(inputs)
    c = layers.Conv2D(4, 3, padding="same", name="c")(inputs)
    q = a / c  # 0 / 0 for a removed channel
    s = layers.Concatenate(axis=1, name="rows")([c, b])  # b's half is 0.5
    s = layers.MaxPooling2D((2, 1))(s)
    x = layers.Concatenate(name="cat")([q, s])
    x = layers.Conv2D(3, 1, name="mix")(x)
    model = keras.Model(inputs, layers.Dense(2)(layers.GlobalAveragePooling2D()(x)))
    graph = kt.analyze(model)
    assert (graph.groups_of_layer_output("a") < 0).all()
    assert (graph.groups_of_layer_output("b") < 0).all()
    assert (graph.groups_of_layer_output("c") < 0).all()
    assert (graph.groups_of_layer_output("mix") >= 0).all()


@pytest.mark.parametrize("merge", ["multiply", "add"])
def test_one_channel_broadcast_over_the_others(merge):
    """Spatial attention `x * sigmoid(conv_1ch(x))` (CBAM): the map keeps its
    one channel; x's channels stay prunable behind a Multiply, not an Add."""
    from conftest import randomize_bn, rel_err

    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(6, 3, padding="same", use_bias=False, name="c")(inputs)
    x = layers.BatchNormalization(name="bn")(x)
    x = layers.ReLU()(x)
    a = layers.Conv2D(1, 3, padding="same", activation="sigmoid", name="attn")(x)
    x = (layers.Multiply if merge == "multiply" else layers.Add)(name="m")([x, a])
    x = layers.Conv2D(4, 3, name="next")(x)
    model = randomize_bn(keras.Model(inputs, layers.Dense(2, name="out")(layers.GlobalAveragePooling2D()(x))))
    graph = kt.analyze(model)
    assert (graph.groups_of_layer_output("attn") < 0).all()
    if merge == "add":
        assert (graph.groups_of_layer_output("bn") < 0).all()
        return
    assert (graph.groups_of_layer_output("bn") >= 0).all()
    gated = kt.add_gates(model)
    gated.get_layer("bn").gate.assign(np.array([1, 0, 1, 1, 0, 1], "float32"))
    pruned = kt.prune(gated)
    assert pruned.get_layer("c").filters == 4
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype("float32")
    assert rel_err(pruned(x), gated(x)) <= 1e-5 and rel_err(model(x), gated(x)) > 1e-3


def test_keras_ops_functions_follow_the_zero_rules():
    """`ops.relu6(s + 3) / 6` (hard sigmoid) as a gate; `ops.tanh` keeps zeros, `ops.exp` does not."""
    from keras import ops
    from conftest import rel_err

    inputs = keras.Input((8, 8, 2))
    x = layers.Conv2D(4, 3, padding="same", name="x")(inputs)
    s = layers.Conv2D(4, 3, padding="same", name="s")(inputs)
    x = layers.Multiply(name="mul")([ops.tanh(x), ops.relu6(s + 3.0) / 6.0])
    e = ops.exp(layers.Conv2D(3, 3, padding="same", name="e")(inputs))
    x = layers.Concatenate(name="cat")([x, e])
    x = layers.Conv2D(2, 3, name="mix")(x)
    model = keras.Model(inputs, layers.Dense(2)(layers.GlobalAveragePooling2D()(x)))
    graph = kt.analyze(model)
    assert (graph.groups_of_layer_output("x") >= 0).all()  # zero times anything
    assert (graph.groups_of_layer_output("e") < 0).all()  # exp(0) = 1 reaches `mix`
    gated = kt.add_gates(model)
    gated.get_layer("x").gate.assign(np.array([0, 1, 1, 0], "float32"))
    pruned = kt.prune(gated)
    x_in = np.random.default_rng(0).normal(size=(2, 8, 8, 2)).astype("float32")
    assert pruned.get_layer("x").filters == 2 and pruned.get_layer("s").filters == 2
    assert rel_err(pruned(x_in), gated(x_in)) <= 1e-5
