"""Read-only analysis of a functional model into channel groups.

Every slot of every tensor's channel axis gets an id. Layers that create
channels (Conv, Dense) make new ids; channel-wise layers pass ids through;
element-wise merges (the residual `Add`) *tie* ids, and a union-find joins tied
ids into components. A component is one **channel group**: its channels must be
kept or removed together, and it behaves like one shared gate whose gradient is
the sum of its members' gate gradients (CVPR'19 §3, DESIGN.md §1).

A component is *fixed* (never pruned) when any of its ids comes from a model
input, reaches a model output, passes an op that maps 0 to non-zero with no
gate behind it, or is consumed by a layer that cannot be sliced.

The analysis never mutates the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import keras
import numpy as np

from keras_taylor import _compat
from keras_taylor.handlers import AnalysisContext, LayerHandler, get_handler

_ON_UNKNOWN = ("error", "freeze")


def unwrap(layer):
    """Returns the layer inside a keras_taylor gate wrapper, or `layer` itself."""
    return layer.layer if getattr(layer, "is_channel_gate", False) else layer


def _shape(t) -> tuple:
    return tuple(t.shape)


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

    # ---- lookups -------------------------------------------------------
    def first_node(self, layer_name: str) -> NodeInfo:
        for n in self.nodes:
            if n.name == layer_name:
                return n
        raise KeyError(layer_name)

    def groups_of_layer_output(self, layer_name: str) -> np.ndarray:
        """Group index of each output channel of a layer (-1: fixed)."""
        node = self.first_node(layer_name)
        return self.group_of_comp[self.comp_of[node.out_maps[0]]]

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
                out[n.name] = n.out_maps[0]
        return out

    def layer_channel_counts(self, removed_groups=()) -> dict:
        """Live output channels of every channel-creating layer."""
        alive = self.alive_ids(removed_groups)
        return {name: int(np.count_nonzero(alive[m])) for name, m in self.creating_layers().items()}


def analyze(model: keras.Model, on_unknown: str = "error") -> ChannelGraph:
    """Reads a Functional or Sequential model into its channel groups.

    Args:
        model: a built Functional or Sequential `keras.Model` (gated or not).
        on_unknown: what to do with a layer that has no handler while channels
            that could otherwise be pruned flow into it: `"error"` raises,
            `"freeze"` keeps those channels. Defaults to `"error"`.

    Returns:
        A `ChannelGraph`.

    Raises:
        ValueError: for a subclassed model, a layer without a handler on a
            prunable path (with `on_unknown="error"`), or an unsupported layer
            configuration; the message names the layer and its class.
    """
    if on_unknown not in _ON_UNKNOWN:
        raise ValueError(f"Expected on_unknown in {_ON_UNKNOWN}. Received: on_unknown={on_unknown!r}")
    uf = _UnionFind()
    maps: dict = {}  # id(KerasTensor) -> channel map
    consumers: dict = {}  # id(KerasTensor) -> [layer names]
    inputs, outputs = _compat.graph_inputs_outputs(model)
    for t in inputs:
        ids = uf.new_ids(_shape(t)[-1] if len(_shape(t)) > 1 else 1)
        uf.fix(ids, f"comes from model input {t.name!r}")
        maps[id(t)] = ids

    nodes: list = []
    first_call: dict = {}
    unknown: list = []  # [(layer, in ids)]
    for layer, in_tensors, out_tensors in _compat.nodes_in_order(model):
        inner = unwrap(layer)
        handler = get_handler(inner)
        in_maps = [maps[id(t)] for t in in_tensors]
        in_shapes = [_shape(t) for t in in_tensors]
        out_shapes = [_shape(t) for t in out_tensors]
        for t in in_tensors:
            consumers.setdefault(id(t), []).append(layer.name)
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
        else:
            out_maps = handler.propagate(inner, in_maps, in_shapes, out_shapes, uf)
        for t, m, s in zip(out_tensors, out_maps, out_shapes):
            expected = s[-1] if len(s) > 1 else 1
            if len(m) != expected:
                raise ValueError(
                    f"Handler for layer {inner.name!r} ({type(inner).__name__}) "
                    f"returned a channel map of size {len(m)} for an output with "
                    f"{expected} channels."
                )
            maps[id(t)] = m
        node = NodeInfo(
            layer, handler, in_maps, out_maps, in_shapes, out_shapes,
            [id(t) for t in out_tensors],
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

    num_comps = len(uniq)
    group_of_comp = np.full(num_comps, -1, dtype=np.int64)
    prunable = [c for c in range(num_comps) if c not in fixed_reason]
    group_of_comp[prunable] = np.arange(len(prunable))

    graph = ChannelGraph(
        model_name=model.name,
        nodes=nodes,
        comp_of=comp_of,
        fixed_reason=fixed_reason,
        group_of_comp=group_of_comp,
        num_groups=len(prunable),
        gate_sites=[],
        unknown_layers=[l.name for l, _ in unknown],
    )
    graph.gate_sites = _gate_sites(graph, consumers, outputs)
    return graph


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
        groups = graph.group_of_comp[graph.comp_of[node.out_maps[0]]]
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

