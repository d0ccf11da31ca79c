"""Symbolic tracing of subclassed composite layers (keras_taylor.tracing)."""

import warnings

import keras
import numpy as np
import pytest
from keras import layers, ops

import keras_taylor as kt
from keras_taylor import tracing
from tests.conftest import randomize_bn


class ConvBN(layers.Layer):
    """conv -> BN -> relu, with `training` passed on."""

    def __init__(self, filters, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.conv = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{self.name}_conv")
        self.bn = layers.BatchNormalization(name=f"{self.name}_bn")

    def call(self, x, training=None):
        return ops.relu(self.bn(self.conv(x), training=training))

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


class ResBlock(layers.Layer):
    """Nested composites and a residual `x + f(x)` made with keras.ops."""

    def __init__(self, filters, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.a = ConvBN(filters, name=f"{self.name}_a")
        self.b = ConvBN(filters, name=f"{self.name}_b")
        self.drop = layers.Dropout(0.5, name=f"{self.name}_drop")

    def call(self, x, training=None):
        return x + self.drop(self.b(self.a(x, training=training), training=training), training=training)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


class Twice(layers.Layer):
    """One sublayer called twice: its weights are shared."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = layers.Conv2D(4, 1, name=f"{self.name}_conv")

    def call(self, x):
        return self.conv(ops.relu(self.conv(x)))


class ValueBranch(layers.Layer):
    """Python control flow on a tensor value: cannot be traced."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = layers.Conv2D(4, 1, name=f"{self.name}_conv")

    def call(self, x):
        if ops.convert_to_numpy(ops.sum(x)) > 0:
            return self.conv(x)
        return self.conv(-x)

    def build(self, shape):
        self.conv.build(shape)

    def compute_output_shape(self, shape):  # lets a functional model hold it
        return (*shape[:-1], 4)


class OwnScale(layers.Layer):
    """Holds a variable of its own besides its sublayer: not traced."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = layers.Conv2D(4, 1, name=f"{self.name}_conv")

    def build(self, shape):
        self.scale = self.add_weight(shape=(4,), initializer="ones", name="scale")

    def call(self, x):
        return self.conv(x) * self.scale


def _model(block, filters=8):
    inputs = keras.Input((None, None, 3), name="img")
    x = layers.Conv2D(filters, 3, padding="same", name="stem")(inputs)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    x = block(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    return randomize_bn(keras.Model(inputs, layers.Dense(3, name="out")(x), name="m"))


def _x(size=12):
    return np.random.default_rng(0).normal(size=(2, size, size, 3)).astype("float32")


def _randomize_nested_bn(model):
    rng = np.random.default_rng(1)
    for layer in model._flatten_layers():
        if isinstance(layer, layers.BatchNormalization) and layer.built:
            layer.set_weights([rng.uniform(0.5, 1.5, w.shape).astype("float32") for w in layer.get_weights()])


def test_nested_composites_are_inlined_and_compute_the_same():
    model = _model(ResBlock(8, name="res"))
    _randomize_nested_bn(model)
    flat = tracing.inline_composite_layers(model)
    names = [l.name for l in flat.layers]
    assert "res" not in names and "res_a" not in names
    assert {"res_a_conv", "res_a_bn", "res_b_conv", "res_b_bn", "res_drop"} <= set(names)
    for size in (12, 7):
        np.testing.assert_allclose(flat(_x(size)), model(_x(size)), rtol=1e-5, atol=1e-6)
    # training= reaches the sublayers: BN in training mode, dropout active.
    t_flat = flat(_x(), training=True)
    assert not np.allclose(t_flat, flat(_x(), training=False))


def test_user_model_is_untouched_by_tracing():
    block = ResBlock(8, name="res")
    model = _model(block)
    before = [w.copy() for w in model.get_weights()]
    nodes = {l.name: len(l._inbound_nodes) for l in block._flatten_layers()}
    flat = tracing.inline_composite_layers(model)
    assert {l.name: len(l._inbound_nodes) for l in block._flatten_layers()} == nodes
    for w in flat.weights:
        w.assign(np.zeros(w.shape, w.dtype))
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_traced_composite_prunes_exactly():
    model = _model(ResBlock(8, name="res"))
    _randomize_nested_bn(model)
    gated = kt.add_gates(model)
    graph = kt.analyze(gated)
    assert any(n.name == "res_a_conv" for n in graph.nodes)
    # Remove group 0 of every gated layer and compare.
    removed = {int(g) for l in kt.gates.gate_layers(gated) for g in graph.groups_of_layer_output(l.name)[:1] if g >= 0}
    for l in kt.gates.gate_layers(gated):
        g = graph.groups_of_layer_output(l.name)
        l.gate.assign(np.where(np.isin(g, list(removed)) & (g >= 0), 0.0, 1.0).astype("float32"))
    pruned = kt.prune(gated)
    np.testing.assert_allclose(pruned(_x()), gated(_x()), rtol=1e-5, atol=1e-5)
    assert kt.profile(pruned, input_shape=(12, 12, 3)).flops < kt.profile(model, input_shape=(12, 12, 3)).flops
    assert not any(type(l).__name__ in ("ResBlock", "ConvBN") for l in pruned.layers)


class NoConfig(ResBlock):
    """A composite whose config cannot rebuild it (like KerasHub's ViT `MLP`,
    DeiT's encoder, MiT's encoder): `get_config` omits `filters`."""

    def get_config(self):
        return layers.Layer.get_config(self)


def test_composite_whose_config_cannot_rebuild_it_is_traced_all_the_same(tmp_path):
    block = NoConfig(8, name="res")
    model = _model(block)
    _randomize_nested_bn(model)
    with pytest.raises(TypeError):
        NoConfig.from_config(block.get_config())
    before = [w.copy() for w in model.get_weights()]
    names = [l.name for l in block._flatten_layers()]
    nodes = [len(l._inbound_nodes) for l in block._flatten_layers()]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r"(?s).*(Cannot trace|reused as is)")  # traced, copied
        flat = tracing.inline_composite_layers(model)
    assert {"res_a_conv", "res_a_bn", "res_b_conv", "res_b_bn", "res_drop"} <= {l.name for l in flat.layers}
    assert not any(isinstance(l, (NoConfig, ConvBN)) for l in flat.layers)
    np.testing.assert_allclose(flat(_x()), model(_x()), rtol=1e-5, atol=1e-6)
    # The user's layers: same names, no new nodes, own weights (not shared).
    assert [l.name for l in block._flatten_layers()] == names
    assert [len(l._inbound_nodes) for l in block._flatten_layers()] == nodes
    assert not {id(v) for v in flat.weights} & {id(v) for v in model.weights}
    for w in flat.weights:
        w.assign(np.zeros(w.shape, w.dtype))
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    # It prunes exactly and the pruned model reloads with no custom objects.
    gated = kt.add_gates(model)
    graph = kt.analyze(gated)
    removed = {int(g) for l in kt.gates.gate_layers(gated) for g in graph.groups_of_layer_output(l.name)[:1] if g >= 0}
    for l in kt.gates.gate_layers(gated):
        g = graph.groups_of_layer_output(l.name)
        l.gate.assign(np.where(np.isin(g, list(removed)) & (g >= 0), 0.0, 1.0).astype("float32"))
    pruned = kt.prune(gated)
    np.testing.assert_allclose(pruned(_x()), gated(_x()), rtol=1e-5, atol=1e-5)
    assert pruned.get_layer("res_a_conv").filters < 8
    path = str(tmp_path / "p.keras")
    pruned.save(path)
    np.testing.assert_allclose(keras.saving.load_model(path)(_x()), pruned(_x()), rtol=1e-6, atol=1e-6)


class NoConfigBranch(ValueBranch):
    """Untraceable (after calling its sublayer), and its config cannot
    rebuild it either."""

    def __init__(self, k, **kwargs):
        super().__init__(**kwargs)
        self.k = k
        self.conv = layers.Conv2D(4, 1, name="inner_conv")

    def call(self, x):
        y = self.conv(x)
        return y if ops.convert_to_numpy(ops.sum(y)) > 0 else -y

    def get_config(self):
        return layers.Layer.get_config(self)


def test_failed_trace_of_the_users_layer_leaves_no_trace():
    block = NoConfigBranch(1, name="nb")
    model = _model(block, filters=4)
    names = [l.name for l in block._flatten_layers()]
    nodes = [(len(l._inbound_nodes), len(l._outbound_nodes)) for l in block._flatten_layers(include_self=False)]
    with pytest.warns(UserWarning, match=r"Cannot trace layer 'nb' of class NoConfigBranch"):
        flat = tracing.inline_composite_layers(model)
    assert flat.get_layer("nb") is block  # reused as is: its config cannot copy it
    assert [l.name for l in block._flatten_layers()] == names
    assert [(len(l._inbound_nodes), len(l._outbound_nodes)) for l in block._flatten_layers(include_self=False)] == nodes
    np.testing.assert_allclose(flat(_x()), model(_x()), rtol=1e-5, atol=1e-6)


class PairOut(layers.Layer):
    """Returns `(output, None)` (KerasHub's DeiTEncoderBlock): Keras refuses
    a symbolic call of it, a node's outputs must all be tensors."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = layers.Conv2D(8, 3, padding="same", name=f"{self.name}_conv")

    def call(self, x):
        return ops.relu(self.conv(x)), None


class HoldsPairOut(layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.inner = PairOut(name=f"{self.name}_inner")

    def call(self, x):
        y, _ = self.inner(x)
        return y + x


def test_composite_calling_a_sublayer_keras_cannot_call_symbolically_is_traced():
    block = HoldsPairOut(name="hp")
    model = _model(block)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r"(?s).*Cannot trace")
        flat = tracing.inline_composite_layers(model)
    assert "hp_inner_conv" in {l.name for l in flat.layers}
    assert not any(isinstance(l, (HoldsPairOut, PairOut)) for l in flat.layers)
    assert type(block.inner) is PairOut  # its class is put back
    np.testing.assert_allclose(flat(_x()), model(_x()), rtol=1e-5, atol=1e-6)
    graph = kt.analyze(kt.add_gates(model))
    assert len(graph.groups_of_layer_output("hp_inner_conv")) == 8


class TokenMLP(layers.Layer):
    """KerasHub MiT's MixFFN pattern: tokens -> Dense -> map (reshaped with
    the run-time batch size `ops.shape(x)[0]`) -> depthwise conv -> tokens ->
    Dense."""

    def __init__(self, mid, **kwargs):
        super().__init__(**kwargs)
        self.mid = mid
        self.fc1 = layers.Dense(mid, name=f"{self.name}_fc1")
        self.dw = layers.DepthwiseConv2D(3, padding="same", name=f"{self.name}_dw")
        self.fc2 = layers.Dense(8, name=f"{self.name}_fc2")

    def call(self, x):
        b, (h, w, c) = ops.shape(x)[0], x.shape[1:]
        t = self.fc1(ops.reshape(x, (b, -1, c)))
        t = ops.reshape(self.dw(ops.reshape(t, (b, h, w, self.mid))), (b, -1, self.mid))
        return ops.reshape(self.fc2(ops.relu(t)), (b, h, w, c))


def test_reshape_with_the_run_time_batch_size_is_traced_and_prunes_exactly(tmp_path):
    inputs = keras.Input((6, 6, 3))
    x = layers.Conv2D(8, 3, padding="same", name="stem")(inputs)
    x = layers.LayerNormalization(name="ln")(x)  # the embedding width stays fixed
    x = TokenMLP(12, name="mlp")(x)
    model = keras.Model(inputs, layers.Dense(3, name="out")(layers.GlobalAveragePooling2D(name="gap")(x)))
    original = keras.ops.reshape
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r"(?s).*Cannot trace")
        gated = kt.add_gates(model)
    assert keras.ops.reshape is original  # the trace-time reshape is put back
    graph = kt.analyze(gated)
    hidden = graph.groups_of_layer_output("mlp_fc1")
    assert len(hidden) == 12 and (hidden >= 0).all()
    removed = {int(g) for g in hidden[[0, 3, 4, 9]]}
    for l in kt.gates.gate_layers(gated):
        g = graph.groups_of_layer_output(l.name)
        l.gate.assign(np.where(np.isin(g, list(removed)) & (g >= 0), 0.0, 1.0).astype("float32"))
    pruned = kt.prune(gated)
    x = np.random.default_rng(0).normal(size=(3, 6, 6, 3)).astype("float32")
    np.testing.assert_allclose(pruned(x), gated(x), rtol=1e-5, atol=1e-5)
    assert pruned.get_layer("mlp_fc1").units == 8 and pruned.get_layer("mlp_dw").kernel.shape[2] == 8
    path = str(tmp_path / "p.keras")
    pruned.save(path)
    np.testing.assert_allclose(keras.saving.load_model(path)(x), pruned(x), rtol=1e-6, atol=1e-6)


def test_reshape_that_splits_channels_fixes_them():
    inputs = keras.Input((4, 8))
    x = layers.Dense(8, name="d")(inputs)
    x = ops.reshape(x, (-1, 4, 2, 4))  # heads out of the channels
    model = keras.Model(inputs, layers.Dense(3, name="out")(ops.reshape(x, (-1, 4, 8))))
    with pytest.raises(ValueError, match=r"ops.reshape\) does not keep the channels"):
        kt.add_gates(model)


def test_shared_sublayer_stays_shared():
    model = _model(Twice(name="tw"), filters=4)
    flat = tracing.inline_composite_layers(model)
    assert [l.name for l in flat.layers].count("tw_conv") == 1
    conv = flat.get_layer("tw_conv")
    assert len(conv._inbound_nodes) >= 2
    np.testing.assert_allclose(flat(_x()), model(_x()), rtol=1e-5, atol=1e-6)
    graph = kt.analyze(flat)  # both calls keep the same channels
    calls = [n for n in graph.nodes if n.name == "tw_conv"]
    assert len(calls) == 2


def test_untraceable_layer_stays_a_fixed_unit_with_a_warning_naming_it():
    model = _model(ValueBranch(name="branchy"), filters=4)
    with pytest.warns(UserWarning, match=r"Cannot trace layer 'branchy' of class ValueBranch"):
        flat = tracing.inline_composite_layers(model)
    assert "branchy" in [l.name for l in flat.layers]


def test_layer_with_own_variables_is_not_traced():
    model = _model(OwnScale(name="own"), filters=4)
    assert tracing.untraceable_reason(model.get_layer("own")).startswith("it holds variables of its own")
    flat = tracing.inline_composite_layers(model)
    assert flat is model


def test_registered_handler_wins_over_tracing():
    class Opaque(ConvBN):
        pass

    kt.register_handler(Opaque, kt.LayerHandler())  # channel-preserving: says "do not trace"
    try:
        model = _model(Opaque(8, name="opq"))
        assert tracing.untraceable_reason(model.get_layer("opq")) == "it is not a composite layer"
        flat = tracing.inline_composite_layers(model)
        assert flat is model
    finally:
        from keras_taylor import handlers

        handlers._REGISTRY[:] = [(c, h) for c, h in handlers._REGISTRY if c is not Opaque]


def test_max_depth_is_validated():
    with pytest.raises(ValueError, match="max_depth"):
        tracing.inline_composite_layers(_model(ConvBN(4, name="cb")), max_depth=0)


# ---- keras.ops nodes KerasHub uses: pad, split, mean ----------------------

def _prune_first_groups(model, k=2):
    gated = kt.add_gates(model)
    graph = kt.analyze(gated)
    removed = set(range(min(k, graph.num_groups)))
    for l in kt.gates.gate_layers(gated):
        g = graph.groups_of_layer_output(l.name)
        l.gate.assign(np.where(np.isin(g, list(removed)) & (g >= 0), 0.0, 1.0).astype("float32"))
    pruned = kt.prune(gated)
    np.testing.assert_allclose(pruned(_x()), gated(_x()), rtol=1e-5, atol=1e-5)
    return graph, pruned


def _op_model(op):
    inputs = keras.Input((12, 12, 3))
    x = layers.Conv2D(6, 3, padding="same", name="c1")(inputs)
    x = layers.BatchNormalization(name="b1")(x)
    x = op(layers.ReLU(name="r1")(x))
    x = layers.Conv2D(4, 3, name="c2")(x)
    x = layers.GlobalAveragePooling2D()(x)
    return randomize_bn(keras.Model(inputs, layers.Dense(3, name="out")(x)))


def test_pad_with_zeros_keeps_channels_prunable_and_exact():
    model = _op_model(lambda x: ops.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))))
    graph, pruned = _prune_first_groups(model)
    assert (graph.groups_of_layer_output("b1") >= 0).all()
    assert pruned.get_layer("c1").filters < 6


def test_pad_with_a_nonzero_constant_fixes_the_channels_it_lifts():
    model = _op_model(lambda x: ops.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-1.0))
    graph = kt.analyze(kt.add_gates(model, on_unknown="freeze"))
    assert (graph.groups_of_layer_output("b1") < 0).all()
    reasons = " ".join(graph.fixed_reason.values())
    assert "constant_values=-1.0" in reasons


def test_pad_of_the_channel_axis_fixes_the_channels():
    model = _op_model(lambda x: ops.pad(x, ((0, 0), (0, 0), (0, 0), (1, 0))))
    graph = kt.analyze(model, on_unknown="freeze")
    assert (graph.groups_of_layer_output("c1") < 0).all()
    assert any("pads the channel axis" in r for r in graph.fixed_reason.values())


def test_getitem_over_positions_keeps_channels_prunable_and_exact():
    model = _op_model(lambda x: x[:, 1:-1, ::2])
    graph, pruned = _prune_first_groups(model)
    assert (graph.groups_of_layer_output("b1") >= 0).all()
    assert pruned.get_layer("c1").filters < 6


def test_getitem_of_a_position_moves_the_channel_axis_and_prunes_exactly():
    # x[:, 0] (a ViT's class token): (B, 12, 12, 6) -> (B, 12, 6), channels last.
    inputs = keras.Input((12, 12, 3))
    x = layers.Conv2D(6, 3, padding="same", name="c1")(inputs)
    x = layers.ReLU(name="r1")(layers.BatchNormalization(name="b1")(x))
    x = layers.Dense(4, name="d")(x[:, 0])
    model = randomize_bn(keras.Model(inputs, layers.Dense(3, name="out")(layers.Flatten()(x))))
    graph, pruned = _prune_first_groups(model)
    assert (graph.groups_of_layer_output("b1") >= 0).all()
    assert pruned.get_layer("d").kernel.shape[0] == pruned.get_layer("c1").filters < 6


@pytest.mark.parametrize("key", ["channels", "ellipsis_channels", "batch"])
def test_getitem_of_channels_or_batch_fixes_the_channels(key):
    op = {
        "channels": lambda x: x[:, :, :, :4],
        "ellipsis_channels": lambda x: x[..., 2:],
        "batch": lambda x: ops.expand_dims(x[0], 0),
    }[key]
    graph = kt.analyze(_op_model(op), on_unknown="freeze")
    assert (graph.groups_of_layer_output("c1") < 0).all()
    assert any("(x[key]) indexes the channel or batch axis" in r for r in graph.fixed_reason.values())


def _split_model(sections):
    inputs = keras.Input((12, 12, 3))
    x = layers.Conv2D(6, 3, padding="same", name="c1")(inputs)
    x = layers.BatchNormalization(name="b1")(x)
    x = layers.ReLU(name="r1")(x)
    a, b = ops.split(x, sections, axis=-1)
    a = layers.Conv2D(4, 1, name="ca")(a)
    b = layers.Conv2D(4, 1, name="cb")(b)
    x = layers.Concatenate()([a, b])
    x = layers.GlobalAveragePooling2D()(x)
    return randomize_bn(keras.Model(inputs, layers.Dense(3, name="out")(x)))


def test_split_into_equal_sections_ties_them_and_prunes_exactly():
    graph, pruned = _prune_first_groups(_split_model(2), k=1)
    groups = graph.groups_of_layer_output("b1")
    np.testing.assert_array_equal(groups[:3], groups[3:])  # channel j of both halves tied
    assert pruned.get_layer("c1").filters in (4, 6)


def test_split_at_explicit_indices_fixes_the_channels():
    graph = kt.analyze(_split_model([2]), on_unknown="freeze")
    assert (graph.groups_of_layer_output("c1") < 0).all()
    assert any("fixed indices" in r for r in graph.fixed_reason.values())


def test_mean_over_positions_squeeze_excite_prunes_exactly():
    def se(x):
        s = ops.mean(x, axis=(1, 2), keepdims=True)
        s = layers.Conv2D(2, 1, activation="relu", name="se_r")(s)
        s = layers.Conv2D(6, 1, name="se_e")(s)
        return x * ops.sigmoid(s)

    graph, pruned = _prune_first_groups(_op_model(se), k=2)
    assert (graph.groups_of_layer_output("b1") >= 0).all()


class TrainModeBN(layers.Layer):
    """Runs its BN in training mode whatever it is told (as DeepLabV3's
    SpatialPyramidPooling did in effect): calling it moves the moving stats."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = layers.Conv2D(6, 1, name=f"{self.name}_conv")
        self.bn = layers.BatchNormalization(name=f"{self.name}_bn")

    def call(self, x):
        return ops.relu(self.bn(self.conv(x), training=True))


def test_checking_a_traced_call_leaves_no_state_behind():
    # The tracer checks each traced call by running the layer and its copy on
    # random inputs; a layer that runs BN in training mode would move both
    # moving statistics (the user's and the gated copy's) without the restore.
    inputs = keras.Input((8, 8, 3))
    x = TrainModeBN(name="block")(inputs)
    model = keras.Model(inputs, layers.Conv2D(4, 1, name="head")(x))
    bn = model.get_layer("block").bn
    before = [keras.ops.convert_to_numpy(v) for v in bn.non_trainable_variables]
    flat = tracing.inline_composite_layers(model)
    after = [keras.ops.convert_to_numpy(v) for v in bn.non_trainable_variables]
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    copy = flat.get_layer("block_bn")
    for a, b in zip(before, copy.non_trainable_variables):
        np.testing.assert_array_equal(a, keras.ops.convert_to_numpy(b))
