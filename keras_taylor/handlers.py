"""Per-layer channel rules, in an `isinstance`-keyed registry.

A handler tells the analysis (`graph.py`) how a layer moves channels from its
inputs to its outputs, tells surgery (`surgery.py`) how to slice its config and
weights, and tells `flops.py` what it costs. Only layers with a handler may sit
on a pruned path; anything else is refused with an error that names the layer
(see `graph.analyze`). Users extend the registry with `register_handler`.

Costs follow the convention of both papers and of He et al. (ResNet-50 v1 =
3.8 GFLOPs at 224², Table 1):
"FLOPs" counts the multiply–accumulates of Conv and Dense layers; batch norm,
activations, pooling and additions count 0. Params count every weight Keras
counts (`model.count_params()`), so BN moving statistics are included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import keras
import numpy as np

from keras_taylor import _compat

# Activations f with f(0) = 0: a channel gated to 0 stays 0 through them.
ZERO_PRESERVING_ACTIVATIONS = frozenset(
    {
        "linear", "relu", "relu6", "leaky_relu", "elu", "selu", "gelu",
        "silu", "swish", "tanh", "mish", "softsign", "hard_silu",
        "hard_swish", "celu", "glu", "sparse_plus", "tanh_shrink",
        "hard_tanh", "hard_shrink", "soft_shrink", "squareplus",
    }
)


def activation_name(activation) -> str:
    """Returns the registered name of a Keras activation (function or string)."""
    if activation is None:
        return "linear"
    if isinstance(activation, str):
        return activation
    name = getattr(activation, "__name__", None)
    if name is None:
        name = keras.activations.serialize(activation)
        if isinstance(name, dict):
            name = name.get("config", name)
    return str(name)


@dataclass(frozen=True)
class Cost:
    """Linear-in-channels cost of one layer call.

    `total(cin, cout) = a*cin*cout + b*cout + c*cin + d`, for `cin`/`cout` the
    number of live channels of the main input and the output.
    """

    a: float = 0.0
    b: float = 0.0
    c: float = 0.0
    d: float = 0.0

    def total(self, cin: float, cout: float) -> float:
        return self.a * cin * cout + self.b * cout + self.c * cin + self.d


ZERO = Cost()


class AnalysisContext:
    """What a handler may do to the channel graph while it is being read.

    A channel map is a 1-D int array, one id per slot of a tensor's channel
    axis (for a flattened tensor: one per feature).

    Shapes given to handlers are in channels-last order whatever the layers'
    `data_format`; while a layer is read, `in_axes` and `out_axes` hold the
    real channel axis of each of its inputs and outputs (`None` for a tensor
    of rank 1).
    """

    in_axes: list = []
    out_axes: list = []

    def new_ids(self, n: int) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def tie(self, a: np.ndarray, b: np.ndarray) -> None:  # pragma: no cover
        raise NotImplementedError

    def fix(self, ids: np.ndarray, reason: str) -> None:  # pragma: no cover
        raise NotImplementedError


class LayerHandler:
    """Base class: how one layer class handles channels.

    Subclasses override what differs. The defaults describe a layer without
    weights that maps each input channel to the same output channel and turns a
    zero channel into a zero channel (dropout, pooling, padding, ReLU).
    """

    #: The layer makes new channels (Conv, Dense): pruning its output removes filters.
    creates_channels = False
    #: The layer can turn a zero channel into a non-zero one (BatchNormalization,
    #: a biased conv), so a gate must follow it when its channels may be pruned.
    needs_gate = False

    def propagate(self, layer, in_maps: list, in_shapes, out_shapes, ctx: AnalysisContext) -> list:
        """Returns the channel maps of the outputs, given those of the inputs."""
        return [in_maps[0]]

    def gate_needed(self, layer) -> bool:
        """Whether `layer` can turn zero input channels into non-zero output channels."""
        return self.needs_gate

    # ---- zero-state dataflow (see graph.analyze) ----------------------
    # A removed channel is pruned consistently only if it is exactly zero in
    # the gated model (its gate at 0) wherever a layer that mixes channels
    # (Conv, Dense) reads it. These three hooks say how a layer moves the
    # "may be non-zero" state of a removed channel from inputs to outputs.

    def mixes_inputs(self, layer, in_shapes) -> bool:
        """Whether every input channel feeds output channels of other groups
        (Conv, Dense): a removed input channel must then be exactly zero."""
        return self.creates_channels

    def lifts_zero(self, layer, in_shapes) -> str | None:
        """Why `layer` maps a zero channel to a non-zero one (after its gate,
        if it has one), or `None` when zero stays zero (ReLU, pooling, ...)."""
        return None

    def combine(self, layer, in_states: list, in_shapes, out_shapes):
        """Per output slot, whether a removed channel may be non-zero, for
        layers whose inputs are tied slot by slot (merges). Each state is an
        int array: 0 = exactly zero, k > 0 = non-zero for reason k. `None`
        (the default) carries each slot's state along its channel id."""
        return None

    def gate_variables(self, layer) -> list:
        """Variables a gate scales (see `gate_scale`) to gate the output channels.

        An empty list means the gate must multiply the layer's output instead.
        """
        return []

    def gate_scale(self, layer, variable, value, gate):
        """Returns `value` (of `variable`) scaled by the output-channel `gate`.

        The default scales the last axis, the output-channel axis of Conv and
        Dense kernels, biases and BN parameters.
        """
        return value * gate

    def out_axes(self, layer, in_axes, in_shapes, out_shapes):
        """The channel axis of each output, given the real (not channels-last)
        shapes, or `None` for the default: the layer's `data_format` if it has
        one, the last axis for a layer that makes channels, else the axis of
        its first input."""
        return None

    def slice_with_layout(self, layer, config, weights, kept_in, kept_out, in_axes, out_axes):
        """`slice`, for handlers that need the real channel axes (Reshape, PReLU)."""
        return self.slice(layer, config, weights, kept_in, kept_out)

    def slice(self, layer, config: dict, weights: list, kept_in: list, kept_out: list):
        """Returns `(config, weights)` keeping only the given channel indices.

        Args:
            kept_in: per input, the kept indices of its channel map.
            kept_out: per output, the kept indices of its channel map.
        """
        return config, weights

    def macs(self, layer, in_shapes, out_shapes) -> Cost:
        return ZERO

    def params(self, layer, in_shapes, out_shapes) -> Cost:
        return ZERO


# --------------------------------------------------------------------------
# Concrete handlers.
# --------------------------------------------------------------------------

def _activation_lift(layer, activation) -> str | None:
    name = activation_name(activation)
    if name not in ZERO_PRESERVING_ACTIVATIONS:
        return f"{layer.name!r} applies activation {name!r}, which maps 0 to a non-zero value"
    return None


def _any(states):
    """OR of slot states: non-zero if any input is (Add, Subtract, Maximum, ...)."""
    out = states[0]
    for s in states[1:]:
        out = np.maximum(out, s)
    return out


def _all(states):
    """AND of slot states: zero if any input is (Multiply)."""
    out = states[0]
    for s in states[1:]:
        out = np.where(s == 0, 0, out)
    return out


class _ProducerHandler(LayerHandler):
    """Layers whose kernel's last axis makes new channels, with an optional bias."""

    creates_channels = True
    needs_gate = True

    def propagate(self, layer, in_maps, in_shapes, out_shapes, ctx):
        return [ctx.new_ids(out_shapes[0][-1])]

    def lifts_zero(self, layer, in_shapes):
        return _activation_lift(layer, layer.activation)

    def gate_variables(self, layer):
        return [v for v in (layer.kernel, getattr(layer, "bias", None)) if v is not None]


class ConvHandler(_ProducerHandler):
    """Conv1D/Conv2D/Conv3D: filters are channels.

    Grouped convolutions (`groups=G`) stay valid grouped convolutions:
    - depthwise form (`groups == in == filters`, ConvNeXt): output `c` is
      tied to input `c`, and `groups` shrinks with the channels;
    - otherwise channel `j` of every group is tied to channel `j` of the
      others (inputs and outputs alike), so each group keeps the same size and
      `groups` is unchanged.
    """

    @staticmethod
    def _groups(layer) -> int:
        return int(getattr(layer, "groups", 1) or 1)

    @classmethod
    def _depthwise_form(cls, layer, in_shapes) -> bool:
        g = cls._groups(layer)
        return g > 1 and g == in_shapes[0][-1] == layer.filters

    def gate_needed(self, layer) -> bool:
        return True

    def mixes_inputs(self, layer, in_shapes) -> bool:
        return not self._depthwise_form(layer, in_shapes)

    def propagate(self, layer, in_maps, in_shapes, out_shapes, ctx):
        g = self._groups(layer)
        if g == 1:
            return super().propagate(layer, in_maps, in_shapes, out_shapes, ctx)
        if self._depthwise_form(layer, in_shapes):
            return [in_maps[0]]
        per_in = in_shapes[0][-1] // g
        for k in range(1, g):
            ctx.tie(in_maps[0][:per_in], in_maps[0][k * per_in : (k + 1) * per_in])
        return [np.tile(ctx.new_ids(out_shapes[0][-1] // g), g)]

    def slice(self, layer, config, weights, kept_in, kept_out):
        g = self._groups(layer)
        config = dict(config)
        config["filters"] = int(len(kept_out[0]))
        if g == 1:
            kernel = weights[0][..., kept_in[0], :][..., kept_out[0]]
        elif g == layer.filters and weights[0].shape[-2] == 1:  # depthwise form
            config["groups"] = int(len(kept_out[0]))
            kernel = weights[0][..., kept_out[0]]
        else:
            per_in = weights[0].shape[-2]
            kept_in_group = kept_in[0][kept_in[0] < per_in]  # the same in every group (tied)
            kernel = weights[0][..., kept_in_group, :][..., kept_out[0]]
        rest = [w[kept_out[0]] for w in weights[1:]]
        return config, [kernel, *rest]

    def macs(self, layer, in_shapes, out_shapes):
        spatial = math.prod(out_shapes[0][1:-1]) * math.prod(layer.kernel_size)
        if self._depthwise_form(layer, in_shapes):
            return Cost(b=spatial)
        return Cost(a=spatial / self._groups(layer))

    def params(self, layer, in_shapes, out_shapes):
        k = math.prod(layer.kernel_size)
        bias = 1.0 if layer.use_bias else 0.0
        if self._depthwise_form(layer, in_shapes):
            return Cost(b=k + bias)
        return Cost(a=k / self._groups(layer), b=bias)


class DenseHandler(_ProducerHandler):
    """Dense on the last axis: units are channels."""

    def slice(self, layer, config, weights, kept_in, kept_out):
        config = dict(config)
        config["units"] = int(len(kept_out[0]))
        kernel = weights[0][kept_in[0], :][:, kept_out[0]]
        rest = [w[kept_out[0]] for w in weights[1:]]
        return config, [kernel, *rest]

    def macs(self, layer, in_shapes, out_shapes):
        return Cost(a=math.prod(out_shapes[0][1:-1]))

    def params(self, layer, in_shapes, out_shapes):
        return Cost(a=1.0, b=1.0 if layer.use_bias else 0.0)


class DepthwiseConvHandler(LayerHandler):
    """DepthwiseConv1D/2D: output channel `c*dm + k` comes from input channel `c`.

    Input channel `c` and its `depth_multiplier` outputs are one channel
    group; the layer's config keeps its `depth_multiplier`.
    """

    def gate_needed(self, layer) -> bool:
        return bool(layer.use_bias)

    def propagate(self, layer, in_maps, in_shapes, out_shapes, ctx):
        return [np.repeat(in_maps[0], layer.depth_multiplier)]

    def lifts_zero(self, layer, in_shapes):
        return _activation_lift(layer, layer.activation)

    def gate_variables(self, layer):
        return [v for v in (layer.kernel, getattr(layer, "bias", None)) if v is not None]

    def gate_scale(self, layer, variable, value, gate):
        if variable is layer.kernel:  # (..., in, dm): output c*dm+k is [..., c, k]
            return value * keras.ops.reshape(gate, tuple(variable.shape[-2:]))
        return value * gate

    def slice(self, layer, config, weights, kept_in, kept_out):
        dm = layer.depth_multiplier
        kernel = weights[0][..., kept_in[0], :]
        rest = [w.reshape(-1, dm)[kept_in[0]].reshape(-1) for w in weights[1:]]
        return config, [kernel, *rest]

    def macs(self, layer, in_shapes, out_shapes):
        return Cost(b=math.prod(out_shapes[0][1:-1]) * math.prod(layer.kernel_size))

    def params(self, layer, in_shapes, out_shapes):
        return Cost(b=math.prod(layer.kernel_size) + (1.0 if layer.use_bias else 0.0))


class SeparableConvHandler(_ProducerHandler):
    """SeparableConv1D/2D: a depthwise conv (multiplier dm) then a 1×1 pointwise conv."""

    def gate_variables(self, layer):
        return [v for v in (layer.pointwise_kernel, getattr(layer, "bias", None)) if v is not None]

    def slice(self, layer, config, weights, kept_in, kept_out):
        dm = layer.depth_multiplier
        config = dict(config)
        config["filters"] = int(len(kept_out[0]))
        rows = (kept_in[0][:, None] * dm + np.arange(dm)[None, :]).reshape(-1)
        depthwise = weights[0][..., kept_in[0], :]
        pointwise = weights[1][..., rows, :][..., kept_out[0]]
        rest = [w[kept_out[0]] for w in weights[2:]]
        return config, [depthwise, pointwise, *rest]

    def macs(self, layer, in_shapes, out_shapes):
        spatial = math.prod(out_shapes[0][1:-1])
        dm = layer.depth_multiplier
        return Cost(a=spatial * dm, c=spatial * dm * math.prod(layer.kernel_size))

    def params(self, layer, in_shapes, out_shapes):
        dm = layer.depth_multiplier
        return Cost(a=dm, c=dm * math.prod(layer.kernel_size), b=1.0 if layer.use_bias else 0.0)


class ConvTransposeHandler(_ProducerHandler):
    """Conv1D/2D/3DTranspose: kernel `(..., out, in)`."""

    def gate_scale(self, layer, variable, value, gate):
        if variable is layer.kernel:
            return value * keras.ops.reshape(gate, (-1, 1))
        return value * gate

    def slice(self, layer, config, weights, kept_in, kept_out):
        config = dict(config)
        config["filters"] = int(len(kept_out[0]))
        kernel = weights[0][..., kept_out[0], :][..., kept_in[0]]
        rest = [w[kept_out[0]] for w in weights[1:]]
        return config, [kernel, *rest]

    def macs(self, layer, in_shapes, out_shapes):
        # Every input position scatters a full kernel.
        return Cost(a=math.prod(in_shapes[0][1:-1]) * math.prod(layer.kernel_size))

    def params(self, layer, in_shapes, out_shapes):
        return Cost(a=math.prod(layer.kernel_size), b=1.0 if layer.use_bias else 0.0)


class BatchNormHandler(LayerHandler):
    """BatchNormalization over the last axis: every weight is per channel."""

    needs_gate = True

    def gate_variables(self, layer):
        # y = gamma * x_hat + beta: scaling both scales y. With scale=False the
        # output cannot be scaled through the parameters.
        if not layer.scale:
            return []
        return [v for v in (layer.gamma, getattr(layer, "beta", None)) if v is not None]

    def slice(self, layer, config, weights, kept_in, kept_out):
        return config, [w[kept_out[0]] for w in weights]

    def params(self, layer, in_shapes, out_shapes):
        return Cost(b=2.0 + float(layer.scale) + float(layer.center))


class PassThroughHandler(LayerHandler):
    """Weightless, channel-wise, zero-preserving layers (pooling, dropout, ...)."""


class ActivationHandler(LayerHandler):
    """`Activation`, `ReLU`, `LeakyReLU`, `ELU`: element-wise, maybe zero-lifting."""

    def lifts_zero(self, layer, in_shapes):
        if isinstance(layer, keras.layers.Activation):
            return _activation_lift(layer, layer.activation)
        if isinstance(layer, keras.layers.ReLU):
            if float(layer.negative_slope) != 0.0 and float(layer.threshold) != 0.0:
                return f"{layer.name!r}: ReLU(threshold, negative_slope) maps 0 to a non-zero value"
        return None


class SoftmaxHandler(LayerHandler):
    """Softmax couples all channels of its axis: none of them may be removed."""

    def propagate(self, layer, in_maps, in_shapes, out_shapes, ctx):
        ctx.fix(in_maps[0], f"{layer.name!r} is a softmax across channels")
        return [in_maps[0]]


class ElementwiseMergeHandler(LayerHandler):
    """Add/Subtract/Average/Maximum/Minimum/Multiply: channel i of every input is tied.

    A removed channel is zero after `Multiply` if it is zero in any input
    (the squeeze-excite `x * sigmoid(s)`), after the others only if it is zero
    in every input. An input with one channel broadcast over the others (a
    spatial-attention map, `x * sigmoid(conv_1ch(x))`) keeps its channel and
    acts as a non-zero factor or term.
    """

    @staticmethod
    def _broadcast(in_shapes, out_shapes) -> list:
        width = out_shapes[0][-1] if len(out_shapes[0]) > 1 else 1
        return [width > 1 and (len(s) <= 1 or s[-1] == 1) for s in in_shapes]

    def propagate(self, layer, in_maps, in_shapes, out_shapes, ctx):
        broadcast = self._broadcast(in_shapes, out_shapes)
        full = [m for m, b in zip(in_maps, broadcast) if not b]
        if len({len(m) for m in full}) != 1:
            raise ValueError(
                f"Expected the inputs of layer {layer.name!r} "
                f"({type(layer).__name__}) to have the same number of channels, "
                "or one channel broadcast over the others. Received: input "
                f"channel counts {[len(m) for m in in_maps]}."
            )
        for m, b in zip(in_maps, broadcast):
            if b:
                ctx.fix(m, f"{layer.name!r} broadcasts it over the channels of its other inputs")
        for other in full[1:]:
            ctx.tie(full[0], other)
        return [full[0]]

    @staticmethod
    def _has_broadcast(in_shapes) -> bool:
        widths = [s[-1] if len(s) > 1 else 1 for s in in_shapes]
        return max(widths) > 1 and min(widths) == 1

    def lifts_zero(self, layer, in_shapes):
        if not isinstance(layer, keras.layers.Multiply) and self._has_broadcast(in_shapes):
            return f"{layer.name!r} adds a channel broadcast over the others"
        return None

    @classmethod
    def merge_states(cls, in_states, in_shapes, out_shapes, multiply: bool):
        """AND (a product) or OR (a sum, max, ...) of the non-broadcast inputs'
        states; a broadcast factor is some fixed value: zero times it stays zero."""
        broadcast = cls._broadcast(in_shapes, out_shapes)
        full = [st for st, b in zip(in_states, broadcast) if not b]
        return _all(full) if multiply else _any(full)

    def combine(self, layer, in_states, in_shapes, out_shapes):
        return self.merge_states(in_states, in_shapes, out_shapes, isinstance(layer, keras.layers.Multiply))


class ConcatenateHandler(LayerHandler):
    """Concatenate: along channels the maps are joined; along space they are tied."""

    @staticmethod
    def _joins_channels(in_shapes, out_shapes) -> bool:
        # Channels-last shapes: joined along channels, the channel counts add up.
        return out_shapes[0][-1] == sum(s[-1] for s in in_shapes)

    def propagate(self, layer, in_maps, in_shapes, out_shapes, ctx):
        if self._joins_channels(in_shapes, out_shapes):
            return [np.concatenate(in_maps)]
        for other in in_maps[1:]:
            ctx.tie(in_maps[0], other)
        return [in_maps[0]]

    def combine(self, layer, in_states, in_shapes, out_shapes):
        if self._joins_channels(in_shapes, out_shapes):
            return None  # channel offsets: each slot keeps its own state
        return _any(in_states)  # joined along space: non-zero if any part is


class FlattenHandler(LayerHandler):
    """Flatten of a channels-last tensor: feature `i` is channel `i % C`."""

    def propagate(self, layer, in_maps, in_shapes, out_shapes, ctx):
        positions = math.prod(in_shapes[0][1:-1])
        rank = len(in_shapes[0])
        axis = ctx.in_axes[0] if ctx.in_axes else rank - 1
        fmt = getattr(layer, "data_format", "channels_last")
        if rank <= 2 or axis == rank - 1 and fmt == "channels_last":
            return [np.tile(in_maps[0], positions)]
        if axis == 1 and fmt == "channels_first":  # Keras moves channels last first
            return [np.tile(in_maps[0], positions)]
        if axis == 1 and fmt == "channels_last":  # (C, H, W) flattened in place
            return [np.repeat(in_maps[0], positions)]
        raise ValueError(
            f"Expected Flatten with data_format matching its input's channel "
            f"axis. Received: layer {layer.name!r} with data_format={fmt!r} on a "
            f"tensor whose channels are on axis {axis}."
        )


class FixingHandler(LayerHandler):
    """Normalization layers that couple channels or shift them.

    LayerNormalization/GroupNormalization/UnitNormalization over channels and
    Normalization over other axes are fixed (a removed channel changes the
    statistics of the others); per-channel Normalization and Rescaling with
    an offset keep their channels apart but map 0 to non-zero.
    """

    @staticmethod
    def _per_channel(layer, rank, axis) -> bool:
        if isinstance(layer, keras.layers.Rescaling):
            return True
        if isinstance(layer, keras.layers.Normalization) and axis is not None:
            return tuple(a % rank for a in layer.axis) == (axis,)
        return False

    def propagate(self, layer, in_maps, in_shapes, out_shapes, ctx):
        rank = len(in_shapes[0])
        axis = ctx.in_axes[0] if ctx.in_axes else rank - 1
        if not self._per_channel(layer, rank, axis):
            ctx.fix(in_maps[0], f"{layer.name!r} ({type(layer).__name__}) mixes channels")
        return [in_maps[0]]

    def lifts_zero(self, layer, in_shapes):
        if isinstance(layer, keras.layers.Rescaling) and not np.any(np.asarray(layer.offset)):
            return None
        return f"{layer.name!r} ({type(layer).__name__}) shifts its channels"

    def params(self, layer, in_shapes, out_shapes):
        return Cost(d=float(layer.count_params()))


class ReshapeHandler(LayerHandler):
    """Reshape/Permute that keep the channel axis whole: positions move, channels do not.

    Permute moves the channel axis wherever its `dims` say (so it can switch
    layouts). Reshape must keep the channels as one axis, first or last: a
    channels-last `(H, W, C) -> (H*W, C)`, a channels-first
    `(C, H, W) -> (C, H*W)`, or a vector `(C,) -> (1, 1, C)` or `(C, 1, 1)`.
    """

    def out_axes(self, layer, in_axes, in_shapes, out_shapes):
        axis, shape, out = in_axes[0], in_shapes[0], out_shapes[0]
        if isinstance(layer, keras.layers.Permute):
            if axis is None:
                return [None]
            return [(0, *layer.dims).index(axis)]
        if axis is None:
            return [None if len(out) <= 1 else len(out) - 1]
        channels, rank = shape[axis], len(shape)
        if axis == rank - 1 and len(out) > 1 and out[-1] == channels:
            return [len(out) - 1]
        if axis == 1 and len(out) > 1 and out[1] == channels:
            return [1]
        raise ValueError(
            f"Expected {type(layer).__name__} to keep the channel axis whole, as "
            f"the first or last axis. Received: layer {layer.name!r} mapping "
            f"{shape} (channels on axis {axis}) to {out}."
        )

    def slice_with_layout(self, layer, config, weights, kept_in, kept_out, in_axes, out_axes):
        target = config.get("target_shape")
        axis = out_axes[0]
        if target is not None and axis is not None and target[axis - 1] != -1:
            target = list(target)
            target[axis - 1] = int(len(kept_out[0]))
            config = dict(config, target_shape=tuple(target))
        return config, weights


class PReLUHandler(LayerHandler):
    """PReLU on channels-last tensors: element-wise, zero-preserving, with a per-channel `alpha`."""

    def out_axes(self, layer, in_axes, in_shapes, out_shapes):
        axis, rank = in_axes[0], len(in_shapes[0])
        if axis is not None and axis != rank - 1:
            raise ValueError(
                f"Expected PReLU on channels-last tensors. Received: layer "
                f"{layer.name!r} on a tensor whose channels are on axis {axis}."
            )
        return None

    def propagate(self, layer, in_maps, in_shapes, out_shapes, ctx):
        if layer.alpha.shape[-1] not in (1, in_shapes[0][-1]):
            raise ValueError(f"Expected PReLU alpha per channel or shared. Received: layer {layer.name!r}.")
        return [in_maps[0]]

    def slice(self, layer, config, weights, kept_in, kept_out):
        if weights[0].shape[-1] == 1:
            return config, weights
        return config, [weights[0][..., kept_out[0]]]

    def params(self, layer, in_shapes, out_shapes):
        per = math.prod(layer.alpha.shape[:-1])
        return Cost(b=float(per)) if layer.alpha.shape[-1] != 1 else Cost(d=float(layer.count_params()))


class OpHandler(LayerHandler):
    """A `keras.ops` node in a functional graph (`x + 3.0`, `x * y`, `x / 6`,
    `ops.relu6(x)`, `ops.sigmoid(x)`).

    With two tensor operands it is an element-wise merge (channels tied). With
    one tensor, scaling and zero-preserving functions keep a removed channel
    zero; adding a constant, `max(x, c)` and functions with f(0) != 0 make it
    non-zero (see the zero-state dataflow in `graph.py`).
    """

    KINDS = ("add", "multiply", "divide", "extremum", "zero_preserving", "lifting")

    def __init__(self, kind: str):
        if kind not in self.KINDS:
            raise ValueError(f"Expected kind in {self.KINDS}. Received: kind={kind!r}")
        self.kind = kind

    def propagate(self, layer, in_maps, in_shapes, out_shapes, ctx):
        if len(in_maps) > 1:
            return ElementwiseMergeHandler().propagate(layer, in_maps, in_shapes, out_shapes, ctx)
        return [in_maps[0]]

    def lifts_zero(self, layer, in_shapes):
        if self.kind == "divide":  # `c / x` or `x / y` may divide by a removed (zero) channel
            return f"{layer.name!r} divides, maybe by a removed (zero) channel"
        if self.kind == "lifting":
            return f"{layer.name!r} ({type(layer).__name__}) maps 0 to a non-zero value"
        if self.kind == "extremum" and len(in_shapes) == 1:
            return f"{layer.name!r} takes a maximum/minimum with a constant"
        if self.kind == "add" and len(in_shapes) == 1:
            return f"{layer.name!r} adds a constant"
        if self.kind in ("add", "extremum") and ElementwiseMergeHandler._has_broadcast(in_shapes):
            return f"{layer.name!r} adds a channel broadcast over the others"
        return None

    def combine(self, layer, in_states, in_shapes, out_shapes):
        if len(in_states) < 2:
            return None
        return ElementwiseMergeHandler.merge_states(in_states, in_shapes, out_shapes, self.kind == "multiply")


class ChannelScaleHandler(LayerHandler):
    """`y = x * gamma` with one weight per channel (ConvNeXt's LayerScale,
    KerasHub's `DINOV2LayerScale` while `attention.prune_embedding` is on)."""

    def slice(self, layer, config, weights, kept_in, kept_out):
        config = dict(config)
        for key in ("projection_dim", "hidden_dim"):  # ConvNeXt's LayerScale, DINOv2's
            if key in config:
                config[key] = int(len(kept_out[0]))
        return config, [w[kept_out[0]] for w in weights]

    def params(self, layer, in_shapes, out_shapes):
        return Cost(b=1.0)


def _channel_axis(ctx, rank: int) -> int | None:
    axes = getattr(ctx, "in_axes", None) or []
    return axes[0] if axes else rank - 1


def _zero_constant(value) -> bool:
    if value is None:
        return True
    try:
        return bool(np.all(np.asarray(value, dtype="float64") == 0.0))
    except (TypeError, ValueError):
        return False


class PadOpHandler(LayerHandler):
    """`keras.ops.pad` node (ResNet v2's -inf spatial padding).

    Padding other axes keeps each channel's id; padding the channel axis adds
    new channels (fixed, and the padded tensor's channels with them, since
    the op's `pad_width` would not change with pruning). A zero channel stays
    zero only with `mode="constant"` and a zero `constant_values`.
    """

    def _widths(self, layer, rank):
        pw = [tuple(int(v) for v in p) for p in layer.pad_width]
        return pw * rank if len(pw) == 1 else pw

    def propagate(self, layer, in_maps, in_shapes, out_shapes, ctx):
        rank = len(in_shapes[0])
        axis = _channel_axis(ctx, rank)
        if axis is None:
            return [in_maps[0]]
        before, after = self._widths(layer, rank)[axis]
        if before == 0 and after == 0:
            return [in_maps[0]]
        out = np.concatenate([ctx.new_ids(before), in_maps[0], ctx.new_ids(after)])
        ctx.fix(out, f"{layer.name!r} (ops.pad) pads the channel axis")
        return [out]

    def lifts_zero(self, layer, in_shapes):
        if getattr(layer, "mode", "constant") != "constant":
            return f"{layer.name!r} (ops.pad) pads with mode={layer.mode!r}"
        value = _compat.recorded_call_kwargs(layer).get("constant_values")
        if not _zero_constant(value):
            return f"{layer.name!r} (ops.pad) pads with constant_values={value!r}"
        return None


def _fixed_through(in_maps, out_shapes, ctx, reason: str) -> list:
    """For an op that moves channels in a way no rule follows: fixes its
    input channels and returns new output channels, fixed too."""
    ctx.fix(in_maps[0], reason)
    out = ctx.new_ids(out_shapes[0][-1] if len(out_shapes[0]) > 1 else 1)
    ctx.fix(out, reason)
    return [out]


class ReshapeOpHandler(LayerHandler):
    """`keras.ops.reshape` node (KerasHub's MiT: tokens `(B, H*W, C)` to a
    map `(B, H, W, C)` and back around its depthwise conv).

    A reshape that keeps the channels as the last axis, of the same size, only
    moves positions: each channel keeps its id, and surgery writes the kept
    count into the op's `newshape`. Any other reshape (heads split out of the
    channels, `(B, N, C) -> (B, N, h, C/h)`) fixes the channels on both sides.
    """

    def propagate(self, layer, in_maps, in_shapes, out_shapes, ctx):
        rank = len(in_shapes[0])
        axis = _channel_axis(ctx, rank)
        target = list(layer.newshape) if isinstance(layer.newshape, (tuple, list)) else []
        if axis == rank - 1 and len(target) > 1 and target[-1] != -1 and out_shapes[0][-1] == in_shapes[0][-1]:
            return [in_maps[0]]
        reason = f"{layer.name!r} (ops.reshape) does not keep the channels as its last axis"
        return _fixed_through(in_maps, out_shapes, ctx, reason)

    def slice(self, layer, config, weights, kept_in, kept_out):
        target = list(config.get("newshape", ()))
        if len(target) > 1 and target[-1] != -1:
            target[-1] = int(len(kept_out[0]))
            config = dict(config, newshape=tuple(target))
        return config, weights


class SplitOpHandler(LayerHandler):
    """`keras.ops.split` node (CSPNet's cross-stage split).

    Along another axis every part keeps the channel ids. Along the channel
    axis into `N` equal sections, channel `j` of every section is tied to
    channel `j` of the others, so the sections stay equal and the same
    `split(x, N)` still applies after pruning. A split at explicit indices
    fixes the channels (its indices would not follow the pruning).
    """

    def propagate(self, layer, in_maps, in_shapes, out_shapes, ctx):
        rank = len(in_shapes[0])
        axis = _channel_axis(ctx, rank)
        if axis is None or layer.axis % rank != axis:
            return [in_maps[0] for _ in out_shapes]
        sizes = [s[-1] for s in out_shapes]
        cuts = np.cumsum([0, *sizes])
        parts = [in_maps[0][cuts[i] : cuts[i + 1]] for i in range(len(sizes))]
        if isinstance(layer.indices_or_sections, int) and len(set(sizes)) == 1:
            for part in parts[1:]:
                ctx.tie(parts[0], part)
        else:
            ctx.fix(in_maps[0], f"{layer.name!r} (ops.split) splits channels at fixed indices {layer.indices_or_sections}")
        return parts


class ReduceOpHandler(LayerHandler):
    """`keras.ops.mean/sum/max/min` node over positions (squeeze-excite's
    `ops.mean(x, axis=(1, 2), keepdims=True)`): channels pass through, and a
    zero channel reduces to zero. A reduction over the channel axis (or all
    axes) fixes the channels."""

    def propagate(self, layer, in_maps, in_shapes, out_shapes, ctx):
        rank = len(in_shapes[0])
        axis = _channel_axis(ctx, rank)
        axes = layer.axis
        if axes is None:
            reduced = set(range(rank))
        else:
            reduced = {int(a) % rank for a in (axes if isinstance(axes, (list, tuple)) else [axes])}
        if axis is None or axis in reduced or 0 in reduced:
            ctx.fix(in_maps[0], f"{layer.name!r} ({type(layer).__name__}) reduces over the channel or batch axis")
            out = out_shapes[0]
            n = out[-1] if len(out) > 1 else 1
            if n != len(in_maps[0]):
                ids = ctx.new_ids(n)
                ctx.fix(ids, f"comes out of {layer.name!r}, which reduces over channels")
                return [ids]
        return [in_maps[0]]

    def out_axes(self, layer, in_axes, in_shapes, out_shapes):
        axis, rank = in_axes[0], len(in_shapes[0])
        if axis is None or getattr(layer, "keepdims", False):
            return None
        axes = layer.axis
        if axes is None:
            return [None]
        reduced = {int(a) % rank for a in (axes if isinstance(axes, (list, tuple)) else [axes])}
        if axis in reduced:
            return None
        out = axis - sum(1 for a in reduced if a < axis)
        return [out if len(out_shapes[0]) > 1 else None]


class GetItemOpHandler(LayerHandler):
    """`x[key]` on a symbolic tensor (`keras.ops` `GetItem`; KerasHub's
    `ViTImageClassifier` pools the class token with `x[:, 0]`).

    A key of ints and slices (one `Ellipsis` at most) that takes the whole
    channel axis (`:` or the `Ellipsis` covers it) and leaves the batch axis
    whole only selects positions: each channel keeps its id, the channel axis
    moves left by the int indices before it, a zero channel stays zero, and
    the key does not change with pruning. Any other key (indexing or slicing
    the channels, `None`/`newaxis`, tensor indices) fixes the channels.
    """

    @staticmethod
    def _subkeys(layer, rank):
        """The key per input axis, or `None` when it is not ints and slices."""
        args = _compat.recorded_call_args(layer)
        key = args[1] if len(args) > 1 else _compat.recorded_call_kwargs(layer).get("key")
        key = list(key) if isinstance(key, (tuple, list)) else [key]
        simple = all(k is Ellipsis or isinstance(k, slice) or (isinstance(k, (int, np.integer)) and not isinstance(k, bool)) for k in key)
        if not simple or sum(k is Ellipsis for k in key) > 1:
            return None
        if Ellipsis not in key:
            key.append(Ellipsis)
        at = key.index(Ellipsis)
        fill = rank - (len(key) - 1)
        if fill < 0:
            return None
        return key[:at] + [slice(None)] * fill + key[at + 1 :]

    @staticmethod
    def _whole(k) -> bool:
        return isinstance(k, slice) and k.start is None and k.stop is None and k.step in (None, 1)

    def _channels_kept(self, layer, rank, axis):
        subkeys = self._subkeys(layer, rank)
        return subkeys is not None and axis is not None and self._whole(subkeys[axis]) and self._whole(subkeys[0]), subkeys

    def propagate(self, layer, in_maps, in_shapes, out_shapes, ctx):
        rank = len(in_shapes[0])
        axis = _channel_axis(ctx, rank)
        ok, _ = self._channels_kept(layer, rank, axis)
        if ok:
            return [in_maps[0]]
        reason = f"{layer.name!r} (x[key]) indexes the channel or batch axis"
        return _fixed_through(in_maps, out_shapes, ctx, reason)

    def out_axes(self, layer, in_axes, in_shapes, out_shapes):
        rank = len(in_shapes[0])
        axis = in_axes[0]
        ok, subkeys = self._channels_kept(layer, rank, axis)
        if not ok:
            return None
        return [axis - sum(1 for k in subkeys[:axis] if not isinstance(k, slice))]


# --------------------------------------------------------------------------
# Registry.
# --------------------------------------------------------------------------

_REGISTRY: list = []  # [(layer class, handler)], most recently registered first


def register_handler(layer_class: type, handler: LayerHandler) -> None:
    """Registers how keras_taylor treats the channels of `layer_class`.

    Handlers are matched with `isinstance`, newest registration first, so a
    handler for a subclass registered later overrides its base class's.

    Args:
        layer_class: a `keras.layers.Layer` subclass.
        handler: a `LayerHandler` instance describing the layer.

    Raises:
        TypeError: if the arguments are not a layer class and a handler.

    Example:

    ```python
    class ScaleChannels(keras.layers.Layer):  # y = x * w, w per channel
        ...

    class ScaleHandler(keras_taylor.LayerHandler):
        needs_gate = False
        def slice(self, layer, config, weights, kept_in, kept_out):
            return config, [weights[0][kept_out[0]]]
        def params(self, layer, in_shapes, out_shapes):
            return keras_taylor.handlers.Cost(b=1.0)

    keras_taylor.register_handler(ScaleChannels, ScaleHandler())
    ```
    """
    if not (isinstance(layer_class, type) and issubclass(layer_class, keras.Operation)):
        raise TypeError(
            "Expected `layer_class` to be a subclass of keras.layers.Layer (or keras.Operation). "
            f"Received: layer_class={layer_class!r}"
        )
    if not isinstance(handler, LayerHandler):
        raise TypeError(
            "Expected `handler` to be a keras_taylor.LayerHandler instance. "
            f"Received: handler={handler!r}"
        )
    _REGISTRY.insert(0, (layer_class, handler))


def get_handler(layer) -> LayerHandler | None:
    """Returns the handler for `layer`, or `None` if no handler knows it."""
    for cls, handler in _REGISTRY:
        if isinstance(layer, cls):
            # Exact Conv classes only: transposed/depthwise/separable convs
            # subclass BaseConv with other weight layouts. A ConvHandler
            # registered for the layer's own class applies.
            if isinstance(handler, ConvHandler) and type(layer) not in _PLAIN_CONVS and cls is not type(layer):
                continue
            return handler
    return None


L = keras.layers
_PLAIN_CONVS = (L.Conv1D, L.Conv2D, L.Conv3D)

#: Layers that act on each channel alone and keep channel ids (dropout,
#: pooling, padding, cropping, upsampling); latency tables time them with the
#: layer whose output they ride on.
CHANNELWISE_LAYERS = (
    L.Dropout, L.SpatialDropout1D, L.SpatialDropout2D, L.SpatialDropout3D,
    L.MaxPooling1D, L.MaxPooling2D, L.MaxPooling3D,
    L.AveragePooling1D, L.AveragePooling2D, L.AveragePooling3D,
    L.GlobalAveragePooling1D, L.GlobalAveragePooling2D, L.GlobalAveragePooling3D,
    L.GlobalMaxPooling1D, L.GlobalMaxPooling2D, L.GlobalMaxPooling3D,
    L.ZeroPadding1D, L.ZeroPadding2D, L.ZeroPadding3D,
    L.Cropping1D, L.Cropping2D, L.Cropping3D,
    L.UpSampling1D, L.UpSampling2D, L.UpSampling3D,
    L.Identity,
)
for _cls in CHANNELWISE_LAYERS + (L.Resizing,):
    register_handler(_cls, PassThroughHandler())
for _cls in (L.Normalization, L.Rescaling, L.LayerNormalization, L.GroupNormalization, L.UnitNormalization):
    register_handler(_cls, FixingHandler())
for _cls in (L.Reshape, L.Permute):
    register_handler(_cls, ReshapeHandler())
register_handler(L.PReLU, PReLUHandler())
for _kind, _classes in _compat.op_classes().items():
    for _cls in _classes:
        register_handler(_cls, OpHandler(_kind))
_structural = _compat.structural_op_classes()
for _handler, _key in (
    (PadOpHandler(), "pad"), (SplitOpHandler(), "split"), (ReduceOpHandler(), "reduce"), (ReshapeOpHandler(), "reshape"),
    (GetItemOpHandler(), "getitem"),
):
    for _cls in _structural[_key]:
        register_handler(_cls, _handler)
_apps = _compat.application_layers()
if "LayerScale" in _apps:
    register_handler(_apps["LayerScale"], ChannelScaleHandler())
if "StochasticDepth" in _apps:
    register_handler(_apps["StochasticDepth"], PassThroughHandler())
if "CustomScaleLayer" in _apps:  # inputs[0] + inputs[1] * scale: non-zero if either is
    register_handler(_apps["CustomScaleLayer"], ElementwiseMergeHandler())
for _cls in (L.Activation, L.ReLU, L.LeakyReLU, L.ELU):
    register_handler(_cls, ActivationHandler())
register_handler(L.Softmax, SoftmaxHandler())
for _cls in (L.Add, L.Subtract, L.Average, L.Maximum, L.Minimum, L.Multiply):
    register_handler(_cls, ElementwiseMergeHandler())
register_handler(L.Concatenate, ConcatenateHandler())
register_handler(L.Flatten, FlattenHandler())
register_handler(L.BatchNormalization, BatchNormHandler())
register_handler(L.Dense, DenseHandler())
for _cls in _PLAIN_CONVS:
    register_handler(_cls, ConvHandler())
for _cls in (L.DepthwiseConv1D, L.DepthwiseConv2D):
    register_handler(_cls, DepthwiseConvHandler())
for _cls in (L.SeparableConv1D, L.SeparableConv2D):
    register_handler(_cls, SeparableConvHandler())
for _cls in (L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose):
    register_handler(_cls, ConvTransposeHandler())
del _cls
