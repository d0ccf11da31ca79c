"""Helpers for checking pruning on keras.applications-style models.

Used by the test suite and `benchmarks/applications_sweep.py`.
"""

from __future__ import annotations

import importlib
import inspect

import keras
import numpy as np

# Smallest input each family accepts with weights=None (Keras checks these);
# every other constructor takes 32×32.
MIN_SIZE = {"InceptionV3": 75, "InceptionResNetV2": 75, "Xception": 71, "NASNetMobile": 224, "NASNetLarge": 331}


def application_constructors() -> dict:
    """`{name: constructor}` of every model in `keras.applications`."""
    out = {}
    for name in dir(keras.applications):
        fn = getattr(keras.applications, name)
        if callable(fn) and name[0].isupper() and "weights" in inspect.signature(fn).parameters:
            out[name] = fn
    return out


def preprocessed(fn, x):
    """Applies the family's own `preprocess_input` (MobileNet expects [-1, 1])."""
    module = importlib.import_module(fn.__module__)
    pre = getattr(module, "preprocess_input", None)
    return np.asarray(pre(x.copy())) if pre is not None else x


def lively_statistics(model, seed=0):
    """Makes a freshly initialised model's channels carry signal, so that pruning
    them visibly changes the output and the equality check is not vacuous.

    ConvNeXt's LayerScale starts at 1e-6 (set to 1), and BN at init lets
    MobileNet's signal die out: BN gets trained-looking statistics. Gains stay
    at most 1 (`gamma / sqrt(var) <= 1`) so very deep nets (EfficientNetV2-L)
    do not amplify activations block after block into a chaotic regime where
    rounding noise alone would separate two equal computations.
    """
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if type(layer).__name__ == "LayerScale":
            layer.set_weights([np.ones_like(w) for w in layer.get_weights()])
        elif isinstance(layer, keras.layers.BatchNormalization):
            new = []
            for v in layer.weights:
                shape = tuple(v.shape)
                if "gamma" in v.name:
                    new.append(rng.uniform(0.5, 1.0, shape))
                elif "variance" in v.name:
                    new.append(rng.uniform(1.0, 1.5, shape))
                else:  # beta, moving_mean
                    new.append(rng.normal(0.0, 0.3, shape))
            layer.set_weights(new)


def random_groups(graph, fraction, rng) -> set:
    """A random `fraction` of `graph`'s groups, drawn so that every
    channel-making layer keeps at least one channel
    (`keras_taylor.selection.random_removal`)."""
    from keras_taylor.selection import random_removal

    return random_removal(graph, fraction, rng)


def prune_application(fn, size=None, seed=0, fraction=0.3) -> dict:
    """Builds `fn` (weights=None, logits), gates it, removes a random `fraction`
    of its channel groups (every layer keeps a channel), applies surgery, and
    measures the pruned model against the gated model with those gates at 0.

    Runs in the current `keras.config.floatx()`. Returns a record with the
    relative error, how much pruning changed the output, FLOPs and params
    before and after.
    """
    import keras_taylor as kt

    name = fn.__name__
    size = size or MIN_SIZE.get(name, 32)
    kwargs = dict(weights=None, input_shape=(size, size, 3), classes=10)
    if "classifier_activation" in inspect.signature(fn).parameters:
        kwargs["classifier_activation"] = None  # compare logits, not a saturated softmax
    keras.utils.set_random_seed(seed)
    model = fn(**kwargs)
    lively_statistics(model, seed)
    gated = kt.add_gates(model)
    graph = kt.analyze(gated)
    rng = np.random.default_rng(seed)
    removed = random_groups(graph, fraction, rng)
    for layer in gated.layers:
        if isinstance(layer, kt.ChannelGate):
            of = graph.groups_of_layer_output(layer.name)
            layer.gate.assign(np.where(np.isin(of, list(removed)), 0.0, 1.0).astype("float32"))
    pruned = kt.apply_plan(gated, kt.PruningPlan.from_groups(graph, removed))
    x = preprocessed(fn, rng.uniform(0, 255, (2, size, size, 3)).astype(keras.config.floatx()))
    a, b = np.asarray(pruned(x, training=False)), np.asarray(gated(x, training=False))
    c = np.asarray(model(x, training=False))
    scale = max(float(np.max(np.abs(b))), 1e-12)
    before, after = kt.profile(model), kt.profile(pruned)
    return {
        "name": name,
        "input": size,
        "dtype": keras.config.floatx(),
        "groups": graph.num_groups,
        "removed_groups": len(removed),
        "rel_err": float(np.max(np.abs(a - b))) / scale,
        "change_vs_unpruned": float(np.max(np.abs(c - b))) / scale,
        "flops_before": before.flops,
        "flops_after": after.flops,
        "params_before": before.params,
        "params_after": after.params,
        "params_keras_after": int(pruned.count_params()),
        "pruned_dtype": pruned.dtype,
    }


def reference_scores(gated, x, y, batch, loss, graph=None):
    """Taylor-FO-BN scores from a plain eager `GradientTape`, independent of
    the scoring train step: per minibatch `(Σ_members ∂L/∂m)²` per group,
    averaged over the minibatches of `x` (the model's weights are not updated).
    """
    import tensorflow as tf

    import keras_taylor as kt

    graph = graph if graph is not None else kt.analyze(gated)
    gates = [l for l in gated.layers if isinstance(l, kt.ChannelGate)]
    total = np.zeros(graph.num_groups)
    n = 0
    for i in range(0, len(x), batch):
        with tf.GradientTape() as tape:
            for l in gates:
                tape.watch(l.gate.value)
            value = loss(y[i : i + batch], gated(x[i : i + batch], training=True))
        grads = tape.gradient(value, [l.gate.value for l in gates])
        group_grad = np.zeros(graph.num_groups)
        for layer, g in zip(gates, grads):
            groups = graph.groups_of_layer_output(layer.name)
            np.add.at(group_grad, groups[groups >= 0], g.numpy().astype("float64")[groups >= 0])
        total += group_grad**2
        n += 1
    return total / n
