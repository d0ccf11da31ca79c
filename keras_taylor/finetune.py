"""`fit_prune`: prune during `fit`, then fine-tune the physically smaller model.

`TaylorPruning` alone keeps training the full-size gated model after the
target is reached, so fine-tuning costs the unpruned FLOPs. `fit_prune` runs
`fit` on the gated model until pruning reaches its target, removes the
channels (`keras_taylor.prune`), slices the optimizer's state (momentum, Adam
moments, ...) to the kept channels with the same indices surgery used,
compiles the pruned model with the same compile configuration, and runs the
remaining epochs on it with the user's other callbacks.

Typical use::

    gated = keras_taylor.add_gates(model)
    gated.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), loss=..., metrics=[...])
    small, history = keras_taylor.fit_prune(
        gated, x, y, epochs=10, batch_size=64,
        pruning=keras_taylor.TaylorPruning(target=0.5), callbacks=[...])
"""

from __future__ import annotations

import math
import warnings

import keras
import numpy as np

from keras_taylor import gates as gates_lib
from keras_taylor import graph as graph_lib
from keras_taylor import nesting
from keras_taylor import surgery
from keras_taylor.callbacks import TaylorPruning
from keras_taylor.plan import PruningPlan

_SWITCH = ("epoch", "step")


class _StopWhenPruned(keras.callbacks.Callback):
    """Stops `fit` once the pruning callback is done: after the minibatch
    that reached the target (`switch="step"`) or at the end of that epoch."""

    def __init__(self, pruning, switch):
        super().__init__()
        self.pruning, self.switch = pruning, switch
        self.stopped_epoch = None
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.switch == "step" and self.pruning.done and self.stopped_epoch is None:
            self.stopped_epoch = self._epoch
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        if self.pruning.done and self.stopped_epoch is None:
            self.stopped_epoch = epoch
            self.model.stop_training = True


# ---- optimizer state -------------------------------------------------------------
def _slot_references(optimizer, variables) -> list:
    """`[(model variable, index in optimizer.variables)]` of every slot a fresh
    optimizer of the same class and config makes for `variables` (a slot is a
    variable made by `add_variable_from_reference`: momentum, Adam moments,
    EMA averages, gradient accumulators)."""
    probe = optimizer.__class__.from_config(optimizer.get_config())
    made = []
    create = probe.add_variable_from_reference

    def recording(reference_variable, *args, **kwargs):
        slot = create(reference_variable, *args, **kwargs)
        made.append((reference_variable, slot))
        return slot

    probe.add_variable_from_reference = recording  # instance attribute: this probe only
    probe.build(list(variables))
    index = {id(v): j for j, v in enumerate(probe.variables)}
    if len(probe.variables) != len(optimizer.variables):
        raise ValueError(
            f"Expected optimizer {optimizer.name!r} to hold the variables a fresh "
            f"{type(optimizer).__name__} of its config builds ({len(probe.variables)}). "
            f"Received: {len(optimizer.variables)} variables; a wrapped or custom-built "
            "optimizer cannot be sliced by fit_prune."
        )
    return [(ref, index[id(slot)]) for ref, slot in made]


def _owners(*models) -> dict:
    """`{id(variable): (layer name, inner layer, index in the layer's weights)}`;
    a `ChannelGate`'s variables belong to the layer it wraps."""
    out = {}
    for model in models:
        for layer in model.layers:
            inner = layer.layer if getattr(layer, "is_channel_gate", False) else layer
            for i, v in enumerate(inner.weights):
                out.setdefault(id(v), (layer.name, inner, i))
    return out


def slice_optimizer_state(old_model, new_model, graph, removed, flat_model=None) -> None:
    """Copies `old_model.optimizer`'s state into `new_model.optimizer`, each
    slot sliced to the kept channels as surgery slices its model variable.

    Args:
        old_model: the gated (or unpruned) model, compiled and trained.
        new_model: `apply_plan(old_model, ...)`, compiled with an optimizer of
            the same class and config, built on its trainable variables.
        graph: `analyze` of `old_model` (as `apply_plan` analysed it).
        removed: the removed channel groups of `graph`.
        flat_model: `inline_nested_models(old_model)` when `graph` is its
            analysis (nested models); its layers name the variables.

    Raises:
        ValueError: if the two optimizers do not have matching variables.
    """
    old_opt, new_opt = old_model.optimizer, new_model.optimizer
    kept = surgery.kept_channels(graph, removed)
    old_refs = _slot_references(old_opt, old_model.trainable_variables)
    new_refs = _slot_references(new_opt, new_model.trainable_variables)
    old_owner = _owners(*([flat_model] if flat_model is not None else []), old_model)
    new_owner = _owners(new_model)
    by_layer = {}  # (layer name, weight index) -> old slot indices in creation order
    for ref, j in old_refs:
        if id(ref) not in old_owner:
            raise ValueError(f"Expected every trainable variable of {old_model.name!r} in a layer. Received: {ref.path!r}.")
        name, inner, i = old_owner[id(ref)]
        by_layer.setdefault((name, i), []).append((inner, j))
    seen: dict = {}
    slot_rows = set()
    old_vars, new_vars = old_opt.variables, new_opt.variables
    for ref, j in new_refs:
        slot_rows.add(j)
        name, _, i = new_owner[id(ref)]
        k = seen.get((name, i), 0)
        seen[(name, i)] = k + 1
        candidates = by_layer.get((name, i), [])
        if k >= len(candidates):
            raise ValueError(
                f"Expected an optimizer slot for weight {i} of layer {name!r} in the "
                f"original optimizer {old_opt.name!r}. Received: none."
            )
        inner, j_old = candidates[k]
        weights = inner.get_weights()
        weights[i] = keras.ops.convert_to_numpy(old_vars[j_old].value)
        sliced = surgery.slice_layer(inner, inner.get_config(), weights, kept)[1][i]
        new_vars[j].assign(np.asarray(sliced).reshape(tuple(new_vars[j].shape)))
    for j, (old, new) in enumerate(zip(old_vars, new_vars)):  # iterations, learning rate, ...
        if j not in slot_rows and tuple(old.shape) == tuple(new.shape):
            new.assign(old.value)


# ---- history ----------------------------------------------------------------------
def _merge_histories(first, second, model) -> keras.callbacks.History:
    """One `History` over both phases; a key only one phase logs is carried
    (`kt_*`: the final pruning state) or NaN-padded."""
    merged = keras.callbacks.History()
    merged.set_model(model)
    a, b = first.history, second.history
    n_a = len(next(iter(a.values()), []))
    n_b = len(next(iter(b.values()), []))
    for key in list(a) + [k for k in b if k not in a]:
        head = list(a.get(key, [math.nan] * n_a))
        fill = head[-1] if key.startswith("kt_") and head else math.nan
        merged.history[key] = head + list(b.get(key, [fill] * n_b))
    merged.epoch = list(first.epoch) + list(second.epoch)
    merged.params = second.params or first.params
    return merged


# ---- the public helper ---------------------------------------------------------------
def fit_prune(model, x=None, y=None, *, pruning, epochs: int = 1, callbacks=None, switch: str = "epoch", **fit_kwargs):
    """Prunes a gated model during `fit`, then fine-tunes the pruned model.

    Phase 1 runs `model.fit(x, y, epochs=epochs, callbacks=callbacks +
    [pruning], ...)` and stops it once `pruning` reaches its target: at the
    end of that epoch (`switch="epoch"`) or right after that minibatch
    (`switch="step"`; the rest of that epoch's minibatches are then not
    trained, so the continuation starts at a fresh epoch). Phase 2 removes
    the pruned channels (`keras_taylor.prune`), compiles the pruned model
    from `model.get_compile_config()` (same optimizer class and config, same
    loss and metrics), copies the optimizer's state with every slot sliced to
    the kept channels by the indices surgery used (and the iteration count,
    so learning-rate schedules continue), and runs `fit` for the remaining
    epochs (`initial_epoch` = the next epoch) with the same `callbacks` and
    `fit_kwargs`. Each minibatch of phase 2 costs the pruned model's FLOPs.

    Callbacks see two `fit` calls: their `on_train_begin` runs again on the
    pruned model (`EarlyStopping` restarts its patience; give `CSVLogger`
    `append=True` to keep the first phase's rows). If the target is not
    reached in `epochs`, the model is pruned as far as it got, with a warning.

    Args:
        model: a gated model (`keras_taylor.add_gates`), compiled with an
            optimizer and a loss. It is trained in phase 1 and left gated.
        x, y: training data, as for `Model.fit`.
        pruning: the `keras_taylor.TaylorPruning` callback that prunes.
        epochs: total epochs over both phases. Defaults to `1`.
        callbacks: other Keras callbacks, used in both phases.
        switch: `"epoch"` or `"step"` (see above). Defaults to `"epoch"`.
        **fit_kwargs: other `Model.fit` arguments (`batch_size`,
            `validation_data`, `verbose`, ...); not `initial_epoch`.

    Returns:
        `(pruned_model, history)`: the pruned model of stock Keras layers,
        compiled and fine-tuned, and one `keras.callbacks.History` over both
        phases.

    Raises:
        ValueError: before any training, for a model that is not gated or not
            compiled with an optimizer and a serialisable compile config, a
            `pruning` that is not a `TaylorPruning`, bad `epochs`/`switch`, or
            `initial_epoch` in `fit_kwargs`.

    Example:

    ```python
    small, history = keras_taylor.fit_prune(
        gated, x_train, y_train, batch_size=64, epochs=8,
        pruning=keras_taylor.TaylorPruning(target=0.5, prune_every=30))
    ```
    """
    if not isinstance(model, keras.Model) or not gates_lib.is_gated(model):
        raise ValueError(
            "Expected a gated model (from `keras_taylor.add_gates`). Received: "
            f"model={getattr(model, 'name', model)!r} without ChannelGate layers."
        )
    if not getattr(model, "compiled", False) or getattr(model, "optimizer", None) is None:
        raise ValueError(
            f"Expected a model compiled with an optimizer and a loss. Received: model={model.name!r}, not compiled."
        )
    try:
        compile_config = model.get_compile_config()
    except Exception as e:  # noqa: BLE001 - any failure means it cannot be recompiled
        raise ValueError(
            f"Expected model {model.name!r} compiled with serialisable optimizer, loss and metrics "
            f"(`get_compile_config()`), to compile the pruned model alike. Received: {e}"
        ) from e
    if not compile_config:
        raise ValueError(f"Expected model {model.name!r} to have a compile config. Received: none.")
    if not isinstance(pruning, TaylorPruning):
        raise ValueError(f"Expected pruning to be a keras_taylor.TaylorPruning. Received: pruning={pruning!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"Expected epochs to be an integer >= 1. Received: epochs={epochs!r}")
    if switch not in _SWITCH:
        raise ValueError(f"Expected switch in {_SWITCH}. Received: switch={switch!r}")
    if "initial_epoch" in fit_kwargs:
        raise ValueError("Expected no initial_epoch: fit_prune runs epochs 0..epochs-1. Received: initial_epoch.")
    callbacks = list(callbacks or [])
    if any(c is pruning or isinstance(c, TaylorPruning) for c in callbacks):
        raise ValueError("Expected the TaylorPruning callback as `pruning=`, not in `callbacks`. Received it in callbacks.")

    stop = _StopWhenPruned(pruning, switch)
    first = model.fit(x, y, epochs=epochs, callbacks=callbacks + [pruning, stop], **fit_kwargs)
    if not pruning.done:
        warnings.warn(
            f"keras_taylor.fit_prune: the pruning target {pruning.target} was not reached in "
            f"{epochs} epochs; pruning the model as far as it got.",
            stacklevel=2,
        )
    flat = nesting.inline_nested_models(model)
    graph = graph_lib.analyze(flat, on_unknown="freeze")
    removed = PruningPlan.from_gates(model).removed_groups(graph)
    pruned = surgery.apply_plan(model, PruningPlan.from_groups(graph, removed), on_unknown="freeze")
    pruned.compile_from_config(compile_config)
    if not pruned.optimizer.built:
        pruned.optimizer.build(pruned.trainable_variables)
    slice_optimizer_state(model, pruned, graph, removed, flat_model=flat)
    done_epochs = (stop.stopped_epoch + 1) if stop.stopped_epoch is not None else epochs
    if done_epochs >= epochs:
        second = keras.callbacks.History()
        second.history, second.epoch, second.params = {}, [], {}
        return pruned, _merge_histories(first, second, pruned)
    second = pruned.fit(x, y, epochs=epochs, initial_epoch=done_epochs, callbacks=callbacks, **fit_kwargs)
    return pruned, _merge_histories(first, second, pruned)
