"""`TaylorPruning`: global iterative Taylor pruning as a Keras callback.

The callback holds no math. It installs the scoring train step
(`scoring.TaylorScorer`) when `fit` begins, and every `prune_every` minibatches
it reads the averaged scores (one host read per pruning step, none per
minibatch), smooths them with an EMA, ranks all channel groups of all layers
in one global list, and sets the gates of the lowest-ranked groups to 0, until
the model is down to its target. Pruned gates stay 0: nothing revives them
(except the optional `channel_multiple` rounding at the last pruning step).
"""

from __future__ import annotations

import logging
import math
import warnings

import keras
import numpy as np

from keras_taylor import criteria as criteria_lib
from keras_taylor import graph as graph_lib
from keras_taylor import flops as flops_lib
from keras_taylor import selection
from keras_taylor.flops import CostModel, removed_groups_from_gates
from keras_taylor import gates as gates_lib
from keras_taylor.gates import METRICS as _METRICS
from keras_taylor.gates import gate_layers, is_gated
from keras_taylor.plan import PruningPlan
from keras_taylor.scoring import TaylorScorer

logger = logging.getLogger("keras_taylor")



def ranking_context(graph, scorer, cost=None) -> criteria_lib.RankingContext:
    """What a criterion's `rank` may ask about a model: per-group layer labels
    (`ChannelGraph.group_labels`), the FLOPs each group's removal saves in the
    unpruned model (computed on first use, one evaluation per label: the
    groups of one label cost the same), and which groups hold a BN channel."""
    labels = np.asarray(graph.group_labels())
    cost = cost if cost is not None else CostModel(graph)

    def group_flops():
        base = cost.evaluate(graph.alive_ids(()))[0]
        out = np.zeros(len(labels))
        for label in np.unique(labels):
            rows = np.flatnonzero(labels == label)
            out[rows] = base - cost.evaluate(graph.alive_ids([int(rows[0])]))[0]
        return out

    return criteria_lib.RankingContext(labels, group_flops, scorer.bn_groups)


# CVPR'19 (ResNet-101 on ImageNet): 100 channels every 30 minibatches, out of
# the 52,672 channels that carry a gate after BN in ResNet-101.
_PAPER_CHANNELS_PER_STEP = 100
_PAPER_GATED_CHANNELS = 52_672


class TaylorPruning(keras.callbacks.Callback):
    """Prunes a gated model during `fit` by Taylor-FO-BN importance (CVPR'19),
    or by any criterion of `keras_taylor.criteria`.

    Every `prune_every` minibatches: average the per-minibatch scores
    accumulated in the train step, update the exponential moving average
    `ema = momentum * ema + (1 - momentum) * average` (the first step takes the
    average), rank every live channel group of the whole model by `ema`
    (passed through the criterion's `rank`: nothing for Taylor-FO-BN, per-layer
    L2 normalisation for the ICLR'17 criteria), and remove the lowest-ranked ones, up to
    `channels_per_step` groups per step, never leaving a Conv/Dense layer with
    fewer than `min_channels` channels, until `metric` is at most `target` of
    its value in the unpruned model. Training continues throughout; once the
    target is reached the model's own train step is restored and the rest of
    `fit` is fine-tuning.

    Args:
        target: fraction of the unpruned model's `metric` to prune down to, in
            (0, 1]. Defaults to `0.5`.
        metric: `"flops"`, `"params"`, `"channels"` (output channels of
            Conv/Dense layers) or `"latency"` (predicted by `latency`).
            Defaults to `"flops"`. With `"latency"` each pruning step is a
            HALP knapsack (`keras_taylor.selection.knapsack_removal`): the
            budget moves down an exponential schedule, `budget_t =
            max(target, now · target^(1/T))` of the dense latency with `T =
            ceil(num_groups · (1 − target) / channels_per_step)` steps (HALP's
            schedule), and the kept set maximises the summed ranking scores
            under it, each layer keeping a prefix of its importance order,
            `min_channels` and `channel_multiple` (as allowed widths) inside
            the knapsack. Removed groups stay removed.
        latency: a `keras_taylor.LatencyTable` measured on the model (needed
            for `metric="latency"`, ignored otherwise).
        prune_every: minibatches between pruning steps (K). Defaults to `30`,
            the paper's value.
        channels_per_step: channel groups removed per pruning step (N).
            Defaults to enough groups to reach `target` by about half of the
            training that `fit` runs (sized from the `epochs` and `steps` that
            Keras gives callbacks: `(1 - target)` of the groups, spread over
            the pruning steps that fit in the first half), and at least the
            paper's rate (100 per 52,672 gated channels of ResNet-101,
            scaled to this model's number of groups). The choice is logged
            (logger `"keras_taylor"`, INFO) and kept in `state()`.
        momentum: EMA momentum across pruning steps. Defaults to `0.9`.
        min_channels: fewest output channels any Conv/Dense layer keeps.
            Defaults to `1`.
        start_step: minibatches of training before the first pruning step
            (scores accumulate from the start). Defaults to `0`.
        criterion: criterion id (`keras_taylor.criteria.names()`: CVPR'19
            `"taylor_fo_bn"`, `"taylor_fo_weight"`, `"taylor_fo_fg"`,
            `"taylor_so"`; ICLR'17 `"iclr17_taylor"`, `"iclr17_taylor_nvlabs"`;
            baselines `"bn_scale"`, `"weight_l1"`, `"weight_l2"`,
            `"activation_mean"`, `"activation_std"`, `"apoz"`, `"random"`)
            or a `Criterion`. Defaults to `"taylor_fo_bn"`.
        channel_multiple: any integer >= 1 (8 and 16 match the SIMD and
            tensor-core widths that make pruned layers fast; 1 means no
            rounding). When set, the last pruning step rounds every
            Conv/Dense layer's kept channels to a multiple of it (or its full
            width; `keras_taylor.selection.align_to_target`), staying at or under
            `target`: it may restore a few of the last-removed groups of a
            layer (weights as they were) and remove a few more low-scored
            ones elsewhere. Defaults to `None` (no rounding).
        input_shape: the input size (without the batch axis, `(224, 224, 3)`)
            that FLOPs are counted at, for a model whose input leaves
            height/width unknown (`keras.Input((None, None, 3))`). Defaults
            to `None`: the model's own input shape, or, when that leaves sizes
            unknown, the shape of the first training batch (logged;
            `input_shapes` holds the size used).
        normalization: how scores are normalised per layer before the global
            ranking (`keras_taylor.criteria.normalize_scores`): `"none"`
            (CVPR'19, raw global ranking), `"l2_layer"` (ICLR'17, divided by
            the layer's L2 norm) or `"mean_group"` (Torch-Pruning's default,
            divided by the coupled group's mean). Defaults to `None`: the
            criterion's own (`"l2_layer"` for the ICLR'17 criteria, `"none"`
            for the others).

    The progress bar and `logs` show `kt_flops` and `kt_params`, the
    fractions of the unpruned model's FLOPs and params left; `history` and
    `state()` hold every pruning step (groups removed, fractions) as plain
    data. `history` restarts when the callback is used on another model.

    When `fit` ends above the target (too few minibatches for the schedule,
    `start_step` past the end of training, or `min_channels` reached), the
    callback warns. The target and metric are stored in the gated model's
    gates, so `keras_taylor.prune` warns too when the model it is given, for
    example the epoch that `ModelCheckpoint(save_best_only=True)` kept, is
    above its run's target.

    With `steps_per_execution=S`, Keras calls callbacks once every `S`
    minibatches, so pruning steps fall every `ceil(prune_every / S) * S`
    minibatches; the callback warns when `S` does not divide `prune_every`.

    Only one `TaylorPruning` may train a model at a time: two in the same
    `fit` raise a `ValueError` when training begins.

    Example:

    ```python
    gated = keras_taylor.add_gates(model)
    gated.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    pruner = keras_taylor.TaylorPruning(target=0.5)
    gated.fit(ds, epochs=4, callbacks=[pruner])
    small = keras_taylor.prune(gated)   # stock Keras layers, half the FLOPs
    ```

    References:
        Molchanov et al. "Importance Estimation for Neural Network Pruning".
        CVPR 2019. Molchanov et al. "Pruning Convolutional Neural Networks for
        Resource Efficient Inference". ICLR 2017.
    """

    def __init__(
        self,
        target: float = 0.5,
        metric: str = "flops",
        prune_every: int = 30,
        channels_per_step: int | None = None,
        momentum: float = 0.9,
        min_channels: int = 1,
        start_step: int = 0,
        criterion="taylor_fo_bn",
        channel_multiple: int | None = None,
        input_shape=None,
        latency=None,
        normalization: str | None = None,
    ):
        super().__init__()
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 < float(target) <= 1.0:
            raise ValueError(f"Expected target in (0, 1]. Received: target={target!r}")
        if metric not in _METRICS:
            raise ValueError(f"Expected metric in {_METRICS}. Received: metric={metric!r}")
        for arg, value, low in (("prune_every", prune_every, 1), ("min_channels", min_channels, 1), ("start_step", start_step, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"Expected {arg} to be an integer >= {low}. Received: {arg}={value!r}")
        if channel_multiple is not None and (
            isinstance(channel_multiple, bool) or not isinstance(channel_multiple, int) or channel_multiple < 1
        ):
            raise ValueError(f"Expected channel_multiple to be None or an integer >= 1. Received: channel_multiple={channel_multiple!r}")
        if channels_per_step is not None and (
            isinstance(channels_per_step, bool) or not isinstance(channels_per_step, int) or channels_per_step < 1
        ):
            raise ValueError(f"Expected channels_per_step to be an integer >= 1. Received: channels_per_step={channels_per_step!r}")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
            raise ValueError(f"Expected momentum in [0, 1). Received: momentum={momentum!r}")
        if metric == "latency" and not callable(getattr(latency, "cost_terms", None)):
            raise ValueError(
                "Expected latency=keras_taylor.LatencyTable.measure(model, ...) with "
                f"metric='latency'. Received: latency={latency!r}"
            )
        self.latency = latency
        self.target = float(target)
        self.metric = metric
        self.prune_every = prune_every
        self.channels_per_step = channels_per_step
        self.momentum = float(momentum)
        self.min_channels = min_channels
        self.start_step = start_step
        self.channel_multiple = channel_multiple
        criteria_lib.get(criterion)  # refuse an unknown criterion now, not at fit time
        self.criterion = criterion
        if input_shape is not None and not (
            isinstance(input_shape, (list, tuple)) and len(input_shape) > 0
        ):
            raise ValueError(
                "Expected input_shape to be a shape without the batch axis, such "
                f"as (224, 224, 3), or a list of them. Received: input_shape={input_shape!r}"
            )
        self.input_shape = input_shape
        self.input_shapes = None  # the input size(s) FLOPs/params are counted at
        self.normalization = criteria_lib.check_normalization(normalization)
        self._graph = None
        self._cost = None
        self._scorer = None
        self._model_id = None
        self._step = 0
        self._last_event = 0
        self._epoch_base = 0
        self._installed = False
        self.done = False
        self.ema = None
        self.removed = []  # removed groups, in removal order
        self.history = []  # one dict per pruning step
        self._warned_nonfinite = False
        self._awaiting_first_epoch = False

    # ---- setup -----------------------------------------------------------------
    def _setup(self) -> None:
        model = self.model
        if keras.backend.backend() != "tensorflow":
            raise ValueError(
                "Expected the TensorFlow Keras backend: the scoring train step "
                "is implemented for TensorFlow only (keras_taylor/scoring.py). "
                f"Received: backend={keras.backend.backend()!r}; set "
                "KERAS_BACKEND=tensorflow."
            )
        if not is_gated(model):
            raise ValueError(
                "Expected a gated model (from `keras_taylor.add_gates(model)`). "
                f"Received: model={model.name!r} without ChannelGate layers."
            )
        self._refuse_second_pruner(model)
        self._warn_execution_schedule(model)
        if id(model) == self._model_id:
            return
        graph = graph_lib.analyze(model, on_unknown="freeze", input_shape=self.input_shape)
        if graph.num_groups == 0:
            raise ValueError(f"Expected prunable channels. Received: model={model.name!r} with none.")
        self._graph = graph
        self._latency_terms = selection.cost_terms(graph, self.latency) if self.metric == "latency" else None
        self._scorer = TaylorScorer(model, graph, self.criterion)
        self._model_id = id(model)
        self._cost = None
        if not flops_lib.is_dynamic(graph):
            self._init_costs(graph)
        self._per_step = self.channels_per_step or self._default_per_step(graph)
        self.removed = []
        self.history = []  # a new model: a new run
        self._warned_nonfinite = False
        self._load_state()

    def _refuse_second_pruner(self, model) -> None:
        """Two callbacks would each install a scoring step and read each
        other's (reset) score windows: refuse before any minibatch runs."""
        other = getattr(model, "_keras_taylor_pruner", None)
        if other is not None and other is not self and other._awaiting_first_epoch and other.model is model:
            other._uninstall()
            other._awaiting_first_epoch = False
            model._keras_taylor_pruner = None
            raise ValueError(
                "Expected one TaylorPruning callback per fit. Received: two "
                f"TaylorPruning callbacks in the same fit of model {model.name!r} "
                f"(targets {other.target:g} and {self.target:g}); they would "
                "share the model's gates and score windows. Pass a single "
                "TaylorPruning in `callbacks`."
            )
        model._keras_taylor_pruner = self
        self._awaiting_first_epoch = True

    def _warn_execution_schedule(self, model) -> None:
        spe = int(getattr(model, "steps_per_execution", 1) or 1)
        if spe > 1 and self.prune_every % spe:
            every = math.ceil(self.prune_every / spe) * spe
            warnings.warn(
                f"TaylorPruning: steps_per_execution={spe} does not divide "
                f"prune_every={self.prune_every}. Keras calls callbacks once per "
                f"{spe} minibatches, so pruning steps will fall every {every} "
                f"minibatches (at {every}, {2 * every}, {3 * every}, ... after "
                f"start_step={self.start_step}). Use a prune_every that is a "
                f"multiple of {spe} to choose the schedule exactly.",
                stacklevel=2,
            )

    def _default_per_step(self, graph) -> int:
        """Groups per pruning step: reach the target by about half of the fit."""
        paper = max(1, int(round(_PAPER_CHANNELS_PER_STEP * graph.num_groups / _PAPER_GATED_CHANNELS)))
        params = getattr(self, "params", None) or {}
        epochs, steps = params.get("epochs"), params.get("steps")
        if not epochs or not steps:
            logger.info(
                "keras_taylor: channels_per_step=%d (the paper's rate for %d groups; "
                "fit did not say how many minibatches it will run).", paper, graph.num_groups,
            )
            return paper
        total = int(epochs) * int(steps)
        half = total // 2
        events = max(1, (half - self.start_step) // self.prune_every)
        # Removing a fraction f of the groups everywhere would keep ~(1 - f)^2
        # of the FLOPs, but the ranking removes cheap channels first, so plan
        # for removing (1 - target) of the groups: on a ResNet this reaches a
        # FLOPs target in about half the planned steps or a little more.
        share = 1.0 - self.target
        need = math.ceil(share * graph.num_groups)
        n = max(paper, math.ceil(need / events))
        logger.info(
            "keras_taylor: channels_per_step=%d: about %d of %d groups to remove, "
            "over %d pruning steps (every %d minibatches) in the first half of "
            "%d minibatches of training.", n, need, graph.num_groups, events, self.prune_every, total,
        )
        return n

    def _init_costs(self, sized_graph) -> None:
        """Cost model, unpruned totals and ranking context, at the input size
        `sized_graph` was read at (same groups as `self._graph`)."""
        self._cost = CostModel(sized_graph)
        self.input_shapes = [tuple(s) for s in sized_graph.input_shapes]
        self._base = self._measure(np.ones(len(self._graph.comp_of), dtype=bool))
        self._context = ranking_context(self._graph, self._scorer, self._cost)
        self._context.normalization = self.normalization

    def _size_from_data(self) -> None:
        """Reads the model at the size of the first training batch (the
        scoring step records it when it is traced)."""
        model = self.model
        shapes = getattr(self._scorer, "data_shapes", None)
        inputs = model.inputs or []
        if not shapes or len(shapes) != len(inputs) or any(d is None for s in shapes for d in s[1:]):
            self._uninstall()
            raise ValueError(
                f"Expected to know the input size FLOPs are counted at: model "
                f"{model.name!r} leaves it unknown ({[tuple(t.shape[1:]) for t in inputs]}) "
                f"and the training data did too (batch shapes {shapes}). Pass "
                "`TaylorPruning(..., input_shape=(H, W, C))`."
            )
        given = [tuple(s[1:]) for s in shapes]
        sized = graph_lib.analyze(model, on_unknown="freeze", input_shape=given if len(given) > 1 else given[0])
        if sized.num_groups != self._graph.num_groups or len(sized.comp_of) != len(self._graph.comp_of):
            raise ValueError(f"Model {model.name!r} has other channel groups at input size {given}.")
        self._init_costs(sized)
        logger.info("keras_taylor: FLOPs and params of %r counted at input size %s (the first training batch)", model.name, self.input_shapes)
        self.done = self._fraction(self._graph.alive_ids(self.removed)) <= self.target

    def _load_state(self) -> None:
        """Reads the pruning state the gated model carries (one host read).

        Gates, score window, EMA and counters are variables of the model's
        `ChannelGate` layers, so a checkpoint restored by `BackupAndRestore`,
        `load_weights` or `keras.saving.load_model` resumes the run where it
        was saved.
        """
        graph, model = self._graph, self.model
        gone = sorted(removed_groups_from_gates(model, graph))
        if sorted(self.removed) != gone:  # keep the removal order when it is ours
            self.removed = gone
        counters = self._scorer.counters()
        self._step = int(counters["batches"])
        self._last_event = int(counters["last_event"])
        self.ema = self._scorer.read_ema()
        self._ema_started = np.full(graph.num_groups, counters["events"] > 0)
        self._loaded_fractions = {"kt_flops": 1.0, "kt_params": 1.0}
        self.done = False
        if self._cost is not None:  # sizes known (else: at the first batch)
            frac = self._measure(graph.alive_ids(self.removed))
            self._loaded_fractions = {  # what the progress bar shows before this run's first step
                "kt_flops": frac["flops"] / self._base["flops"] if self._base["flops"] else 1.0,
                "kt_params": frac["params"] / self._base["params"] if self._base["params"] else 1.0,
            }
            self.done = self._fraction(graph.alive_ids(self.removed)) <= self.target

    def _measure(self, alive) -> dict:
        out = flops_lib.metric_values(self._cost, alive)
        if self._latency_terms is not None:
            out["latency"] = self._latency_terms.evaluate(alive)
        return out

    def _fraction(self, alive) -> float:
        base = self._base[self.metric]
        return self._measure(alive)[self.metric] / base if base else 1.0

    # ---- Keras hooks -------------------------------------------------------------
    def on_train_begin(self, logs=None):
        self._setup()
        self._synced = False
        self._recorded = False
        if not self.done:
            self._scorer.install()
            self._installed = True

    def on_epoch_begin(self, epoch, logs=None):
        self._awaiting_first_epoch = False
        if not self._synced:
            # After every callback's on_train_begin: BackupAndRestore may have
            # just restored the weights, and with them the pruning state.
            self._load_state()
            self._synced = True
            if self.done:
                self._uninstall()
            elif not self._installed:
                self._scorer.install()
                self._installed = True
        self._epoch_base = self._step

    def on_train_batch_end(self, batch, logs=None):
        self._step = self._epoch_base + int(batch) + 1
        if not self._recorded:
            # The run's target goes into the gates with the first minibatch
            # (a fit that fails before training leaves the model as it was).
            gates_lib.record_run(self.model, self.target, self.metric)
            self._recorded = True
        if self._cost is None:
            self._size_from_data()
            if self.done:
                self._uninstall()
        if (
            not self.done
            and self._step >= self.start_step
            and self._step - max(self._last_event, self.start_step) >= self.prune_every
        ):
            self._prune_step()
        if logs is not None:
            logs.update(self._log_values())

    def on_epoch_end(self, epoch, logs=None):
        if self._step == self._epoch_base and not self.done:
            self._uninstall()
            raise ValueError(
                "Expected training data: TaylorPruning scores channels on "
                f"minibatches. Received: model={self.model.name!r} fit for an "
                f"epoch ({epoch}) without any (an empty dataset?)."
            )
        if logs is not None:
            logs.update(self._log_values())

    def on_train_end(self, logs=None):
        self._uninstall()
        self._awaiting_first_epoch = False
        if getattr(self.model, "_keras_taylor_pruner", None) is self:
            self.model._keras_taylor_pruner = None
        if self._graph is None:
            return
        fraction = self._fraction(self._graph.alive_ids(self.removed))
        if fraction > self.target * (1 + 1e-9):
            why = (
                f"start_step={self.start_step} is past the {self._step} minibatches "
                "trained" if self._step < self.start_step else
                f"{len(self.history)} pruning step(s) of up to {self._per_step} groups "
                f"every {self.prune_every} minibatches did not suffice in "
                f"{self._step} minibatches"
            )
            warnings.warn(
                f"TaylorPruning: fit ended with model {self.model.name!r} at "
                f"{fraction:.4f} of its {self.metric}, above the target {self.target:g} "
                f"({why}). Fit for more epochs (the run resumes where it "
                "stopped), raise channels_per_step, or lower prune_every; "
                "`keras_taylor.prune` now would return a model above the target.",
                stacklevel=2,
            )

    def _uninstall(self):
        if self._installed:
            self._scorer.uninstall()
            self._installed = False

    # ---- pruning ---------------------------------------------------------------------
    def _prune_step(self) -> None:
        graph = self._graph
        scores, steps = self._scorer.read()
        skipped = int(self._scorer.counters()["skipped"])
        if skipped > 0 and not self._warned_nonfinite:
            self._warned_nonfinite = True
            logger.warning(
                "keras_taylor: %d minibatch(es) had NaN/Inf gradients; they were "
                "left out of the channel scores (warned once per callback).", skipped,
            )
        self._scorer.reset()
        self._last_event = self._step
        if steps == 0:
            logger.warning("keras_taylor: no finite scores in the last %d minibatches; not pruning.", self.prune_every)
            self._scorer.write_state(self.ema, step=self._step, events_increment=0)
            return
        fresh = ~self._ema_started
        self.ema = np.where(fresh, scores, self.momentum * self.ema + (1.0 - self.momentum) * scores)
        self._ema_started[:] = True

        removed = set(self.removed)
        alive = graph.alive_ids(removed)
        self._context.removed = removed
        ranked = np.asarray(self._scorer.criterion.rank(self.ema, self._context), dtype="float64")
        if self.metric == "latency":
            taken, reached = self._knapsack_step(graph, ranked, removed, alive)
        else:
            taken, reached = selection.greedy_removal(
                graph, ranked, removed=removed, min_channels=self.min_channels, limit=self._per_step,
                stop=lambda r: self._fraction(graph.alive_ids(r)) <= self.target,
            )
        removed.update(taken)
        self.done = self.done or reached
        if not taken and not self.done:
            self.done = True
            logger.warning(
                "keras_taylor: cannot remove more channels without going below "
                "min_channels=%d; stopping at %s fraction %.3f (target %.3f).",
                self.min_channels, self.metric, self._fraction(alive), self.target,
            )
        self.removed.extend(taken)
        self._set_gates(removed)
        self._scorer.write_state(self.ema, step=self._step, events_increment=1)
        frac = self._measure(graph.alive_ids(removed))
        record = {
            "step": self._step,
            "removed": len(taken),
            "removed_total": len(self.removed),
            "flops_fraction": frac["flops"] / self._base["flops"],
            "params_fraction": frac["params"] / self._base["params"],
            "channels_fraction": frac["channels"] / self._base["channels"],
        }
        if "latency" in frac:
            record["latency_fraction"] = frac["latency"] / self._base["latency"]
            record["latency_budget"] = self._budget_fraction
        self.history.append(record)
        logger.info("keras_taylor: step %d removed %d groups (%d total); FLOPs %.3f", self._step, len(taken), len(self.removed), record["flops_fraction"])
        if self.done:
            if self.channel_multiple and self.channel_multiple > 1 and self.metric != "latency":
                self._align(record, ranked)
            # Pruning is over: the rest of fit is plain fine-tuning.
            self._uninstall()

    def _knapsack_step(self, graph, ranked, removed, alive) -> tuple:
        """One latency step: the next budget on the schedule, the knapsack's kept set."""
        steps = max(1, int(np.ceil(graph.num_groups * (1.0 - self.target) / self._per_step)))
        now = self._fraction(alive)
        self._budget_fraction = max(self.target, now * self.target ** (1.0 / steps))
        new = selection.knapsack_removal(
            graph, ranked, self._latency_terms, self._budget_fraction * self._base["latency"],
            removed=removed, min_channels=self.min_channels, channel_multiple=self.channel_multiple,
        )
        taken = sorted(new - removed, key=lambda g: (ranked[g], g))
        reached = self._fraction(graph.alive_ids(new)) <= self.target
        if not reached and self._fraction(graph.alive_ids(new)) > self._budget_fraction:
            reached = True  # the knapsack cannot go lower (min_channels); it warned
        return taken, reached

    def _align(self, record: dict, ranked: np.ndarray) -> None:
        """Rounds every layer's kept channels to `channel_multiple` (last step),
        by the ranking scores of this step (non-finite: never removed)."""
        graph = self._graph
        removed = set(self.removed)
        ranked = np.where(np.isfinite(ranked), ranked, np.inf)
        aligned = selection.align_to_target(
            graph, removed, ranked, self.channel_multiple,
            lambda r: self._fraction(graph.alive_ids(r)), self.target, min_channels=self.min_channels,
        )
        restored = removed - aligned
        self.removed = [g for g in self.removed if g in aligned] + sorted(aligned - removed)
        self._set_gates(aligned, restored)
        frac = self._measure(graph.alive_ids(aligned))
        record.update(
            aligned_to=self.channel_multiple, restored=len(restored), added=len(aligned - removed),
            removed_total=len(self.removed),
            flops_fraction=frac["flops"] / self._base["flops"],
            params_fraction=frac["params"] / self._base["params"],
            channels_fraction=frac["channels"] / self._base["channels"],
        )
        logger.info(
            "keras_taylor: aligned to multiples of %d: %d groups restored, %d more removed; FLOPs %.3f",
            self.channel_multiple, len(restored), len(aligned - removed), record["flops_fraction"],
        )

    def _set_gates(self, removed, restored=()) -> None:
        removed_arr = np.array(sorted(removed), dtype=np.int64)
        restored_arr = np.array(sorted(restored), dtype=np.int64)
        for layer in gate_layers(self.model):
            groups = self._graph.groups_of_layer_output(layer.name)
            off = np.isin(groups, removed_arr) & (groups >= 0)
            back = np.isin(groups, restored_arr) & (groups >= 0)
            current = keras.ops.convert_to_numpy(layer.gate.value)
            new = np.where(off, 0.0, np.where(back, 1.0, current)).astype("float32")
            if not np.array_equal(new, current):
                layer.gate.assign(new)

    def _log_values(self) -> dict:
        if self._graph is None:
            return {}
        if self.history:
            last = self.history[-1]
            return {"kt_flops": last["flops_fraction"], "kt_params": last["params_fraction"]}
        return dict(self._loaded_fractions)

    # ---- state as plain data -----------------------------------------------------------
    @property
    def plan(self) -> PruningPlan:
        """The channels removed so far, as a `PruningPlan`."""
        if self._graph is None:
            raise ValueError("The callback has not seen a model yet: call `fit` first.")
        return PruningPlan.from_groups(self._graph, self.removed)

    def state(self) -> dict:
        """Scores, EMA and plan so far, as plain Python data (JSON-able)."""
        scores = steps = None
        if self._scorer is not None:
            mean, steps = self._scorer.read()
            scores = mean.tolist()
        return {
            "step": self._step,
            "done": self.done,
            "num_groups": None if self._graph is None else self._graph.num_groups,
            "channels_per_step": getattr(self, "_per_step", None),
            "pending_scores": scores,
            "pending_minibatches": steps,
            "ema": None if self.ema is None else self.ema.tolist(),
            "removed_groups": list(self.removed),
            "history": list(self.history),
            "plan": None if self._graph is None else self.plan.to_dict(),
        }

    # ---- read-only views ----------------------------------------------------------------
    @property
    def graph(self):
        """The `ChannelGraph` of the model being pruned (`None` before `fit`)."""
        return self._graph

    @property
    def scorer(self) -> TaylorScorer | None:
        """The `TaylorScorer` that accumulates the channel scores in the train
        step (`None` before `fit`): `scorer.read()`, `scorer.read_ema()`,
        `scorer.counters()`, `scorer.steps`."""
        return self._scorer
