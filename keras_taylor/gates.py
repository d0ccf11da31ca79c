"""Channel gates: `ChannelGate`, `add_gates`, `strip_gates`.

A gate is a per-channel scalar `m` (1 = kept, 0 = pruned) on a layer's output
channels, placed after each Conv/Dense and after its BatchNormalization when
one follows (the CVPR'19 "gate after BN").

The gate does not multiply the activation. It scales the parameters that make
the output channel instead (BN: `gamma` and `beta`; Conv/Dense: the kernel's
output slice and the bias), which gives the same output `m * y` for `m` in
{0, 1} and keeps the added work parameter-sized, not activation-sized:

    BN:    y = (m*gamma) * x_hat + (m*beta)      = m * BN(x)
    conv:  y = act(x * (m*W) + m*b)              = act(m * conv(x))

Backprop then yields `dL/dm = sum(gamma * dL/dgamma' + beta * dL/dbeta')` (or
the kernel/bias analogue), exactly the gradient of a gate on the output
(docs/DESIGN.md §1). A layer whose output cannot be scaled through its parameters
(BN with `scale=False`) falls back to multiplying its output.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import warnings

import keras
import numpy as np
from keras import ops

from keras_taylor import _compat
from keras_taylor import graph as graph_lib
from keras_taylor import nesting, tracing

_MODES = ("params", "output")

#: Slots of `ChannelGate.counters` (kept up to date on the model's first gate):
#: minibatches scored since the last pruning step, minibatches skipped for
#: non-finite gradients, minibatches seen, step of the last pruning event,
#: pruning events so far, the target of the pruning run (0: no run recorded)
#: and its metric (an index into `METRICS`).
COUNTERS = ("window_steps", "skipped", "batches", "last_event", "events", "target", "metric")

#: What a pruning target can measure (`TaylorPruning(metric=...)`).
METRICS = ("flops", "params", "channels", "latency")

_recorder = threading.local()


@contextlib.contextmanager
def recording_outputs():
    """Collects `(gate, output tensor)` for every `ChannelGate` call inside.

    The scoring train step uses it for criteria that read activations
    (per-example Taylor, activation statistics): the outputs are the tensors
    of the forward pass under way, so their gradients come from the same tape.
    """
    previous = getattr(_recorder, "calls", None)
    _recorder.calls = calls = []
    try:
        yield calls
    finally:
        _recorder.calls = previous


@keras.saving.register_keras_serializable(package="keras_taylor")
class ChannelGate(keras.layers.Wrapper):
    """Puts a per-channel gate on the output channels of a layer.

    Besides the gate itself (`gate`, 1 = kept, 0 = pruned), each wrapper
    holds its channels' pruning state as non-trainable variables (`score`,
    `ema`, `counters`), so every checkpoint of a gated model carries the
    pruning run with it.

    Args:
        layer: the `keras.layers.Layer` to wrap (Conv, Dense or
            BatchNormalization).
        mode: `"params"` scales the layer's channel parameters by the gate,
            `"output"` multiplies the layer's output. Defaults to `"params"`
            when the layer allows it.
        **kwargs: base layer arguments (`name`, ...).

    Example:

    ```python
    gated = keras_taylor.ChannelGate(keras.layers.BatchNormalization())
    y = gated(x)        # equals BN(x) while every gate is 1
    ```
    """

    is_channel_gate = True

    def __init__(self, layer, mode: str | None = None, **kwargs):
        super().__init__(layer, **kwargs)
        handler = graph_lib.get_handler(layer)
        if handler is None or not handler.gate_needed(layer):
            raise ValueError(
                "Expected a layer that makes or shifts channels (Conv, Dense, "
                f"BatchNormalization). Received: layer={layer.name!r} of class "
                f"{type(layer).__name__}."
            )
        if mode is not None and mode not in _MODES:
            raise ValueError(f"Expected mode in {_MODES}. Received: mode={mode!r}")
        self._handler = handler
        self.mode = mode
        params = inspect.signature(layer.call).parameters
        self._layer_takes_training = "training" in params
        self._layer_takes_mask = "mask" in params

    def build(self, input_shape):
        if not self.layer.built:
            self.layer.build(input_shape)
        if self.mode is None:
            self.mode = "params" if self._handler.gate_variables(self.layer) else "output"
        out_shape = tuple(self.layer.compute_output_shape(input_shape))
        self._axis = graph_lib._declared_axis(self.layer, len(out_shape))
        if self._axis is None:
            self._axis = len(out_shape) - 1
        self._add_state(int(out_shape[self._axis]))
        self.built = True

    def _add_state(self, channels: int) -> None:
        """Creates the gate and the pruning-state variables for `channels` gates."""
        state = dict(trainable=False, dtype="float32", autocast=False, aggregation="only_first_replica")
        self.gate = self.add_weight(name="gate", shape=(channels,), initializer="ones", **state)
        # Pruning state, saved with every checkpoint of the model so a run
        # can resume mid-pruning (see `TaylorPruning`): the running score sum
        # and the EMA of each channel's group, and run counters.
        self.score = self.add_weight(name="score", shape=(channels,), initializer="zeros", **state)
        self.ema = self.add_weight(name="ema", shape=(channels,), initializer="zeros", **state)
        self.counters = self.add_weight(name="counters", shape=(len(COUNTERS),), initializer="zeros", **state)

    @property
    def channels(self) -> int:
        return int(self.gate.shape[0])

    def _call_inner(self, inputs, training, mask):
        kwargs = {}
        if self._layer_takes_training:
            kwargs["training"] = training
        if self._layer_takes_mask and mask is not None:
            kwargs["mask"] = mask
        return self.layer(inputs, **kwargs)

    def call(self, inputs, training=None, mask=None):
        if self.mode == "output":
            y = self._call_inner(inputs, training, mask)
            gate = ops.cast(self.gate, y.dtype)
            rank = len(y.shape)
            if self._axis != rank - 1:  # channels first: (C, 1, ..., 1)
                gate = ops.reshape(gate, (-1,) + (1,) * (rank - 1 - self._axis))
            return self._record(y * gate)
        gated = self._handler.gate_variables(self.layer)
        mapping = [
            (v, self._handler.gate_scale(self.layer, v, v.value, ops.cast(self.gate, v.dtype)))
            for v in gated
        ]
        with keras.StatelessScope(state_mapping=mapping) as scope:
            y = self._call_inner(inputs, training, mask)
        # State updates made inside the scope (BN moving statistics) are
        # recorded by the scope, not applied: apply them.
        mapped = {id(v) for v in gated}
        for v in self.layer.variables:
            if id(v) in mapped:
                continue
            new = scope.get_current_value(v)
            if new is not None:
                v.assign(new)
        return self._record(y)

    def _record(self, y):
        calls = getattr(_recorder, "calls", None)
        if calls is not None:
            calls.append((self, y))
        return y

    @property
    def channel_axis(self) -> int:
        """The channel axis of the output (last, or 1 for channels_first)."""
        return self._axis

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    @property
    def trainable(self):
        return self.layer.trainable if hasattr(self, "layer") else super().trainable

    @trainable.setter
    def trainable(self, value):
        # Freezing or unfreezing a gated model reaches the wrapped layer
        # (BN gamma/beta, conv kernels); the gate variables stay non-trainable.
        keras.layers.Layer.trainable.fset(self, value)

    def get_config(self):
        config = super().get_config()
        config["mode"] = self.mode
        return config


def is_gated(model: keras.Model) -> bool:
    """True if any layer of `model` is a `ChannelGate`."""
    if not isinstance(model, keras.Model):
        raise ValueError(
            "Expected a Functional or Sequential keras.Model. Received: "
            f"model={getattr(model, 'name', model)!r} of class {type(model).__name__}."
        )
    return any(isinstance(l, ChannelGate) for l in model.layers)


def gate_layers(model: keras.Model) -> list:
    """The `ChannelGate` layers of a model, in model order."""
    return [l for l in model.layers if isinstance(l, ChannelGate)]


def _clone_layer(layer):
    return nesting.copy_layer(layer)[0]


def _nothing_prunable(model, graph) -> ValueError:
    """The error for a model whose analysis found no prunable channel group."""
    creating = graph.creating_layers()
    if not creating:
        why = "it has no layer that makes channels (Conv, Dense)"
    else:
        reasons = []
        for name, out_map in list(creating.items())[:4]:
            comps = np.unique(graph.comp_of[out_map]).tolist()
            why_layer = sorted({graph.fixed_reason.get(c, "fixed") for c in comps})
            reasons.append(f"{name!r}: {'; '.join(why_layer[:2])}")
        more = f" (and {len(creating) - 4} more layers)" if len(creating) > 4 else ""
        why = (
            "every output channel of its Conv/Dense layers must be kept: "
            + ", ".join(reasons) + more
        )
    return ValueError(
        f"Expected a model with prunable channels. Received: model={model.name!r}, "
        f"in which nothing can be pruned: {why}. Channels that reach a model "
        "output or come from a model input are never pruned; a model needs "
        "a Conv/Dense whose output feeds another layer that reads channels."
    )


def _call_accepting(layer, *args, **kwargs):
    """Calls `layer`, dropping keyword arguments its `call` does not take.

    A node recorded for one layer (`mask=None` passed to a BN) is replayed on
    another (the wrapper, or the wrapper's inner Conv) when gates are added or
    stripped.
    """
    params = inspect.signature(layer.call).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    return layer(*args, **kwargs)


def clone_with(model: keras.Model, clone_function, op_config=None) -> keras.Model:
    """`keras.models.clone_model` that tolerates swapping layer classes.

    Stateless `keras.ops` nodes (`x + 3.0`) are copied from their config
    (passed through `op_config(op, config)` when given: surgery writes a
    reshape's new channel count there); `clone_function` sees only layers.
    """

    def clone(op):
        if isinstance(op, keras.layers.Layer):
            return clone_function(op)
        # A stateless `keras.ops` node: a fresh copy, so the user's model does
        # not gain call history; reused when it cannot be rebuilt (and its
        # config is not changed).
        try:
            config = op.get_config()
        except Exception:
            return op
        if op_config is not None:
            changed = op_config(op, config)
            if changed is not config:
                return op.__class__.from_config(changed)
        try:
            return op.__class__.from_config(config)
        except Exception:
            return op

    if isinstance(model, keras.Sequential):
        return keras.models.clone_model(model, clone_function=clone)
    return keras.models.clone_model(model, clone_function=clone, call_function=_call_accepting)


def _copy_weights(pairs) -> None:
    for src, dst in pairs:
        if dst is not src:  # a layer reused as is (see nesting.copy_layer)
            dst.set_weights(src.get_weights())


def add_gates(model: keras.Model, on_unknown: str = "error") -> keras.Model:
    """Returns a copy of `model` with a `ChannelGate` at every prunable site.

    The user's model is never modified: the gated model has new layers holding
    copies of the weights.

    Args:
        model: a built Functional or Sequential model.
        on_unknown: `"error"` or `"freeze"`, see `keras_taylor.analyze`.
            Defaults to `"error"`.

    Returns:
        A new `keras.Model` of the same class (Functional or Sequential) whose
        gated layers are wrapped in `ChannelGate`, every gate at 1. It computes
        the same function as `model`. Models nested as layers are inlined
        (see `keras_taylor.nesting`): the gated model is one flat graph.

    Raises:
        ValueError: if the model cannot be analysed (see `analyze`), is
            already gated, or has no prunable channel (the message says why).
    """
    if is_gated(model):
        raise ValueError(
            "Expected a model without gates. Received: model="
            f"{model.name!r}, which already holds ChannelGate layers."
        )
    model = tracing.inline_composite_layers(model)  # the gated copy is flat and composites traced
    graph = graph_lib.analyze(model, on_unknown=on_unknown)
    if graph.num_groups == 0:
        raise _nothing_prunable(model, graph)
    sites = set(graph.gate_sites)
    pairs = []

    def clone(layer):
        new = _clone_layer(layer)
        pairs.append((layer, new))
        if layer.name in sites:
            # A handler may name its own wrapper (attention heads: `HeadGate`).
            wrapper = getattr(graph_lib.get_handler(new), "gate_wrapper", None) or ChannelGate
            return wrapper(new, name=layer.name)
        return new

    gated = clone_with(model, clone)
    _copy_weights(pairs)
    return gated


def strip_gates(model: keras.Model) -> keras.Model:
    """Returns a copy of a gated model with every gate folded into its layer.

    Each gate multiplies the parameters it scales (BN `gamma`/`beta`, kernel
    output slices and bias), so the result computes the same function as the
    gated model with only stock Keras layers. Pruned channels (gate 0) stay in
    place as zero channels; use `keras_taylor.prune` to remove them.

    Args:
        model: a model holding `ChannelGate` layers.

    Returns:
        A new model without `ChannelGate` layers.

    Raises:
        ValueError: if a gate that multiplies its output (mode `"output"`) has
            a value other than 1, since it cannot be folded into parameters.
    """
    return _strip(model, check_output_gates=True)


def _strip(model: keras.Model, check_output_gates: bool) -> keras.Model:
    _compat.functional_of(model)  # a clear error for what cannot be cloned
    if check_output_gates:  # refuse before building anything
        for wrapper in gate_layers(model):
            gate = keras.ops.convert_to_numpy(wrapper.gate.value)
            if wrapper.mode == "output" and not np.all(gate == 1.0):
                raise ValueError(
                    f"Cannot fold the gate of layer {wrapper.name!r} into its "
                    "parameters: it multiplies the layer's output and has values "
                    "other than 1. Use `keras_taylor.prune(model)` to remove the "
                    "gated channels instead."
                )
    pairs = []
    folds = []

    def clone(layer):
        if isinstance(layer, ChannelGate):
            new = _clone_layer(layer.layer)
            folds.append((layer, new))
            return new
        new = _clone_layer(layer)
        pairs.append((layer, new))
        return new

    stripped = clone_with(model, clone)
    _copy_weights(pairs)
    for wrapper, new in folds:
        gate = keras.ops.convert_to_numpy(wrapper.gate.value)
        inner = wrapper.layer
        scaled = {id(v) for v in wrapper._handler.gate_variables(inner)} if wrapper.mode == "params" else set()
        weights = [
            keras.ops.convert_to_numpy(
                wrapper._handler.gate_scale(inner, v, v.value, gate.astype(v.dtype)) if id(v) in scaled else v.value
            )
            for v in inner.weights
        ]
        new.set_weights([w.astype(v.dtype) for w, v in zip(weights, inner.weights)])
    return stripped


def record_run(model: keras.Model, target: float, metric: str) -> None:
    """Stores a pruning run's target and metric in the model's first gate, so
    every checkpoint of the gated model says what its run was aiming at."""
    counters = gate_layers(model)[0].counters
    c = keras.ops.convert_to_numpy(counters.value).copy()
    c[COUNTERS.index("target")] = float(target)
    c[COUNTERS.index("metric")] = float(METRICS.index(metric))
    counters.assign(c)


def recorded_run(model: keras.Model) -> dict | None:
    """`{"target", "metric", "events", "batches"}` of the pruning run recorded in
    a gated model (`TaylorPruning` writes it), or `None` if none was."""
    layers = gate_layers(model)
    if not layers:
        return None
    c = dict(zip(COUNTERS, keras.ops.convert_to_numpy(layers[0].counters.value).tolist()))
    if c["target"] <= 0.0:
        return None
    return {
        "target": float(c["target"]),
        "metric": METRICS[int(c["metric"])] if 0 <= int(c["metric"]) < len(METRICS) else "flops",
        "events": int(c["events"]),
        "batches": int(c["batches"]),
    }


def gate_values(model: keras.Model) -> dict:
    """Returns `{layer_name: np.ndarray}` with the current gate of every gated layer."""
    return {l.name: keras.ops.convert_to_numpy(l.gate.value) for l in gate_layers(model)}
