"""Seeing a pruning run: TensorBoard summaries (`PruningTensorBoard`); the charts live in `plotting.py`.

* `PruningTensorBoard` is a Keras callback that writes what `TaylorPruning`
  did at each pruning step (FLOPs/params/channels fractions, groups removed,
  live channels per layer, and statistics of the channel scores) as TensorBoard
  summaries, in the run `<log_dir>/keras_taylor`, next to the `train` and
  `validation` runs that `keras.callbacks.TensorBoard(log_dir)` writes.
* `plot_channels` draws output channels per Conv/Dense layer before and after
  pruning; `plot_history` draws accuracy per epoch beside the FLOPs fraction
  over the pruning steps. Both need matplotlib (`pip install matplotlib`);
  they live in `keras_taylor.plotting` and are re-exported here.

Example:

```python
from keras_taylor.monitor import PruningTensorBoard, plot_channels, plot_history

pruner = keras_taylor.TaylorPruning(target=0.5)
board = PruningTensorBoard(pruner, log_dir="logs")
hist = gated.fit(ds, epochs=4, callbacks=[pruner, board,
                                          keras.callbacks.TensorBoard("logs")])
small = keras_taylor.prune(gated)
plot_channels(model, small, "channels.png")
plot_history(pruner, hist, "history.png")
```
"""

from __future__ import annotations

import os

import keras
import numpy as np

from keras_taylor import graph as graph_lib
from keras_taylor.callbacks import TaylorPruning
from keras_taylor.flops import removed_groups_from_gates
from keras_taylor.gates import gate_layers
from keras_taylor.plotting import plot_channels, plot_history

__all__ = ["PruningTensorBoard", "plot_channels", "plot_history"]

RUN_NAME = "keras_taylor"
_PREFIX = "keras_taylor"


# ---- TensorBoard ------------------------------------------------------------------
class PruningTensorBoard(keras.callbacks.Callback):
    """Writes the progress of a `TaylorPruning` callback as TensorBoard summaries.

    After each pruning step of `pruner` (a new entry in `pruner.history`) it
    writes, at step `history[i]["step"]` (the minibatch count at which the step
    pruned, the same x-axis as the batch-level logs of
    `keras.callbacks.TensorBoard`):

    * `keras_taylor/flops_fraction`, `keras_taylor/params_fraction`,
      `keras_taylor/channels_fraction`: what is left of the unpruned model;
    * `keras_taylor/removed_total`, `keras_taylor/removed`: channel groups
      removed so far, and by this step;
    * `keras_taylor/channels/<layer>` (when `per_layer`): live output channels
      of every Conv/Dense layer;
    * `keras_taylor/score/min`, `.../median`, `.../max`: statistics of the score
      EMA over the groups still alive after the step, and the histogram
      `keras_taylor/score/log10_ema` of `log10(EMA)` over those groups (groups
      with a zero EMA are left out of the histogram).

    The check at each minibatch is one Python `len()`: nothing is read from
    the device when no pruning step happened. The fractions come from
    `pruner.history`; live channels and score EMAs are read from the gated
    model's `ChannelGate` variables (`gate`, `ema`), where the pruner keeps
    its state, as tfmot's `PruningSummaries` reads its pruning wrappers. The
    model's channel groups are analysed once, at the first write.

    Put it after `pruner` in the callback list (if it comes first, a step is
    written one minibatch later, still at its own step). The summaries are
    flushed at the end of `fit`.

    The summaries are written with `tf.summary.write` and the scalar/histogram
    plugin metadata, so writing them does not need the `tensorboard` package;
    viewing them does (`tensorboard --logdir <log_dir>`).

    Args:
        pruner: the `TaylorPruning` callback of the same `fit`.
        log_dir: the directory given to `keras.callbacks.TensorBoard`; the
            summaries go to its subdirectory `keras_taylor`. Defaults to `"logs"`.
        per_layer: whether to write the live channels of every layer.
            Defaults to `True`.
        histogram_buckets: buckets of the score histogram. Defaults to `30`.
    """

    def __init__(self, pruner: TaylorPruning, log_dir="logs", per_layer: bool = True, histogram_buckets: int = 30):
        super().__init__()
        if not isinstance(pruner, TaylorPruning):
            raise TypeError(f"Expected a `keras_taylor.TaylorPruning` callback. Received: pruner={pruner!r}")
        if isinstance(histogram_buckets, bool) or not isinstance(histogram_buckets, int) or histogram_buckets < 1:
            raise ValueError(f"Expected histogram_buckets to be an integer >= 1. Received: histogram_buckets={histogram_buckets!r}")
        self.pruner = pruner
        self.log_dir = os.fspath(log_dir)
        self.per_layer = bool(per_layer)
        self.histogram_buckets = histogram_buckets
        self._writer = None
        self._written = 0  # entries of pruner.history already written
        self._graph = None  # this board's analysis of the gated model
        self._graph_of = None  # id() of the model it was made for

    @property
    def run_dir(self) -> str:
        """Where the event files go: `<log_dir>/keras_taylor`."""
        return os.path.join(self.log_dir, RUN_NAME)

    # ---- Keras hooks --------------------------------------------------------------
    def on_train_begin(self, logs=None):
        if self._writer is None:
            import tensorflow as tf

            self._writer = tf.summary.create_file_writer(self.run_dir)
        if len(self.pruner.history) < self._written:
            # The pruner's history was replaced (a new pruner state): start over.
            self._written = 0

    def on_train_batch_end(self, batch, logs=None):
        if len(self.pruner.history) > self._written:
            self._write_pending()

    def on_epoch_end(self, epoch, logs=None):
        if len(self.pruner.history) > self._written:
            self._write_pending()

    def on_train_end(self, logs=None):
        if len(self.pruner.history) > self._written:
            self._write_pending()
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flushes and closes the event file (a later `fit` opens a new one)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # ---- writing ----------------------------------------------------------------------
    def _write_pending(self) -> None:
        if self._writer is None:  # fit without on_train_begin (callback used by hand)
            self.on_train_begin()
        history = self.pruner.history
        last = len(history) - 1
        with self._writer.as_default():
            for i in range(self._written, len(history)):
                # The EMA the pruner holds is the one of its latest step: score
                # statistics are written for that step only.
                self._write_record(history[i], with_scores=(i == last))
        self._written = len(history)

    def _write_record(self, record: dict, with_scores: bool) -> None:
        step = int(record["step"])
        for key in ("flops_fraction", "params_fraction", "channels_fraction", "removed_total", "removed"):
            if key in record:
                _scalar(f"{_PREFIX}/{key}", record[key], step)
        model = self.model if self.model is not None else self.pruner.model
        if model is None:
            return
        graph = self._analysis(model)
        removed, ema = _gate_state(model, graph)
        if self.per_layer:
            for name, count in graph.layer_channel_counts(removed).items():
                _scalar(f"{_PREFIX}/channels/{name}", count, step)
        if with_scores:
            alive = np.ones(graph.num_groups, dtype=bool)
            alive[np.asarray(sorted(removed), dtype=np.int64)] = False
            values = ema[alive]
            values = values[np.isfinite(values)]
            if values.size:
                _scalar(f"{_PREFIX}/score/min", float(np.min(values)), step)
                _scalar(f"{_PREFIX}/score/median", float(np.median(values)), step)
                _scalar(f"{_PREFIX}/score/max", float(np.max(values)), step)
                positive = values[values > 0]
                if positive.size:
                    _histogram(f"{_PREFIX}/score/log10_ema", np.log10(positive), step, self.histogram_buckets)

    def _analysis(self, model) -> graph_lib.ChannelGraph:
        if self._graph is None or self._graph_of != id(model):
            self._graph = graph_lib.analyze(model, on_unknown="freeze")
            self._graph_of = id(model)
        return self._graph


def _gate_state(model, graph) -> tuple:
    """`(removed groups, score EMA per group)` as stored in the model's gates.

    A group is removed when its gates are 0; its EMA is the `ema` variable of
    any of its gate channels (the pruner writes the same value to all of them).
    """
    ema = np.zeros(graph.num_groups, dtype=np.float64)
    for layer in gate_layers(model):
        groups = graph.groups_of_layer_output(layer.name)
        member = groups >= 0
        ema[groups[member]] = keras.ops.convert_to_numpy(layer.ema.value)[member]
    return removed_groups_from_gates(model, graph), ema


def _metadata(plugin_name: str):
    import tensorflow as tf

    meta = tf.compat.v1.SummaryMetadata()
    meta.plugin_data.plugin_name = plugin_name
    meta.plugin_data.content = b""  # version 0 of the plugin's data: empty
    return meta


def _scalar(tag: str, value, step: int) -> None:
    """What `tf.summary.scalar` writes, without needing the tensorboard package."""
    import tensorflow as tf

    tf.summary.write(tag, tf.constant(float(value), tf.float32), step=step, metadata=_metadata("scalars"))


def _histogram(tag: str, data: np.ndarray, step: int, buckets: int) -> None:
    """What `tf.summary.histogram` writes: a `[k, 3]` float64 tensor of (left, right, count)."""
    import tensorflow as tf

    data = np.asarray(data, dtype=np.float64).ravel()
    lo, hi = float(np.min(data)), float(np.max(data))
    if hi > lo:
        counts, edges = np.histogram(data, bins=buckets, range=(lo, hi))
        table = np.stack([edges[:-1], edges[1:], counts.astype(np.float64)], axis=1)
    else:  # all equal: one bucket of zero width holds everything
        table = np.array([[lo, hi, float(data.size)]], dtype=np.float64)
    tf.summary.write(tag, tf.constant(table, tf.float64), step=step, metadata=_metadata("histograms"))
