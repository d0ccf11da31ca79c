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

import contextlib

import keras
import numpy as np
from keras import ops

from keras_taylor import _compat
from keras_taylor import criteria as criteria_lib
from keras_taylor.gates import COUNTERS, gate_layers, recording_outputs
from keras_taylor.graph import ChannelGraph

tf = _compat.import_tensorflow("keras_taylor.TaylorPruning (its scoring train step, keras_taylor.scoring)")


def _replica_sum(x):
    """Sums `x` over the replicas of a `tf.distribute` strategy (identity on one)."""
    ctx = tf.distribute.get_replica_context()
    if ctx is not None and ctx.num_replicas_in_sync > 1:
        return ctx.all_reduce(tf.distribute.ReduceOp.SUM, x)
    return x


def _channel_layout(handler, layer, variable, channels: int):
    """How a variable's elements map to output channels: `"last"` axis,
    `"second_last"` (transposed conv kernels) or `None` (not per channel).

    Read from the handler's own `gate_scale`: scaling by `1..C` labels every
    element with its output channel.
    """
    labels = np.arange(1, channels + 1, dtype="float64")
    with tf.init_scope():  # eager, also when first asked while tracing the step
        ids = np.asarray(keras.ops.convert_to_numpy(handler.gate_scale(layer, variable, np.ones(variable.shape), labels)))
    for layout, moved in (("last", ids), ("second_last", np.moveaxis(ids, -2, -1) if ids.ndim >= 2 else None)):
        if moved is not None and moved.shape[-1] == channels and np.all(moved.reshape(-1, channels) == labels):
            return layout
    return None


def _cached(fn):
    """A per-instance cached property without a lock.

    (`functools.cached_property` takes one lock per class attribute in
    Python < 3.12: under a `tf.distribute` strategy, replica threads tracing
    their own `Signals` would block on it while another holds it inside an
    all-reduce, which waits for them: a deadlock.)
    """
    name = fn.__name__

    def get(self):
        if name not in self._cache:
            self._cache[name] = fn(self)
        return self._cache[name]

    return property(get, doc=fn.__doc__)


def _per_channel(value, layout, channels):
    if layout == "second_last":
        value = ops.moveaxis(value, -2, -1)
    return ops.reshape(value, (-1, channels))


class Signals:
    """Per-group quantities of one minibatch, computed lazily in the train step.

    A `Criterion` reads the attributes it needs; only those are computed.
    Quantities summed over examples are summed across replicas under a
    `tf.distribute` strategy, so every criterion scores the global batch.
    Gradients are unscaled (mixed-precision loss scaling undone).
    """

    def __init__(self, scorer, gate_grads, calls, call_grads, weight_grads, scale, batch=None):
        self._scorer = scorer
        self._gate_grads = gate_grads
        self._calls = calls
        self._call_grads = call_grads
        self._weight_grads = weight_grads
        self._scale = scale
        self._batch = batch
        self._cache = {}
        self.num_groups = scorer.num_groups

    def _segments(self, per_channel, segment_ids):
        """Sums a `(C_total, ...)` tensor per group (fixed channels dropped)."""
        summed = ops.segment_sum(per_channel, ops.convert_to_tensor(segment_ids), num_segments=self.num_groups + 1)
        return summed[: self.num_groups]

    def _unscale(self, g):
        if isinstance(self._scale, (int, float)) and self._scale == 1.0:
            return g
        return g / ops.cast(self._scale, g.dtype)

    # ---- gate gradients -------------------------------------------------------------
    @_cached
    def group_grad(self):
        """`∂L/∂m` per group: the members' gate gradients summed (global batch)."""
        return _replica_sum(self._scorer.group_gate_grads(self._gate_grads))

    # ---- activations (recorded gate outputs) ------------------------------------------
    def _recorded(self):
        """Yields `(a, g, ids)` per recorded gate call: the output and its
        (unscaled) gradient as `(B, positions, C)` float32, and the group of
        each channel."""
        if not self._calls:
            raise ValueError("The criterion reads activations but the train step recorded none.")
        for (gate, y), dy in zip(self._calls, self._call_grads):
            a = ops.cast(y, "float32")
            g = None if dy is None else self._unscale(ops.cast(dy, "float32"))
            axis = gate.channel_axis
            if axis != len(a.shape) - 1:
                a = ops.moveaxis(a, axis, -1)
                g = None if g is None else ops.moveaxis(g, axis, -1)
            shape = (ops.shape(a)[0], -1, int(a.shape[-1]))
            a = ops.reshape(a, shape)
            g = ops.zeros_like(a) if g is None else ops.reshape(g, shape)
            yield a, g, self._scorer.gate_groups_of(gate)

    @_cached
    def _gradient_terms(self):
        """Per group: `Σ_b E_b²`, `Σ_b |spatial mean of E_b|` and
        `Σ_b mean_{h,w} |a·g|`, from the per-example `a·g` of every member."""
        per_example, means, abs_mean, ids = [], [], [], []
        for a, g, groups in self._recorded():
            prod = a * g
            e = ops.sum(prod, axis=1)  # (B, C)
            per_example.append(e)
            means.append(e / ops.cast(ops.shape(a)[1], "float32"))
            abs_mean.append(ops.sum(ops.mean(ops.abs(prod), axis=1), axis=0))
            ids.append(groups)
        ids = np.concatenate(ids)
        per_example = self._segments(ops.transpose(ops.concatenate(per_example, axis=1)), ids)  # (G, B)
        means = self._segments(ops.transpose(ops.concatenate(means, axis=1)), ids)
        return {
            "example_grad_sq": _replica_sum(ops.sum(ops.square(per_example), axis=1)),
            "example_mean_abs": _replica_sum(ops.sum(ops.abs(means), axis=1)),
            "product_abs_mean": _replica_sum(self._segments(ops.concatenate(abs_mean), ids)),
        }

    @_cached
    def _activation_stats(self):
        """Per group, `(Σ relu(a), Σ relu(a)², #(a <= 0), count)` over the
        minibatch, positions and members: no gradients needed."""
        stats, ids = [], []
        for a, _, groups in self._recorded():
            r = ops.relu(a)
            count = ops.cast(ops.shape(a)[0] * ops.shape(a)[1], "float32")
            stats.append(ops.stack([
                ops.sum(r, axis=(0, 1)),
                ops.sum(r * r, axis=(0, 1)),
                ops.sum(ops.cast(a <= 0, "float32"), axis=(0, 1)),
                ops.ones((int(a.shape[-1]),), "float32") * count,
            ], axis=1))  # (C, 4)
            ids.append(groups)
        return _replica_sum(self._segments(ops.concatenate(stats, axis=0), np.concatenate(ids)))  # (G, 4)

    @_cached
    def examples(self):
        """Examples in the (global) minibatch."""
        if self._batch is None:
            raise ValueError("The minibatch size is unknown outside the train step.")
        return _replica_sum(ops.cast(self._batch, "float32"))

    @property
    def example_grad_sq(self):
        """`Σ_b E_b²`, `E_b = Σ_members Σ_{h,w} a·g` of example `b`."""
        return self._gradient_terms["example_grad_sq"]

    @property
    def example_mean_abs(self):
        """`Σ_b |Σ_members (1/M) Σ_{h,w} a·g|` (ICLR'17, before the 1/B)."""
        return self._gradient_terms["example_mean_abs"]

    @property
    def product_abs_mean(self):
        """`Σ_members Σ_b (1/M) Σ_{h,w} |a·g|` (NVlabs' ICLR'17, before the 1/B)."""
        return self._gradient_terms["product_abs_mean"]

    @property
    def activation_mean(self):
        s = self._activation_stats
        return s[:, 0] / s[:, 3]

    @property
    def activation_std(self):
        s = self._activation_stats
        mean = s[:, 0] / s[:, 3]
        return ops.sqrt(ops.maximum(s[:, 1] / s[:, 3] - mean * mean, 0.0))

    @property
    def zero_fraction(self):
        s = self._activation_stats
        return s[:, 2] / s[:, 3]

    # ---- weights ---------------------------------------------------------------------------
    def _filters(self, fn, sources):
        parts, ids = [], []
        for variable, layout, channels, groups, grad_index in sources:
            value = _per_channel(ops.cast(ops.convert_to_tensor(variable), "float32"), layout, channels)
            grad = None
            if grad_index is not None and self._weight_grads[grad_index] is not None:
                grad = _per_channel(self._unscale(ops.cast(self._weight_grads[grad_index], "float32")), layout, channels)
            parts.append(fn(value, grad))
            ids.append(groups)
        return self._segments(ops.concatenate(parts), np.concatenate(ids))

    @property
    def filter_grad(self):
        """`Σ_{filters} w·∂L/∂w` per group (global batch)."""
        zero = lambda w, g: ops.zeros((w.shape[1],), "float32")  # noqa: E731
        fn = lambda w, g: zero(w, g) if g is None else ops.sum(w * g, axis=0)  # noqa: E731
        return _replica_sum(self._filters(fn, self._scorer.filter_sources))

    @property
    def filter_l1(self):
        return self._filters(lambda w, g: ops.sum(ops.abs(w), axis=0), self._scorer.filter_sources)

    @property
    def filter_sq(self):
        return self._filters(lambda w, g: ops.sum(w * w, axis=0), self._scorer.filter_sources)

    @property
    def bn_scale(self):
        """`Σ |γ|` over the group's BatchNorm channels (0 for groups with none;
        see `TaylorScorer.bn_groups`)."""
        sources = self._scorer.bn_sources
        if not sources:
            return ops.zeros((self.num_groups,), "float32")
        return self._filters(lambda w, g: ops.sum(ops.abs(w), axis=0), sources)


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
        self._groups_by_gate = {id(l): g for l, g in zip(self.gates, self._gate_groups)}
        self._graph = graph
        self._filter_sources = None
        self._bn_sources = None
        self.criterion.build(self.num_groups)
        self._scoring_function = None
        self._own_function = None
        self._cache_key = None
        self._counters = self.gates[0].counters

    def gate_groups_of(self, gate) -> np.ndarray:
        """The group of each channel of a gate (fixed channels: `num_groups`)."""
        return self._groups_by_gate[id(gate)]

    def _weight_index(self):
        return {id(v): i for i, v in enumerate(self.model.trainable_weights)}

    @property
    def filter_sources(self) -> list:
        """`(variable, layout, channels, groups, grad index)` of every weight that
        makes channels (the kernel slices and biases of each Conv/Dense)."""
        if self._filter_sources is None:
            graph, index, sources = self._graph, self._weight_index(), []
            for name, out_map in graph.creating_layers().items():
                node = graph.first_node(name)
                layer, channels = node.inner, len(out_map)
                groups = graph.group_of_comp[graph.comp_of[out_map]]
                groups = np.where(groups >= 0, groups, self.num_groups).astype("int32")
                for v in node.handler.gate_variables(layer):
                    layout = _channel_layout(node.handler, layer, v, channels)
                    if layout is not None:
                        sources.append((v, layout, channels, groups, index.get(id(v))))
            self._filter_sources = sources
        return self._filter_sources

    @property
    def bn_sources(self) -> list:
        """`(gamma, "last", channels, groups, None)` of every gated BatchNormalization."""
        if self._bn_sources is None:
            self._bn_sources = [
                (l.layer.gamma, "last", l.channels, self.gate_groups_of(l), None)
                for l in self.gates
                if isinstance(l.layer, keras.layers.BatchNormalization) and l.layer.scale
            ]
        return self._bn_sources

    @property
    def bn_groups(self) -> np.ndarray:
        """Boolean per group: at least one member channel is a gated BN channel."""
        mask = np.zeros(self.num_groups + 1, dtype=bool)
        for *_, groups, _ in self.bn_sources:
            mask[groups] = True
        return mask[: self.num_groups]

    # ---- in-graph ------------------------------------------------------------
    def group_gate_grads(self, gate_grads):
        """Sums gate gradients (one tensor per gate layer) per channel group."""
        flat = ops.concatenate([ops.reshape(ops.cast(g, "float32"), (-1,)) for g in gate_grads])
        summed = ops.segment_sum(flat, ops.convert_to_tensor(self._segment_ids), num_segments=self.num_groups + 1)
        return summed[: self.num_groups]

    def accumulate(self, signals, batch_finite=None):
        """Adds one minibatch's scores (in-graph). Skips batches with NaN/Inf.

        `signals`: a `Signals`, or the list of gate gradients (one tensor per
        gate layer). `batch_finite` (optional boolean scalar): when false, the
        batch is skipped too, as a `LossScaleOptimizer` skips a step whose
        weight gradients overflowed even where the gate gradients did not.
        """
        if not isinstance(signals, Signals):
            signals = Signals(self, signals, [], [], [], 1.0)
        ctx = tf.distribute.get_replica_context()
        multi = ctx is not None and ctx.num_replicas_in_sync > 1
        score = ops.cast(self.criterion.batch_score(signals), "float32")
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
        self._counters.assign_add(ops.stack([one, 1.0 - one, 1.0] + [0.0] * (len(COUNTERS) - 3)))

    def train_step(self, data):
        """The Keras TensorFlow `train_step`, plus gate gradients and scoring."""
        model = self.model
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        # Static batch shapes, recorded when traced: the input size
        # `TaylorPruning` counts FLOPs at when the model leaves it unknown.
        self.data_shapes = [tuple(t.shape) for t in tf.nest.flatten(x) if t is not None]
        gate_vars = [l.gate.value for l in self.gates]
        # Criteria that read activations keep the gate outputs of this forward
        # pass; their gradients come from the same tape.
        record = recording_outputs() if self.criterion.uses_activations else contextlib.nullcontext([])
        with tf.GradientTape() as tape:
            for v in gate_vars:
                tape.watch(v)
            with record as calls:
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
        weights = list(model.trainable_weights)
        outputs = [y for _, y in calls]
        grads = tape.gradient(loss, weights + gate_vars + outputs)
        # Loss scaling (mixed precision) scales every gradient: undo it with
        # the scale read now, before `apply_gradients`, where a
        # LossScaleOptimizer halves it (overflow) or doubles it (growth).
        scale = model.optimizer.scale_loss(1.0) if model.optimizer is not None else 1.0
        weight_grads = grads[: len(weights)]
        model.optimizer.apply_gradients(zip(weight_grads, weights))
        gate_grads = grads[len(weights) : len(weights) + len(gate_vars)]
        batch_finite = None
        if not (isinstance(scale, (int, float)) and scale == 1.0):
            gate_grads = [g / ops.cast(scale, g.dtype) for g in gate_grads]
            # Skip the steps the optimizer skips (non-finite weight gradients).
            checks = [ops.all(ops.isfinite(g)) for g in weight_grads if g is not None]
            batch_finite = ops.all(ops.stack(checks)) if checks else None
        signals = Signals(self, gate_grads, calls, grads[len(weights) + len(gate_vars) :], weight_grads, scale, batch)
        self.accumulate(signals, batch_finite)
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

        The optimizer is built first (on the model's trainable variables, as
        Keras would in the first step), so the step is traced once. The
        compiled function is built once and reused by later `fit` calls
        (no retrace) until the model is recompiled or its optimizer,
        `steps_per_execution` or `jit_compile` change.
        """
        model = self.model
        optimizer = model.optimizer
        if optimizer is not None and not optimizer.built:
            # Keras builds it inside the first traced step otherwise; creating
            # variables there makes TensorFlow trace the step a second time.
            with model.distribute_strategy.scope():
                optimizer.build(model.trainable_variables)
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
