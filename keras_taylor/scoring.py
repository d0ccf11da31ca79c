"""In-graph accumulation of channel importance during `model.fit` (TensorFlow).

This is the only backend-specific module: it builds a train step that is the
Keras TensorFlow train step plus the gradients of the loss w.r.t. the gate
variables, taken from the same `GradientTape` as the weight gradients (no
extra forward or backward pass). The gate gradients are summed per channel
group with one `segment_sum`, scored by the criterion and added to float32
accumulator variables, all inside the compiled step: no host read, no
`py_function`, correct under `steps_per_execution > 1` and `jit_compile`.

Under a `tf.distribute` strategy each replica's group gradients are summed
across replicas before they are squared, so the score is that of the global
batch.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from keras_taylor import _compat
from keras_taylor import criteria as criteria_lib
from keras_taylor.gates import gate_layers
from keras_taylor.graph import ChannelGraph


class TaylorScorer:
    """Accumulates per-group importance of a gated model inside its train step.

    Args:
        model: a gated, compiled model.
        graph: its `ChannelGraph` (from `analyze(model)`).
        criterion: a criterion id or `Criterion`. Defaults to `"taylor_fo_bn"`.

    Attributes:
        score_sum: float32 variable `(num_groups,)`, sum of per-batch scores.
        steps: float32 variable, minibatches accumulated since the last reset.
        skipped: float32 variable, minibatches skipped for non-finite gradients.
    """

    def __init__(self, model: keras.Model, graph: ChannelGraph, criterion="taylor_fo_bn"):
        self.model = model
        self.criterion = criteria_lib.get(criterion)
        self.gates = gate_layers(model)
        self.num_groups = graph.num_groups
        seg = np.concatenate([graph.groups_of_layer_output(l.name) for l in self.gates])
        seg[seg < 0] = self.num_groups  # fixed channels go to a dropped segment
        self._segment_ids = seg.astype("int32")
        self._scoring_function = None
        self._own_function = None
        self._cache_key = None
        with model.distribute_strategy.scope():
            kw = dict(trainable=False, dtype="float32", autocast=False, aggregation="only_first_replica")
            self.score_sum = keras.Variable(np.zeros(self.num_groups, "float32"), name="taylor_score_sum", **kw)
            self.steps = keras.Variable(0.0, name="taylor_steps", **kw)
            self.skipped = keras.Variable(0.0, name="taylor_skipped", **kw)

    # ---- in-graph ------------------------------------------------------------
    def group_gate_grads(self, gate_grads):
        """Sums gate gradients (one tensor per gate layer) per channel group."""
        flat = ops.concatenate([ops.reshape(ops.cast(g, "float32"), (-1,)) for g in gate_grads])
        summed = ops.segment_sum(flat, ops.convert_to_tensor(self._segment_ids), num_segments=self.num_groups + 1)
        return summed[: self.num_groups]

    def accumulate(self, gate_grads):
        """Adds one minibatch's scores (in-graph). Skips batches with NaN/Inf."""
        group_grad = self.group_gate_grads(gate_grads)
        ctx = tf.distribute.get_replica_context()
        if ctx is not None and ctx.num_replicas_in_sync > 1:
            group_grad = ctx.all_reduce(tf.distribute.ReduceOp.SUM, group_grad)
        score = self.criterion.batch_score(group_grad)
        finite = ops.all(ops.isfinite(score))
        self.score_sum.assign_add(ops.where(finite, score, ops.zeros_like(score)))
        self.steps.assign_add(ops.where(finite, 1.0, 0.0))
        self.skipped.assign_add(ops.where(finite, 0.0, 1.0))

    def train_step(self, data):
        """The Keras TensorFlow `train_step`, plus gate gradients and scoring."""
        model = self.model
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        gate_vars = [l.gate.value for l in self.gates]
        with tf.GradientTape() as tape:
            for v in gate_vars:
                tape.watch(v)
            if _compat.call_has_training_arg(model):
                y_pred = model(x, training=True)
            else:
                y_pred = model(x)
            loss = _compat.compute_loss(model, x, y, y_pred, sample_weight)
            batch = tf.shape(next(i for i in tf.nest.flatten(x) if i is not None))[0]
            _compat.loss_tracker(model).update_state(
                _compat.unscale_loss_for_distribution(loss), sample_weight=batch
            )
            if model.optimizer is not None:
                loss = model.optimizer.scale_loss(loss)
        weights = model.trainable_weights
        grads = tape.gradient(loss, list(weights) + gate_vars)
        model.optimizer.apply_gradients(zip(grads[: len(weights)], weights))
        gate_grads = grads[len(weights):]
        # Loss scaling (mixed precision) scales every gradient: undo it.
        scale = model.optimizer.scale_loss(1.0) if model.optimizer is not None else 1.0
        if not (isinstance(scale, (int, float)) and scale == 1.0):
            gate_grads = [g / ops.cast(scale, g.dtype) for g in gate_grads]
        self.accumulate(gate_grads)
        return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    # ---- host ------------------------------------------------------------------
    def read(self) -> tuple:
        """Returns `(mean score per group, minibatches)` since the last reset (host sync)."""
        steps = float(keras.ops.convert_to_numpy(self.steps.value))
        total = keras.ops.convert_to_numpy(self.score_sum.value).astype("float64")
        return (total / steps if steps > 0 else total), steps

    def reset(self) -> None:
        self.score_sum.assign(np.zeros(self.num_groups, "float32"))
        self.steps.assign(0.0)

    def install(self) -> None:
        """Makes `model.fit` run the scoring train step.

        The compiled function is built once and reused by later `fit` calls
        (no retrace) until the model is recompiled or its optimizer,
        `steps_per_execution` or `jit_compile` change.
        """
        model = self.model
        current = model.train_function
        key = (id(model.optimizer), model.steps_per_execution, model.jit_compile)
        recompiled = current is not None and current not in (self._own_function, self._scoring_function)
        if key != self._cache_key or recompiled or self._scoring_function is None:
            if current is None or current is self._scoring_function:
                model.make_train_function(force=True)
                current = model.train_function
            self._own_function = current
            model.train_step = self.train_step
            try:
                model.make_train_function(force=True)
                self._scoring_function = model.train_function
            finally:
                del model.train_step
            self._cache_key = key
        model.train_function = self._scoring_function

    def uninstall(self) -> None:
        """Restores the model's own train function.

        `fit` reads `model.train_function` at every step, so uninstalling in a
        callback mid-fit switches the rest of the run to plain training.
        """
        if self._own_function is None:
            self.model.make_train_function(force=True)
        else:
            self.model.train_function = self._own_function
