"""data_format='channels_first': the same channel rules on the other axis.

Each model is checked against the surgery invariant (pruned == gated with the
removed groups' gates at 0), and a channels_first net is checked against its
channels_last twin (same groups, same FLOPs).
"""

import inspect

import keras
import numpy as np
import pytest
from keras import layers

import keras_taylor as kt
from conftest import randomize_bn, rel_err
from keras_taylor.testing import lively_statistics, preprocessed


def _zero(gated, graph, removed):
    for layer in gated.layers:
        if isinstance(layer, kt.ChannelGate):
            of = graph.groups_of_layer_output(layer.name)
            layer.gate.assign(np.where(np.isin(of, list(removed)), 0.0, 1.0).astype("float32"))


def _random_groups(graph, fraction=0.3, seed=0):
    rng = np.random.default_rng(seed)
    picked = rng.choice(graph.num_groups, size=max(1, int(fraction * graph.num_groups)), replace=False)
    return {int(g) for g in picked if min(graph.layer_channel_counts({int(g)}).values()) > 0}


def _check(model, x, tol=1e-5, fraction=0.3):
    gated = kt.add_gates(model)
    graph = kt.analyze(gated)
    assert graph.num_groups > 0
    removed = _random_groups(graph, fraction)
    _zero(gated, graph, removed)
    pruned = kt.prune(gated)
    masked = np.asarray(gated(x, training=False))
    assert rel_err(pruned(x, training=False), masked) <= tol
    assert rel_err(model(x, training=False), masked) > 1e-4  # not vacuous
    assert kt.profile(pruned).flops < kt.profile(model).flops
    return graph, pruned


def net(fmt, scale=True):
    """Conv/BN/depthwise/concat/residual/squeeze-excite/transpose/Flatten head."""
    ax = 1 if fmt == "channels_first" else -1
    shape = (3, 12, 12) if fmt == "channels_first" else (12, 12, 3)
    kw = dict(data_format=fmt)
    inputs = keras.Input(shape)
    x = layers.Conv2D(6, 3, padding="same", use_bias=False, name="stem", **kw)(inputs)
    x = layers.BatchNormalization(axis=ax, scale=scale, name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    d = layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="dw", **kw)(x)
    d = layers.BatchNormalization(axis=ax, name="dw_bn")(d)
    d = layers.ReLU()(d)
    b = layers.Conv2D(4, 1, name="branch", **kw)(x)
    x = layers.Concatenate(axis=ax, name="cat")([d, b])  # 16 channels
    r = layers.Conv2D(16, 3, padding="same", name="res", **kw)(x)
    r = layers.BatchNormalization(axis=ax, name="res_bn")(r)
    x = layers.Add(name="add")([x, r])
    s = layers.GlobalAveragePooling2D(keepdims=True, name="squeeze", **kw)(x)
    s = layers.Conv2D(4, 1, activation="relu", name="reduce", **kw)(s)
    s = layers.Conv2D(16, 1, activation="sigmoid", name="excite", **kw)(s)
    x = layers.Multiply(name="se")([x, s])
    x = layers.MaxPooling2D(2, name="pool", **kw)(x)
    x = layers.Conv2DTranspose(5, 2, strides=2, name="up", **kw)(x)
    x = layers.ZeroPadding2D(1, **kw)(x)
    x = layers.Conv2D(6, 3, strides=2, activation="relu", name="last", **kw)(x)
    x = layers.Flatten(name="flat")(x)  # data_format left at its default
    return keras.Model(inputs, layers.Dense(3, name="out")(x), name=f"net_{fmt}")


@pytest.mark.parametrize("scale", [True, False], ids=["bn", "bn_scale_false"])
def test_channels_first_net_prunes_exactly(scale):
    keras.utils.set_random_seed(0)
    model = randomize_bn(net("channels_first", scale))
    x = np.random.default_rng(0).normal(size=(2, 3, 12, 12)).astype("float32")
    graph, pruned = _check(model, x)
    # Squeeze-excite channels are prunable in this layout too.
    assert (graph.groups_of_layer_output("res_bn") >= 0).all()
    assert pruned.get_layer("stem").data_format == "channels_first"


def test_channels_first_matches_its_channels_last_twin():
    first, last = net("channels_first"), net("channels_last")
    g_first, g_last = kt.analyze(first), kt.analyze(last)
    assert g_first.num_groups == g_last.num_groups > 0
    assert kt.profile(first).flops == kt.profile(last).flops
    assert kt.profile(first).params == kt.profile(last).params
    # Flatten of a (C, H, W) tensor orders features channel-major; of
    # (H, W, C) channel-minor: the Dense rows map to the same groups either way.
    per = 6
    a = g_first.groups_of_layer_output("last")
    f_first = g_first.group_of_comp[g_first.comp_of[g_first.first_node("flat").out_maps[0]]]
    f_last = g_last.group_of_comp[g_last.comp_of[g_last.first_node("flat").out_maps[0]]]
    assert len(a) == per and f_first[0] == f_first[1] and f_last[0] != f_last[1]


def test_permute_between_layouts_and_channels_first_reshape():
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(5, 3, padding="same", name="c_last")(inputs)
    x = layers.BatchNormalization(name="bn_last")(x)
    x = layers.Permute((3, 1, 2), name="to_first")(x)  # (5, 8, 8)
    x = layers.Conv2D(4, 3, data_format="channels_first", name="c_first")(x)
    x = layers.ReLU()(x)
    x = layers.Reshape((4, 36), name="rows")(x)  # (C, H*W): channels stay whole
    x = layers.Conv1D(3, 3, data_format="channels_first", name="c1d")(x)
    x = layers.GlobalAveragePooling1D(data_format="channels_first")(x)
    model = randomize_bn(keras.Model(inputs, layers.Dense(2, name="out")(x)))
    graph = kt.analyze(model)
    assert graph.num_groups == 5 + 4 + 3
    _check(model, np.random.default_rng(1).normal(size=(2, 8, 8, 3)).astype("float32"))


def test_mixed_layouts_without_permute_are_a_clear_error():
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(4, 3, name="c_last")(inputs)
    x = layers.Conv2D(4, 3, data_format="channels_first", name="c_first")(x)
    model = keras.Model(inputs, layers.Dense(2)(layers.Flatten()(x)))
    with pytest.raises(ValueError, match=r"'c_first' \(Conv2D\) expects the channels of its input on axis 1.*'c_last'"):
        kt.analyze(model)


CHANNELS_FIRST_APPS = {"MobileNetV2": 32, "EfficientNetB0": 32, "MobileNetV3Small": 32, "ResNet50V2": 32}


@pytest.fixture
def channels_first():
    # float32: TensorFlow's CPU kernels have no NCHW float64 convolution.
    old = keras.config.image_data_format()
    keras.config.set_image_data_format("channels_first")
    yield
    keras.config.set_image_data_format(old)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CHANNELS_FIRST_APPS))
def test_channels_first_applications(name, channels_first):
    size = CHANNELS_FIRST_APPS[name]
    fn = getattr(keras.applications, name)
    kwargs = dict(weights=None, input_shape=(3, size, size), classes=10)
    if "classifier_activation" in inspect.signature(fn).parameters:
        kwargs["classifier_activation"] = None
    keras.utils.set_random_seed(0)
    model = fn(**kwargs)
    lively_statistics(model)
    x = preprocessed(fn, np.random.default_rng(0).uniform(0, 255, (2, 3, size, size)).astype("float32"))
    _check(model, x)


def test_one_channel_vectors_and_flatten_only_layouts():
    """Fuzz finds: an SE block pruned to one channel ((1, 1, 1) reads alike on
    either axis), and a channels_first input whose only layout hint is Flatten."""
    inputs = keras.Input((3, 8, 8))
    x = layers.Conv2D(1, 3, padding="same", data_format="channels_first", use_bias=False, name="c")(inputs)
    s = layers.GlobalAveragePooling2D(data_format="channels_first")(x)
    s = layers.Reshape((1, 1, 1), name="se_reshape")(s)
    s = layers.Conv2D(1, 1, activation="sigmoid", data_format="channels_first", name="excite")(s)
    x = layers.Multiply()([x, s])
    model = keras.Model(inputs, layers.Dense(2)(layers.GlobalAveragePooling2D(data_format="channels_first")(x)))
    assert kt.profile(model).flops > 0
    seq = keras.Sequential([keras.Input((2, 6, 6)), layers.ReLU(), layers.Flatten(data_format="channels_first"), layers.Dense(3)])
    graph = kt.analyze(seq)
    assert graph.first_node(seq.layers[0].name).in_axes == [1]
