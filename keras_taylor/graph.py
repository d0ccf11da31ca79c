"""Read-only analysis of a functional model into channel groups.

Every slot of every tensor's channel axis gets an id. Layers that create
channels (Conv, Dense) make new ids; channel-wise layers pass ids through;
element-wise merges (the residual `Add`) *tie* ids, and a union-find joins tied
ids into components. A component is one **channel group**: its channels must be
kept or removed together, and it behaves like one shared gate whose gradient is
the sum of its members' gate gradients (CVPR'19 §3, docs/DESIGN.md §1).

A component is *fixed* (never pruned) when any of its ids comes from a model
input, reaches a model output, is consumed by a layer that cannot be sliced
or that couples channels (softmax, layer norm), or when a removed channel
would still be non-zero where a layer that mixes channels (Conv, Dense)
reads it. That last rule is a dataflow over the gated model with the
group's gates at 0: a gate makes the channel zero, `sigmoid` or `x + 3`
makes it non-zero, `Multiply` is zero if any factor is (the squeeze-excite
`x * sigmoid(s)`), `Add` only if every term is. So the expanded channels of
an EfficientNet/MobileNetV3 block, which pass a sigmoid on their way
through the squeeze-excite branch, stay prunable.

The analysis never mutates the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import keras
import numpy as np

from keras_taylor import _compat, nesting, tracing
from keras_taylor.handlers import AnalysisContext, LayerHandler, get_handler

_ON_UNKNOWN = ("error", "freeze")


def unwrap(layer):
    """Returns the layer inside a keras_taylor gate wrapper, or `layer` itself."""
    return layer.layer if getattr(layer, "is_channel_gate", False) else layer


def _shape(t) -> tuple:
    return tuple(t.shape)


# ---- layouts: where the channel axis of each tensor is ---------------------
# Handlers see every shape in channels-last order (`_canonical`), whatever
# the layers' `data_format`; the real axis is in `NodeInfo.in_axes/out_axes`
# and, during `propagate`, in `ctx.in_axes/ctx.out_axes`.

def _default_axis(shape) -> int | None:
    return len(shape) - 1 if len(shape) > 1 else None


def _channels(shape, axis) -> int:
    return 1 if axis is None else int(shape[axis])


def _canonical(shape, axis) -> tuple:
    """`shape` with its channel axis moved last."""
    if axis is None or axis == len(shape) - 1:
        return tuple(shape)
    shape = tuple(shape)
    return shape[:axis] + shape[axis + 1 :] + (shape[axis],)


def _declared_axis(layer, rank: int) -> int | None:
    """The channel axis `layer` expects its inputs to have, if it says."""
    if rank <= 2:
        return None
    if isinstance(layer, keras.layers.BatchNormalization):
        axis = layer.axis if isinstance(layer.axis, int) else layer.axis[0]
        return axis % rank
    if isinstance(layer, keras.layers.Dense):
        return rank - 1
    fmt = getattr(layer, "data_format", None)
    if fmt in ("channels_first", "channels_last") and not isinstance(layer, keras.layers.Flatten):
        return 1 if fmt == "channels_first" else rank - 1
    return None


def _out_axis(layer, handler, in_axes, in_shapes, out_shape) -> int | None:
    rank = len(out_shape)
    if rank <= 2:
        return _default_axis(out_shape)
    declared = _declared_axis(layer, rank)
    if declared is not None:
        return declared
    if handler.creates_channels:
        return rank - 1
    if in_axes and in_axes[0] is not None and len(in_shapes[0]) == rank:
        return in_axes[0]
    return rank - 1


def _check_input_axes(layer, in_tensors, in_axes) -> None:
    for t, axis in zip(in_tensors, in_axes):
        rank = len(t.shape)
        declared = _declared_axis(layer, rank)
        if declared is not None and axis is not None and declared != axis:
            shape = tuple(t.shape)
            if shape[declared] == shape[axis] and all(
                d == 1 for i, d in enumerate(shape[1:], 1) if i not in (declared, axis)
            ):
                continue  # a (C, 1, 1) / (1, 1, C) vector: either axis reads it alike
            producer = getattr(getattr(t, "_keras_history", None), "operation", None)
            where = f"from {producer.name!r}" if producer is not None else f"{t.name!r}"
            raise ValueError(
                f"Layer {layer.name!r} ({type(layer).__name__}) expects the "
                f"channels of its input on axis {declared}, but the tensor "
                f"{where} has them on axis {axis}. Keep one data_format along a "
                "path (or put a Permute between layouts) so channels can be "
                "followed."
            )


def _input_axes(inputs, calls) -> dict:
    """The channel axis of each model input: the one its first consumer that
    declares a layout (a conv's data_format, BN's axis) expects; channels
    last if none does."""
    users: dict = {}
    for layer, ins, outs in calls:
        for t in ins:
            users.setdefault(id(t), []).append((unwrap(layer), outs))
    result = {}
    for t in inputs:
        rank = len(t.shape)
        axis, hint, frontier, seen = None, None, [t], set()
        while frontier and axis is None:
            nxt = []
            for u in frontier:
                for layer, outs in users.get(id(u), []):
                    declared = _declared_axis(layer, rank)
                    if declared is not None:
                        axis = declared
                        break
                    if isinstance(layer, keras.layers.Flatten) and rank > 2 and hint is None:
                        # A weak hint: Flatten(channels_last) also reads channels-first tensors.
                        hint = 1 if layer.data_format == "channels_first" else rank - 1
                    if get_handler(layer) is not None and not get_handler(layer).creates_channels:
                        nxt.extend(o for o in outs if len(o.shape) == rank and id(o) not in seen)
                        seen.update(id(o) for o in outs)
                if axis is not None:
                    break
            frontier = nxt
        if axis is None:
            axis = hint if hint is not None else _default_axis(tuple(t.shape))
        result[id(t)] = axis
    return result


@dataclass
class NodeInfo:
    """One call of one layer, with the channel maps of its tensors."""

    layer: keras.layers.Layer  # the layer in the model (maybe a gate wrapper)
    handler: LayerHandler | None
    in_maps: list
    out_maps: list
    in_shapes: list
    out_shapes: list
    out_keys: list = field(default_factory=list)  # id() of the output KerasTensors
    in_keys: list = field(default_factory=list)  # id() of the input KerasTensors
    in_axes: list = field(default_factory=list)  # channel axis of each input in its real layout
    out_axes: list = field(default_factory=list)  # channel axis of each output
    # Channel maps of units inside the layer that no tensor carries (the heads
    # of an attention layer, see `keras_taylor.attention`); the first one, when
    # present, is what the layer's gate covers.
    internal_maps: list = field(default_factory=list)

    @property
    def gate_map(self) -> np.ndarray:
        """The channel ids a gate on this layer covers: its first internal map
        (attention heads) if it has one, else its first output's map."""
        return self.internal_maps[0] if self.internal_maps else self.out_maps[0]

    @property
    def name(self) -> str:
        return self.layer.name

    @property
    def inner(self):
        return unwrap(self.layer)


class _UnionFind(AnalysisContext):
    def __init__(self):
        self.parent: list[int] = []
        self.fixed: list = []  # [(ids, reason)]
        self.internal: list = []  # internal maps of the layer being read (NodeInfo.internal_maps)

    def new_ids(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + int(n)))
        return np.arange(start, start + int(n), dtype=np.int64)

    def find(self, i: int) -> int:
        parent = self.parent
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:
            parent[i], i = root, parent[i]
        return root

    def tie(self, a, b) -> None:
        if len(a) != len(b):
            raise ValueError(f"Cannot tie channel maps of sizes {len(a)} and {len(b)}.")
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)

    def fix(self, ids, reason: str) -> None:
        self.fixed.append((np.asarray(ids), reason))


class GroupIndex:
    """The group -> (layer, channels) table of a `ChannelGraph`, both ways.

    One row per channel-creating layer (Conv, Dense, SeparableConv,
    ConvTranspose: `ChannelGraph.creating_layers`, topological order).

    Attributes:
        names: the creating layers' names.
        full: each layer's output channels before pruning (int array).
        fixed: each layer's output channels that can never be removed.
        groups: per layer, the groups it holds (sorted int array).
        counts: per layer, how many of its output channels each of those
            groups holds (a grouped conv ties channel `j` of every group, so
            one group can hold several channels of one layer).
        of_group: per group, `[(layer row, channels)]` of the layers it holds
            channels of (several for a residual stream or a depthwise tie).
    """

    def __init__(self, graph: "ChannelGraph"):
        self.names, full, fixed, self.groups, self.counts = [], [], [], [], []
        self.of_group: list = [[] for _ in range(graph.num_groups)]
        for i, (name, out_map) in enumerate(graph.creating_layers().items()):
            g = graph.group_of_comp[graph.comp_of[out_map]]
            uniq, counts = np.unique(g[g >= 0], return_counts=True)
            self.names.append(name)
            full.append(len(g))
            fixed.append(int(np.count_nonzero(g < 0)))
            self.groups.append(uniq)
            self.counts.append(counts)
            for gg, c in zip(uniq.tolist(), counts.tolist()):
                self.of_group[gg].append((i, c))
        self.full = np.array(full, dtype=np.int64)
        self.fixed = np.array(fixed, dtype=np.int64)

    def kept(self, removed: np.ndarray) -> np.ndarray:
        """Live output channels of every layer, for a boolean mask of removed groups."""
        return np.array(
            [f + int(c[~removed[g]].sum()) for f, g, c in zip(self.fixed, self.groups, self.counts)],
            dtype=np.int64,
        )

    def layer_counts(self, group: int) -> list:
        """`[(layer name, channels)]` that `group` holds."""
        return [(self.names[i], c) for i, c in self.of_group[group]]


@dataclass
class ChannelGraph:
    """The channel structure of a model: components (groups) and gate sites.

    Attributes:
        model_name: name of the analysed model.
        nodes: every layer call in topological order.
        comp_of: component index of every channel id.
        fixed_reason: for each fixed component, why it cannot be pruned.
        group_of_comp: group index of each component, -1 for fixed ones.
        num_groups: number of prunable channel groups.
        gate_sites: names of the layers whose outputs carry a gate (or should).
        unknown_layers: names of layers without a handler (frozen).
    """

    model_name: str
    nodes: list
    comp_of: np.ndarray
    fixed_reason: dict
    group_of_comp: np.ndarray
    num_groups: int
    gate_sites: list
    unknown_layers: list = field(default_factory=list)
    input_shapes: list = field(default_factory=list)  # per model input, without batch: the size costs are for

    # ---- lookups -------------------------------------------------------
    def first_node(self, layer_name: str) -> NodeInfo:
        for n in self.nodes:
            if n.name == layer_name:
                return n
        raise KeyError(layer_name)

    def groups_of_layer_output(self, layer_name: str) -> np.ndarray:
        """Group index of each output channel of a layer (-1: fixed)."""
        node = self.first_node(layer_name)
        return self.group_of_comp[self.comp_of[node.gate_map]]

    def alive_ids(self, removed_groups) -> np.ndarray:
        """Boolean mask over channel ids: False where the id's group is removed."""
        removed = np.zeros(self.num_groups + 1, dtype=bool)  # last slot: fixed
        removed[np.asarray(list(removed_groups), dtype=np.int64)] = True
        groups = self.group_of_comp[self.comp_of]
        return ~removed[groups]  # group -1 indexes the last slot: never removed

    def group_members(self) -> list:
        """For each group, the `(layer_name, channel)` gate slots it holds."""
        members: list = [[] for _ in range(self.num_groups)]
        for name in self.gate_sites:
            for ch, g in enumerate(self.groups_of_layer_output(name).tolist()):
                if g >= 0:
                    members[g].append((name, ch))
        return members

    def creating_layers(self) -> dict:
        """`{name: output channel map}` of every layer that makes channels (Conv, Dense)."""
        out = {}
        for n in self.nodes:
            if n.handler is not None and n.handler.creates_channels and n.name not in out:
                out[n.name] = n.gate_map
        return out

    @property
    def group_index(self) -> GroupIndex:
        """The group -> (layer, channels) table (`GroupIndex`), built once.

        A plain per-instance cache, not `functools.cached_property`: that one
        takes a class-wide lock in Python 3.11, which deadlocked
        `MirroredStrategy` replica threads (see scoring.py).
        """
        index = self.__dict__.get("_group_index")
        if index is None:
            index = self.__dict__["_group_index"] = GroupIndex(self)
        return index

    def layer_channel_counts(self, removed_groups=()) -> dict:
        """Live output channels of every channel-creating layer."""
        alive = self.alive_ids(removed_groups)
        return {name: int(np.count_nonzero(alive[m])) for name, m in self.creating_layers().items()}

    def group_labels(self) -> list:
        """For each group, the layer(s) whose output channels it holds.

        A label is the sorted names of the channel-making layers (Conv, Dense)
        with a member in the group, joined with `"+"`; the groups of a
        residual stream span several layers and share one label. A group with
        no channel-making member (should not happen) is labelled by its gate
        sites.

        Returns:
            A list of `num_groups` strings.
        """
        index = self.group_index
        names: list = [{index.names[i] for i, _ in index.of_group[g]} for g in range(self.num_groups)]
        for g, members in enumerate(self.group_members()):
            if not names[g]:
                names[g].update(name for name, _ in members)
        return ["+".join(sorted(n)) for n in names]


def _refuse_quantized(model) -> None:
    """Quantized layers (`model.quantize("int8")`) store kernels and scales
    that no handler slices or counts: prune first, quantize after."""
    quantized = [l for l in model.layers if getattr(unwrap(l), "quantization_mode", None)]
    if quantized:
        layer = unwrap(quantized[0])
        raise ValueError(
            f"Expected a model without quantized layers. Received: model={model.name!r} "
            f"whose layer {layer.name!r} ({type(layer).__name__}) is quantized "
            f"(quantization_mode={layer.quantization_mode!r}; quantized layers: "
            f"{[l.name for l in quantized][:5]}). keras_taylor prunes float models: "
            "prune the float model first, then quantize the pruned one "
            "(`small.quantize(...)`, or `keras_taylor.export.export_tflite` with "
            "quantization)."
        )


def _input_shape_list(model, inputs, input_shape) -> list | None:
    """Validates `input_shape` (one input: a shape without the batch axis, as
    `keras.Input(shape=...)`; several: a list of them) against the model's
    inputs; returns full shapes (batch axis included) or `None`."""
    if input_shape is None:
        return None
    nested = isinstance(input_shape, (list, tuple)) and len(input_shape) > 0 and all(
        isinstance(s, (list, tuple)) for s in input_shape
    )
    shapes = list(input_shape) if nested else [input_shape]
    if not isinstance(input_shape, (list, tuple)) or len(shapes) != len(inputs):
        raise ValueError(
            f"Expected input_shape to be one shape without the batch axis per "
            f"input of model {model.name!r} ({len(inputs)} input(s): "
            f"{[tuple(t.shape[1:]) for t in inputs]}). Received: input_shape={input_shape!r}"
        )
    full = []
    for t, s in zip(inputs, shapes):
        ref = tuple(t.shape)
        ok = len(s) == len(ref) - 1 and all(
            isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0 and (r is None or r == d)
            for d, r in zip(s, ref[1:])
        )
        if not ok:
            raise ValueError(
                f"Expected input_shape {tuple(s)!r} to give a positive size for every "
                f"axis of input {t.name!r} of model {model.name!r} (shape {ref[1:]}, "
                f"without the batch axis), and to match its known sizes. "
                f"Received: input_shape={input_shape!r}"
            )
        full.append((ref[0] if ref[0] is not None else 1, *(int(d) for d in s)))
    return full


def analyze(model: keras.Model, on_unknown: str = "error", input_shape=None) -> ChannelGraph:
    """Reads a Functional or Sequential model into its channel groups.

    Args:
        model: a built Functional or Sequential `keras.Model` (gated or not).
            Models nested in it as layers are read as if inlined, under the
            names `keras_taylor.nesting.inline_nested_models` gives them.
        on_unknown: what to do with a layer that has no handler while channels
            that could otherwise be pruned flow into it: `"error"` raises,
            `"freeze"` keeps those channels. Defaults to `"error"`.
        input_shape: the size to read the model at, for a model whose input
            leaves spatial sizes unknown (`keras.Input((None, None, 3))`):
            one shape without the batch axis (`(224, 224, 3)`), or a list of
            them for several inputs. Only costs (`CostModel`, `profile`)
            depend on it; channel groups do not. Defaults to `None` (the
            model's own input shapes).

    Returns:
        A `ChannelGraph`; `graph.input_shapes` holds the input shapes (without
        the batch axis) its tensor shapes are for.

    Raises:
        ValueError: for a subclassed model, a quantized model (prune first,
            quantize after), a layer without a handler on a
            prunable path (with `on_unknown="error"`), or an unsupported layer
            configuration; the message names the layer and its class.
    """
    if on_unknown not in _ON_UNKNOWN:
        raise ValueError(f"Expected on_unknown in {_ON_UNKNOWN}. Received: on_unknown={on_unknown!r}")
    model = tracing.inline_composite_layers(model)  # analyse sub-models' layers in place and composites traced
    _refuse_quantized(model)
    uf = _UnionFind()
    maps: dict = {}  # id(KerasTensor) -> channel map
    axes: dict = {}  # id(KerasTensor) -> channel axis (None: one channel)
    consumers: dict = {}  # id(KerasTensor) -> [layer names]
    inputs, outputs = _compat.graph_inputs_outputs(model)
    full_shapes = _input_shape_list(model, inputs, input_shape)
    sizes = _compat.concrete_shapes(model, full_shapes) if full_shapes is not None else {}
    shape_of = lambda t: sizes.get(id(t)) or _shape(t)
    calls = list(_compat.nodes_in_order(model))
    roles = _compat.argument_roles(model)  # call parameter of each input (for attention)
    input_axes = _input_axes(inputs, calls)
    for t in inputs:
        axes[id(t)] = input_axes[id(t)]
        ids = uf.new_ids(_channels(_shape(t), axes[id(t)]))
        uf.fix(ids, f"comes from model input {t.name!r}")
        maps[id(t)] = ids

    nodes: list = []
    first_call: dict = {}
    unknown: list = []  # [(layer, in ids)]
    for layer, in_tensors, out_tensors in calls:
        inner = unwrap(layer)
        handler = get_handler(inner)
        in_maps = [maps[id(t)] for t in in_tensors]
        in_axes = [axes[id(t)] for t in in_tensors]
        real_in = [shape_of(t) for t in in_tensors]
        real_out = [shape_of(t) for t in out_tensors]
        for t in in_tensors:
            consumers.setdefault(id(t), []).append(layer.name)
        if handler is None:
            out_axes = [_default_axis(s) for s in real_out]
        else:
            _check_input_axes(inner, in_tensors, in_axes)
            out_axes = handler.out_axes(inner, in_axes, real_in, real_out)
            if out_axes is None:
                out_axes = [_out_axis(inner, handler, in_axes, real_in, s) for s in real_out]
        in_shapes = [_canonical(s, a) for s, a in zip(real_in, in_axes)]
        out_shapes = [_canonical(s, a) for s, a in zip(real_out, out_axes)]
        uf.in_axes, uf.out_axes = in_axes, out_axes
        uf.internal = []
        uf.in_roles = roles.get(id(out_tensors[0])) if out_tensors else None
        if handler is None:
            out_maps = []
            for s in out_shapes:
                ids = uf.new_ids(s[-1] if len(s) > 1 else 1)
                uf.fix(ids, f"comes out of {inner.name!r} ({type(inner).__name__}), which has no handler")
                out_maps.append(ids)
            unknown.append((inner, [m for m in in_maps]))
        elif layer.name in first_call and getattr(inner, "weights", None):
            # A shared layer: every call must keep the same channels.
            first = first_call[layer.name]
            for a, b in zip(first.in_maps, in_maps):
                uf.tie(a, b)
            out_maps = (
                first.out_maps
                if handler.creates_channels
                else handler.propagate(inner, in_maps, in_shapes, out_shapes, uf)
            )
            uf.internal = list(first.internal_maps)
        else:
            out_maps = handler.propagate(inner, in_maps, in_shapes, out_shapes, uf)
        for t, m, s, a in zip(out_tensors, out_maps, out_shapes, out_axes):
            expected = s[-1] if len(s) > 1 else 1
            if len(m) != expected:
                raise ValueError(
                    f"Handler for layer {inner.name!r} ({type(inner).__name__}) "
                    f"returned a channel map of size {len(m)} for an output with "
                    f"{expected} channels."
                )
            maps[id(t)] = m
            axes[id(t)] = a
        node = NodeInfo(
            layer, handler, in_maps, out_maps, in_shapes, out_shapes,
            [id(t) for t in out_tensors], [id(t) for t in in_tensors],
            list(in_axes), list(out_axes), list(uf.internal),
        )
        nodes.append(node)
        first_call.setdefault(layer.name, node)

    for t in outputs:
        uf.fix(maps[id(t)], f"reaches model output {t.name!r}")

    # Components and why some are fixed.
    roots = np.array([uf.find(i) for i in range(len(uf.parent))], dtype=np.int64)
    uniq, comp_of = np.unique(roots, return_inverse=True)
    fixed_reason: dict = {}
    for ids, reason in uf.fixed:
        for c in np.unique(comp_of[ids]).tolist():
            fixed_reason.setdefault(c, reason)

    blocked = []
    for inner, in_maps in unknown:
        comps = np.unique(np.concatenate([comp_of[m] for m in in_maps])) if in_maps else []
        free = [c for c in np.asarray(comps).tolist() if c not in fixed_reason]
        if free:
            blocked.append(inner)
            for c in free:
                fixed_reason[c] = f"flows into {inner.name!r} ({type(inner).__name__}), which has no handler"
    if blocked and on_unknown == "error":
        layer = blocked[0]
        raise ValueError(
            f"Layer {layer.name!r} of class {type(layer).__name__} sits on a "
            "prunable path, and keras_taylor does not know how to slice its "
            "channels. Register a handler with "
            "`keras_taylor.register_handler(layer_class, handler)`, or pass "
            "`on_unknown='freeze'` to keep the channels that flow into it. "
            f"Layers without a handler on prunable paths: {[l.name for l in blocked]}."
        )

    graph = ChannelGraph(
        model_name=model.name,
        nodes=nodes,
        comp_of=comp_of,
        fixed_reason=fixed_reason,
        group_of_comp=np.zeros(0, dtype=np.int64),
        num_groups=0,
        gate_sites=[],
        unknown_layers=[l.name for l, _ in unknown],
        input_shapes=[shape_of(t)[1:] for t in inputs],
    )
    _number_groups(graph, len(uniq))
    # Gates go where a removed channel could otherwise become non-zero; with
    # them in place, find the channels that would still reach a mixing layer
    # non-zero, fix their components, and drop gates left without a group.
    sites = _gate_sites(graph, consumers, outputs)
    _zero_state_dataflow(graph, set(sites))
    _number_groups(graph, len(uniq))
    graph.gate_sites = [
        name for name in sites if (graph.groups_of_layer_output(name) >= 0).any()
    ]
    return graph


def _number_groups(graph: ChannelGraph, num_comps: int) -> None:
    group_of_comp = np.full(num_comps, -1, dtype=np.int64)
    prunable = [c for c in range(num_comps) if c not in graph.fixed_reason]
    group_of_comp[prunable] = np.arange(len(prunable))
    graph.group_of_comp = group_of_comp
    graph.num_groups = len(prunable)


def _carry(in_maps, in_states, out_map, fresh: int) -> np.ndarray:
    """Moves slot states along channel ids; ids no input holds get `fresh`."""
    if len(in_maps) == 1 and in_maps[0] is out_map:
        return in_states[0].copy()
    ids = np.concatenate(in_maps) if in_maps else np.zeros(0, np.int64)
    codes = np.concatenate(in_states) if in_states else np.zeros(0, np.int64)
    uniq, inverse = np.unique(ids, return_inverse=True)
    agg = np.zeros(len(uniq), dtype=np.int64)
    np.maximum.at(agg, inverse, codes)
    pos = np.minimum(np.searchsorted(uniq, out_map), max(len(uniq) - 1, 0))
    found = (uniq[pos] == out_map) if len(uniq) else np.zeros(len(out_map), bool)
    return np.where(found, agg[pos] if len(uniq) else 0, fresh)


def _zero_state_dataflow(graph: ChannelGraph, gated: set) -> None:
    """Fixes components whose removed channels would reach a mixing layer non-zero.

    State of a slot: 0 when a removed channel is exactly zero there in the
    gated model with its group's gates at 0; k > 0 when it may be non-zero,
    `reasons[k]` saying why.
    """
    reasons = ["", "comes from a model input"]
    state: dict = {}  # model inputs: absent, read as non-zero
    comp_of, fixed = graph.comp_of, graph.fixed_reason
    for node in graph.nodes:
        handler, inner = node.handler, node.inner
        in_states = [
            state[k] if k in state else np.ones(len(m), dtype=np.int64)
            for k, m in zip(node.in_keys, node.in_maps)
        ]
        if handler is None:  # its inputs and outputs are fixed already
            for k, m in zip(node.out_keys, node.out_maps):
                state[k] = np.ones(len(m), dtype=np.int64)
            continue
        if handler.mixes_inputs(inner, node.in_shapes):
            for m, st in zip(node.in_maps, in_states):
                for c, code in zip(comp_of[m[st > 0]].tolist(), st[st > 0].tolist()):
                    if c not in fixed:
                        fixed[c] = (
                            f"a removed channel would reach {node.name!r} "
                            f"({type(inner).__name__}), which mixes channels, non-zero: "
                            f"{reasons[code]}"
                        )
        combined = handler.combine(inner, in_states, node.in_shapes, node.out_shapes)
        lift = handler.lifts_zero(inner, node.in_shapes)
        lift_code = fresh_code = 0
        if lift is not None:
            reasons.append(lift)
            lift_code = len(reasons) - 1
        for i, (k, m) in enumerate(zip(node.out_keys, node.out_maps)):
            if combined is not None and i == 0:
                out = np.asarray(combined, dtype=np.int64).copy()
            else:
                if not fresh_code:
                    reasons.append(f"{node.name!r} makes channels without a gate")
                    fresh_code = len(reasons) - 1
                out = _carry(node.in_maps, in_states, m, fresh_code)
            if node.name in gated:
                out[:] = 0
            if lift_code:
                out[:] = lift_code
            state[k] = out


def _gate_sites(graph: ChannelGraph, consumers: dict, outputs) -> list:
    """Layers that get a gate: every layer that can make a pruned channel non-zero.

    Conv/Dense (their filters) and BatchNormalization (its shift) need one; a
    conv feeding only a BatchNormalization leaves the gate to that BN, which
    is the CVPR'19 placement ("after BN").
    """
    output_ids = {id(t) for t in outputs}
    by_name: dict = {}
    for n in graph.nodes:
        by_name.setdefault(n.name, []).append(n)
    sites = []
    for name, calls in by_name.items():
        node = calls[0]
        if node.handler is None or not node.handler.gate_needed(node.inner):
            continue
        groups = graph.group_of_comp[graph.comp_of[node.gate_map]]
        if not (groups >= 0).any():
            continue
        if len(calls) == 1 and _feeds_only_batchnorm(node, by_name, consumers, output_ids):
            continue
        sites.append(name)
    return sites


def _feeds_only_batchnorm(node, by_name, consumers, output_ids) -> bool:
    if len(node.out_keys) != 1 or node.out_keys[0] in output_ids:
        return False
    users = consumers.get(node.out_keys[0], [])
    if len(users) != 1:
        return False
    nxt = by_name[users[0]]
    return (
        len(nxt) == 1
        and isinstance(nxt[0].inner, keras.layers.BatchNormalization)
        and nxt[0].handler is not None
        and bool(nxt[0].handler.gate_variables(nxt[0].inner))
    )

