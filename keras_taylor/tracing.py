"""Composite layers: see inside subclassed layers by symbolic tracing.

A subclassed layer whose `call` is built from sublayers and `keras.ops`
(KerasHub's `InvertedResidualBlock`, `FusedMBConvBlock`, `FeaturePyramid`,
`SpatialPyramidPooling`, a user's `ResBlock`) hides its convolutions from the
channel analysis. `inline_composite_layers` returns an equivalent Functional
model in which each such layer, recursively, is replaced by the nodes its
`call` records when run on KerasTensors: every sublayer call and every
`keras.ops` operation becomes a node of the outer graph, exactly as
`keras_taylor.nesting.inline_nested_models` does for nested models, so
`analyze`, `add_gates` and `apply_plan` see every Conv and BN inside.

How:

* The graph is replayed node by node (`_compat.run_graph`). A node whose layer
  has no registered handler, owns no weights of its own (all its variables
  belong to sublayers) and has sublayers is *traced*: its `call` runs directly
  on the KerasTensors, not through `__call__`, so its sublayers' calls and the
  ops are recorded as nodes. It runs on a copy of the layer (rebuilt from its
  config, built by one symbolic call, weights copied) when that copy takes the
  layer's weights, else on the user's layer itself: tracing records `call`, so
  the composite's own config does not matter (KerasHub's ViT `MLP`, DeiT's and
  MiT's encoders, whose configs do not rebuild them). The user's sublayers
  that this puts in the graph are then copied from their own configs by one
  more pass, under unique names; at the end the user's layers get their names
  back and lose the nodes tracing added to them.
* When that trace fails it is tried once more with the layer's composite
  sublayers' `call` run directly (a sublayer Keras cannot call symbolically:
  DeiT's block returns `(output, None)`) and with
  `_compat.reshape_with_unknown_batch` (MiT's `ops.reshape(x, (ops.shape(x)[0],
  ...))`, whose batch size is `None` on KerasTensors).
* Each traced call is checked once against the layer on random inputs at two
  sizes, which catches a `call` whose graph depends on run-time values (a
  `Resizing(ops.shape(x)[1], ...)` made inside `call`). The recorded call
  arguments go along unchanged: `training=` reaches the sublayers the way the
  layer's own `call` passes it.
* Every other layer is copied from its config with its weights (reused as is
  when its config cannot rebuild it; `nesting.copy_layer`), so the user's
  model and layers get no new nodes and keep their own weights.
* One copy per original layer: a composite called twice traces twice on the
  same copy, so its sublayers are shared between the calls (weights tied), as
  are sublayers a layer calls twice.
* Nested composites are traced in turn, until none is left (or `max_depth`).
* A handler registered for the layer's class (`register_handler`) wins: such
  a layer is never traced, so a user can still say how their layer prunes.
* Where tracing is impossible (Python control flow on tensor values,
  backend-specific ops, a layer that holds its own variables), the layer
  stays one fixed unit, as
  `on_unknown="freeze"` treats it, and a warning names it and says why.
"""

from __future__ import annotations

import contextlib
import warnings

import keras
import numpy as np

from keras_taylor import _compat, nesting
from keras_taylor.handlers import get_handler


def _sublayers(layer) -> list:
    return list(layer._flatten_layers(include_self=False, recursive=True))


def untraceable_reason(layer) -> str | None:
    """Why `layer` is not traced (`None`: it is a composite that can be).

    Layers with a handler, models (see `nesting`), and layers without
    sublayers are not composites.
    """
    if isinstance(layer, keras.Model) or get_handler(layer) is not None:
        return "it is not a composite layer"
    subs = _sublayers(layer)
    if not subs:
        return "it has no sublayers"
    owned = {id(v) for s in subs for v in s.weights}
    own = [v.path if hasattr(v, "path") else v.name for v in layer.weights if id(v) not in owned]
    if own:
        return f"it holds variables of its own ({own[:3]}), which a traced graph cannot own"
    return None


def _is_candidate(op) -> bool:
    return isinstance(op, keras.layers.Layer) and not isinstance(op, keras.layers.InputLayer) and untraceable_reason(op) is None


class _Tracer:
    def __init__(self, warn: bool):
        self.copies = {}  # id(original) -> copy (or the original, reused)
        self.pairs = []  # (original, copy) whose weights to copy
        self.traced = []  # names of the layers traced
        self.failed = {}  # name -> reason
        self.warn = warn
        self.verified = set()
        self.on_originals = False  # traced on the user's layer (config cannot rebuild it)
        self.names = {"used": set(), "renamed": []}  # names given; (user's layer, its name)

    def copy(self, op):
        key = id(op)
        if key not in self.copies:
            if isinstance(op, keras.layers.Layer):
                new, copied = nesting.copy_layer(op)
                if copied:
                    self.pairs.append((op, new))
            else:  # a stateless keras.ops operation
                try:
                    new = op.__class__.from_config(op.get_config())
                except Exception:  # noqa: BLE001 - stateless: reusing it is harmless
                    new = op
            self.copies[key] = new
        return self.copies[key]

    def _fail(self, op, reason: str) -> None:
        if op.name not in self.failed:
            self.failed[op.name] = reason
            if self.warn:
                warnings.warn(
                    f"Cannot trace layer {op.name!r} of class {type(op).__name__} "
                    f"({reason}); it is kept as one fixed unit: channels flowing "
                    "into it are not pruned (on_unknown='freeze' semantics). "
                    "Register a handler for its class to prune through it.",
                    stacklevel=4,
                )

    def _traceable_copy(self, op, args, kwargs):
        """A built copy of composite `op` holding its weights, or `op` itself
        when its config cannot rebuild it (KerasHub's ViT `MLP`, DeiT's
        encoder, MiT's `HierarchicalTransformerEncoder`, whose configs omit or
        mangle arguments). Tracing only records the layer's `call` on
        symbolic tensors, so the composite's own config does not matter: the
        user's layer is traced as is, and its sublayers (stock layers that
        their configs do rebuild) are copied by a later pass
        (`inline_composite_layers`), which also drops the nodes this added to
        them."""
        key = id(op)
        if key in self.copies:
            return self.copies[key]
        try:
            new = nesting.rebuild_layer(op)
            new(*args, **kwargs)  # builds the copy's sublayers (throwaway node)
            new.set_weights(op.get_weights())
        except Exception:  # noqa: BLE001 - its config does not describe it: trace the layer itself
            new = op
            self.on_originals = True
        for sub in _sublayers(new):  # unique names in the flat model
            name = sub.name if sub.name.startswith(op.name) else f"{op.name}_{sub.name}"
            unique, k = name, 0
            while unique in self.names["used"]:
                k += 1
                unique = f"{name}_{k}"
            self.names["used"].add(unique)
            if new is op:  # the user's sublayer: its name is put back at the end
                self.names["renamed"].append((sub, sub.name))
            sub.name = unique
        self.copies[key] = new
        return new

    def _verify(self, op, new, args, kwargs) -> None:
        """Raises unless the traced `call` of `new` computes what `op` does,
        on random inputs (unknown sizes set to 8): catches calls whose graph
        depends on run-time values (a layer made in `call` from
        `ops.shape(x)`)."""
        # The check runs both layers (the user's one included), possibly in
        # training mode: their state (BN moving statistics, seed generators)
        # is put back afterwards, so neither the user's model nor the copy
        # carries a trace of it.
        saved = [(v, keras.ops.convert_to_numpy(v.value)) for layer in (op, new) for v in layer.non_trainable_variables]
        try:
            for size in (8, 11):
                self._verify_at(op, new, args, kwargs, size)
        finally:
            for v, value in saved:
                v.assign(value)

    def _verify_at(self, op, new, args, kwargs, size) -> None:
        fresh, real = {}, {}
        rng = np.random.default_rng(0)

        def symbolic(t):
            if not isinstance(t, keras.KerasTensor):
                return t
            if id(t) not in fresh:
                fresh[id(t)] = keras.Input(batch_shape=t.shape, dtype=t.dtype)
                shape = tuple(2 if i == 0 and d is None else (size if d is None else d) for i, d in enumerate(t.shape))
                real[id(t)] = rng.normal(size=shape).astype(t.dtype) if "float" in str(t.dtype) else np.zeros(shape, t.dtype)
            return fresh[id(t)]

        sym_args, sym_kwargs = keras.tree.map_structure(symbolic, (list(args), dict(kwargs)))
        out = keras.tree.flatten(new.call(*sym_args, **sym_kwargs))
        symbolic_out = [t for t in out if isinstance(t, keras.KerasTensor)]
        sub = keras.Model(list(fresh.values()), symbolic_out)
        concrete = lambda t: real[id(t)] if isinstance(t, keras.KerasTensor) else t
        c_args, c_kwargs = keras.tree.map_structure(concrete, (list(args), dict(kwargs)))
        want = keras.tree.flatten(op(*c_args, **c_kwargs))
        values = iter(keras.tree.flatten(sub([real[k] for k in fresh])))
        got = [next(values) if isinstance(t, keras.KerasTensor) else t for t in out]  # constants as they are
        if len(want) != len(got):
            raise ValueError(f"its traced call gives {len(got)} outputs where its call gives {len(want)}")
        for a, b in zip(want, got):
            a, b = keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b)
            if a.shape != b.shape:
                raise ValueError(f"its traced graph gives an output of shape {b.shape} where its call gives {a.shape}")
            if not a.size:
                continue
            scale = max(float(np.max(np.abs(a))), 1e-6)
            if not float(np.max(np.abs(a - b))) <= 1e-4 * scale:
                raise ValueError("its traced graph does not compute what its call does (it depends on run-time values)")

    def _trace(self, op, new, args, kwargs):
        if id(op) not in self.verified:
            self._verify(op, new, args, kwargs)
            self.verified.add(id(op))
        out = new.call(*args, **kwargs)
        for t in keras.tree.flatten(out):
            if isinstance(t, keras.KerasTensor) and getattr(t, "_keras_history", None) is None:
                raise ValueError("its call returned a symbolic tensor that no operation made")
            if not isinstance(t, keras.KerasTensor) and not keras.ops.is_tensor(t) and not isinstance(t, np.ndarray):
                raise ValueError(f"its call returned {type(t).__name__}, not a tensor")
        return out

    def call(self, op, *args, **kwargs):
        if _is_candidate(op) and op.name not in self.failed:
            new = self._traceable_copy(op, args, kwargs)
            if new is not None:
                try:
                    try:
                        out = self._trace(op, new, args, kwargs)
                    except Exception:  # noqa: BLE001 - retried with its composite sublayers opened
                        with _calls_opened(new), _compat.reshape_with_unknown_batch():
                            out = self._trace(op, new, args, kwargs)
                except Exception as e:  # noqa: BLE001 - reported, the layer stays a unit
                    self._fail(op, f"its call cannot be traced: {type(e).__name__}: {str(e)[:160]}")
                    self.copies.pop(id(op), None)
                else:
                    if op.name not in self.traced:
                        self.traced.append(op.name)
                    return out
        return self.copy(op)(*args, **kwargs)


@contextlib.contextmanager
def _calls_opened(layer):
    """While active, the composite sublayers of `layer` (direct ones) run
    their `call` when called, not `__call__`: a sublayer whose symbolic call
    Keras refuses (KerasHub's `DeiTEncoderBlock` returns `(output, None)`,
    and a Keras node's outputs must all be tensors) is traced as part of
    `layer`. Puts their classes back on exit."""
    swapped = []
    try:
        for sub in layer._flatten_layers(include_self=False, recursive=False):
            if untraceable_reason(sub) is None:
                cls = type(sub)
                opened = type(cls.__name__, (cls,), {"__call__": lambda self, *a, **k: self.call(*a, **k), "__module__": cls.__module__})
                object.__setattr__(sub, "__class__", opened)
                swapped.append((sub, cls))
        yield
    finally:
        for sub, cls in swapped:
            object.__setattr__(sub, "__class__", cls)


def has_composite_layers(model) -> bool:
    """True if a layer of the graph of `model` can be traced."""
    try:
        return any(_is_candidate(op) for op, _, _ in _compat.nodes_in_order(model))
    except ValueError:
        return False


def _trace_once(model, warn: bool, failed: dict, names: dict):
    fn = _compat.functional_of(model)
    inputs = keras.tree.map_structure(
        lambda x: keras.Input(batch_shape=x.shape, dtype=x.dtype, sparse=x.sparse, name=x.name),
        fn.input,
    )
    tracer = _Tracer(warn)
    tracer.failed = failed
    tracer.names = names
    names["used"] = {op.name for op in nesting._graph_operations(fn)}  # this pass's names
    outputs = _compat.run_graph(fn, keras.tree.flatten(inputs), tracer.call)
    flat = keras.Model(inputs, outputs, name=model.name)
    for src, dst in tracer.pairs:
        dst.set_weights(src.get_weights())
    return flat, tracer.traced, tracer.on_originals


def inline_composite_layers(model: keras.Model, max_depth: int = 8, warn: bool = True) -> keras.Model:
    """Returns `model` with every traceable composite layer inlined.

    Args:
        model: a built Functional or Sequential model. Nested models are
            inlined first (`inline_nested_models`).
        max_depth: how many levels of composites inside composites to open.
            Defaults to `8`.
        warn: warn for each composite that cannot be traced (it stays a
            fixed unit). Defaults to `True`.

    Returns:
        `model` itself when it holds no traceable composite (nested models
        inlined). Otherwise a new Functional model (same name, inputs and
        outputs) computing the same function, whose layers are copies of the
        original layers and of the composites' sublayers (weights copied). A
        plain `keras.Model`, whatever the class of `model` (a KerasHub
        `Backbone` comes back as a Functional model). The user's model and
        layers are not modified.

    Raises:
        ValueError: for a subclassed model, or `max_depth` < 1.
    """
    if isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < 1:
        raise ValueError(f"Expected max_depth to be an integer >= 1. Received: max_depth={max_depth!r}")
    model = nesting.inline_nested_models(model)
    failed: dict = {}
    names: dict = {"used": set(), "renamed": []}  # names given to sublayers; (user's layer, its name)
    before = _compat.node_counts(model)  # tracing a user's layer adds nodes to its sublayers
    result = model
    shared = False  # the result holds sublayers of the user's layers
    try:
        for _ in range(max_depth):
            if not any(_is_candidate(op) and op.name not in failed for op, _, _ in _compat.nodes_in_order(result)):
                break
            result, traced, on_originals = _trace_once(result, warn, failed, names)
            shared = shared or on_originals
            if not traced:
                break
            result = nesting.inline_nested_models(result)
        if shared:  # copy the user's sublayers that tracing put in the graph (renamed copies)
            result, _, _ = _trace_once(result, warn, failed, names)
    finally:
        for layer, name in reversed(names["renamed"]):
            layer.name = name
        if result is not model:
            # The user's layers lose the nodes tracing added (those of the
            # layers the result still reuses, config-less, keep them).
            _compat.drop_nodes_since(before, keep={id(op) for op in nesting._graph_operations(result)})
    if result is not model and not model.trainable:
        result.trainable = False
    return result
