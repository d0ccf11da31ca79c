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
    """

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

def _require_channels_last(layer) -> None:
    fmt = getattr(layer, "data_format", "channels_last")
    if fmt != "channels_last":
        raise ValueError(
            f"Expected data_format='channels_last' on a pruned path. Received: "
            f"layer {layer.name!r} ({type(layer).__name__}) with "
            f"data_format={fmt!r}."
        )


def _fix_if_activation_lifts_zero(layer, ids, ctx, activation) -> None:
    name = activation_name(activation)
    if name not in ZERO_PRESERVING_ACTIVATIONS:
        ctx.fix(
            ids,
            f"{layer.name!r} applies activation {name!r}, which maps 0 to a "
            "non-zero value, so a removed channel would not be zero",
        )


class _ProducerHandler(LayerHandler):
    """Layers whose kernel's last axis makes new channels, with an optional bias."""

    creates_channels = True
    needs_gate = True

    def propagate(self, layer, in_maps, in_shapes, out_shapes, ctx):
        out = ctx.new_ids(out_shapes[0][-1])
        _fix_if_activation_lifts_zero(layer, out, ctx, layer.activation)
        return [out]

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

    def propagate(self, layer, in_maps, in_shapes, out_shapes, ctx):
        _require_channels_last(layer)
        g = self._groups(layer)
        if g == 1:
            return super().propagate(layer, in_maps, in_shapes, out_shapes, ctx)
        if self._depthwise_form(layer, in_shapes):
            out = in_maps[0]
        else:
            per_in = in_shapes[0][-1] // g
            for k in range(1, g):
                ctx.tie(in_maps[0][:per_in], in_maps[0][k * per_in : (k + 1) * per_in])
            out = np.tile(ctx.new_ids(out_shapes[0][-1] // g), g)
        _fix_if_activation_lifts_zero(layer, out, ctx, layer.activation)
        return [out]

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
        _require_channels_last(layer)
        out = np.repeat(in_maps[0], layer.depth_multiplier)
        _fix_if_activation_lifts_zero(layer, out, ctx, layer.activation)
        return [out]

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

    def propagate(self, layer, in_maps, in_shapes, out_shapes, ctx):
        _require_channels_last(layer)
        return super().propagate(layer, in_maps, in_shapes, out_shapes, ctx)

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

    def propagate(self, layer, in_maps, in_shapes, out_shapes, ctx):
        _require_channels_last(layer)
        return super().propagate(layer, in_maps, in_shapes, out_shapes, ctx)

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

    def propagate(self, layer, in_maps, in_shapes, out_shapes, ctx):
        axis = layer.axis if isinstance(layer.axis, int) else layer.axis[0]
        if axis not in (-1, len(in_shapes[0]) - 1):
            raise ValueError(
                f"Expected BatchNormalization over the last (channel) axis. "
                f"Received: layer {layer.name!r} with axis={layer.axis}."
            )
        return [in_maps[0]]

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

    def propagate(self, layer, in_maps, in_shapes, out_shapes, ctx):
        if isinstance(layer, keras.layers.Activation):
            _fix_if_activation_lifts_zero(layer, in_maps[0], ctx, layer.activation)
        elif isinstance(layer, keras.layers.ReLU):
            if float(layer.negative_slope) != 0.0 and float(layer.threshold) != 0.0:
                ctx.fix(in_maps[0], f"{layer.name!r}: ReLU(threshold, negative_slope) maps 0 to non-zero")
        return [in_maps[0]]


class SoftmaxHandler(LayerHandler):
    """Softmax couples all channels of its axis: none of them may be removed."""

    def propagate(self, layer, in_maps, in_shapes, out_shapes, ctx):
        ctx.fix(in_maps[0], f"{layer.name!r} is a softmax across channels")
        return [in_maps[0]]


class ElementwiseMergeHandler(LayerHandler):
    """Add/Subtract/Average/Maximum/Minimum/Multiply: channel i of every input is tied."""

    def propagate(self, layer, in_maps, in_shapes, out_shapes, ctx):
        sizes = {len(m) for m in in_maps}
        if len(sizes) != 1:
            raise ValueError(
                f"Broadcasting merges are not supported yet. Received: layer "
                f"{layer.name!r} ({type(layer).__name__}) with input channel "
                f"counts {[len(m) for m in in_maps]}."
            )
        for other in in_maps[1:]:
            ctx.tie(in_maps[0], other)
        return [in_maps[0]]


class ConcatenateHandler(LayerHandler):
    """Concatenate: along channels the maps are joined; along space they are tied."""

    def propagate(self, layer, in_maps, in_shapes, out_shapes, ctx):
        rank = len(out_shapes[0])
        axis = layer.axis % rank
        if axis == rank - 1:
            return [np.concatenate(in_maps)]
        for other in in_maps[1:]:
            ctx.tie(in_maps[0], other)
        return [in_maps[0]]


class FlattenHandler(LayerHandler):
    """Flatten of a channels-last tensor: feature `i` is channel `i % C`."""

    def propagate(self, layer, in_maps, in_shapes, out_shapes, ctx):
        if getattr(layer, "data_format", "channels_last") != "channels_last":
            _require_channels_last(layer)
        positions = math.prod(in_shapes[0][1:-1])
        return [np.tile(in_maps[0], positions)]


class FixingHandler(LayerHandler):
    """Channel-wise layers whose output for a removed (zero) channel would not be
    zero, or whose channels are coupled, so their channels are kept.

    Normalization (subtracts a mean), Rescaling with an offset,
    LayerNormalization/GroupNormalization/UnitNormalization over channels (a
    removed channel changes the statistics of the others).
    """

    def propagate(self, layer, in_maps, in_shapes, out_shapes, ctx):
        if isinstance(layer, keras.layers.Rescaling) and not np.any(np.asarray(layer.offset)):
            return [in_maps[0]]
        ctx.fix(in_maps[0], f"{layer.name!r} ({type(layer).__name__}) mixes or shifts channels")
        return [in_maps[0]]

    def params(self, layer, in_shapes, out_shapes):
        return Cost(d=float(layer.count_params()))


class ReshapeHandler(LayerHandler):
    """Reshape/Permute that keep the channel axis last and whole: positions move, channels do not."""

    def propagate(self, layer, in_maps, in_shapes, out_shapes, ctx):
        keeps = in_shapes[0][-1] == out_shapes[0][-1]
        if isinstance(layer, keras.layers.Permute):
            keeps = keeps and tuple(layer.dims)[-1] == len(in_shapes[0]) - 1
        if not keeps:
            raise ValueError(
                f"Expected {type(layer).__name__} to keep the channel axis last and whole. "
                f"Received: layer {layer.name!r} mapping {in_shapes[0]} to {out_shapes[0]}."
            )
        return [in_maps[0]]

    def slice(self, layer, config, weights, kept_in, kept_out):
        if "target_shape" in config and config["target_shape"][-1] != -1:
            config = dict(config)
            config["target_shape"] = (*config["target_shape"][:-1], int(len(kept_out[0])))
        return config, weights


class PReLUHandler(LayerHandler):
    """PReLU: element-wise, zero-preserving, with a per-channel `alpha`."""

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
    """A `keras.ops` node in a functional graph (`x + 3.0`, `x * y`, `x / 6`).

    With two tensor operands of equal channel count it is an element-wise
    merge (channels tied). With one tensor and a constant, scaling keeps a zero
    channel zero, and adding a constant does not (those channels are kept).
    """

    def __init__(self, lifts_zero: bool):
        self.lifts_zero = lifts_zero

    def propagate(self, layer, in_maps, in_shapes, out_shapes, ctx):
        if len(in_maps) > 1:
            return ElementwiseMergeHandler().propagate(layer, in_maps, in_shapes, out_shapes, ctx)
        if self.lifts_zero:
            ctx.fix(in_maps[0], f"{layer.name!r} adds a constant, so a removed channel would not be zero")
        return [in_maps[0]]


class ChannelScaleHandler(LayerHandler):
    """`y = x * gamma` with one weight per channel (ConvNeXt's LayerScale)."""

    def slice(self, layer, config, weights, kept_in, kept_out):
        config = dict(config)
        if "projection_dim" in config:
            config["projection_dim"] = int(len(kept_out[0]))
        return config, [w[kept_out[0]] for w in weights]

    def params(self, layer, in_shapes, out_shapes):
        return Cost(b=1.0)


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
            # subclass BaseConv with other weight layouts.
            if isinstance(handler, ConvHandler) and type(layer) not in _PLAIN_CONVS:
                continue
            return handler
    return None


L = keras.layers
_PLAIN_CONVS = (L.Conv1D, L.Conv2D, L.Conv3D)

for _cls in (
    L.Dropout, L.SpatialDropout1D, L.SpatialDropout2D, L.SpatialDropout3D,
    L.MaxPooling1D, L.MaxPooling2D, L.MaxPooling3D,
    L.AveragePooling1D, L.AveragePooling2D, L.AveragePooling3D,
    L.GlobalAveragePooling1D, L.GlobalAveragePooling2D, L.GlobalAveragePooling3D,
    L.GlobalMaxPooling1D, L.GlobalMaxPooling2D, L.GlobalMaxPooling3D,
    L.ZeroPadding1D, L.ZeroPadding2D, L.ZeroPadding3D,
    L.Cropping1D, L.Cropping2D, L.Cropping3D,
    L.UpSampling1D, L.UpSampling2D, L.UpSampling3D,
    L.Identity, L.Resizing,
):
    register_handler(_cls, PassThroughHandler())
for _cls in (L.Normalization, L.Rescaling, L.LayerNormalization, L.GroupNormalization, L.UnitNormalization):
    register_handler(_cls, FixingHandler())
for _cls in (L.Reshape, L.Permute):
    register_handler(_cls, ReshapeHandler())
register_handler(L.PReLU, PReLUHandler())
for _cls in _compat.op_classes()["add"]:
    register_handler(_cls, OpHandler(lifts_zero=True))
for _cls in _compat.op_classes()["scale"]:
    register_handler(_cls, OpHandler(lifts_zero=False))
_apps = _compat.application_layers()
if "LayerScale" in _apps:
    register_handler(_apps["LayerScale"], ChannelScaleHandler())
if "StochasticDepth" in _apps:
    register_handler(_apps["StochasticDepth"], PassThroughHandler())
if "CustomScaleLayer" in _apps:  # inputs[0] + inputs[1] * scale
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
