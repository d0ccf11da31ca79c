"""Small reference CNNs used by the examples and tests.

These are ordinary Keras models built from stock layers; keras_taylor prunes
any model of supported layers, not only these.
"""

from __future__ import annotations

from typing import Sequence

import keras
from keras import layers


def resnet(
    input_shape: Sequence[int] = (28, 28, 1),
    num_classes: int = 10,
    widths: Sequence[int] = (16, 32, 64),
    blocks_per_stage: int = 1,
    name: str = "resnet",
    bn_momentum: float = 0.9,
) -> keras.Model:
    """A CIFAR-style ResNet (He et al. 2016, §4.2) with projection shortcuts.

    `blocks_per_stage=3` with widths (16, 32, 64) is ResNet-20. Every block is
    conv-BN-ReLU-conv-BN, added to its shortcut, then ReLU; a stage that changes
    width or stride projects the shortcut with a 1×1 conv + BN.

    Args:
        input_shape: input shape, channels last. Defaults to `(28, 28, 1)`.
        num_classes: number of output classes. Defaults to `10`.
        widths: channels of each stage. Defaults to `(16, 32, 64)`.
        blocks_per_stage: residual blocks per stage. Defaults to `1`.
        name: model name. Defaults to `"resnet"`.
        bn_momentum: BatchNormalization momentum. Defaults to `0.9` (PyTorch's
            0.1 in its convention), so moving statistics settle within the
            few hundred steps of a short CPU run; Keras's 0.99 lags there.

    Returns:
        A functional `keras.Model` that outputs logits.
    """
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = layers.Conv2D(widths[0], 3, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = layers.BatchNormalization(momentum=bn_momentum, name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    in_width = widths[0]
    for s, width in enumerate(widths):
        for b in range(blocks_per_stage):
            stride = 2 if (s > 0 and b == 0) else 1
            p = f"s{s}b{b}"
            y = layers.Conv2D(width, 3, strides=stride, padding="same", use_bias=False, name=f"{p}_conv1")(x)
            y = layers.BatchNormalization(momentum=bn_momentum, name=f"{p}_bn1")(y)
            y = layers.ReLU(name=f"{p}_relu1")(y)
            y = layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"{p}_conv2")(y)
            y = layers.BatchNormalization(momentum=bn_momentum, name=f"{p}_bn2")(y)
            if stride != 1 or width != in_width:
                x = layers.Conv2D(width, 1, strides=stride, use_bias=False, name=f"{p}_proj")(x)
                x = layers.BatchNormalization(momentum=bn_momentum, name=f"{p}_proj_bn")(x)
            x = layers.Add(name=f"{p}_add")([x, y])
            x = layers.ReLU(name=f"{p}_out")(x)
            in_width = width
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=name)


def vgg(
    input_shape: Sequence[int] = (28, 28, 1),
    num_classes: int = 10,
    widths: Sequence[int] = (16, 32),
    dense_units: int = 64,
    name: str = "vgg",
    bn_momentum: float = 0.9,
) -> keras.Sequential:
    """A small VGG-style Sequential CNN: [conv-BN-ReLU, conv-ReLU, maxpool]×n, Flatten, Dense.

    The second conv of each stage has a bias and no BN, so the model has both
    gate placements (after BN, after a biased conv), and the Flatten→Dense
    head needs the channel→feature index mapping.

    Args:
        input_shape: input shape, channels last. Defaults to `(28, 28, 1)`.
        num_classes: number of output classes. Defaults to `10`.
        widths: channels of each stage. Defaults to `(16, 32)`.
        dense_units: units of the hidden Dense layer. Defaults to `64`.
        name: model name. Defaults to `"vgg"`.
        bn_momentum: BatchNormalization momentum. Defaults to `0.9`.

    Returns:
        A `keras.Sequential` model that outputs logits.
    """
    stack: list = [keras.Input(shape=tuple(input_shape))]
    for s, width in enumerate(widths):
        stack += [
            layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"conv{s}a"),
            layers.BatchNormalization(momentum=bn_momentum, name=f"bn{s}a"),
            layers.ReLU(name=f"relu{s}a"),
            layers.Conv2D(width, 3, padding="same", activation="relu", name=f"conv{s}b"),
            layers.MaxPooling2D(name=f"pool{s}"),
        ]
    stack += [
        layers.Flatten(name="flatten"),
        layers.Dense(dense_units, activation="relu", name="fc1"),
        layers.Dropout(0.25, name="drop"),
        layers.Dense(num_classes, name="logits"),
    ]
    return keras.Sequential(stack, name=name)


@keras.saving.register_keras_serializable(package="keras_taylor")
class ClassTokenPosition(keras.layers.Layer):
    """Prepends a learned class token to a token sequence and adds a learned
    position embedding: `y = concat([cls, x], axis=1) + pos` (ViT, Dosovitskiy
    et al. 2021, eq. 1).

    Input `(batch, tokens, dim)`, output `(batch, tokens + 1, dim)`. Both
    weights are per embedding channel (`cls`: `(dim,)`, `pos`:
    `(tokens + 1, dim)`), so the layer keeps channels apart; keras_taylor's
    handler (`keras_taylor.attention`) slices them with the embedding width.
    """

    def build(self, input_shape):
        tokens, dim = int(input_shape[-2]), int(input_shape[-1])
        self.cls = self.add_weight(name="cls", shape=(dim,), initializer="zeros")
        self.pos = self.add_weight(
            name="pos", shape=(tokens + 1, dim), initializer=keras.initializers.RandomNormal(stddev=0.02)
        )
        self.built = True

    def call(self, x):
        cls = keras.ops.broadcast_to(keras.ops.cast(self.cls, x.dtype), (keras.ops.shape(x)[0], 1, x.shape[-1]))
        return keras.ops.concatenate([cls, x], axis=1) + keras.ops.cast(self.pos, x.dtype)

    def compute_output_shape(self, input_shape):
        tokens = None if input_shape[-2] is None else input_shape[-2] + 1
        return (*input_shape[:-2], tokens, input_shape[-1])


def vit(
    input_shape: Sequence[int] = (28, 28, 1),
    num_classes: int = 10,
    patch_size: int = 7,
    dim: int = 64,
    depth: int = 4,
    num_heads: int = 4,
    mlp_dim: int = 128,
    key_dim: int | None = None,
    num_key_value_heads: int | None = None,
    name: str = "vit",
) -> keras.Model:
    """A small functional Vision Transformer (Dosovitskiy et al. 2021).

    Patch embedding (a `patch_size` × `patch_size` conv with that stride),
    class token and learned position embedding (`ClassTokenPosition`), then
    `depth` pre-norm blocks — `x + MHA(LN(x))`, `x + MLP(LN(x))` with a GELU
    MLP of `mlp_dim` units — a final LayerNormalization, the class token, and
    a Dense head. Stock Keras layers except `ClassTokenPosition` (registered,
    so `.keras` files load without `custom_objects`).

    Args:
        input_shape: image shape, channels last. Defaults to `(28, 28, 1)`.
        num_classes: output classes. Defaults to `10`.
        patch_size: patch side; must divide the image sides. Defaults to `7`.
        dim: embedding (residual-stream) width. Defaults to `64`.
        depth: transformer blocks. Defaults to `4`.
        num_heads: attention heads per block (query heads with GQA).
            Defaults to `4`.
        mlp_dim: hidden units of each block's MLP. Defaults to `128`.
        key_dim: per-head query/key/value width. Defaults to `dim // num_heads`.
        num_key_value_heads: when set, blocks use
            `keras.layers.GroupQueryAttention` with this many key/value heads.
            Defaults to `None` (`MultiHeadAttention`).
        name: model name. Defaults to `"vit"`.

    Returns:
        A functional `keras.Model` that outputs logits.
    """
    h, w = int(input_shape[0]), int(input_shape[1])
    if h % patch_size or w % patch_size:
        raise ValueError(
            f"Expected patch_size to divide the image sides. Received: patch_size={patch_size} "
            f"for input_shape={tuple(input_shape)}."
        )
    key_dim = key_dim or max(1, dim // num_heads)
    tokens = (h // patch_size) * (w // patch_size)
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = layers.Conv2D(dim, patch_size, strides=patch_size, name="patch_embed")(inputs)
    x = layers.Reshape((tokens, dim), name="patch_tokens")(x)
    x = ClassTokenPosition(name="tokens")(x)
    for b in range(depth):
        p = f"block{b}"
        y = layers.LayerNormalization(epsilon=1e-6, name=f"{p}_ln1")(x)
        if num_key_value_heads:
            y = layers.GroupQueryAttention(
                head_dim=key_dim, num_query_heads=num_heads, num_key_value_heads=num_key_value_heads, name=f"{p}_attn"
            )(y, y)
        else:
            y = layers.MultiHeadAttention(num_heads=num_heads, key_dim=key_dim, name=f"{p}_attn")(y, y)
        x = layers.Add(name=f"{p}_add1")([x, y])
        y = layers.LayerNormalization(epsilon=1e-6, name=f"{p}_ln2")(x)
        y = layers.Dense(mlp_dim, activation="gelu", name=f"{p}_mlp1")(y)
        y = layers.Dense(dim, name=f"{p}_mlp2")(y)
        x = layers.Add(name=f"{p}_add2")([x, y])
    x = layers.LayerNormalization(epsilon=1e-6, name="final_ln")(x)
    x = layers.Cropping1D((0, tokens), name="class_token")(x)
    x = layers.Flatten(name="flatten")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=name)
