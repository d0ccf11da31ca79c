"""Nested models (a backbone, a Sequential block, a siamese twin) are inlined
into one flat Functional graph that computes the same function."""

import keras
import numpy as np
import pytest
from keras import layers

import keras_taylor as kt
from keras_taylor import _compat, nesting
from conftest import images, rel_err


# ---------------------------------------------------------------- helpers

def all_operations(model, seen=None):
    """Every layer/op of `model` and of its nested models (and the nested models)."""
    seen = {} if seen is None else seen
    ops = model.layers if isinstance(model, keras.Sequential) else model.operations
    for op in ops:
        if id(op) in seen:
            continue
        seen[id(op)] = op
        if isinstance(op, keras.Model):
            all_operations(op, seen)
    return list(seen.values())


def lively(model, seed=0):
    """Non-trivial BN statistics in `model` and every nested model."""
    rng = np.random.default_rng(seed)
    for op in all_operations(model):
        if isinstance(op, layers.BatchNormalization):
            op.set_weights(
                [
                    rng.uniform(0.5, 1.5, tuple(v.shape)) if ("gamma" in v.name or "variance" in v.name)
                    else rng.normal(0.0, 0.3, tuple(v.shape))
                    for v in op.weights
                ]
            )
    return model


def snapshot(model):
    """What a user could observe of a model: its layers, their names, weights
    and how often each was called."""
    ops = all_operations(model)
    return {
        "ids": [id(op) for op in ops],
        "names": [op.name for op in ops],
        "nodes": [_compat.inbound_node_count(op) for op in ops],
        "weights": [w.copy() for w in model.get_weights()],
        "trainable": [getattr(op, "trainable", None) for op in ops],
        "layers": [id(l) for l in model.layers],
    }


def assert_unchanged(model, before):
    after = snapshot(model)
    for key in ("ids", "names", "nodes", "trainable", "layers"):
        assert after[key] == before[key], key
    assert len(after["weights"]) == len(before["weights"])
    for a, b in zip(after["weights"], before["weights"]):
        np.testing.assert_array_equal(a, b)


def assert_flat_and_equal(model, flat, x, tol=1e-6):
    """`flat` is flat, made of new layers, and computes what `model` computes."""
    assert flat is not model
    assert not nesting.has_nested_models(flat)
    assert not any(isinstance(l, keras.Model) for l in flat.layers)
    originals = {id(op) for op in all_operations(model)}
    assert not any(id(l) in originals for l in flat.layers)
    assert not any(id(v) in {id(w) for w in model.weights} for v in flat.weights)
    # Only the outer model's inputs remain.
    n_inputs = len(keras.tree.flatten(model.inputs))
    assert sum(isinstance(l, layers.InputLayer) for l in flat.layers) == n_inputs
    names = [op.name for op in flat.operations]
    assert len(names) == len(set(names))
    assert len(flat.weights) == len(model.weights)
    assert len(flat.trainable_weights) == len(model.trainable_weights)
    for training in (False, None, True):  # True last: it moves BN statistics (of both)
        a = keras.tree.flatten(flat(x, training=training))
        b = keras.tree.flatten(model(x, training=training))
        assert len(a) == len(b)
        for ya, yb in zip(a, b):
            assert rel_err(ya, yb) <= tol, training


# ---------------------------------------------------------------- models

def tiny_backbone(name="backbone", input_shape=(16, 16, 3)):
    """Conv-BN with MobileNetV3-style hard-swish written with keras.ops, and a residual."""
    inputs = keras.Input(input_shape, name=f"{name}_in")
    x = layers.Conv2D(6, 3, padding="same", use_bias=False, name="stem")(inputs)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.Multiply(name="hswish")([x, layers.ReLU(6.0, name="hs_relu")(x + 3.0) * (1.0 / 6.0)])
    y = layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
    y = layers.BatchNormalization(name="dw_bn")(y)
    y = layers.ReLU(name="dw_relu")(y)
    x = layers.Add(name="res")([x, y])
    x = layers.Conv2D(8, 1, strides=2, name="proj")(x)
    return keras.Model(inputs, x, name=name)


def model_with_sequential_block(with_input=True):
    keras.utils.set_random_seed(0)
    block = [
        layers.Conv2D(5, 3, padding="same", name="conv"),  # clashes with the outer "conv"
        layers.BatchNormalization(name="block_bn"),
        layers.ReLU(name="block_relu"),
        layers.Dropout(0.0, name="block_drop"),
    ]
    block = keras.Sequential(([keras.Input((16, 16, 4))] if with_input else []) + block, name="block")
    inputs = keras.Input((16, 16, 3), name="image")
    x = layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    x = layers.BatchNormalization(name="bn")(x)
    x = block(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    return lively(keras.Model(inputs, layers.Dense(3, name="out")(x), name="outer"))


# ---------------------------------------------------------------- tests

def test_no_nesting_returns_the_model_itself():
    from conftest import make

    model = make("ops_se")
    assert not nesting.has_nested_models(model)
    assert nesting.inline_nested_models(model) is model

    class Sub(keras.Model):
        def call(self, x):
            return x

    assert not nesting.has_nested_models(Sub())  # no graph: analyze reports it


@pytest.mark.parametrize("with_input", [True, False])
def test_sequential_block_in_functional_model(with_input):
    model = model_with_sequential_block(with_input)
    before = snapshot(model)
    assert nesting.has_nested_models(model)
    flat = nesting.inline_nested_models(model)
    assert isinstance(flat, keras.Model) and not isinstance(flat, keras.Sequential)
    assert flat.name == "outer"
    assert [l.name for l in flat.layers] == [
        "image", "conv", "bn", "block_conv", "block_bn", "block_relu", "block_drop", "gap", "out",
    ]
    assert_unchanged(model, before)
    assert_flat_and_equal(model, flat, images(4))


def test_tiny_functional_backbone_with_ops_nodes_and_training_false():
    keras.utils.set_random_seed(0)
    backbone = tiny_backbone()
    inputs = keras.Input((16, 16, 3))
    x = backbone(inputs, training=False)  # the transfer-learning call
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dropout(0.0, name="drop")(x)
    model = lively(keras.Model(inputs, layers.Dense(4, name="head")(x), name="clf"))
    before = snapshot(model)
    flat = nesting.inline_nested_models(model)
    names = {l.name for l in flat.layers}
    assert {"stem", "stem_bn", "hswish", "hs_relu", "dw", "dw_bn", "dw_relu", "res", "proj", "head"} <= names
    assert "backbone" not in names and "backbone_in" not in names
    # The keras.ops nodes (x + 3.0, * (1/6)) were copied, not shared with the user's model.
    op_types = sorted(type(op).__name__ for op in flat.operations if not isinstance(op, keras.layers.Layer))
    assert op_types == ["Add", "Multiply"]
    originals = {id(op) for op in all_operations(model)}
    assert not any(id(op) in originals for op in flat.operations)
    assert_unchanged(model, before)
    assert_flat_and_equal(model, flat, images(4))
    # The flat model is a plain model: gates go on the backbone's layers now.
    gated = kt.add_gates(flat)
    assert {"stem_bn", "dw_bn", "proj"} <= {l.name for l in gated.layers if isinstance(l, kt.ChannelGate)}
    x = images(4)
    assert rel_err(gated(x), model(x)) <= 1e-6
    # ... and pruned: zero one channel group per gated layer, surgery equals masking.
    graph = kt.analyze(gated)
    removed = set()
    for layer in kt.gates.gate_layers(gated):
        of = graph.groups_of_layer_output(layer.name)
        groups = sorted({int(g) for g in of if g >= 0} - removed)
        if len(groups) > 1 and min(graph.layer_channel_counts(removed | {groups[0]}).values()) > 0:
            removed.add(groups[0])
    assert removed
    for layer in kt.gates.gate_layers(gated):
        of = graph.groups_of_layer_output(layer.name)
        layer.gate.assign(np.where(np.isin(of, list(removed)), 0.0, 1.0).astype("float32"))
    pruned = kt.prune(gated)
    assert pruned.count_params() < model.count_params()
    assert rel_err(pruned(x, training=False), gated(x, training=False)) <= 1e-5


def test_mobilenetv2_backbone_with_dense_head():
    keras.utils.set_random_seed(0)
    backbone = keras.applications.MobileNetV2(
        weights=None, include_top=False, input_shape=(32, 32, 3), alpha=0.35
    )
    inputs = keras.Input((32, 32, 3), name="image")
    x = backbone(inputs, training=False)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    model = lively(keras.Model(inputs, layers.Dense(10, name="logits")(x), name="transfer"))
    before = snapshot(model)
    flat = nesting.inline_nested_models(model)
    assert len(flat.layers) == len(backbone.layers) + 2  # backbone's input out, outer input + 2 in
    assert [l.name for l in flat.layers[1:-2]] == [l.name for l in backbone.layers[1:]]
    for src in backbone.layers[1:]:
        dst = flat.get_layer(src.name)
        assert type(dst) is type(src) and dst.dtype_policy.name == src.dtype_policy.name
    x = images(4, shape=(32, 32, 3))
    assert_unchanged(model, before)
    assert_flat_and_equal(model, flat, x)
    # The inlined backbone can be analysed and gated like a top-level one.
    graph = kt.analyze(flat)
    assert graph.num_groups > 0
    assert rel_err(kt.add_gates(flat)(x), model(x)) <= 1e-6


def test_shared_submodel_called_twice_keeps_weights_tied():
    keras.utils.set_random_seed(0)
    encoder = tiny_backbone("encoder")
    a = keras.Input((16, 16, 3), name="left")
    b = keras.Input((16, 16, 3), name="right")
    fa = layers.GlobalAveragePooling2D(name="gap_a")(encoder(a))
    fb = layers.GlobalAveragePooling2D(name="gap_b")(encoder(b))
    d = layers.Subtract(name="diff")([fa, fb])
    model = lively(keras.Model([a, b], layers.Dense(1, name="score")(d), name="siamese"))
    before = snapshot(model)
    flat = nesting.inline_nested_models(model)
    assert_unchanged(model, before)
    x = [images(4, seed=1), images(4, seed=2)]
    assert_flat_and_equal(model, flat, x)
    # One copy of each encoder layer, called once per branch.
    stem = flat.get_layer("stem")
    assert sum(l.name == "stem" for l in flat.layers) == 1
    assert _compat.inbound_node_count(stem) == 2
    assert len(flat.weights) == len(model.weights)
    # Tied: changing the shared kernel changes both branches alike, so the
    # same image on both sides still scores the bias exactly.
    stem.set_weights([w * 2.0 for w in stem.get_weights()])
    same = flat([x[0], x[0]], training=False)
    np.testing.assert_allclose(same, np.broadcast_to(flat.get_layer("score").get_weights()[1], (4, 1)), atol=1e-6)


def test_doubly_nested_models_and_prefixed_names():
    keras.utils.set_random_seed(0)
    inner = keras.Sequential(
        [keras.Input((8, 8, 4)), layers.Conv2D(4, 3, padding="same", name="conv"), layers.BatchNormalization(name="bn")],
        name="inner",
    )
    mid_in = keras.Input((8, 8, 3))
    m = layers.Conv2D(4, 1, name="conv")(mid_in)
    m = inner(m, training=False)
    m = layers.ReLU(name="mid_relu")(m)
    mid = keras.Model(mid_in, inner(m), name="mid")  # `inner` shared inside `mid`
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(3, 1, name="conv")(inputs)
    x = mid(x)
    x = layers.Conv2D(2, 1, name="inner_conv")(x)  # takes the first prefixed name of inner's conv
    x = layers.GlobalAveragePooling2D()(x)
    model = lively(keras.Model(inputs, x, name="outer"))
    before = snapshot(model)
    flat = nesting.inline_nested_models(model)
    names = [l.name for l in flat.layers]
    assert "conv" in names and "mid_conv" in names and "inner_conv" in names
    assert "mid_inner_conv" in names  # inner's conv: "inner_conv" was taken
    assert "bn" in names and "mid_relu" in names  # unique: kept
    assert _compat.inbound_node_count(flat.get_layer("mid_inner_conv")) == 2
    assert_unchanged(model, before)
    assert_flat_and_equal(model, flat, images(4, shape=(8, 8, 3)))


def test_multi_input_multi_output_submodel():
    keras.utils.set_random_seed(0)
    p = keras.Input((8, 8, 3), name="p")
    q = keras.Input((8, 8, 2), name="q")
    h = layers.Concatenate(name="cat")([p, q])
    h = layers.Conv2D(6, 3, padding="same", name="c")(h)
    h = layers.BatchNormalization(name="c_bn")(h)
    low = layers.Conv2D(3, 1, name="low")(h)
    high = layers.MaxPooling2D(name="high")(h)
    sub = keras.Model([p, q], [low, high], name="sub")
    x = keras.Input((8, 8, 3))
    y = layers.Conv2D(2, 1, name="y")(x)
    o1, o2 = sub([x, y])
    out = {
        "dense": layers.Dense(2, name="dense")(layers.GlobalAveragePooling2D()(o2)),
        "map": layers.ReLU(name="map")(o1),
    }
    model = lively(keras.Model(x, out, name="multi"))
    before = snapshot(model)
    flat = nesting.inline_nested_models(model)
    assert set(flat(images(2, shape=(8, 8, 3)))) == {"dense", "map"}
    assert_unchanged(model, before)
    assert_flat_and_equal(model, flat, images(4, shape=(8, 8, 3)))


def test_name_clashes_between_sibling_submodels():
    keras.utils.set_random_seed(0)

    def enc(name):
        i = keras.Input((8, 8, 3))
        h = layers.Conv2D(4, 3, padding="same", name="conv")(i)
        h = layers.BatchNormalization(name=f"{name}_only")(h)
        return keras.Model(i, h, name=name)

    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(3, 1, name="conv")(inputs)
    x = layers.Conv2D(3, 1, name="enc1_conv")(x)  # blocks enc1's first prefixed name
    x = layers.Add()([enc("enc1")(x), enc("enc2")(x)])
    model = lively(keras.Model(inputs, x, name="outer"))
    flat = nesting.inline_nested_models(model)
    names = [l.name for l in flat.layers]
    assert names.count("conv") == 1 and flat.get_layer("conv").kernel.shape == (1, 1, 3, 3)
    assert "enc1_conv_1" in names and "enc2_conv" in names  # both clashing inner convs prefixed
    assert "enc1_only" in names and "enc2_only" in names  # unique: kept as they are
    assert_flat_and_equal(model, flat, images(4, shape=(8, 8, 3)))


def test_subclassed_model_inside_raises():
    class SqueezeBlock(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.conv = layers.Conv2D(4, 1)

        def call(self, x):
            return self.conv(x)

    inputs = keras.Input((8, 8, 3))
    x = SqueezeBlock(name="squeeze")(inputs)
    model = keras.Model(inputs, layers.GlobalAveragePooling2D()(x))
    assert nesting.has_nested_models(model)
    with pytest.raises(ValueError, match=r"'squeeze' of class SqueezeBlock.*functional API"):
        nesting.inline_nested_models(model)
    # Also when it sits two levels down.
    outer_in = keras.Input((8, 8, 3))
    outer = keras.Model(outer_in, keras.Sequential([model], name="wrapper")(outer_in))
    with pytest.raises(ValueError, match=r"SqueezeBlock.*wrapper > .* > squeeze"):
        nesting.inline_nested_models(outer)


def test_frozen_backbone_mixed_dtypes_and_sequential_outer():
    keras.utils.set_random_seed(0)
    backbone = tiny_backbone()
    backbone.trainable = False
    sub_in = keras.Input((4,), name="feat")
    half = keras.Model(
        sub_in,
        layers.Activation("linear", dtype="float32", name="back")(layers.Dense(3, dtype="mixed_float16", name="half")(sub_in)),
        name="half_head",
    )
    model = keras.Sequential(
        [keras.Input((16, 16, 3)), backbone, layers.GlobalAveragePooling2D(), layers.Dense(4, name="fc"), half],
        name="seq",
    )
    lively(model)
    before = snapshot(model)
    flat = nesting.inline_nested_models(model)
    assert not isinstance(flat, keras.Sequential) and flat.name == "seq"
    assert not flat.get_layer("stem").trainable and not flat.get_layer("stem_bn").trainable
    assert flat.get_layer("fc").trainable
    assert flat.get_layer("half").dtype_policy.name == "mixed_float16"
    assert flat.get_layer("back").dtype_policy.name == "float32"
    assert_unchanged(model, before)
    assert_flat_and_equal(model, flat, images(4))


def test_inlined_model_saves_and_loads(tmp_path):
    model = model_with_sequential_block()
    flat = nesting.inline_nested_models(model)
    path = tmp_path / "flat.keras"
    flat.save(path)
    loaded = keras.models.load_model(path)
    x = images(4)
    assert rel_err(loaded(x), model(x)) <= 1e-6


def test_training_argument_of_a_submodel_call_is_kept():
    """`sub(x, training=True)` runs its BN on batch statistics when the outer
    model is called without `training`; an outer `training=` overrides it
    (Keras semantics), inlined or not."""
    keras.utils.set_random_seed(0)
    sub = keras.Sequential([keras.Input((8, 8, 3)), layers.Conv2D(4, 3, name="c"), layers.BatchNormalization(name="b")], name="sub")
    inputs = keras.Input((8, 8, 3))
    model = lively(keras.Model(inputs, sub(inputs, training=True)))
    flat = nesting.inline_nested_models(model)
    x = images(4, shape=(8, 8, 3))
    assert_flat_and_equal(model, flat, x)
    # Not vacuous: without `training`, the inner BN runs on batch statistics.
    assert rel_err(model(x), model(x, training=False)) > 1e-2


@pytest.mark.parametrize("entry", ["add_gates", "apply_plan"])
def test_nested_models_prune_through_the_public_api(entry):
    """add_gates / analyze / apply_plan take the nested model itself."""
    keras.utils.set_random_seed(0)
    encoder = tiny_backbone("encoder")
    inputs = keras.Input((16, 16, 3), name="image")
    x = layers.GlobalAveragePooling2D(name="gap")(encoder(inputs))
    model = lively(keras.Model(inputs, layers.Dense(3, name="logits")(x), name="outer"))
    before = snapshot(model)
    graph = kt.analyze(model)
    assert graph.num_groups > 0
    x = images(4)
    if entry == "add_gates":
        gated = kt.add_gates(model)
        assert not nesting.has_nested_models(gated)
        graph = kt.analyze(gated)
        site = graph.gate_sites[0]
        gated.get_layer(site).gate.assign(np.array([0.0] + [1.0] * (gated.get_layer(site).channels - 1), "float32"))
        pruned = kt.prune(gated)
        assert rel_err(pruned(x), gated(x)) <= 1e-5
    else:
        site = graph.gate_sites[0]
        plan = kt.PruningPlan.from_groups(graph, {int(graph.groups_of_layer_output(site)[0])})
        pruned = kt.apply_plan(model, plan)
        gated = kt.add_gates(model)
        gated.get_layer(site).gate.assign(np.array([0.0] + [1.0] * (gated.get_layer(site).channels - 1), "float32"))
        assert rel_err(pruned(x), gated(x)) <= 1e-5
    assert pruned.count_params() < model.count_params()
    assert rel_err(pruned(x), model(x)) > 1e-4
    assert_unchanged(model, before)


class _LossyConfig(keras.layers.Layer):
    """Its `get_config` omits `extra`, which adds a sublayer (as KerasHub's
    `HierarchicalTransformerEncoder` omits `sr_ratio`)."""

    def __init__(self, extra=False, **kwargs):
        super().__init__(**kwargs)
        self.first = layers.Dense(4)
        self.second = layers.Dense(4) if extra else None

    def call(self, x):
        y = self.first(x)
        return self.second(y) if self.second is not None else y

    def get_config(self):
        return {"name": self.name, "trainable": self.trainable, "dtype": self.dtype_policy.name}


def test_copy_layer_reuses_a_layer_whose_config_makes_other_weights():
    layer = _LossyConfig(extra=True, name="lossy")
    layer(np.zeros((1, 3), "float32"))
    assert len(layer.weights) == 4
    with pytest.warns(UserWarning, match=r"'lossy' of class _LossyConfig .*makes 2 weights where it has 4"):
        new, copied = nesting.copy_layer(layer)
    assert new is layer and not copied
    # A layer whose config does describe it is still copied (and built with its weights' shapes).
    plain = _LossyConfig(name="plain")
    plain(np.zeros((1, 3), "float32"))
    new, copied = nesting.copy_layer(plain)
    assert copied and new is not plain
    assert [tuple(v.shape) for v in new.weights] == [tuple(v.shape) for v in plain.weights]


def test_inlining_a_submodel_holding_a_lossy_config_layer_does_not_crash():
    inner_in = keras.Input((3,))
    inner = keras.Model(inner_in, _LossyConfig(extra=True, name="lossy")(inner_in), name="inner")
    inputs = keras.Input((3,))
    model = keras.Model(inputs, layers.Dense(2)(inner(layers.Dense(3)(inputs))))
    with pytest.warns(UserWarning, match="'lossy'.*reused as is"):
        flat = nesting.inline_nested_models(model)
    assert flat.get_layer("lossy") is inner.get_layer("lossy")
    x = np.random.default_rng(0).normal(size=(4, 3)).astype("float32")
    np.testing.assert_allclose(flat(x), model(x), rtol=1e-6, atol=1e-6)
