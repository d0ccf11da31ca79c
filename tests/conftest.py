"""Shared fixtures: tiny seeded models (≈16×16 inputs, ≤8 filters)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import pytest
from keras import layers

from keras_taylor import models


def randomize_bn(model, seed=0):
    """Gives every BatchNormalization non-trivial statistics, so BN(0) != 0."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            new = []
            for v in layer.weights:
                shape = tuple(v.shape)
                if "variance" in v.name:
                    new.append(rng.uniform(0.5, 1.5, shape).astype("float32"))
                elif "gamma" in v.name:
                    new.append(rng.uniform(0.5, 1.5, shape).astype("float32"))
                else:
                    new.append(rng.normal(0, 0.5, shape).astype("float32"))
            layer.set_weights(new)
    return model


def plain_cnn():
    inputs = keras.Input((16, 16, 3), name="x")
    x = layers.Conv2D(8, 3, padding="same", name="c1")(inputs)
    x = layers.BatchNormalization(name="b1")(x)
    x = layers.ReLU(name="r1")(x)
    x = layers.ZeroPadding2D(1, name="pad")(x)
    x = layers.Conv2D(6, 3, strides=2, activation="relu", name="c2")(x)
    x = layers.AveragePooling2D(2, name="avg")(x)
    x = layers.Conv2D(8, 1, use_bias=False, name="c3")(x)
    x = layers.BatchNormalization(name="b3")(x)
    x = layers.Activation("relu", name="a3")(x)
    x = layers.Dropout(0.1, name="drop")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dense(8, activation="relu", name="fc")(x)
    outputs = layers.Dense(5, name="out")(x)
    return keras.Model(inputs, outputs, name="plain")


def residual():
    return models.resnet(input_shape=(16, 16, 3), num_classes=5, widths=(4, 8), blocks_per_stage=2, name="res")


def vgg_sequential():
    return models.vgg(input_shape=(16, 16, 3), num_classes=5, widths=(4, 8), dense_units=8, name="vggseq")


def concat_net():
    inputs = keras.Input((16, 16, 3))
    a = layers.Conv2D(4, 3, padding="same", name="a")(inputs)
    a = layers.BatchNormalization(name="a_bn")(a)
    b = layers.Conv2D(3, 1, padding="same", name="b")(inputs)
    b = layers.ReLU(name="b_relu")(b)
    x = layers.Concatenate(name="cat")([a, b])
    x = layers.MaxPooling2D(name="mp")(x)
    c = layers.Conv2D(7, 3, padding="same", name="c")(x)
    c = layers.BatchNormalization(name="c_bn")(c)
    x = layers.Add(name="add")([x, c])
    x = layers.Flatten(name="flat")(x)
    outputs = layers.Dense(4, name="out")(x)
    return keras.Model(inputs, outputs, name="concat")


def depthwise_net():
    """MobileNet-style: conv-BN-ReLU, depthwise (multiplier 2, biased) -BN-ReLU, residual."""
    inputs = keras.Input((16, 16, 3))
    x = layers.Conv2D(4, 3, padding="same", use_bias=False, name="stem")(inputs)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_relu")(x)
    y = layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="dw")(x)
    y = layers.BatchNormalization(name="dw_bn")(y)
    y = layers.ReLU(name="dw_relu")(y)
    y = layers.Conv2D(4, 1, name="pw")(y)
    x = layers.Add(name="add")([x, y])
    x = layers.DepthwiseConv2D(3, strides=2, padding="same", name="dw_biased")(x)
    x = layers.ReLU(name="relu2")(x)
    x = layers.SeparableConv2D(6, 3, padding="same", depth_multiplier=2, activation="relu", name="sep")(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(3, name="out")(x), name="depthwise")


def transpose_net():
    """Encoder-decoder with a transposed conv."""
    inputs = keras.Input((16, 16, 3))
    x = layers.Conv2D(6, 3, strides=2, padding="same", name="enc")(inputs)
    x = layers.BatchNormalization(name="enc_bn")(x)
    x = layers.ReLU()(x)
    x = layers.Conv2DTranspose(5, 3, strides=2, padding="same", name="dec")(x)
    x = layers.ReLU()(x)
    x = layers.Conv2D(4, 3, padding="same", name="head")(x)
    x = layers.ReLU()(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(2, name="out")(x), name="transpose")


def preprocessing_net():
    """Rescaling/Normalization on the input, PReLU, Reshape round trip, LayerNorm (channel-fixing)."""
    inputs = keras.Input((16, 16, 3))
    x = layers.Rescaling(1 / 255.0)(inputs)
    x = layers.Normalization(mean=[0.1, 0.2, 0.3], variance=[1.0, 2.0, 3.0])(x)
    x = layers.Conv2D(6, 3, padding="same", name="c1")(x)
    x = layers.PReLU(shared_axes=[1, 2], name="pr1")(x)
    x = layers.Reshape((256, 6), name="to_seq")(x)
    x = layers.Conv1D(7, 3, padding="same", name="c1d")(x)
    x = layers.ReLU()(x)
    x = layers.Reshape((16, 16, 7), name="to_img")(x)
    y = layers.Conv2D(5, 3, padding="same", name="c2")(x)
    y = layers.LayerNormalization(name="ln")(y)
    x = layers.Conv2D(4, 3, padding="same", name="c3")(layers.Concatenate()([x, y]))
    x = layers.PReLU(name="pr3")(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(2, name="out")(x), name="preprocessing")


def grouped_net():
    """Grouped convs: ConvNeXt-style depthwise form (groups = channels) and groups=2."""
    inputs = keras.Input((16, 16, 3))
    x = layers.Conv2D(8, 3, padding="same", name="c")(inputs)
    x = layers.BatchNormalization(name="bn")(x)
    y = layers.Conv2D(8, 3, padding="same", groups=8, name="dwform")(x)
    y = layers.ReLU()(y)
    y = layers.Conv2D(6, 3, padding="same", groups=2, name="grp")(y)
    y = layers.BatchNormalization(name="gbn")(y)
    y = layers.ReLU()(y)
    y = layers.Conv2D(8, 1, groups=2, name="grp2")(y)
    y = layers.ReLU()(y)
    y = layers.GlobalAveragePooling2D()(y)
    return keras.Model(inputs, layers.Dense(2, name="out")(y), name="grouped")


def ops_se_net():
    """MobileNetV3-style hard-swish and squeeze-excite written with keras.ops arithmetic."""
    inputs = keras.Input((16, 16, 3))
    x = layers.Conv2D(8, 3, padding="same", use_bias=False, name="c1")(inputs)
    x = layers.BatchNormalization(name="bn1")(x)
    x = layers.Multiply(name="hswish")([x, layers.ReLU(6.0)(x + 3.0) * (1.0 / 6.0)])
    s = layers.GlobalAveragePooling2D(keepdims=True, name="se_pool")(x)
    s = layers.Conv2D(4, 1, activation="relu", name="se_reduce")(s)
    s = layers.Conv2D(8, 1, name="se_expand")(s)
    s = layers.ReLU(6.0)(s + 3.0) * (1.0 / 6.0)
    x = layers.Multiply(name="se_mul")([x, layers.UpSampling2D(16, name="se_up")(s)])
    x = layers.Conv2D(6, 3, padding="same", name="c2")(x)
    x = layers.ReLU()(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(2, name="out")(x), name="ops_se")


FACTORIES = {
    "grouped": grouped_net,
    "ops_se": ops_se_net,
    "preprocessing": preprocessing_net,
    "plain": plain_cnn,
    "residual": residual,
    "vgg_sequential": vgg_sequential,
    "concat": concat_net,
    "depthwise": depthwise_net,
    "transpose": transpose_net,
}


@pytest.fixture(params=sorted(FACTORIES))
def factory(request):
    return FACTORIES[request.param]


def make(name_or_fn, seed=0):
    keras.utils.set_random_seed(seed)
    fn = FACTORIES[name_or_fn] if isinstance(name_or_fn, str) else name_or_fn
    return randomize_bn(fn(), seed)


def images(n=8, seed=0, shape=(16, 16, 3)):
    return np.random.default_rng(seed).uniform(-1, 1, (n, *shape)).astype("float32")


def rel_err(a, b):
    a, b = np.asarray(a, "float64"), np.asarray(b, "float64")
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


def run_notebook(path, workdir, smoke=True, timeout=600):
    """Executes a notebook in a real Jupyter kernel (nbclient) with `SMOKE = True`
    in its `parameters` cell; returns the text of every stream output."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1 and "SMOKE = False" in params[0].source, "one tagged parameters cell with SMOKE = False"
    if smoke:
        params[0].source = params[0].source.replace("SMOKE = False", "SMOKE = True")
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}).execute()
    return "".join(
        out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
        if out.get("output_type") == "stream"
    )
