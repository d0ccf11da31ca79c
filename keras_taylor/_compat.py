"""The one place that touches Keras internals (`keras.src`) or private attributes.

Everything else in keras_taylor uses the public Keras 3 API. When a Keras
release moves one of these, only this module needs to change.
"""

from __future__ import annotations

import contextlib
import math

import keras
import numpy as np


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
    return _classes_by_name((
        ("keras.src.applications.convnext", ("LayerScale", "StochasticDepth")),
        ("keras.src.applications.inception_resnet_v2", ("CustomScaleLayer",)),
    ))


def kerashub_embedding_layers() -> dict:
    """KerasHub's layers of the ViT family's residual stream that
    `attention.prune_embedding` gives handlers (`ViTPatchingAndEmbedding`,
    `DeiTEmbeddings`, `DINOV2Embedding`, `DINOV2LayerScale`), by class name;
    empty when keras_hub is not installed. Imported only when asked for
    (keras_hub is slow to import)."""
    return _classes_by_name((
        ("keras_hub.src.models.vit.vit_layers", ("ViTPatchingAndEmbedding",)),
        ("keras_hub.src.models.deit.deit_layers", ("DeiTEmbeddings",)),
        ("keras_hub.src.models.dinov2.dinov2_layers", ("DINOV2Embedding", "DINOV2LayerScale")),
    ))


def _classes_by_name(specs) -> dict:
    """`{name: class}` for `(module, names)` pairs; modules that do not
    import and names they lack are skipped."""
    found = {}
    for module, names in specs:
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


def node_counts(model) -> dict:
    """`{id(layer): (layer, inbound, outbound)}` node counts of every layer
    of `model`, sublayers included (see `drop_nodes_since`)."""
    return {
        id(layer): (layer, len(layer._inbound_nodes), len(layer._outbound_nodes))
        for layer in model._flatten_layers(include_self=True, recursive=True)
    }


def drop_nodes_since(counts: dict, keep=frozenset()) -> None:
    """Removes the nodes added to the layers of `counts` (`node_counts`)
    since it was taken, except on layers whose id is in `keep`. Keras only
    appends nodes, so the layers' own graphs are what they were."""
    for key, (layer, n_in, n_out) in counts.items():
        if key not in keep:
            del layer._inbound_nodes[n_in:]
            del layer._outbound_nodes[n_out:]


def patch_tf2onnx() -> None:
    """Keras's numpy-2 compatibility patch for tf2onnx (no-op where absent)."""
    try:
        from keras.src.export.tf2onnx_lib import patch_tf2onnx as patch
    except ImportError:
        return
    patch()


# --------------------------------------------------------------------------
# TensorFlow (optional at import time: keras_taylor loads with any Keras
# backend; the modules that need TensorFlow import it through here).
# --------------------------------------------------------------------------

TF_INSTALL = 'pip install "keras_taylor[tf]"  (or: pip install tensorflow)'


def import_tensorflow(needed_by: str):
    """Imports TensorFlow, or raises an ImportError that says what needs it.

    Args:
        needed_by: what needs TensorFlow, for the message (e.g.
            `"keras_taylor.TaylorPruning (the scoring train step)"`).
    """
    try:
        import tensorflow as tf
    except ImportError as err:
        raise ImportError(
            f"{needed_by} needs TensorFlow, which could not be imported ({err}). "
            f"Install it with: {TF_INSTALL}, and run Keras with "
            "KERAS_BACKEND=tensorflow. The analysis, plan and surgery parts of "
            "keras_taylor (analyze, profile, add_gates, apply_plan, prune) work "
            "without it."
        ) from err
    return tf


def convert_variables_to_constants_v2(concrete_function, **kwargs):
    """TensorFlow's freezing of a concrete function (variables become
    constants); private in TensorFlow (`tensorflow.python.framework`)."""
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2 as convert,
    )

    return convert(concrete_function, **kwargs)


# --------------------------------------------------------------------------
# Dynamic spatial shapes (keras_taylor.graph: `analyze(..., input_shape=)`).
# --------------------------------------------------------------------------

def concrete_shapes(model, input_shapes) -> dict:
    """`{id(KerasTensor): shape}` for every tensor of the graph of `model`
    when its inputs have the given full shapes (batch axis included).

    Each recorded call is replayed with `compute_output_spec` on new
    KerasTensors: no layer is called, so the model gains no nodes.
    """
    fn = functional_of(model)
    tensors = {}
    for x, shape in zip(fn.inputs, input_shapes):
        tensors[id(x)] = keras.KerasTensor(tuple(shape), dtype=x.dtype)
    by_depth = fn._nodes_by_depth
    for depth in sorted(by_depth, reverse=True):
        for node in by_depth[depth]:
            if not node.operation or node.is_input:
                continue
            args, kwargs = node.arguments.fill_in(tensors)
            op = node.operation
            try:
                out = op.compute_output_spec(*args, **kwargs)
            except TypeError:  # a `compute_output_spec` without `training=`
                import inspect

                params = inspect.signature(op.compute_output_spec).parameters
                kwargs = {k: v for k, v in kwargs.items() if k in params}
                out = op.compute_output_spec(*args, **kwargs)
            for ref, new in zip(node.outputs, keras.tree.flatten(out)):
                tensors[id(ref)] = new
    return {k: tuple(v.shape) for k, v in tensors.items()}


def structural_op_classes() -> dict:
    """`keras.ops` operations that move channels (pad, split, reductions, reshape, `x[key]`),
    for the handlers of `keras_taylor.handlers` (absent ones are skipped)."""
    from keras.src.ops import numpy as knp

    def found(names):
        return tuple(getattr(knp, n) for n in names if hasattr(knp, n))

    return {"pad": found(("Pad",)), "split": found(("Split",)), "reduce": found(("Mean", "Sum", "Max", "Min", "Amax", "Amin")), "reshape": found(("Reshape",)), "getitem": found(("GetItem",))}


@contextlib.contextmanager
def reshape_with_unknown_batch():
    """While active, `keras.ops.reshape` of a symbolic tensor whose batch size
    is unknown accepts `None` as the new batch size (what `ops.shape(x)[0]`
    gives on symbolic tensors): `reshape(x, (ops.shape(x)[0], h, w, c))`, as
    KerasHub's MiT layers write it, is recorded as `reshape(x, (-1, h, w, c))`
    (a second `-1` is resolved from the static sizes). Used only to trace
    composite layers (`keras_taylor.tracing`), whose traced graph is then
    checked against the layer on real inputs. It replaces the public
    `keras.ops.reshape` for the duration, so it is not thread-safe: do not
    build other models in other threads while a model is being traced."""
    original = keras.ops.reshape

    def reshape(x, newshape):
        if isinstance(x, keras.KerasTensor) and isinstance(newshape, (tuple, list)) and len(newshape) > 1:
            shape = list(newshape)
            rest = shape[1:]
            ints = all(isinstance(d, (int, np.integer)) for d in rest)
            if shape[0] is None and x.shape[0] is None and ints:
                rest = [int(d) for d in rest]
                if -1 in rest:
                    known = x.shape[1:]
                    if None in known or rest.count(-1) > 1:
                        return original(x, newshape)
                    other = math.prod(d for d in rest if d != -1)
                    rest[rest.index(-1)] = math.prod(known) // other
                return original(x, (-1, *rest))
        return original(x, newshape)

    keras.ops.reshape = reshape
    try:
        yield
    finally:
        keras.ops.reshape = original


def recorded_call_args(op) -> tuple:
    """The positional arguments of the first symbolic call of a `keras.ops`
    operation (the `key` of `x[key]`, a `GetItem`); `()` when it has none."""
    nodes = getattr(op, "_inbound_nodes", None) or []
    if not nodes:
        return ()
    return tuple(nodes[0].arguments.args)


def recorded_call_kwargs(op) -> dict:
    """The keyword arguments of the first symbolic call of a `keras.ops`
    operation (`constant_values` of `ops.pad`); `{}` when it has none."""
    nodes = getattr(op, "_inbound_nodes", None) or []
    if not nodes:
        return {}
    return dict(nodes[0].arguments.kwargs)
