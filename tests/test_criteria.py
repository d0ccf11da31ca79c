"""Every criterion, accumulated in the train step, against a slow independent reference.

The reference replays the gated model's graph eagerly (`_compat.run_graph`)
and, for each example `b` in turn, multiplies every gate output by
`1 + onehot(b) ⊗ δ` and takes `∂L/∂δ` with its own `GradientTape`: that is the
per-example gate gradient `E_b = Σ_{h,w} a_b·g_b` of every channel, computed
one example at a time. Weight criteria are recomputed in numpy from
`get_weights()` and an eager tape on the kernels. Nothing is shared with
`scoring.py` except the channel groups of `analyze`.
"""

import inspect

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_taylor as kt
from keras_taylor import _compat, criteria, testing
from conftest import images, make

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
MODELS = ("residual", "concat", "depthwise", "transpose")
BATCH = 8


def _data(n, seed=0, classes=2):
    return images(n, seed), np.random.default_rng(seed).integers(0, classes, n)


def _classes(name):
    return {"residual": 5, "concat": 4, "depthwise": 3, "transpose": 2}[name]


def _forward(gated, x, deltas=None, example=None, record=None):
    """Replays the gated graph in training mode; optionally scales example
    `example` of every gate output by `1 + delta` (per channel)."""

    def call(op, *args, **kwargs):
        if isinstance(op, keras.layers.Layer) and "training" in inspect.signature(op.call).parameters:
            kwargs["training"] = True
        out = op(*args, **kwargs)
        if isinstance(op, kt.ChannelGate):
            axis = op.channel_axis
            if record is not None:
                record.append((op, out))
            if deltas is not None:
                shape = [1] * len(out.shape)
                shape[axis] = -1
                d = tf.reshape(deltas[op.name], shape)
                mask = tf.reshape(tf.one_hot(example, tf.shape(out)[0]), [-1] + [1] * (len(out.shape) - 1))
                out = out * (1.0 + mask * d)
        return out

    return _compat.run_graph(gated, [tf.convert_to_tensor(x)], call)


def _group_sum(graph, per_gate, agg=np.add):
    """Sums `{gate name: per-channel array (..., C)}` per group -> (..., G)."""
    first = next(iter(per_gate.values()))
    out = np.zeros(first.shape[:-1] + (graph.num_groups,))
    for name, values in per_gate.items():
        groups = graph.groups_of_layer_output(name)
        for ch, g in enumerate(groups.tolist()):
            if g >= 0:
                out[..., g] += values[..., ch]
    return out


def _kernel_by_output(layer, weights):
    """Per output channel, the flattened weights a Conv/Dense uses to make it."""
    rows = []
    for w in weights:
        if isinstance(layer, keras.layers.SeparableConv2D) and w.ndim == 4 and w.shape[0] > 1:
            continue  # the depthwise kernel is per input channel
        if isinstance(layer, keras.layers.Conv2DTranspose) and w.ndim == 4:
            w = np.moveaxis(w, -2, -1)
        rows.append(w.reshape(-1, w.shape[-1]))
    return np.concatenate(rows, axis=0)


def reference(gated, graph, x, y):
    """Every criterion's quantities for one minibatch, the slow way."""
    gates = [l for l in gated.layers if isinstance(l, kt.ChannelGate)]
    n = len(x)
    # Per-example gate gradients, one example (and one tape) at a time.
    per_example = {l.name: np.zeros((n, l.channels)) for l in gates}
    for b in range(n):
        deltas = {l.name: tf.Variable(tf.zeros(l.channels)) for l in gates}
        with tf.GradientTape() as tape:
            loss = LOSS(y, _forward(gated, x, deltas, b))
        grads = tape.gradient(loss, list(deltas.values()))
        for l, g in zip(gates, grads):
            per_example[l.name][b] = np.zeros(l.channels) if g is None else g.numpy()
    # Activations (the gate outputs) and their gradients.
    record = []
    with tf.GradientTape() as tape:
        loss = LOSS(y, _forward(gated, x, record=record))
    grads = tape.gradient(loss, [t for _, t in record])
    acts, prods = {}, {}
    for (gate, a), g in zip(record, grads):
        a = np.moveaxis(a.numpy().astype("float64"), gate.channel_axis, -1).reshape(n, -1, gate.channels)
        g = np.moveaxis(g.numpy().astype("float64"), gate.channel_axis, -1).reshape(n, -1, gate.channels)
        acts[gate.name], prods[gate.name] = a, a * g
    spatial = {k: v.shape[1] for k, v in acts.items()}
    E = _group_sum(graph, per_example)  # (B, G)
    E_mean = _group_sum(graph, {k: v / spatial[k] for k, v in per_example.items()})
    relu = {k: np.maximum(v, 0.0) for k, v in acts.items()}
    count = _group_sum(graph, {k: np.full(v.shape[-1], v.shape[0] * v.shape[1]) for k, v in acts.items()})
    r_sum = _group_sum(graph, {k: v.sum(axis=(0, 1)) for k, v in relu.items()})
    r_sq = _group_sum(graph, {k: (v**2).sum(axis=(0, 1)) for k, v in relu.items()})
    zeros = _group_sum(graph, {k: (v <= 0).sum(axis=(0, 1)) for k, v in acts.items()})
    mean = r_sum / count
    # Weights: every Conv/Dense that writes a group's channels.
    creating = graph.creating_layers()
    layers = {name: graph.first_node(name).inner for name in creating}
    variables = [v for layer in layers.values() for v in layer.trainable_weights]
    with tf.GradientTape() as tape:
        loss = LOSS(y, _forward(gated, x))
    wgrads = dict(zip([id(v) for v in variables], tape.gradient(loss, variables)))
    fo_w, l1, sq = (np.zeros(graph.num_groups) for _ in range(3))
    for name, out_map in creating.items():
        layer = layers[name]
        groups = graph.group_of_comp[graph.comp_of[out_map]]
        ws = [v.numpy().astype("float64") for v in layer.trainable_weights]
        gs = [wgrads[id(v)].numpy().astype("float64") for v in layer.trainable_weights]
        w, g = _kernel_by_output(layer, ws), _kernel_by_output(layer, gs)
        for ch, grp in enumerate(groups.tolist()):
            if grp >= 0:
                fo_w[grp] += np.sum(w[:, ch] * g[:, ch])
                l1[grp] += np.sum(np.abs(w[:, ch]))
                sq[grp] += np.sum(w[:, ch] ** 2)
    gammas = {l.name: np.abs(l.layer.gamma.numpy()) for l in gates if isinstance(l.layer, keras.layers.BatchNormalization)}
    bn = _group_sum(graph, gammas) if gammas else np.zeros(graph.num_groups)
    group_grad = E.sum(axis=0)
    return {
        "taylor_fo_bn": group_grad**2,
        "taylor_fo_weight": fo_w**2,
        "taylor_fo_fg": (E**2).sum(axis=0),
        "taylor_so": (-group_grad + 0.5 * n * (E**2).sum(axis=0)) ** 2,
        "iclr17_taylor": np.abs(E_mean).mean(axis=0),
        "iclr17_taylor_nvlabs": _group_sum(graph, {k: np.abs(v).mean(axis=1).mean(axis=0) for k, v in prods.items()}),
        "bn_scale": bn,
        "weight_l1": l1,
        "weight_l2": np.sqrt(sq),
        "activation_mean": mean,
        "activation_std": np.sqrt(np.maximum(r_sq / count - mean**2, 0.0)),
        "apoz": 1.0 - zeros / count,
        # consistency: the per-example gradients sum to the gate gradient
        "_E_sum": group_grad,
    }


def fit_scores(model_name, criterion, steps=2, jit=False, seed=0):
    model = make(model_name, seed)
    gated = kt.add_gates(model)
    x, y = _data(BATCH * steps, seed, _classes(model_name))
    gated.compile(optimizer=keras.optimizers.SGD(0.0), loss=LOSS, jit_compile=jit)
    graph = kt.analyze(gated)
    refs = [reference(gated, graph, x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, len(x), BATCH)]
    pruner = kt.TaylorPruning(target=0.5, prune_every=10_000, criterion=criterion)
    gated.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[pruner])
    scores, n = pruner.scorer.read()
    assert n == steps
    ref = np.mean([r[criterion if isinstance(criterion, str) else criterion.name] for r in refs], axis=0)
    return scores, ref, refs, graph


def _close(scores, ref, rtol):
    scale = max(float(np.max(np.abs(ref))), 1e-12)
    np.testing.assert_allclose(scores, ref, rtol=rtol, atol=rtol * scale)


ALL = [c for c in criteria.names() if c != "random"]


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("criterion", ALL)
def test_criterion_matches_per_example_reference(model_name, criterion):
    scores, ref, refs, graph = fit_scores(model_name, criterion)
    assert np.all(np.isfinite(scores))
    # Behind a training-mode BN, Σ w·∂L/∂w is a float32 cancellation (BN makes
    # the loss invariant to a filter's scale): ~1e-7, so a looser tolerance.
    _close(scores, ref, rtol=5e-3 if criterion == "taylor_fo_weight" else 2e-4)
    # The reference is not degenerate (the comparison could fail).
    assert np.ptp(ref) > 0


@pytest.mark.parametrize("model_name", MODELS)
def test_per_example_gradients_sum_to_gate_gradient(model_name):
    """Σ_b E_b (one tape per example) equals ∂L/∂m from one batch tape: the
    reference's per-example loop is itself checked against the FO score."""
    model = make(model_name)
    gated = kt.add_gates(model)
    graph = kt.analyze(gated)
    x, y = _data(BATCH, 0, _classes(model_name))
    ref = reference(gated, graph, x, y)
    fo = testing.reference_scores(gated, x, y, BATCH, LOSS, graph)
    _close(ref["_E_sum"] ** 2, fo, rtol=1e-4)


@pytest.mark.parametrize("criterion", ["taylor_fo_fg", "iclr17_taylor", "apoz", "taylor_fo_weight"])
def test_criteria_under_jit_and_steps_per_execution(criterion):
    scores, ref, _, _ = fit_scores("residual", criterion, steps=3, jit=True)
    _close(scores, ref, rtol=5e-3 if criterion == "taylor_fo_weight" else 2e-4)


def test_random_criterion_is_uniform_seeded_and_fresh_each_step():
    model = make("residual")
    gated = kt.add_gates(model)
    x, y = _data(8, 0, 5)
    gated.compile(optimizer=keras.optimizers.SGD(0.0), loss=LOSS)
    scorer = kt.TaylorScorer(gated, kt.analyze(gated), criteria.Random(seed=3))
    scorer.install()
    first = []
    for _ in range(2):
        scorer.reset()
        gated.fit(x, y, batch_size=8, epochs=1, verbose=0)
        first.append(scorer.read()[0])
    scorer.uninstall()
    assert np.all((first[0] >= 0) & (first[0] < 1)) and not np.allclose(first[0], first[1])


def test_iclr17_rank_normalizes_per_layer_and_regularizes_flops():
    labels = np.array(["a", "a", "b", "b", "b"])
    ctx = criteria.RankingContext(labels, group_flops=lambda: np.array([2.0, 2.0, 4.0, 4.0, 4.0]))
    scores = np.array([3.0, 4.0, 1.0, 2.0, 2.0])
    plain = criteria.ICLR17Taylor().rank(scores, ctx)
    np.testing.assert_allclose(plain, [0.6, 0.8, 1 / 3, 2 / 3, 2 / 3])
    reg = criteria.ICLR17Taylor(flops_regularization=0.1).rank(scores, ctx)
    np.testing.assert_allclose(reg, plain - 0.1 * np.array([0.5, 0.5, 1.0, 1.0, 1.0]))
    assert np.array_equal(criteria.TaylorFOBN().rank(scores, ctx), scores)


def test_bn_scale_never_removes_groups_without_bn():
    ctx = criteria.RankingContext(["a", "b"], bn_groups=[True, False])
    out = criteria.BNScale().rank(np.array([0.0, 0.0]), ctx)
    assert out[0] == 0.0 and np.isnan(out[1])


@pytest.mark.parametrize("criterion", ["iclr17_taylor", "weight_l2", "bn_scale", "apoz", "taylor_so", "random"])
def test_pruning_runs_to_target_with_every_criterion_kind(criterion):
    """Each kind of criterion drives a whole pruning run to its target, and
    the pruned model equals the gated one."""
    model = make("residual")
    gated = kt.add_gates(model)
    x, y = _data(64, 1, 5)
    gated.compile(optimizer=keras.optimizers.SGD(0.01), loss=LOSS)
    pruner = kt.TaylorPruning(target=0.6, prune_every=2, channels_per_step=2, criterion=criterion)
    gated.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0, callbacks=[pruner])
    assert pruner.done and pruner.history[-1]["flops_fraction"] <= 0.6
    small = kt.prune(gated)
    np.testing.assert_allclose(small.predict(x[:8], verbose=0), gated.predict(x[:8], verbose=0), rtol=1e-4, atol=1e-5)


def test_criteria_choose_differently():
    """The criteria are not one ranking under different names."""
    orders = {}
    for c in ("taylor_fo_bn", "weight_l2", "activation_mean", "bn_scale"):
        scores, _, _, _ = fit_scores("residual", c)
        orders[c] = tuple(np.argsort(scores, kind="stable")[:4])
    assert len(set(orders.values())) == len(orders)


def test_unknown_criterion_and_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="criterion='nope'"):
        kt.TaylorPruning(criterion="nope")
    with pytest.raises(ValueError, match="flops_regularization"):
        criteria.ICLR17Taylor(flops_regularization=-1)
    with pytest.raises(ValueError, match="seed"):
        criteria.Random(seed="x")
