"""Bad input gets a clear error that names the offending object and what was
expected, and leaves the user's model untouched.

One table, one test: each case builds a small model, snapshots it completely,
calls one keras_taylor function with bad input, checks the exception type and
that its message names the offending object (layer name / class / argument)
and says what was expected, then checks the snapshot is unchanged.

A case that a future change breaks may be marked `xfail(strict=True)` with
the reason (`case(..., xfail="...")`) until it is fixed.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import keras
import numpy as np
import pytest
from keras import layers

import keras_taylor as kt
from conftest import make
from keras_taylor.export import export_saved_model
from keras_taylor.latency import measure_latency
from keras_taylor.plan import FORMAT

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


# --------------------------------------------------------------------------
# Snapshot: everything about a model that a failed call must leave as it was.
# --------------------------------------------------------------------------

def _array(v) -> tuple:
    a = np.asarray(keras.ops.convert_to_numpy(v.value if hasattr(v, "value") else v))
    return (str(a.dtype), a.shape, a.tobytes())


def _config(obj) -> Any:
    """`get_config()` as canonical JSON text, or why there is none."""
    try:
        cfg = obj.get_config()
    except Exception as e:  # subclassed models may not implement it
        return f"<get_config raised {type(e).__name__}>"
    try:
        return json.dumps(cfg, sort_keys=True)
    except TypeError:  # not JSON-able: compare its repr-free structure instead
        return json.dumps(cfg, sort_keys=True, default=lambda o: f"<{type(o).__name__}>")


def _nodes(op) -> tuple:
    # Keras 3 has no public accessor for a layer's call history; a reused layer
    # or op gains an inbound node, which is the only trace some mutations leave.
    return (len(getattr(op, "_inbound_nodes", ()) or ()), len(getattr(op, "_outbound_nodes", ()) or ()))


def _operations(model) -> list:
    try:
        return list(model.operations)  # Functional: layers and keras.ops nodes
    except Exception:
        return list(model.layers)


def snapshot(model) -> dict | None:
    if model is None:
        return None
    snap = {
        "class": type(model).__name__,
        "name": model.name,
        "built": model.built,
        "trainable": model.trainable,
        "config": _config(model),
        "model_nodes": _nodes(model),
        "layers": {
            f"{i}:{l.name}": (id(l), type(l).__name__, l.built, l.trainable, _config(l))
            for i, l in enumerate(model.layers)
        },
        # (inbound, outbound) node counts of every layer and keras.ops node.
        "nodes": {f"{i}:{o.name}": (id(o), type(o).__name__, _nodes(o)) for i, o in enumerate(_operations(model))},
        # Every variable of every layer: trainable weights, BN moving
        # statistics, gates, seed-generator states.
        "variables": {
            f"{i}:{l.name}": [(v.path, v.trainable, _array(v)) for v in l.variables]
            for i, l in enumerate(model.layers)
        },
        "weights": [(v.path, _array(v)) for v in model.weights],
        "gates": {k: _array(v) for k, v in kt.gate_values(model).items()} if kt.is_gated(model) else None,
    }
    try:
        snap["io"] = [tuple(t.shape) for t in [*model.inputs, *model.outputs]]
    except Exception as e:
        snap["io"] = f"<{type(e).__name__}>"
    return snap


def _first_difference(a, b, path="snapshot") -> str | None:
    if type(a) is not type(b):
        return f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        if a.keys() != b.keys():
            return f"{path}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            d = _first_difference(a[k], b[k], f"{path}[{k!r}]")
            if d:
                return d
        return None
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            d = _first_difference(x, y, f"{path}[{i}]")
            if d:
                return d
        return None
    return None if a == b else f"{path}: {str(a)[:120]!r} != {str(b)[:120]!r}"


# --------------------------------------------------------------------------
# Small models.
# --------------------------------------------------------------------------

class Doubler(layers.Layer):
    """A custom layer keras_taylor has no handler for."""

    def call(self, x):
        return x * 2.0


def _through(layer, input_shape=(8, 8, 2)):
    """conv (prunable channels) -> `layer` -> GAP -> Dense."""
    inputs = keras.Input(input_shape)
    x = layers.Conv2D(4, 3, name="conv")(inputs)
    x = layer(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, layers.Dense(2, name="out")(x), name="through")


def unknown_layer_model():
    return _through(Doubler(name="doubler"))


class ValueBranch(layers.Layer):
    """A composite layer whose `call` branches on a tensor value: it cannot
    be traced (keras_taylor.tracing), so it stays one fixed unit."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.inner = layers.Conv2D(4, 1, name=f"{self.name}_inner")

    def call(self, x):
        return self.inner(x if float(keras.ops.convert_to_numpy(keras.ops.sum(x))) > 0 else -x)

    def build(self, shape):
        self.inner.build(shape)

    def compute_output_shape(self, shape):
        return (*shape[:-1], 4)


def untraceable_model():
    return _through(ValueBranch(name="branchy"))


def lambda_model():
    return _through(layers.Lambda(lambda t: t * 2.0, name="lam"))


class SubNet(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = layers.Conv2D(4, 3, name="conv")
        self.bn = layers.BatchNormalization(name="bn")
        self.gap = layers.GlobalAveragePooling2D(name="gap")
        self.out = layers.Dense(2, name="out")

    def call(self, x, training=False):
        return self.out(self.gap(self.bn(self.conv(x), training=training)))


def subclassed_model():
    net = SubNet(name="subnet")
    net(np.zeros((1, 8, 8, 2), "float32"))
    return net


def unbuilt_sequential():
    return keras.Sequential(
        [layers.Conv2D(4, 3, name="conv"), layers.GlobalAveragePooling2D(), layers.Dense(2, name="out")],
        name="unbuilt",
    )


def bn_over_height_model():
    inputs = keras.Input((8, 8, 2))
    x = layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    x = layers.BatchNormalization(axis=1, name="bn_h")(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(2, name="out")(x), name="bn_h_model")


def reshape_model():
    """(8, 8, 4) -> (8, 32): the channel axis is merged with a spatial one."""
    inputs = keras.Input((8, 8, 2))
    x = layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    x = layers.Reshape((8, 32), name="rs")(x)
    x = layers.GlobalAveragePooling1D()(x)
    return keras.Model(inputs, layers.Dense(2, name="out")(x), name="reshape")


def permute_model():
    """Permute((3, 1, 2)) moves the channels to axis 1, and a channels-last conv reads them."""
    inputs = keras.Input((8, 6, 2))
    x = layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    x = layers.Permute((3, 1, 2), name="perm")(x)
    x = layers.Conv2D(3, 1, name="c2")(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(2, name="out")(x), name="permute")


def partly_fixed_model():
    """Channels 0-2 of 'mix' are tied (Add) to the model input: fixed."""
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(6, 3, padding="same", name="mix")(inputs)
    side = layers.Conv2D(3, 1, name="side")(inputs)
    x = layers.Add(name="add")([x, layers.Concatenate(name="cat")([inputs, side])])
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(2, name="out")(x), name="partly_fixed")


def output_gate_model(with_op: bool):
    """Gated model whose BN(scale=False) has an output-multiplying gate, one gate at 0."""
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(4, 3, padding="same", name="c")(inputs)
    x = layers.BatchNormalization(scale=False, name="bn")(x)
    x = layers.ReLU(name="r")(x)
    if with_op:
        x = x * 2.0  # a keras.ops node in the graph
    x = layers.Conv2D(4, 3, name="c2")(x)
    x = layers.GlobalAveragePooling2D()(x)
    gated = kt.add_gates(keras.Model(inputs, layers.Dense(2, name="out")(x), name="outgate"))
    gated.get_layer("bn").gate.assign(np.array([0, 1, 1, 1], "float32"))
    return gated


def gated(name="plain"):
    return kt.add_gates(make(name))


def gated_with_frozen_unknown():
    """conv1 is gated and prunable; conv2's channels flow into a Doubler (frozen)."""
    inputs = keras.Input((8, 8, 2))
    x = layers.Conv2D(4, 3, name="conv1")(inputs)
    x = layers.ReLU()(x)
    x = layers.Conv2D(4, 3, name="conv2")(x)
    x = Doubler(name="doubler")(x)
    x = layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, layers.Dense(2, name="out")(x), name="frozen")
    return kt.add_gates(model, on_unknown="freeze")


def compiled(model):
    model.compile(optimizer="sgd", loss=LOSS)
    return model


def channels_first_pool_model():
    """A channels-last conv read by a channels_first pooling (H would be taken for C)."""
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(8, 3, padding="same", name="conv")(inputs)
    x = layers.GlobalAveragePooling2D(data_format="channels_first", name="cf_gap")(x)
    return keras.Model(inputs, layers.Dense(2, name="out")(x), name="cf_pool")


# --------------------------------------------------------------------------
# The table.
# --------------------------------------------------------------------------

@dataclass
class Ctx:
    tmp_path: Any
    monkeypatch: Any


@dataclass
class Case:
    build: Callable[[], Any] | None  # the user's model, snapshotted around the call
    call: Callable[[Any, Ctx], Any]
    raises: type
    match: tuple  # regexes that must all occur in the message
    forbid: tuple = field(default=())  # regexes that must not occur


def case(id, build, call, raises, *match, forbid=(), xfail=None):
    marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
    return pytest.param(Case(build, call, raises, match, tuple(forbid)), id=id, marks=marks)


def Plan(**removed):
    return kt.PruningPlan(removed=removed)


def fit_with(model, **kwargs):
    x = np.zeros((4, *model.inputs[0].shape[1:]), "float32")
    y = np.zeros((4,), "int64")
    model.fit(x, y, batch_size=2, epochs=1, verbose=0, callbacks=[kt.TaylorPruning(**kwargs)])


def fake_backend(ctx, name="jax"):
    ctx.monkeypatch.setattr(keras.backend, "backend", lambda: name)


UNKNOWN = (r"'doubler'", r"\bDoubler\b", r"register_handler", r"on_unknown='freeze'")
LAMBDA = (r"'lam'", r"\bLambda\b", r"register_handler", r"on_unknown='freeze'")
SUBCLASSED = (r"'subnet'", r"\bSubNet\b", r"subclassed", r"functional API")
UNBUILT = (r"'unbuilt'", r"Expected a built Sequential", r"keras\.Input|model\.build")
# Wording differs between the channels-last-only analysis and the one that
# follows layouts; both name the layer and the axis they expected.
BN_AXIS = (r"'bn_h'", r"\bBatchNormalization\b", r"(?i)expect", r"axis[= ]1")
NOT_PRUNABLE = r"Expected the plan's layers to be prunable layers of model 'plain'"

UNTRACEABLE = (r"'branchy'", r"\bValueBranch\b", r"register_handler", r"on_unknown='freeze'")

CASES = [
    # ---- composite layers that cannot be traced --------------------------------
    case("add_gates-untraceable_composite", untraceable_model, lambda m, c: kt.add_gates(m), ValueError, *UNTRACEABLE),
    case("apply_plan-untraceable_composite", untraceable_model,
         lambda m, c: kt.apply_plan(m, Plan(conv=[0])), ValueError, *UNTRACEABLE),
    # ---- layers without a handler on a prunable path ---------------------------
    case("add_gates-unknown_layer", unknown_layer_model, lambda m, c: kt.add_gates(m), ValueError, *UNKNOWN),
    case("analyze-unknown_layer", unknown_layer_model, lambda m, c: kt.analyze(m), ValueError, *UNKNOWN),
    case("apply_plan-unknown_layer", unknown_layer_model,
         lambda m, c: kt.apply_plan(m, Plan(conv=[0])), ValueError, *UNKNOWN),
    case("prune-gated_with_freeze-unknown_layer", gated_with_frozen_unknown,
         lambda m, c: kt.prune(m), ValueError, *UNKNOWN),
    case("add_gates-lambda", lambda_model, lambda m, c: kt.add_gates(m), ValueError, *LAMBDA),
    case("analyze-lambda", lambda_model, lambda m, c: kt.analyze(m), ValueError, *LAMBDA),
    case("apply_plan-lambda", lambda_model,
         lambda m, c: kt.apply_plan(m, Plan(conv=[0])), ValueError, *LAMBDA),

    # ---- models whose graph cannot be read ---------------------------------------
    case("add_gates-subclassed", subclassed_model, lambda m, c: kt.add_gates(m), ValueError, *SUBCLASSED),
    case("analyze-subclassed", subclassed_model, lambda m, c: kt.analyze(m), ValueError, *SUBCLASSED),
    case("apply_plan-subclassed", subclassed_model,
         lambda m, c: kt.apply_plan(m, Plan(conv=[0])), ValueError, *SUBCLASSED),
    case("profile-subclassed", subclassed_model, lambda m, c: kt.profile(m), ValueError, *SUBCLASSED),
    case("prune-subclassed", subclassed_model, lambda m, c: kt.prune(m), ValueError,
         r"'subnet'", r"Expected a gated model"),
    case("strip_gates-subclassed", subclassed_model, lambda m, c: kt.strip_gates(m), ValueError,
         *SUBCLASSED, forbid=(r"clone_function", r"input_tensors")),
    case("export-subclassed", subclassed_model,
         lambda m, c: export_saved_model(m, str(c.tmp_path / "sm")), ValueError,
         r"'subnet'", r"\bSubNet\b", r"Expected a built Functional or Sequential"),
    case("add_gates-unbuilt_sequential", unbuilt_sequential, lambda m, c: kt.add_gates(m), ValueError, *UNBUILT),
    case("analyze-unbuilt_sequential", unbuilt_sequential, lambda m, c: kt.analyze(m), ValueError, *UNBUILT),
    case("apply_plan-unbuilt_sequential", unbuilt_sequential,
         lambda m, c: kt.apply_plan(m, Plan(conv=[0])), ValueError, *UNBUILT),
    case("profile-unbuilt_sequential", unbuilt_sequential, lambda m, c: kt.profile(m), ValueError, *UNBUILT),
    case("export-unbuilt_sequential", unbuilt_sequential,
         lambda m, c: export_saved_model(m, str(c.tmp_path / "sm")), ValueError,
         r"'unbuilt'", r"Expected a built Functional or Sequential"),

    # ---- not a model at all ------------------------------------------------------------
    case("analyze-a_layer", None, lambda m, c: kt.analyze(layers.Conv2D(4, 3, name="lonely")), ValueError,
         r"'lonely'", r"\bConv2D\b", r"Expected a Functional or Sequential keras\.Model",
         forbid=(r"subclassed model",)),
    case("add_gates-a_layer", None, lambda m, c: kt.add_gates(layers.Conv2D(4, 3, name="lonely")), ValueError,
         r"'lonely'", r"\bConv2D\b", r"Expected a Functional or Sequential keras\.Model"),
    case("prune-none", None, lambda m, c: kt.prune(None), ValueError,
         r"model=None", r"Expected a gated model"),

    # ---- arguments ---------------------------------------------------------------------
    case("analyze-bad_on_unknown", lambda: make("plain"), lambda m, c: kt.analyze(m, on_unknown="skip"),
         ValueError, r"on_unknown='skip'", r"Expected on_unknown in \('error', 'freeze'\)"),
    case("add_gates-bad_on_unknown", lambda: make("plain"), lambda m, c: kt.add_gates(m, on_unknown="skip"),
         ValueError, r"on_unknown='skip'", r"Expected on_unknown in"),
    case("apply_plan-plan_is_a_dict", lambda: make("plain"), lambda m, c: kt.apply_plan(m, {"b1": [0]}),
         TypeError, r"plan=\{'b1': \[0\]\}", r"Expected a keras_taylor\.PruningPlan"),
    case("register_handler-not_a_handler", None, lambda m, c: kt.register_handler(Doubler, object()),
         TypeError, r"handler=<object", r"Expected `handler` to be a keras_taylor\.LayerHandler"),
    case("register_handler-not_a_class", None, lambda m, c: kt.register_handler("Conv2D", kt.LayerHandler()),
         TypeError, r"layer_class='Conv2D'", r"Expected `layer_class` to be a subclass"),
    case("ChannelGate-on_relu", lambda: make("plain"), lambda m, c: kt.ChannelGate(m.get_layer("r1")),
         ValueError, r"layer='r1'", r"\bReLU\b", r"Expected a layer that makes or shifts channels"),
    case("ChannelGate-bad_mode", lambda: make("plain"), lambda m, c: kt.ChannelGate(m.get_layer("c2"), mode="both"),
         ValueError, r"mode='both'", r"Expected mode in \('params', 'output'\)"),

    # ---- gates -------------------------------------------------------------------------------
    case("add_gates-already_gated", gated, lambda m, c: kt.add_gates(m), ValueError,
         r"model='plain'", r"already holds ChannelGate", r"Expected a model without gates"),
    case("prune-ungated", lambda: make("plain"), lambda m, c: kt.prune(m), ValueError,
         r"model='plain'", r"Expected a gated model", r"apply_plan"),
    case("strip_gates-output_gate_not_1", lambda: output_gate_model(False), lambda m, c: kt.strip_gates(m),
         ValueError, r"layer 'bn'", r"multiplies the layer's output", r"keras_taylor\.prune"),
    case("strip_gates-output_gate_not_1-with_ops_node", lambda: output_gate_model(True),
         lambda m, c: kt.strip_gates(m), ValueError, r"layer 'bn'", r"keras_taylor\.prune"),

    # ---- plans that do not fit --------------------------------------------------------------------
    case("apply_plan-unknown_layer_name", lambda: make("plain"), lambda m, c: kt.apply_plan(m, Plan(nope=[0])),
         ValueError, r"layer 'nope'", NOT_PRUNABLE, r"'b1'"),
    case("apply_plan-layer_without_channels", lambda: make("plain"), lambda m, c: kt.apply_plan(m, Plan(r1=[0])),
         ValueError, r"layer 'r1'", NOT_PRUNABLE),
    case("apply_plan-logits_layer", lambda: make("plain"), lambda m, c: kt.apply_plan(m, Plan(out=[0])),
         ValueError, r"layer 'out'", NOT_PRUNABLE),
    case("apply_plan-fixed_channel", partly_fixed_model, lambda m, c: kt.apply_plan(m, Plan(mix=[0])),
         ValueError, r"Channel 0 of layer 'mix' cannot be pruned"),
    case("apply_plan-index_out_of_range", lambda: make("plain"), lambda m, c: kt.apply_plan(m, Plan(b1=[8])),
         ValueError, r"layer 'b1'", r"Expected channel indices .* in \[0, 8\)", r"Received: 8"),
    case("apply_plan-negative_index", lambda: make("plain"), lambda m, c: kt.apply_plan(m, Plan(b1=[-1])),
         ValueError, r"layer 'b1'", r"in \[0, 8\)", r"Received: -1"),
    case("apply_plan-float_index", lambda: make("plain"), lambda m, c: kt.apply_plan(m, Plan(b1=[1.5])),
         ValueError, r"layer 'b1'", r"1\.5", r"integer"),
    case("apply_plan-removed_not_a_dict", lambda: make("plain"),
         lambda m, c: kt.apply_plan(m, kt.PruningPlan(removed=["b1"])), ValueError,
         r"removed=\['b1'\]", r"Expected .*removed.* to map layer names"),
    case("apply_plan-every_channel", lambda: make("plain"), lambda m, c: kt.apply_plan(m, Plan(b1=list(range(8)))),
         ValueError, r"every output channel of layer 'c1'", r"Expected at least one channel left"),
    case("apply_plan-gated-index_out_of_range", gated, lambda m, c: kt.apply_plan(m, Plan(b1=[9])),
         ValueError, r"layer 'b1'", r"in \[0, 8\)"),
    case("apply_plan-plan_for_another_model", lambda: make("plain"),
         lambda m, c: kt.apply_plan(m, kt.PruningPlan.from_groups(kt.analyze(make("residual")), range(4))),
         ValueError, NOT_PRUNABLE, r"a plan that prunes layer '(stem|s\d)\w*'"),
    case("PruningPlan-malformed_json", None, lambda m, c: kt.PruningPlan.from_json("{not json"),
         ValueError, r"Expected a JSON pruning plan", r"does not parse"),
    case("PruningPlan-wrong_format_version", None,
         lambda m, c: kt.PruningPlan.from_json(json.dumps({"format": "keras_taylor.plan/2", "removed": {}})),
         ValueError, re.escape(f"format={FORMAT!r}"), r"keras_taylor\.plan/2"),
    case("PruningPlan-no_format", None, lambda m, c: kt.PruningPlan.from_dict({"removed": {"b1": [0]}}),
         ValueError, re.escape(f"format={FORMAT!r}"), r"'b1'"),
    case("PruningPlan-bad_indices", None,
         lambda m, c: kt.PruningPlan.from_dict({"format": FORMAT, "removed": {"b1": ["0"]}}),
         ValueError, r"Expected 'removed' to map layer names to lists of channel indices", r"'b1'"),
    case("PruningPlan-load_bad_file_names_the_file", None,
         lambda m, c: (c.tmp_path / "plan.json").write_text("{not json") and kt.PruningPlan.load(str(c.tmp_path / "plan.json")),
         ValueError, r"does not parse", r"plan\.json"),

    # ---- layers on a pruned path that keras_taylor refuses ---------------------------------------------
    case("add_gates-bn_over_height", bn_over_height_model, lambda m, c: kt.add_gates(m), ValueError, *BN_AXIS),
    case("apply_plan-bn_over_height", bn_over_height_model, lambda m, c: kt.apply_plan(m, Plan(conv=[0])),
         ValueError, *BN_AXIS),
    case("analyze-reshape_moves_channels", reshape_model, lambda m, c: kt.analyze(m), ValueError,
         r"layer 'rs'", r"Expected Reshape to keep the channel axis", r"\(None, 8, 32\)"),
    case("apply_plan-permute_moves_channels", permute_model, lambda m, c: kt.apply_plan(m, Plan(conv=[0])),
         ValueError, r"'perm'", r"(?i)expect", r"channel axis|channels .* on axis"),
    # Mixed layouts: a channels_first pooling reading a channels-last conv.
    case("add_gates-layout_mismatch_pooling", channels_first_pool_model, lambda m, c: kt.add_gates(m), ValueError,
         r"'cf_gap'", r"\bGlobalAveragePooling2D\b", r"(?i)expect", r"channels_last|channels .*on axis"),

    # ---- TaylorPruning arguments ----------------------------------------------------------------------
    *[
        case(f"TaylorPruning-{arg}={value!r}", None, (lambda kw: lambda m, c: kt.TaylorPruning(**kw))({arg: value}),
             ValueError, re.escape(f"{arg}={value!r}"), expected)
        for arg, value, expected in [
            ("target", 0.0, r"Expected target in \(0, 1\]"),
            ("target", 1.5, r"Expected target in \(0, 1\]"),
            ("target", -0.5, r"Expected target in \(0, 1\]"),
            ("target", math.nan, r"Expected target in \(0, 1\]"),
            ("target", "0.5", r"Expected target in \(0, 1\]"),
            ("metric", "energy", r"Expected metric in \('flops', 'params', 'channels', 'latency'\)"),
            ("prune_every", 0, r"Expected prune_every to be an integer >= 1"),
            ("prune_every", -3, r"Expected prune_every to be an integer >= 1"),
            ("prune_every", 2.5, r"Expected prune_every to be an integer >= 1"),
            ("min_channels", -1, r"Expected min_channels to be an integer >= 1"),
            ("start_step", -1, r"Expected start_step to be an integer >= 0"),
            ("channels_per_step", 0, r"Expected channels_per_step to be an integer >= 1"),
            ("momentum", 1.0, r"Expected momentum in \[0, 1\)"),
        ]
    ],
    case("TaylorPruning-criterion='bogus'", None, lambda m, c: kt.TaylorPruning(criterion="bogus"),
         ValueError, r"criterion='bogus'", r"Expected a criterion id in \[.*'taylor_fo_bn'.*\]"),
    case("TaylorPruning-momentum='0.9'", None, lambda m, c: kt.TaylorPruning(momentum="0.9"),
         ValueError, r"momentum='0\.9'", r"Expected momentum in \[0, 1\)"),
    case("TaylorPruning-channels_per_step=True", None, lambda m, c: kt.TaylorPruning(channels_per_step=True),
         ValueError, r"channels_per_step=True", r"Expected channels_per_step to be an integer >= 1"),
    case("TaylorPruning-fit-criterion='bogus'", lambda: compiled(gated()),
         lambda m, c: fit_with(m, criterion="bogus"), ValueError,
         r"criterion='bogus'", r"Expected a criterion id in \[.*'taylor_fo_bn'.*\]"),
    # (A model without Dropout: Keras's own fit machinery advances Dropout's seed state.)
    case("TaylorPruning-fit-empty_dataset", lambda: compiled(kt.add_gates(make("residual"))),
         lambda m, c: m.fit(np.zeros((0, 16, 16, 3), "float32"), np.zeros((0,), "int64"), epochs=1, verbose=0,
                            callbacks=[kt.TaylorPruning(target=0.5)]),
         ValueError, r"model='res'", r"Expected training data", r"empty dataset"),
    case("TaylorPruning-fit-ungated", lambda: compiled(make("plain")), lambda m, c: fit_with(m), ValueError,
         r"model='plain'", r"Expected a gated model", r"add_gates"),
    case("TaylorPruning-fit-non_tf_backend", lambda: compiled(gated()),
         lambda m, c: (fake_backend(c), fit_with(m)), ValueError,
         r"backend='jax'", r"Expected the TensorFlow Keras backend", r"KERAS_BACKEND=tensorflow"),

    # ---- export ----------------------------------------------------------------------------------------------
    case("export-gated", gated, lambda m, c: export_saved_model(m, str(c.tmp_path / "sm")), ValueError,
         r"model='plain'", r"Expected a model without ChannelGate layers", r"'b1'", r"keras_taylor\.prune"),
    case("export-not_a_model", None, lambda m, c: export_saved_model("model.keras", str(c.tmp_path / "sm")),
         ValueError, r"model='model\.keras'", r"Expected a keras\.Model"),
    case("export-path_none", lambda: make("plain"), lambda m, c: export_saved_model(m, None), ValueError,
         r"path=None", r"Expected path"),
    case("export-path_empty", lambda: make("plain"),
         lambda m, c: (c.monkeypatch.chdir(c.tmp_path), export_saved_model(m, "")), ValueError,
         r"path=''", r"Expected path"),
    case("export-path_is_a_file", lambda: make("plain"),
         lambda m, c: (c.tmp_path / "f").write_text("x") and export_saved_model(m, str(c.tmp_path / "f")),
         ValueError, r"path='.*f'", r"Expected path .*director"),
    case("export-bad_output_name", lambda: make("plain"),
         lambda m, c: export_saved_model(m, str(c.tmp_path / "sm"), output_name="out put"), ValueError,
         r"output_name='out put'", r"Expected output_name to be a non-empty string"),

    # ---- measure_latency ---------------------------------------------------------------------------------------
    case("measure_latency-no_models", None, lambda m, c: measure_latency({}), ValueError,
         r"models=\{\}", r"Expected at least one model"),
    case("measure_latency-bad_reference", lambda: make("plain"),
         lambda m, c: measure_latency({"a": m}, reference="b", rounds=1, calls_per_round=1, warmup=0),
         ValueError, r"reference='b'", r"Expected reference in \['a'\]"),
    case("measure_latency-list_of_models", lambda: make("plain"),
         lambda m, c: measure_latency([m], rounds=1, calls_per_round=1, warmup=0), ValueError,
         r"models=", r"Expected .*mapping|Expected .*dict"),
    case("measure_latency-value_not_a_model", lambda: make("plain"),
         lambda m, c: measure_latency({"a": m, "b": "small.keras"}, rounds=1, calls_per_round=1, warmup=0),
         ValueError, r"'b'", r"Expected .*keras\.Model"),
]

@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_a_clear_error_and_leaves_the_model_untouched(case, tmp_path, monkeypatch):
    model = case.build() if case.build is not None else None
    before = snapshot(model)
    with pytest.raises(case.raises) as info:
        case.call(model, Ctx(tmp_path, monkeypatch))
    message = str(info.value)
    for pattern in case.match:
        assert re.search(pattern, message), f"message lacks /{pattern}/: {message}"
    for pattern in case.forbid:
        assert not re.search(pattern, message), f"message has /{pattern}/: {message}"
    diff = _first_difference(before, snapshot(model))
    assert diff is None, f"the failed call changed the user's model: {diff}"


# --------------------------------------------------------------------------
# Documented non-errors next to the table.
# --------------------------------------------------------------------------

def test_strip_gates_on_an_ungated_model_is_an_untouched_copy():
    """Documented behaviour: `strip_gates` raises only for unfoldable output gates;
    an ungated model comes back as an equal copy."""
    model = make("plain")
    before = snapshot(model)
    copy = kt.strip_gates(model)
    assert copy is not model and not kt.is_gated(copy)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype("float32")
    np.testing.assert_allclose(copy(x), model(x), rtol=1e-6, atol=1e-6)
    assert _first_difference(before, snapshot(model)) is None


def test_add_gates_leaves_keras_ops_nodes_untouched():
    model = make("ops_se")
    before = snapshot(model)
    kt.add_gates(model)
    diff = _first_difference(before, snapshot(model))
    assert diff is None, diff


def test_snapshot_sees_every_kind_of_change():
    """The snapshot is sensitive to what the table relies on it for."""
    changes = [
        lambda: bn.moving_mean.assign(bn.moving_mean + 1.0),  # non-trainable BN statistic
        lambda: model.get_layer("b1").gate.assign(np.zeros(8, "float32")),  # a gate
        lambda: model.get_layer("c2").layer.kernel.assign(model.get_layer("c2").layer.kernel * 2.0),
        lambda: model.get_layer("fc")(keras.Input((8,))),  # a new call (inbound node)
    ]
    for change in changes:
        model = gated()
        bn = model.get_layer("b1").layer
        base = snapshot(model)
        change()
        assert _first_difference(base, snapshot(model)) is not None
