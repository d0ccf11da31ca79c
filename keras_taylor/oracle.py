"""The oracle: the true loss change when one channel group is removed.

Molchanov et al. (CVPR'19) judge an importance criterion against an
*oracle*: the change of the loss when one neuron (here: one channel group)
alone is removed, measured on held-out data. They compare criteria to it by
rank correlation (Spearman, Kendall); the abstract reports more than 93%
correlation for Taylor-FO on ImageNet ResNets. The paper's importance is the
squared loss change, which ranks groups as `|ΔL|` does. This module measures the
oracle on a gated model by setting a group's gates to 0, and computes and
plots those rank correlations.

Typical use::

    from keras_taylor import oracle

    deltas = oracle.oracle_deltas(gated, (x_val, y_val), cache="oracle.npz")
    labels = oracle.group_labels(keras_taylor.analyze(gated))
    corr = oracle.rank_correlations({"taylor_fo_bn": scores}, deltas, labels)
    oracle.plot_correlations(corr, {"taylor_fo_bn": scores}, deltas, "oracle.png")

`scores` holds one value per channel group, in the groups' order (for
example `TaylorPruning.ema`, the smoothed Taylor score of each group).

References:
    Molchanov et al., "Importance Estimation for Neural Network Pruning",
    CVPR 2019.
    Molchanov et al., "Pruning Convolutional Neural Networks for Resource
    Efficient Inference", ICLR 2017.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings

import keras
import numpy as np
from keras_taylor import _compat
from keras_taylor import gates as gates_lib
from keras_taylor import graph as graph_lib
from keras_taylor.plotting import new_figure

tf = _compat.import_tensorflow("keras_taylor.oracle (the measured loss change of each group)")

CACHE_FORMAT = "keras_taylor.oracle/1"
# "heldout": ΔL of the pooled held-out loss, inference mode (signed).
# "nvlabs": E_b |ΔL_b| over training minibatches in training mode, as
# NVlabs/Taylor_pruning's `run_full_oracle` (method 40) computes it.
DEFINITIONS = ("heldout", "nvlabs")


# ---- checks ----------------------------------------------------------------
def _check_model(gated) -> list:
    """Returns the gate layers of a gated, compiled model, or raises."""
    if not gates_lib.is_gated(gated):  # raises itself for a non-Model
        raise ValueError(
            "Expected a gated model (from `keras_taylor.add_gates`). Received: "
            f"gated={gated.name!r} without ChannelGate layers."
        )
    if not getattr(gated, "compiled", False) or getattr(gated, "loss", None) is None:
        raise ValueError(
            "Expected a model compiled with a loss (`gated.compile(loss=...)`), "
            f"whose loss the oracle measures. Received: gated={gated.name!r}, "
            "which is not compiled with a loss."
        )
    return gates_lib.gate_layers(gated)


def _check_graph(graph, gate_layers) -> None:
    names = {layer.name for layer in gate_layers}
    missing = [s for s in graph.gate_sites if s not in names]
    if missing:
        raise ValueError(
            "Expected the ChannelGraph of the gated model (`keras_taylor.analyze(gated)`). "
            f"Received: graph={graph.model_name!r}, whose gate sites {missing[:5]} are not "
            "gate layers of the model."
        )


# ---- data ------------------------------------------------------------------
def _num_examples(x) -> int:
    return int(keras.tree.flatten(x)[0].shape[0])


def _array_batches(data, batch_size: int) -> list:
    x, y, sw = keras.utils.unpack_x_y_sample_weight(tuple(data))
    n = _num_examples(x)
    if y is None or _num_examples(y) != n:
        raise ValueError(
            "Expected data=(x, y) with as many targets as inputs. Received: "
            f"{n} inputs and {None if y is None else _num_examples(y)} targets."
        )
    return [
        keras.tree.map_structure(lambda a, i=i: a[i : i + batch_size], (x, y, sw), none_is_leaf=False)
        for i in range(0, n, batch_size)
    ]


def _dataset_batches(data) -> list:
    if int(data.cardinality()) == int(tf.data.INFINITE_CARDINALITY):
        raise ValueError(
            "Expected a finite tf.data.Dataset of (x, y) batches. Received: "
            "data, an infinite dataset (drop its `.repeat()` or `.take(n)` it)."
        )
    batches = []
    for element in data:
        if not isinstance(element, (tuple, list)) or len(element) not in (2, 3):
            raise ValueError(
                "Expected a tf.data.Dataset of (x, y) or (x, y, sample_weight) "
                f"batches. Received: data with elements of type {type(element).__name__}."
            )
        batches.append(keras.utils.unpack_x_y_sample_weight(tuple(element)))
    return batches


def _materialize(data, batch_size: int) -> list:
    """The held-out batches as `[(x, y, sample_weight)]` of tensors, read once."""
    if isinstance(data, tf.data.Dataset):
        batches = _dataset_batches(data)
    elif isinstance(data, (tuple, list)) and len(data) in (2, 3):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"Expected a positive integer batch_size. Received: batch_size={batch_size!r}")
        batches = _array_batches(data, batch_size)
    else:
        raise ValueError(
            "Expected data=(x, y) numpy arrays or a finite tf.data.Dataset of "
            f"(x, y) batches. Received: data of type {type(data).__name__}."
        )
    batches = [b for b in batches if _num_examples(b[0]) > 0]
    if not batches:
        raise ValueError("Expected held-out examples to measure the loss on. Received: data with 0 examples.")
    return [keras.tree.map_structure(tf.convert_to_tensor, b, none_is_leaf=False) for b in batches]


# ---- cache -----------------------------------------------------------------
def _cache_key(gated, batches, num_groups: int, definition: str = "heldout") -> str:
    """SHA-256 of every model variable (gates included), the data, the loss and
    the oracle's definition (the held-out key is unchanged from before it had one)."""
    suffix = "" if definition == "heldout" else f"|definition={definition}"
    h = hashlib.sha256(f"{CACHE_FORMAT}|groups={num_groups}{suffix}".encode())
    loss = keras.saving.serialize_keras_object(gated.loss)
    h.update(json.dumps(loss, sort_keys=True, default=str).encode())
    arrays = [(v.path, keras.ops.convert_to_numpy(v.value)) for v in gated.weights]
    arrays += [("data", np.asarray(t)) for b in batches for t in keras.tree.flatten(b) if t is not None]
    for name, a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"|{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _load_cache(path, key: str):
    if path is None or not os.path.exists(path):
        return None
    with np.load(path, allow_pickle=False) as f:
        if "key" in f and "deltas" in f and str(f["key"]) == key:
            return np.asarray(f["deltas"], dtype=np.float64)
    return None


def _save_cache(path, key: str, deltas) -> None:
    with open(path, "wb") as f:  # a file object: np.savez adds no ".npz"
        np.savez(f, deltas=deltas, key=np.array(key))


# ---- evaluation ------------------------------------------------------------
def _loss_function(gated, training: bool = False):
    """One compiled function: the model's compiled loss on a batch, in inference
    mode (or in training mode: BatchNorm normalises by the batch's statistics
    and moves its moving statistics, which the caller restores)."""

    @tf.function(reduce_retracing=True)
    def batch_loss(x, y, sample_weight):
        y_pred = gated(x, training=training)
        return gated.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training)

    return batch_loss


def _mean_loss(loss_fn, batches) -> float:
    """The loss averaged over every example: batch means weighted by batch size."""
    total, n = 0.0, 0
    for x, y, sw in batches:
        size = _num_examples(x)
        total += float(loss_fn(x, y, sw)) * size
        n += size
    return total / n


def _group_slots(gate_layers, graph) -> list:
    """For each group, `[(gate index, channel indices)]` of its member gates."""
    slots: list = [[] for _ in range(graph.num_groups)]
    for i, layer in enumerate(gate_layers):
        groups = graph.groups_of_layer_output(layer.name)
        for g in np.unique(groups[groups >= 0]).tolist():
            slots[g].append((i, np.flatnonzero(groups == g)))
    return slots


def _group_deltas(gate_layers, graph, measure, change, progress: bool) -> np.ndarray:
    """`change(measure() with group g's gates at 0, measure())` for every group
    (NaN for a group already removed); gates are set with `assign` and put
    back after each group."""
    original = [keras.ops.convert_to_numpy(l.gate.value) for l in gate_layers]
    base = measure()
    deltas = np.full(graph.num_groups, np.nan)
    # A live bar on a terminal; one line at the end in a log file.
    verbose = 1 if sys.stdout.isatty() else 2
    bar = keras.utils.Progbar(graph.num_groups, unit_name="group", verbose=verbose) if progress else None
    for g, slots in enumerate(_group_slots(gate_layers, graph)):
        if slots and any(np.any(original[i][ch] != 0) for i, ch in slots):
            for i, ch in slots:
                value = original[i].copy()
                value[ch] = 0.0
                gate_layers[i].gate.assign(value)
            deltas[g] = change(measure(), base)
            for i, _ in slots:
                gate_layers[i].gate.assign(original[i])
        if bar is not None:
            bar.update(g + 1)
    return deltas


def _evaluate(gated, gate_layers, graph, batches, progress: bool) -> np.ndarray:
    """ΔL of every group on the pooled batches, in inference mode; the caller
    restores the gates."""
    loss_fn = _loss_function(gated)
    return _group_deltas(gate_layers, graph, lambda: _mean_loss(loss_fn, batches), lambda new, base: new - base, progress)


def _evaluate_nvlabs(gated, gate_layers, graph, batches, progress: bool) -> np.ndarray:
    """`mean_b |L_b(gates of g at 0) − L_b|` of every group, in training mode
    (NVlabs/Taylor_pruning `run_full_oracle`, method 40); the caller restores
    gates and non-trainable variables."""
    loss_fn = _loss_function(gated, training=True)

    def per_batch():
        return np.array([float(loss_fn(x, y, sw)) for x, y, sw in batches])

    return _group_deltas(gate_layers, graph, per_batch, lambda new, base: float(np.mean(np.abs(new - base))), progress)


def _restore_metrics(gated, saved: dict) -> None:
    """Undoes the loss trackers' updates: a multi-output compiled loss tracks
    each output's loss, in metrics it creates on its first call."""
    for metric in gated.metrics:
        if any(id(v) not in saved for v in metric.variables):
            metric.reset_state()
    for v in gated.metrics_variables:
        if id(v) in saved:
            v.assign(saved[id(v)])


def oracle_deltas(
    gated, data, *, batch_size: int = 256, graph=None, cache=None, progress: bool = True, definition: str = "heldout"
) -> np.ndarray:
    """The CVPR'19 oracle: the loss change when each channel group alone is removed.

    For every channel group `g`, `ΔL_g = L(gates of g at 0) − L(gates as they
    are)`, with `L` the model's compiled loss (`gated.compute_loss`, as in
    training) averaged over every held-out example (batch means weighted by
    batch size), in inference mode. Removing a group by its gates equals
    removing it by surgery (`keras_taylor.apply_plan`), except that weight
    regularization penalties do not see the gates: they cancel in `ΔL`.

    The batches are read once, then every group is evaluated by the same
    compiled `tf.function` (no retracing per group). Gates are changed with
    `assign` and always restored, also on an error or `KeyboardInterrupt`.

    Args:
        gated: a compiled gated model (from `keras_taylor.add_gates`).
        data: `(x, y)` (or `(x, y, sample_weight)`) numpy arrays, evaluated in
            batches of `batch_size`, or a finite `tf.data.Dataset` of such
            batches.
        batch_size: batch size for array data. Defaults to `256`.
        graph: the model's `ChannelGraph`. Defaults to `analyze(gated)`.
        cache: optional path of an `.npz` file. When it holds deltas for the
            same model weights (gates included), data, loss and number of
            groups, they are returned without evaluating; otherwise the
            deltas are computed and the file is (over)written. Defaults to
            `None` (no cache).
        progress: show a `keras.utils.Progbar` over the groups. Defaults to
            `True`.
        definition: `"heldout"` (the pooled held-out loss change, inference
            mode) or `"nvlabs"` (mean over minibatches of `|ΔL_b|`, training
            mode). Defaults to `"heldout"`.

    Returns:
        A float64 array of shape `(graph.num_groups,)`: signed loss changes
        (positive: removing the group hurts) for `"heldout"`, mean absolute
        per-minibatch changes for `"nvlabs"`. Groups already pruned (every
        member gate at 0) are NaN.

    Raises:
        ValueError: if `gated` has no gates or is not compiled with a loss,
            if `graph` is not its graph, if `data` is empty or not
            `(x, y)` data, or for an unknown `definition`.

    Example:

    ```python
    deltas = keras_taylor.oracle.oracle_deltas(gated, (x_val[:2000], y_val[:2000]))
    ```

    References:
        Molchanov et al., "Importance Estimation for Neural Network Pruning",
        CVPR 2019 (the oracle).
    """
    if definition not in DEFINITIONS:
        raise ValueError(f"Expected definition in {DEFINITIONS}. Received: definition={definition!r}")
    gate_layers = _check_model(gated)
    graph = graph if graph is not None else graph_lib.analyze(gated, on_unknown="freeze")
    _check_graph(graph, gate_layers)
    batches = _materialize(data, batch_size)
    key = _cache_key(gated, batches, graph.num_groups, definition) if cache is not None else None
    cached = _load_cache(cache, key)
    if cached is not None and cached.shape == (graph.num_groups,):
        return cached
    gate_values = [keras.ops.convert_to_numpy(l.gate.value) for l in gate_layers]
    metric_values = {id(v): keras.ops.convert_to_numpy(v.value) for v in gated.metrics_variables}
    # Training mode moves BatchNorm's moving statistics: put every variable back.
    state = [(v, keras.ops.convert_to_numpy(v.value)) for v in gated.non_trainable_variables] if definition == "nvlabs" else []
    evaluate = _evaluate_nvlabs if definition == "nvlabs" else _evaluate
    try:
        deltas = evaluate(gated, gate_layers, graph, batches, progress)
    finally:
        for v, value in state:
            v.assign(value)
        for layer, value in zip(gate_layers, gate_values):
            layer.gate.assign(value)
        _restore_metrics(gated, metric_values)
    if cache is not None:
        _save_cache(cache, key, deltas)
    return deltas


# ---- labels and correlations -----------------------------------------------
def group_labels(graph) -> list:
    """For each group, the layer(s) whose output channels it holds:
    `graph.group_labels()` (see `ChannelGraph.group_labels`). This is the
    "layer" of per-layer correlations in `rank_correlations`.

    Args:
        graph: a `ChannelGraph` (`keras_taylor.analyze(model)`).

    Returns:
        A list of `graph.num_groups` strings.
    """
    return graph.group_labels()


def _scipy_stats():
    try:
        from scipy import stats
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "keras_taylor.oracle.rank_correlations needs scipy, which is not installed. "
            "Install it with `pip install scipy` (or `pip install keras_taylor[test]`)."
        ) from e
    return stats


_STATS = ("spearman", "kendall", "pearson")


def _pair(stats, a, b) -> dict:
    """Spearman, Kendall and Pearson of two vectors (NaN when fewer than 2 or constant)."""
    if len(a) < 2:
        return {"spearman": float("nan"), "kendall": float("nan"), "pearson": float("nan"), "n": int(len(a))}
    with warnings.catch_warnings():  # a constant input gives NaN, reported as such
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        rho = stats.spearmanr(a, b).statistic
        tau = stats.kendalltau(a, b).statistic
        r = stats.pearsonr(a, b).statistic if np.ptp(a) > 0 and np.ptp(b) > 0 else float("nan")
    return {"spearman": float(rho), "kendall": float(tau), "pearson": float(r), "n": int(len(a))}


def _summaries(per_layer: dict) -> tuple:
    """Median over layers, the group-count-weighted mean and the plain mean
    (NVlabs/NViT `plots/tools.py` `compute_stats`: "Mean per layer"), of each
    statistic, over the layers where it is finite."""
    median, weighted, mean = {}, {}, {}
    for stat in _STATS:
        vals = np.array([r[stat] for r in per_layer.values()], dtype=np.float64)
        counts = np.array([r["n"] for r in per_layer.values()], dtype=np.float64)
        ok = np.isfinite(vals)
        median[stat] = float(np.median(vals[ok])) if ok.any() else float("nan")
        weighted[stat] = float(np.average(vals[ok], weights=counts[ok])) if ok.any() else float("nan")
        mean[stat] = float(np.mean(vals[ok])) if ok.any() else float("nan")
    return median, weighted, mean


def _check_lengths(scores, oracle, labels) -> None:
    if not isinstance(scores, dict) or not scores:
        raise ValueError(
            "Expected scores as a non-empty dict {criterion name: array}. Received: "
            f"scores of type {type(scores).__name__}."
        )
    for name, s in scores.items():
        if np.shape(s) != oracle.shape:
            raise ValueError(
                f"Expected scores[{name!r}] to have one value per group, shape {oracle.shape}. "
                f"Received: shape {np.shape(s)}."
            )
    if labels is not None and len(labels) != len(oracle):
        raise ValueError(
            f"Expected labels with one entry per group ({len(oracle)}). Received: {len(labels)} labels."
        )


def rank_correlations(scores: dict, oracle, labels=None, min_per_layer: int = 3) -> dict:
    """Rank correlations of criteria with the oracle's `|ΔL|` (CVPR'19 Table 1).

    Groups where a score or the oracle is not finite (NaN: already pruned)
    are left out. Reported as NVlabs' NViT code (`plots/tools.py`,
    `compute_stats`) reports them: Spearman, Kendall and Pearson over all
    groups ("over all layers") and per layer, with the plain mean of the
    per-layer values ("mean per layer", `layer_mean`).

    Args:
        scores: `{criterion name: array of one score per group}`.
        oracle: the `oracle_deltas` of the same groups; its absolute value is
            the reference ranking.
        labels: the layer label of each group (`group_labels(graph)`), for
            per-layer correlations. Defaults to `None` (none).
        min_per_layer: layers with fewer valid groups are left out of the
            per-layer results. Defaults to `3`.

    Returns:
        A JSON-able dict `{criterion: {"spearman", "kendall", "pearson", "n",
        "per_layer": {label: {"spearman", "kendall", "pearson", "n"}},
        "layer_median": {...}, "layer_weighted_mean": {...}, "layer_mean":
        {...}}}`, each summary holding `"spearman"`, `"kendall"` and
        `"pearson"`; `layer_weighted_mean` weights each layer by its number of
        groups, `layer_mean` weights every layer alike.

    Raises:
        ValueError: if a score array or `labels` does not have one entry per
            group.
        ImportError: if scipy is not installed.
    """
    oracle = np.abs(np.asarray(oracle, dtype=np.float64))
    _check_lengths(scores, oracle, labels)
    stats = _scipy_stats()
    labels = np.asarray(labels if labels is not None else [""] * len(oracle), dtype=object)
    result = {}
    for name, s in scores.items():
        s = np.asarray(s, dtype=np.float64)
        ok = np.isfinite(s) & np.isfinite(oracle)
        entry = _pair(stats, s[ok], oracle[ok])
        per_layer = {}
        for label in sorted(set(labels[ok].tolist())):
            sel = ok & (labels == label)
            if int(sel.sum()) >= min_per_layer:
                per_layer[str(label)] = _pair(stats, s[sel], oracle[sel])
        entry["per_layer"] = per_layer
        entry["layer_median"], entry["layer_weighted_mean"], entry["layer_mean"] = _summaries(per_layer)
        result[str(name)] = entry
    return result


# ---- plot ------------------------------------------------------------------
def _scatter(ax, title, s, oracle) -> None:
    ok = np.isfinite(s) & np.isfinite(oracle)
    s, o = s[ok], np.abs(oracle[ok])
    if len(s) and np.all(s > 0) and np.all(o > 0):
        ax.scatter(o, s, s=8, alpha=0.6, color="#d1603d")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("|ΔL| (oracle)")
        ax.set_ylabel("score")
    else:  # zeros or negative scores: ranks
        rank = _scipy_stats().rankdata
        ax.scatter(rank(o), rank(s), s=8, alpha=0.6, color="#4c72b0")
        ax.set_xlabel("rank of |ΔL| (oracle)")
        ax.set_ylabel("rank of score")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)


def plot_correlations(correlations: dict, scores: dict, oracle, path) -> str:
    """Writes a PNG: rank correlations per criterion, and score vs `|ΔL|` scatters.

    The top panel shows Spearman and Kendall over all groups for each
    criterion; below, one scatter plot per criterion of its scores against
    the oracle's `|ΔL|`, log-log when both are positive, rank against rank
    otherwise.

    Args:
        correlations: the result of `rank_correlations`.
        scores: `{criterion name: array of one score per group}`.
        oracle: the `oracle_deltas`.
        path: the PNG file to write.

    Returns:
        `path`, as a string.

    Raises:
        ValueError: if a score array does not have one entry per group.
        ImportError: if matplotlib or scipy is not installed.
    """
    oracle = np.asarray(oracle, dtype=np.float64)
    _check_lengths(scores, oracle, None)
    names = list(scores)
    cols = min(3, len(names))
    rows = 1 + -(-len(names) // cols)
    fig = new_figure(figsize=(4.0 * cols + 1.0, 3.2 * rows), layout="constrained")
    grid = fig.add_gridspec(rows, cols)
    ax = fig.add_subplot(grid[0, :])
    x = np.arange(len(names))
    for off, stat, color in ((-0.2, "spearman", "#4c72b0"), (0.2, "kendall", "#d1603d")):
        ax.bar(x + off, [correlations.get(n, {}).get(stat, np.nan) for n in names], 0.4, label=stat, color=color)
    ax.set_xticks(x, names, fontsize=8, rotation=30, ha="right")
    ax.set_ylabel("rank correlation with |ΔL|")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    for k, name in enumerate(names):
        r = correlations.get(name, {})
        title = f"{name} (ρ={r.get('spearman', np.nan):.2f}, n={r.get('n', '?')})"
        _scatter(fig.add_subplot(grid[1 + k // cols, k % cols]), title, np.asarray(scores[name], np.float64), oracle)
    path = os.fspath(path)
    fig.savefig(path, format="png", dpi=100)
    return path
