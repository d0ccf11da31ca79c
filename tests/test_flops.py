import keras
import numpy as np
import pytest
from keras import layers

import keras_taylor as kt


def hand_model():
    inputs = keras.Input((10, 10, 3))
    x = layers.Conv2D(4, 3, name="c1")(inputs)  # 8x8x4, bias
    x = layers.BatchNormalization(name="bn")(x)
    x = layers.ReLU()(x)
    x = layers.Conv2D(6, 3, strides=2, padding="same", use_bias=False, name="c2")(x)  # 4x4x6
    x = layers.Flatten(name="flat")(x)  # 96
    x = layers.Dense(5, name="fc")(x)
    return keras.Model(inputs, x)


def test_hand_counts():
    model = hand_model()
    p = kt.profile(model).by_name()
    assert p["c1"].flops == 8 * 8 * 3 * 3 * 3 * 4 and p["c1"].params == 3 * 3 * 3 * 4 + 4
    assert p["bn"].flops == 0 and p["bn"].params == 4 * 4
    assert p["c2"].flops == 4 * 4 * 3 * 3 * 4 * 6 and p["c2"].params == 3 * 3 * 4 * 6
    assert p["fc"].flops == 96 * 5 and p["fc"].params == 96 * 5 + 5
    total = kt.profile(model)
    assert total.params == model.count_params()
    assert total.flops == 6912 + 3456 + 480
    assert "total" in total.table()


def test_hand_counts_after_pruning():
    model = hand_model()
    gated = kt.add_gates(model)
    gated.get_layer("bn").gate.assign(np.array([1, 0, 1, 1], "float32"))
    gated.get_layer("c2").gate.assign(np.array([1, 1, 0, 0, 1, 1], "float32"))
    expected = {"c1": (8 * 8 * 27 * 3, 27 * 3 + 3), "c2": (4 * 4 * 9 * 3 * 4, 9 * 3 * 4), "fc": (64 * 5, 64 * 5 + 5), "bn": (0, 12)}
    for m in (gated, kt.prune(gated)):
        p = kt.profile(m).by_name()
        for name, (f, prm) in expected.items():
            assert (p[name].flops, p[name].params) == (f, prm), name
    assert kt.profile(kt.prune(gated)).params == kt.prune(gated).count_params()


@pytest.mark.slow
def test_resnet50_matches_he_et_al():
    model = keras.applications.ResNet50(weights=None, input_shape=(224, 224, 3))
    p = kt.profile(model)
    # Independent count from the layers' own output shapes.
    direct = 0
    for layer in model.layers:
        if isinstance(layer, layers.Conv2D):
            h, w, cout = layer.output.shape[1:]
            kh, kw, cin, _ = layer.kernel.shape
            direct += h * w * kh * kw * cin * cout
        elif isinstance(layer, layers.Dense):
            direct += layer.kernel.shape[0] * layer.kernel.shape[1]
    assert p.flops == direct
    # He et al. 2016, Table 1: 3.8e9 for ResNet-50 v1 (stride on the 1x1
    # conv, as keras.applications builds it; torchvision's v1.5 is 4.1e9).
    assert 3.80e9 < p.flops < 3.90e9, p.flops
    assert p.params == model.count_params()


def test_hand_counts_depthwise_separable_transposed():
    inputs = keras.Input((8, 8, 3))
    x = layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="dw")(inputs)  # 8x8x6
    x = layers.SeparableConv2D(4, 3, strides=2, padding="same", depth_multiplier=2, name="sep")(x)  # 4x4x4
    x = layers.Conv2DTranspose(5, 3, strides=2, padding="same", name="tr")(x)  # 8x8x5
    model = keras.Model(inputs, layers.GlobalAveragePooling2D()(x))
    p = kt.profile(model).by_name()
    assert p["dw"].flops == 8 * 8 * 9 * 6 and p["dw"].params == 9 * 6 + 6
    # depthwise 6 -> 12 channels at the output resolution, then 12 -> 4 pointwise.
    assert p["sep"].flops == 4 * 4 * 9 * 12 + 4 * 4 * 12 * 4
    assert p["sep"].params == 9 * 12 + 12 * 4 + 4
    # each of the 4x4 input positions scatters a 3x3x4x5 kernel.
    assert p["tr"].flops == 4 * 4 * 9 * 4 * 5 and p["tr"].params == 9 * 4 * 5 + 5
    assert kt.profile(model).params == model.count_params()
