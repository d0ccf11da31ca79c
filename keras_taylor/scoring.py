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
from keras_taylor.gates import COUNTERS, gate_layers
from keras_taylor.graph import ChannelGraph


class TaylorScorer:
    """Accumulates per-group importance of a gated model inside its train step.

    The running sums live in the model's `ChannelGate` layers (`score`, one
    copy per member channel of a group, and `counters` on the first gate), so
    that they are saved and restored with the model's weights.

    Args:
        model: a gated, compiled model.
        graph: its `ChannelGraph` (from `analyze(model)`).
        criterion: a criterion id or `Criterion`. Defaults to `"taylor_fo_bn"`.
    """

    def __init__(self, model: keras.Model, graph: ChannelGraph, criterion="taylor_fo_bn"):
        self.model = model
        self.criterion = criteria_lib.get(criterion)
        self.gates = gate_layers(model)
        self.num_groups = graph.num_groups
        per_gate = [graph.groups_of_layer_output(l.name) for l in self.gates]
        # For each gate, the group of each channel (fixed channels: num_groups,
        # a segment that is dropped).
        self._gate_groups = [np.where(g >= 0, g, self.num_groups).astype("int32") for g in per_gate]
        self._segment_ids = np.concatenate(self._gate_groups)
        # Where to read each group back: its first member (gate, channel).
        gate_of = np.concatenate([np.full(len(g), i) for i, g in enumerate(per_gate)])
        channel_of = np.concatenate([np.arange(len(g)) for g in per_gate])
        groups, pos = np.unique(self._segment_ids, return_index=True)
        keep = groups < self.num_groups
        self._first_member = np.full((self.num_groups, 2), -1, dtype=np.int64)
        self._first_member[groups[keep]] = np.stack([gate_of[pos[keep]], channel_of[pos[keep]]], axis=1)
        self._scoring_function = None
        self._own_function = None
        self._cache_key = None
        self._counters = self.gates[0].counters

    # ---- in-graph ------------------------------------------------------------
    def group_gate_grads(self, gate_grads):
        """Sums gate gradients (one tensor per gate layer) per channel group."""
        flat = ops.concatenate([ops.reshape(ops.cast(g, "float32"), (-1,)) for g in gate_grads])
        summed = ops.segment_sum(flat, ops.convert_to_tensor(self._segment_ids), num_segments=self.num_groups + 1)
        return summed[: self.num_groups]

    def accumulate(self, gate_grads, batch_finite=None):
        """Adds one minibatch's scores (in-graph). Skips batches with NaN/Inf.

        `batch_finite` (optional boolean scalar): when false, the batch is
        skipped too, as a `LossScaleOptimizer` skips a step whose weight
        gradients overflowed even where the gate gradients did not.
        """
        group_grad = self.group_gate_grads(gate_grads)
        ctx = tf.distribute.get_replica_context()
        multi = ctx is not None and ctx.num_replicas_in_sync > 1
        if multi:
            group_grad = ctx.all_reduce(tf.distribute.ReduceOp.SUM, group_grad)
        score = ops.cast(self.criterion.batch_score(group_grad), "float32")
        finite = ops.all(ops.isfinite(score))
        if batch_finite is not None:
            bad = ops.where(batch_finite, 0.0, 1.0)
            if multi:  # any replica's overflow skips the global step
                bad = ctx.all_reduce(tf.distribute.ReduceOp.SUM, bad)
            finite = ops.logical_and(finite, ops.equal(bad, 0.0))
        padded = ops.concatenate([ops.where(finite, score, ops.zeros_like(score)), ops.zeros((1,), "float32")])
        for gate, groups in zip(self.gates, self._gate_groups):
            gate.score.assign_add(ops.take(padded, ops.convert_to_tensor(groups)))
        one = ops.where(finite, 1.0, 0.0)
        self._counters.assign_add(ops.stack([one, 1.0 - one, 1.0, 0.0, 0.0]))

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
        # Loss scaling (mixed precision) scales every gradient: undo it with
        # the scale read now, before `apply_gradients`, where a
        # LossScaleOptimizer halves it (overflow) or doubles it (growth).
        scale = model.optimizer.scale_loss(1.0) if model.optimizer is not None else 1.0
        model.optimizer.apply_gradients(zip(grads[: len(weights)], weights))
        gate_grads = grads[len(weights):]
        batch_finite = None
        if not (isinstance(scale, (int, float)) and scale == 1.0):
            gate_grads = [g / ops.cast(scale, g.dtype) for g in gate_grads]
            # Skip the steps the optimizer skips (non-finite weight gradients).
            checks = [ops.all(ops.isfinite(g)) for g in grads[: len(weights)] if g is not None]
            batch_finite = ops.all(ops.stack(checks)) if checks else None
        self.accumulate(gate_grads, batch_finite)
        return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    # ---- host ------------------------------------------------------------------
    @property
    def steps(self):
        """Minibatches scored since the last reset (a tensor)."""
        return self._counters[0]

    @property
    def skipped(self):
        """Minibatches skipped for non-finite gradients, in all (a tensor)."""
        return self._counters[1]

    def counters(self) -> dict:
        """The run counters, as Python numbers (host sync)."""
        values = keras.ops.convert_to_numpy(self._counters.value).tolist()
        return dict(zip(COUNTERS, values))

    def _per_group(self, attr: str) -> np.ndarray:
        values = [keras.ops.convert_to_numpy(getattr(g, attr).value) for g in self.gates]
        out = np.zeros(self.num_groups, dtype="float64")
        for i, v in enumerate(values):
            rows = np.flatnonzero(self._first_member[:, 0] == i)
            out[rows] = v[self._first_member[rows, 1]]
        return out

    def read(self) -> tuple:
        """Returns `(mean score per group, minibatches)` since the last reset (host sync)."""
        steps = float(keras.ops.convert_to_numpy(self.steps))
        total = self._per_group("score")
        return (total / steps if steps > 0 else total), steps

    def read_ema(self) -> np.ndarray:
        """The EMA of the scores per group, as stored in the gates."""
        return self._per_group("ema")

    def write_window(self, score_sum, steps) -> None:
        """Sets the running score sums per group and the minibatch count."""
        padded = np.concatenate([np.asarray(score_sum, "float32"), np.zeros(1, "float32")])
        for gate, groups in zip(self.gates, self._gate_groups):
            gate.score.assign(padded[groups])
        c = keras.ops.convert_to_numpy(self._counters.value).copy()
        c[0] = steps
        self._counters.assign(c)

    def write_state(self, ema, step: int, events_increment: int) -> None:
        """Stores the EMA per group and the event counters in the gates."""
        padded = np.concatenate([np.asarray(ema, "float32"), np.zeros(1, "float32")])
        for gate, groups in zip(self.gates, self._gate_groups):
            gate.ema.assign(padded[groups])
        c = keras.ops.convert_to_numpy(self._counters.value).copy()
        c[COUNTERS.index("batches")] = step
        c[COUNTERS.index("last_event")] = step
        c[COUNTERS.index("events")] += events_increment
        self._counters.assign(c)

    def reset(self) -> None:
        """Clears the score window (sums and minibatch count)."""
        self.write_window(np.zeros(self.num_groups, "float32"), 0.0)

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
