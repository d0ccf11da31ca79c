"""FLOPs and parameter counts, per layer and total.

Convention (both papers; He et al. 2016 Table 1: ResNet-50 = 3.8e9 at 224×224,
which this module counts as 3.86e9 for keras.applications.ResNet50): FLOPs are the
multiply–accumulates of Conv and Dense layers, counted once per call. Params
are every weight Keras counts in `model.count_params()` (BN moving statistics
included, gate variables excluded).

For a gated model the counts are *effective*: channels whose gate is 0 are
left out, so they equal the counts of the model that `keras_taylor.prune`
returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import keras
import numpy as np

from keras_taylor import graph as graph_lib


@dataclass(frozen=True)
class LayerCount:
    """Cost of one layer: `flops` (MACs, all calls) and `params`."""

    name: str
    class_name: str
    flops: int
    params: int
    latency_ms: float | None = None  # predicted by a LatencyTable (`profile(model, latency=...)`)


@dataclass
class Profile:
    """FLOPs and params of a model, per layer and in total."""

    layers: list = field(default_factory=list)
    #: Input shape(s) without the batch axis the counts are for.
    input_shapes: list = field(default_factory=list)
    fixed_latency_ms: float | None = None  # the table's per-model cost, when given one

    @property
    def latency_ms(self) -> float | None:
        """Predicted whole-model latency (ms), when profiled with a `LatencyTable`."""
        if self.fixed_latency_ms is None:
            return None
        return float(self.fixed_latency_ms + sum(l.latency_ms or 0.0 for l in self.layers))

    @property
    def flops(self) -> int:
        return int(sum(l.flops for l in self.layers))

    @property
    def params(self) -> int:
        return int(sum(l.params for l in self.layers))

    def by_name(self) -> dict:
        return {l.name: l for l in self.layers}

    def table(self) -> str:
        """A plain-text table, one row per layer with a cost, then the total."""
        lat = self.fixed_latency_ms is not None
        rows = [
            (l.name, l.class_name, f"{l.flops:,}", f"{l.params:,}") + ((f"{l.latency_ms:.4f}" if l.latency_ms is not None else "",) if lat else ())
            for l in self.layers if l.flops or l.params
        ]
        if lat:
            rows.append(("fixed (per model)", "", "", "", f"{self.fixed_latency_ms:.4f}"))
        rows.append(("total", "", f"{self.flops:,}", f"{self.params:,}") + ((f"{self.latency_ms:.4f}",) if lat else ()))
        head = ("layer", "class", "FLOPs (MACs)", "params") + (("latency ms (pred.)",) if lat else ())
        if self.input_shapes:
            size = ", ".join(str(tuple(s)) for s in self.input_shapes)
            rows.append((f"(input {size})",) + ("",) * (len(head) - 1))
        widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
        fmt = lambda r: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        return "\n".join([fmt(head)] + [fmt(r) for r in rows])


class CostModel:
    """Evaluates FLOPs and params of a model for any set of removed groups.

    Built once from a `ChannelGraph`; `evaluate` is cheap enough to call for
    every candidate channel while a pruning step selects channels.
    """

    def __init__(self, graph: graph_lib.ChannelGraph):
        self.graph = graph
        self._terms = []  # (name, class, in_ids or None, out_ids, macs Cost, params Cost or None, fixed params)
        seen = set()
        for node in graph.nodes:
            inner = node.inner
            first = node.name not in seen
            seen.add(node.name)
            if node.handler is None:
                self._terms.append((node.name, type(inner).__name__, None, None, None, None, (inner.count_params() if hasattr(inner, "count_params") else 0) if first else 0))
                continue
            counter = getattr(node.handler, "cost_function", None)
            if counter is not None:
                # Layers whose cost is not linear in (in, out) channels
                # (attention: heads, several inputs): `fn(alive) -> (macs, params)`.
                fn = counter(inner, node)
                self._terms.append((node.name, type(inner).__name__, None, None, fn, first, 0))
                continue
            in_ids = node.in_maps[0] if node.in_maps else None
            out_ids = node.out_maps[0]
            macs, params = _costs(graph, node, first)
            self._terms.append((node.name, type(inner).__name__, in_ids, out_ids, macs, params, 0))

    def profile(self, alive: np.ndarray | None = None) -> Profile:
        """Per-layer counts with only the `alive` channel ids (all when `None`)."""
        per_layer: dict = {}
        for name, cls, in_ids, out_ids, macs, params, fixed in self._terms:
            if macs is None:
                f, p = 0, fixed
            elif callable(macs):
                f, p = macs(alive)
                p = p if params else 0
            else:
                cin = (len(in_ids) if alive is None else int(alive[in_ids].sum())) if in_ids is not None else 0
                cout = len(out_ids) if alive is None else int(alive[out_ids].sum())
                f = macs.total(cin, cout)
                p = params.total(cin, cout) if params is not None else 0
            prev = per_layer.get(name)
            per_layer[name] = LayerCount(name, cls, int(round(f)) + (prev.flops if prev else 0), int(round(p)) + (prev.params if prev else 0))
        return Profile(list(per_layer.values()))

    def evaluate(self, alive: np.ndarray) -> tuple:
        """Returns `(flops, params)` with only the `alive` channel ids."""
        flops = params = 0.0
        for _, _, in_ids, out_ids, macs, prm, fixed in self._terms:
            if macs is None:
                params += fixed
                continue
            if callable(macs):
                f, p = macs(alive)
                flops += f
                params += p if prm else 0
                continue
            cin = int(np.count_nonzero(alive[in_ids])) if in_ids is not None else 0
            cout = int(np.count_nonzero(alive[out_ids]))
            flops += macs.total(cin, cout)
            if prm is not None:
                params += prm.total(cin, cout)
        return flops, params


def _dynamic(shapes) -> bool:
    return any(d is None for s in shapes for d in tuple(s)[1:])


def _costs(graph, node, first: bool) -> tuple:
    """`(macs, params)` Costs of one call; a clear error when they depend on
    a size the model leaves unknown."""
    try:
        macs = node.handler.macs(node.inner, node.in_shapes, node.out_shapes)
        params = node.handler.params(node.inner, node.in_shapes, node.out_shapes) if first else None
    except TypeError as e:
        if not _dynamic(node.in_shapes + node.out_shapes):
            raise
        raise ValueError(
            f"Cannot count the FLOPs of layer {node.name!r} ({type(node.inner).__name__}) "
            f"of model {graph.model_name!r}: they depend on its spatial size, which "
            f"the model leaves unknown (input shape(s) {graph.input_shapes}, output "
            f"{node.out_shapes[0]}). Give the size the counts are for: "
            "`keras_taylor.profile(model, input_shape=(224, 224, 3))` or "
            "`TaylorPruning(..., input_shape=(224, 224, 3))` (without it, "
            "TaylorPruning takes the size of the first training batch)."
        ) from e
    for cost in (macs, params):
        if cost is not None and not all(np.isfinite([cost.a, cost.b, cost.c, cost.d])):
            raise ValueError(f"Handler for layer {node.name!r} returned a non-finite cost {cost}.")
    return macs, params


def is_dynamic(graph: graph_lib.ChannelGraph) -> bool:
    """True if some tensor of `graph` has an unknown non-batch size (the model
    was read without `input_shape` and leaves H/W as `None`)."""
    return any(_dynamic(n.in_shapes + n.out_shapes) for n in graph.nodes)


def removed_groups_from_gates(model: keras.Model, graph: graph_lib.ChannelGraph) -> set:
    """Groups whose gates are all 0 in a gated model."""
    from keras_taylor.gates import gate_values

    removed = set()
    for name, values in gate_values(model).items():
        groups = graph.groups_of_layer_output(name)
        removed.update(int(g) for g in groups[(values == 0.0) & (groups >= 0)])
    return removed


def metric_values(cost: CostModel, alive: np.ndarray) -> dict:
    """`{"flops", "params", "channels"}` with only the `alive` channel ids
    (channels: output channels of the Conv/Dense layers)."""
    flops, params = cost.evaluate(alive)
    channels = sum(int(np.count_nonzero(alive[m])) for m in cost.graph.creating_layers().values())
    return {"flops": flops, "params": params, "channels": channels}


def run_shortfall(model: keras.Model, graph: graph_lib.ChannelGraph) -> str | None:
    """Why a gated model falls short of its recorded pruning target, or `None`.

    `TaylorPruning` stores its target and metric in the gates
    (`gates.record_run`); this compares them with the gates as they are.
    """
    from keras_taylor.gates import recorded_run

    run = recorded_run(model)
    if run is None:
        return None
    if run["metric"] == "latency" or (run["metric"] == "flops" and is_dynamic(graph)):
        return None  # needs the latency table / an input size the gates do not record: not checked
    cost = CostModel(graph)
    base = metric_values(cost, graph.alive_ids(()))[run["metric"]]
    now = metric_values(cost, graph.alive_ids(removed_groups_from_gates(model, graph)))[run["metric"]]
    fraction = now / base if base else 1.0
    if fraction <= run["target"] * (1 + 1e-6):  # the target is stored as float32
        return None
    return (
        f"model {model.name!r} is at {fraction:.4f} of its {run['metric']}, above the "
        f"target {run['target']:.4g} of the pruning run recorded in its gates "
        f"({run['events']} pruning step(s) in {run['batches']} minibatches)"
    )


def profile(model: keras.Model, input_shape=None, latency=None) -> Profile:
    """Counts FLOPs (MACs) and params of every layer of `model`.

    Args:
        model: a Functional or Sequential model, gated or not. Layers without
            a handler are counted with their full params and 0 FLOPs.
        input_shape: the input size to count FLOPs at, without the batch axis
            (`(224, 224, 3)`; a list of shapes for several inputs). Needed when
            the model's input leaves height/width unknown
            (`keras.Input((None, None, 3))`, KerasHub's default): FLOPs depend
            on the size. Defaults to `None` (the model's own input shape).
        latency: optional `keras_taylor.LatencyTable`; each channel-creating
            layer then also gets its predicted latency (its segment: the layer
            and the channel-wise layers riding on it), and the profile the
            table's fixed per-model cost and `latency_ms` total.

    Returns:
        A `Profile`; `profile(m).params == m.count_params()` for an ungated
        model. `Profile.input_shapes` says which size the FLOPs are for.

    Raises:
        ValueError: if the FLOPs depend on a size the model leaves unknown and
            `input_shape` is not given, or `input_shape` does not fit the
            model's inputs.
    """
    graph = graph_lib.analyze(model, on_unknown="freeze", input_shape=input_shape)
    cost = CostModel(graph)
    alive = graph.alive_ids(removed_groups_from_gates(model, graph))
    prof = cost.profile(alive)
    if latency is not None:
        if not callable(getattr(latency, "cost_terms", None)):
            raise ValueError(f"Expected latency to be a keras_taylor.LatencyTable. Received: latency={latency!r}")
        terms = latency.cost_terms(graph)
        ms: dict = {}
        for name, v in terms.per_term(alive):  # a calibrated table has several terms per merge layer
            ms[name] = ms.get(name, 0.0) + v
        rows = [LayerCount(l.name, l.class_name, l.flops, l.params, ms.pop(l.name, None)) for l in prof.layers]
        rows += [LayerCount(n, type(graph.first_node(n).inner).__name__, 0, 0, v) for n, v in ms.items()]
        prof = Profile(rows, fixed_latency_ms=terms.constant)
    prof.input_shapes = [tuple(s) for s in graph.input_shapes]
    return prof
