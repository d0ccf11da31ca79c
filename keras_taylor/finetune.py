"""`fit_prune`: prune during `fit`, then fine-tune the physically smaller model.

`TaylorPruning` alone keeps training the full-size gated model after the
target is reached, so fine-tuning costs the unpruned FLOPs. `fit_prune` runs
`fit` on the gated model; when pruning reaches its target it removes the
channels (`keras_taylor.prune`), slices the optimizer's state (momentum, Adam
moments, ...) to the kept channels with the same indices surgery used,
compiles the pruned model with the same compile configuration, and the same
`fit` continues on the pruned model from the next minibatch, with the user's
callbacks.

Typical use::

    gated = keras_taylor.add_gates(model)
    gated.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), loss=..., metrics=[...])
    small, history = keras_taylor.fit_prune(
        gated, x, y, epochs=10, batch_size=64,
        pruning=keras_taylor.TaylorPruning(target=0.5), callbacks=[...])
"""

from __future__ import annotations

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


def _prune_and_compile(model, compile_config):
    """The pruned model of a gated `model` (as far as its gates say), compiled
    from `compile_config`, with the optimizer state sliced to the kept channels."""
    flat = nesting.inline_nested_models(model)
    graph = graph_lib.analyze(flat, on_unknown="freeze")
    removed = PruningPlan.from_gates(model).removed_groups(graph)
    pruned = surgery.apply_plan(model, PruningPlan.from_groups(graph, removed), on_unknown="freeze")
    pruned.compile_from_config(compile_config)
    if not pruned.optimizer.built:
        pruned.optimizer.build(pruned.trainable_variables)
    slice_optimizer_state(model, pruned, graph, removed, flat_model=flat)
    return pruned


def _one_example(x, y):
    """`(x, y)` of one training example, from arrays/tensors (with `y`) or
    from the first batch of a `tf.data.Dataset`; `None` for other inputs
    (generators, `PyDataset`s: reading them could consume data)."""
    try:
        if y is None and hasattr(x, "element_spec") and hasattr(x, "take"):  # tf.data.Dataset
            batch = next(iter(x.take(1)))
            x, y, _ = keras.utils.unpack_x_y_sample_weight(batch)
            if y is None:
                return None
        elif y is None:
            return None
        return keras.tree.map_structure(lambda a: a[:1], (x, y))
    except Exception:  # noqa: BLE001 - only an optimisation: fall back to Keras' lazy build
        return None


def _build_compiled_state(model, example) -> None:
    """Builds the model's compiled metrics and losses on one example (then
    resets them), as `fit` would inside its first traced step: variables
    created there make TensorFlow trace the step a second time."""
    if example is None:
        return
    x, y = example
    try:
        y_pred = model(x, training=False)
        model.compute_loss(x=x, y=y, y_pred=y_pred)
        model.compute_metrics(x, y, y_pred)
    except Exception:  # noqa: BLE001 - only an optimisation: Keras builds them in the step
        pass
    model.reset_metrics()


def _copy_variables(source, target) -> bool:
    """Assigns `source` to `target` when both hold variables of the same
    shapes in the same order; returns whether they did."""
    source, target = list(source), list(target)
    if len(source) != len(target) or any(tuple(a.shape) != tuple(b.shape) for a, b in zip(source, target)):
        return False
    for a, b in zip(source, target):
        b.assign(a.value)
    return True


class _Switch(keras.callbacks.Callback):
    """Moves the rest of the gated model's `fit` onto the pruned model.

    Once the pruning callback is done (right after that minibatch with
    `switch="step"`, at the end of that epoch with `switch="epoch"`), it
    removes the channels, compiles the pruned model and points the gated
    model's `train_function` and `test_function` at the pruned model's:
    `fit` reads them at every minibatch, so the same `fit` (same data
    iterator, same epoch, same callbacks) continues on the pruned model.
    The user's callbacks get the pruned model (`set_model`); metric states
    are carried across (copied at the switch, or `_merge_metrics` after the
    pruned model's first minibatch) and mirrored into the gated
    model's metrics, which `fit` reads at the end of each epoch; a
    `stop_training` set on the pruned model is passed on to the running
    `fit`. `on_train_end` gives the gated model its own functions back.
    """

    def __init__(self, pruning, switch, callbacks, compile_config, example=None):
        super().__init__()
        self.pruning, self.switch = pruning, switch
        self.callbacks, self.compile_config, self.example = callbacks, compile_config, example
        self.pruned = None
        self.switched_at = None  # (epoch, minibatches of that epoch trained before the switch)
        self._saved = None
        self._carry = None
        self._epoch = 0
        self._batches = 0

    def _do_switch(self):
        gated = self.model
        pruned = _prune_and_compile(gated, self.compile_config)
        _build_compiled_state(pruned, self.example)
        pruned.stop_training = False
        pruned.make_train_function()
        pruned.make_test_function()
        self._saved = (gated.train_function, gated.test_function)
        gated.train_function, gated.test_function = pruned.train_function, pruned.test_function
        # Metric states of the minibatches of this epoch trained so far: copied
        # now when the pruned model's metrics are built (`_build_compiled_state`),
        # else added to them after its first minibatch, which builds them.
        self._carry = None
        if self._batches and not _copy_variables(gated.metrics_variables, pruned.metrics_variables):
            self._carry = [keras.ops.convert_to_numpy(v) for v in gated.metrics_variables]
        for callback in self.callbacks:
            callback.set_model(pruned)
            if getattr(callback, "best_weights", None) is not None:
                callback.best_weights = None  # EarlyStopping: the gated model's weights cannot be restored
        self.pruned = pruned
        self.switched_at = (self._epoch, self._batches)

    def _merge_metrics(self):
        """Adds the carried states to the pruned model's metrics: every stock
        Keras metric keeps sums and counts, so the epoch's figures cover the
        minibatches before and after the switch."""
        carry, self._carry = self._carry, None
        ours = self.pruned.metrics_variables
        if len(ours) != len(carry) or any(tuple(v.shape) != c.shape for v, c in zip(ours, carry)):
            warnings.warn(
                "keras_taylor.fit_prune: the pruned model's metrics do not match the gated model's; "
                "the metrics of the epoch of the switch cover only its minibatches after the switch.",
                stacklevel=2,
            )
            return
        for v, c in zip(ours, carry):
            v.assign(keras.ops.convert_to_numpy(v.value) + c)

    def _mirror(self):
        """The pruned model's metric states into the gated model's (read by `fit`)."""
        _copy_variables(self.pruned.metrics_variables, self.model.metrics_variables)
        if self.pruned.stop_training:
            self.model.stop_training = True

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch, self._batches = epoch, 0
        if self.pruned is not None:
            self.pruned.reset_metrics()  # `fit` reset the gated model's
        elif self.pruning.done and self.switch == "step":  # resumed at the target
            self._do_switch()

    def on_train_batch_end(self, batch, logs=None):
        self._batches = int(batch) + 1
        if self.pruned is None:
            if self.switch == "step" and self.pruning.done:
                self._do_switch()
            return
        if self._carry is not None:
            self._merge_metrics()
            if logs is not None:
                logs.update({k: v for k, v in self.pruned.get_metrics_result().items() if k in logs})
        self._mirror()

    def on_test_begin(self, logs=None):
        if self.pruned is not None:
            self.pruned.reset_metrics()

    def on_test_batch_end(self, batch, logs=None):
        if self.pruned is not None:
            self._mirror()

    def on_epoch_end(self, epoch, logs=None):
        if self.pruned is None and self.pruning.done:
            self._do_switch()
        elif self.pruned is not None and self.pruned.stop_training:
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        if self._saved is not None:
            self.model.train_function, self.model.test_function = self._saved
            self._saved = None


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


# ---- the public helper ---------------------------------------------------------------
def fit_prune(model, x=None, y=None, *, pruning, epochs: int = 1, callbacks=None, switch: str = "step", **fit_kwargs):
    """Prunes a gated model during `fit`, then fine-tunes the pruned model.

    Runs one `model.fit(x, y, epochs=epochs, callbacks=callbacks +
    [pruning], ...)`. Once `pruning` reaches its target it removes the
    pruned channels (`keras_taylor.prune`), compiles the pruned model from
    `model.get_compile_config()` (same optimizer class and config, same loss
    and metrics), copies the optimizer's state with every slot sliced to the
    kept channels by the indices surgery used (and the iteration count, so
    learning-rate schedules continue), and the same `fit` goes on training
    the pruned model: with `switch="step"` (the default) from the next
    minibatch of the same epoch, so no minibatch after the target is
    trained at full size; with `switch="epoch"` from the next epoch (the
    rest of that epoch trains the full-size gated model). Each minibatch
    after the switch costs the pruned model's FLOPs, and every minibatch of
    every epoch is trained exactly once, as in a plain `fit`.

    The callbacks see one `fit`: one `on_train_begin`, every epoch, one
    `History`; at the switch they are given the pruned model (`set_model`),
    so `ModelCheckpoint` saves it and `EarlyStopping` keeps its patience
    (weights it kept from before the switch are dropped: they belong to the
    gated model). The metrics of the epoch of the switch cover all its
    minibatches (metric states are carried over; stock Keras metrics keep
    sums and counts). If the target is not reached in `epochs`, the model is
    pruned as far as it got, with a warning.

    Speed: the run pays two traces of a train step (the gated scoring step
    at the start, the pruned step after the switch; about 1 s each for a
    ResNet-14 on 2 CPU cores) and the switch itself (about 0.3 s). With
    `TaylorPruning(channel_multiple=8)` the pruned layers keep multiples of
    8 channels, which the CPU kernels run faster (pruned step 57-60 ms
    against 60-68 ms unaligned on that ResNet-14, top-1 0.15-0.3 points
    lower; benchmarks/sections/torch_pruning.md, "Wall time"). On a machine
    with few cores, a `tf.data` input with autotuning on
    (`num_parallel_calls=AUTOTUNE`, `prefetch(AUTOTUNE)`) can add a pause of
    seconds at the end of `fit`; `map` + `prefetch(1)` with
    `tf.data.Options().autotune.enabled = False` did not (same section).

    Args:
        model: a gated model (`keras_taylor.add_gates`), compiled with an
            optimizer and a loss. It is trained until the switch and left
            gated.
        x, y: training data, as for `Model.fit`.
        pruning: the `keras_taylor.TaylorPruning` callback that prunes.
        epochs: number of epochs, as for `Model.fit`. Defaults to `1`.
        callbacks: other Keras callbacks.
        switch: `"step"` or `"epoch"` (see above). Defaults to `"step"`.
        **fit_kwargs: other `Model.fit` arguments (`batch_size`,
            `validation_data`, `verbose`, ...); not `initial_epoch`.

    Returns:
        `(pruned_model, history)`: the pruned model of stock Keras layers,
        compiled and fine-tuned, and the `keras.callbacks.History` of the run.

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

    example = _one_example(x, y)
    _build_compiled_state(model, example)
    handoff = _Switch(pruning, switch, callbacks, compile_config, example)
    history = model.fit(x, y, epochs=epochs, callbacks=callbacks + [pruning, handoff], **fit_kwargs)
    pruned = handoff.pruned
    if pruned is None:  # stopped before the switch (target not reached, or a callback stopped it)
        if not pruning.done:
            warnings.warn(
                f"keras_taylor.fit_prune: the pruning target {pruning.target} was not reached in "
                f"{epochs} epochs; pruning the model as far as it got.",
                stacklevel=2,
            )
        pruned = _prune_and_compile(model, compile_config)
    else:
        pruned.optimizer.finalize_variable_values(pruned.trainable_weights)  # `fit` finalised the gated model's
    history.set_model(pruned)
    history.switched_at = handoff.switched_at
    pruned.history = history
    return pruned, history
