"""Matplotlib charts of a pruning run: `plot_channels`, `plot_history`.

Both need matplotlib (`pip install matplotlib`), imported when a chart is
drawn. Figures are drawn on an Agg canvas (`new_figure`), so pyplot's backend
is left alone and no display is needed. `keras_taylor.oracle.plot_correlations`
draws on the same canvas.
"""

from __future__ import annotations

import os

import keras
import numpy as np

from keras_taylor import graph as graph_lib
from keras_taylor.flops import removed_groups_from_gates
from keras_taylor.gates import is_gated


def new_figure(**kwargs):
    """A matplotlib `Figure` on an Agg canvas (no GUI, no change to pyplot's backend)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "keras_taylor plots need matplotlib, which is not installed. "
            "Install it with `pip install matplotlib` (or `pip install keras_taylor[examples]`)."
        ) from e
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _channel_counts(model: keras.Model) -> dict:
    """`{layer: output channels}` of the Conv/Dense layers; live channels for a gated model."""
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
    fig = new_figure(figsize=(max(6.0, 0.45 * len(names) + 2.0), 4.5), layout="constrained")
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


def plot_history(pruner, keras_history, path, title: str | None = None) -> str:
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
    from keras_taylor.callbacks import TaylorPruning

    if not isinstance(pruner, TaylorPruning):
        raise TypeError(f"Expected a `keras_taylor.TaylorPruning` callback. Received: pruner={pruner!r}")
    epochs, series = _accuracy_series(keras_history)
    fig = new_figure(figsize=(11.0, 4.2), layout="constrained")
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
