"""Seeing a pruning run: TensorBoard summaries and matplotlib charts.

* `PruningTensorBoard` is a Keras callback that writes what `TaylorPruning`
  did at each pruning step (FLOPs/params/channels fractions, groups removed,
  live channels per layer, and statistics of the channel scores) as TensorBoard
  summaries, in the run `<log_dir>/keras_taylor`, next to the `train` and
  `validation` runs that `keras.callbacks.TensorBoard(log_dir)` writes.
* `plot_channels` draws output channels per Conv/Dense layer before and after
  pruning; `plot_history` draws accuracy per epoch beside the FLOPs fraction
  over the pruning steps. Both need matplotlib (`pip install matplotlib`).

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

from keras_taylor.callbacks import TaylorPruning

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
    the device when no pruning step happened, and the summaries themselves are
    written from host data (the pruner already read the scores).

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
        graph = self.pruner._graph
        if graph is None:
            return
        removed = list(self.pruner.removed[: int(record["removed_total"])])
        if self.per_layer:
            for name, count in graph.layer_channel_counts(removed).items():
                _scalar(f"{_PREFIX}/channels/{name}", count, step)
        ema = self.pruner.ema
        if with_scores and ema is not None:
            alive = np.ones(graph.num_groups, dtype=bool)
            if removed:
                alive[np.asarray(removed, dtype=np.int64)] = False
            values = np.asarray(ema, dtype=np.float64)[alive]
            values = values[np.isfinite(values)]
            if values.size:
                _scalar(f"{_PREFIX}/score/min", float(np.min(values)), step)
                _scalar(f"{_PREFIX}/score/median", float(np.median(values)), step)
                _scalar(f"{_PREFIX}/score/max", float(np.max(values)), step)
                positive = values[values > 0]
                if positive.size:
                    _histogram(f"{_PREFIX}/score/log10_ema", np.log10(positive), step, self.histogram_buckets)


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


# ---- matplotlib charts ------------------------------------------------------------
def _figure(**kwargs):
    """A matplotlib `Figure` on an Agg canvas (no GUI, no change to pyplot's backend)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "keras_taylor.monitor plots need matplotlib, which is not installed. "
            "Install it with `pip install matplotlib` (or `pip install keras_taylor[examples]`)."
        ) from e
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _channel_counts(model: keras.Model) -> dict:
    """`{layer: output channels}` of the Conv/Dense layers; live channels for a gated model."""
    from keras_taylor import graph as graph_lib
    from keras_taylor.flops import removed_groups_from_gates
    from keras_taylor.gates import is_gated

    try:
        graph = graph_lib.analyze(model, on_unknown="freeze")
    except ValueError:
        graph = None
    if graph is not None:
        removed = removed_groups_from_gates(model, graph) if is_gated(model) else ()
        return graph.layer_channel_counts(removed)
    # Not analysable (e.g. a subclassed model): read the layer configs.
    counts = {}
    for layer in model.layers:
        config = layer.get_config()
        for key in ("filters", "units"):
            if isinstance(config.get(key), int):
                counts[layer.name] = config[key]
                break
        else:
            if isinstance(layer, (keras.layers.DepthwiseConv2D, keras.layers.DepthwiseConv1D)) and layer.built:
                counts[layer.name] = int(layer.kernel.shape[-2]) * int(config["depth_multiplier"])
    return counts


def plot_channels(model_before: keras.Model, model_after: keras.Model, path, title: str | None = None) -> str:
    """Bar chart of the output channels of every Conv/Dense layer, before vs after.

    Args:
        model_before: the unpruned model (plain or gated).
        model_after: the pruned model: from `keras_taylor.prune` /
            `apply_plan`, or a gated model, whose live (gate != 0) channels
            are counted.
        path: the PNG file to write.
        title: figure title. Defaults to the kept fraction of channels.

    Returns:
        `path`, as a string.
    """
    before = _channel_counts(model_before)
    after = _channel_counts(model_after)
    names = list(before) + [n for n in after if n not in before]
    b = np.array([before.get(n, 0) for n in names])
    a = np.array([after.get(n, 0) for n in names])
    fig = _figure(figsize=(max(6.0, 0.45 * len(names) + 2.0), 4.5), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(names))
    ax.bar(x - 0.2, b, width=0.4, label="before", color="#9aa9bd")
    ax.bar(x + 0.2, a, width=0.4, label="after", color="#d1603d")
    ax.set_xticks(x, names, rotation=60 if len(names) > 6 else 0, ha="right" if len(names) > 6 else "center", fontsize=8)
    ax.set_ylabel("output channels")
    ax.set_xlabel("layer")
    if title is None:
        total_b, total_a = int(b.sum()), int(a.sum())
        title = f"channels per layer: {total_a}/{total_b} kept ({total_a / max(total_b, 1):.0%})"
    ax.set_title(title)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    path = os.fspath(path)
    fig.savefig(path, format="png", dpi=100)
    return path


def _accuracy_series(keras_history):
    """`(epochs, {label: values})` of the accuracy (else loss) metrics of a fit."""
    if keras_history is None:
        return [], {}
    logs = getattr(keras_history, "history", keras_history)
    if not isinstance(logs, dict):
        raise TypeError(f"Expected a `keras.callbacks.History` or its `.history` dict. Received: {keras_history!r}")
    keys = [k for k in logs if not k.startswith("val_") and "acc" in k]
    if not keys:
        keys = [k for k in logs if k == "loss"]
    series = {}
    for k in keys[:1]:
        series[k] = list(logs[k])
        if f"val_{k}" in logs:
            series[f"val_{k}"] = list(logs[f"val_{k}"])
    n = max((len(v) for v in series.values()), default=0)
    epochs = list(getattr(keras_history, "epoch", None) or range(n))
    epochs = [e + 1 for e in epochs[:n]]  # metrics are at the end of epoch e
    return epochs, series


def plot_history(pruner: TaylorPruning, keras_history, path, title: str | None = None) -> str:
    """Accuracy per epoch beside the FLOPs fraction over the pruning steps.

    Left axes: the accuracy metric of `keras_history` (the first metric with
    "acc" in its name, and its `val_` counterpart; the loss if there is none)
    per epoch. Right axes: FLOPs and params fraction of the unpruned model
    after each pruning step, against the minibatch at which it pruned, with
    the target as a dashed line when the pruner's metric is FLOPs or params.

    Args:
        pruner: the `TaylorPruning` callback after `fit`.
        keras_history: what `fit` returned (a `keras.callbacks.History`), its
            `.history` dict, or `None` for the pruning axes only.
        path: the PNG file to write.
        title: figure title. Defaults to none.

    Returns:
        `path`, as a string.
    """
    if not isinstance(pruner, TaylorPruning):
        raise TypeError(f"Expected a `keras_taylor.TaylorPruning` callback. Received: pruner={pruner!r}")
    epochs, series = _accuracy_series(keras_history)
    fig = _figure(figsize=(11.0, 4.2), layout="constrained")
    ax_acc, ax_prune = fig.subplots(1, 2)

    if series:
        for label, values in series.items():
            ax_acc.plot(epochs[: len(values)], values, marker="o", label=label, linestyle="--" if label.startswith("val_") else "-")
        ax_acc.set_ylabel(next(iter(series)))
        ax_acc.legend()
    else:
        ax_acc.text(0.5, 0.5, "no Keras history", ha="center", va="center", transform=ax_acc.transAxes)
    ax_acc.set_xlabel("epoch")
    ax_acc.xaxis.get_major_locator().set_params(integer=True)
    ax_acc.set_title("training")
    ax_acc.grid(alpha=0.3)

    history = list(pruner.history)
    steps = [0] + [int(r["step"]) for r in history]
    for key, label in (("flops_fraction", "FLOPs"), ("params_fraction", "params")):
        ax_prune.step(steps, [1.0] + [float(r[key]) for r in history], where="post", marker=".", label=label)
    if pruner.metric in ("flops", "params"):
        ax_prune.axhline(pruner.target, color="gray", linestyle=":", label=f"target ({pruner.metric})")
    ax_prune.set_ylim(0.0, 1.05)
    ax_prune.set_xlabel("minibatch (pruning steps)")
    ax_prune.set_ylabel("fraction of the unpruned model")
    ax_prune.set_title(f"pruning: {len(history)} steps, {len(pruner.removed)} groups removed")
    ax_prune.legend()
    ax_prune.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    path = os.fspath(path)
    fig.savefig(path, format="png", dpi=100)
    return path
