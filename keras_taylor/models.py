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
