"""The one place that touches Keras internals (`keras.src`) or private attributes.

Everything else in keras_taylor uses the public Keras 3 API. When a Keras
release moves one of these, only this module needs to change.
"""

from __future__ import annotations

import keras


def functional_of(model: keras.Model):
    """Returns the Functional graph behind a Functional or Sequential model.

    Raises:
        ValueError: if `model` has no static graph (a subclassed model, or a
            Sequential model that was never built on an input shape).
    """
    if not isinstance(model, keras.Model):
        raise ValueError(
            "Expected a Functional or Sequential keras.Model. Received: "
            f"model={getattr(model, 'name', model)!r} of class {type(model).__name__}."
        )
    if isinstance(model, keras.Sequential):
        fn = getattr(model, "_functional", None)
        if fn is None:
            raise ValueError(
                "Expected a built Sequential model (start it with "
                "`keras.Input(shape)` or call `model.build(input_shape)`). "
                f"Received: model={model.name!r} with no input shape."
            )
        return fn
    if not hasattr(model, "_nodes_by_depth") or not hasattr(model, "_operations"):
        raise ValueError(
            "Expected a Functional or Sequential keras.Model, whose layer graph "
            "can be read. Received: "
            f"model={getattr(model, 'name', model)!r} of class "
            f"{type(model).__name__}, a subclassed model. Rebuild it with the "
            "functional API (`keras.Model(inputs, outputs)`) to prune it."
        )
    return model


def nodes_in_order(model: keras.Model):
    """Yields `(layer, input_tensors, output_tensors)` for every call in the graph.

    Nodes come in topological order (inputs first). `InputLayer` nodes are
    skipped.
    """
    fn = functional_of(model)
    by_depth = fn._nodes_by_depth
    for depth in sorted(by_depth, reverse=True):
        for node in by_depth[depth]:
            layer = node.operation
            if isinstance(layer, keras.layers.InputLayer):
                continue
            yield layer, list(node.input_tensors), list(node.output_tensors)


def argument_roles(model: keras.Model) -> dict:
    """`{id(first output tensor): [argument name of each input tensor]}` per call.

    The input tensors of a node are its call's arguments flattened
    (positional arguments first, then keyword arguments by sorted name); this
    names each one after its `call` parameter (`query`, `value`, `key`,
    `attention_mask`). Calls whose arguments cannot be matched are left out.
    """
    import inspect

    fn = functional_of(model)
    out = {}
    for nodes in fn._nodes_by_depth.values():
        for node in nodes:
            op = node.operation
            if isinstance(op, keras.layers.InputLayer) or not node.output_tensors:
                continue
            args = getattr(node.arguments, "args", ())
            kwargs = getattr(node.arguments, "kwargs", {})
            try:
                names = list(inspect.signature(op.call).parameters)
            except (TypeError, ValueError):
                continue
            roles = []
            for i, a in enumerate(args):
                n = sum(isinstance(t, keras.KerasTensor) for t in keras.tree.flatten(a))
                roles += [names[i] if i < len(names) else f"arg{i}"] * n
            for k in sorted(kwargs):
                n = sum(isinstance(t, keras.KerasTensor) for t in keras.tree.flatten(kwargs[k]))
                roles += [k] * n
            if len(roles) == len(node.input_tensors):
                out[id(node.output_tensors[0])] = roles
    return out


def graph_inputs_outputs(model: keras.Model):
    fn = functional_of(model)
    return list(fn.inputs), list(fn.outputs)


# --------------------------------------------------------------------------
# TensorFlow trainer internals used by the scoring train step.
# --------------------------------------------------------------------------

def unscale_loss_for_distribution(loss):
    from keras.src.losses import loss as loss_module

    return loss_module.unscale_loss_for_distribution(loss)


def compute_loss(model, x, y, y_pred, sample_weight):
    # `_compute_loss` handles user `compute_loss` overrides without a
    # `training` argument (added in Keras 3.3).
    return model._compute_loss(
        x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
    )


def loss_tracker(model):
    return model._loss_tracker


def call_has_training_arg(model) -> bool:
    return bool(getattr(model, "_call_has_training_arg", True))


# --------------------------------------------------------------------------
# Classes that public Keras does not export but functional graphs contain.
# --------------------------------------------------------------------------

def op_classes() -> dict:
    """`keras.ops` operations that appear as nodes when a functional model uses
    `x + 3`, `x * y`, ... on symbolic tensors (MobileNetV3's hard-sigmoid)."""
    from keras.src.ops import core, nn
    from keras.src.ops import numpy as knp

    def found(module, names):
        return tuple(getattr(module, n) for n in names if hasattr(module, n))

    return {
        "add": (knp.Add, knp.Subtract),
        "multiply": (knp.Multiply,),
        "divide": (knp.Divide, knp.TrueDivide),
        "extremum": found(knp, ("Maximum", "Minimum")),
        # Element-wise functions with f(0) = 0 (`ops.relu6(x)`, `ops.tanh(x)`).
        "zero_preserving": found(nn, (
            "Relu", "Relu6", "Silu", "LeakyRelu", "HardSilu", "Elu", "Selu", "Gelu",
            "Celu", "HardTanh", "HardShrink", "SoftShrink", "TanhShrink", "Softsign",
        )) + found(knp, (
            "Tanh", "Abs", "Absolute", "Square", "Sqrt", "Negative", "Sin", "Sinh",
            "Tan", "Arctan", "Arcsinh", "Expm1", "Log1p", "Sign", "Floor", "Ceil", "Round",
        )) + found(core, ("Cast",)),
        # Element-wise functions with f(0) != 0 (`ops.sigmoid(x)`, `ops.exp(x)`).
        "lifting": found(nn, (
            "Sigmoid", "HardSigmoid", "SparseSigmoid", "Softplus", "LogSigmoid",
            "Squareplus", "SparsePlus",
        )) + found(knp, ("Exp", "Cos", "Cosh", "Clip")),
    }


def application_layers() -> dict:
    """Custom layers of keras.applications (absent ones are skipped)."""
    found = {}
    for module, names in (
        ("keras.src.applications.convnext", ("LayerScale", "StochasticDepth")),
        ("keras.src.applications.inception_resnet_v2", ("CustomScaleLayer",)),
    ):
        try:
            mod = __import__(module, fromlist=list(names))
        except ImportError:
            continue
        for name in names:
            if hasattr(mod, name):
                found[name] = getattr(mod, name)
    return found


# --------------------------------------------------------------------------
# Nested models (keras_taylor.nesting).
# --------------------------------------------------------------------------

def is_graph_model(model) -> bool:
    """True for a Functional or Sequential model that runs its recorded layer
    graph as is (its class does not override `call`), so it can be inlined."""
    from keras.src.models.functional import Functional

    if isinstance(model, keras.Sequential):
        return type(model).call is keras.Sequential.call
    return isinstance(model, Functional) and type(model).call is Functional.call


def run_graph(model, inputs, call_fn):
    """Replays the graph of a Functional or Sequential model on new tensors.

    `inputs` is a flat list matching `model.inputs`. Every recorded call is
    replayed, in topological order, as `call_fn(operation, *args, **kwargs)`
    with the recorded arguments, tensors replaced by the new ones; `operation`
    is the model's own layer or op. Returns the outputs in the model's output
    structure. Nothing is called on the model's own layers unless `call_fn`
    does it.
    """
    fn = functional_of(model)
    return fn._run_through_graph(list(inputs), operation_fn=lambda op: op, call_fn=call_fn)


def inbound_node_count(layer) -> int:
    """How many times `layer` (or op) has been called on symbolic tensors."""
    return len(layer._inbound_nodes)


def patch_tf2onnx() -> None:
    """Keras's numpy-2 compatibility patch for tf2onnx (no-op where absent)."""
    try:
        from keras.src.export.tf2onnx_lib import patch_tf2onnx as patch
    except ImportError:
        return
    patch()
