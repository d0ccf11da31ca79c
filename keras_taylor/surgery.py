"""Surgery: apply a `PruningPlan` to get a smaller model of stock Keras layers.

Every layer is rebuilt from its config with the pruned channels left out
(`filters`/`units` reduced) and its weights sliced to match, for producers
(output filters) and consumers (input channels, or Flatten→Dense features)
alike. The result equals the gated model with the removed channels' gates at
0, and holds no keras_taylor layers.
"""

from __future__ import annotations

import warnings

import keras
import numpy as np

from keras_taylor import gates as gates_lib
from keras_taylor import graph as graph_lib
from keras_taylor import nesting, tracing
from keras_taylor.flops import removed_groups_from_gates, run_shortfall
from keras_taylor.plan import PruningPlan


def apply_plan(model: keras.Model, plan: PruningPlan, on_unknown: str = "error") -> keras.Model:
    """Returns a new model with the plan's channels physically removed.

    Args:
        model: a Functional or Sequential model, gated or not. Gates are
            folded first (see `strip_gates`); the model is not modified.
        plan: the `PruningPlan` to apply.
        on_unknown: see `keras_taylor.analyze`. Defaults to `"error"`.

    Returns:
        A new model of the same kind (Functional or Sequential) made of stock
        Keras layers.

    Raises:
        ValueError: if the plan does not fit the model, would remove every
            channel of a layer, or a layer on a pruned path has no handler.
    """
    if not isinstance(plan, PruningPlan):
        raise TypeError(f"Expected a keras_taylor.PruningPlan. Received: plan={plan!r}")
    # Analyse (and validate the plan) before building anything.
    model = tracing.inline_composite_layers(model)  # the pruned model is flat and composites traced
    graph = graph_lib.analyze(model, on_unknown=on_unknown)
    removed = plan.removed_groups(graph)
    for name, count in graph.layer_channel_counts(removed).items():
        if count == 0:
            raise ValueError(
                f"Expected at least one channel left in every layer. Received: "
                f"a plan that removes every output channel of layer {name!r}."
            )
    # Stripping gates keeps every layer name and connection, so the kept
    # indices apply to the stripped model as they are.
    kept = kept_channels(graph, removed)
    if gates_lib.is_gated(model):
        model = gates_lib._strip(model, check_output_gates=False)
    pending = []

    def clone(layer):
        weights = layer.get_weights()
        if layer.name not in kept or graph_lib.get_handler(layer) is None:
            # Channels unchanged: reused when its config cannot rebuild it.
            new, copied = nesting.copy_layer(layer)
            if not copied:
                return new
        else:
            try:
                config = layer.get_config()
            except Exception:  # noqa: BLE001 - a layer without a config: see below
                config = None
            if config is None:  # kept as is if slicing leaves it alone (Identity)
                sliced, new_weights = slice_layer(layer, {}, weights, kept)
                if sliced or any(a.shape != b.shape for a, b in zip(new_weights, weights)):
                    raise ValueError(
                        f"Cannot rebuild layer {layer.name!r} of class {type(layer).__name__} "
                        "with fewer channels: its `get_config()` fails. Give it a "
                        "`get_config()` that `from_config` accepts."
                    )
                new, copied = nesting.copy_layer(layer)
                if not copied:
                    return new
            else:
                config, weights = slice_layer(layer, config, weights, kept)
                new = nesting.rebuild_layer(layer, config)
        pending.append((new, weights))
        return new

    def op_config(op, config):  # a keras.ops node (ops.reshape's newshape)
        return slice_layer(op, config, [], kept)[0]

    pruned = gates_lib.clone_with(model, clone, op_config)
    for layer, weights in pending:
        layer.set_weights(weights)
    return pruned


def kept_channels(graph, removed) -> dict:
    """Kept indices per layer that loses channels, keyed by layer name (first call):
    `{name: (kept per input, kept per output, input axes, output axes)}`."""
    alive = graph.alive_ids(removed)
    kept = {}
    seen = set()
    for node in graph.nodes:
        if node.name in seen:
            continue
        seen.add(node.name)
        kin = [np.flatnonzero(alive[m]) for m in node.in_maps]
        # Internal maps (attention heads) follow the outputs in `kept_out`.
        maps_out = node.out_maps + node.internal_maps
        kout = [np.flatnonzero(alive[m]) for m in maps_out]
        if any(len(k) < len(m) for k, m in zip(kin + kout, node.in_maps + maps_out)):
            kept[node.name] = (kin, kout, node.in_axes, node.out_axes)
    return kept


def slice_layer(layer, config: dict, weights: list, kept: dict) -> tuple:
    """`(config, weights)` of `layer` with the channels `kept_channels` drops
    left out, by the layer's handler; `weights` is shaped like
    `layer.get_weights()` (it may hold other arrays of those shapes, such as
    optimizer slots). Unchanged for a layer that loses no channel."""
    handler = graph_lib.get_handler(layer)
    if handler is not None and layer.name in kept:
        return handler.slice_with_layout(layer, config, weights, *kept[layer.name])
    return config, weights


def prune(model: keras.Model, on_unknown: str = "error") -> keras.Model:
    """Removes every channel whose gate is 0 from a gated model.

    Args:
        model: a model returned by `add_gates` (and pruned by the callback).
        on_unknown: see `keras_taylor.analyze`. Defaults to `"error"`.

    Returns:
        A new, smaller model of stock Keras layers.

    Warns:
        UserWarning: when `TaylorPruning` recorded a target in the model's
            gates that the gates do not reach (a run that ended early, or a
            checkpoint kept from before the target, e.g. by
            `ModelCheckpoint(save_best_only=True)`).
    """
    if not isinstance(model, keras.Model) or not gates_lib.is_gated(model):
        raise ValueError(
            "Expected a gated model (from `keras_taylor.add_gates`). Received: "
            f"model={getattr(model, 'name', model)!r} without ChannelGate layers; use "
            "`apply_plan(model, plan)` for an ungated model."
        )
    graph = graph_lib.analyze(model, on_unknown="freeze")
    shortfall = run_shortfall(model, graph)
    if shortfall:
        warnings.warn(
            f"keras_taylor.prune: {shortfall}; the pruned model keeps those "
            "channels. The run ended early, or this is a checkpoint from before "
            "the target was reached (`ModelCheckpoint(save_best_only=True)` "
            "keeps the best epoch, which may precede it: monitor an epoch after "
            "pruning, or save every epoch). Fit on to finish the run.",
            stacklevel=2,
        )
    return apply_plan(model, PruningPlan.from_groups(graph, removed_groups_from_gates(model, graph)), on_unknown=on_unknown)
