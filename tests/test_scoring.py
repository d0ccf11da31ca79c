"""Tests for `keras_taylor.scoring.TaylorScorer` on a tiny gated model:
segment sums per channel group, the score accumulators and their counters,
the NaN/Inf guard, the host-side state round trips, and install/uninstall."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_taylor as kt
from keras_taylor.gates import COUNTERS
from keras_taylor.scoring import TaylorScorer


def _residual_model() -> keras.Model:
    """Two convs tied by an Add (one residual stream: groups span 2 gates), one free conv."""
    inputs = keras.Input((6, 6, 2))
    a = keras.layers.BatchNormalization(name="bn_a")(keras.layers.Conv2D(4, 3, padding="same", name="a")(inputs))
    b = keras.layers.BatchNormalization(name="bn_b")(keras.layers.Conv2D(4, 3, padding="same", name="b")(a))
    x = keras.layers.ReLU()(keras.layers.Add()([a, b]))
    c = keras.layers.BatchNormalization(name="bn_c")(keras.layers.Conv2D(3, 3, name="c")(x))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.ReLU()(c))
    return keras.Model(inputs, keras.layers.Dense(2, name="out")(x))


@pytest.fixture
def setup():
    keras.utils.set_random_seed(0)
    gated = kt.add_gates(_residual_model())
    gated.compile(optimizer=keras.optimizers.SGD(0.0), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    graph = kt.analyze(gated)
    return gated, graph, TaylorScorer(gated, graph)


def _gate_grads(scorer, fn):
    """One gradient tensor per gate: `fn(gate_index, channel)` per channel."""
    return [
        tf.constant([fn(i, ch) for ch in range(gate.channels)], tf.float32)
        for i, gate in enumerate(scorer.gates)
    ]


def _reference_sums(scorer, graph, grads):
    out = np.zeros(graph.num_groups)
    for gate, g in zip(scorer.gates, grads):
        groups = graph.groups_of_layer_output(gate.name)
        for ch, group in enumerate(groups.tolist()):
            if group >= 0:
                out[group] += float(g.numpy()[ch])
    return out


def test_segment_sums_add_the_members_of_each_group(setup):
    gated, graph, scorer = setup
    assert graph.num_groups == 4 + 3  # the stream (a+b) and c
    assert len(scorer.gates) == 3
    grads = _gate_grads(scorer, lambda i, ch: 10.0 ** i * (ch + 1))
    sums = scorer.group_gate_grads(grads).numpy()
    np.testing.assert_allclose(sums, _reference_sums(scorer, graph, grads), rtol=1e-6)
    # A group of the stream holds one channel of bn_a and one of bn_b: 1*(ch+1) + 10*(ch+1).
    labels = graph.group_labels()
    stream = [g for g, label in enumerate(labels) if label == "a+b"]
    np.testing.assert_allclose(sorted(sums[stream]), [11.0, 22.0, 33.0, 44.0])
    for gate in scorer.gates:
        groups = scorer.gate_groups_of(gate)
        assert groups.shape == (gate.channels,) and groups.max() < graph.num_groups


def test_accumulate_and_read_the_mean(setup):
    _, graph, scorer = setup
    g1 = _gate_grads(scorer, lambda i, ch: 1.0 + ch)
    g2 = _gate_grads(scorer, lambda i, ch: -2.0 * i)
    scorer.accumulate(g1)
    scorer.accumulate(g2)
    mean, steps = scorer.read()
    assert steps == 2.0
    expected = (_reference_sums(scorer, graph, g1) ** 2 + _reference_sums(scorer, graph, g2) ** 2) / 2  # Taylor-FO-BN
    np.testing.assert_allclose(mean, expected, rtol=1e-6)
    counters = scorer.counters()
    assert counters["window_steps"] == 2 and counters["batches"] == 2 and counters["skipped"] == 0
    # Every member channel of a group holds the group's running sum.
    for gate in scorer.gates:
        groups = scorer.gate_groups_of(gate)
        np.testing.assert_allclose(gate.score.numpy(), 2 * expected[groups], rtol=1e-6)


def test_non_finite_batches_are_skipped(setup):
    _, graph, scorer = setup
    good = _gate_grads(scorer, lambda i, ch: 1.0)
    scorer.accumulate(good)
    for bad_value in (np.nan, np.inf):
        scorer.accumulate(_gate_grads(scorer, lambda i, ch, v=bad_value: v if (i, ch) == (2, 1) else 1.0))
    # A batch whose weight gradients overflowed (mixed precision) is skipped too.
    scorer.accumulate(good, batch_finite=tf.constant(False))
    mean, steps = scorer.read()
    assert steps == 1.0
    np.testing.assert_allclose(mean, _reference_sums(scorer, graph, good) ** 2, rtol=1e-6)
    assert np.all(np.isfinite(mean))
    counters = scorer.counters()
    assert counters["skipped"] == 3 and counters["batches"] == 4
    assert float(scorer.skipped.numpy()) == 3


def test_host_state_round_trips(setup):
    _, graph, scorer = setup
    n = graph.num_groups
    sums = np.arange(n, dtype="float32") * 3.0
    scorer.write_window(sums, 3.0)
    mean, steps = scorer.read()
    assert steps == 3.0
    np.testing.assert_allclose(mean, sums / 3.0, rtol=1e-6)
    ema = np.linspace(0.5, 2.0, n).astype("float32")
    scorer.write_state(ema, step=12, events_increment=1)
    np.testing.assert_allclose(scorer.read_ema(), ema, rtol=1e-6)
    counters = scorer.counters()
    assert counters["batches"] == 12 and counters["last_event"] == 12 and counters["events"] == 1
    assert set(counters) == set(COUNTERS)
    scorer.reset()
    mean, steps = scorer.read()
    assert steps == 0.0 and not np.any(mean)
    np.testing.assert_allclose(scorer.read_ema(), ema, rtol=1e-6)  # reset clears the window only


def test_bn_groups_and_sources(setup):
    _, graph, scorer = setup
    assert scorer.bn_groups.shape == (graph.num_groups,) and scorer.bn_groups.all()
    assert len(scorer.bn_sources) == 3
    # Filter sources: kernel and bias of each layer that makes channels (a, b, c, out).
    assert sorted(graph.creating_layers()) == ["a", "b", "c", "out"]
    assert len(scorer.filter_sources) == 8


def test_install_scores_in_fit_and_uninstall_restores(setup):
    gated, graph, scorer = setup
    x = np.random.default_rng(0).normal(size=(8, 6, 6, 2)).astype("float32")
    y = np.array([0, 1] * 4)
    gated.fit(x, y, batch_size=4, epochs=1, verbose=0)
    own = gated.train_function
    scorer.install()
    assert gated.train_function is not own
    gated.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False)
    mean, steps = scorer.read()
    assert steps == 2.0 and np.all(np.isfinite(mean)) and np.any(mean > 0)

    # The scores are the squared gate gradients of each minibatch (lr=0: the
    # weights do not move), summed per group, averaged over the minibatches.
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    expected = np.zeros(graph.num_groups)
    for start in (0, 4):
        gates = [gate.gate.value for gate in scorer.gates]
        with tf.GradientTape() as tape:
            for v in gates:
                tape.watch(v)
            loss = loss_fn(y[start:start + 4], gated(x[start:start + 4], training=True))
        grads = tape.gradient(loss, gates)
        expected += _reference_sums(scorer, graph, grads) ** 2 / 2
    np.testing.assert_allclose(mean, expected, rtol=1e-3, atol=1e-12)

    scorer.uninstall()
    assert gated.train_function is own
    gated.fit(x, y, batch_size=4, epochs=1, verbose=0)
    assert scorer.read()[1] == 2.0  # the model's own step does not score
